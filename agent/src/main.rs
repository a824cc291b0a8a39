//! `kiln-agent`: parses flags, sets up tracing and signals, and runs the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_agent::config::{self, Settings};
use kiln_agent::{Agent, gpu};
use kiln_common::target::TargetName;
use kiln_proto::{Address, v1};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Kiln's agent: joins a compute target, runs the scripts the coordinator assigns to it and
/// streams their logs and metrics back.
///
/// Settings come from flags, environment variables and a TOML file, in that order of
/// precedence: /etc/kiln/agent.toml when it exists, or --config PATH. Each flag below is
/// also a key of that file (`--data-dir` is `data_dir`).
///
/// Examples:
///   sudo kiln-agent join --coordinator https://10.0.0.5:7070 --ca-hash sha256:HEX \
///       --target gpu --token-file -
///   kiln-agent --print-config
///   kiln-agent --coordinator http://127.0.0.1:7070 --target cpu   (an --insecure coordinator)
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The TOML config file. [default: /etc/kiln/agent.toml, when it exists]
    #[arg(long, env = "KILN_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the configuration in force (flags, environment, file and defaults merged) as
    /// TOML, and exit.
    #[arg(long)]
    print_config: bool,
    /// Print what the agent detects about this host (CPUs, memory, GPUs via NVML, one GPU
    /// sample) as JSON, and exit.
    #[arg(long)]
    print_host: bool,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join a compute target: present a join token to the coordinator, write `coordinator`
    /// and `target` into the config file (keeping the rest) and restart kiln-agent.service.
    ///
    /// Run it as root on a new agent host; `kiln-coordinator token create` on the coordinator
    /// host prints the exact command. The agent trusts the coordinator only if its CA has the
    /// hash given with --ca-hash; it makes its key here, sends a certificate signing request
    /// with the token, and stores the client certificate it gets in DATA_DIR/identity. From
    /// then on it authenticates with that certificate (and renews it by itself).
    ///
    /// Example:
    ///   sudo kiln-agent join --coordinator https://10.0.0.5:7070 --ca-hash sha256:HEX \
    ///       --target gpu --token-file -
    #[command(verbatim_doc_comment)]
    Join {
        /// The coordinator: https://HOST:PORT (http:// for an --insecure one).
        #[arg(long)]
        coordinator: String,
        /// The SHA-256 of the coordinator's CA certificate, `sha256:HEX`, as `token create`
        /// printed it. Required for https.
        #[arg(long)]
        ca_hash: Option<String>,
        /// The join token (ID.SECRET) that `kiln-coordinator token create` printed. Visible
        /// to every user of this host while `join` runs: prefer --token-file.
        #[arg(
            long,
            env = "KILN_JOIN_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// Read the join token from this file's first line, or from standard input for `-`
        /// (what the command `token create` prints does: paste the token, then Enter).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The compute target the token was made for.
        #[arg(long)]
        target: String,
        /// Write the config file but do not restart the service.
        #[arg(long)]
        no_restart: bool,
        /// Also set `data_dir` in the config file (where the identity is stored), e.g. a
        /// directory of your own when running the agent by hand without root. Default: the
        /// file's `data_dir`, else /var/lib/kiln/agent.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Drain this host's running agent: it takes no new runs, stops the runs it holds
    /// (SIGTERM to each script, SIGKILL after the grace; checkpoints and outputs are
    /// uploaded), reports each to the coordinator, which queues it again whatever its retry
    /// budget (on another agent, from its last checkpoint), and exits.
    ///
    /// `systemctl stop kiln-agent` (and restart, and upgrades) leave runs running for the next
    /// agent process; drain is for taking the host out of service. Removing the package
    /// drains the agent first. The running agent is found by its lock on the data
    /// directory and is sent SIGUSR1 (the same as `systemctl kill -s USR1 kiln-agent`).
    ///
    /// Example:
    ///   sudo kiln-agent drain --timeout 300
    #[command(verbatim_doc_comment)]
    Drain {
        /// Seconds to wait for the agent to report its runs and exit; after that `drain`
        /// stops it as SIGTERM does (unreported runs are reported by the next agent process,
        /// or declared lost by the coordinator) and exits with status 1.
        #[arg(long, default_value_t = 120, value_name = "SECONDS")]
        timeout: u64,
    },
}

