//! Browser identity and thread authorisation over real sockets: the token in `hello` names the
//! user, each refusal closes with 4003 (or answers `forbidden`) and is counted, and a refused
//! subscription creates no channel state. The key pairs in `tests/it/keys/` are test-only.

use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{Client, Gateway, assert_lines};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key(file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/it/keys/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn signed(algorithm: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).unwrap()
}

fn hs256(claims: Value) -> String {
    signed(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

async fn with_secret() -> Gateway {
    Gateway::start_with(|c| c.auth.jwt_secret = Some(SECRET.into())).await
}

/// Sends `hello` and returns the first frame and, when the gateway closed, its close code.
async fn hello(gateway: &Gateway, frame: Value) -> (Value, Option<u16>) {
    let mut client = crate::support::raw(Client::connect(gateway.addr).await);
    client.send(frame).await;
    let first = client.recv().await;
    if first["type"] == "welcome" {
        return (first, None);
    }
    let code = client.closed().await;
    (first, Some(code))
}

#[tokio::test]
async fn the_token_names_the_user_and_the_user_channel_is_joined() {
    let gateway = with_secret().await;
    let token = hs256(json!({"sub": "u_alice", "exp": now() + 600}));
    let mut client = crate::support::raw(Client::connect(gateway.addr).await);
    client.send(json!({"type": "hello", "token": token})).await;
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user_id"], "u_alice");
    assert_eq!(client.recv().await["channel"], "user:u_alice");
    // The user channel is delivered to.
    gateway
        .publish(&[
            json!({"type": "agent_thinking", "run_id": "r1", "user_id": "u_alice", "payload": {}}),
        ])
        .await;
    assert_eq!(client.recv().await["type"], "agent_thinking");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4003_and_counted() {
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.jwt_issuer = Some("https://app.example".into());
        c.auth.jwt_audience = Some("agentwire".into());
        c.auth.jwt_leeway = Duration::ZERO;
    })
    .await;
    let good = |extra: Value| {
        let mut claims = json!({"sub": "u_1", "exp": now() + 600, "iss": "https://app.example", "aud": "agentwire"});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let other_secret = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
    // {"alg":"none"} and no signature.
    let none_alg = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1XzEiLCJleHAiOjQxMDI0NDQ4MDB9.";
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing",
            json!({"type": "hello", "user_id": "u_1"}),
            "missing",
        ),
        (
            "garbage",
            json!({"type": "hello", "user_id": "u_1", "token": "garbage"}),
            "invalid",
        ),
        (
            "alg none",
            json!({"type": "hello", "token": none_alg}),
            "invalid",
        ),
        (
            "wrong key",
            json!({"type": "hello", "token": signed(Algorithm::HS256, &other_secret, good(json!({})))}),
            "invalid",
        ),
        (
            "expired",
            json!({"type": "hello", "token": hs256(good(json!({"exp": now() - 10})))}),
            "expired",
        ),
        (
            "not yet valid",
            json!({"type": "hello", "token": hs256(good(json!({"nbf": now() + 600})))}),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            json!({"type": "hello", "token": hs256(good(json!({"iss": "https://evil.example"})))}),
            "invalid",
        ),
        (
            "wrong audience",
            json!({"type": "hello", "token": hs256(good(json!({"aud": "other"})))}),
            "invalid",
        ),
        (
            "user mismatch",
            json!({"type": "hello", "user_id": "u_alice", "token": hs256(good(json!({})))}),
            "user_mismatch",
        ),
    ];
    for (name, frame, _) in &cases {
        let (first, code) = hello(&gateway, frame.clone()).await;
        assert_eq!(first["type"], "error", "{name}: {first}");
        assert_eq!(first["code"], "unauthorized", "{name}: {first}");
        assert_eq!(code, Some(4003), "{name}");
    }
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_auth_refused_total{reason=\"missing\"} 1",
            "agentwire_auth_refused_total{reason=\"invalid\"} 5",
            "agentwire_auth_refused_total{reason=\"expired\"} 1",
            "agentwire_auth_refused_total{reason=\"not_yet_valid\"} 1",
            "agentwire_auth_refused_total{reason=\"user_mismatch\"} 1",
            "agentwire_connections_closed_total{reason=\"unauthorized\"} 9",
        ],
    );
    // Nobody joined the user channel they asked for.
    assert_eq!(gateway.get("/v1/channels/user:u_alice").await.0, 404);
    let (first, code) = hello(
        &gateway,
        json!({"type": "hello", "token": hs256(good(json!({})))}),
    )
    .await;
    assert_eq!((first["type"].as_str(), code), (Some("welcome"), None));
}

