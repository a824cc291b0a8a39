//! The per-run supervisor: a small process (`kiln-agent __supervise STATE_DIR`, or the same
//! subcommand of `kiln` in the local target) that owns one run's script. It starts the script
//! in its own process group, appends every output line and metric point to the run's spool
//! with sequence numbers, samples system metrics, and writes `exit.json` when the script has
//! ended and everything is spooled. It runs in its own session, so the agent can stop,
//! restart or be upgraded while the run goes on; the restarted agent reads the spool again.
//!
//! The supervisor never talks to the network and never signals anything but the leftovers
//! of its own script's process group after the script exits.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::lines::LineChunker;
use crate::spool::{self, Exit, LogRecord, MetricRecord, ProcessRecord, Spec, StateDir};

/// The hidden subcommand that runs a supervisor.
pub const SUBCOMMAND: &str = "__supervise";

/// If this process was started as a supervisor (`EXE __supervise STATE_DIR`), runs it and
/// exits; otherwise returns. Call first thing in `main` of every binary that embeds an agent.
pub fn run_if_requested() {
    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    if first.as_deref() == Some(std::ffi::OsStr::new(crate::sandbox::KILL_SUBCOMMAND)) {
        crate::sandbox::kill_own_user();
    }
    if first.as_deref() == Some(std::ffi::OsStr::new(SUBCOMMAND)) {
        let state_dir = args
            .next()
            .map(std::path::PathBuf::from)
            .unwrap_or_default();
        main(&state_dir);
    }
}

/// Runs the supervisor for `state_dir` and exits the process.
pub fn main(state_dir: &Path) -> ! {
    let code = match supervise(&StateDir(state_dir.to_path_buf())) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("kiln supervisor: {error:#}");
            1
        }
    };
    std::process::exit(code)
}

enum Record {
    /// stream, rank, text
    Log(i32, Option<u32>, String),
    /// name, value, step, rank
    Metric(String, f64, Option<i64>, Option<u32>),
}

/// How long the other processes of a gang node get between SIGTERM and SIGKILL once one
/// of them has failed.
const GANG_STOP_GRACE: Duration = Duration::from_secs(5);

