//! Bulk import of existing keys: `POST /v1/keys/import` (CONTRACT §6).
//!
//! The body is NDJSON, one JSON object a line, each with `hash: "sha256:…"`
//! instead of a raw key. It is read as a stream and cut into lines as it
//! arrives; valid records are written in batches of [`BATCH`], one transaction
//! and one feed row each, so the server holds one batch and one line however
//! large the file. Bad lines are listed by number and the rest imported. A
//! re-run changes nothing: keys already stored as given count as unchanged.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::Json;
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};

use super::api::{Admin, ApiError, ApiState};
use super::fields::{
    ip_allowlist, metadata, quota, rate_limit, scopes, string_field, string_list, timestamp, FieldError, FieldResult,
};
use super::model::{key_id_from_hash, ImportKey, KeyStatusText};
use super::store::Import;
use crate::key::{self, KeyDigest};

/// Longest line, without its newline; a longer one is an error of its line.
pub const MAX_LINE: usize = 64 * 1024;
/// Records per transaction (and per feed row).
pub const BATCH: usize = 1000;
/// Errors listed in the answer; past these only their number is given.
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Longest error message, in characters: a message may quote the line's text.
const MAX_MESSAGE: usize = 300;
/// Longest imported key id.
const MAX_ID_LEN: usize = 64;

/// The fields a record may have.
const FIELDS: &[&str] = &[
    "hash",
    "id",
    "name",
    "owner",
    "plan",
    "scopes",
    "ip_allowlist",
    "rate_limit",
    "quota",
    "expires_at",
    "metadata",
    "tags",
    "status",
    "prefix",
    "masked",
    "created_at",
];

// ---------------------------------------------------------------------------
// Lines
// ---------------------------------------------------------------------------

/// Cuts a byte stream into lines as it arrives, holding at most one line and
/// the rest of the last chunk. Lines are numbered from 1, blank ones included;
/// a trailing `\r` is dropped.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// `buf[start..searched]` holds no newline: a line arriving in many small
    /// chunks is searched once, not once per chunk.
    searched: usize,
    /// The number of the line being read.
    number: u64,
    /// The current line has been reported too long: drop it up to its newline.
    skipping: bool,
    ended: bool,
}

/// One line out of a [`LineSplitter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawLine<'a> {
    Text(u64, &'a [u8]),
    /// Longer than [`MAX_LINE`]: its bytes were dropped.
    TooLong(u64),
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter { buf: Vec::new(), start: 0, searched: 0, number: 1, skipping: false, ended: false }
    }
}

impl LineSplitter {
    /// Adds bytes that arrived. Take every line with `next_line` before pushing more.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.ended {
            return;
        }
        self.buf.drain(..self.start);
        self.searched -= self.start;
        self.start = 0;
        self.buf.extend_from_slice(chunk);
    }

    /// The stream has ended: a last line without a newline is a line too.
    pub fn end(&mut self) {
        if !self.ended && !self.skipping && self.start < self.buf.len() {
            self.buf.push(b'\n');
        }
        self.ended = true;
    }

    /// The next complete line, if one has arrived.
    pub fn next_line(&mut self) -> Option<RawLine<'_>> {
        loop {
            let from = self.searched.max(self.start);
            let newline = self.buf[from..].iter().position(|&b| b == b'\n');
            let Some(offset) = newline else {
                self.searched = self.buf.len();
                let pending = self.buf.len() - self.start;
                if self.skipping || pending > MAX_LINE {
                    self.buf.clear();
                    self.start = 0;
                    self.searched = 0;
                    if !std::mem::replace(&mut self.skipping, true) {
                        return Some(RawLine::TooLong(self.number));
                    }
                }
                return None;
            };
            let len = from + offset - self.start;
            let (begin, number) = (self.start, self.number);
            self.start += len + 1;
            self.searched = self.start;
            self.number += 1;
            if std::mem::take(&mut self.skipping) {
                // The rest of a line reported already.
                continue;
            }
            if len > MAX_LINE {
                return Some(RawLine::TooLong(number));
            }
            let line = &self.buf[begin..begin + len];
            return Some(RawLine::Text(number, line.strip_suffix(b"\r").unwrap_or(line)));
        }
    }
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// The record on one line, or why it cannot be imported (naming the field).
pub fn parse_record(line: u64, text: &[u8], plans: &BTreeSet<String>) -> Result<ImportKey, String> {
    let object = match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err("expected a JSON object with a \"hash\"".into()),
        Err(e) => return Err(format!("not valid JSON: {e}")),
    };
    record(line, &object, plans).map_err(|e| e.to_string())
}

