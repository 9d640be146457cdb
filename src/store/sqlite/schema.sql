-- libsaga schema. Each migration starts with a line "-- migration N" and is applied once, in
-- order, inside one transaction that also sets PRAGMA user_version = N. Never edit a released
-- migration: append a new one.

-- migration 1
-- One row per saga instance this node orchestrates.
CREATE TABLE saga_instance (
  id               TEXT PRIMARY KEY,
  def_name         TEXT NOT NULL,
  def_version      INTEGER NOT NULL,
  idem_key         TEXT UNIQUE,
  state            INTEGER NOT NULL,  -- saga_state
  phase            INTEGER NOT NULL,  -- saga_phase of the current step
  step             INTEGER NOT NULL,
  attempt          INTEGER NOT NULL,
  wait             INTEGER NOT NULL,  -- 0 none (terminal), 1 awaiting reply, 2 backing off
  flags            INTEGER NOT NULL DEFAULT 0,
  hseq             INTEGER NOT NULL DEFAULT 0,  -- last history sequence number
  data             BLOB NOT NULL,     -- msgpack map str -> bin
  error            TEXT NOT NULL DEFAULT '',
  trace_span       TEXT NOT NULL DEFAULT '',
  created_ms       INTEGER NOT NULL,
  updated_ms       INTEGER NOT NULL,
  step_deadline_ms INTEGER,           -- reply timeout or end of backoff
  saga_deadline_ms INTEGER,           -- whole-saga deadline (before the pivot)
  deadline_ms      INTEGER,           -- the earlier of the two; NULL when none or parked
  parked           INTEGER NOT NULL DEFAULT 0  -- definition version not registered
);
CREATE INDEX saga_instance_deadline ON saga_instance(deadline_ms) WHERE deadline_ms IS NOT NULL;
CREATE INDEX saga_instance_state ON saga_instance(state, updated_ms);