fn supervise(state: &StateDir) -> anyhow::Result<()> {
    // Its own session: no signal meant for the agent (or a terminal) reaches it.
    let _ = nix::unistd::setsid();
    spool::write_json(
        &state.supervisor(),
        &ProcessRecord {
            pid: std::process::id() as i32,
            boot_id: spool::boot_id(),
        },
    )?;
    let spec: Spec = spool::read_json(&state.spec())?.context("spec.json is missing")?;
    // Room for exit.json even if the script's output fills the disk: freed just before it
    // is written.
    let reserve = state.0.join("exit.reserve");
    std::fs::write(&reserve, [0u8; 16 * 1024]).context("reserve room for exit.json")?;
    // The agent may have spooled lines before the script started (snapshot fetch, ...).
    let log_seq = spool::last_seq(&state.logs())?;
    let metric_seq = spool::last_seq(&state.metrics())?;
    let open = |path: std::path::PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))
    };
    let logs = open(state.logs())?;
    let metrics_file = open(state.metrics())?;

    let _ = std::fs::remove_file(&spec.metrics_socket);
    let listener = std::os::unix::net::UnixListener::bind(&spec.metrics_socket)
        .with_context(|| format!("bind {}", spec.metrics_socket.display()))?;
    if let Some(user) = &spec.run_as {
        // The run's user connects to the metrics socket; no one else may.
        crate::docker::hand_over(&[spec.metrics_socket.as_path()], &user.owner())
            .context("give the metrics socket to the run's user")?;
        crate::sandbox::set_mode(&spec.metrics_socket, 0o600)?;
    }

    if let Some(docker) = &spec.docker {
        // The container's user connects to the metrics socket.
        crate::docker::hand_over(&[spec.metrics_socket.as_path()], &docker.user)
            .context("give the metrics socket to the container's user")?;
        let files = SpoolFiles {
            logs,
            metrics: metrics_file,
            log_seq,
            metric_seq,
        };
        let exit = supervise_container(state, &spec, docker, files, listener)?;
        let _ = std::fs::remove_file(&reserve);
        spool::write_json(&state.exit(), &exit)?;
        return Ok(());
    }

    // One process for a single-node run; one per local rank for a gang node. They share the
    // first one's process group, so that one signal reaches all of them and what they left.
    let procs = if spec.procs.is_empty() {
        vec![crate::spool::ProcSpec {
            rank: None,
            env: Vec::new(),
        }]
    } else {
        spec.procs.clone()
    };
    let mut children = Vec::new();
    let mut pgid: Option<i32> = None;
    for proc in &procs {
        let mut command = Command::new(&spec.program);
        if spec.env_clear {
            // The spec holds everything the script may see (see `runner::inherited_env`).
            command.env_clear();
        }
        command
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .envs(proc.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(pgid.unwrap_or(0));
        if let Some(user) = &spec.run_as {
            // std drops the supervisor's supplementary groups when it switches from root.
            command.uid(user.uid).gid(user.gid);
        }
        match command.spawn() {
            Ok(child) => {
                pgid.get_or_insert(child.id() as i32);
                children.push((proc.rank, child));
            }
            Err(error) => {
                if let Some(pgid) = pgid {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
                let message = format!("could not start `{}`: {error}", spec.program.display());
                spool::write_json(
                    &state.exit(),
                    &Exit {
                        exit_code: None,
                        description: message.clone(),
                        start_error: Some(message),
                        failed_rank: proc.rank,
                        env_failed: false,
                        ..Default::default()
                    },
                )?;
                return Ok(());
            }
        }
    }
    let pid = pgid.expect("at least one process started");
    spool::write_json(
        &state.child(),
        &ProcessRecord {
            pid,
            boot_id: spool::boot_id(),
        },
    )?;

    let (records, records_rx) = mpsc::sync_channel::<Record>(8192);
    let writer = std::thread::spawn(move || {
        let result = write_records(records_rx, logs, metrics_file, log_seq, metric_seq);
        if result.is_err() {
            // Output that cannot be kept must not be produced: stop the script now.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        result
    });
    let mut readers = Vec::new();
    for (rank, child) in &mut children {
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        widen_pipe(&stdout);
        widen_pipe(&stderr);
        readers.push(spawn_reader(stdout, 1, *rank, records.clone()));
        readers.push(spawn_reader(stderr, 2, *rank, records.clone()));
    }
    let done = Arc::new(AtomicBool::new(false));
    let gang = !spec.procs.is_empty();
    let metrics_rank = spec.metrics_rank;
    let acceptor = {
        let (records, done) = (records.clone(), done.clone());
        std::thread::spawn(move || accept_metrics(listener, records, done, gang, metrics_rank))
    };
    // Dropping `stop_sampling` wakes the sampler at once.
    let (stop_sampling, sampling_stopped) = mpsc::channel::<()>();
    let sampler = {
        let records = records.clone();
        let interval = Duration::from_millis(spec.metrics_interval_ms.max(50));
        // A gang node's processes are all children of this supervisor.
        let root = if gang { std::process::id() } else { pid as u32 };
        let run_gpus = spec.gpus.clone();
        std::thread::spawn(move || {
            sample(
                root,
                interval,
                metrics_rank,
                &run_gpus,
                records,
                sampling_stopped,
            )
        })
    };
    drop(records);
    let lease = watch_lease(&spec, move |signal| {
        let _ = killpg(Pid::from_raw(pid), signal);
    });

    let (status, failed_rank) = wait_all(children, pid)?;
    let fenced = lease.finish();
    // Whatever the script left behind in its group goes too, so the pipes close; with a
    // user of its own, so does every process of that user (a double-forked daemon that
    // left the group included).
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    if let Some(user) = &spec.run_as
        && let Ok(program) = std::env::current_exe()
    {
        crate::sandbox::kill_all(&program, user.uid);
    }
    for reader in readers {
        let _ = reader.join();
    }
    done.store(true, Ordering::SeqCst);
    drop(stop_sampling);
    let _ = acceptor.join();
    let _ = sampler.join();
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("spool writer panicked"))?;
    let _ = std::fs::remove_file(&spec.metrics_socket);

    let exit = match written {
        Ok(()) => {
            let (exit_code, description) = describe_exit(&status);
            let description = match failed_rank {
                Some(rank) => format!("rank {rank} {description}"),
                None => description,
            };
            Exit {
                exit_code,
                description,
                start_error: None,
                failed_rank,
                env_failed: false,
                fenced,
                ..Default::default()
            }
        }
        // Say why the run was stopped (the disk is full, typically) rather than vanish.
        Err(error) => Exit {
            exit_code: None,
            description: format!("stopped: the agent could not keep the run's output: {error:#}"),
            start_error: None,
            failed_rank: None,
            env_failed: false,
            ..Default::default()
        },
    };
    let _ = std::fs::remove_file(&reserve);
    spool::write_json(&state.exit(), &exit)?;
    Ok(())
}

/// The spool files, open for appending, and the last sequence numbers in them.
struct SpoolFiles {
    logs: std::fs::File,
    metrics: std::fs::File,
    log_seq: u64,
    metric_seq: u64,
}

/// A Docker run: the container takes the place of the script's process group (see
/// `docker.rs`); the spool, metric socket and sampling work as for a process. SIGTERM to
/// the supervisor stops the container.
fn supervise_container(
    state: &StateDir,
    spec: &Spec,
    docker: &crate::docker::DockerSpec,
    files: SpoolFiles,
    listener: std::os::unix::net::UnixListener,
) -> anyhow::Result<Exit> {
    let (records, records_rx) = mpsc::sync_channel::<Record>(8192);
    let writer = std::thread::spawn(move || {
        let result = write_records(
            records_rx,
            files.logs,
            files.metrics,
            files.log_seq,
            files.metric_seq,
        );
        if result.is_err() {
            // Output that cannot be kept must not be produced: stop the container now.
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        }
        result
    });
    let done = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (records, done) = (records.clone(), done.clone());
        std::thread::spawn(move || accept_metrics(listener, records, done, false, None))
    };
    let (stop_sampling, sampling_stopped) = mpsc::channel::<()>();

    struct Events {
        records: mpsc::SyncSender<Record>,
        state: StateDir,
        interval: Duration,
        sampling_stopped: Option<mpsc::Receiver<()>>,
        sampler: Option<std::thread::JoinHandle<()>>,
        /// The run's GPUs (host indices): only these are sampled.
        gpus: Vec<u32>,
    }
    impl crate::docker::ContainerEvents for Events {
        fn line(&mut self, stream: i32, text: String) {
            let _ = self.records.send(Record::Log(stream, None, text));
        }
        fn started(&mut self, pid: i32) {
            let record = ProcessRecord {
                pid,
                boot_id: spool::boot_id(),
            };
            if let Err(error) = spool::write_json(&self.state.child(), &record) {
                eprintln!("kiln supervisor: could not write child.json: {error}");
            }
            // The container's processes are the tree under its init process.
            if let Some(stop) = self.sampling_stopped.take() {
                let (records, interval) = (self.records.clone(), self.interval);
                let gpus = self.gpus.clone();
                self.sampler = Some(std::thread::spawn(move || {
                    sample(pid as u32, interval, None, &gpus, records, stop)
                }));
            }
        }
    }
    let mut events = Events {
        records: records.clone(),
        state: state.clone(),
        interval: Duration::from_millis(spec.metrics_interval_ms.max(50)),
        gpus: spec.gpus.clone(),
        sampling_stopped: Some(sampling_stopped),
        sampler: None,
    };
    drop(records);
    // SIGTERM to the supervisor stops the container (Docker kills it after its grace).
    let lease = watch_lease(spec, |signal| {
        if signal == Signal::SIGTERM {
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        }
    });
    let ran = crate::docker::run_container(spec, docker, &mut events);
    let fenced = lease.finish();

    done.store(true, Ordering::SeqCst);
    drop(stop_sampling);
    let _ = acceptor.join();
    if let Some(sampler) = events.sampler.take() {
        let _ = sampler.join();
    }
    drop(events);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("spool writer panicked"))?;
    let _ = std::fs::remove_file(&spec.metrics_socket);
    Ok(match (written, ran) {
        (Err(error), _) => Exit {
            exit_code: None,
            description: format!("stopped: the agent could not keep the run's output: {error:#}"),
            start_error: None,
            failed_rank: None,
            env_failed: false,
            ..Default::default()
        },
        (Ok(()), Ok(ended)) => Exit {
            exit_code: ended.exit_code,
            description: ended.description,
            fenced,
            // A container that could not be created or started is the environment's fault
            // (no such command in the image, a device the engine cannot give, ...).
            env_failed: ended.start_error.is_some(),
            start_error: ended.start_error,
            failed_rank: None,
            ..Default::default()
        },
        (Ok(()), Err(error)) => {
            let message = format!("the container could not be run: {error:#}");
            Exit {
                exit_code: None,
                description: message.clone(),
                start_error: Some(message),
                failed_rank: None,
                env_failed: true,
                ..Default::default()
            }
        }
    })
}

