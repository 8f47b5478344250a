//! Per-key usage: counted on the request path, shipped to sinks in the background.
//!
//! The request path only adds to atomics of an entry found by key id (no
//! allocation once a key has been seen, no lock held beyond a shard read
//! guard). The flusher swaps the counters to zero every `usage.flush_interval`
//! and hands the totals to each sink, which keeps and merges what it could not
//! deliver. Entries of keys idle for a whole window are removed, so memory
//! follows active keys, not requests.

mod counters;
mod flusher;
mod record;
mod sink;
mod spool;

pub use counters::{RequestUsage, UsageCounters};
pub use flusher::{Flusher, FlusherHandle, NamedSink};
pub use record::{add_denied, StatusClasses, UsageRecord};
pub use sink::{
    event_id, ControlPlaneSink, FileSink, HttpSink, KeyOwners, NatsSink, SinkError, UsageBatch, UsageEvent, UsageSink,
    BATCH_CONTENT_TYPE, EVENT_CONTENT_TYPE, EVENT_TYPE,
};
