//! JSON that means one thing: an object with the same key twice is refused, because two readers
//! (the gateway, a backend, a browser) may each take a different one of the two values.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a text is not JSON that means one thing.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Invalid(serde_json::Error),
    /// The key (an excerpt of it) that appears twice in one object.
    #[error("the key `{0}` appears twice in one object")]
    DuplicateKey(String),
}

/// Parses `text` in one pass, refusing an object with a key twice.
pub fn parse(text: &str) -> Result<Value, JsonError> {
    parse_with(|seed| {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let value = seed.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(value)
    })
}

/// [`parse`] for bytes (which must be UTF-8, as JSON is).
pub fn parse_slice(bytes: &[u8]) -> Result<Value, JsonError> {
    parse_with(|seed| {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let value = seed.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(value)
    })
}

fn parse_with(
    run: impl FnOnce(Unique<'_>) -> Result<Value, serde_json::Error>,
) -> Result<Value, JsonError> {
    let repeated = RefCell::new(None);
    run(Unique {
        repeated: &repeated,
    })
    .map_err(|error| match repeated.take() {
        Some(key) => JsonError::DuplicateKey(super::excerpt(&key)),
        None => JsonError::Invalid(error),
    })
}

/// Builds a [`Value`] as serde_json's own does, and fails on a repeated key (kept in `repeated`).
#[derive(Clone, Copy)]
struct Unique<'a> {
    repeated: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self)?;
            match object.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(taken) => {
                    let message = format!("duplicate key `{}`", taken.key());
                    *self.repeated.borrow_mut() = Some(taken.key().clone());
                    return Err(de::Error::custom(message));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::{JsonError, parse};

    fn repeated(text: &str) -> Option<String> {
        match parse(text) {
            Err(JsonError::DuplicateKey(key)) => Some(key),
            _ => None,
        }
    }

    #[test]
    fn repeated_keys_anywhere() {
        assert_eq!(repeated(r#"{"a":1,"b":2}"#), None);
        assert_eq!(repeated(r#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            repeated(r#"{"p":{"x":[{"k":1,"k":2}]}}"#).as_deref(),
            Some("k")
        );
        assert_eq!(repeated(r#"[{"a":1},{"a":2}]"#), None, "two objects");
        assert!(matches!(parse("not json"), Err(JsonError::Invalid(_))));
        assert!(matches!(parse("{} x"), Err(JsonError::Invalid(_))));
    }

    #[test]
    fn builds_what_serde_json_builds() {
        let text =
            r#"{"b":[1,-2,3.5,"x\u00e9",null,true],"a":{"z":{},"y":[]},"n":18446744073709551615}"#;
        let ours = parse(text).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(ours.to_string(), theirs.to_string(), "key order kept");
    }
}
