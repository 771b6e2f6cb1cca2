//! A stream's body split into events as it arrives: lines (NDJSON) or Server-Sent Events, each
//! held to its limit.

use super::{Format, Rules, RunStream};
use crate::protocol::event::{self, Refusal, RefusalCode};

/// One line of the body, numbered from 1.
pub(super) enum Line {
    Text(String, usize),
    /// Longer than the limit: skipped as it arrived.
    TooLong(usize, usize),
    NotUtf8(usize),
}

/// Splits chunks into lines (`\n`, a `\r` before it dropped), holding at most `max` bytes of one.
pub(super) struct Lines {
    max: usize,
    held: Vec<u8>,
    /// Bytes of the current line when it is longer than `max` (nothing of it is held).
    skipped: usize,
    number: usize,
}

impl Lines {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            held: Vec::new(),
            skipped: 0,
            number: 0,
        }
    }

    pub(super) fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Line>) {
        while !chunk.is_empty() {
            let (part, rest, ended) = match memchr::memchr(b'\n', chunk) {
                Some(at) => (&chunk[..at], &chunk[at + 1..], true),
                None => (chunk, &[][..], false),
            };
            if self.skipped > 0 || self.held.len() + part.len() > self.max {
                self.skipped += self.held.len() + part.len();
                self.held = Vec::new();
            } else {
                self.held.extend_from_slice(part);
            }
            if ended {
                self.line(out);
            }
            chunk = rest;
        }
    }

    pub(super) fn finish(&mut self, out: &mut Vec<Line>) {
        if self.skipped > 0 || !self.held.is_empty() {
            self.line(out);
        }
    }

    fn line(&mut self, out: &mut Vec<Line>) {
        self.number += 1;
        let held = std::mem::take(&mut self.held);
        let line = if self.skipped > 0 {
            Line::TooLong(self.skipped, self.number)
        } else {
            let mut held = held;
            if held.last() == Some(&b'\r') {
                held.pop();
            }
            match String::from_utf8(held) {
                Ok(text) => Line::Text(text, self.number),
                Err(_) => Line::NotUtf8(self.number),
            }
        };
        self.skipped = 0;
        out.push(line);
    }
}

/// The SSE event being read: its `data:` lines joined.
#[derive(Default)]
pub(super) struct SseEvent {
    data: String,
    /// The line its first `data:` was on.
    first: usize,
    /// Its data went over the limit (nothing more of it is held).
    too_large: Option<usize>,
}

impl SseEvent {
    fn data(&mut self, value: &str, line: usize, max: usize) {
        if self.data.is_empty() && self.too_large.is_none() {
            self.first = line;
        }
        let size = self.data.len() + value.len() + 1;
        if let Some(bytes) = &mut self.too_large {
            *bytes += value.len() + 1;
        } else if size > max {
            self.too_large = Some(size);
            self.data = String::new();
        } else {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(value);
        }
    }

    fn overflow(&mut self, bytes: usize, line: usize) {
        if self.data.is_empty() && self.too_large.is_none() {
            self.first = line;
        }
        let total = self.too_large.unwrap_or(self.data.len()) + bytes;
        self.too_large = Some(total);
        self.data = String::new();
    }

    pub(super) async fn dispatch<R: Rules>(&mut self, stream: &mut RunStream<'_, R>, max: usize) {
        let event = std::mem::take(self);
        match event.too_large {
            Some(bytes) => stream.refuse(event::too_large(bytes, max), event.first),
            None if event.data.is_empty() => {}
            None => stream.item(&event.data, event.first).await,
        }
    }
}

pub(super) async fn take<R: Rules>(
    stream: &mut RunStream<'_, R>,
    format: Format,
    sse: &mut SseEvent,
    line: Line,
    max: usize,
) {
    match (format, line) {
        (Format::Ndjson, Line::Text(text, number)) => {
            let text = text.trim();
            if !text.is_empty() {
                stream.item(text, number).await;
            }
        }
        (Format::Ndjson, Line::TooLong(bytes, number)) => {
            stream.refuse(event::too_large(bytes, max), number);
        }
        (_, Line::NotUtf8(number)) => stream.refuse(
            Refusal {
                code: RefusalCode::InvalidJson,
                field: None,
                reason: "the line is not UTF-8".into(),
            },
            number,
        ),
        // A line over the limit belongs to the event being read, which it makes too large.
        (Format::Sse, Line::TooLong(bytes, number)) => sse.overflow(bytes, number),
        (Format::Sse, Line::Text(text, number)) => {
            if text.is_empty() {
                return sse.dispatch(stream, max).await;
            }
            if text.starts_with(':') {
                return;
            }
            let (field, value) = text.split_once(':').unwrap_or((text.as_str(), ""));
            if field == "data" {
                sse.data(value.strip_prefix(' ').unwrap_or(value), number, max);
            }
        }
    }
}
