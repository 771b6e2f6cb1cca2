//! An event's text read in one pass over its bytes: the gateway's fields, the payload's text and
//! what the gateway reads of the payload, every other value only checked. It takes exactly the
//! events serde_json's reader ([`super::read`]) takes, with the same fields (a property test holds
//! it to that), and refuses nothing itself: whatever it does not take is read again by serde_json,
//! whose error names what is wrong. An event is otherwise read twice over its payload (once to
//! find its end, once to check it) through serde's generic machinery.

use std::borrow::Cow;

use super::read::{Fields, Scanned, Text};
use crate::protocol::agui::PAYLOAD_KEY;
use crate::protocol::json::{Keys, plain_len};

/// Deeper than this, serde_json decides (it refuses past 128).
const MAX_DEPTH: usize = 64;

/// The fields of an event whose text is a JSON object with no key twice anywhere and a payload
/// that is an object, `null` or absent, its payload scanned; `None` for anything else.
pub(super) fn fields(text: &str) -> Option<Fields<'_>> {
    let mut scan = Scanner { text, at: 0 };
    let mut fields = Fields::default();
    let mut scanned = None;
    scan.space();
    scan.object(0, |scan, key| {
        let text = match key.as_ref() {
            "type" => &mut fields.kind,
            "run_id" => &mut fields.own.run_id,
            "thread_id" => &mut fields.own.thread_id,
            "user_id" => &mut fields.own.user_id,
            "event_id" => &mut fields.own.event_id,
            "ts" => &mut fields.own.ts,
            "traceparent" => &mut fields.own.traceparent,
            "payload" => {
                let start = scan.at;
                scanned = match scan.peek()? {
                    b'n' => {
                        scan.literal("null")?;
                        None
                    }
                    b'{' => Some(scan.payload()?),
                    _ => return None,
                };
                fields.payload = Some(Cow::Borrowed(&scan.text[start..scan.at]));
                return Some(());
            }
            _ => return scan.value(1),
        };
        *text = scan.text_value(1)?;
        Some(())
    })?;
    scan.space();
    fields.scanned = Some(scanned);
    (scan.at == text.len()).then_some(fields)
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let rest = self.text.get(self.at..)?;
        rest.starts_with(word).then(|| self.at += word.len())
    }

    /// An object from its `{`: each key given to `member`, which reads its value; no key twice.
    fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Option<()>,
    ) -> Option<()> {
        let mut keys = Keys::default();
        self.list(depth, b'{', b'}', |scan| {
            let key = scan.string()?;
            if !keys.insert(key.clone()) {
                return None;
            }
            scan.space();
            scan.eat(b':')?;
            scan.space();
            member(scan, key)
        })
    }

    /// An object's members or an array's items, from `open` to `close`, separated by commas.
    fn list(
        &mut self,
        depth: usize,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.eat(open)?;
        self.space();
        if self.eat(close).is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            self.space();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.space();
                }
                byte if byte == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The payload object: what the gateway reads of it, every value checked.
    fn payload(&mut self) -> Option<Scanned<'a>> {
        let mut scanned = Scanned::default();
        self.object(1, |scan, key| match key.as_ref() {
            "tool_call_id" => {
                scanned.tool_call_id = scan.text_value(2)?;
                Some(())
            }
            "name" => {
                scanned.name = scan.text_value(2)?;
                Some(())
            }
            PAYLOAD_KEY => {
                scanned.agui = true;
                scan.value(2)
            }
            _ => scan.value(2),
        })?;
        Some(scanned)
    }

    /// A field the gateway reads as text: a string, `null`, or anything else checked.
    fn text_value(&mut self, depth: usize) -> Option<Text<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Text::Str),
            b'n' => self.literal("null").map(|()| Text::Null),
            _ => self.value(depth).map(|()| Text::Other),
        }
    }

    /// Any value, only checked.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth, |scan, _| scan.value(depth + 1)),
            b'[' => self.list(depth, b'[', b']', |scan| scan.value(depth + 1)),
            b'"' => self.string().map(drop),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A number as JSON writes one. A plain integer of up to 18 digits fits serde_json's `u64` or
    /// `i64`; any other is handed to serde_json, which refuses one out of `f64`'s range.
    fn number(&mut self) -> Option<()> {
        let start = self.at;
        let bytes = self.text.as_bytes();
        let digits = |at: &mut usize| {
            let from = *at;
            while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at - from
        };
        let mut at = start;
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        let whole = digits(&mut at);
        if whole == 0 || (whole > 1 && bytes.get(at - whole) == Some(&b'0')) {
            return None;
        }
        let mut plain = whole <= 18;
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            if digits(&mut at) == 0 {
                return None;
            }
            plain = false;
        }
        if let Some(b'e' | b'E') = bytes.get(at) {
            at += 1;
            if let Some(b'+' | b'-') = bytes.get(at) {
                at += 1;
            }
            if digits(&mut at) == 0 {
                return None;
            }
            plain = false;
        }
        if !plain {
            serde_json::from_str::<f64>(&self.text[start..at]).ok()?;
        }
        self.at = at;
        Some(())
    }

    /// A string from its `"`: borrowed when it has no escape, decoded by serde_json when it has.
    /// Refused: a control character, an unknown escape, a surrogate not in a pair.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        self.eat(b'"')?;
        let mut escaped = false;
        loop {
            self.at += plain_len(bytes.get(self.at..)?);
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                // A control character.
                _ => return None,
            }
        }
        self.at += 1;
        match escaped {
            false => Some(Cow::Borrowed(&self.text[start + 1..self.at - 1])),
            true => serde_json::from_str(&self.text[start..self.at])
                .ok()
                .map(Cow::Owned),
        }
    }

    /// One escape, from its `\`.
    fn escape(&mut self) -> Option<()> {
        self.at += 1;
        let byte = self.peek()?;
        self.at += 1;
        match byte {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => match self.hex()? {
                0xD800..=0xDBFF => {
                    self.literal("\\u")?;
                    matches!(self.hex()?, 0xDC00..=0xDFFF).then_some(())
                }
                0xDC00..=0xDFFF => None,
                _ => Some(()),
            },
            _ => None,
        }
    }

    /// Four hex digits.
    fn hex(&mut self) -> Option<u16> {
        let digits = self.text.get(self.at..self.at + 4)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at += 4;
        u16::from_str_radix(digits, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::read::scan_payload;
    use super::super::read_by_serde;
    use super::fields;

    /// Bits of JSON, valid and not, where a reader may go wrong: numbers at the edges of their
    /// types and grammar, escapes, surrogates, control characters.
    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "7",
        "-12",
        "1.5",
        "-0.0",
        "1e5",
        "1E+5",
        "1e-5",
        "1e-400",
        "123456789012345678",
        "-123456789012345678",
        "1234567890123456789",
        "18446744073709551616",
        "-9223372036854775809",
        "1.7976931348623157e308",
    ];
    /// Some are JSON's, out of `f64`'s range.
    const NOT_NUMBERS: &[&str] = &[
        "01",
        "-",
        "1.",
        ".5",
        "1e",
        "0x10",
        "+1",
        "1.0e",
        "00",
        "-a",
        "1e400",
        "-1e400",
        "1.7976931348623159e308",
        "2e308",
    ];
    const STRINGS: &[&str] = &[
        "",
        "a",
        "run-1",
        "typ\\u0065",
        "\\u00e9",
        "é",
        "\\ud800\\udc00",
        "\\/",
        "\\\"",
        "\\\\",
        "\\b\\f\\n\\r\\t",
        "\u{7f}",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "tool_call_id",
        "\\u0000",
    ];
    const NOT_STRINGS: &[&str] = &[
        "\\ud800",
        "\\udc00",
        "\\ud800\\u0041",
        "\\ud800x",
        "\\x",
        "\u{1}",
        "tab\there",
        "\\u00",
        "\\u12G4",
        "\\",
    ];
    const KEYS: &[&str] = &[
        "type",
        "run_id",
        "thread_id",
        "user_id",
        "event_id",
        "ts",
        "traceparent",
        "payload",
        "typ\\u0065",
        "other",
        "tool_call_id",
        "name",
        "agui",
        "a",
        "",
        "\\ud83d\\ude00",
        "😀",
    ];
    const SPACES: &[&str] = &["", "", "", " ", "\n\t ", "\r"];

    fn space() -> impl Strategy<Value = String> {
        prop_oneof![
            200 => prop::sample::select(SPACES).prop_map(str::to_string),
            // Not JSON's whitespace.
            1 => Just("\u{a0}".to_string()),
        ]
    }

    fn quoted(texts: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop::sample::select(texts).prop_map(|s| format!("\"{s}\""))
    }

    fn value() -> impl Strategy<Value = String> {
        let select =
            |texts: &'static [&'static str]| prop::sample::select(texts).prop_map(str::to_string);
        let leaf = prop_oneof![
            40 => select(NUMBERS),
            40 => quoted(STRINGS),
            20 => select(&["null", "true", "false"]),
            1 => select(NOT_NUMBERS),
            1 => quoted(NOT_STRINGS),
            1 => select(&["nul", "tru", "[", "}", "\"open"]),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                (prop::collection::vec((inner.clone(), space()), 0..5)).prop_map(|items| {
                    let items: Vec<String> = items.into_iter().map(|(v, s)| v + &s).collect();
                    format!("[{}]", items.join(","))
                }),
                object(inner),
            ]
        })
    }

    /// An object of distinct keys, now and then one twice.
    fn object(values: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        let member = (
            space(),
            prop::sample::select(KEYS),
            space(),
            values,
            space(),
        );
        (
            prop::collection::vec(member, 0..7),
            prop::bool::weighted(0.02),
        )
            .prop_map(|(mut members, twice)| {
                let mut seen = std::collections::HashSet::new();
                members.retain(|(_, key, ..)| seen.insert(*key));
                if twice && let Some(first) = members.first().cloned() {
                    members.push(first);
                }
                let members: Vec<String> = (members.into_iter())
                    .map(|(a, k, b, v, c)| format!("{a}\"{k}\"{b}:{v}{c}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            })
    }

    /// An event: an object, nearly always with an object as its payload.
    fn event() -> impl Strategy<Value = String> {
        let payload = prop_oneof![4 => object(value()), 1 => value()];
        (
            space(),
            object(value()),
            prop::option::weighted(0.8, payload),
            space(),
        )
            .prop_map(|(a, object, payload, b)| {
                let object = match payload {
                    Some(payload) if object == "{}" => format!("{{\"payload\":{payload}}}"),
                    Some(payload) => format!("{{\"payload\":{payload},{}", &object[1..]),
                    None => object,
                };
                a + &object + &b
            })
    }

    /// Nesting past the scanner's depth is read by serde_json: taken up to serde_json's own
    /// limit, refused past it, as before.
    #[test]
    fn deep_nesting_is_left_to_serde_json() {
        let nested = |depth: usize| {
            format!(
                r#"{{"type":"agent_thinking","run_id":"r1","payload":{{"a":{}1{}}}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        let shallow = nested(60);
        assert!(fields(&shallow).is_some());
        let deep = nested(100);
        assert!(fields(&deep).is_none());
        let event = super::super::parse(&deep, 1 << 20).expect("serde_json takes it");
        assert_eq!(
            event.payload.json(),
            format!("{{\"a\":{}1{}}}", "[".repeat(100), "]".repeat(100))
        );
        let deeper = nested(200);
        assert!(fields(&deeper).is_none());
        assert!(super::super::parse(&deeper, 1 << 20).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 4096,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// The one pass takes exactly what serde_json takes and finds the same fields in it.
        #[test]
        fn the_one_pass_agrees_with_serde_json(text in event()) {
            let by_serde = read_by_serde(&text).ok().and_then(|mut read| {
                let scanned = match &read.payload {
                    None => None,
                    Some(raw) => match scan_payload(raw) {
                        Ok(scanned) => scanned,
                        Err(_) => return None,
                    },
                };
                // Owned again so the fields outlive the payload they borrow from.
                let scanned = format!("{scanned:?}");
                read.scanned = None;
                Some((read, scanned))
            });
            match (fields(&text), by_serde) {
                (Some(mut ours), Some((theirs, scanned))) => {
                    prop_assert_eq!(format!("{:?}", ours.scanned.take().flatten()), scanned);
                    prop_assert_eq!(ours, theirs);
                }
                (None, None) => {}
                (ours, theirs) => {
                    prop_assert!(false, "{}: ours {:?}, serde_json's {:?}", text, ours, theirs);
                }
            }
        }
    }
}
