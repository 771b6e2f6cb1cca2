//! The load a fault meets: a producer that posts each thread's events in order with unique
//! `event_id`s and retries on any failure, and clients that each follow one thread, keep their
//! last `(epoch, seq)`, resume on any close and do what docs/protocol.md asks of a client (drop
//! duplicate seqs, reload on `recovered: false`). Everything either side saw is recorded for the
//! tally.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::cluster::Doors;
use super::wire;

/// How a scenario loads the cluster.
#[derive(Clone, Copy)]
pub struct Load {
    pub threads: usize,
    pub clients: usize,
    /// Events per second over all threads.
    pub rate: f64,
    /// Every event goes to every replica at once (same `event_id`): exactly one may be accepted.
    pub concurrent_retries: bool,
    /// Clients that take [`SLOW_READ`] over each frame: slower than the others, still keeping up.
    pub slow_readers: usize,
}

/// How long a slow reader takes over each frame.
const SLOW_READ: Duration = Duration::from_millis(20);

/// One event the producer got an answer for.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub n: u64,
    /// When the producer first tried to post it.
    pub first_try: Instant,
    /// Answers `accepted` (more than one is a duplicate delivery waiting to happen).
    pub accepted: u32,
}

/// What one thread's producer did.
#[derive(Debug, Default)]
pub struct Produced {
    pub thread: usize,
    pub events: Vec<Accepted>,
    /// Longest time from a failed attempt to the next accepted one.
    pub longest_outage: Duration,
    /// Failed attempts by what failed (`503`, `connect`, …).
    pub failures: BTreeMap<String, u64>,
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub thread: usize,
    /// The `payload.n` of each event shown (duplicates dropped).
    pub events: BTreeSet<u64>,
    /// When a `subscribed` frame said `recovered: false` to a client that had a position: it reloads,
    /// which covers everything emitted before.
    pub resets: Vec<Instant>,
    pub duplicates: u64,
    /// Shown with a lower `n` than one shown before.
    pub out_of_order: u64,
    /// An event whose seq skipped ahead of the last one shown, in the same epoch.
    pub gaps: u64,
    /// An event in another epoch with no `subscribed` frame announcing it.
    pub unannounced_epochs: u64,
    pub closes: BTreeMap<u16, u64>,
    /// Longest time from a close to the next `subscribed`.
    pub longest_interruption: Duration,
}

/// The producer and the clients, running until `finish`.
pub struct Workload {
    stop_producing: CancellationToken,
    stop_clients: CancellationToken,
    producers: JoinSet<Produced>,
    clients: JoinSet<Seen>,
    /// Per thread, the highest `n` each client has shown, for `finish` to wait on.
    progress: Arc<Mutex<Vec<Vec<u64>>>>,
    produced_up_to: Arc<Mutex<Vec<u64>>>,
}

impl Workload {
    /// Connects every client, waits until each has subscribed, then starts producing.
    pub async fn start(doors: &Doors, load: Load) -> Self {
        let stop_producing = CancellationToken::new();
        let stop_clients = CancellationToken::new();
        let progress = Arc::new(Mutex::new(vec![Vec::new(); load.threads]));
        let produced_up_to = Arc::new(Mutex::new(vec![0; load.threads]));
        let mut clients = JoinSet::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(load.clients.max(1));
        for c in 0..load.clients {
            let thread = c % load.threads;
            let slot = {
                let mut progress = progress.lock().unwrap();
                progress[thread].push(0);
                progress[thread].len() - 1
            };
            clients.spawn(follow(
                doors.clone(),
                thread,
                (format!("fu{c}"), c < load.slow_readers),
                stop_clients.clone(),
                ready_tx.clone(),
                (Arc::clone(&progress), slot),
            ));
        }
        drop(ready_tx);
        for _ in 0..load.clients {
            tokio::time::timeout(Duration::from_secs(20), ready_rx.recv())
                .await
                .expect("every client subscribes");
        }
        let mut producers = JoinSet::new();
        let per_thread = Duration::from_secs_f64(load.threads as f64 / load.rate);
        for thread in 0..load.threads {
            producers.spawn(produce(
                doors.clone(),
                thread,
                per_thread,
                load.concurrent_retries,
                stop_producing.clone(),
                Arc::clone(&produced_up_to),
            ));
        }
        Self {
            stop_producing,
            stop_clients,
            producers,
            clients,
            progress,
            produced_up_to,
        }
    }