/// The thread that watches the agent's lease for a fenceable attempt.
struct LeaseWatch {
    done: Arc<AtomicBool>,
    fenced: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWatch {
    /// Stops watching; returns whether the attempt was fenced off.
    fn finish(mut self) -> bool {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.fenced.load(Ordering::SeqCst)
    }
}

/// For a fenceable attempt, watches the agent's lease (see [`spool::Lease`]): once it has
/// run out (the agent froze, died or lost the coordinator for two thirds of its TTL, and
/// the coordinator is about to give the attempt to another agent), stops the attempt with
/// `stop(SIGTERM)`, then `stop(SIGKILL)` at the lease's kill time (before the TTL). This runs in the
/// supervisor, not the agent, because a frozen agent cannot fence anything.
fn watch_lease(spec: &Spec, stop: impl Fn(Signal) + Send + 'static) -> LeaseWatch {
    let done = Arc::new(AtomicBool::new(false));
    let fenced = Arc::new(AtomicBool::new(false));
    let thread = match (&spec.lease_file, spec.fenceable()) {
        (Some(path), true) => {
            let (path, done, fenced) = (path.clone(), done.clone(), fenced.clone());
            Some(std::thread::spawn(move || {
                let mut stopped = false;
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    match spool::Lease::state(&path) {
                        spool::LeaseState::Valid => {}
                        spool::LeaseState::Stop if !stopped => {
                            eprintln!(
                                "kiln supervisor: the agent's lease ran out: fencing the attempt off"
                            );
                            fenced.store(true, Ordering::SeqCst);
                            stop(Signal::SIGTERM);
                            stopped = true;
                        }
                        spool::LeaseState::Stop => {}
                        spool::LeaseState::Kill => {
                            fenced.store(true, Ordering::SeqCst);
                            if !stopped {
                                stop(Signal::SIGTERM);
                            }
                            stop(Signal::SIGKILL);
                            return;
                        }
                    }
                }
            }))
        }
        _ => None,
    };
    LeaseWatch {
        done,
        fenced,
        thread,
    }
}

