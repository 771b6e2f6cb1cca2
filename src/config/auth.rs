//! `[auth]`: who may open the public door. Browsers prove who they are with a JWT signed by the
//! application: an HMAC secret (`jwt_secret`) or a public key (`jwt_public_key`, PEM: RSA, EC or
//! Ed25519). Without either the public door is in protected mode: only loopback peers may connect,
//! unless `insecure` says otherwise.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};

use super::Secret;

/// An HMAC secret shorter than this is refused: HS256 needs 256 bits of key.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lets browsers from any address connect without authentication (development only).
    pub insecure: bool,
    /// The HMAC secret browser tokens are signed with (HS256, HS384, HS512).
    pub jwt_secret: Option<Secret>,
    /// The PEM public key browser tokens are signed for (RSA: RS*/PS*, EC: ES256/ES384,
    /// Ed25519: EdDSA).
    pub jwt_public_key: Option<String>,
    /// The identity provider's JWKS (`jwks_uri`): browser token keys fetched by their `kid`.
    pub jwks_url: Option<String>,
    /// An unknown `kid` fetches the JWKS again at most this often.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// When set, a token's `iss` must be this.
    pub jwt_issuer: Option<String>,
    /// When set, a token's `aud` must contain this.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Keys producers show on the internal door (`Authorization: Bearer`) to post events and
    /// register runs; several for rotation.
    pub producer_keys: Vec<Secret>,
    /// Keys operators show on the internal door to read the ledger, channels, runs and dead
    /// letters and to redrive them.
    pub operator_keys: Vec<Secret>,
    /// The application's subscribe webhook: asked whether a user may read a thread that neither
    /// token allows (`http://` or `https://`).
    pub subscribe_webhook: Option<String>,
    /// How long the subscribe webhook may take; past it the subscription is refused.
    #[serde(with = "humantime_serde")]
    pub subscribe_webhook_timeout: Duration,
    /// How long a subscribe webhook answer is kept, when it does not say (`cache_seconds`).
    #[serde(with = "humantime_serde")]
    pub subscribe_cache_ttl: Duration,
    /// Origins besides the gateway's own that may open `/ws`: `https://app.example.com`, or with a
    /// wildcard label, `https://*.example.com`.
    pub allowed_origins: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            jwt_secret: None,
            jwt_public_key: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            subscribe_webhook: None,
            subscribe_webhook_timeout: Duration::from_secs(2),
            subscribe_cache_ttl: Duration::from_secs(60),
            producer_keys: Vec::new(),
            operator_keys: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether browsers must prove who they are (a key to verify their tokens is configured).
    pub fn authenticates_browsers(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some() || self.jwks_url.is_some()
    }

    /// The key browser tokens are verified with, and the algorithms it may verify: only those of
    /// its own family, so a public key can never be taken for an HMAC secret. `Err` names what is
    /// wrong with the configured key; `Ok(None)` when none is configured.
    pub fn decoding_key(&self) -> Result<Option<(DecodingKey, Vec<Algorithm>)>, String> {
        use Algorithm::*;
        let sources = [
            self.jwt_secret.is_some(),
            self.jwt_public_key.is_some(),
            self.jwks_url.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() > 1 {
            return Err("set one of jwt_secret, jwt_public_key and jwks_url".into());
        }
        match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(_), Some(_)) => Err("set jwt_secret or jwt_public_key, not both".into()),
            (Some(secret), None) if secret.len() < MIN_SECRET_BYTES => Err(format!(
                "must be at least {MIN_SECRET_BYTES} bytes (HS256 needs 256 bits of key)"
            )),
            (Some(secret), None) => Ok(Some((
                DecodingKey::from_secret(secret.expose().as_bytes()),
                vec![HS256, HS384, HS512],
            ))),
            (None, Some(pem)) => {
                let pem = pem.as_bytes();
                if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                    Ok(Some((key, vec![RS256, RS384, RS512, PS256, PS384, PS512])))
                } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
                    Ok(Some((key, vec![ES256, ES384])))
                } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                    Ok(Some((key, vec![EdDSA])))
                } else {
                    Err("not a PEM RSA, EC or Ed25519 public key".into())
                }
            }
            (None, None) => Ok(None),
        }
    }

    /// Whether `origin` (an `Origin` header) may open `/ws`; `host` is the request's `Host`.
    pub fn allows_origin(&self, origin: &str, host: Option<&str>) -> bool {
        let same = url::Url::parse(origin).ok().is_some_and(|url| {
            let authority = match (url.host_str(), url.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => return false,
            };
            host.is_some_and(|host| host.eq_ignore_ascii_case(&authority))
        });
        same || self
            .allowed_origins
            .iter()
            .any(|allowed| matches(allowed, origin))
    }
}

/// `https://*.example.com` matches `https://a.example.com` (one or more labels), not
/// `https://example.com` nor `https://evil.com/.example.com`.
fn matches(pattern: &str, origin: &str) -> bool {
    match pattern.split_once("*.") {
        None => pattern.eq_ignore_ascii_case(origin),
        Some((scheme, domain)) => {
            origin
                .get(..scheme.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                && origin[scheme.len()..]
                    .to_ascii_lowercase()
                    .strip_suffix(&domain.to_ascii_lowercase())
                    .is_some_and(|sub| {
                        sub.ends_with('.')
                            && sub.len() > 1
                            && !sub.contains(['/', ':', '@', '?', '#'])
                    })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let auth = AuthConfig {
            allowed_origins: vec![
                "https://app.example.com".into(),
                "https://*.agents.dev".into(),
            ],
            ..AuthConfig::default()
        };
        let check = |origin, host| auth.allows_origin(origin, host);
        assert!(
            check("http://localhost:8000", Some("localhost:8000")),
            "same origin"
        );
        assert!(check("https://app.example.com", Some("gw.example.com")));
        assert!(check("https://a.b.agents.dev", None));
        assert!(!check("https://agents.dev", None));
        assert!(!check("https://evil.example", Some("gw.example.com")));
        assert!(!check("https://evil.com/.agents.dev", None));
        assert!(!check("https://evil.com?.agents.dev", None));
        assert!(!check("http://app.example.com", None), "scheme matters");
        assert!(!check("null", Some("localhost:8000")));
    }
}
