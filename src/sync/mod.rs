//! Gateway side of key distribution: where the key index comes from and how it stays fresh.

mod cache_file;
mod feeds;
mod fleet_engine;
mod follow;
mod keys_file;
mod last_sync;
mod quota_seed;

pub use cache_file::{CacheError, LastKnownGood, LoadedCache};
pub use feeds::{LocalFeed, RemoteFeed};
pub use fleet_engine::ControlPlaneEngine;
pub use follow::{record_from_stored, ChangeBatch, FeedError, Follower, KeyFeed, LoadedKeys, LONG_POLL};
pub use keys_file::KeysFileSource;
pub use last_sync::{Freshness, LastSync};
pub use quota_seed::QuotaSeedSource;
