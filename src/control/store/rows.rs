//! Rows and the model: conversions, the listing cursor and search patterns, usage sums.

use super::*;

// ---- conversions between rows and the model ----

/// Unix milliseconds, rounded down.
pub(super) fn to_ms(t: OffsetDateTime) -> i64 {
    // OffsetDateTime spans ±9999 years, well inside i64 milliseconds.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

pub(super) fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(corrupt)
}

pub(super) fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

/// A stored value the store cannot read back (a bug or a hand-edited database).
pub(super) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(format!("unreadable stored value: {e}").into()))
}

pub(super) fn to_u64(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(corrupt)
}

pub(super) fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("count {n} is too large")))
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

pub(super) fn unjson<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(corrupt)
}

/// Maps a unique-constraint violation (a concurrent writer won a race) to `Conflict`.
pub(super) fn conflict_on_unique(e: sqlx::Error, message: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message.into()),
        _ => StoreError::Database(e),
    }
}

/// One row of `keys`, as stored: what a gateway needs, and the rest.
#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    #[sqlx(flatten)]
    pub(super) served: GatewayKeyRow,
    pub(super) prefix: String,
    pub(super) masked: String,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) last_used_at: Option<i64>,
    pub(super) version: i64,
}

impl KeyRow {
    pub(super) fn into_key(self) -> Result<StoredKey> {
        let GatewayKeyRow {
            id,
            hash,
            name,
            owner,
            plan,
            scopes,
            ip_allowlist,
            rate_limit,
            quota,
            status,
            expires_at,
            metadata,
            tags,
            imported,
        } = self.served;
        Ok(StoredKey {
            status: KeyStatusText::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?,
            scopes: unjson(&scopes)?,
            ip_allowlist: unjson(&ip_allowlist)?,
            rate_limit: rate_limit.as_deref().map(unjson::<RateLimitConfig>).transpose()?,
            quota: quota.as_deref().map(unjson::<QuotaConfig>).transpose()?,
            expires_at: expires_at.map(from_ms).transpose()?,
            metadata: unjson(&metadata)?,
            tags: unjson(&tags)?,
            created_at: from_ms(self.created_at)?,
            updated_at: from_ms(self.updated_at)?,
            last_used_at: self.last_used_at.map(from_ms).transpose()?,
            version: to_u64(self.version)?,
            imported,
            id,
            hash,
            prefix: self.prefix,
            masked: self.masked,
            name,
            owner,
            plan,
        })
    }
}

/// What a gateway needs of one key, as stored: a snapshot reads every key in this
/// form. Fewer columns than [`KeyRow`] and its JSON left as text until [`wire`]
/// borrows from it, so ten million keys stream without building each as a
/// [`StoredKey`]. The result is the same as [`crate::control::snapshot::wire_key`]
/// of the stored key.
///
/// [`wire`]: GatewayKeyRow::wire
#[derive(sqlx::FromRow)]
pub struct GatewayKeyRow {
    pub(super) id: String,
    pub(super) hash: String,
    pub(super) name: String,
    pub(super) owner: Option<String>,
    pub(super) plan: Option<String>,
    pub(super) scopes: String,
    pub(super) ip_allowlist: String,
    pub(super) rate_limit: Option<String>,
    pub(super) quota: Option<String>,
    pub(super) status: String,
    pub(super) expires_at: Option<i64>,
    pub(super) metadata: String,
    pub(super) tags: String,
    pub(super) imported: bool,
}

impl GatewayKeyRow {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key in wire form, borrowing the row's text. An unusable hash or a stored
    /// value that does not parse is an error: the key cannot be served as stored.
    pub fn wire(&self) -> Result<WireKey<'_>> {
        /// A JSON string, borrowed from the row unless it holds escapes.
        #[derive(serde::Deserialize)]
        struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
        fn strings(column: &str) -> Result<Vec<Cow<'_, str>>> {
            let texts: Vec<Text<'_>> = serde_json::from_str(column).map_err(corrupt)?;
            Ok(texts.into_iter().map(|t| t.0).collect())
        }
        let digest = KeyDigest::parse(&self.hash).map_err(|e| corrupt(format!("hash of {}: {e}", self.id)))?;
        let status = KeyStatusText::parse(&self.status).ok_or_else(|| corrupt(format!("status {:?}", self.status)))?;
        // Stored compact by the admin API and the import; checked, never rebuilt.
        let metadata = match self.metadata.as_str() {
            "{}" => None,
            text => {
                if !text.starts_with('{') {
                    return Err(corrupt(format!("metadata of {} is no object", self.id)));
                }
                serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(corrupt)?;
                Some(Cow::Borrowed(text))
            }
        };
        Ok(WireKey {
            digest: digest.0,
            id: Cow::Borrowed(&self.id),
            name: (self.name != self.id).then_some(Cow::Borrowed(self.name.as_str())),
            owner: self.owner.as_deref().map(Cow::Borrowed),
            plan: self.plan.as_deref().map(Cow::Borrowed),
            scopes: strings(&self.scopes)?,
            ip_allowlist: strings(&self.ip_allowlist)?,
            ip_allowlist_unusable: false,
            rate_limit: self
                .rate_limit
                .as_deref()
                .map(unjson::<RateLimitConfig>)
                .transpose()?
                .as_ref()
                .map(WireRate::from),
            quota: self.quota.as_deref().map(unjson::<QuotaConfig>).transpose()?.as_ref().map(WireQuota::from),
            status: status.into(),
            expires_at_ms: self.expires_at,
            metadata,
            tags: strings(&self.tags)?,
            imported: self.imported,
        })
    }
}

