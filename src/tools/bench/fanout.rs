//! `bench fanout`, `bench saturate` and `bench redis`: C connections over T threads; P events
//! published over HTTP, at a fixed rate or as fast as the gateway accepts; with `redis`, over two
//! replicas (connection i and POST j go to replica i % 2 and j % 2, and every thread has watchers on
//! both). Latency is publish → receive,
//! read from the send time each event carries. Server CPU is summed over the replicas.
//!
//! With `--events-to FIFO` the events are written there instead, one JSON object a line, for a
//! script to add to a Redis-mode gateway's ingest stream (`scripts/bench xadd` pipes them through
//! `redis-cli --pipe` as `XADD`s): the same load, measured the same way, on the `XADD` path.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::viewer::{self, Latency, Ledger, Until};
use super::{Protocol, Server, now_us, run_tag, usage};
use crate::tools::client::Http;

#[derive(Debug, Clone, clap::Args)]
pub struct Load {
    /// WebSocket connections.
    #[arg(long, default_value_t = 2_000)]
    pub connections: usize,
    /// Threads the connections are spread over (connection i watches thread i % T).
    #[arg(long, default_value_t = 200)]
    pub threads: usize,
    /// Events published in all.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Events per second (fanout only).
    #[arg(long, default_value_t = 2_000)]
    pub rate: usize,
    /// Approximate payload size of each event, in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Events per POST.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent POSTs (saturate only).
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// The run stops after this long, finished or not.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub max_time: Duration,
    /// Write the events to this named pipe, one JSON object a line, instead of POSTing them (a
    /// script turns them into `XADD`s on a Redis-mode gateway's ingest stream). One writer, so
    /// `--in-flight` does not apply; the ledger is read as in Redis mode.
    #[arg(long)]
    pub events_to: Option<std::path::PathBuf>,
}

/// Where the events go: POSTs on a kept-alive connection, or lines on a named pipe.
enum Producer {
    Post(Http),
    Pipe(tokio::net::unix::pipe::Sender),
}

