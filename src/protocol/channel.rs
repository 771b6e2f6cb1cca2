//! Channel names: `thread:<thread_id>` and `user:<user_id>`, the only two kinds of target.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Longest id (thread, user, run, event, tool call, connection) the gateway accepts, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Which kind of target a channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    Thread,
    User,
}

/// A channel name such as `thread:t_42`. Cheap to clone: the text is shared. Equal, hashed and
/// borrowed as its text (its kind follows from the text), so a map of channels can be read with a
/// name as received, without making a `ChannelName` of it.
#[derive(Debug, Clone)]
pub struct ChannelName {
    full: Arc<str>,
    kind: ChannelKind,
}

impl PartialEq for ChannelName {
    fn eq(&self, other: &Self) -> bool {
        self.full == other.full
    }
}

impl Eq for ChannelName {}

impl Hash for ChannelName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.full.hash(state);
    }
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.full
    }
}

impl ChannelName {
    pub fn thread(thread_id: &str) -> Self {
        Self {
            full: joined("thread:", thread_id),
            kind: ChannelKind::Thread,
        }
    }

    pub fn user(user_id: &str) -> Self {
        Self {
            full: joined("user:", user_id),
            kind: ChannelKind::User,
        }
    }

    /// Parses `thread:<id>` or `user:<id>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (kind, id) = text.split_once(':')?;
        if check_id(id).is_err() {
            return None;
        }
        match kind {
            "thread" => Some(Self::thread(id)),
            "user" => Some(Self::user(id)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// The id after the prefix: the thread id or the user id.
    pub fn id(&self) -> &str {
        match self.kind {
            ChannelKind::Thread => &self.full["thread:".len()..],
            ChannelKind::User => &self.full["user:".len()..],
        }
    }
}

/// Written as its name.
impl serde::Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.full)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// Why an id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {} bytes", MAX_ID_LEN)]
    TooLong,
    #[error("must not contain control characters, whitespace or invisible formatting characters")]
    BadCharacter,
}

/// Ids become parts of channel names, log fields and URLs, so they are kept printable.
pub fn check_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    // Ids are nearly always ASCII, where control, whitespace and format characters are exactly
    // the bytes that are not graphic; the per-char checks are for the rest.
    let bad = if id.is_ascii() {
        !id.bytes().all(|b| b.is_ascii_graphic())
    } else {
        id.chars()
            .any(|c| c.is_control() || c.is_whitespace() || is_format(c))
    };
    if bad {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

/// `prefix` and `id` in one shared text. Joined on the stack and copied once, into the `Arc`: a
/// `String` turned into an `Arc<str>` is a second allocation, and a name is made for every event.
fn joined(prefix: &str, id: &str) -> Arc<str> {
    let mut buf = [0u8; 8 + MAX_ID_LEN];
    if let Some(room) = buf.get_mut(..prefix.len() + id.len()) {
        let (head, tail) = room.split_at_mut(prefix.len());
        head.copy_from_slice(prefix.as_bytes());
        tail.copy_from_slice(id.as_bytes());
        // Two texts joined are text: this does not fail.
        if let Ok(text) = std::str::from_utf8(room) {
            return Arc::from(text);
        }
    }
    // An id longer than any the gateway accepts (a name being checked).
    Arc::from([prefix, id].concat())
}

/// Unicode format characters (category Cf) that change how an id looks without being seen: bidi
/// overrides and isolates, zero-width characters, the soft hyphen, the byte-order mark, tag
/// characters. Two ids that look the same must be the same id.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<(&str, ChannelKind)>) {
        let parsed = ChannelName::parse(input);
        assert_eq!(
            parsed.as_ref().map(|c| (c.id(), c.kind())),
            expected,
            "{input}"
        );
    }

    #[test]
    fn invisible_characters_are_not_ids() {
        for id in ["t\u{202E}gpj.exe", "t\u{200B}1", "\u{FEFF}t", "t\u{2066}x"] {
            assert_eq!(check_id(id), Err(IdError::BadCharacter), "{id:?}");
        }
        assert_eq!(check_id("thread-ü-日本"), Ok(()));
    }

    #[test]
    fn an_ascii_byte_is_judged_as_the_char_checks_judge_it() {
        for b in 0u8..=0x7f {
            let c = char::from(b);
            let printable = !(c.is_control() || c.is_whitespace() || is_format(c));
            let id = format!("a{c}b");
            assert_eq!(check_id(&id).is_ok(), printable, "{b:#04x}");
            // The same byte beside a non-ASCII char takes the per-char path.
            assert_eq!(check_id(&format!("{id}ü")).is_ok(), printable, "{b:#04x}");
        }
    }

    #[test]
    fn names_of_any_length_are_joined() {
        for id in [
            "t",
            "é".repeat(MAX_ID_LEN / 2).as_str(),
            &"x".repeat(3 * MAX_ID_LEN),
        ] {
            let name = ChannelName::thread(id);
            assert_eq!(name.as_str(), format!("thread:{id}"));
            assert_eq!(name.id(), id);
        }
    }

    #[test]
    fn parses_channel_names() {
        check("thread:t_42", Some(("t_42", ChannelKind::Thread)));
        check("user:u_9", Some(("u_9", ChannelKind::User)));
        check("thread:a:b", Some(("a:b", ChannelKind::Thread)));
        check("run:r1", None);
        check("thread:", None);
        check("t_42", None);
        check("thread:a b", None);
    }
}
