//! Serde structs that mirror the YAML file field for field.
//!
//! Every struct denies unknown fields. Scalars are kept loose here (strings,
//! whole numbers) and given meaning in `validate.rs`, which reports every
//! problem rather than the first. Where a subtree is wrapped in [`Parsed`] it is
//! deserialized on its own, so that one bad list element or map entry does not
//! hide the errors in its siblings.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_norway::Value;

use super::position::join_index;

/// A serde failure inside one subtree: `path` is relative to that subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    pub path: String,
    pub message: String,
}

impl NodeError {
    /// The path of the failure under `base`, the subtree's own path.
    pub fn path_under(&self, base: &str) -> String {
        if self.path.is_empty() {
            base.to_owned()
        } else if base.is_empty() {
            self.path.trim_start_matches('.').to_owned()
        } else {
            format!("{base}{}", self.path)
        }
    }

    /// serde_path_to_error puts an unknown field's own name on the path; the
    /// error belongs at that key rather than at its value.
    pub fn is_unknown_field(&self) -> bool {
        self.message.starts_with("unknown field")
    }
}

/// A subtree deserialized in isolation: its failure is kept, not propagated.
pub struct Parsed<T>(pub Result<T, NodeError>);

impl<T: fmt::Debug> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Ok(Parsed(parse_value(value)))
    }
}

/// Deserializes `value`, recording where inside it a failure happened.
pub fn parse_value<T: DeserializeOwned>(value: Value) -> Result<T, NodeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = String::new();
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => {
                    path = join_index(&path, *index);
                }
                serde_path_to_error::Segment::Map { key } => path = format!("{path}.{key}"),
                serde_path_to_error::Segment::Enum { variant } => {
                    path = format!("{path}.{variant}");
                }
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        NodeError { path, message: e.into_inner().to_string() }
    })
}

