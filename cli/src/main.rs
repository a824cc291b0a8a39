//! `kiln`: the user's command line. A client of the coordinator's public API only; with no
//! coordinator configured it uses the local target (see `local.rs`).

mod local;
mod output;
mod runconfig;
mod submit;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_proto::{Address, v1};
use tonic::transport::Channel;

/// Kiln runs your training scripts on your own machines: on this one (the local target) or
/// on a pool of GPU VMs (a compute target of kiln-agents).
///
/// With no coordinator configured, commands use the local target: a background daemon on
/// this machine that keeps run history under $XDG_DATA_HOME/kiln/local.
///
/// Examples:
///   kiln submit examples/quickstart train.py -- --epochs 5
///   kiln --coordinator http://10.0.0.5:7070 submit --target gpu . train.py
///   kiln runs
#[derive(Parser, Debug)]
#[command(name = "kiln", verbatim_doc_comment, disable_version_flag = true)]
struct Cli {
    /// The coordinator: http://HOST:PORT or unix:///PATH. Unset: the local target.
    #[arg(long, env = "KILN_COORDINATOR", global = true)]
    coordinator: Option<String>,
    /// Print kiln's version and the coordinator's, when one is reachable.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum AgentsCommand {
    /// One agent: host, GPUs, state, and the environments (venv, conda) it keeps cached.
    Show {
        /// The agent's id or host name.
        agent: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    Submit(Box<submit::SubmitArgs>),
    /// Print a run's log; with --follow keep printing until the run ends.
    ///
    /// Example:
    ///   kiln logs 42 --follow
    #[command(verbatim_doc_comment)]
    Logs {
        run: i64,
        #[arg(short, long)]
        follow: bool,
        /// Only the lines of this rank (distributed runs).
        #[arg(long)]
        rank: Option<u32>,
    },
    /// List runs, newest first.
    ///
    /// Example:
    ///   kiln runs --target gpu --json
    #[command(verbatim_doc_comment)]
    Runs {
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one run: status, target, agent, environment, resources, env, timeout, timings,
    /// exit code, snapshot digest.
    ///
    /// Example:
    ///   kiln show 42
    #[command(verbatim_doc_comment)]
    Show {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// A run's metrics: name, last value, step and number of points.
    ///
    /// Example:
    ///   kiln metrics 42
    #[command(verbatim_doc_comment)]
    Metrics {
        run: i64,
        /// Distributed runs: this rank's metrics (default: rank 0).
        #[arg(long)]
        rank: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running run (its whole process tree is stopped).
    ///
    /// Example:
    ///   kiln cancel 42
    #[command(verbatim_doc_comment)]
    Cancel {
        run: i64,
    },
    /// List compute targets with their agents and runs.
    ///
    /// Example:
    ///   kiln targets --json
    #[command(verbatim_doc_comment)]
    Targets {
        #[arg(long)]
        json: bool,
    },
    /// List agents: host, target, CPUs, memory, GPUs, last heartbeat, state.
    ///
    /// Examples:
    ///   kiln agents
    ///   kiln agents show gpu-node-3     # one agent, with its cached environments
    #[command(verbatim_doc_comment)]
    Agents {
        #[command(subcommand)]
        command: Option<AgentsCommand>,
        #[arg(long)]
        json: bool,
    },
    /// Download a run's outputs/ folder.
    ///
    /// Example:
    ///   kiln download 42 ./model-42
    #[command(verbatim_doc_comment)]
    Download {
        run: i64,
        /// Where to put the files (default: ./kiln-run-RUN). Must be empty or not exist.
        dest: Option<PathBuf>,
    },
    /// Run the local target's daemon (started automatically; not for direct use).
    #[command(hide = true)]
    LocalDaemon,
}

fn main() {
    kiln_agent::supervisor::run_if_requested();
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::LocalDaemon)) {
        // The daemon embeds an agent: same allocator setting as kiln-agent.
        kiln_agent::limit_malloc_arenas();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                1
            }
        }
    });
    // Do not wait for stray blocking tasks (a progress bar, a pending read) at exit.
    runtime.shutdown_background();
    std::process::exit(code);
}

/// Where the commands go: an explicit coordinator, or the local target.
pub struct Connection {
    pub address: Address,
    pub local: bool,
}

