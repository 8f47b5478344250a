//! Usage records as CloudEvents 1.0 (CONTRACT §8), shared by the `http` and
//! `nats` sinks, and what those sinks remember of the batch they are retrying.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use super::{SinkError, UsageBatch};
use crate::index::KeyIndex;
use crate::usage::record::UsageRecord;

pub const EVENT_TYPE: &str = "keygate.usage";
/// The content type of one event in structured mode.
pub const EVENT_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Where the events' `subject` (the key's owner) comes from.
pub trait KeyOwners: Send + Sync {
    /// The owner of each of `key_ids` that is known and has one.
    fn owners_of(&self, key_ids: &HashSet<String>) -> HashMap<String, String>;
}

/// For records that do not carry their owner (read back from the spool after a
/// restart). The gateway's key index is keyed by digest, not id, and a second map
/// by id would double its memory for millions of keys, so the owners of such a
/// batch are found in one pass over the index (see [`Delivery`]). A key deleted
/// before its usage is delivered has no owner any more: its events name the key
/// id instead.
impl KeyOwners for KeyIndex {
    fn owners_of(&self, key_ids: &HashSet<String>) -> HashMap<String, String> {
        let snapshot = self.current();
        let mut owners = HashMap::new();
        for (_, record) in snapshot.records() {
            if let Some(owner) = record.owner() {
                if key_ids.contains(record.id()) {
                    owners.insert(record.id().to_owned(), owner.to_owned());
                }
            }
        }
        owners
    }
}

/// One usage record as a CloudEvent; `data` is the record exactly as a file sink writes it.
#[derive(Debug, Serialize)]
pub struct UsageEvent<'a> {
    pub specversion: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub source: String,
    pub id: String,
    pub subject: &'a str,
    pub time: String,
    pub datacontenttype: &'static str,
    pub data: &'a UsageRecord,
}

/// The event of `record`, the batch's record for one key. Everything in it is
/// fixed by the batch and the owners found for it, so a retry sends the same event.
pub fn usage_event<'a>(
    batch: &UsageBatch<'_>,
    record: &'a UsageRecord,
    owners: &'a HashMap<String, String>,
) -> Result<UsageEvent<'a>, SinkError> {
    let time = record
        .window_end
        .format(&Rfc3339)
        .map_err(|e| SinkError::Other(format!("cannot format the window end of {}: {e}", record.key_id)))?;
    Ok(UsageEvent {
        specversion: "1.0",
        kind: EVENT_TYPE,
        source: format!("keygate/{}", batch.node),
        id: event_id(batch.node, batch.boot_id, batch.sequence, &record.key_id),
        subject: owners.get(&record.key_id).map_or(&record.key_id, String::as_str),
        time,
        datacontenttype: "application/json",
        data: record,
    })
}

/// Deterministic per (node, boot, sequence, key): a retried batch repeats it, and
/// no other record of any node gets it. 128 bits of SHA-256 in hex, so its length
/// and characters suit any receiver whatever the node and key ids hold.
pub fn event_id(node: &str, boot_id: &str, sequence: u64, key_id: &str) -> String {
    digest_id(&[node.as_bytes(), boot_id.as_bytes(), &sequence.to_be_bytes(), key_id.as_bytes()])
}

/// The same for one request of a batch (the `webhook-id` of a signed request).
pub fn request_id(batch: &UsageBatch<'_>, chunk: usize) -> String {
    digest_id(&[
        batch.node.as_bytes(),
        batch.boot_id.as_bytes(),
        &batch.sequence.to_be_bytes(),
        b"request",
        &(chunk as u64).to_be_bytes(),
    ])
}

