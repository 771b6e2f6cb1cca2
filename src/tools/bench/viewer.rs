//! What the scenarios that deliver share on the viewers' side: opening a subscribed WebSocket,
//! reading event frames (native or AG-UI) with publish → receive latency from the send time each
//! event carries, acking as a client does, and the ledger of the channels a run used.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::ensure;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::now_us;
use crate::tools::client::{Http, Socket, Target, expect_type, next_text, send};

/// Publish → receive latency in microseconds, up to two minutes.
pub(super) struct Latency(Histogram<u64>);

impl Latency {
    pub(super) fn new() -> anyhow::Result<Self> {
        Ok(Self(Histogram::new_with_bounds(1, 120_000_000, 3)?))
    }

    fn record(&mut self, sent_us: u64, now_us: u64) {
        self.0
            .saturating_record(now_us.saturating_sub(sent_us).max(1));
    }

    pub(super) fn add(&mut self, other: &Self) -> anyhow::Result<()> {
        Ok(self.0.add(&other.0)?)
    }

    /// The quantile `q` in milliseconds.
    pub(super) fn ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub(super) fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// What the JSON line reports: p50, p90, p99, p99.9 and max, in milliseconds.
    pub(super) fn json(&self) -> Value {
        json!({"p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99), "p99_9": self.ms(0.999), "max": self.max_ms()})
    }

    /// The same for the human summary.
    pub(super) fn summary(&self) -> String {
        format!(
            "latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.max_ms()
        )
    }
}

/// A WebSocket from `source` with its `hello` answered and `thread_id` subscribed (live from now).
pub(super) async fn open(
    target: &Target,
    source: IpAddr,
    hello: &Value,
    thread_id: &str,
) -> anyhow::Result<Socket> {
    let mut ws = target.websocket(target.connect_from(source).await?).await?;
    send(&mut ws, hello).await?;
    expect_type(&mut ws, "welcome").await?;
    expect_type(&mut ws, "subscribed").await?;
    send(
        &mut ws,
        &json!({"type": "subscribe", "thread_id": thread_id}),
    )
    .await?;
    expect_type(&mut ws, "subscribed").await?;
    Ok(ws)
}

/// When a viewer has read everything it waits for.
#[derive(Clone, Copy)]
pub(super) enum Until {
    /// This many events.
    Count(u64),
    /// An event frame that holds these bytes (the run's last event), counted with the rest.
    Holds(&'static [u8]),
}

/// Acks sent at most this often: often enough that the ledger's `acked` follows, rarely enough
/// that a thousand viewers cost the gateway little beside the events themselves.
const ACK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Received {
    pub(super) count: u64,
    pub(super) latency: Latency,
    pub(super) last: Option<Instant>,
}

/// Reads event frames (native `{"seq":…}` or AG-UI `{"type":"agui",…}`) until `until` or the
/// deadline. With `ack`, the thread whose events these are, it acks the last seq at most once per
/// [`ACK_EVERY`] and once at the end, as a client that shows what it receives does.
pub(super) async fn receive(
    mut ws: Socket,
    until: Until,
    deadline: Instant,
    ack: Option<String>,
) -> anyhow::Result<Received> {
    let mut received = Received {
        count: 0,
        latency: Latency::new()?,
        last: None,
    };
    let (mut last_seq, mut acked_seq, mut acked_at) = (0u64, 0u64, Instant::now());
    loop {
        if let Until::Count(expected) = until
            && received.count >= expected
        {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(frame) = tokio::time::timeout(remaining, next_text(&mut ws)).await else {
            break;
        };
        let frame = frame?;
        if !is_event(&frame) {
            continue;
        }
        let now = now_us();
        if let Some(sent_us) = number_after(&frame, b"\"sent_us\":") {
            received.latency.record(sent_us, now);
        }
        received.count += 1;
        received.last = Some(Instant::now());
        last_seq = number_after(&frame, b"\"seq\":").unwrap_or(last_seq);
        let last = matches!(until, Until::Holds(marker) if contains(&frame, marker));
        if let Some(thread_id) = &ack
            && last_seq > acked_seq
            && (last || acked_at.elapsed() >= ACK_EVERY)
        {
            send(
                &mut ws,
                &json!({"type": "ack", "thread_id": thread_id, "seq": last_seq}),
            )
            .await?;
            (acked_seq, acked_at) = (last_seq, Instant::now());
        }
        if last {
            break;
        }
    }
    Ok(received)
}

/// An event of the channel: a native event frame, an AG-UI one that is not a prelude (which
/// stands for a position, not an event), or the floor's copy of an event as it was posted.
fn is_event(frame: &[u8]) -> bool {
    frame.starts_with(b"{\"seq\":")
        || frame.starts_with(b"{\"type\":\"agent_thinking\"")
        || (frame.starts_with(b"{\"type\":\"agui\"") && !contains(frame, b"\"prelude\":true"))
}

fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|w| w == needle)
}

/// The unsigned number right after the first `key` in `frame`.
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = frame.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The ledgers of `threads` summed: emitted, delivered, pending, lost, and whether every one
/// balances. One kept-alive connection for all of them.
pub(super) struct Ledger {
    pub(super) emitted: u64,
    pub(super) delivered: u64,
    pub(super) pending: u64,
    pub(super) lost: u64,
    pub(super) balanced: bool,
}

impl Ledger {
    pub(super) async fn of(
        api: &Target,
        threads: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<Self> {
        let mut http = Http::open(api).await?;
        let mut sum = Self {
            emitted: 0,
            delivered: 0,
            pending: 0,
            lost: 0,
            balanced: true,
        };
        for thread in threads {
            let path = format!("/v1/channels/thread:{thread}");
            let (status, ledger) = http.request("GET", &path, None).await?;
            ensure!(status == 200, "GET {path} answered {status}");
            sum.emitted += ledger["emitted"].as_u64().unwrap_or(0);
            sum.delivered += ledger["delivered"].as_u64().unwrap_or(0);
            sum.pending += ledger["pending"].as_u64().unwrap_or(0);
            sum.lost += ledger["lost_total"].as_u64().unwrap_or(0);
            sum.balanced &= ledger["balanced"] == true;
        }
        Ok(sum)
    }

    pub(super) fn json(&self) -> Value {
        json!({"emitted": self.emitted, "delivered": self.delivered, "pending": self.pending, "lost": self.lost, "balanced": self.balanced})
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "ledger emitted {} delivered {} pending {} lost {}{}",
            self.emitted,
            self.delivered,
            self.pending,
            self.lost,
            if self.balanced { "" } else { " UNBALANCED" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cursor_and_send_time_of_both_kinds_of_frame() {
        let native =
            br#"{"seq":42,"type":"agent_thinking","payload":{"sent_us":1700000000000001}}"#;
        let agui = br#"{"type":"agui","channel":"thread:t","epoch":"e","seq":7,"events":[{"type":"TEXT_MESSAGE_CONTENT","messageId":"m","delta":"abcdefgh","rawEvent":{"sent_us":1700000000000002}}]}"#;
        let prelude = br#"{"type":"agui","prelude":true,"channel":"thread:t","epoch":"e","seq":7,"events":[]}"#;
        assert!(is_event(native) && is_event(agui) && !is_event(prelude));
        assert!(!is_event(br#"{"type":"subscribed","seq":3}"#));
        assert_eq!(number_after(native, b"\"seq\":"), Some(42));
        assert_eq!(number_after(agui, b"\"seq\":"), Some(7));
        assert_eq!(
            number_after(agui, b"\"sent_us\":"),
            Some(1_700_000_000_000_002)
        );
        assert_eq!(number_after(b"{}", b"\"seq\":"), None);
    }
}
