//! Verifying Standard Webhooks signatures as a receiver does, written apart from
//! keygate's signing so that the tests check it against the specification.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under `secret`
/// (`whsec_` and base64, or the text itself), with a timestamp within five minutes.
pub fn verify_signature(secret: &str, id: &str, timestamp: &str, signature: &str, body: &[u8]) -> Result<(), String> {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = match secret.strip_prefix("whsec_") {
        Some(encoded) => engine.decode(encoded).map_err(|e| format!("the test's secret is not base64: {e}"))?,
        None => secret.as_bytes().to_vec(),
    };
    let sent: i64 = timestamp.parse().map_err(|_| format!("webhook-timestamp {timestamp:?}"))?;
    if (time::OffsetDateTime::now_utc().unix_timestamp() - sent).abs() > 300 {
        return Err(format!("webhook-timestamp {sent} is not now"));
    }
    if id.is_empty() {
        return Err("no webhook-id".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    if signature == expected {
        Ok(())
    } else {
        Err(format!("webhook-signature {signature:?}, expected {expected:?}"))
    }
}

/// An HTTP receiver on a free port of 127.0.0.1 that answers `POST path` with
/// `handler`, sharing `state` with the test; it runs on a runtime of its own (the tests
/// are synchronous) as long as it lives.
pub struct Receiver<S> {
    pub url: String,
    pub state: std::sync::Arc<S>,
    _runtime: tokio::runtime::Runtime,
}

impl<S: Default + Send + Sync + 'static> Receiver<S> {
    pub fn listen<H, T>(path: &str, handler: H) -> Receiver<S>
    where
        H: axum::handler::Handler<T, std::sync::Arc<S>>,
        T: 'static,
    {
        let state = std::sync::Arc::new(S::default());
        let app =
            axum::Router::new().route(path, axum::routing::post(handler)).with_state(std::sync::Arc::clone(&state));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the receiver");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the receiver");
        let url = format!("http://{}{path}", listener.local_addr().expect("the receiver's address"));
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver { url, state, _runtime: runtime }
    }
}
