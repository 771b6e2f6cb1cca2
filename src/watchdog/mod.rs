//! The run watchdog: follows every run from `agent_started` to `agent_completed` / `agent_error`,
//! counts lifecycle violations, and declares a run stalled when it has been quiet for
//! `watchdog.run_idle_timeout`, so that its channel gets a gateway-made `agent_error` with
//! `payload.reason = "stalled"` instead of an endless spinner.
//!
//! State is sharded by run id (no global lock on the event path) and bounded: each shard holds at
//! most `max_runs / SHARDS` runs; a full shard evicts its least recently active run, ended runs
//! before open ones, in amortised O(1) (`lru.rs`), counted. What a run keeps is bounded too: ids
//! are at most `MAX_ID_LEN` bytes and its open tool calls are capped (`open_tools.rs`).
//! Ended runs are kept for `watchdog.retain` so `GET /v1/runs/{run_id}` can still show them.

mod lru;
mod open_tools;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::config::WatchdogConfig;
use crate::hashed::{Hashed, KeyHasher};
use crate::metrics::{Label, Metrics, count};
use crate::protocol::ChannelName;
use crate::protocol::agui::{self, Sequence};
use crate::protocol::event::{Event, EventType, Payload};
use crate::telemetry::Throttle;
use lru::{Lane, Lru};
use open_tools::OpenTools;
pub use open_tools::{MAX_OPEN_TOOLS, SHOWN_TOOL_IDS};

const SHARDS: usize = 16;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Events arrived but `agent_started` has not (yet).
    Unstarted,
    Running,
    Completed,
    Errored,
    Stalled,
}

impl RunState {
    fn is_open(self) -> bool {
        matches!(self, Self::Unstarted | Self::Running)
    }

    /// Where a run in this state stands in its shard's table: ended runs are evicted first.
    fn lane(self) -> Lane {
        if self.is_open() {
            Lane::EvictLast
        } else {
            Lane::EvictFirst
        }
    }
}

/// How a run ended, counted in `agentwire_runs_completed_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Error,
    Stalled,
}

impl Label for RunOutcome {
    const ALL: &'static [Self] = &[Self::Completed, Self::Error, Self::Stalled];

    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Error => "error",
            Self::Stalled => "stalled",
        }
    }
}

/// Lifecycle violations, counted in `agentwire_lifecycle_violations_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    ToolCompletedWithoutExecuting,
    EventBeforeStart,
    EventAfterEnd,
    EventAfterStall,
    EndedWithOpenTools,
    DuplicateStart,
}

impl crate::metrics::Label for Violation {
    const ALL: &'static [Self] = &[
        Self::ToolCompletedWithoutExecuting,
        Self::EventBeforeStart,
        Self::EventAfterEnd,
        Self::EventAfterStall,
        Self::EndedWithOpenTools,
        Self::DuplicateStart,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ToolCompletedWithoutExecuting => "tool_completed_without_executing",
            Self::EventBeforeStart => "event_before_start",
            Self::EventAfterEnd => "event_after_end",
            Self::EventAfterStall => "event_after_stall",
            Self::EndedWithOpenTools => "ended_with_open_tools",
            Self::DuplicateStart => "duplicate_start",
        }
    }
}

impl crate::metrics::Label for agui::OrderViolation {
    const ALL: &'static [Self] = agui::OrderViolation::ALL;

    fn as_str(self) -> &'static str {
        agui::OrderViolation::as_str(self)
    }
}

#[derive(Debug)]
struct Run {
    state: RunState,
    channel: ChannelName,
    thread_id: Option<String>,
    user_id: Option<String>,
    first_event: Instant,
    last_event: Instant,
    ended: Option<Instant>,
    open_tools: OpenTools,
    /// Events by type, at the type's place in [`EventType::ALL`]: every event adds one where
    /// the run already is, instead of looking its type's name up in a tree of its own.
    counts: [u64; EventType::ALL.len()],
    violations: BTreeMap<&'static str, u64>,
    /// AG-UI runs only: where the run stands in AG-UI's ordering rules, which then judge its
    /// order instead of the native ones.
    agui: Option<Box<Sequence>>,
}

