//! What shapes a request: `key_locations`, `upstreams`, `routes` and `http`.

use super::*;

impl Builder<'_> {
    pub(super) fn key_locations(&mut self, raw: Option<Parsed<Vec<Parsed<RawKeyLocation>>>>) -> Vec<KeyLocation> {
        let Some(parsed) = raw else {
            return vec![
                KeyLocation::Header { name: http::header::AUTHORIZATION, scheme: Some("Bearer".to_owned()) },
                KeyLocation::Header { name: http::HeaderName::from_static("x-api-key"), scheme: None },
                KeyLocation::Query { name: "api_key".to_owned() },
            ];
        };
        let Some(items) = self.issues.take(parsed, "key_locations") else {
            return Vec::new();
        };
        if items.is_empty() {
            self.issues.add(
                "key_locations",
                "at least one key location is required (leave `key_locations` out for the defaults)",
            );
        }
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = join_index("key_locations", i);
            let Some(location) = self.issues.take(item, &path) else {
                continue;
            };
            match (location.header, location.query) {
                (Some(Text(header)), None) => {
                    let header_path = join_key(&path, "header");
                    let name = match http::HeaderName::from_bytes(header.trim().to_ascii_lowercase().as_bytes()) {
                        Ok(name) => Some(name),
                        Err(_) => {
                            self.issues.add(&header_path, format!("{header:?} is not a valid header name"));
                            None
                        }
                    };
                    let scheme = location.scheme.and_then(|Text(scheme)| {
                        let scheme = scheme.trim().to_owned();
                        if scheme.is_empty() || !scheme.bytes().all(is_token_byte) {
                            self.issues.add(
                                &join_key(&path, "scheme"),
                                format!("{scheme:?} is not a valid auth scheme (one word, like Bearer)"),
                            );
                            None
                        } else {
                            Some(scheme)
                        }
                    });
                    if let Some(name) = name {
                        out.push(KeyLocation::Header { name, scheme });
                    }
                }
                (None, Some(Text(query))) => {
                    if location.scheme.is_some() {
                        self.issues.add(&join_key(&path, "scheme"), "`scheme` applies to `header` locations only");
                    }
                    let query = query.trim().to_owned();
                    if query.is_empty() || query.contains(['&', '=', '#', '?', ' ']) {
                        self.issues
                            .add(&join_key(&path, "query"), format!("{query:?} is not a valid query parameter name"));
                    } else {
                        out.push(KeyLocation::Query { name: query });
                    }
                }
                (Some(_), Some(_)) => self.issues.add(&path, "give either `header` or `query`, not both"),
                (None, None) => {
                    self.issues.add(&path, "needs `header: <name>` (optionally with `scheme`) or `query: <name>`")
                }
            }
        }
        out
    }

    /// Also returns every declared upstream name (even of entries that failed),
    /// or None when the section itself is unreadable.
    pub(super) fn upstreams(
        &mut self,
        raw: Option<Parsed<Entries<Parsed<RawUpstream>>>>,
    ) -> (BTreeMap<String, UpstreamConfig>, Option<BTreeSet<String>>) {
        let mut out = BTreeMap::new();
        let Some(parsed) = raw else {
            return (out, Some(BTreeSet::new()));
        };
        let Some(Entries(entries)) = self.issues.take(parsed, "upstreams") else {
            return (out, None);
        };
        let names = entries.iter().map(|(name, _)| name.clone()).collect();
        for (name, item) in entries {
            let path = join_key("upstreams", &name);
            if name.trim().is_empty() {
                self.issues.add(&path, "upstream names must not be empty");
            }
            let Some(upstream) = self.issues.take(item, &path) else {
                continue;
            };
            let config = self.upstream(upstream, &path);
            out.insert(name, config);
        }
        (out, Some(names))
    }

    pub(super) fn upstream(&mut self, raw: RawUpstream, path: &str) -> UpstreamConfig {
        let targets_path = join_key(path, "targets");
        let mut targets = Vec::new();
        match raw.targets {
            None => self.issues.add(&targets_path, MISSING),
            Some(list) if list.is_empty() => self.issues.add(&targets_path, "at least one target is required"),
            Some(list) => {
                for (i, Text(target)) in list.into_iter().enumerate() {
                    let target_path = join_index(&targets_path, i);
                    match check_target(&target) {
                        Ok(target) if targets.contains(&target) => {
                            self.issues.add(&target_path, format!("duplicate target {target:?}"))
                        }
                        Ok(target) => targets.push(target),
                        Err(message) => self.issues.add(&target_path, message),
                    }
                }
            }
        }
        let tls_path = join_key(path, "tls");
        let tls = self.parsed(raw.tls, &tls_path).map(|tls| {
            let sni = tls.sni.and_then(|Text(sni)| {
                let sni = sni.trim().to_ascii_lowercase();
                if valid_host_name(&sni) {
                    Some(sni)
                } else {
                    self.issues.add(&join_key(&tls_path, "sni"), format!("{sni:?} is not a valid host name"));
                    None
                }
            });
            let ca = tls.ca.and_then(|ca| self.pem_file(Some(ca), &join_key(&tls_path, "ca"), Pem::Cert));
            UpstreamTlsConfig { sni, ca, verify: tls.verify.is_none_or(|raw::Flag(v)| v) }
        });
        let hc_path = join_key(path, "health_check");
        let health_check = self.parsed(raw.health_check, &hc_path).map(|hc| {
            let check_path = hc.path.map_or_else(|| "/".to_owned(), |Text(p)| p);
            if !check_path.starts_with('/') {
                self.issues.add(&join_key(&hc_path, "path"), "must start with '/'");
            }
            let mut threshold = |value: Option<raw::Num<u32>>, field: &str| match value {
                None => 1,
                Some(raw::Num(0)) => {
                    self.issues.add(&join_key(&hc_path, field), "must be at least 1");
                    1
                }
                Some(raw::Num(n)) => n,
            };
            let healthy_threshold = threshold(hc.healthy_threshold, "healthy_threshold");
            let unhealthy_threshold = threshold(hc.unhealthy_threshold, "unhealthy_threshold");
            HealthCheckConfig {
                path: check_path,
                interval: self.duration(hc.interval, &join_key(&hc_path, "interval"), Duration::from_secs(5), false),
                timeout: self.duration(hc.timeout, &join_key(&hc_path, "timeout"), Duration::from_secs(2), false),
                healthy_threshold,
                unhealthy_threshold,
            }
        });
        let connect_timeout =
            self.duration(raw.connect_timeout, &join_key(path, "connect_timeout"), Duration::from_secs(2), false);
        let read_timeout =
            self.duration(raw.read_timeout, &join_key(path, "read_timeout"), Duration::from_secs(30), false);
        UpstreamConfig { targets, tls, health_check, connect_timeout, read_timeout }
    }

    pub(super) fn routes(
        &mut self,
        raw: Option<Parsed<Vec<Parsed<RawRoute>>>>,
        upstreams: Option<&BTreeSet<String>>,
    ) -> Vec<RouteConfig> {
        let items = self.parsed(raw, "routes").unwrap_or_default();
        let mut out = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = join_index("routes", i);
            let Some(route) = self.issues.take(item, &path) else {
                continue;
            };
            let name_path = join_key(&path, "name");
            let name = self.required_nonblank(route.name, &name_path);
            if let Some(name) = &name {
                if let Some(first) = names.get(name) {
                    self.issues.add(
                        &name_path,
                        format!("duplicate route name {name:?}: routes[{first}] and routes[{i}] both use it"),
                    );
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let match_path = join_key(&path, "match");
            let matcher = match route.matcher {
                None => Some(RouteMatch { path_prefix: "/".to_owned(), methods: Vec::new(), host: None }),
                Some(p) => self.issues.take(p, &match_path).map(|m| self.route_match(m, &match_path)),
            };
            let upstream_path = join_key(&path, "upstream");
            let upstream = self.required_nonblank(route.upstream, &upstream_path);
            if let (Some(upstream), Some(known)) = (&upstream, upstreams) {
                if !known.contains(upstream) {
                    self.issues
                        .add(&upstream_path, format!("unknown upstream {upstream:?} (not defined under `upstreams`)"));
                }
            }
            let auth = match route.auth {
                None | Some(RawRouteAuth::Key) => RouteAuth::Key,
                Some(RawRouteAuth::None) => RouteAuth::None,
            };
            let scopes_path = join_key(&path, "scopes");
            let mut scopes = Vec::new();
            for (j, Text(scope)) in route.scopes.unwrap_or_default().into_iter().enumerate() {
                if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    self.issues.add(
                        &join_index(&scopes_path, j),
                        format!("{scope:?} is not a valid scope (non-empty, no spaces)"),
                    );
                } else {
                    scopes.push(scope);
                }
            }
            if auth == RouteAuth::None && !scopes.is_empty() {
                self.issues.add(
                    &scopes_path,
                    "a route with `auth: none` checks no key, so its scopes would be ignored: remove them or use `auth: key`",
                );
            }
            let set_headers = self.set_headers(route.set_headers, &join_key(&path, "set_headers"));
            if let (Some(name), Some(matcher), Some(upstream)) = (name, matcher, upstream) {
                out.push(RouteConfig { name, matcher, upstream, auth, scopes, set_headers });
            }
        }
        out
    }

    pub(super) fn route_match(&mut self, raw: raw::RawRouteMatch, path: &str) -> RouteMatch {
        let prefix_path = join_key(path, "path_prefix");
        let path_prefix = raw.path_prefix.map_or_else(|| "/".to_owned(), |Text(p)| p);
        if !path_prefix.starts_with('/') {
            self.issues.add(&prefix_path, "must start with '/'");
        } else if path_prefix.contains(['?', '#']) {
            self.issues.add(&prefix_path, "matches the path only: it cannot contain '?' or '#'");
        } else if path_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.issues.add(&prefix_path, "must not contain spaces or control characters");
        }
        let mut methods: Vec<http::Method> = Vec::new();
        for (i, Text(m)) in raw.methods.unwrap_or_default().into_iter().enumerate() {
            match parse_method(&m) {
                Ok(method) => {
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
                Err(message) => self.issues.add(&join_index(&join_key(path, "methods"), i), message),
            }
        }
        let host = raw.host.and_then(|Text(host)| {
            let host = host.trim().to_ascii_lowercase();
            let host_path = join_key(path, "host");
            if host.contains(':') {
                self.issues.add(&host_path, format!("{host:?}: match the host name without a port"));
                None
            } else if !valid_host_name(&host) {
                self.issues.add(&host_path, format!("{host:?} is not a valid host name"));
                None
            } else {
                Some(host)
            }
        });
        RouteMatch { path_prefix, methods, host }
    }

    pub(super) fn set_headers(
        &mut self,
        raw: Option<Entries<Text>>,
        path: &str,
    ) -> Vec<(http::HeaderName, http::HeaderValue)> {
        // Headers that frame the message or the connection: overriding them
        // would corrupt the proxied exchange.
        const FORBIDDEN: &[&str] = &[
            "connection",
            "content-length",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        self.header_list(raw, path, FORBIDDEN, "is managed by the proxy")
    }

    /// Header names and values from config, minus those in `forbidden` (refused as `{name} {why}`).
    pub(super) fn header_list(
        &mut self,
        raw: Option<Entries<Text>>,
        path: &str,
        forbidden: &[&str],
        why: &str,
    ) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let mut out: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
        for (raw_name, Text(value)) in raw.map(|e| e.0).unwrap_or_default() {
            let header_path = join_key(path, &raw_name);
            let name = match http::HeaderName::from_bytes(raw_name.to_ascii_lowercase().as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    self.issues.add(&header_path, format!("{raw_name:?} is not a valid header name"));
                    continue;
                }
            };
            if forbidden.contains(&name.as_str()) {
                self.issues.add(&header_path, format!("{name} {why} and cannot be set"));
                continue;
            }
            if out.iter().any(|(n, _)| *n == name) {
                self.issues.add(&header_path, format!("header {name} is set twice (names are case-insensitive)"));
                continue;
            }
            // The value is likely a secret: the message must not echo it.
            match http::HeaderValue::from_str(&value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    out.push((name, value));
                }
                Err(_) => self.issues.add(
                    &header_path,
                    "invalid header value: only visible ASCII characters, spaces and tabs are allowed",
                ),
            }
        }
        out
    }

    pub(super) fn http(&mut self, raw: Option<Parsed<RawHttp>>, key_locations: &[KeyLocation]) -> HttpConfig {
        let defaults = HttpConfig::default();
        let Some(raw) = self.parsed(raw, "http") else {
            return defaults;
        };
        let mut timeout = |text: Option<Text>, field: &str, default: Duration| {
            let path = join_key("http", field);
            let value = self.duration(text, &path, default, false);
            if value > super::super::MAX_HTTP_TIMEOUT {
                self.issues.add(&path, "must be at most 24h");
                return default;
            }
            value
        };
        let request_header_timeout =
            timeout(raw.request_header_timeout, "request_header_timeout", defaults.request_header_timeout);
        let idle_timeout = timeout(raw.idle_timeout, "idle_timeout", defaults.idle_timeout);
        let max_connections = match raw.max_connections {
            None => defaults.max_connections,
            Some(raw::Num(0)) => {
                self.issues.add("http.max_connections", "must be at least 1");
                defaults.max_connections
            }
            Some(raw::Num(n)) => n,
        };
        let mut choice = |text: Option<Text>, field: &str, options: &[&str]| -> Option<usize> {
            let Text(value) = text?;
            let found = options.iter().position(|o| *o == value.trim());
            if found.is_none() {
                let expected = options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ");
                self.issues.add(&join_key("http", field), format!("{value:?} is not one of {expected}"));
            }
            found
        };
        let escaped_slashes = match choice(raw.escaped_slashes, "escaped_slashes", &["reject", "pass"]) {
            Some(1) => EscapedSlashes::Pass,
            _ => EscapedSlashes::Reject,
        };
        let underscore_headers = match choice(raw.underscore_headers, "underscore_headers", &["drop", "reject", "pass"])
        {
            Some(1) => UnderscoreHeaders::Reject,
            Some(2) => UnderscoreHeaders::Pass,
            _ => UnderscoreHeaders::Drop,
        };
        if underscore_headers == UnderscoreHeaders::Reject {
            for (i, location) in key_locations.iter().enumerate() {
                if let KeyLocation::Header { name, .. } = location {
                    if name.as_str().contains('_') {
                        self.issues.add(
                            &join_key(&join_index("key_locations", i), "header"),
                            format!("{name:?} has '_', and http.underscore_headers: reject refuses every such request"),
                        );
                    }
                }
            }
        }
        HttpConfig { request_header_timeout, idle_timeout, max_connections, escaped_slashes, underscore_headers }
    }
}

