//! TLS with rustls: listener certificates and upstream trust anchors.
//!
//! Everything is loaded and checked when the config is (Pingora's own loader
//! panics on a bad file), and a listener serves its certificate through a
//! resolver, so a certificate renewed on disk is picked up by a config reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{load_certs_and_key_files, ClientHello, CryptoProvider, ResolvesServerCert, RootCertStore};
use pingora::utils::tls::WrappedX509;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{cert} and {key}: {reason}")]
    Pair { cert: PathBuf, key: PathBuf, reason: String },
}

/// The process-wide rustls provider (ring), installed on first use.
fn crypto_provider() -> Option<Arc<CryptoProvider>> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default().cloned()
}

/// Loads a certificate chain and its private key, and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pair = |reason: String| TlsError::Pair { cert: cert.to_owned(), key: key.to_owned(), reason };
    let (certs, private_key) = load_certs_and_key_files(&cert.to_string_lossy(), &key.to_string_lossy())
        .map_err(|e| pair(e.to_string()))?
        .ok_or_else(|| {
            pair("expected PEM certificates in the first file and a PEM private key in the second".into())
        })?;
    let provider = crypto_provider().ok_or_else(|| pair("no TLS crypto provider is available".into()))?;
    let signing_key =
        provider.key_provider.load_private_key(private_key).map_err(|e| pair(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(|e| pair(format!("the key does not match the certificate: {e}")))?;
    Ok(certified)
}

/// A listener's certificate, replaceable while the listener runs.
#[derive(Debug)]
pub struct ListenerCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl ListenerCertificate {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(ListenerCertificate { current: ArcSwap::from_pointee(load_certified_key(cert, key)?) })
    }

    pub fn replace(&self, certified: CertifiedKey) {
        self.current.store(Arc::new(certified));
    }

    /// Pingora's settings for a listener serving this certificate, with HTTP/2 by ALPN.
    pub fn settings(self: &Arc<Self>) -> pingora::Result<TlsSettings> {
        // The paths are unused: a resolver supplies the certificate.
        let mut settings = TlsSettings::intermediate("", "")?;
        settings.set_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        settings.enable_h2();
        Ok(settings)
    }
}

impl ResolvesServerCert for ListenerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Trust anchors for an upstream with a private CA, in the form Pingora's peers take.
pub fn load_upstream_ca(path: &Path) -> Result<Arc<[WrappedX509]>, TlsError> {
    let fail = |reason: String| TlsError::File { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut anchors = Vec::new();
    // Parsed by webpki first: Pingora's own parser panics on a certificate it cannot read.
    let mut store = RootCertStore::empty();
    for item in CertificateDer::pem_slice_iter(&pem) {
        let der = item.map_err(|e| fail(format!("not a PEM certificate file: {e}")))?;
        store.add(der.clone()).map_err(|e| fail(format!("unusable CA certificate: {e}")))?;
        anchors.push(WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509));
    }
    if anchors.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(anchors.into())
}
