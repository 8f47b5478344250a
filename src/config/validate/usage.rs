//! `usage:`: the flush, the spool, retention and the sinks.

use super::*;

impl Builder<'_> {
    pub(super) fn usage(
        &mut self,
        raw: Option<Parsed<RawUsage>>,
        mode: Option<Mode>,
        keys: Option<&KeysConfig>,
    ) -> UsageConfig {
        let usage = self.parsed(raw, "usage");
        let (flush_interval, spool, sinks, retention) = match usage {
            Some(u) => (u.flush_interval, u.spool, u.sinks, u.retention),
            None => (None, None, None, None),
        };
        let flush_interval = self.duration(flush_interval, "usage.flush_interval", Duration::from_secs(5), false);
        let spool = self.optional_path(spool, "usage.spool");
        let retention = self.retention(retention, mode);
        let Some(sinks) = sinks else {
            let sinks = if mode.unwrap_or_default() == Mode::Standalone { vec![SinkConfig::Store] } else { Vec::new() };
            return UsageConfig { flush_interval, spool, sinks, retention };
        };
        let mut out: Vec<SinkConfig> = Vec::new();
        for (i, item) in sinks.into_iter().enumerate() {
            let path = join_index("usage.sinks", i);
            let Some(sink) = self.issues.take(item, &path) else {
                continue;
            };
            if let Some(sink) = self.sink(sink, &path, mode, keys) {
                if let Some(j) = out.iter().position(|s| *s == sink) {
                    self.issues
                        .add(&path, format!("same sink as an earlier entry (index {j}): usage would be counted twice"));
                } else {
                    out.push(sink);
                }
            }
        }
        UsageConfig { flush_interval, spool, sinks: out, retention }
    }

    /// `usage.retention`: each age at least the finer one's, so a rollup never
    /// reaches buckets younger than those it rolls up into.
    pub(super) fn retention(&mut self, raw: Option<Parsed<RawRetention>>, mode: Option<Mode>) -> UsageRetention {
        let defaults = UsageRetention::default();
        let Some(raw) = self.parsed(raw, "usage.retention") else {
            return defaults;
        };
        if mode == Some(Mode::Gateway) {
            self.issues.add(
                "usage.retention",
                "a gateway has no store: retention applies where usage is stored (standalone or control-plane)",
            );
            return defaults;
        }
        let issues_before = self.issues.list.len();
        let minute = self.duration(raw.minute, "usage.retention.minute", defaults.minute, false);
        let hour = self.duration(raw.hour, "usage.retention.hour", defaults.hour, false);
        let day = self.duration(raw.day, "usage.retention.day", defaults.day, false);
        if self.issues.list.len() > issues_before {
            // Comparing against a default put in for a bad value would only confuse.
            return UsageRetention { minute, hour, day };
        }
        let shown = format_duration;
        if minute < UsageRetention::MIN_MINUTE {
            self.issues.add(
                "usage.retention.minute",
                format!(
                    "must be at least {}: minutes are rolled up a whole hour at a time",
                    shown(UsageRetention::MIN_MINUTE)
                ),
            );
        }
        if hour < minute {
            self.issues
                .add("usage.retention.hour", format!("must be at least usage.retention.minute ({})", shown(minute)));
        }
        if day < hour {
            self.issues.add("usage.retention.day", format!("must be at least usage.retention.hour ({})", shown(hour)));
        } else if day < UsageRetention::MIN_DAY {
            self.issues.add(
                "usage.retention.day",
                format!(
                    "must be at least {}: monthly quotas count the usage stored since the first of the month",
                    shown(UsageRetention::MIN_DAY)
                ),
            );
        }
        UsageRetention { minute, hour, day }
    }

    pub(super) fn sink(
        &mut self,
        raw: RawSink,
        path: &str,
        mode: Option<Mode>,
        keys: Option<&KeysConfig>,
    ) -> Option<SinkConfig> {
        let type_path = join_key(path, "type");
        let kind = self.required(raw.kind.clone(), &type_path)?;
        // Which sink types take each optional field.
        let fields: [(&str, bool, &[&str]); 7] = [
            ("path", raw.path.is_some(), &["file"]),
            ("url", raw.url.is_some(), &["http", "nats"]),
            ("format", raw.format.is_some(), &["http"]),
            ("batch_size", raw.batch_size.is_some(), &["http"]),
            ("secret", raw.secret.is_some(), &["http"]),
            ("headers", raw.headers.is_some(), &["http"]),
            ("subject", raw.subject.is_some(), &["nats"]),
        ];
        let known = ["store", "control_plane", "file", "http", "nats"].contains(&kind.as_str());
        for (field, present, takers) in fields {
            if present && known && !takers.contains(&kind.as_str()) {
                let takers = takers.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" or ");
                self.issues.add(&join_key(path, field), format!("only a sink of type {takers} takes `{field}`"));
            }
        }
        match kind.as_str() {
            "store" => {
                if mode == Some(Mode::Gateway) {
                    self.issues.add(&type_path, "a gateway has no store: use { type: control_plane } or a file sink");
                }
                Some(SinkConfig::Store)
            }
            "control_plane" => {
                if mode.is_some_and(|m| m != Mode::Gateway) {
                    self.issues.add(&type_path, "only gateways send usage to a control plane: use { type: store }");
                } else if keys.is_some_and(|k| k.control_plane.is_none())
                    && !self.issues.list.iter().any(|i| i.path.starts_with("keys.control_plane"))
                {
                    self.issues.add(&type_path, "needs keys.control_plane, the control plane to send usage to");
                }
                Some(SinkConfig::ControlPlane)
            }
            "file" => {
                let file = self.required_nonblank(raw.path, &join_key(path, "path"))?;
                Some(SinkConfig::File { path: PathBuf::from(file) })
            }
            "http" => self.http_sink(raw, path).map(SinkConfig::Http),
            "nats" => self.nats_sink(raw, path).map(SinkConfig::Nats),
            other => {
                self.issues.add(
                    &type_path,
                    format!("unknown sink type {other:?}, expected `store`, `control_plane`, `file`, `http` or `nats`"),
                );
                None
            }
        }
    }

    pub(super) fn http_sink(&mut self, raw: RawSink, path: &str) -> Option<HttpSinkConfig> {
        /// Headers the sink writes itself: the body's framing and type, and the signature.
        const SET_BY_THE_SINK: &[&str] = &[
            "connection",
            "content-length",
            "content-type",
            "host",
            "transfer-encoding",
            "webhook-id",
            "webhook-signature",
            "webhook-timestamp",
        ];
        let url_path = join_key(path, "url");
        let url = self.required_nonblank(raw.url, &url_path).filter(|url| self.check_http_url(url, &url_path));
        let format_path = join_key(path, "format");
        let format = match raw.format {
            Some(Text(f)) if f == "cloudevents" => Some(EventFormat::CloudEvents),
            Some(Text(other)) => {
                self.issues.add(&format_path, format!("unknown format {other:?}, expected `cloudevents`"));
                None
            }
            None => {
                self.issues.add(&format_path, format!("{MISSING}: the only format is `cloudevents`"));
                None
            }
        };
        let batch_size = match raw.batch_size {
            None => DEFAULT_SINK_BATCH_SIZE,
            Some(raw::Num(n)) if (1..=MAX_SINK_BATCH_SIZE as u32).contains(&n) => n as usize,
            Some(raw::Num(n)) => {
                self.issues.add(
                    &join_key(path, "batch_size"),
                    format!("must be between 1 and {MAX_SINK_BATCH_SIZE}, found {n}"),
                );
                DEFAULT_SINK_BATCH_SIZE
            }
        };
        let secret = raw.secret.and_then(|secret| self.signing_secret(Some(secret), &join_key(path, "secret")));
        let headers = self.header_list(raw.headers, &join_key(path, "headers"), SET_BY_THE_SINK, "is set by the sink");
        Some(HttpSinkConfig { url: url?, format: format?, batch_size, secret, headers })
    }

    pub(super) fn nats_sink(&mut self, raw: RawSink, path: &str) -> Option<NatsSinkConfig> {
        let url_path = join_key(path, "url");
        let url = self.required_nonblank(raw.url, &url_path).filter(|url| {
            let ok = (url.starts_with("nats://") || url.starts_with("tls://"))
                && url.parse::<http::Uri>().ok().and_then(|u| u.host().map(|h| !h.is_empty())).unwrap_or(false);
            if !ok {
                self.issues.add(&url_path, format!("expected a nats:// or tls:// URL with a host, found {url:?}"));
            }
            ok
        });
        let subject_path = join_key(path, "subject");
        let subject = self.required_nonblank(raw.subject, &subject_path).filter(|subject| {
            let tokens_ok = subject.split('.').all(|token| !token.is_empty() && token != "*" && token != ">");
            let ok = tokens_ok && !subject.chars().any(char::is_whitespace);
            if !ok {
                self.issues.add(
                    &subject_path,
                    format!("{subject:?} is not a subject to publish to: dot-separated names, no spaces, no wildcards"),
                );
            }
            ok
        });
        Some(NatsSinkConfig { url: url?, subject: subject? })
    }
}
