//! One key's settings as the gateway needs them on the request path.

use http::HeaderValue;
use ipnet::IpNet;
use time::OffsetDateTime;

use crate::config::{QuotaConfig, RateLimitConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Disabled,
    Revoked,
}

impl KeyStatus {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(KeyStatus::Active),
            "disabled" => Some(KeyStatus::Disabled),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Disabled => "disabled",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// Scopes a key holds: exact names, `prefix:*` wildcards and `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    all: bool,
    exact: Vec<Box<str>>,
    /// Stored with the trailing `*` removed, e.g. `orders:`.
    prefixes: Vec<Box<str>>,
}

impl ScopeSet {
    pub fn new<S: AsRef<str>>(scopes: &[S]) -> Self {
        let mut set = ScopeSet::default();
        for scope in scopes {
            let scope = scope.as_ref();
            if scope == "*" {
                set.all = true;
            } else if let Some(prefix) = scope.strip_suffix('*') {
                set.prefixes.push(prefix.into());
            } else {
                set.exact.push(scope.into());
            }
        }
        set
    }

    pub fn holds(&self, required: &str) -> bool {
        self.all
            || self.exact.iter().any(|s| &**s == required)
            || self.prefixes.iter().any(|p| required.len() > p.len() && required.starts_with(&**p))
    }

    pub fn holds_all<S: AsRef<str>>(&self, required: &[S]) -> bool {
        required.iter().all(|r| self.holds(r.as_ref()))
    }
}

/// Header values sent upstream for an allowed request, built once per record.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub key_id: HeaderValue,
    pub owner: Option<HeaderValue>,
    pub plan: Option<HeaderValue>,
    pub scopes: HeaderValue,
}

#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub owner: Option<String>,
    pub plan: Option<String>,
    pub scope_names: Vec<String>,
    pub scopes: ScopeSet,
    pub ip_allowlist: Vec<IpNet>,
    pub rate_limit: Option<RateLimitConfig>,
    pub quota: Option<QuotaConfig>,
    pub status: KeyStatus,
    pub expires_at: Option<OffsetDateTime>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub tags: Vec<String>,
    pub headers: IdentityHeaders,
}

impl KeyRecord {
    pub fn builder(id: impl Into<String>) -> KeyRecordBuilder {
        KeyRecordBuilder {
            id: id.into(),
            name: String::new(),
            owner: None,
            plan: None,
            scopes: Vec::new(),
            ip_allowlist: Vec::new(),
            rate_limit: None,
            quota: None,
            status: KeyStatus::Active,
            expires_at: None,
            metadata: serde_json::Map::new(),
            tags: Vec::new(),
        }
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        self.ip_allowlist.is_empty() || self.ip_allowlist.iter().any(|net| net.contains(&ip))
    }
}

pub struct KeyRecordBuilder {
    id: String,
    name: String,
    owner: Option<String>,
    plan: Option<String>,
    scopes: Vec<String>,
    ip_allowlist: Vec<IpNet>,
    rate_limit: Option<RateLimitConfig>,
    quota: Option<QuotaConfig>,
    status: KeyStatus,
    expires_at: Option<OffsetDateTime>,
    metadata: serde_json::Map<String, serde_json::Value>,
    tags: Vec<String>,
}

