//! Who is who. Browsers: the JWT a client shows in `hello` (whose `sub` is its user id and whose
//! `threads` claim lists the threads it may read) and the subscription tokens it may show for one
//! thread, verified with the key `[auth]` configures, against `exp`, `nbf`, `iss` and `aud`.
//! Producers and operators: the keys they show on the internal door.

mod jwks;
mod subscribe;

pub use subscribe::{Decision, SubscribeWebhook};

use jwks::Jwks;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::{AuthConfig, Secret};
use crate::metrics::{Label, Metrics};
use crate::protocol::channel::check_id;

/// Verifies browser tokens; present when `[auth]` configures a key.
pub struct Verifier {
    keys: Keys,
    validation: Validation,
}

/// Where the verifying key comes from.
enum Keys {
    /// `jwt_secret` or `jwt_public_key`.
    Configured(DecodingKey),
    /// `jwks_url`: by the token's `kid`, each key with its one algorithm.
    Fetched(Jwks),
}

/// Who a connection is, from its token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: String,
    /// Exact thread ids, or prefixes ending in `*`: held for the connection's life, so each at its
    /// size (the claim's list was read with room to grow).
    threads: Box<[Box<str>]>,
    /// When the token stops being valid.
    pub expires: SystemTime,
}

/// Why a token or a subscription was refused, counted in `agentwire_auth_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `hello` without a token, while browsers must authenticate.
    Missing,
    Expired,
    NotYetValid,
    /// A bad signature, a wrong algorithm, issuer or audience, or not a JWT at all.
    Invalid,
    /// `hello.user_id` differs from the token's `sub`.
    UserMismatch,
    /// Neither the connection's token nor a subscription token allows the thread.
    Thread,
    /// A connection token in an event stream's query (`?token=`): only a subscription token for
    /// the thread may travel in a URL, which ends up in access logs and browser history.
    QueryConnectionToken,
}

impl Label for Refusal {
    const ALL: &'static [Self] = &[
        Self::Missing,
        Self::Expired,
        Self::NotYetValid,
        Self::Invalid,
        Self::UserMismatch,
        Self::Thread,
        Self::QueryConnectionToken,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Invalid => "invalid",
            Self::UserMismatch => "user_mismatch",
            Self::Thread => "thread",
            Self::QueryConnectionToken => "query_connection_token",
        }
    }
}

impl Refusal {
    /// What the client is told (never the token, never which check an attacker almost passed).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "this gateway requires a token in hello",
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::Invalid => "the token is not valid for this gateway",
            Self::UserMismatch => "user_id differs from the token's sub",
            Self::Thread => "not allowed to read this thread",
            Self::QueryConnectionToken => {
                "a token in the URL must be a subscription token for this thread (connection tokens go in the Authorization header)"
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    threads: Vec<String>,
    /// Subscription tokens: the one thread they allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thread_id: Option<String>,
}

impl Verifier {
    /// `None` when no key is configured (the configuration was checked at load).
    pub fn new(
        config: &AuthConfig,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Self>> {
        let (keys, algorithms) = match (config.decoding_key(), Jwks::new(config, ca_file)?) {
            (Ok(Some((key, algorithms))), _) => (Keys::Configured(key), algorithms),
            (_, Some(jwks)) => (Keys::Fetched(jwks), vec![Algorithm::RS256]),
            _ => return Ok(None),
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = config.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_string(), "sub".to_string()]);
        if let Some(issuer) = &config.jwt_issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &config.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Ok(Some(Self { keys, validation }))
    }

