//! The web console (`GET /ui`) in a real headless Chromium, driven through
//! WebDriver, against a real `keygate serve` standalone node (SQLite, a real
//! upstream, usage flushed every second): signing in, creating a key and seeing
//! it once, search, editing, disabling, rotating and deleting, live updates
//! between two browsers, the usage chart after real traffic, the fleet page, and
//! a read-only token.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/setup.sh
//! --with-postgres` installs them); without them every test here fails, saying so.
//! With `KEYGATE_SCREENSHOTS=<dir>` the tests save PNGs of the main pages there.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::browser::{turn, Browser, PATIENCE};
use common::*;

const ADMIN_TOKEN: &str = "kg-console-admin-token-5d1e8a";
const READ_TOKEN: &str = "kg-console-read-token-93c2f7";
const SYNC_TOKEN: &str = "kg-console-sync-token-4a7b10";
/// Longer than the control plane's 5 s between two `usage` events.
const USAGE_TICK_AND_SOME: Duration = Duration::from_secs(6);

/// A standalone node: admin API and console, a proxy listener with one upstream,
/// keyed routes `/v1/orders` (scope `orders:read`) and `/v1/reports` (`reports:read`).
/// `extra_tokens` adds lines under `admin.tokens`.
fn node(up: &Upstream, extra_tokens: &str) -> Node {
    let template = format!(
        r#"mode: standalone
node_id: @NODE@
threads: 1
admin:
  address: @ADMIN@
  tokens:
    - {{ name: ops, token: "${{env:ADMIN_TOKEN}}" }}
{extra_tokens}  sync_tokens:
    - {{ name: edge, token: "${{env:SYNC_TOKEN}}" }}
store:
  url: "sqlite://@DIR@/keygate.db"
plans:
  free: {{ rate_limit: {{ requests: 1000, per: 1s }} }}
  pro: {{ rate_limit: {{ requests: 1000, per: 1s }} }}
usage:
  flush_interval: 1s
listeners:
  - address: @LISTEN@
upstreams:
  api: {{ targets: ["@UP@"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
  - {{ name: reports, match: {{ path_prefix: /v1/reports }}, upstream: api, scopes: [reports:read] }}
access_log: off
"#
    );
    NodeBuilder::new(&template)
        .var("UP", &up.addr())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("READ_TOKEN", READ_TOKEN)
        .env("SYNC_TOKEN", SYNC_TOKEN)
        .start()
}

fn console_url(node: &Node) -> String {
    format!("http://{}/ui", node.admin)
}

/// Creates a key through the admin API; answers (raw key, record).
fn create_key(node: &Node, body: Value) -> (String, Value) {
    let (status, _, json) = admin_json("POST", node.admin, "/v1/keys", Some(ADMIN_TOKEN), Some(&body));
    assert_eq!(status, 201, "create {body}: {json}");
    (json["key"].as_str().unwrap().to_owned(), json["record"].clone())
}

/// Opens the console and signs in with `token`; returns once the keys list shows.
fn sign_in(browser: &Browser, node: &Node, token: &str) {
    browser.goto(&console_url(node));
    browser.fill("form.signin input[name=token]", token);
    browser.click("form.signin button[type=submit]");
    browser.wait("table.keys-table tbody tr");
}

/// Fails on an error the console reported (an API error it did not expect, or a script error).
fn assert_no_console_error(browser: &Browser) {
    assert!(!browser.visible_now(".notice-error"), "the console shows an error: {}", browser.page_text());
}

fn row(id: &str) -> String {
    format!("table.keys-table tr[data-key-id=\"{id}\"]")
}

#[test]
fn signing_in_creating_a_key_shows_it_once_and_search_finds_it() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    // Some keys to list and search among, in every status.
    for (i, owner) in ["acme", "globex", "initech", "acme", "umbrella"].iter().enumerate() {
        let (_, record) = create_key(
            &node,
            json!({"name": format!("batch-{i}"), "owner": owner, "plan": "free", "tags": ["batch"], "scopes": ["orders:read"]}),
        );
        let id = record["id"].as_str().unwrap();
        if i == 1 {
            admin_json("POST", node.admin, &format!("/v1/keys/{id}/revoke"), Some(ADMIN_TOKEN), None);
        } else if i == 2 {
            admin_json(
                "PATCH",
                node.admin,
                &format!("/v1/keys/{id}"),
                Some(ADMIN_TOKEN),
                Some(&json!({"status": "disabled"})),
            );
        }
    }

    // The console's files carry the strict policy.
    let page = node.admin_get("/ui");
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some_and(|csp| csp.contains("script-src 'self'")));

    let browser = Browser::start("admin");
    browser.goto(&console_url(&node));
    browser.wait("form.signin input[name=token]");
    browser.screenshot("sign-in");
    // A wrong token is refused on the form, and nothing is kept.
    browser.fill("form.signin input[name=token]", "not-the-token");
    browser.click("form.signin button[type=submit]");
    browser.wait_text("form.signin .error", "that the token is not valid", |t| t.contains("not valid"));
    assert_eq!(browser.exec("return sessionStorage.length;", vec![]), json!(0));

    // Enter submits: the form works from the keyboard.
    browser.fill("form.signin input[name=token]", &format!("{ADMIN_TOKEN}{}", &*fantoccini::key::Key::Enter));
    browser.wait_for(PATIENCE, "the five keys", |b| {
        (b.count("table.keys-table tbody tr[data-key-id]") == 5).then_some(())
    });
    // The token is in the tab's session storage only, never in the address.
    let url = browser.exec("return location.href;", vec![]);
    assert!(!url.as_str().unwrap().contains(ADMIN_TOKEN), "{url}");
    assert_eq!(browser.exec("return sessionStorage.getItem('keygate.admin_token');", vec![]), json!(ADMIN_TOKEN));
    assert_eq!(browser.exec("return localStorage.length;", vec![]), json!(0));
    browser.screenshot("keys-list");

    // Create a key with most of its fields through the form.
    browser.click("a.create-key");
    browser.fill("form.key-form input[name=name]", "console-created");
    browser.fill("form.key-form input[name=owner]", "acme");
    browser.fill("form.key-form input[name=plan]", "pro");
    browser.fill("form.key-form input[name=tags]", "console, e2e");
    browser.fill("form.key-form textarea[name=scopes]", "orders:read\nreports:*");
    browser.fill("form.key-form textarea[name=ip_allowlist]", "127.0.0.0/8, ::1");
    browser.fill("form.key-form input[name='rate_limit.requests']", "100");
    browser.fill("form.key-form input[name='rate_limit.per']", "1m");
    browser.fill("form.key-form input[name='rate_limit.burst']", "20");
    browser.fill("form.key-form input[name='quota.requests']", "5000");
    browser.choose("form.key-form select[name='quota.per']", "day");
    browser.choose("form.key-form select[name=expiry]", "ttl");
    browser.fill("form.key-form input[name=ttl]", "30d");
    browser.fill("form.key-form textarea[name=metadata]", r#"{"team": "billing", "<b>": "<i>x</i>"}"#);
    browser.click("form.key-form button[type=submit]");

    let raw = browser.wait_for(PATIENCE, "the new key, shown once", |b| {
        let value = b.find_now(".secret-panel input.secret").map(|_| b.prop(".secret-panel input.secret", "value"))?;
        (!value.is_empty()).then_some(value)
    });
    assert!(raw.starts_with("kg_live_"), "{raw}");
    assert!(browser.text(".secret-panel").contains("will not be shown again"));
    let curl = browser.prop(".secret-panel textarea.curl", "value");
    assert!(curl.starts_with(&format!("curl -H \"Authorization: Bearer {raw}\" http://")), "{curl}");
    browser.screenshot("create-key-shown-once");
    assert_no_console_error(&browser);

    // The API holds every field as typed, and the key works through the gateway.
    let (status, _, listed) = admin_json("GET", node.admin, "/v1/keys?q=console-created", Some(ADMIN_TOKEN), None);
    assert_eq!(status, 200);
    let record = listed["keys"][0].clone();
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["owner"], "acme");
    assert_eq!(record["plan"], "pro");
    assert_eq!(record["tags"], json!(["console", "e2e"]));
    assert_eq!(record["scopes"], json!(["orders:read", "reports:*"]));
    assert_eq!(record["ip_allowlist"], json!(["127.0.0.0/8", "::1"]));
    assert_eq!(record["rate_limit"], json!({"requests": 100, "per": "1m", "burst": 20}));
    assert_eq!(record["quota"], json!({"requests": 5000, "per": "day"}));
    assert_eq!(record["metadata"], json!({"team": "billing", "<b>": "<i>x</i>"}));
    assert!(record["expires_at"].is_string());
    wait_until(EVENTUALLY, "the new key to be served", || {
        (node.get("/v1/orders/1", &[("Authorization", &format!("Bearer {raw}"))]).status == 200).then_some(())
    });
    // Its use reaches the store with the next usage flush; until then the pages compared
    // below could show "last used" change between two reads.
    let key_path = format!("/v1/keys/{id}");
    wait_until(EVENTUALLY, "the key's use to be stored", || {
        admin_json("GET", node.admin, &key_path, Some(ADMIN_TOKEN), None).2["last_used_at"].is_string().then_some(())
    });

    // Away and back: the raw key is gone for good, from the page and from storage.
    browser.route("#/keys");
    browser.wait(&row(&id));
    browser.route("#/create");
    browser.wait("form.key-form input[name=name]");
    assert!(!browser.visible_now(".secret-panel"));
    assert_eq!(browser.prop("form.key-form input[name=name]", "value"), "");
    browser.route(&format!("#/keys/{id}"));
    browser.wait_text(".key-detail h1", "the key's name", |t| t == "console-created");
    // Strings from the API are text, never markup.
    assert!(browser.text("dl.record").contains("\"<b>\": \"<i>x</i>\""));
    assert_eq!(browser.count("dl.record b, dl.record i"), 0);
    for place in
        ["document.documentElement.outerHTML", "JSON.stringify(sessionStorage)", "JSON.stringify(localStorage)"]
    {
        let text = browser.exec(&format!("return {place};"), vec![]);
        assert!(!text.as_str().unwrap_or_default().contains(&raw), "the raw key is still in {place}");
    }

    // Search finds it by part of its name, and the filters narrow the list.
    browser.route("#/keys");
    browser.fill("form.filters input[name=q]", "console-cre");
    browser.click("form.filters button[type=submit]");
    browser.wait_for(PATIENCE, "one search result", |b| {
        (b.count("table.keys-table tbody tr[data-key-id]") == 1).then_some(())
    });
    browser.wait(&row(&id));
    browser.click("form.filters button[type=reset]");
    browser.choose("form.filters select[name=status]", "revoked");
    browser.click("form.filters button[type=submit]");
    browser.wait_for(PATIENCE, "only the revoked key", |b| {
        (b.count("table.keys-table tbody tr[data-key-id]") == 1 && b.text("table.keys-table tbody").contains("batch-1"))
            .then_some(())
    });
    // Pages of two: next, next, then back.
    browser.click("form.filters button[type=reset]");
    browser
        .wait_for(PATIENCE, "all six keys", |b| (b.count("table.keys-table tbody tr[data-key-id]") == 6).then_some(()));
    browser.route("#/keys?limit=2");
    browser.wait_for(PATIENCE, "a page of two", |b| {
        (b.count("table.keys-table tbody tr[data-key-id]") == 2).then_some(())
    });
    let first_page = browser.text("table.keys-table tbody");
    browser.click(".pager button:last-child");
    browser.wait_text(".pager .page-label", "page 2", |t| t == "Page 2");
    browser.click(".pager button:last-child");
    browser.wait_text(".pager .page-label", "page 3", |t| t == "Page 3");
    assert!(browser.exec("return document.querySelector('.pager button:last-child').disabled;", vec![]) == json!(true));
    browser.click(".pager button:first-child");
    browser.click(".pager button:first-child");
    browser.wait_text(".pager .page-label", "page 1", |t| t == "Page 1");
    assert_eq!(browser.text("table.keys-table tbody"), first_page);
    assert_no_console_error(&browser);

    // Signing out forgets the token.
    browser.click("#signout");
    browser.wait("form.signin");
    assert_eq!(browser.exec("return sessionStorage.length;", vec![]), json!(0));
}

#[test]
fn a_key_is_edited_disabled_rotated_and_deleted_from_its_page() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    let (_, record) = create_key(
        &node,
        json!({"name": "editable", "scopes": ["orders:read"], "tags": ["old"], "rate_limit": {"requests": 5, "per": "1s"}}),
    );
    let id = record["id"].as_str().unwrap().to_owned();
    let key_path = format!("/v1/keys/{id}");
    let stored = |field: &str| admin_json("GET", node.admin, &key_path, Some(ADMIN_TOKEN), None).2[field].clone();

    let browser = Browser::start("editor");
    sign_in(&browser, &node, ADMIN_TOKEN);
    browser.route(&format!("#/keys/{id}"));
    browser.wait_text(".key-detail h1", "the key", |t| t == "editable");

    // The API's own message names a field it refuses.
    browser.click("details.edit > summary");
    browser.fill("details.edit textarea[name=ip_allowlist]", "10.0.0.0/33");
    browser.click("details.edit button[type=submit]");
    browser.wait_text("details.edit .error", "the API's error message", |t| t.contains("ip_allowlist[0]"));
    // Only what changed is sent; an emptied rate limit is cleared.
    browser.fill("details.edit textarea[name=ip_allowlist]", "");
    browser.fill("details.edit input[name=tags]", "new, shiny");
    browser.fill("details.edit textarea[name=scopes]", "orders:*");
    browser.fill("details.edit input[name='rate_limit.requests']", "");
    browser.click("details.edit button[type=submit]");
    browser.wait_text("dl.record", "the saved tags", |t| t.contains("shiny"));
    assert_eq!(stored("tags"), json!(["new", "shiny"]));
    assert_eq!(stored("scopes"), json!(["orders:*"]));
    assert_eq!(stored("rate_limit"), Value::Null);
    assert_eq!(stored("name"), "editable");

    browser.click("button.disable-key");
    browser.wait_text(".key-detail .title-row .badge", "disabled", |t| t == "disabled");
    assert_eq!(stored("status"), "disabled");
    browser.click("button.enable-key");
    browser.wait_text(".key-detail .title-row .badge", "active", |t| t == "active");
    assert_eq!(stored("status"), "active");

    // Rotation: the successor is shown once; the old key now ends with its grace period.
    browser.click("button.rotate-key");
    browser.choose("dialog[open] select[name=grace_period]", "1h");
    browser.click("dialog[open] button:last-child");
    let successor = browser.wait_for(PATIENCE, "the successor key, shown once", |b| {
        let value = b.find_now(".secret-panel input.secret").map(|_| b.prop(".secret-panel input.secret", "value"))?;
        (!value.is_empty()).then_some(value)
    });
    assert!(browser.text(".secret-panel").contains("keeps working for 1h"));
    let expires = stored("expires_at");
    let expires =
        time::OffsetDateTime::parse(expires.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(55) && left <= time::Duration::hours(1), "{left}");
    wait_until(EVENTUALLY, "the successor to be served", || {
        (node.get("/v1/orders/1", &[("Authorization", &format!("Bearer {successor}"))]).status == 200).then_some(())
    });

    // Deleting asks first: Escape and Cancel keep the key, the button deletes it.
    browser.click("button.delete-key");
    browser.wait("dialog[open]");
    browser.press_escape();
    browser.wait_gone("dialog[open]");
    browser.click("button.delete-key");
    browser.click("dialog[open] button.secondary");
    browser.wait_gone("dialog[open]");
    assert_eq!(admin_json("GET", node.admin, &key_path, Some(ADMIN_TOKEN), None).0, 200);
    browser.click("button.delete-key");
    browser.click("dialog[open] button.danger");
    browser.wait("table.keys-table");
    browser.wait_for(PATIENCE, "the deleted key to leave the list", |b| (!b.visible_now(&row(&id))).then_some(()));
    assert_eq!(admin_json("GET", node.admin, &key_path, Some(ADMIN_TOKEN), None).0, 404);
    assert_no_console_error(&browser);
}

