//! The Kiln agent as a library. [`Agent::start`] registers with the coordinator and runs what
//! it is assigned until the shutdown token is cancelled; `main.rs` and the `kiln` CLI's local
//! mode only build a [`Config`].
//!
//! Shutdown versus kill: cancelling the agent's token *stops the agent*, which in this version
//! also stops its runs (reported as failed, "agent stopped"); a coordinator `CancelRun` kills
//! one run (reported as cancelled).

pub mod config;
pub mod gpu;
pub mod runner;
mod session;
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
use tracing::info;

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
}

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
        }
    }
}

/// Why a run is being stopped by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A user cancelled it.
    Cancelled,
    /// The agent is shutting down.
    AgentStopping,
}

struct RunHandle {
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

pub struct Agent {
    config: Config,
    agent_id: String,
    host: v1::HostInfo,
    gpus: Arc<dyn gpu::GpuProbe>,
    /// Messages for the coordinator; the session forwards them while connected.
    uplink: mpsc::Sender<v1::AgentMessage>,
    runs: Mutex<HashMap<(i64, u32), RunHandle>>,
    run_tasks: TaskTracker,
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
        for dir in ["snapshots/tmp", "runs", "sock", "python"] {
            std::fs::create_dir_all(config.data_dir.join(dir))
                .with_context(|| format!("create {}", config.data_dir.join(dir).display()))?;
        }
        let python_dir = config.data_dir.join("python");
        std::fs::write(python_dir.join("kiln.py"), KILN_PY)
            .context("write the kiln Python module")?;
        let agent_id = load_or_create_agent_id(&config)?;
        let host = telemetry::host_info(config.hostname.as_deref(), gpus.as_ref());
        info!(
            agent_id = %agent_id,
            target = %config.target,
            coordinator = %config.coordinator,
            cpus = host.cpus,
            gpus = host.gpus.len(),
            gpu_probe = %host.gpu_probe_error,
            "Agent starting."
        );
        let (uplink, uplink_rx) = mpsc::channel(4096);
        let (channel, _) = tokio::sync::watch::channel(None);
        let agent = Arc::new(Agent {
            config,
            agent_id,
            host,
            gpus,
            uplink,
            runs: Mutex::new(HashMap::new()),
            run_tasks: TaskTracker::new(),
            channel,
            python_dir,
        });
        let session_stop = CancellationToken::new();
        let session = tokio::spawn(session::run(agent.clone(), uplink_rx, session_stop.clone()));

        shutdown.cancelled().await;
        info!("Agent stopping: stopping runs.");
        agent.stop_all_runs(StopReason::AgentStopping);
        agent.run_tasks.close();
        if tokio::time::timeout(Duration::from_secs(20), agent.run_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Some runs did not stop within 20 s.");
        }
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
        let stop = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        {
            let mut runs = self.runs();
            if runs.contains_key(&key) {
                return;
            }
            runs.insert(
                key,
                RunHandle {
                    stop: stop.clone(),
                    reason: reason.clone(),
                },
            );
        }
        let agent = self.clone();
        self.run_tasks.spawn(async move {
            runner::execute(agent.clone(), assignment, stop, reason).await;
            agent.runs().remove(&key);
            release_free_memory();
        });
    }

    fn stop_run(&self, run_id: i64, attempt: u32, why: StopReason) {
        if let Some(handle) = self.runs().get(&(run_id, attempt)) {
            handle
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(why);
            handle.stop.cancel();
        }
    }

    fn stop_all_runs(&self, why: StopReason) {
        for handle in self.runs().values() {
            handle
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(why);
            handle.stop.cancel();
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
