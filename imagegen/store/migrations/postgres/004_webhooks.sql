-- Version 4: webhooks, as SQLite's version 5 (see there): job_webhooks, written in the create's
-- transaction before its job.created event, and deliveries, written by the trigger below in the
-- same transaction as each event (an outbox). Any node may attempt a delivery; a claim leases it
-- (lease_until_ms), so one node at a time does, and a node that dies mid-attempt loses nothing.
CREATE TABLE job_webhooks (
    job_id text PRIMARY KEY,
    owner  text,
    url    text NOT NULL,
    host   text NOT NULL,
    events jsonb NOT NULL
);

CREATE TABLE deliveries (
    id         text PRIMARY KEY,
    job_id     text NOT NULL,
    owner      text,
    seq        bigint NOT NULL,
    event      text NOT NULL,
    job        text NOT NULL,
    event_at   text NOT NULL,
    url        text NOT NULL,
    host       text NOT NULL,
    status     text NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'delivered', 'failed', 'given_up')),
    attempts   text NOT NULL DEFAULT '[]',
    next_at_ms bigint,
    window_ms  bigint NOT NULL,
    lease_until_ms bigint,  -- by the database's clock, as every node reads it
    lease_owner text,
    created_at text NOT NULL,
    updated_at text NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_at_ms) WHERE status = 'pending';
CREATE INDEX deliveries_job_seq ON deliveries (job_id, seq);

-- Once per statement, over the events it inserted: a job without a webhook costs one probe of
-- job_webhooks' primary key.
CREATE FUNCTION imagegen_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deliveries (id, job_id, owner, seq, event, job, event_at, url, host, next_at_ms, window_ms,
                            created_at, updated_at)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), w.job_id, w.owner, e.seq, e.name, e.job,
           e.created_at, w.url, w.host, (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
           (extract(epoch FROM clock_timestamp()) * 1000)::bigint, e.created_at, e.created_at
    FROM new_events AS e JOIN job_webhooks AS w ON w.job_id = e.job_id
    WHERE w.events ? e.name;
    RETURN NULL;
END $$;
CREATE TRIGGER events_outbox AFTER INSERT ON events
REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION imagegen_outbox();
