//! One run attempt on this agent. Preparation, in order: fetch the snapshot (cache by
//! digest, verified) → unpack into a fresh `work/` directory → check the script → write
//! `spec.json` → start the run's supervisor (see `supervisor.rs`), which starts the script.
//! Then [`attach`] follows the attempt's spool until the script has ended: it sends every
//! log line and metric point, keeps what the coordinator has not acknowledged and sends it
//! again on every new session, uploads `outputs/`, reports `Finished` and waits for its ack.
//! Only then is the run directory removed.
//!
//! Stopping the agent leaves supervisors and scripts running; the next agent process finds
//! them in `runs/` and attaches again ([`Agent::reattach_runs`](crate::Agent)). A cancel
//! from the coordinator stops the script's whole process group (SIGTERM, SIGKILL after
//! [`STOP_GRACE`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln_common::snapshot::{self, DIGEST_PREFIX, PackOptions, SnapshotError, UnpackLimits};
use kiln_proto::v1::{self, agent_message::Kind as Up};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::Agent;
use crate::session::up;
use crate::spool::{self, Acked, Exit, LogRecord, MetricRecord, ProcessRecord, Spec, StateDir};

/// Time a cancelled run gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the spool is checked for new lines while a run is active.
const POLL: Duration = Duration::from_millis(5);
/// Most bytes of unacknowledged lines and points one attempt holds in memory, sent or not;
/// the rest waits in the spool file. Bounds the agent's memory per run and what one
/// session's resend puts on the wire.
pub(crate) const MAX_UNACKED_BYTES: usize = 8 << 20;
/// Most spool bytes read at once.
const MAX_READ_BYTES: usize = 4 << 20;
/// The largest spool record (a 64 KiB line and its JSON escaping and fields): a read needs
/// at least this much room to make progress.
const MAX_LINE_RECORD_BYTES: usize = 400 << 10;
/// How often the spool is read while the attempt is being prepared.
const PREPARE_POLL: Duration = Duration::from_millis(100);
/// Largest batch message, in bytes: well below the 16 MiB gRPC message limit.
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// What the coordinator has acknowledged for one attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AckState {
    pub log_seq: u64,
    pub metric_seq: u64,
    pub finished: bool,
    /// The coordinator has no record of the attempt: stop it and forget it.
    pub discard: bool,
}

/// How the agent talks to one run's task.
pub(crate) struct RunControl {
    /// Cancelled when the coordinator cancels the attempt.
    pub cancel: CancellationToken,
    /// Cancelled when the agent fences the attempt off (no coordinator for too long).
    pub fence: CancellationToken,
    /// Cancelled when the agent process stops: the task ends, the run goes on.
    pub detach: CancellationToken,
    /// Cancelled when the agent is drained: the attempt is stopped (or not started) and
    /// reported `drained`.
    pub drain: CancellationToken,
    pub acks: watch::Receiver<AckState>,
    /// Gang runs: the coordinator's go, once every node is ready.
    pub launch: watch::Receiver<Option<v1::Launch>>,
}

/// Where an attempt lives on disk: `runs/<run>.<attempt>/{state,work}`.
pub(crate) fn run_root(agent: &Agent, run_id: i64, attempt: u32) -> PathBuf {
    agent
        .config
        .data_dir
        .join("runs")
        .join(format!("{run_id}.{attempt}"))
}

/// Prepares and starts a newly assigned attempt, then follows it.
pub(crate) async fn execute(agent: Arc<Agent>, assignment: v1::Assignment, control: RunControl) {
    let span = info_span!(
        "run",
        run_id = assignment.run_id,
        attempt = assignment.attempt
    );
    async move {
        info!(script = %assignment.script, snapshot = %assignment.snapshot_digest, "Run assigned.");
        let root = run_root(&agent, assignment.run_id, assignment.attempt);
        let state = StateDir(root.join("state"));
        // The preparation's own lines (snapshot fetch, environment build output, image pull)
        // stream to the coordinator while it runs, not only once the script has started.
        let mut follower = Follower::new(&agent, assignment.run_id, assignment.attempt, &state);
        let prepared = {
            let preparing = prepare(&agent, &assignment, &root, &state, &control);
            tokio::pin!(preparing);
            let mut sessions = agent.session_generation.subscribe();
            let mut acks = control.acks.clone();
            loop {
                tokio::select! {
                    result = &mut preparing => break result,
                    // A stopping agent does not wait for a download, an environment build or
                    // a gang's launch: nothing runs yet, so the attempt is dropped (a build
                    // is killed with its future) and the coordinator gives it out again
                    // when this agent says hello without it, or is lost.
                    _ = control.detach.cancelled() => {
                        info!("Agent stopping: the run's preparation is abandoned; the coordinator gives the attempt out again.");
                        return;
                    }
                    // A drained agent starts nothing: the attempt is reported drained.
                    _ = control.drain.cancelled() => {
                        break Err(anyhow::anyhow!("the agent was drained before the run started"));
                    }
                    _ = tokio::time::sleep(PREPARE_POLL) => {
                        follower.read_spool();
                    }
                    permit = agent.uplink.reserve(), if follower.has_unsent() => {
                        if let Ok(permit) = permit
                            && let Some(message) = follower.next_message()
                        {
                            permit.send(message);
                        }
                    }
                    changed = acks.changed() => {
                        if changed.is_ok() {
                            follower.acknowledged(*acks.borrow_and_update());
                        }
                    }
                    changed = sessions.changed() => {
                        if changed.is_ok() {
                            follower.resend();
                        }
                    }
                }
            }
        };
        if let Err(error) = prepared {
            // Nothing started: record why, and report it like any other end.
            let message = format!("{error:#}");
            let env_failed = error.chain().any(|e| e.is::<crate::env::EnvError>());
            warn!(error = %message, env_failed, "Run could not start.");
            let mut spool_logs = SystemLines::new(&state);
            spool_logs.line(&message);
            let exit = Exit {
                exit_code: None,
                description: message.clone(),
                start_error: Some(message),
                failed_rank: None,
                env_failed,
                ..Default::default()
            };
            if let Err(error) = spool::write_json(&state.exit(), &exit) {
                warn!(error = %error, "Could not record the failed start; dropping the run.");
                let _ = std::fs::remove_dir_all(&root);
                return;
            }
        }
        attach(
            agent,
            assignment.run_id,
            assignment.attempt,
            root,
            control,
            Some(follower),
        )
        .await;
    }
    .instrument(span)
    .await
}

/// Lines Kiln itself writes into the log spool before the supervisor starts.
struct SystemLines {
    path: PathBuf,
}

impl SystemLines {
    fn new(state: &StateDir) -> SystemLines {
        SystemLines { path: state.logs() }
    }

    fn line(&mut self, text: &str) {
        let write = || -> std::io::Result<()> {
            let seq = spool::last_seq(&self.path)? + 1;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let record = LogRecord {
                seq,
                stream: v1::LogStream::System as i32,
                time_ms: now_ms(),
                text: text.to_string(),
                rank: None,
            };
            spool::append(&mut file, &record)
        };
        if let Err(error) = write() {
            warn!(error = %error, "Could not spool a system line.");
        }
    }
}

