//! Running keygate in production: SIGHUP reloads the config without dropping
//! connections (and refuses a bad one), SIGTERM drains requests in flight
//! within `shutdown_timeout` and exits 0, answering requests on connections it had
//! accepted; SIGQUIT hands the listening sockets to a new process.

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn config(extra_route: &str, shutdown_timeout: &str) -> String {
    gateway_config(&format!(
        r#"upstreams:
  api: {{ targets: ["@UP@"], read_timeout: 30s }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
{extra_route}access_log: off
shutdown_timeout: {shutdown_timeout}
"#
    ))
}

fn start(up: &Upstream, key: &TestKey, shutdown_timeout: &str) -> Gateway {
    GatewayBuilder::new(&config("", shutdown_timeout))
        .var("UP", &up.addr())
        .keys(&keys_file(&[key.entry("scopes: [orders:read, reports:read]")]))
        .start()
}

#[test]
fn sighup_reloads_routes_without_dropping_open_connections() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = start(&up, &alice, "30s");
    let mut conn = gw.conn();
    let key_header = format!("x-api-key: {}\r\n", alice.raw);
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{key_header}\r\n").into_bytes();
    assert_eq!(conn.send(&request("/v1/orders/1")).status, 200);
    assert_error(&gw.get("/v1/reports/1", &[("x-api-key", &alice.raw)]), 404, "no_route");

    // Add a route in the running config file and ask for a reload.
    let running = fs::read_to_string(&gw.config_path).expect("read config");
    let with_reports = running.replace(
        "access_log: off",
        "  - { name: reports, match: { path_prefix: /v1/reports }, upstream: api, scopes: [reports:read] }\naccess_log: off",
    );
    assert_ne!(running, with_reports);
    fs::write(&gw.config_path, with_reports).expect("write config");
    gw.signal("HUP");
    wait_until(EVENTUALLY, "the reloaded route", || {
        (gw.get("/v1/reports/1", &[("x-api-key", &alice.raw)]).status == 200).then_some(())
    });
    assert_eq!(gw.metric(r#"keygate_config_reloads_total{result="ok"}"#), Some(1.0));
    // The connection opened before the reload still works, and sees the new route.
    assert_eq!(conn.send(&request("/v1/orders/2")).status, 200);
    assert_eq!(conn.send(&request("/v1/reports/2")).status, 200);
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = start(&up, &alice, "30s");
    let running = fs::read_to_string(&gw.config_path).expect("read config");
    fs::write(&gw.config_path, running.replace("routes:", "routes:\n  - { name: broken, upstream: nowhere }"))
        .expect("write config");
    gw.signal("HUP");
    wait_until(EVENTUALLY, "the refused reload to be counted", || {
        (gw.metric(r#"keygate_config_reloads_total{result="error"}"#) == Some(1.0)).then_some(())
    });
    assert_eq!(gw.get("/v1/orders/1", &[("x-api-key", &alice.raw)]).status, 200);
    assert!(gw.output().contains("config reload refused"), "{}", gw.output());
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_zero() {
    let up = Upstream::start("api");
    up.set_slow(Duration::from_millis(1500));
    let alice = TestKey::new("key_alice");
    let gw = start(&up, &alice, "30s");
    let addr = gw.addr;
    let raw = alice.raw.clone();
    let in_flight = thread::spawn(move || get(addr, "/v1/orders/slow", &[("x-api-key", &raw)]));
    wait_until(EVENTUALLY, "the slow request to reach the upstream", || (up.request_count() == 1).then_some(()));

    let (status, output) = gw.stop_with_status();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "keygate did not exit 0 by itself:\n{output}");
    let answer = in_flight.join().expect("client thread");
    assert_eq!(answer.status, 200, "the request in flight was cut off: {}", answer.text());
}

#[test]
fn shutdown_timeout_bounds_the_wait_for_slow_requests() {
    let up = Upstream::start("api");
    up.set_slow(Duration::from_secs(25));
    let alice = TestKey::new("key_alice");
    let gw = start(&up, &alice, "1s");
    let addr = gw.addr;
    let raw = alice.raw.clone();
    thread::spawn(move || {
        let _ = try_send_to(addr, &request("GET", "/v1/orders/slow", &[("x-api-key", &raw)]));
    });
    wait_until(EVENTUALLY, "the slow request to reach the upstream", || (up.request_count() == 1).then_some(()));

    let asked = Instant::now();
    // stop_with_status kills the process if it has not exited after 10 s.
    let (status, output) = gw.stop_with_status();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "keygate did not stop by itself:\n{output}");
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(output.contains("still in flight"), "{output}");
}

/// Regression: when the gateway stopped accepting, Pingora closed at once every
/// connection waiting for its next request, so a request sent an instant after the
/// stop (or still on its way on a connection accepted just before) went unanswered.
#[test]
fn a_connection_waiting_for_a_request_at_sigterm_is_still_answered() {
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let mut gw = start(&up, &alice, "5s");
    let get = request("GET", "/v1/orders/1", &[("x-api-key", &alice.raw)]);
    let mut conn = gw.conn();
    // Answered once, so the gateway surely holds the connection, waiting for the next request.
    assert_eq!(conn.send(&get).status, 200);

    gw.signal("TERM");
    thread::sleep(Duration::from_millis(300));
    let answer = conn.try_send(&get).unwrap_or_else(|e| panic!("closed unanswered: {e}\n{}", gw.output()));
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"), "a stopping gateway does not keep connections alive");
    let exit = gw.wait_exit(Duration::from_secs(15));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", gw.output());
}

/// A second `keygate serve --upgrade` takes the listening sockets over from a
/// running one (sent SIGQUIT) while a client keeps sending: no request fails.
#[test]
fn upgrade_hands_the_sockets_over_without_a_failed_request() {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let mut old = start(&up, &alice, "5s");
    let addr = old.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed, raw) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed), alice.raw.clone());
        thread::spawn(move || {
            let mut failures = Vec::new();
            let get = || try_send_to(addr, &request("GET", "/v1/orders/1", &[("x-api-key", &raw)]));
            while !stop.load(Ordering::Relaxed) {
                // A new connection for every request: some are accepted by the old
                // process in its last instant and must still be answered.
                match get() {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        failures.push(format!("{:?}", other.map(|r| r.status)));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            failures
        })
    };
    wait_until(EVENTUALLY, "steady traffic", || (ok.load(Ordering::Relaxed) > 20).then_some(()));

    let log = fs::File::create(old.dir().join("new.log")).expect("log file");
    let mut new = Command::new(BIN)
        .args(["serve", "--upgrade", "-c"])
        .arg(&old.config_path)
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start the new keygate");
    // The new process waits on the upgrade socket; give it a moment to be there.
    let socket = std::env::temp_dir().join(format!("keygate-test-gw-{}.upgrade.sock", addr.port()));
    wait_until(EVENTUALLY, "the new process's upgrade socket", || socket.exists().then_some(()));
    old.signal("QUIT");
    let exit = old.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "the old process did not hand over and exit:\n{}", old.output());

    // The new process alone serves now.
    let served_after = ok.load(Ordering::Relaxed);
    wait_until(EVENTUALLY, "traffic served by the new process", || {
        (ok.load(Ordering::Relaxed) > served_after + 20).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let failures = load.join().expect("load thread");
    let _ = new.kill();
    let _ = new.wait();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests during the upgrade: {failures:?}");
}

/// Regression: a SIGHUP that arrived while a node was still starting (here:
/// waiting for a control plane that does not answer) ended the process, the
/// signal's default action, instead of reloading.
#[test]
fn sighup_while_starting_does_not_end_keygate() {
    // Accepts connections (the kernel does) but never answers: the first key sync hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = format!(
        r#"mode: gateway
node_id: hup-test
threads: 1
listeners:
  - address: @LISTEN@
admin:
  address: @ADMIN@
keys:
  source: control_plane
  control_plane: {{ url: "http://{}", token: sync }}
access_log: off
"#,
        silent.local_addr().expect("addr")
    );
    let mut gw = GatewayBuilder::new(&config).start();
    gw.signal("HUP");
    assert!(gw.wait_exit(Duration::from_secs(1)).is_none(), "SIGHUP ended keygate:\n{}", gw.output());
    wait_until(EVENTUALLY, "the admin API", || (gw.admin_get("/healthz").status == 200).then_some(()));
}