impl KeyRecordBuilder {
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    pub fn owner(mut self, owner: Option<String>) -> Self {
        self.owner = owner;
        self
    }
    pub fn plan(mut self, plan: Option<String>) -> Self {
        self.plan = plan;
        self
    }
    pub fn scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }
    pub fn ip_allowlist(mut self, nets: Vec<IpNet>) -> Self {
        self.ip_allowlist = nets;
        self
    }
    pub fn rate_limit(mut self, limit: Option<RateLimitConfig>) -> Self {
        self.rate_limit = limit;
        self
    }
    pub fn quota(mut self, quota: Option<QuotaConfig>) -> Self {
        self.quota = quota;
        self
    }
    pub fn status(mut self, status: KeyStatus) -> Self {
        self.status = status;
        self
    }
    pub fn expires_at(mut self, at: Option<OffsetDateTime>) -> Self {
        self.expires_at = at;
        self
    }
    pub fn metadata(mut self, metadata: serde_json::Map<String, serde_json::Value>) -> Self {
        self.metadata = metadata;
        self
    }
    pub fn tags(mut self, tags: Vec<String>) -> Self {
        self.tags = tags;
        self
    }

    pub fn build(self) -> KeyRecord {
        let headers = IdentityHeaders {
            key_id: header_value(&self.id),
            owner: self.owner.as_deref().map(header_value),
            plan: self.plan.as_deref().map(header_value),
            scopes: header_value(&self.scopes.join(" ")),
        };
        KeyRecord {
            scopes: ScopeSet::new(&self.scopes),
            scope_names: self.scopes,
            id: self.id,
            name: self.name,
            owner: self.owner,
            plan: self.plan,
            ip_allowlist: self.ip_allowlist,
            rate_limit: self.rate_limit,
            quota: self.quota,
            status: self.status,
            expires_at: self.expires_at,
            metadata: self.metadata,
            tags: self.tags,
            headers,
        }
    }
}

/// Record fields are validated where they enter (keys file, admin API); this only
/// guards against a control character slipping through into a header.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let cleaned: String = text.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        HeaderValue::from_str(&cleaned).unwrap_or(HeaderValue::from_static("?"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_scopes_match_only_themselves() {
        let set = ScopeSet::new(&["orders:read"]);
        assert!(set.holds("orders:read"));
        assert!(!set.holds("orders:write"));
        assert!(!set.holds("orders"));
    }

    #[test]
    fn prefix_wildcard_matches_everything_under_it() {
        let set = ScopeSet::new(&["orders:*"]);
        assert!(set.holds("orders:read"));
        assert!(set.holds("orders:write:all"));
        assert!(!set.holds("orders:"));
        assert!(!set.holds("orders"));
        assert!(!set.holds("billing:read"));
    }

    #[test]
    fn star_holds_every_scope() {
        let set = ScopeSet::new(&["*"]);
        assert!(set.holds("anything"));
        assert!(set.holds_all(&["a", "b:c"]));
    }

    #[test]
    fn holds_all_needs_every_required_scope() {
        let set = ScopeSet::new(&["orders:read", "billing:*"]);
        assert!(set.holds_all(&["orders:read", "billing:write"]));
        assert!(!set.holds_all(&["orders:read", "orders:write"]));
        assert!(set.holds_all::<&str>(&[]));
        assert!(ScopeSet::default().holds_all::<&str>(&[]));
        assert!(!ScopeSet::default().holds("x"));
    }

    #[test]
    fn allowlist_empty_means_any_address() {
        let open = KeyRecord::builder("k").build();
        assert!(open.allows_ip("203.0.113.9".parse().unwrap()));
        let closed = KeyRecord::builder("k")
            .ip_allowlist(vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()])
            .build();
        assert!(closed.allows_ip("10.1.2.3".parse().unwrap()));
        assert!(closed.allows_ip("2001:db8::1".parse().unwrap()));
        assert!(!closed.allows_ip("11.0.0.1".parse().unwrap()));
        assert!(!closed.allows_ip("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn identity_headers_are_prepared_once() {
        let record =
            KeyRecord::builder("key_1").owner(Some("acme".into())).scopes(vec!["a:b".into(), "c".into()]).build();
        assert_eq!(record.headers.key_id, "key_1");
        assert_eq!(record.headers.owner.as_ref().unwrap(), "acme");
        assert_eq!(record.headers.scopes, "a:b c");
        assert!(record.headers.plan.is_none());
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        let record = KeyRecord::builder("key\n1").build();
        assert_eq!(record.headers.key_id, "key?1");
    }
}