#[tokio::test]
async fn public_keys_verify_their_own_algorithm_and_refuse_the_hmac_confusion() {
    for (public, private, algorithm) in [
        ("rsa.pub.pem", "rsa.pem", Algorithm::RS256),
        ("ec.pub.pem", "ec.pem", Algorithm::ES256),
        ("ed.pub.pem", "ed.pem", Algorithm::EdDSA),
    ] {
        let pem = key(public);
        let gateway = Gateway::start_with(|c| c.auth.jwt_public_key = Some(pem.clone())).await;
        let private = key(private);
        let encoding = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private.as_bytes()),
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            _ => EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .unwrap();
        let token = signed(
            algorithm,
            &encoding,
            json!({"sub": "u_k", "exp": now() + 600}),
        );
        let (first, code) = hello(&gateway, json!({"type": "hello", "token": token})).await;
        assert_eq!(
            (first["type"].as_str(), code),
            (Some("welcome"), None),
            "{public}: {first}"
        );
        // The public key, which anyone may hold, used as an HMAC secret.
        let forged = signed(
            Algorithm::HS256,
            &EncodingKey::from_secret(pem.as_bytes()),
            json!({"sub": "u_k", "exp": now() + 600}),
        );
        let (first, code) = hello(&gateway, json!({"type": "hello", "token": forged})).await;
        assert_eq!(code, Some(4003), "{public}: {first}");
    }
}

#[tokio::test]
async fn threads_are_read_only_when_the_token_or_a_subscription_token_allows_it() {
    let gateway = with_secret().await;
    let token =
        hs256(json!({"sub": "u_bob", "exp": now() + 600, "threads": ["t_own", "team_b/*"]}));
    let mut client = crate::support::raw(Client::connect(gateway.addr).await);
    client.send(json!({"type": "hello", "token": token})).await;
    assert_eq!(client.recv().await["type"], "welcome");
    assert_eq!(client.recv().await["type"], "subscribed");

    client
        .send(json!({"type": "subscribe", "thread_id": "t_own"}))
        .await;
    assert_eq!(client.recv().await["channel"], "thread:t_own");
    client
        .send(json!({"type": "subscribe", "thread_id": "team_b/42"}))
        .await;
    assert_eq!(client.recv().await["channel"], "thread:team_b/42");

    gateway
        .publish(&[json!({"type": "agent_thinking", "run_id": "r_s", "thread_id": "t_secret", "payload": {}})])
        .await;
    client
        .send(json!({"type": "subscribe", "thread_id": "t_secret", "since": {"seq": 0}}))
        .await;
    let refused = client.recv().await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    // A subscription token for another thread, or another user's, does not help.
    let for_other_thread =
        hs256(json!({"sub": "u_bob", "exp": now() + 60, "thread_id": "t_other"}));
    let for_other_user = hs256(json!({"sub": "u_eve", "exp": now() + 60, "thread_id": "t_secret"}));
    for token in [for_other_thread, for_other_user] {
        client
            .send(json!({"type": "subscribe", "thread_id": "t_secret", "since": {"seq": 0}, "token": token}))
            .await;
        assert_eq!(client.recv().await["code"], "forbidden");
    }
    // Nothing of t_secret reached the client, and a never-seen thread got no state.
    client
        .send(json!({"type": "subscribe", "thread_id": "t_never"}))
        .await;
    assert_eq!(client.recv().await["code"], "forbidden");
    assert_eq!(gateway.get("/v1/channels/thread:t_never").await.0, 404);
    assert_eq!(gateway.channel("thread:t_secret").await["subscribers"], 0);

    let granted = hs256(json!({"sub": "u_bob", "exp": now() + 60, "thread_id": "t_secret"}));
    client
        .send(json!({"type": "subscribe", "thread_id": "t_secret", "since": {"seq": 0}, "token": granted}))
        .await;
    let subscribed = client.recv().await;
    assert_eq!(subscribed["channel"], "thread:t_secret", "{subscribed}");
    assert_eq!(client.recv().await["type"], "agent_thinking");
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_auth_refused_total{reason=\"thread\"} 4",
            "agentwire_client_errors_total{code=\"forbidden\"} 4",
        ],
    );
}

