//! Human output: tables and records as a person reads them.

use super::*;

// Human output.

pub(crate) fn render_key_list(records: &[Value], next: Option<&str>) -> String {
    let mut out = String::new();
    if records.is_empty() {
        out.push_str("no keys\n");
    } else {
        let mut table =
            Table::new(["ID", "NAME", "OWNER", "PLAN", "STATUS", "MASKED", "SCOPES", "EXPIRES", "LAST USED"]);
        for record in records {
            table.row([
                plain(record.get("id")),
                plain(record.get("name")),
                plain(record.get("owner")),
                plain(record.get("plan")),
                plain(record.get("status")),
                plain(record.get("masked")),
                joined(record.get("scopes"), ","),
                timestamp(record.get("expires_at")),
                timestamp(record.get("last_used_at")),
            ]);
        }
        out.push_str(&table.render());
    }
    if let Some(next) = next {
        out.push_str(&format!("\nmore keys: run again with --cursor {} (or use --all)\n", clean(next)));
    }
    out
}

/// The fields of a record in the order people read them; others follow.
pub(crate) const RECORD_FIELDS: [&str; 17] = [
    "id",
    "name",
    "owner",
    "plan",
    "status",
    "prefix",
    "masked",
    "scopes",
    "ip_allowlist",
    "rate_limit",
    "quota",
    "expires_at",
    "metadata",
    "tags",
    "created_at",
    "updated_at",
    "last_used_at",
];

