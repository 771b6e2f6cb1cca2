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

/// Splits a body into the raw JSON text of each item.
pub fn split(body: &[u8], ndjson: bool) -> Result<Vec<&str>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let items: Vec<&str> = if ndjson {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect()
    } else if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
        items.into_iter().map(RawValue::get).collect()
    } else {
        let item: &RawValue =
            serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
        vec![item.get()]
    };
    if items.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_bodies() {
        assert_eq!(split(br#"{"a":1}"#, false).unwrap(), vec![r#"{"a":1}"#]);
        assert_eq!(
            split(br#" [{"a":1}, 5]"#, false).unwrap(),
            vec![r#"{"a":1}"#, "5"]
        );
        assert_eq!(
            split(b"{\"a\":1}\n\n{\"b\":2}\nnope\n", true).unwrap(),
            vec![r#"{"a":1}"#, r#"{"b":2}"#, "nope"]
        );
        assert!(matches!(split(b"nope", false), Err(BodyError::NotJson(_))));
        assert!(matches!(split(b"[]", false), Err(BodyError::Empty)));
        assert!(matches!(split(b"\xff", false), Err(BodyError::NotUtf8)));
    }
}
