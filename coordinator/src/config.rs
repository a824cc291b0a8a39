//! The coordinator's settings, from three layers: flags (and their environment variables),
//! a TOML file, and defaults. Precedence: **flag > environment > file > default**.
//!
//! [`Settings`] is one layer: every field optional. Its `///` docs are at once the `--help`
//! text of each flag and the documentation of each key of `/etc/kiln/coordinator.toml`
//! (`packaging/coordinator.toml` is the commented example, tested to parse). A flag
//! `--data-dir` is the key `data_dir`. [`Settings::resolve`] fills in defaults and checks
//! every value, reporting all problems at once.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kiln/coordinator.toml";
/// The log filter unless configured.
pub const DEFAULT_LOG: &str = "info";

/// One layer of coordinator settings (the flags, or the config file).
#[derive(clap::Args, Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to serve gRPC on: HOST:PORT (TLS, unless `insecure`), or unix:///PATH for a
    /// Unix socket (plaintext and unauthenticated: access is the socket file's permissions).
    /// [default: 127.0.0.1:7070]
    #[arg(long, env = "KILN_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,

    /// Directory for the SQLite database (kiln.db) and the blob store (blobs/).
    /// [default: $XDG_DATA_HOME/kiln/coordinator; the package's file sets /var/lib/kiln/coordinator]
    #[arg(long, env = "KILN_DATA_DIR", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,

    /// Seconds without a heartbeat after which an agent is lost, and its runs with it.
    /// [default: 30]
    #[arg(long, env = "KILN_HEARTBEAT_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ttl: Option<u64>,

    /// Seconds the coordinator keeps the runs of an agent that announced its stop (SIGTERM:
    /// `systemctl stop`/`restart`, an upgrade) before it declares it lost; its runs go on
    /// meanwhile. [default: 600]
    #[arg(long, env = "KILN_DISCONNECT_GRACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect_grace: Option<u64>,

    /// Largest snapshot or outputs archive accepted, in bytes. [default: 8589934592 (8 GiB)]
    #[arg(long, env = "KILN_MAX_BLOB_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blob_bytes: Option<u64>,

    /// Most runs one user may have waiting in queues (all targets together); a submission
    /// over it is refused, saying so. Between users, queues are served by fair share.
    /// [default: 1000]
    #[arg(long, env = "KILN_MAX_QUEUED_PER_USER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_per_user: Option<u32>,

    /// Most connections open at once (TCP listeners); more are closed at once, so that
    /// idle or stalled connections cannot use up the coordinator's file descriptors.
    /// [default: 8192]
    #[arg(long, env = "KILN_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,

    /// Most connections open at once from one IP address: one client cannot take every
    /// connection (agents and users behind one NAT address share it). [default: 1024]
    #[arg(long, env = "KILN_MAX_CONNECTIONS_PER_IP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<u32>,

    /// Seconds an upload (snapshot, outputs, checkpoint) may send nothing before it is
    /// ended and its partial blob dropped; the client's retry starts it again. [default: 60]
    #[arg(long, env = "KILN_UPLOAD_STALL_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_stall_timeout: Option<u64>,

    /// Seconds after a run ended that its logs, metrics, outputs and checkpoints are
    /// removed (the run's row stays in the history, marked pruned); its blobs then go with
    /// the next blob sweep. 0: keep everything (7776000 is 90 days). [default: 0]
    #[arg(long, env = "KILN_RUN_RETENTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_retention: Option<u64>,

    /// Seconds a blob that no run names (a snapshot uploaded but not submitted, the
    /// outputs of a pruned run) is kept, counted from its upload or the last time a client
    /// asked for it, before the blob sweep removes it. [default: 86400]
    #[arg(long, env = "KILN_BLOB_GRACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_grace: Option<u64>,

    /// Seconds between housekeeping passes (pruning old runs, sweeping unused blobs).
    /// [default: 3600]
    #[arg(long, env = "KILN_HOUSEKEEPING_INTERVAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub housekeeping_interval: Option<u64>,

    /// Log filter, RUST_LOG syntax: a level (error, warn, info, debug, trace) or
    /// directives such as "info,kiln_coordinator=debug". [default: info]
    #[arg(long, env = "RUST_LOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,

    /// The URL agents and users reach this coordinator at, printed by `token create` in the
    /// join command. [default: derived from `listen`, with this host's name for 0.0.0.0]
    #[arg(long, env = "KILN_ADVERTISE_URL", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,

    /// Serve plaintext gRPC and authenticate nobody: agents connect by target name, the CLI
    /// needs no token. For experiments and tests on loopback only; logged as a warning at
    /// start. [default: false]
    #[arg(long, env = "KILN_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,

    /// The server certificate chain (PEM) from an existing PKI; with `tls_key`. It must be
    /// signed by the CA (`tls_ca_cert`). [default: made at each start by the coordinator's CA,
    /// in DATA_DIR/pki/server.crt]
    #[arg(long, env = "KILN_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// The server certificate's private key (PEM), with `tls_cert`.
    #[arg(long, env = "KILN_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// The CA certificate (PEM) that signs agent certificates and the server's, from an
    /// existing PKI; with `tls_ca_key`. [default: DATA_DIR/pki/ca.crt, made on first start]
    #[arg(long, env = "KILN_TLS_CA_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_cert: Option<PathBuf>,

    /// The CA's private key (PEM), with `tls_ca_cert`.
    #[arg(long, env = "KILN_TLS_CA_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_key: Option<PathBuf>,

    /// More host names or IP addresses for the server certificate the coordinator makes,
    /// besides those of `listen` and `advertise_url`, this host's name and loopback
    /// (comma-separated on the command line).
    #[arg(long, env = "KILN_TLS_NAMES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_names: Option<Vec<String>>,

    /// Lifetime of agent certificates, in seconds; agents renew at about two thirds of it.
    /// [default: 2592000 (30 days)]
    #[arg(long, env = "KILN_AGENT_CERT_TTL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cert_ttl: Option<u64>,
}

