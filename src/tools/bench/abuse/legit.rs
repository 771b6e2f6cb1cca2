//! The legitimate client beside the attacker: one WebSocket subscribed to its own thread, and a
//! producer posting one small event on that thread every 10 ms. Each event carries the attack it
//! was sent during and its send time, so latency is publish → receive per attack. A refused POST
//! (429, 503, 408) is retried every 100 ms with the same send time, as a producer that keeps its
//! events would, and counted.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::ensure;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::now_us;
use crate::tools::bench::{Server, viewer};
use crate::tools::client::{Http, Target, next_text, send};

/// Between two events of the producer.
const EVERY: Duration = Duration::from_millis(10);
/// A POST that takes longer is abandoned (and its connection opened again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An event still refused this long after its first attempt is given up (counted, not sent).
const GIVE_UP: Duration = Duration::from_secs(10);
/// How long the last events of an attack may take to arrive.
const DRAIN: Duration = Duration::from_secs(10);

struct Stats {
    received: u64,
    latency_us: Histogram<u64>,
}

pub(super) struct Legit {
    api: Target,
    pub(super) thread: String,
    run: String,
    stats: Arc<Mutex<Vec<Stats>>>,
    /// Why the socket ended, if it did.
    ended: Arc<Mutex<Option<String>>>,
    reader: JoinHandle<()>,
}

/// The producer of one attack.
pub(super) struct Producing {
    attack: usize,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Sent>,
}

#[derive(Debug, Default)]
struct Sent {
    sent: u64,
    refused: u64,
    errors: u64,
    abandoned: u64,
}

