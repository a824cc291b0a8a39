//! The process driver: the script runs as processes of the supervisor — one, or one per
//! local rank of a gang node — in one process group (the first one's), as the run's own
//! user when the agent gives it one (see `sandbox`). Their stdout and stderr are read
//! through widened pipes, a thread per pipe, whole lines at a time.

use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{Driver, Ended, Output, Record, Recovered, Started, recover_supervisor};
use crate::lines::LineChunker;
use crate::spool::{self, ProcSpec, ProcessRecord, Spec, StateDir};

pub(crate) struct ProcessDriver {
    spec: Spec,
    state: StateDir,
    /// The script's process group, once started (in the supervisor).
    pgid: OnceLock<i32>,
    /// The started processes (rank, child) and the threads reading their output.
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    children: Vec<(Option<u32>, std::process::Child)>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl ProcessDriver {
    pub fn new(spec: &Spec, state: &StateDir) -> ProcessDriver {
        ProcessDriver {
            spec: spec.clone(),
            state: state.clone(),
            pgid: OnceLock::new(),
            running: Mutex::new(Running::default()),
        }
    }

    /// The script's process group: this supervisor's own record, or (from the agent) the
    /// one `child.json` holds, if it is of this boot.
    fn process_group(&self) -> Option<i32> {
        if let Some(pgid) = self.pgid.get() {
            return Some(*pgid);
        }
        spool::read_json::<ProcessRecord>(&self.state.child())
            .ok()
            .flatten()
            .filter(|child| child.boot_id == spool::boot_id())
            .map(|child| child.pid)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Driver for ProcessDriver {
    fn grant_metrics_socket(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(user) = &self.spec.run_as {
            // The run's user connects to the metrics socket; no one else may.
            crate::docker::hand_over(&[path], &user.owner())
                .context("give the metrics socket to the run's user")?;
            crate::sandbox::set_mode(path, 0o600)?;
        }
        Ok(())
    }

    fn start(&self, output: Output) -> Result<Started, Ended> {
        let spec = &self.spec;
        // One process for a single-node run; one per local rank for a gang node. They
        // share the first one's process group, so that one signal reaches all of them and
        // what they left.
        let procs = if spec.procs.is_empty() {
            vec![ProcSpec {
                rank: None,
                env: Vec::new(),
            }]
        } else {
            spec.procs.clone()
        };
        let mut running = self.running();
        let mut pgid: Option<i32> = None;
        for proc in &procs {
            let mut command = Command::new(&spec.program);
            if spec.env_clear {
                // The spec holds everything the script may see (see `run::inherited_env`).
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
                    running.children.push((proc.rank, child));
                }
                Err(error) => {
                    if let Some(pgid) = pgid {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    }
                    let message = format!("could not start `{}`: {error}", spec.program.display());
                    return Err(Ended::not_started(message, false, proc.rank));
                }
            }
        }
        let pid = pgid.expect("at least one process started");
        let _ = self.pgid.set(pid);
        let Running { children, readers } = &mut *running;
        for (rank, child) in children.iter_mut() {
            let stdout = child.stdout.take().expect("piped");
            let stderr = child.stderr.take().expect("piped");
            widen_pipe(&stdout);
            widen_pipe(&stderr);
            readers.push(spawn_reader(stdout, 1, *rank, output.clone()));
            readers.push(spawn_reader(stderr, 2, *rank, output.clone()));
        }
        // A gang node's processes are all children of this supervisor.
        let sample_root = if spec.procs.is_empty() {
            pid as u32
        } else {
            std::process::id()
        };
        Ok(Started { pid, sample_root })
    }

    fn wait(&self) -> anyhow::Result<Ended> {
        let (children, readers) = {
            let mut running = self.running();
            (
                std::mem::take(&mut running.children),
                std::mem::take(&mut running.readers),
            )
        };
        let pgid = self
            .pgid
            .get()
            .copied()
            .context("the script was not started")?;
        let (status, failed_rank) = wait_all(children, pgid)?;
        // Whatever the script left behind in its group goes too, so the pipes close; with a
        // user of its own, so does every process of that user (a double-forked daemon that
        // left the group included).
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        if let Some(user) = &self.spec.run_as
            && let Ok(program) = std::env::current_exe()
        {
            crate::sandbox::kill_all(&program, user.uid);
        }
        for reader in readers {
            let _ = reader.join();
        }
        let (exit_code, description) = crate::supervisor::describe_exit(&status);
        let description = match failed_rank {
            Some(rank) => format!("rank {rank} {description}"),
            None => description,
        };
        Ok(Ended {
            exit_code,
            description,
            failed_rank,
            ..Default::default()
        })
    }

    fn stop(&self, signal: Signal) {
        if let Some(pgid) = self.process_group() {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }

    fn recover(&self) -> Recovered {
        recover_supervisor(&self.state, || {
            // Nothing watches the script any more: it goes too.
            self.stop(Signal::SIGKILL);
            "the run's supervisor process is gone (killed, or the machine restarted)".to_string()
        })
    }

    fn destroy(&self) -> BoxFuture<'static, anyhow::Result<usize>> {
        // The supervisor (or `recover`) stopped every process; the run's user is released
        // with the attempt's directory (`run::remove_attempt`).
        Box::pin(async { Ok(0) })
    }
}

/// How long the other processes of a gang node get between SIGTERM and SIGKILL once one
/// of them has failed.
const GANG_STOP_GRACE: Duration = Duration::from_secs(5);

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

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt as _;

    use super::*;
    use crate::spool::Exit;

    /// A spec for `sh -c SCRIPT`, one process per rank in `ranks` (none: a single-node run).
    fn spec(dir: &Path, script: &str, ranks: &[u32]) -> Spec {
        let procs: Vec<serde_json::Value> = ranks
            .iter()
            .map(|rank| serde_json::json!({"rank": rank, "env": [["KILN_RANK", rank.to_string()]]}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "run_id": 1,
            "attempt": 1,
            "program": "/bin/sh",
            "args": ["-c", script],
            "cwd": dir,
            "env": [["PATH", "/usr/bin:/bin"]],
            "env_clear": true,
            "metrics_socket": dir.join("m.sock"),
            "metrics_interval_ms": 1000,
            "procs": procs,
        }))
        .unwrap()
    }

