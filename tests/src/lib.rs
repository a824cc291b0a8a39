//! Test harness: starts the real `kiln-coordinator` and `kiln-agent` binaries as processes
//! on loopback (port 0, temporary directories) and drives them with the real `kiln` CLI.
//! Binaries come from the same target directory as the test executable; build them first
//! (`cargo build --workspace`, which `tests/run` does).
//!
//! [`grpc`] submits runs through the public API directly, for run options the CLI has no
//! flag for; [`docker`] provides the Docker tests' image.

pub mod conda;
pub mod docker;
pub mod grpc;
pub mod secure;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// A built Kiln binary, next to the test executable's `deps/` directory (or next to the
/// executable itself, for a harness binary such as `bench-docker`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let parent = exe.parent().expect("target/<profile>/...");
    let dir = if parent.file_name() == Some(std::ffi::OsStr::new("deps")) {
        parent.parent().expect("target/<profile>/deps/<test>")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before the tests (tests/run does)",
        path.display()
    );
    path
}

/// The interpreter agents use in tests: Debian's python3 starts much faster than a shim.
pub fn python() -> String {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}

/// A temporary directory for a cluster's data. Agents running as root (as the tests do)
/// give runs users of their own, who must pass through it to their run directories.
pub fn cluster_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the cluster directory");
    dir
}

