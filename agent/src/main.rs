//! `kiln-agent`: parses flags, sets up tracing and signals, and runs the agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kiln_agent::{Agent, Config, gpu};
use kiln_common::target::TargetName;
use kiln_proto::Address;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Kiln's agent: joins a compute target, runs the scripts the coordinator assigns to it and
/// streams their logs and metrics back.
///
/// Example:
///   kiln-agent --coordinator http://10.0.0.5:7070 --target gpu --slots 2
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The coordinator: http://HOST:PORT or unix:///PATH.
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// The compute target to join: 2–16 lowercase letters, digits or '-', starting with a letter.
    #[arg(long, env = "KILN_TARGET")]
    target: Option<String>,
    /// Directory for the agent id, the snapshot cache and run directories.
    /// Default: $XDG_DATA_HOME/kiln/agent.
    #[arg(long, env = "KILN_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How many runs may execute at once.
    #[arg(long, env = "KILN_SLOTS", default_value_t = 1)]
    slots: u32,
    /// Interpreter for .py scripts (the user-managed environment).
    #[arg(long, env = "KILN_PYTHON", default_value = kiln_agent::DEFAULT_PYTHON)]
    python: String,
    /// Seconds between heartbeats.
    #[arg(long, env = "KILN_HEARTBEAT_INTERVAL", default_value_t = 5.0)]
    heartbeat_interval: f64,
    /// Seconds between system metric samples (CPU, memory, GPUs) of each run.
    #[arg(long, env = "KILN_METRICS_INTERVAL", default_value_t = 5.0)]
    metrics_interval: f64,
    /// Host name to report (default: the system's).
    #[arg(long, env = "KILN_HOSTNAME")]
    hostname: Option<String>,
    /// Print what the agent detects about this host (CPUs, memory, GPUs via NVML, one GPU
    /// sample) as JSON, and exit.
    #[arg(long)]
    print_host: bool,
}

fn main() -> anyhow::Result<()> {
    kiln_agent::limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let gpus: Arc<dyn gpu::GpuProbe> = Arc::new(gpu::NvmlProbe::new());
    if args.print_host {
        let host = kiln_agent::telemetry::host_info(args.hostname.as_deref(), gpus.as_ref());
        println!(
            "{}",
            serde_json::to_string_pretty(&host_json(&host, &gpus.sample()))?
        );
        return Ok(());
    }
    let target = args
        .target
        .context("--target is required: the compute target this agent joins, e.g. --target gpu")?;
    let target = TargetName::new(&target)?;
    let coordinator = Address::parse(&args.coordinator)?;
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => dirs::data_dir()
            .context("no data directory: set --data-dir")?
            .join("kiln/agent"),
    };
    let mut config = Config::new(coordinator, target, data_dir);
    config.slots = args.slots.max(1);
    config.python = args.python;
    config.heartbeat_interval = Duration::from_secs_f64(args.heartbeat_interval.max(0.05));
    config.metrics_interval = Duration::from_secs_f64(args.metrics_interval.max(0.05));
    config.hostname = args.hostname;

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    Agent::run(config, gpus, shutdown).await
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

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping."),
        _ = int.recv() => info!("SIGINT: stopping."),
    }
    shutdown.cancel();
}