#[test]
fn a_revocation_in_one_browser_shows_in_another_without_reloading() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    let (_, record) = create_key(&node, json!({"name": "to-revoke", "owner": "acme"}));
    let id = record["id"].as_str().unwrap().to_owned();

    let watcher = Browser::start("watcher");
    let actor = Browser::start("actor");
    sign_in(&watcher, &node, ADMIN_TOKEN);
    sign_in(&actor, &node, ADMIN_TOKEN);
    watcher.wait(&row(&id));
    watcher.wait_for(Duration::from_secs(10), "the live indicator (GET /v1/events streaming)", |b| {
        (b.exec("return document.getElementById('live').dataset.state;", vec![]) == json!("live")).then_some(())
    });
    // Marks this page load: a reload would lose it.
    watcher.exec("window.__same_page = true;", vec![]);

    actor.route(&format!("#/keys/{id}"));
    actor.click("button.revoke-key");
    actor.wait("dialog[open]");
    actor.click("dialog[open] button.danger");
    actor.wait_text(".key-detail .title-row .badge", "revoked", |t| t == "revoked");
    assert!(!actor.visible_now("button.revoke-key"), "a revoked key offers no revoke");

    watcher.wait_text(&format!("{} [data-field=status]", row(&id)), "revoked without a reload", |t| t == "revoked");

    // A key created elsewhere appears too.
    let (_, created) = create_key(&node, json!({"name": "appears-live"}));
    let new_id = created["id"].as_str().unwrap();
    watcher.wait(&row(new_id));

    // Usage ticks move the live counters of an open key.
    let (raw, busy) = create_key(&node, json!({"name": "ticking", "scopes": ["orders:read"]}));
    let busy_id = busy["id"].as_str().unwrap().to_owned();
    watcher.route(&format!("#/keys/{busy_id}"));
    watcher.wait_text(".key-detail h1", "the key", |t| t == "ticking");
    let auth = format!("Bearer {raw}");
    wait_until(EVENTUALLY, "the new key to be served", || {
        (node.get("/v1/orders/0", &[("Authorization", &auth)]).status == 200).then_some(())
    });
    for i in 1..4 {
        assert_eq!(node.get(&format!("/v1/orders/{i}"), &[("Authorization", &auth)]).status, 200);
    }
    watcher.wait_for(EVENTUALLY, "4 requests in the live counters", |b| {
        b.text(".live-counts").contains(": 4 requests,").then_some(())
    });
    // Each usage event repeats the minute's totals so far: later ones add nothing more.
    thread::sleep(USAGE_TICK_AND_SOME);
    assert!(watcher.text(".live-counts").contains(": 4 requests,"), "{}", watcher.text(".live-counts"));

    // The node restarts: the stream reconnects by itself and updates go on.
    watcher.route("#/keys");
    watcher.wait(&row(&busy_id));
    let mut node = node;
    node.restart();
    let (_, after) = create_key(&node, json!({"name": "after-restart"}));
    watcher.wait_for(Duration::from_secs(40), "the key created after the restart", |b| {
        b.visible_now(&row(after["id"].as_str().unwrap())).then_some(())
    });
    assert_eq!(watcher.exec("return window.__same_page === true;", vec![]), json!(true), "the page was reloaded");
    assert_no_console_error(&watcher);
    assert_no_console_error(&actor);
}