fn record(line: u64, object: &Map<String, Value>, plans: &BTreeSet<String>) -> FieldResult<ImportKey> {
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(FieldError::new(&shorten(unknown), "unknown field"));
    }
    let field = |name: &str| object.get(name).filter(|v| !v.is_null());
    let hash = match field("hash") {
        None => return Err(FieldError::new("hash", "is required")),
        Some(Value::String(text)) => {
            KeyDigest::parse(text).map(|_| text.clone()).map_err(|e| FieldError::new("hash", e))?
        }
        Some(_) => return Err(FieldError::new("hash", "must be a string")),
    };
    let id = match field("id") {
        Some(value) => import_id(value)?,
        None => key_id_from_hash(&hash),
    };
    let prefix = field("prefix").map(|v| string_field("prefix", v)).transpose()?;
    if prefix.as_deref().is_some_and(|p| !key::valid_prefix(p)) {
        return Err(FieldError::new("prefix", key::KeyFormatError::BadPrefix));
    }
    Ok(ImportKey {
        line,
        name: field("name").map(|v| string_field("name", v)).transpose()?.unwrap_or_else(|| id.clone()),
        owner: field("owner").map(|v| string_field("owner", v)).transpose()?,
        plan: field("plan").map(|v| super::fields::plan(plans, v)).transpose()?,
        scopes: field("scopes").map(scopes).transpose()?.unwrap_or_default(),
        ip_allowlist: field("ip_allowlist").map(ip_allowlist).transpose()?.unwrap_or_default(),
        rate_limit: field("rate_limit").map(rate_limit).transpose()?,
        quota: field("quota").map(quota).transpose()?,
        status: field("status").map(status).transpose()?.unwrap_or(KeyStatusText::Active),
        expires_at: field("expires_at").map(|v| timestamp("expires_at", v)).transpose()?,
        metadata: field("metadata").map(metadata).transpose()?.unwrap_or_default(),
        tags: field("tags").map(|v| string_list("tags", v)).transpose()?.unwrap_or_default(),
        masked: field("masked").map(|v| string_field("masked", v)).transpose()?,
        created_at: field("created_at").map(|v| timestamp("created_at", v)).transpose()?,
        prefix,
        id,
        hash,
    })
}

/// Ids go into URLs, headers and logs: letters, digits and `_ - . :` only.
fn import_id(value: &Value) -> FieldResult<String> {
    let Value::String(id) = value else { return Err(FieldError::new("id", "must be a string")) };
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(allowed) {
        return Err(FieldError::new(
            "id",
            format!("must be 1 to {MAX_ID_LEN} characters of a-z, A-Z, 0-9, '_', '-', '.' and ':'"),
        ));
    }
    Ok(id.clone())
}

fn status(value: &Value) -> FieldResult<KeyStatusText> {
    match value.as_str() {
        Some("active") => Ok(KeyStatusText::Active),
        Some("disabled") => Ok(KeyStatusText::Disabled),
        Some("revoked") => Ok(KeyStatusText::Revoked),
        _ => Err(FieldError::new("status", "must be \"active\", \"disabled\" or \"revoked\"")),
    }
}

/// At most [`MAX_MESSAGE`] characters.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// The handler
// ---------------------------------------------------------------------------

/// The answer, built batch by batch.
#[derive(Debug, Default)]
struct Report {
    imported: u64,
    unchanged: u64,
    errors: Vec<(u64, String)>,
    omitted: u64,
}

