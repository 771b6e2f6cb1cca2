//! `[agui]`: AG-UI's rules for its events and streams, and the agents the public
//! `POST /agui/{agent}` forwards a run to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AguiConfig {
    /// An event that breaks AG-UI's ordering rules is refused (`out_of_order`) instead of
    /// published.
    pub strict: bool,
    /// Largest `RunAgentInput` a browser may send to `POST /agui/{agent}`.
    pub max_input_bytes: usize,
    /// The agents `POST /agui/{agent}` forwards to, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub agents: BTreeMap<String, AgentConfig>,
}

/// One AG-UI agent: where its runs are POSTed and the headers that authenticate the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's AG-UI endpoint (`http://` or `https://`), which answers a `RunAgentInput`
    /// with an SSE stream of AG-UI events.
    pub url: String,
    /// Headers sent with every run (an API key); values are secrets, never shown or logged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Secret>,
}

impl Default for AguiConfig {
    fn default() -> Self {
        Self {
            strict: false,
            max_input_bytes: 1024 * 1024,
            agents: BTreeMap::new(),
        }
    }
}

impl AguiConfig {
    /// What serde cannot check: the agents' URLs and headers. `Err` is the key and the reason.
    pub(super) fn check(&self) -> Result<(), (String, String)> {
        for (name, agent) in &self.agents {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err((
                    format!("agui.agents.{name}"),
                    "an agent's name is letters, digits, `-` and `_`".into(),
                ));
            }
            crate::outbound::check_url(&agent.url)
                .map_err(|reason| (format!("agui.agents.{name}.url"), reason))?;
            for (header, value) in &agent.headers {
                let key = || format!("agui.agents.{name}.headers.{header}");
                crate::outbound::check_header(header, value.expose())
                    .map_err(|reason| (key(), reason.to_string()))?;
            }
        }
        Ok(())
    }
}