/// A run as `GET /v1/runs/{run_id}` shows it.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub state: RunState,
    pub channel: String,
    pub thread_id: Option<String>,
    pub user_id: Option<String>,
    pub counts: BTreeMap<&'static str, u64>,
    /// How many tool calls are open.
    pub open_tools: usize,
    /// The ids of at most [`SHOWN_TOOL_IDS`] of them.
    pub open_tool_ids: Vec<String>,
    pub seconds_since_last_event: f64,
    pub duration_seconds: Option<f64>,
    pub violations: BTreeMap<&'static str, u64>,
}

/// A run the sweep found stalled: what its channel must be told.
#[derive(Debug)]
pub struct Stalled {
    pub run_id: String,
    pub channel: ChannelName,
    pub user_id: Option<String>,
    /// How many tool calls were open.
    pub open_tools: usize,
    /// The ids of at most [`SHOWN_TOOL_IDS`] of them.
    pub open_tool_ids: Vec<String>,
    pub idle: Duration,
}

impl Stalled {
    /// The gateway-made `agent_error` that ends the run for the UI. It carries how many tool calls
    /// were open and at most a few of their ids, dropped as needed so that the event fits
    /// `max_event_bytes` like any producer's event (an event larger than a subscriber's queue
    /// would close it with 4008 instead of telling it). Without ids it always fits
    /// `config::MIN_EVENT_BYTES`: its other fields are bounded by the id limit.
    pub fn event(&self, max_event_bytes: usize) -> Event {
        let mut shown = self.open_tool_ids.len();
        loop {
            let event = self.event_with(&self.open_tool_ids[..shown]);
            let fits = event.to_text().len() <= max_event_bytes;
            if fits || shown == 0 {
                return event;
            }
            shown -= 1;
        }
    }

    fn event_with(&self, open_tool_ids: &[String]) -> Event {
        let payload = json!({
            "reason": "stalled",
            "message": format!("no event from this run for {} s; the gateway ended it", self.idle.as_secs()),
            "idle_seconds": self.idle.as_secs_f64(),
            "open_tools": self.open_tools,
            "open_tool_ids": open_tool_ids,
            "source": "agentwire",
        });
        Event {
            kind: EventType::AgentError,
            run_id: Some(self.run_id.clone()),
            thread_id: None,
            user_id: self.user_id.clone(),
            event_id: None,
            ts: None,
            traceparent: None,
            payload: match payload {
                serde_json::Value::Object(map) => Payload::from_map(map),
                _ => Payload::default(),
            },
            producer: None,
        }
    }
}

/// The AG-UI event a native event was made from, if it was.
fn agui_event(event: &Event) -> Option<&serde_json::Map<String, serde_json::Value>> {
    event.payload.agui()
}

type Shard = Lru<Run>;

pub struct Watchdog {
    config: WatchdogConfig,
    shards: Box<[Mutex<Shard>]>,
    /// Hashes run ids and tool call ids, keyed: a producer cannot aim its runs at one shard, nor
    /// make two tool call ids collide.
    keys: KeyHasher,
}

