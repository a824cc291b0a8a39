//! `kiln-coordinator`: parses flags, sets up tracing and signals, and runs the coordinator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kiln_coordinator::{Config, Coordinator, Listener};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Kiln's coordinator: holds compute targets, the run queue, run history, logs, metrics and
/// snapshot blobs, and assigns runs to agents.
///
/// Example:
///   kiln-coordinator --listen 127.0.0.1:7070 --data-dir /var/lib/kiln/coordinator
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Address to serve gRPC on: HOST:PORT, or unix:///PATH for a Unix socket.
    #[arg(long, env = "KILN_LISTEN", default_value = kiln_coordinator::DEFAULT_LISTEN)]
    listen: String,
    /// Directory for the SQLite database (kiln.db) and the blob store (blobs/).
    /// Default: $XDG_DATA_HOME/kiln/coordinator.
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds without a heartbeat after which an agent and its runs are lost.
    #[arg(long, env = "KILN_HEARTBEAT_TTL", default_value_t = 30)]
    heartbeat_ttl: u64,
    /// Largest snapshot or outputs archive accepted, in bytes.
    #[arg(long, env = "KILN_MAX_BLOB_BYTES", default_value_t = kiln_coordinator::DEFAULT_MAX_BLOB_BYTES)]
    max_blob_bytes: u64,
    /// Write the address actually listened on (useful with port 0) to this file.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => dirs::data_dir()
            .context("no data directory: set --data-dir")?
            .join("kiln/coordinator"),
    };
    let mut config = Config::new(data_dir);
    config.heartbeat_ttl = Duration::from_secs(args.heartbeat_ttl.max(1));
    config.max_blob_bytes = args.max_blob_bytes;

    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(config.clone(), shutdown.clone())?;
    let listener = Listener::bind(&args.listen).await?;
    let address = listener.address();
    if let Some(path) = &args.address_file {
        std::fs::write(path, format!("{address}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    info!(listen = %address, data_dir = %config.data_dir.display(), version = kiln_common::VERSION, "Coordinator ready.");

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
