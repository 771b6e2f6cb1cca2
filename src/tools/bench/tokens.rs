//! `bench tokens`: N concurrent runs, each on its own thread with one viewer, each streaming
//! deltas of a few bytes at a fixed rate as an agent's token stream does. Two protocols: `agui`
//! (`TEXT_MESSAGE_CONTENT` framed by RUN_STARTED, TEXT_MESSAGE_START … TEXT_MESSAGE_END,
//! RUN_FINISHED, to a viewer that says `"protocol":"ag-ui"`) and `native` (`agent_thinking`
//! framed by `agent_started` … `agent_completed`, to a native viewer). Two producers: `stream`,
//! one long-lived `POST /v1/runs/{run_id}/agui` or `/events` NDJSON body per run, an event per
//! line as it is produced (what an agent does); `post`, one keep-alive `POST /v1/events` per event
//! over a bounded pool of connections. Every event carries its send time (in AG-UI's `rawEvent`,
//! or the native payload, which the gateway passes through), so latency is publish → receive.
//! Lost: events the gateway accepted that the run's viewer had not received by the deadline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant as Clock;

use super::viewer::{self, Latency, Ledger, Received, Until};
use super::{Server, ensure_open_files, now_us, run_tag, usage};
use crate::tools::client::{Http, Upload};

/// Connections being set up at once (viewers, then the streams).
const CONCURRENT_HANDSHAKES: usize = 256;
/// How long the gateway may take to answer a stream once its body ended (it answers at once).
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct Tokens {
    /// Concurrent runs, each on its own thread with one viewer.
    #[arg(long, default_value_t = 2_000)]
    pub runs: usize,
    /// Events (deltas) per second of each run.
    #[arg(long, default_value_t = 20)]
    pub rate_per_run: u32,
    /// Bytes of text in each delta.
    #[arg(long, default_value_t = 8)]
    pub delta_bytes: usize,
    /// How long each run streams deltas.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How the runs reach the gateway.
    #[arg(long, value_enum, default_value_t = Producer::Stream)]
    pub producer: Producer,
    /// Which events the runs are made of.
    #[arg(long, value_enum, default_value_t = Events::Agui)]
    pub events: Events,
    /// Keep-alive HTTP connections the runs share (`--producer post`).
    #[arg(long, default_value_t = 64)]
    pub producer_connections: usize,
    /// How long after the last event is due the viewers may take to receive everything; a
    /// producer that has not sent everything by then stops.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Producer {
    /// One `POST /v1/runs/{run_id}/agui?thread_id=…` per run, NDJSON written as it is produced.
    Stream,
    /// One `POST /v1/events` per event, over `--producer-connections` keep-alive connections.
    Post,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Events {
    /// AG-UI events, streamed to `POST /v1/runs/{run_id}/agui`, read by AG-UI viewers.
    Agui,
    /// Native events, streamed to `POST /v1/runs/{run_id}/events`, read by native viewers.
    Native,
}

impl Events {
    fn as_str(self) -> &'static str {
        match self {
            Self::Agui => "agui",
            Self::Native => "native",
        }
    }

    /// The run's last event, which tells its viewer it has everything.
    fn last(self) -> &'static [u8] {
        match self {
            Self::Agui => b"\"RUN_FINISHED\"",
            Self::Native => b"\"agent_completed\"",
        }
    }

    /// Events around the deltas: RUN_STARTED, TEXT_MESSAGE_START … TEXT_MESSAGE_END,
    /// RUN_FINISHED; or `agent_started` … `agent_completed`.
    fn framing(self) -> usize {
        match self {
            Self::Agui => 4,
            Self::Native => 2,
        }
    }
}

/// The runs of one bench: names, events, and when each is due.
struct Runs {
    tag: String,
    kind: Events,
    count: usize,
    deltas: usize,
    period: Duration,
    delta: String,
}

impl Runs {
    fn thread(&self, k: usize) -> String {
        format!("bench-{}-t{k}", self.tag)
    }

