//! keygate: an API-key enforcement gateway built on Pingora.
//!
//! - `proxy`: the request path (Pingora adapter, routing, upstreams, responses)
//! - `policy`: the access decision, a pure function
//! - `outcome`: what keygate answers itself: outcome codes, the JSON error body, request ids
//! - `index`: the in-memory key index and the keys file
//! - `key`: key format, checksum, hashing
//! - `sync`: how a gateway's index stays fresh
//! - `control`: the control plane: admin API, sync feed, snapshots, import, events and
//!   webhooks, the store
//! - `console`: the web console at `/ui`, a static app that uses only the admin API
//! - `key_state`: each budget's mutable state (rate limit, quota, usage) in one entry
//! - `limit`: rate limiters and quota counters
//! - `usage`: usage counters, the flusher, its spool and the sinks
//! - `metrics`, `access_log`, `admin`: Prometheus metrics, the access log, the health endpoints
//! - `systemd_notify`: readiness for systemd
//! - `config`: the config file, validated
//! - `http_client`: the one HTTP client builder (CLI, gateway to control plane)
//! - `webhook_signature`: Standard Webhooks signing (webhooks, the `http` usage sink)
//! - `server`, `cli`: running a node, the command line

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod http_client;
pub mod index;
pub mod key;
pub mod limit;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod sync;
pub mod systemd_notify;
pub mod usage;
pub mod webhook_signature;
