//! The Kiln coordinator as a library: [`Coordinator`] owns run state, the agent sessions and
//! the blob store; [`serve`] exposes it over gRPC. `main.rs` (and the `kiln` CLI's local mode)
//! only parse configuration and call [`Coordinator::start`] and [`serve`].

pub mod auth;
pub mod blobs;
pub mod config;
pub mod conns;
pub mod join;
pub mod lifecycle;
pub mod limits;
pub mod pki;
pub mod scheduler;
pub mod secrets;
mod service;
pub mod sessions;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use kiln_common::run::{Outcome, Pending, RunEvent, RunStatus};
use kiln_proto::v1;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use service::{Listener, serve};

use crate::blobs::BlobStore;
use crate::lifecycle::{GangStep, Ownership, Released, release_run};
use crate::store::{EventFields, Store, TransitionError, is_gang};

/// Default gRPC address: loopback only; set `listen` to serve other hosts.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default time without a heartbeat after which an agent is lost.
pub const DEFAULT_HEARTBEAT_TTL: Duration = Duration::from_secs(30);
/// How long the runs of an agent that announced its stop are kept (see `v1::Goodbye`).
pub const DEFAULT_DISCONNECT_GRACE: Duration = Duration::from_secs(600);
/// Default largest blob (snapshot or outputs) the coordinator stores.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 8 << 30;
/// Default most runs one user may have queued.
pub const DEFAULT_MAX_QUEUED_PER_USER: u32 = 1000;
pub const DEFAULT_UPLOAD_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a blob no run names is kept (from its upload or last `HasBlob`).
pub const DEFAULT_BLOB_GRACE: Duration = Duration::from_secs(24 * 3600);
/// How often old runs are pruned and unused blobs swept.
pub const DEFAULT_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `kiln.db` (SQLite, WAL) and `blobs/`.
    pub data_dir: PathBuf,
    pub heartbeat_ttl: Duration,
    /// How long an agent that said goodbye (runs continue) is `away` before it is lost.
    pub disconnect_grace: Duration,
    pub max_blob_bytes: u64,
    /// Most runs one user may have queued (`submit_run` refuses more).
    pub max_queued_per_user: u32,
    /// Caps on open TCP connections, in all and per client IP (see `conns.rs`).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// How long an upload may send nothing (`service::next_chunk`).
    pub upload_stall_timeout: Duration,
    /// Runs ended longer ago lose their logs, metrics, outputs and checkpoints (`None`:
    /// kept for ever).
    pub run_retention: Option<Duration>,
    /// See [`DEFAULT_BLOB_GRACE`].
    pub blob_grace: Duration,
    /// See [`DEFAULT_HOUSEKEEPING_INTERVAL`].
    pub housekeeping_interval: Duration,
    /// TLS and authentication: with a PKI every call is authenticated (see `auth.rs`);
    /// without (`--insecure`, the local target's Unix socket) nobody is.
    pub pki: Option<Arc<pki::Pki>>,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            heartbeat_ttl: DEFAULT_HEARTBEAT_TTL,
            disconnect_grace: DEFAULT_DISCONNECT_GRACE,
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            max_queued_per_user: DEFAULT_MAX_QUEUED_PER_USER,
            max_connections: conns::DEFAULT_MAX_CONNECTIONS as usize,
            max_connections_per_ip: conns::DEFAULT_MAX_CONNECTIONS_PER_IP as usize,
            upload_stall_timeout: DEFAULT_UPLOAD_STALL_TIMEOUT,
            run_retention: None,
            blob_grace: DEFAULT_BLOB_GRACE,
            housekeeping_interval: DEFAULT_HOUSEKEEPING_INTERVAL,
            pki: None,
        }
    }
}

/// The database, shared by async tasks; every call runs on the blocking pool.
#[derive(Clone)]
pub struct Db(Arc<Mutex<Store>>);

impl Db {
    pub async fn call<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> T + Send + 'static,
    {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut store)
        })
        .await
        .expect("database task panicked")
    }
}

type AgentTx = mpsc::Sender<Result<v1::CoordinatorMessage, tonic::Status>>;

/// An agent with an open session.
struct Session {
    session_id: u64,
    target: String,
    slots: u32,
    low_priority: bool,
    /// What the agent reported at hello: CPUs, memory, GPUs.
    host: v1::HostInfo,
    /// Where other agents reach this one (gang runs' MASTER_ADDR and KILN_NODES).
    address: String,
    tx: AgentTx,
    /// Cancelled to end the session's stream (the agent was declared lost): the agent then
    /// reconnects and says hello, instead of heartbeating into a session nobody owns.
    closed: CancellationToken,
    /// The process that said hello (`sessions::judge` compares the next hello with it).
    speaker: sessions::Speaker,
    /// The agent is draining (`v1::Drain`): it gets no new runs.
    draining: bool,
}

