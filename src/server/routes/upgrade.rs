//! `GET /ws`: the WebSocket upgrade. hyper and fastwebsockets do the handshake only; the session
//! takes the TCP stream back so that no library buffer stays per connection.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Body, error};
use crate::Gateway;

pub(super) fn upgrade(gateway: Arc<Gateway>, mut request: Request<Incoming>) -> Response<Body> {
    if gateway.shutdown.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this replica is shutting down; connect to another",
            None,
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&request) {
        return error(
            StatusCode::BAD_REQUEST,
            "upgrade_required",
            "/ws expects a WebSocket upgrade",
            None,
        );
    }
    let (response, upgraded) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(pair) => pair,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string(), None),
    };
    let tracker = gateway.shutdown.tracker.clone();
    tracker.spawn(async move {
        let ws = match upgraded.await {
            Ok(ws) => ws,
            Err(error) => return tracing::debug!(%error, "WebSocket upgrade did not complete."),
        };
        // Take the TCP stream back from hyper: its upgraded wrapper keeps a read buffer per socket.
        match ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        {
            Ok(parts) => {
                let connection_id = format!("{:016x}", rand::random::<u64>());
                crate::session::serve(
                    gateway,
                    parts.io.into_inner(),
                    parts.read_buf,
                    connection_id,
                )
                .await;
            }
            Err(_) => tracing::error!("An upgraded connection is not a TCP stream; closing it."),
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Body::default())
}
