//! The session's read side without a socket, for the codec's tests: bytes arrive in chunks and go
//! through [`parse`] and [`Reassembly`] as `Session::read_messages` takes them, and come out as
//! frames, messages, or the close code the session would send.

use bytes::BytesMut;

use super::{FrameError, parse};
use crate::session::message::{AssemblyError, Message, Reassembly};

/// The longest frame header: two bytes, a 64-bit length and the mask.
pub const MAX_HEADER: usize = 14;

/// What one chunk of bytes produced, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A frame, unmasked.
    Frame {
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The frame before it completed a message.
    Message(Message),
    /// The stream was refused: the code of the session's close frame. Nothing follows.
    Close(u16),
}

/// The codec with the session's buffers.
pub struct Decoder {
    inbox: BytesMut,
    reassembly: Reassembly,
    max_bytes: usize,
    /// A close was decided (the session's or the client's): the session reads no further.
    done: bool,
}

impl Decoder {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inbox: BytesMut::new(),
            reassembly: Reassembly::default(),
            max_bytes,
            done: false,
        }
    }

    /// Appends a chunk and takes every complete frame out of it; "need more" is the end of the list
    /// without a `Close` (see [`Self::pending`]).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        if self.done {
            return outcomes;
        }
        self.inbox.extend_from_slice(chunk);
        loop {
            let raw = match parse(&mut self.inbox, self.max_bytes) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(error) => {
                    outcomes.push(Outcome::Close(frame_close(error)));
                    self.done = true;
                    break;
                }
            };
            outcomes.push(Outcome::Frame {
                fin: raw.fin,
                opcode: raw.opcode,
                payload: raw.payload.to_vec(),
            });
            match self.reassembly.push(raw, self.max_bytes) {
                Ok(None) => {}
                Ok(Some(message)) => {
                    self.done = matches!(message, Message::Close(_));
                    outcomes.push(Outcome::Message(message));
                    if self.done {
                        break;
                    }
                }
                Err(error) => {
                    outcomes.push(Outcome::Close(assembly_close(error)));
                    self.done = true;
                    break;
                }
            }
        }
        outcomes
    }

    /// Feeds every chunk in turn; all the outcomes.
    pub fn feed_all<'a>(&mut self, chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Outcome> {
        chunks.into_iter().flat_map(|c| self.feed(c)).collect()
    }

    /// Bytes of a frame or a message begun and not finished.
    pub fn pending(&self) -> bool {
        !self.done && (!self.inbox.is_empty() || self.reassembly.in_progress())
    }

    /// Bytes held while reading goes on: the unparsed frame, and the message being reassembled.
    /// After a close the session reads nothing more and drops both.
    pub fn held(&self) -> (usize, usize) {
        match self.done {
            true => (0, 0),
            false => (self.inbox.len(), self.reassembly.held()),
        }
    }
}

/// The codes `Session::read_messages` closes with.
fn frame_close(error: FrameError) -> u16 {
    match error {
        FrameError::TooLarge => 1009,
        FrameError::Protocol => 1002,
    }
}

fn assembly_close(error: AssemblyError) -> u16 {
    match error {
        AssemblyError::TooLarge => 1009,
        AssemblyError::Protocol => 1002,
        AssemblyError::InvalidUtf8 => 1007,
    }
}

/// `bytes` cut at the given chunk lengths, cycled (0 taken as 1); the rest in the last chunk.
pub fn split<'a>(bytes: &'a [u8], lengths: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    let mut lengths = lengths.iter().copied().map(|n| n.max(1)).cycle();
    while !rest.is_empty() {
        let n = lengths.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, after) = rest.split_at(n);
        chunks.push(chunk);
        rest = after;
    }
    chunks
}
