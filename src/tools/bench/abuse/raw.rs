//! Hand-made requests for the attacks that a well-behaved client library would not send: an upgrade
//! whose refusal status is read, frames written byte by byte, bodies that never arrive.

use std::net::IpAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tools::client::Target;

/// Opens `/ws` from `source` by hand: the status of the upgrade (101, or the refusal) and the
/// stream, right after the response head.
pub(super) async fn upgrade(target: &Target, source: IpAddr) -> anyhow::Result<(u16, TcpStream)> {
    let mut stream = target.connect_from(source).await?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.authority()
    );
    stream.write_all(request.as_bytes()).await?;
    let status = read_status(&mut stream).await?;
    Ok((status, stream))
}

/// Starts `POST /v1/events` from `source` declaring `length` bytes of body, and sends none of it.
pub(super) async fn start_post(
    api: &Target,
    source: IpAddr,
    length: usize,
) -> anyhow::Result<TcpStream> {
    let mut stream = api.connect_from(source).await?;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n",
        api.authority()
    );
    stream.write_all(head.as_bytes()).await?;
    Ok(stream)
}

/// Reads a response head and returns its status code (what follows the head is not kept).
pub(super) async fn read_status(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> anyhow::Result<u16> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the connection ended before a response");
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            bail!("a response head over 16 KiB");
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .context("a response without a status")
}

/// A client text frame carrying `payload` (masked with the zero key, so the bytes go as they are).
pub(super) fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = frame_header(payload.len());
    frame.extend_from_slice(payload);
    frame
}

/// The header of a masked client text frame claiming `length` bytes.
pub(super) fn frame_header(length: usize) -> Vec<u8> {
    let mut header = vec![0x81];
    match length {
        0..=125 => header.push(0x80 | length as u8),
        126..=0xFFFF => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(length as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}
