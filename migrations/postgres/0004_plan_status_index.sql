-- A plan and a status together: both rare (enterprise keys that are disabled) match one
-- key in hundreds, too few to find a page of them by walking either column's index.

SELECT set_config('maintenance_work_mem', '256MB', true)
WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes('256MB');

CREATE INDEX keys_plan_status_created_idx ON keys (plan, status, created_at DESC, id DESC);