-- Append-only transitions of every saga, for the inspector and audits.
CREATE TABLE saga_history (
  saga_id  TEXT NOT NULL,
  seq      INTEGER NOT NULL,
  at_ms    INTEGER NOT NULL,
  event    INTEGER NOT NULL,  -- saga_event_type
  step     INTEGER NOT NULL,
  attempt  INTEGER NOT NULL,
  detail   TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;

-- Transactional outbox: rows commit with the state change that produced them. AUTOINCREMENT
-- keeps ids increasing even after the newest rows are deleted, which the relay relies on.
CREATE TABLE saga_outbox (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  channel    TEXT NOT NULL,
  saga_id    TEXT NOT NULL,
  body       BLOB NOT NULL,
  created_ms INTEGER NOT NULL
);

-- Participant inbox: one row per command message handled, with the reply it produced.
CREATE TABLE saga_inbox (
  msg_id      TEXT PRIMARY KEY,
  saga_id     TEXT NOT NULL,
  received_ms INTEGER NOT NULL,
  reply_to    TEXT NOT NULL,
  reply       BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX saga_inbox_received ON saga_inbox(received_ms);

-- Participant step record across attempts and phases: 1 applied, 2 compensated,
-- 3 tombstone (compensated or resolved before any action applied), 4 action refused.
CREATE TABLE saga_pstep (
  saga_id    TEXT NOT NULL,
  step       INTEGER NOT NULL,
  state      INTEGER NOT NULL,
  attempt    INTEGER NOT NULL,
  reply      BLOB,              -- data of the successful action's reply
  updated_ms INTEGER NOT NULL,
  PRIMARY KEY (saga_id, step)
) WITHOUT ROWID;

-- Messages that could not be handled: kept, with the reason, for an operator.
CREATE TABLE saga_dead_letter (
  id      INTEGER PRIMARY KEY,
  at_ms   INTEGER NOT NULL,
  channel TEXT NOT NULL,
  msg_id  TEXT NOT NULL DEFAULT '',
  reason  TEXT NOT NULL,
  body    BLOB NOT NULL
);

-- migration 2
-- Indexes that cost less per step, and one for retention. The state index no longer holds
-- updated_ms (which changes on every save, so every save moved the entry); finished sagas
-- (COMPLETED, COMPENSATED) get a partial index by age for the purge, which running sagas
-- never touch. The participant step record gets an age index for the purge too.
DROP INDEX saga_instance_state;
CREATE INDEX saga_instance_state ON saga_instance(state);
CREATE INDEX saga_instance_done ON saga_instance(updated_ms) WHERE state IN (3, 4);

-- migration 3
-- The outbox without AUTOINCREMENT, whose sqlite_sequence row cost a read and a write per
-- message. The node assigns ids itself (see saga__node_outbox) above the largest id ever
-- used, kept in saga_meta('outbox_id') and written once per transaction: ids never repeat,
-- also after the newest rows were deleted and between processes sharing the database, so a
-- late confirmation of a deleted row never names a newer one.
CREATE TABLE saga_meta (
  key   TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO saga_meta(key, value) VALUES ('outbox_id', coalesce(
  (SELECT seq FROM sqlite_sequence WHERE name = 'saga_outbox'), 0));
CREATE TABLE saga_outbox_v3 (
  id         INTEGER PRIMARY KEY,
  channel    TEXT NOT NULL,
  saga_id    TEXT NOT NULL,
  body       BLOB NOT NULL,
  created_ms INTEGER NOT NULL
);
INSERT INTO saga_outbox_v3(id, channel, saga_id, body, created_ms)
  SELECT id, channel, saga_id, body, created_ms FROM saga_outbox;
DROP TABLE saga_outbox;
ALTER TABLE saga_outbox_v3 RENAME TO saga_outbox;

-- migration 4
-- Inbox records lose their age index (an index write on every command handled); retention
-- sweeps the inbox in key order instead, as it does the participant step records.
DROP INDEX saga_inbox_received;

-- migration 5
-- Idempotency keys are unique per definition name, no longer across every definition (a
-- start of definition B with a key used by A returned A's saga). SQLite cannot drop a
-- column's UNIQUE constraint: the table is rebuilt with the same columns in the same order,
-- keeping its rows (and rowids) and its indexes. legacy_alter_table keeps the RENAME from
-- checking the schema's views: an operator's view over saga_instance would otherwise fail
-- it ("no such table" in between), and it works on the new table by name.
PRAGMA legacy_alter_table = ON;
CREATE TABLE saga_instance_v5 (
  id               TEXT PRIMARY KEY,
  def_name         TEXT NOT NULL,
  def_version      INTEGER NOT NULL,
  idem_key         TEXT,              -- unique per def_name (NULL = none)
  state            INTEGER NOT NULL,  -- saga_state
  phase            INTEGER NOT NULL,  -- saga_phase of the current step
  step             INTEGER NOT NULL,
  attempt          INTEGER NOT NULL,
  wait             INTEGER NOT NULL,  -- 0 none (terminal), 1 awaiting reply, 2 backing off
  flags            INTEGER NOT NULL DEFAULT 0,
  hseq             INTEGER NOT NULL DEFAULT 0,  -- last history sequence number
  data             BLOB NOT NULL,     -- msgpack map str -> bin
  error            TEXT NOT NULL DEFAULT '',
  trace_span       TEXT NOT NULL DEFAULT '',
  created_ms       INTEGER NOT NULL,
  updated_ms       INTEGER NOT NULL,
  step_deadline_ms INTEGER,           -- reply timeout or end of backoff
  saga_deadline_ms INTEGER,           -- whole-saga deadline (before the pivot)
  deadline_ms      INTEGER,           -- the earlier of the two; NULL when none or parked
  parked           INTEGER NOT NULL DEFAULT 0,  -- definition version not registered
  UNIQUE (def_name, idem_key)
);
INSERT INTO saga_instance_v5(rowid, id, def_name, def_version, idem_key, state, phase, step,
                             attempt, wait, flags, hseq, data, error, trace_span, created_ms,
                             updated_ms, step_deadline_ms, saga_deadline_ms, deadline_ms,
                             parked)
  SELECT rowid, id, def_name, def_version, idem_key, state, phase, step, attempt, wait, flags,
         hseq, data, error, trace_span, created_ms, updated_ms, step_deadline_ms,
         saga_deadline_ms, deadline_ms, parked FROM saga_instance;
DROP TABLE saga_instance;
ALTER TABLE saga_instance_v5 RENAME TO saga_instance;
PRAGMA legacy_alter_table = OFF;
CREATE INDEX saga_instance_deadline ON saga_instance(deadline_ms) WHERE deadline_ms IS NOT NULL;
CREATE INDEX saga_instance_state ON saga_instance(state);
CREATE INDEX saga_instance_done ON saga_instance(updated_ms) WHERE state IN (3, 4);

-- migration 6
-- Replies parked because their saga's definition version is not registered on this node yet
-- (a rolling upgrade, a node started without one of its definitions). They are acknowledged
-- to the transport (a broker would otherwise dead-letter them after its delivery cap) and
-- applied by saga_node_start() once the version is registered.
CREATE TABLE saga_parked_reply (
  id       INTEGER PRIMARY KEY,
  saga_id  TEXT NOT NULL UNIQUE,   -- one: the answer to the saga's last command
  at_ms    INTEGER NOT NULL,
  body     BLOB NOT NULL
);

-- migration 7
-- What an operator's tools need to read a node's database on their own: the definitions as
-- registered (name, version, steps), durable operator requests that the node carries out in
-- its own transactions, and views with readable names. saga_node_start() records every
-- registered definition (replacing the recorded steps of a name and version registered again).
CREATE TABLE saga_definition (
  name          TEXT NOT NULL,
  version       INTEGER NOT NULL,
  nsteps        INTEGER NOT NULL,
  deadline_ms   INTEGER NOT NULL,  -- whole-saga deadline before the pivot; 0 = none
  registered_ms INTEGER NOT NULL,  -- last saga_node_start() that recorded it
  PRIMARY KEY (name, version)
) WITHOUT ROWID;

-- One row per step of a recorded definition. kind: 0 COMPENSATABLE, 1 PIVOT, 2 RETRIABLE.
-- channel is '' and local 1 for a step run on the orchestrator's own node. Retry columns as
-- saga_retry, resolved (0 for the action's max_attempts means 1; comp_* is the compensation's
-- policy after defaults; 4294967295 = forever). timeout_ms 4294967295 = no timeout.
CREATE TABLE saga_definition_step (
  def_name          TEXT NOT NULL,
  def_version       INTEGER NOT NULL,
  step              INTEGER NOT NULL,
  name              TEXT NOT NULL,
  kind              INTEGER NOT NULL,
  channel           TEXT NOT NULL,
  action            TEXT NOT NULL,
  compensation      TEXT NOT NULL,   -- '' = nothing to undo
  local             INTEGER NOT NULL,
  has_local_compensation INTEGER NOT NULL,
  max_attempts      INTEGER NOT NULL,
  backoff_ms        INTEGER NOT NULL,
  multiplier        REAL NOT NULL,
  cap_ms            INTEGER NOT NULL,
  jitter            REAL NOT NULL,
  retry_before_compensate INTEGER NOT NULL,
  timeout_ms        INTEGER NOT NULL,
  comp_max_attempts INTEGER NOT NULL,
  comp_backoff_ms   INTEGER NOT NULL,
  comp_multiplier   REAL NOT NULL,
  comp_cap_ms       INTEGER NOT NULL,
  comp_jitter       REAL NOT NULL,
  PRIMARY KEY (def_name, def_version, step)
) WITHOUT ROWID;

-- Repairs an operator asked for (sagactl retry / cancel / dead-letters replay / purge). A tool
-- inserts a row with state 0; a node opening this database carries it out in its own
-- transaction (within a second while it runs, at its next start otherwise) and sets state
-- 1 (done) or 2 (refused, with the reason in result), done_ms and result in the same
-- transaction as the repair itself. action: 'retry' and 'cancel' (target = a saga id),
-- 'replay' and 'purge' (target = a dead letter id, or '*' for every dead letter with purge).
CREATE TABLE saga_operator_request (
  id           INTEGER PRIMARY KEY,
  at_ms        INTEGER NOT NULL,
  action       TEXT NOT NULL,
  target       TEXT NOT NULL,
  requested_by TEXT NOT NULL DEFAULT '',
  state        INTEGER NOT NULL DEFAULT 0,  -- 0 pending, 1 done, 2 refused
  result       TEXT NOT NULL DEFAULT '',
  done_ms      INTEGER
);
CREATE INDEX saga_operator_request_pending ON saga_operator_request(id) WHERE state = 0;
CREATE INDEX saga_operator_request_target ON saga_operator_request(target);

CREATE VIEW saga_instance_view AS
SELECT i.id, i.def_name AS definition, i.def_version AS version, i.idem_key,
       CASE i.state WHEN 1 THEN 'RUNNING' WHEN 2 THEN 'COMPENSATING' WHEN 3 THEN 'COMPLETED'
                    WHEN 4 THEN 'COMPENSATED' WHEN 5 THEN 'FAILED' ELSE 'UNKNOWN' END AS state,
       i.step, coalesce(s.name, '') AS step_name,
       CASE i.phase WHEN 0 THEN 'ACTION' WHEN 1 THEN 'COMPENSATION' WHEN 2 THEN 'RESOLVE'
                    ELSE 'UNKNOWN' END AS phase,
       i.attempt,
       CASE i.wait WHEN 0 THEN 'NONE' WHEN 1 THEN 'REPLY' WHEN 2 THEN 'BACKOFF'
                   ELSE 'UNKNOWN' END AS waiting_for,
       i.parked, i.error, length(i.data) AS data_bytes,
       strftime('%Y-%m-%dT%H:%M:%fZ', i.created_ms / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%dT%H:%M:%fZ', i.updated_ms / 1000.0, 'unixepoch') AS updated,
       i.created_ms, i.updated_ms, i.deadline_ms
FROM saga_instance i
LEFT JOIN saga_definition_step s
  ON s.def_name = i.def_name AND s.def_version = i.def_version AND s.step = i.step;

CREATE VIEW saga_history_view AS
SELECT h.saga_id, h.seq,
       strftime('%Y-%m-%dT%H:%M:%fZ', h.at_ms / 1000.0, 'unixepoch') AS at,
       CASE h.event WHEN 1 THEN 'STARTED' WHEN 2 THEN 'STEP_SENT' WHEN 3 THEN 'STEP_SUCCEEDED'
         WHEN 4 THEN 'STEP_FAILED' WHEN 5 THEN 'STEP_TIMED_OUT' WHEN 6 THEN 'STEP_RETRY'
         WHEN 7 THEN 'COMPENSATION_SENT' WHEN 8 THEN 'COMPENSATED'
         WHEN 9 THEN 'COMPENSATION_FAILED' WHEN 10 THEN 'RESOLVE_SENT' WHEN 11 THEN 'CANCELLED'
         WHEN 12 THEN 'COMPLETED' WHEN 13 THEN 'SAGA_COMPENSATED' WHEN 14 THEN 'SAGA_FAILED'
         WHEN 15 THEN 'STALE_REPLY' WHEN 16 THEN 'DEFINITION_MISSING'
         WHEN 17 THEN 'OPERATOR_REQUEST' ELSE 'UNKNOWN' END AS event,
       h.step, coalesce(s.name, '') AS step_name, h.attempt, h.detail, h.at_ms
FROM saga_history h
LEFT JOIN saga_instance i ON i.id = h.saga_id
LEFT JOIN saga_definition_step s
  ON s.def_name = i.def_name AND s.def_version = i.def_version AND s.step = h.step;

CREATE VIEW saga_operator_request_view AS
SELECT id, strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') AS requested,
       action, target, requested_by,
       CASE state WHEN 0 THEN 'PENDING' WHEN 1 THEN 'DONE' WHEN 2 THEN 'REFUSED'
                  ELSE 'UNKNOWN' END AS state,
       result,
       CASE WHEN done_ms IS NULL THEN NULL
            ELSE strftime('%Y-%m-%dT%H:%M:%fZ', done_ms / 1000.0, 'unixepoch') END AS done
FROM saga_operator_request;

-- migration 8
-- Trace context (docs/operating.md, "Tracing"): the caller's W3C traceparent a saga was
-- started with ('' = none: the trace id is the saga id), when the saga's span started, and
-- the span of the attempt whose command is in flight with its start, so that a restarted
-- node ends that span with the same id and every later span keeps its parent.
ALTER TABLE saga_instance ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
ALTER TABLE saga_instance ADD COLUMN started_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE saga_instance ADD COLUMN attempt_span TEXT NOT NULL DEFAULT '';
ALTER TABLE saga_instance ADD COLUMN attempt_ns INTEGER NOT NULL DEFAULT 0;

-- migration 9
-- Domain events (include/saga/domain.h, docs/patterns.md). The publisher's last sequence
-- number per (channel, key), bumped in the transaction that publishes; and the subscriber's
-- cursor per (publisher stream, channel, key): the last sequence number handled, skipped or
-- dead-lettered. Neither is purged: a key's sequence must never start over. The publisher's
-- stream id is saga_meta('event_stream'), made at random on the first publish.
CREATE TABLE saga_event_seq (
  channel TEXT NOT NULL,
  key     TEXT NOT NULL,
  seq     INTEGER NOT NULL,
  PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE TABLE saga_event_cursor (
  stream     TEXT NOT NULL,
  channel    TEXT NOT NULL,
  key        TEXT NOT NULL,
  seq        INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  PRIMARY KEY (stream, channel, key)
) WITHOUT ROWID;

-- migration 10
-- Semantic locks (include/saga/lock.h, docs/patterns.md): a business record (type, id) held by
-- the saga whose step wrote the row, in the participant's transaction: the row commits with
-- the step's effects, its inbox record and its reply, or not at all. Released by a later step
-- (saga_lock_release), by the node when it handles the compensation of the step that took it,
-- and on the orchestrator's node when the saga ends COMPLETED or COMPENSATED. A FAILED saga
-- keeps its locks until its repair.
CREATE TABLE saga_lock (
  type        TEXT NOT NULL,
  id          TEXT NOT NULL,
  saga_id     TEXT NOT NULL,
  step        INTEGER NOT NULL,  -- the step whose handler took the lock
  acquired_ms INTEGER NOT NULL,
  PRIMARY KEY (type, id)
) WITHOUT ROWID;
CREATE INDEX saga_lock_saga ON saga_lock(saga_id, step);

-- The locks held, with the saga's state where this node orchestrates it (NULL elsewhere).
CREATE VIEW saga_lock_view AS
SELECT l.type, l.id, l.saga_id, l.step,
       strftime('%Y-%m-%dT%H:%M:%fZ', l.acquired_ms / 1000.0, 'unixepoch') AS acquired,
       CASE WHEN i.id IS NULL THEN NULL
            ELSE CASE i.state WHEN 1 THEN 'RUNNING' WHEN 2 THEN 'COMPENSATING'
                   WHEN 3 THEN 'COMPLETED' WHEN 4 THEN 'COMPENSATED' WHEN 5 THEN 'FAILED'
                   ELSE 'UNKNOWN' END END AS saga_state,
       i.def_name AS definition, l.acquired_ms
FROM saga_lock l
LEFT JOIN saga_instance i ON i.id = l.saga_id;