/// A temporary directory that a test and its runs' scripts both write (a gate, a marker):
/// runs of a root agent have users of their own.
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod the shared directory");
    dir
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed if the test panics before stopping it.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Daemon {
        // Append: a restarted daemon keeps the log of its previous process.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open daemon log");
        command.stdout(Stdio::null()).stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and asserts that the daemon drained and exited 0 (showing its log if not).
    pub fn stop_cleanly(&mut self) {
        let code = self.terminate();
        assert_eq!(
            code,
            Some(0),
            "{} did not stop cleanly:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// SIGTERM, then waits for the exit; returns the exit code (None: killed after 30 s).
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process vanishes without a word, as on a node crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the process freezes (holding its sockets open) and thaws.
    pub fn pause(&self, paused: bool) {
        let signal = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal");
    }

    /// Whether it has exited (with its code).
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("wait").map(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A coordinator and its agents, all real processes, in one temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Daemon,
    pub address: String,
    pub agents: Vec<Daemon>,
    specs: Vec<AgentSpec>,
    /// Extra environment variables of agent `index` (e.g. `KILN_FAKE_GPUS`).
    agent_env: std::collections::HashMap<usize, Vec<(String, String)>>,
    /// A command agent `index` runs under (e.g. `ip netns exec NS`).
    agent_wrapper: std::collections::HashMap<usize, Vec<String>>,
    ttl: String,
    /// Flags every agent gets on top of the harness's own (see [`Cluster::start_with_agent_args`]).
    agent_args: Vec<String>,
    /// Flags the coordinator gets on top of the harness's own, at every start (see
    /// [`Cluster::start_with_coordinator_args`]).
    coordinator_args: Vec<String>,
}

#[derive(Clone)]
pub struct AgentSpec {
    pub target: &'static str,
    pub slots: u32,
    /// `--advertise-address` (gang runs' MASTER_ADDR), e.g. a 127.0.0.x address of its own.
    pub advertise: Option<&'static str>,
}

impl Cluster {
    /// A coordinator plus one agent per spec; returns when every agent is online.
    pub fn start(agents: &[AgentSpec]) -> Cluster {
        Cluster::start_with_ttl(agents, 5)
    }

    /// Like [`Cluster::start`], with the coordinator's heartbeat TTL in seconds.
    pub fn start_with_ttl(agents: &[AgentSpec], ttl_s: u32) -> Cluster {
        Cluster::start_full("127.0.0.1:0", agents, ttl_s, &[])
    }

    /// Like [`Cluster::start`], each agent started with `args` added to its command line
    /// (e.g. `["--docker-cpu-image", "kiln-test/python:bookworm"]`).
    pub fn start_with_agent_args(agents: &[AgentSpec], args: &[&str]) -> Cluster {
        Cluster::start_full("127.0.0.1:0", agents, 5, args)
    }

    /// Like [`Cluster::start_with_ttl`], with the coordinator listening on `listen`
    /// (`IP:0` for any free port), e.g. an address agents in a network namespace reach.
    pub fn start_listening(listen: &str, agents: &[AgentSpec], ttl_s: u32) -> Cluster {
        Cluster::start_full(listen, agents, ttl_s, &[])
    }

    /// Like [`Cluster::start_with_ttl`], the coordinator started (and restarted) with `args`
    /// added to its command line (e.g. `["--max-blob-bytes", "1000000"]`).
    pub fn start_with_coordinator_args(agents: &[AgentSpec], ttl_s: u32, args: &[&str]) -> Cluster {
        Cluster::start_inner("127.0.0.1:0", agents, ttl_s, &[], args)
    }

    fn start_full(listen: &str, agents: &[AgentSpec], ttl_s: u32, agent_args: &[&str]) -> Cluster {
        Cluster::start_inner(listen, agents, ttl_s, agent_args, &[])
    }

    fn start_inner(
        listen: &str,
        agents: &[AgentSpec],
        ttl_s: u32,
        agent_args: &[&str],
        coordinator_args: &[&str],
    ) -> Cluster {
        let dir = cluster_dir();
        let address_file = dir.path().join("coordinator.addr");
        let mut command = Command::new(bin("kiln-coordinator"));
        let ttl = ttl_s.to_string();
        // Plaintext on loopback: the scenarios here are about runs, not credentials
        // (tests/tests/security.rs runs the coordinator with TLS and authentication).
        command
            .args([
                "--insecure",
                "--listen",
                listen,
                "--heartbeat-ttl",
                &ttl,
                "--data-dir",
            ])
            .arg(dir.path().join("coordinator"))
            .arg("--address-file")
            .arg(&address_file)
            .args(coordinator_args);
        let coordinator = Daemon::spawn("coordinator", command, dir.path().join("coordinator.log"));
        let address = wait_for("the coordinator's address", Duration::from_secs(20), || {
            std::fs::read_to_string(&address_file)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        });
        let mut cluster = Cluster {
            dir,
            coordinator,
            address,
            agents: Vec::new(),
            specs: Vec::new(),
            agent_env: Default::default(),
            agent_wrapper: Default::default(),
            ttl,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
        };
        for spec in agents {
            cluster.add_agent(spec.clone());
        }
        cluster.wait_agents_online(cluster.agents.len());
        cluster
    }

    /// Stops the coordinator with SIGTERM (asserting a clean exit) and starts it again on
    /// the same address and data directory.
    pub fn restart_coordinator(&mut self) {
        self.coordinator.stop_cleanly();
        self.start_coordinator_again();
    }

    /// SIGKILLs the coordinator (no chance to flush anything) and starts it again.
    pub fn crash_coordinator(&mut self) {
        self.coordinator.kill();
        self.start_coordinator_again();
    }

    /// SIGKILLs the coordinator and leaves it down (an outage); [`Cluster::start_coordinator`]
    /// brings it back.
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// Starts the coordinator again (after [`Cluster::kill_coordinator`]) on the same address
    /// and data directory; returns once it listens.
    pub fn start_coordinator(&mut self) {
        self.start_coordinator_again();
    }

    /// The coordinator's data directory (`kiln.db`, `blobs/`).
    pub fn coordinator_data(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// Agent `index`'s data directory (`runs/<run>.<attempt>/...`).
    pub fn agent_data(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("agent{index}"))
    }

    fn start_coordinator_again(&mut self) {
        let listen = self.address.trim_start_matches("http://").to_string();
        let mut command = Command::new(bin("kiln-coordinator"));
        command
            .args([
                "--insecure",
                "--listen",
                &listen,
                "--heartbeat-ttl",
                &self.ttl,
                "--data-dir",
            ])
            .arg(self.dir.path().join("coordinator"))
            .args(&self.coordinator_args);
        self.coordinator = Daemon::spawn(
            "coordinator",
            command,
            self.dir.path().join("coordinator.log"),
        );
        wait_for(
            "the coordinator to listen again",
            Duration::from_secs(20),
            || std::net::TcpStream::connect(&listen).ok(),
        );
    }

    pub fn add_agent(&mut self, spec: AgentSpec) -> usize {
        let index = self.agents.len();
        let daemon = self.spawn_agent(index, &spec);
        self.agents.push(daemon);
        self.specs.push(spec);
        index
    }

    /// Like [`Cluster::add_agent`], with extra environment variables for the agent (and so
    /// for its run supervisors), e.g. `KILN_FAKE_GPUS=2` for two recorded H100s.
    pub fn add_agent_with_env(&mut self, spec: AgentSpec, env: &[(&str, &str)]) -> usize {
        let index = self.agents.len();
        self.agent_env.insert(
            index,
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self.add_agent(spec)
    }

    /// Sets the extra environment of agent `index` for its next start (see
    /// [`Cluster::restart_agent`]); empty: none.
    pub fn set_agent_env(&mut self, index: usize, env: &[(&str, &str)]) {
        self.agent_env.insert(
            index,
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// Like [`Cluster::add_agent`], with the agent started under `wrapper` (a command that
    /// execs its arguments, such as `ip netns exec NAME`, so the pid stays the agent's).
    pub fn add_agent_wrapped(&mut self, spec: AgentSpec, wrapper: &[&str]) -> usize {
        let index = self.agents.len();
        self.agent_wrapper
            .insert(index, wrapper.iter().map(|s| s.to_string()).collect());
        self.add_agent(spec)
    }

    /// Waits until `n` agents are online.
    pub fn wait_agents_online(&self, n: usize) {
        wait_for("agents online", Duration::from_secs(20), || {
            let agents = self.json(&["agents", "--json"]);
            let online = agents
                .as_array()?
                .iter()
                .filter(|a| a["state"] == "online")
                .count();
            (online == n).then_some(())
        });
    }

    /// SIGKILLs agent `index` and starts it again on the same data directory.
    pub fn crash_and_restart_agent(&mut self, index: usize) {
        self.agents[index].kill();
        self.restart_agent(index);
    }

    /// Starts agent `index` again (after it was killed) on the same data directory.
    pub fn restart_agent(&mut self, index: usize) {
        let connected = |daemon: &Daemon| {
            daemon
                .log_text()
                .matches("Connected to the coordinator")
                .count()
        };
        let before = connected(&self.agents[index]);
        let spec = self.specs[index].clone();
        self.agents[index] = self.spawn_agent(index, &spec);
        let agent = &self.agents[index];
        wait_for(
            "the restarted agent to connect",
            Duration::from_secs(20),
            || (connected(agent) > before).then_some(()),
        );
    }

    fn spawn_agent(&self, index: usize, spec: &AgentSpec) -> Daemon {
        let data = self.dir.path().join(format!("agent{index}"));
        let mut command = match self.agent_wrapper.get(&index) {
            Some(wrapper) => {
                let mut command = Command::new(&wrapper[0]);
                command.args(&wrapper[1..]).arg(bin("kiln-agent"));
                command
            }
            None => Command::new(bin("kiln-agent")),
        };
        command
            .args(["--coordinator", &self.address, "--target", spec.target])
            .args(["--slots", &spec.slots.to_string()])
            .args(["--python", &python()])
            .args(["--heartbeat-interval", "0.5", "--metrics-interval", "0.3"])
            .args(["--hostname", &format!("host{index}")])
            .args(
                spec.advertise
                    .map(|address| vec!["--advertise-address", address])
                    .unwrap_or_default(),
            )
            .arg("--data-dir")
            .arg(&data)
            .envs(self.agent_env.get(&index).into_iter().flatten().cloned())
            .args(&self.agent_args);
        let log = self.dir.path().join(format!("agent{index}.log"));
        Daemon::spawn(&format!("agent{index}"), command, log)
    }

    /// `kiln ARGS` against this cluster's coordinator.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_command(args).output().expect("run kiln")
    }

    pub fn kiln_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin("kiln"));
        command
            .args(args)
            .env("KILN_COORDINATOR", &self.address)
            .env_remove("KILN_TARGET")
            .stdin(Stdio::null());
        command
    }

    /// `kiln submit --detach ARGS`, which must succeed; returns the run id it printed.
    pub fn submit_detached(&self, args: &[&str]) -> i64 {
        let mut full = vec!["submit", "--detach"];
        full.extend_from_slice(args);
        let output = self.kiln(&full);
        assert!(
            output.status.success(),
            "kiln {full:?} failed: {}",
            text(&output.stderr)
        );
        text(&output.stdout)
            .trim()
            .parse()
            .expect("submit --detach prints the run id")
    }

    /// `kiln ARGS` in the background, its stdout read line by line as it is printed.
    pub fn spawn_kiln(&self, args: &[&str]) -> Following {
        self.spawn_kiln_with_env(args, &[])
    }

    /// Like [`Cluster::spawn_kiln`], with extra environment variables for `kiln`.
    pub fn spawn_kiln_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Following {
        let mut child = self
            .kiln_command(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        Following { child, stdout }
    }

    /// `kiln ARGS` that must succeed, parsed as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        json_of(args, &self.kiln(args))
    }

    pub fn run(&self, run_id: i64) -> Value {
        self.json(&["show", &run_id.to_string(), "--json"])
    }

    pub fn wait_status(&self, run_id: i64, status: &str) -> Value {
        wait_for(
            &format!("run {run_id} to be {status}"),
            Duration::from_secs(30),
            || {
                let run = self.run(run_id);
                (run["status"] == status).then_some(run)
            },
        )
    }

    /// Waits until the run has ended (any terminal status; `stopping` is not one) and
    /// returns it; on timeout, panics with the run as last seen and the tail of every
    /// agent's log.
    pub fn wait_ended(&self, run_id: i64, timeout: Duration) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let output = self.kiln(&["show", &run_id.to_string(), "--json"]);
            if output.status.success() {
                let run: Value = serde_json::from_slice(&output.stdout).expect("kiln printed JSON");
                if ENDED.iter().any(|s| run["status"] == *s) {
                    return run;
                }
                if std::time::Instant::now() > deadline {
                    let agents: Vec<String> = self
                        .agents
                        .iter()
                        .map(|a| format!("{}:\n{}", a.name, tail(&a.log_text(), 20)))
                        .collect();
                    panic!(
                        "run {run_id} did not end within {timeout:?}; last seen: {run}\n{}",
                        agents.join("\n")
                    );
                }
            } else {
                assert!(
                    std::time::Instant::now() < deadline,
                    "kiln show {run_id} kept failing: {}",
                    text(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent id of agent `index` as the coordinator lists it (by host name).
    pub fn agent_id(&self, index: usize) -> String {
        let agents = self.json(&["agents", "--json"]);
        agents
            .as_array()
            .expect("array")
            .iter()
            .find(|a| a["hostname"] == format!("host{index}"))
            .and_then(|a| a["id"].as_str())
            .expect("agent listed")
            .to_string()
    }

    /// Stops everything with SIGTERM and asserts each daemon exited 0.
    pub fn stop(mut self) {
        for agent in &mut self.agents {
            agent.stop_cleanly();
        }
        self.coordinator.stop_cleanly();
    }
}

/// A background `kiln` command whose output a test reads as it comes.
pub struct Following {
    pub child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Following {
    /// The next line of stdout (with its newline; empty at the end).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line).expect("read kiln's stdout");
        line
    }

    /// Sends a signal to the command (SIGINT is a user's Ctrl-C).
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal kiln");
    }

    /// Waits for the end: the rest of stdout, and the exit status and stderr.
    pub fn finish(mut self) -> (String, Output) {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).expect("read kiln's stdout");
        let output = self.child.wait_with_output().expect("wait for kiln");
        (rest, output)
    }
}

/// The JSON that `kiln ARGS` printed; panics with its stderr when it failed.
pub fn json_of(args: &[&str], output: &Output) -> Value {
    assert!(
        output.status.success(),
        "kiln {args:?} failed: {}",
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kiln printed JSON")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes files (path → content) under `dir`, creating parents.
pub fn write_tree(dir: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write file");
    }
}

/// The run id `kiln submit` reported on stderr ("run N submitted ...").
pub fn submitted_run_id(stderr: &[u8]) -> i64 {
    let stderr = text(stderr);
    stderr
        .lines()
        .find_map(|line| {
            line.strip_prefix("run ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no run id in: {stderr}"))
}

/// Whether a process exists (signal 0).
pub fn process_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// A TCP proxy in front of a coordinator that cuts one connection, the first to carry more
/// than `cut_after` bytes (either way), as a coordinator restart or a network reset would
/// in the middle of a transfer. Later connections pass untouched.
pub struct CuttingProxy {
    /// `http://127.0.0.1:PORT`, for `--coordinator` or `KILN_COORDINATOR`.
    pub address: String,
    /// Whether the cut happened.
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    pub fn start(coordinator: &str, cut_after: u64) -> CuttingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let target = coordinator.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = format!("http://{}", listener.local_addr().expect("address"));
        let cut = Arc::new(AtomicBool::new(false));
        let cut_flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let carried = Arc::new(AtomicU64::new(0));
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    let (carried, cut) = (carried.clone(), cut_flag.clone());
                    std::thread::spawn(move || {
                        let mut buffer = [0u8; 16 * 1024];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let total = carried.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            if total > cut_after
                                && cut
                                    .compare_exchange(
                                        false,
                                        true,
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    )
                                    .is_ok()
                            {
                                break;
                            }
                            if std::io::Write::write_all(&mut to, &buffer[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(client, server);
                pipe(server2, client2);
            }
        });
        CuttingProxy { address, cut }
    }
}

/// A tmpfs mounted for the length of a test (the tests run as root, as CI does): a small
/// disk to fill.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(path: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).expect("create the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The statuses a run ends in.
pub const ENDED: [&str; 5] = ["succeeded", "failed", "cancelled", "lost", "env_failed"];

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
