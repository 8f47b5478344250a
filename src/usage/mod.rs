//! Per-key usage: counted on the request path, shipped to sinks in the background.
//!
//! The request path only adds to atomics (`KeyUsage`) in the key's entry of
//! `crate::limit::KeyStates`, held since the access decision (no lookup, no
//! allocation once a key has been seen, no lock). The flusher swaps the counters
//! to zero every `usage.flush_interval`, through [`UsageCounters`] (which `limit`
//! implements, so this module needs nothing of it), and hands the totals to each
//! sink, which keeps and merges what it could not deliver. Entries of keys idle for a whole window are reset, or removed when
//! their limits hold nothing either, so memory follows active keys, not requests.

mod counters;
mod flusher;
mod record;
mod sink;
mod spool;
pub mod upload;

pub(crate) use counters::KeyUsage;
pub use counters::{RequestUsage, UsageCounters};
pub use flusher::{Flusher, FlusherHandle, NamedSink};
pub use record::{add_denied, StatusClasses, UsageRecord};
pub use sink::{
    event_id, ControlPlaneSink, FileSink, HttpSink, KeyOwners, NatsSink, SinkError, UsageBatch, UsageEvent, UsageSink,
    BATCH_CONTENT_TYPE, EVENT_CONTENT_TYPE, EVENT_TYPE,
};
