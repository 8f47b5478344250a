//! The limits of a usage upload (`POST /v1/sync/usage`), shared by the control plane
//! that enforces them and the gateways that split their usage to fit.
//!
//! A gateway sends one flush window as several uploads of at most
//! [`MAX_UPLOAD_RECORDS`] records, each with its own sequence, so each is counted once
//! on its own however often it is retried. An upload over either limit is refused
//! whole with `413 payload_too_large`; nothing of it is counted.

/// Most usage records one upload may hold: a gateway's chunk size.
pub const MAX_UPLOAD_RECORDS: usize = 5_000;

/// Largest body of one upload, in bytes. A record is a few hundred bytes of JSON;
/// this leaves room for [`MAX_UPLOAD_RECORDS`] records over 3 KB each (long key ids,
/// every denial code), while one upload's memory on the control plane stays bounded.
pub const MAX_UPLOAD_BYTES: usize = 16 * 1024 * 1024;
