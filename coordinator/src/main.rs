//! `kiln-coordinator`: parses flags, sets up tracing and signals, and runs the coordinator.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_common::target::TargetName;
use kiln_coordinator::config::{self, Settings};
use kiln_coordinator::join;
use kiln_coordinator::pki::Pki;
use kiln_coordinator::store::{NewUser, Role, Store};
use kiln_coordinator::{Coordinator, Listener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Kiln's coordinator: holds compute targets, the run queue, run history, logs, metrics and
/// snapshot blobs, and assigns runs to agents.
///
/// Settings come from flags, environment variables and a TOML file, in that order of
/// precedence: /etc/kiln/coordinator.toml when it exists, or --config PATH. Each flag below
/// is also a key of that file (`--data-dir` is `data_dir`).
///
/// Examples:
///   kiln-coordinator --listen 0.0.0.0:7070 --data-dir /var/lib/kiln/coordinator
///   kiln-coordinator --config /etc/kiln/coordinator.toml --print-config
///   sudo kiln-coordinator token create --target gpu
///   sudo kiln-coordinator user create alice --role admin
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
    /// Users of the user API and their API tokens. `user create` prints the `kiln login`
    /// command to give the user. Like `token`, these open the database directly.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user with an API token and print the `kiln login` command that uses it.
    ///
    /// Members submit runs and see and cancel their own; admins see and cancel every run and
    /// revoke agents. The token is shown once: only its SHA-256 is kept.
    ///
    /// Example:
    ///   sudo kiln-coordinator user create alice --role admin
    #[command(verbatim_doc_comment)]
    Create {
        name: String,
        #[arg(long, default_value = "member", value_parser = ["admin", "member"])]
        role: String,
    },
    /// Give a user a new API token; the old one stops working at once.
    Token { name: String },
    /// List users: name, role, last use, own queue limit (tokens are never shown again).
    List,
    /// Set how many runs one user may have queued, over the coordinator's
    /// max_queued_per_user (`default` goes back to it).
    ///
    /// Example:
    ///   sudo kiln-coordinator user limit bob --max-queued 20
    #[command(verbatim_doc_comment)]
    Limit {
        name: String,
        /// A number of runs, or `default`.
        #[arg(long, value_name = "N|default")]
        max_queued: String,
    },
    /// Delete a user; their token stops working at once (their runs stay).
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token for a target and print the command that joins a host with it.
    ///
    /// The command goes to stdout, the details to stderr. It carries the SHA-256 of the
    /// coordinator's CA, which the agent pins before it trusts the coordinator; the agent
    /// then gets its own client certificate and authenticates with it from then on.
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
    // The database, blobs and CA key are nobody else's: files 0600, directories 0700.
    kiln_common::private::restrict_umask();
    kiln_proto::tls::install_provider();
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
    match args.command {
        Some(Command::Token(command)) => return token(command, &effective),
        Some(Command::User(command)) => return user(command, &effective),
        None => {}
    }
    kiln_common::logging::init_logging(&effective.log);
    if let Some(warning) = kiln_common::private::private_dir(&effective.data_dir, 0)
        .with_context(|| format!("create data directory {}", effective.data_dir.display()))?
    {
        warn!("{warning}");
    }
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
    let mut config = effective.coordinator_config();
    // Held until the process exits: a second coordinator on this directory is refused
    // (admin commands such as `user create` share the database and do not take it).
    let _lock = kiln_common::dirlock::DirLock::acquire(&config.data_dir, "kiln-coordinator")?;
    if effective.tls() {
        let pki = Pki::load_or_create(&effective.pki_config())?;
        info!(ca_hash = %pki.ca_hash(), cluster = %pki.cluster_id(), "TLS on; every caller is authenticated.");
        config.pki = Some(std::sync::Arc::new(pki));
    } else if effective.insecure {
        warn!(
            "INSECURE: plaintext gRPC and no authentication (--insecure). Anyone who can reach \
             {} can run code on every agent. Use this on loopback for experiments only.",
            effective.listen
        );
    } else {
        info!("Unix socket: no TLS; access is decided by the socket file's permissions.");
    }
    let shutdown = CancellationToken::new();
    let coordinator = Coordinator::start(config.clone(), shutdown.clone())?;
    let listener = Listener::bind(&effective.listen).await?;
    let address = listener.address(config.pki.is_some());
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

/// Opens the database next to the running service (WAL lets both write), as the data
/// directory's owner.
fn open_store(effective: &config::Effective) -> anyhow::Result<Store> {
    let data_dir = &effective.data_dir;
    act_as_data_dir_owner(data_dir)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;
    Store::open(&data_dir.join("kiln.db"))
}

/// `--ca-hash sha256:...` for the commands that `token create` and `user create` print, or
/// nothing when the coordinator serves no TLS. Loads (or makes) the same CA the service uses.
fn ca_hash_flag(effective: &config::Effective) -> anyhow::Result<String> {
    if !effective.tls() {
        return Ok(String::new());
    }
    let pki = Pki::load_ca(&effective.pki_config())?;
    Ok(format!(" --ca-hash {}", pki.ca_hash()))
}

/// `kiln-coordinator user ...`.
fn user(command: UserCommand, effective: &config::Effective) -> anyhow::Result<()> {
    let store = open_store(effective)?;
    let url = &effective.advertise_url;
    let now = kiln_coordinator::now_ms();
    match command {
        UserCommand::Create { name, role } => {
            validate_user_name(&name)?;
            let role = Role::parse(&role).expect("clap checked the role");
            let (token, token_id, token_sha256) = kiln_coordinator::auth::new_token()?;
            store.insert_user(&NewUser {
                name: &name,
                role,
                token_id: &token_id,
                token_sha256,
                now_ms: now,
            })?;
            eprintln!(
                "Created {} `{name}`. Give them this command and the token under it, which it \
                 reads from standard input (the token is not shown again):",
                role.as_str()
            );
            println!(
                "kiln login --coordinator {url}{} --token-file -\n{token}",
                ca_hash_flag(effective)?
            );
            if !effective.tls() {
                eprintln!(
                    "note: this coordinator authenticates nobody (insecure or a Unix socket): \
                     the token is needed only once TLS is on."
                );
            }
        }
        UserCommand::Token { name } => {
            let (token, token_id, token_sha256) = kiln_coordinator::auth::new_token()?;
            anyhow::ensure!(
                store.replace_user_token(&name, &token_id, &token_sha256)?,
                "no user `{name}`: see `kiln-coordinator user list`"
            );
            eprintln!(
                "New token for `{name}`; the old one no longer works. The command to log in \
                 with it, and the token, which it reads from standard input:"
            );
            println!(
                "kiln login --coordinator {url}{} --token-file -\n{token}",
                ca_hash_flag(effective)?
            );
        }
        UserCommand::List => {
            let users = store.list_users()?;
            if users.is_empty() {
                eprintln!(
                    "No users. Create one with `kiln-coordinator user create NAME --role admin`."
                );
            } else {
                println!(
                    "{:<24}  {:<6}  {:<20}  {:<20}  {:<10}",
                    "NAME", "ROLE", "CREATED", "LAST USED", "MAX QUEUED"
                );
            }
            for user in users {
                println!(
                    "{:<24}  {:<6}  {:<20}  {:<20}  {:<10}",
                    user.name,
                    user.role.as_str(),
                    format_ms(user.created_ms),
                    user.last_used_ms
                        .map(format_ms)
                        .unwrap_or_else(|| "-".into()),
                    user.max_queued
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "default".into()),
                );
            }
        }
        UserCommand::Limit { name, max_queued } => {
            let limit = match max_queued.as_str() {
                "default" => None,
                n => Some(n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--max-queued `{n}` is neither a number of runs (1 or more) nor `default`"
                    )
                })?),
            };
            anyhow::ensure!(
                store.set_user_max_queued(&name, limit)?,
                "no user `{name}`: see `kiln-coordinator user list`"
            );
            match limit {
                Some(n) => eprintln!("User `{name}` may have {n} runs queued."),
                None => eprintln!("User `{name}` has the coordinator's max_queued_per_user again."),
            }
        }
        UserCommand::Delete { name } => {
            anyhow::ensure!(
                store.delete_user(&name)?,
                "no user `{name}`: see `kiln-coordinator user list`"
            );
            eprintln!("Deleted user `{name}`; their token no longer works.");
        }
    }
    Ok(())
}

/// A user name: 1 to 64 letters, digits, `.`, `_`, `-` or `@`.
fn validate_user_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@')),
        "user name `{name}` is invalid: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
    );
    Ok(())
}

/// `kiln-coordinator token ...`: works on join tokens in the database.
fn token(command: TokenCommand, effective: &config::Effective) -> anyhow::Result<()> {
    let store = open_store(effective)?;
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
                "As root on each new agent host, with the kiln-agent package installed, run this \
                 command and paste the token under it when it asks (or put the token in a file \
                 only root reads and pass --token-file FILE):"
            );
            println!(
                "kiln-agent join --coordinator {url}{} --target {target} --token-file -\n{}",
                ca_hash_flag(effective)?,
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
