//! The connection to Redis: one server, or a Redis Cluster (`redis+cluster://` seed nodes). The
//! rest of the broker speaks to [`Conn`], a `ConnectionLike` either way; on a Cluster the redis
//! crate routes each command by its first key, follows `MOVED` and `ASK`, and refreshes its slot
//! map when a master fails over. What differs is here: a pipeline must stay in one slot
//! ([`Conn::each`] sends commands that span slots), and the pub/sub connection is the crate's
//! RESP3 cluster connection (`pubsub.rs`: sharded pub/sub, each message on the shard that owns its
//! channel). A command connection that stops answering while a fresh one answers is replaced
//! ([`Healing`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use futures_util::{StreamExt, stream};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Arg, Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::time::timeout;

/// Commands of [`Conn::each`] in flight at once, in Cluster mode.
const IN_FLIGHT: usize = 64;

/// Where the broker connects, chosen once from `broker.redis_url`.
pub(crate) enum Backend {
    Server(redis::Client),
    Cluster {
        client: Box<ClusterClient>,
        /// The seed nodes and the CA certificate, for the pub/sub connection's own client.
        seeds: Vec<String>,
        ca: Option<Vec<u8>>,
    },
}

/// How long a connection may take, and an answer: fail fast while Redis is away, so callers
/// answer 503 instead of hanging.
const CONNECT: Duration = Duration::from_secs(1);

impl Backend {
    pub(crate) fn new(url: &str, ca: Option<Vec<u8>>) -> anyhow::Result<Self> {
        if let Some(seeds) = crate::config::cluster_seeds(url).map_err(anyhow::Error::msg)? {
            let client = cluster_builder(&seeds, ca.clone())
                // A failover takes seconds: a few quick retries (MOVED, TRYAGAIN, a lost node),
                // then the caller answers 503 and its producer retries.
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(500)
                .overall_response_timeout(Some(Duration::from_secs(3)))
                .build()?;
            return Ok(Self::Cluster {
                client: Box::new(client),
                seeds,
                ca,
            });
        }
        Ok(Self::Server(match ca {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
            None => redis::Client::open(url)?,
        }))
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// Splits the channels of a report into the calls of a script that takes several at once: a
    /// script touches one slot, so on a Cluster a call takes channels of one slot; on one server
    /// any. At most `most` channels a call. `keys` is one key of each channel; the answer is the
    /// indexes each call takes, in their order.
    pub(crate) fn script_calls<'k>(
        &self,
        keys: impl Iterator<Item = &'k str>,
        most: usize,
    ) -> Vec<Vec<usize>> {
        let mut calls: Vec<Vec<usize>> = Vec::new();
        if let Self::Server(_) = self {
            // One server: any keys go together.
            for (i, _) in keys.enumerate() {
                match calls.last_mut() {
                    Some(call) if call.len() < most => call.push(i),
                    _ => calls.push(vec![i]),
                }
            }
            return calls;
        }
        // The call still filling for each slot.
        let mut open: HashMap<Slot, usize> = HashMap::new();
        for (i, key) in keys.enumerate() {
            let slot = Slot::for_key(key);
            match open.get(&slot) {
                Some(&call) if calls[call].len() < most => calls[call].push(i),
                _ => {
                    open.insert(slot, calls.len());
                    calls.push(vec![i]);
                }
            }
        }
        calls
    }

    /// A command connection, made lazily (a Redis down at start only shows as not ready), that
    /// reconnects by itself. `answer` bounds each reply; `retries` applies to one server.
    pub(crate) fn connect_lazily(&self, answer: Duration, retries: usize) -> RedisResult<Conn> {
        Ok(match self {
            Self::Server(client) => Conn::Server(ConnectionManager::new_lazy_with_config(
                client.clone(),
                manager_config(answer, retries),
            )?),
            Self::Cluster { client, .. } => Conn::Cluster(
                client.get_pending_async_connection_with_config(cluster_config(answer)),
            ),
        })
    }

    /// A command connection made now, as [`Self::connect_lazily`] makes them.
    async fn connect(&self, answer: Duration, retries: usize) -> RedisResult<Conn> {
        Ok(match self {
            Self::Server(client) => Conn::Server(
                ConnectionManager::new_with_config(client.clone(), manager_config(answer, retries))
                    .await?,
            ),
            Self::Cluster { client, .. } => Conn::Cluster(
                client
                    .get_async_connection_with_config(cluster_config(answer))
                    .await?,
            ),
        })
    }