/// The configuration in force: every layer merged and defaults applied. `--print-config`
/// prints it as TOML.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Effective {
    pub listen: String,
    pub data_dir: PathBuf,
    pub heartbeat_ttl: u64,
    pub disconnect_grace: u64,
    pub max_blob_bytes: u64,
    pub max_queued_per_user: u32,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub upload_stall_timeout: u64,
    pub run_retention: u64,
    pub blob_grace: u64,
    pub housekeeping_interval: u64,
    pub log: String,
    pub advertise_url: String,
    pub insecure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_key: Option<PathBuf>,
    pub tls_names: Vec<String>,
    pub agent_cert_ttl: u64,
}

impl Settings {
    /// Keeps every field set in `self` and takes the others from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            heartbeat_ttl: self.heartbeat_ttl.or(lower.heartbeat_ttl),
            disconnect_grace: self.disconnect_grace.or(lower.disconnect_grace),
            max_queued_per_user: self.max_queued_per_user.or(lower.max_queued_per_user),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            upload_stall_timeout: self.upload_stall_timeout.or(lower.upload_stall_timeout),
            run_retention: self.run_retention.or(lower.run_retention),
            blob_grace: self.blob_grace.or(lower.blob_grace),
            housekeeping_interval: self.housekeeping_interval.or(lower.housekeeping_interval),
            max_blob_bytes: self.max_blob_bytes.or(lower.max_blob_bytes),
            log: self.log.or(lower.log),
            advertise_url: self.advertise_url.or(lower.advertise_url),
            insecure: self.insecure.or(lower.insecure),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            tls_ca_cert: self.tls_ca_cert.or(lower.tls_ca_cert),
            tls_ca_key: self.tls_ca_key.or(lower.tls_ca_key),
            tls_names: self.tls_names.or(lower.tls_names),
            agent_cert_ttl: self.agent_cert_ttl.or(lower.agent_cert_ttl),
        }
    }

    /// Applies defaults and checks every value; the error lists every problem found.
    pub fn resolve(self) -> anyhow::Result<Effective> {
        let mut problems = Vec::new();
        let listen = self
            .listen
            .unwrap_or_else(|| crate::DEFAULT_LISTEN.to_string());
        if listen.is_empty() {
            problems.push("listen is empty: use HOST:PORT or unix:///PATH".to_string());
        }
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => match dirs::data_dir() {
                Some(dir) => dir.join("kiln/coordinator"),
                None => {
                    problems.push(
                        "no default data directory ($HOME is not set): set data_dir".to_string(),
                    );
                    PathBuf::new()
                }
            },
        };
        let heartbeat_ttl = self
            .heartbeat_ttl
            .unwrap_or(crate::DEFAULT_HEARTBEAT_TTL.as_secs());
        if heartbeat_ttl == 0 {
            problems.push("heartbeat_ttl is 0: use at least 1 (seconds)".to_string());
        }
        let disconnect_grace = self
            .disconnect_grace
            .unwrap_or(crate::DEFAULT_DISCONNECT_GRACE.as_secs());
        let max_blob_bytes = self.max_blob_bytes.unwrap_or(crate::DEFAULT_MAX_BLOB_BYTES);
        let max_queued_per_user = self
            .max_queued_per_user
            .unwrap_or(crate::DEFAULT_MAX_QUEUED_PER_USER);
        if max_queued_per_user == 0 {
            problems.push("max_queued_per_user is 0: use at least 1".to_string());
        }
        let max_connections = self
            .max_connections
            .unwrap_or(crate::conns::DEFAULT_MAX_CONNECTIONS);
        let max_connections_per_ip = self
            .max_connections_per_ip
            .unwrap_or(crate::conns::DEFAULT_MAX_CONNECTIONS_PER_IP);
        let upload_stall_timeout = self
            .upload_stall_timeout
            .unwrap_or(crate::DEFAULT_UPLOAD_STALL_TIMEOUT.as_secs());
        if upload_stall_timeout == 0 {
            problems.push("upload_stall_timeout is 0: use at least 1 (seconds)".to_string());
        }
        let run_retention = self.run_retention.unwrap_or(0);
        let blob_grace = self
            .blob_grace
            .unwrap_or(crate::DEFAULT_BLOB_GRACE.as_secs());
        let housekeeping_interval = self
            .housekeeping_interval
            .unwrap_or(crate::DEFAULT_HOUSEKEEPING_INTERVAL.as_secs());
        if housekeeping_interval == 0 {
            problems.push("housekeeping_interval is 0: use at least 1 (seconds)".to_string());
        }
        if max_connections == 0 || max_connections_per_ip == 0 {
            problems
                .push("max_connections and max_connections_per_ip must be at least 1".to_string());
        }
        let log = self.log.unwrap_or_else(|| DEFAULT_LOG.to_string());
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&log) {
            problems.push(format!("log filter `{log}` is invalid: {error}"));
        }
        let insecure = self.insecure.unwrap_or(false);
        let tls = !insecure && !listen.starts_with("unix://");
        for (a, b, value_a, value_b) in [
            ("tls_cert", "tls_key", &self.tls_cert, &self.tls_key),
            (
                "tls_ca_cert",
                "tls_ca_key",
                &self.tls_ca_cert,
                &self.tls_ca_key,
            ),
        ] {
            if value_a.is_some() != value_b.is_some() {
                problems.push(format!("{a} and {b} must be set together"));
            }
            if !tls && (value_a.is_some() || value_b.is_some()) {
                problems.push(format!(
                    "{a}/{b} are set, but this coordinator serves no TLS ({}): remove them",
                    if insecure {
                        "insecure = true"
                    } else {
                        "a unix:// listen address"
                    }
                ));
            }
        }
        if self.tls_cert.is_some() && self.tls_ca_cert.is_none() {
            problems.push(
                "tls_cert needs tls_ca_cert and tls_ca_key: the CA that signed it also signs \
                 agent certificates"
                    .to_string(),
            );
        }
        let agent_cert_ttl = self
            .agent_cert_ttl
            .unwrap_or(crate::pki::DEFAULT_AGENT_CERT_TTL.as_secs());
        if agent_cert_ttl < 3 {
            problems.push("agent_cert_ttl must be at least 3 (seconds)".to_string());
        }
        let advertise_url = match self.advertise_url {
            Some(url) => url,
            None => advertise_url_for(&listen, tls),
        };
        if let Err(error) = kiln_proto::Address::parse(&advertise_url) {
            problems.push(format!("advertise_url: {error:#}"));
        }
        if !problems.is_empty() {
            anyhow::bail!(
                "the coordinator's configuration is invalid:\n  - {}",
                problems.join("\n  - ")
            );
        }
        Ok(Effective {
            listen,
            data_dir,
            heartbeat_ttl,
            disconnect_grace,
            max_blob_bytes,
            max_queued_per_user,
            max_connections,
            max_connections_per_ip,
            upload_stall_timeout,
            run_retention,
            blob_grace,
            housekeeping_interval,
            log,
            advertise_url,
            insecure,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca_cert: self.tls_ca_cert,
            tls_ca_key: self.tls_ca_key,
            tls_names: self.tls_names.unwrap_or_default(),
            agent_cert_ttl,
        })
    }
}

