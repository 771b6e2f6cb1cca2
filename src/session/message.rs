//! Client messages reassembled from their frames (RFC 6455 §5.4): a fragmented text or binary
//! message is collected within the size limit; control frames pass between fragments. Text is
//! checked as UTF-8 fragment by fragment, so a bad byte fails the connection at once (§8.1), while
//! a character split across two fragments is accepted.

use bytes::Bytes;

use super::frame::{self, Raw};

/// One message from the client, reassembled from its frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    /// The client's close, with the code to echo.
    Close(u16),
}

/// Why frames do not make a message: the session closes with 1009, 1002 or 1007.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssemblyError {
    TooLarge,
    Protocol,
    /// A text message that is not UTF-8 (RFC 6455 §8.1: close 1007).
    InvalidUtf8,
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    bytes: Vec<u8>,
    /// For text: how many leading bytes are known to be whole UTF-8 characters.
    checked: usize,
}

/// A fragmented message being assembled: whether it is text, and its bytes so far.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Option<Partial>,
}

/// Checks the text after `checked` as UTF-8, where the last few bytes may begin a character
/// the next fragment ends; the new count of checked bytes.
fn check_utf8(bytes: &[u8], checked: usize) -> Result<usize, AssemblyError> {
    match std::str::from_utf8(&bytes[checked..]) {
        Ok(_) => Ok(bytes.len()),
        // `error_len` is `None` when the input ends inside a character that could still be valid.
        Err(error) if error.error_len().is_none() => Ok(checked + error.valid_up_to()),
        Err(_) => Err(AssemblyError::InvalidUtf8),
    }
}

