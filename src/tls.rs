//! TLS for the connections Telltale makes (feature `ssr`): the agent's
//! `wss://`, the store's PostgreSQL with `sslmode=require`. Always rustls
//! with ring (no OpenSSL), always verifying the server's certificate against
//! this machine's trusted certificates, or `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! when set (`rediss://` gets the same from the redis crate).

use std::sync::Arc;

/// A client configuration trusting this machine's certificates, to check
/// `server` with. `Err` (saying why and what to do) when none are found.
pub fn client_config(server: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("reading the trusted certificates: {e}");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (trusted, _unusable) = roots.add_parsable_certificates(found.certs);
    let source = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(|var| Some(format!("{var}={}", std::env::var(var).ok()?)))
        .collect::<Vec<_>>();
    let source = if source.is_empty() {
        "the platform's trust store".to_owned()
    } else {
        source.join(", ")
    };
    if trusted == 0 {
        return Err(format!(
            "no trusted certificate found in {source} to check {server} with; install \
             ca-certificates, or set SSL_CERT_FILE to the PEM file of the server's CA"
        ));
    }
    tracing::info!("TLS to {server}: trusting {trusted} certificates from {source}");
    // The provider is given here, so no process-wide default is needed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS cannot be set up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What to do about a server certificate from an unknown CA.
pub const UNTRUSTED: &str = "the server's certificate is not signed by a CA this machine \
     trusts; for a private CA set SSL_CERT_FILE to its PEM file";

/// What went wrong in a TLS handshake, in words: a certificate from a CA
/// this machine does not trust says how to trust it.
pub fn explain(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            format!("TLS: {e} ({UNTRUSTED})")
        }
        e => format!("TLS: {e}"),
    }
}

/// The rustls error inside `e`, if a TLS handshake is what failed.
pub fn cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An I/O error's `source` skips the error it wraps (which may
        // itself be an I/O error wrapping the TLS error: reqwest's).
        source = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}