/// Why a hello was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    /// Another process holds this agent id's live session (`sessions::judge`); the agent
    /// tries again shortly.
    #[error("{0}")]
    LiveSession(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

pub struct Coordinator {
    db: Db,
    blobs: BlobStore,
    /// Seals and opens runs' secrets (`secrets.rs`).
    secrets: secrets::SecretBox,
    config: Config,
    sessions: Mutex<HashMap<String, Session>>,
    /// When the coordinator last heard from each agent not yet judged lost, on its own
    /// monotonic clock: neither an agent's clock nor a jump of this machine's wall clock
    /// can make an agent look silent.
    last_heard: Mutex<HashMap<String, std::time::Instant>>,
    /// Agents that said goodbye with their runs going on, until they are heard again.
    away: Mutex<std::collections::HashSet<String>>,
    /// Fair share: when each (target, owner) last had a run placed, as a growing counter
    /// (`scheduler::Usage::last_placed`). In memory: after a restart every user is equal.
    last_placed: Mutex<HashMap<(String, String), u64>>,
    next_session_id: std::sync::atomic::AtomicU64,
    /// One hello at a time per agent id, from judging it to registering its session, so
    /// that two processes with one identity cannot both be let in. An async mutex held
    /// across the hello's database work (the one lock held across `.await`).
    hello_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Stale attempts already reported in the log, so each is logged once.
    stale_told: Mutex<std::collections::HashSet<(String, i64, u32)>>,
    /// The id of every run whose status, logs or metrics changed; followers wake on it.
    run_changes: broadcast::Sender<i64>,
    schedule_needed: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Coordinator {
    /// Opens the data directory and starts the scheduler and liveness tasks. They stop when
    /// `shutdown` is cancelled; [`Coordinator::stopped`] waits for them.
    pub fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Arc<Coordinator>> {
        kiln_proto::tls::install_provider();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
        let store = Store::open(&config.data_dir.join("kiln.db"))?;
        // Every agent known alive gets one TTL from now to reconnect before it is judged
        // (after a restart all of them are reconnecting at once).
        let started = std::time::Instant::now();
        let last_heard = store
            .list_agents()?
            .into_iter()
            .filter(|agent| !matches!(agent.state.as_str(), "lost" | "stopped" | "revoked"))
            .map(|agent| (agent.id, started))
            .collect();
        let blobs = BlobStore::open(&config.data_dir.join("blobs"), config.max_blob_bytes)?;
        let secrets = secrets::SecretBox::load_or_create(&config.data_dir.join(secrets::KEY_FILE))?;
        let (run_changes, _) = broadcast::channel(4096);
        let coordinator = Arc::new(Coordinator {
            db: Db(Arc::new(Mutex::new(store))),
            blobs,
            secrets,
            config,
            sessions: Mutex::new(HashMap::new()),
            last_heard: Mutex::new(last_heard),
            away: Mutex::new(std::collections::HashSet::new()),
            last_placed: Mutex::new(HashMap::new()),
            next_session_id: 1.into(),
            hello_turns: Mutex::new(HashMap::new()),
            stale_told: Mutex::new(std::collections::HashSet::new()),
            run_changes,
            schedule_needed: Notify::new(),
            shutdown,
            tasks: TaskTracker::new(),
        });
        coordinator
            .tasks
            .spawn(coordinator.clone().scheduler_loop());
        coordinator.tasks.spawn(coordinator.clone().liveness_loop());
        coordinator
            .tasks
            .spawn(coordinator.clone().housekeeping_loop());
        coordinator.tasks.close();
        Ok(coordinator)
    }

    /// Waits until the background tasks have stopped after shutdown.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// `kiln targets delete`: see [`store::Store::delete_target`].
    pub async fn delete_target(&self, name: &str) -> Result<(), tonic::Status> {
        let wanted = name.to_string();
        let refused = self
            .db
            .call(move |s| s.delete_target(&wanted, now_ms()))
            .await
            .map_err(service::internal)?;
        match refused {
            Ok(()) => {
                info!(target_name = %name, "Target deleted.");
                Ok(())
            }
            Err(store::TargetRefusal::NotFound(why)) => Err(tonic::Status::not_found(why)),
            Err(store::TargetRefusal::InUse(why)) => Err(tonic::Status::failed_precondition(why)),
        }
    }

    /// Makes sure a target exists even before any agent joined it (the local target).
    pub async fn ensure_target(&self, name: &str) -> anyhow::Result<()> {
        let name = name.to_string();
        self.db
            .call(move |s| s.ensure_target(&name, now_ms()))
            .await
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_changed(&self, run_id: i64) {
        let _ = self.run_changes.send(run_id);
    }

    fn kick_scheduler(&self) {
        self.schedule_needed.notify_one();
    }

    async fn scheduler_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.schedule_needed.notified() => {}
            }
            if let Err(error) = self.schedule().await {
                warn!(error = %format!("{error:#}"), "Scheduling pass failed.");
            }
        }
    }

    /// One scheduling pass: places as many queued runs as free slots allow.
    async fn schedule(&self) -> anyhow::Result<()> {
        let online: Vec<scheduler::AgentSlots> = self
            .sessions()
            .iter()
            .filter(|(_, s)| !s.draining)
            .map(|(id, s)| scheduler::AgentSlots {
                agent_id: id.clone(),
                target: s.target.clone(),
                free: s.slots,
                low_priority: s.low_priority,
                free_cpus: s.host.cpus,
                free_memory_bytes: s.host.memory_bytes,
                free_gpus: s.host.gpus.iter().map(|g| g.index).collect(),
            })
            .collect();
        if online.is_empty() {
            return Ok(());
        }
        let mut targets: Vec<String> = online.iter().map(|a| a.target.clone()).collect();
        targets.sort();
        targets.dedup();
        let (active, queue) = self
            .db
            .call(move |s| -> anyhow::Result<_> {
                let active = s.active_allocations()?;
                let mut queue = Vec::new();
                for target in &targets {
                    queue.extend(s.queued_runs(target, 10_000)?);
                }
                Ok((active, queue))
            })
            .await?;
        // What each agent has left after the runs it holds.
        let mut slots = online;
        for agent in &mut slots {
            for held in active.iter().filter(|a| a.agent_id == agent.agent_id) {
                agent.free = agent.free.saturating_sub(1);
                agent.free_cpus = agent.free_cpus.saturating_sub(held.need.cpus);
                agent.free_memory_bytes = agent
                    .free_memory_bytes
                    .saturating_sub(held.need.memory_bytes);
                agent.free_gpus.retain(|gpu| !held.gpus.contains(gpu));
            }
        }
        // Fair share between users: what each holds on each target now, and when each was
        // last served.
        let mut usage: HashMap<(String, String), scheduler::Usage> = self
            .last_placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, &last_placed)| {
                (
                    key.clone(),
                    scheduler::Usage {
                        nodes: 0,
                        last_placed,
                    },
                )
            })
            .collect();
        for held in &active {
            usage
                .entry((held.target.clone(), held.owner.clone()))
                .or_default()
                .nodes += 1;
        }
        let order = scheduler::fair_order(
            &queue
                .iter()
                .map(|run| scheduler::Queued {
                    target: &run.target,
                    owner: &run.owner,
                    nodes: run.nodes,
                })
                .collect::<Vec<_>>(),
            &usage,
        );
        let mut queue: Vec<Option<v1::Run>> = queue.into_iter().map(Some).collect();
        let queue: Vec<_> = order
            .into_iter()
            .filter_map(|index| queue[index].take())
            .map(|run| scheduler::QueuedRun {
                run_id: run.id,
                need: need_of(&run),
                target: run.target,
                nodes: run.nodes,
            })
            .collect();
        let assignments = scheduler::assign(&slots, &queue);
        if assignments.is_empty() {
            return Ok(());
        }
        let placed = self
            .db
            .call(move |s| {
                let now = now_ms();
                assignments
                    .into_iter()
                    .filter_map(|a| {
                        let fields = EventFields {
                            placement: &a.agent_ids,
                            gpus: &a.gpus,
                            now_ms: now,
                            ..Default::default()
                        };
                        // A run cancelled since the queue was read is simply skipped.
                        let run = s
                            .transition(a.run_id, None, RunEvent::Assign, &fields)
                            .ok()?;
                        let checkpoints = s.node_checkpoints(run.id).unwrap_or_default();
                        let sealed = s.sealed_secrets(run.id).unwrap_or_default();
                        Some((a.agent_ids, run, checkpoints, sealed))
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        {
            let mut last_placed = self.last_placed.lock().unwrap_or_else(|p| p.into_inner());
            let mut tick = last_placed.values().max().copied().unwrap_or(0);
            for (_, run, _, _) in &placed {
                tick += 1;
                last_placed.insert((run.target.clone(), run.owner.clone()), tick);
            }
        }
        for (agent_ids, run, checkpoints, sealed) in placed {
            let secrets = match sealed.map(|sealed| self.secrets.open(&sealed)).transpose() {
                Ok(secrets) => secrets.unwrap_or_default(),
                Err(error) => {
                    // Never started without them: the run ends, saying why.
                    let message = format!("{error:#}");
                    error!(run_id = run.id, error = %message, "A run's secrets cannot be opened; it fails.");
                    let run_id = run.id;
                    let _ = self
                        .db
                        .call(move |s| {
                            s.transition(
                                run_id,
                                None,
                                RunEvent::Finish(Outcome::Failed),
                                &EventFields {
                                    message: Some(&message),
                                    now_ms: now_ms(),
                                    ..Default::default()
                                },
                            )
                        })
                        .await;
                    self.run_changed(run_id);
                    continue;
                }
            };
            let mut all_sent = true;
            for (node_rank, agent_id) in agent_ids.iter().enumerate() {
                let node_rank = node_rank as u32;
                let checkpoint = checkpoints.get(&node_rank).cloned();
                let mut assignment = lifecycle::assignment(&run, node_rank, checkpoint);
                assignment.secrets = secrets.clone();
                let message = v1::CoordinatorMessage {
                    kind: Some(v1::coordinator_message::Kind::Assign(assignment)),
                };
                let sent = self.send_to_agent(agent_id, message);
                info!(run_id = run.id, attempt = run.attempt, node_rank, agent_id = %agent_id, sent, "Assigned run.");
                all_sent &= sent;
            }
            if !all_sent {
                // The whole placement is undone: a gang never starts with a node missing.
                for agent_id in &agent_ids {
                    self.send_to_agent(agent_id, cancel_message(run.id, run.attempt));
                }
                let attempt = run.attempt;
                let run_id = run.id;
                let _ = self
                    .db
                    .call(move |s| {
                        s.transition(
                            run_id,
                            Some(attempt),
                            RunEvent::Requeue,
                            &EventFields {
                                now_ms: now_ms(),
                                ..Default::default()
                            },
                        )
                    })
                    .await;
                self.kick_scheduler();
            }
            self.run_changed(run.id);
        }
        Ok(())
    }

    /// Cancels the other nodes of a gang attempt that was released or ended.
    fn stop_nodes(&self, released: &Released) {
        for agent_id in &released.agents {
            self.send_to_agent(agent_id, cancel_message(released.run_id, released.attempt));
        }
    }

    /// Sends `Launch` to every node of a gang attempt once all of them are ready. Repeats are
    /// harmless: an agent ignores a launch for an attempt it has already started.
    async fn maybe_launch(&self, run_id: i64, attempt: u32) -> anyhow::Result<()> {
        let (run, nodes) = self
            .db
            .call(move |s| anyhow::Ok((s.get_run(run_id)?, s.run_nodes(run_id, attempt)?)))
            .await?;
        let Some(run) = run else { return Ok(()) };
        if run.attempt != attempt
            || !matches!(
                run.status().domain(),
                RunStatus::Assigned | RunStatus::Running
            )
            || nodes.is_empty()
            || nodes.iter().any(|node| node.state == "assigned")
        {
            return Ok(());
        }
        let launch = v1::Launch {
            run_id,
            attempt,
            master_addr: nodes[0].address.clone(),
            master_port: nodes[0].port,
            node_addresses: nodes.iter().map(|node| node.address.clone()).collect(),
        };
        for node in nodes.iter().filter(|node| node.state == "ready") {
            let message = v1::CoordinatorMessage {
                kind: Some(v1::coordinator_message::Kind::Launch(launch.clone())),
            };
            self.send_to_agent(&node.agent_id, message);
        }
        info!(run_id, attempt, master_addr = %launch.master_addr, master_port = launch.master_port, "Gang ready; launching.");
        Ok(())
    }

    fn send_to_agent(&self, agent_id: &str, message: v1::CoordinatorMessage) -> bool {
        let sessions = self.sessions();
        match sessions.get(agent_id) {
            Some(session) => session.tx.try_send(Ok(message)).is_ok(),
            None => false,
        }
    }

    /// Records that an agent spoke (hello, heartbeat or any other message).
    fn heard_from(&self, agent_id: &str) {
        self.away
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(agent_id);
        let now = std::time::Instant::now();
        let mut last_heard = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        match last_heard.get_mut(agent_id) {
            Some(at) => *at = now,
            None => {
                last_heard.insert(agent_id.to_string(), now);
            }
        }
    }

    /// Every `housekeeping_interval` (and once at start): prunes runs past
    /// `run_retention`, then removes blobs that no kept run names and that nobody wrote or
    /// asked for during `blob_grace`.
    async fn housekeeping_loop(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.housekeeping_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            if let Err(error) = self.housekeeping().await {
                warn!(error = %format!("{error:#}"), "Housekeeping failed; trying again at the next pass.");
            }
        }
    }

    async fn housekeeping(&self) -> anyhow::Result<()> {
        if let Some(retention) = self.config.run_retention {
            let now = now_ms();
            let cutoff = now - retention.as_millis() as i64;
            let pruned = self.db.call(move |s| s.prune_runs(cutoff, now)).await?;
            if !pruned.is_empty() {
                info!(
                    runs = pruned.len(),
                    first = pruned[0],
                    "Pruned runs past run_retention: their logs, metrics, outputs and checkpoints are removed."
                );
                for id in pruned {
                    self.run_changed(id);
                }
            }
        }
        let keep = self.db.call(|s| s.referenced_digests()).await?;
        let grace = self.config.blob_grace;
        let blobs = self.blobs.clone();
        let (removed, bytes) =
            tokio::task::spawn_blocking(move || blobs.sweep(&keep, grace)).await??;
        if !removed.is_empty() {
            info!(
                blobs = removed.len(),
                bytes, "Removed blobs no kept run names."
            );
            self.db
                .call(move |s| s.forget_blob_owners(&removed))
                .await?;
        }
        Ok(())
    }

    async fn liveness_loop(self: Arc<Self>) {
        let period = (self.config.heartbeat_ttl / 4).max(Duration::from_millis(100));
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            // A tick that comes much later than its period means this process did not run
            // (SIGSTOP, a paused VM, a starved machine): its agents' heartbeats are waiting
            // in their sockets, unread. Judging them now would call healthy agents lost, so
            // each gets the grace a restart gives: one TTL from now.
            let gap = last_tick.elapsed();
            last_tick = std::time::Instant::now();
            if gap > period + stall_allowance(self.config.heartbeat_ttl) {
                warn!(
                    stalled_ms = gap.as_millis() as u64,
                    "The coordinator did not run for a while; every agent gets a heartbeat TTL to be heard again."
                );
                self.grant_grace();
                continue;
            }
            if let Err(error) = self.expire_silent_agents().await {
                warn!(error = %format!("{error:#}"), "Liveness check failed.");
            }
        }
    }

    /// Gives every agent not yet judged one TTL from now to be heard.
    fn grant_grace(&self) {
        let now = std::time::Instant::now();
        let mut last_heard = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        for at in last_heard.values_mut() {
            *at = (*at).max(now);
        }
    }

    /// Marks agents that missed heartbeats for the TTL as lost, and their runs with them.
    /// An agent stays on the watch list until that is written: if the write fails (a full
    /// disk), the next tick tries again.
    async fn expire_silent_agents(&self) -> anyhow::Result<()> {
        let ttl = self.config.heartbeat_ttl;
        let silent: Vec<(String, std::time::Instant)> = self
            .last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, at)| at.elapsed() > ttl)
            .map(|(id, at)| (id.clone(), *at))
            .collect();
        for (agent_id, heard_at) in silent {
            let away = self
                .away
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&agent_id);
            let message = if away {
                let grace = self.config.disconnect_grace.as_secs();
                warn!(agent_id = %agent_id, grace_s = grace, "Agent stopped and did not come back within the disconnect grace; marking it lost.");
                format!("node_lost: agent {agent_id} stopped and did not come back within {grace}s")
            } else {
                warn!(agent_id = %agent_id, ttl_s = ttl.as_secs(), "Agent missed heartbeats; marking it lost.");
                format!(
                    "node_lost: agent {agent_id} missed heartbeats for {}s",
                    ttl.as_secs()
                )
            };
            self.release_agent(&agent_id, message, Loss::Silent)
                .await
                .with_context(|| format!("mark agent {agent_id} lost (tried again next check)"))?;
            // Written: it leaves the watch list, unless it spoke meanwhile.
            let mut last_heard = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
            if last_heard.get(&agent_id) == Some(&heard_at) {
                last_heard.remove(&agent_id);
            }
        }
        Ok(())
    }

    /// Takes every run away from an agent (see [`release_run`]) and closes its session: the
    /// agent went silent, or was revoked. A revoked agent is told so first, and its running
    /// runs are queued again whatever their retry budget (their agent did not fail them).
    async fn release_agent(
        &self,
        agent_id: &str,
        message: String,
        loss: Loss,
    ) -> anyhow::Result<()> {
        if let Some(session) = self.sessions().remove(agent_id) {
            if loss == Loss::Revoked {
                let _ = session.tx.try_send(Ok(v1::CoordinatorMessage {
                    kind: Some(v1::coordinator_message::Kind::Revoked(v1::Revoked {
                        reason: message.clone(),
                    })),
                }));
            }
            session.closed.cancel();
        }
        if loss == Loss::Revoked {
            self.last_heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(agent_id);
        }
        let agent_id = agent_id.to_string();
        let lost = self
            .db
            .call(move |s| -> anyhow::Result<Vec<Released>> {
                if loss == Loss::Silent {
                    s.set_agent_state(&agent_id, "lost")?;
                }
                let runs = s.active_runs_of_agent(&agent_id)?;
                let fields = EventFields {
                    message: Some(&message),
                    now_ms: now_ms(),
                    ..Default::default()
                };
                Ok(runs
                    .iter()
                    .filter_map(|run| release_run(s, run, &fields, loss == Loss::Revoked))
                    .collect())
            })
            .await?;
        for released in lost {
            warn!(run_id = released.run_id, "Run released from its agent.");
            self.stop_nodes(&released);
            self.run_changed(released.run_id);
        }
        self.kick_scheduler();
        Ok(())
    }

    /// `kiln agents revoke`: the agent's certificate is refused from now on (checked at every
    /// call, so also by the open session's next message, which is closed right away
    /// anyway: a long-lived stream never handshakes again), its runs are requeued, and the
    /// agent is told to stop its workloads and delete its key.
    /// Removes a disconnected agent's row (`kiln agents forget`); an agent with a live
    /// session, or one that is away with runs, is refused.
    pub async fn forget_agent(&self, agent: &str) -> Result<v1::Agent, tonic::Status> {
        let row = self.find_agent(agent).await?;
        let connected = self.sessions().contains_key(&row.id);
        if connected || matches!(row.state.as_str(), "online" | "draining" | "away") {
            return Err(tonic::Status::failed_precondition(format!(
                "agent {} is {}: stop it first (or `kiln agents revoke` it), then forget it",
                row.id,
                if connected {
                    "connected"
                } else {
                    row.state.as_str()
                }
            )));
        }
        let id = row.id.clone();
        self.db
            .call(move |s| s.forget_agent(&id))
            .await
            .map_err(service::internal)?;
        self.last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.id);
        self.away
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.id);
        info!(agent_id = %row.id, hostname = %row.host.hostname, "Agent forgotten.");
        Ok(agent_reply(row, "forgotten"))
    }

    /// The one agent with this id or host name.
    async fn find_agent(&self, agent: &str) -> Result<store::AgentRow, tonic::Status> {
        let wanted = agent.to_string();
        let found = self
            .db
            .call(move |s| {
                anyhow::Ok(
                    s.list_agents()?
                        .into_iter()
                        .filter(|a| a.id == wanted || a.host.hostname == wanted)
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .map_err(service::internal)?;
        match found.len() {
            0 => Err(tonic::Status::not_found(format!(
                "no agent has id or host name `{agent}`: see `kiln agents`"
            ))),
            1 => Ok(found.into_iter().next().expect("one")),
            _ => Err(tonic::Status::failed_precondition(format!(
                "several agents have host name `{agent}`: name one by its id"
            ))),
        }
    }

    pub async fn revoke_agent(&self, agent: &str) -> Result<v1::Agent, tonic::Status> {
        let row = self.find_agent(agent).await?;
        let (id, target) = (row.id.clone(), row.target.clone());
        self.db
            .call(move |s| s.revoke_agent(&id, &target, now_ms()))
            .await
            .map_err(service::internal)?;
        warn!(agent_id = %row.id, hostname = %row.host.hostname, "Agent revoked.");
        let message = format!("node_lost: agent {} was revoked", row.id);
        self.release_agent(&row.id, message, Loss::Revoked)
            .await
            .map_err(service::internal)?;
        Ok(agent_reply(row, "revoked"))
    }

    // ---- agent sessions ----

    /// Registers an agent's session; returns its session id. Runs the coordinator believes
    /// are on this agent but that the agent no longer has are marked lost; runs the agent
    /// still has but that ended here (cancelled meanwhile) are cancelled on the agent.
    async fn agent_connected(
        &self,
        hello: v1::Hello,
        peer: Option<std::net::IpAddr>,
        tx: AgentTx,
        closed: CancellationToken,
    ) -> Result<u64, HelloError> {
        let turn = self
            .hello_turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hello.agent_id.clone())
            .or_default()
            .clone();
        let _turn = turn.lock().await;
        let speaker = sessions::Speaker::of(&hello, peer);
        // Judged before anything of this hello counts: a refused one neither keeps the agent
        // alive nor touches its runs.
        let verdict = self.judge_hello(&hello.agent_id, &speaker).await?;
        let session_id = self
            .next_session_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let agent_id = hello.agent_id.clone();
        self.heard_from(&agent_id);
        let target = hello.target.clone();
        let host = hello.host.clone().unwrap_or_default();
        let slots = hello.slots.max(1);
        let low_priority = host.low_priority;
        let address = if !host.advertise_address.is_empty() {
            host.advertise_address.clone()
        } else {
            peer.map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string())
        };
        let still_active: Vec<(i64, u32)> = hello
            .active_runs
            .iter()
            .map(|r| (r.run_id, r.attempt))
            .collect();
        let (lost, to_cancel, gangs) = {
            let agent_id = agent_id.clone();
            let target = target.clone();
            self.db
                .call(move |s| -> anyhow::Result<_> {
                    s.upsert_agent(&agent_id, &target, &host, slots, now_ms())?;
                    let mut lost = Vec::new();
                    for run in s.active_runs_of_agent(&agent_id)? {
                        // A gang node that already ended is not held any more.
                        let ended = s
                            .node_row(run.id, run.attempt, &agent_id)?
                            .is_some_and(|node| node.state == "exited");
                        if !ended && !still_active.contains(&(run.id, run.attempt)) {
                            let fields = EventFields {
                                message: Some("lost: the agent restarted without this run"),
                                now_ms: now_ms(),
                                ..Default::default()
                            };
                            lost.extend(release_run(s, &run, &fields, false));
                        }
                    }
                    let mut to_cancel = Vec::new();
                    for (run_id, attempt) in still_active {
                        let node = s.node_row(run_id, attempt, &agent_id)?;
                        let keep = s
                            .get_run(run_id)?
                            .is_some_and(|run| lifecycle::wanted(&run, attempt, node.as_ref()));
                        if !keep {
                            to_cancel.push((run_id, attempt));
                        }
                    }
                    // Gang attempts of this agent that may wait for a launch it missed.
                    let gangs: Vec<(i64, u32)> = s
                        .active_runs_of_agent(&agent_id)?
                        .iter()
                        .filter(|run| is_gang(run))
                        .map(|run| (run.id, run.attempt))
                        .collect();
                    Ok((lost, to_cancel, gangs))
                })
                .await?
        };
        for released in lost {
            self.stop_nodes(&released);
            self.run_changed(released.run_id);
        }
        for (run_id, attempt) in to_cancel {
            let _ = tx.try_send(Ok(cancel_message(run_id, attempt)));
        }
        let previous = self.sessions().insert(
            agent_id.clone(),
            Session {
                session_id,
                target: target.clone(),
                slots,
                low_priority,
                host: hello.host.clone().unwrap_or_default(),
                address,
                tx,
                closed,
                speaker,
                draining: false,
            },
        );
        if let Some(previous) = &previous {
            previous.closed.cancel();
            match verdict {
                Some(sessions::Verdict::TakeOver) => {
                    info!(agent_id = %agent_id, previous = %previous.speaker.describe(), "Agent restarted; its silent previous session is replaced.")
                }
                _ => {
                    info!(agent_id = %agent_id, "Agent reconnected; its previous session is replaced.")
                }
            }
        }
        for (run_id, attempt) in gangs {
            self.maybe_launch(run_id, attempt).await?;
        }
        info!(agent_id = %agent_id, target = %target, slots, "Agent online.");
        self.kick_scheduler();
        Ok(session_id)
    }

    /// An agent stops on purpose. If its runs go on, it is `away`: the liveness loop judges
    /// it one disconnect grace from now instead of one TTL, and its runs stay placed.
    async fn agent_leaving(&self, agent_id: &str, goodbye: v1::Goodbye) -> anyhow::Result<()> {
        if !goodbye.runs_continue {
            // A clean stop with nothing left running is `stopped`, never judged `lost`. If
            // the coordinator still holds runs on it (one assigned as it stopped), the agent
            // is judged after the TTL as usual, and its runs with it.
            let id = agent_id.to_string();
            let stopped = self
                .db
                .call(move |s| {
                    if !s.active_runs_of_agent(&id)?.is_empty() {
                        return anyhow::Ok(false);
                    }
                    s.set_agent_state(&id, "stopped")?;
                    anyhow::Ok(true)
                })
                .await?;
            if stopped {
                info!(agent_id = %agent_id, "Agent stopped cleanly, with no runs.");
                self.last_heard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(agent_id);
            }
            return Ok(());
        }
        let grace = self.config.disconnect_grace;
        info!(agent_id = %agent_id, grace_s = grace.as_secs(), "Agent stopping; its runs go on and are kept for the disconnect grace.");
        {
            let mut last_heard = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
            // `last_heard + TTL` is when the agent is judged: put that at `now + grace`.
            let judged_at = std::time::Instant::now() + grace;
            let at = judged_at
                .checked_sub(self.config.heartbeat_ttl)
                .unwrap_or_else(std::time::Instant::now)
                .max(std::time::Instant::now());
            last_heard.insert(agent_id.to_string(), at);
        }
        self.away
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent_id.to_string());
        let agent_id = agent_id.to_string();
        self.db
            .call(move |s| s.set_agent_state(&agent_id, "away"))
            .await
    }

    /// An agent is draining: no new runs for it; it stops and reports the ones it holds
    /// (`Finished.drained`, queued again by `lifecycle::finish_event`).
    async fn agent_draining(&self, agent_id: &str) -> anyhow::Result<()> {
        if let Some(session) = self.sessions().get_mut(agent_id) {
            session.draining = true;
        }
        info!(agent_id = %agent_id, "Agent draining: it gets no new runs and gives its runs back.");
        let agent_id = agent_id.to_string();
        self.db
            .call(move |s| s.set_agent_state(&agent_id, "draining"))
            .await
    }

    /// Fills `waiting` for the queued runs among `runs` ([`waiting_reason`]).
    pub(crate) async fn explain_waiting(&self, runs: &mut [v1::Run]) -> anyhow::Result<()> {
        let queued: Vec<(i64, String)> = runs
            .iter()
            .filter(|run| run.status() == v1::RunStatus::Queued)
            .map(|run| (run.id, run.target.clone()))
            .collect();
        if queued.is_empty() {
            return Ok(());
        }
        let ahead = self
            .db
            .call(move |s| {
                queued
                    .iter()
                    .map(|(id, target)| Ok((*id, s.queued_before(target, *id)?)))
                    .collect::<anyhow::Result<HashMap<i64, u64>>>()
            })
            .await?;
        let sessions = self.sessions();
        for run in runs.iter_mut() {
            let Some(&ahead) = ahead.get(&run.id) else {
                continue;
            };
            let online: Vec<v1::HostInfo> = sessions
                .values()
                .filter(|s| s.target == run.target && !s.draining)
                .map(|s| s.host.clone())
                .collect();
            run.waiting = waiting_reason(run, &online, ahead);
        }
        Ok(())
    }

    /// Judges a hello against the agent id's live session, if any (`sessions::judge`). A
    /// refusal from another boot or address is logged as a possible cloned key and recorded
    /// on the agent (`kiln agents show`), for an admin to revoke it.
    async fn judge_hello(
        &self,
        agent_id: &str,
        newcomer: &sessions::Speaker,
    ) -> Result<Option<sessions::Verdict>, HelloError> {
        let Some(live) = self
            .sessions()
            .get(agent_id)
            .map(|session| session.speaker.clone())
        else {
            return Ok(None);
        };
        let silent_for = self
            .last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent_id)
            .map(|at| at.elapsed());
        let ttl = self.config.heartbeat_ttl;
        let verdict = sessions::judge(&live, newcomer, silent_for, ttl);
        let sessions::Verdict::Refuse { grace, suspicious } = verdict else {
            return Ok(Some(verdict));
        };
        let silent_ms = silent_for.unwrap_or_default().as_millis() as u64;
        if suspicious {
            warn!(
                agent_id = %agent_id,
                live = %live.describe(),
                newcomer = %newcomer.describe(),
                silent_ms,
                "Refused a second session for a live agent: possible cloned agent key."
            );
            let conflict = format!(
                "refused a second session from {} while the agent was live ({}): possible cloned agent key",
                newcomer.describe(),
                live.describe()
            );
            let id = agent_id.to_string();
            self.db
                .call(move |s| s.record_agent_conflict(&id, &conflict, now_ms()))
                .await?;
        } else {
            info!(agent_id = %agent_id, newcomer_pid = newcomer.pid, silent_ms, "A new process of a live agent said hello (a restart?): refused until its old session closes or goes silent.");
        }
        Err(HelloError::LiveSession(format!(
            "agent {agent_id} already has a live session from another process: one session per agent identity.              A restarted agent is let in once its old session closes or has been silent for {} ms;              otherwise this may be a copy of the agent's key (an admin sees it in `kiln agents show {agent_id}`              and can `kiln agents revoke` it)",
            grace.as_millis()
        )))
    }

    async fn agent_disconnected(&self, agent_id: &str, session_id: u64) {
        let removed = {
            let mut sessions = self.sessions();
            match sessions.get(agent_id) {
                Some(session) if session.session_id == session_id => {
                    sessions.remove(agent_id).is_some()
                }
                _ => false,
            }
        };
        if removed {
            info!(agent_id = %agent_id, "Agent offline.");
            let agent_id = agent_id.to_string();
            let _ =
                self.db
                    .call(move |s| {
                        // A lost agent stays lost until it says hello again.
                        if s.list_agents()?.iter().any(|a| {
                            a.id == agent_id && (a.state == "online" || a.state == "draining")
                        }) {
                            s.set_agent_state(&agent_id, "offline")?;
                        }
                        anyhow::Ok(())
                    })
                    .await;
        }
    }

    /// Handles one message of an agent's session. Messages about an attempt that is not the
    /// run's current attempt on this agent are dropped (fencing).
    async fn agent_message(
        &self,
        agent_id: &str,
        message: v1::agent_message::Kind,
    ) -> anyhow::Result<Option<v1::CoordinatorMessage>> {
        use v1::agent_message::Kind;
        self.heard_from(agent_id);
        match message {
            Kind::Hello(_) => anyhow::bail!("hello sent twice"),
            Kind::Heartbeat(mut beat) => {
                let agent_id = agent_id.to_string();
                beat.environments.truncate(1000);
                self.db
                    .call(move |s| {
                        s.heartbeat(&agent_id, now_ms())?;
                        if beat.environments_included {
                            s.set_agent_environments(&agent_id, &beat.environments)?;
                        }
                        anyhow::Ok(())
                    })
                    .await?;
                // An empty ack answers the heartbeat: the agent knows the coordinator hears it.
                Ok(Some(ack(0, 0, 0, 0, false)))
            }
            Kind::Logs(mut batch) => {
                sanitize_lines(&mut batch.lines);
                let (run_id, attempt) = (batch.run_id, batch.attempt);
                let Some(node) = self.storable(agent_id, run_id, attempt).await? else {
                    return Ok(Some(discard(run_id, attempt)));
                };
                let log_seq = self
                    .db
                    .call(move |s| s.append_logs(run_id, attempt, node, &batch.lines))
                    .await?;
                self.run_changed(run_id);
                Ok(Some(ack(run_id, attempt, log_seq, 0, false)))
            }
            Kind::Metrics(mut batch) => {
                sanitize_points(&mut batch.points);
                let (run_id, attempt) = (batch.run_id, batch.attempt);
                let Some(node) = self.storable(agent_id, run_id, attempt).await? else {
                    return Ok(Some(discard(run_id, attempt)));
                };
                let metric_seq = self
                    .db
                    .call(move |s| s.append_metrics(run_id, attempt, node, &batch.points))
                    .await?;
                self.run_changed(run_id);
                Ok(Some(ack(run_id, attempt, 0, metric_seq, false)))
            }
            Kind::RunEvent(event) => self.run_event(agent_id, event).await,
            Kind::Goodbye(goodbye) => {
                self.agent_leaving(agent_id, goodbye).await?;
                Ok(None)
            }
            Kind::Drain(v1::Drain {}) => {
                self.agent_draining(agent_id).await?;
                Ok(None)
            }
        }
    }

    /// How a message of `attempt` from this agent relates to the run (see
    /// [`lifecycle::ownership`]). A stale attempt is told to stop.
    async fn ownership(
        &self,
        agent_id: &str,
        run_id: i64,
        attempt: u32,
    ) -> anyhow::Result<Ownership> {
        let agent = agent_id.to_string();
        let (run, node) = self
            .db
            .call(move |s| anyhow::Ok((s.get_run(run_id)?, s.node_row(run_id, attempt, &agent)?)))
            .await?;
        let ownership = lifecycle::ownership(run, attempt, node);
        match &ownership {
            Ownership::Current(..) => {}
            Ownership::Stale(run, _) => {
                if !self.stale_told(agent_id, run_id, attempt) {
                    warn!(run_id, attempt, current_attempt = run.attempt, status = %run.status().domain(), agent_id = %agent_id, "A stale attempt is still running: stopping it.");
                }
                self.send_to_agent(agent_id, cancel_message(run_id, attempt));
            }
            Ownership::Unknown => {
                warn!(run_id, attempt, agent_id = %agent_id, "A message about an attempt this agent never held: telling it to discard the attempt.");
            }
        }
        Ok(ownership)
    }

    /// Whether a stale attempt was already reported once in the log (it is told to stop on
    /// every message, but logged once).
    fn stale_told(&self, agent_id: &str, run_id: i64, attempt: u32) -> bool {
        let mut told = self.stale_told.lock().unwrap_or_else(|p| p.into_inner());
        if told.len() > 10_000 {
            told.clear();
        }
        !told.insert((agent_id.to_string(), run_id, attempt))
    }

    /// The node rank under which this agent's lines and points of `attempt` are stored: any
    /// attempt it held (a stale one's lines are kept under their own attempt, never mixed
    /// into a newer one); `None` when it never held one.
    async fn storable(
        &self,
        agent_id: &str,
        run_id: i64,
        attempt: u32,
    ) -> anyhow::Result<Option<u32>> {
        Ok(match self.ownership(agent_id, run_id, attempt).await? {
            Ownership::Current(_, node) | Ownership::Stale(_, node) => Some(node),
            Ownership::Unknown => None,
        })
    }

    /// Applies a run event; a `Finished` is acknowledged once stored (or already stored), so
    /// the agent may forget the attempt.
    async fn run_event(
        &self,
        agent_id: &str,
        mut event: v1::RunEvent,
    ) -> anyhow::Result<Option<v1::CoordinatorMessage>> {
        let (run_id, attempt) = (event.run_id, event.attempt);
        if let Some(v1::run_event::Kind::Finished(finished)) = &mut event.kind
            && !finished.outputs_digest.is_empty()
            && !self
                .agent_may_name_blob(agent_id, &finished.outputs_digest)
                .await?
        {
            warn!(run_id, attempt, agent_id = %agent_id, digest = %finished.outputs_digest, "Agent named outputs it did not upload; not keeping them.");
            finished.outputs_error = format!(
                "the agent reported outputs {} that it did not upload",
                finished.outputs_digest
            );
            finished.outputs_digest.clear();
        }
        let is_finish = matches!(event.kind, Some(v1::run_event::Kind::Finished(_)));
        let (run, node) = match self.ownership(agent_id, run_id, attempt).await? {
            Ownership::Current(run, node) => (run, node),
            Ownership::Stale(run, node) => {
                if let Some(v1::run_event::Kind::Finished(finished)) = event.kind {
                    // The attempt has ended: what it measured is kept if the run ended with
                    // this very attempt (cancelled or lost meanwhile); it changes nothing else.
                    if run.attempt == attempt {
                        let agent = agent_id.to_string();
                        self.db
                            .call(move |s| {
                                s.node_exited(
                                    run_id,
                                    attempt,
                                    node,
                                    finished.exit_code,
                                    &finished.outputs_digest,
                                )?;
                                s.record_late_result(
                                    run_id,
                                    attempt,
                                    finished.exit_code,
                                    &finished.outputs_digest,
                                )?;
                                tracing::debug!(run_id, attempt, agent_id = %agent, "Late result recorded.");
                                anyhow::Ok(())
                            })
                            .await?;
                        self.run_changed(run_id);
                    }
                    return Ok(Some(ack(run_id, attempt, 0, 0, true)));
                }
                return Ok(None);
            }
            Ownership::Unknown => return Ok(Some(discard(run_id, attempt))),
        };
        let result = match event.kind {
            Some(v1::run_event::Kind::Ready(ready)) => {
                let address = self
                    .sessions()
                    .get(agent_id)
                    .map(|session| session.address.clone())
                    .unwrap_or_default();
                info!(run_id, attempt, node, address = %address, port = ready.port, "Gang node ready.");
                self.db
                    .call(move |s| s.node_ready(run_id, attempt, node, &address, ready.port))
                    .await?;
                self.maybe_launch(run_id, attempt).await?;
                return Ok(None);
            }
            Some(v1::run_event::Kind::Finished(finished)) if is_gang(&run) => {
                self.gang_node_finished(run, node, finished).await?;
                return Ok(Some(ack(run_id, attempt, 0, 0, true)));
            }
            Some(v1::run_event::Kind::Started(started)) => {
                info!(run_id, attempt, node, pid = started.pid, "Run started.");
                self.db
                    .call(move |s| {
                        s.node_started(run_id, attempt, node)?;
                        s.transition(
                            run_id,
                            Some(attempt),
                            RunEvent::Start,
                            &EventFields {
                                now_ms: now_ms(),
                                ..Default::default()
                            },
                        )
                    })
                    .await
            }
            Some(v1::run_event::Kind::Finished(finished)) => {
                let event = lifecycle::finish_event(&run, &finished);
                info!(run_id, attempt, exit_code = ?finished.exit_code, event = ?event, lost = finished.lost, fenced = finished.fenced, "Run finished.");
                self.db
                    .call(move |s| {
                        let message = lifecycle::finish_message(&finished);
                        s.node_exited(
                            run_id,
                            attempt,
                            node,
                            finished.exit_code,
                            &finished.outputs_digest,
                        )?;
                        let fields = EventFields {
                            exit_code: finished.exit_code,
                            message: (!message.is_empty()).then_some(message.as_str()),
                            outputs_digest: Some(&finished.outputs_digest),
                            outputs_error: Some(&finished.outputs_error),
                            now_ms: now_ms(),
                            ..Default::default()
                        };
                        let result = s.transition(run_id, Some(attempt), event, &fields);
                        if let Err(TransitionError::Invalid(_)) = result {
                            // Ended here already: keep what the agent measured.
                            s.record_late_result(
                                run_id,
                                attempt,
                                finished.exit_code,
                                &finished.outputs_digest,
                            )?;
                        }
                        result.map_err(anyhow::Error::from)
                    })
                    .await
                    .map_err(TransitionError::Db)
            }
            Some(v1::run_event::Kind::Checkpointed(checkpoint)) => {
                if !kiln_common::snapshot::is_valid_digest(&checkpoint.digest)
                    || self.blobs.size(&checkpoint.digest).await?.is_none()
                    || !self
                        .agent_may_name_blob(agent_id, &checkpoint.digest)
                        .await?
                {
                    warn!(run_id, attempt, digest = %checkpoint.digest, "Ignoring a checkpoint that is not stored or not this agent's.");
                    return Ok(None);
                }
                info!(run_id, attempt, node, digest = %checkpoint.digest, "Checkpoint stored.");
                self.db
                    .call(move |s| s.set_checkpoint(run_id, attempt, node, &checkpoint.digest))
                    .await?;
                return Ok(None);
            }
            None => return Ok(None),
        };
        match result {
            Ok(_) | Err(TransitionError::Invalid(_)) => {}
            Err(error) => return Err(error.into()),
        }
        self.run_changed(run_id);
        self.kick_scheduler();
        Ok(is_finish.then(|| ack(run_id, attempt, 0, 0, true)))
    }

    /// One node of a gang attempt ended (and delivered everything). The run succeeds when
    /// every node has ended with 0; the first failure (a rank exiting non-zero, a node that
    /// could not start, a fenced or lost node) makes the run `stopping`: every other node is
    /// told to stop, and once the last has reported the run restarts while `max_restarts`
    /// allows, else fails naming the rank (see [`lifecycle::gang_step`]).
    async fn gang_node_finished(
        &self,
        run: v1::Run,
        node: u32,
        finished: v1::Finished,
    ) -> anyhow::Result<()> {
        let (run_id, attempt) = (run.id, run.attempt);
        let exit_code = finished.exit_code;
        let digest = finished.outputs_digest.clone();
        let nodes = self
            .db
            .call(move |s| {
                s.node_exited(run_id, attempt, node, exit_code, &digest)?;
                s.run_nodes(run_id, attempt)
            })
            .await?;
        info!(run_id, attempt, node, exit_code = ?finished.exit_code, status = ?finished.status(), "Gang node ended.");
        let step = lifecycle::gang_step(&run, node, &finished, &nodes);
        let to_stop: Vec<String> = nodes
            .iter()
            .filter(|n| n.state != "exited")
            .map(|n| n.agent_id.clone())
            .collect();
        match step {
            GangStep::Wait => return Ok(()),
            GangStep::Succeed => {
                let message = lifecycle::finish_message(&finished);
                self.db
                    .call(move |s| {
                        s.transition(
                            run_id,
                            Some(attempt),
                            RunEvent::Finish(Outcome::Succeeded),
                            &EventFields {
                                exit_code: Some(0),
                                message: (!message.is_empty()).then_some(message.as_str()),
                                outputs_digest: Some(&finished.outputs_digest),
                                outputs_error: Some(&finished.outputs_error),
                                now_ms: now_ms(),
                                ..Default::default()
                            },
                        )
                    })
                    .await?;
            }
            GangStep::Settle => {
                self.db
                    .call(move |s| {
                        let pending = s.pending(run_id)?.unwrap_or(Pending::Failed);
                        s.transition(
                            run_id,
                            Some(attempt),
                            RunEvent::Settle(pending),
                            &EventFields {
                                now_ms: now_ms(),
                                ..Default::default()
                            },
                        )
                        .map_err(anyhow::Error::from)
                    })
                    .await?;
            }
            GangStep::Stop {
                pending,
                message,
                rank,
            } => {
                warn!(
                    run_id,
                    attempt,
                    rank,
                    pending = pending.as_str(),
                    "{message}"
                );
                let settle_now = to_stop.is_empty();
                self.db
                    .call(move |s| {
                        let fields = EventFields {
                            exit_code: finished.exit_code,
                            message: Some(&message),
                            failed_rank: Some(rank),
                            pending: Some(pending),
                            now_ms: now_ms(),
                            ..Default::default()
                        };
                        s.transition(run_id, Some(attempt), RunEvent::Stop, &fields)?;
                        if settle_now {
                            s.transition(
                                run_id,
                                Some(attempt),
                                RunEvent::Settle(pending),
                                &fields,
                            )?;
                        }
                        anyhow::Ok(())
                    })
                    .await?;
                self.stop_nodes(&Released {
                    run_id,
                    attempt,
                    agents: to_stop,
                });
            }
        }
        self.run_changed(run_id);
        self.kick_scheduler();
        Ok(())
    }

    // ---- user API ----

    /// Cancels a run: a queued run ends at once; a placed one becomes `stopping`, its nodes
    /// are told to stop, and it ends `cancelled` once they have stopped and delivered their
    /// last lines (or their agents are gone).
    async fn cancel(&self, run_id: i64) -> Result<v1::Run, TransitionError> {
        let result = self
            .db
            .call(move |s| {
                s.transition(
                    run_id,
                    None,
                    RunEvent::Cancel,
                    &EventFields {
                        message: Some("cancelled by user"),
                        now_ms: now_ms(),
                        ..Default::default()
                    },
                )
            })
            .await;
        let run = match result {
            Ok(run) => run,
            // Already ended: cancelling is idempotent.
            Err(TransitionError::Invalid(_)) => {
                return self
                    .db
                    .call(move |s| s.get_run(run_id))
                    .await?
                    .ok_or(TransitionError::NoSuchRun(run_id));
            }
            Err(e) => return Err(e),
        };
        info!(run_id, agent_id = %run.agent_id, status = %run.status().domain(), "Run cancelled.");
        if run.status().domain() == RunStatus::Stopping {
            let attempt = run.attempt;
            let nodes = self.db.call(move |s| s.run_nodes(run_id, attempt)).await?;
            for node in nodes.iter().filter(|n| n.state != "exited") {
                self.send_to_agent(&node.agent_id, cancel_message(run_id, attempt));
            }
        }
        self.run_changed(run_id);
        self.kick_scheduler();
        Ok(run)
    }
}

