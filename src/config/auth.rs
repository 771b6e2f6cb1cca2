//! `[auth]`: who may open the public door. Without browser authentication the public door is in
//! protected mode: only loopback peers may connect, unless `insecure` says otherwise.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lets browsers from any address connect without authentication (development only).
    pub insecure: bool,
    /// Origins besides the gateway's own that may open `/ws`: `https://app.example.com`, or with a
    /// wildcard label, `https://*.example.com`.
    pub allowed_origins: Vec<String>,
}

impl AuthConfig {
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
