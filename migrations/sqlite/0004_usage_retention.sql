-- Usage retention (`usage.retention`): minute buckets are rolled up into hour buckets,
-- hours into days, old days deleted, old batch ids pruned. Rolled-up buckets stay in
-- `usage_buckets` and `usage_denied`, at the start of their hour or day, so every query
-- that sums a range (the usage API, quota seeding) reads them unchanged.

-- The rollup and the pruning find old rows by time, not by key.
CREATE INDEX usage_buckets_start_idx ON usage_buckets (bucket_start);
CREATE INDEX usage_denied_start_idx ON usage_denied (bucket_start);
CREATE INDEX usage_batches_received_idx ON usage_batches (received_at);

-- How far each rollup has gone: buckets before `done_before` are already at the
-- level's width, so a pass starts there instead of rescanning every kept bucket.
CREATE TABLE usage_rollups (
    level       TEXT   PRIMARY KEY,   -- 'hour' | 'day'
    done_before INTEGER NOT NULL
);
