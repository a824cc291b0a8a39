//! `kiln-coordinator`: parses flags, sets up tracing and signals, and runs the coordinator.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_common::target::TargetName;
use kiln_coordinator::config::{self, Settings};
use kiln_coordinator::join;
use kiln_coordinator::store::Store;
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
///   sudo kiln-coordinator token create --target gpu
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join tokens for new agent hosts. `token create` prints the `kiln-agent join` command
    /// to run on them. These commands open the coordinator's database directly (the service
    /// may be running); as root they act as the owner of the data directory.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token for a target and print the command that joins a host with it.
    ///
    /// The command goes to stdout, the details to stderr. The token gates `kiln-agent join`
    /// only: this version does not authenticate agent sessions yet.
    ///
    /// Example:
    ///   sudo kiln-coordinator token create --target gpu --ttl 2h --uses 10
    #[command(verbatim_doc_comment)]
    Create {
        /// The compute target that hosts joining with this token serve.
        #[arg(long)]
        target: String,
        /// How long the token stays valid: 30m, 2h, 7d, ...
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many hosts may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List join tokens: id, target, uses left, expiry (secrets are never shown again).
    List,
    /// Revoke a join token by its id (the part of the token before the dot).
    Revoke {
        /// The token's id.
        id: String,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (file, effective) = match config::load(args.config.as_deref())
        .and_then(|(file, settings)| Ok((file, args.settings.or(settings).resolve()?)))
    {
        Ok(loaded) => loaded,
        Err(error) => exit_config_error(error),
    };
    if args.print_config {
        match &file {
            Some(path) => println!("# config file: {}", path.display()),
            None => println!("# config file: none"),
        }
        print!("{}", effective.to_toml());
        return Ok(());
    }
    if let Some(Command::Token(command)) = args.command {
        return token(command, &effective);
    }
    kiln_common::logging::init_logging(&effective.log);
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

/// `kiln-coordinator token ...`: opens the database next to the running service (WAL lets
/// both write) and works on join tokens.
fn token(command: TokenCommand, effective: &config::Effective) -> anyhow::Result<()> {
    let data_dir = &effective.data_dir;
    act_as_data_dir_owner(data_dir)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;
    let store = Store::open(&data_dir.join("kiln.db"))?;
    match command {
        TokenCommand::Create { target, ttl, uses } => {
            let target = TargetName::new(&target)?;
            let now = kiln_coordinator::now_ms();
            let created = join::create_token(&store, &target, ttl, uses, now)?;
            let url = &effective.advertise_url;
            eprintln!(
                "Created join token {} for target `{target}`: {uses} use{}, valid until {} ({}).",
                created.id,
                if uses == 1 { "" } else { "s" },
                format_ms(created.expires_ms),
                humantime::format_duration(ttl),
            );
            if is_loopback(url) {
                eprintln!(
                    "warning: {url} is a loopback address, which agents on other hosts cannot \
                     reach: set advertise_url (or listen) in the coordinator's config file."
                );
            }
            eprintln!(
                "As root on each new agent host, with the kiln-agent package installed, run:"
            );
            println!(
                "kiln-agent join --coordinator {url} --token {} --target {target}",
                created.token
            );
        }
        TokenCommand::List => {
            let tokens = store.list_join_tokens()?;
            if tokens.is_empty() {
                eprintln!(
                    "No join tokens. Create one with `kiln-coordinator token create --target NAME`."
                );
            } else {
                println!(
                    "{:<16}  {:<16}  {:>9}  {:<20}  {:<20}",
                    "ID", "TARGET", "USES LEFT", "VALID UNTIL", "LAST USED"
                );
            }
            for token in tokens {
                println!(
                    "{:<16}  {:<16}  {:>9}  {:<20}  {:<20}",
                    token.id,
                    token.target,
                    token.uses_left,
                    format_ms(token.expires_ms),
                    token
                        .last_used_ms
                        .map(format_ms)
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
        TokenCommand::Revoke { id } => {
            anyhow::ensure!(
                store.revoke_join_token(&id)?,
                "no join token has id `{id}`: see `kiln-coordinator token list`"
            );
            eprintln!("Revoked join token {id}.");
        }
    }
    Ok(())
}

/// As root, switches to the owner of the data directory (the `kiln` user when installed from
/// the package), so that files SQLite creates there stay the service's.
fn act_as_data_dir_owner(data_dir: &Path) -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid, geteuid, setgid, setgroups, setuid};
    use std::os::unix::fs::MetadataExt as _;
    if !geteuid().is_root() {
        return Ok(());
    }
    let meta = match std::fs::metadata(data_dir) {
        Ok(meta) => meta,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "data directory {} does not exist: start the coordinator once first \
             (systemctl start kiln-coordinator), or set data_dir",
            data_dir.display()
        ),
        Err(error) => {
            return Err(error).with_context(|| format!("inspect {}", data_dir.display()));
        }
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    setgroups(&[]).context("drop supplementary groups")?;
    setgid(Gid::from_raw(meta.gid())).context("switch to the data directory's group")?;
    setuid(Uid::from_raw(meta.uid())).context("switch to the data directory's owner")?;
    Ok(())
}

fn format_ms(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(
        time.min(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)),
    )
    .to_string()
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .split([':', '/'])
        .next()
        .unwrap_or("");
    host == "localhost"
        || host.starts_with("127.")
        || url.starts_with("unix://")
        || url.contains("[::1]")
}

/// Exit status for an invalid configuration (EX_CONFIG from sysexits.h); the systemd unit
/// does not restart on it (`RestartPreventExitStatus=78`).
const EXIT_CONFIG: i32 = 78;

fn exit_config_error(error: anyhow::Error) -> ! {
    eprintln!("Error: {error:#}");
    std::process::exit(EXIT_CONFIG)
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
