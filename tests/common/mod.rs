//! Black-box harness for keygate: a recording upstream, a wrapper around a real
//! `keygate serve` process, a raw HTTP/1.1 client, key helpers and throwaway
//! PostgreSQL databases; the tests depend on nothing but the binary's external behaviour.
//!
//! One module, since every test binary includes it whole (`mod common;`); the
//! browser, which only the console tests need, is apart in `browser.rs`.

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

/// A headless Chromium through WebDriver, for tests/console.rs.
pub mod browser;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod sse;
pub mod standard_webhooks;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// How long a test waits for something eventually-consistent (hot reload, health checks).
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// A port free now and not handed out before in this test binary: the kernel may give a
/// port just released to the next bind, so two calls in a row (listener, admin) could
/// otherwise name the same port.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

// ---------------------------------------------------------------------------
// HTTP/1.1 message parsing shared by the upstream and the client.
// ---------------------------------------------------------------------------

type Headers = Vec<(String, String)>;

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Reads one CRLF/LF-terminated line; `None` on EOF before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line"));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads a start line and headers (names lowercased); `None` on a clean EOF.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let start = match read_line(r)? {
        Some(l) => l,
        None => return Ok(None),
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in headers"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Some((start, headers)))
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn header_all<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunk size"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while let Some(l) = read_line(r)? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        read_line(r)?;
    }
}

/// Reads a body framed by Content-Length or chunked encoding; `None` if neither.
fn read_framed_body(r: &mut impl BufRead, headers: &Headers) -> io::Result<Option<Vec<u8>>> {
    if header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return read_chunked(r).map(Some);
    }
    if let Some(len) = header(headers, "content-length") {
        let len: usize = len.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(Some(body));
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Upstream: a recording HTTP/1.1 server.
// ---------------------------------------------------------------------------

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path with query, exactly as sent on the request line.
    pub target: String,
    /// Lowercased names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_all(&self.headers, name)
    }
    /// True if `needle` occurs anywhere in the request line, headers or body.
    pub fn contains(&self, needle: &str) -> bool {
        self.target.contains(needle)
            || self.headers.iter().any(|(n, v)| n.contains(needle) || v.contains(needle))
            || String::from_utf8_lossy(&self.body).contains(needle)
    }
}

struct UpstreamState {
    name: String,
    requests: Mutex<Vec<Recorded>>,
    health_checks: AtomicUsize,
    unhealthy: AtomicBool,
    slow: Mutex<Duration>,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// A thread-per-connection HTTP/1.1 server on 127.0.0.1:0. Answers 200 JSON
/// echoing the request and `x-upstream: <name>`; any path containing `/slow` sleeps first;
/// `/healthz` answers 200, or 500 once switched unhealthy. Health checks are
/// counted, not recorded, so `requests()` holds only proxied traffic.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            requests: Mutex::new(Vec::new()),
            health_checks: AtomicUsize::new(0),
            unhealthy: AtomicBool::new(false),
            slow: Mutex::new(Duration::from_secs(3)),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(clone) = stream.try_clone() {
                    st.conns.lock().unwrap().push(clone);
                }
                let st = st.clone();
                thread::spawn(move || {
                    let _ = serve_upstream_conn(stream, &st);
                });
            }
        });
        Upstream { addr, state, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
    pub fn name(&self) -> &str {
        &self.state.name
    }
    /// Every proxied (non-health-check) request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
    /// The most recent proxied request; panics if there is none.
    pub fn last(&self) -> Recorded {
        self.requests().pop().unwrap_or_else(|| panic!("upstream {} received no request", self.name()))
    }
    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }
    pub fn set_healthy(&self, healthy: bool) {
        self.state.unhealthy.store(!healthy, Ordering::SeqCst);
    }
    pub fn set_slow(&self, d: Duration) {
        *self.state.slow.lock().unwrap() = d;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn serve_upstream_conn(stream: TcpStream, st: &UpstreamState) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some((start, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let body = read_framed_body(&mut reader, &headers)?.unwrap_or_default();
        let path = target.split('?').next().unwrap_or("");
        let status = if path == "/healthz" {
            st.health_checks.fetch_add(1, Ordering::SeqCst);
            if st.unhealthy.load(Ordering::SeqCst) {
                500
            } else {
                200
            }
        } else {
            // Record before answering, so a client that has its response can
            // rely on the record being there.
            st.requests.lock().unwrap().push(Recorded {
                method: method.clone(),
                target: target.clone(),
                headers: headers.clone(),
                body: body.clone(),
            });
            if path.contains("/slow") {
                let d = *st.slow.lock().unwrap();
                thread::sleep(d);
            }
            200
        };
        let echo = serde_json::json!({
            "upstream": st.name,
            "method": method,
            "target": target,
            "headers": headers,
        })
        .to_string();
        let close = header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-upstream: {}\r\n{}\r\n",
            if status == 200 { "OK" } else { "Internal Server Error" },
            echo.len(),
            st.name,
            if close { "connection: close\r\n" } else { "" },
        )
        .into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(echo.as_bytes());
        }
        writer.write_all(&out)?;
        if close {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Client.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Lowercased names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_all(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("response body is not JSON ({e}): status {} body {:?}", self.status, self.text())
        })
    }
    /// Which upstream answered (from the test upstream's `x-upstream` header).
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }
}

