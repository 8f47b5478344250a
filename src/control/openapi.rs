//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of the admin address (CONTRACT §6).
//!
//! The document is written by hand beside this file (`openapi.json`) and served as it
//! is. Tests hold it to the code: the unit tests below compare its operations with the
//! routes the admin address serves, both ways, and check its schemas against the
//! records keygate writes; `tests/openapi.rs` validates real responses of a running
//! node against it.

use axum::http::header;
use axum::response::IntoResponse;

use super::api::Reader;
use crate::outcome::APPLICATION_JSON;

/// The document, compiled into the binary.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /v1/openapi.json` (admin or read token).
pub(super) async fn document(_reader: Reader) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, APPLICATION_JSON)], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use super::*;
    use crate::control::model::{sample_key, AuditEvent, StoredKey, UsageBucket};

    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
    }

    /// A validator for `schema` (inline or a `$ref`), with the document's components to resolve in.
    fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
        let root = json!({"components": doc["components"], "allOf": [schema]});
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    #[track_caller]
    fn assert_valid(doc: &Value, name: &str, instance: &Value) {
        let schema = json!({"$ref": format!("#/components/schemas/{name}")});
        let errors: Vec<String> = validator(doc, &schema).iter_errors(instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name} does not accept {instance}: {errors:#?}");
    }

    fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut out = Vec::new();
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("a path item").iter() {
                if METHODS.contains(&method.as_str()) {
                    out.push((method.to_uppercase(), path.clone(), operation));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_is_openapi_3_1_of_this_version() {
        let doc = doc();
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"), "info.version follows Cargo.toml");
    }

    #[test]
    fn every_route_served_is_documented_and_every_operation_is_served() {
        let doc = doc();
        let mut served = BTreeSet::new();
        for (method, path) in super::super::api::routes()
            .iter()
            .map(|r| (&r.method, r.path))
            .chain(crate::admin::ops_routes().iter().map(|r| (&r.method, r.path)))
        {
            assert!(served.insert((method.to_string(), path.to_owned())), "{method} {path} is routed twice");
        }
        let documented: BTreeSet<(String, String)> =
            operations(&doc).into_iter().map(|(method, path, _)| (method, path)).collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(undocumented.is_empty(), "served but not in openapi.json: {undocumented:?}");
        assert!(unserved.is_empty(), "in openapi.json but not served: {unserved:?}");
    }

    #[test]
    fn every_operation_is_named_tagged_and_answers_errors_in_the_error_shape() {
        let doc = doc();
        let tags: BTreeSet<&str> =
            doc["tags"].as_array().expect("tags").iter().filter_map(|t| t["name"].as_str()).collect();
        let mut ids = BTreeSet::new();
        for (method, path, operation) in operations(&doc) {
            let at = format!("{method} {path}");
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{at} has no operationId"));
            assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
            let tag = operation["tags"][0].as_str().unwrap_or_else(|| panic!("{at} has no tag"));
            assert!(tags.contains(tag), "{at}: tag {tag} is not declared");
            let sync = path.starts_with("/v1/sync/");
            assert_eq!(sync, tag == "sync", "{at}: the sync feed, and only it, is tagged sync");
            if sync {
                assert_eq!(operation["security"], json!([{"syncToken": []}]), "{at}");
                assert_eq!(operation["x-internal"], true, "{at}");
            }
            let responses = operation["responses"].as_object().unwrap_or_else(|| panic!("{at} has no responses"));
            if path.starts_with("/v1/") {
                assert!(responses.contains_key("401"), "{at} documents no 401");
            }
            for (status, response) in responses {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                let content = &resolve(&doc, response)["content"];
                assert_eq!(
                    content["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                    "{at} {status}"
                );
            }
        }
    }

    /// A Response or Parameter object, its `$ref` followed.
    fn resolve<'a>(doc: &'a Value, object: &'a Value) -> &'a Value {
        match object["$ref"].as_str() {
            Some(reference) => doc
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{reference} points at nothing")),
            None => object,
        }
    }

    #[test]
    fn every_reference_resolves_inside_the_document() {
        fn walk(doc: &Value, at: &Value, path: &str) {
            match at {
                Value::Object(map) => {
                    if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                        assert!(reference.starts_with("#/"), "{path}: {reference} is not local");
                        assert!(doc.pointer(&reference[1..]).is_some(), "{path}: {reference} points at nothing");
                    }
                    for (key, value) in map {
                        walk(doc, value, &format!("{path}/{key}"));
                    }
                }
                Value::Array(items) => {
                    for (i, value) in items.iter().enumerate() {
                        walk(doc, value, &format!("{path}/{i}"));
                    }
                }
                _ => {}
            }
        }
        let doc = doc();
        walk(&doc, &doc, "");
    }

    #[test]
    fn every_schema_is_valid_json_schema_2020_12_and_compiles() {
        let doc = doc();
        let schemas = doc["components"]["schemas"].as_object().expect("components.schemas");
        for (name, schema) in schemas {
            if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
                panic!("components.schemas.{name} is not a JSON Schema: {e}");
            }
            validator(&doc, &json!({"$ref": format!("#/components/schemas/{name}")}));
        }
    }

    /// Every property of `schema`, which must all be required and no others allowed.
    fn closed_properties(doc: &Value, name: &str) -> BTreeSet<String> {
        let schema = &doc["components"]["schemas"][name];
        assert_eq!(schema["additionalProperties"], false, "{name} allows other properties");
        let properties: BTreeSet<String> =
            schema["properties"].as_object().expect("properties").keys().cloned().collect();
        let required: BTreeSet<String> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .map(|v| v.as_str().expect("a property name").to_owned())
            .collect();
        assert_eq!(properties, required, "{name}: every property of a record is always written");
        properties
    }

    fn keys_of(value: &Value) -> BTreeSet<String> {
        value.as_object().expect("an object").keys().cloned().collect()
    }

    #[test]
    fn the_key_schemas_name_every_field_of_a_record() {
        let doc = doc();
        let key = StoredKey {
            owner: Some("acme".into()),
            plan: Some("free".into()),
            rate_limit: Some(crate::config::RateLimitConfig {
                requests: 10,
                per: std::time::Duration::from_secs(1),
                burst: Some(20),
                by: crate::config::LimitScope::Owner,
            }),
            quota: Some(crate::config::QuotaConfig {
                requests: 1000,
                per: crate::config::QuotaPeriod::Month,
                by: crate::config::LimitScope::Key,
            }),
            expires_at: Some(time::macros::datetime!(2027-01-01 00:00 UTC)),
            last_used_at: Some(time::macros::datetime!(2026-02-01 12:30:00.25 UTC)),
            ..sample_key("key_abc", format!("sha256:{}", "0".repeat(64)))
        };
        let public = key.public_json();
        assert_eq!(closed_properties(&doc, "Key"), keys_of(&public));
        assert_valid(&doc, "Key", &public);
        assert_valid(&doc, "Key", &sample_key("key_abc", String::new()).public_json());

        // The sync feed's record is the stored one: the public record, its hash and its version.
        let stored = serde_json::to_value(&key).expect("a key serializes");
        assert_eq!(closed_properties(&doc, "SyncKey"), keys_of(&stored));
        let mut sync_only = closed_properties(&doc, "SyncKey");
        sync_only.retain(|p| !closed_properties(&doc, "Key").contains(p));
        assert_eq!(sync_only, BTreeSet::from(["hash".to_owned(), "version".to_owned()]));
        for property in closed_properties(&doc, "Key") {
            assert_eq!(
                doc["components"]["schemas"]["Key"]["properties"][&property],
                doc["components"]["schemas"]["SyncKey"]["properties"][&property],
                "Key and SyncKey differ on {property}"
            );
        }
        assert_valid(&doc, "SyncKey", &stored);
    }

    #[test]
    fn usage_audit_and_gateway_schemas_name_every_field() {
        let doc = doc();
        let mut bucket = UsageBucket::empty(time::macros::datetime!(2026-01-01 00:00 UTC));
        bucket.denied.insert("rate_limited".into(), 2);
        let bucket = serde_json::to_value(&bucket).expect("a bucket serializes");
        assert_eq!(closed_properties(&doc, "UsageBucket"), keys_of(&bucket));
        assert_valid(&doc, "UsageBucket", &bucket);

        let event = AuditEvent {
            id: 1,
            at: time::macros::datetime!(2026-01-01 00:00 UTC),
            actor: "ops".into(),
            action: "key.update".into(),
            key_id: Some("key_abc".into()),
            details: json!({"fields": ["name"]}),
        };
        let event = serde_json::to_value(&event).expect("an audit event serializes");
        assert_eq!(closed_properties(&doc, "AuditEvent"), keys_of(&event));
        assert_valid(&doc, "AuditEvent", &event);

        let codes = &doc["components"]["schemas"]["DeniedCounts"]["propertyNames"]["enum"];
        assert_eq!(codes, &json!(crate::outcome::Denial::CODES), "DeniedCounts names every denial code");

        let registry = crate::control::gateways::GatewayRegistry::default();
        drop(registry.poll_started("gw-1", 3, Some("10.0.0.2:5000".parse().expect("an address"))));
        let gateway = serde_json::to_value(&registry.list(5)[0]).expect("a gateway serializes");
        assert_eq!(closed_properties(&doc, "Gateway"), keys_of(&gateway));
        assert_valid(&doc, "Gateway", &gateway);
    }
}
