//! `kiln`: the user's command line. A client of the coordinator's public API only; with no
//! coordinator configured it uses the local target (see `local.rs`).

mod credentials;
mod history;
mod listing;
mod local;
mod output;
mod runconfig;
mod submit;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_proto::{Address, v1};
use tonic::transport::Channel;

use crate::output::{errln, outln};

/// Kiln runs your training scripts on your own machines: on this one (the local target) or
/// on a pool of GPU VMs (a compute target of kiln-agents).
///
/// With no coordinator configured (no --coordinator, no KILN_COORDINATOR, no `kiln login`),
/// commands use the local target: a background daemon on this machine that keeps run
/// history under $XDG_DATA_HOME/kiln/local.
///
/// Examples:
///   kiln submit examples/quickstart train.py -- --epochs 5
///   kiln login --coordinator https://10.0.0.5:7070 --ca-hash sha256:HEX --token-file -
///   kiln submit --target gpu . train.py
///   kiln runs
#[derive(Parser, Debug)]
#[command(name = "kiln", verbatim_doc_comment, disable_version_flag = true)]
struct Cli {
    /// The coordinator: https://HOST:PORT, http://HOST:PORT (an --insecure one) or
    /// unix:///PATH. Unset: the one `kiln login` stored, else the local target.
    #[arg(long, env = "KILN_COORDINATOR", global = true)]
    coordinator: Option<String>,
    /// Print kiln's version and the coordinator's, when one is reachable.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum TargetsCommand {
    /// Delete a target (admins): it must have no agents (`kiln agents forget` them) and no
    /// queued or active runs; its past runs keep its name. An agent joining it again
    /// recreates it.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum AgentsCommand {
    /// Revoke an agent (admins): its certificate is refused from now on, its open session
    /// is closed, its runs are requeued, and it stops its workloads and deletes its key.
    /// The host needs a new join token to come back.
    ///
    /// Example:
    ///   kiln agents revoke gpu-node-3
    #[command(verbatim_doc_comment)]
    Revoke {
        /// The agent's id or host name.
        agent: String,
    },
    /// Forget an agent that is not connected (admins): it leaves the lists and stops being
    /// counted; its past runs keep its id. If it connects again with a valid key it registers
    /// again: revoke it to keep it out.
    ///
    /// Example:
    ///   kiln agents forget old-node-7
    #[command(verbatim_doc_comment)]
    Forget {
        /// The agent's id or host name.
        agent: String,
    },
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
    /// Log in to a coordinator with the API token an admin made (`kiln-coordinator user
    /// create`), checking the coordinator's CA against --ca-hash; later commands use it.
    /// Stored in $XDG_CONFIG_HOME/kiln/credentials.toml, readable by you only.
    ///
    /// Example:
    ///   kiln login --coordinator https://10.0.0.5:7070 --ca-hash sha256:HEX --token-file -
    #[command(verbatim_doc_comment)]
    Login {
        /// The API token (ID.SECRET). Visible to every user of this host while `login` runs:
        /// prefer --token-file.
        #[arg(
            long,
            env = "KILN_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// Read the API token from this file's first line, or from standard input for `-`
        /// (what the command `user create` prints does: paste the token, then Enter).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The SHA-256 of the coordinator's CA certificate, as `user create` printed it.
        #[arg(long, conflicts_with = "ca_file")]
        ca_hash: Option<String>,
        /// The coordinator's CA certificate (PEM), instead of --ca-hash.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Forget the stored login for --coordinator (default: the one in use; then commands go
    /// to the local target until you log in again). Other logins stay.
    Logout,
    /// Who the coordinator takes you for.
    Whoami,
    /// Print a run's log; with --follow keep printing until the run ends, then exit as
    /// `kiln submit` does: the script's exit code (0 when it succeeded, 125 when it could not
    /// start, 130 when it was cancelled or Ctrl-C stopped following, 137 when it was lost).
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
        /// Show at most this many runs (0: every run).
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
    /// A run's metrics: name, last value, step and number of points; with names, every point
    /// of those metrics: a chart (sparkline, first/last/min/max) or the points as JSON/CSV.
    ///
    /// Examples:
    ///   kiln metrics 42
    ///   kiln metrics 42 loss accuracy
    ///   kiln metrics 42 loss --csv > loss.csv
    #[command(verbatim_doc_comment)]
    Metrics {
        run: i64,
        /// Metrics whose every point to show (default: one line per metric).
        names: Vec<String>,
        /// Distributed runs: this rank's metrics (default: rank 0).
        #[arg(long)]
        rank: Option<u32>,
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// With names: every point as CSV (name,step,value,time_unix_ms,rank).
        #[arg(long, requires = "names")]
        csv: bool,
    },
    /// Runs side by side: status, duration, the settings in which they differ (script and
    /// args, env, environment, resources, snapshot, ...) and each metric's last, min and max.
    ///
    /// Example:
    ///   kiln compare 41 42 43
    #[command(verbatim_doc_comment)]
    Compare {
        #[arg(required = true, num_args = 2..)]
        runs: Vec<i64>,
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
    /// Wait until a run ends, printing nothing but its end, and exit as `kiln submit` does
    /// (the script's exit code; 125 could not start, 130 cancelled, 137 lost): for scripts
    /// that submit with --detach and need the outcome.
    ///
    /// Example:
    ///   id=$(kiln submit --detach . train.py) && kiln wait "$id" && kiln download "$id" out/
    #[command(verbatim_doc_comment)]
    Wait {
        run: i64,
    },
    /// List compute targets with their agents and runs.
    ///
    /// Examples:
    ///   kiln targets --json
    ///   kiln targets delete old-pool     # admins; forget its agents first
    #[command(verbatim_doc_comment)]
    Targets {
        #[command(subcommand)]
        command: Option<TargetsCommand>,
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
    kiln_proto::tls::install_provider();
    kiln_agent::supervisor::run_if_requested();
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::LocalDaemon)) {
        // The daemon embeds an agent: same allocator setting and umask as kiln-agent.
        kiln_agent::limit_malloc_arenas();
        kiln_common::private::restrict_umask();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(error) => {
                // Line by line: a message of several lines keeps them, escaped otherwise.
                let message = format!("{error:#}");
                let lines: Vec<_> = message.lines().map(output::sanitize).collect();
                errln!("error: {}", lines.join("\n"));
                1
            }
        }
    });
    // Do not wait for stray blocking tasks (a progress bar, a pending read) at exit.
    runtime.shutdown_background();
    std::process::exit(code);
}

