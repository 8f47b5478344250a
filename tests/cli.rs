//! Black-box tests of keygate's command line: gen-key, hash-key, check-config,
//! exit codes (CONTRACT §1, §3, §4).

mod common;

use std::fs;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn combined(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}; output:\n{}", combined(out));
}

fn is_base62(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Checks `<prefix>_<32 base62><6 base62>`.
#[track_caller]
fn assert_key_format(key: &str, prefix: &str) {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('_'))
        .unwrap_or_else(|| panic!("key {key:?} does not start with {prefix}_"));
    assert_eq!(rest.len(), 38, "key {key:?}: want 32 random + 6 checksum chars");
    assert!(is_base62(rest), "key {key:?} is not base62 after the prefix");
}

#[track_caller]
fn assert_hash_format(hash: &str) {
    let hex = hash.strip_prefix("sha256:").unwrap_or_else(|| panic!("hash {hash:?} lacks the sha256: prefix"));
    assert_eq!(hex.len(), 64, "hash {hash:?}");
    assert!(hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')), "hash {hash:?} is not lowercase hex");
}

// ---------------------------------------------------------------------------
// gen-key / hash-key
// ---------------------------------------------------------------------------

#[test]
fn gen_key_prints_a_key_and_its_sha256_hash() {
    let out = run_cli(&["gen-key"], None, &[], &[]);
    assert_exit(&out, 0);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "want key and hash lines, got:\n{stdout}");
    let (key, hash) = (lines[0].trim(), lines[1].trim());
    assert_key_format(key, "kg_live");
    assert_hash_format(hash);
    assert_eq!(hash, format!("sha256:{}", sha256_hex(key)));
}

#[test]
fn gen_key_uses_the_given_prefix() {
    let (key, hash) = gen_key(Some("kg_test"));
    assert_key_format(&key, "kg_test");
    assert_eq!(hash, format!("sha256:{}", sha256_hex(&key)));
}

#[test]
fn gen_key_never_repeats_a_key() {
    let keys: Vec<String> = (0..5).map(|_| gen_key(None).0).collect();
    let mut dedup = keys.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), keys.len(), "repeated keys: {keys:?}");
    // Same length, so the checksum part differs too, not just the random part.
    let checksums: std::collections::HashSet<&str> = keys.iter().map(|k| &k[k.len() - 6..]).collect();
    assert!(checksums.len() > 1, "checksums never vary: {keys:?}");
}

#[test]
fn hash_key_prints_the_sha256_of_the_key_on_stdin() {
    for prefix in [None, Some("kg_test")] {
        let (key, hash) = gen_key(prefix);
        for input in [format!("{key}\n"), key.clone()] {
            let out = run_cli(&["hash-key"], Some(&input), &[], &[]);
            assert_exit(&out, 0);
            let printed = String::from_utf8(out.stdout).unwrap();
            assert_eq!(printed.trim(), hash, "hash-key of {input:?}");
            assert_eq!(printed.trim(), format!("sha256:{}", sha256_hex(&key)));
        }
    }
}

// ---------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------

/// A config file plus its keys file in a temp dir.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p
    }
}

