//! The agent's settings, from three layers: flags (and their environment variables), a TOML
//! file, and defaults. Precedence: **flag > environment > file > default**.
//!
//! [`Settings`] is one layer: every field optional. Its `///` docs are at once the `--help`
//! text of each flag and the documentation of each key of `/etc/kiln/agent.toml`
//! (`packaging/agent.toml` is the commented example, tested to parse). A flag `--data-dir`
//! is the key `data_dir`. [`Settings::resolve`] fills in defaults and checks every value,
//! reporting all problems at once. [`write_joined`] is what `kiln-agent join` does to the file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_common::target::TargetName;
use kiln_proto::Address;
use serde::{Deserialize, Serialize};

/// Read when it exists and no `--config` is given; `kiln-agent join` writes it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kiln/agent.toml";
/// The coordinator unless configured.
pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7070";
/// The log filter unless configured.
pub const DEFAULT_LOG: &str = "info";

/// One layer of agent settings (the flags, or the config file).
#[derive(clap::Args, Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The coordinator: https://HOST:PORT (the identity `kiln-agent join` stored in
    /// DATA_DIR/identity authenticates the agent), http://HOST:PORT for one started with
    /// --insecure, or unix:///PATH. [default: https://127.0.0.1:7070]
    #[arg(long, env = "KILN_COORDINATOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,

    /// The compute target to join: 2–16 lowercase letters, digits or '-', starting with a
    /// letter. Required; `kiln-agent join` sets it.
    #[arg(long, env = "KILN_TARGET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,

    /// Directory for the agent id, the snapshot cache and run directories.
    /// [default: $XDG_DATA_HOME/kiln/agent; the package's file sets /var/lib/kiln/agent]
    #[arg(long, env = "KILN_AGENT_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,

    /// How many runs may execute at once (the agent's concurrency). [default: 1]
    #[arg(long, env = "KILN_SLOTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,

    /// Interpreter for .py scripts (the user-managed environment). [default: python3]
    #[arg(long, env = "KILN_PYTHON")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,

    /// Seconds between heartbeats to the coordinator. [default: 5.0]
    #[arg(long, env = "KILN_HEARTBEAT_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<f64>,

    /// Seconds between system metric samples (CPU, memory, GPUs) of each run. [default: 5.0]
    #[arg(long, env = "KILN_METRICS_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_interval: Option<f64>,

    /// Host name to report to the coordinator. [default: the system's]
    #[arg(long, env = "KILN_HOSTNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,

    /// Log filter, RUST_LOG syntax: a level (error, warn, info, debug, trace) or directives
    /// such as "info,kiln_agent=debug". [default: info]
    #[arg(long, env = "RUST_LOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,

    /// A low-priority (e.g. preemptible or spot) node: the coordinator places runs here only
    /// when the target's regular agents are full. [default: false]
    #[arg(long, env = "KILN_LOW_PRIORITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_priority: Option<bool>,

    /// The IP address other agents reach this node on: distributed runs use node 0's as
    /// MASTER_ADDR and bind their rendezvous port on it. [default: the address the
    /// coordinator sees this agent connect from]
    #[arg(long, env = "KILN_ADVERTISE_ADDRESS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,

    /// Size limit of the environment cache (venv and conda environments the agent built),
    /// in bytes: least-recently-used environments that no run uses are removed while the
    /// cache is larger. [default: 53687091200 (50 GiB)]
    #[arg(long, env = "KILN_ENV_CACHE_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_cache_max_bytes: Option<u64>,

    /// Size limit of the snapshot cache (the archives of snapshots runs were given, kept by
    /// digest under data_dir/snapshots), in bytes: the least recently used are removed
    /// after a fetch while the cache is larger. [default: 21474836480 (20 GiB)]
    #[arg(long, env = "KILN_SNAPSHOT_CACHE_MAX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_cache_max_bytes: Option<u64>,

    /// An external conda, mamba or micromamba (a name on PATH or a path) that builds the conda
    /// environments runs ask for, as `CMD env create -p PREFIX -f FILE`, so that the site's
    /// .condarc (mirrors, proxies, credentials) applies. [default: none: the agent solves and
    /// installs them itself]
    #[arg(long, env = "KILN_CONDA_COMMAND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda_command: Option<String>,
    /// Where named conda channels (`conda-forge`, `pytorch`) are found, as conda's
    /// `channel_alias`: a mirror's URL, or file:///PATH for channels kept on this host.
    /// [default: https://conda.anaconda.org]
    #[arg(long, env = "KILN_CONDA_CHANNEL_ALIAS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda_channel_alias: Option<String>,
    /// What the channel `defaults` means, as conda's `default_channels` (URLs or file:///
    /// paths, comma-separated on the command line). [default:
    /// https://repo.anaconda.com/pkgs/main, https://repo.anaconda.com/pkgs/r]
    #[arg(long, env = "KILN_CONDA_DEFAULT_CHANNELS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda_default_channels: Option<Vec<String>>,
    /// Docker runs: the image of `image: cpu`, and of `image: auto` when the run has no
    /// GPUs. [default: python:3.12-slim]
    #[arg(long, env = "KILN_DOCKER_CPU_IMAGE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_cpu_image: Option<String>,

    /// Docker runs: the image of `image: gpu`, and of `image: auto` when the run was given
    /// GPUs on this agent. [default: nvidia/cuda:12.4.1-runtime-ubuntu22.04]
    #[arg(long, env = "KILN_DOCKER_GPU_IMAGE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_gpu_image: Option<String>,

    /// Docker runs: the engine, unix:///PATH or tcp://HOST:PORT (plaintext). [default: the
    /// local socket, /var/run/docker.sock]
    #[arg(long, env = "KILN_DOCKER_HOST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,

    /// Docker runs: the most processes (and threads) one container may have; a fork bomb
    /// stops there instead of taking the machine. [default: 4096]
    #[arg(long, env = "KILN_DOCKER_PIDS_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_pids_limit: Option<u32>,

    /// Docker runs: the network each container joins. `run`: a bridge network of its own,
    /// made for the attempt and removed after it, so runs (of different users) cannot reach
    /// each other; `none`: no network at all; any other value: that existing network (e.g.
    /// `bridge`, Docker's default, shared by every container). [default: run]
    #[arg(long, env = "KILN_DOCKER_NETWORK")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_network: Option<String>,

    /// Docker runs: the registry whose login is used for pulls from it, e.g.
    /// registry.example.org:5000 or docker.io. Set with docker_registry_username and
    /// docker_registry_password_file.
    #[arg(long, env = "KILN_DOCKER_REGISTRY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry: Option<String>,

    /// Docker runs: the user name for docker_registry.
    #[arg(long, env = "KILN_DOCKER_REGISTRY_USERNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry_username: Option<String>,

    /// Docker runs: a file holding the password or access token for docker_registry (read
    /// at each pull; keep it readable by the agent only).
    #[arg(long, env = "KILN_DOCKER_REGISTRY_PASSWORD_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry_password_file: Option<PathBuf>,

    /// Process runs (user, venv, conda) of an agent running as root each run as a user of
    /// their own, a uid from this range (FIRST-LAST), so that no run reads the agent's key or
    /// another run's files (SECURITY.md); `off` runs them as the agent's user. Ignored when
    /// the agent is not root. [default: 1900000000-1900000999]
    #[arg(long, env = "KILN_RUN_USERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_users: Option<String>,
    /// The agent's own environment variables that runs' processes inherit: names, or
    /// prefixes ending in `*` (`*` alone: all), comma-separated on the command line. Nothing
    /// else of the agent's environment reaches a run (a secret in the unit's Environment=
    /// stays the agent's); runs get Kiln's variables and their own `--env` as always.
    /// [default: PATH, LANG, LANGUAGE, LC_*, TZ, TERM, TMPDIR, the proxy variables
    /// (http_proxy, https_proxy, no_proxy and upper case), SSL_CERT_FILE, SSL_CERT_DIR,
    /// REQUESTS_CA_BUNDLE, LD_LIBRARY_PATH, CUDA_HOME, NVIDIA_*, HOME]
    #[arg(long, env = "KILN_PASS_ENV", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_env: Option<Vec<String>>,
}

