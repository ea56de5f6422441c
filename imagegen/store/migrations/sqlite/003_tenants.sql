-- Version 3: tenants. With [auth] enabled each job belongs to the API key (its name) that made
-- it; jobs made with auth off have no owner (NULL). Idempotency keys become per tenant.
ALTER TABLE jobs ADD COLUMN owner TEXT; -- the tenant (API key name) that created the job; NULL: made with auth off

-- One tenant's list, newest first. Partial: with auth off no row is in it, so it costs nothing.
CREATE INDEX jobs_owner_seq ON jobs (owner, seq) WHERE owner IS NOT NULL;

-- The same key from two tenants names two jobs: the key is unique per owner ('' with auth off).
CREATE TABLE idempotency_keys_v3 (
    owner        TEXT NOT NULL DEFAULT '', -- the tenant that sent the key; '' with auth off
    key          TEXT NOT NULL,            -- the client's Idempotency-Key header
    request_hash TEXT NOT NULL,            -- sha256 of the validated request body: a reused key must carry the same
    job_id       TEXT NOT NULL,            -- the job it created
    created_at   TEXT NOT NULL,            -- pruned once older than the retention
    PRIMARY KEY (owner, key)
);
INSERT INTO idempotency_keys_v3 (owner, key, request_hash, job_id, created_at)
SELECT '', key, request_hash, job_id, created_at FROM idempotency_keys;
DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_v3 RENAME TO idempotency_keys;
-- A deleted job's keys are found by its id.
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);