fn digest_id(fields: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for field in fields {
        // Length-prefixed, so that no two different field lists hash the same bytes.
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// What a sink has done so far for the batch it is writing. The flusher retries a
/// failed batch unchanged, so parts already acknowledged (records, or requests of
/// several records) are not sent again, and the owners found for the first try
/// are kept: every try sends the same events.
#[derive(Default)]
pub struct Delivery {
    state: Mutex<Option<DeliveryState>>,
}

struct DeliveryState {
    boot_id: String,
    sequence: u64,
    owners: Option<Arc<HashMap<String, String>>>,
    /// Indexes of the parts acknowledged.
    acknowledged: HashSet<usize>,
}

impl Delivery {
    /// The owners for `batch` and the parts of it already acknowledged.
    pub async fn start(
        &self,
        batch: &UsageBatch<'_>,
        owners: &Arc<dyn KeyOwners>,
    ) -> Result<(Arc<HashMap<String, String>>, HashSet<usize>), SinkError> {
        let known = {
            let mut state = self.lock();
            let same_batch = state.as_ref().is_some_and(|s| s.boot_id == batch.boot_id && s.sequence == batch.sequence);
            if !same_batch {
                *state = Some(DeliveryState {
                    boot_id: batch.boot_id.to_owned(),
                    sequence: batch.sequence,
                    owners: None,
                    acknowledged: HashSet::new(),
                });
            }
            state.as_ref().and_then(|s| s.owners.clone().map(|owners| (owners, s.acknowledged.clone())))
        };
        if let Some(known) = known {
            return Ok(known);
        }
        // Records counted by this process carry their key's owner; only records read
        // back from the spool need the index.
        let mut found: HashMap<String, String> = batch
            .records
            .iter()
            .filter_map(|r| match &r.owner_at_count {
                Some(Some(owner)) => Some((r.key_id.clone(), owner.clone())),
                _ => None,
            })
            .collect();
        let unknown: HashSet<String> =
            batch.records.iter().filter(|r| r.owner_at_count.is_none()).map(|r| r.key_id.clone()).collect();
        if !unknown.is_empty() {
            let lookup = Arc::clone(owners);
            // One pass over the whole index: off the async workers.
            let looked_up = tokio::task::spawn_blocking(move || lookup.owners_of(&unknown))
                .await
                .map_err(|e| SinkError::Other(format!("the owner lookup stopped: {e}")))?;
            found.extend(looked_up);
        }
        let found = Arc::new(found);
        if let Some(state) = self.lock().as_mut() {
            state.owners = Some(Arc::clone(&found));
        }
        Ok((found, HashSet::new()))
    }

    /// Marks parts of `batch` as acknowledged by the receiver.
    pub fn acknowledged(&self, batch: &UsageBatch<'_>, parts: impl IntoIterator<Item = usize>) {
        if let Some(state) = self.lock().as_mut() {
            if state.boot_id == batch.boot_id && state.sequence == batch.sequence {
                state.acknowledged.extend(parts);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<DeliveryState>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(key: &str) -> UsageRecord {
        UsageRecord {
            node: "gw-1".into(),
            key_id: key.into(),
            window_start: datetime!(2026-03-01 12:00:00 UTC),
            window_end: datetime!(2026-03-01 12:00:05.25 UTC),
            requests: 3,
            allowed: 2,
            denied: [("rate_limited".to_owned(), 1)].into(),
            status: Default::default(),
            bytes_in: 1,
            bytes_out: 2,
            last_used_at: None,
            owner_at_count: None,
        }
    }

    fn batch(records: &[UsageRecord], sequence: u64) -> UsageBatch<'_> {
        UsageBatch { node: "gw-1", boot_id: "boot-a", sequence, records }
    }

    #[test]
    fn event_ids_repeat_for_the_same_record_of_the_same_batch_only() {
        let id = event_id("gw-1", "boot-a", 7, "key_1");
        assert_eq!(id, event_id("gw-1", "boot-a", 7, "key_1"));
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        for other in [
            event_id("gw-2", "boot-a", 7, "key_1"),
            event_id("gw-1", "boot-b", 7, "key_1"),
            event_id("gw-1", "boot-a", 8, "key_1"),
            event_id("gw-1", "boot-a", 7, "key_2"),
            // Field boundaries count: the same bytes split differently are another record.
            event_id("gw-1b", "oot-a", 7, "key_1"),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn event_carries_every_required_attribute_and_the_record_as_data() {
        let records = [record("key_1")];
        let owners = HashMap::from([("key_1".to_owned(), "acme".to_owned())]);
        let event = usage_event(&batch(&records, 7), &records[0], &owners).unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "keygate.usage");
        assert_eq!(json["source"], "keygate/gw-1");
        assert_eq!(json["id"], event_id("gw-1", "boot-a", 7, "key_1"));
        assert_eq!(json["subject"], "acme");
        assert_eq!(json["time"], "2026-03-01T12:00:05.25Z");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["data"], serde_json::to_value(&records[0]).unwrap());
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), 8, "no attribute beyond the eight: {json}");
    }

    #[test]
    fn event_subject_falls_back_to_the_key_id_without_an_owner() {
        let records = [record("key_1"), record("key_2")];
        let owners = HashMap::from([("key_2".to_owned(), "acme".to_owned())]);
        let event = usage_event(&batch(&records, 1), &records[0], &owners).unwrap();
        assert_eq!(event.subject, "key_1");
    }

    #[test]
    fn key_index_finds_owners_by_key_id() {
        use crate::index::{KeyRecord, Snapshot};
        let key = |id: &str, owner: Option<&str>, digest: u8| {
            (crate::key::KeyDigest([digest; 32]), KeyRecord::builder(id).owner(owner.map(str::to_owned)).build())
        };
        let snapshot =
            Snapshot::build(1, [key("key_a", Some("acme"), 1), key("key_b", None, 2), key("key_c", Some("globex"), 3)])
                .unwrap();
        let index = KeyIndex::new(snapshot);
        let wanted: HashSet<String> = ["key_a", "key_b", "key_gone"].map(str::to_owned).into();
        assert_eq!(index.owners_of(&wanted), HashMap::from([("key_a".to_owned(), "acme".to_owned())]));
    }

    struct CountingOwners(std::sync::atomic::AtomicUsize);

    impl KeyOwners for CountingOwners {
        fn owners_of(&self, key_ids: &HashSet<String>) -> HashMap<String, String> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            key_ids.iter().map(|id| (id.clone(), format!("owner-{n}"))).collect()
        }
    }

    #[tokio::test]
    async fn a_retried_batch_keeps_its_owners_and_acknowledged_parts() {
        let owners: Arc<dyn KeyOwners> = Arc::new(CountingOwners(Default::default()));
        let delivery = Delivery::default();
        let records = [record("key_1"), record("key_2")];
        let first = batch(&records, 1);
        let (found, done) = delivery.start(&first, &owners).await.unwrap();
        assert_eq!(found["key_1"], "owner-0");
        assert!(done.is_empty());
        delivery.acknowledged(&first, [1]);

        let (found, done) = delivery.start(&first, &owners).await.unwrap();
        assert_eq!(found["key_1"], "owner-0", "a retry looked the owners up again");
        assert_eq!(done, HashSet::from([1]));

        let (found, done) = delivery.start(&batch(&records, 2), &owners).await.unwrap();
        assert_eq!(found["key_1"], "owner-1", "the next batch reused the last one's owners");
        assert!(done.is_empty(), "the next batch started with the last one's acknowledgements");
    }

    #[tokio::test]
    async fn records_that_carry_their_owner_need_no_pass_over_the_index() {
        let lookups = Arc::new(CountingOwners(Default::default()));
        let owners: Arc<dyn KeyOwners> = Arc::clone(&lookups) as Arc<dyn KeyOwners>;
        let mut counted = [record("key_1"), record("key_2")];
        counted[0].owner_at_count = Some(Some("acme".to_owned()));
        counted[1].owner_at_count = Some(None);
        let (found, _) = Delivery::default().start(&batch(&counted, 1), &owners).await.unwrap();
        assert_eq!(*found, HashMap::from([("key_1".to_owned(), "acme".to_owned())]));
        assert_eq!(lookups.0.load(std::sync::atomic::Ordering::SeqCst), 0, "the index was scanned");

        // Read back from the spool: the owner is looked up.
        let replayed = [record("key_3")];
        let (found, _) = Delivery::default().start(&batch(&replayed, 2), &owners).await.unwrap();
        assert_eq!(found["key_3"], "owner-0");
    }
}
