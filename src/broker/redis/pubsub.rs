//! The pub/sub connection's two ends, on one server (`SUBSCRIBE`, a RESP2 pub/sub connection) or
//! on a Redis Cluster (`SSUBSCRIBE`, sharded pub/sub over the redis crate's RESP3 cluster
//! connection, whose messages arrive as pushes). `live.rs` drives either the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use super::conn::Backend;

/// Pushes waiting for the pub/sub task (Cluster mode). The redis crate cannot wait for room: a
/// push that finds the queue full is dropped and the task reads every mirrored stream instead.
const PUSHES: usize = 4096;

/// Subscriptions sent at once when a Cluster connection subscribes to many channels.
const IN_FLIGHT: usize = 64;

/// The command side: subscribe, unsubscribe, ping.
pub(super) enum Sink {
    Server(PubSubSink),
    Cluster(ClusterConnection),
}

/// The message side.
pub(super) enum Messages {
    Server(PubSubStream),
    Cluster {
        pushes: mpsc::Receiver<PushInfo>,
        /// Set when a push was dropped on a full queue.
        overflowed: Arc<AtomicBool>,
    },
}

/// What came in on the connection.
pub(super) enum Incoming {
    /// A message published to `channel`.
    Message { channel: String, payload: Bytes },
    /// Cluster: the redis crate subscribed to `channel` again (a node reconnected, or its slot
    /// moved to another master), so what was published meanwhile must be read from the stream.
    Resubscribed(String),
    /// Cluster: a node ended the subscription to `channel` (its slot left that node), or
    /// confirmed an unsubscription asked for.
    Unsubscribed(String),
    /// Cluster: pushes were dropped on a full queue: every mirrored stream must be read.
    Overflowed,
    /// Cluster: the connection to a node was lost. The redis crate would subscribe again only
    /// once something sends it a command for that node's slots; a new connection learns where
    /// every slot is now (after a failover, the promoted replica).
    NodeLost,
    /// Nothing to act on (a confirmation, a disconnection the crate repairs).
    Other,
}

/// Opens the pub/sub connection.
pub(super) async fn open(backend: &Backend) -> RedisResult<(Sink, Messages)> {
    match backend {
        Backend::Server(client) => {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            Ok((Sink::Server(sink), Messages::Server(stream)))
        }
        Backend::Cluster { seeds, ca, .. } => {
            let (sender, pushes) = mpsc::channel(PUSHES);
            let overflowed = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&overflowed);
            let push = move |push: PushInfo| match sender.try_send(push) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    flag.store(true, Ordering::Release);
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
            };
            let conn = Backend::cluster_pubsub(seeds, ca.clone(), push).await?;
            Ok((
                Sink::Cluster(conn),
                Messages::Cluster { pushes, overflowed },
            ))
        }
    }
}

impl Sink {
    pub(super) async fn subscribe(&mut self, channels: Vec<String>) -> RedisResult<()> {
        match self {
            Self::Server(sink) => sink.subscribe(channels).await,
            // One command per channel: a sharded subscription names channels of one slot only.
            Self::Cluster(conn) => {
                stream::iter(channels)
                    .map(|channel| {
                        let mut conn = conn.clone();
                        async move { conn.ssubscribe(channel).await }
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .try_collect()
                    .await
            }
        }
    }

    /// Whether (un)subscriptions are confirmed on the message side (Cluster: RESP3 pushes, as are
    /// those a node makes on its own).
    pub(super) fn confirms_by_push(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    pub(super) async fn unsubscribe(&mut self, channel: String) -> RedisResult<()> {
        match self {
            Self::Server(sink) => sink.unsubscribe(channel).await,
            Self::Cluster(conn) => conn.sunsubscribe(channel).await,
        }
    }

    /// Every node answers (Cluster: every master).
    pub(super) async fn ping(&mut self) -> RedisResult<()> {
        match self {
            Self::Server(sink) => sink.ping::<Value>().await.map(drop),
            Self::Cluster(conn) => redis::cmd("PING")
                .query_async::<Value>(conn)
                .await
                .map(drop),
        }
    }
}

impl Messages {
    /// The next thing that came in; `None` when the connection is gone.
    pub(super) async fn next(&mut self) -> Option<Incoming> {
        match self {
            Self::Server(stream) => {
                let message = stream.next().await?;
                Some(Incoming::Message {
                    channel: message.get_channel_name().to_string(),
                    payload: Bytes::copy_from_slice(message.get_payload_bytes()),
                })
            }
            Self::Cluster { pushes, overflowed } => {
                // The pushes still queued came before the one dropped; the resync that follows
                // reads past all of them.
                if overflowed.swap(false, Ordering::AcqRel) {
                    return Some(Incoming::Overflowed);
                }
                Some(incoming(pushes.recv().await?))
            }
        }
    }
}

fn incoming(push: PushInfo) -> Incoming {
    if push.kind != PushKind::SMessage {
        tracing::debug!(kind = ?push.kind, data = ?push.data, "A Redis Cluster push.");
    }
    let text = |value: Option<&Value>| match value {
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    };
    let mut data = push.data.into_iter();
    let channel = text(data.next().as_ref());
    match (push.kind, channel) {
        (PushKind::SMessage | PushKind::Message, Some(channel)) => match data.next() {
            Some(Value::BulkString(payload)) => Incoming::Message {
                channel,
                payload: payload.into(),
            },
            _ => Incoming::Other,
        },
        (PushKind::SSubscribe, Some(channel)) => Incoming::Resubscribed(channel),
        (PushKind::SUnsubscribe, Some(channel)) => Incoming::Unsubscribed(channel),
        (PushKind::Disconnection, _) => Incoming::NodeLost,
        _ => Incoming::Other,
    }
}
