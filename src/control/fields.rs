//! Validation of key fields as they come in JSON: shared by the admin API's
//! create and update calls and by the bulk import, so a field means the same
//! wherever it is given. Every error names the field (`scopes[2]`, `rate_limit.per`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::parse_cidr;
use crate::config::raw::{RawQuota, RawRateLimit};
use crate::config::{parse_duration, QuotaConfig, RateLimitConfig};

/// A field that is not valid: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl std::fmt::Display) -> Self {
        FieldError { field: field.to_owned(), message: message.to_string() }
    }
}

pub type FieldResult<T> = Result<T, FieldError>;

pub fn string_field(field: &str, value: &Value) -> FieldResult<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() && s.len() <= 256 && !s.chars().any(char::is_control) => Ok(s.clone()),
        Value::String(_) => Err(FieldError::new(field, "must be 1 to 256 printable characters")),
        _ => Err(FieldError::new(field, "must be a string")),
    }
}

pub fn string_list(field: &str, value: &Value) -> FieldResult<Vec<String>> {
    let Value::Array(items) = value else { return Err(FieldError::new(field, "must be a list of strings")) };
    items.iter().enumerate().map(|(i, item)| string_field(&format!("{field}[{i}]"), item)).collect()
}

pub fn scopes(value: &Value) -> FieldResult<Vec<String>> {
    let scopes = string_list("scopes", value)?;
    if let Some((i, _)) = scopes.iter().enumerate().find(|(_, s)| s.contains(char::is_whitespace)) {
        return Err(FieldError::new(&format!("scopes[{i}]"), "a scope has no spaces"));
    }
    Ok(scopes)
}

pub fn ip_allowlist(value: &Value) -> FieldResult<Vec<String>> {
    let entries = string_list("ip_allowlist", value)?;
    for (i, entry) in entries.iter().enumerate() {
        if parse_cidr(entry).is_none() {
            return Err(FieldError::new(
                &format!("ip_allowlist[{i}]"),
                format!("{entry:?} is not an IP address or CIDR"),
            ));
        }
    }
    Ok(entries)
}

/// A plan the config defines.
pub fn plan(plans: &BTreeSet<String>, value: &Value) -> FieldResult<String> {
    let plan = string_field("plan", value)?;
    if !plans.contains(&plan) {
        return Err(FieldError::new("plan", format!("unknown plan {plan:?}")));
    }
    Ok(plan)
}

pub fn rate_limit(value: &Value) -> FieldResult<RateLimitConfig> {
    let raw: RawRateLimit = limit_shape("rate_limit", value)?;
    raw.validate("rate_limit").map_err(invalid_fields)
}

pub fn quota(value: &Value) -> FieldResult<QuotaConfig> {
    let raw: RawQuota = limit_shape("quota", value)?;
    raw.validate("quota").map_err(invalid_fields)
}

/// A `rate_limit` or `quota` object, its errors naming the field inside it.
fn limit_shape<T: serde::de::DeserializeOwned>(field: &str, value: &Value) -> FieldResult<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." { field.to_owned() } else { format!("{field}.{inner}") };
        FieldError::new(&path, e.inner())
    })
}

/// Every (path, message) of a validation in one error that starts with the first field.
fn invalid_fields(errors: Vec<(String, String)>) -> FieldError {
    let mut errors = errors.into_iter();
    let Some((path, message)) = errors.next() else { return FieldError::new("request", "is not valid") };
    let rest: String = errors.map(|(path, message)| format!("; {path}: {message}")).collect();
    FieldError::new(&path, format!("{message}{rest}"))
}

pub fn timestamp(field: &str, value: &Value) -> FieldResult<OffsetDateTime> {
    let text = value.as_str().ok_or_else(|| FieldError::new(field, "must be an RFC 3339 time"))?;
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| FieldError::new(field, format!("{text:?} is not an RFC 3339 time")))
}

pub fn duration(field: &str, value: &Value) -> FieldResult<Duration> {
    let text = value.as_str().ok_or_else(|| FieldError::new(field, "must be a duration such as \"30d\""))?;
    parse_duration(text).map_err(|e| FieldError::new(field, e))
}

pub fn expiry_from_ttl(value: &Value) -> FieldResult<OffsetDateTime> {
    let ttl = duration("ttl", value)?;
    if ttl.is_zero() {
        return Err(FieldError::new("ttl", "must be longer than zero"));
    }
    let ttl = time::Duration::try_from(ttl).map_err(|_| FieldError::new("ttl", "too long"))?;
    OffsetDateTime::now_utc().checked_add(ttl).ok_or_else(|| FieldError::new("ttl", "too long"))
}

pub fn metadata(value: &Value) -> FieldResult<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map.clone()),
        _ => Err(FieldError::new("metadata", "must be a JSON object")),
    }
}
