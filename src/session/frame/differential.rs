//! Differential test of the session's codec: client frames encoded, masked, by an independent
//! implementation (tungstenite) are read back by [`super::parse`] and the reassembly, in any
//! chunking of the byte stream, as exactly the frames and messages tungstenite encoded.

use bytes::Bytes;
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};

use super::decode::{Decoder, Outcome, split};
use crate::session::message::Message;

/// The limit the decoder runs with: a 65,537-byte message fits.
const MAX: usize = 70_000;

/// A control frame a client may send between the fragments of a message.
#[derive(Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

/// One thing a client sends.
#[derive(Debug, Clone)]
enum Sent {
    /// A text or binary message, cut into fragments at `cuts` (byte offsets, anywhere: inside a
    /// UTF-8 character too), with a control frame after some fragments.
    Data {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        between: Vec<Option<Control>>,
    },
    Control(Control),
    /// A close frame: no payload, or a code and a reason. Ends the stream.
    Close(Option<(u16, String)>),
}

/// Encodes what a client sends with tungstenite, masked with `masks` in turn; the bytes and the
/// outcomes the session's codec must produce: each frame as tungstenite built it, and the message
/// each completes.
fn encode(sent: &[Sent], masks: &[[u8; 4]]) -> (Vec<u8>, Vec<Outcome>) {
    let mut masks = masks.iter().copied().cycle();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    let mut put = |mut frame: Frame, message: Option<Message>| {
        frame.header_mut().mask = masks.next();
        expected.push(Outcome::Frame {
            fin: frame.header().is_final,
            opcode: u8::from(frame.header().opcode),
            payload: frame.payload().to_vec(),
        });
        expected.extend(message.map(Outcome::Message));
        frame.format(&mut bytes).expect("a Vec takes any frame");
    };
    let control = |control: &Control| match control {
        Control::Ping(data) => (
            Frame::ping(data.clone()),
            Message::Ping(Bytes::from(data.clone())),
        ),
        Control::Pong(data) => (Frame::pong(data.clone()), Message::Pong),
    };
    for item in sent {
        match item {
            Sent::Data {
                text,
                payload,
                cuts,
                between,
            } => {
                let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                bounds.sort_unstable();
                bounds.dedup();
                bounds.retain(|&b| b > 0 && b < payload.len());
                bounds.insert(0, 0);
                bounds.push(payload.len());
                let pieces = bounds.len() - 1;
                let kind = if *text { Data::Text } else { Data::Binary };
                for i in 0..pieces {
                    let fin = i + 1 == pieces;
                    let opcode = OpCode::Data(if i == 0 { kind } else { Data::Continue });
                    let data = payload[bounds[i]..bounds[i + 1]].to_vec();
                    let message = fin.then(|| match text {
                        true => Message::Text(
                            String::from_utf8(payload.clone()).expect("text is UTF-8"),
                        ),
                        false => Message::Binary,
                    });
                    put(Frame::message(data, opcode, fin), message);
                    if let (false, Some(Some(between))) = (fin, between.get(i)) {
                        let (frame, message) = control(between);
                        put(frame, Some(message));
                    }
                }
            }
            Sent::Control(c) => {
                let (frame, message) = control(c);
                put(frame, Some(message));
            }
            Sent::Close(None) => put(Frame::close(None), Some(Message::Close(1000))),
            Sent::Close(Some((code, reason))) => {
                let close = CloseFrame {
                    code: (*code).into(),
                    reason: reason.as_str().into(),
                };
                put(Frame::close(Some(close)), Some(Message::Close(*code)));
            }
        }
    }
    (bytes, expected)
}

/// `len` bytes of text: the alphabet's characters in turn, ASCII at the end to make it exact.
fn text_of(len: usize, alphabet: &[char]) -> Vec<u8> {
    let mut text = String::with_capacity(len);
    for c in alphabet.iter().cycle() {
        if text.len() + c.len_utf8() > len {
            break;
        }
        text.push(*c);
    }
    while text.len() < len {
        text.push('a');
    }
    text.into_bytes()
}

/// `len` bytes: text of the alphabet's characters, or binary of their code points' bytes.
fn payload_of(text: bool, len: usize, alphabet: &[char]) -> Vec<u8> {
    match text {
        true => text_of(len, alphabet),
        false => {
            let bytes = alphabet.iter().flat_map(|c| u32::from(*c).to_be_bytes());
            bytes.cycle().take(len).collect()
        }
    }
}

fn data(text: bool, len: usize, cuts: &[usize], between: Vec<Option<Control>>) -> Sent {
    Sent::Data {
        text,
        payload: payload_of(text, len, &['h', 'é', '€', '😀', '"', '\u{0}']),
        cuts: cuts.to_vec(),
        between,
    }
}

