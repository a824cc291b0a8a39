//! The agent's session with the coordinator: connect, say hello, then one loop that forwards
//! the agent's messages (logs, metrics, run events, heartbeats) and receives assignments and
//! cancellations. On any break it reconnects with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1::{self, agent_message::Kind as Up, coordinator_message::Kind as Down};
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Agent;

const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) async fn run(
    agent: Arc<Agent>,
    mut uplink: mpsc::Receiver<v1::AgentMessage>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connected(&agent, &mut uplink, &stop).await {
            Ok(()) => return,
            Err(error) => {
                warn!(
                    coordinator = %agent.config.coordinator,
                    error = %format!("{error:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "Not connected to the coordinator."
                );
            }
        }
        agent.channel.send_replace(None);
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session. Returns Ok when asked to stop, Err when the connection broke.
async fn connected(
    agent: &Arc<Agent>,
    uplink: &mut mpsc::Receiver<v1::AgentMessage>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = kiln_proto::connect(&agent.config.coordinator).await?;
    let mut client = kiln_proto::clients::agent(channel.clone());
    let (out, out_rx) = mpsc::channel::<v1::AgentMessage>(256);
    let hello = v1::Hello {
        agent_id: agent.agent_id.clone(),
        target: agent.config.target.to_string(),
        host: Some(agent.host.clone()),
        slots: agent.config.slots,
        active_runs: agent.active_runs(),
    };
    out.try_send(up(Up::Hello(hello)))
        .expect("a new channel has room");
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(v1::CoordinatorMessage {
            kind: Some(Down::Welcome(welcome)),
        }) => {
            agent.coordinator_contact(Some(Duration::from_millis(welcome.heartbeat_ttl_ms)));
            info!(coordinator_version = %welcome.coordinator_version, "Connected to the coordinator.");
        }
        _ => anyhow::bail!("the coordinator did not welcome this agent"),
    }
    agent.channel.send_replace(Some(channel));
    // Every run resends what the coordinator has not acknowledged.
    agent
        .session_generation
        .send_modify(|generation| *generation += 1);

    let mut heartbeat = tokio::time::interval(agent.config.heartbeat_interval);
    // The environment cache as last reported on this session (none yet: report it).
    let mut reported_environments: Option<Vec<v1::CachedEnvironment>> = None;
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Say goodbye: forward what the runs reported while stopping, then close.
                while let Ok(message) = uplink.try_recv() {
                    if out.send(message).await.is_err() {
                        break;
                    }
                }
                drop(out);
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
            message = inbound.message() => match message? {
                Some(v1::CoordinatorMessage { kind: Some(kind) }) => {
                    agent.coordinator_contact(None);
                    handle(agent, kind);
                }
                Some(_) => {}
                None => anyhow::bail!("the coordinator closed the session"),
            },
            _ = heartbeat.tick() => {
                let environments = cached_environments(agent);
                let beat = if reported_environments.as_ref() == Some(&environments) {
                    v1::Heartbeat::default()
                } else {
                    reported_environments = Some(environments.clone());
                    v1::Heartbeat {
                        environments_included: true,
                        environments,
                    }
                };
                out.send(up(Up::Heartbeat(beat))).await?;
            }
            Some(message) = uplink.recv() => {
                out.send(message).await?;
            }
        }
    }
}

fn handle(agent: &Arc<Agent>, kind: Down) {
    match kind {
        Down::Assign(assignment) => agent.start_run(assignment),
        Down::Cancel(cancel) => {
            info!(
                run_id = cancel.run_id,
                attempt = cancel.attempt,
                "Cancel requested."
            );
            agent.cancel_run(cancel.run_id, cancel.attempt);
        }
        Down::Ack(ack) => agent.acknowledge(&ack),
        Down::Launch(launch) => {
            info!(
                run_id = launch.run_id,
                attempt = launch.attempt,
                "Gang launch."
            );
            agent.launch_run(launch);
        }
        Down::Welcome(_) => {}
    }
}

/// The agent's environment cache (a directory listing and small JSON files: cheap enough to
/// read at every heartbeat), most recently used first.
fn cached_environments(agent: &Agent) -> Vec<v1::CachedEnvironment> {
    let cache =
        crate::env::cache::Cache::new(&agent.config.data_dir, agent.config.env.cache_max_bytes);
    let ms = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let mut entries = cache.entries();
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    entries
        .into_iter()
        .map(|(used, info)| v1::CachedEnvironment {
            name: info.name,
            size_bytes: info.size_bytes,
            built_unix_ms: info.built_unix_ms as i64,
            last_used_unix_ms: ms(used),
            source: info.source,
        })
        .collect()
}

pub(crate) fn up(kind: Up) -> v1::AgentMessage {
    v1::AgentMessage { kind: Some(kind) }
}