/// What an admin call about one agent answers: the agent as stored, in its new `state`,
/// with no runs.
fn agent_reply(row: store::AgentRow, state: &str) -> v1::Agent {
    v1::Agent {
        id: row.id,
        target: row.target,
        host: Some(row.host),
        slots: row.slots,
        runs_active: 0,
        state: state.to_string(),
        last_heartbeat_unix_ms: row.last_heartbeat_ms,
        environments: row.environments,
        conflict: row.conflict,
        conflict_unix_ms: row.conflict_ms,
    }
}

/// Longest log record stored (one or more lines, see `LogLine`); the agent splits longer
/// output (its limit is 64 KiB), so only a misbehaving agent sends more, and the excess is
/// cut rather than refused.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Longest metric name stored.
pub const MAX_METRIC_NAME_BYTES: usize = 256;

/// Makes an agent's log lines storable whatever the agent sent: over-long text is cut (with a
/// marker). Lines are never dropped, so their sequence stays whole.
fn sanitize_lines(lines: &mut [v1::LogLine]) {
    for line in lines {
        if line.text.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !line.text.is_char_boundary(end) {
                end -= 1;
            }
            line.text.truncate(end);
            line.text.push_str(" [kiln: line cut]");
        }
    }
}

/// Makes an agent's metric points storable whatever the agent sent: a name that is empty,
/// too long or has control characters becomes `invalid_metric_name`, and a value that is not
/// a finite number becomes 0 under that name, so that the sequence stays whole (a point
/// cannot be dropped without leaving a hole) and nothing sent can fail the insert.
fn sanitize_points(points: &mut [v1::MetricPoint]) {
    for point in points {
        let bad_name = point.name.is_empty()
            || point.name.len() > MAX_METRIC_NAME_BYTES
            || point.name.chars().any(char::is_control);
        if bad_name || !point.value.is_finite() {
            if !bad_name {
                warn!(name = %point.name, "Dropping a non-finite metric value.");
            }
            point.name = "invalid_metric_name".to_string();
            point.value = 0.0;
        }
    }
}