/// Where the commands go (an explicit coordinator, the one `kiln login` stored, or the
/// local target) and with which credentials.
pub struct Connection {
    pub address: Address,
    pub local: bool,
    /// Chosen with --coordinator or KILN_COORDINATOR (not the stored login's default):
    /// `submit --target local` then does not switch to the local daemon.
    pub explicit: bool,
    tls: Option<kiln_proto::tls::ClientTls>,
    pub bearer: kiln_proto::Bearer,
}

impl Connection {
    /// The per-user local daemon (target `local`).
    pub fn local() -> anyhow::Result<Connection> {
        Ok(Connection {
            address: local::address()?,
            local: true,
            explicit: false,
            tls: None,
            bearer: kiln_proto::Bearer::none(),
        })
    }

    fn from_cli(coordinator: Option<&str>) -> anyhow::Result<Connection> {
        let logins = credentials::load()?;
        let explicit = coordinator.filter(|text| !text.is_empty());
        let (address, stored) = match explicit {
            // `local` names the per-user local daemon, whatever else is stored.
            Some("local") => {
                return Ok(Connection {
                    explicit: true,
                    ..Connection::local()?
                });
            }
            Some(text) => {
                let address = Address::parse(text)?;
                let stored = logins.for_coordinator(&address).cloned();
                (address, stored)
            }
            None => match logins.current() {
                Some(stored) => (Address::parse(&stored.coordinator)?, Some(stored.clone())),
                None => return Connection::local(),
            },
        };
        let token = match std::env::var("KILN_TOKEN") {
            Ok(token) if !token.is_empty() => Some(token),
            _ => stored.as_ref().map(|c| c.token.clone()),
        };
        let ca = match std::env::var_os("KILN_CA_FILE") {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("read KILN_CA_FILE {}", path.to_string_lossy()))?,
            ),
            None => stored.map(|c| c.ca).filter(|ca| !ca.is_empty()),
        };
        let tls = match (address.is_tls(), ca) {
            (true, Some(ca)) => Some(kiln_proto::tls::ClientTls::trusting(
                kiln_proto::tls::Trust::CaPem(ca),
            )),
            (true, None) => anyhow::bail!(
                "{address} uses TLS and you are not logged in to it: run `kiln login --coordinator \
                 {address} --ca-hash ... --token ...` with what `kiln-coordinator user create` \
                 printed"
            ),
            (false, _) => None,
        };
        let bearer = match token {
            Some(token) => kiln_proto::Bearer::new(&token)?,
            None => kiln_proto::Bearer::none(),
        };
        Ok(Connection {
            address,
            local: false,
            explicit: explicit.is_some(),
            tls,
            bearer,
        })
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        if self.local {
            local::connect_or_start().await
        } else {
            kiln_proto::connect_with(&self.address, self.tls.as_ref()).await
        }
    }

    /// A user-API client on a new channel, carrying the token.
    pub async fn kiln(
        &self,
    ) -> anyhow::Result<v1::kiln_client::KilnClient<kiln_proto::AuthChannel>> {
        Ok(kiln_proto::clients::kiln(
            self.channel().await?,
            self.bearer.clone(),
        ))
    }
}

