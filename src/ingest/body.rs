//! A `POST /v1/events` body split into the raw JSON text of each item: one object, a JSON array, or
//! NDJSON (one object per line).

use serde_json::value::RawValue;

/// Why a whole body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body holds no events")]
    Empty,
}

/// A body's items. One object is not scanned here: its event's parse reads all of it and refuses
/// anything after it, and only a body whose parse failed is checked again for being JSON at all
/// ([`Items::One`]). Scanning every single-event body twice cost an eighth of an event's way through
/// the gateway.
#[derive(Debug)]
pub enum Items<'a> {
    /// The body is one object: `item` is its text without the whitespace around it.
    One { item: &'a str, body: &'a str },
    /// A JSON array's items, or NDJSON's lines.
    Many(Vec<&'a str>),
}

impl Items<'_> {
    /// How many events the body holds (never none: an empty body is refused).
    pub fn count(&self) -> usize {
        match self {
            Self::One { .. } => 1,
            Self::Many(items) => items.len(),
        }
    }
}

/// Splits a body into the raw JSON text of each item.
pub fn split(body: &[u8], ndjson: bool) -> Result<Items<'_>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let items: Vec<&str> = if ndjson {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect()
    } else {
        let value = text.trim_matches([' ', '\t', '\n', '\r']);
        if value.starts_with('{') {
            return Ok(Items::One {
                item: value,
                body: text,
            });
        }
        if value.starts_with('[') {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
            items.into_iter().map(RawValue::get).collect()
        } else {
            check(text)?;
            vec![value]
        }
    };
    if items.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(Items::Many(items))
}

/// Whether `body` is one JSON value: the check of a single-object body whose event was refused,
/// so that a body that is not JSON is refused whole, as a list that is not JSON is.
pub fn check(body: &str) -> Result<(), BodyError> {
    serde_json::from_str::<&RawValue>(body)
        .map(|_| ())
        .map_err(|e| BodyError::NotJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many(items: Items<'_>) -> Vec<&str> {
        match items {
            Items::Many(items) => items,
            Items::One { .. } => panic!("one object: {items:?}"),
        }
    }

    #[test]
    fn splits_bodies() {
        assert!(matches!(
            split(b" {\"a\":1}\n", false).unwrap(),
            Items::One {
                item: r#"{"a":1}"#,
                body: " {\"a\":1}\n"
            }
        ));
        assert_eq!(
            many(split(br#" [{"a":1}, 5]"#, false).unwrap()),
            vec![r#"{"a":1}"#, "5"]
        );
        assert_eq!(many(split(b" 5 ", false).unwrap()), vec!["5"]);
        assert_eq!(
            many(split(b"{\"a\":1}\n\n{\"b\":2}\nnope\n", true).unwrap()),
            vec![r#"{"a":1}"#, r#"{"b":2}"#, "nope"]
        );
        assert!(matches!(split(b"nope", false), Err(BodyError::NotJson(_))));
        assert!(matches!(split(b"", false), Err(BodyError::NotJson(_))));
        assert!(matches!(
            split(b"\xc2\xa05", false),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(check("{\"a\":1} x"), Err(BodyError::NotJson(_))));
        assert!(matches!(split(b"[]", false), Err(BodyError::Empty)));
        assert!(matches!(split(b"\xff", false), Err(BodyError::NotUtf8)));
    }
}
