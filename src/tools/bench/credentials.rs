//! How the load generator says who it is, as a production deployment would: viewers with a browser
//! token in `hello` (HS256 or ES256, signed here), producers and operators with their keys on the
//! internal door. Without any, viewers send a bare `user_id` and requests carry no key.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// Signs the browser tokens viewers send in `hello`, or leaves them out.
pub(super) enum Signer {
    None,
    Signed(jsonwebtoken::EncodingKey, jsonwebtoken::Algorithm),
}

impl Signer {
    pub(super) fn new(secret: Option<&str>, private_key: Option<&Path>) -> anyhow::Result<Self> {
        Ok(match (secret, private_key) {
            (Some(secret), _) => Self::Signed(
                jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                jsonwebtoken::Algorithm::HS256,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Self::Signed(
                    jsonwebtoken::EncodingKey::from_ec_pem(&pem)?,
                    jsonwebtoken::Algorithm::ES256,
                )
            }
            (None, None) => Self::None,
        })
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Signed(_, jsonwebtoken::Algorithm::HS256) => "HS256",
            Self::Signed(..) => "ES256",
        }
    }

    /// The `hello` of `user_id`, whose token (if any) lets it read `thread_id` and nothing else.
    pub(super) fn hello(&self, user_id: &str, thread_id: &str) -> anyhow::Result<Value> {
        let Self::Signed(key, algorithm) = self else {
            return Ok(json!({"type": "hello", "user_id": user_id}));
        };
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        let claims = json!({"sub": user_id, "exp": exp, "threads": [thread_id]});
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(*algorithm), &claims, key)?;
        Ok(json!({"type": "hello", "token": token}))
    }
}