/// The settable columns of a key, encoded for binding.
pub(super) struct KeyColumns {
    pub(super) scopes: String,
    pub(super) ip_allowlist: String,
    pub(super) rate_limit: Option<String>,
    pub(super) quota: Option<String>,
    pub(super) expires_at: Option<i64>,
    pub(super) metadata: String,
    pub(super) tags: String,
}

impl KeyColumns {
    pub(super) fn of(key: &StoredKey) -> Result<Self> {
        Ok(KeyColumns {
            scopes: json(&key.scopes)?,
            ip_allowlist: json(&key.ip_allowlist)?,
            rate_limit: key.rate_limit.as_ref().map(json).transpose()?,
            quota: key.quota.as_ref().map(json).transpose()?,
            expires_at: key.expires_at.map(to_ms),
            metadata: json(&key.metadata)?,
            tags: json(&key.tags)?,
        })
    }
}

/// The record a new key will have (before the store assigns its version).
pub(super) fn key_from_new(new: NewKey, now: i64) -> Result<StoredKey> {
    let now = from_ms(now)?;
    Ok(StoredKey {
        id: new.id,
        hash: new.hash,
        prefix: new.prefix,
        masked: new.masked,
        name: new.name,
        owner: new.owner,
        plan: new.plan,
        scopes: new.scopes,
        ip_allowlist: new.ip_allowlist,
        rate_limit: new.rate_limit,
        quota: new.quota,
        status: KeyStatusText::Active,
        expires_at: new.expires_at,
        metadata: new.metadata,
        tags: new.tags,
        created_at: now,
        updated_at: now,
        last_used_at: None,
        version: 0,
        imported: false,
    })
}

/// `key` with `patch` applied, and the names of the fields whose value changed.
pub(super) fn apply_patch(key: &StoredKey, patch: KeyPatch) -> (StoredKey, Vec<&'static str>) {
    let mut next = key.clone();
    let mut changed = Vec::new();
    pub(super) fn set<T: PartialEq>(
        field: &mut T,
        value: Option<T>,
        name: &'static str,
        changed: &mut Vec<&'static str>,
    ) {
        if let Some(value) = value {
            if *field != value {
                *field = value;
                changed.push(name);
            }
        }
    }
    // Compare at stored precision, so re-sending the same expiry is not a change.
    let expires_at = patch.expires_at.map(|at| at.map(|t| from_ms(to_ms(t)).unwrap_or(t)));
    set(&mut next.name, patch.name, "name", &mut changed);
    set(&mut next.owner, patch.owner, "owner", &mut changed);
    set(&mut next.plan, patch.plan, "plan", &mut changed);
    set(&mut next.scopes, patch.scopes, "scopes", &mut changed);
    set(&mut next.ip_allowlist, patch.ip_allowlist, "ip_allowlist", &mut changed);
    set(&mut next.rate_limit, patch.rate_limit, "rate_limit", &mut changed);
    set(&mut next.quota, patch.quota, "quota", &mut changed);
    set(&mut next.status, patch.status, "status", &mut changed);
    set(&mut next.expires_at, expires_at, "expires_at", &mut changed);
    set(&mut next.metadata, patch.metadata, "metadata", &mut changed);
    set(&mut next.tags, patch.tags, "tags", &mut changed);
    (next, changed)
}

// ---- list cursor ----

/// Position after the last key of a page: (created_at ms, id).
pub(super) type Cursor = (i64, String);