async fn prepare(
    agent: &Arc<Agent>,
    assignment: &v1::Assignment,
    root: &Path,
    state: &StateDir,
    control: &RunControl,
) -> anyhow::Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("clear {}", root.display()))?;
    }
    std::fs::create_dir_all(&state.0).with_context(|| format!("create {}", state.0.display()))?;
    let mut system = SystemLines::new(state);
    let archive = tokio::select! {
        _ = control.cancel.cancelled() => anyhow::bail!("cancelled before the run started"),
        archive = fetch_snapshot(agent, &assignment.snapshot_digest, &mut system) => {
            archive.context("could not fetch the snapshot")?
        }
    };
    let work = root.join("work");
    unpack(&archive, &work)
        .await
        .context("the snapshot could not be unpacked")?;
    let script = work.join(&assignment.script);
    anyhow::ensure!(
        script.is_file(),
        "script `{}` does not exist in the snapshot",
        assignment.script
    );
    let outputs = work.join("outputs");
    std::fs::create_dir_all(&outputs).context("create outputs/")?;
    // A Docker run gets its image ready here; its script runs with the image's python3, or
    // with the conda environment's python baked into a derived image (`docker.conda`).
    let mut docker_image = match docker_environment(assignment) {
        Some(environment) => {
            Some(prepare_docker(agent, assignment, environment, &mut system).await?)
        }
        None => None,
    };
    let docker_conda = docker_environment(assignment)
        .map(|docker| docker.conda.clone())
        .filter(|conda| !conda.is_empty());
    let environment = match &docker_conda {
        Some(file) => Some(v1::Environment {
            kind: Some(v1::environment::Kind::Conda(v1::CondaEnvironment {
                file: file.clone(),
            })),
        }),
        None => assignment.environment.clone(),
    };
    let prepared = if docker_image.is_some() && docker_conda.is_none() {
        crate::env::Prepared {
            python: PathBuf::from("python3"),
            env: Vec::new(),
        }
    } else {
        let mut log = |line: &str| system.line(line);
        crate::env::prepare(
            environment.as_ref(),
            crate::env::Context {
                default_python: &agent.config.python,
                data_dir: &agent.config.data_dir,
                work: &work,
                settings: &agent.config.env,
                cancel: &control.cancel,
                log: &mut log,
            },
        )
        .await?
    };
    if let (Some(image), Some(_)) = (docker_image.as_mut(), &docker_conda) {
        let prefix = prepared
            .env
            .iter()
            .find(|(key, _)| key == "CONDA_PREFIX")
            .map(|(_, value)| PathBuf::from(value))
            .ok_or_else(|| crate::env::EnvError("the conda environment has no prefix".into()))?;
        let mut log = |line: &str| system.line(line);
        image.image = crate::docker::derive_conda_image(
            &agent.config.docker,
            &image.image,
            &prefix,
            &mut log,
        )
        .await?;
    }
    let (program, args) = command_line(&prepared.python, assignment, &script)?;
    let socket = agent
        .config
        .data_dir
        .join("sock")
        .join(format!("{}.{}.sock", assignment.run_id, assignment.attempt));
    // What the run inherits of the agent's own environment (the supervisor starts the
    // script with nothing else), then Kiln's variables, the environment's, the run's own.
    // (A container's environment is its image's: nothing of the host's.)
    let mut env = match &docker_image {
        None => inherited_env(std::env::vars_os(), &agent.config.pass_env),
        Some(_) => Vec::new(),
    };
    env.extend([
        ("PYTHONPATH".to_string(), python_path(&agent.python_dir)),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("KILN_RUN_ID".to_string(), assignment.run_id.to_string()),
        ("KILN_ATTEMPT".to_string(), assignment.attempt.to_string()),
        ("KILN_TARGET".to_string(), agent.config.target.to_string()),
        (
            "KILN_OUTPUTS_DIR".to_string(),
            outputs.to_string_lossy().into_owned(),
        ),
        (
            "KILN_METRICS_SOCKET".to_string(),
            socket.to_string_lossy().into_owned(),
        ),
    ]);
    env.extend(prepared.env.iter().cloned());
    let mut user_env: Vec<_> = assignment
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    user_env.sort();
    env.extend(user_env);
    // A container sees only its GPUs (renumbered from 0): no CUDA_VISIBLE_DEVICES there.
    if assignment.gang.is_none() && !assignment.gpus.is_empty() && docker_image.is_none() {
        env.push(("CUDA_VISIBLE_DEVICES".to_string(), join(&assignment.gpus)));
    }
    // A process run of a root agent gets a user of its own (see `sandbox`).
    let run_user = match (&agent.config.run_users, &docker_image) {
        (Some(range), None) => {
            let user = crate::sandbox::claim(range, root, &agent.config.supervisor_program)
                .context("claim a user for the run")?;
            let home = root.join("home");
            std::fs::create_dir_all(&home).context("create the run's home directory")?;
            env.push(("HOME".to_string(), home.to_string_lossy().into_owned()));
            Some(user)
        }
        _ => None,
    };
    let checkpoint_dir = (assignment.checkpoint_interval_s > 0).then(|| root.join("checkpoint"));
    if let Some(dir) = &checkpoint_dir {
        std::fs::create_dir_all(dir).context("create the checkpoint directory")?;
        if !assignment.checkpoint_digest.is_empty() {
            let n_files =
                restore_checkpoint(agent, &assignment.checkpoint_digest, dir, &mut system)
                    .await
                    .context("could not restore the last checkpoint")?;
            system.line(&format!(
                "Checkpoint {} restored ({n_files} files).",
                short(&assignment.checkpoint_digest)
            ));
        }
        env.push((
            "KILN_CHECKPOINT_DIR".to_string(),
            dir.to_string_lossy().into_owned(),
        ));
    }
    let mut procs = Vec::new();
    let mut metrics_rank = None;
    let mut port_reservation = None;
    if let Some(gang) = &assignment.gang {
        let reservation = (gang.node_rank == 0)
            .then(|| reserve_port(agent))
            .transpose()
            .context("reserve a rendezvous port")?;
        let port = reservation
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| u32::from(a.port()));
        port_reservation = reservation;
        let launch = wait_for_launch(agent, assignment, gang, port, control, &mut system).await?;
        let hostfile = root.join("hostfile");
        let lines: String = launch
            .node_addresses
            .iter()
            .map(|address| format!("{address} slots={}\n", gang.procs_per_node.max(1)))
            .collect();
        std::fs::write(&hostfile, lines).context("write the hostfile")?;
        let (mut common, per_proc) = gang_env(gang, &launch, &hostfile, &assignment.gpus);
        // `env` is all the script will see (the agent's own variables only as `pass_env`
        // lets them through): set there is set for the script.
        let (defaults, note) =
            torchrun_defaults(gang, assignment.run_id, assignment.max_retries, |name| {
                env.iter().any(|(k, _)| k == name)
            });
        common.extend(defaults);
        if let Some(note) = note {
            system.line(&note);
        }
        env.extend(common);
        procs = per_proc;
        metrics_rank = Some(gang.node_rank * gang.procs_per_node.max(1));
    }
    let spec = Spec {
        env_clear: true,
        run_as: run_user,
        run_id: assignment.run_id,
        attempt: assignment.attempt,
        program,
        args,
        cwd: work,
        env,
        metrics_socket: socket,
        metrics_interval_ms: agent.config.metrics_interval.as_millis() as u64,
        max_retries: assignment.max_retries,
        checkpoint_dir,
        checkpoint_interval_ms: u64::from(assignment.checkpoint_interval_s) * 1000,
        procs,
        metrics_rank,
        fenceable: Some(assignment.fenceable),
        lease_file: Some(agent.lease_file()),
        timeout_s: assignment.timeout_s,
        gpus: assignment.gpus.clone(),
        docker: docker_image.map(|image| crate::docker::DockerSpec {
            image: image.image,
            host: agent.config.docker.host.clone(),
            agent_id: agent.agent_id.clone(),
            gpus: image.gpus,
            gpu_driver: image.gpu_driver,
            cpus: assignment.resources.map_or(0, |r| r.cpus),
            memory_bytes: assignment.resources.map_or(0, |r| r.memory_bytes),
            shm_size_bytes: environment_shm_size(assignment),
            user: crate::docker::container_user(),
            pids_limit: agent.config.docker.pids_limit,
            python_dir: agent.python_dir.clone(),
            network: agent.config.docker.network.clone(),
        }),
    };
    if let Some(docker) = &spec.docker {
        // The container's user (never root) writes outputs/ and checkpoints.
        let mut paths = vec![spec.cwd.as_path()];
        paths.extend(spec.checkpoint_dir.as_deref());
        crate::docker::hand_over(&paths, &docker.user)
            .context("give the run's directories to the container's user")?;
    }
    if let Some(user) = &spec.run_as {
        // The run's user owns its work, home and checkpoint directories, and nothing else:
        // `state/` (spec.json holds the run's environment) stays the agent's.
        let mut paths = vec![spec.cwd.clone(), root.join("home")];
        paths.extend(spec.checkpoint_dir.clone());
        let owner = user.owner();
        let state_dir = state.0.clone();
        let root_dir = root.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            crate::docker::hand_over(&refs, &owner)
                .context("give the run's directories to the run's user")?;
            for path in &paths {
                crate::sandbox::set_mode(path, 0o700)?;
            }
            crate::sandbox::set_mode(&state_dir, 0o700)?;
            crate::sandbox::set_mode(&root_dir, 0o711)
        })
        .await??;
    }
    spool::write_json(&state.spec(), &spec).context("write spec.json")?;
    anyhow::ensure!(
        !control.cancel.is_cancelled(),
        "cancelled before the run started"
    );
    // Node 0's script binds the port next.
    drop(port_reservation);
    start_supervisor(agent, state)
}

/// The run's Docker environment, if it asked for one.
fn docker_environment(assignment: &v1::Assignment) -> Option<&v1::DockerEnvironment> {
    match assignment.environment.as_ref()?.kind.as_ref()? {
        v1::environment::Kind::Docker(docker) => Some(docker),
        _ => None,
    }
}

fn environment_shm_size(assignment: &v1::Assignment) -> u64 {
    docker_environment(assignment).map_or(0, |docker| docker.shm_size_bytes)
}

/// Picks, checks and (if missing) pulls the run's image; the pull's progress goes into the
/// run's log.
async fn prepare_docker(
    agent: &Agent,
    assignment: &v1::Assignment,
    environment: &v1::DockerEnvironment,
    system: &mut SystemLines,
) -> Result<crate::docker::PreparedImage, crate::env::EnvError> {
    if assignment.gang.is_some() {
        return Err(crate::env::EnvError(
            "docker environments are not supported for distributed runs (--nodes or \
             --procs-per-node above 1) yet: use a user-managed environment"
                .into(),
        ));
    }
    let mut log = |line: &str| system.line(line);
    crate::docker::prepare(
        crate::docker::PrepareRequest {
            environment,
            allocated_gpus: &assignment.gpus,
            host_gpus: agent.host.gpus.len(),
            settings: &agent.config.docker,
        },
        &mut log,
    )
    .await
}

/// Binds a free port on this node's advertised address (any address when none is set) and
/// holds it until the gang launches, so that nothing else takes it meanwhile.
fn reserve_port(agent: &Agent) -> std::io::Result<std::net::TcpListener> {
    let ip: std::net::IpAddr = agent
        .config
        .advertise_address
        .as_deref()
        .and_then(|a| a.parse().ok())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    std::net::TcpListener::bind((ip, 0))
}