    /// The Cluster's pub/sub connection (RESP3): subscriptions and messages arrive as pushes on
    /// `pushes`; the redis crate subscribes again by itself after a reconnect or a failover.
    pub(crate) async fn cluster_pubsub(
        seeds: &[String],
        ca: Option<Vec<u8>>,
        pushes: impl redis::aio::AsyncPushSender,
    ) -> RedisResult<ClusterConnection> {
        let client = cluster_builder(seeds, ca)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()?;
        let config = cluster_config(Duration::from_secs(2)).set_push_sender(pushes);
        client.get_async_connection_with_config(config).await
    }
}

fn manager_config(answer: Duration, retries: usize) -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT))
        .set_response_timeout(Some(answer))
        .set_number_of_retries(retries)
        .set_max_delay(Duration::from_millis(500))
}

fn cluster_config(answer: Duration) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(CONNECT)
        .set_response_timeout(answer)
}

fn cluster_builder(seeds: &[String], ca: Option<Vec<u8>>) -> ClusterClientBuilder {
    let builder = ClusterClientBuilder::new(seeds.to_vec());
    match ca {
        Some(root_cert) => builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        }),
        None => builder,
    }
}

/// Failed checks in a row before a fresh connection is tried.
const FAILED_BEFORE_RENEWAL: u32 = 2;
/// Replacements at most this often: a master that holds writes (`CLIENT PAUSE … WRITE`) makes every
/// connection's `PING` wait behind a held call, fresh ones too once they carry one, and replacing
/// each time would flip the broker up and down every tick and reload the topology for nothing.
const RENEWAL_GAP: Duration = Duration::from_secs(10);

/// A command connection that is replaced when it stops answering while a fresh one answers.
/// The redis crate repairs lost connections, not wedged ones: its Cluster connection can stay
/// for good in the slot refresh that follows a failover (every later command times out while
/// the other replicas' connections have recovered), and a connection whose packets vanish
/// (a NAT or load balancer that forgot it) times out without ever being called lost.
pub(crate) struct Healing {
    current: ArcSwap<Conn>,
    answer: Duration,
    retries: usize,
    /// Checks failed in a row.
    failed: AtomicU32,
    /// When a fresh connection last took this one's place.
    replaced_at: Mutex<Option<Instant>>,
}

/// What [`Healing::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Answered,
    /// The connection did not answer; a fresh one did, and took its place.
    Replaced,
    /// Neither answered: Redis is away (or still failing over).
    Away,
}

impl Healing {
    /// Made lazily, as [`Backend::connect_lazily`].
    pub(crate) fn new(backend: &Backend, answer: Duration, retries: usize) -> RedisResult<Self> {
        Ok(Self {
            current: ArcSwap::from_pointee(backend.connect_lazily(answer, retries)?),
            answer,
            retries,
            failed: AtomicU32::new(0),
            replaced_at: Mutex::new(None),
        })
    }

    /// The connection now.
    pub(crate) fn get(&self) -> Conn {
        Conn::clone(&self.current.load())
    }

    /// Pings Redis, each step within `within`. From the second failure in a row, a fresh
    /// connection is made and pinged too; if it answers, it replaces this one (requests in
    /// flight on the old one end as they would have). At most one replacement per
    /// [`RENEWAL_GAP`].
    pub(crate) async fn check(&self, backend: &Backend, within: Duration) -> Health {
        if ping(&mut self.get(), within).await {
            self.failed.store(0, Ordering::Relaxed);
            return Health::Answered;
        }
        if self.failed.fetch_add(1, Ordering::Relaxed) + 1 < FAILED_BEFORE_RENEWAL {
            return Health::Away;
        }
        let recently = |at: &Option<Instant>| at.is_some_and(|at| at.elapsed() < RENEWAL_GAP);
        if recently(&self.replaced_at.lock().unwrap_or_else(|e| e.into_inner())) {
            return Health::Away;
        }
        let Ok(Ok(mut fresh)) = timeout(within, backend.connect(self.answer, self.retries)).await
        else {
            return Health::Away;
        };
        if !ping(&mut fresh, within).await {
            return Health::Away;
        }
        self.current.store(Arc::new(fresh));
        self.failed.store(0, Ordering::Relaxed);
        *self.replaced_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Health::Replaced
    }
}

/// Whether `conn` answers a `PING` within `within` (Cluster: every master answers).
async fn ping(conn: &mut Conn, within: Duration) -> bool {
    let ping = redis::cmd("PING");
    matches!(
        timeout(within, ping.query_async::<String>(conn)).await,
        Ok(Ok(_))
    )
}

