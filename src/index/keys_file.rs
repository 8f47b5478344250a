//! The YAML keys file of `keys.source: file`: records with `hash:`, never raw keys.
//!
//! Like the config file, every problem is reported at once with its field path
//! and position, and a file with any problem is refused whole.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::{KeyRecord, KeyRecordBuilder, KeyStatus, SharedPolicies};
use crate::config::parse_cidr;
use crate::config::position::Positions;
use crate::config::raw::{RawQuota, RawRateLimit};
use crate::config::{ConfigError, ConfigErrors, PlanConfig};
use crate::key::KeyDigest;

pub type KeysFileError = ConfigErrors;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeysFile {
    keys: Vec<serde_norway::Value>,
}

/// One record as written. Besides the key fields of the admin API's records,
/// `masked`, `prefix` and the timestamps are accepted so an exported record loads as is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    hash: String,
    id: Option<String>,
    name: Option<String>,
    owner: Option<String>,
    plan: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    ip_allowlist: Vec<String>,
    rate_limit: Option<RawRateLimit>,
    quota: Option<RawQuota>,
    status: Option<String>,
    expires_at: Option<String>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(rename = "created_at")]
    _created_at: Option<String>,
    #[serde(rename = "updated_at")]
    _updated_at: Option<String>,
    #[serde(rename = "last_used_at")]
    _last_used_at: Option<String>,
    #[serde(rename = "masked")]
    _masked: Option<String>,
    #[serde(rename = "prefix")]
    _prefix: Option<String>,
}

pub fn load_keys_file(
    file: &Path,
    plans: &BTreeMap<String, PlanConfig>,
) -> Result<Vec<(KeyDigest, KeyRecord)>, KeysFileError> {
    match std::fs::read_to_string(file) {
        Ok(text) => parse_keys_file(&text, file, plans),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read the keys file: {e}"),
        }])),
    }
}

/// Parses and validates a whole keys file; `plans` are the plans a key may name.
pub fn parse_keys_file(
    text: &str,
    file: &Path,
    plans: &BTreeMap<String, PlanConfig>,
) -> Result<Vec<(KeyDigest, KeyRecord)>, KeysFileError> {
    let positions = Positions::build(text);
    let mut errors = Errors { file, positions: &positions, list: Vec::new() };

    let document: RawKeysFile = match serde_norway::from_str::<serde_norway::Value>(text)
        .map_err(|e| (String::new(), e.location().map(|l| (l.line(), l.column())), e.to_string()))
        .and_then(|value| {
            serde_path_to_error::deserialize(value).map_err(|e| (e.path().to_string(), None, e.inner().to_string()))
        }) {
        Ok(document) => document,
        Err((path, location, message)) => {
            let path = if path == "." { String::new() } else { path };
            errors.push_at(&path, location, message);
            return Err(errors.into_errors());
        }
    };

    let mut records = Vec::with_capacity(document.keys.len());
    let mut policies = SharedPolicies::default();
    let mut seen_hashes: HashMap<KeyDigest, usize> = HashMap::new();
    let mut seen_ids: HashMap<String, usize> = HashMap::new();
    for (index, value) in document.keys.into_iter().enumerate() {
        let base = format!("keys[{index}]");
        let raw: RawKey = match serde_path_to_error::deserialize(value) {
            Ok(raw) => raw,
            Err(e) => {
                let inner = e.path().to_string();
                let path = if inner == "." { base } else { format!("{base}.{inner}") };
                errors.push(&path, e.inner().to_string());
                continue;
            }
        };
        // Duplicates are found even among records with other problems.
        if let Ok(digest) = KeyDigest::parse(&raw.hash) {
            if let Some(first) = seen_hashes.insert(digest, index) {
                errors.push(&format!("{base}.hash"), format!("the same hash as keys[{first}]"));
            }
        }
        if let Some(id) = &raw.id {
            if let Some(first) = seen_ids.insert(id.clone(), index) {
                errors.push(&format!("{base}.id"), format!("id {id:?} is already used by keys[{first}]"));
            }
        }
        if let Some((digest, record)) = validate_key(raw, &base, plans, &mut errors) {
            records.push((digest, record.build_sharing(&mut policies)));
        }
    }
    if errors.list.is_empty() {
        Ok(records)
    } else {
        Err(errors.into_errors())
    }
}

