/* The nats transport: being written. */
