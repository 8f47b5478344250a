//! Unit tests of the store's pure parts: import decisions, cursors, search patterns.

use super::*;
use time::macros::datetime;

fn key() -> StoredKey {
    key_from_new(
        NewKey {
            id: "key_a".into(),
            hash: format!("sha256:{}", "a".repeat(64)),
            prefix: "kg_live".into(),
            masked: "kg_live_Ab3d…x9Zq".into(),
            name: "a".into(),
            owner: Some("o".into()),
            plan: None,
            scopes: vec![],
            ip_allowlist: vec![],
            rate_limit: None,
            quota: None,
            expires_at: None,
            metadata: serde_json::Map::new(),
            tags: vec![],
        },
        1_700_000_000_000,
    )
    .unwrap()
}

fn import_record(key: &StoredKey) -> ImportKey {
    ImportKey {
        line: 1,
        id: key.id.clone(),
        hash: key.hash.clone(),
        prefix: None,
        masked: None,
        name: key.name.clone(),
        owner: key.owner.clone(),
        plan: key.plan.clone(),
        scopes: key.scopes.clone(),
        ip_allowlist: key.ip_allowlist.clone(),
        rate_limit: key.rate_limit,
        quota: key.quota,
        status: key.status,
        expires_at: key.expires_at,
        metadata: key.metadata.clone(),
        tags: key.tags.clone(),
        created_at: None,
    }
}

const LATER: i64 = 1_800_000_000_000;

#[test]
fn an_import_of_a_new_key_marks_it_imported_with_unknown_shape() {
    let mut record = import_record(&key());
    record.created_at = Some(datetime!(2019-05-01 12:00:00.123456 UTC));
    let ImportAction::Write(written) = import_action(record, None, None, LATER) else { panic!("not written") };
    assert!(written.imported);
    assert_eq!((written.prefix.as_str(), written.masked.as_str()), ("", "…"));
    assert_eq!(written.created_at, datetime!(2019-05-01 12:00:00.123 UTC), "stored to the millisecond");
    assert_eq!(to_ms(written.updated_at), LATER);
}

#[test]
fn an_import_that_matches_the_stored_key_changes_nothing() {
    let stored = key();
    let mut record = import_record(&stored);
    record.created_at = Some(stored.created_at + time::Duration::microseconds(300));
    assert_eq!(import_action(record, Some(&stored), Some(&stored.id), LATER), ImportAction::Unchanged);
    let revoked = StoredKey { status: KeyStatusText::Revoked, ..key() };
    assert_eq!(
        import_action(import_record(&revoked), Some(&revoked), Some(&revoked.id), LATER),
        ImportAction::Unchanged
    );
}

#[test]
fn an_import_that_changes_a_field_rewrites_the_key_and_keeps_what_it_does_not_give() {
    let stored = StoredKey { imported: false, ..key() };
    let record = ImportKey { owner: Some("other".into()), ..import_record(&stored) };
    let ImportAction::Write(written) = import_action(record, Some(&stored), Some(&stored.id), LATER) else {
        panic!("not written")
    };
    assert_eq!(written.owner.as_deref(), Some("other"));
    assert_eq!((written.prefix.as_str(), written.masked.as_str()), ("kg_live", "kg_live_Ab3d…x9Zq"));
    assert_eq!(written.created_at, stored.created_at);
    assert!(!written.imported, "a key keygate issued keeps its shape");
    assert_eq!(to_ms(written.updated_at), LATER);
}

#[test]
fn an_import_that_conflicts_is_refused_naming_the_field() {
    let stored = key();
    let other_hash = ImportKey { hash: format!("sha256:{}", "b".repeat(64)), ..import_record(&stored) };
    let refused = |action| match action {
        ImportAction::Refuse(message) => message,
        other => panic!("not refused: {other:?}"),
    };
    assert!(refused(import_action(other_hash, Some(&stored), None, LATER)).starts_with("id: key_a"));
    let other_id = ImportKey { id: "key_b".into(), ..import_record(&stored) };
    assert_eq!(refused(import_action(other_id, None, Some("key_a"), LATER)), "hash: already belongs to key key_a");
    let revoked = StoredKey { status: KeyStatusText::Revoked, ..key() };
    let revive = ImportKey { status: KeyStatusText::Active, ..import_record(&revoked) };
    assert!(refused(import_action(revive, Some(&revoked), Some("key_a"), LATER)).starts_with("status:"));
}

#[test]
fn cursor_round_trips_and_rejects_garbage() {
    let k = key();
    let cursor = encode_cursor(&k, KeyOrder::Created);
    assert_eq!(decode_cursor(&cursor, KeyOrder::Created).unwrap(), (1_700_000_000_000, "key_a".to_owned()));
    assert!(matches!(decode_cursor(&cursor, KeyOrder::LastUsed), Err(StoreError::Invalid(_))));
    for bad in ["", "zz", &hex::encode("no-colon"), &hex::encode("x:key_a"), &hex::encode("12:")] {
        assert!(matches!(decode_cursor(bad, KeyOrder::Created), Err(StoreError::Invalid(_))), "{bad}");
    }
    let used = StoredKey { last_used_at: Some(k.created_at + time::Duration::SECOND), ..key() };
    let cursor = encode_cursor(&used, KeyOrder::LastUsed);
    assert_eq!(decode_cursor(&cursor, KeyOrder::LastUsed).unwrap(), (1_700_000_001_000, "key_a".to_owned()));
    assert_eq!(decode_cursor(&encode_cursor(&k, KeyOrder::LastUsed), KeyOrder::LastUsed).unwrap().0, 0);
}

