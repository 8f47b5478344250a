//! TLS: listeners terminate TLS with rustls (HTTP/2 by ALPN, HTTP/1.1 still
//! served), upstreams are reached over TLS with SNI and verification against a
//! custom CA, and bad certificate files are refused with a clear error.
//! Certificates are generated for each test run.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A CA and a certificate for `localhost` that it signed, written as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// A key that belongs to no certificate here.
    other_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("leaf params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf certificate");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            fs::write(&path, text).expect("write PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            cert: write("cert.pem", &leaf.pem()),
            key: write("key.pem", &leaf_key.serialize_pem()),
            other_key: write("other-key.pem", &KeyPair::generate().expect("key").serialize_pem()),
            _dir: dir,
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A gateway whose listener speaks TLS with `pki`'s certificate, in front of `up`.
fn tls_gateway(pki: &Pki, up: &Upstream, key: &TestKey) -> Gateway {
    let config = format!(
        r#"mode: gateway
node_id: tls-gw
threads: 1
listeners:
  - address: @LISTEN@
    tls: {{ cert: "{cert}", key: "{key}" }}
admin:
  address: @ADMIN@
keys:
  source: file
  file: @KEYS@
upstreams:
  api: {{ targets: ["@UP@"] }}
routes:
  - {{ name: public, match: {{ path_prefix: /public }}, upstream: api, auth: none }}
  - {{ name: orders, match: {{ path_prefix: /v1/orders }}, upstream: api, scopes: [orders:read] }}
access_log: off
"#,
        cert = path(&pki.cert),
        key = path(&pki.key)
    );
    GatewayBuilder::new(&config).var("UP", &up.addr()).keys(&keys_file(&[key.entry("scopes: [orders:read]")])).start()
}

/// A synchronous HTTPS client trusting `pki`'s CA, so tests stay free of async plumbing.
struct Https {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

struct Answer {
    status: u16,
    version: reqwest::Version,
    body: String,
}

impl Https {
    fn new(pki: &Pki, http1_only: bool) -> Https {
        let ca = fs::read(&pki.ca).expect("read CA");
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA PEM"))
            .timeout(Duration::from_secs(10));
        if http1_only {
            builder = builder.http1_only();
        }
        Https {
            runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
            client: builder.build().expect("client"),
        }
    }

    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Answer {
        self.runtime.block_on(async {
            let mut request = self.client.get(url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
            let status = response.status().as_u16();
            let version = response.version();
            let body = response.text().await.unwrap_or_default();
            Answer { status, version, body }
        })
    }
}

#[test]
fn tls_listener_negotiates_http2_and_still_serves_http1() {
    let pki = Pki::new();
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let gw = tls_gateway(&pki, &up, &alice);
    let url = format!("https://localhost:{}/v1/orders/1", gw.addr.port());

    let h2 = Https::new(&pki, false);
    let answer = h2.get(&url, &[("x-api-key", &alice.raw)]);
    assert_eq!((answer.status, answer.version), (200, reqwest::Version::HTTP_2), "{}", answer.body);
    let denied = h2.get(&url, &[]);
    assert_eq!(denied.status, 401);
    assert!(denied.body.contains("missing_key"), "{}", denied.body);

    let h1 = Https::new(&pki, true);
    let answer = h1.get(&url, &[("authorization", &alice.bearer())]);
    assert_eq!((answer.status, answer.version), (200, reqwest::Version::HTTP_11), "{}", answer.body);
    assert_eq!(up.request_count(), 2);
    // The key never reaches the upstream, over TLS as over plain HTTP.
    assert!(up.requests().iter().all(|r| !r.contains(&alice.raw)));
}

/// A gateway whose `secure` upstream is `tls_upstream` over TLS, with or without our CA.
fn gateway_to_tls_upstream(pki: &Pki, tls_upstream: &Gateway, with_ca: bool) -> Gateway {
    let ca = if with_ca { format!(", ca: \"{}\"", path(&pki.ca)) } else { String::new() };
    let config = gateway_config(&format!(
        r#"upstreams:
  secure:
    targets: ["127.0.0.1:{port}"]
    tls: {{ sni: localhost{ca} }}
    connect_timeout: 2s
    read_timeout: 5s
routes:
  - {{ name: through, match: {{ path_prefix: /public }}, upstream: secure, auth: none }}
access_log: off
"#,
        port = tls_upstream.addr.port()
    ));
    GatewayBuilder::new(&config).start()
}

#[test]
fn upstream_tls_is_verified_against_a_custom_ca() {
    let pki = Pki::new();
    let up = Upstream::start("api");
    let alice = TestKey::new("key_alice");
    let tls_upstream = tls_gateway(&pki, &up, &alice);

    let trusting = gateway_to_tls_upstream(&pki, &tls_upstream, true);
    let through = trusting.get("/public/hello", &[]);
    assert_eq!(through.status, 200, "{}", through.text());
    assert!(up.requests().iter().any(|r| r.target == "/public/hello"), "the request went through both gateways");

    // Without the CA the upstream's certificate cannot be verified: the gateway refuses it.
    let distrusting = gateway_to_tls_upstream(&pki, &tls_upstream, false);
    let refused = wait_until(Duration::from_secs(10), "a verification failure", || {
        let r = distrusting.get("/public/hello", &[]);
        (r.status >= 500).then_some(r)
    });
    assert_error(&refused, 502, "upstream_error");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_by_check_config_and_serve() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.yaml");
    fs::write(&keys, "keys: []\n").expect("write keys");
    let config = dir.path().join("keygate.yaml");
    fs::write(
        &config,
        format!(
            "mode: gateway\nlisteners:\n  - address: 127.0.0.1:{port}\n    tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n\
             admin: {{ address: 127.0.0.1:{admin} }}\nkeys: {{ source: file, file: \"{keys}\" }}\n",
            port = free_port(),
            admin = free_port(),
            cert = path(&pki.cert),
            key = path(&pki.other_key),
            keys = path(&keys),
        ),
    )
    .expect("write config");
    let config = path(&config);

    let checked = run_cli(&["check-config", "-c", &config], None, &[], &[]);
    assert_eq!(checked.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(stderr.contains("does not match the certificate"), "{stderr}");

    let served = run_cli(&["serve", "-c", &config], None, &[], &[]);
    assert_eq!(served.status.code(), Some(1), "serve must refuse, not panic");
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(stderr.contains("does not match the certificate") && !stderr.contains("panicked"), "{stderr}");
}
