//! Bulk import end to end (CONTRACT §1 `keygate keys import`, §6 `POST /v1/keys/import`):
//! the real binary as CLI, standalone node, control plane and gateway, over real HTTP.
//! Imported keys are known only by their hash and may have any shape (a Stripe-style
//! `sk_live_…`); gateways must accept them while still refusing garbage.

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::*;

const ADMIN_TOKEN: &str = "kg-test-admin-token-5d1c0e";
const SYNC_TOKEN: &str = "kg-test-sync-token-9a7f22";
/// How long an imported key may take to reach a gateway.
const PROPAGATION: Duration = Duration::from_secs(5);
/// A key keygate never issued: no keygate checksum.
const FOREIGN_KEY: &str = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";

const ADMIN_SECTION: &str = r#"admin:
  address: @ADMIN@
  tokens:
    - { name: ops, token: "${env:ADMIN_TOKEN}" }
  sync_tokens:
    - { name: edge, token: "${env:SYNC_TOKEN}" }
"#;

const PLANS: &str = "plans:
  free: { rate_limit: { requests: 1000, per: 1s } }
  pro: { rate_limit: { requests: 1000, per: 1s } }
";

const PROXY_SECTION: &str = r#"listeners:
  - address: @LISTEN@
upstreams:
  api: { targets: ["@UP@"] }
routes:
  - { name: orders, match: { path_prefix: /v1/orders }, upstream: api, scopes: [orders:read] }
access_log: off
"#;

fn standalone(up: &Upstream) -> Node {
    let template = format!(
        "mode: standalone\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"sqlite://@DIR@/keygate.db\"\n\
         {PLANS}{PROXY_SECTION}"
    );
    NodeBuilder::new(&template)
        .var("UP", &up.addr())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

fn control_plane(store_url: &str) -> Node {
    let template =
        format!("mode: control-plane\nnode_id: @NODE@\nthreads: 1\n{ADMIN_SECTION}store:\n  url: \"@STORE@\"\n{PLANS}");
    NodeBuilder::new(&template)
        .var("STORE", store_url)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

fn gateway(up: &Upstream, cp: SocketAddr) -> Node {
    let template = format!(
        r#"mode: gateway
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
keys:
  source: control_plane
  control_plane: {{ url: "http://@CP@", token: "${{env:SYNC_TOKEN}}" }}
{PLANS}{PROXY_SECTION}"#
    );
    NodeBuilder::new(&template).var("CP", &cp.to_string()).var("UP", &up.addr()).env("SYNC_TOKEN", SYNC_TOKEN).start()
}

fn sha256(raw: &str) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(raw.as_bytes()).iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    )
}