impl Producer {
    /// One producer per door, or the pipe.
    async fn open(load: &Load, api: &crate::tools::client::Target) -> anyhow::Result<Self> {
        let Some(path) = &load.events_to else {
            return Ok(Self::Post(Http::open(api).await?));
        };
        // The reader opens its end when it starts: wait for it (ENXIO until then).
        const ENXIO: i32 = 6;
        let started = Instant::now();
        loop {
            match tokio::net::unix::pipe::OpenOptions::new().open_sender(path) {
                Ok(sender) => return Ok(Self::Pipe(sender)),
                Err(error)
                    if error.raw_os_error() == Some(ENXIO)
                        && started.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("cannot open {}", path.display()));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Rate,
    Saturate,
    /// At the fixed rate, across replicas; with redis-server's pid, its CPU is measured too.
    Redis(Option<u32>),
}

pub(super) async fn run(
    servers: &[Server],
    sources: &[IpAddr],
    load: Load,
    mode: Mode,
) -> anyhow::Result<Value> {
    ensure!(
        load.threads > 0 && load.connections >= load.threads,
        "need connections >= threads > 0"
    );
    let api = &servers[0].api;
    let protocol = servers[0].protocol;
    ensure!(
        protocol == Protocol::Agentwire || load.batch == 1,
        "the floor and nchan take one event per POST: --batch 1"
    );
    ensure!(
        protocol == Protocol::Agentwire || load.events_to.is_none(),
        "--events-to feeds agentwire's ingest stream; the floor and nchan have none"
    );
    let tag = run_tag();
    let deadline = Instant::now() + load.max_time;
    let thread = |k: usize| format!("bench-{tag}-t{k}");
    // Connection i goes to replica i % R and watches thread (i / R) % T, so every thread has
    // watchers on every replica (as browsers of one thread would, behind a load balancer).
    let watched = |i: usize| (i / servers.len()) % load.threads;
    let expected_for = |k: usize| {
        (load.events / load.threads + usize::from(k < load.events % load.threads)) as u64
    };

    // Everyone subscribed before the first event.
    let gate = Arc::new(Semaphore::new(256));
    let mut opening = Vec::with_capacity(load.connections);
    for i in 0..load.connections {
        let (server, source, gate, thread_id) = (
            servers[i % servers.len()].clone(),
            sources[i % sources.len()],
            Arc::clone(&gate),
            thread(watched(i)),
        );
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let hello = server
                .signer
                .hello(&format!("{thread_id}-c{i}"), &thread_id)?;
            server.viewer(source, &hello, &thread_id).await
        }));
    }
    let mut readers = Vec::with_capacity(load.connections);
    for (i, task) in opening.into_iter().enumerate() {
        let ws = task.await?.with_context(|| format!("connection {i}"))?;
        readers.push(tokio::spawn(viewer::receive(
            ws,
            Until::Count(expected_for(watched(i))),
            deadline,
            None,
        )));
    }

    let redis_pid = match mode {
        Mode::Redis(pid) => pid,
        _ => None,
    };
    let redis_before = redis_pid.map(super::proc_usage).transpose()?;
    let before = usage(servers).await?;
    let machine_before = super::machine_times();
    let started = Instant::now();
    let events = Arc::new(Events {
        protocol,
        tag: tag.clone(),
        threads: load.threads,
        pad: "x".repeat(load.payload.saturating_sub(40)),
    });
    match mode {
        Mode::Rate | Mode::Redis(_) => {
            let mut producers = Vec::with_capacity(servers.len());
            for server in servers {
                producers.push(Producer::open(&load, &server.api).await?);
                if load.events_to.is_some() {
                    break;
                }
            }
            let mut posts = 0usize;
            // A POST every millisecond: a fixed rate, not bursts of a hundredth of a second.
            let per_tick = (load.rate / 1000).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0;
            while sent < load.events && Instant::now() < deadline {
                tick.tick().await;
                let mut n = 0;
                while n < per_tick && sent < load.events {
                    let to = (sent + load.batch.min(per_tick - n)).min(load.events);
                    let which = posts % producers.len();
                    let producer = &mut producers[which];
                    posts += 1;
                    events.send(producer, sent, to).await?;
                    n += to - sent;
                    sent = to;
                }
            }
        }
        Mode::Saturate => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut publishers = Vec::new();
            let writers = match load.events_to {
                Some(_) => 1,
                None => load.in_flight.max(1),
            };
            for _ in 0..writers {
                let (next, events, mut producer) = (
                    Arc::clone(&next),
                    Arc::clone(&events),
                    Producer::open(&load, api).await?,
                );
                let (batch, total) = (load.batch, load.events);
                publishers.push(tokio::spawn(async move {
                    loop {
                        let from = next.fetch_add(batch, Ordering::Relaxed);
                        if from >= total || Instant::now() >= deadline {
                            return anyhow::Ok(());
                        }
                        events
                            .send(&mut producer, from, (from + batch).min(total))
                            .await?;
                    }
                }));
            }
            for publisher in publishers {
                publisher.await??;
            }
        }
    }
    let published_in = started.elapsed();

    let mut latency = Latency::new()?;
    let (mut received, mut last) = (0u64, started);
    for reader in readers {
        let r = reader.await??;
        received += r.count;
        latency.add(&r.latency)?;
        if let Some(at) = r.last {
            last = last.max(at);
        }
    }
    let after = usage(servers).await?;
    let steal = super::steal_percent(machine_before, super::machine_times());
    // Redis's own CPU per published event: how many events one Redis core carries.
    let redis_cpu = match (redis_pid, redis_before) {
        (Some(pid), Some(before)) => Some(super::proc_usage(pid)?.cpu_seconds - before.cpu_seconds),
        _ => None,
    };
    let expected: u64 = (0..load.connections)
        .map(|i| expected_for(watched(i)))
        .sum();
    // The replicas' delivery reports reach Redis in batches that wait 100 ms (docs/redis.md): the
    // ledger is read once they are in, so `pending` is not the batching's lag.
    if matches!(mode, Mode::Redis(_)) || load.events_to.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The floor and nchan keep no ledger: what they delivered is what the viewers counted.
    let ledger = match protocol {
        Protocol::Agentwire => {
            Some(Ledger::of(&servers[0].operator, (0..load.threads).map(thread)).await?)
        }
        Protocol::Floor | Protocol::Nchan => None,
    };
    let delivering = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-9);
    let cpu = after.cpu_seconds - before.cpu_seconds;
    let kernel = (after.kernel_seconds.zip(before.kernel_seconds)).map(|(a, b)| a - b);
    let name = match mode {
        Mode::Rate => "fanout",
        Mode::Saturate => "saturate",
        Mode::Redis(_) => "redis",
    };
    let result = json!({
        "scenario": name,
        "protocol": protocol,
        "producer": if load.events_to.is_some() { "pipe" } else { "post" },
        "batch": load.batch,
        "payload_bytes": load.payload,
        "connections": load.connections,
        "threads": load.threads,
        "events": load.events,
        "replicas": servers.len(),
        "rate": if mode == Mode::Saturate { Value::Null } else { json!(load.rate) },
        "deliveries_expected": expected,
        "deliveries_received": received,
        "publish_seconds": published_in.as_secs_f64(),
        "deliveries_per_second": (received as f64 / delivering).round(),
        "latency_ms": latency.json(),
        "server_cpu_seconds": cpu,
        "server_cpu_us_per_delivery": super::us_per(cpu, received),
        "server_kernel_cpu_us_per_delivery": kernel.map(|kernel| super::us_per(kernel, received)),
        "redis_cpu_seconds": redis_cpu,
        "redis_cpu_us_per_event": redis_cpu.map(|cpu| cpu * 1e6 / load.events as f64),
        "machine_steal_percent": steal,
        "server_rss_before_bytes": before.rss_bytes,
        "server_rss_after_bytes": after.rss_bytes,
        "ledger": ledger.as_ref().map(Ledger::json),
    });
    eprintln!(
        "{name} ({protocol:?}, {} per POST): {received}/{expected} deliveries ({:.0}/s); {}; server CPU {:.2} µs/delivery; RSS {:.1} -> {:.1} MiB; {}",
        load.batch,
        received as f64 / delivering,
        latency.summary(),
        super::us_per(cpu, received),
        before.rss_bytes / 1048576.0,
        after.rss_bytes / 1048576.0,
        ledger.as_ref().map_or("no ledger".into(), Ledger::summary),
    );
    super::say_steal(steal);
    if let Some(cpu) = redis_cpu {
        eprintln!(
            "  redis-server CPU {:.2} µs per published event",
            cpu * 1e6 / load.events as f64
        );
    }
    ensure!(
        received == expected,
        "{} deliveries missing",
        expected - received
    );
    ensure!(
        ledger.is_none_or(|ledger| ledger.balanced && ledger.lost == 0),
        "the ledger reports lost events or does not balance"
    );
    Ok(result)
}