#[test]
fn like_pattern_escapes_wildcards() {
    assert_eq!(like_pattern("A_b%c\\"), "%a\\_b\\%c\\\\%");
}

#[test]
fn trigram_index_needs_three_letters_or_digits_in_a_row() {
    for yes in ["abc", "org-09999", "a b cde", "été", "x1y"] {
        assert!(trigram_indexable(yes), "{yes}");
    }
    for no in ["", "ab", "a b c", "g s", "ab-cd", "%_\\", "a\u{1}bc"] {
        assert!(!trigram_indexable(no), "{no}");
    }
}

#[test]
fn fts_phrase_quotes_and_needs_a_trigram() {
    assert_eq!(fts_phrase("Ab\"c").as_deref(), Some("\"ab\"\"c\""));
    assert_eq!(fts_phrase("a%_").as_deref(), Some("\"a%_\""));
    assert_eq!(fts_phrase("ab"), None);
    assert_eq!(fts_phrase("éé"), None);
    assert_eq!(fts_phrase("ééé").as_deref(), Some("\"ééé\""));
}

#[test]
fn fts_trigrams_are_distinct_lower_case_and_bounded() {
    assert_eq!(fts_trigrams("Org-0999"), ["org", "rg-", "g-0", "-09", "099", "999"]);
    assert_eq!(fts_trigrams("aaaa"), ["aaa"]);
    assert_eq!(fts_trigrams("ab"), Vec::<String>::new());
    assert_eq!(fts_trigrams("ééé"), ["ééé"]);
    let long: String = ('a'..='z').collect();
    assert_eq!(fts_trigrams(&long).len(), FTS_PROBED_TRIGRAMS);
}

#[test]
fn fts_search_uses_only_the_rarest_trigrams() {
    let counted = |pairs: &[(&str, u64)]| pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect::<Vec<_>>();
    // Of org-09999 in 10,000 sampled keys: org, rg-, g-0 in every key.
    let org = counted(&[("org", 10_000), ("rg-", 10_000), ("g-0", 9_000), ("-09", 120), ("099", 40), ("999", 41)]);
    assert_eq!(fts_rare_trigrams(&org, 10_000).as_deref(), Some("\"099\" AND \"999\" AND \"-09\""));
    // At most one key in 20 of the sample is still rare; more is common.
    let edge = counted(&[("abc", 500), ("bcd", 501)]);
    assert_eq!(fts_rare_trigrams(&edge, 10_000).as_deref(), Some("\"abc\""));
    assert_eq!(fts_rare_trigrams(&counted(&[("org", 10_000), ("rg-", 10_000)]), 10_000), None);
    // A trigram no sampled key holds is the rarest; quotes are doubled.
    let quoted = counted(&[("a\"b", 0), ("\"bc", 3)]);
    assert_eq!(fts_rare_trigrams(&quoted, 100).as_deref(), Some("\"a\"\"b\" AND \"\"\"bc\""));
}

#[test]
fn patch_reports_only_fields_that_change() {
    let k = key();
    let (next, changed) = apply_patch(
        &k,
        KeyPatch { name: Some("a".into()), owner: Some(None), plan: Some(Some("pro".into())), ..KeyPatch::default() },
    );
    assert_eq!(changed, ["owner", "plan"]);
    assert_eq!(next.owner, None);
    assert_eq!(next.plan.as_deref(), Some("pro"));
    assert_eq!(next.name, "a");
    assert!(apply_patch(&k, KeyPatch::default()).1.is_empty());
}

#[test]
fn usage_is_bucketed_by_the_minute_the_window_ended() {
    let record = |end: OffsetDateTime| UsageRecord {
        node: "n".into(),
        key_id: "key_a".into(),
        window_start: end - time::Duration::seconds(5),
        window_end: end,
        requests: 3,
        allowed: 2,
        denied: [("rate_limited".to_owned(), 1)].into(),
        status: Default::default(),
        bytes_in: 1,
        bytes_out: 2,
        last_used_at: Some(end),
        owner_at_count: None,
    };
    let agg = UsageAggregate::of(&[
        record(datetime!(2026-01-01 10:00:05 UTC)),
        record(datetime!(2026-01-01 10:00:59.999 UTC)),
        record(datetime!(2026-01-01 10:01:00 UTC)),
    ])
    .unwrap();
    let minute = to_ms(datetime!(2026-01-01 10:00 UTC));
    assert_eq!(agg.buckets[&("key_a".to_owned(), minute)].requests, 6);
    assert_eq!(agg.buckets[&("key_a".to_owned(), minute + 60_000)].requests, 3);
    assert_eq!(agg.denied[&("key_a".to_owned(), minute, "rate_limited".to_owned())], 2);
    assert_eq!(agg.last_used["key_a"], minute + 60_000);
}