fn good_keys() -> String {
    let (_, hash) = gen_key(None);
    format!(
        "keys:
  - id: key_alice
    hash: \"{hash}\"
    name: alice
    owner: acme
    scopes: [\"orders:read\", \"billing:*\"]
    ip_allowlist: [\"127.0.0.1/32\", \"::1/128\"]
    status: active
    expires_at: \"2030-01-01T00:00:00Z\"
    metadata: {{ team: x }}
    tags: [a, b]
"
    )
}

fn good_config(keys_path: &str) -> String {
    format!(
        "mode: gateway
node_id: test-cc
threads: 1
listeners:
  - address: 127.0.0.1:18080
admin:
  address: 127.0.0.1:19090
keys:
  source: file
  file: {keys_path}
client_ip:
  trusted_proxies: [10.0.0.0/8, \"fd00::/8\"]
key_locations:
  - {{ header: authorization, scheme: Bearer }}
  - {{ header: x-api-key }}
  - {{ query: api_key }}
upstreams:
  api:
    targets: [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]
    health_check: {{ path: /healthz, interval: 5s }}
    connect_timeout: 250ms
    read_timeout: 30s
routes:
  - {{ name: public, match: {{ path_prefix: /public }}, upstream: api, auth: none }}
  - name: orders-read
    match: {{ path_prefix: /v1/orders, methods: [GET, HEAD], host: api.example.com }}
    upstream: api
    scopes: [orders:read]
    set_headers:
      authorization: \"Bearer ${{env:KG_CC_UPSTREAM_TOKEN}}\"
access_log: off
"
    )
}

/// One parsed `FILE:LINE:COL: path: message` line.
#[derive(Debug)]
struct ConfigError {
    line: u32,
    col: u32,
    rest: String,
}

/// Error lines for `file`, in the contract's `FILE:LINE:COL: path: message` form.
fn errors_for(output: &str, file: &str) -> Vec<ConfigError> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix(file)?.strip_prefix(':')?;
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.trim().parse().ok()?;
            let col = parts.next()?.trim().parse().ok()?;
            let rest = parts.next()?.trim().to_string();
            Some(ConfigError { line, col, rest })
        })
        .collect()
}

/// Finds the error whose field path starts with `path` and mentions `also`,
/// and checks it points at `line`.
#[track_caller]
fn assert_reported(output: &str, file: &str, path: &str, also: &str, line: u32) {
    let errors = errors_for(output, file);
    let e = errors
        .iter()
        .find(|e| e.rest.starts_with(path) && e.rest.contains(also))
        .unwrap_or_else(|| panic!("no `{file}:LINE:COL: {path}...` error mentioning {also:?}; output:\n{output}"));
    assert_eq!(e.line, line, "wrong line for {path}: {e:?}");
    assert!(e.col >= 1, "column must be 1-based: {e:?}");
}

/// 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> u32 {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in config")) as u32 + 1
}

#[test]
fn check_config_accepts_a_valid_gateway_config() {
    let f = Files::new();
    let keys = f.write("keys.yaml", &good_keys());
    let config = f.write("keygate.yaml", &good_config(&keys));
    let out = run_cli(&["check-config", "-c", &config], None, &[("KG_CC_UPSTREAM_TOKEN", "secret")], &[]);
    assert_exit(&out, 0);
}

#[test]
fn check_config_lists_every_error_with_file_line_and_field_path() {
    let f = Files::new();
    let keys = f.write("keys.yaml", &good_keys());
    let text = format!(
        "mode: gateway
node_id: test-cc
threads: 1
listeners:
  - address: 127.0.0.1:18080
    bogus_field: 1
admin:
  address: 127.0.0.1:19090
keys:
  source: file
  file: {keys}
client_ip:
  trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]
upstreams:
  api:
    targets: [\"127.0.0.1:9001\"]
    connect_timeout: 2 seconds
routes:
  - name: ok
    match: {{ path_prefix: /ok }}
    upstream: api
    auth: none
  - name: orders
    match: {{ path_prefix: /v1/orders }}
    upstream: nope
access_log: off
"
    );
    let config = f.write("keygate.yaml", &text);
    let out = run_cli(&["check-config", "-c", &config], None, &[], &[]);
    assert_exit(&out, 1);
    let output = combined(&out);

    assert_reported(&output, &config, "listeners[0]", "bogus_field", line_of(&text, "bogus_field"));
    assert_reported(&output, &config, "client_ip.trusted_proxies[1]", "", line_of(&text, "10.0.0.0/33"));
    assert_reported(&output, &config, "upstreams.api.connect_timeout", "", line_of(&text, "2 seconds"));
    assert_reported(&output, &config, "routes[1].upstream", "", line_of(&text, "upstream: nope"));
    // Nothing else in the file is wrong.
    let n = errors_for(&output, &config).len();
    assert_eq!(n, 4, "want exactly the four errors; output:\n{output}");
}