/// Builds requests: event n goes to thread n % T and carries its send time.
struct Events {
    protocol: Protocol,
    tag: String,
    threads: usize,
    pad: String,
}

impl Events {
    fn event(&self, n: usize, sent_us: u64) -> String {
        let (tag, pad, k) = (&self.tag, &self.pad, n % self.threads);
        format!(
            r#"{{"type":"agent_thinking","run_id":"bench-{tag}-r{k}","thread_id":"bench-{tag}-t{k}","payload":{{"sent_us":{sent_us},"pad":"{pad}"}}}}"#
        )
    }

    /// Sends events `from..to` with `producer`.
    async fn send(&self, producer: &mut Producer, from: usize, to: usize) -> anyhow::Result<()> {
        match producer {
            Producer::Post(http) => self.post(http, from, to).await,
            Producer::Pipe(pipe) => {
                use tokio::io::AsyncWriteExt;
                let sent_us = now_us();
                let mut lines = String::new();
                for n in from..to {
                    lines.push_str(&self.event(n, sent_us));
                    lines.push('\n');
                }
                pipe.write_all(lines.as_bytes())
                    .await
                    .context("the events pipe")
            }
        }
    }

    /// POSTs events `from..to`: one object when there is one, else an array (agentwire); one
    /// event to its thread's path (the floor, nchan).
    async fn post(&self, http: &mut Http, from: usize, to: usize) -> anyhow::Result<()> {
        let sent_us = now_us();
        let thread = from % self.threads;
        // nchan answers 201 when the thread has subscribers and 202 when it only queued the event.
        let (path, body, accepted): (String, _, &[u16]) = match self.protocol {
            Protocol::Floor => (
                format!("/events/bench-{}-t{thread}", self.tag),
                self.event(from, sent_us),
                &[202],
            ),
            Protocol::Nchan => (
                format!("/pub/bench-{}-t{thread}", self.tag),
                self.event(from, sent_us),
                &[201, 202],
            ),
            Protocol::Agentwire if to - from == 1 => {
                ("/v1/events".into(), self.event(from, sent_us), &[200])
            }
            Protocol::Agentwire => {
                let events: Vec<String> = (from..to).map(|n| self.event(n, sent_us)).collect();
                (
                    "/v1/events".into(),
                    format!("[{}]", events.join(",")),
                    &[200],
                )
            }
        };
        let (status, answer) = http.request("POST", &path, Some(body)).await?;
        ensure!(
            accepted.contains(&status),
            "POST {path} answered {status}: {answer}"
        );
        Ok(())
    }
}