/// One client connection; requests on it reuse the socket (keep-alive), and
/// raw or malformed bytes can be written as they are.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let writer = stream.try_clone().unwrap();
        Conn { reader: BufReader::new(stream), writer }
    }

    pub fn set_read_timeout(&self, d: Duration) {
        self.writer.set_read_timeout(Some(d)).unwrap();
    }

    pub fn write(&mut self, raw: &[u8]) -> io::Result<()> {
        self.writer.write_all(raw)?;
        self.writer.flush()
    }

    /// Reads one response. `head` says the request was HEAD (no body follows).
    pub fn read_response(&mut self, head: bool) -> io::Result<Response> {
        let (start, headers) = read_head(&mut self.reader)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"))?;
        let status: u16 = start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {start:?}")))?;
        let body = if head || status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if let Some(b) = read_framed_body(&mut self.reader, &headers)? {
            b
        } else {
            let mut b = Vec::new();
            self.reader.read_to_end(&mut b)?;
            b
        };
        Ok(Response { status, headers, body })
    }

    pub fn try_send(&mut self, raw: &[u8]) -> io::Result<Response> {
        self.write(raw)?;
        self.read_response(raw.starts_with(b"HEAD "))
    }

    pub fn send(&mut self, raw: &[u8]) -> Response {
        self.try_send(raw)
            .unwrap_or_else(|e| panic!("request failed: {e}\n--- request ---\n{}", String::from_utf8_lossy(raw)))
    }

    /// Waits up to `d` for anything more from the server. `None` means the
    /// server stayed silent or closed the connection.
    pub fn unexpected_response(&mut self, d: Duration) -> Option<Response> {
        self.set_read_timeout(d);
        match self.read_response(false) {
            Ok(r) => Some(r),
            Err(e) if is_timeout(&e) => None,
            Err(_) => None,
        }
    }
}

/// Builds a raw HTTP/1.1 request; adds `Host: localhost` unless given.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        s.push_str("Host: localhost\r\n");
    }
    for (n, v) in headers {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// A request with a Content-Length body.
pub fn request_with_body(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let len = body.len().to_string();
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("Content-Length", &len));
    let mut raw = request(method, target, &h);
    raw.extend_from_slice(body);
    raw
}

/// One request on a fresh connection.
pub fn send_to(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    Conn::open(addr).send(&request(method, target, headers))
}

pub fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Response {
    send_to(addr, "GET", target, headers)
}

// ---------------------------------------------------------------------------
// Error-shape assertions (CONTRACT §5).
// ---------------------------------------------------------------------------