/// Waits for every process. The first that fails (exits non-zero or is killed) stops the
/// others: SIGTERM to the group, SIGKILL after [`GANG_STOP_GRACE`]. Returns the status that
/// describes the node (the first failure's, else the last exit) and the failed rank.
fn wait_all(
    children: Vec<(Option<u32>, std::process::Child)>,
    pgid: i32,
) -> anyhow::Result<(std::process::ExitStatus, Option<u32>)> {
    let n = children.len();
    let (exited, exits) = mpsc::channel();
    for (rank, mut child) in children {
        let exited = exited.clone();
        std::thread::spawn(move || {
            let _ = exited.send((rank, child.wait()));
        });
    }
    drop(exited);
    let mut first_failure: Option<(Option<u32>, std::process::ExitStatus)> = None;
    let mut last = None;
    let mut kill_at: Option<std::time::Instant> = None;
    let mut remaining = n;
    while remaining > 0 {
        let timeout = kill_at.map_or(Duration::from_secs(3600), |at| {
            at.saturating_duration_since(std::time::Instant::now())
        });
        match exits.recv_timeout(timeout) {
            Ok((rank, status)) => {
                remaining -= 1;
                let status = status.context("wait for the script")?;
                if !status.success() && first_failure.is_none() {
                    first_failure = Some((rank, status));
                    if remaining > 0 {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
                        kill_at = Some(std::time::Instant::now() + GANG_STOP_GRACE);
                    }
                }
                last = Some(status);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if kill_at.is_some() {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    kill_at = None;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    match first_failure {
        Some((rank, status)) => Ok((status, rank)),
        None => Ok((last.context("no process was waited for")?, None)),
    }
}

/// Numbers records and appends them, several per write when they arrive together.
fn write_records(
    records: mpsc::Receiver<Record>,
    mut logs: std::fs::File,
    mut metrics: std::fs::File,
    mut log_seq: u64,
    mut metric_seq: u64,
) -> anyhow::Result<()> {
    let mut log_buffer = Vec::new();
    let mut metric_buffer = Vec::new();
    while let Ok(first) = records.recv() {
        let mut next = Some(first);
        while let Some(record) = next.take() {
            let time_ms = now_ms();
            match record {
                Record::Log(stream, rank, text) => {
                    log_seq += 1;
                    serde_json::to_writer(
                        &mut log_buffer,
                        &LogRecord {
                            seq: log_seq,
                            stream,
                            time_ms,
                            text,
                            rank,
                        },
                    )?;
                    log_buffer.push(b'\n');
                }
                Record::Metric(name, value, step, rank) => {
                    metric_seq += 1;
                    serde_json::to_writer(
                        &mut metric_buffer,
                        &MetricRecord {
                            seq: metric_seq,
                            name,
                            value,
                            step,
                            time_ms,
                            rank,
                        },
                    )?;
                    metric_buffer.push(b'\n');
                }
            }
            if log_buffer.len() + metric_buffer.len() < (1 << 20) {
                next = records.try_recv().ok();
            }
        }
        if !log_buffer.is_empty() {
            logs.write_all(&log_buffer)
                .context("append to the log spool")?;
            log_buffer.clear();
        }
        if !metric_buffer.is_empty() {
            metrics
                .write_all(&metric_buffer)
                .context("append to the metric spool")?;
            metric_buffer.clear();
        }
    }
    Ok(())
}

/// The script's output pipes hold this much (Linux's default is 64 KiB), so that the
/// reader can leave them alone for a moment: see [`spawn_reader`].
const PIPE_BYTES: i32 = 1 << 20;

/// A read that returned less than this is a trickle: the reader pauses [`TRICKLE_PAUSE`]
/// before the next one.
const TRICKLE_BYTES: usize = 16 * 1024;
const TRICKLE_PAUSE: Duration = Duration::from_millis(1);

/// Raises an output pipe's capacity to [`PIPE_BYTES`] (best effort: above the system's
/// `fs.pipe-max-size` it stays as it is).
fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// Reads one output pipe of the script and hands on, as one record, every whole line each
/// read returned (see [`crate::lines`]): no per-line work between the script and the spool.
///
/// A reader that always waits in `read` is woken by every `write` of the script, and a
/// script printing short lines as fast as it can (`python -u`) then pays a wake-up per
/// line and gets one line per read. After a read that returned little, the reader pauses
/// 1 ms instead: the script's writes meanwhile go into the (widened) pipe without waking
/// anyone, and the next read takes them all. A line is handed on as soon as it was read, so
/// this delays nothing already read; a quiet script's next line waits at most the pause.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    stream: i32,
    rank: Option<u32>,
    records: mpsc::SyncSender<Record>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunker = LineChunker::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match pipe.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for text in chunker.push(&buffer[..n]) {
                if records.send(Record::Log(stream, rank, text)).is_err() {
                    return;
                }
            }
            if n < TRICKLE_BYTES {
                std::thread::sleep(TRICKLE_PAUSE);
            }
        }
        if let Some(text) = chunker.finish() {
            let _ = records.send(Record::Log(stream, rank, text));
        }
    })
}

