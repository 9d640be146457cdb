/*
 * FTGO's Create Order saga (Richardson, Microservices Patterns, ch. 4): four services, each
 * a process with its own database, over TCP. The Order service orchestrates; Consumer,
 * Kitchen and Accounting are participants. README.md tells the story; docs/patterns.md the
 * patterns (semantic locks, the pivot).
 */
#ifndef FTGO_H
#define FTGO_H

#include <sqlite3.h>

#include <saga.h>
#include <uv.h>

/* The business tables and seed data of a service ("order", "consumer", "kitchen",
 * "accounting"), created in its node's database. 0 or -1. */
int ftgo_schema(sqlite3 *db, const char *service);

/* Registers the handlers of a participant service on its node (channel = service name). */
int ftgo_participant_register(saga_node *node, const char *service);

/* ---- the Order service: orchestrator of create_order and cancel_order ---------------------- */

typedef struct ftgo_order_svc {
  uv_loop_t *loop;
  saga_node *node;
  sqlite3 *app; /* the service's own connection, for requests outside sagas (revise) */
} ftgo_order_svc;

/* Opens the Order service's node on db_path (created), listening on listen, with routes to
 * the three participants, and its own connection. 0 or -1 (err says why). */
int ftgo_order_open(ftgo_order_svc *s, uv_loop_t *loop, const char *db_path, const char *listen,
                    const char *consumer, const char *kitchen, const char *accounting, char *err,
                    size_t errlen);
void ftgo_order_close(ftgo_order_svc *s);

/* An order as the client asks for it. */
typedef struct ftgo_order_req {
  const char *order, *consumer, *restaurant, *item, *card;
  int qty, amount;
} ftgo_order_req;

/* Starts the Create Order saga (idempotency key "create-<order>"); runs the loop until the
 * saga is started; its id into id (40 bytes). 0 or -1. */
int ftgo_create_order(ftgo_order_svc *s, const ftgo_order_req *r, char *id);
/* Starts a Cancel Order saga for order (key "cancel-<order>-<n>"); id as above. */
int ftgo_cancel_order(ftgo_order_svc *s, const char *order, int n, char *id);
/* reviseOrder: a local transaction on the service's own connection, refused while a saga
 * holds the order (its semantic lock) or when the order is not APPROVED. 1 revised, 0
 * refused (why says why), -1 error. */
int ftgo_revise_order(ftgo_order_svc *s, const char *order, int qty, char *why, size_t len);
/* Runs the loop until saga id ends (or timeout_ms of real time); its state, or -1. */
int ftgo_wait(ftgo_order_svc *s, const char *id, uint64_t timeout_ms);
/* Runs the loop until saga id waits for the reply of step `step` (RUNNING), or timeout. 0/-1. */
int ftgo_wait_step(ftgo_order_svc *s, const char *id, int step, uint64_t timeout_ms);

/* A text column of the first row of sql (one text parameter) on the database file at path,
 * read on a connection of its own, into out ("" when no row). 0 or -1. */
int ftgo_read(const char *path, const char *sql, const char *arg, char *out, size_t len);

#endif