/// Tells the coordinator this node is ready (node 0: with its rendezvous port) and waits for
/// the whole gang to be: no process of a gang starts before every node has its snapshot.
async fn wait_for_launch(
    agent: &Agent,
    assignment: &v1::Assignment,
    gang: &v1::Gang,
    port: u32,
    control: &RunControl,
    system: &mut SystemLines,
) -> anyhow::Result<v1::Launch> {
    let ready = up(Up::RunEvent(v1::RunEvent {
        run_id: assignment.run_id,
        attempt: assignment.attempt,
        kind: Some(v1::run_event::Kind::Ready(v1::Ready { port })),
    }));
    system.line(&format!(
        "Node {} of {} ready; waiting for the other nodes of the gang.",
        gang.node_rank, gang.nodes
    ));
    let mut sessions = agent.session_generation.subscribe();
    sessions.mark_unchanged();
    let mut launch = control.launch.clone();
    let _ = agent.uplink.send(ready.clone()).await;
    loop {
        if let Some(launch) = launch.borrow_and_update().clone() {
            system.line(&format!(
                "Gang launched: MASTER_ADDR={} MASTER_PORT={} WORLD_SIZE={}",
                launch.master_addr,
                launch.master_port,
                gang.nodes * gang.procs_per_node.max(1)
            ));
            return Ok(launch);
        }
        tokio::select! {
            _ = control.cancel.cancelled() => anyhow::bail!("cancelled before the run started"),
            _ = control.detach.cancelled() => {
                anyhow::bail!("the agent stopped before the gang launched")
            }
            changed = launch.changed() => {
                anyhow::ensure!(changed.is_ok(), "the agent stopped before the gang launched");
            }
            changed = sessions.changed() => {
                // A new session (the coordinator may have restarted): say it again.
                if changed.is_ok() {
                    let _ = agent.uplink.send(ready.clone()).await;
                }
            }
        }
    }
}

/// The agent's environment variables a run inherits unless `pass_env` says otherwise.
pub const DEFAULT_PASS_ENV: [&str; 20] = [
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "NVIDIA_*",
    "HOME",
];

/// [`DEFAULT_PASS_ENV`], owned (the settings' default).
pub fn default_pass_env() -> Vec<String> {
    DEFAULT_PASS_ENV.map(String::from).to_vec()
}

/// The variables of `agent_env` that `pass_env` lets through (a name, or a prefix ending in
/// `*`), in name order; the agent's own `KILN_*` variables never (its coordinator, token,
/// settings). Not UTF-8: left out.
pub fn inherited_env(
    agent_env: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    pass_env: &[String],
) -> Vec<(String, String)> {
    let passes = |name: &str| {
        pass_env
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    };
    let mut env: Vec<(String, String)> = agent_env
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(name, _)| !name.starts_with("KILN_") && passes(name))
        .collect();
    env.sort();
    env
}

/// The environment `torchrun` would give each process, plus Kiln's own: variables shared by
/// the node's processes, and one [`spool::ProcSpec`] per process with its rank's.
fn gang_env(
    gang: &v1::Gang,
    launch: &v1::Launch,
    hostfile: &Path,
    allocated_gpus: &[u32],
) -> (Vec<(String, String)>, Vec<spool::ProcSpec>) {
    // This node's GPUs, in order (the coordinator's allocation); each local rank gets its
    // share.
    let gpus: Vec<u32> = if allocated_gpus.is_empty() {
        (0..gang.gpus_per_node).collect()
    } else {
        allocated_gpus.to_vec()
    };
    let nodes = gang.nodes.max(1);
    let per_node = gang.procs_per_node.max(1);
    let world = nodes * per_node;
    let var = |k: &str, v: String| (k.to_string(), v);
    let mut common = vec![
        var("MASTER_ADDR", launch.master_addr.clone()),
        var("MASTER_PORT", launch.master_port.to_string()),
        var("NODE_RANK", gang.node_rank.to_string()),
        var("GROUP_RANK", gang.node_rank.to_string()),
        var("GROUP_WORLD_SIZE", nodes.to_string()),
        var("KILN_NUM_NODES", nodes.to_string()),
        var("KILN_NODE_RANK", gang.node_rank.to_string()),
        var("KILN_NODES", launch.node_addresses.join(",")),
        var("KILN_HOSTFILE", hostfile.to_string_lossy().into_owned()),
        var("KILN_PROCS_PER_NODE", per_node.to_string()),
        var("KILN_GPUS_PER_NODE", gpus.len().to_string()),
        var("KILN_RESTART_COUNT", gang.restart_count.to_string()),
        var("TORCHELASTIC_RESTART_COUNT", gang.restart_count.to_string()),
    ];
    if gang.launcher == "none" {
        common.extend([
            var("PET_NNODES", nodes.to_string()),
            var("PET_NPROC_PER_NODE", per_node.to_string()),
            var("PET_NODE_RANK", gang.node_rank.to_string()),
            var("PET_MASTER_ADDR", launch.master_addr.clone()),
            var("PET_MASTER_PORT", launch.master_port.to_string()),
        ]);
        let mut env = Vec::new();
        if !gpus.is_empty() {
            env.push(var("CUDA_VISIBLE_DEVICES", join(&gpus)));
        }
        return (common, vec![spool::ProcSpec { rank: None, env }]);
    }
    common.extend([
        var("WORLD_SIZE", world.to_string()),
        var("LOCAL_WORLD_SIZE", per_node.to_string()),
        var("ROLE_WORLD_SIZE", world.to_string()),
        var("ROLE_NAME", "default".to_string()),
    ]);
    let procs = (0..per_node)
        .map(|local| {
            let rank = gang.node_rank * per_node + local;
            let mut env = vec![
                var("RANK", rank.to_string()),
                var("LOCAL_RANK", local.to_string()),
                var("ROLE_RANK", rank.to_string()),
                var("KILN_RANK", rank.to_string()),
                var("KILN_LOCAL_RANK", local.to_string()),
            ];
            if !gpus.is_empty() {
                env.push(var(
                    "CUDA_VISIBLE_DEVICES",
                    join(&gpus_of_local_rank(&gpus, local, per_node)),
                ));
            }
            spool::ProcSpec {
                rank: Some(rank),
                env,
            }
        })
        .collect();
    (common, procs)
}

/// What `torchrun` sets besides ranks and addresses, for Kiln's launcher (with `--launcher
/// none` the user's own torchrun does it): `OMP_NUM_THREADS=1` when a node runs several
/// processes and the run does not get it already (its `--env`, or the agent's through
/// `pass_env`) (torchrun's rule: N processes each spawning a thread per core oversubscribe
/// the CPUs; CPU DDP ran 1.9× slower without it),
/// said in the run's log; and the `TORCHELASTIC_*` variables scripts read to know they
/// run under an elastic launcher. Returns the variables and the line for the run's log.
fn torchrun_defaults(
    gang: &v1::Gang,
    run_id: i64,
    max_retries: u32,
    is_set: impl Fn(&str) -> bool,
) -> (Vec<(String, String)>, Option<String>) {
    if gang.launcher == "none" {
        return (Vec::new(), None);
    }
    let mut env = vec![
        ("TORCHELASTIC_RUN_ID".to_string(), run_id.to_string()),
        (
            "TORCHELASTIC_MAX_RESTARTS".to_string(),
            max_retries.to_string(),
        ),
        // No launcher-hosted store: rank 0 hosts it at MASTER_ADDR:MASTER_PORT.
        (
            "TORCHELASTIC_USE_AGENT_STORE".to_string(),
            "False".to_string(),
        ),
    ];
    let mut note = None;
    if gang.procs_per_node > 1 && !is_set("OMP_NUM_THREADS") {
        env.push(("OMP_NUM_THREADS".to_string(), "1".to_string()));
        note = Some(format!(
            "OMP_NUM_THREADS=1 for each of this node's {} processes (torchrun's default; \
             set it with --env OMP_NUM_THREADS=N to tune).",
            gang.procs_per_node
        ));
    }
    (env, note)
}

