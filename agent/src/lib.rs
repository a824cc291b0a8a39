//! The Kiln agent as a library. [`Agent::start`] registers with the coordinator and runs what
//! it is assigned until the shutdown token is cancelled; `main.rs` and the `kiln` CLI's local
//! mode only build a [`Config`].
//!
//! Shutdown versus kill: cancelling the agent's token *stops the agent* and leaves its runs
//! running under their supervisors (the next agent process attaches to them again); a
//! coordinator `CancelRun` kills one run (reported as cancelled).

pub mod config;
pub mod docker;
mod driver;
pub mod env;
pub mod gpu;
pub mod identity;
pub mod lines;
pub mod run;
pub mod sandbox;
mod session;
pub mod spool;
pub mod supervisor;
pub mod telemetry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::target::TargetName;
use kiln_proto::{Address, v1};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The interpreter for `.py` scripts unless configured otherwise.
pub const DEFAULT_PYTHON: &str = "python3";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// The module that scripts `import kiln` from; written to the data dir at start.
const KILN_PY: &str = include_str!("../python/kiln.py");

#[derive(Debug, Clone)]
pub struct Config {
    pub coordinator: Address,
    pub target: TargetName,
    /// Holds the agent id, the snapshot cache, run directories and metric sockets.
    pub data_dir: PathBuf,
    /// How many runs may execute at once.
    pub slots: u32,
    /// Interpreter for `.py` scripts (user-managed environment).
    pub python: String,
    pub heartbeat_interval: Duration,
    /// How often system metrics (CPU, memory, GPUs) are sampled for each run.
    pub metrics_interval: Duration,
    /// Reported host name; default: the system's.
    pub hostname: Option<String>,
    /// A low-priority (preemptible) node: it gets runs only when regular agents are full.
    pub low_priority: bool,
    /// The executable that runs `__supervise` (kiln-agent itself, or kiln in the local target).
    pub supervisor_program: PathBuf,
    /// The IP address other agents reach this one on (gang runs); `None`: the address the
    /// coordinator sees.
    pub advertise_address: Option<String>,
    /// Built environments (venv, conda): cache size, external conda.
    pub env: env::Settings,
    /// Docker runs: images, engine, registry login.
    pub docker: docker::Settings,
    /// The uids that process runs get, one each, when the agent is root (see `sandbox`);
    /// `None`: runs run as the agent's user.
    pub run_users: Option<std::ops::RangeInclusive<u32>>,
    /// The agent's environment variables runs inherit (names or `PREFIX*`; see
    /// `run::inherited_env`).
    pub pass_env: Vec<String>,
    /// Size limit of the snapshot cache (`DATA_DIR/snapshots`), in bytes.
    pub snapshot_cache_max_bytes: u64,
}

/// Default limit of the snapshot cache (`snapshot_cache_max_bytes`): 20 GiB.
pub const DEFAULT_SNAPSHOT_CACHE_MAX_BYTES: u64 = 20 << 30;

