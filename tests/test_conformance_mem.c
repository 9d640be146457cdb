/*
 * The in-memory transport passes the conformance kit, described as brokerless (through
 * saga_conformance_run2) and the first way (saga_conformance_run, whose redelivery_ms of 0
 * means brokerless). And the kit fails what it should: the same hub wrapped in an adapter that
 * acknowledges each delivery as it hands it over (before the node's commit), and the hub
 * described as a broker (which it is not: it never confirms before the receiver acknowledged).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "internal.h"
#include "saga/conformance.h"
#include "saga/sys/transport.h"

/* ---- an adapter with the classic mistake: acknowledging on receipt ---------------------- */

typedef struct eager {
  saga_transport base;       /* what the kit or node sees */
  saga_transport *inner;     /* a mem transport */
  saga__transport_host host; /* the inner transport's host: forwards to base's */
} eager;

static int eager_deliver(void *ctx, const char *channel, const void *data, size_t len,
                         uint64_t tag) {
  eager *e = ctx;
  int rc = saga_transport_deliver(&e->base, channel, data, len, tag);
  e->inner->methods->ack(e->inner, tag); /* the mistake: before the receiver committed */
  return rc;
}

static void eager_sent(void *ctx, uint64_t token, int status) {
  saga_transport_sent(&((eager *)ctx)->base, token, status);
}

static void eager_closed(void *ctx) { saga_transport_closed(&((eager *)ctx)->base); }

static void eager_log(void *ctx, saga_log_level level, const char *msg) {
  saga_transport_log(&((eager *)ctx)->base, level, msg);
}

static int eager_dead_letter(void *ctx, const char *channel, const void *data, size_t len,
                             uint64_t tag, const char *reason) {
  return saga_transport_dead_letter(&((eager *)ctx)->base, channel, data, len, tag, reason);
}

static int eager_open(saga_transport *t, uv_loop_t *loop) {
  eager *e = (eager *)t;
  e->inner->saga__host = &e->host;
  return e->inner->methods->open(e->inner, loop);
}

static int eager_subscribe(saga_transport *t, const char *channel) {
  eager *e = (eager *)t;
  return e->inner->methods->subscribe(e->inner, channel);
}

static int eager_send(saga_transport *t, const char *channel, const void *data, size_t len,
                      uint64_t token) {
  eager *e = (eager *)t;
  return e->inner->methods->send(e->inner, channel, data, len, token);
}

static void eager_ack(saga_transport *t, uint64_t tag) {
  eager *e = (eager *)t;
  e->inner->methods->ack(e->inner, tag);
}

static void eager_close(saga_transport *t) {
  eager *e = (eager *)t;
  e->inner->methods->close(e->inner);
}

static void eager_destroy(saga_transport *t) {
  eager *e = (eager *)t;
  e->inner->methods->destroy(e->inner);
  free(e);
}

static const saga_transport_methods eager_methods = {
    .version = 1,
    .name = "eager",
    .open = eager_open,
    .subscribe = eager_subscribe,
    .send = eager_send,
    .ack = eager_ack,
    .close = eager_close,
    .destroy = eager_destroy,
};

static int mem_create(void *ctx, const char *node, saga_transport **out) {
  return saga_mem_transport_new(out, (saga_mem_hub *)ctx);
}

static int eager_create(void *ctx, const char *node, saga_transport **out) {
  eager *e = calloc(1, sizeof *e);
  if (e == NULL) return SAGA_ENOMEM;
  int rc = saga_mem_transport_new(&e->inner, (saga_mem_hub *)ctx);
  if (rc != SAGA_OK) {
    free(e);
    return rc;
  }
  e->base.methods = &eager_methods;
  e->host.deliver = eager_deliver;
  e->host.sent = eager_sent;
  e->host.closed = eager_closed;
  e->host.log = eager_log;
  e->host.dead_letter = eager_dead_letter;
  e->host.ctx = e;
  *out = &e->base;
  return SAGA_OK;
}

/* ---- running the kit on a hub ------------------------------------------------------------ */

typedef struct run {
  char report[4096];
  int failed;
} run;

/* Runs the kit on a fresh hub: through run2 with kind (0: through saga_conformance_run). */
static void run_kit(run *r, int (*create)(void *, const char *, saga_transport **),
                    saga_medium_kind kind, uint32_t redelivery_ms, int sagas) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_mem_hub *hub = NULL;
  assert_int_equal(saga_mem_hub_new(&hub, &loop, NULL, NULL, NULL), SAGA_OK);
  char *dir = th_tmpdir();
  if (kind == 0) {
    saga_conformance_medium m;
    memset(&m, 0, sizeof m);
    m.create = create;
    m.ctx = hub;
    m.ordered = 1;
    m.redelivery_ms = redelivery_ms;
    m.timeout_ms = 2000;
    m.db_dir = sagas ? dir : NULL;
    r->failed = saga_conformance_run(&loop, &m, r->report, sizeof r->report);
  } else {
    saga_conformance_medium2 m;
    memset(&m, 0, sizeof m);
    m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
    m.kind = kind;
    m.create = create;
    m.ctx = hub;
    m.ordered = 1;
    m.redelivery_ms = redelivery_ms;
    m.timeout_ms = 2000;
    m.db_dir = sagas ? dir : NULL;
    r->failed = saga_conformance_run2(&loop, &m, r->report, sizeof r->report);
  }
  printf("%s", r->report);
  assert_int_equal(saga_mem_hub_close(hub), SAGA_OK);
  th_drain(&loop);
  assert_int_equal(uv_loop_close(&loop), 0);
  th_rmdir(dir);
}