#[tokio::test]
async fn agentwire_token_mints_what_the_gateway_accepts() {
    let gateway = with_secret().await;
    let output = crate::support::binary()
        .args([
            "token", "--user", "u_cli", "--thread", "t_cli", "--ttl", "5m",
        ])
        .env_clear()
        .env("AGENTWIRE_AUTH__JWT_SECRET", SECRET)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let mut client = crate::support::raw(Client::connect(gateway.addr).await);
    client.send(json!({"type": "hello", "token": token})).await;
    assert_eq!(client.recv().await["user_id"], "u_cli");
    client.recv().await;
    client
        .send(json!({"type": "subscribe", "thread_id": "t_cli"}))
        .await;
    assert_eq!(client.recv().await["channel"], "thread:t_cli");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_a_gateway_that_asks_for_keys_and_tokens() {
    const PRODUCER: &str = "probe-producer-key-01";
    const OPERATOR: &str = "probe-operator-key-01";
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.producer_keys = vec![PRODUCER.into()];
        c.auth.operator_keys = vec![OPERATOR.into()];
    })
    .await;
    let token =
        hs256(json!({"sub": "u_probe", "exp": now() + 600, "threads": ["agentwire-probe-*"]}));
    let (url, api) = (
        format!("http://{}", gateway.addr),
        format!("http://{}", gateway.internal),
    );
    let probe = |env: Vec<(&'static str, String)>| {
        let (url, api) = (url.clone(), api.clone());
        tokio::task::spawn_blocking(move || {
            crate::support::binary()
                .args(["probe", "--url", &url, "--api-url", &api, "--timeout", "5s"])
                .env_clear()
                .envs(env)
                .output()
                .unwrap()
        })
    };
    let all = vec![
        ("AGENTWIRE_PROBE_PRODUCER_KEY", PRODUCER.to_string()),
        ("AGENTWIRE_PROBE_OPERATOR_KEY", OPERATOR.to_string()),
        ("AGENTWIRE_PROBE_TOKEN", token),
    ];
    let output = probe(all.clone()).await.unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.starts_with("agentwire probe: ok"), "{out}");
    let without_key = probe(all[1..].to_vec()).await.unwrap();
    let out = String::from_utf8_lossy(&without_key.stdout);
    assert!(out.contains("FAIL") && out.contains("401"), "{out}");
}

