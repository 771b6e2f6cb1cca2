//! The seven attacks. Each sends what a hostile producer or client would, from the attack
//! addresses, counts what the gateway answered, and stops at its deadline; none of them fails on a
//! refusal, which is the budget doing its work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{Ctx, counters, raw};
use crate::tools::client::Http;

/// Upgrades being set up at once.
const CONCURRENT_HANDSHAKES: usize = 256;
/// An attack request that takes longer is counted as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Attack 1, history flood: 60 KB events, 1,000 per thread on 70 threads (4.2 GB offered).
pub(super) async fn history(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const EVENT_BYTES: usize = 60_000;
    const PER_POST: usize = 16;
    let (threads, per_thread) = (ctx.n(70), ctx.n(1_000));
    let total = threads * per_thread;
    let tag = ctx.tag.to_string();
    let pad = Arc::new("x".repeat(EVENT_BYTES - 120));
    let body = move |b: usize| {
        let events: Vec<String> = (b * PER_POST..((b + 1) * PER_POST).min(total))
            .map(|i| {
                let k = i % threads;
                format!(
                    r#"{{"type":"agent_thinking","run_id":"bench-{tag}-h{k}","thread_id":"bench-{tag}-h{k}","payload":{{"text":"{pad}"}}}}"#
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    };
    let posted = post_all(ctx, total.div_ceil(PER_POST), 4, Arc::new(body)).await;
    Ok(json!({
        "threads": threads,
        "events": total,
        "event_bytes": EVENT_BYTES,
        "posts": posted,
    }))
}

/// Attack 2, unknown-run flood: 64 KiB events of empty objects (`{"x":[{},{},…]}`, the most parsed
/// structure per byte) for a run nobody registered, then one `GET /v1/deadletter`, timed.
pub(super) async fn unknown_run(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const EVENT_BYTES: usize = 65_472;
    const PER_POST: usize = 15;
    let count = ctx.n(2_000);
    let run = format!("bench-{}-ghost", ctx.tag);
    let envelope = format!(r#"{{"type":"agent_thinking","run_id":"{run}","payload":{{"x":[]}}}}"#);
    let objects = (EVENT_BYTES - envelope.len() + 1) / 3;
    let x = vec!["{}"; objects].join(",");
    let event = Arc::new(format!(
        r#"{{"type":"agent_thinking","run_id":"{run}","payload":{{"x":[{x}]}}}}"#
    ));
    let body = move |b: usize| {
        let n = PER_POST.min(count - b * PER_POST);
        format!("[{}]", vec![event.as_str(); n].join(","))
    };
    let posted = post_all(ctx, count.div_ceil(PER_POST), 4, Arc::new(body)).await;
    // The held events become dead letters after `resolve.grace`.
    let waiting_until = ctx.deadline.max(Instant::now() + Duration::from_secs(10));
    let mut pending = 0.0;
    while Instant::now() < waiting_until {
        pending = counters(ctx.server)
            .await?
            .get("agentwire_events_pending_resolution")
            .copied()
            .unwrap_or(0.0);
        if pending == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let asked = Instant::now();
    let (status, letters) = ctx.api().http("GET", "/v1/deadletter", None).await?;
    let deadletter_ms = asked.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "events": count,
        "event_bytes": EVENT_BYTES,
        "empty_objects_per_event": objects,
        "posts": posted,
        "pending_resolution_left": pending,
        "deadletter": {"status": status, "ms": deadletter_ms, "count": letters["count"]},
    }))
}

/// Attack 3, open tools: runs with 256 `tool_executing` each, every `tool_call_id` 256 bytes long.
pub(super) async fn open_tools(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const TOOLS: usize = 256;
    let runs = ctx.n(2_000);
    let tag = ctx.tag.to_string();
    let body = move |r: usize| {
        let (run, thread) = (
            format!("bench-{tag}-o{r}"),
            format!("bench-{tag}-o{}", r % 100),
        );
        let mut events = vec![format!(
            r#"{{"type":"agent_started","run_id":"{run}","thread_id":"{thread}","payload":{{}}}}"#
        )];
        events.extend((0..TOOLS).map(|j| {
            let id = format!("{run}-{j:04}-{}", "c".repeat(256));
            let id = &id[..256];
            format!(
                r#"{{"type":"tool_executing","run_id":"{run}","thread_id":"{thread}","payload":{{"tool_call_id":"{id}"}}}}"#
            )
        }));
        format!("[{}]", events.join(","))
    };
    let posted = post_all(ctx, runs, 4, Arc::new(body)).await;
    Ok(json!({"runs": runs, "tools_per_run": TOOLS, "tool_call_id_bytes": 256, "posts": posted}))
}

/// How a trickling connection ended.
enum Trickle {
    Refused(u16),
    /// The gateway closed it (the frame timeout), after this long.
    Cut(Duration),
    /// Still open when the attack ended.
    Held,
    Error,
}

/// Attack 4, connection flood: 8,000 WebSockets with `hello` from ONE address (past
/// `session.max_connections_per_ip` they are refused), and 1,000 connections from another that
/// send `hello`, then a frame header claiming 64 KiB, then a byte every 500 ms.
pub(super) async fn connections(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    let (flood, trickling) = (ctx.n(8_000), ctx.n(1_000));
    let until = Instant::now() + ctx.time(Duration::from_secs(12));
    let (flood_source, trickle_source) = (ctx.attacker(0), ctx.attacker(1));
    let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let hello = |i: usize, kind: &str| {
        raw::text_frame(
            json!({"type": "hello", "user_id": format!("bench-{}-{kind}{i}", ctx.tag)})
                .to_string()
                .as_bytes(),
        )
    };
    let mut trickles = Vec::with_capacity(trickling);
    for i in 0..trickling {
        let (target, gate, hello) = (ctx.server.target.clone(), Arc::clone(&gate), hello(i, "s"));
        trickles.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let Ok((status, mut stream)) = raw::upgrade(&target, trickle_source).await else {
                return Trickle::Error;
            };
            drop(permit);
            if status != 101 {
                return Trickle::Refused(status);
            }
            let mut start = hello;
            start.extend_from_slice(&raw::frame_header(0xFFFF));
            if stream.write_all(&start).await.is_err() {
                return Trickle::Error;
            }
            let began = Instant::now();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => {
                        if !matches!(read, Ok(n) if n > 0) {
                            return Trickle::Cut(began.elapsed());
                        }
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        if Instant::now() >= until {
                            return Trickle::Held;
                        }
                        if stream.write_all(b" ").await.is_err() {
                            return Trickle::Cut(began.elapsed());
                        }
                    }
                }
            }
        }));
    }
    let mut opening = Vec::with_capacity(flood);
    for i in 0..flood {
        let (target, gate, hello) = (ctx.server.target.clone(), Arc::clone(&gate), hello(i, "f"));
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let (status, mut stream) = raw::upgrade(&target, flood_source).await?;
            if status == 101 {
                stream.write_all(&hello).await?;
            }
            anyhow::Ok((status, stream))
        }));
    }
    let mut held: Vec<TcpStream> = Vec::new();
    let (mut flood_statuses, mut flood_errors, mut first_error) = (BTreeMap::new(), 0u64, None);
    for task in opening {
        match task.await? {
            Ok((status, stream)) => {
                *flood_statuses.entry(status.to_string()).or_insert(0u64) += 1;
                if status == 101 {
                    held.push(stream);
                }
            }
            Err(e) => {
                flood_errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let held_for = until.saturating_duration_since(Instant::now());
    tokio::time::sleep_until(until.into()).await;
    let rss_held = ctx.server.usage().await?.rss_bytes;
    drop(held);
    let (mut refused, mut cut, mut still, mut errors) = (BTreeMap::new(), Vec::new(), 0u64, 0u64);
    for task in trickles {
        match task.await? {
            Trickle::Refused(status) => *refused.entry(status.to_string()).or_insert(0u64) += 1,
            Trickle::Cut(after) => cut.push(after.as_secs_f64()),
            Trickle::Held => still += 1,
            Trickle::Error => errors += 1,
        }
    }
    cut.sort_by(f64::total_cmp);
    Ok(json!({
        "flood": {
            "source": flood_source.to_string(),
            "attempted": flood,
            "statuses": flood_statuses,
            "errors": flood_errors,
            "first_error": first_error,
            "held_for_seconds": held_for.as_secs_f64(),
        },
        "server_rss_while_held_mib": rss_held / 1048576.0,
        "trickle": {
            "source": trickle_source.to_string(),
            "attempted": trickling,
            "refused": refused,
            "cut": cut.len(),
            "cut_after_seconds_median": cut.get(cut.len() / 2),
            "open_at_the_end": still,
            "errors": errors,
        },
    }))
}

/// Attack 5, slow bodies: 1,000 producers each declaring a 1 MB `POST /v1/events` and sending a
/// byte every 100 ms; each starts again when it is answered, until the attack ends.
pub(super) async fn slow_bodies(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const DECLARED: usize = 1_000_000;
    let workers = ctx.n(1_000);
    let until = Instant::now() + ctx.time(Duration::from_secs(15));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let count = |statuses: &Mutex<BTreeMap<String, u64>>, key: String| {
        *statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(0) += 1;
    };
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let (api, source, statuses) = (ctx.api().clone(), ctx.attacker(w), Arc::clone(&statuses));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let Ok(stream) = raw::start_post(&api, source, DECLARED).await else {
                    count(&statuses, "connect_error".into());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let (mut reader, mut writer) = stream.into_split();
                let mut reading = std::pin::pin!(raw::read_status(&mut reader));
                let mut first = true;
                let pause = loop {
                    tokio::select! {
                        status = &mut reading => {
                            let key = status.map_or_else(|_| "reset".to_string(), |s| s.to_string());
                            let pause = if key == "408" { 100 } else { 1000 };
                            count(&statuses, key);
                            break Duration::from_millis(pause);
                        }
                        () = tokio::time::sleep(Duration::from_millis(100)) => {
                            if Instant::now() >= until {
                                count(&statuses, "open_at_the_end".into());
                                break Duration::ZERO;
                            }
                            let byte: &[u8] = if first { b"[" } else { b" " };
                            first = false;
                            if writer.write_all(byte).await.is_err() {
                                count(&statuses, "reset".into());
                                break Duration::from_millis(100);
                            }
                        }
                    }
                };
                tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now())))
                    .await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let statuses = statuses
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(json!({"producers": workers, "declared_bytes": DECLARED, "outcomes": statuses}))
}