/// Every size around the length encodings' edges, both kinds, whole and fragmented, with control
/// frames between fragments, and each close code a client may send.
fn corpus() -> Vec<Vec<Sent>> {
    let mut stream = Vec::new();
    for len in [0, 1, 2, 125, 126, 127, 65_535, 65_536, 65_537] {
        stream.push(data(true, len, &[], vec![]));
        stream.push(data(false, len, &[], vec![]));
    }
    // "€" is three bytes: cut after its first and second byte.
    stream.push(Sent::Data {
        text: true,
        payload: "a€b€".as_bytes().to_vec(),
        cuts: vec![2, 3, 6],
        between: vec![
            Some(Control::Ping(b"mid".to_vec())),
            None,
            Some(Control::Pong(vec![])),
        ],
    });
    stream.push(data(
        true,
        65_536,
        &[1, 125, 126, 65_535],
        vec![
            Some(Control::Ping(vec![7; 125])),
            None,
            Some(Control::Pong(b"p".to_vec())),
        ],
    ));
    stream.push(data(
        false,
        300,
        &[0, 100, 200],
        vec![Some(Control::Ping(vec![]))],
    ));
    for len in [0, 1, 125] {
        stream.push(Sent::Control(Control::Ping(vec![0xFF; len])));
        stream.push(Sent::Control(Control::Pong(vec![0x80; len])));
    }
    let mut streams = vec![stream.clone()];
    let closes = [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999];
    for code in closes {
        let mut with_close = stream[..2].to_vec();
        with_close.push(Sent::Close(Some((code, "bye ✓".to_string()))));
        streams.push(with_close);
    }
    stream.push(Sent::Close(Some((1000, "r".repeat(123)))));
    streams.push(stream);
    streams.push(vec![Sent::Close(None)]);
    streams
}

#[test]
fn tungstenite_frames_read_back_whole_and_one_byte_at_a_time() {
    for (i, sent) in corpus().iter().enumerate() {
        let (bytes, expected) = encode(sent, &[[0x37, 0xFA, 0x21, 0x3D], [0, 0, 0, 0]]);
        let mut whole = Decoder::new(MAX);
        assert_eq!(whole.feed(&bytes), expected, "stream {i}, whole");
        assert!(!whole.pending());
        let mut bytewise = Decoder::new(MAX);
        assert_eq!(
            bytewise.feed_all(bytes.chunks(1)),
            expected,
            "stream {i}, one byte at a time"
        );
        for lengths in [&[2, 3, 5, 7][..], &[125, 1, 126], &[4096], &[65_535, 3]] {
            let mut chunked = Decoder::new(MAX);
            assert_eq!(
                chunked.feed_all(split(&bytes, lengths)),
                expected,
                "stream {i}, chunks of {lengths:?}"
            );
        }
    }
}

fn control() -> impl Strategy<Value = Control> {
    let payload = prop::collection::vec(any::<u8>(), 0..=125);
    prop_oneof![
        payload.clone().prop_map(Control::Ping),
        payload.prop_map(Control::Pong),
    ]
}

/// Lengths at the edges of the 7-bit, 16-bit and 64-bit length encodings, and small ones.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..=300usize,
        2 => 124..=127usize,
        1 => 65_534..=65_537usize,
    ]
}

fn sent() -> impl Strategy<Value = Sent> {
    let alphabet = prop::collection::vec(any::<char>(), 1..8);
    let between = prop::collection::vec(prop::option::of(control()), 0..4);
    let cuts = prop::collection::vec(any::<usize>(), 0..4);
    prop_oneof![
        3 => (any::<bool>(), length(), alphabet, cuts, between).prop_map(
            |(text, len, alphabet, cuts, between)| Sent::Data {
                text,
                payload: payload_of(text, len, &alphabet),
                cuts,
                between,
            }
        ),
        1 => control().prop_map(Sent::Control),
    ]
}

fn close() -> impl Strategy<Value = Sent> {
    let code = prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16];
    let reason = "\\PC{0,30}".prop_filter("at most 123 bytes", |r: &String| r.len() <= 123);
    prop::option::of((code, reason)).prop_map(Sent::Close)
}

fn stream() -> impl Strategy<Value = Vec<Sent>> {
    (
        prop::collection::vec(sent(), 1..6),
        prop::option::of(close()),
    )
        .prop_map(|(mut s, close)| {
            s.extend(close);
            s
        })
}

fn chunk_lengths() -> impl Strategy<Value = Vec<usize>> {
    let length = prop_oneof![1..=4usize, 1..=300usize, 1..=70_000usize];
    prop::collection::vec(length, 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn tungstenite_frames_read_back_in_any_chunking(
        sent in stream(),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..6),
        lengths in chunk_lengths(),
    ) {
        let (bytes, expected) = encode(&sent, &masks);
        let mut decoder = Decoder::new(MAX);
        prop_assert_eq!(decoder.feed_all(split(&bytes, &lengths)), expected);
        prop_assert!(!decoder.pending());
    }
}
