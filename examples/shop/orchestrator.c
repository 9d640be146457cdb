/*
 * The orchestrator service: runs the purchase saga (docs/shop.md, "The purchase saga").
 *
 * It owns nothing but its libsaga database (saga instances, history, outbox). Its node is
 * opened with cfg.event_channel = SHOP_EVENTS (main.c), so every transition of every
 * purchase saga is published, in the transition's own transaction, to the purchase service,
 * which streams them to customers over Server-Sent Events (purchase.c).
 *
 * Purchases arrive as the command "orchestrator.purchase" on channel SHOP_CH_REQUESTS
 * (sent by the purchase service's one-step "purchase-request" saga). The handler starts the
 * "purchase" saga with saga_tx_start(), inside the command's own transaction, with the
 * purchase id as idempotency key: the saga exists if and only if the command was taken, and
 * a redelivered or retried command finds the saga it already started instead of buying twice.
 */
#include <stdio.h>
#include <string.h>

#include "shop.h"

/*
 * Retry policies. Participants run in processes of their own (distributed mode) that may be
 * killed and restarted, or down for a long time. The transports (TCP, NATS JetStream) keep
 * resending an unconfirmed command until the participant's node took it, so a command is
 * delivered once its participant is back; the timeouts below only decide how long a purchase
 * waits for a participant that does not answer.
 *
 * Actions:
 *  - timeout 10 s per attempt: the participants answer in milliseconds; 10 s means one is
 *    down or partitioned (a restart takes well under a second);
 *  - 6 attempts, 100 ms backoff doubling up to 2 s, 20 % jitter: a timed-out action is sent
 *    again (a participant that already applied it answers with its recorded reply). So a
 *    participant may be down for about a minute before the purchase gives up on it; then the
 *    step is compensated as if it had failed (its outcome is unknown: the participant
 *    tombstones an action it never saw, so a late copy cannot apply afterwards);
 *  - retry_before_compensate 0: a business refusal (not enough inventory, payment refused)
 *    is definitive, so the saga compensates at once rather than asking again;
 *  - the pivot (CREATE_PAYMENT) is never guessed: once its attempts timed out the engine asks
 *    the payment participant whether the charge applied (saga.resolve), for as long as it
 *    takes.
 * Compensations never give up (SAGA_RETRY_FOREVER): a release or an order deletion is retried,
 * with backoff up to 5 s between attempts of 10 s, until its participant is back and confirms
 * it. A purchase therefore never ends FAILED because a participant was down; it ends
 * COMPENSATED once the participant returns (STATUS_ROLLBACK_FAIL stays possible only for a
 * compensation its participant refuses, which the shop's participants never do).
 */
#define STEP_RETRY                                                                                 \
  {                                                                                                \
    .max_attempts = 6, .backoff_ms = 100, .multiplier = 2.0, .cap_ms = 2000, .jitter = 0.2,        \
    .retry_before_compensate = 0                                                                   \
  }
#define COMPENSATION_RETRY                                                                         \
  {                                                                                                \
    .max_attempts = SAGA_RETRY_FOREVER, .backoff_ms = 100, .multiplier = 2.0, .cap_ms = 5000,      \
    .jitter = 0.2                                                                                  \
  }
#define STEP_TIMEOUT_MS 10000

static const saga_step purchase_steps[] = {
    /* 0: reserve every item's amount, all or nothing; compensation releases exactly what
     * this purchase reserved (and tolerates "never reserved"). */
    {.name = "UPDATE_PRODUCT_INVENTORY",
     .channel = SHOP_CH_PRODUCT,
     .action = "product.reserve",
     .compensation = "product.release",
     .kind = SAGA_STEP_COMPENSATABLE,
     .retry = STEP_RETRY,
     .compensation_retry = COMPENSATION_RETRY,
     .timeout_ms = STEP_TIMEOUT_MS},
    /* 1: create the order; compensation deletes it. */
    {.name = "CREATE_ORDER",
     .channel = SHOP_CH_ORDER,
     .action = "order.create",
     .compensation = "order.delete",
     .kind = SAGA_STEP_COMPENSATABLE,
     .retry = STEP_RETRY,
     .compensation_retry = COMPENSATION_RETRY,
     .timeout_ms = STEP_TIMEOUT_MS},
    /* 2: charge the payment: the pivot, the go/no-go step. docs/shop.md lists "refund" as its
     * compensation, but a pivot is never compensated: it is the last step, so once it
     * succeeds the purchase is complete and nothing after it can fail; when it is refused
     * nothing was charged and the steps before it are compensated. A refund would only be
     * needed for a step failing after the payment, and there is none. If every attempt
     * times out, the engine asks the payment participant whether the charge applied
     * (saga.resolve) instead of guessing. */
    {.name = "CREATE_PAYMENT",
     .channel = SHOP_CH_PAYMENT,
     .action = "payment.charge",
     .compensation = NULL,
     .kind = SAGA_STEP_PIVOT,
     .retry = STEP_RETRY,
     .timeout_ms = STEP_TIMEOUT_MS},
};

static const saga_definition purchase_def = {
    .struct_version = SAGA_DEFINITION_VERSION,
    .name = "purchase",
    .version = 1,
    .steps = purchase_steps,
    .nsteps = sizeof purchase_steps / sizeof purchase_steps[0],
    .deadline_ms = 0, /* no whole-saga deadline: the per-step timeouts bound it */
    .step_size = sizeof(saga_step), /* the saga_step this program was built with */
};

/*
 * "orchestrator.purchase": the saga data sent by the purchase service (purchase_id,
 * customer_id, items, currency) becomes the purchase saga's input. The purchase service
 * validated it; the participants check it again (unknown products, amounts) and refuse what
 * they cannot do, which the saga reports and compensates. Only a purchase without an id is
 * refused here, as it could not be started idempotently (the purchase service never sends
 * one: its request step is retriable, so a refusal would be retried, with backoff, forever).
 */
static int on_purchase(saga_tx *tx, const saga_msg *cmd, saga_reply *reply, void *arg) {
  (void)arg;
  const saga_data *in = saga_msg_data(cmd);
  const char *purchase_id = saga_data_get_str(in, "purchase_id");
  if (purchase_id == NULL || purchase_id[0] == '\0')
    return saga_reply_fail(reply, "purchase_id missing");
  char saga_id[64];
  int existed = 0;
  int rc = saga_tx_start(tx, "purchase", in, purchase_id, saga_id, sizeof saga_id, &existed);
  /* Errors: SAGA_ENOMEM is transient (the command comes again); a store error is answered
   * with a failure and the purchase service's retriable request step tries again later. */
  if (rc != SAGA_OK) return rc;
  rc = saga_reply_set_str(reply, "orchestrator_saga_id", saga_id);
  return rc;
}

int shop_orchestrator_init(shop_ctx *c, saga_node *node) {
  (void)c;
  int rc = saga_node_register(node, &purchase_def);
  if (rc == SAGA_OK)
    rc = saga_node_handle(node, SHOP_CH_REQUESTS, "orchestrator.purchase", on_purchase, NULL);
  if (rc != SAGA_OK) {
    fprintf(stderr, "orchestrator: %s: %s\n", saga_strerror(rc), saga_node_errmsg(node));
    return -1;
  }
  return 0;
}
