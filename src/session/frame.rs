//! WebSocket framing (RFC 6455) for the server side, done here rather than by a library so that a
//! connection owns no buffer while it is idle: client frames are parsed out of the session's own
//! read buffer, and server frames are encoded into one write buffer per flush, so every frame a
//! connection has queued leaves in one syscall.

use bytes::{Buf, BytesMut};

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CONTINUATION: u8 = 0x0;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// One frame from a client, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Raw {
    pub fin: bool,
    pub opcode: u8,
    pub payload: BytesMut,
}

/// Why the byte stream cannot be read as WebSocket frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A payload over the limit (close 1009).
    TooLarge,
    /// Broken framing: unmasked client frame, reserved bits, unknown opcode, bad control frame (1002).
    Protocol,
}

/// Takes the next complete frame out of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Raw>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 || !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(FrameError::Protocol);
    }
    // Clients must mask every frame.
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol);
    }
    let (length, header) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            // RFC 6455: the most significant bit of a 64-bit length must be 0.
            if bytes[0] & 0x80 != 0 {
                return Err(FrameError::Protocol);
            }
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let control = opcode >= CLOSE;
    if control && (!fin || length > 125) {
        return Err(FrameError::Protocol);
    }
    if length > max_payload as u64 {
        return Err(FrameError::TooLarge);
    }
    let length = length as usize;
    // Not reserved ahead: a frame that claims 64 KiB and trickles holds only what has arrived.
    if buf.len() < header + 4 + length {
        return Ok(None);
    }
    let mask = [
        buf[header],
        buf[header + 1],
        buf[header + 2],
        buf[header + 3],
    ];
    buf.advance(header + 4);
    let mut payload = buf.split_to(length);
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
    Ok(Some(Raw {
        fin,
        opcode,
        payload,
    }))
}

/// The code of a client's close frame, to echo (1000 when it sent none); `Err` for a payload
/// RFC 6455 forbids (one byte, a code that may not be sent, a reason that is not UTF-8).
pub fn close_code(payload: &[u8]) -> Result<u16, ()> {
    match payload {
        [] => Ok(1000),
        [_] => Err(()),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            // RFC 6455 §7.4 and IANA's registry: 1004 is reserved, 1005 and 1006 are never sent,
            // 1015 is for TLS failures only, 1016–2999 are unassigned; 3000–4999 are free to use.
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed || std::str::from_utf8(reason).is_err() {
                return Err(());
            }
            Ok(code)
        }
    }
}

/// Appends one unmasked, unfragmented server frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    // One allocation for an empty buffer (an idle session keeps none), not one per push.
    out.reserve(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with a code and a short reason.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    encode(out, CLOSE, &payload);
}

#[cfg(test)]
mod decode;
#[cfg(test)]
mod differential;
#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser sends it (masked).
    pub(super) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    type Parsed<'a> = Result<Option<(bool, u8, &'a [u8])>, FrameError>;

    fn check(bytes: &[u8], max: usize, expected: Parsed<'_>) {
        let mut buf = BytesMut::from(bytes);
        let got = parse(&mut buf, max);
        let got = got.map(|frame| frame.map(|f| (f.fin, f.opcode, f.payload.to_vec())));
        let expected = expected.map(|frame| frame.map(|(fin, op, p)| (fin, op, p.to_vec())));
        assert_eq!(got, expected);
    }

    #[test]
    fn parses_client_frames() {
        check(
            &client_frame(true, TEXT, b"{\"type\":\"ping\"}"),
            1024,
            Ok(Some((true, TEXT, b"{\"type\":\"ping\"}"))),
        );
        let long = vec![b'a'; 300];
        check(
            &client_frame(true, TEXT, &long),
            1024,
            Ok(Some((true, TEXT, &long))),
        );
        let huge = vec![b'a'; 70_000];
        check(
            &client_frame(true, BINARY, &huge),
            100_000,
            Ok(Some((true, BINARY, &huge))),
        );
        check(
            &client_frame(false, TEXT, b"par"),
            1024,
            Ok(Some((false, TEXT, b"par"))),
        );
        check(
            &client_frame(true, PING, b"hi"),
            1024,
            Ok(Some((true, PING, b"hi"))),
        );
        check(&client_frame(true, TEXT, &long)[..100], 1024, Ok(None));
        check(
            &client_frame(true, TEXT, &long),
            299,
            Err(FrameError::TooLarge),
        );
        check(
            &client_frame(true, PING, &long),
            1024,
            Err(FrameError::Protocol),
        );
        check(
            &client_frame(false, PING, b""),
            1024,
            Err(FrameError::Protocol),
        );
        check(&[0x81, 0x02, b'h', b'i'], 1024, Err(FrameError::Protocol));
        check(&[0x83, 0x80, 0, 0, 0, 0], 1024, Err(FrameError::Protocol));
        check(&[0xC1, 0x80, 0, 0, 0, 0], 1024, Err(FrameError::Protocol));
    }

    #[test]
    fn two_frames_in_one_read_come_out_one_by_one() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&client_frame(true, TEXT, b"one"));
        buf.extend_from_slice(&client_frame(true, TEXT, b"two"));
        assert_eq!(parse(&mut buf, 64).unwrap().unwrap().payload, &b"one"[..]);
        assert_eq!(parse(&mut buf, 64).unwrap().unwrap().payload, &b"two"[..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn validates_close_payloads() {
        assert_eq!(close_code(b""), Ok(1000));
        assert_eq!(close_code(&[0x03, 0xE9]), Ok(1001));
        assert_eq!(close_code(&[0x0F, 0xA0, b'o', b'k']), Ok(4000));
        assert_eq!(close_code(&[0x03]), Err(()));
        assert_eq!(close_code(&[0x03, 0xED]), Err(()), "1005 is reserved");
        assert_eq!(close_code(&[0x03, 0xE8, 0xFF]), Err(()), "reason not UTF-8");
    }

    #[test]
    fn the_registered_close_codes_are_valid_and_the_others_are_not() {
        let valid = |code: u16| close_code(&code.to_be_bytes()).is_ok();
        for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011] {
            assert!(valid(code), "{code}");
        }
        for code in [1012, 1013, 1014] {
            assert!(
                valid(code),
                "{code}: registered with IANA, a client may send it"
            );
        }
        for code in [3000, 3999, 4000, 4999] {
            assert!(valid(code), "{code}");
        }
        let reserved = [1004, 1005, 1006, 1015, 1016, 2000, 2999];
        let out_of_range = [0, 1, 999, 5000, u16::MAX];
        for code in reserved.into_iter().chain(out_of_range) {
            assert!(!valid(code), "{code}");
        }
    }

    #[test]
    fn encodes_server_frames() {
        let mut out = Vec::new();
        encode(&mut out, TEXT, b"hi");
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        out.clear();
        encode(&mut out, TEXT, &[0; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        out.clear();
        encode_close(&mut out, 4008, "slow_consumer");
        assert_eq!(&out[..4], &[0x88, 15, 0x0F, 0xA8]);
    }
}