/// Asserts `resp` is keygate's JSON error `code` with `status`, and returns its
/// request_id. 401s must carry the Bearer challenge. Key denials (which only a
/// request naming a key can get) must carry `X-Request-Id`; wherever the
/// header is present it equals the body's id. Callers assert the header for
/// other keyed requests themselves.
#[track_caller]
pub fn assert_error(resp: &Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status, status, "expected {status} {code}, got {} with body {}", resp.status, resp.text());
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "error {code} has content-type {ct:?}, want application/json");
    let v = resp.json();
    let err = &v["error"];
    assert_eq!(err["code"], code, "wrong error code in {v}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {v}");
    let id = err["request_id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("error without a request_id: {v}"))
        .to_string();
    if status == 401 {
        assert_eq!(
            resp.header("www-authenticate"),
            Some(r#"Bearer realm="keygate""#),
            "401 {code} without the Bearer challenge"
        );
    }
    match resp.header("x-request-id") {
        Some(h) => assert_eq!(h, id, "X-Request-Id differs from the error's request_id"),
        None => assert!(
            !matches!(
                code,
                "invalid_key"
                    | "key_revoked"
                    | "key_expired"
                    | "key_disabled"
                    | "ip_not_allowed"
                    | "insufficient_scope"
            ),
            "{code} response to a keyed request lacks X-Request-Id"
        ),
    }
    id
}

/// Asserts a 200 that came from one of the test upstreams.
#[track_caller]
pub fn assert_proxied(resp: &Response) {
    assert_eq!(resp.status, 200, "expected the upstream's 200, got {} with body {}", resp.status, resp.text());
    assert!(resp.upstream().is_some(), "200 did not come from a test upstream: {:?}", resp.headers);
}

// ---------------------------------------------------------------------------
// Keys.
// ---------------------------------------------------------------------------

/// Runs `keygate gen-key [--prefix P]` and returns (key, hash).
pub fn gen_key(prefix: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("gen-key");
    if let Some(p) = prefix {
        cmd.args(["--prefix", p]);
    }
    let out = cmd.output().expect("run keygate gen-key");
    assert!(out.status.success(), "gen-key failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("gen-key prints UTF-8");
    let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
    let key = lines.next().expect("gen-key printed no key").to_string();
    let hash = lines.next().expect("gen-key printed no hash").to_string();
    (key, hash)
}

/// A key generated by the binary, with the id it gets in a keys file.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub id: String,
    pub raw: String,
    pub hash: String,
}

impl TestKey {
    pub fn new(id: &str) -> TestKey {
        Self::with_prefix(id, None)
    }

    pub fn with_prefix(id: &str, prefix: Option<&str>) -> TestKey {
        let (raw, hash) = gen_key(prefix);
        TestKey { id: id.to_string(), raw, hash }
    }

    /// A keys-file entry; `fields` are extra YAML lines (e.g. "scopes: [a]").
    pub fn entry(&self, fields: &str) -> String {
        let mut s = format!(
            "  - id: {}\n    hash: \"{}\"\n    name: {}\n    owner: acme\n",
            self.id,
            self.hash,
            self.id.trim_start_matches("key_")
        );
        for line in fields.lines().filter(|l| !l.trim().is_empty()) {
            s.push_str("    ");
            s.push_str(line.trim());
            s.push('\n');
        }
        s
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.raw)
    }
}

/// A whole keys file from entries made by `TestKey::entry`.
pub fn keys_file(entries: &[String]) -> String {
    if entries.is_empty() {
        return "keys: []\n".to_string();
    }
    format!("keys:\n{}", entries.concat())
}

/// `key` with its last (checksum) character changed: still well-formed, but
/// the checksum no longer matches.
pub fn with_bad_checksum(key: &str) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    let last = chars.last_mut().unwrap();
    *last = if *last == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------
// Gateway process.
// ---------------------------------------------------------------------------

/// The head every gateway test config shares; tests append their upstreams,
/// routes and `access_log`. `@LISTEN@`, `@ADMIN@` and `@KEYS@` are filled in by
/// `GatewayBuilder::start` with fresh ports and the temp keys file.
pub fn gateway_config(body: &str) -> String {
    format!(
        "mode: gateway
node_id: test-gw
threads: 1
listeners:
  - address: @LISTEN@
admin:
  address: @ADMIN@
keys:
  source: file
  file: @KEYS@
{body}"
    )
}

