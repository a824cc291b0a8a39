//! The local target: with no coordinator configured, `kiln` talks to a per-user background
//! daemon that runs an embedded coordinator and one local agent in one process, listening on
//! a Unix socket under the XDG data dir. The first command that needs it starts it; it exits
//! by itself after a quiet period with no queued or running run. A run therefore outlives the
//! `kiln submit` that started it (Ctrl-C stops following, not the run), and run history
//! persists in `$XDG_DATA_HOME/kiln/local/coordinator/kiln.db`.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::target::LOCAL_TARGET;
use kiln_proto::Address;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// How long the daemon stays up with nothing queued or running.
const DEFAULT_IDLE_EXIT: Duration = Duration::from_secs(15 * 60);

/// The local agent's settings: the agent's own environment variables as `kiln-agent` reads
/// them (`KILN_PYTHON`, `KILN_DOCKER_CPU_IMAGE`, `KILN_CONDA_CHANNEL_ALIAS`, ...; see
/// `kiln-agent --help`), as they were when the daemon started, under what makes it the
/// local target: its socket, target and data directory. Metrics are sampled every second
/// unless `KILN_METRICS_INTERVAL` says otherwise, and scripts run as the user, with the
/// daemon's whole environment (but `KILN_*`).
fn local_agent_config(
    socket: &std::path::Path,
    home: &std::path::Path,
) -> anyhow::Result<kiln_agent::Config> {
    use kiln_agent::config::Settings;
    #[derive(clap::Parser)]
    struct FromEnvironment {
        #[command(flatten)]
        settings: Settings,
    }
    let from_env = <FromEnvironment as clap::Parser>::try_parse_from(["kiln-local-agent"])
        .map_err(|error| {
            anyhow::anyhow!("the local agent's settings from the environment: {error}")
        })?
        .settings;
    let forced = Settings {
        coordinator: Some(Address::Unix(socket.to_path_buf()).to_string()),
        target: Some(LOCAL_TARGET.to_string()),
        data_dir: Some(home.join("agent")),
        ..Settings::default()
    };
    // The local target runs the user's own scripts as that user: no per-run users, even
    // for root (KILN_RUN_USERS turns them on).
    let local_defaults = Settings {
        metrics_interval: Some(1.0),
        run_users: Some("off".to_string()),
        // Your own scripts see your environment (API keys, caches), as in a shell.
        pass_env: Some(vec!["*".to_string()]),
        ..Settings::default()
    };
    forced
        .or(from_env)
        .or(local_defaults)
        .resolve()
        .context("the local agent's settings")?
        .agent_config()
}

pub fn home() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_LOCAL_HOME") {
        return Ok(PathBuf::from(dir));
    }
    Ok(dirs::data_dir()
        .context("cannot find a data directory for the local target: set $HOME or $XDG_DATA_HOME")?
        .join("kiln/local"))
}

pub fn socket_path() -> anyhow::Result<PathBuf> {
    Ok(home()?.join("kiln.sock"))
}

pub fn address() -> anyhow::Result<Address> {
    Ok(Address::Unix(socket_path()?))
}

/// Connects to the local daemon, starting it first if nothing answers.
pub async fn connect_or_start() -> anyhow::Result<tonic::transport::Channel> {
    let address = address()?;
    if let Ok(channel) = kiln_proto::connect(&address).await {
        return Ok(channel);
    }
    let home = home()?;
    std::fs::create_dir_all(&home).with_context(|| format!("create {}", home.display()))?;
    let log_path = home.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("find the kiln executable")?;
    std::process::Command::new(exe)
        .arg("local-daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("start the local Kiln daemon")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match kiln_proto::connect(&address).await {
            Ok(channel) => return Ok(channel),
            Err(error) if tokio::time::Instant::now() > deadline => {
                return Err(error.context(format!(
                    "the local Kiln daemon did not start; see {}",
                    log_path.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The daemon itself (`kiln local-daemon`, started by [`connect_or_start`]).
pub async fn daemon() -> anyhow::Result<()> {
    let home = home()?;
    std::fs::create_dir_all(&home)?;
    // One daemon per data dir: whoever holds the lock serves; a second one leaves quietly.
    let lock_file = std::fs::File::create(home.join("daemon.lock"))?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err(_) => return Ok(()),
        };
    std::fs::write(home.join("daemon.pid"), format!("{}\n", std::process::id()))?;
    let shutdown = CancellationToken::new();
    let config = kiln_coordinator::Config::new(home.join("coordinator"));
    let coordinator = kiln_coordinator::Coordinator::start(config, shutdown.clone())?;
    coordinator.ensure_target(LOCAL_TARGET).await?;
    let socket = socket_path()?;
    let listener =
        kiln_coordinator::Listener::bind(&format!("unix://{}", socket.display())).await?;

    let mut agent_config = local_agent_config(&socket, &home)?;
    if let Some(slots) = std::env::var("KILN_LOCAL_SLOTS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        agent_config.slots = slots;
    }
    let idle_exit = std::env::var("KILN_LOCAL_IDLE_EXIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_IDLE_EXIT);
    info!(socket = %socket.display(), "Local Kiln daemon ready.");

    let agent_stop = CancellationToken::new();
    let gpus: Arc<dyn kiln_agent::gpu::GpuProbe> = Arc::new(kiln_agent::gpu::NvmlProbe::new());
    let agent = tokio::spawn(kiln_agent::Agent::run(
        agent_config,
        gpus,
        agent_stop.clone(),
    ));
    let server = tokio::spawn(kiln_coordinator::serve(
        coordinator.clone(),
        listener,
        shutdown.clone(),
    ));

    // Stop on a signal or after the idle period.
    let db = coordinator.db().clone();
    let mut idle_since = tokio::time::Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(5).min(idle_exit));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = check.tick() => {
                let busy = db
                    .call(|s| s.list_targets())
                    .await
                    .map(|targets| targets.iter().any(|t| t.runs_queued + t.runs_active > 0))
                    .unwrap_or(true);
                if busy {
                    idle_since = tokio::time::Instant::now();
                } else if idle_since.elapsed() >= idle_exit {
                    info!("Idle: the local daemon exits.");
                    break;
                }
            }
        }
    }
    agent_stop.cancel();
    let _ = agent.await;
    shutdown.cancel();
    let _ = server.await;
    coordinator.stopped().await;
    Ok(())
}
