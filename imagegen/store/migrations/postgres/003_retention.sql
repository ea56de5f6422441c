-- Version 3: retention finds the terminal jobs that ended longest ago. Partial: only ended jobs
-- have a completed_at, and the index holds nothing else.
CREATE INDEX jobs_completed_at ON jobs (completed_at) WHERE completed_at IS NOT NULL;