/// The configuration in force: every layer merged and defaults applied. `--print-config`
/// prints it as TOML.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Effective {
    pub coordinator: String,
    pub target: String,
    pub data_dir: PathBuf,
    pub slots: u32,
    pub python: String,
    pub heartbeat_interval: f64,
    pub metrics_interval: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub log: String,
    pub low_priority: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    pub env_cache_max_bytes: u64,
    pub snapshot_cache_max_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda_command: Option<String>,
    pub conda_channel_alias: String,
    pub conda_default_channels: Vec<String>,
    pub docker_cpu_image: String,
    pub docker_gpu_image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,
    pub docker_pids_limit: u32,
    pub docker_network: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_registry_password_file: Option<PathBuf>,
    pub run_users: String,
    pub pass_env: Vec<String>,
}

impl Settings {
    /// Keeps every field set in `self` and takes the others from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            coordinator: self.coordinator.or(lower.coordinator),
            target: self.target.or(lower.target),
            data_dir: self.data_dir.or(lower.data_dir),
            slots: self.slots.or(lower.slots),
            python: self.python.or(lower.python),
            heartbeat_interval: self.heartbeat_interval.or(lower.heartbeat_interval),
            metrics_interval: self.metrics_interval.or(lower.metrics_interval),
            hostname: self.hostname.or(lower.hostname),
            log: self.log.or(lower.log),
            low_priority: self.low_priority.or(lower.low_priority),
            advertise_address: self.advertise_address.or(lower.advertise_address),
            env_cache_max_bytes: self.env_cache_max_bytes.or(lower.env_cache_max_bytes),
            snapshot_cache_max_bytes: self
                .snapshot_cache_max_bytes
                .or(lower.snapshot_cache_max_bytes),
            conda_command: self.conda_command.or(lower.conda_command),
            conda_channel_alias: self.conda_channel_alias.or(lower.conda_channel_alias),
            conda_default_channels: self.conda_default_channels.or(lower.conda_default_channels),
            docker_cpu_image: self.docker_cpu_image.or(lower.docker_cpu_image),
            docker_gpu_image: self.docker_gpu_image.or(lower.docker_gpu_image),
            docker_host: self.docker_host.or(lower.docker_host),
            docker_pids_limit: self.docker_pids_limit.or(lower.docker_pids_limit),
            docker_network: self.docker_network.or(lower.docker_network),
            docker_registry: self.docker_registry.or(lower.docker_registry),
            docker_registry_username: self
                .docker_registry_username
                .or(lower.docker_registry_username),
            docker_registry_password_file: self
                .docker_registry_password_file
                .or(lower.docker_registry_password_file),
            run_users: self.run_users.or(lower.run_users),
            pass_env: self.pass_env.or(lower.pass_env),
        }
    }

    /// `data_dir`, or the default (`$XDG_DATA_HOME/kiln/agent`, /var/lib/kiln/agent for the
    /// packaged service, whose config file sets it).
    pub fn data_dir_or_default(&self) -> anyhow::Result<PathBuf> {
        match (&self.data_dir, dirs::data_dir()) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, Some(dir)) => Ok(dir.join("kiln/agent")),
            (None, None) => {
                anyhow::bail!("no default data directory ($HOME is not set): set data_dir")
            }
        }
    }

    /// Applies defaults and checks every value; the error lists every problem found.
    pub fn resolve(self) -> anyhow::Result<Effective> {
        let mut problems = Vec::new();
        let data_dir = match self.data_dir_or_default() {
            Ok(dir) => dir,
            Err(error) => {
                problems.push(error.to_string());
                PathBuf::new()
            }
        };
        let coordinator = self
            .coordinator
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
        if let Err(error) = Address::parse(&coordinator) {
            problems.push(format!("coordinator: {error:#}"));
        }
        let target = match self.target {
            Some(target) => {
                if let Err(error) = TargetName::new(&target) {
                    problems.push(format!("target: {error:#}"));
                }
                target
            }
            None => {
                problems.push(
                    "target is not set: the compute target this agent joins. Run the join \
                     command `kiln-coordinator token create` prints (`sudo kiln-agent join \
                     --coordinator URL --ca-hash sha256:HEX --token-file - --target NAME`), or set \
                     `target` in the config file, or pass --target"
                        .to_string(),
                );
                String::new()
            }
        };
        let slots = self.slots.unwrap_or(1);
        if slots == 0 {
            problems.push("slots is 0: use at least 1".to_string());
        }
        let python = self
            .python
            .unwrap_or_else(|| crate::DEFAULT_PYTHON.to_string());
        if python.is_empty() {
            problems.push("python is empty: name an interpreter, e.g. python3".to_string());
        }
        let mut interval = |key: &str, value: Option<f64>, default: std::time::Duration| {
            let seconds = value.unwrap_or(default.as_secs_f64());
            if !(seconds.is_finite() && seconds > 0.0) {
                problems.push(format!(
                    "{key} = {seconds} is invalid: use a positive number of seconds"
                ));
            }
            seconds
        };
        let heartbeat_interval = interval(
            "heartbeat_interval",
            self.heartbeat_interval,
            crate::DEFAULT_HEARTBEAT_INTERVAL,
        );
        let metrics_interval = interval(
            "metrics_interval",
            self.metrics_interval,
            crate::DEFAULT_METRICS_INTERVAL,
        );
        let log = self.log.unwrap_or_else(|| DEFAULT_LOG.to_string());
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&log) {
            problems.push(format!("log filter `{log}` is invalid: {error}"));
        }
        let advertise_address = self.advertise_address.filter(|a| !a.is_empty());
        if let Some(address) = &advertise_address
            && address.parse::<std::net::IpAddr>().is_err()
        {
            problems.push(format!(
                "advertise_address `{address}` is not an IP address (e.g. 10.0.0.5)"
            ));
        }
        let conda_command = self.conda_command.filter(|c| !c.is_empty());
        let conda_channel_alias = self
            .conda_channel_alias
            .unwrap_or_else(|| crate::env::conda::DEFAULT_CHANNEL_ALIAS.to_string());
        if url::Url::parse(&conda_channel_alias).is_err() {
            problems.push(format!(
                "conda_channel_alias `{conda_channel_alias}` is not a URL (e.g. \
                 https://conda.example.org or file:///srv/conda)"
            ));
        }
        let conda_default_channels = self
            .conda_default_channels
            .unwrap_or_else(crate::env::conda::default_default_channels);
        let mut image = |key: &str, value: Option<String>, default: &str| {
            let image = value.unwrap_or_else(|| default.to_string());
            if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                problems.push(format!(
                    "{key} `{image}` is not an image reference (e.g. python:3.12-slim)"
                ));
            }
            image
        };
        let docker_cpu_image = image(
            "docker_cpu_image",
            self.docker_cpu_image,
            crate::docker::DEFAULT_CPU_IMAGE,
        );
        let docker_gpu_image = image(
            "docker_gpu_image",
            self.docker_gpu_image,
            crate::docker::DEFAULT_GPU_IMAGE,
        );
        let docker_host = self.docker_host.filter(|h| !h.is_empty());
        if let Some(host) = &docker_host
            && !["unix:///", "tcp://", "http://"]
                .iter()
                .any(|scheme| host.starts_with(scheme))
        {
            problems.push(format!(
                "docker_host `{host}` is invalid: use unix:///PATH or tcp://HOST:PORT"
            ));
        }
        let registry = [
            ("docker_registry", self.docker_registry.is_some()),
            (
                "docker_registry_username",
                self.docker_registry_username.is_some(),
            ),
            (
                "docker_registry_password_file",
                self.docker_registry_password_file.is_some(),
            ),
        ];
        if registry.iter().any(|(_, set)| *set) && !registry.iter().all(|(_, set)| *set) {
            let missing: Vec<&str> = registry
                .iter()
                .filter(|(_, set)| !set)
                .map(|(key, _)| *key)
                .collect();
            problems.push(format!(
                "a registry login needs docker_registry, docker_registry_username and \
                 docker_registry_password_file together: {} missing",
                missing.join(", ")
            ));
        }
        let run_users = self.run_users.unwrap_or_else(|| {
            let range = crate::sandbox::DEFAULT_RANGE;
            format!("{}-{}", range.start(), range.end())
        });
        if let Err(error) = crate::sandbox::parse_range(&run_users) {
            problems.push(format!("run_users `{run_users}` is invalid: {error:#}"));
        }
        if !problems.is_empty() {
            anyhow::bail!(
                "the agent's configuration is invalid:\n  - {}",
                problems.join("\n  - ")
            );
        }
        Ok(Effective {
            coordinator,
            target,
            data_dir,
            slots,
            python,
            heartbeat_interval,
            metrics_interval,
            hostname: self.hostname,
            log,
            low_priority: self.low_priority.unwrap_or(false),
            advertise_address,
            env_cache_max_bytes: self
                .env_cache_max_bytes
                .unwrap_or(crate::env::DEFAULT_CACHE_MAX_BYTES),
            snapshot_cache_max_bytes: self
                .snapshot_cache_max_bytes
                .unwrap_or(crate::DEFAULT_SNAPSHOT_CACHE_MAX_BYTES),
            conda_command,
            conda_channel_alias,
            conda_default_channels,
            docker_cpu_image,
            docker_gpu_image,
            docker_host,
            docker_pids_limit: self
                .docker_pids_limit
                .filter(|limit| *limit > 0)
                .unwrap_or(crate::docker::CONTAINER_PIDS_LIMIT),
            docker_network: self
                .docker_network
                .filter(|network| !network.is_empty())
                .unwrap_or_else(|| crate::docker::RUN_NETWORK.to_string()),
            docker_registry: self.docker_registry,
            docker_registry_username: self.docker_registry_username,
            docker_registry_password_file: self.docker_registry_password_file,
            run_users,
            pass_env: self.pass_env.unwrap_or_else(crate::run::default_pass_env),
        })
    }
}