impl Config {
    pub fn new(coordinator: Address, target: TargetName, data_dir: PathBuf) -> Config {
        Config {
            coordinator,
            target,
            data_dir,
            slots: 1,
            python: DEFAULT_PYTHON.to_string(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            hostname: None,
            low_priority: false,
            supervisor_program: std::env::current_exe()
                .unwrap_or_else(|_| PathBuf::from("kiln-agent")),
            advertise_address: None,
            env: env::Settings::default(),
            docker: docker::Settings::default(),
            run_users: None,
            pass_env: run::default_pass_env(),
            snapshot_cache_max_bytes: DEFAULT_SNAPSHOT_CACHE_MAX_BYTES,
        }
    }
}

struct RunHandle {
    cancel: CancellationToken,
    fence: CancellationToken,
    /// Within the run's retry budget: the coordinator would place it again if this agent
    /// were lost, so the agent stops it when it loses the coordinator (fencing).
    fenceable: bool,
    acks: tokio::sync::watch::Sender<run::AckState>,
    launch: tokio::sync::watch::Sender<Option<v1::Launch>>,
}

/// What the agent knows of its link to the coordinator, for fencing.
struct Link {
    /// When the coordinator last said anything (welcome, ack, heartbeat answer).
    last_contact: Option<std::time::Instant>,
    /// Fence attempts off after this long without contact: two thirds of the coordinator's
    /// heartbeat TTL, learnt from its welcome.
    fence_after: Option<Duration>,
    /// The lease last written to `lease.json` (`CLOCK_BOOTTIME` ms).
    lease_written: u64,
    /// How long the coordinator keeps this agent's runs after a goodbye (from its welcome).
    disconnect_grace: Duration,
}

/// How much a lease must have moved before it is written again.
const LEASE_WRITE_STEP_MS: u64 = 250;

pub struct Agent {
    config: Config,
    agent_id: String,
    host: v1::HostInfo,
    /// Messages for the coordinator; the session forwards them while connected.
    uplink: mpsc::Sender<v1::AgentMessage>,
    runs: Mutex<HashMap<(i64, u32), RunHandle>>,
    run_tasks: TaskTracker,
    link: Mutex<Link>,
    /// Counts sessions: a run resends what is unacknowledged whenever it changes.
    session_generation: tokio::sync::watch::Sender<u64>,
    /// Cancelled when the agent process stops: run tasks end, runs go on.
    detach: CancellationToken,
    /// Cancelled when the agent is drained (`kiln-agent drain`): every run is stopped and
    /// reported `drained`, and the coordinator gives this agent no new runs.
    drain: CancellationToken,
    /// Set as the agent stops (before its run tasks detach and leave the table): whether it
    /// held runs, which go on under their supervisors (`Goodbye.runs_continue`).
    stopping_with_runs: std::sync::atomic::AtomicBool,
    /// The channel of the current session, for blob transfers.
    channel: tokio::sync::watch::Sender<Option<tonic::transport::Channel>>,
    python_dir: PathBuf,
}

impl Agent {
    /// Prepares the data directory and starts the session with the coordinator. Returns when
    /// `shutdown` is cancelled and the agent has stopped its runs and said goodbye.
    pub async fn run(
        config: Config,
        gpus: Arc<dyn gpu::GpuProbe>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        Agent::run_draining(config, gpus, shutdown, CancellationToken::new()).await
    }

