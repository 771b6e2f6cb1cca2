//! The gateway's own outbound HTTP requests (HLink webhooks, the subscribe webhook, JWKS):
//! `http://` or `https://`, with rustls (the `ring` provider) and the system's CA certificates.

use std::sync::Once;
use std::time::Duration;

static PROVIDER: Once = Once::new();

/// Makes `ring` the process's TLS provider: every rustls client (these requests, and the OTLP
/// exporter's) needs one installed before it is built. Called first in `main`; idempotent.
pub fn install_tls_provider() {
    PROVIDER.call_once(|| {
        // Another part of the process may have installed one first; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client whose every request gives up after `timeout`. Built once per use at start; an error
/// (no TLS roots, say) stops the start.
pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    install_tls_provider();
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()?)
}

/// Whether `raw` is a URL the gateway can call: `http://` or `https://`, with a host.
pub fn check_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    match url.scheme() {
        "http" | "https" if url.has_host() => Ok(()),
        "http" | "https" => Err("no host".into()),
        other => Err(format!("the scheme is {other}, not http or https")),
    }
}