static const char *const all_checks[] = {"PASS delivery\n",  "PASS ack\n",
                                         "PASS unacked\n",   "PASS duplicates\n",
                                         "PASS order\n",     "PASS consumer-crash\n",
                                         "PASS peer-gone\n", "PASS close\n",
                                         "PASS sagas\n",     "PASS sagas-crash\n"};

static void test_mem_conformance(void **state) {
  run r;
  run_kit(&r, mem_create, SAGA_MEDIUM_BROKERLESS, 0, 1);
  assert_int_equal(r.failed, 0);
  for (size_t i = 0; i < sizeof all_checks / sizeof *all_checks; i++)
    assert_non_null(strstr(r.report, all_checks[i]));
}

/* The first entry point still runs everything, a redelivery_ms of 0 meaning brokerless. */
static void test_mem_conformance_v1(void **state) {
  run r;
  run_kit(&r, mem_create, 0, 0, 1);
  assert_int_equal(r.failed, 0);
  for (size_t i = 0; i < sizeof all_checks / sizeof *all_checks; i++)
    assert_non_null(strstr(r.report, all_checks[i]));
}

/* Acknowledging on receipt: the sender is told before the consumer committed, and a crash
 * then loses the message. consumer-crash (and unacked) must say so. */
static void test_kit_catches_ack_on_receipt(void **state) {
  run r;
  run_kit(&r, eager_create, SAGA_MEDIUM_BROKERLESS, 0, 0);
  assert_true(r.failed >= 2);
  assert_non_null(strstr(r.report, "FAIL consumer-crash: a brokerless medium confirmed"));
  assert_non_null(strstr(r.report, "FAIL unacked"));
  assert_non_null(strstr(r.report, "PASS delivery\n"));
}

/* The hub described as a broker: it never stores-and-confirms, which a broker must. */
static void test_kit_holds_a_broker_to_its_kind(void **state) {
  run r;
  run_kit(&r, mem_create, SAGA_MEDIUM_BROKER, 100, 0);
  assert_non_null(strstr(r.report, "FAIL unacked: a broker never confirmed"));
  assert_non_null(strstr(r.report, "FAIL consumer-crash: a broker never confirmed"));
  assert_non_null(strstr(r.report, "FAIL peer-gone: a broker never confirmed"));
  assert_int_equal(r.failed, 3);
}

/* Store-and-forward accepts either way, so the hub (which confirms only after the
 * acknowledgement, and keeps messages for an absent consumer) passes as one. */
static void test_mem_as_store_and_forward(void **state) {
  run r;
  run_kit(&r, mem_create, SAGA_MEDIUM_STORE_AND_FORWARD, 0, 0);
  assert_int_equal(r.failed, 0);
  assert_non_null(strstr(r.report, "PASS consumer-crash\n"));
}

/* A description the kit cannot use is refused before anything runs. */
static void test_kit_refuses_bad_descriptions(void **state) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  saga_conformance_medium2 m;
  memset(&m, 0, sizeof m);
  m.struct_version = SAGA_CONFORMANCE_MEDIUM_VERSION;
  m.kind = SAGA_MEDIUM_BROKERLESS;
  m.create = mem_create;
  char report[64] = "x";
  m.kind = 0; /* the kind is required */
  assert_int_equal(saga_conformance_run2(&loop, &m, report, sizeof report), SAGA_EINVAL);
  assert_string_equal(report, "");
  m.kind = SAGA_MEDIUM_STORE_AND_FORWARD + 1;
  assert_int_equal(saga_conformance_run2(&loop, &m, report, sizeof report), SAGA_EINVAL);
  m.kind = SAGA_MEDIUM_BROKERLESS; /* struct_version: test_abi */
  m.create = NULL;
  assert_int_equal(saga_conformance_run2(&loop, &m, report, sizeof report), SAGA_EINVAL);
  assert_int_equal(saga_conformance_run2(NULL, &m, report, sizeof report), SAGA_EINVAL);
  assert_int_equal(saga_conformance_run2(&loop, NULL, report, sizeof report), SAGA_EINVAL);
  assert_int_equal(saga_conformance_run(&loop, NULL, report, sizeof report), SAGA_EINVAL);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_mem_conformance),
      cmocka_unit_test(test_mem_conformance_v1),
      cmocka_unit_test(test_kit_catches_ack_on_receipt),
      cmocka_unit_test(test_kit_holds_a_broker_to_its_kind),
      cmocka_unit_test(test_mem_as_store_and_forward),
      cmocka_unit_test(test_kit_refuses_bad_descriptions),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