/// `field: value` lines, values aligned.
pub(crate) fn render_record(record: &Value) -> String {
    let Some(fields) = record.as_object() else {
        return pretty(record);
    };
    let mut lines: Vec<(&str, String)> = Vec::new();
    for name in RECORD_FIELDS {
        if let Some(value) = fields.get(name) {
            lines.push((name, describe_field(name, value)));
        } else if matches!(name, "owner" | "plan" | "expires_at" | "last_used_at") {
            // Say "-" rather than leave people wondering whether it was printed.
            lines.push((name, "-".to_owned()));
        }
    }
    for (name, value) in fields {
        if !RECORD_FIELDS.contains(&name.as_str()) {
            lines.push((name, describe_field(name, value)));
        }
    }
    let width = lines.iter().map(|(name, _)| clean(name).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (name, value) in lines {
        let label = format!("{}:", clean(name));
        out.push_str(&format!("{label:<w$} {value}\n", w = width + 1));
    }
    out
}

/// `, by owner` for a limit shared by the key's owner; nothing for the default.
pub(crate) fn shared_by(limit: &Map<String, Value>) -> String {
    match limit.get("by").and_then(Value::as_str) {
        Some(by) if by != "key" => format!(", by {by}"),
        _ => String::new(),
    }
}

pub(crate) fn describe_field(name: &str, value: &Value) -> String {
    match (name, value) {
        ("rate_limit", Value::Object(limit)) => {
            let mut text = format!("{}/{}", plain(limit.get("requests")), plain(limit.get("per")));
            if let Some(burst) = limit.get("burst").filter(|b| !b.is_null()) {
                text.push_str(&format!(", burst {}", plain(Some(burst))));
            }
            clean(&(text + &shared_by(limit)))
        }
        ("quota", Value::Object(quota)) => {
            clean(&(format!("{}/{}", plain(quota.get("requests")), plain(quota.get("per"))) + &shared_by(quota)))
        }
        (_, Value::Object(entries)) if entries.values().all(|v| !v.is_object() && !v.is_array()) => {
            clean(&entries.iter().map(|(k, v)| format!("{k}={}", plain(Some(v)))).collect::<Vec<_>>().join(", "))
        }
        (_, Value::Array(_)) => clean(&joined(Some(value), ", ")),
        (_, Value::Object(_)) => clean(&value.to_string()),
        _ => clean(&plain(Some(value))),
    }
}

/// A scalar as text; null and absent are empty (rendered `-`).
pub(crate) fn plain(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

pub(crate) fn joined(value: Option<&Value>, separator: &str) -> String {
    match value {
        Some(Value::Array(items)) => items.iter().map(|item| plain(Some(item))).collect::<Vec<_>>().join(separator),
        other => plain(other),
    }
}

/// RFC 3339 shortened to whole seconds in UTC; anything else as it came.
pub(crate) fn timestamp(value: Option<&Value>) -> String {
    let text = plain(value);
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    OffsetDateTime::parse(&text, &Rfc3339)
        .ok()
        .and_then(|at| at.to_offset(UtcOffset::UTC).format(format).ok())
        .unwrap_or(text)
}

pub(crate) fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

pub(crate) fn render_new_key(reply: &Reply, heading: &str) -> Result<String, KeysError> {
    let body = reply.value()?;
    let raw = body.get("key").and_then(Value::as_str).ok_or_else(|| reply.bad("no \"key\" in the response"))?;
    let record = body.get("record").unwrap_or(&Value::Null);
    let id = plain(record.get("id"));
    let heading = if heading == "Created" { format!("Created key {}.", clean(&id)) } else { heading.to_owned() };
    Ok(format!(
        "{heading}\n\n    {}\n\nThis key is shown only once: store it now. keygate keeps only its hash.\n\n{}",
        clean(raw),
        render_record(record)
    ))
}

/// One usage bucket (or the totals) reduced to the table's numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsageRow {
    pub(crate) requests: u64,
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
    pub(crate) s2xx: u64,
    pub(crate) s4xx: u64,
    pub(crate) s5xx: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl UsageRow {
    /// Absent counters are zero: the server may leave out what did not happen.
    pub(crate) fn of(bucket: &Value) -> Self {
        let number = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
        let status = |class: &str| number(bucket.get("status").and_then(|s| s.get(class)));
        let denied = match bucket.get("denied") {
            Some(Value::Object(codes)) => codes.values().map(|n| n.as_u64().unwrap_or(0)).fold(0, u64::saturating_add),
            other => number(other),
        };
        UsageRow {
            requests: number(bucket.get("requests")),
            allowed: number(bucket.get("allowed")),
            denied,
            s2xx: status("2xx"),
            s4xx: status("4xx"),
            s5xx: status("5xx"),
            bytes_in: number(bucket.get("bytes_in")),
            bytes_out: number(bucket.get("bytes_out")),
        }
    }

    pub(crate) fn add(self, other: UsageRow) -> UsageRow {
        UsageRow {
            requests: self.requests.saturating_add(other.requests),
            allowed: self.allowed.saturating_add(other.allowed),
            denied: self.denied.saturating_add(other.denied),
            s2xx: self.s2xx.saturating_add(other.s2xx),
            s4xx: self.s4xx.saturating_add(other.s4xx),
            s5xx: self.s5xx.saturating_add(other.s5xx),
            bytes_in: self.bytes_in.saturating_add(other.bytes_in),
            bytes_out: self.bytes_out.saturating_add(other.bytes_out),
        }
    }

    pub(crate) fn cells(self, start: String) -> [String; 9] {
        [
            start,
            self.requests.to_string(),
            self.allowed.to_string(),
            self.denied.to_string(),
            self.s2xx.to_string(),
            self.s4xx.to_string(),
            self.s5xx.to_string(),
            self.bytes_in.to_string(),
            self.bytes_out.to_string(),
        ]
    }
}

pub(crate) fn render_usage(body: &Value, id: &str) -> String {
    let buckets = body.get("buckets").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if buckets.is_empty() {
        return format!("no usage recorded for {} in this period\n", clean(id));
    }
    let mut table =
        Table::new(["START", "REQUESTS", "ALLOWED", "DENIED", "2XX", "4XX", "5XX", "BYTES IN", "BYTES OUT"])
            .right(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut sum = UsageRow::default();
    for bucket in buckets {
        let row = UsageRow::of(bucket);
        sum = sum.add(row);
        table.row(row.cells(timestamp(bucket.get("start"))));
    }
    // The server's totals are authoritative; the sum covers a server that sends none.
    let totals = body.get("totals").filter(|t| t.is_object()).map(UsageRow::of).unwrap_or(sum);
    table.row(totals.cells("TOTAL".to_owned()));
    table.render()
}
