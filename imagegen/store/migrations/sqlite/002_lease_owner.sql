-- Version 2: which process drew each job's current attempt (the PostgreSQL backend's lease
-- owner; on SQLite one process owns the file, so it is informational only).
ALTER TABLE jobs ADD COLUMN lease_owner TEXT; -- node id of the worker process holding the job while it is processing
