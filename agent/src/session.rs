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
use crate::identity;

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How soon a hello refused because this agent id has a live session from another process
/// (this agent restarted and the coordinator has not seen the old connection close yet) is
/// tried again: the coordinator lets it in once the old session closed or went silent.
const LIVE_SESSION_RETRY: Duration = Duration::from_millis(500);
/// Without usable credentials (revoked, expired, never joined) the agent only waits for a
/// new join: it checks its identity files this often at most, and never dials.
const MAX_CREDENTIALS_BACKOFF: Duration = Duration::from_secs(60);

/// The agent cannot connect until it joins again; retrying sooner would only hammer the
/// coordinator with handshakes it must refuse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NeedsJoin(String);

/// The coordinator holds a live session for this agent id from another process.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LiveSession(String);

/// This process's nonce for its hellos: random, drawn once, never shown. The coordinator
/// lets a hello with it replace the live session (a reconnect of this process) and refuses
/// another process's while this one's session is live (a copy of the agent's key).
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| hex::encode(rand::random::<[u8; 16]>()))
}

pub(crate) async fn run(
    agent: Arc<Agent>,
    mut uplink: mpsc::Receiver<v1::AgentMessage>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut credentials_backoff = Duration::from_secs(5);
    loop {
        let mut welcomed = false;
        let result = connected(&agent, &mut uplink, &stop, &mut welcomed).await;
        if welcomed {
            // A session was established: the next break starts the backoff afresh, instead
            // of every later reconnect waiting as long as the worst outage so far.
            backoff = Duration::from_millis(100);
            credentials_backoff = Duration::from_secs(5);
        }
        let wait = match result {
            Ok(()) => return,
            Err(error) if error.is::<NeedsJoin>() => {
                warn!(
                    coordinator = %agent.config.coordinator,
                    error = %format!("{error:#}"),
                    retry_in_ms = credentials_backoff.as_millis() as u64,
                    "Not connecting: this agent needs a new join token (kiln-agent join)."
                );
                let wait = credentials_backoff;
                credentials_backoff = (credentials_backoff * 2).min(MAX_CREDENTIALS_BACKOFF);
                backoff = Duration::from_millis(100);
                wait
            }
            Err(error) if error.is::<LiveSession>() => {
                warn!(
                    error = %format!("{error:#}"),
                    retry_in_ms = LIVE_SESSION_RETRY.as_millis() as u64,
                    "The coordinator refused this agent's session: another process holds it."
                );
                backoff = Duration::from_millis(100);
                LIVE_SESSION_RETRY
            }
            Err(error) => {
                warn!(
                    coordinator = %agent.config.coordinator,
                    error = %format!("{error:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "Not connected to the coordinator."
                );
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        agent.channel.send_replace(None);
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait.mul_f64(jitter)) => {}
        }
    }
}

/// The TLS settings for the next connection: the stored identity, read afresh each time (a
/// renewal or a new join replaces it). `Err(NeedsJoin)` when it is missing or expired.
fn client_tls(agent: &Agent) -> anyhow::Result<Option<kiln_proto::tls::ClientTls>> {
    if !agent.config.coordinator.is_tls() {
        return Ok(None);
    }
    match identity::load(&agent.config.data_dir)? {
        None => Err(NeedsJoin(
            "no certificate (this agent was revoked, or never joined)".to_string(),
        )
        .into()),
        Some(id) if id.expired(identity::now_ms()) => Err(NeedsJoin(format!(
            "its certificate expired at {} (the host was off longer than the certificate \
             lives)",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(id.not_after_ms.max(0) as u64)
            )
        ))
        .into()),
        Some(id) => Ok(Some(id.client_tls())),
    }
}