    fn run(&self, k: usize) -> String {
        format!("bench-{}-r{k}", self.tag)
    }

    /// Events of each run: the deltas and their framing.
    fn events(&self) -> usize {
        self.deltas + self.kind.framing()
    }

    /// Where run `k` is streamed (`--producer stream`).
    fn stream_path(&self, k: usize) -> String {
        let (run, thread) = (self.run(k), self.thread(k));
        match self.kind {
            Events::Agui => format!("/v1/runs/{run}/agui?thread_id={thread}"),
            Events::Native => format!("/v1/runs/{run}/events?thread_id={thread}"),
        }
    }

    /// When event `i` of run `k` is due after the start: one every period, the runs' phases
    /// spread evenly over a period so that the gateway sees a steady flow, not bursts.
    fn due(&self, k: usize, i: usize) -> Duration {
        self.period.mul_f64(i as f64 + k as f64 / self.count as f64)
    }

    /// Event `i` of run `k` as JSON, carrying its send time; with `beside`, the gateway's
    /// `run_id` and `thread_id` next to it (what `POST /v1/events` needs).
    fn event(&self, k: usize, i: usize, beside: bool) -> String {
        let (thread, run) = (self.thread(k), self.run(k));
        if self.kind == Events::Native {
            let sent = json!({"sent_us": now_us()});
            let mut event = match i {
                0 => json!({"type": "agent_started", "payload": sent}),
                i if i <= self.deltas => json!({"type": "agent_thinking",
                    "payload": {"delta": self.delta, "sent_us": sent["sent_us"]}}),
                _ => json!({"type": "agent_completed", "payload": sent}),
            };
            if beside {
                event["run_id"] = run.into();
                event["thread_id"] = thread.into();
            }
            return event.to_string();
        }
        let mut event = match i {
            0 => json!({"type": "RUN_STARTED", "threadId": thread, "runId": run}),
            1 => json!({"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"}),
            i if i < self.deltas + 2 => {
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": self.delta})
            }
            i if i == self.deltas + 2 => json!({"type": "TEXT_MESSAGE_END", "messageId": "m"}),
            _ => json!({"type": "RUN_FINISHED", "threadId": thread, "runId": run}),
        };
        event["rawEvent"] = json!({"sent_us": now_us()});
        if beside {
            event["run_id"] = run.into();
            event["thread_id"] = thread.into();
        }
        event.to_string()
    }
}

/// What producing one run (or one connection's runs) came to.
#[derive(Default)]
struct Produced {
    /// Accepted by the gateway, per run (indexed by run).
    accepted: Vec<(usize, u64)>,
    sent: u64,
    /// Events not sent: the grace ran out, or the gateway stopped reading a stream.
    unsent: u64,
    /// Answers that were not a success, with the first one kept for the report.
    refusals: u64,
    first_refusal: Option<String>,
    /// How far behind its schedule the producer sent an event, at most.
    lag: Duration,
}

impl Produced {
    fn refused(&mut self, what: String) {
        self.refusals += 1;
        self.first_refusal.get_or_insert(what);
    }

    fn merge(&mut self, other: Self) {
        self.accepted.extend(other.accepted);
        self.sent += other.sent;
        self.unsent += other.unsent;
        self.refusals += other.refusals;
        if self.first_refusal.is_none() {
            self.first_refusal = other.first_refusal;
        }
        self.lag = self.lag.max(other.lag);
    }
}

