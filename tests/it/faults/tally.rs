//! One row per scenario: what was accepted, what each client should have shown, what it showed,
//! and every miss split into named (the client was told `recovered: false` after the event was
//! posted, so its reload covers it) and silent. A silent miss fails the scenario.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use super::workload::{Produced, Seen};

pub struct Row {
    pub scenario: &'static str,
    pub accepted: u64,
    pub expected: u64,
    pub seen: u64,
    pub missing_named: u64,
    pub silent: u64,
    /// The cluster ledger's lost events by reason, at the end.
    pub lost: String,
    pub duplicates_dropped: u64,
    /// Events two replicas both accepted (a retry delivered twice).
    pub accepted_twice: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub unannounced_epochs: u64,
    pub balanced: bool,
    pub recover: Duration,
    /// Every close the clients saw, by code (1006: no close frame).
    pub closes: BTreeMap<u16, u64>,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        produced: &[Produced],
        seen: &[Seen],
        ledger: &Value,
    ) -> Self {
        let mut row = Self {
            scenario,
            accepted: produced.iter().map(|p| p.events.len() as u64).sum(),
            expected: 0,
            seen: 0,
            missing_named: 0,
            silent: 0,
            lost: lost_by_reason(ledger),
            duplicates_dropped: seen.iter().map(|s| s.duplicates).sum(),
            accepted_twice: produced
                .iter()
                .flat_map(|p| &p.events)
                .filter(|e| e.accepted > 1)
                .count() as u64,
            out_of_order: seen.iter().map(|s| s.out_of_order).sum(),
            gaps: seen.iter().map(|s| s.gaps).sum(),
            unannounced_epochs: seen.iter().map(|s| s.unannounced_epochs).sum(),
            balanced: ledger["channels"]["balanced"] == true
                && ledger["channels"]["unbalanced"] == 0,
            recover: produced
                .iter()
                .map(|p| p.longest_outage)
                .chain(seen.iter().map(|s| s.longest_interruption))
                .max()
                .unwrap_or_default(),
            closes: BTreeMap::new(),
        };
        for (code, n) in seen.iter().flat_map(|s| &s.closes) {
            *row.closes.entry(*code).or_default() += n;
        }
        for client in seen {
            let Some(thread) = produced.iter().find(|p| p.thread == client.thread) else {
                continue;
            };
            for event in &thread.events {
                row.expected += 1;
                if client.events.contains(&event.n) {
                    row.seen += 1;
                } else if client.resets.iter().any(|&reset| reset >= event.first_try) {
                    row.missing_named += 1;
                } else {
                    row.silent += 1;
                }
            }
        }
        row
    }

    /// Prints the row (and appends it to `$FAULTS_REPORT`, which `scripts/faults` prints as one
    /// table), then fails on anything silent or wrong.
    pub fn check(&self) {
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            self.scenario,
            self.accepted,
            self.expected,
            self.seen,
            self.missing_named,
            self.lost,
            self.silent,
            self.duplicates_dropped,
            self.out_of_order + self.gaps + self.unannounced_epochs,
            self.accepted_twice,
            if self.balanced { "yes" } else { "NO" },
            self.recover.as_secs_f64(),
        );
        report(&line);
        assert!(self.accepted > 0, "nothing was accepted: {line}");
        assert_eq!(self.silent, 0, "silent misses: {line}");
        assert_eq!(
            (self.out_of_order, self.gaps, self.unannounced_epochs),
            (0, 0, 0),
            "order: {line}"
        );
        assert_eq!(self.accepted_twice, 0, "an event accepted twice: {line}");
        assert!(self.balanced, "the ledger does not balance: {line}");
    }
}

/// Prints a row of the table, and appends it to `$FAULTS_REPORT` when set.
pub fn report(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os("FAULTS_REPORT") {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("FAULTS_REPORT is writable");
        writeln!(file, "{line}").expect("FAULTS_REPORT is writable");
    }
}

fn lost_by_reason(ledger: &Value) -> String {
    let lost: Vec<String> = ledger["channels"]["lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if lost.is_empty() {
        "0".into()
    } else {
        lost.join(", ")
    }
}