/// The GPUs local rank `local` of `per_node` gets: an equal share when they divide evenly,
/// else one each, round-robin.
fn gpus_of_local_rank(gpus: &[u32], local: u32, per_node: u32) -> Vec<u32> {
    let (n, p) = (gpus.len() as u32, per_node.max(1));
    if n >= p && n % p == 0 {
        let share = n / p;
        gpus[(local * share) as usize..((local + 1) * share) as usize].to_vec()
    } else {
        vec![gpus[(local % n) as usize]]
    }
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// How many supervisor logs `DATA_DIR/supervisor-logs/` keeps (the newest).
const KEPT_SUPERVISOR_LOGS: usize = 100;

/// Moves an attempt's `state/supervisor.log` (the supervisor's own errors; empty when all
/// went well) to `DATA_DIR/supervisor-logs/<run>.<attempt>.log` before the attempt's
/// directory is removed, so that an attempt that ended oddly ("the supervisor process is
/// gone") can still be diagnosed, and says where it went. Keeps the newest
/// [`KEPT_SUPERVISOR_LOGS`].
fn keep_supervisor_log(data_dir: &Path, root: &Path, run_id: i64, attempt: u32) {
    let log = root.join("state").join("supervisor.log");
    let Ok(text) = std::fs::read_to_string(&log) else {
        return;
    };
    if text.trim().is_empty() {
        return;
    }
    let dir = data_dir.join("supervisor-logs");
    let kept = dir.join(format!("{run_id}.{attempt}.log"));
    let moved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::rename(&log, &kept));
    let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
    match moved {
        Ok(()) => {
            warn!(run_id, attempt, log = %kept.display(), last_lines = %tail, "The run's supervisor reported errors; its log is kept.");
        }
        Err(error) => {
            warn!(run_id, attempt, error = %error, last_lines = %tail, "The run's supervisor reported errors; its log could not be kept.");
        }
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if logs.len() > KEPT_SUPERVISOR_LOGS {
        logs.sort();
        for (_, path) in &logs[..logs.len() - KEPT_SUPERVISOR_LOGS] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts the supervisor in its own process group; a task reaps it when it exits.
fn start_supervisor(agent: &Agent, state: &StateDir) -> anyhow::Result<()> {
    let log =
        std::fs::File::create(state.0.join("supervisor.log")).context("create supervisor.log")?;
    let mut child = tokio::process::Command::new(&agent.config.supervisor_program)
        .arg(crate::supervisor::SUBCOMMAND)
        .arg(&state.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| {
            format!(
                "start the run supervisor {}",
                agent.config.supervisor_program.display()
            )
        })?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

/// Follows an attempt's spool to its end and reports it. Used for new runs and for runs found
/// again after an agent restart.
pub(crate) async fn attach(
    agent: Arc<Agent>,
    run_id: i64,
    attempt: u32,
    root: PathBuf,
    mut control: RunControl,
    follower: Option<Follower>,
) {
    let state = StateDir(root.join("state"));
    let mut follower = follower.unwrap_or_else(|| Follower::new(&agent, run_id, attempt, &state));
    let mut sessions = agent.session_generation.subscribe();
    sessions.mark_changed();
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    let spec: Option<Spec> = spool::read_json(&state.spec()).ok().flatten();
    let docker = spec.as_ref().and_then(|spec| spec.docker.clone());
    follower.docker = docker.is_some();
    let mut checkpoints = Checkpoints::new(&agent, run_id, attempt, spec.as_ref());
    // The run's time limit counts from when it was set up (spec.json), so that it holds
    // across agent restarts.
    let deadline = spec
        .as_ref()
        .filter(|spec| spec.timeout_s > 0)
        .and_then(|spec| {
            let written = std::fs::metadata(state.spec()).ok()?.modified().ok()?;
            Some(written + Duration::from_secs(u64::from(spec.timeout_s)))
        });
    let mut timed_out = false;
    // The drain stopped the script (one that ended by itself first is reported as it ended).
    let mut drain_stopped = false;
    // The control loop: it reads the spool within the attempt's byte budget, sends when the
    // uplink has room, and enforces cancel, fencing, the time limit and stop escalation
    // whether or not the uplink has room (it never waits on a full queue).
    let mut ended: Option<Exit> = None;
    let exit = loop {
        checkpoints.maybe_start();
        // exit.json is written after the last record was spooled: once it exists, reading the
        // spool to its end has read everything.
        if ended.is_none() {
            ended = follower.exit();
        }
        let progressed = follower.read_spool();
        if let Some(exit) = &ended
            && follower.spool_read_to_end()
        {
            break exit.clone();
        }
        if ended.is_none() && !progressed {
            ended = follower.supervisor_vanished();
        }
        if stopping.is_none()
            && deadline.is_some_and(|deadline| std::time::SystemTime::now() >= deadline)
        {
            warn!("The run reached its time limit: stopping its processes.");
            follower.signal_group(Signal::SIGTERM);
            stopping = Some(Instant::now());
            timed_out = true;
        }
        if let Some(since) = stopping
            && !killed
            && since.elapsed() > STOP_GRACE
        {
            follower.signal_group(Signal::SIGKILL);
            killed = true;
        }
        let idle = if follower.more_to_read() {
            Duration::ZERO
        } else {
            POLL
        };
        tokio::select! {
            _ = control.detach.cancelled() => return,
            _ = control.cancel.cancelled(), if stopping.is_none() && ended.is_none() => {
                info!("Cancel: stopping the run's processes.");
                follower.signal_group(Signal::SIGTERM);
                stopping = Some(Instant::now());
            }
            _ = control.fence.cancelled(), if stopping.is_none() && ended.is_none() => {
                warn!("No coordinator for too long: fencing the attempt off, stopping its processes.");
                follower.signal_group(Signal::SIGTERM);
                stopping = Some(Instant::now());
            }
            _ = control.drain.cancelled(), if stopping.is_none() && ended.is_none() => {
                info!("Agent draining: stopping the run's processes; the run goes back to the queue.");
                follower.signal_group(Signal::SIGTERM);
                stopping = Some(Instant::now());
                drain_stopped = true;
            }
            changed = control.acks.changed() => {
                if changed.is_ok() {
                    follower.acknowledged(*control.acks.borrow_and_update());
                }
            }
            changed = sessions.changed() => {
                if changed.is_ok() {
                    follower.resend();
                }
            }
            permit = agent.uplink.reserve(), if follower.has_unsent() => {
                if let Ok(permit) = permit
                    && let Some(message) = follower.next_message()
                {
                    permit.send(message);
                }
            }
            _ = tokio::time::sleep(idle) => {}
        }
    };
    // The supervisor removes its container; if it died, nothing else would: remove what
    // is left of this attempt, by label.
    if let Some(docker) = &docker {
        match crate::docker::remove_run_containers(
            docker.host.as_deref(),
            &docker.agent_id,
            run_id,
            attempt,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => warn!(
                containers = n,
                "Removed containers the run's supervisor left."
            ),
            Err(error) => {
                warn!(error = %format!("{error:#}"), "Could not check for leftover containers.")
            }
        }
    }
    // The script has ended: its last checkpoint goes up before the run is reported.
    checkpoints.finish().await;
    let cancelled = control.cancel.is_cancelled();
    let fenced = (control.fence.is_cancelled() || exit.fenced) && !cancelled;
    // Drained: stopped by the drain, or not started because of it.
    let drained = (drain_stopped || (exit.start_error.is_some() && control.drain.is_cancelled()))
        && !cancelled
        && !fenced;

    // Every line and point must be stored before the run is reported as ended, so that a
    // follower that sees the end has seen everything: also for a cancelled or fenced
    // attempt (the coordinator stores a stale attempt's lines under its own attempt).
    // Only a coordinator that has no record of the attempt (discard) lets it go unsent.
    while !follower.all_acknowledged() && !control.acks.borrow().discard {
        tokio::select! {
            _ = control.detach.cancelled() => return,
            changed = control.acks.changed() => {
                if changed.is_ok() {
                    follower.acknowledged(*control.acks.borrow_and_update());
                }
            }
            changed = sessions.changed() => {
                if changed.is_ok() {
                    follower.resend();
                }
            }
            permit = agent.uplink.reserve(), if follower.has_unsent() => {
                if let Ok(permit) = permit
                    && let Some(message) = follower.next_message()
                {
                    permit.send(message);
                }
            }
        }
    }
    follower.persist_acks();

    let discard = control.acks.borrow().discard;
    if !discard {
        let finished = match spool::read_json::<FinishedRecord>(&state.finished()) {
            Ok(Some(record)) => record.into_wire(),
            _ => {
                let timeout = timed_out.then(|| spec.as_ref().map_or(0, |s| s.timeout_s));
                let outcome = Outcome {
                    cancelled,
                    fenced,
                    drained,
                    timed_out_after_s: timeout,
                };
                let Some(finished) = finish(&agent, &root, &exit, outcome, &control).await else {
                    // The agent is stopping: the next agent process finishes the upload.
                    return;
                };
                if let Err(error) =
                    spool::write_json(&state.finished(), &FinishedRecord::from_wire(&finished))
                {
                    warn!(error = %error, "Could not persist the final report.");
                }
                finished
            }
        };
        info!(status = ?finished.status(), exit_code = ?finished.exit_code, lost = finished.lost, fenced = finished.fenced, drained = finished.drained, "Run ended; reporting.");
        let report = up(Up::RunEvent(v1::RunEvent {
            run_id,
            attempt,
            kind: Some(v1::run_event::Kind::Finished(finished)),
        }));
        let mut unsent = true;
        loop {
            let state = *control.acks.borrow();
            if state.finished || state.discard {
                break;
            }
            tokio::select! {
                _ = control.detach.cancelled() => return,
                changed = control.acks.changed() => { if changed.is_err() { break; } }
                changed = sessions.changed() => {
                    if changed.is_ok() {
                        unsent = true;
                    }
                }
                permit = agent.uplink.reserve(), if unsent => {
                    if let Ok(permit) = permit {
                        permit.send(report.clone());
                        unsent = false;
                    }
                }
            }
        }
    }
    // Removing a big run directory is slow file I/O: off the async workers.
    let data_dir = agent.config.data_dir.clone();
    let removed = tokio::task::spawn_blocking(move || {
        remove_attempt(&data_dir, &root, run_id, attempt);
    });
    let _ = removed.await;
}

/// Removes what an attempt left on disk once it is over: its metrics socket, its claim on
/// a run user, and its directory (keeping the supervisor's log if it says anything).
pub(crate) fn remove_attempt(data_dir: &Path, root: &Path, run_id: i64, attempt: u32) {
    let _ = std::fs::remove_file(
        data_dir
            .join("sock")
            .join(format!("{run_id}.{attempt}.sock")),
    );
    let run_as = spool::read_json::<Spec>(&spool::StateDir(root.join("state")).spec())
        .ok()
        .flatten()
        .and_then(|spec| spec.run_as);
    if let Some(user) = run_as {
        crate::sandbox::release(user, root);
    }
    keep_supervisor_log(data_dir, root, run_id, attempt);
    if let Err(error) = std::fs::remove_dir_all(root)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        warn!(error = %error, "Could not remove the run directory.");
    }
}

/// How the agent ended an attempt, besides the script's own exit.
struct Outcome {
    cancelled: bool,
    fenced: bool,
    drained: bool,
    timed_out_after_s: Option<u32>,
}

/// The final report for an attempt whose script has ended (or never started). Uploads the
/// outputs first, retrying until they are stored or refused for good (see
/// [`upload_outputs`]); `None` when the agent is stopping meanwhile.
async fn finish(
    agent: &Agent,
    root: &Path,
    exit: &Exit,
    outcome: Outcome,
    control: &RunControl,
) -> Option<v1::Finished> {
    let outputs = root.join("work/outputs");
    // A symlink in outputs/'s place is packed too, to be refused with a reason the user sees.
    let present = std::fs::symlink_metadata(&outputs).is_ok_and(|m| m.is_dir() || m.is_symlink());
    let (outputs_digest, outputs_error) = if exit.start_error.is_none() && present {
        match upload_outputs(agent, &outputs, control).await {
            Uploaded::Stored(digest) => (digest, String::new()),
            Uploaded::Refused(reason) => {
                warn!(reason = %reason, "The run's outputs were refused.");
                (String::new(), reason)
            }
            Uploaded::Detached => return None,
        }
    } else {
        (String::new(), String::new())
    };
    let (status, message) = if outcome.cancelled {
        (v1::RunStatus::Cancelled, "cancelled by user".to_string())
    } else if outcome.fenced {
        (
            v1::RunStatus::Failed,
            "fenced: the agent lost the coordinator for too long and stopped the attempt"
                .to_string(),
        )
    } else if outcome.drained {
        (
            v1::RunStatus::Failed,
            "drained: the agent was taken out of service (kiln-agent drain) and stopped the \
             attempt; the run is queued again"
                .to_string(),
        )
    } else if let Some(limit) = outcome.timed_out_after_s {
        (
            v1::RunStatus::Failed,
            format!("timed out: the run exceeded its time limit of {limit}s and was stopped"),
        )
    } else if let Some(error) = &exit.start_error {
        (v1::RunStatus::Failed, error.clone())
    } else if exit.exit_code == Some(0) {
        (v1::RunStatus::Succeeded, String::new())
    } else {
        (v1::RunStatus::Failed, exit.description.clone())
    };
    Some(v1::Finished {
        status: status as i32,
        exit_code: exit.exit_code,
        message,
        outputs_digest,
        fenced: outcome.fenced,
        drained: outcome.drained,
        failed_rank: exit.failed_rank,
        env_failed: exit.env_failed,
        lost: exit.lost && !outcome.cancelled,
        outputs_error,
    })
}

/// How an outputs upload ended.
enum Uploaded {
    Stored(String),
    /// Refused for good (too large for the coordinator, unreadable): the reason, for the
    /// run's message and `kiln download`.
    Refused(String),
    /// The agent is stopping: the next agent process uploads them.
    Detached,
}

/// How many entries left out of a packed directory are logged one by one.
const MAX_SKIPPED_LOGGED: usize = 10;

/// First and longest wait between outputs upload tries.
const UPLOAD_RETRY_FIRST: Duration = Duration::from_millis(500);
const UPLOAD_RETRY_MAX: Duration = Duration::from_secs(30);

/// Uploads `outputs/`, retrying with backoff across coordinator restarts, broken streams
/// and full disks (each try packs and uploads again from the start; the coordinator keeps
/// only a blob whose bytes hashed to its digest). Gives up only on a refusal that a retry
/// cannot change, or when the attempt is cancelled meanwhile.
async fn upload_outputs(agent: &Agent, outputs: &Path, control: &RunControl) -> Uploaded {
    let mut wait = UPLOAD_RETRY_FIRST;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let attempt = upload_dir(agent, outputs);
        let result = tokio::select! {
            _ = control.detach.cancelled() => return Uploaded::Detached,
            result = attempt => result,
        };
        match result {
            Ok(digest) => {
                if tries > 1 {
                    info!(tries, "Outputs uploaded.");
                }
                return Uploaded::Stored(digest);
            }
            Err(error) => {
                if let Some(reason) = permanent_refusal(&error) {
                    return Uploaded::Refused(reason);
                }
                if control.cancel.is_cancelled() && tries > 1 {
                    return Uploaded::Refused(format!(
                        "the run was cancelled while its outputs were being uploaded ({})",
                        error_text(&error)
                    ));
                }
                warn!(error = %error_text(&error), tries, retry_in_ms = wait.as_millis() as u64, "Outputs upload failed; retrying.");
                tokio::select! {
                    _ = control.detach.cancelled() => return Uploaded::Detached,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(UPLOAD_RETRY_MAX);
            }
        }
    }
}

fn error_text(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

/// The reason to give up, when a retry cannot help: the coordinator refused the blob
/// itself (too large, invalid), or the directory cannot be packed safely (it is a symlink,
/// or changed into one while it was read). Transport errors, an unavailable coordinator and
/// full disks (on either side) are worth another try.
fn permanent_refusal(error: &anyhow::Error) -> Option<String> {
    match error
        .chain()
        .find_map(|e| e.downcast_ref::<SnapshotError>())
    {
        Some(SnapshotError::NotADirectory(path)) => {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            return Some(format!(
                "{name}/ is a symlink or not a directory; it must be a real directory, and symlinks \
                 are never followed"
            ));
        }
        Some(refused @ (SnapshotError::Unsafe { .. } | SnapshotError::NonUtf8Path(_))) => {
            return Some(refused.to_string());
        }
        _ => {}
    }
    let status = error
        .chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())?;
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::ResourceExhausted
        | tonic::Code::FailedPrecondition
        | tonic::Code::OutOfRange
        | tonic::Code::PermissionDenied => Some(status.message().to_string()),
        _ => None,
    }
}

/// `finished.json`: the final report as the agent first computed it, so that a restarted
/// agent reports the same outcome and outputs.
#[derive(serde::Serialize, serde::Deserialize)]
struct FinishedRecord {
    status: i32,
    exit_code: Option<i32>,
    message: String,
    outputs_digest: String,
    #[serde(default)]
    fenced: bool,
    #[serde(default)]
    failed_rank: Option<u32>,
    #[serde(default)]
    env_failed: bool,
    #[serde(default)]
    lost: bool,
    #[serde(default)]
    outputs_error: String,
    #[serde(default)]
    drained: bool,
}

impl FinishedRecord {
    fn from_wire(f: &v1::Finished) -> Self {
        FinishedRecord {
            status: f.status,
            exit_code: f.exit_code,
            message: f.message.clone(),
            outputs_digest: f.outputs_digest.clone(),
            fenced: f.fenced,
            failed_rank: f.failed_rank,
            env_failed: f.env_failed,
            lost: f.lost,
            outputs_error: f.outputs_error.clone(),
            drained: f.drained,
        }
    }
    fn into_wire(self) -> v1::Finished {
        v1::Finished {
            status: self.status,
            exit_code: self.exit_code,
            message: self.message,
            outputs_digest: self.outputs_digest,
            fenced: self.fenced,
            failed_rank: self.failed_rank,
            env_failed: self.env_failed,
            lost: self.lost,
            outputs_error: self.outputs_error,
            drained: self.drained,
        }
    }
}

/// Uploads an attempt's checkpoint directory every interval (one upload at a time) and once
/// more when the script has ended.
struct Checkpoints {
    agent: Arc<Agent>,
    run_id: i64,
    attempt: u32,
    dir: Option<PathBuf>,
    interval: Duration,
    next: Instant,
    last: Option<String>,
    running: Option<tokio::task::JoinHandle<anyhow::Result<Option<String>>>>,
}

impl Checkpoints {
    fn new(agent: &Arc<Agent>, run_id: i64, attempt: u32, spec: Option<&Spec>) -> Checkpoints {
        let interval = Duration::from_millis(spec.map_or(0, |s| s.checkpoint_interval_ms));
        Checkpoints {
            agent: agent.clone(),
            run_id,
            attempt,
            dir: spec.and_then(|s| s.checkpoint_dir.clone()),
            interval,
            next: Instant::now() + interval,
            last: None,
            running: None,
        }
    }

    fn maybe_start(&mut self) {
        let Some(dir) = self.dir.clone() else { return };
        if let Some(running) = &self.running {
            if !running.is_finished() {
                return;
            }
            let running = self.running.take().expect("checked above");
            self.record(futures::FutureExt::now_or_never(running));
        }
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + self.interval;
        let task = upload_checkpoint(
            self.agent.clone(),
            self.run_id,
            self.attempt,
            dir,
            self.last.clone(),
        );
        self.running = Some(tokio::spawn(task));
    }

    fn record(
        &mut self,
        result: Option<Result<anyhow::Result<Option<String>>, tokio::task::JoinError>>,
    ) {
        match result {
            Some(Ok(Ok(Some(digest)))) => {
                info!(digest = %digest, "Checkpoint uploaded.");
                self.last = Some(digest);
            }
            Some(Ok(Err(error))) => {
                warn!(error = %format!("{error:#}"), "Checkpoint upload failed.")
            }
            _ => {}
        }
    }

    async fn finish(&mut self) {
        let Some(dir) = self.dir.clone() else { return };
        if let Some(running) = self.running.take() {
            self.record(Some(running.await));
        }
        let result = upload_checkpoint(
            self.agent.clone(),
            self.run_id,
            self.attempt,
            dir,
            self.last.clone(),
        )
        .await;
        self.record(Some(Ok(result)));
    }
}

/// Reads one attempt's spool and keeps what is not yet acknowledged, within
/// [`MAX_UNACKED_BYTES`]; hands out batches of at most [`MAX_BATCH_BYTES`] to send.
pub(crate) struct Follower {
    run_id: i64,
    attempt: u32,
    state: StateDir,
    logs: spool::Tail,
    metrics: spool::Tail,
    acked: Acked,
    acked_persisted: Acked,
    acked_persisted_at: Instant,
    unacked_logs: VecDeque<v1::LogLine>,
    unacked_metrics: VecDeque<v1::MetricPoint>,
    /// The approximate wire size of everything unacknowledged.
    unacked_bytes: usize,
    /// How many of the unacknowledged items have been sent on the current session.
    sent_logs: usize,
    sent_metrics: usize,
    child: Option<ProcessRecord>,
    started_sent: bool,
    /// A Docker run: its supervisor, not a process group, is signalled.
    docker: bool,
}

/// Approximate encoded size of a log line (its text plus the fields around it).
fn line_bytes(line: &v1::LogLine) -> usize {
    line.text.len() + 32
}

fn point_bytes(point: &v1::MetricPoint) -> usize {
    point.name.len() + 48
}

impl Follower {
    fn new(agent: &Arc<Agent>, run_id: i64, attempt: u32, state: &StateDir) -> Follower {
        let _ = agent;
        let acked = spool::read_json::<Acked>(&state.acked())
            .ok()
            .flatten()
            .unwrap_or_default();
        Follower {
            run_id,
            attempt,
            state: state.clone(),
            logs: spool::Tail::new(state.logs()),
            metrics: spool::Tail::new(state.metrics()),
            acked,
            acked_persisted: acked,
            acked_persisted_at: Instant::now(),
            unacked_logs: VecDeque::new(),
            unacked_metrics: VecDeque::new(),
            unacked_bytes: 0,
            sent_logs: 0,
            sent_metrics: 0,
            child: None,
            started_sent: false,
            docker: false,
        }
    }

    /// Reads new spool records while the attempt's byte budget allows; returns whether
    /// anything new was read. Back-pressure: with the budget spent, nothing is read until
    /// acknowledgements free it (the records wait in the spool file, nothing is dropped).
    fn read_spool(&mut self) -> bool {
        let mut progressed = false;
        let budget = MAX_UNACKED_BYTES.saturating_sub(self.unacked_bytes);
        if budget < MAX_LINE_RECORD_BYTES {
            self.logs.unknown_end();
            self.metrics.unknown_end();
        } else {
            let chunk = budget.min(MAX_READ_BYTES);
            match self.logs.read::<LogRecord>(chunk) {
                Ok(records) => {
                    progressed |= !records.is_empty();
                    let acked = self.acked.log_seq;
                    for r in records.into_iter().filter(|r| r.seq > acked) {
                        let line = v1::LogLine {
                            seq: r.seq,
                            stream: r.stream,
                            text: r.text,
                            time_unix_ms: r.time_ms,
                            cursor: 0,
                            attempt: self.attempt,
                            rank: r.rank,
                            node: 0,
                        };
                        self.unacked_bytes += line_bytes(&line);
                        self.unacked_logs.push_back(line);
                    }
                }
                Err(error) => {
                    self.logs.unknown_end();
                    warn!(error = %error, "Could not read the log spool.");
                }
            }
            let budget = MAX_UNACKED_BYTES.saturating_sub(self.unacked_bytes);
            if budget < MAX_LINE_RECORD_BYTES {
                self.metrics.unknown_end();
            } else {
                match self
                    .metrics
                    .read::<MetricRecord>(budget.min(MAX_READ_BYTES))
                {
                    Ok(records) => {
                        progressed |= !records.is_empty();
                        let acked = self.acked.metric_seq;
                        for r in records.into_iter().filter(|r| r.seq > acked) {
                            let point = v1::MetricPoint {
                                seq: r.seq,
                                name: r.name,
                                value: r.value,
                                step: r.step,
                                time_unix_ms: r.time_ms,
                                rank: r.rank,
                                cursor: 0,
                            };
                            self.unacked_bytes += point_bytes(&point);
                            self.unacked_metrics.push_back(point);
                        }
                    }
                    Err(error) => {
                        self.metrics.unknown_end();
                        warn!(error = %error, "Could not read the metric spool.");
                    }
                }
            }
        }
        if self.child.is_none() {
            self.child = spool::read_json(&self.state.child()).ok().flatten();
        }
        progressed
    }

    /// Whether the last read reached the end of both spool files.
    fn spool_read_to_end(&self) -> bool {
        self.logs.at_end() && self.metrics.at_end()
    }

    /// Whether more of the spool could be read right now (the last read stopped at its size
    /// cap, not at the end, and the budget has room).
    fn more_to_read(&self) -> bool {
        !self.spool_read_to_end()
            && MAX_UNACKED_BYTES.saturating_sub(self.unacked_bytes) >= MAX_LINE_RECORD_BYTES
    }

    /// Whether something waits to be sent on this session.
    fn has_unsent(&self) -> bool {
        (!self.started_sent && self.child.is_some())
            || self.sent_logs < self.unacked_logs.len()
            || self.sent_metrics < self.unacked_metrics.len()
    }

    /// The next message to send on this session (`Started`, then log batches, then metric
    /// batches), each at most [`MAX_BATCH_BYTES`]; marks it sent.
    fn next_message(&mut self) -> Option<v1::AgentMessage> {
        if !self.started_sent
            && let Some(child) = &self.child
        {
            self.started_sent = true;
            return Some(up(Up::RunEvent(v1::RunEvent {
                run_id: self.run_id,
                attempt: self.attempt,
                kind: Some(v1::run_event::Kind::Started(v1::Started {
                    pid: child.pid as u32,
                })),
            })));
        }
        if self.sent_logs < self.unacked_logs.len() {
            let (mut end, mut bytes) = (self.sent_logs, 0);
            while end < self.unacked_logs.len()
                && (end == self.sent_logs
                    || bytes + line_bytes(&self.unacked_logs[end]) <= MAX_BATCH_BYTES)
            {
                bytes += line_bytes(&self.unacked_logs[end]);
                end += 1;
            }
            let lines = self
                .unacked_logs
                .range(self.sent_logs..end)
                .cloned()
                .collect();
            self.sent_logs = end;
            return Some(up(Up::Logs(v1::LogBatch {
                run_id: self.run_id,
                attempt: self.attempt,
                lines,
            })));
        }
        if self.sent_metrics < self.unacked_metrics.len() {
            let (mut end, mut bytes) = (self.sent_metrics, 0);
            while end < self.unacked_metrics.len()
                && (end == self.sent_metrics
                    || bytes + point_bytes(&self.unacked_metrics[end]) <= MAX_BATCH_BYTES)
            {
                bytes += point_bytes(&self.unacked_metrics[end]);
                end += 1;
            }
            let points = self
                .unacked_metrics
                .range(self.sent_metrics..end)
                .cloned()
                .collect();
            self.sent_metrics = end;
            return Some(up(Up::Metrics(v1::MetricBatch {
                run_id: self.run_id,
                attempt: self.attempt,
                points,
            })));
        }
        None
    }

    /// A new session: everything unacknowledged goes again (the coordinator ignores repeats).
    fn resend(&mut self) {
        self.sent_logs = 0;
        self.sent_metrics = 0;
        self.started_sent = false;
    }

    fn acknowledged(&mut self, ack: AckState) {
        self.acked.log_seq = self.acked.log_seq.max(ack.log_seq);
        self.acked.metric_seq = self.acked.metric_seq.max(ack.metric_seq);
        while let Some(line) = self.unacked_logs.front()
            && line.seq <= self.acked.log_seq
        {
            self.unacked_bytes -= line_bytes(line);
            self.unacked_logs.pop_front();
            self.sent_logs = self.sent_logs.saturating_sub(1);
        }
        while let Some(point) = self.unacked_metrics.front()
            && point.seq <= self.acked.metric_seq
        {
            self.unacked_bytes -= point_bytes(point);
            self.unacked_metrics.pop_front();
            self.sent_metrics = self.sent_metrics.saturating_sub(1);
        }
        if self.acked_persisted_at.elapsed() > Duration::from_secs(1) {
            self.persist_acks();
        }
    }

    fn persist_acks(&mut self) {
        if self.acked != self.acked_persisted {
            if let Err(error) = spool::write_json(&self.state.acked(), &self.acked) {
                warn!(error = %error, "Could not persist acknowledgements.");
            }
            self.acked_persisted = self.acked;
        }
        self.acked_persisted_at = Instant::now();
    }

    /// Everything read from the spool is acknowledged (call once the spool was read to its
    /// end after the exit).
    fn all_acknowledged(&self) -> bool {
        self.unacked_logs.is_empty() && self.unacked_metrics.is_empty()
    }

    fn exit(&self) -> Option<Exit> {
        spool::read_json(&self.state.exit()).ok().flatten()
    }

    /// An `Exit` when the supervisor is gone without writing one (killed, or the machine
    /// rebooted): the script cannot be followed any more.
    fn supervisor_vanished(&self) -> Option<Exit> {
        let record: ProcessRecord = match spool::read_json(&self.state.supervisor()) {
            Ok(Some(record)) => record,
            // Not written yet: the supervisor is starting.
            _ => return None,
        };
        let alive = record.alive();
        if alive {
            return None;
        }
        // It may have written exit.json just before exiting.
        if let Some(exit) = self.exit() {
            return Some(exit);
        }
        // A Docker run's container is removed by `attach` (by its labels).
        if let Some(child) = &self.child
            && child.boot_id == spool::boot_id()
            && !self.docker
        {
            let _ = killpg(Pid::from_raw(child.pid), Signal::SIGKILL);
        }
        let message = if self.docker {
            "the run's supervisor process is gone (killed, or the machine restarted); its \
             container was stopped and removed"
                .to_string()
        } else {
            "the run's supervisor process is gone (killed, or the machine restarted)".to_string()
        };
        Some(Exit {
            exit_code: None,
            description: message.clone(),
            start_error: Some(message),
            failed_rank: None,
            env_failed: false,
            lost: true,
            ..Default::default()
        })
    }

    fn signal_group(&self, signal: Signal) {
        if self.docker {
            // The supervisor stops the container on SIGTERM (Docker sends SIGKILL after the
            // grace period); killing the supervisor would leave the container running.
            if signal == Signal::SIGTERM
                && let Ok(Some(supervisor)) =
                    spool::read_json::<ProcessRecord>(&self.state.supervisor())
                && supervisor.boot_id == spool::boot_id()
            {
                let _ = nix::sys::signal::kill(Pid::from_raw(supervisor.pid), signal);
            }
            return;
        }
        if let Some(child) = &self.child {
            let _ = killpg(Pid::from_raw(child.pid), signal);
        }
    }
}

fn command_line(
    python: &Path,
    assignment: &v1::Assignment,
    script: &Path,
) -> anyhow::Result<(PathBuf, Vec<String>)> {
    use std::os::unix::fs::PermissionsExt as _;
    if assignment.script.ends_with(".py") {
        let mut args = vec![assignment.script.clone()];
        args.extend(assignment.args.iter().cloned());
        return Ok((python.to_path_buf(), args));
    }
    let mode = std::fs::metadata(script)?.permissions().mode();
    anyhow::ensure!(
        mode & 0o111 != 0,
        "script `{}` is neither a .py file nor executable: `chmod +x {}` before submitting",
        assignment.script,
        assignment.script
    );
    Ok((script.to_path_buf(), assignment.args.clone()))
}

fn python_path(kiln_module_dir: &Path) -> String {
    let mut paths = vec![kiln_module_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths)
        .unwrap_or_else(|_| kiln_module_dir.as_os_str().to_owned())
        .to_string_lossy()
        .into_owned()
}

// ---- snapshot ----

/// The snapshot archive in the local cache, downloading it first if needed.
async fn fetch_snapshot(
    agent: &Agent,
    digest: &str,
    system: &mut SystemLines,
) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        snapshot::is_valid_digest(digest),
        "invalid snapshot digest `{digest}`"
    );
    let hex = &digest[DIGEST_PREFIX.len()..];
    let cached = agent
        .config
        .data_dir
        .join("snapshots")
        .join(format!("{hex}.tar.zst"));
    if cached.is_file() {
        // Verified at every use: a damaged archive (bit rot, a half-written copy, a careless
        // hand) must cost one download, not fail every later run of this snapshot here.
        let path = cached.clone();
        let actual = tokio::task::spawn_blocking(move || snapshot::digest_file(&path)).await?;
        match actual {
            Ok(actual) if actual == digest => {
                system.line(&format!(
                    "Snapshot {} found in the agent's cache.",
                    short(digest)
                ));
                return Ok(cached);
            }
            Ok(_) | Err(_) => {
                warn!(path = %cached.display(), "Cached snapshot is damaged; fetching it again.");
                system.line(&format!(
                    "Snapshot {} in the agent's cache is damaged (it no longer hashes to its digest); fetching it again.",
                    short(digest)
                ));
                let path = cached.clone();
                tokio::task::spawn_blocking(move || std::fs::remove_file(path))
                    .await?
                    .with_context(|| format!("remove the damaged {}", cached.display()))?;
            }
        }
    }
    let (temp, bytes) =
        download_blob(agent, digest, "Snapshot", &mut |line| system.line(line)).await?;
    temp.persist(&cached).map_err(|e| e.error)?;
    system.line(&format!(
        "Snapshot {} fetched ({bytes} bytes).",
        short(digest)
    ));
    Ok(cached)
}