    /// [`Agent::run`], and when `drain` is cancelled: tell the coordinator (no new runs),
    /// stop every run and report it `drained` (the coordinator queues it again), then say
    /// goodbye (no runs go on) and return. `shutdown` during a drain stops the agent as
    /// usual: what is not reported yet is reported by the next agent process, or the
    /// coordinator declares it lost after the TTL.
    pub async fn run_draining(
        config: Config,
        gpus: Arc<dyn gpu::GpuProbe>,
        shutdown: CancellationToken,
        drain: CancellationToken,
    ) -> anyhow::Result<()> {
        for dir in ["snapshots/tmp", "runs", "sock", "python"] {
            std::fs::create_dir_all(config.data_dir.join(dir))
                .with_context(|| format!("create {}", config.data_dir.join(dir).display()))?;
        }
        let mut config = config;
        if let Some(range) = config.run_users.clone()
            && sandbox::available()
            && !sandbox::range_mapped(&range)
        {
            warn!(
                first_uid = range.start(),
                last_uid = range.end(),
                "The run users' uids do not exist in this user namespace (/proc/self/uid_map): \
                 runs run as the agent's user. Set run_users to a range the namespace maps."
            );
        }
        if !sandbox::enabled(&config) {
            config.run_users = None;
        }
        if let Some(range) = &config.run_users {
            sandbox::open_data_dir(&config.data_dir)?;
            info!(
                first_uid = range.start(),
                last_uid = range.end(),
                "Process runs each run as a user of their own."
            );
        }
        let python_dir = config.data_dir.join("python");
        std::fs::write(python_dir.join("kiln.py"), KILN_PY)
            .context("write the kiln Python module")?;
        // Public code a container's user (`nobody` under a root agent) must read; the umask
        // would make it the agent's only.
        for (path, mode) in [
            (python_dir.join("kiln.py"), 0o644),
            (python_dir.clone(), 0o755),
        ] {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .with_context(|| format!("make {} readable", path.display()))?;
        }
        let agent_id = load_or_create_agent_id(&config)?;
        let mut host = telemetry::host_info(config.hostname.as_deref(), gpus.as_ref());
        host.low_priority = config.low_priority;
        host.advertise_address = config.advertise_address.clone().unwrap_or_default();
        info!(
            agent_id = %agent_id,
            target = %config.target,
            coordinator = %config.coordinator,
            cpus = host.cpus,
            gpus = host.gpus.len(),
            gpu_probe = %host.gpu_probe_error,
            "Agent starting."
        );
        // Few messages: each run holds at most `run::follow::MAX_UNACKED_BYTES` and sends batches
        // of at most `run::follow::MAX_BATCH_BYTES`, so this bounds bytes in flight, not only
        // messages.
        let (uplink, uplink_rx) = mpsc::channel(64);
        let (channel, _) = tokio::sync::watch::channel(None);
        let agent = Arc::new(Agent {
            config,
            agent_id,
            host,
            uplink,
            runs: Mutex::new(HashMap::new()),
            run_tasks: TaskTracker::new(),
            link: Mutex::new(Link {
                last_contact: None,
                fence_after: None,
                lease_written: 0,
                disconnect_grace: Duration::ZERO,
            }),
            session_generation: tokio::sync::watch::channel(0).0,
            detach: CancellationToken::new(),
            drain,
            stopping_with_runs: std::sync::atomic::AtomicBool::new(false),
            channel,
            python_dir,
        });
        agent.reattach_runs();
        tokio::spawn(agent.clone().reap_docker_orphans());
        tokio::spawn(agent.clone().reap_previous_identities());
        if agent.config.coordinator.is_tls() {
            tokio::spawn(session::renewal(agent.clone()));
        }
        tokio::spawn(agent.clone().fence_watchdog());
        tokio::spawn(agent.clone().sweep_stale_attempts());
        let session_stop = CancellationToken::new();
        let session = tokio::spawn(session::run(agent.clone(), uplink_rx, session_stop.clone()));

        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = agent.drain.cancelled() => {
                info!(runs = agent.runs().len(), "Draining: no new runs; stopping and reporting every run.");
                let _ = agent
                    .uplink
                    .send(session::up(v1::agent_message::Kind::Drain(v1::Drain {})))
                    .await;
                agent.run_tasks.close();
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        warn!(runs = agent.runs().len(), "Stopped while draining: runs not yet reported are reported by the next agent process.");
                    }
                    _ = agent.run_tasks.wait() => {
                        info!("Drained: every run stopped and reported.");
                    }
                }
            }
        }
        if !agent.drain.is_cancelled() {
            info!(
                runs = agent.runs().len(),
                "Agent stopping; its runs go on under their supervisors."
            );
        }
        agent.stopping_with_runs.store(
            !agent.runs().is_empty(),
            std::sync::atomic::Ordering::SeqCst,
        );
        agent.detach.cancel();
        agent.run_tasks.close();
        agent.run_tasks.wait().await;
        session_stop.cancel();
        let _ = session.await;
        info!("Agent stopped.");
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.agent_id
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, u32), RunHandle>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn active_runs(&self) -> Vec<v1::RunRef> {
        self.runs()
            .keys()
            .map(|&(run_id, attempt)| v1::RunRef { run_id, attempt })
            .collect()
    }

    fn start_run(self: &Arc<Self>, assignment: v1::Assignment) {
        let key = (assignment.run_id, assignment.attempt);
        // The coordinator decides (lifecycle::fenceable); the agent does not guess.
        let fenceable = assignment.fenceable;
        let Some(control) = self.register_run(key, fenceable) else {
            return;
        };
        let agent = self.clone();
        self.run_tasks.spawn(async move {
            run::execute(agent.clone(), assignment, control, None).await;
            agent.run_ended(key);
        });
    }

    /// Adds a run to the table; `None` if it is already there.
    fn register_run(&self, key: (i64, u32), fenceable: bool) -> Option<run::RunControl> {
        let mut runs = self.runs();
        if runs.contains_key(&key) {
            return None;
        }
        let cancel = CancellationToken::new();
        let fence = CancellationToken::new();
        let (acks, acks_rx) = tokio::sync::watch::channel(run::AckState::default());
        let (launch, launch_rx) = tokio::sync::watch::channel(None);
        runs.insert(
            key,
            RunHandle {
                cancel: cancel.clone(),
                fence: fence.clone(),
                fenceable,
                acks,
                launch,
            },
        );
        Some(run::RunControl {
            cancel,
            fence,
            detach: self.detach.clone(),
            drain: self.drain.clone(),
            acks: acks_rx,
            launch: launch_rx,
        })
    }

    /// Records that the coordinator spoke; a welcome also tells its heartbeat TTL. Extends
    /// the lease that the supervisors of fenceable attempts watch (`spool::Lease`).
    fn coordinator_contact(&self, heartbeat_ttl: Option<Duration>) {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        link.last_contact = Some(std::time::Instant::now());
        if let Some(ttl) = heartbeat_ttl.filter(|ttl| !ttl.is_zero()) {
            link.fence_after = Some(ttl * 2 / 3);
        }
        if let Some(after) = link.fence_after {
            // after = 2/3 of the TTL, the window in which the coordinator keeps the runs.
            if let Err(error) = self.extend_lease(&mut link, after * 3 / 2, LEASE_WRITE_STEP_MS) {
                warn!(error = %error, "Could not extend the lease.");
            }
        }
    }

    /// Writes a lease for `window` from now (how long the coordinator keeps this agent's
    /// runs): supervisors send SIGTERM at 2/3 of it and SIGKILL at 9/10. Only when it moves
    /// the lease at least `min_step_ms` later (never earlier); says whether it wrote.
    fn extend_lease(
        &self,
        link: &mut Link,
        window: Duration,
        min_step_ms: u64,
    ) -> std::io::Result<bool> {
        let now = spool::boottime_ms();
        let window_ms = window.as_millis() as u64;
        let until = now + window_ms * 2 / 3;
        if until < link.lease_written + min_step_ms.max(1) {
            return Ok(false);
        }
        let lease = spool::Lease {
            until_boottime_ms: until,
            kill_boottime_ms: now + window_ms * 9 / 10,
        };
        spool::write_json(&self.lease_file(), &lease)?;
        link.lease_written = until;
        Ok(true)
    }

    fn set_disconnect_grace(&self, grace: Duration) {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disconnect_grace = grace;
    }

    /// The agent is about to say goodbye (runs continue): the coordinator will keep its runs
    /// for its disconnect grace, so the supervisors' lease is extended to two thirds of it
    /// (SIGKILL at nine tenths), as for the TTL. Never shortens the lease.
    fn leaving(&self) {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let grace = link.disconnect_grace;
        match self.extend_lease(&mut link, grace, 1) {
            Ok(true) => info!(
                grace_s = grace.as_secs(),
                "Runs go on; the coordinator keeps them while this agent is away."
            ),
            Ok(false) => {}
            Err(error) => warn!(error = %error, "Could not extend the lease for the stop."),
        }
    }

    /// `DATA_DIR/lease.json`: see [`spool::Lease`].
    pub(crate) fn lease_file(&self) -> PathBuf {
        self.config.data_dir.join("lease.json")
    }

    /// Stops attempts the coordinator would retry elsewhere once this agent has been out of
    /// touch for two thirds of the coordinator's TTL, so two copies of an attempt never run
    /// (and write checkpoints) at once. Runs without a retry budget keep running: nobody
    /// would replace them, and they report when the link is back.
    async fn fence_watchdog(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = self.detach.cancelled() => return,
                _ = tick.tick() => {}
            }
            let overdue = {
                let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
                match (link.last_contact, link.fence_after) {
                    (Some(last), Some(after)) => last.elapsed() > after,
                    _ => false,
                }
            };
            if overdue {
                for (&(run_id, attempt), handle) in self.runs().iter() {
                    if handle.fenceable && !handle.fence.is_cancelled() {
                        tracing::warn!(
                            run_id,
                            attempt,
                            "Coordinator out of reach: fencing the attempt off."
                        );
                        handle.fence.cancel();
                    }
                }
            }
        }
    }

    /// Every [`sweep_interval`]: removes attempt directories under `runs/` that no run task
    /// holds (what a task that ended abnormally left behind; they used to linger until the
    /// next agent restart). A run is registered before its directory is made and
    /// unregistered after it is removed, so a directory nobody holds is stale; one younger
    /// than the interval, or whose supervisor still lives, is left alone.
    async fn sweep_stale_attempts(self: Arc<Self>) {
        let interval = sweep_interval();
        loop {
            tokio::select! {
                _ = self.detach.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let agent = self.clone();
            let swept = tokio::task::spawn_blocking(move || {
                // The table is read after the directory is listed: a run's directory exists
                // only once the run is registered, so a listed directory not held is stale.
                let held = |key: &(i64, u32)| agent.runs().contains_key(key);
                sweep_runs_dir(&agent.config.data_dir, held, interval)
            })
            .await
            .unwrap_or_default();
            for (run_id, attempt) in swept {
                warn!(
                    run_id,
                    attempt, "Removed a stale attempt directory no run held."
                );
            }
        }
    }

    fn run_ended(&self, key: (i64, u32)) {
        self.runs().remove(&key);
        release_free_memory();
    }

    /// Finds the runs a previous agent process left in `runs/` and takes each up where it
    /// was (see [`run::Phase`]): preparing again, starting a supervisor that never
    /// started, or following the spool.
    fn reattach_runs(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.config.data_dir.join("runs")) else {
            return;
        };
        for entry in entries.flatten() {
            let root = entry.path();
            let state = spool::StateDir(root.join("state"));
            let spec: Option<spool::Spec> = spool::read_json(&state.spec()).ok().flatten();
            let Some(spec) = spec else {
                if state.exit().exists() {
                    // It could not start; that is reported like any end.
                    if let Some((run_id, attempt)) = parse_run_dir(&root) {
                        self.spawn_attach(run_id, attempt, false, root);
                    }
                } else if let Some((assignment, phase)) = run::resumable(&state) {
                    self.resume_run(assignment, phase);
                } else {
                    // Nothing of it was kept (an agent from before phases): nothing runs;
                    // the coordinator requeues the attempt when this agent says hello
                    // without it.
                    let _ = std::fs::remove_dir_all(&root);
                }
                continue;
            };
            let never_started = !state.supervisor().exists() && !state.exit().exists();
            if never_started {
                // Stopped between writing spec.json and starting the supervisor.
                info!(
                    run_id = spec.run_id,
                    attempt = spec.attempt,
                    "Starting the supervisor of a run the previous agent process launched no further."
                );
                if let Err(error) = run::start_supervisor(self, &state) {
                    let message = format!("{error:#}");
                    let exit = spool::Exit {
                        description: message.clone(),
                        start_error: Some(message),
                        ..Default::default()
                    };
                    let _ = spool::write_json(&state.exit(), &exit);
                }
            }
            let fenceable = spec.fenceable();
            self.spawn_attach(spec.run_id, spec.attempt, fenceable, root);
        }
    }

    /// Takes up the preparation of an attempt the previous agent process left before its
    /// launch.
    fn resume_run(self: &Arc<Self>, assignment: v1::Assignment, phase: run::Phase) {
        let key = (assignment.run_id, assignment.attempt);
        let Some(control) = self.register_run(key, assignment.fenceable) else {
            return;
        };
        let agent = self.clone();
        self.run_tasks.spawn(async move {
            run::execute(agent.clone(), assignment, control, Some(phase)).await;
            agent.run_ended(key);
        });
    }

    /// Removes this agent's containers whose attempt is gone from `runs/` (a crash between
    /// the container and the bookkeeping). Nothing to do, and nothing said, without Docker.
    async fn reap_docker_orphans(self: Arc<Self>) {
        let runs_dir = self.config.data_dir.join("runs");
        let host = self.config.docker.host.as_deref();
        match docker::reap_orphans(host, &self.agent_id, &runs_dir).await {
            Ok(n) => info!(
                removed = n,
                "Checked Docker for containers of runs this agent no longer has."
            ),
            Err(error) => {
                tracing::debug!(error = %format!("{error:#}"), "No Docker leftovers checked.")
            }
        }
    }

    /// Removes the containers of this host's earlier identities (see
    /// [`identity::PREVIOUS_IDS`]), then forgets those ids. Without Docker there is nothing
    /// to remove.
    async fn reap_previous_identities(self: Arc<Self>) {
        let path = self.config.data_dir.join(identity::PREVIOUS_IDS);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let host = self.config.docker.host.as_deref();
        let mut left = Vec::new();
        for old in text
            .lines()
            .map(str::trim)
            .filter(|id| !id.is_empty() && *id != self.agent_id)
        {
            match docker::remove_agent_containers(host, old).await {
                Ok(n) => {
                    info!(previous_agent_id = %old, containers = n, "Removed the containers of this host's previous identity.")
                }
                Err(error) => {
                    // No Docker engine: no containers either. Anything else: try next start.
                    let message = format!("{error:#}");
                    if !message.contains("Docker") {
                        left.push(old.to_string());
                    }
                    tracing::debug!(error = %message, "Previous identity's containers not checked.");
                }
            }
        }
        let _ = if left.is_empty() {
            std::fs::remove_file(&path)
        } else {
            std::fs::write(&path, left.join("\n") + "\n")
        };
    }

    /// The coordinator revoked this agent: stop every run it holds (their processes and
    /// containers; the coordinator has requeued them already) and delete the key. The agent
    /// then waits for a new `kiln-agent join`.
    fn revoked(&self, reason: &str) {
        warn!(reason = %reason, "This agent was revoked: stopping its runs and deleting its key.");
        for handle in self.runs().values() {
            handle.cancel.cancel();
        }
        if let Err(error) = identity::wipe(&self.config.data_dir) {
            warn!(error = %format!("{error:#}"), "Could not delete the agent's key.");
        }
    }

    fn spawn_attach(self: &Arc<Self>, run_id: i64, attempt: u32, fenceable: bool, root: PathBuf) {
        let key = (run_id, attempt);
        let Some(control) = self.register_run(key, fenceable) else {
            return;
        };
        info!(
            run_id,
            attempt, "Attaching to a run left by the previous agent process."
        );
        let agent = self.clone();
        self.run_tasks.spawn(async move {
            run::attach(agent.clone(), run_id, attempt, root, control, None).await;
            agent.run_ended(key);
        });
    }

    fn cancel_run(&self, run_id: i64, attempt: u32) {
        if let Some(handle) = self.runs().get(&(run_id, attempt)) {
            handle.cancel.cancel();
        }
    }

    /// The coordinator's go for a gang attempt waiting in `run::wait_for_launch`; ignored
    /// for an attempt that is not waiting (already launched, or unknown).
    fn launch_run(&self, launch: v1::Launch) {
        if let Some(handle) = self.runs().get(&(launch.run_id, launch.attempt)) {
            handle.launch.send_if_modified(|current| {
                if current.is_some() {
                    return false;
                }
                *current = Some(launch);
                true
            });
        }
    }

    fn acknowledge(&self, ack: &v1::Ack) {
        if let Some(handle) = self.runs().get(&(ack.run_id, ack.attempt)) {
            handle.acks.send_modify(|state| {
                state.log_seq = state.log_seq.max(ack.log_seq);
                state.metric_seq = state.metric_seq.max(ack.metric_seq);
                state.finished |= ack.finished;
                state.discard |= ack.discard;
            });
            if ack.discard {
                warn!(
                    run_id = ack.run_id,
                    attempt = ack.attempt,
                    "The coordinator has no record of this attempt: stopping and discarding it."
                );
                handle.cancel.cancel();
            }
        }
    }

    /// A channel to the coordinator, waiting for the session to have one.
    async fn coordinator_channel(&self) -> tonic::transport::Channel {
        let mut watch = self.channel.subscribe();
        loop {
            if let Some(channel) = watch.borrow_and_update().clone() {
                return channel;
            }
            if watch.changed().await.is_err() {
                // The sender lives as long as the agent; this cannot end while we hold it.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// How often stale attempt directories are swept: a minute, or `KILN_AGENT_SWEEP_SECS`
/// seconds (not a documented setting: tests shorten it).
fn sweep_interval() -> Duration {
    std::env::var("KILN_AGENT_SWEEP_SECS")
        .ok()
        .and_then(|secs| secs.parse::<f64>().ok())
        .filter(|secs| *secs > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60))
}

/// Removes the attempt directories of `data_dir/runs` not `held`, older than `min_age`
/// and without a live supervisor; returns which.
fn sweep_runs_dir(
    data_dir: &std::path::Path,
    held: impl Fn(&(i64, u32)) -> bool,
    min_age: Duration,
) -> Vec<(i64, u32)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("runs")) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let root = entry.path();
        let Some(key) = parse_run_dir(&root) else {
            continue;
        };
        let old_enough = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if !old_enough || held(&key) {
            continue;
        }
        let state = spool::StateDir(root.join("state"));
        let supervised = spool::read_json::<spool::ProcessRecord>(&state.supervisor())
            .ok()
            .flatten()
            .is_some_and(|record| record.alive());
        if supervised {
            warn!(
                run_id = key.0,
                attempt = key.1,
                "An attempt directory no run holds still has a live supervisor: left alone."
            );
            continue;
        }
        run::remove_attempt(data_dir, &root, key.0, key.1);
        swept.push(key);
    }
    swept
}

/// `runs/<run>.<attempt>` → (run, attempt).
fn parse_run_dir(root: &std::path::Path) -> Option<(i64, u32)> {
    let name = root.file_name()?.to_str()?;
    let (run, attempt) = name.split_once('.')?;
    Some((run.parse().ok()?, attempt.parse().ok()?))
}

/// Caps glibc's malloc arenas: by default every thread that allocates may get its own arena
/// (up to 8 per core), and memory freed in one is never reused by another, so an agent that
/// unpacked a few large snapshots on blocking-pool threads would stay large when idle.
/// Call once at start-up, before threads exist.
#[allow(unsafe_code)]
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed after a run (download, unpack and pack buffers, mostly on blocking-pool
/// threads whose malloc arenas glibc keeps) back to the system, so an idle agent stays small.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers
    // from us and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn load_or_create_agent_id(config: &Config) -> anyhow::Result<String> {
    let path = config.data_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let id = format!("ag-{:08x}", rand::random::<u32>());
    std::fs::write(&path, &id).with_context(|| format!("write {}", path.display()))?;
    Ok(id)
}
