//! The key set as bytes: the snapshot a control plane streams to its gateways and
//! a gateway's last-known-good files share this one encoding.
//!
//! A stream starts with [`MAGIC`] and a little-endian `u16` format version, then
//! holds frames: a `u32` payload length, the payload's CRC32, and the payload, one
//! [`Frame`] in postcard (varint integers, strings as length + bytes). A snapshot
//! is `Start`, any number of `Keys`, `End` with the number of keys sent; a stream
//! that stops before `End`, or whose count or checksums disagree, is refused whole.
//!
//! Why this shape: frames let both sides work in bounded memory (the control plane
//! encodes one page of keys at a time, a gateway decodes one frame at a time into
//! its index); the checksum per frame finds a torn or flipped byte where it is; the
//! binary records are about a fifth of the same keys in JSON and decode without a
//! value tree, borrowing their strings from the frame.

use std::borrow::Cow;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::record::{KeyRecord, KeyRecordBuilder, KeyStatus, SharedPolicies};
use super::{Snapshot, SnapshotBuilder, SnapshotError};
use crate::config::parse_cidr;
use crate::config::{LimitScope, QuotaConfig, QuotaPeriod, RateLimitConfig};
use crate::key::KeyDigest;

pub const MAGIC: [u8; 6] = *b"KGKEYS";
/// 2: limits carry `by` (key or owner).
pub const FORMAT: u16 = 2;
/// The HTTP media type of a streamed key set.
pub const MEDIA_TYPE: &str = "application/vnd.keygate.keys";
/// No frame is larger: a length above it is corruption, not a big frame.
pub const MAX_FRAME: usize = 64 << 20;
const HEADER_LEN: usize = MAGIC.len() + 2;
const FRAME_HEAD_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a keygate key set")]
    BadMagic,
    #[error("key set format {0} is not one this keygate reads (it reads format {FORMAT})")]
    Format(u16),
    #[error("a frame of {0} bytes is over the limit: the data is corrupt")]
    TooLarge(usize),
    #[error("checksum mismatch in the frame at byte {0}")]
    Checksum(u64),
    #[error("undecodable frame at byte {at}: {reason}")]
    Decode { at: u64, reason: String },
    #[error("the key set ends early, at byte {0}")]
    Truncated(u64),
    #[error("the key set's frames are out of order: {0}")]
    Sequence(&'static str),
    #[error("the key set announces {announced} keys but holds {held}")]
    Count { announced: u64, held: u64 },
    #[error(transparent)]
    Index(#[from] SnapshotError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One frame's content.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Opens a key set at a feed version. `keys` is a hint for sizing the index
    /// (0: unknown); `id` ties a change log to the snapshot file it follows.
    Start {
        version: u64,
        keys: u64,
        id: u64,
    },
    Keys(#[serde(borrow)] Vec<WireKey<'a>>),
    /// One applied batch of changes (a change log's entries).
    Changes {
        version: u64,
        #[serde(borrow)]
        changes: Vec<WireChange<'a>>,
    },
    /// Closes a key set: how many keys it held.
    End {
        version: u64,
        keys: u64,
    },
}

/// A key in the form a gateway builds its record from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireKey<'a> {
    pub digest: [u8; 32],
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// `None`: the name is the id.
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub owner: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub plan: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub scopes: Vec<Cow<'a, str>>,
    /// As stored: an entry that is no address or CIDR closes the key to every address.
    #[serde(borrow)]
    pub ip_allowlist: Vec<Cow<'a, str>>,
    pub ip_allowlist_unusable: bool,
    pub rate_limit: Option<WireRate>,
    pub quota: Option<WireQuota>,
    pub status: KeyStatus,
    pub expires_at_ms: Option<i64>,
    /// Compact JSON object text.
    #[serde(borrow)]
    pub metadata: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub tags: Vec<Cow<'a, str>>,
    /// Brought in by an import: its raw form may have any shape.
    pub imported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRate {
    pub requests: u32,
    pub per_ms: u64,
    pub burst: Option<u32>,
    pub by: LimitScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireQuota {
    pub requests: u64,
    pub per: QuotaPeriod,
    pub by: LimitScope,
}

/// A key set or removed (`key: None`) under a digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireChange<'a> {
    pub digest: [u8; 32],
    #[serde(borrow)]
    pub key: Option<WireKey<'a>>,
}

impl From<&RateLimitConfig> for WireRate {
    fn from(limit: &RateLimitConfig) -> Self {
        WireRate {
            requests: limit.requests,
            per_ms: u64::try_from(limit.per.as_millis()).unwrap_or(u64::MAX),
            burst: limit.burst,
            by: limit.by,
        }
    }
}

impl From<&QuotaConfig> for WireQuota {
    fn from(quota: &QuotaConfig) -> Self {
        WireQuota { requests: quota.requests, per: quota.per, by: quota.by }
    }
}

fn ms_to_time(ms: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

fn time_to_ms(at: time::OffsetDateTime) -> i64 {
    // OffsetDateTime spans ±9999 years, well inside i64 milliseconds.
    at.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

impl<'a> WireKey<'a> {
    /// A record of the index back in wire form, borrowing its text.
    pub fn from_record(record: &'a KeyRecord) -> Self {
        let borrowed = |s: &'a str| Cow::Borrowed(s);
        WireKey {
            digest: record.digest.0,
            id: borrowed(record.id()),
            name: record.own_name().map(borrowed),
            owner: record.owner().map(borrowed),
            plan: record.plan().map(borrowed),
            scopes: record.scope_names().iter().map(|s| borrowed(s)).collect(),
            ip_allowlist: record.ip_allowlist().iter().map(|net| Cow::Owned(net.to_string())).collect(),
            ip_allowlist_unusable: record.ip_allowlist_unusable(),
            rate_limit: record.rate_limit().map(WireRate::from),
            quota: record.quota().map(WireQuota::from),
            status: record.status,
            expires_at_ms: record.expires_at().map(time_to_ms),
            metadata: record.metadata_json().map(borrowed),
            tags: record.tags().iter().map(|s| borrowed(s)).collect(),
            imported: record.imported(),
        }
    }

    /// The record the request path uses. An allowlist entry that is no address or
    /// CIDR makes the key admit no address: dropping the entry instead could leave
    /// an empty list, which admits every one.
    pub fn to_record(&self) -> (KeyDigest, KeyRecord) {
        let (digest, builder) = self.to_builder();
        (digest, builder.build())
    }

    /// [`WireKey::to_record`] before the record is built.
    pub fn to_builder(&self) -> (KeyDigest, KeyRecordBuilder) {
        let builder = KeyRecord::builder(self.id.as_ref())
            .name(self.name.as_deref().unwrap_or(&self.id))
            .owner(self.owner.as_deref().map(str::to_owned))
            .plan(self.plan.as_deref().map(str::to_owned))
            .scopes(self.scopes.iter().map(|s| s.as_ref().to_owned()).collect())
            .rate_limit(self.rate_limit.map(|r| RateLimitConfig {
                requests: r.requests,
                per: std::time::Duration::from_millis(r.per_ms),
                burst: r.burst,
                by: r.by,
            }))
            .quota(self.quota.map(|q| QuotaConfig { requests: q.requests, per: q.per, by: q.by }))
            .status(self.status)
            .expires_at(self.expires_at_ms.and_then(ms_to_time))
            .metadata_json(self.metadata.as_deref().map(str::to_owned))
            .tags(self.tags.iter().map(|s| s.as_ref().to_owned()).collect())
            .imported(self.imported);
        let nets = self.ip_allowlist.iter().map(|entry| parse_cidr(entry)).collect::<Option<Vec<_>>>();
        let builder = match nets {
            Some(nets) if !self.ip_allowlist_unusable => builder.ip_allowlist(nets),
            _ => builder.unusable_ip_allowlist(),
        };
        (KeyDigest(self.digest), builder)
    }

    /// The allowlist entries that close this key, for the log.
    pub fn unusable_allowlist_entries(&self) -> Vec<&str> {
        self.ip_allowlist.iter().filter(|entry| parse_cidr(entry).is_none()).map(|e| e.as_ref()).collect()
    }
}

/// The stream header: magic and format.
pub fn header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..MAGIC.len()].copy_from_slice(&MAGIC);
    header[MAGIC.len()..].copy_from_slice(&FORMAT.to_le_bytes());
    header
}

fn check_header(header: &[u8]) -> Result<(), WireError> {
    if header[..MAGIC.len()] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let format = u16::from_le_bytes([header[MAGIC.len()], header[MAGIC.len() + 1]]);
    if format != FORMAT {
        return Err(WireError::Format(format));
    }
    Ok(())
}

/// Appends `frame`, with its length and checksum, to `out`.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEAD_LEN]);
    // Writing to a Vec only fails on allocation failure, which aborts anyway.
    let written = postcard::to_io(frame, &mut *out).is_ok();
    debug_assert!(written);
    let payload_len = out.len() - start - FRAME_HEAD_LEN;
    let crc = crc32fast::hash(&out[start + FRAME_HEAD_LEN..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode_payload(payload: &[u8], at: u64) -> Result<Frame<'_>, WireError> {
    postcard::from_bytes(payload).map_err(|e| WireError::Decode { at, reason: e.to_string() })
}

/// Reads frames from bytes that arrive in pieces (an HTTP body).
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
    /// Where unread bytes start in `buffer`.
    read: usize,
    /// Stream offset of `buffer[0]`, for error messages.
    offset: u64,
    header_seen: bool,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.read > 0 && self.read >= self.buffer.len() / 2 {
            self.buffer.drain(..self.read);
            self.offset += self.read as u64;
            self.read = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame's payload, checked; `None` until more bytes arrive.
    pub fn next_payload(&mut self) -> Result<Option<(&[u8], u64)>, WireError> {
        if !self.header_seen {
            if self.buffer.len() - self.read < HEADER_LEN {
                return Ok(None);
            }
            check_header(&self.buffer[self.read..self.read + HEADER_LEN])?;
            self.read += HEADER_LEN;
            self.header_seen = true;
        }
        let unread = &self.buffer[self.read..];
        if unread.len() < FRAME_HEAD_LEN {
            return Ok(None);
        }
        let at = self.offset + self.read as u64;
        let (len, crc) = frame_head(unread)?;
        if unread.len() < FRAME_HEAD_LEN + len {
            return Ok(None);
        }
        let start = self.read + FRAME_HEAD_LEN;
        self.read = start + len;
        let payload = &self.buffer[start..start + len];
        if crc32fast::hash(payload) != crc {
            return Err(WireError::Checksum(at));
        }
        Ok(Some((payload, at)))
    }

    /// Whether bytes are left that do not make a whole frame.
    pub fn has_partial_frame(&self) -> bool {
        self.read < self.buffer.len() || !self.header_seen
    }

    pub fn position(&self) -> u64 {
        self.offset + self.read as u64
    }
}

fn frame_head(bytes: &[u8]) -> Result<(usize, u32), WireError> {
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok((len, crc))
}

/// Reads frames from a file. A frame cut short by the end of the file is
/// `Truncated`; `Ok(None)` only at a frame boundary.
pub struct FileFrames<R> {
    input: R,
    payload: Vec<u8>,
    position: u64,
}

impl<R: Read> FileFrames<R> {
    pub fn open(mut input: R) -> Result<Self, WireError> {
        let mut header = [0u8; HEADER_LEN];
        read_exact_or_truncated(&mut input, &mut header, 0)?;
        check_header(&header)?;
        Ok(FileFrames { input, payload: Vec::new(), position: HEADER_LEN as u64 })
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        let at = self.position;
        let mut head = [0u8; FRAME_HEAD_LEN];
        let mut filled = 0;
        while filled < FRAME_HEAD_LEN {
            match self.input.read(&mut head[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Truncated(at)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (len, crc) = frame_head(&head)?;
        self.payload.resize(len, 0);
        read_exact_or_truncated(&mut self.input, &mut self.payload, at)?;
        self.position += (FRAME_HEAD_LEN + len) as u64;
        if crc32fast::hash(&self.payload) != crc {
            return Err(WireError::Checksum(at));
        }
        decode_payload(&self.payload, at).map(Some)
    }

    pub fn position(&self) -> u64 {
        self.position
    }
}

fn read_exact_or_truncated(input: &mut impl Read, into: &mut [u8], at: u64) -> Result<(), WireError> {
    input.read_exact(into).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Truncated(at),
        _ => WireError::Io(e),
    })
}

/// Writes a key set or a change log frame by frame.
pub struct FrameWriter<W: Write> {
    out: W,
    buffer: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Starts a new stream (writes the header).
    pub fn create(mut out: W) -> io::Result<Self> {
        out.write_all(&header())?;
        Ok(FrameWriter { out, buffer: Vec::new() })
    }

    /// Continues a stream whose header is written already.
    pub fn append(out: W) -> Self {
        FrameWriter { out, buffer: Vec::new() }
    }

    pub fn write(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        self.buffer.clear();
        encode_frame(frame, &mut self.buffer);
        self.out.write_all(&self.buffer)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Keys whose stored allowlist closes them, seen while loading (for one log line).
#[derive(Debug, Default)]
pub struct UnusableAllowlists {
    pub count: u64,
    /// The first few, with their bad entries.
    pub examples: Vec<(String, Vec<String>)>,
}

impl UnusableAllowlists {
    const EXAMPLES: usize = 10;

    pub fn note(&mut self, key: &WireKey<'_>) {
        if !key.ip_allowlist_unusable && key.ip_allowlist.iter().all(|entry| parse_cidr(entry).is_some()) {
            return;
        }
        self.count += 1;
        if self.examples.len() < Self::EXAMPLES {
            let entries = key.unusable_allowlist_entries().into_iter().map(str::to_owned).collect();
            self.examples.push((key.id.to_string(), entries));
        }
    }
}

/// Builds a snapshot from a key set's frames as they come, and hands it over only
/// when the whole set has arrived and checks out.
pub struct KeySetLoader {
    builder: Option<SnapshotBuilder>,
    start: Option<(u64, u64)>,
    held: u64,
    finished: Option<Snapshot>,
    pub unusable: UnusableAllowlists,
}

impl Default for KeySetLoader {
    fn default() -> Self {
        Self::new()
    }
}

impl KeySetLoader {
    pub fn new() -> Self {
        KeySetLoader { builder: None, start: None, held: 0, finished: None, unusable: UnusableAllowlists::default() }
    }

    /// Takes one frame. `Changes` frames do not belong in a key set.
    pub fn frame(&mut self, frame: Frame<'_>) -> Result<(), WireError> {
        if self.finished.is_some() {
            return Err(WireError::Sequence("a frame after the end"));
        }
        match frame {
            Frame::Start { version, keys, id } => {
                if self.start.is_some() {
                    return Err(WireError::Sequence("a second start"));
                }
                // A hint, not a promise: cap what a corrupt or hostile value can reserve.
                let capacity = usize::try_from(keys.min(100_000_000)).unwrap_or(0);
                self.builder = Some(SnapshotBuilder::with_capacity(capacity));
                self.start = Some((version, id));
            }
            Frame::Keys(keys) => {
                let builder = self.builder.as_mut().ok_or(WireError::Sequence("keys before the start"))?;
                for key in &keys {
                    self.unusable.note(key);
                    let (digest, record) = key.to_builder();
                    builder.push_new(digest, record)?;
                }
                self.held += keys.len() as u64;
            }
            Frame::Changes { .. } => return Err(WireError::Sequence("changes inside a key set")),
            Frame::End { version, keys } => {
                let (start_version, _) = self.start.ok_or(WireError::Sequence("an end before the start"))?;
                if version != start_version {
                    return Err(WireError::Sequence("the end's version is not the start's"));
                }
                if keys != self.held {
                    return Err(WireError::Count { announced: keys, held: self.held });
                }
                let builder = self.builder.take().ok_or(WireError::Sequence("an end before the start"))?;
                self.finished = Some(builder.finish(version));
            }
        }
        Ok(())
    }

    /// The id the set's start frame carried.
    pub fn id(&self) -> Option<u64> {
        self.start.map(|(_, id)| id)
    }

    /// The snapshot, once the end frame has been taken.
    pub fn finish(self) -> Result<(Snapshot, UnusableAllowlists), WireError> {
        match self.finished {
            Some(snapshot) => Ok((snapshot, self.unusable)),
            None => Err(WireError::Sequence("the key set has no end")),
        }
    }

    /// Decodes and takes every whole frame `reader` holds.
    pub fn take_from(&mut self, reader: &mut FrameReader) -> Result<(), WireError> {
        while let Some((payload, at)) = reader.next_payload()? {
            let frame = decode_payload(payload, at)?;
            self.frame(frame)?;
        }
        Ok(())
    }
}

/// The change batch of a `Changes` frame, as records (a bulk change, a plan's
/// keys re-limited, shares its policies).
pub fn changes_to_records(changes: &[WireChange<'_>]) -> Vec<(KeyDigest, Option<KeyRecord>)> {
    let mut policies = SharedPolicies::default();
    changes
        .iter()
        .map(|change| {
            let record = change.key.as_ref().map(|key| key.to_builder().1.build_sharing(&mut policies));
            (KeyDigest(change.digest), record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(n: usize) -> (KeyDigest, KeyRecord) {
        let mut metadata = serde_json::Map::new();
        metadata.insert("n".into(), n.into());
        let record = KeyRecord::builder(format!("key_{n}"))
            .name(format!("name {n}"))
            .owner(Some(format!("owner-{}", n % 3)))
            .plan(Some("pro".into()))
            .scopes(vec!["orders:*".into(), "billing:read".into()])
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::1/128".parse().unwrap()])
            .rate_limit(Some(RateLimitConfig {
                requests: 5,
                per: Duration::from_millis(1500),
                burst: Some(9),
                by: LimitScope::Owner,
            }))
            .quota(Some(QuotaConfig { requests: 100, per: QuotaPeriod::Month, by: LimitScope::Owner }))
            .status(if n.is_multiple_of(2) { KeyStatus::Active } else { KeyStatus::Disabled })
            .expires_at(Some(time::macros::datetime!(2030-01-02 03:04:05.678 UTC)))
            .metadata(metadata)
            .tags(vec!["a".into(), format!("t{n}")])
            .build();
        (KeyDigest::of(&format!("raw-{n}")), record)
    }

    fn encode_set(version: u64, records: &[(KeyDigest, KeyRecord)], per_frame: usize) -> Vec<u8> {
        let mut bytes = header().to_vec();
        encode_frame(&Frame::Start { version, keys: records.len() as u64, id: 7 }, &mut bytes);
        let snapshot = Snapshot::build(version, records.iter().cloned()).unwrap();
        let mut in_index: Vec<_> = snapshot.records().map(|(_, r)| r).collect();
        in_index.sort_by_key(|r| r.id().to_owned());
        for chunk in in_index.chunks(per_frame.max(1)) {
            encode_frame(&Frame::Keys(chunk.iter().map(|r| WireKey::from_record(r)).collect()), &mut bytes);
        }
        encode_frame(&Frame::End { version, keys: records.len() as u64 }, &mut bytes);
        bytes
    }

    fn load(bytes: &[u8], piece: usize) -> Result<Snapshot, WireError> {
        let mut reader = FrameReader::default();
        let mut loader = KeySetLoader::new();
        for chunk in bytes.chunks(piece) {
            reader.push(chunk);
            loader.take_from(&mut reader)?;
        }
        if reader.has_partial_frame() {
            return Err(WireError::Truncated(reader.position()));
        }
        loader.finish().map(|(snapshot, _)| snapshot)
    }

    #[test]
    fn a_key_set_read_in_any_pieces_gives_back_every_setting() {
        let records: Vec<_> = (0..50).map(record).collect();
        let bytes = encode_set(42, &records, 7);
        for piece in [1, 3, 64, 4096, bytes.len()] {
            let snapshot = load(&bytes, piece).unwrap();
            assert_eq!(snapshot.version(), 42);
            assert_eq!(snapshot.len(), 50);
            for (digest, original) in &records {
                let loaded = snapshot.get(digest).expect("every key arrives");
                assert_eq!(
                    WireKey::from_record(loaded),
                    WireKey::from_record(&{
                        let mut r = original.clone();
                        r.digest = *digest;
                        r
                    })
                );
                assert_eq!(loaded.metadata(), original.metadata());
                assert_eq!(loaded.expires_at(), original.expires_at());
            }
        }
    }

    #[test]
    fn a_key_set_cut_anywhere_is_refused() {
        let records: Vec<_> = (0..20).map(record).collect();
        let bytes = encode_set(3, &records, 4);
        for cut in 0..bytes.len() {
            assert!(load(&bytes[..cut], 17).is_err(), "a set cut at byte {cut} of {} was accepted", bytes.len());
        }
    }

    #[test]
    fn a_flipped_byte_is_found_by_the_checksum_or_the_decoder() {
        let records: Vec<_> = (0..10).map(record).collect();
        let bytes = encode_set(3, &records, 4);
        for at in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x20;
            assert!(load(&corrupt, 4096).is_err(), "a flipped byte at {at} was accepted");
        }
    }

    #[test]
    fn an_unusable_allowlist_stays_closed_through_the_wire() {
        let (digest, record) = (
            KeyDigest::of("x"),
            KeyRecord::builder("key_x")
                .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap()])
                .unusable_ip_allowlist()
                .build(),
        );
        let snapshot = load(&encode_set(1, &[(digest, record)], 1), 4096).unwrap();
        let loaded = snapshot.get(&digest).unwrap();
        assert!(loaded.ip_allowlist_unusable());
        assert!(!loaded.allows_ip("10.1.2.3".parse().unwrap()));
        let mut from_text = WireKey::from_record(loaded);
        from_text.ip_allowlist_unusable = false;
        from_text.ip_allowlist = vec![Cow::Borrowed("banana")];
        let (_, rebuilt) = from_text.to_record();
        assert!(!rebuilt.allows_ip("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn file_frames_report_a_torn_tail_as_truncated() {
        let records: Vec<_> = (0..5).map(record).collect();
        let bytes = encode_set(9, &records, 2);
        let mut frames = FileFrames::open(&bytes[..]).unwrap();
        let mut count = 0;
        while frames.next_frame().unwrap().is_some() {
            count += 1;
        }
        assert_eq!(count, 5, "start, three key frames, end");
        let mut torn = FileFrames::open(&bytes[..bytes.len() - 3]).unwrap();
        let mut result = Ok(Some(()));
        while let Ok(Some(_)) = result {
            result = torn.next_frame().map(|f| f.map(|_| ()));
        }
        assert!(matches!(result, Err(WireError::Truncated(_))), "{result:?}");
        assert!(matches!(FileFrames::open(&b"KGKEYZ\x01\x00"[..]), Err(WireError::BadMagic)));
        assert!(matches!(FileFrames::open(&b"KGKEYS\x09\x00"[..]), Err(WireError::Format(9))));
    }
}