impl Effective {
    /// Whether the coordinator is reached over TLS (and so needs the joined identity).
    pub fn coordinator_is_tls(&self) -> bool {
        Address::parse(&self.coordinator).is_ok_and(|address| address.is_tls())
    }

    /// The library's [`crate::Config`] for these settings.
    pub fn agent_config(&self) -> anyhow::Result<crate::Config> {
        use std::time::Duration;
        let mut config = crate::Config::new(
            Address::parse(&self.coordinator)?,
            TargetName::new(&self.target)?,
            self.data_dir.clone(),
        );
        config.slots = self.slots.max(1);
        config.python = self.python.clone();
        config.heartbeat_interval = Duration::from_secs_f64(self.heartbeat_interval.max(0.05));
        config.metrics_interval = Duration::from_secs_f64(self.metrics_interval.max(0.05));
        config.hostname = self.hostname.clone();
        config.low_priority = self.low_priority;
        config.advertise_address = self.advertise_address.clone();
        config.env.cache_max_bytes = self.env_cache_max_bytes;
        config.snapshot_cache_max_bytes = self.snapshot_cache_max_bytes;
        config.env.conda_command = self
            .conda_command
            .as_deref()
            .map(|c| crate::env::find_program(c).unwrap_or_else(|| PathBuf::from(c)));
        config.env.conda_channel_alias = self.conda_channel_alias.clone();
        config.env.conda_default_channels = self.conda_default_channels.clone();
        config.run_users = crate::sandbox::parse_range(&self.run_users)?;
        config.pass_env = self.pass_env.clone();
        config.docker = crate::docker::Settings {
            cpu_image: self.docker_cpu_image.clone(),
            gpu_image: self.docker_gpu_image.clone(),
            host: self.docker_host.clone(),
            pids_limit: self.docker_pids_limit,
            network: self.docker_network.clone(),
            registry_auth: match (
                &self.docker_registry,
                &self.docker_registry_username,
                &self.docker_registry_password_file,
            ) {
                (Some(server), Some(username), Some(password_file)) => {
                    Some(crate::docker::RegistryAuth {
                        server: server.clone(),
                        username: username.clone(),
                        password_file: password_file.clone(),
                    })
                }
                _ => None,
            },
        };
        Ok(config)
    }

