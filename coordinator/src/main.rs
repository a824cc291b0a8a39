//! `kiln-coordinator`: parses flags, sets up tracing and signals, and runs the coordinator.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use kiln_coordinator::config::{self, Settings};
use kiln_coordinator::{Coordinator, Listener};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Kiln's coordinator: holds compute targets, the run queue, run history, logs, metrics and
/// snapshot blobs, and assigns runs to agents.
///
/// Settings come from flags, environment variables and a TOML file, in that order of
/// precedence: /etc/kiln/coordinator.toml when it exists, or --config PATH. Each flag below
/// is also a key of that file (`--data-dir` is `data_dir`).
///
/// Examples:
///   kiln-coordinator --listen 127.0.0.1:7070 --data-dir /var/lib/kiln/coordinator
///   kiln-coordinator --config /etc/kiln/coordinator.toml --print-config
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The TOML config file. [default: /etc/kiln/coordinator.toml, when it exists]
    #[arg(long, env = "KILN_COORDINATOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the configuration in force (flags, environment, file and defaults merged) as
    /// TOML, and exit.
    #[arg(long)]
    print_config: bool,
    /// Write the address actually listened on (useful with port 0) to this file.
    #[arg(long)]
    address_file: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (file, file_settings) = config::load(args.config.as_deref())?;
    let effective = args.settings.or(file_settings).resolve()?;
    if args.print_config {
        match &file {
            Some(path) => println!("# config file: {}", path.display()),
            None => println!("# config file: none"),
        }
        print!("{}", effective.to_toml());
        return Ok(());
    }
    config::init_logging(&effective.log);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(serve(effective, file, args.address_file))
}

async fn serve(
    effective: config::Effective,
    file: Option<PathBuf>,
    address_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = effective.coordinator_config();
    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(config.clone(), shutdown.clone())?;
    let listener = Listener::bind(&effective.listen).await?;
    let address = listener.address();
    if let Some(path) = &address_file {
        std::fs::write(path, format!("{address}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    let config_file = file.map(|path| path.display().to_string());
    info!(
        listen = %address,
        data_dir = %config.data_dir.display(),
        config_file = config_file.as_deref().unwrap_or("none"),
        version = kiln_common::VERSION,
        "Coordinator ready."
    );

    tokio::spawn(stop_on_signal(shutdown.clone()));
    kiln_coordinator::serve(coordinator.clone(), listener, shutdown).await?;
    coordinator.stopped().await;
    info!("Coordinator stopped.");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining."),
        _ = int.recv() => info!("SIGINT: draining."),
    }
    shutdown.cancel();
}