/// What the legitimate client saw during one attack.
pub(super) struct Delivery {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) json: Value,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Legit {
    /// Connects from `source`, subscribes to its own thread and starts its run.
    pub(super) async fn open(
        server: &Server,
        source: IpAddr,
        tag: &str,
        attacks: usize,
    ) -> anyhow::Result<Self> {
        let (thread, run) = (
            format!("bench-{tag}-legit"),
            format!("bench-{tag}-legit-run"),
        );
        let hello = json!({"type": "hello", "user_id": thread});
        let mut ws = viewer::open(&server.target, source, &hello, &thread).await?;
        let (status, answer) = server
            .api
            .http(
                "POST",
                "/v1/events",
                Some(
                    json!([{"type": "agent_started", "run_id": run, "thread_id": thread, "payload": {}}])
                        .to_string(),
                ),
            )
            .await?;
        ensure!(
            status == 200,
            "the legitimate run's agent_started answered {status}: {answer}"
        );
        let stats = (0..attacks)
            .map(|_| {
                Ok(Stats {
                    received: 0,
                    latency_us: Histogram::new_with_bounds(1, 120_000_000, 3)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let stats = Arc::new(Mutex::new(stats));
        let ended = Arc::new(Mutex::new(None));
        let reader = {
            let (stats, ended) = (Arc::clone(&stats), Arc::clone(&ended));
            tokio::spawn(async move {
                // Acks what it has shown, as a real client does: a client that never sends
                // anything is closed after session.client_timeout.
                let mut last_ack = std::time::Instant::now();
                loop {
                    let frame = match next_text(&mut ws).await {
                        Ok(frame) => frame,
                        Err(e) => {
                            *lock(&ended) = Some(format!("{e:#}"));
                            return;
                        }
                    };
                    let now = now_us();
                    let Ok(value) = serde_json::from_slice::<Value>(&frame) else {
                        continue;
                    };
                    if let Some(seq) = value["seq"].as_u64()
                        && last_ack.elapsed() > std::time::Duration::from_secs(5)
                    {
                        last_ack = std::time::Instant::now();
                        let ack =
                            json!({"type": "ack", "thread_id": value["thread_id"], "seq": seq});
                        if let Err(e) = send(&mut ws, &ack).await {
                            *lock(&ended) = Some(format!("{e:#}"));
                            return;
                        }
                    }
                    let payload = &value["payload"];
                    let (Some(attack), Some(sent_us)) =
                        (payload["attack"].as_u64(), payload["sent_us"].as_u64())
                    else {
                        continue;
                    };
                    if let Some(stats) = lock(&stats).get_mut(attack as usize) {
                        stats.received += 1;
                        stats
                            .latency_us
                            .saturating_record(now.saturating_sub(sent_us).max(1));
                    }
                }
            })
        };
        Ok(Self {
            api: server.api.clone(),
            thread,
            run,
            stats,
            ended,
            reader,
        })
    }

    /// Starts posting an event every 10 ms, tagged with `attack`.
    pub(super) fn start(&self, attack: usize) -> Producing {
        let stop = Arc::new(AtomicBool::new(false));
        let (api, run, thread, stopped) = (
            self.api.clone(),
            self.run.clone(),
            self.thread.clone(),
            Arc::clone(&stop),
        );
        let task = tokio::spawn(async move {
            let mut sent = Sent::default();
            let mut http = None;
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let body = format!(
                    r#"[{{"type":"agent_thinking","run_id":"{run}","thread_id":"{thread}","payload":{{"attack":{attack},"n":{n},"sent_us":{}}}}}]"#,
                    now_us()
                );
                n += 1;
                let first = Instant::now();
                loop {
                    if http.is_none() {
                        http = tokio::time::timeout(REQUEST_TIMEOUT, Http::open(&api))
                            .await
                            .ok()
                            .and_then(Result::ok);
                    }
                    let answer = match http.as_mut() {
                        Some(connection) => tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            connection.request("POST", "/v1/events", Some(body.clone())),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok),
                        None => None,
                    };
                    match answer {
                        Some((200, _)) => {
                            sent.sent += 1;
                            break;
                        }
                        Some(_) => sent.refused += 1,
                        None => {
                            sent.errors += 1;
                            http = None;
                        }
                    }
                    if first.elapsed() >= GIVE_UP {
                        sent.abandoned += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            sent
        });
        Producing { attack, stop, task }
    }

    /// Stops the producer and waits for its last events.
    pub(super) async fn finish(&self, producing: Producing) -> anyhow::Result<Delivery> {
        producing.stop.store(true, Ordering::Relaxed);
        let sent = producing.task.await?;
        let until = Instant::now() + DRAIN;
        let received = loop {
            let received = lock(&self.stats)[producing.attack].received;
            if received >= sent.sent || Instant::now() >= until || self.reader.is_finished() {
                break received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stats = lock(&self.stats);
        let latency = &stats[producing.attack].latency_us;
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        let (p50_ms, p99_ms, max_ms) = (ms(0.5), ms(0.99), latency.max() as f64 / 1000.0);
        let ended = lock(&self.ended).clone();
        Ok(Delivery {
            sent: sent.sent,
            received,
            p50_ms,
            p99_ms,
            max_ms,
            json: json!({
                "sent": sent.sent,
                "received": received,
                "missing": sent.sent.saturating_sub(received),
                "latency_ms": {"p50": p50_ms, "p99": p99_ms, "max": max_ms},
                "producer_refused": sent.refused,
                "producer_errors": sent.errors,
                "producer_abandoned": sent.abandoned,
                "socket_ended": ended,
            }),
        })
    }

    /// The legitimate thread's ledger: emitted, delivered, pending, lost, balanced.
    pub(super) async fn ledger(&self) -> anyhow::Result<Value> {
        let (status, ledger) = self
            .api
            .http("GET", &format!("/v1/channels/thread:{}", self.thread), None)
            .await?;
        ensure!(
            status == 200,
            "GET /v1/channels/thread:{} answered {status}",
            self.thread
        );
        Ok(json!({
            "emitted": ledger["emitted"],
            "delivered": ledger["delivered"],
            "pending": ledger["pending"],
            "lost": ledger["lost_total"],
            "balanced": ledger["balanced"],
        }))
    }
}

impl Drop for Legit {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
