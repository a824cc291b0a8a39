//! A coordinator with TLS and authentication on (its default), agents that join it with
//! tokens the way an operator does (`token create`, `kiln-agent join`), and users who log
//! in (`user create`, `kiln login`), all real processes; plus raw gRPC clients with chosen
//! credentials, to check what the coordinator refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_proto::tls::{ClientTls, Trust};
use kiln_proto::{Address, v1};

use crate::{Daemon, bin, python, text, wait_for};

pub struct SecureCluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Daemon,
    /// `https://127.0.0.1:PORT`.
    pub address: String,
    /// Agent daemons by index (None: joined but not running).
    pub agents: Vec<Option<Daemon>>,
}

impl SecureCluster {
    /// A coordinator on loopback with TLS, heartbeat TTL 5 s, and `args` on top.
    pub fn start(args: &[&str]) -> SecureCluster {
        let dir = crate::cluster_dir();
        let address_file = dir.path().join("coordinator.addr");
        let mut command = Command::new(bin("kiln-coordinator"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-ttl",
                "5",
                "--data-dir",
            ])
            .arg(dir.path().join("coordinator"))
            .arg("--address-file")
            .arg(&address_file)
            .args(args);
        let coordinator = Daemon::spawn("coordinator", command, dir.path().join("coordinator.log"));
        let address = wait_for("the coordinator's address", Duration::from_secs(20), || {
            std::fs::read_to_string(&address_file)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        });
        assert!(address.starts_with("https://"), "{address}");
        SecureCluster {
            dir,
            coordinator,
            address,
            agents: Vec::new(),
        }
    }

    /// The coordinator's TCP address (it listens on 127.0.0.1).
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let port: u16 = self
            .address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the coordinator's address");
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// `kiln-coordinator ARGS` on this coordinator's data directory (token, user).
    pub fn admin_command(&self, args: &[&str]) -> Output {
        Command::new(bin("kiln-coordinator"))
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--advertise-url", &self.address])
            .stdin(Stdio::null())
            .output()
            .expect("run kiln-coordinator")
    }

    /// `token create --target TARGET EXTRA...`: the join command it printed and the token
    /// printed under it (which the command reads from standard input).
    pub fn printed_join(&self, target: &str, extra: &[&str]) -> (Vec<String>, String) {
        let mut args = vec!["token", "create", "--target", target];
        args.extend_from_slice(extra);
        let output = self.admin_command(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        printed_command(&text(&output.stdout), &["kiln-agent", "join"])
    }

    /// The arguments of the join command `token create --target TARGET EXTRA...` printed,
    /// with the token on the command line (`--token TOKEN` for `--token-file -`).
    pub fn join_command(&self, target: &str, extra: &[&str]) -> Vec<String> {
        let (words, token) = self.printed_join(target, extra);
        with_token_argument(words, &token)
    }

    fn agent_config(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("agent{index}.toml"))
    }

    pub fn agent_data(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("agent{index}"))
    }

    /// `kiln-agent join ARGS --no-restart` for agent `index` (its own config file).
    pub fn join(&self, index: usize, args: &[String]) -> Output {
        self.join_fed(index, args, "")
    }

    /// [`SecureCluster::join`] with `input` on its standard input.
    pub fn join_fed(&self, index: usize, args: &[String], input: &str) -> Output {
        let config = self.agent_config(index);
        if !config.exists() {
            std::fs::write(
                &config,
                format!(
                    "data_dir = \"{}\"\npython = \"{}\"\nhostname = \"host{index}\"\n\
                     heartbeat_interval = 0.5\nmetrics_interval = 0.3\n",
                    self.agent_data(index).display(),
                    python()
                ),
            )
            .expect("write agent config");
        }
        let mut child = Command::new(bin("kiln-agent"))
            .arg("join")
            .args(args)
            .arg("--no-restart")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kiln-agent join");
        let mut stdin = child.stdin.take().expect("piped");
        // A join that fails before it reads its input closes the pipe: not an error here.
        let _ = std::io::Write::write_all(&mut stdin, input.as_bytes());
        drop(stdin);
        child.wait_with_output().expect("wait for kiln-agent join")
    }

    /// Starts (or restarts) agent `index` from its joined config file.
    pub fn start_agent(&mut self, index: usize) {
        let mut command = Command::new(bin("kiln-agent"));
        command.arg("--config").arg(self.agent_config(index));
        let log = self.dir.path().join(format!("agent{index}.log"));
        let daemon = Daemon::spawn(&format!("agent{index}"), command, log);
        if self.agents.len() <= index {
            self.agents.resize_with(index + 1, || None);
        }
        self.agents[index] = Some(daemon);
    }

    /// A new agent of `target`: token, join, start. Returns its index.
    pub fn add_agent(&mut self, target: &str) -> usize {
        let index = self.agents.len();
        let join = self.join_command(target, &[]);
        let output = self.join(index, &join);
        assert!(output.status.success(), "join: {}", text(&output.stderr));
        self.start_agent(index);
        index
    }

    pub fn agent_id(&self, index: usize) -> String {
        std::fs::read_to_string(self.agent_data(index).join("agent-id"))
            .expect("joined agents have an id")
            .trim()
            .to_string()
    }

    pub fn agent_log(&self, index: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("agent{index}.log")))
            .unwrap_or_default()
    }

    /// A user and a config home in which they are logged in (`kiln login` as printed).
    pub fn login(&self, name: &str, role: &str) -> User {
        let output = self.admin_command(&["user", "create", name, "--role", role]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        // Without `kiln`: the arguments start with `login`.
        let (words, token) = printed_command(&text(&output.stdout), &["kiln"]);
        assert_eq!(words[0], "login");
        let home = self.dir.path().join(format!("home-{name}"));
        std::fs::create_dir_all(&home).expect("home");
        let words = with_token_argument(words, &token);
        let user = User { home, token };
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let output = user.kiln(&words);
        assert!(output.status.success(), "login: {}", text(&output.stderr));
        user
    }

    /// The CA certificate (public).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("pki/ca.crt")).expect("the CA exists")
    }

    /// Client TLS that trusts this coordinator's CA and presents nothing.
    pub fn anonymous(&self) -> ClientTls {
        ClientTls::trusting(Trust::CaPem(self.ca_pem()))
    }

    /// Client TLS with agent `index`'s certificate, as stored by its join.
    pub fn agent_tls(&self, index: usize) -> ClientTls {
        ClientTls {
            identity: Some(stored_identity(&self.agent_data(index))),
            ..self.anonymous()
        }
    }

    pub fn wait_agent_state(&self, admin: &User, agent_id: &str, state: &str) {
        wait_for(
            &format!("agent {agent_id} {state}"),
            Duration::from_secs(20),
            || {
                let agents = admin.json(&["agents", "--json"]);
                agents
                    .as_array()?
                    .iter()
                    .any(|a| a["id"] == agent_id && a["state"] == state)
                    .then_some(())
            },
        );
    }
}