    /// Stops producing, gives the clients up to `settle` to catch up with every accepted event,
    /// stops them, and returns what both sides saw.
    pub async fn finish(mut self, settle: Duration) -> (Vec<Produced>, Vec<Seen>) {
        self.stop_producing.cancel();
        let mut produced = Vec::new();
        while let Some(p) = self.producers.join_next().await {
            produced.push(p.expect("producer"));
        }
        let deadline = Instant::now() + settle;
        while Instant::now() < deadline {
            let caught_up = {
                let up_to = self.produced_up_to.lock().unwrap();
                let progress = self.progress.lock().unwrap();
                progress
                    .iter()
                    .zip(up_to.iter())
                    .all(|(clients, &last)| clients.iter().all(|&n| n >= last))
            };
            if caught_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop_clients.cancel();
        let mut seen = Vec::new();
        while let Some(s) = self.clients.join_next().await {
            seen.push(s.expect("client"));
        }
        (produced, seen)
    }
}

fn thread_id(thread: usize) -> String {
    format!("fault_t{thread}")
}

/// Posts thread `thread`'s events one at a time, every `every`, each retried (same `event_id`)
/// until a replica takes it.
async fn produce(
    doors: Doors,
    thread: usize,
    every: Duration,
    concurrent: bool,
    stop: CancellationToken,
    produced_up_to: Arc<Mutex<Vec<u64>>>,
) -> Produced {
    let mut produced = Produced {
        thread,
        ..Produced::default()
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let id = thread_id(thread);
    for n in 0.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let kind = if n == 0 {
            "agent_started"
        } else {
            "agent_thinking"
        };
        let event = json!({
            "type": kind, "run_id": format!("run_{id}"), "thread_id": id,
            "event_id": format!("{id}-{n}"), "payload": {"n": n},
        });
        let body = Value::from(vec![event]).to_string();
        let first_try = Instant::now();
        let mut failing_since: Option<Instant> = None;
        let accepted = loop {
            let targets: Vec<_> = if concurrent {
                doors.internals()
            } else {
                doors.pick().map(|d| d.1).into_iter().collect()
            };
            let attempts = targets
                .into_iter()
                .map(|addr| wire::request(addr, "POST", "/v1/events", Some(body.clone())));
            let answers = futures_util::future::join_all(attempts).await;
            let mut accepted = 0;
            let mut taken = false;
            for answer in answers {
                match answer {
                    Ok((StatusCode::OK, answer)) => match answer["results"][0]["status"].as_str() {
                        Some("accepted") => {
                            accepted += 1;
                            taken = true;
                        }
                        Some("duplicate") => taken = true,
                        other => panic!("unexpected item status {other:?}: {answer}"),
                    },
                    Ok((status, _)) => {
                        *produced
                            .failures
                            .entry(status.as_u16().to_string())
                            .or_default() += 1
                    }
                    Err(_) => *produced.failures.entry("connect".into()).or_default() += 1,
                }
            }
            if taken {
                break accepted;
            }
            failing_since.get_or_insert_with(Instant::now);
            if stop.is_cancelled() && first_try.elapsed() > Duration::from_secs(30) {
                panic!("event {n} of {id} was never taken");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(since) = failing_since {
            produced.longest_outage = produced.longest_outage.max(since.elapsed());
        }
        produced.events.push(Accepted {
            n,
            first_try,
            accepted,
        });
        produced_up_to.lock().unwrap()[thread] = n;
    }
    produced
}

/// Follows thread `thread` as user `user` until `stop`, resuming after every close.
async fn follow(
    doors: Doors,
    thread: usize,
    (user, slow): (String, bool),
    stop: CancellationToken,
    ready: tokio::sync::mpsc::Sender<()>,
    (progress, slot): (Arc<Mutex<Vec<Vec<u64>>>>, usize),
) -> Seen {
    let mut seen = Seen {
        thread,
        ..Seen::default()
    };
    let channel = format!("thread:{}", thread_id(thread));
    let mut epoch = String::new();
    let mut seq = 0u64;
    let mut max_n: Option<u64> = None;
    let mut closed_at: Option<Instant> = None;
    // After `recovered: false` the replay may start past a gap: the reload covered it.
    let mut reloaded = false;
    let mut ready = Some(ready);
    while !stop.is_cancelled() {
        if closed_at.is_some() {
            // Full jitter, as a browser client should, so replicas are not hit at once.
            let backoff = rand::random_range(10..100);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        let Some((public, _)) = doors.pick() else {
            closed_at.get_or_insert_with(Instant::now);
            continue;
        };
        let connect = tokio_tungstenite::connect_async(format!("ws://{public}/ws"));
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(Duration::from_secs(2), connect).await
        else {
            closed_at.get_or_insert_with(Instant::now);
            continue;
        };
        let mut subscribe = json!({"type": "subscribe", "thread_id": thread_id(thread)});
        if !epoch.is_empty() {
            subscribe["since"] = json!({"epoch": epoch, "seq": seq});
        }
        let opened = async {
            ws.send(Message::text(
                json!({"type": "hello", "user_id": user}).to_string(),
            ))
            .await?;
            ws.send(Message::text(subscribe.to_string())).await
        };
        if opened.await.is_err() {
            closed_at.get_or_insert_with(Instant::now);
            continue;
        }
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                message = ws.next() => message,
            };
            if slow {
                tokio::time::sleep(SLOW_READ).await;
            }
            let frame: Value = match message {
                Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                    Ok(frame) => frame,
                    Err(_) => continue,
                },
                Some(Ok(Message::Close(close))) => {
                    let code = close.map_or(1005, |c| u16::from(c.code));
                    *seen.closes.entry(code).or_default() += 1;
                    break;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    *seen.closes.entry(1006).or_default() += 1;
                    break;
                }
            };
            if frame["channel"] != channel.as_str() {
                continue;
            }
            if frame["type"] == "subscribed" {
                if let Some(at) = closed_at.take() {
                    seen.longest_interruption = seen.longest_interruption.max(at.elapsed());
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(()).await;
                }
                // No position yet, or `recovered: false`: (reload and) continue from the
                // channel's position the frame names; a replay below it is what the reload
                // showed. `recovered: true`: the replay continues from our position.
                if frame["recovered"] != true {
                    if !epoch.is_empty() {
                        seen.resets.push(Instant::now());
                        reloaded = true;
                    }
                    epoch = frame["epoch"].as_str().unwrap_or_default().to_string();
                    seq = frame["seq"].as_u64().unwrap_or(0);
                }
                continue;
            }
            let (Some(event_seq), Some(event_epoch)) =
                (frame["seq"].as_u64(), frame["epoch"].as_str())
            else {
                continue;
            };
            if event_epoch != epoch {
                if !epoch.is_empty() {
                    seen.unannounced_epochs += 1;
                }
                epoch = event_epoch.to_string();
                seq = 0;
            }
            if event_seq <= seq {
                seen.duplicates += 1;
                continue;
            }
            if event_seq > seq + 1 && seq > 0 && !reloaded {
                seen.gaps += 1;
            }
            reloaded = false;
            seq = event_seq;
            if let Some(n) = frame["payload"]["n"].as_u64() {
                if max_n.is_some_and(|max| n < max) {
                    seen.out_of_order += 1;
                }
                max_n = Some(max_n.map_or(n, |max| max.max(n)));
                seen.events.insert(n);
                progress.lock().unwrap()[thread][slot] = max_n.unwrap_or(0);
            }
        }
        closed_at.get_or_insert_with(Instant::now);
    }
    seen
}
