/*
 * The smallest complete libsaga program: a 3-step trip-booking saga whose last step fails,
 * so the first two are compensated in reverse order. Orchestrator and participants share
 * one node and one in-memory transport; the database is trip.db in the current folder
 * (or the path given as the first argument).
 */
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include <saga.h>

/* Participants. Real ones would write business rows with saga_tx_db(tx). */
static int book_flight(saga_tx *tx, const saga_msg *cmd, saga_reply *r, void *arg) {
  printf("  flight booked for %s\n", saga_data_get_str(saga_msg_data(cmd), "traveller"));
  return saga_reply_set_str(r, "flight", "LH-1234");
}
static int cancel_flight(saga_tx *tx, const saga_msg *cmd, saga_reply *r, void *arg) {
  printf("  flight %s cancelled\n", saga_data_get_str(saga_msg_data(cmd), "flight"));
  return SAGA_OK;
}
static int book_hotel(saga_tx *tx, const saga_msg *cmd, saga_reply *r, void *arg) {
  printf("  hotel booked\n");
  return saga_reply_set_str(r, "hotel", "H-77");
}
static int cancel_hotel(saga_tx *tx, const saga_msg *cmd, saga_reply *r, void *arg) {
  printf("  hotel %s cancelled\n", saga_data_get_str(saga_msg_data(cmd), "hotel"));
  return SAGA_OK;
}
static int charge_card(saga_tx *tx, const saga_msg *cmd, saga_reply *r, void *arg) {
  printf("  card declined\n");
  return saga_reply_fail(r, "card declined");
}

/* The saga: a static table of steps. The payment is the pivot. */
static const saga_step trip_steps[] = {
    {.name = "BOOK_FLIGHT", .channel = "travel", .action = "flight.book",
     .compensation = "flight.cancel", .timeout_ms = 5000},
    {.name = "BOOK_HOTEL", .channel = "travel", .action = "hotel.book",
     .compensation = "hotel.cancel", .timeout_ms = 5000},
    {.name = "CHARGE_CARD", .channel = "payment", .action = "card.charge",
     .kind = SAGA_STEP_PIVOT, .timeout_ms = 5000},
};
static const saga_definition trip = {.struct_version = SAGA_DEFINITION_VERSION,
                                     .name = "trip", .version = 1, .steps = trip_steps,
                                     .nsteps = 3, .step_size = sizeof(saga_step)};

static saga_mem_hub *hub;

static void closed(void *arg) { saga_mem_hub_close(hub); }

static void on_event(saga_node *node, const saga_event *ev, void *arg) {
  printf("[%s] %-18s %s %s\n", saga_state_name(ev->state), saga_event_name(ev->type),
         ev->step_name, ev->detail);
  if (ev->type == SAGA_EV_COMPLETED || ev->type == SAGA_EV_SAGA_COMPENSATED ||
      ev->type == SAGA_EV_SAGA_FAILED)
    saga_node_close(node, closed, NULL);
}

static void started(saga_node *node, int status, const char *id, int existed, void *arg) {
  if (status != SAGA_OK) {
    fprintf(stderr, "start failed: %s\n", saga_strerror(status));
    saga_node_close(node, closed, NULL);
    return;
  }
  printf("saga %s started%s\n", id, existed ? " (already existed)" : "");
}

int main(int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  saga_transport *t = NULL;
  saga_node *node = NULL;
  char err[256];
  int rc = saga_mem_hub_new(&hub, loop, NULL, NULL, NULL);
  if (rc == SAGA_OK) rc = saga_mem_transport_new(&t, hub);
  if (rc != SAGA_OK) {
    fprintf(stderr, "transport: %s\n", saga_strerror(rc));
    return 1;
  }
  saga_node_config cfg;
  saga_node_config_init(&cfg);
  cfg.db_mode = SAGA_DB_CREATE; /* makes trip.db on the first run */
  cfg.name = "trips";
  cfg.db_path = argc > 1 ? argv[1] : "trip.db";
  cfg.transport = t;
  cfg.on_event = on_event;
  rc = saga_node_open(&node, loop, &cfg, err, sizeof err);
  if (rc != SAGA_OK) {
    fprintf(stderr, "open: %s\n", err);
    return 1;
  }
  if ((rc = saga_node_register(node, &trip)) != SAGA_OK ||
      (rc = saga_node_handle(node, "travel", "flight.book", book_flight, NULL)) != SAGA_OK ||
      (rc = saga_node_handle(node, "travel", "flight.cancel", cancel_flight, NULL)) != SAGA_OK ||
      (rc = saga_node_handle(node, "travel", "hotel.book", book_hotel, NULL)) != SAGA_OK ||
      (rc = saga_node_handle(node, "travel", "hotel.cancel", cancel_hotel, NULL)) != SAGA_OK ||
      (rc = saga_node_handle(node, "payment", "card.charge", charge_card, NULL)) != SAGA_OK ||
      (rc = saga_node_start(node, NULL)) != SAGA_OK) {
    fprintf(stderr, "setup: %s\n", saga_node_errmsg(node));
    return 1;
  }
  saga_data *input = NULL;
  saga_data_new(&input, NULL);
  saga_data_set_str(input, "traveller", "Ada");
  rc = saga_start(node, "trip", input, NULL, started, NULL);
  saga_data_free(input);
  if (rc != SAGA_OK) {
    fprintf(stderr, "start: %s\n", saga_node_errmsg(node));
    return 1;
  }
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