fn main() -> anyhow::Result<()> {
    // The identity, run state (env secrets) and spools are nobody else's, and so are the files
    // of the runs' processes, which inherit it: files 0600, directories 0700.
    kiln_common::private::restrict_umask();
    kiln_proto::tls::install_provider();
    kiln_agent::supervisor::run_if_requested();
    kiln_agent::limit_malloc_arenas();
    let args = Args::parse();
    if let Some(Command::Join {
        coordinator,
        ca_hash,
        token,
        token_file,
        target,
        no_restart,
        data_dir,
    }) = args.command
    {
        let token = match (token, token_file) {
            (_, Some(path)) => kiln_common::private::read_token_file(&path, "join token")?,
            (Some(token), None) => token,
            (None, None) => unreachable!("clap requires --token or --token-file"),
        };
        let path = args
            .config
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
        return join(
            &coordinator,
            ca_hash.as_deref(),
            &token,
            &target,
            &path,
            data_dir.as_deref(),
            no_restart,
        );
    }
    let (file, file_settings) =
        config::load(args.config.as_deref()).unwrap_or_else(|error| exit_config_error(error));
    let settings = args.settings.or(file_settings);
    if let Some(Command::Drain { timeout }) = args.command {
        let data_dir = settings
            .data_dir_or_default()
            .unwrap_or_else(|error| exit_config_error(error));
        return drain(&data_dir, Duration::from_secs(timeout));
    }
    if args.print_host {
        let gpus = gpu::probe_from_env();
        let host = kiln_agent::telemetry::host_info(settings.hostname.as_deref(), gpus.as_ref());
        println!(
            "{}",
            serde_json::to_string_pretty(&host_json(&host, &gpus.sample()))?
        );
        return Ok(());
    }
    let effective = settings
        .resolve()
        .unwrap_or_else(|error| exit_config_error(error));
    if args.print_config {
        if file.is_empty() {
            println!("# config file: none");
        }
        for path in &file {
            println!("# config file: {}", path.display());
        }
        print!("{}", effective.to_toml());
        return Ok(());
    }
    if effective.coordinator_is_tls() {
        match kiln_agent::identity::load(&effective.data_dir) {
            Ok(Some(_)) => {}
            Ok(None) => exit_config_error(anyhow::anyhow!(
                "this agent has no certificate for {} (it never joined, or was revoked): run \
                 the `kiln-agent join` command that `kiln-coordinator token create` prints \
                 (`sudo kiln-agent join --coordinator URL --ca-hash sha256:HEX --token-file - \
                 --target NAME`)",
                effective.coordinator
            )),
            Err(error) => exit_config_error(error),
        }
    }
    kiln_common::logging::init_logging(&effective.log);
    let config = effective.agent_config()?;
    // Run users pass through the data directory to their own run directories (0711).
    let others_keep = if kiln_agent::sandbox::enabled(&config) {
        0o001
    } else {
        0
    };
    if let Some(warning) = kiln_common::private::private_dir(&effective.data_dir, others_keep)
        .with_context(|| format!("create {}", effective.data_dir.display()))?
    {
        warn!("{warning}");
    }
    let config_files: Vec<String> = file.iter().map(|p| p.display().to_string()).collect();
    info!(
        config_files = %if config_files.is_empty() { "none".to_string() } else { config_files.join(", ") },
        version = kiln_common::VERSION,
        "Configuration loaded."
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    // The signal handlers exist before the lock is taken: `kiln-agent drain` (which finds
    // this process by the lock) or a SIGTERM right after start must never meet a process
    // whose SIGUSR1/SIGTERM still has the default action (death, runs unreported).
    let signals = runtime.block_on(async { Signals::install() })?;
    // Held until the process exits: a second agent on this directory is refused.
    let _lock = kiln_common::dirlock::DirLock::acquire(&config.data_dir, "kiln-agent")?;
    if !kiln_agent::sandbox::enabled(&config) {
        tracing::warn!(
            uid = nix::unistd::getuid().as_raw(),
            "Process runs run as this agent's own user: a run can read the agent's identity \
             and other runs' files. Run the agent as root (with run_users) or use Docker \
             environments to contain them (SECURITY.md)."
        );
    }
    runtime.block_on(async {
        let gpus: Arc<dyn gpu::GpuProbe> = Arc::from(gpu::probe_from_env());
        let shutdown = CancellationToken::new();
        let drain = CancellationToken::new();
        tokio::spawn(signals.watch(shutdown.clone(), drain.clone()));
        Agent::run_draining(config, gpus, shutdown, drain).await
    })
}

/// `kiln-agent join`: checks what it can before spending a use of the token, asks the
/// coordinator (pinning its CA), writes the identity and the config file, restarts the
/// service.
fn join(
    coordinator: &str,
    ca_hash: Option<&str>,
    token: &str,
    target: &str,
    path: &Path,
    data_dir: Option<&Path>,
    no_restart: bool,
) -> anyhow::Result<()> {
    use kiln_agent::identity;
    use kiln_proto::tls::{ClientTls, Trust};
    let address = Address::parse(coordinator)?;
    let target_name = TargetName::new(target)?;
    let pin = match (address.is_tls(), ca_hash) {
        (true, Some(hash)) => Some(kiln_proto::tls::parse_ca_hash(hash)?),
        (true, None) => anyhow::bail!(
            "--ca-hash is required for {address}: use the whole command `kiln-coordinator token \
             create` printed (the hash lets this host check that it talks to your coordinator)"
        ),
        (false, _) => None,
    };
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.exists() && nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
        anyhow::bail!(
            "cannot write {} (permission denied): run `kiln-agent join` as root, e.g. with sudo",
            path.display()
        );
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default();
    let key_and_csr = match pin {
        Some(_) => Some(identity::new_key_and_csr()?),
        None => None,
    };
    let request = v1::JoinRequest {
        token: token.trim().to_string(),
        target: target_name.as_str().to_string(),
        hostname,
        csr_pem: key_and_csr
            .as_ref()
            .map(|(_, csr)| csr.clone())
            .unwrap_or_default(),
    };
    let tls = pin.map(|pin| ClientTls::trusting(Trust::Pinned(pin)));
    let reply = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(async {
            let channel = kiln_proto::connect_with(&address, tls.as_ref()).await?;
            let mut client = kiln_proto::clients::enrollment(channel);
            match client.join(request).await {
                Ok(reply) => Ok(reply.into_inner()),
                Err(status) if status.code() == tonic::Code::Unimplemented => anyhow::bail!(
                    "the coordinator at {address} does not accept joins: upgrade kiln-coordinator \
                     to {} or later",
                    kiln_common::VERSION
                ),
                Err(status) => {
                    anyhow::bail!(
                        "the coordinator at {address} refused to join: {}",
                        status.message()
                    )
                }
            }
        })?;
    if let Some(pin) = pin {
        // The handshake already proved the CA; the reply must carry that same CA.
        let sent = kiln_proto::tls::pem_ca_hash(&reply.ca_pem)?;
        anyhow::ensure!(
            kiln_proto::tls::parse_ca_hash(&sent)? == pin,
            "the coordinator sent a CA certificate other than the pinned one"
        );
    }
    let effective =
        config::write_joined(path, &address.to_string(), target_name.as_str(), data_dir)?;
    let data_dir = &effective.data_dir;
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    if !reply.agent_id.is_empty() {
        let id_path = data_dir.join("agent-id");
        if let Ok(previous) = std::fs::read_to_string(&id_path)
            && !previous.trim().is_empty()
            && previous.trim() != reply.agent_id
        {
            // Its containers are removed when the agent starts under the new identity.
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(data_dir.join(identity::PREVIOUS_IDS))
                .and_then(|mut file| writeln!(file, "{}", previous.trim()))
                .context("record the previous agent id")?;
        }
        std::fs::write(&id_path, &reply.agent_id)
            .with_context(|| format!("write {}", id_path.display()))?;
    }
    if let Some((key_pem, _)) = &key_and_csr {
        identity::save(data_dir, &reply.ca_pem, &reply.certificate_pem, key_pem)?;
    }
    give_to_data_dir_owner(data_dir)?;
    eprintln!(
        "Joined target `{}` at {address} (coordinator {}) as agent {}; wrote {}.",
        reply.target,
        reply.coordinator_version,
        reply.agent_id,
        config::drop_in_dir(path)
            .join(config::JOINED_FILE)
            .display()
    );
    if no_restart {
        eprintln!(
            "Not restarting (--no-restart): start the agent with `kiln-agent --config {}`.",
            path.display()
        );
        return Ok(());
    }
    if !Path::new("/run/systemd/system").exists() {
        eprintln!(
            "systemd is not running on this host: start the agent yourself, e.g. \
             `runuser -u kiln -- kiln-agent --config {}`.",
            path.display()
        );
        return Ok(());
    }
    for action in ["enable", "restart"] {
        let status = std::process::Command::new("systemctl")
            .args([action, "kiln-agent.service"])
            .status()
            .with_context(|| format!("run systemctl {action} kiln-agent.service"))?;
        anyhow::ensure!(
            status.success(),
            "systemctl {action} kiln-agent.service failed ({status}): see `journalctl -u kiln-agent`"
        );
    }
    eprintln!(
        "kiln-agent.service enabled and restarted; follow it with `journalctl -u kiln-agent -f`."
    );
    Ok(())
}

/// As root, hands what `join` wrote in the data directory to the directory's owner (the
/// `kiln` user when installed from the package), so that the service can read its key and
/// renew its certificate.
fn give_to_data_dir_owner(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(data_dir)?;
    if meta.uid() == 0 {
        return Ok(());
    }
    let owner = (
        Some(nix::unistd::Uid::from_raw(meta.uid())),
        Some(nix::unistd::Gid::from_raw(meta.gid())),
    );
    let identity = data_dir.join("identity");
    for path in [
        data_dir.join("agent-id"),
        data_dir.join(kiln_agent::identity::PREVIOUS_IDS),
        identity.join("ca.crt"),
        identity.join("agent.pem"),
        identity,
    ] {
        if path.exists() {
            nix::unistd::chown(&path, owner.0, owner.1)
                .with_context(|| format!("give {} to the agent's user", path.display()))?;
        }
    }
    Ok(())
}

fn host_json(host: &kiln_proto::v1::HostInfo, samples: &[gpu::GpuSample]) -> serde_json::Value {
    serde_json::json!({
        "hostname": host.hostname,
        "os": host.os,
        "cpus": host.cpus,
        "memory_bytes": host.memory_bytes,
        "cuda_driver_version": host.cuda_driver_version,
        "gpu_probe_error": host.gpu_probe_error,
        "gpus": host.gpus.iter().map(|g| serde_json::json!({
            "index": g.index, "name": g.name, "uuid": g.uuid, "memory_bytes": g.memory_bytes,
        })).collect::<Vec<_>>(),
        "gpu_samples": samples.iter().map(|s| serde_json::json!({
            "index": s.index,
            "utilization_percent": s.utilization_percent,
            "memory_used_bytes": s.memory_used_bytes,
            "power_watts": s.power_watts,
        })).collect::<Vec<_>>(),
    })
}

/// Exit status for an invalid configuration (EX_CONFIG from sysexits.h); the systemd unit
/// does not restart on it (`RestartPreventExitStatus=78`).
const EXIT_CONFIG: i32 = 78;

fn exit_config_error(error: anyhow::Error) -> ! {
    eprintln!("Error: {error:#}");
    std::process::exit(EXIT_CONFIG)
}

/// The agent's signal handlers, installed (in a runtime) before the data directory is
/// locked.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            usr1: signal(SignalKind::user_defined1()).context("install the SIGUSR1 handler")?,
        })
    }

    /// Cancels `shutdown` on SIGTERM or SIGINT, and `drain` on SIGUSR1 (`kiln-agent drain`).
    async fn watch(mut self, shutdown: CancellationToken, drain: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    info!("SIGTERM: stopping.");
                    shutdown.cancel();
                    return;
                }
                _ = self.int.recv() => {
                    info!("SIGINT: stopping.");
                    shutdown.cancel();
                    return;
                }
                _ = self.usr1.recv(), if !drain.is_cancelled() => {
                    info!("SIGUSR1: draining.");
                    drain.cancel();
                }
            }
        }
    }
}