/// A command connection to one server or to a Cluster; cheap to clone (both multiplex).
#[derive(Clone)]
pub(crate) enum Conn {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends `commands`, each of which names its key first (a script call, `EVALSHA`, its first
    /// key), and returns their replies in order, failing on the first that is an error.
    pub(crate) async fn each<T: FromRedisValue>(
        &mut self,
        commands: Vec<Cmd>,
    ) -> RedisResult<Vec<T>> {
        (self.each_reply(commands).await.into_iter())
            .map(|reply| reply.and_then(|value| T::from_redis_value(value).map_err(Into::into)))
            .collect()
    }

    /// [`Self::each`], with each command's own result, so a caller learns which commands ran:
    /// one pipeline on one server; on a Cluster one pipeline per slot (a pipeline must stay in one
    /// slot), in order within it, a few slots at a time. A command's error is its own (a server
    /// error) or its pipeline's (the link failed): on a Cluster a slot whose node failed fails its
    /// commands only, and the other slots' replies stand.
    pub(crate) async fn each_reply(&mut self, commands: Vec<Cmd>) -> Vec<RedisResult<Value>> {
        let count = commands.len();
        let conn = match self {
            Self::Server(conn) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for command in commands {
                    pipe.add_command(command);
                }
                return replies_of(pipe.query_async(conn).await, count);
            }
            Self::Cluster(conn) => conn,
        };
        let mut slots: Vec<(Slot, Vec<usize>, Pipeline)> = Vec::new();
        for (i, command) in commands.into_iter().enumerate() {
            let key_at = match command.args_iter().next() {
                Some(Arg::Simple(b"EVALSHA")) => 3,
                _ => 1,
            };
            let slot = match command.args_iter().nth(key_at) {
                Some(Arg::Simple(key)) => Slot::for_key(key),
                _ => Slot::for_key(""),
            };
            let at = match slots.iter().position(|(s, _, _)| *s == slot) {
                Some(at) => at,
                None => {
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    slots.push((slot, Vec::new(), pipe));
                    slots.len() - 1
                }
            };
            slots[at].1.push(i);
            slots[at].2.add_command(command);
        }
        let mut ordered: Vec<RedisResult<Value>> = (0..count).map(|_| Err(unanswered())).collect();
        let mut replies = stream::iter(slots)
            .map(|(_, indices, pipe)| {
                let mut conn = conn.clone();
                async move {
                    let replies = replies_of(pipe.query_async(&mut conn).await, indices.len());
                    (indices, replies)
                }
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some((indices, replies)) = replies.next().await {
            for (i, reply) in indices.into_iter().zip(replies) {
                ordered[i] = reply;
            }
        }
        ordered
    }
}

/// The `count` results of one pipeline's commands: each reply, a server error as its command's
/// error; the pipeline's own error (the link failed: which of its commands ran is unknown) as
/// every command's.
fn replies_of(pipeline: RedisResult<Vec<Value>>, count: usize) -> Vec<RedisResult<Value>> {
    match pipeline {
        Ok(values) => {
            let mut replies: Vec<RedisResult<Value>> = (values.into_iter())
                .map(|value| match value {
                    Value::ServerError(error) => Err(error.into()),
                    value => Ok(value),
                })
                .collect();
            replies.resize_with(count, || Err(unanswered()));
            replies
        }
        Err(error) => vec![Err(error); count],
    }
}

/// A command a pipeline's answer left out (a reply of the wrong shape: ours to look at).
fn unanswered() -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "a command of a pipeline got no reply",
    ))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn a_script_call_takes_channels_of_one_slot_on_a_cluster_and_any_on_one_server() {
        // `{a}` and `{b}` hash to different slots; the key around a tag does not matter.
        let keys = [
            "aw:{a}:meta",
            "aw:{b}:meta",
            "aw:{a}:log",
            "x{a}",
            "aw:{b}:log",
        ];
        let server = Backend::new("redis://127.0.0.1:1/", None).unwrap();
        assert_eq!(
            server.script_calls(keys.into_iter(), 2),
            [vec![0, 1], vec![2, 3], vec![4]]
        );
        let cluster = Backend::new("redis+cluster://127.0.0.1:1,127.0.0.1:2", None).unwrap();
        assert_eq!(
            cluster.script_calls(keys.into_iter(), 2),
            [vec![0, 2], vec![1, 4], vec![3]]
        );
    }
}
