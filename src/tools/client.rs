//! A minimal agentwire client over real sockets (HTTP/1.1 and WebSocket), used by
//! `agentwire probe` and `agentwire bench`. A target is `http://` or `https://` (TLS with rustls,
//! verifying the URL's host against the system's CA certificates plus an optional PEM CA file), as
//! the probe may reach the gateway through a TLS-terminating ingress. The bench stays on `http://`:
//! it binds chosen local addresses and runs beside the gateway. `tokio::spawn` here serves the tools
//! only.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as Task, Poll};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

pub type Socket = WebSocket<TokioIo<Upgraded>>;

/// A connection to the gateway: plain TCP, or TLS over TCP. hyper and fastwebsockets take any of
/// these, so both kinds go through the same HTTP and WebSocket code.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

/// Where the gateway listens.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// The URL's path and query (`/` when it has none).
    pub path: String,
    /// A key sent as `Authorization: Bearer` with every HTTP request.
    pub bearer: Option<String>,
    /// For an `https://` target: the TLS client (its trusted CAs), built once.
    tls: Option<TlsConnector>,
}

impl Target {
    /// An `http://` or `https://` URL (`ws://` and `wss://` mean the same: the WebSocket goes to
    /// `/ws` on that door either way). For `https://` the gateway's certificate must chain to
    /// one of the system's CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set) or to one
    /// in `ca_file` (PEM), and name the URL's host.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http" | "ws") => (None, 80),
            Some("https" | "wss") => (Some(tls_connector(ca_file)?), 443),
            _ => bail!("only http:// and https:// URLs are supported (got `{url}`)"),
        };
        let host = uri.host().context("the URL has no host")?.to_string();
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(default_port),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            bearer: None,
            tls,
        })
    }

    /// An `http://` URL only: the bench connects over plain TCP from chosen local addresses.
    pub fn parse_plain(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        ensure!(
            matches!(uri.scheme_str(), Some("http" | "ws")),
            "only http:// URLs are supported here (got `{url}`)"
        );
        Self::parse(url, None)
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

    /// The `Host` header: without the port when it is the scheme's own (what an ingress that
    /// routes by host name expects).
    fn host_header(&self) -> String {
        match (&self.tls, self.port) {
            (None, 80) | (Some(_), 443) => self.host.clone(),
            _ => self.authority(),
        }
    }

    /// A connection to the target: TCP, and TLS over it for an `https://` target.
    pub async fn connect(&self) -> anyhow::Result<Stream> {
        // The authority, not (host, port): an IPv6 host keeps its brackets in a URL.
        let tcp = TcpStream::connect(self.authority())
            .await
            .with_context(|| format!("cannot connect to {}", self.authority()))?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        // What the certificate must name: a host name (also sent as SNI) or an IP address.
        let name = self.host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(name.to_string())
            .with_context(|| format!("`{name}` is not a host name TLS can verify"))?;
        match tls.connect(name, tcp).await {
            Ok(stream) => Ok(Box::new(stream)),
            Err(error) => {
                // rustls says why; an unknown issuer has a remedy worth naming.
                let unknown_issuer = matches!(
                    error
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer
                    ))
                );
                let hint = if unknown_issuer {
                    " (its certificate is not signed by a CA the probe trusts: for a private CA, pass --ca-file)"
                } else {
                    ""
                };
                Err(error).with_context(|| {
                    format!("TLS handshake with {} failed{hint}", self.authority())
                })
            }
        }
    }

    /// Connects from a chosen local address (to spread sockets over 127.0.0.x sources).
    pub async fn connect_from(&self, local: IpAddr) -> anyhow::Result<TcpStream> {
        ensure!(
            self.tls.is_none(),
            "connections from a chosen local address are plain TCP: an http:// target only"
        );
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
    pub async fn websocket(&self, stream: impl Io + 'static) -> anyhow::Result<Socket> {
        self.websocket_at(stream, "/ws").await
    }

    /// Opens a WebSocket on `path` over `stream`.
    pub async fn websocket_at(
        &self,
        stream: impl Io + 'static,
        path: &str,
    ) -> anyhow::Result<Socket> {
        let request = Request::builder()
            .uri(path)
            .header("host", self.host_header())
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
            .with_context(|| format!("WebSocket upgrade on {path} failed"))?;
        Ok(ws)
    }
}