#[derive(serde::Deserialize)]
struct UserPoint {
    name: String,
    value: f64,
    step: Option<i64>,
    /// `$RANK` of the process that logged the point (`kiln.py` sends it when set).
    #[serde(default)]
    rank: Option<u32>,
}

/// How often the metric acceptor looks for new connections and for `done`.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Accepts the script's metric connections until `done`; each connection is read to its
/// end. Connections still queued when `done` is seen are accepted and read too: a script
/// that logged a point just before exiting may not have been accepted yet.
///
/// The listener is polled (non-blocking, every [`ACCEPT_POLL`]) rather than woken by a
/// connection of the supervisor's own: that connection goes through the socket's path,
/// and once the path was gone (the agent's data directory removed under a running
/// supervisor) a blocked accept was never woken and the supervisor never exited.
fn accept_metrics(
    listener: std::os::unix::net::UnixListener,
    records: mpsc::SyncSender<Record>,
    done: Arc<AtomicBool>,
    gang: bool,
    default_rank: Option<u32>,
) {
    let read = |stream: std::os::unix::net::UnixStream| {
        let records = records.clone();
        let _ = stream.set_nonblocking(false);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if let Ok(point) = serde_json::from_str::<UserPoint>(&line)
                    && point.value.is_finite()
                    && !point.name.is_empty()
                    && records
                        .send(Record::Metric(
                            point.name,
                            point.value,
                            point.step,
                            // Ranks mean something in gang runs only.
                            if gang {
                                point.rank.or(default_rank)
                            } else {
                                None
                            },
                        ))
                        .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut connections = Vec::new();
    let _ = listener.set_nonblocking(true);
    loop {
        // Read before accepting: a connection queued before `done` is still accepted.
        let finished = done.load(Ordering::SeqCst);
        match listener.accept() {
            Ok((stream, _)) => connections.push(read(stream)),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) if finished => break,
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
    // The script's processes are gone, so every connection is at its end.
    for connection in connections {
        let _ = connection.join();
    }
}

/// Samples the script's process tree (and the run's GPUs) every `interval` until `stop` is
/// dropped.
fn sample(
    pid: u32,
    interval: Duration,
    rank: Option<u32>,
    run_gpus: &[u32],
    records: mpsc::SyncSender<Record>,
    stop: mpsc::Receiver<()>,
) {
    // The first sample comes soon, so that even a short run has one with a CPU reading.
    let mut wait = interval.min(Duration::from_millis(500));
    let mut gpus = None;
    let mut sampler = crate::telemetry::TreeSampler::new(pid);
    loop {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = stop.recv_timeout(wait) {
            return;
        }
        wait = interval;
        let sample = sampler.sample();
        if sample.n_processes == 0 {
            continue;
        }
        let mut points = vec![
            ("system/cpu_percent".to_string(), sample.cpu_percent),
            (
                "system/memory_rss_bytes".to_string(),
                sample.memory_rss_bytes as f64,
            ),
        ];
        // Only the run's own GPUs: another run's load is not this run's. NVML is opened on
        // first use, so a run without GPUs never loads it.
        if !run_gpus.is_empty() {
            let gpus = gpus.get_or_insert_with(crate::gpu::probe_from_env);
            let mine: Vec<_> = gpus
                .sample()
                .into_iter()
                .filter(|sample| run_gpus.contains(&sample.index))
                .collect();
            points.extend(crate::gpu::sample_points(&mine));
        }
        for (name, value) in points {
            if records
                .send(Record::Metric(name, value, None, rank))
                .is_err()
            {
                return;
            }
        }
    }
}

/// (exit code, description). A script killed by a signal exits with 128 + the signal
/// number, as a shell would report it.
pub fn describe_exit(status: &std::process::ExitStatus) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => (Some(code), format!("exited with code {code}")),
        (None, Some(signal)) => (Some(128 + signal), format!("killed by signal {signal}")),
        (None, None) => (None, "ended without an exit status".to_string()),
    }
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
    fn the_metric_acceptor_ends_when_done_even_with_its_socket_path_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (records, received) = mpsc::sync_channel(16);
        let done = Arc::new(AtomicBool::new(false));
        let (ended, acceptor_ended) = mpsc::channel();
        let acceptor = {
            let done = done.clone();
            std::thread::spawn(move || {
                accept_metrics(listener, records, done, false, None);
                let _ = ended.send(());
            })
        };
        // A point logged just before the end, by a connection not accepted yet.
        let mut script = std::os::unix::net::UnixStream::connect(&path).unwrap();
        script
            .write_all(b"{\"name\": \"loss\", \"value\": 0.5, \"step\": 3}\n")
            .unwrap();
        drop(script);
        // Let the acceptor take it and wait for more, as it does while a run goes on.
        std::thread::sleep(Duration::from_millis(200));
        // The run's directory goes (a data dir removed under the supervisor), then the end.
        drop(dir);
        done.store(true, Ordering::SeqCst);
        acceptor_ended
            .recv_timeout(Duration::from_secs(5))
            .expect("the acceptor ended");
        acceptor.join().unwrap();
        match received.recv_timeout(Duration::from_secs(1)) {
            Ok(Record::Metric(name, value, step, _)) => {
                assert_eq!((name.as_str(), value, step), ("loss", 0.5, Some(3)))
            }
            _ => panic!("the queued connection's point was not read"),
        }
    }
}
