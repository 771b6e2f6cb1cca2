//! A JSON text checked in one pass over its bytes, as serde_json would read it, with no key twice
//! in any object: strings are borrowed where they have no escape, numbers and the rest only
//! checked. It refuses nothing itself: what it does not take, its callers read again with
//! serde_json, whose error names what is wrong. Events ([`super::event`]) and client frames
//! ([`super::client`]) are read with it, without building a `serde_json::Value` for each.

use std::borrow::Cow;

use smallvec::SmallVec;

use super::json::{Keys, plain_len};

/// Deeper than this, serde_json decides (it refuses past 128).
const MAX_DEPTH: usize = 64;

/// An object's members: each key with its value's text as it stands.
pub(super) type Members<'a> = SmallVec<[(Cow<'a, str>, &'a str); 8]>;

/// The members of a JSON object, every value checked (no key twice anywhere); `None` for
/// anything else.
pub(super) fn members(text: &str) -> Option<Members<'_>> {
    let mut scan = Scanner::new(text);
    let mut members = SmallVec::new();
    scan.space();
    scan.object(0, |scan, key| {
        let start = scan.at;
        scan.value(1)?;
        members.push((key, &scan.text[start..scan.at]));
        Some(())
    })?;
    scan.space();
    (scan.at == text.len()).then_some(members)
}

/// A checked string value's text (quotes included) as the string it stands for.
pub(super) fn string(raw: &str) -> Option<Cow<'_, str>> {
    let mut scan = Scanner::new(raw);
    let string = scan.string()?;
    (scan.at == raw.len()).then_some(string)
}

pub(super) struct Scanner<'a> {
    pub(super) text: &'a str,
    pub(super) at: usize,
}

impl<'a> Scanner<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    pub(super) fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    pub(super) fn literal(&mut self, word: &str) -> Option<()> {
        let rest = self.text.get(self.at..)?;
        rest.starts_with(word).then(|| self.at += word.len())
    }

    /// An object from its `{`: each key given to `member`, which reads its value; no key twice.
    pub(super) fn object(
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

    /// Any value, only checked.
    pub(super) fn value(&mut self, depth: usize) -> Option<()> {
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
    pub(super) fn string(&mut self) -> Option<Cow<'a, str>> {
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
