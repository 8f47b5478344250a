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
