-- imagegen schema for PostgreSQL, version 1: the same tables as SQLite's schema.sql (same
-- columns, same timestamps as ISO 8601 text), plus what many nodes need: leases, and event
-- ids that follow commit order, and the create as one server-side function.
--
-- Job status transitions (enforced by the trigger jobs_status_transition below):
--
--   pending    -> processing   a worker claimed the job (attempts + 1) and holds its lease
--   pending    -> canceled     canceled before a worker took it
--   processing -> completed    every image is stored
--   processing -> failed       a non-retryable provider error, retries exhausted, or a job
--                              whose worker died while drawing it max_recoveries times
--   processing -> canceled     canceled while drawing; the worker (on any node) is interrupted
--   processing -> pending      a retryable provider error (retried after not_before), a lease
--                              that expired (its node died: rescued), or a graceful shutdown
--                              that handed the job back
--
-- completed, failed and canceled are terminal: nothing leaves them (a terminal job can only
-- be deleted).

CREATE TABLE jobs (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- creation order: list cursors and claim order
    id               text    NOT NULL UNIQUE,            -- public job id: a lowercase canonical UUID
    status           text    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'canceled')),
    num_images       integer NOT NULL CHECK (num_images >= 1),
    animal           text    NOT NULL,                   -- what the provider draws
    prompt           text,                               -- the client's optional free text
    images           text    NOT NULL DEFAULT '[]',      -- JSON array of stored image paths, relative to data_dir
    attempts         integer NOT NULL DEFAULT 0,         -- how many times a worker claimed the job; fences late results
    recoveries       integer NOT NULL DEFAULT 0,         -- how many times its worker died while drawing it (poison-job guard)
    not_before       text,                               -- a retry waits until then (backoff); NULL: at once
    error_code       text,                               -- machine-readable reason of the last failure
    error_message    text,                               -- human-readable reason of the last failure
    error_retryable  integer,                            -- 1 if that failure was transient
    created_at       text    NOT NULL,                   -- ISO 8601 UTC with milliseconds and Z, like every *_at
    updated_at       text    NOT NULL,                   -- last change of any column but the lease
    started_at       text,                               -- first claim by a worker
    completed_at     text,                               -- when the job reached a terminal status
    lease_owner      text,                               -- node id of the worker drawing it (while processing)
    lease_expires_at timestamptz                         -- by the database's clock: past it, the job is rescued
);

-- Listing by status walks newest first within one status; claims take the oldest pending.
CREATE INDEX jobs_status_seq ON jobs (status, seq);
-- The rescuer looks for processing jobs whose lease expired.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE status = 'processing';

CREATE FUNCTION jobs_status_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT (
           (OLD.status = 'pending'    AND NEW.status IN ('processing', 'canceled'))
        OR (OLD.status = 'processing' AND NEW.status IN ('completed', 'failed', 'canceled', 'pending'))
    ) THEN
        RAISE EXCEPTION 'illegal job status transition';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_status_transition BEFORE UPDATE OF status ON jobs
FOR EACH ROW EXECUTE FUNCTION jobs_status_transition();

-- One row per committed change of a job, written in the same transaction as the change.
-- Ids come from event_counter, not a sequence: a sequence hands out values before commit, so
-- id 101 could commit while 100 is still open, and a stream that sent 101 would never send
-- 100. The counter row is updated as the last statement of every writing transaction; its row
-- lock is held until commit (and a rollback gives the value back), so ids are strictly
-- increasing in commit order on every node. Each write is one statement (or, for a create,
-- one function call), so that lock is never held across a round trip to the client.
CREATE TABLE events (
    seq        bigint PRIMARY KEY, -- global event id, in commit order
    job_id     text   NOT NULL,    -- jobs.id (no foreign key: events outlive deleted jobs until pruned)
    name       text   NOT NULL,    -- job.created, .processing, .progress, .completed, .failed,
                                   -- .canceled, .retrying, .requeued, .deleted
    job        text   NOT NULL,    -- JSON snapshot of the job row right after the change
    job_seq    bigint NOT NULL,    -- the job's seq and status, copied out of the snapshot so the
    status     text   NOT NULL,    -- feed's readers need not parse it
    created_at text   NOT NULL
);