#[test]
fn check_config_reports_errors_in_the_keys_file() {
    let f = Files::new();
    let (_, hash) = gen_key(None);
    let keys_text = format!(
        "keys:
  - id: key_a
    hash: \"{hash}\"
    name: a
    ip_allowlist: [\"10.0.0.0/33\"]
  - id: key_b
    hash: \"sha256:nothex\"
    name: b
    status: sleeping
"
    );
    let keys = f.write("keys.yaml", &keys_text);
    let config = f.write("keygate.yaml", &good_config(&keys));
    let out = run_cli(&["check-config", "-c", &config], None, &[("KG_CC_UPSTREAM_TOKEN", "secret")], &[]);
    assert_exit(&out, 1);
    let output = combined(&out);
    assert_reported(&output, &keys, "keys[0].ip_allowlist", "", line_of(&keys_text, "/33"));
    assert_reported(&output, &keys, "keys[1].hash", "", line_of(&keys_text, "nothex"));
    assert_reported(&output, &keys, "keys[1].status", "", line_of(&keys_text, "sleeping"));
}

#[test]
fn check_config_reports_a_missing_env_var() {
    let f = Files::new();
    let keys = f.write("keys.yaml", &good_keys());
    let config = f.write("keygate.yaml", &good_config(&keys));

    let out = run_cli(&["check-config", "-c", &config], None, &[], &["KG_CC_UPSTREAM_TOKEN"]);
    assert_exit(&out, 1);
    let output = combined(&out);
    assert!(
        output.lines().any(|l| l.contains("routes[1].set_headers") && l.contains("KG_CC_UPSTREAM_TOKEN")),
        "no error naming the field and the variable; output:\n{output}"
    );

    // The same file passes once the variable exists.
    let out = run_cli(&["check-config", "-c", &config], None, &[("KG_CC_UPSTREAM_TOKEN", "x")], &[]);
    assert_exit(&out, 0);
}

#[test]
fn check_config_on_a_missing_file_exits_1() {
    let f = Files::new();
    let missing = f.path("does-not-exist.yaml");
    let out = run_cli(&["check-config", "-c", &missing], None, &[], &[]);
    assert_exit(&out, 1);
    assert!(combined(&out).contains("does-not-exist.yaml"));
}

#[test]
fn bad_command_line_exits_2() {
    for args in [
        &["frobnicate"][..],
        &["gen-key", "--no-such-flag"],
        &["gen-key", "--prefix"],
        &["check-config", "-c"],
        &["check-config", "--no-such-flag", "x"],
        &["serve", "--no-such-flag"],
        &["hash-key", "extra", "args", "here"],
    ] {
        let out = run_cli(args, None, &[], &[]);
        assert_eq!(out.status.code(), Some(2), "keygate {args:?}: want exit 2; output:\n{}", combined(&out));
    }
}

#[test]
fn serve_refuses_an_invalid_config_with_exit_1() {
    let f = Files::new();
    let keys = f.write("keys.yaml", &good_keys());
    let text = good_config(&keys).replace("threads: 1\n", "threads: 1\nbogus_top: 1\n");
    let config = f.write("keygate.yaml", &text);
    let mut child = Command::new(BIN)
        .args(["serve", "-c", &config])
        .env("KG_CC_UPSTREAM_TOKEN", "x")
        .current_dir(f.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("serve kept running with an invalid config:\n{}", combined(&out));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 1);
    assert!(combined(&out).contains("bogus_top"), "error does not name the field");
}

/// The example configs in `config/` are what newcomers copy: they must stay valid.
#[test]
fn shipped_example_configs_pass_check_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = [
        ("KEYGATE_ADMIN_TOKEN", "example-admin-token"),
        ("KEYGATE_SYNC_TOKEN", "example-sync-token"),
        ("KEYGATE_DATABASE_URL", "postgres://keygate@db.internal:5432/keygate"),
        ("KEYGATE_CONTROL_PLANE_URL", "http://cp.internal:9090"),
    ];
    for name in ["keygate.yaml", "gateway-file.yaml", "gateway.yaml", "control-plane.yaml"] {
        let out = Command::new(BIN)
            .current_dir(root)
            .args(["check-config", "-c", &format!("config/{name}")])
            .envs(env)
            .output()
            .expect("run keygate check-config");
        assert!(
            out.status.success(),
            "config/{name} is refused:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
