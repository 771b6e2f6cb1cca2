//! `agentwire config`: the effective configuration as TOML, with secrets hidden, and each optional
//! key that is not set as a comment with its meaning, so that it can be found.

use super::Config;

/// The keys that have no default, by section (`""`: the top level), with what setting one does.
/// `docs/configuration.md` lists the same keys as `unset` (tidy test).
pub const OPTIONAL: [(&str, &str, &str); 11] = [
    (
        "",
        "tls_ca_file",
        "a PEM CA certificate the gateway's own HTTPS requests trust besides the system's",
    ),
    (
        "upstream",
        "webhook_url",
        "where HLink messages are POSTed (http:// or https://); without it they are refused",
    ),
    (
        "upstream",
        "signing_secret",
        "signs each webhook request (X-Agentwire-Signature); at least 16 bytes",
    ),
    (
        "broker",
        "redis_url",
        "redis://[:password@]host:port[/db] or rediss://, or redis+cluster://host:port,host:port for a Redis Cluster: the Redis broker, instead of the embedded one",
    ),
    (
        "broker",
        "redis_ca_file",
        "a PEM CA certificate to verify a rediss:// (or rediss+cluster://) server with, instead of the system's",
    ),
    (
        "auth",
        "jwt_secret",
        "the HMAC secret browser tokens are signed with (at least 32 bytes)",
    ),
    (
        "auth",
        "jwt_public_key",
        "the PEM public key browser tokens are verified with (RSA, EC or Ed25519)",
    ),
    (
        "auth",
        "jwks_url",
        "the identity provider's JWKS: browser token keys fetched by their kid",
    ),
    (
        "auth",
        "jwt_issuer",
        "when set, a token's iss must equal it",
    ),
    (
        "auth",
        "jwt_audience",
        "when set, a token's aud must contain it",
    ),
    (
        "auth",
        "subscribe_webhook",
        "asked whether a user may read a thread neither token allows",
    ),
];

impl Config {
    /// The effective configuration as TOML, for `agentwire config`.
    /// Secrets (a password in a URL, every [`super::Secret`]) are shown as `***`; each optional key
    /// that is not set is a comment in its section: `# key = ""  # unset: what it does`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.webhook_url = shown.upstream.webhook_url.as_deref().map(hide_password);
        shown.broker.redis_url = shown.broker.redis_url.as_deref().map(hide_password);
        shown.auth.jwks_url = shown.auth.jwks_url.as_deref().map(hide_password);
        shown.auth.subscribe_webhook = shown.auth.subscribe_webhook.as_deref().map(hide_password);
        for agent in shown.agui.agents.values_mut() {
            agent.url = hide_password(&agent.url);
        }
        // The text keeps the fields' order; the table says which keys are set.
        match (
            toml::to_string_pretty(&shown),
            toml::Table::try_from(&shown),
        ) {
            (Ok(text), Ok(table)) => with_unset_keys(&text, &table),
            (Err(error), _) | (_, Err(error)) => format!("# cannot render: {error}\n"),
        }
    }
}

/// `text` (TOML) with a comment for each key of [`OPTIONAL`] that `table` does not hold, at the end
/// of its section.
fn with_unset_keys(text: &str, table: &toml::Table) -> String {
    let unset = |section: &str, key: &str| {
        let holder = match section {
            "" => Some(table),
            section => table.get(section).and_then(toml::Value::as_table),
        };
        !holder.is_some_and(|holder| holder.contains_key(key))
    };
    let comments = |section: &str| -> String {
        OPTIONAL
            .iter()
            .filter(|&&(s, key, _)| s == section && unset(s, key))
            .map(|(_, key, meaning)| format!("# {key} = \"\"  # unset: {meaning}\n"))
            .collect()
    };
    let mut out = String::new();
    let mut section = String::new();
    let mut blank = 0;
    for line in text.lines() {
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push_str(&comments(&section));
            section = name.to_string();
        }
        out.push_str(&"\n".repeat(blank));
        blank = 0;
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&comments(&section));
    out
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
        config.agui.agents.insert(
            "research".into(),
            crate::config::AgentConfig {
                url: "http://agent:s3cret@agent:8123/run".into(),
                headers: [("x-api-key".to_string(), "agent-s3cret".into())].into(),
            },
        );
        let shown = config.to_toml();
        assert!(
            !shown.contains("s3cret") && !shown.contains("abcdef-secret"),
            "{shown}"
        );
        assert!(shown.contains("[agui.agents.research.headers]"), "{shown}");
    }

    #[test]
    fn unset_optional_keys_are_comments_in_their_section() {
        let shown = Config::default().to_toml();
        let parsed: toml::Table = toml::from_str(&shown).expect("still TOML");
        assert_eq!(
            parsed,
            toml::Table::try_from(Config::default()).unwrap(),
            "comments only"
        );
        for (section, key, _) in OPTIONAL {
            // Uncommented, the line sets the key where it belongs.
            let uncommented =
                shown.replace(&format!("# {key} = \"\"  #"), &format!("{key} = \"x\" #"));
            let parsed: toml::Table = toml::from_str(&uncommented).expect("still TOML");
            let holder = match section {
                "" => &parsed,
                section => parsed[section].as_table().unwrap(),
            };
            assert_eq!(
                holder.get(key).and_then(|v| v.as_str()),
                Some("x"),
                "{section}.{key}:\n{shown}"
            );
        }
        let mut config = Config::default();
        config.upstream.webhook_url = Some("http://agent:9000/hlink".into());
        config.tls_ca_file = Some("/etc/ca.pem".into());
        let shown = config.to_toml();
        assert!(!shown.contains("# webhook_url"), "{shown}");
        assert!(!shown.contains("# tls_ca_file"), "{shown}");
        assert!(shown.contains("# redis_url = "), "{shown}");
    }
}
