-- Fleet limits through the control plane (`fleet_limits: { engine: control_plane }`):
-- the counters and high-water marks gateways reconcile through, each with its expiry
-- (Unix milliseconds); expired rows count as absent and are swept.
CREATE TABLE fleet_counters (
    name       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    value      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX fleet_counters_expiry_idx ON fleet_counters (expires_at);