/// `kiln-agent drain`: signals the agent holding `data_dir` to drain and waits for it to
/// exit, for at most `timeout`; then stops it (SIGTERM) and fails.
fn drain(data_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(pid) = kiln_common::dirlock::holder(data_dir)? else {
        println!(
            "No kiln-agent is running on {}: nothing to drain.",
            data_dir.display()
        );
        return Ok(());
    };
    let pid = Pid::from_raw(pid as i32);
    kill(pid, Signal::SIGUSR1).with_context(|| format!("signal kiln-agent (pid {pid})"))?;
    println!(
        "Draining kiln-agent (pid {pid}): its runs are stopped and given back to the \
         coordinator; waiting up to {} s.",
        timeout.as_secs()
    );
    let started = std::time::Instant::now();
    let gone = || kiln_common::dirlock::holder(data_dir).is_ok_and(|holder| holder.is_none());
    while started.elapsed() < timeout {
        if gone() {
            println!(
                "Drained in {:.1} s: kiln-agent (pid {pid}) reported its runs and exited.",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = kill(pid, Signal::SIGTERM);
    anyhow::bail!(
        "kiln-agent (pid {pid}) did not finish draining within {} s (is the coordinator \
         reachable?): stopped it; runs it had not reported are reported when an agent starts \
         on {} again, or declared lost by the coordinator",
        timeout.as_secs(),
        data_dir.display()
    )
}
