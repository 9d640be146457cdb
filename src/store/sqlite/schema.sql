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
-- Trace context (docs/operating.md, "Tracing"): the caller's W3C traceparent a saga was
-- started with ('' = none: the trace id is the saga id), when the saga's span started, and
-- the span of the attempt whose command is in flight with its start, so that a restarted
-- node ends that span with the same id and every later span keeps its parent.
ALTER TABLE saga_instance ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
ALTER TABLE saga_instance ADD COLUMN started_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE saga_instance ADD COLUMN attempt_span TEXT NOT NULL DEFAULT '';
ALTER TABLE saga_instance ADD COLUMN attempt_ns INTEGER NOT NULL DEFAULT 0;