    /// The configuration as TOML, in the config file's syntax.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the effective configuration serializes to TOML")
    }
}

/// Parses a config file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Settings> {
    kiln_common::config_file::parse(text, origin)
}

/// Reads the config file: `explicit` (which must exist) or else [`DEFAULT_CONFIG_PATH`] when it
/// exists. Returns the path read, if any, and its settings.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<(Vec<PathBuf>, Settings)> {
    load_from(explicit, Path::new(DEFAULT_CONFIG_PATH))
}

/// The config file (`explicit`, or `default` when it exists), then every `*.toml` of its
/// drop-in directory ([`drop_in_dir`]) in name order, each over the ones before. Returns
/// the files read and the merged settings.
fn load_from(explicit: Option<&Path>, default: &Path) -> anyhow::Result<(Vec<PathBuf>, Settings)> {
    load_layers(explicit, default, None)
}

/// [`load_from`], with `replacing`'s drop-in taken as the given settings instead of what
/// the file holds (or as if it were there): what the agent will read once it is written.
fn load_layers(
    explicit: Option<&Path>,
    default: &Path,
    replacing: Option<(&Path, &Settings)>,
) -> anyhow::Result<(Vec<PathBuf>, Settings)> {
    let (file, mut settings) = kiln_common::config_file::load::<Settings>(explicit, default)?;
    let mut read: Vec<PathBuf> = file.into_iter().collect();
    let mut files = drop_in_files(&drop_in_dir(explicit.unwrap_or(default)))?;
    if let Some((path, _)) = replacing
        && !files.iter().any(|file| file == path)
    {
        files.push(path.to_path_buf());
        files.sort();
    }
    for path in files {
        let layer = match replacing {
            Some((replaced, layer)) if replaced == path => layer.clone(),
            _ => read_layer(&path)?,
        };
        settings = layer.or(settings);
        read.push(path);
    }
    Ok((read, settings))
}