/// How late a liveness tick may be before the coordinator counts it as its own stall
/// rather than its agents' silence: a quarter of the TTL (at least a second), well above
/// scheduling jitter and well below the TTL, so a stall never ages an agent to lost.
fn stall_allowance(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_secs(1))
}

/// Why an agent's runs are taken away from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// It missed heartbeats for the TTL.
    Silent,
    /// An admin revoked it.
    Revoked,
}

/// Why a queued run waits, as far as the coordinator can tell now: no agent of its target
/// online, none big enough for one node, fewer online agents than its nodes, runs queued
/// before it, or no free slot. `online` are the target's online (not draining) agents'
/// hosts; `ahead` counts the runs queued on the target before it.
pub fn waiting_reason(run: &v1::Run, online: &[v1::HostInfo], ahead: u64) -> String {
    let target = &run.target;
    if online.is_empty() {
        return format!("no agent of target `{target}` is online");
    }
    let need = need_of(run);
    let big_enough = online.iter().filter(|host| need.fits_host(host)).count();
    if big_enough == 0 {
        let most_gpus = online.iter().map(|h| h.gpus.len()).max().unwrap_or(0);
        let most_cpus = online.iter().map(|h| h.cpus).max().unwrap_or(0);
        let most_memory = online.iter().map(|h| h.memory_bytes).max().unwrap_or(0);
        return format!(
            "no online agent of `{target}` is big enough for one node ({} GPUs, {} CPUs, \
             {} MiB; the largest have {most_gpus} GPUs, {most_cpus} CPUs, {} MiB)",
            need.gpus,
            need.cpus,
            need.memory_bytes >> 20,
            most_memory >> 20
        );
    }
    let nodes = run.nodes.max(1) as usize;
    if big_enough < nodes {
        return format!(
            "needs {nodes} agents at once; {big_enough} online agents of `{target}` are big \
             enough"
        );
    }
    match ahead {
        0 => {}
        1 => return format!("1 run was queued on `{target}` before it"),
        n => return format!("{n} runs were queued on `{target}` before it"),
    }
    format!("waiting for free capacity on `{target}` (its online agents are busy)")
}