/// How many times a blob download is tried before the run fails, and the first wait
/// between tries (doubling: 0.5 + 1 + 2 + 4 + 8 s, enough for a coordinator restart).
const DOWNLOAD_TRIES: u32 = 6;
const DOWNLOAD_RETRY_FIRST: Duration = Duration::from_millis(500);

use kiln_proto::transfer::{TransferFailure, failure as transfer_failure};

/// Downloads a blob into a temporary file and checks that it hashes to its digest, trying
/// again with backoff when the transfer broke (a coordinator restart, a reset connection,
/// bytes that do not hash to the digest); each retry is said in the run's log through
/// `say`. `what` names the blob there ("Snapshot", "Checkpoint").
async fn download_blob(
    agent: &Agent,
    digest: &str,
    what: &str,
    say: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<(tempfile::NamedTempFile, u64)> {
    let mut wait = DOWNLOAD_RETRY_FIRST;
    let mut tries = 0;
    loop {
        tries += 1;
        let error = match download_blob_once(agent, digest).await {
            Ok(downloaded) => return Ok(downloaded),
            Err(error) => error,
        };
        let transient = error
            .chain()
            .find_map(|e| e.downcast_ref::<TransferFailure>())
            .is_none_or(|failure| failure.transient);
        if !transient || tries >= DOWNLOAD_TRIES {
            return Err(error.context(format!(
                "{what} {} could not be downloaded (try {tries} of {DOWNLOAD_TRIES})",
                short(digest)
            )));
        }
        say(&format!(
            "{what} {} download failed: {error:#}; trying again in {:.1}s (try {} of {DOWNLOAD_TRIES}).",
            short(digest),
            wait.as_secs_f64(),
            tries + 1
        ));
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}

/// One try of [`download_blob`].
async fn download_blob_once(
    agent: &Agent,
    digest: &str,
) -> anyhow::Result<(tempfile::NamedTempFile, u64)> {
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel, kiln_proto::Bearer::none());
    let mut stream = client
        .download_blob(v1::DownloadBlobRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|s| transfer_failure(&s))?
        .into_inner();
    let mut file = tokio::fs::File::from_std(temp.reopen()?);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| transfer_failure(&s))?;
        bytes += chunk.data.len() as u64;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.data).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    drop(file);
    let path = temp.path().to_path_buf();
    let actual = tokio::task::spawn_blocking(move || snapshot::digest_file(&path)).await??;
    if actual != digest {
        return Err(TransferFailure {
            words: format!(
                "the bytes received hash to {actual}, not to {digest} (damaged in transit)"
            ),
            transient: true,
        }
        .into());
    }
    Ok((temp, bytes))
}

