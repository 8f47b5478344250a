//! The control-plane store against real databases: every scenario runs on SQLite
//! (a file in a temp dir) and on PostgreSQL (a fresh database per test, dropped
//! afterwards). PostgreSQL is `postgres://postgres@127.0.0.1:5432/postgres` unless
//! `KEYGATE_TEST_POSTGRES_URL` says otherwise; if it is unreachable the PostgreSQL
//! tests fail, they never skip.
//!
//! One file because every scenario runs on both databases through one list
//! (`on_both_backends!`): the list is the store's contract, and it reads best whole.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate::config::{LimitScope, QuotaConfig, QuotaPeriod, RateLimitConfig, UsageRetention};
use keygate::control::model::{
    key_id_from_hash, new_key_id, Change, Granularity, ImportKey, KeyChange, KeyFilter, KeyOrder, KeyPatch,
    KeyStatusText, NewKey, StoredKey,
};
use keygate::control::store::{BatchOutcome, Store, StoreError, UsageCompaction};
use keygate::key::{self, KeyDigest};
use keygate::usage::UsageRecord;
use serde_json::json;
use sqlx::Connection as _;
use time::macros::datetime;
use time::OffsetDateTime;

use common::{postgres_server, with_database, DEFAULT_PG_URL};

// ---- harness ----

/// One scenario's database. Dropping it removes the PostgreSQL database.
struct TestDb {
    store: Store,
    url: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgDatabase>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        // A directory that does not exist yet: connect must create it.
        let url = format!("sqlite://{}/nested/keygate.db", dir.path().display());
        let store = Store::connect(&url).await.expect("connect to SQLite");
        TestDb { store, url, _dir: Some(dir), _pg: None }
    }

    async fn postgres() -> TestDb {
        let pg = PgDatabase::create().await;
        let url = pg.url.clone();
        let store = Store::connect(&url).await.expect("connect to the test PostgreSQL database");
        TestDb { store, url, _dir: None, _pg: Some(pg) }
    }

    /// A second, independent connection pool to the same database.
    async fn reconnect(&self) -> Store {
        Store::connect(&self.url).await.expect("second connection")
    }
}

