//! `agentwire config`: the effective configuration as TOML, with secrets hidden.

use super::Config;

impl Config {
    /// The effective configuration as TOML, for `agentwire config`.
    /// Secrets (a password in a URL, every [`super::Secret`]) are shown as `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.webhook_url = shown.upstream.webhook_url.as_deref().map(hide_password);
        shown.broker.redis_url = shown.broker.redis_url.as_deref().map(hide_password);
        shown.auth.jwks_url = shown.auth.jwks_url.as_deref().map(hide_password);
        shown.auth.subscribe_webhook = shown.auth.subscribe_webhook.as_deref().map(hide_password);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `scheme://user:secret@host/…?key=value` → `scheme://user:***@host/…?key=***`: a URL's password
/// and its query values (a webhook's `?token=`) are not shown.
fn hide_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = hide_userinfo(base);
    match query {
        None => base,
        Some(query) => {
            let hidden: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) => format!("{key}=***"),
                    None => pair.to_string(),
                })
                .collect();
            format!("{base}?{}", hidden.join("&"))
        }
    }
}

fn hide_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let hidden = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        "***".to_string()
    };
    format!("{scheme}://{hidden}@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_when_printed() {
        assert_eq!(
            hide_password("http://hook:s3cret@agent:9000/hlink"),
            "http://hook:***@agent:9000/hlink"
        );
        assert_eq!(
            hide_password("redis://:pw@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(hide_password("http://token@agent/x"), "http://***@agent/x");
        assert_eq!(
            hide_password("https://hook:pw@agent/h?token=abc&tenant=a&flag"),
            "https://hook:***@agent/h?token=***&tenant=***&flag"
        );
        assert_eq!(
            hide_password("http://agent:9000/hlink"),
            "http://agent:9000/hlink"
        );
        let mut config = Config::default();
        config.upstream.webhook_url = Some("http://hook:s3cret@agent:9000/hlink".into());
        config.auth.jwt_secret = Some("0123456789abcdef0123456789abcdef-secret".into());
        config.auth.producer_keys = vec!["producer-s3cret".into()];
        config.auth.operator_keys = vec!["operator-s3cret".into()];
        let shown = config.to_toml();
        assert!(
            !shown.contains("s3cret") && !shown.contains("abcdef-secret"),
            "{shown}"
        );
    }
}