/// `keygate keys import ARGS…` against `node`'s admin API with the admin token.
fn cli_import(node: &Node, args: &[&str], stdin: Option<&str>) -> Output {
    let url = format!("http://{}", node.admin);
    let mut all = vec!["keys", "import"];
    all.extend(args);
    run_cli(&all, stdin, &[("KEYGATE_ADMIN_URL", &url), ("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)], &[])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_file(node: &Node, name: &str, text: &str) -> String {
    let path = node.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn admin_get_json(node: &Node, path: &str) -> (u16, Value) {
    let (status, _, value) = admin_json("GET", node.admin, path, Some(ADMIN_TOKEN), None);
    (status, value)
}

/// Sends `raw` in `X-Api-Key` to `/v1/orders` until the node answers `want`.
#[track_caller]
fn wait_for_status(node: &Node, raw: &str, want: u16) -> Response {
    let mut last = 0;
    wait_until(PROPAGATION, &format!("{raw} answered {want} (last {last})"), || {
        let resp = node.get("/v1/orders", &[("x-api-key", raw)]);
        last = resp.status;
        (resp.status == want).then_some(resp)
    })
}

#[test]
fn cli_import_lists_bad_lines_by_number_imports_the_rest_and_a_rerun_changes_nothing() {
    let up = Upstream::start("api");
    let node = standalone(&up);
    let good = [
        json!({"hash": sha256(FOREIGN_KEY), "id": "kong-a", "name": "legacy a", "owner": "acme", "scopes": ["orders:read"]}),
        json!({"hash": sha256("disabled-key-d"), "id": "kong-d", "status": "disabled", "scopes": ["orders:read"]}),
        json!({"hash": sha256("no-id-key-e"), "plan": "pro", "created_at": "2019-05-01T12:00:00Z"}),
    ];
    let lines = [
        good[0].to_string(),                                               // 1
        String::new(),                                                     // 2: blank, skipped
        r#"{"hash": "sha256:nothex"}"#.to_owned(),                         // 3
        json!({"hash": sha256("b"), "plan": "gold"}).to_string(),          // 4
        "not json at all".to_owned(),                                      // 5
        json!({"hash": sha256("c"), "colour": "blue"}).to_string(),        // 6
        good[1].to_string(),                                               // 7
        json!({"hash": sha256(FOREIGN_KEY), "id": "kong-a2"}).to_string(), // 8: hash of line 1
        good[2].to_string(),                                               // 9
    ];
    let file = write_file(&node, "keys.ndjson", &lines.join("\n"));

    let out = cli_import(&node, &[&file], None);
    assert_eq!(out.status.code(), Some(1), "some lines failed: exit 1\n{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("imported:  3\nunchanged: 0\nerrors:    5\n"), "{text}");
    for (line, field) in [(3, "hash:"), (4, "plan: unknown plan \"gold\""), (5, "not valid JSON"), (6, "colour:")] {
        assert!(text.lines().any(|l| l.trim_start().starts_with(&format!("{line}  {field}"))), "line {line}: {text}");
    }
    assert!(text.contains("8  hash: already given on line 1"), "{text}");
    assert!(stderr(&out).contains("5 line(s)"), "{}", stderr(&out));

    // The same file again, as JSON: nothing imported, the good lines unchanged, the same errors.
    let again = cli_import(&node, &["--json", &file], None);
    assert_eq!(again.status.code(), Some(1));
    let body: Value = serde_json::from_str(&stdout(&again)).expect("--json prints the API's JSON");
    assert_eq!((body["imported"].clone(), body["unchanged"].clone()), (json!(0), json!(3)));
    let error_lines: Vec<u64> =
        body["errors"].as_array().unwrap().iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(error_lines, [3, 4, 5, 6, 8]);
    assert_eq!(body["errors_omitted"], 0);

    // Only the good lines, from stdin: exit 0.
    let clean: String = good.iter().map(|g| format!("{g}\n")).collect();
    let ok = cli_import(&node, &["-"], Some(&clean));
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert!(stdout(&ok).starts_with("imported:  0\nunchanged: 3\nerrors:    0\n"), "{}", stdout(&ok));

    let (status, record) = admin_get_json(&node, "/v1/keys/kong-a");
    assert_eq!(status, 200, "{record}");
    assert_eq!((record["owner"].clone(), record["imported"].clone()), (json!("acme"), json!(true)));
    assert_eq!(record["masked"], "…");
    assert!(record.get("hash").is_none(), "the admin API never shows the hash");

    // The standalone node's own proxy serves the foreign-shaped key and keeps it from the upstream.
    let resp = wait_for_status(&node, FOREIGN_KEY, 200);
    assert_proxied(&resp);
    let seen = up.last();
    assert_eq!(seen.header("x-keygate-key-id"), Some("kong-a"));
    assert!(!seen.contains(FOREIGN_KEY), "the imported key reached the upstream: {seen:?}");
    let denied = node.get("/v1/orders", &[("x-api-key", "disabled-key-d")]);
    assert_error(&denied, 403, "key_disabled");
    assert_error(&node.get("/v1/orders", &[("x-api-key", "garbage")]), 401, "invalid_key");
}

#[test]
fn a_gateway_following_the_control_plane_serves_imported_keys_of_any_shape() {
    let db = PgDb::create("keygate_import_test");
    let up = Upstream::start("api");
    let cp = control_plane(&db.url);
    let gw = gateway(&up, cp.admin);
    // A keygate key issued before the import: shape checks still hold for it.
    let (native_key, native_hash) = gen_key(None);
    let lines = [
        json!({"hash": sha256(FOREIGN_KEY), "id": "key_stripe", "scopes": ["orders:read"], "owner": "acme"}),
        json!({"hash": native_hash, "id": "key_native", "scopes": ["orders:read"], "prefix": "kg_live"}),
        json!({"hash": sha256("revoked-legacy-key"), "status": "revoked", "scopes": ["orders:read"]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let out = cli_import(&cp, &["-"], Some(&text));
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).starts_with("imported:  3\n"), "{}", stdout(&out));

    let resp = wait_for_status(&gw, FOREIGN_KEY, 200);
    assert_proxied(&resp);
    let seen = up.last();
    assert_eq!(seen.header("x-keygate-key-id"), Some("key_stripe"));
    assert_eq!(seen.header("x-keygate-owner"), Some("acme"));
    assert!(!seen.contains(FOREIGN_KEY), "the imported key reached the upstream: {seen:?}");
    assert_proxied(&gw.get("/v1/orders", &[("authorization", &format!("Bearer {FOREIGN_KEY}"))]));
    assert_proxied(&gw.get("/v1/orders", &[("x-api-key", &native_key)]));
    assert_error(&gw.get("/v1/orders", &[("x-api-key", "revoked-legacy-key")]), 401, "key_revoked");
    // Garbage, a near miss of the imported key and a mistyped keygate key stay invalid.
    for garbage in ["garbage", "sk_live_4eC39HqLyjWDarjtT1zdp7dX", &with_bad_checksum(&native_key)] {
        assert_error(&gw.get("/v1/orders", &[("x-api-key", garbage)]), 401, "invalid_key");
    }
    // One import event in the audit trail for the whole batch.
    let (_, audit) = admin_get_json(&cp, "/v1/audit?limit=100");
    let imports: Vec<&Value> =
        audit["events"].as_array().unwrap().iter().filter(|e| e["action"] == "key.import").collect();
    assert_eq!(imports.len(), 1, "{audit}");
    assert_eq!(imports[0]["key_id"], Value::Null);
    assert_eq!(imports[0]["details"]["count"], 3);
}

#[test]
fn an_import_larger_than_the_usual_body_limit_streams_in_batches() {
    let up = Upstream::start("api");
    let node = standalone(&up);
    // About 3 MiB: past axum's 2 MiB default body limit, in 25 batches.
    let n = 25_000;
    let mut text = String::with_capacity(n * 130);
    for i in 0..n {
        let line = json!({"hash": sha256(&format!("bulk-{i}")), "owner": "bulk", "metadata": {"row": i, "pad": "x".repeat(16)}});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    assert!(text.len() > 2 * 1024 * 1024);
    let out = cli_import(&node, &["-"], Some(&text));
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).starts_with(&format!("imported:  {n}\nunchanged: 0\nerrors:    0\n")), "{}", stdout(&out));
    let (_, audit) = admin_get_json(&node, "/v1/audit?limit=1000");
    let imports = audit["events"].as_array().unwrap().iter().filter(|e| e["action"] == "key.import").count();
    assert_eq!(imports, n.div_ceil(1000), "one audit event per batch of 1000");
    wait_for_status(&node, &format!("bulk-{}", n - 1), 403);
}

#[test]
fn an_import_without_an_admin_token_is_refused() {
    let up = Upstream::start("api");
    let node = standalone(&up);
    let body = format!("{}\n", json!({"hash": sha256("x")}));
    let raw = request_with_body("POST", "/v1/keys/import", &[("Connection", "close")], body.as_bytes());
    let resp = try_send_to(node.admin, &raw).unwrap();
    assert_error(&resp, 401, "unauthorized");
    let (_, list) = admin_get_json(&node, "/v1/keys");
    assert_eq!(list["keys"], json!([]));
}