/// Standard methods plus the IANA registry's extension methods (WebDAV and
/// friends) and PURGE; anything else is far likelier a typo than intended.
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "ACL",
    "BASELINE-CONTROL",
    "BIND",
    "CHECKIN",
    "CHECKOUT",
    "COPY",
    "LABEL",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "MOVE",
    "ORDERPATCH",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "QUERY",
    "REBIND",
    "REPORT",
    "SEARCH",
    "UNBIND",
    "UNCHECKOUT",
    "UNLINK",
    "UNLOCK",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
];

fn parse_method(s: &str) -> Result<http::Method, String> {
    let name = s.trim();
    if METHODS.contains(&name) {
        return http::Method::from_bytes(name.as_bytes()).map_err(|_| format!("unknown HTTP method {s:?}"));
    }
    let upper = name.to_ascii_uppercase();
    if METHODS.contains(&upper.as_str()) {
        return Err(format!("HTTP methods are case-sensitive: write {upper:?}, not {s:?}"));
    }
    Err(format!("unknown HTTP method {s:?}"))
}

/// `host:port` with a required port; hosts may be names (resolved elsewhere)
/// or IP addresses, IPv6 in brackets.
fn check_target(s: &str) -> Result<String, String> {
    let target = s.trim();
    if target.contains("://") {
        return Err(format!("{s:?}: targets are host:port without a scheme (use `tls:` for HTTPS)"));
    }
    let port = if let Some(rest) = target.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| format!("{s:?}: missing ']' after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>().map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        after.strip_prefix(':').ok_or_else(|| format!("{s:?} has no port; write [addr]:port"))?
    } else {
        let (host, port) =
            target.rsplit_once(':').ok_or_else(|| format!("{s:?} has no port; write host:port, e.g. 10.0.1.5:8000"))?;
        if host.contains(':') {
            return Err(format!("{s:?}: write IPv6 addresses in brackets, e.g. [::1]:8000"));
        }
        if !valid_host_name(host) {
            return Err(format!("{s:?}: {host:?} is not a valid host name or IP address"));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(target.to_owned()),
        _ => Err(format!("{s:?}: the port must be a number from 1 to 65535")),
    }
}

/// DNS-style names (also IPv4 literals): dot-separated labels of letters,
/// digits, '-' and '_', none empty.
fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// RFC 9110 token characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