#[test]
fn the_fleet_page_lists_the_gateways_that_follow_the_node() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    let template = format!(
        r#"mode: gateway
node_id: edge-gateway-1
threads: 1
admin:
  address: @ADMIN@
keys:
  source: control_plane
  control_plane: {{ url: "http://{cp}", token: "${{env:SYNC_TOKEN}}" }}
plans:
  free: {{ rate_limit: {{ requests: 1000, per: 1s }} }}
  pro: {{ rate_limit: {{ requests: 1000, per: 1s }} }}
listeners:
  - address: @LISTEN@
upstreams:
  api: {{ targets: ["{up}"] }}
routes:
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api }}
access_log: off
"#,
        cp = node.admin,
        up = up.addr()
    );
    let _gateway = NodeBuilder::new(&template).env("SYNC_TOKEN", SYNC_TOKEN).start();
    create_key(&node, json!({"name": "synced"}));

    let browser = Browser::start("fleet");
    sign_in(&browser, &node, ADMIN_TOKEN);
    browser.route("#/fleet");
    browser.wait("table.fleet-table tr[data-node=edge-gateway-1]");
    let summary = browser.wait_text(".fleet-summary", "one gateway", |t| t.starts_with("1 gateway"));
    assert!(summary.contains("index version"), "{summary}");
    browser.screenshot("fleet");
    assert_no_console_error(&browser);
}