/// `kiln login`: fetches and checks the CA (pinned by hash) or reads it from a file, checks
/// the token with `WhoAmI`, and stores all three.
async fn login(
    coordinator: Option<&str>,
    token: &str,
    ca_hash: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    use kiln_proto::tls::{ClientTls, Trust};
    let Some(text) = coordinator.filter(|text| !text.is_empty()) else {
        anyhow::bail!("which coordinator? give --coordinator https://HOST:PORT");
    };
    let address = Address::parse(text)?;
    let ca = if !address.is_tls() {
        String::new()
    } else if let Some(path) = ca_file {
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    } else if let Some(hash) = ca_hash {
        let pin = kiln_proto::tls::parse_ca_hash(hash)?;
        let tls = ClientTls::trusting(Trust::Pinned(pin));
        let channel = kiln_proto::connect_with(&address, Some(&tls)).await?;
        let ca = kiln_proto::clients::enrollment(channel)
            .get_ca(v1::GetCaRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .ca_pem;
        anyhow::ensure!(
            kiln_proto::tls::parse_ca_hash(&kiln_proto::tls::pem_ca_hash(&ca)?)? == pin,
            "the coordinator sent a CA certificate other than the one pinned with --ca-hash"
        );
        ca
    } else {
        anyhow::bail!(
            "give --ca-hash (printed by `kiln-coordinator user create`) or --ca-file, so that \
             kiln can check it talks to your coordinator"
        );
    };
    let tls = address
        .is_tls()
        .then(|| ClientTls::trusting(Trust::CaPem(ca.clone())));
    let channel = kiln_proto::connect_with(&address, tls.as_ref()).await?;
    let me = kiln_proto::clients::kiln(channel, kiln_proto::Bearer::new(token)?)
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut logins = credentials::load()?;
    let others = logins.logins.len() - usize::from(logins.for_coordinator(&address).is_some());
    logins.log_in(credentials::Credentials {
        coordinator: address.to_string(),
        user: me.user.clone(),
        token: token.trim().to_string(),
        ca,
    });
    let path = credentials::save(&logins)?;
    if others > 0 {
        errln!(
            "Your {others} other login(s) stay stored: `--coordinator URL` (or \
             KILN_COORDINATOR) uses one; `--coordinator local` is the local target."
        );
    }
    if me.authenticated {
        errln!(
            "Logged in to {address} as {} ({}); credentials in {}.",
            output::sanitize(&me.user),
            output::sanitize(&me.role),
            path.display()
        );
    } else {
        errln!(
            "{address} authenticates nobody (--insecure); saved it as your coordinator in {}.",
            path.display()
        );
    }
    Ok(0)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    if matches!(cli.command, Some(Command::LocalDaemon)) {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        kiln_common::logging::init_logging(&filter);
        local::daemon().await?;
        return Ok(0);
    }
    match &cli.command {
        Some(Command::Login {
            token,
            token_file,
            ca_hash,
            ca_file,
        }) => {
            let token = match (token, token_file) {
                (_, Some(path)) => kiln_common::private::read_token_file(path, "API token")?,
                (Some(token), None) => token.clone(),
                (None, None) => unreachable!("clap requires --token or --token-file"),
            };
            return login(
                cli.coordinator.as_deref(),
                &token,
                ca_hash.as_deref(),
                ca_file.as_deref(),
            )
            .await;
        }
        Some(Command::Logout) => {
            let mut logins = credentials::load()?;
            let named = match cli.coordinator.as_deref().filter(|c| !c.is_empty()) {
                Some(text) => Some(Address::parse(text)?),
                None => None,
            };
            match logins.log_out(named.as_ref()) {
                Some(removed) => {
                    credentials::save(&logins)?;
                    if logins.current().is_some() {
                        errln!("Logged out of {}.", removed.coordinator);
                    } else {
                        errln!(
                            "Logged out of {}: commands go to the local target again.",
                            removed.coordinator
                        );
                    }
                }
                None => errln!("Not logged in."),
            }
            return Ok(0);
        }
        _ => {}
    }
    let connection = Connection::from_cli(cli.coordinator.as_deref())?;
    if cli.version {
        outln!("kiln {}", kiln_common::VERSION);
        let channel = if connection.local {
            kiln_proto::connect(&connection.address).await
        } else {
            connection.channel().await
        };
        match channel {
            Ok(channel) => {
                let reply = kiln_proto::clients::kiln(channel, connection.bearer.clone())
                    .version(v1::VersionRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner();
                outln!("coordinator {} at {}", reply.version, connection.address);
            }
            Err(error) if connection.local => {
                outln!("local target: not running ({error:#})");
            }
            Err(error) => outln!("coordinator: {error:#}"),
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
            let mut client = connection.kiln().await?;
            if follow {
                submit::follow(&connection, run, 0, rank)
                    .await
                    .map(submit::Followed::exit_code)
            } else {
                submit::print_logs(&mut client, run, rank).await.map(|_| 0)
            }
        }
        Command::Runs {
            target,
            limit,
            json,
        } => {
            let mut client = connection.kiln().await?;
            let runs = listing::runs(&mut client, &target.unwrap_or_default(), limit).await?;
            output::runs(&runs, json);
            Ok(0)
        }
        Command::Show { run, json } => {
            let mut client = connection.kiln().await?;
            let run = client
                .get_run(v1::GetRunRequest { run_id: run })
                .await
                .map_err(status_error)?
                .into_inner();
            output::show(&run, json);
            Ok(0)
        }
        Command::Metrics {
            run,
            names,
            rank,
            json,
            csv,
        } if !names.is_empty() => {
            let mut client = connection.kiln().await?;
            let mut series = Vec::new();
            for name in names {
                let points = listing::metric_series(&mut client, run, &name, rank).await?;
                series.push((name, points));
            }
            let format = match (json, csv) {
                (true, _) => history::SeriesFormat::Json,
                (_, true) => history::SeriesFormat::Csv,
                _ => history::SeriesFormat::Chart,
            };
            history::print_series(run, &series, format);
            // A name with no points is most likely mistyped: say so in the exit status.
            Ok(if series.iter().all(|(_, p)| !p.is_empty()) {
                0
            } else {
                1
            })
        }
        Command::Compare { runs, json } => {
            let mut client = connection.kiln().await?;
            let mut compared = Vec::new();
            for run_id in runs {
                let run = client
                    .get_run(v1::GetRunRequest { run_id })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let mut metrics = std::collections::BTreeMap::new();
                for summary in listing::metrics(&mut client, run_id, None).await? {
                    let points =
                        listing::metric_series(&mut client, run_id, &summary.name, None).await?;
                    if let Some(stats) = history::SeriesStats::of(&points) {
                        metrics.insert(summary.name, stats);
                    }
                }
                compared.push(history::Compared { run, metrics });
            }
            history::print_compare(&compared, json);
            Ok(0)
        }
        Command::Metrics {
            run, rank, json, ..
        } => {
            let mut client = connection.kiln().await?;
            let metrics = listing::metrics(&mut client, run, rank).await?;
            if let (Some(rank), true) = (rank, metrics.is_empty()) {
                // Say why nothing is listed: no such rank, or a rank that logged nothing.
                let info = client
                    .get_run(v1::GetRunRequest { run_id: run })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let world = info.nodes.max(1) * info.procs_per_node.max(1);
                anyhow::ensure!(
                    rank < world,
                    "run {run} has {world} rank{} (0–{}): there is no rank {rank}",
                    if world == 1 { "" } else { "s" },
                    world - 1
                );
                if !json {
                    errln!("run {run}: rank {rank} has logged no metrics");
                }
            }
            output::metrics(&metrics, json);
            Ok(0)
        }
        Command::Wait { run } => submit::wait(&connection, run).await,
        Command::Cancel { run } => {
            let mut client = connection.kiln().await?;
            let run = client
                .cancel_run(v1::CancelRunRequest { run_id: run })
                .await
                .map_err(status_error)?
                .into_inner();
            let was_active = run.status() == v1::RunStatus::Stopping;
            // A placed run stops its processes and delivers their last lines first: wait
            // for that (the script has 10 s between SIGTERM and SIGKILL), then say how it
            // ended.
            let mut run = run;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while run.status() == v1::RunStatus::Stopping && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                run = client
                    .get_run(v1::GetRunRequest { run_id: run.id })
                    .await
                    .map_err(status_error)?
                    .into_inner();
            }
            match run.status() {
                v1::RunStatus::Cancelled => errln!("run {} cancelled", run.id),
                v1::RunStatus::Stopping => errln!(
                    "run {} is stopping: it ends cancelled once its processes have stopped \
                     and delivered their output (`kiln show {}`)",
                    run.id,
                    run.id
                ),
                status if was_active => {
                    errln!(
                        "run {} ended before the cancel took effect: {}",
                        run.id,
                        status.domain()
                    )
                }
                status => errln!("run {} had already ended: {}", run.id, status.domain()),
            }
            Ok(0)
        }
        Command::Targets {
            command: Some(TargetsCommand::Delete { name }),
            ..
        } => {
            connection
                .kiln()
                .await?
                .delete_target(v1::DeleteTargetRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            errln!("Deleted target {}.", output::sanitize(&name));
            Ok(0)
        }
        Command::Targets { json, .. } => {
            let mut client = connection.kiln().await?;
            let targets = client
                .list_targets(v1::ListTargetsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .targets;
            output::targets(&targets, json);
            Ok(0)
        }
        Command::Agents {
            command: Some(AgentsCommand::Forget { agent }),
            ..
        } => {
            let agent = connection
                .kiln()
                .await?
                .forget_agent(v1::ForgetAgentRequest { agent })
                .await
                .map_err(status_error)?
                .into_inner();
            errln!(
                "Forgot agent {} (target {}).",
                output::sanitize(&agent.id),
                output::sanitize(&agent.target)
            );
            Ok(0)
        }
        Command::Agents {
            command: Some(AgentsCommand::Revoke { agent }),
            ..
        } => {
            let agent = connection
                .kiln()
                .await?
                .revoke_agent(v1::RevokeAgentRequest { agent })
                .await
                .map_err(status_error)?
                .into_inner();
            let host = agent.host.map(|h| h.hostname).unwrap_or_default();
            errln!(
                "Revoked agent {} ({}): its certificate is refused, its runs are requeued. \
                 The host needs a new join token to come back.",
                output::sanitize(&agent.id),
                output::sanitize(&host)
            );
            Ok(0)
        }
        Command::Whoami => {
            let me = connection
                .kiln()
                .await?
                .who_am_i(v1::WhoAmIRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if me.authenticated {
                outln!(
                    "{} ({}) at {}",
                    output::sanitize(&me.user),
                    output::sanitize(&me.role),
                    connection.address
                );
            } else {
                outln!("nobody: {} authenticates no one", connection.address);
            }
            Ok(0)
        }
        Command::Login { .. } | Command::Logout => unreachable!("handled above"),
        Command::Agents { command, json } => {
            let mut client = connection.kiln().await?;
            let agents = listing::agents(&mut client).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_takes_its_token_from_a_flag_or_a_file_not_both() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["kiln", "login"], args].concat());
        let from_file = parse(&["--ca-hash", "sha256:ab", "--token-file", "-"]).expect("file");
        assert!(matches!(
            from_file.command,
            Some(Command::Login { token: None, token_file: Some(ref path), .. }) if path == std::path::Path::new("-")
        ));
        let inline = parse(&["--token", "a.b"]).expect("flag");
        assert!(matches!(
            inline.command,
            Some(Command::Login { token: Some(ref token), token_file: None, .. }) if token == "a.b"
        ));
        let both = parse(&["--token", "a.b", "--token-file", "t"]).expect_err("both");
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
