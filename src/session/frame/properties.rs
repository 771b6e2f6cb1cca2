//! Property tests of the session's codec on whatever a client may send: arbitrary bytes, and
//! frame-shaped bytes with arbitrary headers and payloads, in arbitrary chunkings. The codec never
//! panics; every outcome is a frame, a message, "need more" or a close code; the chunking changes
//! nothing; and it never holds more than one frame's header and the limit.

use proptest::prelude::*;

use super::decode::{Decoder, MAX_HEADER, Outcome, split};
use super::tests::client_frame;
use super::{CLOSE, CONTINUATION, TEXT};
use crate::session::message::Message;

/// A frame as a client might write it, right or wrong.
#[derive(Debug, Clone)]
struct Shaped {
    /// FIN, RSV1-3, opcode: mostly the valid ones.
    b0: u8,
    masked: bool,
    /// 0: the shortest length encoding; 1: 16-bit; 2: 64-bit (not the shortest is allowed).
    encoding: u8,
    /// A length claimed in place of the payload's, sometimes.
    claimed: Option<u64>,
    mask: [u8; 4],
    payload: Vec<u8>,
}

impl Shaped {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.b0);
        let length = self.claimed.unwrap_or(self.payload.len() as u64);
        let masked = if self.masked { 0x80 } else { 0 };
        match (self.encoding, length) {
            (0, n) if n < 126 => out.push(masked | n as u8),
            (0 | 1, n) if n <= 0xFFFF => {
                out.push(masked | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            (_, n) => {
                out.push(masked | 127);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        if self.masked {
            out.extend_from_slice(&self.mask);
        }
        let mask = if self.masked { self.mask } else { [0; 4] };
        out.extend(
            self.payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4]),
        );
    }
}

fn shaped() -> impl Strategy<Value = Shaped> {
    let b0 = prop_oneof![
        // Whole messages and pings, fragments, a close, anything.
        12 => prop::sample::select(vec![0x81, 0x82, 0x89, 0x8A]),
        6 => prop::sample::select(vec![0x01, 0x02, 0x00, 0x80]),
        1 => Just(0x88),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        "\\PC{0,40}".prop_map(String::into_bytes),
        // A close frame's payload: a code, a short reason.
        (prop_oneof![990..=1020u16, any::<u16>()], "\\PC{0,8}").prop_map(|(code, reason)| {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            payload
        }),
    ];
    let claimed = prop::option::weighted(
        0.05,
        prop_oneof![
            0..400u64,
            Just(u64::MAX),
            Just(1 << 63),
            Just(u64::from(u32::MAX))
        ],
    );
    (
        b0,
        prop::bool::weighted(0.98),
        0..3u8,
        claimed,
        any::<[u8; 4]>(),
        payload,
    )
        .prop_map(|(b0, masked, encoding, claimed, mask, payload)| Shaped {
            b0,
            masked,
            encoding,
            claimed,
            mask,
            payload,
        })
}

fn frames() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(shaped(), 0..8).prop_map(|frames| {
        let mut out = Vec::new();
        for frame in &frames {
            frame.write(&mut out);
        }
        out
    })
}

/// Bytes a client may send: pure noise, or frame-shaped, or frames then noise.
fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..600),
        4 => frames(),
        1 => (frames(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(mut f, noise)| {
            f.extend(noise);
            f
        }),
    ]
}

fn chunk_lengths() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1..=3usize, 1..=64usize, 1..=1024usize], 1..12)
}

/// Every outcome is what the session can act on, within the limit; a close is last.
fn check_outcomes(outcomes: &[Outcome], max: usize) -> Result<(), TestCaseError> {
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Outcome::Frame {
                fin,
                opcode,
                payload,
            } => {
                prop_assert!(payload.len() <= max);
                prop_assert!(matches!(opcode, 0x0..=0x2 | 0x8..=0xA), "{opcode}");
                if *opcode >= CLOSE {
                    prop_assert!(*fin && payload.len() <= 125, "a control frame");
                }
            }
            Outcome::Message(message) => {
                if let Message::Close(code) = message {
                    prop_assert!(i + 1 == outcomes.len(), "nothing after the client's close");
                    prop_assert!(matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999));
                }
            }
            Outcome::Close(code) => {
                prop_assert!(i + 1 == outcomes.len(), "nothing after a close");
                prop_assert!(matches!(code, 1002 | 1007 | 1009), "{code}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_in_any_chunking_decode_alike_within_the_limits(
        bytes in client_bytes(),
        lengths in chunk_lengths(),
        max in prop_oneof![0..=130usize, 100..=300usize],
    ) {
        let mut whole = Decoder::new(max);
        let expected = whole.feed(&bytes);
        check_outcomes(&expected, max)?;

        let mut chunked = Decoder::new(max);
        let mut outcomes = Vec::new();
        for chunk in split(&bytes, &lengths) {
            outcomes.extend(chunked.feed(chunk));
            // Bounded: at most one unfinished frame (its header and the limit) and one message.
            let (inbox, message) = chunked.held();
            prop_assert!(inbox < MAX_HEADER + max, "{inbox} bytes held, limit {max}");
            prop_assert!(message <= max, "{message} bytes of message held, limit {max}");
        }
        prop_assert_eq!(&outcomes, &expected);
        prop_assert_eq!(chunked.pending(), whole.pending());
    }

    #[test]
    fn a_text_message_in_any_fragments_is_accepted_exactly_when_it_is_utf8(
        bytes in prop_oneof![
            "\\PC{0,60}".prop_map(String::into_bytes),
            // Valid text with one byte changed.
            ("\\PC{1,60}", any::<prop::sample::Index>(), any::<u8>()).prop_map(|(s, at, byte)| {
                let mut bytes = s.into_bytes();
                let at = at.index(bytes.len());
                bytes[at] = byte;
                bytes
            }),
            prop::collection::vec(any::<u8>(), 0..60),
        ],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        lengths in chunk_lengths(),
    ) {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        bounds.extend([0, bytes.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        if bounds.len() == 1 {
            bounds.push(0); // An empty message: one empty frame.
        }
        let pieces = bounds.len() - 1;
        let mut stream = Vec::new();
        for (i, piece) in bounds.windows(2).enumerate() {
            let opcode = if i == 0 { TEXT } else { CONTINUATION };
            stream.extend(client_frame(i + 1 == pieces, opcode, &bytes[piece[0]..piece[1]]));
        }
        let outcomes = Decoder::new(1024).feed_all(split(&stream, &lengths));
        let frames = outcomes.iter().filter(|o| matches!(o, Outcome::Frame { .. })).count();
        match std::str::from_utf8(&bytes) {
            Ok(text) => {
                prop_assert_eq!(frames, pieces);
                prop_assert_eq!(
                    outcomes.last(),
                    Some(&Outcome::Message(Message::Text(text.to_string())))
                );
            }
            Err(error) => {
                prop_assert_eq!(outcomes.last(), Some(&Outcome::Close(1007)));
                // Failed fast: no later than the fragment that holds the byte after the first bad
                // sequence (or the last fragment, when the text ends inside a character).
                let bad = match error.error_len() {
                    Some(len) => (error.valid_up_to() + len).min(bytes.len() - 1),
                    None => bytes.len() - 1,
                };
                let holding = bounds.windows(2).position(|w| w[0] <= bad && bad < w[1]);
                prop_assert!(frames <= holding.map_or(pieces, |p| p + 1), "{frames} frames read");
            }
        }
    }
}