impl Connection {
    fn from_cli(coordinator: Option<&str>) -> anyhow::Result<Connection> {
        match coordinator {
            Some(text) if !text.is_empty() => Ok(Connection {
                address: Address::parse(text)?,
                local: false,
            }),
            _ => Ok(Connection {
                address: local::address()?,
                local: true,
            }),
        }
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        if self.local {
            local::connect_or_start().await
        } else {
            kiln_proto::connect(&self.address).await
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    if matches!(cli.command, Some(Command::LocalDaemon)) {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        kiln_common::logging::init_logging(&filter);
        local::daemon().await?;
        return Ok(0);
    }
    let connection = Connection::from_cli(cli.coordinator.as_deref())?;
    if cli.version {
        println!("kiln {}", kiln_common::VERSION);
        match kiln_proto::connect(&connection.address).await {
            Ok(channel) => {
                let reply = kiln_proto::clients::kiln(channel)
                    .version(v1::VersionRequest {})
                    .await?
                    .into_inner();
                println!("coordinator {} at {}", reply.version, connection.address);
            }
            Err(error) if connection.local => {
                println!("local target: not running ({error:#})");
            }
            Err(error) => println!("coordinator: {error:#}"),
        }
        return Ok(0);
    }
    let Some(command) = cli.command else {
        use clap::CommandFactory as _;
        Cli::command().print_help()?;
        return Ok(2);
    };
    match command {
        Command::Submit(args) => submit::submit(&connection, *args).await,
        Command::Logs { run, follow, rank } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            if follow {
                submit::follow(&connection, run, 0, rank).await.map(|_| 0)
            } else {
                submit::print_logs(&mut client, run, rank).await.map(|_| 0)
            }
        }
        Command::Runs {
            target,
            limit,
            json,
        } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let runs = client
                .list_runs(v1::ListRunsRequest {
                    target: target.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .runs;
            output::runs(&runs, json);
            Ok(0)
        }
        Command::Show { run, json } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let run = client
                .get_run(v1::GetRunRequest { run_id: run })
                .await
                .map_err(status_error)?
                .into_inner();
            output::show(&run, json);
            Ok(0)
        }
        Command::Metrics { run, rank, json } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let metrics = client
                .list_metrics(v1::ListMetricsRequest { run_id: run, rank })
                .await
                .map_err(status_error)?
                .into_inner()
                .metrics;
            output::metrics(&metrics, json);
            Ok(0)
        }
        Command::Cancel { run } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let run = client
                .cancel_run(v1::CancelRunRequest { run_id: run })
                .await
                .map_err(status_error)?
                .into_inner();
            match run.status() {
                v1::RunStatus::Cancelled => eprintln!("run {} cancelled", run.id),
                status => eprintln!("run {} had already ended: {}", run.id, status.domain()),
            }
            Ok(0)
        }
        Command::Targets { json } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let targets = client
                .list_targets(v1::ListTargetsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .targets;
            output::targets(&targets, json);
            Ok(0)
        }
        Command::Agents { command, json } => {
            let mut client = kiln_proto::clients::kiln(connection.channel().await?);
            let agents = client
                .list_agents(v1::ListAgentsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .agents;
            if let Some(AgentsCommand::Show { agent, json }) = command {
                let found = agents.iter().find(|a| {
                    a.id == agent || a.host.as_ref().is_some_and(|h| h.hostname == agent)
                });
                let Some(found) = found else {
                    let known: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
                    anyhow::bail!(
                        "no agent `{agent}` (give an id or a host name; agents: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    );
                };
                output::agent(found, json);
                return Ok(0);
            }
            output::agents(&agents, json);
            Ok(0)
        }
        Command::Download { run, dest } => {
            let dest = dest.unwrap_or_else(|| PathBuf::from(format!("kiln-run-{run}")));
            submit::download(&connection, run, &dest).await?;
            Ok(0)
        }
        Command::LocalDaemon => unreachable!("handled above"),
    }
}

/// A gRPC status as a user-facing error: its message, which the coordinator writes for users.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => {
            anyhow::anyhow!("the coordinator is unavailable: {}", status.message())
        }
        _ => anyhow::anyhow!("{}", status.message()),
    }
}