impl Report {
    fn error(&mut self, line: u64, message: &str) {
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push((line, shorten(message)));
        } else {
            self.omitted += 1;
        }
    }

    fn json(&self) -> Value {
        let errors: Vec<Value> =
            self.errors.iter().map(|(line, message)| json!({"line": line, "message": message})).collect();
        json!({
            "imported": self.imported,
            "unchanged": self.unchanged,
            "errors": errors,
            "errors_omitted": self.omitted,
        })
    }
}

/// Records waiting to be written and the errors of lines read since the last
/// write; together never more than [`BATCH`], so the errors come out in line order.
#[derive(Default)]
struct Pending {
    records: Vec<ImportKey>,
    errors: Vec<(u64, String)>,
}

impl Pending {
    fn is_full(&self) -> bool {
        self.records.len() + self.errors.len() >= BATCH
    }
}

pub async fn import_keys(
    State(state): State<Arc<ApiState>>,
    Admin(actor): Admin,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let mut import = state.store.begin_import().await?;
    let mut report = Report::default();
    let mut pending = Pending::default();
    let mut lines = LineSplitter::default();
    let mut stream = body.into_data_stream();
    let mut read_to_end = false;
    while !read_to_end {
        match stream.next().await {
            Some(Ok(chunk)) => lines.push(&chunk),
            Some(Err(e)) => {
                // Batches written so far stay: a re-run of the file completes the import.
                return Err(ApiError::invalid("body", format!("reading the upload failed: {e}")));
            }
            None => {
                lines.end();
                read_to_end = true;
            }
        }
        while let Some(line) = lines.next_line() {
            match line {
                RawLine::TooLong(number) => {
                    pending.errors.push((number, format!("the line is longer than {MAX_LINE} bytes")))
                }
                RawLine::Text(_, text) if text.iter().all(u8::is_ascii_whitespace) => {}
                RawLine::Text(number, text) => match parse_record(number, text, &state.plans) {
                    Ok(record) => pending.records.push(record),
                    Err(message) => pending.errors.push((number, message)),
                },
            }
            if pending.is_full() {
                write(&state, &mut import, &mut pending, &actor, &mut report).await?;
            }
        }
    }
    write(&state, &mut import, &mut pending, &actor, &mut report).await?;
    import.finish().await?;
    tracing::info!(
        actor = %actor,
        imported = report.imported,
        unchanged = report.unchanged,
        errors = report.errors.len() as u64 + report.omitted,
        "key import finished"
    );
    Ok(Json(report.json()))
}

