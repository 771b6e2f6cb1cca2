//! What `POST /v1/runs` names: where a registered run's events go.

use super::channel::ChannelName;

/// Where a registered run's events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTarget {
    pub thread_id: Option<String>,
    pub user_id: Option<String>,
}

impl RunTarget {
    /// The thread when known, else the user.
    pub fn channel(&self) -> Option<ChannelName> {
        match (&self.thread_id, &self.user_id) {
            (Some(thread), _) => Some(ChannelName::thread(thread)),
            (None, Some(user)) => Some(ChannelName::user(user)),
            (None, None) => None,
        }
    }
}
