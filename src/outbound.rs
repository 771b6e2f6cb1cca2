//! The gateway's own outbound HTTP requests (HLink webhooks, the subscribe webhook, JWKS, AG-UI
//! agents):
//! `http://` or `https://`, with rustls (the `ring` provider), the system's CA certificates and the
//! optional `tls_ca_file`.

use std::path::Path;
use std::sync::Once;

use anyhow::Context;
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

/// A client whose every request gives up after `timeout`, trusting the system's CA certificates
/// and, when given, the PEM CA certificate at `ca_file` (`tls_ca_file`). Built once per use at
/// start; an error (an unreadable CA, no TLS roots) stops the start.
pub fn client(timeout: Duration, ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    build(
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout),
        ca_file,
    )
}

/// A client for answers that stream for as long as a run lasts (an AG-UI agent's SSE): no bound
/// on a whole request, only on connecting; the caller bounds the silence between chunks.
pub fn streaming_client(
    connect_timeout: Duration,
    ca_file: Option<&Path>,
) -> anyhow::Result<reqwest::Client> {
    build(
        reqwest::Client::builder().connect_timeout(connect_timeout),
        ca_file,
    )
}

fn build(
    mut builder: reqwest::ClientBuilder,
    ca_file: Option<&Path>,
) -> anyhow::Result<reqwest::Client> {
    install_tls_provider();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read tls_ca_file {}", path.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// Whether `raw` is a URL the gateway may take keys or decisions from: `https://`, or `http://`
/// to this machine (anyone on the path of a plain request could answer it).
pub fn check_trusted_url(raw: &str) -> Result<(), String> {
    check_url(raw)?;
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    let local = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        _ if local => Ok(()),
        _ => Err("must be https:// (http:// only to this machine)".into()),
    }
}

/// Whether `raw` is a URL the gateway can call: `http://` or `https://`, with a host and a port
/// from 1 to 65535 (a larger one is refused by the parser, 0 here).
pub fn check_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if url.port() == Some(0) {
        return Err("port 0: the port must be between 1 and 65535".into());
    }
    match url.scheme() {
        "http" | "https" if url.has_host() => Ok(()),
        "http" | "https" => Err("no host".into()),
        other => Err(format!("the scheme is {other}, not http or https")),
    }
}

/// Headers the gateway sets itself on a request it forwards: a configured one may not replace them.
const OWN_HEADERS: [&str; 6] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "accept",
];

/// Whether `name: value` is a header the gateway may add to its requests (an agent's API key).
/// The reason never repeats the value, which is a secret.
pub fn check_header(name: &str, value: &str) -> Result<(), &'static str> {
    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err("not a header name");
    }
    if OWN_HEADERS.iter().any(|own| own.eq_ignore_ascii_case(name)) {
        return Err("set by the gateway itself");
    }
    if reqwest::header::HeaderValue::from_str(value).is_err() {
        return Err("the value is not a valid header value (visible ASCII)");
    }
    Ok(())
}
