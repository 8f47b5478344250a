//! Hostile clients against the real `keygate serve`: slow and idle connection
//! floods, connection caps, path and header tricks, malformed requests. Each
//! test guards a hole that was found by attacking keygate from outside.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `simple_config`'s public and keyed routes with `http:` settings of the test's own.
fn start(up: &Upstream, http: &str, keys: &str) -> Gateway {
    GatewayBuilder::new(&simple_config(&format!("{http}\n"))).var("UP", &up.addr()).keys(keys).start()
}

fn raw_conn(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    stream
}

/// Reads until the server closes; returns what it sent and how long that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection still open after {:?}: {e}", started.elapsed()),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

/// The JSON body of a raw response, checked to be the contract's error `code`.
#[track_caller]
fn assert_raw_error(raw: &str, status: u16, code: &str) {
    assert!(raw.starts_with(&format!("HTTP/1.1 {status} ")), "expected {status} {code}, got {raw:?}");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {raw:?}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{json}");
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    let text = gw.admin_get("/metrics").text();
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

// ---------------------------------------------------------------------------
// Slowloris and idle connections
// ---------------------------------------------------------------------------

#[test]
fn a_request_head_sent_byte_by_byte_is_cut_at_the_header_deadline() {
    let up = Upstream::start("api");
    let gw = start(&up, "http: { request_header_timeout: 1s }", &keys_file(&[]));
    let mut stream = raw_conn(gw.addr);
    let started = Instant::now();
    let head = b"GET /public/slowloris HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    // Every byte well within any per-read timeout, the whole head never in time.
    let mut cut_at = None;
    for byte in head.iter() {
        if stream.write_all(&[*byte]).is_err() {
            cut_at = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(150));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let (answer, _) = read_until_closed(&mut stream);
    let closed_after = cut_at.unwrap_or_else(|| started.elapsed());
    assert!(closed_after < Duration::from_secs(8), "closed only after {closed_after:?}");
    assert_raw_error(&answer, 408, "request_timeout");
    assert_eq!(up.request_count(), 0);
    assert!(metric(&gw, "keygate_connections_refused_total{reason=\"header_timeout\"}") >= 1.0);
}

#[test]
fn a_connection_that_never_sends_a_request_is_closed_at_the_header_deadline() {
    let up = Upstream::start("api");
    let gw = start(&up, "http: { request_header_timeout: 1s }", &keys_file(&[]));
    let mut stream = raw_conn(gw.addr);
    let (answer, took) = read_until_closed(&mut stream);
    assert_eq!(answer, "", "nothing is answered to a client that asked nothing");
    assert!(took < Duration::from_secs(8), "closed only after {took:?}");
    assert!(metric(&gw, "keygate_connections_refused_total{reason=\"header_timeout\"}") >= 1.0);
}

#[test]
fn a_reused_connection_still_has_a_header_deadline_and_an_idle_timeout() {
    let up = Upstream::start("api");
    let gw = start(&up, "http: { request_header_timeout: 1s, idle_timeout: 2s }", &keys_file(&[]));

    // Pingora reads without any timeout once a connection was reused.
    let mut conn = gw.conn();
    assert_proxied(&conn.send(&request("GET", "/public/one", &[])));
    conn.write(b"GET /public/two HTTP/1.1\r\n").unwrap();
    thread::sleep(Duration::from_millis(200));
    conn.write(b"Host: localhost\r\n").unwrap();
    let started = Instant::now();
    let answer = conn.read_response(false).expect("an answer before the close");
    assert_error(&answer, 408, "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(8));

    // An idle keep-alive connection is closed after idle_timeout, silently.
    let mut conn = gw.conn();
    assert_proxied(&conn.send(&request("GET", "/public/three", &[])));
    let started = Instant::now();
    assert!(conn.unexpected_response(Duration::from_secs(10)).is_none());
    let idle_for = started.elapsed();
    assert!(idle_for >= Duration::from_millis(1500) && idle_for < Duration::from_secs(8), "closed after {idle_for:?}");
    assert_eq!(up.request_count(), 2);
}

#[test]
fn connections_past_max_connections_are_refused_and_counted() {
    let up = Upstream::start("api");
    let gw = start(&up, "http: { max_connections: 3 }", &keys_file(&[]));
    let held: Vec<TcpStream> = (0..3).map(|_| raw_conn(gw.addr)).collect();
    wait_until(EVENTUALLY, "three open connections", || (metric(&gw, "keygate_connections_open") == 3.0).then_some(()));

    let mut refused = raw_conn(gw.addr);
    let _ = refused.write_all(&request("GET", "/public/x", &[]));
    let (answer, took) = read_until_closed(&mut refused);
    assert_eq!(answer, "", "a refused connection is closed unanswered");
    assert!(took < Duration::from_secs(5));
    assert!(metric(&gw, "keygate_connections_refused_total{reason=\"max_connections\"}") >= 1.0);
    assert_eq!(up.request_count(), 0);

    drop(held);
    wait_until(EVENTUALLY, "connections to close", || (metric(&gw, "keygate_connections_open") == 0.0).then_some(()));
    assert_proxied(&gw.get("/public/after", &[]));
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

#[test]
fn encoded_slashes_and_dot_segments_cannot_walk_out_of_a_public_route() {
    let up = Upstream::start("api");
    let gw = start(&up, "", &keys_file(&[]));
    for target in [
        "/public/..%2Fv1/orders",
        "/public/%2E%2E%2Fv1/orders",
        "/public%2F..%2Fv1%2Forders",
        "/public/..%2fv1/orders",
        "/public/..%5Cv1/orders",
        "/public/..\\v1/orders",
        "/public/..;/v1/orders",
        "/public/%2e%2e;x=1/v1/orders",
        "/public/../v1/orders",
        "/public/x%2Fy",
        "/public/%zz",
    ] {
        let r = gw.get(target, &[]);
        assert_error(&r, 400, "bad_request");
        assert!(r.header("x-request-id").is_some(), "{target}");
    }
    assert_eq!(up.request_count(), 0, "{:?}", up.requests());
    // A fragment is no part of the path: the upstream is sent the path without it.
    assert_proxied(&gw.get("/public#/../v1/orders", &[]));
    assert_eq!(up.last().target, "/public");
}

#[test]
fn paths_are_routed_and_forwarded_in_one_reading() {
    let up = Upstream::start("api");
    let key = TestKey::new("key_ok");
    let gw = start(&up, "", &keys_file(&[key.entry("scopes: [orders:read]")]));
    // What an upstream would read as /v1/orders is the keyed route here too.
    for target in ["//v1/orders", "/v1/%6Frders", "/%76%31/orders", "/v1//orders"] {
        assert_error(&gw.get(target, &[]), 401, "missing_key");
    }
    let r = gw.get("/v1//%6Frders/7?q=a%2Fb", &[("x-api-key", &key.raw)]);
    assert_proxied(&r);
    assert_eq!(up.last().target, "/v1/orders/7?q=a%2Fb");
    assert_eq!(up.request_count(), 1);
}

#[test]
fn an_absolute_form_target_is_routed_on_its_own_authority() {
    let up = Upstream::start("api");
    let cfg = gateway_config(
        r#"upstreams:
  api: { targets: ["@UP@"] }
routes:
  - { name: public, match: { path_prefix: /, host: public.example.com }, upstream: api, auth: none }
  - { name: api, match: { path_prefix: /, host: api.example.com }, upstream: api }
access_log: off
"#,
    );
    let gw = GatewayBuilder::new(&cfg).var("UP", &up.addr()).keys(&keys_file(&[])).start();
    let r = gw.get("http://api.example.com/v1/orders", &[("Host", "api.example.com")]);
    assert_error(&r, 401, "missing_key");
    // A Host that disagrees with the target is refused outright, in keygate's shape.
    let mut stream = raw_conn(gw.addr);
    stream.write_all(&request("GET", "http://api.example.com/v1/orders", &[("Host", "public.example.com")])).unwrap();
    assert_raw_error(&read_until_closed(&mut stream).0, 400, "bad_request");
    assert_eq!(up.request_count(), 0);
    assert_proxied(&gw.get("/v1/orders", &[("Host", "public.example.com")]));
}

#[test]
fn passed_escaped_slashes_are_forwarded_as_sent_but_never_as_dot_segments() {
    let up = Upstream::start("api");
    let gw = start(&up, "http: { escaped_slashes: pass }", &keys_file(&[]));
    assert_proxied(&gw.get("/public/files/a%2Fb", &[]));
    assert_eq!(up.last().target, "/public/files/a%2Fb");
    for target in ["/public/..%2Fv1/orders", "/public%2F..%2Fv1%2Forders"] {
        assert_error(&gw.get(target, &[]), 400, "bad_request");
    }
    assert_eq!(up.request_count(), 1);
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

/// Whether the upstream got a header an upstream could read as keygate's `name`.
fn has_spelling_of(rec: &Recorded, name: &str) -> Vec<String> {
    rec.headers
        .iter()
        .filter(|(n, _)| n.replace('_', "-").eq_ignore_ascii_case(name))
        .map(|(n, v)| format!("{n}: {v}"))
        .collect()
}

#[test]
fn underscore_spellings_of_identity_headers_never_reach_the_upstream() {
    let up = Upstream::start("api");
    let key = TestKey::new("key_ok");
    for http in ["", "http: { underscore_headers: pass }"] {
        let gw = start(&up, http, &keys_file(&[key.entry("scopes: [orders:read]")]));
        let forged = [
            ("X_Keygate_Key_Id", "key_admin"),
            ("X_Keygate_Scopes", "*"),
            ("x_keygate-owner", "root"),
            ("X-Keygate_Plan", "enterprise"),
            ("X_Forwarded_For", "10.0.0.1"),
            ("X_Request_Id", "forged"),
        ];
        for (path, auth) in [("/public/x", None), ("/v1/orders", Some(key.raw.as_str()))] {
            let mut headers = forged.to_vec();
            if let Some(raw) = auth {
                headers.push(("x-api-key", raw));
            }
            assert_proxied(&gw.get(path, &headers));
            let rec = up.last();
            for name in ["x-keygate-key-id", "x-keygate-scopes", "x-keygate-owner", "x-keygate-plan"] {
                let seen = has_spelling_of(&rec, name);
                // Only keygate's own, for keyed requests: a plan header only where the key has a plan.
                let expected = usize::from(auth.is_some() && name != "x-keygate-plan");
                assert_eq!(seen.len(), expected, "{http:?} {path} {name}: {seen:?}");
                assert!(seen.iter().all(|h| h.starts_with(name)), "{seen:?}");
            }
            assert!(!rec.headers.iter().any(|(n, _)| n.contains('_') && n.to_ascii_lowercase().contains("keygate")));
            assert_eq!(has_spelling_of(&rec, "x-forwarded-for").len(), 1, "{:?}", rec.headers);
            assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
            assert_eq!(has_spelling_of(&rec, "x-request-id").len(), 1, "{:?}", rec.headers);
            if auth.is_some() {
                assert_eq!(rec.header("x-keygate-key-id"), Some("key_ok"));
            }
        }
    }
}

#[test]
fn underscore_headers_are_dropped_by_default_passed_or_refused_as_configured() {
    let up = Upstream::start("api");
    let gw = start(&up, "", &keys_file(&[]));
    assert_proxied(&gw.get("/public/x", &[("X_Custom", "1"), ("x-custom", "2")]));
    assert_eq!(up.last().header("x_custom"), None);
    assert_eq!(up.last().header("x-custom"), Some("2"));
    drop(gw);

    let gw = start(&up, "http: { underscore_headers: pass }", &keys_file(&[]));
    assert_proxied(&gw.get("/public/x", &[("X_Custom", "1")]));
    assert_eq!(up.last().header("x_custom"), Some("1"));
    drop(gw);

    let gw = start(&up, "http: { underscore_headers: reject }", &keys_file(&[]));
    let before = up.request_count();
    assert_error(&gw.get("/public/x", &[("X_Custom", "1")]), 400, "bad_request");
    assert_eq!(up.request_count(), before);
    assert_proxied(&gw.get("/public/x", &[("x-custom", "1")]));
}

// ---------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------

#[test]
fn requests_pingora_refuses_get_keygates_json_error() {
    let up = Upstream::start("api");
    let gw = start(&up, "", &keys_file(&[]));
    for (raw, status, code) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "bad_request"),
        (b"GET /public HTTP/1.1\r\nHost: localhost\r\nNo colon here\r\n\r\n", 400, "bad_request"),
        (b"GET /public HTTP/1.1\r\nHost: localhost\r\nBad\x01Name: x\r\n\r\n", 400, "bad_request"),
        (b"GET /public HTTP/9.9\r\nHost: localhost\r\n\r\n", 400, "bad_request"),
        (
            b"POST /public HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "bad_request",
        ),
        (b"CONNECT localhost:80 HTTP/1.1\r\nHost: localhost:80\r\n\r\n", 405, "method_not_allowed"),
    ] {
        let mut stream = raw_conn(gw.addr);
        stream.write_all(raw).unwrap();
        let (answer, _) = read_until_closed(&mut stream);
        assert_raw_error(&answer, status, code);
    }
    assert_eq!(up.request_count(), 0, "{:?}", up.requests());
}

/// Guards the harness itself: a listener and an admin address picked one after the other
/// once got the same port (the kernel handed the just-released port out again), and the
/// node refused to start.
#[test]
fn the_harness_never_hands_out_one_port_twice() {
    let ports: Vec<u16> = (0..2_000).map(|_| free_port()).collect();
    let unique: std::collections::HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(unique.len(), ports.len());
}