/// A token that runs out: `token_expiring` ahead of it, `refresh` keeps the connection, and
/// without one the connection closes with 4004; a reconnect with a fresh token resumes with
/// exactly what was missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_in_place_or_the_connection_closes_at_expiry() {
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.jwt_leeway = Duration::ZERO;
    })
    .await;
    let token = |ttl: u64| hs256(json!({"sub": "u_r", "exp": now() + ttl, "threads": ["t_r"]}));
    let connect = |token: String| {
        let addr = gateway.addr;
        async move {
            let mut client = crate::support::raw(Client::connect(addr).await);
            client.send(json!({"type": "hello", "token": token})).await;
            assert_eq!(client.recv().await["type"], "welcome");
            client.recv().await;
            client
        }
    };

    let mut refreshed = connect(token(3)).await;
    let expiring = refreshed.recv().await;
    assert_eq!(expiring["type"], "token_expiring", "{expiring}");
    assert!(expiring["expires_in_ms"].as_u64().unwrap() <= 3000);
    refreshed
        .send(json!({"type": "refresh", "token": token(600)}))
        .await;
    assert_eq!(refreshed.recv().await["type"], "refreshed");
    // Another user's token is no refresh.
    let other = hs256(json!({"sub": "u_other", "exp": now() + 600}));
    refreshed
        .send(json!({"type": "refresh", "token": other}))
        .await;
    assert_eq!(refreshed.recv().await["code"], "unauthorized");

    let mut expired = connect(token(2)).await;
    expired.subscribe("t_r", None).await;
    assert_eq!(expired.recv().await["type"], "token_expiring");
    assert_eq!(expired.closed().await, 4004);
    gateway
        .publish(&[json!({"type": "agent_thinking", "run_id": "r_r", "thread_id": "t_r", "payload": {"n": 1}})])
        .await;
    // The refreshed connection is still open past the first token's expiry.
    refreshed.send(json!({"type": "ping"})).await;
    assert_eq!(refreshed.recv().await["type"], "pong");

    let mut back = connect(token(600)).await;
    let subscribed = back.subscribe("t_r", Some(json!({"seq": 0}))).await;
    assert_eq!(subscribed["replayed"], 1, "{subscribed}");
    assert_eq!(back.events(1).await[0]["payload"]["n"], 1);
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_closed_total{reason=\"token_expired\"} 1"],
    );
}

/// `bench idle` with tokens cannot rot: every connection authenticates and subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_bench_authenticates_every_connection() {
    let gateway = with_secret().await;
    let (url, api) = (
        format!("http://{}", gateway.addr),
        format!("http://{}", gateway.internal),
    );
    let result = crate::support::bench(&[
        "bench",
        "--url",
        &url,
        "--api-url",
        &api,
        "--sources",
        "2",
        "idle",
        "--connections",
        "50",
        "--settle",
        "100ms",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    assert_eq!(result["token"], "HS256", "{result}");
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_opened_total 50"],
    );
}

/// The application's subscribe webhook decides threads neither token allows: allow, deny, and a
/// slow or failing webhook refuses (fails closed); answers are cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_webhook_allows_denies_caches_and_fails_closed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/may-read", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body = request.into_body().collect().await?.to_bytes();
                        let asked: Value = serde_json::from_slice(&body).unwrap();
                        let (status, answer) = match asked["thread_id"].as_str().unwrap() {
                            "t_allowed" => (200, r#"{"allow":true,"cache_seconds":60}"#),
                            "t_denied" => (200, r#"{"allow":false}"#),
                            "t_slow" => {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                (200, r#"{"allow":true}"#)
                            }
                            "t_garbled" => (200, "yes"),
                            _ => (500, ""),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(answer)));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.subscribe_webhook = Some(url);
        c.auth.subscribe_webhook_timeout = Duration::from_millis(500);
    })
    .await;
    let connect = || async {
        let mut client = crate::support::raw(Client::connect(gateway.addr).await);
        let token = hs256(json!({"sub": "u_w", "exp": now() + 600}));
        client.send(json!({"type": "hello", "token": token})).await;
        client.recv().await;
        client.recv().await;
        client
    };
    let mut client = connect().await;
    client
        .send(json!({"type": "subscribe", "thread_id": "t_allowed"}))
        .await;
    assert_eq!(client.recv().await["channel"], "thread:t_allowed");
    for thread in ["t_denied", "t_slow", "t_garbled", "t_broken"] {
        client
            .send(json!({"type": "subscribe", "thread_id": thread}))
            .await;
        assert_eq!(client.recv().await["code"], "forbidden", "{thread}");
        assert_eq!(
            gateway
                .get(&format!("/v1/channels/thread:{thread}"))
                .await
                .0,
            404
        );
    }
    // Another connection of the same user: the cached answer, no second request.
    let before = asked.load(Ordering::SeqCst);
    let mut again = connect().await;
    again
        .send(json!({"type": "subscribe", "thread_id": "t_allowed"}))
        .await;
    assert_eq!(again.recv().await["channel"], "thread:t_allowed");
    assert_eq!(asked.load(Ordering::SeqCst), before);
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_subscribe_webhook_total{outcome=\"allow\"} 1",
            "agentwire_subscribe_webhook_total{outcome=\"deny\"} 1",
            "agentwire_subscribe_webhook_total{outcome=\"error\"} 3",
        ],
    );
}