/// Renews the agent's certificate at two thirds of its lifetime, with a new key, over the
/// current session's channel; the next connection uses the new one. Runs for the agent's
/// life.
pub(crate) async fn renewal(agent: Arc<Agent>) {
    loop {
        let identity = match identity::load(&agent.config.data_dir) {
            Ok(Some(identity)) if !identity.expired(identity::now_ms()) => identity,
            _ => {
                // Nothing to renew (revoked, expired, not joined): look again later.
                tokio::select! {
                    _ = agent.detach.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        tokio::select! {
            _ = agent.detach.cancelled() => return,
            _ = tokio::time::sleep(identity::until(identity.renew_at_ms())) => {}
        }
        let channel = tokio::select! {
            _ = agent.detach.cancelled() => return,
            channel = agent.coordinator_channel() => channel,
        };
        match renew(&agent, &identity, channel).await {
            Ok(not_after_ms) => info!(not_after_ms, "Certificate renewed."),
            Err(error) => {
                // Try again in a tenth of what is left (at least a second).
                let left = (identity.not_after_ms - identity::now_ms()).max(0) as u64;
                let retry = Duration::from_millis((left / 10).max(1000));
                warn!(error = %format!("{error:#}"), retry_in_ms = retry.as_millis() as u64, "Certificate renewal failed.");
                tokio::select! {
                    _ = agent.detach.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

async fn renew(
    agent: &Agent,
    identity: &identity::Identity,
    channel: tonic::transport::Channel,
) -> anyhow::Result<i64> {
    let (key_pem, csr_pem) = identity::new_key_and_csr()?;
    let reply = kiln_proto::clients::enrollment(channel)
        .renew(v1::RenewRequest { csr_pem })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    identity::save(
        &agent.config.data_dir,
        &identity.ca_pem,
        &reply.certificate_pem,
        &key_pem,
    )?;
    Ok(reply.not_after_unix_ms)
}

/// One session. Returns Ok when asked to stop, Err when the connection broke.
async fn connected(
    agent: &Arc<Agent>,
    uplink: &mut mpsc::Receiver<v1::AgentMessage>,
    stop: &CancellationToken,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let tls = client_tls(agent)?;
    let channel = kiln_proto::connect_with(&agent.config.coordinator, tls.as_ref()).await?;
    let mut client = kiln_proto::clients::agent(channel.clone());
    let (out, out_rx) = mpsc::channel::<v1::AgentMessage>(256);
    let hello = v1::Hello {
        agent_id: agent.agent_id.clone(),
        target: agent.config.target.to_string(),
        host: Some(agent.host.clone()),
        slots: agent.config.slots,
        active_runs: agent.active_runs(),
        instance: instance().to_string(),
        boot_id: crate::spool::boot_id(),
        pid: std::process::id(),
        heartbeat_interval_ms: agent.config.heartbeat_interval.as_millis() as u64,
    };
    out.try_send(up(Up::Hello(hello)))
        .expect("a new channel has room");
    let mut inbound = match client.session(ReceiverStream::new(out_rx)).await {
        Ok(response) => response.into_inner(),
        Err(status)
            if status.code() == tonic::Code::PermissionDenied
                && status.message().contains("revoked") =>
        {
            agent.revoked(status.message());
            return Err(NeedsJoin(status.message().to_string()).into());
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            return Err(LiveSession(status.message().to_string()).into());
        }
        Err(status) => return Err(status.into()),
    };
    match inbound.message().await? {
        Some(v1::CoordinatorMessage {
            kind: Some(Down::Welcome(welcome)),
        }) => {
            agent.coordinator_contact(Some(Duration::from_millis(welcome.heartbeat_ttl_ms)));
            agent.set_disconnect_grace(Duration::from_millis(welcome.disconnect_grace_ms));
            info!(coordinator_version = %welcome.coordinator_version, "Connected to the coordinator.");
            *welcomed = true;
        }
        _ => anyhow::bail!("the coordinator did not welcome this agent"),
    }
    if agent.drain.is_cancelled() {
        // A new coordinator (or a new session) must not give a draining agent runs.
        out.try_send(up(Up::Drain(v1::Drain {})))
            .expect("the channel holds only the hello");
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
                // Say goodbye: forward what the runs reported while stopping, announce that
                // the runs go on (the coordinator keeps them for its disconnect grace
                // instead of its TTL, and their supervisors extend their lease to match),
                // then close.
                while let Ok(message) = uplink.try_recv() {
                    if out.send(message).await.is_err() {
                        break;
                    }
                }
                // A drained agent has stopped and reported its runs: none go on; an agent
                // with none is simply `stopped` (never judged lost).
                let runs_continue = !agent.drain.is_cancelled()
                    && agent.stopping_with_runs.load(std::sync::atomic::Ordering::SeqCst);
                if runs_continue {
                    agent.leaving();
                }
                let _ = out
                    .send(up(Up::Goodbye(v1::Goodbye { runs_continue })))
                    .await;
                drop(out);
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
            message = inbound.message() => match message? {
                Some(v1::CoordinatorMessage { kind: Some(Down::Revoked(revoked)) }) => {
                    agent.revoked(&revoked.reason);
                    return Err(NeedsJoin(format!("revoked: {}", revoked.reason)).into());
                }
                Some(v1::CoordinatorMessage { kind: Some(kind) }) => {
                    agent.coordinator_contact(None);
                    handle(agent, kind);
                }
                Some(_) => {}
                None => anyhow::bail!("the coordinator closed the session"),
            },
            _ = heartbeat.tick() => {
                // Reading the environment cache is file I/O: off the async workers.
                let reader = agent.clone();
                let environments = tokio::task::spawn_blocking(move || cached_environments(&reader))
                    .await
                    .unwrap_or_default();
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
        Down::Welcome(_) | Down::Revoked(_) => {}
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