/// The arguments (after `program`) of the command on the first line of `printed`, and the
/// token on its second line.
pub fn printed_command(printed: &str, program: &[&str]) -> (Vec<String>, String) {
    let mut lines = printed.lines();
    let command = lines.next().unwrap_or_default();
    let words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
    assert_eq!(words[..program.len()], *program, "{printed}");
    assert!(
        words.ends_with(&["--token-file".to_string(), "-".to_string()]),
        "{printed}"
    );
    let token = lines.next().expect("the token under the command").trim();
    assert!(token.contains('.'), "{printed}");
    (words[program.len()..].to_vec(), token.to_string())
}

/// `words` with `--token-file -` replaced by `--token TOKEN`.
pub fn with_token_argument(mut words: Vec<String>, token: &str) -> Vec<String> {
    let at = words
        .iter()
        .position(|w| w == "--token-file")
        .expect("--token-file");
    words.splice(at..at + 2, ["--token".to_string(), token.to_string()]);
    words
}

/// (certificate, key) from an agent's `identity/agent.pem`.
pub fn stored_identity(data_dir: &Path) -> (String, String) {
    let pem = std::fs::read_to_string(data_dir.join("identity/agent.pem")).expect("agent.pem");
    let split = pem.find("-----BEGIN PRIVATE KEY-----").expect("a key");
    (pem[..split].to_string(), pem[split..].to_string())
}

/// A user logged in under their own config home.
pub struct User {
    pub home: PathBuf,
    pub token: String,
}

impl User {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin("kiln"));
        command
            .args(args)
            .env("XDG_CONFIG_HOME", &self.home)
            .env("XDG_DATA_HOME", self.home.join("data"))
            .env_remove("KILN_COORDINATOR")
            .env_remove("KILN_TOKEN")
            .env_remove("KILN_TARGET")
            .stdin(Stdio::null());
        command
    }

    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kiln")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        crate::json_of(args, &self.kiln(args))
    }

    pub fn submit_detached(&self, args: &[&str]) -> i64 {
        let mut full = vec!["submit", "--detach"];
        full.extend_from_slice(args);
        let output = self.kiln(&full);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout).trim().parse().expect("run id")
    }

    pub fn wait_status(&self, run: i64, status: &str) -> serde_json::Value {
        wait_for(
            &format!("run {run} {status}"),
            Duration::from_secs(30),
            || {
                let run = self.json(&["show", &run.to_string(), "--json"]);
                (run["status"] == status).then_some(run)
            },
        )
    }
}

/// Runs `f` on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// A channel to `address` with `tls`; the error text when it cannot be opened.
pub async fn channel(address: &str, tls: &ClientTls) -> Result<tonic::transport::Channel, String> {
    let address = Address::parse(address).expect("address");
    kiln_proto::connect_with(&address, Some(tls))
        .await
        .map_err(|e| format!("{e:#}"))
}

/// An agent's session as a raw client holds it: what to send, what comes back.
pub type Session = (
    tokio::sync::mpsc::Sender<v1::AgentMessage>,
    tonic::Streaming<v1::CoordinatorMessage>,
);

/// The hello of a one-slot host named "intruder", as `agent_id` on `target`.
pub fn intruder_hello(agent_id: &str, target: &str) -> v1::Hello {
    v1::Hello {
        agent_id: agent_id.to_string(),
        target: target.to_string(),
        host: Some(v1::HostInfo {
            hostname: "intruder".into(),
            cpus: 1,
            memory_bytes: 1 << 30,
            ..Default::default()
        }),
        slots: 1,
        instance: "intruder".into(),
        ..Default::default()
    }
}

/// Opens an agent session that says hello as `agent_id` on `target`; the status the
/// coordinator answered with, or the session's two halves.
pub async fn session(
    channel: tonic::transport::Channel,
    agent_id: &str,
    target: &str,
) -> Result<Session, tonic::Status> {
    session_with(channel, intruder_hello(agent_id, target)).await
}

/// Opens an agent session that says `hello`.
pub async fn session_with(
    channel: tonic::transport::Channel,
    hello: v1::Hello,
) -> Result<Session, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(hello)),
    })
    .await
    .expect("room for hello");
    let inbound = kiln_proto::clients::agent(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}