/// A one-upstream config with an `auth: none` route and a keyed route that
/// accepts any method but needs `orders:read`; `@UP@` is the upstream and `extra`
/// goes in before `access_log: off`.
pub fn simple_config(extra: &str) -> String {
    gateway_config(&format!(
        r#"upstreams:
  api:
    targets: ["@UP@"]
    connect_timeout: 1s
    read_timeout: 5s
routes:
  - {{ name: public, match: {{ path_prefix: /public }}, upstream: api, auth: none }}
  - name: orders
    match: {{ path_prefix: /v1/orders }}
    upstream: api
    scopes: [orders:read]
{extra}access_log: off
"#
    ))
}

pub struct GatewayBuilder {
    config: String,
    keys: String,
    vars: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl GatewayBuilder {
    pub fn new(config: &str) -> GatewayBuilder {
        GatewayBuilder { config: config.to_string(), keys: keys_file(&[]), vars: Vec::new(), env: Vec::new() }
    }
    pub fn keys(mut self, yaml: &str) -> Self {
        self.keys = yaml.to_string();
        self
    }
    /// Replaces `@NAME@` in the config.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((format!("@{name}@"), value.to_string()));
        self
    }
    /// Sets an environment variable for the gateway process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let keys_path = dir.path().join("keys.yaml");
        let mut config = self
            .config
            .replace("@LISTEN@", &addr.to_string())
            .replace("@ADMIN@", &admin.to_string())
            .replace("@KEYS@", &keys_path.display().to_string());
        for (k, v) in &self.vars {
            config = config.replace(k, v);
        }
        assert_no_placeholders(&config);
        let config_path = dir.path().join("keygate.yaml");
        fs::write(&config_path, &config).unwrap();
        fs::write(&keys_path, &self.keys).unwrap();
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn keygate serve");
        let mut gw = Gateway { addr, admin, config_path, keys_path, stdout_path, stderr_path, child: Some(child), dir };
        gw.wait_listening(addr, &config);
        gw
    }
}

fn assert_no_placeholders(config: &str) {
    for (i, part) in config.split('@').enumerate() {
        if i % 2 == 1
            && !part.is_empty()
            && part.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            panic!("config still has placeholder @{part}@:\n{config}");
        }
    }
}

/// A running `keygate serve`, killed on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub keys_path: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// A gateway from a full config (see `gateway_config`) and a keys file.
    pub fn start(config: &str, keys: &str) -> Gateway {
        GatewayBuilder::new(config).keys(keys).start()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until `addr` accepts connections; panics with the captured
    /// output if the process exits or 20 s pass.
    pub fn wait_listening(&mut self, addr: SocketAddr, config: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "keygate serve exited early with {status}\n--- config ---\n{config}\n--- output ---\n{}",
                    self.output()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "keygate did not listen on {addr} within 20 s\n--- config ---\n{config}\n--- output ---\n{}",
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, target: &str, headers: &[(&str, &str)]) -> Response {
        get(self.addr, target, headers)
    }

    pub fn send(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
        send_to(self.addr, method, target, headers)
    }

    pub fn conn(&self) -> Conn {
        Conn::open(self.addr)
    }

    /// Overwrites the keys file in place (truncate and write, same inode).
    pub fn write_keys_in_place(&self, yaml: &str) {
        let mut f = fs::OpenOptions::new().write(true).truncate(true).open(&self.keys_path).unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }

    /// Replaces the keys file atomically: write a temp file beside it, rename over.
    pub fn replace_keys(&self, yaml: &str) {
        let tmp = self.dir.path().join(".keys.yaml.tmp");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, &self.keys_path).unwrap();
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Captured stdout and stderr so far.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout(), fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s) and returns
    /// everything it wrote to stdout and stderr.
    pub fn stop(mut self) -> String {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
        self.output()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Running the CLI.
// ---------------------------------------------------------------------------

/// Runs the binary with `args` and optional stdin; returns its output.
pub fn run_cli(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)], env_remove: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in env_remove {
        cmd.env_remove(k);
    }
    let mut child = cmd.spawn().expect("spawn keygate");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().expect("wait for keygate")
}

/// Resolves "host:port" to a socket address.
pub fn sock(addr: &str) -> SocketAddr {
    addr.to_socket_addrs().unwrap().next().unwrap()
}

// ---------------------------------------------------------------------------
// Admin address and exit status (appended for tests/limits_usage.rs).
// ---------------------------------------------------------------------------