/// Writes the pending records as one batch and moves every error into the report.
async fn write(
    state: &ApiState,
    import: &mut Import,
    pending: &mut Pending,
    actor: &str,
    report: &mut Report,
) -> Result<(), ApiError> {
    let mut errors = std::mem::take(&mut pending.errors);
    let records = std::mem::take(&mut pending.records);
    if !records.is_empty() {
        let outcome = import.write_batch(records, actor).await?;
        report.imported += outcome.imported;
        report.unchanged += outcome.unchanged;
        errors.extend(outcome.errors);
        if outcome.version.is_some() {
            state.feed.poke();
        }
    }
    errors.sort_by_key(|(line, _)| *line);
    for (line, message) in &errors {
        report.error(*line, message);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plans() -> BTreeSet<String> {
        ["free".to_owned(), "pro".to_owned()].into()
    }

    fn hash(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    /// Every line of `input` fed in chunks of `chunk` bytes, as (number, text or None for too long).
    fn split(input: &[u8], chunk: usize) -> Vec<(u64, Option<Vec<u8>>)> {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        let mut collect = |splitter: &mut LineSplitter| {
            while let Some(line) = splitter.next_line() {
                out.push(match line {
                    RawLine::Text(n, text) => (n, Some(text.to_vec())),
                    RawLine::TooLong(n) => (n, None),
                });
            }
        };
        for piece in input.chunks(chunk.max(1)) {
            splitter.push(piece);
            collect(&mut splitter);
        }
        splitter.end();
        collect(&mut splitter);
        out
    }

    #[test]
    fn lines_are_numbered_from_one_whatever_the_chunks() {
        let input = b"a\r\n\nbb\nccc";
        let expected: Vec<(u64, Option<Vec<u8>>)> =
            vec![(1, Some(b"a".to_vec())), (2, Some(vec![])), (3, Some(b"bb".to_vec())), (4, Some(b"ccc".to_vec()))];
        for chunk in 1..=input.len() {
            assert_eq!(split(input, chunk), expected, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_too_long_line_is_reported_once_and_the_next_line_keeps_its_number() {
        let mut input = b"{}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend(b"\nlast\n");
        for chunk in [1000, MAX_LINE / 3, MAX_LINE + 100, input.len()] {
            assert_eq!(
                split(&input, chunk),
                vec![(1, Some(b"{}".to_vec())), (2, None), (3, Some(b"last".to_vec()))],
                "chunks of {chunk}"
            );
        }
        // A line of exactly the limit is fine; an unterminated overlong last line is reported too.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        exact.extend(std::iter::repeat_n(b'z', MAX_LINE + 1));
        assert_eq!(split(&exact, 4096), vec![(1, Some(vec![b'y'; MAX_LINE])), (2, None)]);
    }

    #[test]
    fn a_line_arriving_a_byte_at_a_time_is_searched_once() {
        let mut splitter = LineSplitter::default();
        let line = vec![b'a'; MAX_LINE];
        for byte in &line {
            splitter.push(std::slice::from_ref(byte));
            assert_eq!(splitter.next_line(), None);
            assert_eq!(splitter.searched, splitter.buf.len(), "what arrived is searched once");
        }
        splitter.push(b"\n");
        assert_eq!(splitter.next_line(), Some(RawLine::Text(1, &line)));
    }

    #[test]
    fn the_splitter_holds_no_more_than_a_line_and_a_chunk() {
        let mut splitter = LineSplitter::default();
        let chunk = vec![b'q'; 8192];
        for _ in 0..100 {
            splitter.push(&chunk);
            while splitter.next_line().is_some() {}
            assert!(splitter.buf.len() <= MAX_LINE + chunk.len(), "{}", splitter.buf.len());
        }
    }

    #[test]
    fn a_minimal_record_gets_its_defaults() {
        let line = format!(r#"{{"hash": "{}"}}"#, hash(1));
        let record = parse_record(7, line.as_bytes(), &plans()).unwrap();
        assert_eq!(record.line, 7);
        assert_eq!(record.hash, hash(1));
        assert_eq!(record.id, key_id_from_hash(&hash(1)));
        assert_eq!(record.name, record.id);
        assert_eq!(record.status, KeyStatusText::Active);
        assert_eq!((record.prefix, record.masked, record.created_at), (None, None, None));
    }

    #[test]
    fn every_field_is_read() {
        let line = json!({
            "hash": hash(2), "id": "kong-1f2e", "name": "legacy", "owner": "acme", "plan": "pro",
            "scopes": ["orders:*"], "ip_allowlist": ["10.0.0.0/8"], "rate_limit": {"requests": 5, "per": "1s", "by": "owner"},
            "quota": {"requests": 100, "per": "day", "by": "owner"}, "expires_at": "2030-01-01T00:00:00Z",
            "metadata": {"from": "kong"}, "tags": ["migrated"], "status": "revoked", "prefix": "sk_live",
            "masked": "sk_live_4eC3…p7dc", "created_at": "2019-05-01T12:00:00Z",
        })
        .to_string();
        let record = parse_record(1, line.as_bytes(), &plans()).unwrap();
        assert_eq!(record.id, "kong-1f2e");
        assert_eq!(record.plan.as_deref(), Some("pro"));
        assert_eq!(record.status, KeyStatusText::Revoked);
        assert_eq!(record.prefix.as_deref(), Some("sk_live"));
        assert_eq!(record.masked.as_deref(), Some("sk_live_4eC3…p7dc"));
        assert_eq!(record.created_at, Some(time::macros::datetime!(2019-05-01 12:00 UTC)));
        assert_eq!(record.rate_limit.map(|r| (r.requests, r.by)), Some((5, crate::config::LimitScope::Owner)));
        assert_eq!(record.quota.map(|q| q.by), Some(crate::config::LimitScope::Owner));
        assert_eq!(record.metadata["from"], "kong");
    }

    #[test]
    fn errors_name_the_field() {
        let good = hash(3);
        for (line, field) in [
            (r#"{"id": "a"}"#.to_owned(), "hash: is required"),
            (r#"{"hash": "sha256:ABC"}"#.to_owned(), "hash: expected"),
            (format!(r#"{{"hash": "{good}", "colour": "blue"}}"#), "colour: unknown field"),
            (format!(r#"{{"hash": "{good}", "id": "has space"}}"#), "id: must be"),
            (format!(r#"{{"hash": "{good}", "plan": "gold"}}"#), "plan: unknown plan \"gold\""),
            (format!(r#"{{"hash": "{good}", "scopes": ["a b"]}}"#), "scopes[0]:"),
            (format!(r#"{{"hash": "{good}", "ip_allowlist": ["10.0.0.0/33"]}}"#), "ip_allowlist[0]:"),
            (format!(r#"{{"hash": "{good}", "rate_limit": {{"requests": 0, "per": "1s"}}}}"#), "rate_limit.requests"),
            (format!(r#"{{"hash": "{good}", "status": "paused"}}"#), "status: must be"),
            (format!(r#"{{"hash": "{good}", "prefix": "_bad"}}"#), "prefix:"),
            (format!(r#"{{"hash": "{good}", "created_at": "yesterday"}}"#), "created_at:"),
            (format!(r#"{{"hash": "{good}", "metadata": []}}"#), "metadata:"),
            (format!(r#"{{"hash": "{good}", "tags": "x"}}"#), "tags:"),
            ("[1, 2]".to_owned(), "expected a JSON object"),
            ("{\"hash\": ".to_owned(), "not valid JSON"),
        ] {
            let message = parse_record(1, line.as_bytes(), &plans()).expect_err(&line);
            assert!(message.starts_with(field), "{line}: {message}");
        }
    }

    #[test]
    fn long_text_in_a_message_is_cut() {
        let line = format!(r#"{{"hash": "{}", "expires_at": "{}"}}"#, hash(4), "9".repeat(10_000));
        let message = parse_record(1, line.as_bytes(), &plans()).unwrap_err();
        let mut report = Report::default();
        report.error(1, &message);
        assert!(report.errors[0].1.chars().count() <= MAX_MESSAGE + 1);
    }

    #[test]
    fn the_error_list_is_capped_and_counts_the_rest() {
        let mut report = Report::default();
        for line in 1..=(MAX_LISTED_ERRORS as u64 + 5) {
            report.error(line, "bad");
        }
        let json = report.json();
        assert_eq!(json["errors"].as_array().unwrap().len(), MAX_LISTED_ERRORS);
        assert_eq!(json["errors_omitted"], 5);
    }

    proptest! {
        #[test]
        fn splitting_and_parsing_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..300) {
            let plans = plans();
            let mut count = 0u64;
            for (number, text) in split(&input, chunk) {
                count += 1;
                prop_assert_eq!(number, count);
                if let Some(text) = text {
                    let _ = parse_record(number, &text, &plans);
                }
            }
            let newlines = input.iter().filter(|&&b| b == b'\n').count() as u64;
            let unterminated = u64::from(!input.is_empty() && input.last() != Some(&b'\n'));
            prop_assert_eq!(count, newlines + unterminated);
        }

        #[test]
        fn json_like_lines_never_panic(line in r#"\{("[a-z_]{1,12}": ("[^"\\]{0,20}"|[0-9]{1,5}|null|\[\]|\{\}|true), ?){0,5}"hash": "sha256:[0-9a-f]{64}"\}"#) {
            let _ = parse_record(1, line.as_bytes(), &plans());
        }
    }
}