-- A job's own stream replays its events by id.
CREATE INDEX events_job_seq ON events (job_id, seq);

CREATE TABLE event_counter (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), -- there is exactly one row
    last     bigint  NOT NULL                                   -- the id of the last committed event
);
INSERT INTO event_counter (last) VALUES (0);

-- Small facts about the database itself.
CREATE TABLE meta (
    key   text PRIMARY KEY, -- events_pruned_through: the highest event id deleted by retention
    value bigint NOT NULL
);

-- Idempotency-Key of POST /generations: the job a key created, kept for jobs.idempotency_ttl_s.
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY, -- the client's Idempotency-Key header
    request_hash text NOT NULL,    -- sha256 of the validated request body
    job_id       text NOT NULL,    -- the job it created
    created_at   text NOT NULL     -- pruned once older than the retention
);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);

-- A job row as its events' snapshot: the same keys, in the same order, as SQLite's.
CREATE FUNCTION imagegen_snapshot(j jobs) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'seq', j.seq, 'id', j.id, 'status', j.status, 'num_images', j.num_images, 'animal', j.animal,
        'prompt', j.prompt, 'images', j.images, 'attempts', j.attempts, 'error_code', j.error_code,
        'error_message', j.error_message, 'error_retryable', j.error_retryable,
        'created_at', j.created_at, 'updated_at', j.updated_at, 'started_at', j.started_at,
        'completed_at', j.completed_at, 'not_before', j.not_before)::text
$$;

-- POST /generations in one round trip, so the counter's lock is held only while the server
-- runs it (never across a round trip to a busy client). A create takes that lock first: creates
-- then run one at a time, and the pending count below (each statement here sees what the
-- creates before it committed) is exact across all nodes. Returns one row: the job.created
-- event (event_seq, snapshot, job_seq); or the job an Idempotency-Key already made
-- (reused_job_id, same_body); or, with max_pending jobs waiting, how many (pending).
CREATE FUNCTION imagegen_create_job(
    p_id text, p_num_images integer, p_animal text, p_prompt text, p_now text,
    p_key text, p_request_hash text, p_max_pending integer
) RETURNS TABLE (event_seq bigint, snapshot text, job_seq bigint, reused_job_id text, same_body boolean, pending bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    used idempotency_keys%ROWTYPE;
    waiting bigint;
    created jobs%ROWTYPE;
    next_seq bigint;
BEGIN
    PERFORM 1 FROM event_counter FOR UPDATE;
    IF p_key IS NOT NULL THEN
        SELECT * INTO used FROM idempotency_keys WHERE key = p_key;
        IF FOUND THEN
            RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint, used.job_id, used.request_hash = p_request_hash, NULL::bigint;
            RETURN;
        END IF;
    END IF;
    -- Counted no further than the limit: the cost stays bounded however long the backlog.
    SELECT count(*) INTO waiting FROM (SELECT 1 FROM jobs WHERE status = 'pending' LIMIT p_max_pending) AS waiting_jobs;
    IF waiting >= p_max_pending THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::boolean, waiting;
        RETURN;
    END IF;
    INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at)
    VALUES (p_id, p_num_images, p_animal, p_prompt, p_now, p_now)
    RETURNING * INTO created;
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) VALUES (p_key, p_request_hash, p_id, p_now);
    END IF;
    UPDATE event_counter SET last = last + 1 RETURNING last INTO next_seq;
    INSERT INTO events (seq, job_id, name, job, job_seq, status, created_at)
    VALUES (next_seq, p_id, 'job.created', imagegen_snapshot(created), created.seq, created.status, p_now);
    PERFORM pg_notify('imagegen_events', '');
    RETURN QUERY SELECT next_seq, imagegen_snapshot(created), created.seq, NULL::text, NULL::boolean, NULL::bigint;
END $$;
