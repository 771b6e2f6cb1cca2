//! JSON that means one thing: an object with the same key twice is refused, because two readers
//! (the gateway, a backend, a browser) may each take a different one of the two values. And
//! [`write_str`], the string writer of the texts written for every event.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use smallvec::SmallVec;

/// Why a text is not JSON that means one thing.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Invalid(serde_json::Error),
    /// The key (an excerpt of it) that appears twice in one object.
    #[error("the key `{0}` appears twice in one object")]
    DuplicateKey(String),
}

/// Writes `text` as a JSON string, quoted and escaped byte for byte as serde_json escapes it
/// (unit test). Every event's frame and answer writes a few short ids this way; serde_json's
/// serialiser, a generic writer checking one byte at a time, cost more than the rest of the frame.
pub fn write_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let plain = plain_len(bytes);
    out.extend_from_slice(&bytes[..plain]);
    let mut from = plain;
    for (at, &byte) in bytes.iter().enumerate().skip(plain) {
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&bytes[from..at]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
                from = at + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..at]);
        out.extend_from_slice(escaped);
        from = at + 1;
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

/// How many bytes at the start of `bytes` a JSON string holds as they are: up to the first
/// control character, quote or backslash. Read eight bytes at a time.
pub fn plain_len(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte below 0x20, quote or backslash: the lowest one set is exact (a
    // false one can only follow a true one), so it says where the first such byte is.
    let special = |word: u64| {
        let zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
        control | zero(word ^ (ONES * u64::from(b'"'))) | zero(word ^ (ONES * u64::from(b'\\')))
    };
    let first = |mask: u64| (mask.trailing_zeros() / 8) as usize;
    let word = |chunk: &[u8]| <[u8; 8]>::try_from(chunk).map(u64::from_le_bytes).ok();
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8).and_then(word) {
        let mask = special(word);
        if mask != 0 {
            return at + first(mask);
        }
        at += 8;
    }
    if at == bytes.len() {
        return at;
    }
    // Fewer than eight left: the last eight bytes as one word (those before `at` are plain).
    if let Some(start) = bytes.len().checked_sub(8)
        && let Some(last) = word(&bytes[start..])
    {
        let mask = special(last);
        return match mask {
            0 => bytes.len(),
            _ => start + first(mask),
        };
    }
    let special = |&byte: &u8| byte < 0x20 || byte == b'"' || byte == b'\\';
    bytes.iter().position(special).unwrap_or(bytes.len())
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

/// Reads `text` with a reader of its own (one that builds no tree), which reads what it does not
/// keep with [`Checked`] and notes its own repeated keys with [`Checked::repeated`]: the same
/// rule as [`parse`], without the allocations of a [`Value`].
pub fn read<'de, T>(
    text: &'de str,
    reader: impl FnOnce(
        &mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
        Checked<'_>,
    ) -> Result<T, serde_json::Error>,
) -> Result<T, JsonError> {
    let repeated = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    reader(
        &mut deserializer,
        Checked {
            repeated: &repeated,
        },
    )
    .and_then(|value| deserializer.end().map(|()| value))
    .map_err(|error| match repeated.take() {
        Some(key) => JsonError::DuplicateKey(super::excerpt(&key)),
        None => JsonError::Invalid(error),
    })
}

/// Reads one value only to check it: nothing is built, and no object may have a key twice.
#[derive(Clone, Copy)]
pub struct Checked<'a> {
    repeated: &'a RefCell<Option<String>>,
}

impl Checked<'_> {
    /// Notes `key` as the repeated one, and the error that stops the read.
    pub fn repeated<E: de::Error>(self, key: &str) -> E {
        *self.repeated.borrow_mut() = Some(key.to_string());
        E::custom(format_args!("duplicate key `{key}`"))
    }
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(Key)? {
            if !keys.insert(key.clone()) {
                return Err(self.repeated(&key));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

/// An object's key, borrowed from the text unless it had to be unescaped.
pub struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The keys seen in one object. A few are kept in place and compared one by one (no allocation,
/// and nothing to set up or tear down but the ones kept, for the small objects events are made
/// of); past [`FEW_KEYS`] they are hashed, so that an object of thousands of keys costs no more
/// than its length.
#[derive(Default)]
pub struct Keys<'de> {
    few: SmallVec<[Cow<'de, str>; FEW_KEYS]>,
    many: Option<HashSet<Cow<'de, str>>>,
}

/// How many keys of an object [`Keys`] compares one by one before it hashes them.
const FEW_KEYS: usize = 16;

impl<'de> Keys<'de> {
    /// Whether `key` is new in this object.
    /// (A key borrowed from the text is cloned for nothing; an unescaped one is copied.)
    pub fn insert(&mut self, key: Cow<'de, str>) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        if self.few.len() < FEW_KEYS {
            self.few.push(key);
            return true;
        }
        let mut many: HashSet<_> = self.few.drain(..).collect();
        many.insert(key);
        self.many = Some(many);
        true
    }
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
    use super::{Checked, JsonError, parse, read, write_str};
    use serde::de::DeserializeSeed;

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

    /// [`read`] with [`Checked`] refuses what [`parse`] refuses, with the same answer.
    #[test]
    fn checking_without_building_refuses_the_same() {
        let many: Vec<String> = (0..40).map(|n| format!(r#""k{n}":{n}"#)).collect();
        let many = format!("{{{}}}", many.join(","));
        let many_repeated = many.replace(r#""k39""#, r#""k3""#);
        for text in [
            r#"{"a":1,"b":2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"p":{"x":[{"k":1,"k":2}]}}"#,
            r#"{"a\u0062":1,"ab":2}"#,
            r#"[{"a":1},{"a":2}]"#,
            "not json",
            "{} x",
            &many,
            &many_repeated,
        ] {
            let checked = read(text, |de, checked: Checked<'_>| checked.deserialize(de));
            let parsed = parse(text);
            match (&checked, &parsed) {
                (Ok(()), Ok(_)) => {}
                (Err(JsonError::DuplicateKey(a)), Err(JsonError::DuplicateKey(b))) => {
                    assert_eq!(a, b, "{text}")
                }
                (Err(JsonError::Invalid(_)), Err(JsonError::Invalid(_))) => {}
                _ => panic!("{text}: {checked:?} against {parsed:?}"),
            }
        }
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

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut texts: Vec<String> = (0u32..0x80)
            .filter_map(char::from_u32)
            .map(|c| format!("ab{c}cdefghij{c}"))
            .collect();
        texts.extend(
            [
                "",
                "a",
                "thread:bench-x-t1",
                "0123456789abcdef",
                "\"\"\"\"\"\"\"\"\"",
                "\\",
                "é \u{2028} \u{7f} 😀 and then some",
                "12345678\n2345678\u{1}",
            ]
            .map(String::from),
        );
        // Every length around the eight-byte steps, with one byte to escape at each place.
        for len in 0..20 {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{1}', '\u{1f}'] {
                    let mut text: Vec<char> = "abcdefghijklmnopqrst".chars().take(len).collect();
                    text[at] = special;
                    texts.push(text.into_iter().collect());
                }
            }
        }
        for text in texts {
            let special = |&b: &u8| b < 0x20 || b == b'"' || b == b'\\';
            let plain = text.bytes().position(|b| special(&b)).unwrap_or(text.len());
            assert_eq!(super::plain_len(text.as_bytes()), plain, "{text:?}");
            let mut ours = Vec::new();
            write_str(&mut ours, &text);
            let theirs = serde_json::to_vec(&text).expect("a string serialises");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "{text:?}"
            );
        }
    }
}
