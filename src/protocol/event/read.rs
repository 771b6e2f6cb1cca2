//! Reading an event's text without building it: the gateway's fields as strings ([`Text`]), the
//! payload kept as its text and scanned for what the gateway reads of it ([`Scanned`]), every other
//! value only checked (JSON, no key twice).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Refusal, json_refusal};
use crate::protocol::agui::PAYLOAD_KEY;
use crate::protocol::channel::{IdError, check_id};
use crate::protocol::json::{Checked, Key, Keys};

/// One field as read: the gateway's fields are strings, so anything else is only checked (no
/// key twice) and refused by name once the whole event is read.
#[derive(Debug, Default, PartialEq)]
pub(super) enum Text<'de> {
    #[default]
    Absent,
    Null,
    Str(Cow<'de, str>),
    Other,
}

impl<'de> Text<'de> {
    pub(super) fn of(value: Option<Value>) -> Self {
        match value {
            None => Self::Absent,
            Some(Value::Null) => Self::Null,
            Some(Value::String(text)) => Self::Str(Cow::Owned(text)),
            Some(_) => Self::Other,
        }
    }

    /// An optional string field: absent or `null` is `None`.
    pub(super) fn string(self, name: &str) -> Result<Option<String>, Refusal> {
        match self {
            Self::Absent | Self::Null => Ok(None),
            Self::Str(text) => Ok(Some(text.into_owned())),
            Self::Other => Err(Refusal::invalid(name, "must be a string")),
        }
    }

    /// An optional id field.
    pub(super) fn id(self, name: &str) -> Result<Option<String>, Refusal> {
        let Some(id) = self.string(name)? else {
            return Ok(None);
        };
        check_id(&id).map_err(|e: IdError| Refusal::invalid(name, e.to_string()))?;
        Ok(Some(id))
    }
}

/// Reads one field as a [`Text`].
struct TextSeed<'c>(Checked<'c>);

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Text<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Text<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
        Ok(Text::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
        Ok(Text::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Text<'de>, E> {
        Ok(Text::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Text<'de>, E> {
        Ok(Text::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Text<'de>, E> {
        Ok(Text::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Text<'de>, E> {
        Ok(Text::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Text<'de>, E> {
        Ok(Text::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text<'de>, A::Error> {
        self.0.visit_seq(seq).map(|()| Text::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text<'de>, A::Error> {
        self.0.visit_map(map).map(|()| Text::Other)
    }
}

/// An event's fields as read from its text, before any rule is applied.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Fields<'de> {
    pub(super) kind: Text<'de>,
    pub(super) own: Own<'de>,
    /// Kept as its text; [`scan_payload`] reads what the gateway needs of it.
    pub(super) payload: Option<Cow<'de, str>>,
    /// What [`scan_payload`] reads, when the read of the fields read it already: `Some(None)` for
    /// a payload that is `null` or absent.
    pub(super) scanned: Option<Option<Scanned<'de>>>,
}

/// The gateway's own fields of an event (beside its type and payload), as read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Own<'de> {
    pub(super) run_id: Text<'de>,
    pub(super) thread_id: Text<'de>,
    pub(super) user_id: Text<'de>,
    pub(super) event_id: Text<'de>,
    pub(super) ts: Text<'de>,
    pub(super) traceparent: Text<'de>,
}

impl Own<'_> {
    /// Takes them out of an event read as a tree (an AG-UI event, a stream's event).
    pub(super) fn take(fields: &mut serde_json::Map<String, Value>) -> Self {
        let mut take = |name: &str| Text::of(fields.remove(name));
        Self {
            run_id: take("run_id"),
            thread_id: take("thread_id"),
            user_id: take("user_id"),
            event_id: take("event_id"),
            ts: take("ts"),
            traceparent: take("traceparent"),
        }
    }
}

/// An object read key by key into `Self`: the keys it knows are read, every other value only
/// checked.
trait ReadObject<'de>: Default {
    fn read<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        checked: Checked<'_>,
    ) -> Result<(), A::Error>;
}

impl<'de> ReadObject<'de> for Fields<'de> {
    fn read<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        checked: Checked<'_>,
    ) -> Result<(), A::Error> {
        let text = TextSeed(checked);
        match key {
            "type" => self.kind = map.next_value_seed(text)?,
            "run_id" => self.own.run_id = map.next_value_seed(text)?,
            "thread_id" => self.own.thread_id = map.next_value_seed(text)?,
            "user_id" => self.own.user_id = map.next_value_seed(text)?,
            "event_id" => self.own.event_id = map.next_value_seed(text)?,
            "ts" => self.own.ts = map.next_value_seed(text)?,
            "traceparent" => self.own.traceparent = map.next_value_seed(text)?,
            "payload" => {
                let raw: &'de RawValue = map.next_value()?;
                self.payload = Some(Cow::Borrowed(raw.get()));
            }
            _ => map.next_value_seed(checked)?,
        }
        Ok(())
    }
}

/// What the gateway reads of a payload object.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Scanned<'de> {
    pub(super) tool_call_id: Text<'de>,
    pub(super) name: Text<'de>,
    /// Whether it has an `agui` key.
    pub(super) agui: bool,
}

impl<'de> ReadObject<'de> for Scanned<'de> {
    fn read<A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        checked: Checked<'_>,
    ) -> Result<(), A::Error> {
        match key {
            "tool_call_id" => self.tool_call_id = map.next_value_seed(TextSeed(checked))?,
            "name" => self.name = map.next_value_seed(TextSeed(checked))?,
            PAYLOAD_KEY => {
                self.agui = true;
                map.next_value_seed(checked)?;
            }
            _ => map.next_value_seed(checked)?,
        }
        Ok(())
    }
}

/// Reads an object with its [`ReadObject`], refusing a key twice; `None` for any other value.
pub(super) struct ObjectSeed<'c, T>(Checked<'c>, PhantomData<T>);

impl<'c, T> ObjectSeed<'c, T> {
    pub(super) fn new(checked: Checked<'c>) -> Self {
        Self(checked, PhantomData)
    }
}

impl<'de, T: ReadObject<'de>> DeserializeSeed<'de> for ObjectSeed<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: ReadObject<'de>> Visitor<'de> for ObjectSeed<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<T>, A::Error> {
        self.0.visit_seq(seq).map(|()| None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut object = T::default();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(Key)? {
            if !keys.insert(key.clone()) {
                return Err(self.0.repeated(&key));
            }
            object.read(&key, &mut map, self.0)?;
        }
        Ok(Some(object))
    }
}

/// Reads a payload's text: `None` for `null`, the fields the gateway reads for an object (with
/// no key twice anywhere in it), refused otherwise.
pub(super) fn scan_payload<'de>(raw: &'de str) -> Result<Option<Scanned<'de>>, Refusal> {
    if raw == "null" {
        return Ok(None);
    }
    crate::protocol::json::read(raw, |deserializer, checked| {
        ObjectSeed::new(checked).deserialize(deserializer)
    })
    .map_err(json_refusal)?
    .map(Some)
    .ok_or_else(|| Refusal::invalid("payload", "must be an object"))
}