/// Attack 6, run flood: 100,000 `agent_started`, each with its own run id.
pub(super) async fn run_flood(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const PER_POST: usize = 1_000;
    let runs = ctx.n(100_000);
    let tag = ctx.tag.to_string();
    let body = move |b: usize| {
        let events: Vec<String> = (b * PER_POST..((b + 1) * PER_POST).min(runs))
            .map(|i| {
                format!(
                    r#"{{"type":"agent_started","run_id":"bench-{tag}-f{i}","thread_id":"bench-{tag}-f{}","payload":{{}}}}"#,
                    i % 1_000
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    };
    let posted = post_all(ctx, runs.div_ceil(PER_POST), 4, Arc::new(body)).await;
    Ok(json!({"runs": runs, "posts": posted}))
}

/// Attack 7, ledger loop: 8 operators asking `GET /v1/ledger` back to back.
pub(super) async fn ledger_loop(ctx: &Ctx<'_>) -> anyhow::Result<Value> {
    const CLIENTS: usize = 8;
    let until = Instant::now() + ctx.time(Duration::from_secs(10));
    let mut tasks = Vec::with_capacity(CLIENTS);
    for c in 0..CLIENTS {
        let (api, source) = (ctx.api().clone(), ctx.attacker(c));
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
            let mut statuses = BTreeMap::<String, u64>::new();
            let mut http = Http::open_from(&api, source).await?;
            while Instant::now() < until {
                let asked = Instant::now();
                let status = match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    http.request("GET", "/v1/ledger", None),
                )
                .await
                {
                    Ok(Ok((status, _))) => status.to_string(),
                    _ => {
                        http = Http::open_from(&api, source).await?;
                        "error".to_string()
                    }
                };
                latency.saturating_record(asked.elapsed().as_micros().max(1) as u64);
                *statuses.entry(status).or_insert(0) += 1;
            }
            anyhow::Ok((latency, statuses))
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut statuses = BTreeMap::<String, u64>::new();
    for task in tasks {
        let (one, counted) = task.await??;
        latency.add(&one)?;
        for (status, n) in counted {
            *statuses.entry(status).or_insert(0) += n;
        }
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "clients": CLIENTS,
        "requests": latency.len(),
        "statuses": statuses,
        "ledger_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": latency.max() as f64 / 1000.0},
    }))
}