/// A kept-alive HTTP/1.1 connection.
pub struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
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

    async fn over(target: &Target, stream: impl Io + 'static) -> anyhow::Result<Self> {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: target.host_header(),
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
            .header("host", &self.host)
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
        answer(response).await
    }
}

/// A response's status and body, as JSON (or as a string if it is not JSON).
async fn answer(response: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<(u16, Value)> {
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// Pieces an [`Upload`] writes before the writer waits for the socket.
const UPLOAD_QUEUE: usize = 16;

/// A `POST` whose body is written piece by piece as it is produced (`Transfer-Encoding:
/// chunked`), answered when the body ends: a producer's long-lived event stream.
pub struct Upload {
    body: mpsc::Sender<Bytes>,
    answer: tokio::task::JoinHandle<anyhow::Result<(u16, Value)>>,
}

impl Upload {
    /// Sends the request's head from `local` (plain TCP); the body follows with [`Upload::send`].
    pub async fn start(
        target: &Target,
        local: IpAddr,
        path: &str,
        content_type: &str,
    ) -> anyhow::Result<Self> {
        let stream = target.connect_from(local).await?;
        // Each piece is one small write that should leave at once, not wait for the previous
        // one's ACK (Nagle's algorithm against a delayed ACK would add up to 40 ms).
        stream.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let (body, pieces) = mpsc::channel(UPLOAD_QUEUE);
        let mut request = Request::builder()
            .method("POST")
            .uri(path)
            .header("host", target.host_header())
            .header("content-type", content_type);
        if let Some(key) = &target.bearer {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request.body(Pieces(pieces))?;
        let path = path.to_string();
        let answer = tokio::spawn(async move {
            let response = sender
                .send_request(request)
                .await
                .with_context(|| format!("POST {path}"))?;
            answer(response).await
        });
        Ok(Self { body, answer })
    }

    /// Writes one piece of the body; an error once the server has answered (it reads no more)
    /// or the connection broke: [`Upload::finish`] says which.
    pub async fn send(&self, piece: Bytes) -> anyhow::Result<()> {
        self.body
            .send(piece)
            .await
            .ok()
            .context("the body is no longer read")
    }

    /// Ends the body and waits for the answer.
    pub async fn finish(self) -> anyhow::Result<(u16, Value)> {
        drop(self.body);
        self.answer.await?
    }
}

/// The body of an [`Upload`]: what its sender queues, then its end when the sender is dropped.
struct Pieces(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Task<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|piece| Ok(hyper::body::Frame::data(piece))))
    }
}

/// A TLS client trusting the system's CA certificates and those in `ca_file`, with the process's
/// provider (`ring`, as the gateway's own clients), speaking HTTP/1.1 only.
fn tls_connector(ca_file: Option<&Path>) -> anyhow::Result<TlsConnector> {
    crate::outbound::install_tls_provider();
    let mut roots = rustls::RootCertStore::empty();
    // What cannot be read or parsed is skipped: another root may still verify the gateway, and
    // an empty set is refused below.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?;
        ensure!(
            !certs.is_empty(),
            "the CA file {} holds no PEM certificate",
            path.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {} cannot be parsed", path.display()))?;
        }
    }
    if roots.is_empty() {
        let why: Vec<String> = system.errors.iter().map(ToString::to_string).collect();
        bail!(
            "no CA certificate to verify the gateway with: none found on this system ({}) and no --ca-file",
            if why.is_empty() {
                "no error".into()
            } else {
                why.join("; ")
            }
        );
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
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