impl Watchdog {
    pub fn new(config: WatchdogConfig) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Lru::default())).collect();
        Self {
            config,
            shards,
            keys: KeyHasher::default(),
        }
    }

    /// The shard of a run, locked, and the run id hashed once for the shard and its table.
    fn shard<'a>(&'a self, run_id: &'a str) -> (MutexGuard<'a, Shard>, Hashed<'a>) {
        let key = self.keys.hash(run_id);
        let shard = self.shards[key.shard(SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (shard, key)
    }

    /// Follows one emitted event of a run.
    pub fn observe(&self, event: &Event, channel: &ChannelName, metrics: &Metrics) {
        let Some(run_id) = event.run_id.as_deref() else {
            return;
        };
        let now = Instant::now();
        let (mut shard, key) = self.shard(run_id);
        if event.kind == EventType::Custom && agui_event(event).is_none() {
            // Custom events keep a run alive but are not part of its lifecycle.
            shard.update(key, |run| {
                run.last_event = now;
                run.counts[event.kind as usize] += 1;
                ((), run.state.lane())
            });
            return;
        }
        let follow = |run: &mut Run| {
            self.follow(run, run_id, event, now, metrics);
            ((), run.state.lane())
        };
        if shard.update(key, follow).is_none() {
            self.make_room(&mut shard, metrics);
            metrics.runs_active.inc();
            let state = if event.kind == EventType::AgentStarted {
                metrics.runs_started.inc();
                RunState::Running
            } else {
                RunState::Unstarted
            };
            let mut run = Run {
                state,
                channel: channel.clone(),
                thread_id: event.thread_id.clone(),
                user_id: event.user_id.clone(),
                first_event: now,
                last_event: now,
                ended: None,
                open_tools: OpenTools::default(),
                counts: [0; EventType::ALL.len()],
                violations: BTreeMap::new(),
                agui: None,
            };
            if event.kind == EventType::AgentStarted && agui_event(event).is_none() {
                run.counts[event.kind as usize] += 1;
                shard.insert(key, run, state.lane());
                return;
            }
            shard.insert(key, run, state.lane());
            shard.update(key, follow);
        }
    }

    /// One lifecycle event of a followed run.
    fn follow(&self, run: &mut Run, run_id: &str, event: &Event, now: Instant, metrics: &Metrics) {
        run.last_event = now;
        run.counts[event.kind as usize] += 1;
        if run.thread_id.is_none() {
            run.thread_id = event.thread_id.clone();
        }
        if run.user_id.is_none() {
            run.user_id = event.user_id.clone();
        }
        let agui = agui_event(event);
        let violation = |run: &mut Run, kind: &'static str| {
            *run.violations.entry(kind).or_default() += 1;
            metrics
                .lifecycle_violations
                .with_label_values(&[kind])
                .inc();
            tracing::debug!(run_id, channel = %run.channel, kind, "Lifecycle violation.");
        };
        if let Some(fields) = agui {
            // AG-UI's rules judge an AG-UI run; its native lifecycle is still followed below.
            let sequence = run.agui.get_or_insert_with(Box::default);
            if let Err(kind) = sequence.apply_fields(fields) {
                violation(run, kind.as_str());
            }
        }
        let violation = |run: &mut Run, kind: Violation| {
            if run.agui.is_none() {
                violation(run, kind.as_str());
            }
        };
        match run.state {
            RunState::Stalled => return violation(run, Violation::EventAfterStall),
            RunState::Completed | RunState::Errored => {
                let kind = if event.kind == EventType::AgentStarted {
                    Violation::DuplicateStart
                } else {
                    Violation::EventAfterEnd
                };
                return violation(run, kind);
            }
            RunState::Unstarted | RunState::Running => {}
        }
        match event.kind {
            EventType::AgentStarted if run.state == RunState::Unstarted => {
                run.state = RunState::Running;
                metrics.runs_started.inc();
            }
            EventType::AgentStarted => violation(run, Violation::DuplicateStart),
            _ if run.state == RunState::Unstarted && run.counts.iter().sum::<u64>() == 1 => {
                violation(run, Violation::EventBeforeStart)
            }
            _ => {}
        }
        // Validated at ingest: a tool event's `tool_call_id` is an id (at most `MAX_ID_LEN` bytes).
        let tool_call_id = event.payload.tool_call_id().unwrap_or_default();
        match event.kind {
            EventType::ToolExecuting => {
                // Past the cap the call is not followed; its completion will count as a violation.
                run.open_tools.open(tool_call_id, &self.keys);
            }
            EventType::ToolCompleted => {
                let was_open = run.open_tools.close(tool_call_id, &self.keys);
                if !was_open {
                    violation(run, Violation::ToolCompletedWithoutExecuting);
                }
            }
            EventType::AgentCompleted | EventType::AgentError => {
                if !run.open_tools.is_empty() {
                    violation(run, Violation::EndedWithOpenTools);
                }
                let (state, outcome) = if event.kind == EventType::AgentCompleted {
                    (RunState::Completed, RunOutcome::Completed)
                } else {
                    (RunState::Errored, RunOutcome::Error)
                };
                end(run, state, outcome, now, metrics);
            }
            _ => {}
        }
    }

    /// Whether an AG-UI event (its fields) keeps AG-UI's ordering rules where its run stands, without
    /// following it (`agui.strict` asks before publishing). A run not followed yet starts idle.
    pub fn agui_order(
        &self,
        run_id: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), agui::OrderViolation> {
        let (shard, key) = self.shard(run_id);
        let mut sequence = shard
            .get(key)
            .and_then(|run| run.agui.as_deref().cloned())
            .unwrap_or_default();
        sequence.apply_fields(fields)
    }

    /// Evicts the least recently active runs of a full shard (ended ones first), in amortised O(1) each.
    fn make_room(&self, shard: &mut Shard, metrics: &Metrics) {
        let per_shard = self.config.max_runs.div_ceil(SHARDS).max(1);
        while shard.len() >= per_shard {
            let Some((run_id, run)) = shard.pop_oldest() else {
                return;
            };
            if run.state.is_open() {
                metrics.runs_active.dec();
            }
            metrics.runs_evicted.inc();
            static FULL: Throttle = Throttle::every(Duration::from_secs(10));
            if let Some(held_back) = FULL.allow() {
                tracing::warn!(%run_id, state = ?run.state, held_back, "Watchdog is full: stopped following a run (watchdog.max_runs); held_back more since the last line.");
            }
        }
    }

    /// Forgets ended runs past `retain` and returns the open runs quiet for longer than
    /// `run_idle_timeout`: candidates for [`Self::stall`] (in Redis mode, once the run's shared
    /// activity confirmed that no replica saw it either).
    pub fn sweep(&self) -> Vec<String> {
        let now = Instant::now();
        let mut quiet = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, run| {
                run.ended
                    .is_none_or(|ended| now.saturating_duration_since(ended) <= self.config.retain)
            });
            quiet.extend(
                shard
                    .iter()
                    .filter(|(_, run)| {
                        run.state.is_open()
                            && now.saturating_duration_since(run.last_event)
                                > self.config.run_idle_timeout
                    })
                    .map(|(run_id, _)| run_id.to_string()),
            );
        }
        quiet
    }

    /// Ends a quiet run as stalled; `None` if it is no longer open and quiet.
    pub fn stall(&self, run_id: &str, metrics: &Metrics) -> Option<Stalled> {
        let now = Instant::now();
        let (mut shard, key) = self.shard(run_id);
        let run = shard.get_mut(key)?;
        let idle = now.saturating_duration_since(run.last_event);
        if !run.state.is_open() || idle <= self.config.run_idle_timeout {
            return None;
        }
        // Many runs can stall at once (a backend restart, or a producer starting runs it never
        // ends): one line per interval, the rest counted in it and in the metrics.
        tracing::debug!(%run_id, channel = %run.channel, thread_id = run.thread_id.as_deref(), idle_seconds = idle.as_secs_f64(), open_tools = run.open_tools.len(), "Run stalled.");
        static STALLED: Throttle = Throttle::every(Duration::from_secs(10));
        if let Some(held_back) = STALLED.allow() {
            tracing::warn!(%run_id, channel = %run.channel, thread_id = run.thread_id.as_deref(), idle_seconds = idle.as_secs_f64(), open_tools = run.open_tools.len(), held_back, "Run stalled; held_back more runs stalled since the last line.");
        }
        metrics.runs_stalled.inc();
        end(run, RunState::Stalled, RunOutcome::Stalled, now, metrics);
        let stalled = Stalled {
            run_id: run_id.to_string(),
            channel: run.channel.clone(),
            user_id: run.user_id.clone(),
            open_tools: run.open_tools.len(),
            open_tool_ids: run.open_tools.shown(),
            idle,
        };
        shard.touch(key, RunState::Stalled.lane());
        Some(stalled)
    }

    /// Redis mode: another replica saw an event of this run `ago`: it is not quiet.
    pub fn seen_elsewhere(&self, run_id: &str, ago: Duration) {
        let (mut shard, key) = self.shard(run_id);
        if let Some(run) = shard.get_mut(key) {
            let at = Instant::now().checked_sub(ago).unwrap_or(run.last_event);
            run.last_event = run.last_event.max(at);
            let lane = run.state.lane();
            shard.touch(key, lane);
        }
    }

    /// Redis mode: the run ended through another replica, which counted its end; stop following it.
    pub fn ended_elsewhere(&self, run_id: &str, metrics: &Metrics) {
        let (mut shard, key) = self.shard(run_id);
        if let Some(run) = shard.remove(key)
            && run.state.is_open()
        {
            metrics.runs_active.dec();
        }
    }

    pub fn report(&self, run_id: &str) -> Option<RunReport> {
        let (shard, key) = self.shard(run_id);
        let run = shard.get(key)?;
        let now = Instant::now();
        Some(RunReport {
            run_id: run_id.to_string(),
            state: run.state,
            channel: run.channel.to_string(),
            thread_id: run.thread_id.clone(),
            user_id: run.user_id.clone(),
            counts: (EventType::ALL.into_iter())
                .filter(|&kind| run.counts[kind as usize] > 0)
                .map(|kind| (kind.as_str(), run.counts[kind as usize]))
                .collect(),
            open_tools: run.open_tools.len(),
            open_tool_ids: run.open_tools.shown(),
            seconds_since_last_event: now.saturating_duration_since(run.last_event).as_secs_f64(),
            duration_seconds: run.ended.map(|ended| {
                ended
                    .saturating_duration_since(run.first_event)
                    .as_secs_f64()
            }),
            violations: run.violations.clone(),
        })
    }
}