    async fn claims(&self, token: &str) -> Result<Claims, Refusal> {
        let decoded = match &self.keys {
            Keys::Configured(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation),
            Keys::Fetched(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid)?;
                let kid = header.kid.ok_or(Refusal::Invalid)?;
                let (key, algorithm) = jwks.key(&kid).await.ok_or(Refusal::Invalid)?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![algorithm];
                jsonwebtoken::decode::<Claims>(token, &key, &validation)
            }
        };
        let claims = decoded
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                _ => Refusal::Invalid,
            })?
            .claims;
        check_id(&claims.sub).map_err(|_| Refusal::Invalid)?;
        Ok(claims)
    }

    /// The identity a connection token proves; `claimed` is `hello.user_id`, if sent.
    pub async fn connection(
        &self,
        token: &str,
        claimed: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let claims = self.claims(token).await?;
        if claimed.is_some_and(|claimed| claimed != claims.sub) {
            return Err(Refusal::UserMismatch);
        }
        Ok(Identity {
            user_id: claims.sub,
            threads: claims.threads.into_iter().map(Into::into).collect(),
            expires: SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(claims.exp))
                .ok_or(Refusal::Invalid)?,
        })
    }

    /// Whether `token` is a subscription token of `user_id` for `thread_id`.
    pub async fn subscription(
        &self,
        token: &str,
        user_id: &str,
        thread_id: &str,
    ) -> Result<(), Refusal> {
        let claims = self.claims(token).await?;
        if claims.sub != user_id || claims.thread_id.as_deref() != Some(thread_id) {
            return Err(Refusal::Thread);
        }
        Ok(())
    }
}

impl Verifier {
    /// The identity a subscription token for `thread_id` proves, when it is the only credential
    /// (an event stream's `?token=`): its `sub` is the user, and it allows that one thread.
    pub async fn subscription_identity(
        &self,
        token: &str,
        thread_id: &str,
    ) -> Result<Identity, Refusal> {
        let claims = self.claims(token).await?;
        match claims.thread_id.as_deref() {
            None => return Err(Refusal::QueryConnectionToken),
            Some(allowed) if allowed != thread_id => return Err(Refusal::Thread),
            Some(_) => {}
        }
        Ok(Identity {
            user_id: claims.sub,
            threads: Box::new([thread_id.into()]),
            expires: SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(claims.exp))
                .ok_or(Refusal::Invalid)?,
        })
    }
}

/// What decides whether a user may read a thread, with browser authentication: the verifier, the
/// application's subscribe webhook, and where the webhook's answers are counted.
pub struct ThreadAccess<'a> {
    pub verifier: &'a Verifier,
    pub webhook: Option<&'a SubscribeWebhook>,
    pub metrics: &'a Metrics,
}

impl ThreadAccess<'_> {
    /// Whether `user_id` may read `thread_id`: when its connection token (`identity`) lists the
    /// thread, `token` is a subscription token of this user for it, or the application's
    /// subscribe webhook says so. Both `/ws` subscriptions and event streams ask here.
    pub async fn may_read(
        &self,
        identity: Option<&Identity>,
        user_id: &str,
        thread_id: &str,
        token: Option<&str>,
    ) -> Result<(), Refusal> {
        if identity.is_some_and(|identity| identity.may_read(thread_id)) {
            return Ok(());
        }
        if let Some(token) = token
            && self
                .verifier
                .subscription(token, user_id, thread_id)
                .await
                .is_ok()
        {
            return Ok(());
        }
        match self.webhook {
            Some(webhook) if webhook.allows(user_id, thread_id, self.metrics).await => Ok(()),
            _ => Err(Refusal::Thread),
        }
    }
}

impl Identity {
    /// Whether the connection token's `threads` claim lists `thread_id` (exactly, or by a
    /// prefix ending in `*`).
    pub fn may_read(&self, thread_id: &str) -> bool {
        self.threads
            .iter()
            .any(|allowed| match allowed.strip_suffix('*') {
                Some(prefix) => thread_id.starts_with(prefix),
                None => allowed.as_ref() == thread_id,
            })
    }
}

/// A development token signed with an HMAC `secret` (HS256): `agentwire token`. `thread_id` makes
/// it a subscription token for that thread.
pub fn mint(
    secret: &str,
    user_id: &str,
    threads: &[String],
    thread_id: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .saturating_add(ttl)
        .as_secs();
    let claims = Claims {
        sub: user_id.to_string(),
        exp,
        threads: threads.to_vec(),
        thread_id: thread_id.map(str::to_string),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// What a caller of the internal door wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Post events, register runs.
    Producer,
    /// Read the ledger, channels, runs and dead letters; redrive.
    Operator,
}

/// Why the internal door refused a request, counted in `agentwire_api_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiRefusal {
    /// No `Authorization: Bearer` key.
    Missing,
    /// A key that is not one of the configured ones.
    Invalid,
    /// A key of the other role (a producer key on an operator endpoint, or the reverse).
    WrongRole,
}