/// A string field that also takes a number or boolean as written (`node_id: 7`),
/// since YAML gives bare scalars those types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A whole number that may also arrive as a string, which is what
/// `threads: ${env:THREADS}` becomes after interpolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Num<T>(pub T);

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Num<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: TryFrom<u64>> Visitor<'_> for V<T> {
            type Value = Num<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num<T>, E> {
                T::try_from(v).map(Num).map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num<T>, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is negative"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Num<T>, E> {
                // `1e3` is a float in YAML but a fine whole number.
                if v.fract() == 0.0 && v >= 0.0 && v <= u64::MAX as f64 {
                    self.visit_u64(v as u64)
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num<T>, E> {
                match v.trim().parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A boolean that may also arrive as the string "true" or "false".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                match v.trim() {
                    "true" => Ok(Flag(true)),
                    "false" => Ok(Flag(false)),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping whose keys are names chosen by the user, in file order.
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V: fmt::Debug> fmt::Debug for Entries<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some((Text(key), value)) = map.next_entry::<Text, V>()? {
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// The top-level keys, in the order the contract lists them.
pub const TOP_LEVEL_FIELDS: &[&str] = &[
    "mode",
    "node_id",
    "threads",
    "listeners",
    "admin",
    "store",
    "keys",
    "client_ip",
    "key_locations",
    "upstreams",
    "routes",
    "plans",
    "default_plan",
    "usage",
    "access_log",
    "shutdown_timeout",
    "http",
    "fleet_limits",
    "webhooks",
];

/// The whole file. Built only from the known top-level keys (unknown ones are
/// reported and dropped first), and every field is a [`Parsed`], so this never
/// fails as a whole.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub mode: Option<Parsed<RawMode>>,
    pub node_id: Option<Parsed<Text>>,
    pub threads: Option<Parsed<Num<usize>>>,
    pub listeners: Option<Parsed<Vec<Parsed<RawListener>>>>,
    pub admin: Option<Parsed<RawAdmin>>,
    pub store: Option<Parsed<RawStore>>,
    pub keys: Option<Parsed<RawKeys>>,
    pub client_ip: Option<Parsed<RawClientIp>>,
    pub key_locations: Option<Parsed<Vec<Parsed<RawKeyLocation>>>>,
    pub upstreams: Option<Parsed<Entries<Parsed<RawUpstream>>>>,
    pub routes: Option<Parsed<Vec<Parsed<RawRoute>>>>,
    pub plans: Option<Parsed<Entries<Parsed<RawPlan>>>>,
    pub default_plan: Option<Parsed<Text>>,
    pub usage: Option<Parsed<RawUsage>>,
    pub access_log: Option<Parsed<RawAccessLog>>,
    /// keygate's own: how long SIGTERM waits for requests in flight.
    pub shutdown_timeout: Option<Parsed<Text>>,
    pub http: Option<Parsed<RawHttp>>,
    pub fleet_limits: Option<Parsed<RawFleetLimits>>,
    pub webhooks: Option<Parsed<Vec<Parsed<RawWebhook>>>>,
}

/// One `webhooks:` entry. No `Debug`: `secret` is a secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Option<Text>,
    pub secret: Option<Text>,
    pub events: Option<Vec<Text>>,
    pub expiring_lead: Option<Text>,
}

/// `{ engine: redis, url: redis://..., sync_interval: 200ms }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleetLimits {
    pub engine: Option<Text>,
    pub url: Option<Text>,
    pub sync_interval: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub request_header_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_connections: Option<Num<usize>>,
    pub escaped_slashes: Option<Text>,
    pub underscore_headers: Option<Text>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    Standalone,
    Gateway,
    ControlPlane,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: Option<Text>,
    pub tls: Option<Parsed<RawTlsFiles>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsFiles {
    pub cert: Option<Text>,
    pub key: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: Option<Text>,
    pub tokens: Option<Vec<Parsed<RawToken>>>,
    pub sync_tokens: Option<Vec<Parsed<RawToken>>>,
}

/// No `Debug`: `token` may hold a raw secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub name: Option<Text>,
    pub hash: Option<Text>,
    pub token: Option<Text>,
    pub role: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub url: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    pub source: Option<RawKeySource>,
    pub control_plane: Option<Parsed<RawControlPlaneClient>>,
    pub file: Option<Text>,
    pub cache_file: Option<Text>,
    pub max_staleness: Option<Text>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawKeySource {
    Store,
    ControlPlane,
    File,
}

/// No `Debug`: `token` is a secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControlPlaneClient {
    pub url: Option<Text>,
    pub token: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientIp {
    pub trusted_proxies: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyLocation {
    pub header: Option<Text>,
    pub scheme: Option<Text>,
    pub query: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub targets: Option<Vec<Text>>,
    pub tls: Option<Parsed<RawUpstreamTls>>,
    pub health_check: Option<Parsed<RawHealthCheck>>,
    pub connect_timeout: Option<Text>,
    pub read_timeout: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub sni: Option<Text>,
    pub ca: Option<Text>,
    pub verify: Option<Flag>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub healthy_threshold: Option<Num<u32>>,
    pub unhealthy_threshold: Option<Num<u32>>,
}

/// No `Debug`: `set_headers` values are often upstream credentials.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Text>,
    #[serde(rename = "match")]
    pub matcher: Option<Parsed<RawRouteMatch>>,
    pub upstream: Option<Text>,
    pub auth: Option<RawRouteAuth>,
    pub scopes: Option<Vec<Text>>,
    pub set_headers: Option<Entries<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteMatch {
    pub path_prefix: Option<Text>,
    pub methods: Option<Vec<Text>>,
    pub host: Option<Text>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawRouteAuth {
    Key,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub rate_limit: Option<Parsed<RawRateLimit>>,
    pub quota: Option<Parsed<RawQuota>>,
}

/// `{ requests: 10, per: 1s, burst: 20 }`, in plans and in per-key overrides.
/// Turn it into a [`super::RateLimitConfig`] with `validate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests: Option<Num<u32>>,
    pub per: Option<Text>,
    pub burst: Option<Num<u32>>,
    /// `key` (default) or `owner`.
    pub by: Option<Text>,
}

/// `{ requests: 10000, per: month }`, in plans and in per-key overrides.
/// Turn it into a [`super::QuotaConfig`] with `validate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub requests: Option<Num<u64>>,
    pub per: Option<Text>,
    /// `key` (default) or `owner`.
    pub by: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub flush_interval: Option<Text>,
    pub spool: Option<Text>,
    pub sinks: Option<Vec<Parsed<RawSink>>>,
    pub retention: Option<Parsed<RawRetention>>,
}

/// `{ minute: 7d, hour: 90d, day: 2y }`: how long the store keeps each granularity.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub minute: Option<Text>,
    pub hour: Option<Text>,
    pub day: Option<Text>,
}

/// No derived `Debug`: `secret` and `headers` hold credentials.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    #[serde(rename = "type")]
    pub kind: Option<Text>,
    pub path: Option<Text>,
    pub url: Option<Text>,
    pub format: Option<Text>,
    pub batch_size: Option<Num<u32>>,
    pub secret: Option<Text>,
    pub headers: Option<Entries<Text>>,
    pub subject: Option<Text>,
}

impl fmt::Debug for RawSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSink")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("format", &self.format)
            .field("batch_size", &self.batch_size)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// `off` (or `false`, which YAML 1.1 makes of a bare `off`), or `{ path: ... }`.
#[derive(Debug)]
pub enum RawAccessLog {
    Off,
    Path(Option<Text>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLogPath {
    path: Option<Text>,
}

impl<'de> Deserialize<'de> for RawAccessLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "expected `off` or { path: stdout } or { path: <file> }";
        match Value::deserialize(d)? {
            Value::Bool(false) => Ok(RawAccessLog::Off),
            Value::String(s) if s == "off" => Ok(RawAccessLog::Off),
            Value::Mapping(map) => {
                parse_value::<RawAccessLogPath>(Value::Mapping(map)).map(|p| RawAccessLog::Path(p.path)).map_err(|e| {
                    let at = e.path_under("");
                    if at.is_empty() {
                        de::Error::custom(e.message)
                    } else {
                        de::Error::custom(format!("{at}: {}", e.message))
                    }
                })
            }
            _ => Err(de::Error::custom(EXPECTED)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_top_level_fields_match_raw_config() {
        let mut map = serde_norway::Mapping::new();
        for field in TOP_LEVEL_FIELDS {
            map.insert(Value::String((*field).to_owned()), Value::Null);
        }
        assert!(parse_value::<RawConfig>(Value::Mapping(map)).is_ok());
        let error = match parse_value::<RawConfig>(serde_norway::from_str("bogus: 1").unwrap()) {
            Ok(_) => panic!("unknown key accepted"),
            Err(e) => e.message,
        };
        for field in TOP_LEVEL_FIELDS {
            assert!(error.contains(&format!("`{field}`")), "{field} in {error}");
        }
    }

    #[test]
    fn raw_parsed_keeps_sibling_errors_apart() {
        let value: Value = serde_norway::from_str("[{address: a}, {adress: b}, {address: [1]}]").unwrap();
        let list: Vec<Parsed<RawListener>> = parse_value(value).unwrap();
        assert!(list[0].0.is_ok());
        let e1 = list[1].0.as_ref().unwrap_err();
        assert_eq!(e1.path_under("listeners[1]"), "listeners[1].adress");
        assert!(e1.is_unknown_field());
        let e2 = list[2].0.as_ref().unwrap_err();
        assert_eq!(e2.path_under("listeners[2]"), "listeners[2].address");
    }

    #[test]
    fn raw_num_accepts_numbers_and_numeric_strings() {
        let parse = |s: &str| parse_value::<Num<u32>>(serde_norway::from_str(s).unwrap());
        assert_eq!(parse("7"), Ok(Num(7)));
        assert_eq!(parse("'7'"), Ok(Num(7)));
        assert_eq!(parse("1e3"), Ok(Num(1000)));
        assert!(parse("-1").unwrap_err().message.contains("negative"));
        assert!(parse("4294967296").unwrap_err().message.contains("too large"));
        assert!(parse("seven").is_err());
        assert!(parse("1.5").is_err());
    }
}
