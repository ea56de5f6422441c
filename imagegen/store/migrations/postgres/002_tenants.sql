-- Version 2: tenants. With [auth] enabled each job belongs to the API key (its name) that made
-- it; jobs made with auth off have no owner (NULL). Idempotency keys become per tenant, the
-- create counts each tenant's backlog, and claims take turns between tenants.
ALTER TABLE jobs ADD COLUMN owner text; -- the tenant (API key name) that created the job; NULL: made with auth off
-- One tenant's list, newest first. Partial: with auth off no row is in it, so it costs nothing.
CREATE INDEX jobs_owner_seq ON jobs (owner, seq) WHERE owner IS NOT NULL;
-- One tenant's backlog, counted by every create of that tenant.
CREATE INDEX jobs_owner_pending ON jobs (owner) WHERE status = 'pending' AND owner IS NOT NULL;

ALTER TABLE events ADD COLUMN owner text; -- the job's owner, copied out like job_seq: streams filter on it

-- The same key from two tenants names two jobs: the key is unique per owner ('' with auth off).
ALTER TABLE idempotency_keys ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (owner, key);

-- Fair claiming: when each tenant ('' for jobs without an owner) last had a job claimed. The
-- next claim goes to the tenant with a runnable job whose turn is oldest (round-robin), and
-- within a tenant to its oldest job.
CREATE TABLE tenant_turns (
    owner      text   PRIMARY KEY,
    last_claim bigint NOT NULL -- the event id of that claim: larger is more recent
);

-- A job row as its events' snapshot: the same keys, in the same order, as SQLite's.
CREATE OR REPLACE FUNCTION imagegen_snapshot(j jobs) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'seq', j.seq, 'id', j.id, 'status', j.status, 'num_images', j.num_images, 'animal', j.animal,
        'prompt', j.prompt, 'images', j.images, 'attempts', j.attempts, 'error_code', j.error_code,
        'error_message', j.error_message, 'error_retryable', j.error_retryable,
        'created_at', j.created_at, 'updated_at', j.updated_at, 'started_at', j.started_at,
        'completed_at', j.completed_at, 'not_before', j.not_before, 'owner', j.owner)::text
$$;

-- As in version 1, with the owner: its Idempotency-Key is looked up among its own, and with
-- p_owner_max_pending of its jobs waiting the create is refused (pending, tenant_limited).
DROP FUNCTION imagegen_create_job(text, integer, text, text, text, text, text, integer);
CREATE FUNCTION imagegen_create_job(
    p_id text, p_num_images integer, p_animal text, p_prompt text, p_now text,
    p_key text, p_request_hash text, p_max_pending integer, p_owner text, p_owner_max_pending integer
) RETURNS TABLE (
    event_seq bigint, snapshot text, job_seq bigint, reused_job_id text, same_body boolean, pending bigint,
    tenant_limited boolean
)
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
        SELECT * INTO used FROM idempotency_keys WHERE owner = coalesce(p_owner, '') AND key = p_key;
        IF FOUND THEN
            RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint, used.job_id, used.request_hash = p_request_hash,
                                NULL::bigint, NULL::boolean;
            RETURN;
        END IF;
    END IF;
    -- Counted no further than the limit: the cost stays bounded however long the backlog.
    IF p_owner IS NOT NULL AND p_owner_max_pending IS NOT NULL THEN
        SELECT count(*) INTO waiting FROM (
            SELECT 1 FROM jobs WHERE status = 'pending' AND owner = p_owner LIMIT p_owner_max_pending
        ) AS waiting_jobs;
        IF waiting >= p_owner_max_pending THEN
            RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::boolean, waiting, true;
            RETURN;
        END IF;
    END IF;
    SELECT count(*) INTO waiting FROM (SELECT 1 FROM jobs WHERE status = 'pending' LIMIT p_max_pending) AS waiting_jobs;
    IF waiting >= p_max_pending THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::boolean, waiting, false;
        RETURN;
    END IF;
    INSERT INTO jobs (id, num_images, animal, prompt, created_at, updated_at, owner)
    VALUES (p_id, p_num_images, p_animal, p_prompt, p_now, p_now, p_owner)
    RETURNING * INTO created;
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (owner, key, request_hash, job_id, created_at)
        VALUES (coalesce(p_owner, ''), p_key, p_request_hash, p_id, p_now);
    END IF;
    UPDATE event_counter SET last = last + 1 RETURNING last INTO next_seq;
    INSERT INTO events (seq, job_id, name, job, job_seq, status, owner, created_at)
    VALUES (next_seq, p_id, 'job.created', imagegen_snapshot(created), created.seq, created.status, p_owner, p_now);
    PERFORM pg_notify('imagegen_events', '');
    RETURN QUERY SELECT next_seq, imagegen_snapshot(created), created.seq, NULL::text, NULL::boolean, NULL::bigint,
                        NULL::boolean;
END $$;
