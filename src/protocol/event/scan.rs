//! An event's text read in one pass over its bytes ([`crate::protocol::scan`]): the gateway's
//! fields, the payload's text and what the gateway reads of the payload, every other value only
//! checked. It takes exactly the events serde_json's reader ([`super::read`]) takes, with the same
//! fields (a property test holds it to that); whatever it does not take is read again by
//! serde_json, whose error names what is wrong. An event is otherwise read twice over its payload
//! (once to find its end, once to check it) through serde's generic machinery.

use std::borrow::Cow;

use super::read::{Fields, Scanned, Text};
use crate::protocol::agui::PAYLOAD_KEY;
use crate::protocol::scan::Scanner;

/// The fields of an event whose text is a JSON object with no key twice anywhere and a payload
/// that is an object, `null` or absent, its payload scanned; `None` for anything else.
pub(super) fn fields(text: &str) -> Option<Fields<'_>> {
    let mut scan = Scanner::new(text);
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
                    b'{' => Some(payload(scan)?),
                    _ => return None,
                };
                fields.payload = Some(Cow::Borrowed(&scan.text[start..scan.at]));
                return Some(());
            }
            _ => return scan.value(1),
        };
        *text = text_value(scan, 1)?;
        Some(())
    })?;
    scan.space();
    fields.scanned = Some(scanned);
    (scan.at == text.len()).then_some(fields)
}

/// The payload object: what the gateway reads of it, every value checked.
fn payload<'a>(scan: &mut Scanner<'a>) -> Option<Scanned<'a>> {
    let mut scanned = Scanned::default();
    scan.object(1, |scan, key| match key.as_ref() {
        "tool_call_id" => {
            scanned.tool_call_id = text_value(scan, 2)?;
            Some(())
        }
        "name" => {
            scanned.name = text_value(scan, 2)?;
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
fn text_value<'a>(scan: &mut Scanner<'a>, depth: usize) -> Option<Text<'a>> {
    match scan.peek()? {
        b'"' => scan.string().map(Text::Str),
        b'n' => scan.literal("null").map(|()| Text::Null),
        _ => scan.value(depth).map(|()| Text::Other),
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