/// The most runs `GET /v1/runs` lists.
pub const MAX_LISTED: usize = 100;

/// Every followed run counted by state, and the most recently active ones (`GET /v1/runs`).
#[derive(Debug, Serialize)]
pub struct RunList {
    /// How many followed runs are in each state (every state named, 0 included).
    pub counts: BTreeMap<&'static str, u64>,
    /// How many runs the watchdog follows (bounded by `watchdog.max_runs`).
    pub followed: u64,
    /// At most the asked number (and [`MAX_LISTED`]), most recently active first.
    pub runs: Vec<RunReport>,
}

impl RunState {
    const ALL: [Self; 5] = [
        Self::Unstarted,
        Self::Running,
        Self::Completed,
        Self::Errored,
        Self::Stalled,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Unstarted => "unstarted",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Errored => "errored",
            Self::Stalled => "stalled",
        }
    }
}

impl Watchdog {
    /// Counts every followed run by state and reports the `limit` most recently active (at most
    /// [`MAX_LISTED`]). One pass over the runs, one shard locked at a time; what it keeps while
    /// passing is bounded by `limit` (a min-heap of the most recent), so its cost is the walk, not
    /// memory.
    pub fn list(&self, limit: usize) -> RunList {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let limit = limit.min(MAX_LISTED);
        let mut counts: BTreeMap<&'static str, u64> =
            RunState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut followed = 0;
        let mut recent: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (run_id, run) in shard.iter() {
                followed += 1;
                *counts.entry(run.state.as_str()).or_default() += 1;
                let newer = recent
                    .peek()
                    .is_none_or(|Reverse((oldest, _))| run.last_event > *oldest);
                if limit > 0 && (recent.len() < limit || newer) {
                    recent.push(Reverse((run.last_event, run_id.to_string())));
                    if recent.len() > limit {
                        recent.pop();
                    }
                }
            }
        }
        // Newest first; a run forgotten between the pass and its report is left out.
        let runs = recent
            .into_sorted_vec()
            .into_iter()
            .filter_map(|Reverse((_, run_id))| self.report(&run_id))
            .collect();
        RunList {
            counts,
            followed,
            runs,
        }
    }
}