fn validate_key(
    raw: RawKey,
    base: &str,
    plans: &BTreeMap<String, PlanConfig>,
    errors: &mut Errors<'_>,
) -> Option<(KeyDigest, KeyRecordBuilder)> {
    let before = errors.list.len();
    let digest = KeyDigest::parse(&raw.hash).map_err(|e| errors.push(&format!("{base}.hash"), e.to_string())).ok();
    // Without an explicit id, the digest names the key stably across reloads.
    let id = match raw.id {
        Some(id) => id,
        None => digest.map(|d| format!("key_{}", &hex::encode(d.0)[..16])).unwrap_or_default(),
    };
    if raw_text_invalid(&id) {
        errors.push(&format!("{base}.id"), "must be 1 to 128 printable characters without spaces".into());
    }
    for (field, value) in [("owner", &raw.owner), ("plan", &raw.plan)] {
        if value.as_deref().is_some_and(raw_text_invalid) {
            errors.push(&format!("{base}.{field}"), "must be 1 to 128 printable characters without spaces".into());
        }
    }
    if let Some(plan) = &raw.plan {
        if !plans.contains_key(plan) {
            errors.push(&format!("{base}.plan"), format!("unknown plan {plan:?}"));
        }
    }
    for (i, scope) in raw.scopes.iter().enumerate() {
        if raw_text_invalid(scope) {
            errors
                .push(&format!("{base}.scopes[{i}]"), "a scope must be non-empty printable text without spaces".into());
        }
    }
    let mut allowlist = Vec::with_capacity(raw.ip_allowlist.len());
    for (i, entry) in raw.ip_allowlist.iter().enumerate() {
        match parse_cidr(entry) {
            Some(net) => allowlist.push(net),
            None => {
                errors.push(&format!("{base}.ip_allowlist[{i}]"), format!("{entry:?} is not an IP address or CIDR"))
            }
        }
    }
    let rate_limit = raw
        .rate_limit
        .as_ref()
        .and_then(|raw| raw.validate(&format!("{base}.rate_limit")).map_err(|found| errors.push_all(found)).ok());
    let quota = raw
        .quota
        .as_ref()
        .and_then(|raw| raw.validate(&format!("{base}.quota")).map_err(|found| errors.push_all(found)).ok());
    let status = match raw.status.as_deref() {
        None => KeyStatus::Active,
        Some(text) => KeyStatus::parse(text).unwrap_or_else(|| {
            errors.push(&format!("{base}.status"), format!("{text:?} is not one of active, disabled, revoked"));
            KeyStatus::Active
        }),
    };
    let expires_at = raw.expires_at.as_deref().and_then(|text| {
        OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|_| errors.push(&format!("{base}.expires_at"), format!("{text:?} is not an RFC 3339 time")))
            .ok()
    });
    if errors.list.len() > before {
        return None;
    }
    let record = KeyRecord::builder(id.clone())
        .name(raw.name.unwrap_or(id))
        .owner(raw.owner)
        .plan(raw.plan)
        .scopes(raw.scopes)
        .ip_allowlist(allowlist)
        .rate_limit(rate_limit)
        .quota(quota)
        .status(status)
        .expires_at(expires_at)
        .metadata(raw.metadata)
        .tags(raw.tags);
    digest.map(|d| (d, record))
}

fn raw_text_invalid(text: &str) -> bool {
    text.is_empty() || text.len() > 128 || text.chars().any(|c| c.is_control() || c.is_whitespace())
}