/// A JWK of an EC P-256 public key (PEM SubjectPublicKeyInfo: its last 64 bytes are x and y).
fn ec_jwk(public_pem: &str, kid: &str) -> Value {
    use base64::Engine;
    let body: String = public_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let point = &der[der.len() - 64..];
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": b64(&point[..32]), "y": b64(&point[32..])})
}

/// Keys from a JWKS URL: a token's `kid` picks its key; a rotated key is fetched when a token names
/// it, but at most once per `auth.jwks_refresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_fetched_by_kid_and_rotation_is_picked_up() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};

    let served = Arc::new(Mutex::new(
        json!({"keys": [ec_jwk(&key("ec.pub.pem"), "k1")]}),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    let (set, count) = (Arc::clone(&served), Arc::clone(&fetches));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (set, count) = (Arc::clone(&set), Arc::clone(&count));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = set.lock().unwrap().to_string();
                    async move { Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let es256 = |private: &str, kid: &str| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let key = EncodingKey::from_ec_pem(key(private).as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &json!({"sub": "u_j", "exp": now() + 600}), &key).unwrap()
    };
    let eager = Gateway::start_with(|c| {
        c.auth.jwks_url = Some(url.clone());
        c.auth.jwks_refresh = Duration::ZERO;
    })
    .await;
    let patient = Gateway::start_with(|c| c.auth.jwks_url = Some(url.clone())).await;
    for gateway in [&eager, &patient] {
        let (first, code) = hello(
            gateway,
            json!({"type": "hello", "token": es256("ec.pem", "k1")}),
        )
        .await;
        assert_eq!(
            (first["type"].as_str(), code),
            (Some("welcome"), None),
            "{first}"
        );
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "one fetch per gateway");

    // The provider rotates to a new key.
    *served.lock().unwrap() = json!({"keys": [ec_jwk(&key("ec2.pub.pem"), "k2")]});
    let rotated = es256("ec2.pem", "k2");
    let (first, code) = hello(&eager, json!({"type": "hello", "token": rotated.clone()})).await;
    assert_eq!(
        (first["type"].as_str(), code),
        (Some("welcome"), None),
        "{first}"
    );
    // Within its jwks_refresh (5 minutes) the other gateway does not fetch again.
    let (_, code) = hello(&patient, json!({"type": "hello", "token": rotated})).await;
    assert_eq!(code, Some(4003));
    assert_eq!(fetches.load(Ordering::SeqCst), 3);
    // A token signed with the right key but naming an unknown kid is refused.
    let (_, code) = hello(
        &eager,
        json!({"type": "hello", "token": es256("ec2.pem", "nope")}),
    )
    .await;
    assert_eq!(code, Some(4003));
}

/// A client that can set headers may send its token with the upgrade instead of in `hello`.
#[tokio::test]
async fn the_token_may_come_with_the_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let gateway = with_secret().await;
    let token = hs256(json!({"sub": "u_header", "exp": now() + 600}));
    let mut request = format!("ws://{}/ws", gateway.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut client = crate::support::raw(ws);
    client.send(json!({"type": "hello"})).await;
    let welcome = client.recv().await;
    assert_eq!(welcome["user_id"], "u_header", "{welcome}");
}
