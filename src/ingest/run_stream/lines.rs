//! A stream's body split into events as it arrives: lines (NDJSON) or Server-Sent Events, each
//! held to its limit.

use super::{Format, Rules, RunStream};
use crate::protocol::event::{self, Refusal, RefusalCode};

/// One line of the body, numbered from 1.
pub(super) enum Line<'a> {
    Text(&'a str, usize),
    /// Longer than the limit: skipped as it arrived.
    TooLong(usize, usize),
    NotUtf8(usize),
}

/// Splits chunks into lines (`\n`, a `\r` before it dropped), holding at most `max` bytes of one.
/// A line that arrives whole in one chunk (a token stream's usual line) is read where it is; only
/// a line split over chunks is copied, into a buffer kept from line to line.
pub(super) struct Lines {
    max: usize,
    held: Vec<u8>,
    /// `held` is a line already handed out: emptied before the next is gathered.
    handed_out: bool,
    /// Bytes of the current line when it is longer than `max` (nothing of it is held).
    skipped: usize,
    number: usize,
}

impl Lines {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            held: Vec::new(),
            handed_out: false,
            skipped: 0,
            number: 0,
        }
    }

    /// The next line that `chunk` ends, taken off its front; `None` when the chunk has no more
    /// line ends (what is left of it is held for the next chunk).
    pub(super) fn next<'s, 'c: 's>(&'s mut self, chunk: &mut &'c [u8]) -> Option<Line<'s>> {
        if std::mem::take(&mut self.handed_out) {
            self.held.clear();
        }
        while !chunk.is_empty() {
            let (part, rest, ended) = match memchr::memchr(b'\n', chunk) {
                Some(at) => (&chunk[..at], &chunk[at + 1..], true),
                None => (*chunk, &[][..], false),
            };
            *chunk = rest;
            if self.skipped > 0 || self.held.len() + part.len() > self.max {
                self.skipped += self.held.len() + part.len();
                self.held = Vec::new();
            } else if ended && self.held.is_empty() {
                self.number += 1;
                return Some(text(part, self.number));
            } else {
                self.held.extend_from_slice(part);
            }
            if ended {
                return Some(self.line());
            }
        }
        None
    }

    /// The last line, when the body did not end with a line end.
    pub(super) fn finish(&mut self) -> Option<Line<'_>> {
        if std::mem::take(&mut self.handed_out) {
            self.held.clear();
        }
        (self.skipped > 0 || !self.held.is_empty()).then(|| self.line())
    }

    fn line(&mut self) -> Line<'_> {
        self.number += 1;
        if self.skipped > 0 {
            let bytes = std::mem::take(&mut self.skipped);
            return Line::TooLong(bytes, self.number);
        }
        self.handed_out = true;
        text(&self.held, self.number)
    }
}

/// Line `number`, its `\r` dropped.
fn text(line: &[u8], number: usize) -> Line<'_> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match std::str::from_utf8(line) {
        Ok(text) => Line::Text(text, number),
        Err(_) => Line::NotUtf8(number),
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
    line: Line<'_>,
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
            let (field, value) = text.split_once(':').unwrap_or((text, ""));
            if field == "data" {
                sse.data(value.strip_prefix(' ').unwrap_or(value), number, max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line the chunks end, then the last; as (text or what was wrong, number).
    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, usize)> {
        let mut lines = Lines::new(max);
        let mut out = Vec::new();
        let mut note = |line: Line<'_>| match line {
            Line::Text(text, n) => out.push((text.to_string(), n)),
            Line::TooLong(bytes, n) => out.push((format!("too long: {bytes}"), n)),
            Line::NotUtf8(n) => out.push(("not UTF-8".into(), n)),
        };
        for chunk in chunks {
            let mut rest = *chunk;
            while let Some(line) = lines.next(&mut rest) {
                note(line);
            }
        }
        if let Some(line) = lines.finish() {
            note(line);
        }
        out
    }

    #[test]
    fn lines_whole_or_split_over_chunks_come_out_the_same() {
        let whole = split(16, &[b"{\"a\":1}\n{\"b\":2}\r\n", b"{\"c\":3}"]);
        let pieces = split(16, &[b"{\"a\"", b":1}\n{", b"\"b\":2}\r", b"\n{\"c\":3}"]);
        let expected = [("{\"a\":1}", 1), ("{\"b\":2}", 2), ("{\"c\":3}", 3)];
        let expected: Vec<_> = expected.iter().map(|(t, n)| (t.to_string(), *n)).collect();
        assert_eq!(whole, expected);
        assert_eq!(pieces, expected);
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_and_the_next_is_read() {
        let out = split(8, &[b"0123456", b"789abc\nok\n\xff\xfe\n"]);
        assert_eq!(
            out,
            [
                ("too long: 13".to_string(), 1),
                ("ok".into(), 2),
                ("not UTF-8".into(), 3)
            ]
        );
    }
}
