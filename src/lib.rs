//! keygate: an API-key enforcement gateway built on Pingora.
//!
//! Modules by layer: each uses only modules listed before it here, so no two
//! import each other. The declarations below keep these four groups (rustfmt
//! sorts each).
//!
//! Foundations, which use no other module:
//! - `key`: key format, checksum, hashing
//! - `outcome`: what keygate answers itself: denials and other outcome codes, the JSON error body, request ids
//! - `config`: the config file, validated; CIDRs and the bounds a limit can be enforced within
//! - `http_client`: the one HTTP client builder
//! - `webhook_signature`: Standard Webhooks signing (webhooks, the `http` usage sink)
//! - `systemd_notify`: readiness for systemd
//!
//! State and its outputs:
//! - `index`: the in-memory key index and the keys file
//! - `metrics`: Prometheus metrics
//! - `access_log`: the access log writer
//! - `console`: the web console at `/ui`, a static app that uses only the admin API
//! - `usage`: usage counters, the flusher, its spool, the sinks and the upload limits
//! - `admin`: the admin listener, `/healthz` `/readyz` `/metrics`, the admin router's pieces
//! - `limit`: each budget's state (rate limit, quota, usage counters), the limiters, fleet limits
//!
//! Decisions and services:
//! - `policy`: the access decision, a pure function
//! - `control`: the control plane: admin API, sync feed, snapshots, import, events and webhooks, the store
//! - `sync`: how a gateway's index stays fresh (keys file, feeds, cache file, quota seeds)
//! - `proxy`: the request path (Pingora adapter, routing, upstreams, responses)
//!
//! Entry points:
//! - `server`: running a node: its components, started in one order, stopped by one signal
//! - `cli`: the command line

pub mod config;
pub mod http_client;
pub mod key;
pub mod outcome;
pub mod systemd_notify;
pub mod webhook_signature;

pub mod access_log;
pub mod admin;
pub mod console;
pub mod index;
pub mod limit;
pub mod metrics;
pub mod usage;

pub mod control;
pub mod policy;
pub mod proxy;
pub mod sync;

pub mod cli;
pub mod server;
