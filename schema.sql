-- imagegen's SQLite schema, version 1: what the first release shipped. Later versions are the
-- migrations in imagegen/store/migrations/sqlite/, applied in order at start-up under SQLite's
-- write lock (PRAGMA user_version counts them); PostgreSQL's schema is in
-- imagegen/store/migrations/postgres/. The first release applied this file at every start-up,
-- so every statement is idempotent.
--
-- Job status transitions (enforced by the trigger jobs_status_transition below):
--
--   pending    -> processing   a worker claimed the job (attempts + 1)
--   pending    -> canceled     canceled before a worker took it
--   processing -> completed    every image is stored
--   processing -> failed       a non-retryable provider error, retries exhausted, or a job
--                              that was running in every one of max_recoveries crashes
--   processing -> canceled     canceled while drawing; the worker is interrupted
--   processing -> pending      a retryable provider error (retried after not_before), start-up
--                              recovery after a crash, or a graceful shutdown that handed the
--                              job back
--
-- completed, failed and canceled are terminal: nothing leaves them (a terminal job can only
-- be deleted).

PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT, -- creation order; list cursors and recovery order use it
    id           TEXT    NOT NULL UNIQUE,           -- public job id: a lowercase canonical UUID
    status       TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'canceled')),
    num_images   INTEGER NOT NULL CHECK (num_images >= 1),
    animal       TEXT    NOT NULL,                  -- what the provider draws
    prompt       TEXT,                              -- the client's optional free text, added to the provider's prompt
    images       TEXT    NOT NULL DEFAULT '[]',     -- JSON array of stored image paths, relative to data_dir, in index order
    attempts     INTEGER NOT NULL DEFAULT 0,        -- how many times a worker claimed the job; fences late results
    recoveries   INTEGER NOT NULL DEFAULT 0,        -- how many crashes found it processing (poison-job guard)
    not_before   TEXT,                              -- a retry waits until then (backoff); NULL: at once
    error_code   TEXT,                              -- machine-readable reason of the last failure; NULL if none
    error_message TEXT,                             -- human-readable reason of the last failure
    error_retryable INTEGER,                        -- 1 if that failure was transient (timeouts, 429, 5xx)
    created_at   TEXT    NOT NULL,                  -- ISO 8601 UTC with milliseconds and Z, like every *_at
    updated_at   TEXT    NOT NULL,                  -- last change of any column
    started_at   TEXT,                              -- first claim by a worker
    completed_at TEXT                               -- when the job reached a terminal status
);

-- Listing by status walks newest first within one status.
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);

CREATE TRIGGER IF NOT EXISTS jobs_status_transition
BEFORE UPDATE OF status ON jobs
WHEN NEW.status <> OLD.status AND NOT (
       (OLD.status = 'pending'    AND NEW.status IN ('processing', 'canceled'))
    OR (OLD.status = 'processing' AND NEW.status IN ('completed', 'failed', 'canceled', 'pending'))
)
BEGIN
    SELECT RAISE(ABORT, 'illegal job status transition');
END;

-- One row per committed change of a job, written in the same transaction as the change,
-- so that a stream can replay exactly what was committed.
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- global, strictly increasing event id
    job_id     TEXT    NOT NULL,                  -- jobs.id (no foreign key: events outlive deleted jobs until pruned)
    name       TEXT    NOT NULL,                  -- job.created, .processing, .progress, .completed, .failed,
                                                  -- .canceled, .retrying, .requeued, .deleted
    job        TEXT    NOT NULL,                  -- JSON snapshot of the job row right after the change
    created_at TEXT    NOT NULL
);

-- A job's own stream replays its events by id.
CREATE INDEX IF NOT EXISTS events_job_seq ON events (job_id, seq);

-- Small facts about the database itself.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY, -- events_pruned_through: the highest event id deleted by retention
    value INTEGER NOT NULL
);

-- Idempotency-Key of POST /generations: the job a key created, kept for jobs.idempotency_ttl_s.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          TEXT PRIMARY KEY,  -- the client's Idempotency-Key header
    request_hash TEXT NOT NULL,     -- sha256 of the validated request body: a reused key must carry the same
    job_id       TEXT NOT NULL,     -- the job it created
    created_at   TEXT NOT NULL      -- pruned once older than the retention
);