/// The `*.toml` files of a drop-in directory, in name order (none when it does not exist).
fn drop_in_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("read config directory {}", dir.display()));
        }
    };
    files.sort();
    Ok(files)
}

fn read_layer(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    kiln_common::config_file::parse(&text, path)
}

/// The drop-in directory of a config file: `/etc/kiln/agent.toml` → `/etc/kiln/agent.d/`.
/// Its files are read after the config file and override it; `kiln-agent join` writes
/// [`JOINED_FILE`] there, so the packaged conffile is never edited (an upgrade that ships a
/// new one then neither stops at dpkg's prompt nor loses the join).
pub fn drop_in_dir(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent".to_string());
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{stem}.d"))
}

/// What `kiln-agent join` writes in [`drop_in_dir`].
pub const JOINED_FILE: &str = "50-joined.toml";

/// The commented default config the package installs; `join` starts from it when the
/// config file does not exist yet.
pub const SHIPPED_CONFIG: &str = include_str!("../../packaging/agent.toml");

/// What `kiln-agent join` writes: `coordinator`, `target` and, when given, `data_dir`
/// (made absolute, so it means the same from any working directory) in
/// [`drop_in_dir`]`/`[`JOINED_FILE`] of the config file at `path`, which is left as it is
/// (created from the shipped default when there is none, for an agent set up by hand). A
/// later join without `data_dir` keeps the one an earlier join wrote. Files are replaced
/// atomically, mode 0640, keeping their owner and group (new files: root and group `kiln`
/// when it exists, so the service can read them and nobody else can).
pub fn write_joined(
    path: &Path,
    coordinator: &str,
    target: &str,
    data_dir: Option<&Path>,
) -> anyhow::Result<Effective> {
    let data_dir = data_dir
        .map(|dir| std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display())))
        .transpose()?;
    if !path.exists() {
        write_private(path, SHIPPED_CONFIG)?;
    }
    let joined_path = drop_in_dir(path).join(JOINED_FILE);
    let earlier: Option<Settings> = match std::fs::read_to_string(&joined_path) {
        Ok(text) => kiln_common::config_file::parse(&text, &joined_path).ok(),
        Err(_) => None,
    };
    let joined = Settings {
        coordinator: Some(coordinator.to_string()),
        target: Some(target.to_string()),
        data_dir: data_dir.or_else(|| earlier.and_then(|e| e.data_dir)),
        ..Settings::default()
    };
    let mut text = String::from(
        "# Written by `kiln-agent join`; read after agent.toml and overriding it. Join again\n\
         # to change it (editing it works too).\n",
    );
    text.push_str(&toml::to_string(&joined).context("write the joined settings")?);
    // What the agent will read once the file is written, checked before it is.
    let (_, merged) = load_layers(Some(path), path, Some((&joined_path, &joined)))?;
    let effective = merged.resolve()?;
    anyhow::ensure!(
        effective.coordinator == coordinator && effective.target == target,
        "another file in {} sets coordinator or target after {JOINED_FILE}: remove it or \
         join again once it is gone",
        drop_in_dir(path).display()
    );
    let dir = drop_in_dir(path);
    if !dir.exists() {
        // root:kiln 0750, like the file in it: the service (user kiln) must read it.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))
            .with_context(|| format!("set the mode of {}", dir.display()))?;
        if let Some(group) = nix::unistd::Group::from_name("kiln").ok().flatten() {
            let _ = std::os::unix::fs::chown(&dir, None, Some(group.gid.as_raw()));
        }
    }
    write_private(&joined_path, &text)?;
    Ok(effective)
}