/// Hex of `created_at_ms:id` (`used:last_used_ms:id` in last-use order): opaque to
/// clients, trivial to check.
pub(super) fn encode_cursor(key: &StoredKey, order: KeyOrder) -> String {
    match order {
        KeyOrder::Created => hex::encode(format!("{}:{}", to_ms(key.created_at), key.id)),
        KeyOrder::LastUsed => hex::encode(format!("used:{}:{}", key.last_used_at.map_or(0, to_ms), key.id)),
    }
}

pub(super) fn decode_cursor(text: &str, order: KeyOrder) -> Result<Cursor> {
    let invalid = || StoreError::Invalid("cursor: not a cursor returned by this listing".into());
    let bytes = hex::decode(text).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let text = match order {
        KeyOrder::Created => text.as_str(),
        KeyOrder::LastUsed => text.strip_prefix("used:").ok_or_else(invalid)?,
    };
    let (ms, id) = text.split_once(':').ok_or_else(invalid)?;
    let ms = ms.parse::<i64>().map_err(|_| invalid())?;
    if id.is_empty() {
        return Err(invalid());
    }
    Ok((ms, id.to_owned()))
}

/// `%needle%` for `LIKE … ESCAPE '\'`, lowercased, with wildcards in the needle escaped.
pub(super) fn like_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Whether pg_trgm's index can narrow a search for `needle`: it takes trigrams from runs
/// of letters and digits, and a needle without a run of three has only rare-to-useless
/// ones (word-boundary padding), which would read most of the index.
pub(super) fn trigram_indexable(needle: &str) -> bool {
    let mut run = 0;
    needle.chars().any(|c| {
        run = if c.is_alphanumeric() { run + 1 } else { 0 };
        run >= 3
    })
}

/// The FTS5 query for `needle` as one phrase (a substring, on the trigram index), or
/// `None` when it is shorter than a trigram and the index cannot answer.
pub(super) fn fts_phrase(needle: &str) -> Option<String> {
    let needle = needle.to_lowercase();
    (needle.chars().count() >= 3).then(|| fts_string(&needle))
}

/// `text` as one FTS5 string (quoted: the query syntax's characters lose their meaning).
fn fts_string(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Trigrams of a needle probed at most for their frequency: a longer needle is rare
/// enough on a few of them.
pub(super) const FTS_PROBED_TRIGRAMS: usize = 12;

/// The distinct trigrams of `needle` (lower case, as FTS5's trigram tokenizer folds),
/// in order of first appearance, at most [`FTS_PROBED_TRIGRAMS`].
pub(super) fn fts_trigrams(needle: &str) -> Vec<String> {
    let chars: Vec<char> = needle.to_lowercase().chars().collect();
    let mut trigrams: Vec<String> = Vec::new();
    for window in chars.windows(3) {
        let trigram: String = window.iter().collect();
        if !trigrams.contains(&trigram) {
            trigrams.push(trigram);
        }
        if trigrams.len() == FTS_PROBED_TRIGRAMS {
            break;
        }
    }
    trigrams
}

/// A trigram found in more than one key in this many of the sample is too common to
/// narrow a search.
const FTS_COMMON_SHARE: u64 = 20;
/// Trigrams combined in one search: the rarest, which bound the candidates.
const FTS_RAREST_USED: usize = 3;

/// The FTS5 query for a needle from its trigrams and how many keys of a sample of
/// `sampled` keys hold each: the rarest few, all of which a key holding the needle
/// holds (candidates for the exact test), or `None` when every one is common.
///
/// FTS5 answers a phrase by reading the position lists of all its trigrams, and a
/// trigram that every key holds (`org` of `org-09999`) costs a read of the whole
/// index; a needle with rarer trigrams needs none of it.
pub(super) fn fts_rare_trigrams(counted: &[(String, u64)], sampled: u64) -> Option<String> {
    let mut rare: Vec<&(String, u64)> =
        counted.iter().filter(|(_, count)| count.saturating_mul(FTS_COMMON_SHARE) <= sampled).collect();
    rare.sort_by_key(|(_, count)| *count);
    let terms: Vec<String> = rare.iter().take(FTS_RAREST_USED).map(|(trigram, _)| fts_string(trigram)).collect();
    (!terms.is_empty()).then(|| terms.join(" AND "))
}

// ---- usage ----

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) requests: u64,
    pub(super) allowed: u64,
    pub(super) s2xx: u64,
    pub(super) s3xx: u64,
    pub(super) s4xx: u64,
    pub(super) s5xx: u64,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
}

/// A usage batch folded into per-key minute buckets, sorted so that concurrent
/// writers touch rows in one order (no deadlocks on PostgreSQL).
#[derive(Debug, Default)]
pub(super) struct UsageAggregate {
    pub(super) buckets: BTreeMap<(String, i64), Counts>,
    pub(super) denied: BTreeMap<(String, i64, String), u64>,
    pub(super) last_used: BTreeMap<String, i64>,
}