impl Reassembly {
    /// Whether a fragmented message has begun and not ended.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Bytes held for a fragmented message, for tests of the limit.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.partial
            .as_ref()
            .map_or(0, |partial| partial.bytes.len())
    }

    /// Takes one frame; `Some` once it completes a message.
    pub fn push(&mut self, raw: Raw, max_bytes: usize) -> Result<Option<Message>, AssemblyError> {
        let finish = |text: bool, bytes: Vec<u8>| {
            if !text {
                return Ok(Message::Binary);
            }
            String::from_utf8(bytes)
                .map(Message::Text)
                .map_err(|_| AssemblyError::InvalidUtf8)
        };
        let message = match raw.opcode {
            frame::TEXT | frame::BINARY => {
                if self.partial.is_some() {
                    return Err(AssemblyError::Protocol);
                }
                let text = raw.opcode == frame::TEXT;
                if !raw.fin {
                    let bytes = raw.payload.to_vec();
                    let checked = if text { check_utf8(&bytes, 0)? } else { 0 };
                    self.partial = Some(Partial {
                        text,
                        bytes,
                        checked,
                    });
                    return Ok(None);
                }
                finish(text, raw.payload.to_vec())
            }
            frame::CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(AssemblyError::Protocol);
                };
                // Checked before copying, so the message never holds more than the limit.
                if partial.bytes.len() + raw.payload.len() > max_bytes {
                    return Err(AssemblyError::TooLarge);
                }
                partial.bytes.extend_from_slice(&raw.payload);
                if !raw.fin {
                    if partial.text {
                        partial.checked = check_utf8(&partial.bytes, partial.checked)?;
                    }
                    self.partial = Some(partial);
                    return Ok(None);
                }
                finish(partial.text, partial.bytes)
            }
            // Copied: a shared slice would pin the whole read buffer while the pong waits.
            frame::PING => Ok(Message::Ping(Bytes::copy_from_slice(&raw.payload))),
            frame::PONG => Ok(Message::Pong),
            _ => frame::close_code(&raw.payload)
                .map(Message::Close)
                .map_err(|()| AssemblyError::Protocol),
        };
        message.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    fn raw(fin: bool, opcode: u8, payload: &[u8]) -> Raw {
        Raw {
            fin,
            opcode,
            payload: BytesMut::from(payload),
        }
    }

    #[test]
    fn fragments_make_one_message_and_control_frames_pass_between() {
        let mut reassembly = Reassembly::default();
        assert!(matches!(
            reassembly.push(raw(false, frame::TEXT, b"he"), 8),
            Ok(None)
        ));
        assert!(matches!(
            reassembly.push(raw(true, frame::PING, b"p"), 8),
            Ok(Some(Message::Ping(_)))
        ));
        match reassembly.push(raw(true, frame::CONTINUATION, b"llo"), 8) {
            Ok(Some(Message::Text(text))) => assert_eq!(text, "hello"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_order_or_too_large_fragments_are_refused() {
        let mut reassembly = Reassembly::default();
        assert!(matches!(
            reassembly.push(raw(true, frame::CONTINUATION, b"x"), 8),
            Err(AssemblyError::Protocol)
        ));
        assert!(matches!(
            reassembly.push(raw(false, frame::TEXT, b"1234"), 8),
            Ok(None)
        ));
        assert!(matches!(
            reassembly.push(raw(false, frame::TEXT, b"x"), 8),
            Err(AssemblyError::Protocol)
        ));
        let mut reassembly = Reassembly::default();
        assert!(matches!(
            reassembly.push(raw(false, frame::TEXT, b"1234"), 8),
            Ok(None)
        ));
        assert!(matches!(
            reassembly.push(raw(true, frame::CONTINUATION, b"56789"), 8),
            Err(AssemblyError::TooLarge)
        ));
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_whole_or_in_fragments() {
        let mut reassembly = Reassembly::default();
        assert_eq!(
            reassembly.push(raw(true, frame::TEXT, b"ok \xFF"), 64),
            Err(AssemblyError::InvalidUtf8)
        );
        // A bad byte in the first fragment fails at once, before the message ends.
        let mut reassembly = Reassembly::default();
        assert_eq!(
            reassembly.push(raw(false, frame::TEXT, b"\xC0\x80"), 64),
            Err(AssemblyError::InvalidUtf8)
        );
        let mut reassembly = Reassembly::default();
        assert_eq!(
            reassembly.push(raw(false, frame::TEXT, b"ok"), 64),
            Ok(None)
        );
        assert_eq!(
            reassembly.push(raw(false, frame::CONTINUATION, b"\xED\xA0\x80"), 64),
            Err(AssemblyError::InvalidUtf8),
            "a surrogate"
        );
        // A character begun in one fragment and not ended by the last one.
        let mut reassembly = Reassembly::default();
        assert_eq!(
            reassembly.push(raw(false, frame::TEXT, b"\xE2\x82"), 64),
            Ok(None)
        );
        assert_eq!(
            reassembly.push(raw(true, frame::CONTINUATION, b""), 64),
            Err(AssemblyError::InvalidUtf8)
        );
        // Binary is not text.
        let mut reassembly = Reassembly::default();
        assert_eq!(
            reassembly.push(raw(true, frame::BINARY, b"\xFF"), 64),
            Ok(Some(Message::Binary))
        );
    }

    #[test]
    fn a_character_split_across_fragments_is_accepted() {
        let euro = "€".as_bytes();
        for at in 1..euro.len() {
            let mut reassembly = Reassembly::default();
            assert_eq!(
                reassembly.push(raw(false, frame::TEXT, &euro[..at]), 64),
                Ok(None)
            );
            assert_eq!(
                reassembly.push(raw(true, frame::CONTINUATION, &euro[at..]), 64),
                Ok(Some(Message::Text("€".to_string())))
            );
        }
        // One byte per fragment, a four-byte character among others.
        let text = "a😀b";
        let mut reassembly = Reassembly::default();
        let bytes = text.as_bytes();
        assert_eq!(
            reassembly.push(raw(false, frame::TEXT, &bytes[..1]), 64),
            Ok(None)
        );
        for (i, byte) in bytes.iter().enumerate().skip(1) {
            let fin = i == bytes.len() - 1;
            let got = reassembly.push(raw(fin, frame::CONTINUATION, &[*byte]), 64);
            let expected = fin.then(|| Message::Text(text.to_string()));
            assert_eq!(got, Ok(expected));
        }
    }
}