pub(super) async fn run(
    server: &Server,
    sources: &[IpAddr],
    args: Tokens,
) -> anyhow::Result<Value> {
    ensure!((1..=100_000).contains(&args.runs), "--runs is 1 to 100000");
    ensure!(
        (1..=1_000).contains(&args.rate_per_run),
        "--rate-per-run is 1 to 1000"
    );
    ensure!(
        (1..=4_096).contains(&args.delta_bytes),
        "--delta-bytes is 1 to 4096"
    );
    ensure!(
        args.duration <= Duration::from_secs(3_600),
        "--duration is at most 1h"
    );
    ensure!(
        args.producer_connections > 0,
        "--producer-connections must be above 0"
    );
    // A viewer per run, and a stream per run or the shared connections.
    let producers = match args.producer {
        Producer::Stream => args.runs,
        Producer::Post => args.producer_connections.min(args.runs),
    };
    ensure_open_files((args.runs + producers) as u64 + 256)?;
    let period = Duration::from_secs(1) / args.rate_per_run;
    let runs = Arc::new(Runs {
        tag: run_tag(),
        kind: args.events,
        count: args.runs,
        deltas: (args.duration.as_secs_f64() * f64::from(args.rate_per_run)).round() as usize,
        period,
        delta: "abcdefghijklmnopqrstuvwxyz"
            .chars()
            .cycle()
            .take(args.delta_bytes)
            .collect(),
    });

    // Every viewer subscribed before its run starts, so it reads the run from RUN_STARTED.
    let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let mut opening = Vec::with_capacity(args.runs);
    let kind = args.events;
    for k in 0..args.runs {
        let (target, source, gate, thread) = (
            server.target.clone(),
            sources[k % sources.len()],
            Arc::clone(&gate),
            runs.thread(k),
        );
        let mut hello = server.signer.hello(&format!("{thread}-v"), &thread)?;
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            if kind == Events::Agui {
                hello["protocol"] = "ag-ui".into();
            }
            viewer::open(&target, source, &hello, &thread).await
        }));
    }
    let mut viewers = Vec::with_capacity(args.runs);
    for (k, task) in opening.into_iter().enumerate() {
        viewers.push(task.await?.with_context(|| format!("viewer {k}"))?);
    }
    let streams = match args.producer {
        Producer::Stream => Some(open_streams(server, sources, &runs).await?),
        Producer::Post => None,
    };

    let before = usage(std::slice::from_ref(server)).await?;
    let machine_before = super::machine_times();
    let started = Clock::now();
    let last_due = runs.due(args.runs - 1, runs.events() - 1);
    let deadline = (started + last_due + args.grace).into_std();
    let readers: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(k, ws)| {
            tokio::spawn(viewer::receive(
                ws,
                Until::Holds(runs.kind.last()),
                deadline,
                Some(runs.thread(k)),
            ))
        })
        .collect();
    let produced = match streams {
        Some(streams) => stream(streams, &runs, started, deadline.into()).await?,
        None => post(server, sources, &runs, producers, started, deadline.into()).await?,
    };
    let produced_in = started.elapsed();

    let mut accepted = vec![0u64; args.runs];
    for &(k, n) in &produced.accepted {
        accepted[k] += n;
    }
    let mut latency = Latency::new()?;
    let (mut received, mut lost, mut last) = (0u64, 0u64, started.into_std());
    for (k, reader) in readers.into_iter().enumerate() {
        let Received {
            count,
            latency: one,
            last: at,
        } = reader.await?.with_context(|| format!("viewer {k}"))?;
        received += count;
        lost += accepted[k].saturating_sub(count);
        latency.add(&one)?;
        if let Some(at) = at {
            last = last.max(at);
        }
    }
    let after = usage(std::slice::from_ref(server)).await?;
    let steal = super::steal_percent(machine_before, super::machine_times());
    // A thread exists only once an event of its run was accepted: a refused run has no ledger.
    let used = (0..args.runs).filter(|&k| accepted[k] > 0);
    let ledger = Ledger::of(&server.operator, used.map(|k| runs.thread(k))).await?;

    let events_in: u64 = accepted.iter().sum();
    let delivering = last
        .saturating_duration_since(started.into_std())
        .as_secs_f64()
        .max(1e-9);
    let cpu = after.cpu_seconds - before.cpu_seconds;
    let kernel = (after.kernel_seconds.zip(before.kernel_seconds)).map(|(a, b)| a - b);
    let per = |n: u64| super::us_per(cpu, n);
    let producer = match args.producer {
        Producer::Stream => "stream",
        Producer::Post => "post",
    };
    let result = json!({
        "scenario": "tokens",
        "producer": producer,
        "events": args.events.as_str(),
        "runs": args.runs,
        "rate_per_run": args.rate_per_run,
        "delta_bytes": args.delta_bytes,
        "duration_seconds": args.duration.as_secs_f64(),
        "producer_connections": producers,
        "events_per_run": runs.events(),
        "events_sent": produced.sent,
        "events_unsent": produced.unsent,
        "events_in": events_in,
        "refusals": produced.refusals,
        "first_refusal": produced.first_refusal,
        "producer_lag_ms_max": produced.lag.as_secs_f64() * 1000.0,
        "produce_seconds": produced_in.as_secs_f64(),
        "events_in_per_second": (events_in as f64 / produced_in.as_secs_f64().max(1e-9)).round(),
        "deliveries_expected": events_in,
        "deliveries_received": received,
        "deliveries_per_second": (received as f64 / delivering).round(),
        "lost": lost,
        "latency_ms": latency.json(),
        "server_cpu_seconds": cpu,
        "server_cpu_us_per_event_in": per(events_in),
        "server_kernel_cpu_us_per_event_in": kernel.map(|kernel| super::us_per(kernel, events_in)),
        "server_cpu_us_per_delivery_out": per(received),
        "server_rss_before_bytes": before.rss_bytes,
        "server_rss_after_bytes": after.rss_bytes,
        "machine_steal_percent": steal,
        "ledger": ledger.json(),
    });
    eprintln!(
        "tokens ({}, {producer}): {} runs × {} events in {:.1} s; {events_in} events in ({:.0}/s), {received} deliveries out, {lost} lost, {} refused, {} unsent; producer lag max {:.1} ms; {}; server CPU {:.2} µs/event in, {:.2} µs/delivery out; RSS {:.1} -> {:.1} MiB; {}",
        args.events.as_str(),
        args.runs,
        runs.events(),
        produced_in.as_secs_f64(),
        events_in as f64 / produced_in.as_secs_f64().max(1e-9),
        produced.refusals,
        produced.unsent,
        produced.lag.as_secs_f64() * 1000.0,
        latency.summary(),
        per(events_in),
        per(received),
        before.rss_bytes / 1048576.0,
        after.rss_bytes / 1048576.0,
        ledger.summary(),
    );
    super::say_steal(steal);
    ensure!(
        produced.refusals == 0 && produced.unsent == 0,
        "{} answers refused events and {} events were not sent (first refusal: {})",
        produced.refusals,
        produced.unsent,
        produced.first_refusal.as_deref().unwrap_or("none")
    );
    ensure!(
        lost == 0,
        "{lost} accepted events did not reach their viewer in time"
    );
    ensure!(
        ledger.balanced && ledger.lost == 0,
        "the ledger reports lost events or does not balance"
    );
    Ok(result)
}

