//! JSON that means one thing: an object with the same key twice is refused, because two readers
//! (the gateway, a backend, a browser) may each take a different one of the two values.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The first key that appears twice in one object of `text`, if any (`Ok(None)` also for text
/// that is not JSON: the caller's own parse says why).
pub fn duplicate_key(text: &str) -> Option<String> {
    match serde_json::from_str::<Unique>(text) {
        Err(error) if error.is_data() => {
            let message = error.to_string();
            message
                .strip_prefix("duplicate key `")
                .and_then(|rest| rest.split('`').next())
                .map(super::excerpt)
        }
        _ => None,
    }
}

/// Walks a JSON value and fails on a repeated key.
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }
}

#[cfg(test)]
mod tests {
    use super::duplicate_key;

    #[test]
    fn repeated_keys_anywhere() {
        assert_eq!(duplicate_key(r#"{"a":1,"b":2}"#), None);
        assert_eq!(duplicate_key(r#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            duplicate_key(r#"{"p":{"x":[{"k":1,"k":2}]}}"#).as_deref(),
            Some("k")
        );
        assert_eq!(duplicate_key(r#"[{"a":1},{"a":2}]"#), None, "two objects");
        assert_eq!(duplicate_key("not json"), None);
    }
}