/// Restores a checkpoint blob into `dir` (empty).
async fn restore_checkpoint(
    agent: &Agent,
    digest: &str,
    dir: &Path,
    system: &mut SystemLines,
) -> anyhow::Result<u64> {
    let (archive, _) =
        download_blob(agent, digest, "Checkpoint", &mut |line| system.line(line)).await?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut file = std::io::BufReader::new(std::fs::File::open(archive.path())?);
        Ok(snapshot::unpack(&mut file, &dir, &UnpackLimits::default())?.n_files)
    })
    .await?
}

/// Packs `dir` and, if it differs from `last`, uploads it and tells the coordinator.
/// Returns the new digest.
async fn upload_checkpoint(
    agent: Arc<Agent>,
    run_id: i64,
    attempt: u32,
    dir: PathBuf,
    last: Option<String>,
) -> anyhow::Result<Option<String>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let digest = upload_dir(&agent, &dir)
        .await
        .context("upload the checkpoint")?;
    if last.as_deref() == Some(digest.as_str()) {
        return Ok(None);
    }
    let event = up(Up::RunEvent(v1::RunEvent {
        run_id,
        attempt,
        kind: Some(v1::run_event::Kind::Checkpointed(v1::Checkpointed {
            digest: digest.clone(),
        })),
    }));
    let _ = agent.uplink.send(event).await;
    Ok(Some(digest))
}