impl Gateway {
    /// The admin listener (`@ADMIN@`): /healthz, /readyz, /metrics.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// One GET to the admin listener on a fresh connection.
    pub fn admin_get(&self, target: &str) -> Response {
        get(self.admin, target, &[])
    }

    /// Like `stop`, but also returns how the process ended: `Some(status)` if it
    /// exited by itself within 10 s of SIGTERM, `None` if it had to be killed.
    pub fn stop_with_status(mut self) -> (Option<std::process::ExitStatus>, String) {
        let exit = self.child.take().and_then(terminate);
        (exit, self.output())
    }
}

// ---------------------------------------------------------------------------
// Nodes in any mode, and a client for the admin API (appended for
// tests/control_plane.rs).
// ---------------------------------------------------------------------------

/// One request on a fresh connection, or the I/O error (nothing listening,
/// connection reset) instead of a panic.
pub fn try_send_to(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let writer = stream.try_clone()?;
    let mut conn = Conn { reader: BufReader::new(stream), writer };
    conn.try_send(raw)
}

/// A `keygate serve` process started from a config template. The template may
/// use `@ADMIN@` and `@LISTEN@` (fresh ports, unless `admin_addr` fixes the
/// admin one), `@DIR@` (the node's own temp dir, kept across restarts),
/// `@NODE@` (a node id unique to this node) and any `@NAME@` given with `var`,
/// which is replaced first (so a value may itself contain `@DIR@`).
pub struct NodeBuilder {
    template: String,
    vars: Vec<(String, String)>,
    env: Vec<(String, String)>,
    admin: Option<SocketAddr>,
}

impl NodeBuilder {
    pub fn new(template: &str) -> NodeBuilder {
        NodeBuilder { template: template.to_string(), vars: Vec::new(), env: Vec::new(), admin: None }
    }
    /// Replaces `@NAME@` in the template.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((format!("@{name}@"), value.to_string()));
        self
    }
    /// Sets an environment variable for the process (on every restart too).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }
    /// Uses this admin address instead of a fresh port (e.g. one that gateways
    /// were already pointed at before this node started).
    pub fn admin_addr(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Writes the config and starts the node; see `Node::restart` for when it returns.
    pub fn start(self) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = self.admin.unwrap_or_else(|| sock(&format!("127.0.0.1:{}", free_port())));
        let listen = sock(&format!("127.0.0.1:{}", free_port()));
        let mut config = self.template.clone();
        for (k, v) in &self.vars {
            config = config.replace(k, v);
        }
        let uses_listen = config.contains("@LISTEN@");
        config = config
            .replace("@ADMIN@", &admin.to_string())
            .replace("@LISTEN@", &listen.to_string())
            .replace("@DIR@", &dir.path().display().to_string())
            .replace("@NODE@", &format!("node-{}", admin.port()));
        assert_no_placeholders(&config);
        let config_path = dir.path().join("keygate.yaml");
        fs::write(&config_path, &config).unwrap();
        let mut node = Node {
            admin,
            listen,
            uses_listen,
            config,
            config_path,
            stdout_path: dir.path().join("stdout.log"),
            stderr_path: dir.path().join("stderr.log"),
            env: self.env,
            child: None,
            dir,
        };
        node.restart();
        node
    }
}