struct Errors<'a> {
    file: &'a Path,
    positions: &'a Positions,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, path: &str, message: String) {
        let location = self.positions.value(path);
        self.push_at(path, location, message);
    }

    fn push_all(&mut self, found: Vec<(String, String)>) {
        for (path, message) in found {
            self.push(&path, message);
        }
    }

    fn push_at(&mut self, path: &str, location: Option<(usize, usize)>, message: String) {
        self.list.push(ConfigError {
            file: self.file.to_owned(),
            path: path.to_owned(),
            line: location.map(|l| l.0),
            column: location.map(|l| l.1),
            message,
        });
    }

    fn into_errors(self) -> ConfigErrors {
        ConfigErrors(self.list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key;

    fn plans() -> BTreeMap<String, PlanConfig> {
        let mut plans = BTreeMap::new();
        plans.insert("free".to_owned(), PlanConfig { rate_limit: None, quota: None });
        plans
    }

    fn parse(text: &str) -> Result<Vec<(KeyDigest, KeyRecord)>, KeysFileError> {
        parse_keys_file(text, Path::new("keys.yaml"), &plans())
    }

    #[test]
    fn full_record_loads() {
        let raw = key::generate("kg_live").unwrap();
        let text = format!(
            r#"
keys:
  - id: key_alice
    hash: "{}"
    name: alice
    owner: acme
    plan: free
    scopes: ["orders:read", "billing:*"]
    ip_allowlist: ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
    rate_limit: {{ requests: 5, per: 1s, burst: 10 }}
    quota: {{ requests: 1000, per: day }}
    status: disabled
    expires_at: "2030-01-01T00:00:00Z"
    metadata: {{ team: payments, tier: 2 }}
    tags: [internal]
"#,
            KeyDigest::of(&raw)
        );
        let records = parse(&text).unwrap();
        assert_eq!(records.len(), 1);
        let (digest, record) = &records[0];
        assert_eq!(*digest, KeyDigest::of(&raw));
        assert_eq!(record.id(), "key_alice");
        assert_eq!(record.owner(), Some("acme"));
        assert_eq!(record.status, KeyStatus::Disabled);
        assert_eq!(record.ip_allowlist().len(), 3);
        assert!(record.scopes().holds("billing:refund"));
        assert_eq!(record.rate_limit().map(|r| r.requests), Some(5));
        assert_eq!(record.metadata()["team"], "payments");
        assert!(record.expires_at().is_some());
    }

    #[test]
    fn missing_id_is_derived_from_the_hash() {
        let text = format!("keys:\n  - hash: \"{}\"\n", KeyDigest::of("x"));
        let records = parse(&text).unwrap();
        assert!(records[0].1.id().starts_with("key_"));
        assert_eq!(records[0].1.id().len(), 4 + 16);
    }

    #[test]
    fn every_problem_is_listed_with_its_path_and_line() {
        let good = KeyDigest::of("a");
        let text = format!(
            "keys:\n  - id: one\n    hash: \"{good}\"\n    ip_allowlist: [\"10.0.0.0/33\"]\n  - id: two\n    hash: \"sha256:nothex\"\n    status: paused\n  - id: three\n    hash: \"{good}\"\n  - id: four\n    hash: \"{}\"\n    plan: gold\n  - id: five\n    hash: \"{}\"\n    colour: blue\n",
            KeyDigest::of("b"),
            KeyDigest::of("c")
        );
        let errors = parse(&text).unwrap_err();
        let rendered: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
        let find = |needle: &str| rendered.iter().find(|line| line.contains(needle)).cloned();
        assert!(find("keys[0].ip_allowlist[0]").is_some_and(|l| l.starts_with("keys.yaml:4:")), "{rendered:?}");
        assert!(find("keys[1].hash").is_some(), "{rendered:?}");
        assert!(find("keys[1].status").is_some_and(|l| l.starts_with("keys.yaml:7:")), "{rendered:?}");
        assert!(find("keys[3].plan").is_some(), "{rendered:?}");
        assert!(find("keys[2].hash").is_some_and(|l| l.contains("keys[0]")), "{rendered:?}");
        assert!(find("colour").is_some(), "{rendered:?}");
    }

    #[test]
    fn limits_the_limiter_cannot_honour_are_refused_with_their_path() {
        let text = format!(
            "keys:\n  - hash: \"{}\"\n    rate_limit: {{ requests: 1, per: 1m, burst: 4294967295 }}\n    quota: {{ requests: 2000000000000, per: day }}\n",
            KeyDigest::of("a")
        );
        let errors = parse(&text).unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["keys[0].rate_limit.burst", "keys[0].quota.requests"], "{errors}");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = format!(
            "keys:\n  - {{ id: same, hash: \"{}\" }}\n  - {{ id: same, hash: \"{}\" }}\n",
            KeyDigest::of("a"),
            KeyDigest::of("b")
        );
        let errors = parse(&text).unwrap_err();
        assert!(errors.0.iter().any(|e| e.path == "keys[1].id"), "{errors}");
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let errors = parse("keys:\n  - id: [unclosed\n").unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert!(errors.0[0].line.is_some(), "{errors}");
    }

    #[test]
    fn raw_keys_are_refused_in_place_of_hashes() {
        let raw = key::generate("kg_live").unwrap();
        let errors = parse(&format!("keys:\n  - {{ id: k, hash: \"{raw}\" }}\n")).unwrap_err();
        assert_eq!(errors.0[0].path, "keys[0].hash");
        assert!(!errors.to_string().contains(&raw));
    }

    #[test]
    fn an_empty_list_is_a_valid_file() {
        assert!(parse("keys: []\n").unwrap().is_empty());
    }
}
