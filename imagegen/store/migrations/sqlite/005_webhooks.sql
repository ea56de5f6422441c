-- Version 5: webhooks. A job made with a `webhook` has a row in job_webhooks (written in the
-- create's transaction, before its job.created event). Each event of such a job whose name the
-- job asked for becomes a delivery row, written by the trigger below in the same transaction as
-- the event: an outbox, so no committed change goes unannounced and no uncommitted one is sent.
CREATE TABLE job_webhooks (
    job_id TEXT PRIMARY KEY,  -- jobs.id (no foreign key: deliveries outlive a deleted job)
    owner  TEXT,              -- the job's tenant, for the deliveries endpoint
    url    TEXT NOT NULL,     -- where to POST
    host   TEXT NOT NULL,     -- the receiver, "host:port", lowercased: concurrency is bounded per receiver
    events TEXT NOT NULL      -- JSON array of the event names to deliver
);

CREATE TABLE deliveries (
    id         TEXT PRIMARY KEY,              -- msg_<hex>: the webhook-id header, the same on every retry
    job_id     TEXT NOT NULL,
    owner      TEXT,
    seq        INTEGER NOT NULL,              -- the event's id: deliveries of a job go out in this order
    event      TEXT NOT NULL,                 -- the event's name (job.completed...)
    job        TEXT NOT NULL,                 -- the event's snapshot of the job: the body's data
    event_at   TEXT NOT NULL,                 -- when the event was committed
    url        TEXT NOT NULL,
    host       TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'delivered', 'failed', 'given_up')),
    attempts   TEXT NOT NULL DEFAULT '[]',    -- JSON array: {at, durationMs, status?, error?} per attempt
    next_at_ms INTEGER,                       -- pending: the next attempt not before (Unix ms)
    window_ms  INTEGER NOT NULL,              -- retries end retry_for_s after this (its creation, or a manual retry)
    lease_until_ms INTEGER,                   -- an attempt is in flight until then (a node claimed it)
    lease_owner TEXT,                         -- which deliverer holds that lease: only it records the outcome
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_at_ms) WHERE status = 'pending';
CREATE INDEX deliveries_job_seq ON deliveries (job_id, seq);

CREATE TRIGGER events_outbox AFTER INSERT ON events
BEGIN
    INSERT INTO deliveries (id, job_id, owner, seq, event, job, event_at, url, host, next_at_ms, window_ms,
                            created_at, updated_at)
    SELECT 'msg_' || lower(hex(randomblob(12))), w.job_id, w.owner, NEW.seq, NEW.name, NEW.job, NEW.created_at,
           w.url, w.host, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
           CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), NEW.created_at, NEW.created_at
    FROM job_webhooks AS w
    WHERE w.job_id = NEW.job_id AND EXISTS (SELECT 1 FROM json_each(w.events) WHERE value = NEW.name);
END;