#[test]
fn traffic_through_the_gateway_shows_in_the_usage_chart() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    let (raw, record) = create_key(&node, json!({"name": "busy", "owner": "acme", "scopes": ["orders:read"]}));
    let id = record["id"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {raw}");
    // A new key reaches the node's index within moments (503 not_ready before its first load).
    wait_until(EVENTUALLY, "the new key to be served", || {
        (node.get("/v1/orders/0", &[("Authorization", &auth)]).status == 200).then_some(())
    });
    for i in 1..6 {
        assert_eq!(node.get(&format!("/v1/orders/{i}"), &[("Authorization", &auth)]).status, 200);
    }
    for _ in 0..2 {
        assert_eq!(node.get("/v1/reports/1", &[("Authorization", &auth)]).status, 403);
    }
    // The flusher writes usage to the store every second.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, _, usage) =
            admin_json("GET", node.admin, &format!("/v1/keys/{id}/usage?granularity=minute"), Some(ADMIN_TOKEN), None);
        if usage["totals"]["requests"].as_u64() == Some(8) {
            break;
        }
        assert!(Instant::now() < deadline, "usage did not reach the store: {usage}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let browser = Browser::start("usage");
    sign_in(&browser, &node, ADMIN_TOKEN);
    browser.click(&format!("{} a.key-link", row(&id)));
    browser.wait_text(".key-detail h1", "the key's name", |t| t == "busy");
    browser.wait_for(PATIENCE, "bars in the usage chart", |b| {
        if b.count("figure.usage-chart svg rect.bar") > 0 {
            return Some(());
        }
        b.click("button.refresh-usage");
        None
    });
    let totals = browser.wait_text(".usage .totals", "8 requests", |t| t.contains("8 requests"));
    assert!(totals.contains("6 allowed") && totals.contains("2 denied"), "{totals}");
    assert!(browser.count("rect.bar[data-series=allowed]") >= 1);
    assert!(browser.count("rect.bar[data-series=insufficient_scope]") >= 1);
    assert!(browser.count("rect.bar[data-series='2xx']") >= 1);
    assert!(browser.text("figure.usage-chart").contains("denied: insufficient_scope"));
    // The same numbers as a table, for screen readers and copying.
    browser.click("details.as-table > summary");
    let table = browser.text("table.usage-table tbody");
    assert!(table.contains("insufficient_scope 2"), "{table}");
    browser.click("details.as-table > summary");
    // The day view holds them too.
    browser.click("input[name=range][value=day]");
    browser.wait_text(".usage .totals", "the day's totals", |t| t.starts_with("Last day: 8 requests"));
    assert!(browser.count("figure.usage-chart svg rect.bar") > 0);
    browser.click("input[name=range][value=hour]");
    browser.wait_text(".usage .totals", "the hour's totals", |t| t.starts_with("Last hour: 8 requests"));
    browser.screenshot("key-detail-usage");

    // The audit trail shows the creation, by the token's name.
    browser.route("#/audit");
    browser.wait_text("table.audit-table tbody", "the key's creation", |t| t.contains("ops") && t.contains(&id));
    browser.fill("form.filters input[name=key_id]", &id);
    browser.click("form.filters button[type=submit]");
    browser.wait_text("table.audit-table tbody", "one key's events", |t| t.contains(&id));
    browser.screenshot("audit");

    // On a phone: nothing makes the page scroll sideways (wide tables scroll in their box).
    browser.resize(390, 844);
    for (page, ready) in [
        ("#/keys".to_owned(), row(&id)),
        (format!("#/keys/{id}"), "figure.usage-chart svg rect.bar".to_owned()),
        ("#/audit".to_owned(), "table.audit-table tbody tr".to_owned()),
        ("#/create".to_owned(), "form.key-form".to_owned()),
    ] {
        browser.route(&page);
        browser.wait(&ready);
        assert!(!browser.overflows_sideways(), "{page} is wider than a phone's screen");
    }
    assert_no_console_error(&browser);
}

#[test]
fn a_read_token_sees_no_controls_that_change_anything() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "    - { name: dashboard, token: \"${env:READ_TOKEN}\", role: read }\n");
    let (_, record) = create_key(&node, json!({"name": "look-dont-touch"}));
    let id = record["id"].as_str().unwrap().to_owned();

    let browser = Browser::start("reader");
    sign_in(&browser, &node, READ_TOKEN);
    browser.wait(&row(&id));
    browser.wait_text("#who", "the read role", |t| t.contains("read"));
    assert!(!browser.visible_now("a.create-key"), "a create button for a read token");
    assert!(!browser.visible_now("#nav a[data-route=create]"), "a create link for a read token");

    browser.route(&format!("#/keys/{id}"));
    browser.wait_text(".key-detail h1", "the key", |t| t == "look-dont-touch");
    browser.wait("dl.record");
    for control in ["button.revoke-key", "button.delete-key", "button.rotate-key", "button.disable-key", "details.edit"]
    {
        assert_eq!(browser.count(control), 0, "{control} offered to a read token");
    }
    browser.route("#/create");
    browser.wait_text("main", "that the token is read-only", |t| t.contains("read-only"));
    assert_eq!(browser.count("form.key-form"), 0);
    assert_no_console_error(&browser);
}

