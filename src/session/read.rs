//! Reading client messages: reassembles fragments within the size limit and turns every
//! WebSocket-level failure into a [`Message`] the session answers with a close code.

use std::convert::Infallible;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use tokio::io::AsyncRead;

/// One thing the client sent, or why nothing more will come.
#[derive(Debug)]
pub enum Message {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
    /// A message over `session.max_frame_bytes` (answered with 1009).
    TooLarge,
    /// Broken framing or invalid UTF-8 (answered with 1002).
    Invalid,
    /// The peer went away without a close frame.
    Gone,
}

/// Pings and closes are answered by the session through the writer, not by the library.
pub fn configure<S>(socket: &mut WebSocketRead<S>, max_bytes: usize) {
    socket.set_auto_close(false);
    socket.set_auto_pong(false);
    // The library refuses payloads of `max_message_size` bytes or more.
    socket.set_max_message_size(max_bytes + 1);
}

pub struct Reader {
    max_bytes: usize,
    /// A fragmented message being assembled: whether it is text, and its bytes so far.
    partial: Option<(bool, Vec<u8>)>,
}

impl Reader {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            partial: None,
        }
    }

    pub async fn next<S: AsyncRead + Unpin>(&mut self, socket: &mut WebSocketRead<S>) -> Message {
        loop {
            let frame = match socket
                .read_frame(&mut |_: Frame<'_>| async { Ok::<(), Infallible>(()) })
                .await
            {
                Ok(frame) => frame,
                Err(WebSocketError::FrameTooLarge) => return Message::TooLarge,
                Err(
                    WebSocketError::UnexpectedEOF
                    | WebSocketError::IoError(_)
                    | WebSocketError::ConnectionClosed,
                ) => {
                    return Message::Gone;
                }
                Err(_) => return Message::Invalid,
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Message::Invalid;
                    }
                    let text = frame.opcode == OpCode::Text;
                    if frame.fin {
                        return finish(text, frame.payload.to_vec());
                    }
                    self.partial = Some((text, frame.payload.to_vec()));
                }
                OpCode::Continuation => {
                    let Some((text, mut bytes)) = self.partial.take() else {
                        return Message::Invalid;
                    };
                    bytes.extend_from_slice(&frame.payload);
                    if bytes.len() > self.max_bytes {
                        return Message::TooLarge;
                    }
                    if frame.fin {
                        return finish(text, bytes);
                    }
                    self.partial = Some((text, bytes));
                }
                OpCode::Ping => return Message::Ping(Bytes::copy_from_slice(&frame.payload)),
                OpCode::Pong => return Message::Pong,
                OpCode::Close => return Message::Close,
            }
        }
    }
}

fn finish(text: bool, bytes: Vec<u8>) -> Message {
    if !text {
        return Message::Binary;
    }
    match String::from_utf8(bytes) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Invalid,
    }
}