/// Replaces `path` atomically with `text`, mode 0640, keeping the owner and group of the
/// file it replaces (new files: group `kiln` when it exists).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (uid, gid) = match std::fs::metadata(path) {
        Ok(meta) => (Some(meta.uid()), Some(meta.gid())),
        Err(_) => (
            None,
            nix::unistd::Group::from_name("kiln")
                .ok()
                .flatten()
                .map(|group| group.gid.as_raw()),
        ),
    };
    let file_name = path.file_name().context("config path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.join-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid)?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    if let Err(error) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(error).with_context(|| format!("write config file {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../packaging/agent.toml");

    #[test]
    fn the_shipped_config_parses_and_wants_a_target() {
        let settings = parse(EXAMPLE, Path::new("packaging/agent.toml")).unwrap();
        assert_eq!(
            settings.data_dir.as_deref(),
            Some(Path::new("/var/lib/kiln/agent"))
        );
        let error = settings.clone().resolve().unwrap_err().to_string();
        assert!(error.contains("kiln-agent join"), "{error}");
        // The join command a new admin can type: with the CA pin, the token not on argv.
        assert!(error.contains("--ca-hash"), "{error}");
        let joined = Settings {
            target: Some("gpu".into()),
            ..Settings::default()
        }
        .or(settings)
        .resolve()
        .unwrap();
        assert_eq!(joined.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(joined.python, "python3");
    }

    #[test]
    fn every_commented_key_of_the_shipped_config_is_a_real_key() {
        // Uncommenting `# key = value` lines must give a file that parses and resolves: the
        // example documents only keys that exist, with values of the right type.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let settings = parse(&uncommented, Path::new("uncommented")).unwrap();
        assert!(settings.target.is_some() && settings.hostname.is_some());
        settings.resolve().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = parse("target = \"gpu\"\nslot = 2\n", Path::new("a.toml")).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("a.toml") && message.contains("slot"),
            "{message}"
        );
    }

    #[test]
    fn precedence_is_flag_or_env_then_file_then_default() {
        fn layer(target: Option<&str>, slots: Option<u32>) -> Settings {
            Settings {
                target: target.map(str::to_string),
                slots,
                data_dir: Some("/d".into()),
                ..Settings::default()
            }
        }
        // (command line (flag or its environment variable), file) → effective.
        let cases: &[(Settings, Settings, &str, u32)] = &[
            (layer(Some("cli"), None), layer(None, None), "cli", 1),
            (layer(None, None), layer(Some("file"), Some(3)), "file", 3),
            (
                layer(Some("cli"), None),
                layer(Some("file"), Some(3)),
                "cli",
                3,
            ),
            (
                layer(Some("cli"), Some(4)),
                layer(Some("file"), Some(3)),
                "cli",
                4,
            ),
        ];
        for (index, (command_line, file, target, slots)) in cases.iter().enumerate() {
            let effective = command_line.clone().or(file.clone()).resolve();
            let effective = effective.unwrap_or_else(|e| panic!("case {index}: {e}"));
            assert_eq!(
                (effective.target.as_str(), effective.slots),
                (*target, *slots),
                "case {index}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let settings = Settings {
            coordinator: Some("unix://relative".into()),
            target: Some("Bad_Name".into()),
            slots: Some(0),
            heartbeat_interval: Some(-1.0),
            data_dir: Some("/d".into()),
            ..Settings::default()
        };
        let error = settings.resolve().unwrap_err().to_string();
        for part in ["coordinator", "target", "slots", "heartbeat_interval"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
    }

    #[test]
    fn the_effective_config_prints_as_a_file_that_parses_back() {
        let effective = Settings {
            target: Some("gpu".into()),
            data_dir: Some("/d".into()),
            hostname: Some("h".into()),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        let reparsed = parse(&effective.to_toml(), Path::new("printed")).unwrap();
        assert_eq!(reparsed.resolve().unwrap(), effective);
    }

    #[test]
    fn an_explicit_config_must_exist_and_the_default_may_be_absent() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        assert!(load_from(Some(&missing), &missing).is_err());
        let (path, settings) = load_from(None, &missing).unwrap();
        assert_eq!((path, settings), (Vec::new(), Settings::default()));
    }

    #[test]
    fn join_writes_a_drop_in_and_never_edits_the_config_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/agent.toml");
        let joined = dir.path().join("etc/agent.d").join(JOINED_FILE);
        // No config file yet (an agent set up by hand): the shipped one is written.
        let effective = write_joined(&path, "http://c:7070", "gpu", None).unwrap();
        assert_eq!(effective.data_dir, Path::new("/var/lib/kiln/agent"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SHIPPED_CONFIG);
        for file in [&path, &joined] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o640, "{}", file.display());
        }
        // The admin's edits of the conffile stay byte for byte; the join overrides target.
        let edited = "slots = 4\ntarget = \"old\"\n";
        std::fs::write(&path, edited).unwrap();
        let effective = write_joined(&path, "http://d:7070", "cpu", None).unwrap();
        assert_eq!((effective.slots, effective.target.as_str()), (4, "cpu"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edited);
        let (read, settings) = load(Some(&path)).unwrap();
        assert_eq!(read, [path.clone(), joined.clone()]);
        assert_eq!(settings.resolve().unwrap(), effective);
        // A bad target is refused and nothing changes.
        assert!(write_joined(&path, "http://d:7070", "Bad_Name", None).is_err());
        assert!(
            std::fs::read_to_string(&joined)
                .unwrap()
                .contains("\"cpu\"")
        );
        // Later drop-ins override earlier ones; a later one that sets the target makes a
        // join refuse rather than write what would not take effect.
        std::fs::write(dir.path().join("etc/agent.d/90-local.toml"), "slots = 8\n").unwrap();
        assert_eq!(load(Some(&path)).unwrap().1.resolve().unwrap().slots, 8);
        std::fs::write(
            dir.path().join("etc/agent.d/99-x.toml"),
            "target = \"zz\"\n",
        )
        .unwrap();
        let error = write_joined(&path, "http://d:7070", "cpu", None).unwrap_err();
        assert!(
            format!("{error:#}").contains("99-x.toml") || format!("{error:#}").contains("after"),
            "{error:#}"
        );
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("etc/agent.d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn join_without_root_names_a_data_directory_of_the_users_own() {
        // By hand, as a normal user: `join --data-dir agent-data` (relative) must not leave
        // the shipped /var/lib/kiln/agent in the file, and must mean the same from anywhere.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let relative = Path::new("agent-data");
        let effective = write_joined(&path, "http://c:7070", "gpu", Some(relative)).unwrap();
        let expected = std::env::current_dir().unwrap().join("agent-data");
        assert_eq!(effective.data_dir, expected);
        let reread = load(Some(&path)).unwrap().1.resolve().unwrap();
        assert_eq!(reread.data_dir, expected);
        // A later join without --data-dir keeps it.
        let effective = write_joined(&path, "http://d:7070", "gpu", None).unwrap();
        assert_eq!(effective.data_dir, expected);
    }
}