/// The console's event-stream parser, run in the browser on a stream cut at every
/// possible point: ids carry over, comments and unknown fields are skipped, and
/// CR, LF and CRLF all end lines.
#[test]
fn the_event_stream_parser_reads_a_stream_cut_anywhere() {
    let _turn = turn();
    let up = Upstream::start("orders");
    let node = node(&up, "");
    let browser = Browser::start("parser");
    browser.goto(&console_url(&node));
    browser.wait("form.signin");
    let result = browser.exec_async(
        r#"const done = arguments[arguments.length - 1];
        import('/ui/sse.js').then(({SseParser}) => {
          const stream = '\uFEFF: hello\n\nid: 7\nevent: key.revoked\ndata: {"a":\ndata: 1}\n\n'
            + 'event: usage\r\ndata: {"tick":true}\r\n\r\n'
            + 'retry: 2500\rfoo: bar\rdata\r\r'
            + 'id: 8\nevent: key.created\ndata:  two spaces\n\n'
            + 'data: unterminated';
          const runs = [];
          for (let cut = 0; cut <= stream.length; cut++) {
            const events = [];
            const parser = new SseParser((e) => events.push(e));
            parser.push(stream.slice(0, cut));
            parser.push(stream.slice(cut));
            runs.push(JSON.stringify({events, lastId: parser.lastId, retry: parser.retry}));
          }
          done({runs: [...new Set(runs)], one: JSON.parse(runs[0])});
        }).catch((e) => done({error: String(e)}));"#,
        vec![],
    );
    assert!(result.get("error").is_none(), "{result}");
    assert_eq!(result["runs"].as_array().unwrap().len(), 1, "the result depends on where the stream is cut: {result}");
    assert_eq!(
        result["one"],
        json!({
            "events": [
                {"id": "7", "event": "key.revoked", "data": "{\"a\":\n1}"},
                {"id": "7", "event": "usage", "data": "{\"tick\":true}"},
                {"id": "7", "event": "message", "data": ""},
                {"id": "8", "event": "key.created", "data": " two spaces"},
            ],
            "lastId": "8",
            "retry": 2500,
        })
    );
}