impl Effective {
    /// The library's [`crate::Config`] for these settings.
    pub fn coordinator_config(&self) -> crate::Config {
        let mut config = crate::Config::new(self.data_dir.clone());
        config.heartbeat_ttl = std::time::Duration::from_secs(self.heartbeat_ttl.max(1));
        config.disconnect_grace = std::time::Duration::from_secs(self.disconnect_grace);
        config.max_blob_bytes = self.max_blob_bytes;
        config.max_queued_per_user = self.max_queued_per_user;
        config.max_connections = self.max_connections as usize;
        config.max_connections_per_ip = self.max_connections_per_ip as usize;
        config.upload_stall_timeout = std::time::Duration::from_secs(self.upload_stall_timeout);
        config.run_retention =
            (self.run_retention > 0).then(|| std::time::Duration::from_secs(self.run_retention));
        config.blob_grace = std::time::Duration::from_secs(self.blob_grace);
        config.housekeeping_interval =
            std::time::Duration::from_secs(self.housekeeping_interval.max(1));
        config
    }

    /// Whether this coordinator serves TLS and authenticates its callers: on TCP unless
    /// `insecure`.
    pub fn tls(&self) -> bool {
        !self.insecure && !self.listen.starts_with("unix://")
    }

    /// Where the PKI comes from: the names the server certificate is made for are those of
    /// `listen` and `advertise_url` (when they are names, not 0.0.0.0), `tls_names` and this
    /// host's name.
    pub fn pki_config(&self) -> crate::pki::PkiConfig {
        let mut names = self.tls_names.clone();
        for url in [self.listen.as_str(), self.advertise_url.as_str()] {
            if let Some(host) = host_of(url) {
                names.push(host);
            }
        }
        names.push(host_name());
        crate::pki::PkiConfig {
            dir: self.data_dir.join("pki"),
            ca_cert: self.tls_ca_cert.clone(),
            ca_key: self.tls_ca_key.clone(),
            server_cert: self.tls_cert.clone(),
            server_key: self.tls_key.clone(),
            server_names: names,
            agent_cert_ttl: Some(std::time::Duration::from_secs(self.agent_cert_ttl)),
        }
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
pub fn load(explicit: Option<&Path>) -> anyhow::Result<(Option<PathBuf>, Settings)> {
    load_from(explicit, Path::new(DEFAULT_CONFIG_PATH))
}

fn load_from(
    explicit: Option<&Path>,
    default: &Path,
) -> anyhow::Result<(Option<PathBuf>, Settings)> {
    kiln_common::config_file::load(explicit, default)
}

/// The host of `HOST:PORT` or `SCHEME://HOST:PORT`, unless it is unspecified (0.0.0.0, ::).
fn host_of(url: &str) -> Option<String> {
    if url.starts_with("unix://") {
        return None;
    }
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = match hostport.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!matches!(host, "" | "0.0.0.0" | "::")).then(|| host.to_string())
}

/// What `token create` tells agents to dial when `advertise_url` is not set: the listen
/// address, with this host's name in place of an unspecified address (https with TLS).
fn advertise_url_for(listen: &str, tls: bool) -> String {
    if listen.starts_with("unix://") {
        return listen.to_string();
    }
    let hostport = listen
        .strip_prefix("http://")
        .unwrap_or(listen)
        .trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "7070"));
    let host = match host {
        "0.0.0.0" | "[::]" | "" => host_name(),
        host => host.to_string(),
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{host}:{port}")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../packaging/coordinator.toml");

    #[test]
    fn the_shipped_config_parses_and_resolves() {
        let settings = parse(EXAMPLE, Path::new("packaging/coordinator.toml")).unwrap();
        let effective = settings.resolve().unwrap();
        assert_eq!(effective.data_dir, Path::new("/var/lib/kiln/coordinator"));
        assert_eq!(effective.listen, crate::DEFAULT_LISTEN);
    }

    #[test]
    fn every_commented_key_of_the_shipped_config_is_a_real_key() {
        // Uncommenting `# key = value` lines must give a file that parses: the example
        // documents only keys that exist, with values of the right type, that resolve.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let settings = parse(&uncommented, Path::new("uncommented")).unwrap();
        assert!(settings.listen.is_some() && settings.advertise_url.is_some());
        assert!(settings.tls_cert.is_some() && settings.tls_ca_cert.is_some());
        let effective = settings.resolve().unwrap();
        assert!(
            effective.tls(),
            "the example's keys describe a TLS coordinator"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = parse("listen = \"a:1\"\nlisen = \"b\"\n", Path::new("c.toml")).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("c.toml") && message.contains("lisen"),
            "{message}"
        );
    }

    #[test]
    fn precedence_is_flag_or_env_then_file_then_default() {
        fn layer(listen: Option<&str>, ttl: Option<u64>) -> Settings {
            Settings {
                listen: listen.map(str::to_string),
                heartbeat_ttl: ttl,
                data_dir: Some("/d".into()),
                ..Settings::default()
            }
        }
        // (command line (flag or its environment variable), file) → effective.
        let cases: &[(Settings, Settings, &str, u64)] = &[
            (layer(None, None), layer(None, None), "127.0.0.1:7070", 30),
            (layer(None, None), layer(Some("f:1"), Some(7)), "f:1", 7),
            (
                layer(Some("c:2"), None),
                layer(Some("f:1"), Some(7)),
                "c:2",
                7,
            ),
            (
                layer(Some("c:2"), Some(9)),
                layer(Some("f:1"), Some(7)),
                "c:2",
                9,
            ),
            (layer(None, Some(9)), layer(None, None), "127.0.0.1:7070", 9),
        ];
        for (index, (command_line, file, listen, ttl)) in cases.iter().enumerate() {
            let effective = command_line.clone().or(file.clone()).resolve().unwrap();
            assert_eq!(
                (effective.listen.as_str(), effective.heartbeat_ttl),
                (*listen, *ttl),
                "case {index}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let settings = Settings {
            heartbeat_ttl: Some(0),
            log: Some("info,=[".into()),
            tls_key: Some("/k".into()),
            data_dir: Some("/d".into()),
            agent_cert_ttl: Some(1),
            ..Settings::default()
        };
        let error = settings.resolve().unwrap_err().to_string();
        for part in ["heartbeat_ttl", "log filter", "tls_key", "agent_cert_ttl"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
    }

    #[test]
    fn advertise_url_defaults_from_listen() {
        fn check(listen: &str, tls: bool, expected: &str) {
            assert_eq!(advertise_url_for(listen, tls), expected, "listen {listen}");
        }
        check("127.0.0.1:7070", true, "https://127.0.0.1:7070");
        check("127.0.0.1:7070", false, "http://127.0.0.1:7070");
        check("coord.example:9000", true, "https://coord.example:9000");
        check("unix:///run/k.sock", false, "unix:///run/k.sock");
        assert!(advertise_url_for("0.0.0.0:7070", true).ends_with(":7070"));
        assert!(!advertise_url_for("0.0.0.0:7070", true).contains("0.0.0.0"));
    }

    #[test]
    fn the_server_certificate_names_come_from_listen_advertise_url_and_tls_names() {
        assert_eq!(
            host_of("https://coord.example:7070").as_deref(),
            Some("coord.example")
        );
        assert_eq!(host_of("10.0.0.5:7070").as_deref(), Some("10.0.0.5"));
        assert_eq!(host_of("[::1]:7070").as_deref(), Some("::1"));
        assert_eq!(host_of("0.0.0.0:7070"), None);
        assert_eq!(host_of("unix:///run/k.sock"), None);
        let effective = Settings {
            data_dir: Some("/d".into()),
            listen: Some("0.0.0.0:7070".into()),
            advertise_url: Some("https://kiln.example:7070".into()),
            tls_names: Some(vec!["10.1.2.3".into()]),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        let names = effective.pki_config().server_names;
        assert!(names.contains(&"kiln.example".to_string()), "{names:?}");
        assert!(names.contains(&"10.1.2.3".to_string()), "{names:?}");
        assert!(!names.contains(&"0.0.0.0".to_string()), "{names:?}");
    }

    #[test]
    fn insecure_or_a_unix_socket_means_no_tls_and_no_tls_files() {
        let base = Settings {
            data_dir: Some("/d".into()),
            ..Settings::default()
        };
        assert!(base.clone().resolve().unwrap().tls());
        let insecure = Settings {
            insecure: Some(true),
            ..base.clone()
        };
        let effective = insecure.clone().resolve().unwrap();
        assert!(!effective.tls());
        assert!(effective.advertise_url.starts_with("http://"));
        let error = Settings {
            tls_ca_cert: Some("/ca.crt".into()),
            tls_ca_key: Some("/ca.key".into()),
            ..insecure
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(error.contains("serves no TLS"), "{error}");
        let unix = Settings {
            listen: Some("unix:///run/k.sock".into()),
            ..base
        };
        assert!(!unix.resolve().unwrap().tls());
    }

    #[test]
    fn the_effective_config_prints_as_a_file_that_parses_back() {
        let effective = Settings {
            data_dir: Some("/d".into()),
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
        assert_eq!((path, settings), (None, Settings::default()));
        let present = dir.path().join("c.toml");
        std::fs::write(&present, "heartbeat_ttl = 12\n").unwrap();
        let (path, settings) = load_from(None, &present).unwrap();
        assert_eq!(path.as_deref(), Some(present.as_path()));
        assert_eq!(settings.heartbeat_ttl, Some(12));
    }
}