fn short(digest: &str) -> &str {
    let end = (DIGEST_PREFIX.len() + 12).min(digest.len());
    &digest[..end]
}

async fn unpack(archive: &Path, work: &Path) -> anyhow::Result<()> {
    let archive = archive.to_path_buf();
    let work = work.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::create_dir_all(&work)?;
        let mut file = std::io::BufReader::new(std::fs::File::open(&archive)?);
        snapshot::unpack(&mut file, &work, &UnpackLimits::default())?;
        Ok(())
    })
    .await?
}

/// Packs a directory the run's script wrote (no ignore rules, nothing outside it: see
/// [`snapshot::pack_untrusted_dir`]) and uploads it unless the coordinator has it.
async fn upload_dir(agent: &Agent, outputs: &Path) -> anyhow::Result<String> {
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let (dir, dest) = (outputs.to_path_buf(), temp.path().to_path_buf());
    let untrusted = tokio::task::spawn_blocking(move || {
        snapshot::pack_untrusted_dir(&dir, PackOptions::default().level, &dest)
    })
    .await??;
    for skipped in untrusted.skipped.iter().take(MAX_SKIPPED_LOGGED) {
        warn!(dir = %outputs.display(), entry = %skipped, "Left out of the packed directory.");
    }
    if untrusted.skipped.len() > MAX_SKIPPED_LOGGED {
        warn!(dir = %outputs.display(), n_more = untrusted.skipped.len() - MAX_SKIPPED_LOGGED, "More entries were left out of the packed directory.");
    }
    let packed = untrusted.packed;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel.clone(), kiln_proto::Bearer::none());
    let present = client
        .has_blob(v1::HasBlobRequest {
            digest: packed.digest.clone(),
        })
        .await?
        .into_inner()
        .present;
    if !present {
        let chunks =
            kiln_proto::blob_chunks(temp.path(), &packed.digest, packed.compressed_bytes).await?;
        client.upload_blob(chunks).await.context("upload outputs")?;
    }
    Ok(packed.digest)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_supervisors_error_log_outlives_its_attempt_and_only_the_newest_are_kept() {
        let data = tempfile::tempdir().unwrap();
        let attempt_dir = |run: i64| {
            let root = data.path().join(format!("runs/{run}.1"));
            std::fs::create_dir_all(root.join("state")).unwrap();
            root
        };
        // A quiet supervisor leaves nothing.
        let root = attempt_dir(1);
        std::fs::write(root.join("state/supervisor.log"), "").unwrap();
        remove_attempt(data.path(), &root, 1, 1);
        assert!(!root.exists());
        assert!(!data.path().join("supervisor-logs/1.1.log").exists());
        // One that said something is kept under the attempt's name.
        let root = attempt_dir(2);
        std::fs::write(
            root.join("state/supervisor.log"),
            "kiln supervisor: open logs.spool: No space left on device\n",
        )
        .unwrap();
        remove_attempt(data.path(), &root, 2, 1);
        assert!(!root.exists());
        let kept = std::fs::read_to_string(data.path().join("supervisor-logs/2.1.log")).unwrap();
        assert!(kept.contains("No space left"), "{kept}");
        for run in 3..(KEPT_SUPERVISOR_LOGS as i64 + 10) {
            let root = attempt_dir(run);
            std::fs::write(root.join("state/supervisor.log"), "error\n").unwrap();
            remove_attempt(data.path(), &root, run, 1);
        }
        let kept = std::fs::read_dir(data.path().join("supervisor-logs"))
            .unwrap()
            .count();
        assert_eq!(kept, KEPT_SUPERVISOR_LOGS);
    }

    fn env_of(pairs: &[(String, String)], key: &str) -> Option<String> {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn launch() -> v1::Launch {
        v1::Launch {
            run_id: 7,
            attempt: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29511,
            node_addresses: vec!["10.0.0.1".into(), "10.0.0.2".into()],
        }
    }

    #[test]
    fn every_process_gets_torchruns_variables_and_its_own_gpus() {
        let gang = v1::Gang {
            nodes: 2,
            node_rank: 1,
            procs_per_node: 4,
            launcher: "kiln".into(),
            restart_count: 2,
            gpus_per_node: 8,
            restartable: true,
        };
        let (common, procs) = gang_env(&gang, &launch(), Path::new("/r/hostfile"), &[]);
        for (key, value) in [
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29511"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("NODE_RANK", "1"),
            ("GROUP_RANK", "1"),
            ("KILN_NUM_NODES", "2"),
            ("KILN_NODES", "10.0.0.1,10.0.0.2"),
            ("KILN_HOSTFILE", "/r/hostfile"),
            ("KILN_GPUS_PER_NODE", "8"),
            ("KILN_RESTART_COUNT", "2"),
        ] {
            assert_eq!(env_of(&common, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(env_of(&common, "PET_NNODES"), None);
        let ranks: Vec<_> = procs.iter().map(|p| p.rank).collect();
        assert_eq!(ranks, [Some(4), Some(5), Some(6), Some(7)]);
        let last = &procs[3].env;
        assert_eq!(env_of(last, "RANK").as_deref(), Some("7"));
        assert_eq!(env_of(last, "LOCAL_RANK").as_deref(), Some("3"));
        // 8 GPUs over 4 local ranks: two each, in order.
        assert_eq!(env_of(last, "CUDA_VISIBLE_DEVICES").as_deref(), Some("6,7"));
    }

    #[test]
    fn with_launcher_none_one_process_per_node_gets_the_pet_variables() {
        let gang = v1::Gang {
            nodes: 2,
            node_rank: 0,
            procs_per_node: 8,
            launcher: "none".into(),
            restart_count: 0,
            gpus_per_node: 0,
            restartable: false,
        };
        let (common, procs) = gang_env(&gang, &launch(), Path::new("/r/hostfile"), &[]);
        assert_eq!(procs.len(), 1);
        assert_eq!(procs[0].rank, None);
        assert_eq!(env_of(&procs[0].env, "CUDA_VISIBLE_DEVICES"), None);
        for (key, value) in [
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "8"),
            ("PET_NODE_RANK", "0"),
            ("PET_MASTER_ADDR", "10.0.0.1"),
            ("PET_MASTER_PORT", "29511"),
        ] {
            assert_eq!(env_of(&common, key).as_deref(), Some(value), "{key}");
        }
        // torchrun computes the per-worker ranks itself.
        assert_eq!(env_of(&common, "RANK"), None);
        assert_eq!(env_of(&common, "WORLD_SIZE"), None);
    }

    #[test]
    fn runs_inherit_only_the_agent_variables_pass_env_names() {
        let agent_env = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("KILN_TOKEN", "abc.def"),
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("MY_CACHE", "/cache"),
        ]
        .map(|(k, v)| (std::ffi::OsString::from(k), std::ffi::OsString::from(v)));
        let defaults: Vec<String> = DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect();
        let names =
            |env: Vec<(String, String)>| env.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            names(inherited_env(agent_env.clone().into_iter(), &defaults)),
            ["LC_ALL", "NVIDIA_VISIBLE_DEVICES", "PATH"]
        );
        assert_eq!(
            names(inherited_env(
                agent_env.clone().into_iter(),
                &["MY_CACHE".to_string()]
            )),
            ["MY_CACHE"]
        );
        // Everything but the agent's own KILN_* variables.
        assert_eq!(
            names(inherited_env(agent_env.into_iter(), &["*".to_string()])),
            [
                "AWS_SECRET_ACCESS_KEY",
                "LC_ALL",
                "MY_CACHE",
                "NVIDIA_VISIBLE_DEVICES",
                "PATH"
            ]
        );
    }

    #[test]
    fn several_processes_per_node_get_one_omp_thread_unless_it_was_set() {
        let mut gang = v1::Gang {
            nodes: 2,
            node_rank: 0,
            procs_per_node: 4,
            launcher: "kiln".into(),
            ..Default::default()
        };
        let (env, note) = torchrun_defaults(&gang, 42, 2, |_| false);
        assert_eq!(env_of(&env, "OMP_NUM_THREADS").as_deref(), Some("1"));
        assert!(note.is_some_and(|n| n.contains("OMP_NUM_THREADS=1")));
        assert_eq!(env_of(&env, "TORCHELASTIC_RUN_ID").as_deref(), Some("42"));
        assert_eq!(
            env_of(&env, "TORCHELASTIC_MAX_RESTARTS").as_deref(),
            Some("2")
        );
        // Set by the run (or the agent's environment): left alone, nothing said.
        let (env, note) = torchrun_defaults(&gang, 42, 2, |name| name == "OMP_NUM_THREADS");
        assert_eq!(env_of(&env, "OMP_NUM_THREADS"), None);
        assert_eq!(note, None);
        // One process per node: torchrun leaves the default thread count.
        gang.procs_per_node = 1;
        assert_eq!(
            env_of(
                &torchrun_defaults(&gang, 42, 2, |_| false).0,
                "OMP_NUM_THREADS"
            ),
            None
        );
        // The user's own torchrun applies its rules itself.
        gang.procs_per_node = 4;
        gang.launcher = "none".into();
        assert!(torchrun_defaults(&gang, 42, 2, |_| false).0.is_empty());
    }

    #[test]
    fn gpus_are_shared_out_evenly_or_round_robin() {
        assert_eq!(gpus_of_local_rank(&[0, 1, 2, 3], 1, 2), [2, 3]);
        assert_eq!(gpus_of_local_rank(&[0, 1], 2, 3), [0]);
        assert_eq!(gpus_of_local_rank(&[0, 1, 2], 1, 2), [1]);
    }
}