/// A `keygate_test_<random>` database on the test server.
struct PgDatabase {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    async fn create() -> PgDatabase {
        let server = postgres_server();
        let mut admin = sqlx::PgConnection::connect(&server).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {server} is unreachable ({e}). The store tests need a PostgreSQL server: \
                 start one or point KEYGATE_TEST_POSTGRES_URL at it."
            )
        });
        let name = format!("keygate_test_{}", new_key_id()[4..].to_lowercase());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("CREATE DATABASE");
        let _ = admin.close().await;
        let url = with_database(&server, &name);
        PgDatabase { server, name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime (or while unwinding from a failed
        // assertion): do the async cleanup on a thread with a runtime of its own.
        let (server, name) = (self.server.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&server).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
                admin.close().await
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs one scenario on both backends, as `<name>::sqlite` and `<name>::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::TestDb::sqlite().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::TestDb::postgres().await).await;
            }
        }
    )*};
}

on_both_backends!(
    create_get_and_list_with_every_filter,
    cursor_pagination_visits_every_key_exactly_once,
    filtered_pages_visit_every_match_exactly_once,
    tag_index_follows_create_update_rotate_revoke_and_delete,
    q_finds_what_a_plain_substring_search_finds,
    q_with_common_and_rare_trigrams_finds_exactly_the_substring_matches,
    duplicate_id_or_hash_is_a_conflict,
    update_sets_clears_and_leaves_fields,
    revoked_is_final,
    rotate_expires_old_key_after_grace_and_creates_a_new_one,
    delete_removes_the_key_and_feeds_a_delete,
    feed_versions_increase_and_changes_since_returns_exactly_the_missed_changes,
    snapshot_is_consistent_with_the_feed_version,
    snapshot_streamed_while_keys_change_converges_with_the_changes_after_its_version,
    gateway_rows_give_the_wire_form_of_the_stored_keys,
    change_through_one_connection_is_visible_to_another,
    concurrent_creates_get_distinct_increasing_versions,
    feed_reader_following_concurrent_writers_misses_nothing,
    duplicate_usage_batch_is_counted_once,
    usage_rolls_up_minutes_into_hours_and_days_with_totals,
    gateway_sized_usage_chunks_land_whole_and_a_retried_chunk_counts_once,
    retention_rolls_up_deletes_and_prunes_keeping_every_kept_total,
    late_usage_after_a_rollup_is_folded_in_by_a_later_pass,
    concurrent_compactions_and_uploads_lose_and_double_nothing,
    quota_used_counts_allowed_requests_since,
    audit_is_newest_first_with_actor_names,
    migrations_run_again_on_reconnect_and_data_survives,
    import_is_idempotent_and_updates_changed_keys,
    import_refuses_conflicting_and_repeated_lines_by_line,
    an_import_batch_is_one_feed_row_that_expands_into_its_keys,
    feed_pages_never_split_an_import_version,
    a_key_changed_after_import_comes_with_its_later_version,
    an_import_that_stops_midway_keeps_its_batches_and_leaves_no_trace,
    fleet_counters_answer_as_redis_would,
    every_key_change_is_one_event_in_commit_order_with_the_record_and_never_the_hash,
    keys_sorted_by_last_use_page_through_every_key_once,
    old_events_are_forgotten_once_every_webhook_receiver_has_passed_them,
    usage_of_a_minute_lists_the_busiest_keys_with_their_denials,
);

// ---- helpers ----

fn new_key(name: &str) -> NewKey {
    let raw = key::generate(key::DEFAULT_PREFIX).expect("generate key");
    NewKey {
        id: new_key_id(),
        hash: KeyDigest::of(&raw).to_string(),
        prefix: key::DEFAULT_PREFIX.into(),
        masked: key::mask(&raw),
        name: name.into(),
        owner: None,
        plan: None,
        scopes: vec![],
        ip_allowlist: vec![],
        rate_limit: None,
        quota: None,
        expires_at: None,
        metadata: serde_json::Map::new(),
        tags: vec![],
    }
}

fn rate(requests: u32, secs: u64, burst: Option<u32>) -> RateLimitConfig {
    RateLimitConfig { requests, per: Duration::from_secs(secs), burst, by: LimitScope::Key }
}

async fn all_changes(store: &Store) -> (Vec<Change>, u64) {
    store.changes_since(0, 10_000).await.expect("changes_since")
}

fn versions(changes: &[Change]) -> Vec<u64> {
    changes.iter().map(|c| c.version).collect()
}

fn assert_strictly_increasing(versions: &[u64]) {
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "versions not strictly increasing: {versions:?}");
}

fn ids(keys: &[StoredKey]) -> Vec<String> {
    keys.iter().map(|k| k.id.clone()).collect()
}

/// Needles made of trigrams that every key holds and of rarer ones: SQLite's search asks
/// its index only for the rarer ones, and the answer must still be the exact substring
/// matches, page after page.
async fn q_with_common_and_rare_trigrams_finds_exactly_the_substring_matches(db: TestDb) {
    let store = &db.store;
    for i in 0..400 {
        let mut k = new_key(&format!("svc-{i:04} {}", ["prod", "staging"][i % 2]));
        k.owner = Some(format!("org-{:05}", i % 40));
        store.create_key(k, "ops").await.unwrap();
    }
    let all = everything(store).await;
    for needle in [
        "org-00017",
        "ORG-0001",
        "org-",
        "org",
        "rg-00039",
        "-0003",
        "00017",
        "svc-0123",
        "svc-01",
        "c-0399 st",
        "0399 prod",
        "g-00017x",
        "c-00017",
        "17 prod",
        "org-00017 svc",
    ] {
        let filter = KeyFilter { q: Some(needle.into()), ..Default::default() };
        let expected: Vec<_> = all.iter().filter(|k| selects(&filter, k)).map(|k| k.id.clone()).collect();
        for limit in [7, 1000] {
            let found = all_pages(store, &filter, limit).await.concat();
            assert_eq!(ids(&found), expected, "q={needle:?} limit={limit}");
        }
    }
}

/// Every page of a listing, following cursors.
async fn all_pages(store: &Store, filter: &KeyFilter, limit: u32) -> Vec<Vec<StoredKey>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = store.list_keys(filter, limit, cursor.as_deref()).await.expect("list_keys");
        pages.push(page);
        match next {
            Some(next) => cursor = Some(next),
            None => return pages,
        }
        assert!(pages.len() < 1000, "pagination does not end");
    }
}

/// Every key, in listing order.
async fn everything(store: &Store) -> Vec<StoredKey> {
    all_pages(store, &KeyFilter::default(), 1000).await.concat()
}

/// What `filter` must select, decided in Rust from the records themselves.
fn selects(filter: &KeyFilter, key: &StoredKey) -> bool {
    let needle = filter.q.as_deref().map(str::to_lowercase);
    filter.owner.as_ref().is_none_or(|o| key.owner.as_ref() == Some(o))
        && filter.status.is_none_or(|s| key.status == s)
        && filter.plan.as_ref().is_none_or(|p| key.plan.as_ref() == Some(p))
        && filter.tag.as_ref().is_none_or(|t| key.tags.contains(t))
        && needle.is_none_or(|n| {
            [key.name.as_str(), key.owner.as_deref().unwrap_or(""), key.id.as_str(), key.masked.as_str()]
                .iter()
                .any(|field| field.to_lowercase().contains(&n))
        })
}

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// One row of `key_tags`.
type KeyTagRow = (String, i64, String, String, Option<String>, Option<String>);

/// Asserts that the `key_tags` side table holds exactly one row per distinct tag of each
/// key, with the key's status, owner and plan.
async fn assert_key_tags_in_step(db: &TestDb) {
    let expected: BTreeSet<KeyTagRow> = everything(&db.store)
        .await
        .iter()
        .flat_map(|k| {
            k.tags.iter().map(|t| {
                let status = k.status.as_str().to_owned();
                (t.clone(), millis(k.created_at), k.id.clone(), status, k.owner.clone(), k.plan.clone())
            })
        })
        .collect();
    let sql = "SELECT tag, key_created_at, key_id, key_status, key_owner, key_plan FROM key_tags";
    let rows: Vec<KeyTagRow> = if db.url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.expect("SQLite connection");
        sqlx::query_as(sql).fetch_all(&mut conn).await.expect("read key_tags")
    } else {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("PostgreSQL connection");
        sqlx::query_as(sql).fetch_all(&mut conn).await.expect("read key_tags")
    };
    assert_eq!(rows.len(), expected.len(), "key_tags has duplicate rows: {rows:?}");
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), expected);
}

/// A usage line (CONTRACT §8) ending at `end`.
fn usage_record(key_id: &str, end: OffsetDateTime, allowed: u64, denied: &[(&str, u64)]) -> UsageRecord {
    let denied: BTreeMap<String, u64> = denied.iter().map(|(c, n)| (c.to_string(), *n)).collect();
    let requests = allowed + denied.values().sum::<u64>();
    serde_json::from_value(json!({
        "node": "gw-1",
        "key_id": key_id,
        "window_start": (end - time::Duration::seconds(5)).format(&time::format_description::well_known::Rfc3339).unwrap(),
        "window_end": end.format(&time::format_description::well_known::Rfc3339).unwrap(),
        "requests": requests,
        "allowed": allowed,
        "denied": denied,
        "status": {"2xx": allowed, "3xx": 0, "4xx": requests - allowed, "5xx": 0},
        "bytes_in": 100 * requests,
        "bytes_out": 1000 * allowed,
        "last_used_at": end.format(&time::format_description::well_known::Rfc3339).unwrap(),
    }))
    .expect("usage record")
}

// ---- scenarios ----

async fn create_get_and_list_with_every_filter(db: TestDb) {
    let store = &db.store;
    let mut a = new_key("Billing Service");
    a.owner = Some("acme".into());
    a.plan = Some("pro".into());
    a.tags = vec!["prod".into(), "eu".into()];
    a.scopes = vec!["orders:*".into()];
    a.ip_allowlist = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()];
    a.rate_limit = Some(rate(10, 1, Some(20)));
    a.quota = Some(QuotaConfig { requests: 100, per: QuotaPeriod::Month, by: LimitScope::Key });
    a.expires_at = Some(datetime!(2030-01-02 03:04:05.678 UTC));
    a.metadata = json!({"team": "payments", "n": 3}).as_object().unwrap().clone();
    let mut b = new_key("reporting");
    b.owner = Some("acme".into());
    b.plan = Some("free".into());
    b.tags = vec!["staging".into()];
    let mut c = new_key("50%_off job");
    c.owner = Some("globex".into());
    c.tags = vec!["prod".into()];

    let created_a = store.create_key(a.clone(), "ops").await.expect("create a");
    assert_eq!(created_a.id, a.id);
    assert_eq!(created_a.hash, a.hash);
    assert_eq!(created_a.masked, a.masked);
    assert_eq!(created_a.status, KeyStatusText::Active);
    assert_eq!(created_a.scopes, a.scopes);
    assert_eq!(created_a.ip_allowlist, a.ip_allowlist);
    assert_eq!(created_a.rate_limit, a.rate_limit);
    assert_eq!(created_a.quota, a.quota);
    assert_eq!(created_a.expires_at, a.expires_at);
    assert_eq!(created_a.metadata, a.metadata);
    assert_eq!(created_a.tags, a.tags);
    assert_eq!(created_a.created_at, created_a.updated_at);
    assert_eq!(created_a.last_used_at, None);
    assert!(created_a.version > 0);
    let created_b = store.create_key(b.clone(), "ops").await.expect("create b");
    let created_c = store.create_key(c.clone(), "ops").await.expect("create c");
    store
        .update_key(&c.id, KeyPatch { status: Some(KeyStatusText::Disabled), ..Default::default() }, "ops")
        .await
        .expect("disable c");

    assert_eq!(store.get_key(&a.id).await.unwrap(), Some(created_a.clone()));
    assert_eq!(store.get_key_by_hash(&a.hash).await.unwrap(), Some(created_a.clone()));
    assert_eq!(store.get_key("key_missing").await.unwrap(), None);
    assert_eq!(store.get_key_by_hash(&format!("sha256:{}", "0".repeat(64))).await.unwrap(), None);

    let list = |filter: KeyFilter| async move {
        let (keys, next) = store.list_keys(&filter, 100, None).await.expect("list");
        assert_eq!(next, None);
        ids(&keys).into_iter().collect::<BTreeSet<_>>()
    };
    let set = |keys: &[&NewKey]| keys.iter().map(|k| k.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(list(KeyFilter::default()).await, set(&[&a, &b, &c]));
    assert_eq!(list(KeyFilter { owner: Some("acme".into()), ..Default::default() }).await, set(&[&a, &b]));
    assert_eq!(list(KeyFilter { owner: Some("ACME".into()), ..Default::default() }).await, set(&[]));
    assert_eq!(list(KeyFilter { plan: Some("free".into()), ..Default::default() }).await, set(&[&b]));
    assert_eq!(list(KeyFilter { status: Some(KeyStatusText::Disabled), ..Default::default() }).await, set(&[&c]));
    assert_eq!(list(KeyFilter { status: Some(KeyStatusText::Active), ..Default::default() }).await, set(&[&a, &b]));
    assert_eq!(list(KeyFilter { status: Some(KeyStatusText::Revoked), ..Default::default() }).await, set(&[]));
    assert_eq!(list(KeyFilter { tag: Some("prod".into()), ..Default::default() }).await, set(&[&a, &c]));
    assert_eq!(list(KeyFilter { tag: Some("pro".into()), ..Default::default() }).await, set(&[]));
    // q: case-insensitive substring of name, owner, id or masked.
    assert_eq!(list(KeyFilter { q: Some("BILLING".into()), ..Default::default() }).await, set(&[&a]));
    assert_eq!(list(KeyFilter { q: Some("GLOBE".into()), ..Default::default() }).await, set(&[&c]));
    assert_eq!(list(KeyFilter { q: Some(a.id[6..14].to_uppercase()), ..Default::default() }).await, set(&[&a]));
    let masked_part = &b.masked[key::DEFAULT_PREFIX.len() + 1..key::DEFAULT_PREFIX.len() + 5];
    assert!(list(KeyFilter { q: Some(masked_part.into()), ..Default::default() }).await.contains(&b.id));
    // LIKE wildcards in q are literal characters.
    assert_eq!(list(KeyFilter { q: Some("50%_".into()), ..Default::default() }).await, set(&[&c]));
    assert_eq!(list(KeyFilter { q: Some("%".into()), ..Default::default() }).await, set(&[&c]));
    assert_eq!(list(KeyFilter { q: Some("t_ng".into()), ..Default::default() }).await, set(&[]));
    assert_eq!(list(KeyFilter { q: Some("re%ing".into()), ..Default::default() }).await, set(&[]));
    // Filters combine.
    let both = KeyFilter { owner: Some("acme".into()), tag: Some("prod".into()), ..Default::default() };
    assert_eq!(list(both).await, set(&[&a]));

    // Newest first.
    let (keys, _) = store.list_keys(&KeyFilter::default(), 10, None).await.unwrap();
    let order: Vec<_> = keys.iter().map(|k| (k.created_at, k.id.clone())).collect();
    let mut sorted = order.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(order, sorted);
    let _ = (created_b, created_c);
}

async fn cursor_pagination_visits_every_key_exactly_once(db: TestDb) {
    let store = &db.store;
    let mut created = Vec::new();
    for i in 0..23 {
        let mut k = new_key(&format!("key {i}"));
        k.owner = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
        created.push(store.create_key(k, "ops").await.unwrap().id);
        if i % 5 == 0 {
            // Spread created_at over several milliseconds; the rest share them (ties break on id).
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let (everything, next) = store.list_keys(&KeyFilter::default(), 1000, None).await.unwrap();
    assert_eq!(next, None);
    assert_eq!(everything.len(), 23);
    for limit in [1, 5, 7, 23, 24] {
        let pages = all_pages(store, &KeyFilter::default(), limit).await;
        let sizes: Vec<_> = pages.iter().map(Vec::len).collect();
        assert!(sizes[..sizes.len() - 1].iter().all(|&n| n == limit as usize), "limit {limit}: {sizes:?}");
        let flat: Vec<_> = pages.iter().flat_map(|p| ids(p)).collect();
        assert_eq!(flat, ids(&everything), "limit {limit}: pages must concatenate to the full listing");
    }
    // A page that ends exactly on the last key has no next cursor.
    let pages = all_pages(store, &KeyFilter::default(), 23).await;
    assert_eq!(pages.len(), 1);

    let odd = KeyFilter { owner: Some("odd".into()), ..Default::default() };
    let pages = all_pages(store, &odd, 4).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 3]);
    let flat: BTreeSet<_> = pages.iter().flat_map(|p| ids(p)).collect();
    let expected: BTreeSet<_> = created.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(flat, expected);

    for bad in ["garbage", "", "00", "6162"] {
        let result = store.list_keys(&KeyFilter::default(), 10, Some(bad)).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "cursor {bad:?}: {result:?}");
    }
    for bad in [0, 1001] {
        assert!(matches!(store.list_keys(&KeyFilter::default(), bad, None).await, Err(StoreError::Invalid(_))));
    }
}

async fn filtered_pages_visit_every_match_exactly_once(db: TestDb) {
    let store = &db.store;
    for i in 0..30 {
        let mut k = new_key(&format!("svc {i} {}", ["billing", "reporting", "search"][i % 3]));
        k.owner = Some(format!("o{}", i % 2));
        k.plan = Some(if i % 4 == 0 { "pro" } else { "free" }.into());
        k.tags = match i % 3 {
            0 => vec!["t1".into()],
            1 => vec!["t1".into(), "t2".into()],
            _ => vec![],
        };
        let id = store.create_key(k, "ops").await.unwrap().id;
        if i % 5 == 1 {
            let patch = KeyPatch { status: Some(KeyStatusText::Disabled), ..Default::default() };
            store.update_key(&id, patch, "ops").await.unwrap();
        }
        if i % 4 == 0 {
            // Several keys share each millisecond: ties break on id, on every index.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let all = everything(store).await;
    let filters = [
        KeyFilter { tag: Some("t1".into()), ..Default::default() },
        KeyFilter { tag: Some("t1".into()), status: Some(KeyStatusText::Active), ..Default::default() },
        // A tag with fewer keys than the owner (10 against 15), then one with more (20).
        KeyFilter { tag: Some("t2".into()), owner: Some("o1".into()), ..Default::default() },
        KeyFilter {
            tag: Some("t1".into()),
            owner: Some("o1".into()),
            status: Some(KeyStatusText::Active),
            ..Default::default()
        },
        KeyFilter {
            tag: Some("t1".into()),
            plan: Some("free".into()),
            status: Some(KeyStatusText::Active),
            ..Default::default()
        },
        KeyFilter { status: Some(KeyStatusText::Disabled), ..Default::default() },
        KeyFilter { plan: Some("free".into()), owner: Some("o0".into()), ..Default::default() },
        KeyFilter { q: Some("billing".into()), ..Default::default() },
        KeyFilter { q: Some("SVC 1".into()), tag: Some("t1".into()), ..Default::default() },
        KeyFilter { q: Some("vc".into()), status: Some(KeyStatusText::Active), ..Default::default() },
    ];
    for filter in &filters {
        let expected: Vec<_> = all.iter().filter(|k| selects(filter, k)).map(|k| k.id.clone()).collect();
        assert!(expected.len() > 3, "{filter:?} selects too few keys to paginate: {expected:?}");
        for limit in [1, 3, 7] {
            let pages = all_pages(store, filter, limit).await;
            let flat: Vec<_> = pages.iter().flat_map(|p| ids(p)).collect();
            assert_eq!(flat, expected, "{filter:?}, limit {limit}");
        }
    }
}

async fn tag_index_follows_create_update_rotate_revoke_and_delete(db: TestDb) {
    let store = &db.store;
    let tagged = |tag: &str, status: Option<KeyStatusText>| {
        let filter = KeyFilter { tag: Some(tag.into()), status, ..Default::default() };
        async move { ids(&store.list_keys(&filter, 100, None).await.expect("list").0) }
    };
    let mut a = new_key("a");
    a.tags = vec!["prod".into(), "eu".into(), "prod".into()];
    let mut b = new_key("b");
    b.tags = vec!["staging".into()];
    let c = new_key("c");
    for k in [&a, &b, &c] {
        store.create_key(k.clone(), "ops").await.unwrap();
    }
    assert_key_tags_in_step(&db).await;
    assert_eq!(tagged("prod", None).await, [a.id.clone()]);

    let patch = KeyPatch { tags: Some(vec!["eu".into(), "pci".into()]), ..Default::default() };
    store.update_key(&a.id, patch, "ops").await.unwrap();
    // A change that leaves the tags alone leaves their rows alone; owner and plan are copied.
    store.update_key(&b.id, KeyPatch { name: Some("b2".into()), ..Default::default() }, "ops").await.unwrap();
    let patch = KeyPatch { owner: Some(Some("acme".into())), plan: Some(Some("pro".into())), ..Default::default() };
    store.update_key(&a.id, patch, "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    let filter = KeyFilter {
        tag: Some("eu".into()),
        owner: Some("acme".into()),
        plan: Some("pro".into()),
        ..Default::default()
    };
    assert_eq!(ids(&store.list_keys(&filter, 10, None).await.unwrap().0), [a.id.clone()]);
    store.update_key(&a.id, KeyPatch { owner: Some(None), ..Default::default() }, "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    assert!(store.list_keys(&filter, 10, None).await.unwrap().0.is_empty());
    assert!(tagged("prod", None).await.is_empty());
    assert_eq!(tagged("pci", None).await, [a.id.clone()]);

    let mut successor = new_key("a, rotated");
    successor.tags = vec!["pci".into()];
    store.rotate_key(&a.id, successor.clone(), Duration::from_secs(60), "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    assert_eq!(tagged("pci", None).await, [successor.id.clone(), a.id.clone()]);

    store.revoke_key(&b.id, "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    assert_eq!(tagged("staging", Some(KeyStatusText::Revoked)).await, [b.id.clone()]);
    assert!(tagged("staging", Some(KeyStatusText::Active)).await.is_empty());

    store.delete_key(&a.id, "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    assert_eq!(tagged("pci", None).await, [successor.id.clone()]);
    assert!(tagged("eu", None).await.is_empty());

    store.update_key(&c.id, KeyPatch { tags: Some(vec!["eu".into()]), ..Default::default() }, "ops").await.unwrap();
    store.update_key(&successor.id, KeyPatch { tags: Some(vec![]), ..Default::default() }, "ops").await.unwrap();
    assert_key_tags_in_step(&db).await;
    assert_eq!(tagged("eu", None).await, [c.id.as_str()]);
    assert!(tagged("pci", None).await.is_empty());
}

async fn q_finds_what_a_plain_substring_search_finds(db: TestDb) {
    let store = &db.store;
    let people = [
        ("Billing Service", Some("acme")),
        ("billing-eu", Some("globex")),
        ("Reporting", None),
        ("50%_off job", Some("initech")),
        ("quote \"x\" here", Some("acme")),
        ("café crème", Some("umbrella")),
        ("a", Some("ab")),
        ("ab cd", None),
        ("renamed later", Some("acme")),
        ("deleted later", Some("hooli")),
        ("odd\u{1}name", Some("ctrl")),
    ];
    let mut created = Vec::new();
    for (name, owner) in people {
        let mut k = new_key(name);
        k.owner = owner.map(Into::into);
        created.push(store.create_key(k, "ops").await.unwrap());
    }
    // The search index follows changes of name and owner, and deletions.
    let patch = KeyPatch { name: Some("Invoicing".into()), owner: Some(None), ..Default::default() };
    store.update_key(&created[8].id, patch, "ops").await.unwrap();
    store.delete_key(&created[9].id, "ops").await.unwrap();

    let all = everything(store).await;
    let masked_tail = &created[0].masked[created[0].masked.len() - "…x9Zq".len()..];
    let id_part = created[1].id[5..13].to_uppercase();
    let needles = [
        "b",
        "B",
        "bi",
        "ab",
        "bil",
        "BILLING",
        "service",
        "g s",
        "ING",
        "acme",
        "globex",
        "%",
        "50%_",
        "t_ng",
        "re%ing",
        "\"x\"",
        "\"",
        "café",
        "CAFÉ",
        "é",
        "key_",
        "kg_live_",
        "…",
        masked_tail,
        &id_part,
        "invoicing",
        "renamed",
        "deleted",
        "hooli",
        "zzz",
        "odd\u{1}n",
        "\u{1}",
        "odd\u{1}name\u{1}ctrl",
        // Only across two fields' boundary (name, then owner): no match.
        "service acme",
        "ing acme",
    ];
    for needle in needles {
        let filter = KeyFilter { q: Some(needle.into()), ..Default::default() };
        let expected: Vec<_> = all.iter().filter(|k| selects(&filter, k)).map(|k| k.id.clone()).collect();
        let (found, next) = store.list_keys(&filter, 1000, None).await.expect("list");
        assert_eq!(next, None);
        assert_eq!(ids(&found), expected, "q={needle:?}");
    }
    let only = |needle: &str| {
        let filter = KeyFilter { q: Some(needle.into()), ..Default::default() };
        async move { ids(&store.list_keys(&filter, 1000, None).await.expect("list").0) }
    };
    assert_eq!(only("invoicing").await, [created[8].id.clone()]);
    assert!(only("renamed").await.is_empty());
    assert!(only("hooli").await.is_empty());
    assert!(only("service acme").await.is_empty());
    assert_eq!(only(&id_part).await, [created[1].id.clone()]);
}

async fn duplicate_id_or_hash_is_a_conflict(db: TestDb) {
    let store = &db.store;
    let first = new_key("first");
    store.create_key(first.clone(), "ops").await.unwrap();
    let (_, before) = all_changes(store).await;

    let mut same_hash = new_key("same hash");
    same_hash.hash = first.hash.clone();
    let result = store.create_key(same_hash.clone(), "ops").await;
    assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
    let mut same_id = new_key("same id");
    same_id.id = first.id.clone();
    let result = store.create_key(same_id, "ops").await;
    assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");

    // A refused create leaves no trace in the keys, the feed or the audit log.
    assert_eq!(store.get_key(&same_hash.id).await.unwrap(), None);
    assert_eq!(all_changes(store).await.1, before);
    assert_eq!(store.audit(None, None, 100).await.unwrap().len(), 1);

    let mut bad_hash = new_key("bad hash");
    bad_hash.hash = "sha256:nothex".into();
    assert!(matches!(store.create_key(bad_hash, "ops").await, Err(StoreError::Invalid(_))));
}

async fn update_sets_clears_and_leaves_fields(db: TestDb) {
    let store = &db.store;
    let mut k = new_key("before");
    k.owner = Some("acme".into());
    k.plan = Some("free".into());
    k.scopes = vec!["a".into()];
    k.rate_limit = Some(rate(5, 1, None));
    k.quota = Some(QuotaConfig { requests: 10, per: QuotaPeriod::Day, by: LimitScope::Key });
    k.expires_at = Some(datetime!(2031-01-01 00:00 UTC));
    k.metadata = json!({"x": 1}).as_object().unwrap().clone();
    k.tags = vec!["t".into()];
    let created = store.create_key(k.clone(), "ops").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let patch = KeyPatch {
        name: Some("after".into()),
        owner: Some(None),
        plan: Some(Some("pro".into())),
        rate_limit: Some(Some(rate(50, 60, Some(100)))),
        quota: Some(None),
        expires_at: Some(None),
        tags: Some(vec!["t".into(), "u".into()]),
        ..Default::default()
    };
    let updated = store.update_key(&k.id, patch, "alice").await.unwrap();
    assert_eq!(updated.name, "after");
    assert_eq!(updated.owner, None, "Some(None) clears");
    assert_eq!(updated.plan.as_deref(), Some("pro"));
    assert_eq!(updated.rate_limit, Some(rate(50, 60, Some(100))));
    assert_eq!(updated.quota, None);
    assert_eq!(updated.expires_at, None);
    assert_eq!(updated.tags, ["t", "u"]);
    // None leaves a field as it was.
    assert_eq!(updated.scopes, created.scopes);
    assert_eq!(updated.metadata, created.metadata);
    assert_eq!(updated.status, KeyStatusText::Active);
    assert_eq!((updated.id.as_str(), updated.hash.as_str()), (created.id.as_str(), created.hash.as_str()));
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at > created.updated_at);
    assert!(updated.version > created.version);
    assert_eq!(store.get_key(&k.id).await.unwrap(), Some(updated.clone()));

    let events = store.audit(Some(&k.id), None, 10).await.unwrap();
    assert_eq!(events[0].action, "key.update");
    assert_eq!(events[0].actor, "alice");
    assert_eq!(
        events[0].details,
        json!({"fields": ["name", "owner", "plan", "rate_limit", "quota", "expires_at", "tags"]})
    );
    let (changes, latest) = all_changes(store).await;
    assert_eq!(latest, updated.version);
    assert!(matches!(&changes.last().unwrap().change, KeyChange::Upsert(key) if *key == updated));

    // A patch that changes nothing is not a change.
    let same = store.update_key(&k.id, KeyPatch { name: Some("after".into()), ..Default::default() }, "alice").await;
    assert_eq!(same.unwrap(), updated);
    assert_eq!(all_changes(store).await.1, latest);

    let disabled =
        store.update_key(&k.id, KeyPatch { status: Some(KeyStatusText::Disabled), ..Default::default() }, "ops");
    assert_eq!(disabled.await.unwrap().status, KeyStatusText::Disabled);
    let revoke_by_patch =
        store.update_key(&k.id, KeyPatch { status: Some(KeyStatusText::Revoked), ..Default::default() }, "ops");
    assert!(matches!(revoke_by_patch.await, Err(StoreError::Invalid(_))));
    let missing = store.update_key("key_missing", KeyPatch { name: Some("x".into()), ..Default::default() }, "ops");
    assert!(matches!(missing.await, Err(StoreError::NotFound)));
}

async fn revoked_is_final(db: TestDb) {
    let store = &db.store;
    let k = new_key("doomed");
    store.create_key(k.clone(), "ops").await.unwrap();
    let revoked = store.revoke_key(&k.id, "ops").await.unwrap();
    assert_eq!(revoked.status, KeyStatusText::Revoked);
    let (_, latest) = all_changes(store).await;
    assert_eq!(latest, revoked.version);

    // Revoking again changes nothing and appends nothing.
    assert_eq!(store.revoke_key(&k.id, "ops").await.unwrap(), revoked);
    assert_eq!(all_changes(store).await.1, latest);
    assert_eq!(
        store.audit(Some(&k.id), None, 10).await.unwrap().iter().filter(|e| e.action == "key.revoke").count(),
        1
    );

    for patch in [
        KeyPatch { status: Some(KeyStatusText::Active), ..Default::default() },
        KeyPatch { name: Some("revived".into()), ..Default::default() },
        KeyPatch::default(),
    ] {
        let result = store.update_key(&k.id, patch, "ops").await;
        assert!(matches!(&result, Err(StoreError::Conflict(m)) if m == "revoked keys cannot be changed"), "{result:?}");
    }
    let rotated = store.rotate_key(&k.id, new_key("successor"), Duration::from_secs(60), "ops").await;
    assert!(matches!(rotated, Err(StoreError::Conflict(_))), "{rotated:?}");
    assert_eq!(store.get_key(&k.id).await.unwrap(), Some(revoked));
    assert_eq!(all_changes(store).await.1, latest);
    assert!(matches!(store.revoke_key("key_missing", "ops").await, Err(StoreError::NotFound)));
}

async fn rotate_expires_old_key_after_grace_and_creates_a_new_one(db: TestDb) {
    let store = &db.store;
    let mut old = new_key("rotating");
    old.owner = Some("acme".into());
    old.scopes = vec!["orders:read".into()];
    let old_created = store.create_key(old.clone(), "ops").await.unwrap();

    // The API copies the old key's settings into the new one.
    let mut successor = new_key("rotating");
    successor.owner = old.owner.clone();
    successor.scopes = old.scopes.clone();
    let grace = Duration::from_secs(3600);
    let before = OffsetDateTime::now_utc();
    let (old_after, new_created) = store.rotate_key(&old.id, successor.clone(), grace, "bob").await.unwrap();
    let after = OffsetDateTime::now_utc();

    let expires = old_after.expires_at.expect("old key gets an expiry");
    let ms = time::Duration::milliseconds(1);
    assert!(expires >= before + grace - ms && expires <= after + grace, "{expires} not now + 1h");
    assert_eq!(old_after.status, KeyStatusText::Active, "the old key works during the grace period");
    assert_eq!(old_after.hash, old_created.hash);
    assert_eq!(new_created.id, successor.id);
    assert_ne!(new_created.id, old.id);
    assert_eq!(new_created.hash, successor.hash);
    assert_ne!(new_created.hash, old.hash);
    assert_eq!(new_created.status, KeyStatusText::Active);
    assert_eq!(new_created.expires_at, None);
    assert_eq!(new_created.scopes, old.scopes);
    assert_eq!(store.get_key_by_hash(&successor.hash).await.unwrap(), Some(new_created.clone()));

    // Both changes are in the feed, from one transaction.
    let (changes, latest) = store.changes_since(old_created.version, 100).await.unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(latest, changes[1].version);
    let changed: BTreeSet<_> = changes
        .iter()
        .map(|c| match &c.change {
            KeyChange::Upsert(k) => k.id.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(changed, BTreeSet::from([old.id.clone(), successor.id.clone()]));

    let events = store.audit(Some(&old.id), None, 10).await.unwrap();
    assert_eq!(events[0].action, "key.rotate");
    assert_eq!(events[0].actor, "bob");
    assert_eq!(events[0].details, json!({"new_key_id": successor.id}));

    // An expiry sooner than the grace period stays.
    let mut soon = new_key("expiring soon");
    let soon_at = OffsetDateTime::now_utc() + time::Duration::minutes(10);
    soon.expires_at = Some(soon_at);
    let soon_created = store.create_key(soon.clone(), "ops").await.unwrap();
    let (soon_after, _) =
        store.rotate_key(&soon.id, new_key("next"), Duration::from_secs(86_400), "ops").await.unwrap();
    assert_eq!(soon_after.expires_at, soon_created.expires_at);

    // A new key that clashes is refused and the old key stays untouched.
    let mut clash = new_key("clash");
    clash.hash = old.hash.clone();
    let result = store.rotate_key(&new_created.id, clash, grace, "ops").await;
    assert!(matches!(result, Err(StoreError::Conflict(_))), "{result:?}");
    assert_eq!(store.get_key(&new_created.id).await.unwrap().unwrap().expires_at, None);
    let missing = store.rotate_key("key_missing", new_key("x"), grace, "ops").await;
    assert!(matches!(missing, Err(StoreError::NotFound)));
}

async fn delete_removes_the_key_and_feeds_a_delete(db: TestDb) {
    let store = &db.store;
    let k = new_key("short-lived");
    let keeper = new_key("keeper");
    store.create_key(k.clone(), "ops").await.unwrap();
    store.create_key(keeper.clone(), "ops").await.unwrap();
    let (_, before) = all_changes(store).await;

    store.delete_key(&k.id, "carol").await.unwrap();
    assert_eq!(store.get_key(&k.id).await.unwrap(), None);
    assert_eq!(store.get_key_by_hash(&k.hash).await.unwrap(), None);
    assert!(matches!(store.delete_key(&k.id, "carol").await, Err(StoreError::NotFound)));

    let (changes, latest) = store.changes_since(before, 100).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].version, latest);
    assert_eq!(changes[0].change, KeyChange::Delete { id: k.id.clone(), hash: k.hash.clone() });

    // A follower starting from zero learns that the key is gone, not its old record.
    let (from_zero, _) = all_changes(store).await;
    assert!(from_zero.iter().all(|c| !matches!(&c.change, KeyChange::Upsert(key) if key.id == k.id)));

    // The deleted key's audit trail stays.
    let actions: Vec<_> = store.audit(Some(&k.id), None, 10).await.unwrap().into_iter().map(|e| e.action).collect();
    assert_eq!(actions, ["key.delete", "key.create"]);
    assert!(store.get_key(&keeper.id).await.unwrap().is_some());
}

async fn feed_versions_increase_and_changes_since_returns_exactly_the_missed_changes(db: TestDb) {
    let store = &db.store;
    let (empty, zero) = all_changes(store).await;
    assert!(empty.is_empty());
    assert_eq!(zero, 0);

    let a = store.create_key(new_key("a"), "ops").await.unwrap();
    let b = store.create_key(new_key("b"), "ops").await.unwrap();
    let (seen, checkpoint) = all_changes(store).await;
    assert_eq!(versions(&seen), [a.version, b.version]);
    assert_eq!(checkpoint, b.version);

    // What a follower at `checkpoint` misses:
    let c = store.create_key(new_key("c"), "ops").await.unwrap();
    let a2 = store.update_key(&a.id, KeyPatch { name: Some("a2".into()), ..Default::default() }, "ops").await.unwrap();
    store.delete_key(&b.id, "ops").await.unwrap();
    let (missed, latest) = store.changes_since(checkpoint, 100).await.unwrap();
    assert_strictly_increasing(&versions(&missed));
    assert!(missed.iter().all(|ch| ch.version > checkpoint));
    assert_eq!(missed.len(), 3);
    assert_eq!(latest, missed[2].version);
    assert_eq!(missed[0].change, KeyChange::Upsert(c.clone()));
    assert_eq!(missed[1].change, KeyChange::Upsert(a2.clone()));
    assert_eq!(missed[1].version, a2.version);
    assert_eq!(missed[2].change, KeyChange::Delete { id: b.id.clone(), hash: b.hash.clone() });
    assert_eq!(store.changes_since(latest, 100).await.unwrap(), (vec![], latest));

    // Paging through the feed gives the same changes as one read.
    let (all, _) = all_changes(store).await;
    assert_strictly_increasing(&versions(&all));
    let mut paged = Vec::new();
    let mut at = 0;
    loop {
        let (page, latest) = store.changes_since(at, 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        at = last.version;
        paged.extend(page);
        if at == latest {
            break;
        }
    }
    assert_eq!(paged, all);
    // An upsert carries the key's current record, even for an older version.
    assert!(matches!(&all[0].change, KeyChange::Upsert(k) if *k == a2));
    assert!(matches!(store.changes_since(0, 0).await, Err(StoreError::Invalid(_))));
}

async fn snapshot_is_consistent_with_the_feed_version(db: TestDb) {
    let store = &db.store;
    let (version, keys) = store.snapshot().await.unwrap();
    assert_eq!((version, keys.len()), (0, 0));
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(store.create_key(new_key(&format!("k{i}")), "ops").await.unwrap());
    }
    store.delete_key(&created[1].id, "ops").await.unwrap();
    store.revoke_key(&created[2].id, "ops").await.unwrap();

    let (version, snapshot) = store.snapshot().await.unwrap();
    let (_, latest) = all_changes(store).await;
    assert_eq!(version, latest);
    assert!(snapshot.iter().all(|k| k.version <= version));
    // Replaying the feed up to the snapshot's version gives the snapshot.
    let mut replayed: HashMap<String, StoredKey> = HashMap::new();
    for change in store.changes_since(0, 10_000).await.unwrap().0.into_iter().filter(|c| c.version <= version) {
        match change.change {
            KeyChange::Upsert(k) => {
                replayed.insert(k.id.clone(), k);
            }
            KeyChange::Delete { id, .. } => {
                replayed.remove(&id);
            }
        }
    }
    let snapshot_map: HashMap<_, _> = snapshot.into_iter().map(|k| (k.id.clone(), k)).collect();
    assert_eq!(replayed, snapshot_map);
    assert_eq!(snapshot_map.len(), 4);
    assert_eq!(snapshot_map[&created[2].id].status, KeyStatusText::Revoked);
}

/// A snapshot streamed (as `/v1/sync/snapshot` reads it) while keys are created,
/// revoked and deleted, plus the changes after the version read before it, is
/// exactly the store's final state.
async fn snapshot_streamed_while_keys_change_converges_with_the_changes_after_its_version(db: TestDb) {
    use futures_util::StreamExt as _;
    let store = &db.store;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(store.create_key(new_key(&format!("k{i}")), "ops").await.unwrap().id);
    }
    let version = store.latest_version().await.unwrap();
    let mut seen: HashMap<String, StoredKey> = HashMap::new();
    {
        let mut keys = store.all_keys();
        let mut step = 0;
        while let Some(key) = keys.next().await {
            let key = key.unwrap();
            assert!(seen.insert(key.id.clone(), key).is_none(), "a key came twice");
            // Changes while the statement streams.
            match step {
                0 => store.revoke_key(&ids[0], "ops").await.map(|_| ()).unwrap(),
                1 => store.delete_key(&ids[29], "ops").await.unwrap(),
                2 => store.create_key(new_key("late"), "ops").await.map(|_| ()).unwrap(),
                3 => store.delete_key(&ids[1], "ops").await.unwrap(),
                _ => {}
            }
            step += 1;
        }
    }
    let (changes, _) = store.changes_since(version, 10_000).await.unwrap();
    assert!(!changes.is_empty());
    for change in changes {
        match change.change {
            KeyChange::Upsert(k) => {
                seen.insert(k.id.clone(), k);
            }
            KeyChange::Delete { id, .. } => {
                seen.remove(&id);
            }
        }
    }
    let (_, all) = store.snapshot().await.unwrap();
    let expected: HashMap<String, StoredKey> = all.into_iter().map(|k| (k.id.clone(), k)).collect();
    assert_eq!(seen, expected);
    assert_eq!(expected.len(), 29);
    assert!(store.key_count_estimate().await.is_ok());
}

/// The snapshot reads keys as light rows (`gateway_key_pages`; a SQLite file on a
/// connection of its own) and the changes as stored keys: both must give a gateway
/// the same key, for every field a key can have, escapes in its text included.
async fn gateway_rows_give_the_wire_form_of_the_stored_keys(db: TestDb) {
    use futures_util::TryStreamExt as _;
    use keygate::control::snapshot::wire_key;
    let store = &db.store;
    let mut full = new_key("billing \"prod\" é");
    full.owner = Some("org-1".into());
    full.plan = Some("pro".into());
    full.scopes = vec!["orders:read".into(), "a\\b".into()];
    full.ip_allowlist = vec!["10.0.0.0/8".into(), "2001:db8::1".into()];
    full.rate_limit = Some(rate(10, 1, Some(20)));
    full.quota = Some(QuotaConfig { requests: 1000, per: QuotaPeriod::Month, by: LimitScope::Key });
    full.expires_at = Some(datetime!(2031-01-02 03:04:05.678 UTC));
    full.metadata = json!({"team": "pay\nments", "n": 1, "nested": {"a": [1, 2]}}).as_object().cloned().unwrap();
    full.tags = vec!["prod".into(), "pci".into()];
    let full = store.create_key(full, "ops").await.unwrap();
    let bare = store.create_key(new_key("bare"), "ops").await.unwrap();
    let mut named_as_id = new_key("");
    named_as_id.name = named_as_id.id.clone();
    store.create_key(named_as_id, "ops").await.unwrap();
    store.revoke_key(&bare.id, "ops").await.unwrap();
    let mut records = import_records("legacy", 1, 2);
    records[0].tags = vec!["imported".into()];
    import(store, vec![records]).await;

    let (_, stored) = store.snapshot().await.unwrap();
    let pages: Vec<_> = store.gateway_key_pages(2).try_collect().await.unwrap();
    assert!(pages.iter().all(|page| !page.is_empty() && page.len() <= 2), "pages of at most 2 rows");
    let rows: Vec<_> = pages.into_iter().flatten().collect();
    assert_eq!(rows.len(), stored.len());
    assert_eq!(rows.len(), 5);
    for row in &rows {
        let key = stored.iter().find(|k| k.id == row.id()).expect("a row of a stored key");
        assert_eq!(row.wire().unwrap(), wire_key(key).unwrap(), "{}", key.id);
    }
    let full = rows.iter().find(|row| row.id() == full.id).unwrap().wire().unwrap();
    assert!(full.metadata.is_some() && full.rate_limit.is_some() && full.expires_at_ms.is_some());
}

async fn change_through_one_connection_is_visible_to_another(db: TestDb) {
    let first = &db.store;
    let second = db.reconnect().await;
    let (_, start) = second.changes_since(0, 100).await.unwrap();
    let k = first.create_key(new_key("shared"), "ops").await.unwrap();
    let (changes, latest) = second.changes_since(start, 100).await.unwrap();
    assert_eq!(latest, k.version);
    assert_eq!(changes, [Change { version: k.version, change: KeyChange::Upsert(k.clone()) }]);
    assert_eq!(second.get_key(&k.id).await.unwrap(), Some(k.clone()));

    let revoked = second.revoke_key(&k.id, "ops").await.unwrap();
    let (changes, _) = first.changes_since(latest, 100).await.unwrap();
    assert_eq!(changes, [Change { version: revoked.version, change: KeyChange::Upsert(revoked) }]);
    second.close().await;
}

async fn concurrent_creates_get_distinct_increasing_versions(db: TestDb) {
    let stores = [db.store.clone(), db.reconnect().await];
    let mut tasks = Vec::new();
    for (n, store) in stores.iter().enumerate() {
        for i in 0..12 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move { store.create_key(new_key(&format!("s{n}-{i}")), "ops").await }));
        }
    }
    let mut created = Vec::new();
    for task in tasks {
        created.push(task.await.expect("task").expect("concurrent create"));
    }
    let distinct: BTreeSet<_> = created.iter().map(|k| k.version).collect();
    assert_eq!(distinct.len(), created.len(), "versions must be distinct");

    for store in &stores {
        let (changes, latest) = all_changes(store).await;
        assert_strictly_increasing(&versions(&changes));
        assert_eq!(versions(&changes), distinct.iter().copied().collect::<Vec<_>>());
        assert_eq!(latest, *distinct.last().unwrap());
        let fed: BTreeSet<_> = changes
            .iter()
            .map(|c| match &c.change {
                KeyChange::Upsert(k) => {
                    assert_eq!(k.version, c.version);
                    k.id.clone()
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(fed, created.iter().map(|k| k.id.clone()).collect());
    }
}

async fn feed_reader_following_concurrent_writers_misses_nothing(db: TestDb) {
    // A follower that polls while several writers commit must end up with every
    // version: a version that commits after a higher one would be skipped.
    let writers = [db.store.clone(), db.reconnect().await, db.reconnect().await];
    let reader = db.reconnect().await;
    let done = Arc::new(AtomicBool::new(false));
    let follow = tokio::spawn({
        let done = done.clone();
        async move {
            let mut seen = Vec::new();
            let mut at = 0;
            loop {
                // Read the flag first: an empty page after every write committed means caught up.
                let finished = done.load(Ordering::SeqCst);
                let (page, _) = reader.changes_since(at, 1000).await.expect("follow");
                if page.is_empty() && finished {
                    return seen;
                }
                if let Some(last) = page.last() {
                    at = last.version;
                }
                seen.extend(page.into_iter().map(|c| c.version));
                tokio::task::yield_now().await;
            }
        }
    });
    let mut tasks = Vec::new();
    for (n, store) in writers.iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                store.create_key(new_key(&format!("w{n}-{i}")), "ops").await.expect("create");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let seen = follow.await.expect("reader");
    let (all, _) = all_changes(&writers[0]).await;
    assert_eq!(seen, versions(&all), "the follower must see every version, in order");
}

async fn duplicate_usage_batch_is_counted_once(db: TestDb) {
    let store = &db.store;
    let k = store.create_key(new_key("metered"), "ops").await.unwrap();
    let t = datetime!(2026-03-01 12:00:30 UTC);
    let batch = [usage_record(&k.id, t, 5, &[("rate_limited", 2)]), usage_record("key_unknown", t, 1, &[])];
    assert!(store.ingest_usage("gw-1", "boot-a", 1, &batch).await.unwrap());
    assert!(!store.ingest_usage("gw-1", "boot-a", 1, &batch).await.unwrap(), "a retried batch is a duplicate");
    let range = (datetime!(2026-03-01 00:00 UTC), datetime!(2026-03-02 00:00 UTC));
    let (_, totals) = store.usage(&k.id, range.0, range.1, Granularity::Day).await.unwrap();
    assert_eq!((totals.requests, totals.allowed), (7, 5));
    assert_eq!(totals.denied, BTreeMap::from([("rate_limited".to_owned(), 2)]));

    // Another sequence, boot or node is another batch.
    assert!(store.ingest_usage("gw-1", "boot-a", 2, &batch[..1]).await.unwrap());
    assert!(store.ingest_usage("gw-1", "boot-b", 1, &batch[..1]).await.unwrap());
    assert!(store.ingest_usage("gw-2", "boot-a", 1, &batch[..1]).await.unwrap());
    let (_, totals) = store.usage(&k.id, range.0, range.1, Granularity::Day).await.unwrap();
    assert_eq!((totals.requests, totals.allowed), (28, 20));

    // last_used_at follows the latest usage and never goes back; it is not a key change.
    let (_, latest) = all_changes(store).await;
    assert_eq!(store.get_key(&k.id).await.unwrap().unwrap().last_used_at, Some(t));
    let earlier = [usage_record(&k.id, t - time::Duration::hours(1), 1, &[])];
    assert!(store.ingest_usage("gw-1", "boot-a", 3, &earlier).await.unwrap());
    assert_eq!(store.get_key(&k.id).await.unwrap().unwrap().last_used_at, Some(t));
    assert_eq!(all_changes(store).await.1, latest);

    // Usage of an unknown key is kept.
    let (_, unknown) = store.usage("key_unknown", range.0, range.1, Granularity::Day).await.unwrap();
    assert_eq!(unknown.requests, 1);
    // An empty batch is still a batch.
    assert!(store.ingest_usage("gw-1", "boot-a", 4, &[]).await.unwrap());
    assert!(!store.ingest_usage("gw-1", "boot-a", 4, &[]).await.unwrap());
}

async fn usage_rolls_up_minutes_into_hours_and_days_with_totals(db: TestDb) {
    let store = &db.store;
    let id = "key_usage";
    let records = [
        usage_record(id, datetime!(2026-03-01 10:00:05 UTC), 1, &[]),
        usage_record(id, datetime!(2026-03-01 10:00:59 UTC), 2, &[("quota_exceeded", 1)]),
        usage_record(id, datetime!(2026-03-01 10:01:00 UTC), 3, &[]),
        usage_record(id, datetime!(2026-03-01 11:30:00 UTC), 4, &[("rate_limited", 2)]),
        usage_record(id, datetime!(2026-03-02 00:00:10 UTC), 5, &[]),
        usage_record("key_other", datetime!(2026-03-01 10:00:05 UTC), 100, &[]),
    ];
    assert!(store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap());
    let from = datetime!(2026-03-01 00:00 UTC);
    let to = datetime!(2026-03-03 00:00 UTC);

    let (minutes, totals) = store.usage(id, from, to, Granularity::Minute).await.unwrap();
    let starts: Vec<_> = minutes.iter().map(|b| b.start).collect();
    assert_eq!(
        starts,
        [
            datetime!(2026-03-01 10:00 UTC),
            datetime!(2026-03-01 10:01 UTC),
            datetime!(2026-03-01 11:30 UTC),
            datetime!(2026-03-02 00:00 UTC)
        ]
    );
    let first = &minutes[0];
    assert_eq!((first.requests, first.allowed), (4, 3));
    assert_eq!(first.denied, BTreeMap::from([("quota_exceeded".to_owned(), 1)]));
    assert_eq!((first.status.s2xx, first.status.s4xx), (3, 1));
    assert_eq!((first.bytes_in, first.bytes_out), (400, 3000));

    let (hours, hour_totals) = store.usage(id, from, to, Granularity::Hour).await.unwrap();
    let summary: Vec<_> = hours.iter().map(|b| (b.start, b.requests, b.allowed)).collect();
    assert_eq!(
        summary,
        [
            (datetime!(2026-03-01 10:00 UTC), 7, 6),
            (datetime!(2026-03-01 11:00 UTC), 6, 4),
            (datetime!(2026-03-02 00:00 UTC), 5, 5)
        ]
    );
    let (days, day_totals) = store.usage(id, from, to, Granularity::Day).await.unwrap();
    let summary: Vec<_> = days.iter().map(|b| (b.start, b.requests, b.allowed)).collect();
    assert_eq!(summary, [(datetime!(2026-03-01 00:00 UTC), 13, 10), (datetime!(2026-03-02 00:00 UTC), 5, 5)]);
    assert_eq!(days[0].denied, BTreeMap::from([("quota_exceeded".to_owned(), 1), ("rate_limited".to_owned(), 2)]));

    for t in [&totals, &hour_totals, &day_totals] {
        assert_eq!(t.start, from);
        assert_eq!((t.requests, t.allowed), (18, 15));
        assert_eq!(t.denied, BTreeMap::from([("quota_exceeded".to_owned(), 1), ("rate_limited".to_owned(), 2)]));
        assert_eq!((t.status.s2xx, t.status.s4xx, t.bytes_in, t.bytes_out), (15, 3, 1800, 15000));
    }

    // [from, to): the bucket at `to` is out, the one at `from` is in.
    let (window, totals) = store
        .usage(id, datetime!(2026-03-01 10:01 UTC), datetime!(2026-03-02 00:00 UTC), Granularity::Minute)
        .await
        .unwrap();
    assert_eq!(window.iter().map(|b| b.requests).collect::<Vec<_>>(), [3, 6]);
    assert_eq!(totals.requests, 9);
    let (none, totals) = store.usage(id, to, from, Granularity::Hour).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(totals.requests, 0);
}

/// Rows of a usage table, read behind the store's back.
async fn count_rows(db: &TestDb, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    if db.url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.expect("SQLite connection");
        sqlx::query_scalar(&sql).fetch_one(&mut conn).await.expect("count rows")
    } else {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("PostgreSQL connection");
        sqlx::query_scalar(&sql).fetch_one(&mut conn).await.expect("count rows")
    }
}

/// `n` records of distinct keys, all in one window ending at `end`.
fn chunk_of_keys(prefix: &str, n: usize, end: OffsetDateTime) -> Vec<UsageRecord> {
    (0..n).map(|i| usage_record(&format!("{prefix}_{i:06}"), end, 1 + (i % 3) as u64, &[("rate_limited", 1)])).collect()
}

async fn gateway_sized_usage_chunks_land_whole_and_a_retried_chunk_counts_once(db: TestDb) {
    let store = &db.store;
    let end = datetime!(2026-03-01 12:00:05 UTC);
    // A window of 12,000 active keys, sent as a gateway sends it: chunks of at most
    // 5,000 records, one sequence each. Some keys exist, so last_used_at is written too.
    let records = chunk_of_keys("key_chunk", 12_000, end);
    let known: Vec<StoredKey> = {
        let mut keys = Vec::new();
        for i in [0usize, 4_999, 5_000, 11_999] {
            let mut new = new_key("metered");
            new.id = format!("key_chunk_{i:06}");
            keys.push(store.create_key(new, "ops").await.unwrap());
        }
        keys
    };
    for (sequence, chunk) in records.chunks(5_000).enumerate() {
        assert!(store.ingest_usage("gw-big", "boot-1", sequence as u64 + 1, chunk).await.unwrap());
    }
    // The middle chunk's answer was lost: the gateway sends it again.
    assert!(!store.ingest_usage("gw-big", "boot-1", 2, &records[5_000..10_000]).await.unwrap());

    let expected_allowed: u64 = records.iter().map(|r| r.allowed).sum();
    let range = (datetime!(2026-03-01 00:00 UTC), datetime!(2026-03-02 00:00 UTC));
    let mut allowed = 0;
    let mut denied = 0;
    for r in records.iter().step_by(997).chain(records.last()) {
        let (_, totals) = store.usage(&r.key_id, range.0, range.1, Granularity::Day).await.unwrap();
        assert_eq!((totals.requests, totals.allowed), (r.requests, r.allowed), "{}", r.key_id);
        assert_eq!(totals.denied, BTreeMap::from([("rate_limited".to_owned(), 1)]), "{}", r.key_id);
    }
    for (key_id, n) in store.allowed_since(range.0).await.unwrap() {
        assert!(key_id.starts_with("key_chunk_"));
        allowed += n;
        denied += 1;
    }
    assert_eq!(allowed, expected_allowed, "every chunk counted exactly once");
    assert_eq!(denied, 12_000, "one row of usage per key");
    assert_eq!(count_rows(&db, "usage_buckets").await, 12_000);
    assert_eq!(count_rows(&db, "usage_denied").await, 12_000);
    assert_eq!(count_rows(&db, "usage_batches").await, 3);
    for key in &known {
        assert_eq!(store.get_key(&key.id).await.unwrap().unwrap().last_used_at, Some(end), "{}", key.id);
    }
}

/// Reference answers of the usage API for `key` over `[from, to)`, one per granularity.
async fn usage_answers(
    store: &Store,
    key: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Vec<(Vec<keygate::control::model::UsageBucket>, keygate::control::model::UsageBucket)> {
    let mut out = Vec::new();
    for granularity in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        out.push(store.usage(key, from, to, granularity).await.unwrap());
    }
    out
}

const DAY_SECS: u64 = 86_400;

/// Minutes kept 7 days, hours 30, days 40.
fn test_retention() -> UsageRetention {
    UsageRetention {
        minute: Duration::from_secs(7 * DAY_SECS),
        hour: Duration::from_secs(30 * DAY_SECS),
        day: Duration::from_secs(40 * DAY_SECS),
    }
}

async fn retention_rolls_up_deletes_and_prunes_keeping_every_kept_total(db: TestDb) {
    let store = &db.store;
    let id = "key_ret";
    // As of `now`: minutes before 02-22 00:00 become hours, hours before 01-30 become
    // days, days before 01-20 are deleted.
    let now = datetime!(2026-03-01 00:30 UTC);
    let records = [
        usage_record(id, datetime!(2026-01-10 12:00:10 UTC), 1, &[]),
        usage_record(id, datetime!(2026-01-19 23:59:30 UTC), 2, &[("rate_limited", 9)]),
        usage_record(id, datetime!(2026-01-20 00:00:30 UTC), 3, &[]),
        usage_record(id, datetime!(2026-01-25 10:00:05 UTC), 4, &[("rate_limited", 1)]),
        usage_record(id, datetime!(2026-01-25 10:59:00 UTC), 5, &[]),
        usage_record(id, datetime!(2026-01-25 13:30:00 UTC), 6, &[("quota_exceeded", 2)]),
        usage_record(id, datetime!(2026-02-20 10:15:00 UTC), 7, &[("rate_limited", 3)]),
        usage_record(id, datetime!(2026-02-20 10:45:00 UTC), 8, &[]),
        usage_record(id, datetime!(2026-02-21 23:59:59 UTC), 9, &[]),
        usage_record(id, datetime!(2026-02-22 00:10:00 UTC), 10, &[]),
        usage_record(id, datetime!(2026-02-28 12:34:56 UTC), 11, &[("ip_not_allowed", 1)]),
        usage_record("key_ret_other", datetime!(2026-02-20 10:15:00 UTC), 100, &[]),
        usage_record("key_ret_other", datetime!(2026-02-20 10:45:00 UTC), 100, &[]),
    ];
    let received = OffsetDateTime::now_utc();
    assert!(store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap());
    assert_eq!(count_rows(&db, "usage_buckets").await, 13);
    let kept = (datetime!(2026-01-20 00:00 UTC), now);
    let minutes_kept = (datetime!(2026-02-22 00:00 UTC), now);
    let hours_kept = (datetime!(2026-01-30 00:00 UTC), now);
    let before = usage_answers(store, id, kept.0, kept.1).await;
    let minutes_before = store.usage(id, minutes_kept.0, minutes_kept.1, Granularity::Minute).await.unwrap();
    let hours_before = store.usage(id, hours_kept.0, hours_kept.1, Granularity::Hour).await.unwrap();
    let other_before = usage_answers(store, "key_ret_other", kept.0, kept.1).await;
    assert_eq!(before[0].1.allowed, 63);

    let done = store.compact_usage(now, &test_retention()).await.unwrap();
    assert_eq!(
        (done.hour_buckets, done.day_buckets, done.deleted_buckets),
        // Hours: a row per key and ten-minute slice of minutes that are not on the hour
        // (01-19 23:59, 01-25 10:59 and 13:30, 02-20 10:15 and 10:45 for both keys, 02-21
        // 23:59). Days: 01-10, 01-19, 01-25 (10:00 and 13:00 in one slice). Deleted: 01-10, 01-19.
        (8, 3, 2),
        "{done:?}"
    );

    // Every granularity answers as before over the range it keeps...
    let after = usage_answers(store, id, kept.0, kept.1).await;
    assert_eq!(after[2], before[2], "days over the kept range");
    assert_eq!(store.usage(id, hours_kept.0, hours_kept.1, Granularity::Hour).await.unwrap(), hours_before);
    assert_eq!(store.usage(id, minutes_kept.0, minutes_kept.1, Granularity::Minute).await.unwrap(), minutes_before);
    // ...and the totals of any granularity over the whole kept range are unchanged.
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.1, b.1);
    }
    let other_after = usage_answers(store, "key_ret_other", kept.0, kept.1).await;
    assert_eq!(other_after[1..], other_before[1..], "hours and days of the other key");
    assert_eq!(other_after[0].1, other_before[0].1);
    // Rolled-up minutes answer as one bucket at the start of their hour.
    let (rolled, _) = store
        .usage(id, datetime!(2026-02-20 00:00 UTC), datetime!(2026-02-21 00:00 UTC), Granularity::Minute)
        .await
        .unwrap();
    let summary: Vec<_> = rolled.iter().map(|b| (b.start, b.allowed, b.denied.clone())).collect();
    assert_eq!(summary, [(datetime!(2026-02-20 10:00 UTC), 15, BTreeMap::from([("rate_limited".to_owned(), 3)]))]);
    // Days before the day retention are gone.
    let (gone, totals) = store.usage(id, datetime!(2026-01-01 00:00 UTC), kept.0, Granularity::Day).await.unwrap();
    assert!(gone.is_empty() && totals.requests == 0, "{gone:?}");
    // Monthly quota seeding reads the rolled-up rows unchanged.
    assert_eq!(store.quota_used(id, datetime!(2026-02-01 00:00 UTC)).await.unwrap(), 45);

    // One row per kept day (01-20, 01-25), hour (02-20 10h, 02-21 23h) and minute (2), for
    // the other key one hour; denials: 01-25 (two codes), 02-20 10h, 02-28.
    assert_eq!(count_rows(&db, "usage_buckets").await, 7);
    assert_eq!(count_rows(&db, "usage_denied").await, 4);

    // Again: nothing left to do, nothing changes.
    assert_eq!(store.compact_usage(now, &test_retention()).await.unwrap(), UsageCompaction::default());
    assert_eq!(usage_answers(store, id, kept.0, kept.1).await, after);
    assert_eq!(count_rows(&db, "usage_buckets").await, 7);

    // Batch ids are kept for the minute retention (at least a week), then forgotten:
    // a retry within that age is recognised, one after it would count again.
    let within = received + time::Duration::days(7) - time::Duration::minutes(1);
    assert_eq!(store.compact_usage(within, &test_retention()).await.unwrap().pruned_batch_ids, 0);
    assert!(!store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap(), "still a duplicate");
    let later = OffsetDateTime::now_utc() + time::Duration::days(7) + time::Duration::minutes(1);
    assert_eq!(store.compact_usage(later, &test_retention()).await.unwrap().pruned_batch_ids, 1);
    assert_eq!(count_rows(&db, "usage_batches").await, 0);
}

async fn late_usage_after_a_rollup_is_folded_in_by_a_later_pass(db: TestDb) {
    let store = &db.store;
    let id = "key_late";
    let now = datetime!(2026-03-01 00:30 UTC);
    let hour = (datetime!(2026-02-20 10:00 UTC), datetime!(2026-02-20 11:00 UTC));
    let first = [usage_record(id, datetime!(2026-02-20 10:15:00 UTC), 7, &[("rate_limited", 3)])];
    assert!(store.ingest_usage("gw-1", "boot", 1, &first).await.unwrap());
    store.compact_usage(now, &test_retention()).await.unwrap();
    // A gateway back from a long outage replays its spool: minutes of an hour already
    // rolled up. They count at once, and the next pass folds them into their hour.
    let late = [
        usage_record(id, datetime!(2026-02-20 10:20:00 UTC), 20, &[("rate_limited", 1)]),
        usage_record(id, datetime!(2026-02-20 10:59:30 UTC), 30, &[]),
    ];
    assert!(store.ingest_usage("gw-2", "boot", 1, &late).await.unwrap());
    let (buckets, totals) = store.usage(id, hour.0, hour.1, Granularity::Hour).await.unwrap();
    assert_eq!((buckets.len(), totals.allowed, totals.denied["rate_limited"]), (1, 57, 4));
    assert_eq!(count_rows(&db, "usage_buckets").await, 3);
    store.compact_usage(now, &test_retention()).await.unwrap();
    assert_eq!(store.usage(id, hour.0, hour.1, Granularity::Hour).await.unwrap(), (buckets.clone(), totals.clone()));
    assert_eq!(count_rows(&db, "usage_buckets").await, 1, "the late minutes are folded into their hour");
    // Once past the hour retention, the day is one day bucket.
    let later = now + time::Duration::days(30);
    store.compact_usage(later, &test_retention()).await.unwrap();
    assert_eq!(count_rows(&db, "usage_buckets").await, 1);
    assert_eq!(count_rows(&db, "usage_denied").await, 1);
    let day = (datetime!(2026-02-20 00:00 UTC), datetime!(2026-02-21 00:00 UTC));
    let (days, day_totals) = store.usage(id, day.0, day.1, Granularity::Day).await.unwrap();
    assert_eq!((days.len(), day_totals.allowed, day_totals.denied["rate_limited"]), (1, 57, 4));
    assert_eq!(days[0].start, day.0);
}

async fn concurrent_compactions_and_uploads_lose_and_double_nothing(db: TestDb) {
    let second = db.reconnect().await;
    let store = &db.store;
    let now = datetime!(2026-03-01 00:30 UTC);
    // 40 keys, a record a minute for six hours, all old enough to be rolled up into hours.
    let start = datetime!(2026-02-10 00:00:30 UTC);
    let uploads: Vec<Vec<UsageRecord>> = (0..36)
        .map(|slice| {
            (0..10)
                .flat_map(|m| {
                    let end = start + time::Duration::minutes(slice * 10 + m);
                    (0..40).map(move |k| usage_record(&format!("key_c{k:02}"), end, 1, &[("rate_limited", 1)]))
                })
                .collect()
        })
        .collect();
    let expected: u64 = uploads.iter().flatten().map(|r| r.allowed).sum();
    // Half the uploads are in before the first compaction; the rest race with two compactors.
    for (i, upload) in uploads[..18].iter().enumerate() {
        assert!(store.ingest_usage("gw-1", "boot", i as u64, upload).await.unwrap());
    }
    let uploader = {
        let store = second.clone();
        let rest = uploads[18..].to_vec();
        tokio::spawn(async move {
            for (i, upload) in rest.iter().enumerate() {
                assert!(store.ingest_usage("gw-1", "boot", 18 + i as u64, upload).await.unwrap());
            }
        })
    };
    let compactor = |store: Store| async move {
        for _ in 0..5 {
            store.compact_usage(now, &test_retention()).await.unwrap();
        }
    };
    let (a, b) = tokio::join!(tokio::spawn(compactor(store.clone())), tokio::spawn(compactor(second.clone())));
    a.unwrap();
    b.unwrap();
    uploader.await.unwrap();
    store.compact_usage(now, &test_retention()).await.unwrap();
    let range = (datetime!(2026-02-10 00:00 UTC), datetime!(2026-02-11 00:00 UTC));
    let mut allowed = 0;
    for k in 0..40 {
        let (hours, totals) = store.usage(&format!("key_c{k:02}"), range.0, range.1, Granularity::Hour).await.unwrap();
        assert_eq!(hours.len(), 6);
        assert_eq!(totals.denied["rate_limited"], totals.allowed);
        allowed += totals.allowed;
    }
    assert_eq!(allowed, expected);
    assert_eq!(count_rows(&db, "usage_buckets").await, 40 * 6, "every minute folded into its hour");
}

async fn quota_used_counts_allowed_requests_since(db: TestDb) {
    let store = &db.store;
    let id = "key_quota";
    assert_eq!(store.quota_used(id, datetime!(2026-03-01 00:00 UTC)).await.unwrap(), 0);
    let records = [
        usage_record(id, datetime!(2026-02-28 23:59:30 UTC), 7, &[]),
        usage_record(id, datetime!(2026-03-01 00:00:05 UTC), 3, &[("rate_limited", 4), ("quota_exceeded", 1)]),
        usage_record(id, datetime!(2026-03-15 08:00:00 UTC), 2, &[("ip_not_allowed", 1)]),
    ];
    assert!(store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap());
    assert_eq!(store.quota_used(id, datetime!(2026-03-01 00:00 UTC)).await.unwrap(), 5);
    assert_eq!(store.quota_used(id, datetime!(2026-02-01 00:00 UTC)).await.unwrap(), 12);
    assert_eq!(store.quota_used(id, datetime!(2026-03-16 00:00 UTC)).await.unwrap(), 0);
    assert_eq!(store.quota_used("key_other", datetime!(2026-01-01 00:00 UTC)).await.unwrap(), 0);
}

async fn audit_is_newest_first_with_actor_names(db: TestDb) {
    let store = &db.store;
    let a = new_key("a");
    let b = new_key("b");
    store.create_key(a.clone(), "alice").await.unwrap();
    store.create_key(b.clone(), "bob").await.unwrap();
    store.update_key(&a.id, KeyPatch { plan: Some(Some("pro".into())), ..Default::default() }, "bob").await.unwrap();
    store.revoke_key(&b.id, "carol").await.unwrap();
    store.delete_key(&a.id, "alice").await.unwrap();

    let events = store.audit(None, None, 100).await.unwrap();
    let trail: Vec<_> = events.iter().map(|e| (e.action.as_str(), e.actor.as_str(), e.key_id.clone())).collect();
    assert_eq!(
        trail,
        [
            ("key.delete", "alice", Some(a.id.clone())),
            ("key.revoke", "carol", Some(b.id.clone())),
            ("key.update", "bob", Some(a.id.clone())),
            ("key.create", "bob", Some(b.id.clone())),
            ("key.create", "alice", Some(a.id.clone())),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id > w[1].id && w[0].at >= w[1].at));
    assert_eq!(events[2].details, json!({"fields": ["plan"]}));
    // The raw key never reaches the audit log; the hash does not either.
    assert!(events.iter().all(|e| !e.details.to_string().contains(&a.hash[7..])));

    let only_b: Vec<_> = store.audit(Some(&b.id), None, 100).await.unwrap().into_iter().map(|e| e.action).collect();
    assert_eq!(only_b, ["key.revoke", "key.create"]);
    assert_eq!(store.audit(None, None, 2).await.unwrap().len(), 2);
    assert!(matches!(store.audit(None, None, 0).await, Err(StoreError::Invalid(_))));
    let by_bob: Vec<_> = store.audit(None, Some("bob"), 100).await.unwrap().into_iter().map(|e| e.action).collect();
    assert_eq!(by_bob, ["key.update", "key.create"]);
    assert_eq!(store.audit(Some(&a.id), Some("bob"), 100).await.unwrap().len(), 1);
}

async fn every_key_change_is_one_event_in_commit_order_with_the_record_and_never_the_hash(db: TestDb) {
    let store = &db.store;
    let before = store.latest_event_id().await.unwrap();
    let a = store.create_key(new_key("a"), "ops").await.unwrap();
    store.update_key(&a.id, KeyPatch { plan: Some(Some("pro".into())), ..Default::default() }, "ops").await.unwrap();
    let disable = KeyPatch { status: Some(KeyStatusText::Disabled), ..Default::default() };
    store.update_key(&a.id, disable, "ops").await.unwrap();
    let enable = KeyPatch { status: Some(KeyStatusText::Active), ..Default::default() };
    store.update_key(&a.id, enable, "ops").await.unwrap();
    let successor = new_key("a2");
    store.rotate_key(&a.id, successor.clone(), Duration::from_secs(60), "ops").await.unwrap();
    store.revoke_key(&a.id, "ops").await.unwrap();
    store.delete_key(&successor.id, "ops").await.unwrap();
    // A change that changes nothing is no event.
    store.update_key(&a.id, KeyPatch::default(), "ops").await.ok();

    let events = store.events_after(before, 100).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| (e.kind.as_str(), e.key_id.clone().unwrap_or_default())).collect();
    assert_eq!(
        kinds,
        [
            ("key.created", a.id.clone()),
            ("key.updated", a.id.clone()),
            ("key.disabled", a.id.clone()),
            ("key.updated", a.id.clone()),
            ("key.rotated", a.id.clone()),
            ("key.revoked", a.id.clone()),
            ("key.deleted", successor.id.clone()),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(store.latest_event_id().await.unwrap(), events.last().unwrap().id);
    assert_eq!(events[1].data["fields"], json!(["plan"]));
    assert_eq!(events[2].data["key"]["status"], "disabled");
    assert_eq!(events[4].data["successor"]["id"], successor.id.as_str());
    assert_eq!(events[5].data["key"]["status"], "revoked");
    assert_eq!(events[6].data["key"]["name"], "a2", "a deleted key's event carries its last record");
    for event in &events {
        let text = event.data.to_string();
        assert!(!text.contains(&a.hash[7..]) && !text.contains(&successor.hash[7..]), "{text}");
        assert!(event.data["key"].get("hash").is_none() && event.data["key"].get("version").is_none());
        assert_eq!(event.body()["type"], event.kind.as_str());
    }
    // Resuming after an event gives exactly the ones after it.
    let rest = store.events_after(events[3].id, 100).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), events[4..].iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(store.events_after(events[0].id, 2).await.unwrap().len(), 2);
}

async fn old_events_are_forgotten_once_every_webhook_receiver_has_passed_them(db: TestDb) {
    let store = &db.store;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::DAY;
    let a = store.create_key(new_key("a"), "ops").await.unwrap();
    // A receiver seen now starts after the first event, with a lease for 40 days.
    let cursor =
        store.webhook_lease("https://h/x", "cp-1", now, Duration::from_secs(40 * 86_400)).await.unwrap().unwrap();
    assert_eq!(cursor.delivered_through, store.latest_event_id().await.unwrap());
    assert_eq!(
        store.webhook_lease("https://h/x", "cp-2", now, Duration::from_secs(86_400)).await.unwrap(),
        None,
        "leased to cp-1"
    );
    store.revoke_key(&a.id, "ops").await.unwrap();
    store.delete_key(&a.id, "ops").await.unwrap();
    let all = store.events_after(0, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(store.append_event_once(("test", "s", now - 70 * day), "key.expiring", None, &json!({})).await.unwrap());
    assert!(!store.append_event_once(("test", "s", now - 70 * day), "key.expiring", None, &json!({})).await.unwrap());

    // Nothing is old yet.
    assert_eq!(store.prune_event_log(now).await.unwrap(), 0);
    // 31 days on, the receiver still holds every event after its place.
    assert_eq!(store.prune_event_log(now + 31 * day).await.unwrap(), 1);
    assert_eq!(store.events_after(0, 100).await.unwrap()[0].id, all[1].id);
    let through = store.latest_event_id().await.unwrap();
    let moved = keygate::control::store::WebhookCursor { delivered_through: through, failing_since: None };
    assert!(store.webhook_advance("https://h/x", "cp-1", moved).await.unwrap());
    assert!(!store.webhook_advance("https://h/x", "cp-2", moved).await.unwrap(), "cp-2 holds no lease");
    assert_eq!(store.prune_event_log(now + 31 * day).await.unwrap(), 3);
    // The once-only mark of a period long over is gone: the event could be sent again.
    assert!(store.append_event_once(("test", "s", now - 70 * day), "key.expiring", None, &json!({})).await.unwrap());
}

async fn keys_sorted_by_last_use_page_through_every_key_once(db: TestDb) {
    let store = &db.store;
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(store.create_key(new_key(&format!("k{i}")), "ops").await.unwrap());
    }
    let now = OffsetDateTime::now_utc();
    // k3 used last, then k0, then k5 and k6 at the same moment (ties broken by id); the rest never.
    let uses = [(3, 30), (0, 20), (5, 10), (6, 10)];
    let records: Vec<_> = uses
        .iter()
        .map(|(i, secs)| usage_record(&made[*i].id, now - time::Duration::seconds(60 - secs), 1, &[]))
        .collect();
    assert!(store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap());
    let filter = KeyFilter { order: KeyOrder::LastUsed, ..Default::default() };
    let pages = all_pages(store, &filter, 2).await;
    let order: Vec<StoredKey> = pages.into_iter().flatten().collect();
    let mut tied = [made[5].id.clone(), made[6].id.clone()];
    tied.sort();
    tied.reverse();
    assert_eq!(ids(&order[..4]), [made[3].id.clone(), made[0].id.clone(), tied[0].clone(), tied[1].clone()]);
    let mut never: Vec<_> = [1, 2, 4].iter().map(|i| made[*i].id.clone()).collect();
    never.sort();
    never.reverse();
    assert_eq!(ids(&order[4..]), never, "keys never used come last, by id");
    assert!(order[4..].iter().all(|k| k.last_used_at.is_none()));
    // Filters hold in this order too.
    store
        .update_key(&made[0].id, KeyPatch { plan: Some(Some("pro".into())), ..Default::default() }, "ops")
        .await
        .unwrap();
    let pro = KeyFilter { plan: Some("pro".into()), order: KeyOrder::LastUsed, ..Default::default() };
    assert_eq!(ids(&all_pages(store, &pro, 1).await.concat()), [made[0].id.clone()]);
    // A cursor of one order is refused by the other.
    let (_, next) = store.list_keys(&filter, 1, None).await.unwrap();
    let created = KeyFilter::default();
    assert!(matches!(store.list_keys(&created, 1, next.as_deref()).await, Err(StoreError::Invalid(_))));
}

async fn usage_of_a_minute_lists_the_busiest_keys_with_their_denials(db: TestDb) {
    let store = &db.store;
    let end = OffsetDateTime::now_utc().replace_second(30).unwrap().replace_nanosecond(0).unwrap();
    let records = [
        usage_record("key_busy", end, 9, &[("rate_limited", 3)]),
        usage_record("key_quiet", end, 1, &[]),
        usage_record("key_other_minute", end - time::Duration::minutes(2), 50, &[]),
    ];
    assert!(store.ingest_usage("gw-1", "boot", 1, &records).await.unwrap());
    let minute = end.replace_second(0).unwrap();
    let ticks = store.usage_of_minute(minute, 10).await.unwrap();
    assert_eq!(ticks.iter().map(|t| t.key_id.as_str()).collect::<Vec<_>>(), ["key_busy", "key_quiet"]);
    assert_eq!((ticks[0].requests, ticks[0].allowed, ticks[0].denied["rate_limited"]), (12, 9, 3));
    assert_eq!(ticks[0].status.s2xx, 9);
    assert_eq!(store.usage_of_minute(minute, 1).await.unwrap().len(), 1);
}

async fn migrations_run_again_on_reconnect_and_data_survives(db: TestDb) {
    let k = db.store.create_key(new_key("durable"), "ops").await.unwrap();
    db.store.close().await;
    let again = db.reconnect().await;
    let third = db.reconnect().await;
    assert_eq!(again.get_key(&k.id).await.unwrap(), Some(k.clone()));
    assert_eq!(third.changes_since(0, 10).await.unwrap().1, k.version);
    again.close().await;
    third.close().await;
}

// ---- bulk import ----

/// A record of an imported key, as the import's line parser makes it.
fn import_record(line: u64, id: Option<&str>, raw: &str) -> ImportKey {
    let hash = KeyDigest::of(raw).to_string();
    ImportKey {
        line,
        id: id.map_or_else(|| key_id_from_hash(&hash), str::to_owned),
        hash,
        prefix: None,
        masked: None,
        name: format!("imported {line}"),
        owner: Some("legacy".into()),
        plan: None,
        scopes: vec!["orders:read".into()],
        ip_allowlist: vec![],
        rate_limit: None,
        quota: None,
        status: KeyStatusText::Active,
        expires_at: None,
        metadata: serde_json::Map::new(),
        tags: vec![],
        created_at: Some(datetime!(2019-05-01 12:00 UTC)),
    }
}

/// `n` records on lines `first..`, with foreign-shaped raw keys `<tag>-<i>`.
fn import_records(tag: &str, first: u64, n: u64) -> Vec<ImportKey> {
    (0..n).map(|i| import_record(first + i, None, &format!("{tag}-{i}"))).collect()
}

/// Imports `batches` in one import, as the admin API does with one request.
async fn import(store: &Store, batches: Vec<Vec<ImportKey>>) -> Vec<BatchOutcome> {
    let mut import = store.begin_import().await.expect("begin_import");
    let mut outcomes = Vec::new();
    for batch in batches {
        outcomes.push(import.write_batch(batch, "ops").await.expect("write_batch"));
    }
    import.finish().await.expect("finish");
    outcomes
}

fn error_lines(outcome: &BatchOutcome) -> Vec<u64> {
    outcome.errors.iter().map(|(line, _)| *line).collect()
}

async fn import_is_idempotent_and_updates_changed_keys(db: TestDb) {
    let store = &db.store;
    let records = import_records("sk_live", 1, 5);
    let first = import(store, vec![records.clone()]).await;
    assert_eq!((first[0].imported, first[0].unchanged, first[0].errors.len()), (5, 0, 0));
    let version = first[0].version.expect("a batch that writes has a version");
    let stored = store.get_key(&records[0].id).await.unwrap().expect("imported key");
    assert!(stored.imported);
    assert_eq!(stored.version, version);
    assert_eq!(stored.created_at, datetime!(2019-05-01 12:00 UTC));
    assert_eq!((stored.prefix.as_str(), stored.masked.as_str()), ("", "…"));
    let (_, latest) = all_changes(store).await;
    let events = store.audit(None, None, 100).await.unwrap().len();

    // The same file again: nothing is written, no version, no audit event.
    let again = import(store, vec![records.clone()]).await;
    assert_eq!(again[0], BatchOutcome { imported: 0, unchanged: 5, errors: vec![], version: None });
    assert_eq!(all_changes(store).await.1, latest);
    assert_eq!(store.audit(None, None, 100).await.unwrap().len(), events);
    assert_eq!(store.get_key(&records[0].id).await.unwrap(), Some(stored.clone()));

    // One changed field: that key is rewritten, the others are unchanged.
    let mut changed = records.clone();
    changed[2].plan = Some("pro".into());
    let third = import(store, vec![changed.clone()]).await;
    assert_eq!((third[0].imported, third[0].unchanged), (1, 4));
    let updated = store.get_key(&changed[2].id).await.unwrap().unwrap();
    assert_eq!(updated.plan.as_deref(), Some("pro"));
    assert_eq!(updated.version, third[0].version.unwrap());
    assert!(updated.imported && updated.created_at == stored.created_at);
}

async fn import_refuses_conflicting_and_repeated_lines_by_line(db: TestDb) {
    let store = &db.store;
    let native = store.create_key(new_key("native"), "ops").await.unwrap();
    let revoked = import(
        store,
        vec![vec![ImportKey { status: KeyStatusText::Revoked, ..import_record(1, Some("key_gone"), "gone") }]],
    )
    .await;
    assert_eq!(revoked[0].imported, 1);

    let mut with_native_hash = import_record(3, Some("key_thief"), "unused");
    with_native_hash.hash = native.hash.clone();
    let first_batch = vec![
        import_record(1, Some("key_ok1"), "ok-1"),
        // The native key's id with another hash.
        import_record(2, Some(&native.id), "other"),
        // The native key's hash under another id.
        with_native_hash,
        // A revoked key cannot come back.
        import_record(4, Some("key_gone"), "gone"),
        // Repeats an id and a hash given earlier in this batch.
        import_record(5, Some("key_ok1"), "ok-5"),
        import_record(6, Some("key_ok6"), "ok-1"),
        import_record(7, Some("key_ok7"), "ok-7"),
    ];
    // Repeats of lines from the first batch, caught in the next one.
    let second_batch = vec![import_record(8, Some("key_ok7"), "ok-8"), import_record(9, Some("key_ok9"), "ok-7")];
    let outcomes = import(store, vec![first_batch, second_batch]).await;
    assert_eq!(error_lines(&outcomes[0]), [2, 3, 4, 5, 6]);
    assert_eq!(outcomes[0].imported, 2);
    let messages: Vec<&str> = outcomes[0].errors.iter().map(|(_, m)| m.as_str()).collect();
    assert!(messages[0].starts_with("id: "), "{messages:?}");
    assert_eq!(messages[1], format!("hash: already belongs to key {}", native.id));
    assert!(messages[2].starts_with("status: key_gone is revoked"), "{messages:?}");
    assert_eq!(messages[3], "id: key_ok1 is already given on line 1");
    assert_eq!(messages[4], "hash: already given on line 1");
    assert_eq!(error_lines(&outcomes[1]), [8, 9]);
    assert_eq!(outcomes[1].errors[0].1, "id: key_ok7 is already given on line 7");
    assert_eq!(outcomes[1].errors[1].1, "hash: already given on line 7");
    assert_eq!(outcomes[1].version, None);
    // Nothing refused was written; the native key is untouched.
    assert_eq!(store.get_key(&native.id).await.unwrap(), Some(native));
    assert!(store.get_key("key_thief").await.unwrap().is_none());
    assert_eq!(store.get_key("key_gone").await.unwrap().unwrap().status, KeyStatusText::Revoked);

    // A new import starts afresh: lines of an earlier import are not repeats.
    let rerun = import(store, vec![vec![import_record(1, Some("key_ok1"), "ok-1")]]).await;
    assert_eq!((rerun[0].unchanged, rerun[0].errors.len()), (1, 0));
}

async fn an_import_batch_is_one_feed_row_that_expands_into_its_keys(db: TestDb) {
    let store = &db.store;
    let before = store.create_key(new_key("before"), "ops").await.unwrap();
    let outcome = import(store, vec![import_records("kong", 10, 5)]).await;
    let version = outcome[0].version.unwrap();
    let after = store.create_key(new_key("after"), "ops").await.unwrap();
    assert_eq!((before.version + 1, version + 1), (version, after.version), "one version for the batch");

    let (changes, latest) = all_changes(store).await;
    assert_eq!(latest, after.version);
    assert_eq!(changes.len(), 7);
    assert_eq!(versions(&changes), [before.version, version, version, version, version, version, after.version]);
    let mut imported: Vec<String> = changes[1..6]
        .iter()
        .map(|c| match &c.change {
            KeyChange::Upsert(key) if key.imported && key.version == version => key.id.clone(),
            other => panic!("not an imported upsert: {other:?}"),
        })
        .collect();
    imported.sort();
    let mut expected: Vec<String> = import_records("kong", 10, 5).into_iter().map(|r| r.id).collect();
    expected.sort();
    assert_eq!(imported, expected);

    // One audit event for the batch, about no single key.
    let events = store.audit(None, None, 100).await.unwrap();
    let imports: Vec<_> = events.iter().filter(|e| e.action == "key.import").collect();
    assert_eq!(imports.len(), 1);
    assert_eq!(imports[0].key_id, None);
    assert_eq!(imports[0].actor, "ops");
    assert_eq!(imports[0].details["count"], 5);
    assert_eq!(
        (imports[0].details["first_line"].clone(), imports[0].details["last_line"].clone()),
        (json!(10), json!(14))
    );
    assert_eq!(store.latest_version().await.unwrap(), latest);
}

async fn feed_pages_never_split_an_import_version(db: TestDb) {
    let store = &db.store;
    let a = store.create_key(new_key("a"), "ops").await.unwrap();
    let v1 = import(store, vec![import_records("one", 1, 4)]).await[0].version.unwrap();
    let v2 = import(store, vec![import_records("two", 1, 3)]).await[0].version.unwrap();
    let b = store.create_key(new_key("b"), "ops").await.unwrap();

    // Rows are taken whole until the page holds `limit` changes.
    let page = |since, limit| async move { store.changes_since(since, limit).await.unwrap().0 };
    assert_eq!(versions(&page(0, 1).await), [a.version]);
    assert_eq!(versions(&page(0, 2).await), [a.version, v1, v1, v1, v1]);
    assert_eq!(versions(&page(a.version, 1).await), [v1, v1, v1, v1]);
    assert_eq!(versions(&page(a.version, 5).await), [v1, v1, v1, v1, v2, v2, v2]);
    assert_eq!(versions(&page(v1, 3).await), [v2, v2, v2]);
    assert_eq!(versions(&page(v1, 4).await), [v2, v2, v2, b.version]);

    // Following the feed a page at a time sees every change once, whatever the page size.
    let (all, latest) = all_changes(store).await;
    for limit in 1..=8 {
        let mut followed = Vec::new();
        let mut at = 0;
        while at < latest {
            let changes = page(at, limit).await;
            let last = changes.last().expect("a page before the end is not empty").version;
            assert!(changes.iter().all(|c| c.version > at));
            followed.extend(changes);
            at = last;
        }
        assert_eq!(followed, all, "pages of {limit}");
    }
}

async fn a_key_changed_after_import_comes_with_its_later_version(db: TestDb) {
    let store = &db.store;
    let records = import_records("stripe", 1, 3);
    let v = import(store, vec![records.clone()]).await[0].version.unwrap();
    let updated = store
        .update_key(&records[0].id, KeyPatch { status: Some(KeyStatusText::Disabled), ..Default::default() }, "ops")
        .await
        .unwrap();
    store.delete_key(&records[1].id, "ops").await.unwrap();
    let (changes, latest) = all_changes(store).await;
    assert_eq!(changes.len(), 3);
    assert_eq!(
        changes[0],
        Change { version: v, change: KeyChange::Upsert(store.get_key(&records[2].id).await.unwrap().unwrap()) }
    );
    assert_eq!(changes[1], Change { version: updated.version, change: KeyChange::Upsert(updated.clone()) });
    assert_eq!(
        changes[2],
        Change {
            version: latest,
            change: KeyChange::Delete { id: records[1].id.clone(), hash: records[1].hash.clone() }
        }
    );
    assert!(updated.imported, "an update keeps the key's imported flag");

    // An import row whose keys all changed since expands to nothing; a reader is carried past it.
    let solo = import_records("solo", 1, 1);
    let w = import(store, vec![solo.clone()]).await[0].version.unwrap();
    let renamed = store
        .update_key(&solo[0].id, KeyPatch { name: Some("renamed".into()), ..Default::default() }, "ops")
        .await
        .unwrap();
    let (page, _) = store.changes_since(w - 1, 1).await.unwrap();
    assert_eq!(page, [Change { version: renamed.version, change: KeyChange::Upsert(renamed) }]);
}

async fn an_import_that_stops_midway_keeps_its_batches_and_leaves_no_trace(db: TestDb) {
    let store = &db.store;
    let records = import_records("partial", 1, 3);
    let mut broken = store.begin_import().await.unwrap();
    broken.write_batch(records[..2].to_vec(), "ops").await.unwrap();
    drop(broken);
    assert!(store.get_key(&records[1].id).await.unwrap().is_some(), "a committed batch stays");
    // The whole file again: the lines of the unfinished import are not repeats.
    let rerun = import(store, vec![records.clone()]).await;
    assert_eq!((rerun[0].imported, rerun[0].unchanged, rerun[0].errors.len()), (1, 2, 0));
    // The store keeps working with its other connections.
    assert_eq!(store.list_keys(&KeyFilter::default(), 10, None).await.unwrap().0.len(), 3);
}

// ---- single-backend cases ----

#[tokio::test]
async fn in_memory_sqlite_keeps_its_data_across_calls() {
    let store = Store::connect("sqlite::memory:").await.expect("memory store");
    let k = store.create_key(new_key("mem"), "ops").await.unwrap();
    for _ in 0..3 {
        assert_eq!(store.get_key(&k.id).await.unwrap(), Some(k.clone()));
    }
    assert_eq!(store.snapshot().await.unwrap(), (k.version, vec![k]));
}

/// The SQLite search index finds rows by rowid: VACUUM must leave them in place.
#[tokio::test]
async fn sqlite_search_finds_keys_after_vacuum() {
    let db = TestDb::sqlite().await;
    let mut kept = Vec::new();
    for i in 0..12 {
        let key = db.store.create_key(new_key(&format!("vacuumed service {i:02}")), "ops").await.unwrap();
        if i % 3 == 0 {
            db.store.delete_key(&key.id, "ops").await.unwrap();
        } else {
            kept.push(key);
        }
    }
    let mut conn = sqlx::SqliteConnection::connect(&db.url).await.expect("SQLite connection");
    sqlx::query("VACUUM").execute(&mut conn).await.expect("VACUUM");
    conn.close().await.unwrap();
    kept.push(db.store.create_key(new_key("vacuumed service 99"), "ops").await.unwrap());
    for key in &kept {
        for needle in [key.name.clone(), key.id[4..12].to_owned()] {
            let filter = KeyFilter { q: Some(needle.clone()), ..Default::default() };
            let (found, _) = db.store.list_keys(&filter, 100, None).await.unwrap();
            assert_eq!(ids(&found), [key.id.as_str()], "q={needle:?}");
        }
    }
}

/// Keys written before migration 0003 are in its tag table and search index.
async fn listing_indexes_cover_keys_written_before_them(url: &str, dialect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let init = format!("migrations/{dialect}/0001_init.sql");
    std::fs::copy(&init, dir.path().join("0001_init.sql")).expect("copy the first migration");
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.expect("read the first migration");
    let insert = "INSERT INTO keys (id, hash, prefix, masked, name, owner, status, tags, created_at, updated_at, \
                  version) VALUES ($1, $2, 'kg_live', 'kg_live_Ab3d…x9Zq', $3, 'acme', 'active', $4, $5, $5, 1)";
    let rows = [("key_old1", "Legacy Billing", r#"["prod","eu"]"#), ("key_old2", "legacy reports", "[]")];
    let hash = |i: usize| format!("sha256:{}", i.to_string().repeat(64));
    if dialect == "sqlite" {
        let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc")).await.unwrap();
        migrator.run(&pool).await.expect("first migration");
        for (i, (id, name, tags)) in rows.iter().enumerate() {
            let q = sqlx::query(insert).bind(id).bind(hash(i)).bind(name).bind(tags).bind(1_700_000_000_000 + i as i64);
            q.execute(&pool).await.unwrap();
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        migrator.run(&pool).await.expect("first migration");
        for (i, (id, name, tags)) in rows.iter().enumerate() {
            let q = sqlx::query(insert).bind(id).bind(hash(i)).bind(name).bind(tags).bind(1_700_000_000_000 + i as i64);
            q.execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = Store::connect(url).await.expect("later migrations");
    let list = |filter: KeyFilter| {
        let store = store.clone();
        async move { ids(&store.list_keys(&filter, 100, None).await.expect("list").0) }
    };
    assert_eq!(list(KeyFilter { tag: Some("eu".into()), ..Default::default() }).await, ["key_old1"]);
    assert_eq!(list(KeyFilter { q: Some("BILLING".into()), ..Default::default() }).await, ["key_old1"]);
    assert_eq!(list(KeyFilter { q: Some("legacy".into()), ..Default::default() }).await, ["key_old2", "key_old1"]);
    assert_eq!(list(KeyFilter { owner: Some("acme".into()), ..Default::default() }).await, ["key_old2", "key_old1"]);
    store.close().await;
}

mod listing_indexes_cover_keys_written_before_them {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/keygate.db", dir.path().display());
        super::listing_indexes_cover_keys_written_before_them(&url, "sqlite").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let pg = super::PgDatabase::create().await;
        super::listing_indexes_cover_keys_written_before_them(&pg.url, "postgres").await;
    }
}

#[tokio::test]
async fn in_memory_sqlite_imports_on_its_one_connection_and_keeps_the_data() {
    let store = Store::connect("sqlite::memory:").await.expect("memory store");
    let records = import_records("mem", 1, 2);
    let mut unfinished = store.begin_import().await.unwrap();
    unfinished.write_batch(records.clone(), "ops").await.unwrap();
    drop(unfinished);
    let again = import(&store, vec![records.clone()]).await;
    assert_eq!((again[0].imported, again[0].unchanged), (0, 2));
    assert_eq!(store.snapshot().await.unwrap().1.len(), 2);
}

#[tokio::test]
async fn unknown_store_url_is_refused() {
    assert!(matches!(Store::connect("mysql://localhost/db").await, Err(StoreError::Invalid(_))));
}

#[test]
fn postgres_test_url_gets_the_test_database() {
    assert_eq!(with_database(DEFAULT_PG_URL, "x"), "postgres://postgres@127.0.0.1:5432/x");
    assert_eq!(with_database("postgresql://u:p@h/db?sslmode=disable", "x"), "postgresql://u:p@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://h:5432", "x"), "postgres://h:5432/x");
}

/// The admin API runs store calls inside axum handlers, which need `Send` futures.
#[allow(dead_code)]
fn store_futures_are_send(store: &Store) {
    fn send<T: Send>(_: T) {}
    send(store.create_key(new_key("x"), "ops"));
    send(store.list_keys(&KeyFilter::default(), 10, None));
    send(store.update_key("id", KeyPatch::default(), "ops"));
    send(store.rotate_key("id", new_key("x"), Duration::ZERO, "ops"));
    send(store.changes_since(0, 10));
    send(store.begin_import());
    send(store.snapshot());
    send(store.ingest_usage("n", "b", 1, &[]));
    send(store.usage("id", OffsetDateTime::UNIX_EPOCH, OffsetDateTime::UNIX_EPOCH, Granularity::Hour));
}

/// A large import leaves PostgreSQL's statistics current: the listing's plans
/// depend on them, and autovacuum may be late or off (it is off on the machines
/// these tests run on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_import_refreshes_postgresql_statistics() {
    let db = TestDb::postgres().await;
    let analyzed = || async {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let n: i64 = sqlx::query_scalar("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'keys'")
            .fetch_one(&mut conn)
            .await
            .expect("pg_stat_user_tables");
        let _ = conn.close().await;
        n
    };
    let before = analyzed().await;
    let records = import_records("bulk", 1, 10_000);
    import(&db.store, records.chunks(1000).map(<[ImportKey]>::to_vec).collect()).await;
    // The statistics views are updated a moment after the transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while analyzed().await <= before {
        assert!(std::time::Instant::now() < deadline, "no ANALYZE of keys after importing 10,000 keys");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The control plane's fleet engine (`fleet_limits: { engine: control_plane }`)
/// answers each op as Redis answers the engine's commands: `INCRBY` + `PEXPIRE`,
/// `GET`, `ZADD GT` + expiry, `ZSCORE`; an expired counter is absent.
async fn fleet_counters_answer_as_redis_would(db: TestDb) {
    use keygate::limit::fleet::Op;
    let store = &db.store;
    let hour = Duration::from_secs(3600);
    let add = |key: &str, by: u64, ttl: Duration| Op::Add { key: key.into(), by, ttl };
    let read = |key: &str| Op::Read { key: key.into() };
    let far = 4_000_000_000_000u64;
    let answers = store
        .fleet_exchange(&[
            read("r"),
            add("r", 3, hour),
            add("r", 4, hour),
            read("r"),
            Op::ReadMark { key: "t".into() },
            Op::Raise { key: "t".into(), to: 50, until: far },
            Op::Raise { key: "t".into(), to: 40, until: far },
            Op::ReadMark { key: "t".into() },
            add("gone", 5, Duration::ZERO),
        ])
        .await
        .unwrap();
    assert_eq!(answers, vec![None, Some(3), Some(7), Some(7), None, None, None, Some(50), Some(5)]);
    // Expired (ttl 0): absent, and an add starts it again.
    let answers = store.fleet_exchange(&[read("gone"), add("gone", 2, hour), read("r")]).await.unwrap();
    assert_eq!(answers, vec![None, Some(2), Some(7)]);
    assert!(store.fleet_exchange(&[]).await.unwrap().is_empty());
    store.fleet_exchange(&[add("short", 1, Duration::ZERO)]).await.unwrap();
    assert!(store.sweep_fleet_counters().await.unwrap() >= 1, "the expired counters are swept");
    assert_eq!(store.fleet_exchange(&[read("r")]).await.unwrap(), vec![Some(7)], "live counters stay");
}
