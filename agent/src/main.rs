//! `kiln-agent`: parses flags, sets up tracing and signals, and runs the agent.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kiln_agent::config::{self, Settings};
use kiln_agent::{Agent, gpu};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Kiln's agent: joins a compute target, runs the scripts the coordinator assigns to it and
/// streams their logs and metrics back.
///
/// Settings come from flags, environment variables and a TOML file, in that order of
/// precedence: /etc/kiln/agent.toml when it exists, or --config PATH. Each flag below is
/// also a key of that file (`--data-dir` is `data_dir`).
///
/// Examples:
///   kiln-agent --coordinator http://10.0.0.5:7070 --target gpu --slots 2
///   kiln-agent --print-config
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The TOML config file. [default: /etc/kiln/agent.toml, when it exists]
    #[arg(long, env = "KILN_AGENT_CONFIG")]
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
}

fn main() -> anyhow::Result<()> {
    kiln_agent::limit_malloc_arenas();
    let args = Args::parse();
    let (file, file_settings) = config::load(args.config.as_deref())?;
    let settings = args.settings.or(file_settings);
    if args.print_host {
        let gpus = gpu::NvmlProbe::new();
        let host = kiln_agent::telemetry::host_info(settings.hostname.as_deref(), &gpus);
        println!(
            "{}",
            serde_json::to_string_pretty(&host_json(&host, &gpu::GpuProbe::sample(&gpus)))?
        );
        return Ok(());
    }
    let effective = settings.resolve()?;
    if args.print_config {
        match &file {
            Some(path) => println!("# config file: {}", path.display()),
            None => println!("# config file: none"),
        }
        print!("{}", effective.to_toml());
        return Ok(());
    }
    config::init_logging(&effective.log);
    let config_file = file.map(|path| path.display().to_string());
    info!(
        config_file = config_file.as_deref().unwrap_or("none"),
        version = kiln_common::VERSION,
        "Agent starting."
    );
    let config = effective.agent_config()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(async {
            let gpus: Arc<dyn gpu::GpuProbe> = Arc::new(gpu::NvmlProbe::new());
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            Agent::run(config, gpus, shutdown).await
        })
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
