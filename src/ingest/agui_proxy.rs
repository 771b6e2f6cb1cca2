//! The proxy behind `POST /agui/{agent}`: a browser's `RunAgentInput` is forwarded to the AG-UI
//! agent configured under that name (`agui.agents.<name>`, with its headers), and the agent's SSE
//! answer is read by a task of its own, detached from the browser's request, into the run's
//! thread through the same stream ingest as `POST /v1/runs/{run_id}/agui`. A browser that goes
//! away does not stop the run; an agent that cannot be reached, answers with an error status,
//! falls silent or dies mid-run has its run closed for every viewer.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header;
use tokio::sync::OwnedSemaphorePermit;

use super::run_stream::agui::Agui;
use super::run_stream::{Bound, Ending, Format, RunStream, read};
use crate::Gateway;

/// A run a browser asked for, checked and authorised.
#[derive(Debug)]
pub struct ProxiedRun {
    /// The configured agent's name (`agui.agents.<name>`).
    pub agent: String,
    pub thread_id: String,
    pub run_id: String,
    /// The `RunAgentInput` as the browser sent it.
    pub input: Bytes,
}

/// Starts the run on `Shutdown::run_streams`, holding `place` (in `ingest.max_streams`) until
/// the agent's stream has been read to its end.
pub fn start(gateway: &Arc<Gateway>, run: ProxiedRun, place: OwnedSemaphorePermit) {
    let owned = Arc::clone(gateway);
    gateway.shutdown.run_streams.spawn(async move {
        let _place = place;
        forward(&owned, run).await;
    });
}

async fn forward(gateway: &Gateway, run: ProxiedRun) {
    let bound = Bound {
        run_id: run.run_id.clone(),
        thread_id: Some(run.thread_id.clone()),
        producer: None,
        opened_by_gateway: true,
    };
    let stream = RunStream::new(gateway, bound, Agui::default());
    let Some(agent) = gateway.config.agui.agents.get(&run.agent) else {
        // The route checked the name against this same configuration.
        stream.end(Ending::Unreachable).await;
        return;
    };
    let mut request = gateway
        .agui_client
        .post(&agent.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "text/event-stream")
        .body(run.input);
    for (name, value) in &agent.headers {
        request = request.header(name.as_str(), value.expose());
    }
    let idle = gateway.config.ingest.stream_idle_timeout;
    let sent = tokio::select! {
        biased;
        () = gateway.shutdown.close.raised() => {
            stream.end(Ending::Shutdown).await;
            return;
        }
        sent = tokio::time::timeout(idle, request.send()) => sent,
    };
    // Never the URL (it may hold credentials) nor the headers (secrets).
    let response = match sent {
        Ok(Ok(response)) if response.status().is_success() => response,
        Ok(Ok(response)) => {
            tracing::warn!(agent = %run.agent, run_id = %run.run_id, status = response.status().as_u16(), "An AG-UI agent refused a run.");
            stream.end(Ending::Unreachable).await;
            return;
        }
        Ok(Err(error)) => {
            tracing::warn!(agent = %run.agent, run_id = %run.run_id, error = %error.without_url(), "Cannot reach an AG-UI agent.");
            stream.end(Ending::Unreachable).await;
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %run.agent, run_id = %run.run_id, timeout = ?idle, "An AG-UI agent did not answer within ingest.stream_idle_timeout.");
            stream.end(Ending::Unreachable).await;
            return;
        }
    };
    let ndjson = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    let format = if ndjson { Format::Ndjson } else { Format::Sse };
    let body = Box::pin(futures_util::stream::unfold(
        response,
        |mut response| async move {
            match response.chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), response)),
                Ok(None) => None,
                Err(error) => Some((Err(error.without_url()), response)),
            }
        },
    ));
    let summary = read(gateway, stream, format, body).await;
    tracing::debug!(agent = %run.agent, run_id = %run.run_id, accepted = summary.accepted, failed = summary.failed, violations = ?summary.violations, ended = ?summary.ended, closed = summary.closed, "An AG-UI agent's run ended.");
    if summary.failed > 0 {
        tracing::warn!(agent = %run.agent, run_id = %run.run_id, failed = summary.failed, first = ?summary.errors.first(), "An AG-UI agent sent events the gateway refused.");
    }
}