impl UsageAggregate {
    /// The start of the oldest bucket.
    pub(super) fn oldest_bucket(&self) -> Option<i64> {
        self.buckets.keys().map(|(_, start)| *start).min()
    }

    pub(super) fn of(records: &[UsageRecord]) -> Result<Self> {
        let mut agg = UsageAggregate::default();
        for r in records {
            // The minute (UTC) in which the window ended.
            let bucket = to_ms(r.window_end).div_euclid(60_000) * 60_000;
            let c = agg.buckets.entry((r.key_id.clone(), bucket)).or_default();
            let add = |a: &mut u64, b: u64| -> Result<()> {
                *a = a.checked_add(b).ok_or_else(|| StoreError::Invalid("usage counts overflow".into()))?;
                Ok(())
            };
            add(&mut c.requests, r.requests)?;
            add(&mut c.allowed, r.allowed)?;
            add(&mut c.s2xx, r.status.s2xx)?;
            add(&mut c.s3xx, r.status.s3xx)?;
            add(&mut c.s4xx, r.status.s4xx)?;
            add(&mut c.s5xx, r.status.s5xx)?;
            add(&mut c.bytes_in, r.bytes_in)?;
            add(&mut c.bytes_out, r.bytes_out)?;
            for (code, n) in &r.denied {
                add(agg.denied.entry((r.key_id.clone(), bucket, code.clone())).or_default(), *n)?;
            }
            if let Some(at) = r.last_used_at {
                let at = to_ms(at);
                let seen = agg.last_used.entry(r.key_id.clone()).or_insert(at);
                *seen = (*seen).max(at);
            }
        }
        Ok(agg)
    }
}

/// One rolled-up bucket as summed by the database.
#[derive(sqlx::FromRow)]
pub(super) struct BucketSums {
    pub(super) bucket: i64,
    pub(super) requests: i64,
    pub(super) allowed: i64,
    pub(super) s2xx: i64,
    pub(super) s3xx: i64,
    pub(super) s4xx: i64,
    pub(super) s5xx: i64,
    pub(super) bytes_in: i64,
    pub(super) bytes_out: i64,
}

impl BucketSums {
    pub(super) fn into_counts(self) -> Result<(i64, Counts)> {
        Ok((
            self.bucket,
            Counts {
                requests: to_u64(self.requests)?,
                allowed: to_u64(self.allowed)?,
                s2xx: to_u64(self.s2xx)?,
                s3xx: to_u64(self.s3xx)?,
                s4xx: to_u64(self.s4xx)?,
                s5xx: to_u64(self.s5xx)?,
                bytes_in: to_u64(self.bytes_in)?,
                bytes_out: to_u64(self.bytes_out)?,
            },
        ))
    }
}

/// Rolled-up rows as read from the database: `(start ms, counts)` and
/// `(start ms, code, n)`.
#[derive(Debug, Default)]
pub(super) struct UsageRows {
    pub(super) buckets: Vec<(i64, Counts)>,
    pub(super) denied: Vec<(i64, String, u64)>,
}

impl UsageRows {
    pub(super) fn into_buckets(self, from: OffsetDateTime) -> Result<(Vec<UsageBucket>, UsageBucket)> {
        let mut by_start: BTreeMap<i64, UsageBucket> = BTreeMap::new();
        for (start, c) in self.buckets {
            let bucket = match by_start.entry(start) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(UsageBucket::empty(from_ms(start)?)),
            };
            bucket.add(&UsageBucket {
                start: bucket.start,
                requests: c.requests,
                allowed: c.allowed,
                denied: BTreeMap::new(),
                status: crate::control::model::StatusCounts { s2xx: c.s2xx, s3xx: c.s3xx, s4xx: c.s4xx, s5xx: c.s5xx },
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
            });
        }
        for (start, code, n) in self.denied {
            if n == 0 {
                continue;
            }
            let bucket = match by_start.entry(start) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(UsageBucket::empty(from_ms(start)?)),
            };
            *bucket.denied.entry(code).or_default() += n;
        }
        let buckets: Vec<UsageBucket> = by_start.into_values().filter(|b| !b.is_empty()).collect();
        let mut totals = UsageBucket::empty(from);
        for b in &buckets {
            totals.add(b);
        }
        Ok((buckets, totals))
    }
}

/// Distinct ids, in first-seen order.
pub(super) fn distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    ids.filter(|id| seen.insert(*id)).collect()
}
