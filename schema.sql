-- imagegen schema. Applied at every start-up; every statement is idempotent.
--
-- Job status transitions (enforced by the trigger jobs_status_transition below):
--
--   pending    -> processing   a worker claimed the job (attempts + 1)
--   processing -> completed    every image is stored
--   processing -> failed       the provider failed the job
--   processing -> pending      start-up recovery after a crash, or a graceful shutdown
--                              that returned an unfinished job to the queue
--
-- completed and failed are terminal: nothing leaves them.

PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT, -- creation order; list cursors and recovery order use it
    id           TEXT    NOT NULL UNIQUE,           -- public job id: a lowercase canonical UUID
    status       TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    num_images   INTEGER NOT NULL CHECK (num_images >= 1),
    animal       TEXT    NOT NULL,                  -- what the provider draws
    prompt       TEXT,                              -- the client's optional free text, added to the provider's prompt
    images       TEXT    NOT NULL DEFAULT '[]',     -- JSON array of stored image paths, relative to data_dir, in index order
    attempts     INTEGER NOT NULL DEFAULT 0,        -- how many times a worker claimed the job; fences late results
    error_code   TEXT,                              -- machine-readable failure reason; NULL unless failed
    error_message TEXT,                             -- human-readable failure reason; NULL unless failed
    error_retryable INTEGER,                        -- 1 if the failure was transient (timeouts, 429, 5xx); NULL unless failed
    created_at   TEXT    NOT NULL,                  -- ISO 8601 UTC with milliseconds and Z, like every *_at
    updated_at   TEXT    NOT NULL,                  -- last change of any column
    started_at   TEXT,                              -- first claim by a worker
    completed_at TEXT                               -- when the job reached completed or failed
);

-- Listing by status walks newest first within one status.
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);

CREATE TRIGGER IF NOT EXISTS jobs_status_transition
BEFORE UPDATE OF status ON jobs
WHEN NEW.status <> OLD.status AND NOT (
       (OLD.status = 'pending'    AND NEW.status = 'processing')
    OR (OLD.status = 'processing' AND NEW.status IN ('completed', 'failed', 'pending'))
)
BEGIN
    SELECT RAISE(ABORT, 'illegal job status transition');
END;

-- One row per committed change of a job, written in the same transaction as the change,
-- so that a stream can replay exactly what was committed.
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- global, strictly increasing event id
    job_id     TEXT    NOT NULL,                  -- jobs.id (no foreign key: events outlive deleted jobs until pruned)
    name       TEXT    NOT NULL,                  -- job.created, job.processing, job.progress, job.completed, job.failed, job.requeued
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