/// A running `keygate serve` in any mode, killed on drop. Its temp dir (config,
/// logs, SQLite files, cache files under `@DIR@`) lives as long as the `Node`.
pub struct Node {
    pub admin: SocketAddr,
    /// The proxy listener (`@LISTEN@`); meaningful only if the template used it.
    pub listen: SocketAddr,
    uses_listen: bool,
    pub config: String,
    config_path: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Node {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the node wrote to stdout and stderr, over all its runs.
    pub fn output(&self) -> String {
        format!(
            "{}{}",
            fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Starts the same config again in the same dir, on the same ports (killing
    /// a still-running process first). Returns once `/healthz` on the admin
    /// address answers 200 and, for a node with a proxy listener, that listener
    /// accepts connections; panics with the node's output if the process exits
    /// or 20 s pass.
    pub fn restart(&mut self) {
        self.kill();
        let append = |p: &Path| fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(append(&self.stdout_path))
            .stderr(append(&self.stderr_path));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn keygate serve"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "keygate serve exited early with {status}\n--- config ---\n{}\n--- output ---\n{}",
                    self.config,
                    self.output()
                );
            }
            let healthy = try_send_to(self.admin, &request("GET", "/healthz", &[])).is_ok_and(|r| r.status == 200);
            let listening =
                !self.uses_listen || TcpStream::connect_timeout(&self.listen, Duration::from_millis(200)).is_ok();
            if healthy && listening {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "keygate did not come up within 20 s (admin {}, listener {})\n--- config ---\n{}\n--- output ---\n{}",
                    self.admin,
                    self.listen,
                    self.config,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no draining, no final flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s. `Some(status)` if it exited by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        terminate(self.child.take()?)
    }

    /// One request to the proxy listener on a fresh connection.
    pub fn get(&self, target: &str, headers: &[(&str, &str)]) -> Response {
        get(self.listen, target, headers)
    }

    /// One GET to the admin address on a fresh connection, without a token.
    pub fn admin_get(&self, target: &str) -> Response {
        get(self.admin, target, &[])
    }

    /// The value of one series in `/metrics`, e.g. `keygate_sync_errors_total`
    /// or `keygate_usage_flush_total{sink="store",result="ok"}` (labels as the
    /// exposition writes them); `None` if absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").text();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One admin API call on a fresh connection: `Authorization: Bearer <token>`
/// when a token is given, and a JSON body when one is given.
pub fn admin_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("Connection", "close")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    let raw = match body {
        Some(body) => {
            headers.push(("Content-Type", "application/json"));
            request_with_body(method, path, &headers, body.to_string().as_bytes())
        }
        None => request(method, path, &headers),
    };
    try_send_to(addr, &raw).unwrap_or_else(|e| panic!("{method} {path} to {addr} failed: {e}"))
}

/// `admin_request`, answered as (status, headers, JSON body). An empty body is
/// `Null`; a body that is not JSON comes back as a JSON string.
pub fn admin_json(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let resp = admin_request(method, addr, path, token, body);
    let value = if resp.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&resp.body).unwrap_or_else(|_| Value::String(resp.text()))
    };
    (resp.status, resp.headers, value)
}

impl Gateway {
    /// Sends a signal (`HUP`, `QUIT`, ...) to the running gateway.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the gateway is running");
        let status =
            Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The value of one series on the admin address's `/metrics`, if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").text();
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Gateway {
    /// Waits for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL test server
// ---------------------------------------------------------------------------

/// The test server when `KEYGATE_TEST_POSTGRES_URL` is unset.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The PostgreSQL server the tests create their databases on.
pub fn postgres_server() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// `server` with its database path replaced by `name`, keeping any `?query`.
pub fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..authority_end])
}

/// A fresh `<prefix>_*` database on the test PostgreSQL server, dropped (WITH FORCE) on drop.
/// If the server is unreachable the test fails; it never skips.
pub struct PgDb {
    server: String,
    pub name: String,
    pub url: String,
}

impl PgDb {
    pub fn create(prefix: &str) -> PgDb {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let server = postgres_server();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("{prefix}_{}_{}_{nanos}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        pg_exec(&server, &format!("CREATE DATABASE {name}")).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {server} is unreachable or refused CREATE DATABASE ({e}). These tests need a \
                 PostgreSQL server: start one or point KEYGATE_TEST_POSTGRES_URL at it."
            )
        });
        let url = with_database(&server, &name);
        PgDb { server, name, url }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Err(e) = pg_exec(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs one statement on its own connection and runtime (the tests are synchronous).
pub fn pg_exec(server: &str, sql: &str) -> Result<(), String> {
    use sqlx::Connection as _;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let work = async {
            let mut conn = sqlx::PgConnection::connect(server).await?;
            sqlx::query(sql).execute(&mut conn).await?;
            conn.close().await
        };
        match tokio::time::timeout(Duration::from_secs(15), work).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 15 s".to_owned()),
        }
    })
}

/// SIGTERM, then SIGKILL after 10 s. `Some(status)` if the process exited by itself.
pub fn terminate(mut child: Child) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
