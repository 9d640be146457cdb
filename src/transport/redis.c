/* The redis transport: being written. */
