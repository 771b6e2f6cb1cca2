//! The webhook queue, fair between users: each user's messages wait in a lane of their own, and
//! the worker takes one message from each waiting user in turn. One user's flood therefore delays
//! another user's message by at most the one delivery in flight, and fills only that user's lane.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::protocol::upstream::Outbound;

/// The queue, or the user's share of it, is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

pub struct FairQueue {
    lanes: Mutex<Lanes>,
    ready: Notify,
    /// Messages waiting at most, over all users.
    capacity: usize,
    /// Messages one user may have waiting at most.
    per_user: usize,
}

#[derive(Default)]
struct Lanes {
    by_user: HashMap<String, VecDeque<Outbound>>,
    /// Users with messages waiting, in the order they are served.
    turn: VecDeque<String>,
    len: usize,
    /// Shutdown: the queue takes nothing more.
    closed: bool,
}

impl FairQueue {
    pub fn new(capacity: usize, per_user: usize) -> Self {
        Self {
            lanes: Mutex::default(),
            ready: Notify::new(),
            capacity,
            per_user,
        }
    }

    /// Queues a message behind its user's earlier ones; `Err` when the queue or that user's lane
    /// is full (the message is dropped: the caller tells the client). Never waits.
    pub fn push(&self, message: Outbound) -> Result<(), Full> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = lanes.by_user.get(&message.user_id).map_or(0, VecDeque::len);
        if lanes.closed || lanes.len >= self.capacity || waiting >= self.per_user {
            return Err(Full);
        }
        if waiting == 0 {
            lanes.turn.push_back(message.user_id.clone());
        }
        lanes
            .by_user
            .entry(message.user_id.clone())
            .or_default()
            .push_back(message);
        lanes.len += 1;
        drop(lanes);
        self.ready.notify_one();
        Ok(())
    }

    /// The next message, the next user's in turn; waits while none is queued.
    pub async fn pop(&self) -> Outbound {
        loop {
            let ready = self.ready.notified();
            if let Some(message) = self.take() {
                return message;
            }
            ready.await;
        }
    }

    /// Shutdown: refuses every later message and takes every queued one, in the order they would
    /// have been served.
    pub fn close(&self) -> Vec<Outbound> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        std::iter::from_fn(|| self.take()).collect()
    }

    fn take(&self) -> Option<Outbound> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let user = lanes.turn.pop_front()?;
        let lane = lanes.by_user.get_mut(&user)?;
        let message = lane.pop_front()?;
        if lane.is_empty() {
            lanes.by_user.remove(&user);
        } else {
            lanes.turn.push_back(user);
        }
        lanes.len -= 1;
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;
    use crate::protocol::client::{Recipient, Sender, UpstreamMessage};

    fn message(user: &str, n: u32) -> Outbound {
        let upstream = UpstreamMessage {
            kind: "user_message",
            id: Some(n.to_string()),
            sender: Sender {
                agent_id: "a".into(),
                role: "user".into(),
            },
            recipient: Recipient {
                target: "agent".into(),
                agent_id: None,
            },
            payload: Map::new(),
            timestamp: None,
            metadata: None,
        };
        Outbound::new(upstream, user, "c")
    }

    #[tokio::test]
    async fn users_take_turns_and_a_flood_fills_only_its_own_lane() {
        let queue = FairQueue::new(10, 3);
        for n in 0..3 {
            queue.push(message("flood", n)).unwrap();
        }
        assert!(queue.push(message("flood", 3)).is_err(), "its lane is full");
        queue.push(message("quiet", 0)).unwrap();
        let first = queue.pop().await;
        let second = queue.pop().await;
        assert_eq!(
            (first.user_id.as_str(), second.user_id.as_str()),
            ("flood", "quiet")
        );
        assert_eq!(queue.pop().await.user_id, "flood");
    }

    #[test]
    fn close_takes_what_waits_in_turn_and_refuses_more() {
        let queue = FairQueue::new(10, 3);
        for (user, n) in [("a", 0), ("a", 1), ("b", 0)] {
            queue.push(message(user, n)).unwrap();
        }
        let left: Vec<_> = queue.close().into_iter().map(|m| m.user_id).collect();
        assert_eq!(left, ["a", "b", "a"]);
        assert!(queue.push(message("c", 0)).is_err(), "closed");
    }
}