/// Sleeps until event `i` of run `k` is due; how late it already was.
async fn wait_for(runs: &Runs, started: Clock, k: usize, i: usize) -> Duration {
    let due = started + runs.due(k, i);
    tokio::time::sleep_until(due).await;
    Clock::now().saturating_duration_since(due)
}

/// One stream per run, its request head sent (the gateway is reading it) before the clock starts.
async fn open_streams(
    server: &Server,
    sources: &[IpAddr],
    runs: &Arc<Runs>,
) -> anyhow::Result<Vec<Upload>> {
    let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let mut opening = Vec::with_capacity(runs.count);
    for k in 0..runs.count {
        let (api, source, gate) = (
            server.api.clone(),
            sources[k % sources.len()],
            Arc::clone(&gate),
        );
        let path = runs.stream_path(k);
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            Upload::start(&api, source, &path, "application/x-ndjson").await
        }));
    }
    let mut streams = Vec::with_capacity(runs.count);
    for (k, task) in opening.into_iter().enumerate() {
        streams.push(task.await?.with_context(|| format!("stream of run {k}"))?);
    }
    Ok(streams)
}

/// `--producer stream`: each run writes its events to its own stream as they are due, then ends
/// the body; the gateway's summary says how many it accepted.
async fn stream(
    streams: Vec<Upload>,
    runs: &Arc<Runs>,
    started: Clock,
    deadline: Clock,
) -> anyhow::Result<Produced> {
    let mut tasks = Vec::with_capacity(streams.len());
    for (k, upload) in streams.into_iter().enumerate() {
        let runs = Arc::clone(runs);
        tasks.push(tokio::spawn(async move {
            let mut produced = Produced::default();
            for i in 0..runs.events() {
                let lag = wait_for(&runs, started, k, i).await;
                if Clock::now() >= deadline {
                    produced.unsent += (runs.events() - i) as u64;
                    break;
                }
                produced.lag = produced.lag.max(lag);
                let mut line = runs.event(k, i, false);
                line.push('\n');
                if upload.send(Bytes::from(line)).await.is_err() {
                    // The gateway answered early: the answer below says why.
                    produced.unsent += (runs.events() - i) as u64;
                    break;
                }
                produced.sent += 1;
            }
            let (status, summary) = tokio::time::timeout(SUMMARY_TIMEOUT, upload.finish())
                .await
                .with_context(|| {
                    format!("no summary of run {k}'s stream within {SUMMARY_TIMEOUT:?} of its end")
                })?
                .with_context(|| format!("stream of run {k}"))?;
            let accepted = summary["accepted"].as_u64().unwrap_or(0);
            produced.accepted.push((k, accepted));
            if status != 200 || accepted < produced.sent {
                produced.refused(format!("run {k}: {status} {summary}"));
            }
            anyhow::Ok(produced)
        }));
    }
    let mut all = Produced::default();
    for task in tasks {
        all.merge(task.await??);
    }
    Ok(all)
}

