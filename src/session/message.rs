//! Client messages reassembled from their frames (RFC 6455 §5.4): a fragmented text or binary
//! message is collected within the size limit; control frames pass between fragments.

use bytes::Bytes;

use super::frame::{self, Raw};

/// One message from the client, reassembled from its frames.
#[derive(Debug)]
pub enum Message {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    /// The client's close, with the code to echo.
    Close(u16),
}

/// Why frames do not make a message: the session closes with 1009 or 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssemblyError {
    TooLarge,
    Protocol,
}

/// A fragmented message being assembled: whether it is text, and its bytes so far.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Option<(bool, Vec<u8>)>,
}

impl Reassembly {
    /// Whether a fragmented message has begun and not ended.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes one frame; `Some` once it completes a message.
    pub fn push(&mut self, raw: Raw, max_bytes: usize) -> Result<Option<Message>, AssemblyError> {
        let finish = |text: bool, bytes: Vec<u8>| {
            if !text {
                return Ok(Message::Binary);
            }
            String::from_utf8(bytes)
                .map(Message::Text)
                .map_err(|_| AssemblyError::Protocol)
        };
        let message = match raw.opcode {
            frame::TEXT | frame::BINARY => {
                if self.partial.is_some() {
                    return Err(AssemblyError::Protocol);
                }
                let text = raw.opcode == frame::TEXT;
                if !raw.fin {
                    self.partial = Some((text, raw.payload.to_vec()));
                    return Ok(None);
                }
                finish(text, raw.payload.to_vec())
            }
            frame::CONTINUATION => {
                let Some((text, mut bytes)) = self.partial.take() else {
                    return Err(AssemblyError::Protocol);
                };
                bytes.extend_from_slice(&raw.payload);
                if bytes.len() > max_bytes {
                    return Err(AssemblyError::TooLarge);
                }
                if !raw.fin {
                    self.partial = Some((text, bytes));
                    return Ok(None);
                }
                finish(text, bytes)
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
}