fn end(run: &mut Run, state: RunState, outcome: RunOutcome, now: Instant, metrics: &Metrics) {
    run.state = state;
    run.ended = Some(now);
    metrics.runs_active.dec();
    count(&metrics.runs_completed, outcome);
    metrics
        .run_duration
        .observe(now.saturating_duration_since(run.first_event).as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::channel::MAX_ID_LEN;
    use crate::protocol::event;

    fn run_event(kind: &str, run: &str) -> Event {
        event::parse(
            &format!(r#"{{"type":"{kind}","run_id":"{run}","thread_id":"t"}}"#),
            1024,
        )
        .unwrap()
    }

    fn watchdog(max_runs: usize, retain: Duration) -> Watchdog {
        Watchdog::new(WatchdogConfig {
            run_idle_timeout: Duration::from_secs(60),
            stalled_event: true,
            max_runs,
            retain,
        })
    }

    #[test]
    fn a_full_watchdog_evicts_the_least_recently_active_and_counts_it() {
        let metrics = Metrics::new();
        let dog = watchdog(SHARDS, Duration::from_secs(60));
        let channel = ChannelName::thread("t");
        for n in 0..100 {
            dog.observe(
                &run_event("agent_started", &format!("run_{n}")),
                &channel,
                &metrics,
            );
        }
        let followed = (0..100)
            .filter(|n| dog.report(&format!("run_{n}")).is_some())
            .count();
        assert!(followed <= SHARDS, "bounded by max_runs: {followed}");
        assert_eq!(metrics.runs_evicted.get() as usize, 100 - followed);
        assert_eq!(metrics.runs_active.get() as usize, followed);
        assert!(dog.report("run_99").is_some(), "the newest run is kept");
    }

    #[test]
    fn a_full_shard_evicts_ended_runs_before_open_ones() {
        let metrics = Metrics::new();
        let dog = watchdog(SHARDS * 10, Duration::from_secs(60));
        let channel = ChannelName::thread("t");
        for n in 0..80 {
            let run = format!("done_{n}");
            dog.observe(&run_event("agent_started", &run), &channel, &metrics);
            dog.observe(&run_event("agent_completed", &run), &channel, &metrics);
        }
        let open: Vec<String> = (0..120).map(|n| format!("open_{n}")).collect();
        for run in &open {
            dog.observe(&run_event("agent_started", run), &channel, &metrics);
        }
        assert!(metrics.runs_evicted.get() > 0, "the shards filled up");
        let shard_of = |run: &str| dog.keys.hash(run).shard(SHARDS);
        for shard in 0..SHARDS {
            let ended_left = (0..80)
                .map(|n| format!("done_{n}"))
                .any(|run| shard_of(&run) == shard && dog.report(&run).is_some());
            let open_evicted = open
                .iter()
                .any(|run| shard_of(run) == shard && dog.report(run).is_none());
            assert!(
                !(ended_left && open_evicted),
                "shard {shard} evicted an open run while an ended one was left"
            );
        }
        assert!(dog.report("open_119").is_some(), "the newest run is kept");
    }

    #[test]
    fn an_evicted_run_is_never_reported_stalled() {
        let metrics = Metrics::new();
        let dog = Watchdog::new(WatchdogConfig {
            run_idle_timeout: Duration::from_millis(1),
            stalled_event: true,
            max_runs: SHARDS,
            retain: Duration::from_secs(60),
        });
        let channel = ChannelName::thread("t");
        for n in 0..200 {
            dog.observe(
                &run_event("agent_started", &format!("run_{n}")),
                &channel,
                &metrics,
            );
        }
        let evicted: Vec<String> = (0..200)
            .map(|n| format!("run_{n}"))
            .filter(|run| dog.report(run).is_none())
            .collect();
        assert_eq!(evicted.len() as u64, metrics.runs_evicted.get());
        std::thread::sleep(Duration::from_millis(5));
        let quiet = dog.sweep();
        assert!(quiet.len() <= SHARDS);
        for run in &evicted {
            assert!(!quiet.contains(run), "{run} was evicted");
            assert!(dog.stall(run, &metrics).is_none(), "{run} was evicted");
        }
        let stalled = quiet
            .iter()
            .filter_map(|run| dog.stall(run, &metrics))
            .count();
        assert_eq!(stalled, quiet.len());
        assert_eq!(metrics.runs_stalled.get() as usize, stalled);
        assert_eq!(metrics.runs_active.get(), 0);
    }

    #[test]
    fn open_tools_are_capped_and_the_stall_notice_fits_the_smallest_event() {
        let metrics = Metrics::new();
        let dog = Watchdog::new(WatchdogConfig {
            run_idle_timeout: Duration::from_millis(1),
            stalled_event: true,
            max_runs: 100,
            retain: Duration::from_secs(60),
        });
        // The longest ids, made of a character JSON escapes to two bytes.
        let longest = |n: usize| format!("{n:03}{}", "\\".repeat(MAX_ID_LEN - 3));
        let run_id = longest(0);
        let channel = ChannelName::thread("t");
        let observe = |event: serde_json::Value| {
            let event = event::parse(&event.to_string(), 4096).unwrap();
            dog.observe(&event, &channel, &metrics);
        };
        observe(serde_json::json!({
            "type": "agent_started", "run_id": run_id, "thread_id": "t", "user_id": longest(1)
        }));
        for n in 0..MAX_OPEN_TOOLS + 10 {
            observe(serde_json::json!({
                "type": "tool_executing", "run_id": run_id, "payload": {"tool_call_id": longest(n)}
            }));
        }
        let report = dog.report(&run_id).unwrap();
        assert_eq!(report.open_tools, MAX_OPEN_TOOLS);
        assert_eq!(report.open_tool_ids.len(), SHOWN_TOOL_IDS);

        std::thread::sleep(Duration::from_millis(5));
        let stalled = dog.stall(&run_id, &metrics).unwrap();
        assert_eq!(stalled.open_tools, MAX_OPEN_TOOLS);
        let size = |event: &Event| event.to_text().len();
        let roomy = stalled.event(64 * 1024);
        assert_eq!(
            roomy.payload.value()["open_tool_ids"]
                .as_array()
                .unwrap()
                .len(),
            SHOWN_TOOL_IDS
        );
        let tight = stalled.event(crate::config::MIN_EVENT_BYTES);
        assert!(
            size(&tight) <= crate::config::MIN_EVENT_BYTES,
            "{}",
            size(&tight)
        );
        assert_eq!(tight.payload.value()["open_tools"], MAX_OPEN_TOOLS);
        assert_eq!(tight.payload.value()["reason"], "stalled");
        let none = stalled.event(0);
        assert_eq!(none.payload.value()["open_tool_ids"], serde_json::json!([]));
        assert!(
            size(&none) <= crate::config::MIN_EVENT_BYTES,
            "without ids it fits the smallest limit: {}",
            size(&none)
        );
    }

    #[test]
    fn ended_runs_are_forgotten_after_retain() {
        let metrics = Metrics::new();
        let dog = watchdog(100, Duration::ZERO);
        let channel = ChannelName::thread("t");
        dog.observe(&run_event("agent_started", "run_a"), &channel, &metrics);
        dog.observe(&run_event("agent_completed", "run_a"), &channel, &metrics);
        dog.observe(&run_event("agent_started", "run_b"), &channel, &metrics);
        assert_eq!(
            dog.report("run_a").map(|r| r.state),
            Some(RunState::Completed)
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(dog.sweep().is_empty());
        assert!(dog.report("run_a").is_none(), "ended and past retain");
        assert_eq!(
            dog.report("run_b").map(|r| r.state),
            Some(RunState::Running),
            "open runs stay"
        );
    }
}
