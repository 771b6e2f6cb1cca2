//! HLink messages from the browser reach the agent backends' webhook, stamped with who sent them;
//! invalid ones get an error frame naming the field.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::support::Gateway;

/// A webhook that fails its first `failures` requests with 503, then records bodies.
async fn webhook(failures: usize) -> (String, Arc<Mutex<Vec<Value>>>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hlink", listener.local_addr().unwrap());
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let (bodies, count) = (Arc::clone(&received), Arc::clone(&attempts));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (bodies, count) = (Arc::clone(&bodies), Arc::clone(&count));
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (bodies, count) = (Arc::clone(&bodies), Arc::clone(&count));
                    async move {
                        assert_eq!(request.uri().path(), "/hlink");
                        let body = request.into_body().collect().await?.to_bytes();
                        let mut response = Response::new(Full::new(Bytes::new()));
                        if count.fetch_add(1, Ordering::SeqCst) < failures {
                            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        } else {
                            bodies
                                .lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                        }
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received, attempts)
}

fn message() -> Value {
    json!({"type": "user_message", "id": "m-1", "sender": {"agent_id": "browser", "role": "user"},
           "recipient": {"target": "agent", "agent_id": "planner"}, "payload": {"text": "hi"},
           "timestamp": "2026-11-22T10:00:00Z", "metadata": {"tab": 2}})
}

#[tokio::test]
async fn a_user_message_reaches_the_webhook_after_retries_and_is_acked() {
    let (url, received, attempts) = webhook(2).await;
    let gateway = Gateway::start_with(|c| c.upstream.webhook_url = Some(url)).await;
    let mut client = gateway.client("u_9").await;
    client.send(message()).await;
    let ack = client.recv().await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["id"].as_str(),
            ack["status"].as_str()
        ),
        (Some("websocket_ack"), Some("m-1"), Some("queued"))
    );
    let message_id = ack["message_id"].as_str().unwrap().to_string();

    let mut bodies = Vec::new();
    for _ in 0..100 {
        bodies = received.lock().unwrap().clone();
        if !bodies.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bodies.len(), 1, "delivered once");
    let body = &bodies[0];
    assert_eq!(body["message_id"], message_id.as_str());
    assert_eq!(
        (body["type"].as_str(), body["user_id"].as_str()),
        (Some("user_message"), Some("u_9"))
    );
    assert_eq!(body["connection_id"], client.welcome["connection_id"]);
    assert_eq!(body["client_message_id"], "m-1");
    assert_eq!(
        body["recipient"],
        json!({"target": "agent", "agent_id": "planner"})
    );
    assert_eq!(body["payload"]["text"], "hi");
    assert_eq!(body["metadata"]["tab"], 2);
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "two 503s, then success");
    assert_eq!(
        gateway
            .metric("agentwire_upstream_messages_total{outcome=\"delivered\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn each_invalid_hlink_message_names_its_field() {
    let (url, received, _) = webhook(0).await;
    let gateway = Gateway::start_with(|c| c.upstream.webhook_url = Some(url)).await;
    let mut client = gateway.client("u_9").await;
    let without = |path: &[&str]| {
        let mut m = message();
        match path {
            [field] => {
                m.as_object_mut().unwrap().remove(*field);
            }
            [outer, inner] => {
                m[*outer].as_object_mut().unwrap().remove(*inner);
            }
            _ => unreachable!(),
        }
        m
    };
    let mut wrong_payload = message();
    wrong_payload["payload"] = json!("text");
    for (frame, field) in [
        (without(&["sender"]), "`sender`"),
        (without(&["sender", "agent_id"]), "`sender.agent_id`"),
        (without(&["sender", "role"]), "`sender.role`"),
        (without(&["recipient"]), "`recipient`"),
        (without(&["recipient", "target"]), "`recipient.target`"),
        (without(&["payload"]), "`payload`"),
        (wrong_payload, "`payload`"),
    ] {
        client.send(frame).await;
        let error = client.recv().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("invalid_frame")),
            "{error}"
        );
        assert!(
            error["message"].as_str().unwrap().starts_with(field),
            "{field}: {error}"
        );
    }
    client.barrier().await;
    assert!(received.lock().unwrap().is_empty());
    assert_eq!(
        gateway
            .metric("agentwire_upstream_messages_total{outcome=\"invalid\"}")
            .await,
        7.0
    );
}

/// What a signed webhook request carried: its path and query, its two signature headers, its body.
type Seen = (String, Option<String>, Option<String>, String);

/// A webhook that records each request whole.
async fn recording_webhook(path: &str) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let record = Arc::clone(&record);
                    async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let target = request.uri().to_string();
                        let (timestamp, signature) = (
                            header("x-agentwire-timestamp"),
                            header("x-agentwire-signature"),
                        );
                        let body = request.into_body().collect().await?.to_bytes();
                        let body = String::from_utf8_lossy(&body).into_owned();
                        record
                            .lock()
                            .unwrap()
                            .push((target, timestamp, signature, body));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

/// How a backend checks a request: recompute the HMAC over "<timestamp>.<body>".
fn verify(secret: &str, timestamp: &str, body: &str, signature: &str) -> bool {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    signature == format!("v1={expected}")
}

#[tokio::test]
async fn webhook_requests_are_signed_keep_their_query_and_carry_the_authenticated_user() {
    const SIGNING: &str = "a-signing-secret-0001";
    const JWT: &str = "a-test-secret-of-at-least-32-bytes!!";
    let (url, seen) = recording_webhook("/hlink?tenant=acme").await;
    let gateway = Gateway::start_with(|c| {
        c.upstream.webhook_url = Some(url);
        c.upstream.signing_secret = Some(SIGNING.into());
        c.auth.jwt_secret = Some(JWT.into());
    })
    .await;
    let token = agentwire::auth::mint(JWT, "u_alice", &[], None, Duration::from_secs(600)).unwrap();
    let mut client = crate::support::raw(crate::support::Client::connect(gateway.addr).await);
    client
        .send(json!({"type": "hello", "user_id": "u_alice", "token": token}))
        .await;
    client.recv().await;
    client.recv().await;
    let mut claimed = message();
    claimed["user_id"] = "u_bob".into();
    claimed["connection_id"] = "forged".into();
    client.send(claimed).await;
    assert_eq!(client.recv().await["type"], "websocket_ack");
    for _ in 0..200 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (target, timestamp, signature, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(target, "/hlink?tenant=acme");
    let (timestamp, signature) = (timestamp.unwrap(), signature.unwrap());
    assert!(
        verify(SIGNING, &timestamp, &body, &signature),
        "{signature}"
    );
    assert!(!verify(
        "another-secret-000001",
        &timestamp,
        &body,
        &signature
    ));
    assert!(!verify(
        SIGNING,
        &timestamp,
        &body.replace("u_alice", "u_bob"),
        &signature
    ));
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        sent["user_id"], "u_alice",
        "the token's user, not the client's claim"
    );
    assert_ne!(sent["connection_id"], "forged");
}