impl Label for ApiRefusal {
    const ALL: &'static [Self] = &[Self::Missing, Self::Invalid, Self::WrongRole];

    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::WrongRole => "wrong_role",
        }
    }
}

/// The internal door's keys, kept as SHA-256 digests and compared in constant time (a digest has
/// one length, so not even a key's length leaks).
pub struct ApiKeys {
    producers: Vec<ApiKey>,
    operators: Vec<ApiKey>,
}

/// One configured key: its digest, and its id (the first 8 hex digits of the digest), made once so
/// that admitting a request and tagging its events with the id allocate nothing.
struct ApiKey {
    digest: [u8; 32],
    id: Arc<str>,
}

impl ApiKey {
    fn new(key: &str) -> Self {
        let digest = digest(key);
        let id = digest[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Self {
            digest,
            id: id.into(),
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    pub fn new(config: &AuthConfig) -> Self {
        let keys = |keys: &[Secret]| keys.iter().map(|k| ApiKey::new(k.expose())).collect();
        Self {
            producers: keys(&config.producer_keys),
            operators: keys(&config.operator_keys),
        }
    }

    /// The key among `keys` whose digest is `presented`.
    fn find<'a>(keys: &'a [ApiKey], presented: &[u8; 32]) -> Option<&'a ApiKey> {
        // Every key is compared and the match picked without a branch, so the time does not tell
        // which one matched.
        let mut found = u64::MAX;
        for (i, key) in (0u64..).zip(keys) {
            found.conditional_assign(&i, key.digest.ct_eq(presented));
        }
        keys.get(found as usize)
    }

    /// Whether any role is open (has no keys): the internal door then trusts whoever reaches it.
    pub fn open(&self) -> bool {
        self.producers.is_empty() || self.operators.is_empty()
    }

    /// Whether `bearer` may act as `role`. `Ok` carries the key's id (the first 8 hex digits of its
    /// digest), which scopes what that key does (its `event_id`s); `Ok(None)` when the role has no
    /// keys configured (allowed only on a loopback internal door: checked at load).
    pub fn admit(&self, role: Role, bearer: Option<&str>) -> Result<Option<Arc<str>>, ApiRefusal> {
        let (own, other) = match role {
            Role::Producer => (&self.producers, &self.operators),
            Role::Operator => (&self.operators, &self.producers),
        };
        if own.is_empty() {
            return Ok(None);
        }
        let presented = digest(bearer.ok_or(ApiRefusal::Missing)?);
        if let Some(key) = Self::find(own, &presented) {
            return Ok(Some(Arc::clone(&key.id)));
        }
        Err(if Self::find(other, &presented).is_some() {
            ApiRefusal::WrongRole
        } else {
            ApiRefusal::Invalid
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_patterns() {
        let identity = Identity {
            user_id: "u".into(),
            threads: Box::new(["t_1".into(), "team_a/*".into()]),
            expires: SystemTime::now(),
        };
        assert!(identity.may_read("t_1"));
        assert!(!identity.may_read("t_10"));
        assert!(identity.may_read("team_a/x"));
        assert!(!identity.may_read("team_b/x"));
    }

    #[test]
    fn api_keys_by_role() {
        let config = AuthConfig {
            producer_keys: vec!["producer-key-0001".into(), "producer-key-0002".into()],
            operator_keys: vec!["operator-key-0001".into()],
            ..AuthConfig::default()
        };
        let keys = ApiKeys::new(&config);
        let producer = keys.admit(Role::Producer, Some("producer-key-0002"));
        assert!(matches!(producer, Ok(Some(ref id)) if id.len() == 8));
        assert_eq!(keys.admit(Role::Producer, None), Err(ApiRefusal::Missing));
        assert_eq!(
            keys.admit(Role::Producer, Some("nope")),
            Err(ApiRefusal::Invalid)
        );
        assert_eq!(
            keys.admit(Role::Operator, Some("producer-key-0001")),
            Err(ApiRefusal::WrongRole)
        );
        let open = ApiKeys::new(&AuthConfig::default());
        assert_eq!(open.admit(Role::Operator, None), Ok(None));
    }
}
