//! The per-run supervisor: a small process (`kiln-agent __supervise STATE_DIR`, or the same
//! subcommand of `kiln` in the local target) that owns one run's script. It starts the script
//! in its own process group, appends every output line and metric point to the run's spool
//! with sequence numbers, samples system metrics, and writes `exit.json` when the script has
//! ended and everything is spooled. It runs in its own session, so the agent can stop,
//! restart or be upgraded while the run goes on; the restarted agent reads the spool again.
//!
//! The supervisor never talks to the network and never signals anything but the leftovers
//! of its own script's process group after the script exits.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::driver::{self, Driver, Record};
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
    let driver: Arc<dyn Driver> = Arc::from(driver::for_attempt(&spec, state));

    let _ = std::fs::remove_file(&spec.metrics_socket);
    let listener = std::os::unix::net::UnixListener::bind(&spec.metrics_socket)
        .with_context(|| format!("bind {}", spec.metrics_socket.display()))?;
    driver.grant_metrics_socket(&spec.metrics_socket)?;

    let (records, records_rx) = mpsc::sync_channel::<Record>(8192);
    let masks = spec.masked_values();
    let writer = {
        let driver = driver.clone();
        std::thread::spawn(move || {
            let result = write_records(
                records_rx,
                SpoolFiles {
                    logs,
                    metrics: metrics_file,
                    log_seq,
                    metric_seq,
                },
                &masks,
            );
            if result.is_err() {
                // Output that cannot be kept must not be produced: stop the script now.
                driver.stop(Signal::SIGKILL);
            }
            result
        })
    };
    let done = Arc::new(AtomicBool::new(false));
    let gang = !spec.procs.is_empty();
    let metrics_rank = spec.metrics_rank;
    let acceptor = {
        let (records, done) = (records.clone(), done.clone());
        std::thread::spawn(move || accept_metrics(listener, records, done, gang, metrics_rank))
    };
    // Dropping `stop_sampling` wakes the sampler at once.
    let (stop_sampling, sampling_stopped) = mpsc::channel::<()>();
    let started = driver.start(records.clone());
    let sampler = match &started {
        Ok(started) => {
            spool::write_json(
                &state.child(),
                &ProcessRecord {
                    pid: started.pid,
                    boot_id: spool::boot_id(),
                },
            )?;
            let records = records.clone();
            let interval = Duration::from_millis(spec.metrics_interval_ms.max(50));
            let (root, run_gpus) = (started.sample_root, spec.gpus.clone());
            Some(std::thread::spawn(move || {
                sample(
                    root,
                    interval,
                    metrics_rank,
                    &run_gpus,
                    records,
                    sampling_stopped,
                )
            }))
        }
        Err(_) => None,
    };
    drop(records);
    let (ended, fenced) = match started {
        Ok(_) => {
            let lease = watch_lease(&spec, {
                let driver = driver.clone();
                move |signal| driver.stop(signal)
            });
            let ended = driver.wait();
            (ended, lease.finish())
        }
        Err(ended) => (Ok(ended), false),
    };
    done.store(true, Ordering::SeqCst);
    drop(stop_sampling);
    let _ = acceptor.join();
    if let Some(sampler) = sampler {
        let _ = sampler.join();
    }
    drop(driver);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("spool writer panicked"))?;
    let _ = std::fs::remove_file(&spec.metrics_socket);
    let ended = ended?;

    let exit = match written {
        Ok(()) => Exit {
            exit_code: ended.exit_code,
            description: ended.description,
            start_error: ended.start_error,
            failed_rank: ended.failed_rank,
            env_failed: ended.env_failed,
            fenced,
            ..Default::default()
        },
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

/// The spool files, open for appending, and the last sequence numbers in them.
struct SpoolFiles {
    logs: std::fs::File,
    metrics: std::fs::File,
    log_seq: u64,
    metric_seq: u64,
}

/// What stands in for a secret's value in the run's output.
pub const MASK: &str = "***";

/// `text` with every occurrence of each of `masks` (longest first) replaced by [`MASK`].
/// A record holds whole lines, so a value is found unless it spans a line break or a cut
/// 64 KiB line.
fn masked(text: String, masks: &[String]) -> String {
    if !masks.iter().any(|value| text.contains(value.as_str())) {
        return text;
    }
    masks
        .iter()
        .fold(text, |text, value| text.replace(value.as_str(), MASK))
}

/// Numbers records (masking secrets in log text) and appends them, several per write when
/// they arrive together.
fn write_records(
    records: mpsc::Receiver<Record>,
    files: SpoolFiles,
    masks: &[String],
) -> anyhow::Result<()> {
    let SpoolFiles {
        mut logs,
        mut metrics,
        mut log_seq,
        mut metric_seq,
    } = files;
    let mut log_buffer = Vec::new();
    let mut metric_buffer = Vec::new();
    while let Ok(first) = records.recv() {
        let mut next = Some(first);
        while let Some(record) = next.take() {
            let time_ms = crate::identity::now_ms();
            match record {
                Record::Log(stream, rank, text) => {
                    let text = masked(text, masks);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_in_output_and_short_ones_are_not() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "run_id": 1, "attempt": 1, "program": "python3", "args": [], "cwd": "/",
            "env": [["SEED", "hf_abc"], ["HF_TOKEN", "hf_abc123"], ["FLAG", "on"], ["USER_ID", "hf_abc"]],
            "metrics_socket": "/m.sock", "metrics_interval_ms": 1000,
            "secret_names": ["HF_TOKEN", "FLAG", "USER_ID"],
        }))
        .unwrap();
        // SEED is not a secret (its value is USER_ID's too: masked as USER_ID's); FLAG is
        // too short to mask; the longer value goes first, so no tail of it is left.
        assert_eq!(spec.masked_values(), ["hf_abc123", "hf_abc"]);
        let masks = spec.masked_values();
        assert_eq!(
            masked(
                "token=hf_abc123 id=hf_abc on\nagain hf_abc123".into(),
                &masks
            ),
            "token=*** id=*** on\nagain ***"
        );
        assert_eq!(masked("nothing here".into(), &masks), "nothing here");
    }

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