/// `--producer post`: connection c carries runs c, c + C, c + 2C, …, one event per request, each
/// when it is due (later if the previous answer was late).
async fn post(
    server: &Server,
    sources: &[IpAddr],
    runs: &Arc<Runs>,
    connections: usize,
    started: Clock,
    deadline: Clock,
) -> anyhow::Result<Produced> {
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let mut http = Http::open_from(&server.api, sources[c % sources.len()])
            .await
            .with_context(|| format!("producer connection {c}"))?;
        let runs = Arc::clone(runs);
        tasks.push(tokio::spawn(async move {
            let mut produced = Produced::default();
            let mine: Vec<usize> = (c..runs.count).step_by(connections).collect();
            let mut accepted = vec![0u64; mine.len()];
            'rounds: for i in 0..runs.events() {
                for (j, &k) in mine.iter().enumerate() {
                    let lag = wait_for(&runs, started, k, i).await;
                    if Clock::now() >= deadline {
                        produced.unsent += ((runs.events() - i) * mine.len() - j) as u64;
                        break 'rounds;
                    }
                    produced.lag = produced.lag.max(lag);
                    let (status, answer) = http
                        .request("POST", "/v1/events", Some(runs.event(k, i, true)))
                        .await?;
                    produced.sent += 1;
                    match answer["accepted"].as_u64() {
                        Some(n) if status == 200 && n == 1 => accepted[j] += 1,
                        _ => produced.refused(format!("run {k} event {i}: {status} {answer}")),
                    }
                }
            }
            produced.accepted = mine.into_iter().zip(accepted).collect();
            anyhow::Ok(produced)
        }));
    }
    let mut all = Produced::default();
    for (c, task) in tasks.into_iter().enumerate() {
        all.merge(
            task.await?
                .with_context(|| format!("producer connection {c}"))?,
        );
    }
    Ok(all)
}