/// What one node of a run asks for: its resources, GPUs being the larger of
/// `resources.gpus` and `gpus_per_node`.
pub fn need_of(run: &v1::Run) -> scheduler::Need {
    let resources = run.resources.unwrap_or_default();
    scheduler::Need {
        cpus: resources.cpus,
        memory_bytes: resources.memory_bytes,
        gpus: resources.gpus.max(run.gpus_per_node),
    }
}

fn cancel_message(run_id: i64, attempt: u32) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage {
        kind: Some(v1::coordinator_message::Kind::Cancel(v1::CancelRun {
            run_id,
            attempt,
        })),
    }
}

/// Tells the agent that the coordinator has no record of this attempt on it.
fn discard(run_id: i64, attempt: u32) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage {
        kind: Some(v1::coordinator_message::Kind::Ack(v1::Ack {
            run_id,
            attempt,
            discard: true,
            ..Default::default()
        })),
    }
}

fn ack(
    run_id: i64,
    attempt: u32,
    log_seq: u64,
    metric_seq: u64,
    finished: bool,
) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage {
        kind: Some(v1::coordinator_message::Kind::Ack(v1::Ack {
            run_id,
            attempt,
            log_seq,
            metric_seq,
            finished,
            discard: false,
        })),
    }
}

/// Runs `each` on `threads` threads released together, for the tests of what two
/// processes may do to one data directory at the same moment; returns their results.
#[cfg(test)]
pub(crate) fn at_once<T: Send + 'static>(
    threads: usize,
    each: impl Fn() -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = std::sync::Barrier::new(threads);
    let shared = Arc::new((barrier, each));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                shared.0.wait();
                (shared.1)()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_run_says_why_it_waits() {
        let host = |gpus: usize| v1::HostInfo {
            cpus: 16,
            memory_bytes: 64 << 30,
            gpus: vec![v1::GpuInfo::default(); gpus],
            ..Default::default()
        };
        let run = |gpus: u32, nodes: u32| v1::Run {
            target: "gpu".into(),
            nodes,
            resources: Some(v1::Resources {
                gpus,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            waiting_reason(&run(1, 1), &[], 0),
            "no agent of target `gpu` is online"
        );
        let why = waiting_reason(&run(4, 1), &[host(2), host(1)], 0);
        assert!(
            why.starts_with("no online agent of `gpu` is big enough"),
            "{why}"
        );
        assert!(
            why.contains("4 GPUs") && why.contains("the largest have 2 GPUs"),
            "{why}"
        );
        assert_eq!(
            waiting_reason(&run(2, 3), &[host(2), host(2), host(1)], 0),
            "needs 3 agents at once; 2 online agents of `gpu` are big enough"
        );
        assert_eq!(
            waiting_reason(&run(1, 1), &[host(2)], 3),
            "3 runs were queued on `gpu` before it"
        );
        assert_eq!(
            waiting_reason(&run(1, 1), &[host(2)], 0),
            "waiting for free capacity on `gpu` (its online agents are busy)"
        );
    }

    #[test]
    fn whatever_an_agent_sends_is_made_storable_without_dropping_an_item() {
        let mut lines = vec![
            v1::LogLine {
                seq: 1,
                text: "é".repeat(MAX_LINE_BYTES),
                ..Default::default()
            },
            v1::LogLine {
                seq: 2,
                text: "short".into(),
                ..Default::default()
            },
        ];
        sanitize_lines(&mut lines);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].text.len() <= MAX_LINE_BYTES + 32);
        assert!(lines[0].text.ends_with("[kiln: line cut]"));
        assert_eq!(lines[1].text, "short");

        let point = |name: &str, value: f64| v1::MetricPoint {
            name: name.into(),
            value,
            ..Default::default()
        };
        let mut points = vec![
            point("loss", 0.5),
            point("", 1.0),
            point(&"x".repeat(300), 1.0),
            point("bad\nname", 1.0),
            point("nan", f64::NAN),
            point("inf", f64::INFINITY),
        ];
        sanitize_points(&mut points);
        let names: Vec<_> = points.iter().map(|p| (p.name.as_str(), p.value)).collect();
        assert_eq!(names[0], ("loss", 0.5));
        for (name, value) in &names[1..] {
            assert_eq!((*name, *value), ("invalid_metric_name", 0.0));
        }
    }
}
