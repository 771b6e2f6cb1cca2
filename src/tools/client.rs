//! A minimal agentwire client over real sockets (HTTP/1.1 and WebSocket), used by
//! `agentwire probe` and `agentwire bench`. Only `http://` targets: the tools run beside the
//! gateway, and `tokio::spawn` here serves the tools only.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};

pub type Socket = WebSocket<TokioIo<Upgraded>>;

/// Where the gateway listens.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// The URL's path and query (`/` when it has none).
    pub path: String,
    /// A key sent as `Authorization: Bearer` with every HTTP request.
    pub bearer: Option<String>,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "only http:// URLs are supported (got `{url}`)"
        );
        let host = uri.host().context("the URL has no host")?.to_string();
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            bearer: None,
        })
    }

    /// The same target, with a key for its HTTP requests.
    pub fn with_bearer(&self, key: Option<&str>) -> Self {
        Self {
            bearer: key.map(str::to_string),
            ..self.clone()
        }
    }

    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub async fn connect(&self) -> anyhow::Result<TcpStream> {
        TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {}", self.authority()))
    }

    /// Connects from a chosen local address (to spread sockets over 127.0.0.x sources).
    pub async fn connect_from(&self, local: IpAddr) -> anyhow::Result<TcpStream> {
        let remote: SocketAddr = tokio::net::lookup_host(self.authority())
            .await?
            .next()
            .with_context(|| format!("{} does not resolve", self.authority()))?;
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(local, 0))
            .with_context(|| format!("cannot bind {local}"))?;
        socket
            .connect(remote)
            .await
            .with_context(|| format!("cannot connect to {remote} from {local}"))
    }

    /// One request on a fresh connection; the body as JSON (or as a string if it is not JSON).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut connection = Http::open(self).await?;
        connection.request(method, path, body).await
    }

    /// Opens a WebSocket on `/ws` over `stream`.
    pub async fn websocket(&self, stream: TcpStream) -> anyhow::Result<Socket> {
        let request = Request::builder()
            .uri("/ws")
            .header("host", self.authority())
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())?;
        let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
            .await
            .context("WebSocket upgrade on /ws failed")?;
        Ok(ws)
    }
}

/// A kept-alive HTTP/1.1 connection.
pub struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    bearer: Option<String>,
}

impl Http {
    pub async fn open(target: &Target) -> anyhow::Result<Self> {
        Self::over(target, target.connect().await?).await
    }

    /// A connection from a chosen local address (per-address budgets count each source apart).
    pub async fn open_from(target: &Target, local: IpAddr) -> anyhow::Result<Self> {
        Self::over(target, target.connect_from(local).await?).await
    }

    async fn over(target: &Target, stream: TcpStream) -> anyhow::Result<Self> {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            authority: target.authority(),
            bearer: target.bearer.clone(),
        })
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, Value)> {
        self.sender.ready().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/json");
        if let Some(key) = &self.bearer {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

pub async fn send(ws: &mut Socket, frame: &Value) -> anyhow::Result<()> {
    let text = frame.to_string();
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
        .context("writing to the WebSocket")
}

/// The next text frame's bytes, skipping heartbeats and control frames; an error on close.
pub async fn next_text(ws: &mut Socket) -> anyhow::Result<Vec<u8>> {
    loop {
        let frame = ws
            .read_frame()
            .await
            .context("reading from the WebSocket")?;
        match frame.opcode {
            OpCode::Text if &frame.payload[..] != br#"{"type":"heartbeat"}"# => {
                return Ok(frame.payload.to_vec());
            }
            OpCode::Close => {
                let code = frame
                    .payload
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(1005);
                bail!("the gateway closed the connection with {code}");
            }
            _ => {}
        }
    }
}

/// The next JSON data frame.
pub async fn next_data(ws: &mut Socket) -> anyhow::Result<Value> {
    let bytes = next_text(ws).await?;
    serde_json::from_slice(&bytes).context("a frame that is not JSON")
}

pub async fn expect_type(ws: &mut Socket, kind: &str) -> anyhow::Result<Value> {
    let frame = next_data(ws).await?;
    ensure!(
        frame["type"] == kind,
        "expected a {kind} frame, received {frame}"
    );
    Ok(frame)
}
