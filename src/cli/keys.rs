//! `keygate keys …`: a client of the admin API (CONTRACT §6).
//!
//! Everything that can be checked without the server (rate-limit and quota
//! syntax, durations, timestamps, CIDRs) is checked by clap, so a typo fails
//! with exit 2 before any request is sent. The server stays the authority on
//! everything else; its errors are mapped to one readable line (exit 1).

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::import::ImportArgs;
use super::table::{clean, Table};
use crate::config::parse_duration;
use crate::http_client;

mod args;
mod client;
mod render;

pub use args::KeysArgs;
use args::*;
use client::*;
pub(super) use client::{Admin, KeysError, Reply};
pub(super) use render::pretty;
use render::*;

const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9090";
/// Short, so a wrong address fails fast instead of hanging a script.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a non-JSON error body is worth showing.
const MAX_BODY_EXCERPT: usize = 200;

// ---------------------------------------------------------------------------
// Running a command.

/// Runs `keygate keys …`: prints the output, or `error: …` on stderr and exits 1.
pub fn run(args: KeysArgs) -> ExitCode {
    if let Err(e) = check_command_line(&args) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    match execute(args) {
        Ok(output) => {
            // A key that could not be written out is lost to the user: say so.
            if let Err(e) = std::io::stdout().lock().write_all(output.as_bytes()) {
                eprintln!("error: cannot write the output: {e}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let KeysError::Partial { output, .. } = &e {
                if let Err(write) = std::io::stdout().lock().write_all(output.as_bytes()) {
                    eprintln!("error: cannot write the output: {write}");
                }
            }
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// What clap cannot express briefly: `update` needs a change. (An ArgGroup of
/// all 21 flags works too, but its error message lists every one of them.)
fn check_command_line(args: &KeysArgs) -> Result<(), clap::Error> {
    if let KeysCommand::Update(update) = args.command.as_ref() {
        if update_body(update).as_object().is_some_and(Map::is_empty) {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::MissingRequiredArgument,
                "nothing to change: give at least one field, e.g. --name, --status disabled or --clear-owner\n\n\
                 For more information, try 'keygate keys update --help'.\n",
            ));
        }
    }
    Ok(())
}

/// Runs the command and returns what it would print: testable without stdout.
fn execute(args: KeysArgs) -> Result<String, KeysError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KeysError::Local(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(dispatch(args))
}

async fn dispatch(args: KeysArgs) -> Result<String, KeysError> {
    let admin = Admin::new(&args.global)?;
    let json = args.global.json;
    match *args.command {
        KeysCommand::Create(create) => {
            let reply = admin.call(Method::POST, &["v1", "keys"], &[], Some(&create_body(&create)), None).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            render_new_key(&reply, "Created")
        }
        KeysCommand::List(list) => list_keys(&admin, &list, json).await,
        KeysCommand::Show(IdArg { id }) => {
            let reply = admin.call(Method::GET, &["v1", "keys", &id], &[], None, Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            Ok(render_record(&reply.value()?))
        }
        KeysCommand::Update(update) => {
            let id = &update.id;
            let body = update_body(&update);
            let reply = admin.call(Method::PATCH, &["v1", "keys", id], &[], Some(&body), Some(id)).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            Ok(format!("updated {}\n{}", clean(id), render_record(&reply.value()?)))
        }
        KeysCommand::Revoke(IdArg { id }) => {
            let reply = admin.call(Method::POST, &["v1", "keys", &id, "revoke"], &[], None, Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            Ok(format!("revoked {}\n{}", clean(&id), render_record(&reply.value()?)))
        }
        KeysCommand::Rotate(RotateArgs { id, grace_period }) => {
            let body = match &grace_period {
                Some(grace) => json!({ "grace_period": grace }),
                None => json!({}),
            };
            let reply = admin.call(Method::POST, &["v1", "keys", &id, "rotate"], &[], Some(&body), Some(&id)).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            let heading = match &grace_period {
                Some(grace) => format!("Rotated {}; the old key keeps working for {}.", clean(&id), clean(grace)),
                None => format!("Rotated {}; the old key keeps working for the grace period.", clean(&id)),
            };
            render_new_key(&reply, &heading)
        }
        KeysCommand::Delete(IdArg { id }) => {
            let reply = admin.call(Method::DELETE, &["v1", "keys", &id], &[], None, Some(&id)).await?;
            if json {
                // 204 has no body; print one only if the server sent one.
                return if reply.text.trim().is_empty() { Ok(String::new()) } else { Ok(pretty(&reply.value()?)) };
            }
            Ok(format!("deleted {}\n", clean(&id)))
        }
        KeysCommand::Usage(usage) => {
            let id = &usage.id;
            let reply =
                admin.call(Method::GET, &["v1", "keys", id, "usage"], &usage_query(&usage), None, Some(id)).await?;
            if json {
                return Ok(pretty(&reply.value()?));
            }
            Ok(render_usage(&reply.value()?, id))
        }
        KeysCommand::Import(import) => {
            // No overall timeout: the upload takes as long as the file.
            let admin = Admin::with_total_timeout(&args.global, None)?;
            super::import::import(&admin, &import, json).await
        }
    }
}

async fn list_keys(admin: &Admin, args: &ListArgs, json: bool) -> Result<String, KeysError> {
    let mut cursor = args.cursor.clone();
    let mut seen = HashSet::new();
    let mut records: Vec<Value> = Vec::new();
    let mut first_page: Option<Value> = None;
    loop {
        let reply = admin.call(Method::GET, &["v1", "keys"], &list_query(args, cursor.as_deref()), None, None).await?;
        let page = reply.value()?;
        let keys = page.get("keys").and_then(Value::as_array).ok_or_else(|| reply.bad("no \"keys\" list"))?;
        records.extend(keys.iter().cloned());
        let next = next_cursor(&page);
        if json && !args.all {
            first_page = Some(page);
        }
        match next {
            Some(next) if args.all => {
                // A server that hands out the same cursor again would loop forever.
                if !seen.insert(next.clone()) {
                    return Err(reply.bad(format!("next_cursor {next:?} came back twice")));
                }
                cursor = Some(next);
            }
            next => {
                if json {
                    // --all prints one body as if the server had sent every key at once.
                    let body = first_page.unwrap_or_else(|| json!({ "keys": records, "next_cursor": null }));
                    return Ok(pretty(&body));
                }
                return Ok(render_key_list(&records, next.as_deref()));
            }
        }
    }
}

fn next_cursor(page: &Value) -> Option<String> {
    match page.get("next_cursor") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        keys: KeysArgs,
    }

    fn parse(args: &[&str]) -> Result<KeysArgs, clap::Error> {
        TestCli::try_parse_from(std::iter::once("keys").chain(args.iter().copied())).map(|cli| cli.keys)
    }

    fn parsed(args: &[&str]) -> KeysArgs {
        match parse(args) {
            Ok(keys) => keys,
            Err(e) => panic!("{args:?} should parse: {e}"),
        }
    }

    fn refused(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(keys) => panic!("{args:?} should be refused, got {keys:?}"),
            Err(e) => e,
        }
    }

    fn create(args: &[&str]) -> CreateArgs {
        match *parsed(args).command {
            KeysCommand::Create(create) => create,
            other => panic!("expected create, got {other:?}"),
        }
    }

    fn update(args: &[&str]) -> UpdateArgs {
        match *parsed(args).command {
            KeysCommand::Update(update) => update,
            other => panic!("expected update, got {other:?}"),
        }
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        TestCli::command().debug_assert();
        super::super::Cli::command().debug_assert();
    }

    #[test]
    fn rate_limit_and_quota_syntax() {
        assert_eq!(parse_rate_limit("10/1s"), Ok(RateLimitArg { requests: 10, per: "1s".into() }));
        assert_eq!(parse_rate_limit(" 1000 / 1m "), Ok(RateLimitArg { requests: 1000, per: "1m".into() }));
        assert_eq!(parse_rate_limit("5/s"), Ok(RateLimitArg { requests: 5, per: "1s".into() }));
        assert_eq!(parse_rate_limit("100/1h30m"), Ok(RateLimitArg { requests: 100, per: "1h30m".into() }));
        for bad in ["10", "10/", "/1s", "x/1s", "0/1s", "-1/1s", "10/0s", "10/1.5s", "10/1x", "99999999999/1s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_rate_limit("10").unwrap_err().contains("REQUESTS/DURATION"));

        assert_eq!(parse_quota("10000/month"), Ok(QuotaArg { requests: 10_000, per: "month" }));
        assert_eq!(parse_quota("50/day"), Ok(QuotaArg { requests: 50, per: "day" }));
        for bad in ["10000", "10000/week", "0/day", "x/day", "10/1d", "10/Month"] {
            assert!(parse_quota(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bad_flag_values_are_command_line_errors() {
        for args in [
            &["create", "--name", "a", "--rate-limit", "10/x"][..],
            &["create", "--name", "a", "--quota", "10/week"],
            &["create", "--name", "a", "--ip", "10.0.0.0/33"],
            &["create", "--name", "a", "--expires-at", "tomorrow"],
            &["create", "--name", "a", "--ttl", "0s"],
            &["create", "--name", "a", "--metadata", "novalue"],
            &["create", "--name", "a", "--prefix", "_bad"],
            &["create", "--name", "a", "--scope", "has space"],
            &["list", "--limit", "0"],
            &["list", "--status", "expired"],
            &["update", "k", "--status", "revoked"],
            &["usage", "k", "--granularity", "week"],
            &["usage", "k", "--from", "yesterday"],
            &["rotate", "k", "--grace-period", "1 day"],
            &["list", "--admin-url", "localhost:9090"],
        ] {
            let error = refused(args);
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }

    #[test]
    fn required_fields_and_conflicts() {
        // create needs --name; update needs something to change.
        assert_eq!(refused(&["create"]).kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let error = match check_command_line(&parsed(&["update", "key_1"])) {
            Ok(()) => panic!("an update without changes should be refused"),
            Err(e) => e,
        };
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("nothing to change"), "{error}");
        assert!(check_command_line(&parsed(&["update", "key_1", "--tag", "x"])).is_ok());
        assert!(check_command_line(&parsed(&["show", "key_1"])).is_ok());
        assert_eq!(refused(&["show"]).kind(), clap::error::ErrorKind::MissingRequiredArgument);
        // --burst only means something with --rate-limit.
        assert_eq!(refused(&["create", "--name", "a", "--burst", "5"]).exit_code(), 2);
        assert_eq!(
            refused(&["create", "--name", "a", "--ttl", "1d", "--expires-at", "2030-01-01T00:00:00Z"]).exit_code(),
            2
        );
        assert_eq!(
            refused(&["update", "k", "--owner", "o", "--clear-owner"]).kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
        assert_eq!(refused(&["update", "k", "--ttl", "1d", "--clear-expires-at"]).exit_code(), 2);
        // A clear flag alone is a change.
        assert!(update(&["update", "key_1", "--clear-quota"]).clear_quota);
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        let before = parsed(&["--json", "--admin-url", "http://cp:9999/", "--token", "t0k", "list"]);
        let after = parsed(&["list", "--json", "--admin-url", "http://cp:9999/", "--token", "t0k"]);
        for args in [before, after] {
            assert!(args.global.json);
            assert_eq!(display_url(&args.global.admin_url), "http://cp:9999");
            assert_eq!(args.global.token.as_deref(), Some("t0k"));
            // Debug output must not carry the token.
            assert!(!format!("{args:?}").contains("t0k"));
        }
    }

    #[test]
    fn the_admin_url_defaults_to_the_local_admin_port() {
        // Only meaningful when the environment does not override it.
        if std::env::var_os("KEYGATE_ADMIN_URL").is_none() {
            assert_eq!(display_url(&parsed(&["list"]).global.admin_url), DEFAULT_ADMIN_URL);
        }
    }

    #[test]
    fn create_body_carries_exactly_the_given_fields() {
        let minimal = create(&["create", "--name", "web"]);
        assert_eq!(create_body(&minimal), json!({ "name": "web" }));

        let full = create(&[
            "create",
            "--name",
            "web",
            "--owner",
            "acme",
            "--plan",
            "pro",
            "--scope",
            "orders:read",
            "--scope",
            "orders:write,users:*",
            "--ip",
            "10.0.0.0/8",
            "--ip",
            "192.0.2.7",
            "--ip",
            "2001:db8::/32",
            "--rate-limit",
            "10/1s",
            "--burst",
            "20",
            "--quota",
            "10000/month",
            "--quota-by",
            "owner",
            "--ttl",
            "30d",
            "--prefix",
            "kg_test",
            "--metadata",
            "team=core",
            "--metadata",
            "ticket=OPS-1=2",
            "--tag",
            "prod",
            "--tag",
            "eu",
        ]);
        assert_eq!(
            create_body(&full),
            json!({
                "name": "web",
                "owner": "acme",
                "plan": "pro",
                "scopes": ["orders:read", "orders:write", "users:*"],
                "ip_allowlist": ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"],
                "rate_limit": { "requests": 10, "per": "1s", "burst": 20 },
                "quota": { "requests": 10000, "per": "month", "by": "owner" },
                "ttl": "30d",
                "prefix": "kg_test",
                "metadata": { "team": "core", "ticket": "OPS-1=2" },
                "tags": ["prod", "eu"],
            })
        );

        let expiring =
            create(&["create", "--name", "w", "--expires-at", "2030-01-31T00:00:00Z", "--rate-limit", "5/1m"]);
        assert_eq!(
            create_body(&expiring),
            json!({ "name": "w", "expires_at": "2030-01-31T00:00:00Z", "rate_limit": { "requests": 5, "per": "1m" } })
        );
    }

    #[test]
    fn update_body_sends_only_changes_and_nulls_for_clears() {
        let rename = update(&["update", "key_1", "--name", "new", "--status", "disabled"]);
        assert_eq!(update_body(&rename), json!({ "name": "new", "status": "disabled" }));

        let clears = update(&[
            "update",
            "key_1",
            "--clear-owner",
            "--clear-plan",
            "--clear-ip-allowlist",
            "--clear-rate-limit",
            "--clear-quota",
            "--clear-expires-at",
        ]);
        assert_eq!(
            update_body(&clears),
            json!({
                "owner": null, "plan": null, "ip_allowlist": null,
                "rate_limit": null, "quota": null, "expires_at": null,
            })
        );

        let mixed = update(&["update", "key_1", "--quota", "50/day", "--scope", "a"]);
        assert_eq!(update_body(&mixed), json!({ "quota": { "requests": 50, "per": "day" }, "scopes": ["a"] }));

        let collections = update(&["update", "key_1", "--clear-scopes", "--clear-tags", "--clear-metadata"]);
        assert_eq!(update_body(&collections), json!({ "scopes": [], "tags": [], "metadata": {} }));
    }

    #[test]
    fn list_and_usage_queries_carry_only_what_was_given() {
        let KeysCommand::List(list) =
            *parsed(&["list", "--owner", "acme", "--status", "revoked", "--limit", "5"]).command
        else {
            panic!("expected list");
        };
        assert_eq!(
            list_query(&list, Some("c2")),
            vec![
                ("owner", "acme".into()),
                ("status", "revoked".into()),
                ("limit", "5".into()),
                ("cursor", "c2".into())
            ]
        );
        let KeysCommand::Usage(usage) =
            *parsed(&["usage", "key_1", "--from", "2025-01-01T00:00:00Z", "--granularity", "hour"]).command
        else {
            panic!("expected usage");
        };
        assert_eq!(usage_query(&usage), vec![("from", "2025-01-01T00:00:00Z".into()), ("granularity", "hour".into())]);
    }

    #[test]
    fn error_messages_follow_the_status() {
        let body = |message: &str| format!(r#"{{"error":{{"code":"x","message":"{message}","request_id":"req_1"}}}}"#);
        assert_eq!(
            describe_api_error(400, &body("rate_limit.per: invalid duration"), None, true),
            "invalid request: rate_limit.per: invalid duration"
        );
        let unauthorized = describe_api_error(401, &body("bad token"), None, true);
        assert!(unauthorized.starts_with("the admin API refused the token (401): bad token\nhint: "), "{unauthorized}");
        assert!(unauthorized.contains("--token") && unauthorized.contains("KEYGATE_ADMIN_TOKEN"));
        assert!(describe_api_error(401, "", None, false).contains("no token was given"));

        let not_found = r#"{"error":{"code":"not_found","message":"key not found","request_id":"r"}}"#;
        assert_eq!(describe_api_error(404, not_found, Some("key_9"), true), "no key key_9: key not found");
        let own = r#"{"error":{"code":"not_found","message":"no key key_9","request_id":"r"}}"#;
        assert_eq!(describe_api_error(404, own, Some("key_9"), true), "no key key_9");
        assert_eq!(describe_api_error(404, "", Some("key_9"), true), "no key key_9");
        let no_route = r#"{"error":{"code":"no_route","message":"no route","request_id":"r"}}"#;
        assert!(describe_api_error(404, no_route, Some("key_9"), true).contains("--admin-url"));

        assert_eq!(describe_api_error(409, &body("name taken"), None, true), "conflict: name taken");
        assert_eq!(
            describe_api_error(500, &body("database down"), None, true),
            "the admin API answered 500 Internal Server Error: database down (request id req_1)"
        );
        assert_eq!(describe_api_error(403, "", None, true), "the admin API answered 403 Forbidden");
        assert_eq!(
            describe_api_error(502, "<html>\n <b>Bad\tgateway</b></html>", None, true),
            "the admin API answered 502 Bad Gateway: <html> <b>Bad gateway</b></html>"
        );
    }

    #[test]
    fn an_unreachable_admin_api_is_exit_1_with_a_clear_message() {
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("cannot bind a local port: {e}"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let args = || parsed(&["--admin-url", &url, "--token", "s3cret-token", "show", "key_1"]);
        let message = match execute(args()) {
            Ok(output) => panic!("expected an error, got {output:?}"),
            Err(e) => e.to_string(),
        };
        assert!(message.starts_with(&format!("cannot reach the admin API at {url}: ")), "{message}");
        assert!(message.contains("--admin-url") && message.contains("KEYGATE_ADMIN_URL"), "{message}");
        assert!(!message.contains("s3cret-token"), "{message}");
        assert_eq!(run(args()), ExitCode::from(1));
    }

    fn record() -> Value {
        json!({
            "id": "key_1", "name": "web", "owner": "acme", "plan": null, "status": "active",
            "masked": "kg_live_Ab3d…x9Zq", "prefix": "kg_live", "scopes": ["orders:read", "orders:*"],
            "ip_allowlist": [], "rate_limit": { "requests": 10, "per": "1s", "burst": 20 },
            "quota": { "requests": 10000, "per": "month", "by": "owner" }, "expires_at": "2030-01-31T12:00:00.123+01:00",
            "metadata": { "team": "core" }, "tags": ["prod"], "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z", "last_used_at": null, "version": 3,
        })
    }

    #[test]
    fn the_key_table_aligns_columns_and_dashes_empty_cells() {
        let other = json!({ "id": "key_22", "name": "batch job", "status": "revoked", "masked": "kg_live_Zz…Yy" });
        let rendered = render_key_list(&[record(), other], Some("abc"));
        let expected = "\
ID      NAME       OWNER  PLAN  STATUS   MASKED             SCOPES                EXPIRES               LAST USED
key_1   web        acme   -     active   kg_live_Ab3d…x9Zq  orders:read,orders:*  2030-01-31 11:00:00Z  -
key_22  batch job  -      -     revoked  kg_live_Zz…Yy      -                     -                     -

more keys: run again with --cursor abc (or use --all)
";
        assert_eq!(rendered, expected);
        assert_eq!(render_key_list(&[], None), "no keys\n");
    }

    #[test]
    fn a_record_is_field_value_lines() {
        let rendered = render_record(&record());
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines[0], "id:           key_1");
        assert!(lines.contains(&"plan:         -"), "{rendered}");
        assert!(lines.contains(&"scopes:       orders:read, orders:*"), "{rendered}");
        assert!(lines.contains(&"ip_allowlist: -"), "{rendered}");
        assert!(lines.contains(&"rate_limit:   10/1s, burst 20"), "{rendered}");
        assert!(lines.contains(&"quota:        10000/month, by owner"), "{rendered}");
        assert!(lines.contains(&"metadata:     team=core"), "{rendered}");
        assert!(lines.contains(&"last_used_at: -"), "{rendered}");
        assert_eq!(lines.last(), Some(&"version:      3"));
    }

    #[test]
    fn a_new_key_is_shown_prominently_once() {
        let reply = Reply {
            text: json!({ "key": "kg_live_secret", "record": { "id": "key_1", "name": "web" } }).to_string(),
            url: "http://x".into(),
        };
        let rendered = match render_new_key(&reply, "Created") {
            Ok(text) => text,
            Err(e) => panic!("{e}"),
        };
        assert!(rendered.starts_with("Created key key_1.\n\n    kg_live_secret\n\n"), "{rendered}");
        assert!(rendered.contains("shown only once"), "{rendered}");
        assert!(rendered.contains("\nname:         web\n"), "{rendered}");
        let missing = Reply { text: "{}".into(), url: "http://x".into() };
        assert!(render_new_key(&missing, "Created").is_err());
    }

    #[test]
    fn usage_table_sums_denials_and_adds_a_totals_row() {
        let body = json!({
            "key_id": "key_1",
            "buckets": [
                { "start": "2025-01-01T00:00:00Z", "requests": 10, "allowed": 7, "denied": { "rate_limited": 2, "quota_exceeded": 1 },
                  "status": { "2xx": 6, "4xx": 1 }, "bytes_in": 100, "bytes_out": 2000 },
                { "start": "2025-01-01T01:00:00Z", "requests": 1, "allowed": 1, "denied": {},
                  "status": { "5xx": 1 }, "bytes_in": 5, "bytes_out": 0 },
            ],
        });
        let expected = "\
START                 REQUESTS  ALLOWED  DENIED  2XX  4XX  5XX  BYTES IN  BYTES OUT
2025-01-01 00:00:00Z        10        7       3    6    1    0       100       2000
2025-01-01 01:00:00Z         1        1       0    0    0    1         5          0
TOTAL                       11        8       3    6    1    1       105       2000
";
        assert_eq!(render_usage(&body, "key_1"), expected);
        let mut with_totals = body.clone();
        with_totals["totals"] = json!({ "requests": 99, "allowed": 90, "denied": { "x": 9 } });
        let rendered = render_usage(&with_totals, "key_1");
        assert!(rendered.lines().last().is_some_and(|l| l.starts_with("TOTAL") && l.contains("99")), "{rendered}");
        assert_eq!(render_usage(&json!({ "buckets": [] }), "key_1"), "no usage recorded for key_1 in this period\n");
    }

    #[test]
    fn json_output_keeps_the_servers_key_order() {
        let text = r#"{"record":{"zeta":1,"alpha":[true,null,1.5,"s"]},"key":"kg_live_x","empty":{}}"#;
        let json: Value = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(e) => panic!("{e}"),
        };
        let printed = pretty(&json);
        assert!(printed.find("record").zip(printed.find("\"key\"")).is_some_and(|(r, k)| r < k), "{printed}");
        assert!(printed.find("zeta").zip(printed.find("alpha")).is_some_and(|(z, a)| z < a), "{printed}");
        let reparsed: Value = serde_json::from_str(&printed).unwrap_or_default();
        assert_eq!(reparsed, serde_json::from_str::<Value>(text).unwrap_or_default());
    }

    #[test]
    fn ids_are_one_path_segment() {
        let admin = match Admin::new(&parsed(&["--admin-url", "http://h:1/base/", "list"]).global) {
            Ok(admin) => admin,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(admin.endpoint(&["v1", "keys", "a/../b?c"]).as_str(), "http://h:1/base/v1/keys/a%2F..%2Fb%3Fc");
    }
}