    fn state(dir: &Path) -> StateDir {
        let state = StateDir(dir.join("state"));
        std::fs::create_dir_all(&state.0).unwrap();
        state
    }

    fn lines(received: mpsc::Receiver<Record>) -> Vec<(Option<u32>, String)> {
        let mut lines: Vec<_> = received
            .try_iter()
            .filter_map(|record| match record {
                Record::Log(_, rank, text) => Some((rank, text)),
                Record::Metric(..) => None,
            })
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn every_rank_runs_its_output_is_read_and_the_first_failure_ends_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            dir.path(),
            // Rank 1 fails only once rank 0 has said its line (else the stop may come first).
            "echo rank $KILN_RANK; if [ $KILN_RANK = 0 ]; then touch said; exec sleep 30; fi; \
             while [ ! -e said ]; do sleep 0.01; done; exit 3",
            &[0, 1],
        );
        let driver = ProcessDriver::new(&spec, &state(dir.path()));
        let (output, received) = mpsc::sync_channel(64);
        let started = driver.start(output).expect("started");
        // A gang node's processes are sampled under the supervisor (this process).
        assert_eq!(started.sample_root, std::process::id());
        let ended = driver.wait().unwrap();
        assert_eq!(ended.exit_code, Some(3));
        assert_eq!(ended.failed_rank, Some(1));
        assert_eq!(ended.description, "rank 1 exited with code 3");
        assert_eq!(ended.start_error, None);
        // Rank 0's sleep was stopped with the node (what the group held was SIGKILLed; a
        // killed orphan is gone once init has reaped it), and both ranks' lines came through.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while nix::sys::signal::killpg(Pid::from_raw(started.pid), None).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the node's process group outlived it"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            lines(received),
            [
                (Some(0), "rank 0".to_string()),
                (Some(1), "rank 1".to_string())
            ]
        );
    }

    #[test]
    fn the_agent_stops_a_script_from_what_the_supervisor_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), "echo up; exec sleep 30", &[]);
        let state = state(dir.path());
        let supervisor = ProcessDriver::new(&spec, &state);
        let (output, received) = mpsc::sync_channel(64);
        let started = supervisor.start(output).expect("started");
        assert_eq!(started.sample_root, started.pid as u32);
        spool::write_json(
            &state.child(),
            &ProcessRecord {
                pid: started.pid,
                boot_id: spool::boot_id(),
            },
        )
        .unwrap();
        let Ok(Record::Log(1, None, first)) = received.recv_timeout(Duration::from_secs(10)) else {
            panic!("the script said nothing");
        };
        assert_eq!(first, "up");
        // The agent's driver holds no process: it finds the group in child.json.
        ProcessDriver::new(&spec, &state).stop(Signal::SIGTERM);
        let ended = supervisor.wait().unwrap();
        assert_eq!(ended.exit_code, Some(128 + 15));
        assert_eq!(ended.description, "killed by signal 15");
    }

    #[test]
    fn a_program_that_cannot_start_is_said_and_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), "", &[]);
        spec.program = dir.path().join("no-such-program");
        let driver = ProcessDriver::new(&spec, &state(dir.path()));
        let (output, _received) = mpsc::sync_channel(64);
        let Err(ended) = driver.start(output) else {
            panic!("a missing program started");
        };
        let error = ended.start_error.expect("a start error");
        assert!(error.starts_with("could not start `"), "{error}");
        assert!(error.contains("no-such-program"), "{error}");
        assert!(!ended.env_failed);
    }

    #[test]
    fn recover_tells_a_starting_a_running_and_a_vanished_supervisor_apart() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), "", &[]);
        let state = state(dir.path());
        let driver = ProcessDriver::new(&spec, &state);
        assert!(matches!(driver.recover(), Recovered::Starting));
        let record = |pid: i32| ProcessRecord {
            pid,
            boot_id: spool::boot_id(),
        };
        // A live supervisor (this process stands in for it).
        spool::write_json(&state.supervisor(), &record(std::process::id() as i32)).unwrap();
        assert!(matches!(driver.recover(), Recovered::Running));
        // A supervisor that died without exit.json, and the script it left behind.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id() as i32;
        dead.wait().unwrap();
        let mut script = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        spool::write_json(&state.supervisor(), &record(dead_pid)).unwrap();
        spool::write_json(&state.child(), &record(script.id() as i32)).unwrap();
        let Recovered::Ended(exit) = driver.recover() else {
            panic!("a dead supervisor was not noticed");
        };
        assert!(exit.lost);
        assert!(exit.description.contains("supervisor process is gone"));
        // What it left running was stopped.
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(script.wait().unwrap().signal(), Some(9));
        // An exit.json written just before it died is its end.
        let written = Exit {
            exit_code: Some(0),
            description: "exited with code 0".into(),
            ..Default::default()
        };
        spool::write_json(&state.exit(), &written).unwrap();
        let Recovered::Ended(exit) = driver.recover() else {
            panic!("a dead supervisor was not noticed");
        };
        assert_eq!(exit, written);
    }
}
