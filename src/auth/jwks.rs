//! Browser token keys from a JWKS URL (an identity provider's `jwks_uri`): fetched when a token
//! names a key id not seen yet, at most once per `auth.jwks_refresh`, so a provider's key rotation
//! is picked up without a restart and a flood of made-up key ids cannot make the gateway fetch.
//! Only public keys are taken (RSA, EC P-256/P-384, Ed25519): a symmetric key never comes from a URL.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AuthConfig;

pub struct Jwks {
    client: reqwest::Client,
    url: String,
    refresh: Duration,
    keys: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
    /// When the set was last fetched; held while fetching, so one fetch serves every waiter.
    fetched: Mutex<Option<Instant>>,
}

impl Jwks {
    /// `None` without `auth.jwks_url`.
    pub fn new(config: &AuthConfig, ca_file: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let Some(url) = &config.jwks_url else {
            return Ok(None);
        };
        Ok(Some(Self {
            client: crate::outbound::client(Duration::from_secs(5), ca_file)?,
            url: url.clone(),
            refresh: config.jwks_refresh,
            keys: RwLock::default(),
            fetched: Mutex::new(None),
        }))
    }

    fn known(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// The key `kid` names and its one algorithm; an unknown `kid` fetches the set again unless it
    /// was fetched within `auth.jwks_refresh`.
    pub async fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        if let Some(known) = self.known(kid) {
            return Some(known);
        }
        let mut fetched = self.fetched.lock().await;
        if let Some(known) = self.known(kid) {
            return Some(known);
        }
        if fetched.is_some_and(|at| at.elapsed() < self.refresh) {
            return None;
        }
        *fetched = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "Fetched the JWKS.");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot fetch the JWKS; tokens of unknown keys are refused.")
            }
        }
        self.known(kid)
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, (DecodingKey, Algorithm)>> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.without_url())?
            .error_for_status()
            .map_err(|e| e.without_url())?;
        let body = response.bytes().await.map_err(|e| e.without_url())?;
        let set: JwkSet = serde_json::from_slice(&body)?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let algorithm = algorithm_of(jwk)?;
                Some((kid, (DecodingKey::from_jwk(jwk).ok()?, algorithm)))
            })
            .collect())
    }
}

/// The algorithm a public key is for: its `alg`, or what its type and curve imply. Symmetric keys
/// (`oct`) and algorithms outside the key's family give `None`.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    use Algorithm::*;
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => ES256,
            EllipticCurve::P384 => ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => EdDSA,
        _ => return None,
    };
    let stated = match jwk.common.key_algorithm {
        Some(stated) => Algorithm::try_from(stated).ok()?,
        None => implied,
    };
    let same_family = matches!(
        (implied, stated),
        (RS256, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
            | (ES256, ES256)
            | (ES384, ES384)
            | (EdDSA, EdDSA)
    );
    same_family.then_some(stated)
}
