//! What an operator uses when an alert fires: dead letters and redrive, the ledger overview,
//! latency histograms, and the delivery probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Certificates, Gateway, assert_lines, binary, event};

#[tokio::test]
async fn a_dead_letter_is_listed_and_redriven_after_registration() {
    let gateway = Gateway::start_with(|c| c.resolve.grace = Duration::from_millis(100)).await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_dl", None).await;
    gateway.publish(&[json!({"type": "agent_thinking", "run_id": "run_dl", "event_id": "ev-dl", "payload": {"n": 1}})]).await;

    let mut listed = json!(null);
    for _ in 0..100 {
        let (_, body) = gateway.get("/v1/deadletter").await;
        if body["count"] == 1 {
            listed = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let entry = &listed["events"][0];
    assert_eq!(
        (
            entry["run_id"].as_str(),
            entry["type"].as_str(),
            entry["event_id"].as_str()
        ),
        (Some("run_dl"), Some("agent_thinking"), Some("ev-dl"))
    );
    assert_eq!(entry["event"]["payload"]["n"], 1);
    assert!(entry["reason"].as_str().is_some() && entry["lost_at"].as_str().is_some());

    // The producer's retry of a dead-lettered event is not swallowed as a duplicate: it waits again.
    let retry = json!({"type": "agent_thinking", "run_id": "run_dl", "event_id": "ev-dl", "payload": {"n": 1}});
    let (_, answer) = gateway.post("/v1/events", &retry.to_string()).await;
    assert_eq!(answer["results"][0]["status"], "pending_resolution");
    for _ in 0..100 {
        if gateway.get("/v1/deadletter").await.1["count"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gateway.get("/v1/deadletter").await.1["count"], 2);
    assert_eq!(
        gateway.metric("agentwire_unresolved_run_ids_total").await,
        1.0,
        "one run id, counted once"
    );

    // Redrive before the registration: still unresolved, still listed.
    let (_, report) = gateway.post("/v1/deadletter/redrive", "").await;
    assert_eq!(
        (report["delivered"].as_u64(), report["unresolved"].as_u64()),
        (Some(0), Some(2))
    );

    gateway
        .post(
            "/v1/runs",
            &json!({"run_id": "run_dl", "thread_id": "t_dl"}).to_string(),
        )
        .await;
    let (status, report) = gateway.post("/v1/deadletter/redrive", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            report["delivered"].as_u64(),
            report["duplicate"].as_u64(),
            report["unresolved"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(
        report["results"][1]["status"], "duplicate",
        "the retry is not shown twice"
    );
    assert_eq!(
        report["results"][0],
        json!({"id": entry["id"], "run_id": "run_dl", "status": "delivered", "channel": "thread:t_dl", "seq": 1})
    );
    let redriven = client.recv().await;
    assert_eq!(
        (
            redriven["run_id"].as_str(),
            redriven["payload"]["n"].as_u64()
        ),
        (Some("run_dl"), Some(1))
    );
    client.barrier().await;
    assert_eq!(gateway.get("/v1/deadletter").await.1["count"], 0);

    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_events_lost_total{reason=\"unresolved\"} 2",
            "agentwire_events_redriven_total 2",
            "agentwire_events_duplicate_total 1",
            "agentwire_deadletter_events 0",
            "agentwire_events_ingested_total 2",
            "agentwire_events_emitted_total 1",
        ],
    );
    let (_, ledger) = gateway.get("/v1/ledger").await;
    assert_eq!(ledger["channels"]["balanced"], true, "{ledger}");
    assert_eq!(ledger["ingest"]["redriven"], 2);
    gateway.channel("thread:t_dl").await;
}

#[tokio::test]
async fn the_ledger_overview_names_the_worst_channels() {
    let gateway = Gateway::start_with(|c| c.history.max_events = 2).await;
    let thinking = |thread: &str, n: usize| {
        (0..n)
            .map(|_| event("agent_thinking", "r", thread))
            .collect::<Vec<_>>()
    };
    gateway.publish(&thinking("t_waiting", 2)).await;
    gateway.publish(&thinking("t_lossy", 5)).await;
    gateway.publish(&thinking("t_one", 1)).await;
    let (status, ledger) = gateway.get("/v1/ledger?top=2").await;
    assert_eq!(status, 200);
    assert_eq!(ledger["channels"]["emitted"], 8);
    assert_eq!(ledger["channels"]["pending"], 5);
    assert_eq!(ledger["channels"]["lost"]["expired_unseen"], 3);
    assert_eq!(ledger["channels"]["balanced"], true);
    let pending: Vec<_> = ledger["top_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["thread:t_lossy", "thread:t_waiting"]);
    assert_eq!(ledger["top_lost"][0]["channel"], "thread:t_lossy");
    assert_eq!(ledger["top_lost"][0]["lost_total"], 3);
    assert!(
        ledger["top_pending"][0]["oldest_pending_age_seconds"]
            .as_f64()
            .is_some()
    );
}

#[tokio::test]
async fn event_age_is_measured_from_the_producer_ts() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    let ts =
        humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_millis(50)).to_string();
    let mut timed = event("agent_thinking", "r", "t_1");
    timed["ts"] = ts.clone().into();
    gateway
        .publish(&[timed, event("agent_thinking", "r", "t_1")])
        .await;
    assert_eq!(client.recv().await["ts"], ts);
    client.recv().await;
    client.barrier().await;
    let metrics = gateway.metrics().await;
    crate::support::assert_lines(&metrics, &["agentwire_event_age_seconds_count 1"]);
    crate::support::assert_lines(
        &metrics,
        &["agentwire_live_delivery_latency_seconds_count 2"],
    );
    assert!(crate::support::metric_value(&metrics, "agentwire_event_age_seconds_sum") >= 0.05);
}

async fn probe(url: String, api_url: String) -> (Option<i32>, String) {
    probe_with(url, api_url, &[], &[]).await
}

/// The probe as a process, with more arguments and environment.
async fn probe_with(
    url: String,
    api_url: String,
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> (Option<i32>, String) {
    let mut command = binary();
    command
        .args([
            "probe",
            "--url",
            &url,
            "--api-url",
            &api_url,
            "--timeout",
            "5s",
        ])
        .args(args)
        .envs(env.iter().copied());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A TLS-terminating proxy on `ip` (an ingress) with `certificates`' server certificate,
/// forwarding each connection over plain TCP to `upstream`; its port.
async fn tls_proxy(certificates: &Certificates, ip: &str, upstream: SocketAddr) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    agentwire::outbound::install_tls_provider();
    let chain = CertificateDer::pem_file_iter(&certificates.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certificates.key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends its connection in the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// Behind a TLS-terminating ingress both doors are `https://`: the probe passes when it trusts the
/// ingress's CA (`--ca-file`, or the system's store), and fails on the certificate otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_goes_through_https_and_trusts_only_a_verified_certificate() {
    let certificates = Certificates::make();
    let gateway = Gateway::start().await;
    let public = tls_proxy(&certificates, "127.0.0.1", gateway.addr).await;
    let internal = tls_proxy(&certificates, "127.0.0.1", gateway.internal).await;
    let url = format!("https://localhost:{public}");
    let api = format!("https://localhost:{internal}");
    let ca = certificates.ca.to_string_lossy().into_owned();

    let (code, out) = probe_with(url.clone(), api.clone(), &["--ca-file", &ca], &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("agentwire probe: ok: 5/5 events in order")
            && out.contains("emitted 5, delivered 5, pending 0, lost 0"),
        "{out}"
    );

    // The system's store (SSL_CERT_FILE) is trusted as well, without --ca-file; wss:// names the
    // same door as https://.
    let (code, out) = probe_with(
        format!("wss://localhost:{public}"),
        api.clone(),
        &[],
        &[("SSL_CERT_FILE", &certificates.ca)],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");

    // Without --ca-file, the system's store does not hold the test CA: a FAIL on the certificate.
    let (code, out) = probe_with(url.clone(), api.clone(), &[], &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("agentwire probe: FAIL:") && out.contains("certificate"),
        "{out}"
    );
    // The same with a store that certainly has CAs, only not this one: the handshake refuses the
    // unknown issuer, before anything is sent.
    let other = certificates.another_ca();
    let (code, out) = probe_with(url, api.clone(), &[], &[("SSL_CERT_FILE", &other)]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("agentwire probe: FAIL: TLS handshake with localhost:")
            && out.contains("not signed by a CA the probe trusts")
            && out.contains("UnknownIssuer"),
        "{out}"
    );

    // The name is checked: the certificate is for localhost and 127.0.0.1, not for 127.0.0.2.
    let elsewhere = tls_proxy(&certificates, "127.0.0.2", gateway.addr).await;
    let (code, out) = probe_with(
        format!("https://127.0.0.2:{elsewhere}"),
        api,
        &["--ca-file", &ca],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL: TLS handshake")
            && out.contains("certificate not valid for name \"127.0.0.2\""),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_on_a_healthy_gateway_and_fails_clearly_otherwise() {
    let healthy = Gateway::start().await;
    let urls = |g: &Gateway| {
        (
            format!("http://{}", g.addr),
            format!("http://{}", g.internal),
        )
    };
    let (url, api) = urls(&healthy);
    let (code, out) = probe(url, api).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("agentwire probe: ok: 5/5 events in order"),
        "{out}"
    );
    assert!(
        out.contains("emitted 5, delivered 5, pending 0, lost 0"),
        "{out}"
    );

    // A gateway whose per-connection queue cannot hold the handshake's frames closes the probe with 4008.
    let broken = Gateway::start_with(|c| {
        c.session.queue_events = 1;
    })
    .await;
    let (url, api) = urls(&broken);
    let (code, out) = probe(url, api).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL") && out.contains("4008"), "{out}");

    let port = crate::support::free_port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let (code, out) = probe(nowhere.clone(), nowhere).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL: cannot connect"), "{out}");
}

/// The benchmark cannot rot: each scenario runs small against a live gateway with every feature on
/// (viewer tokens, producer and operator keys) and must end with every delivery received and
/// nothing lost. No speed is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bench_scenario_completes_with_nothing_lost() {
    const SECRET: &str = "a-bench-secret-of-thirty-two-bytes-or-more";
    const PRODUCER: &str = "bench-producer-key-01";
    const OPERATOR: &str = "bench-operator-key-01";
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.producer_keys = vec![PRODUCER.into()];
        c.auth.operator_keys = vec![OPERATOR.into()];
    })
    .await;
    let url = format!("http://{}", gateway.addr);
    let api = format!("http://{}", gateway.internal);
    let scenarios: [&[&str]; 5] = [
        &["idle", "--connections", "200", "--settle", "100ms"],
        &[
            "fanout",
            "--connections",
            "100",
            "--threads",
            "10",
            "--events",
            "500",
            "--rate",
            "1000",
            "--max-time",
            "30s",
        ],
        &[
            "saturate",
            "--connections",
            "100",
            "--threads",
            "10",
            "--events",
            "1000",
            "--max-time",
            "30s",
        ],
        &[
            "tokens",
            "--runs",
            "4",
            "--duration",
            "1s",
            "--producer",
            "post",
            "--producer-connections",
            "2",
        ],
        &["tokens", "--runs", "4", "--duration", "1s"],
    ];
    for scenario in scenarios {
        let mut args = vec!["bench", "--url", &url, "--api-url", &api, "--sources", "4"];
        args.extend_from_slice(&["--jwt-secret", SECRET, "--producer-key", PRODUCER]);
        args.extend_from_slice(&["--operator-key", OPERATOR]);
        args.extend_from_slice(scenario);
        let result = crate::support::bench(&args).await;
        assert_eq!(result["scenario"], scenario[0]);
    }
}