#[derive(Default)]
struct Tally {
    posts: u64,
    statuses: BTreeMap<String, u64>,
    accepted: u64,
    pending_resolution: u64,
    failed: u64,
}

type Bodies = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// POSTs `bodies(0..batches)` to `/v1/events` over `in_flight` connections, each from its own
/// attack address, until all are sent or the deadline; what the gateway answered.
async fn post_all(ctx: &Ctx<'_>, batches: usize, in_flight: usize, bodies: Bodies) -> Value {
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = ctx.deadline;
    let mut tasks = Vec::with_capacity(in_flight);
    for w in 0..in_flight {
        let (api, source, next, tally, bodies) = (
            ctx.api().clone(),
            ctx.attacker(w),
            Arc::clone(&next),
            Arc::clone(&tally),
            Arc::clone(&bodies),
        );
        tasks.push(tokio::spawn(async move {
            let mut http = None;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches || Instant::now() >= deadline {
                    return;
                }
                if http.is_none() {
                    http = Http::open_from(&api, source).await.ok();
                }
                let answer = match http.as_mut() {
                    Some(connection) => tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        connection.request("POST", "/v1/events", Some(bodies(b))),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok),
                    None => None,
                };
                let refused = {
                    let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
                    tally.posts += 1;
                    let key = answer
                        .as_ref()
                        .map_or_else(|| "error".to_string(), |(status, _)| status.to_string());
                    *tally.statuses.entry(key).or_insert(0) += 1;
                    if let Some((_, summary)) = &answer {
                        tally.accepted += summary["accepted"].as_u64().unwrap_or(0);
                        tally.pending_resolution +=
                            summary["pending_resolution"].as_u64().unwrap_or(0);
                        tally.failed += summary["failed"].as_u64().unwrap_or(0);
                    }
                    !matches!(answer, Some((200 | 207 | 400, _)))
                };
                if answer.is_none() {
                    http = None;
                }
                if refused {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
    json!({
        "batches": batches,
        "sent": tally.posts,
        "statuses": tally.statuses,
        "events_accepted": tally.accepted,
        "events_pending_resolution": tally.pending_resolution,
        "events_failed": tally.failed,
    })
}
