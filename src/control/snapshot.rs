//! The key set a gateway loads at start, streamed page by page from the store.
//!
//! The feed version is read first, then the keys by id in pages, each page one
//! frame of the wire encoding (`index::wire`). Pages are separate queries, not
//! one long transaction: a slow or vanished gateway then holds no database
//! connection and no more than the page being sent. A key changed while the
//! pages are read shows its newer state or its older one, and either way the
//! gateway's next step, the changes after the version sent, brings it to the
//! current state.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

use super::model::StoredKey;
use super::store::{Store, StoreError, MAX_SNAPSHOT_PAGE};
use crate::index::wire::{self, Frame, WireKey, WireQuota, WireRate};
use crate::key::KeyDigest;

/// The wire form of a stored key; `None` if its hash is unusable (a hand-edited store).
pub fn wire_key(key: &StoredKey) -> Option<WireKey<'_>> {
    let digest = KeyDigest::parse(&key.hash).ok()?;
    fn borrowed(s: &str) -> Cow<'_, str> {
        Cow::Borrowed(s)
    }
    Some(WireKey {
        digest: digest.0,
        id: Cow::Borrowed(&key.id),
        name: (key.name != key.id).then_some(Cow::Borrowed(key.name.as_str())),
        owner: key.owner.as_deref().map(borrowed),
        plan: key.plan.as_deref().map(borrowed),
        scopes: key.scopes.iter().map(|s| borrowed(s)).collect(),
        ip_allowlist: key.ip_allowlist.iter().map(|s| borrowed(s)).collect(),
        ip_allowlist_unusable: false,
        rate_limit: key.rate_limit.as_ref().map(WireRate::from),
        quota: key.quota.as_ref().map(WireQuota::from),
        status: key.status.into(),
        expires_at_ms: key.expires_at.map(|at| at.unix_timestamp_nanos().div_euclid(1_000_000) as i64),
        metadata: (!key.metadata.is_empty())
            .then(|| serde_json::to_string(&key.metadata).ok())
            .flatten()
            .map(Cow::Owned),
        tags: key.tags.iter().map(|s| borrowed(s)).collect(),
        imported: false,
    })
}

enum Step {
    Start,
    Page { version: u64, after: Option<String>, sent: u64 },
    Done,
}

/// Where a snapshot starts: the feed version, read before any key.
pub struct SnapshotStart {
    version: u64,
    keys_estimate: u64,
}

impl SnapshotStart {
    /// Reads the version (and a key count for the gateway to size its index): the
    /// part that can fail before any byte is sent, so it can still get an error answer.
    pub async fn read(store: &Store) -> Result<Self, StoreError> {
        Ok(SnapshotStart { version: store.feed_version().await?, keys_estimate: store.key_count_estimate().await? })
    }
}

/// The whole key set as a stream of encoded frames, read one page at a time as
/// the body is sent: a page is read only when the previous one has been taken.
pub fn stream(store: Arc<Store>, start: SnapshotStart) -> impl Stream<Item = Result<Bytes, StoreError>> + Send {
    futures_util::stream::try_unfold(Step::Start, move |step| {
        let store = Arc::clone(&store);
        async move {
            match step {
                Step::Start => {
                    let SnapshotStart { version, keys_estimate } = start;
                    let mut bytes = wire::header().to_vec();
                    // The id only ties a gateway's change log to its snapshot file.
                    wire::encode_frame(&Frame::Start { version, keys: keys_estimate, id: 0 }, &mut bytes);
                    Ok(Some((Bytes::from(bytes), Step::Page { version, after: None, sent: 0 })))
                }
                Step::Page { version, after, sent } => {
                    let page = store.keys_after(after.as_deref(), MAX_SNAPSHOT_PAGE).await?;
                    let mut bytes = Vec::new();
                    let Some(last) = page.last() else {
                        wire::encode_frame(&Frame::End { version, keys: sent }, &mut bytes);
                        return Ok(Some((Bytes::from(bytes), Step::Done)));
                    };
                    let after = Some(last.id.clone());
                    let keys: Vec<WireKey<'_>> = page
                        .iter()
                        .filter_map(|key| {
                            let wire = wire_key(key);
                            if wire.is_none() {
                                tracing::error!(key_id = %key.id, "a stored key has an unusable hash; it is not sent to gateways");
                            }
                            wire
                        })
                        .collect();
                    let sent = sent + keys.len() as u64;
                    wire::encode_frame(&Frame::Keys(keys), &mut bytes);
                    Ok(Some((Bytes::from(bytes), Step::Page { version, after, sent })))
                }
                Step::Done => Ok(None),
            }
        }
    })
}
