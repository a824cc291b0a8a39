//! One run on this agent, in fixed phases: fetch snapshot → unpack → start → stream logs and
//! metrics while waiting → upload outputs → report. Cleanup (process group, socket, run
//! directory) always runs. Every log line and metric point gets the next per-attempt
//! sequence number here, so the coordinator can store them idempotently.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::snapshot::{self, DIGEST_PREFIX, PackOptions, UnpackLimits};
use kiln_proto::v1::{self, agent_message::Kind as Up};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::session::up;
use crate::{Agent, StopReason};

/// Time a cancelled run gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest log line sent as one line; longer output is split.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// What a run phase returns when the run cannot go on: the status and message to report.
struct Fail {
    message: String,
}

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(error: E) -> Fail {
        Fail {
            message: error.to_string(),
        }
    }
}

pub(crate) async fn execute(
    agent: Arc<Agent>,
    assignment: v1::Assignment,
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
) {
    let span = info_span!(
        "run",
        run_id = assignment.run_id,
        attempt = assignment.attempt
    );
    async move {
        info!(script = %assignment.script, snapshot = %assignment.snapshot_digest, "Run assigned.");
        let run_dir = agent
            .config
            .data_dir
            .join("runs")
            .join(format!("{}.{}", assignment.run_id, assignment.attempt));
        let socket = agent
            .config
            .data_dir
            .join("sock")
            .join(format!("{}.{}.sock", assignment.run_id, assignment.attempt));
        let reporter = Reporter::new(&agent, &assignment);
        let finished = run_phases(
            &agent,
            &assignment,
            &run_dir,
            &socket,
            &reporter,
            &stop,
            &reason,
        )
        .await;
        reporter.close().await;
        let status = finished.status();
        let _ = agent
            .uplink
            .send(up(Up::RunEvent(v1::RunEvent {
                run_id: assignment.run_id,
                attempt: assignment.attempt,
                kind: Some(v1::run_event::Kind::Finished(finished)),
            })))
            .await;
        let _ = std::fs::remove_file(&socket);
        if let Err(error) = std::fs::remove_dir_all(&run_dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %error, "Could not remove the run directory.");
        }
        info!(status = ?status, "Run done.");
    }
    .instrument(span)
    .await
}

async fn run_phases(
    agent: &Arc<Agent>,
    assignment: &v1::Assignment,
    run_dir: &Path,
    socket: &Path,
    reporter: &Reporter,
    stop: &CancellationToken,
    reason: &Mutex<Option<StopReason>>,
) -> v1::Finished {
    let failed = |message: String| v1::Finished {
        status: v1::RunStatus::Failed as i32,
        exit_code: None,
        message,
        outputs_digest: String::new(),
    };
    // Fetch and unpack.
    let archive = tokio::select! {
        _ = stop.cancelled() => return stopped_before_start(reason),
        archive = fetch_snapshot(agent, &assignment.snapshot_digest, reporter) => archive,
    };
    let archive = match archive {
        Ok(archive) => archive,
        Err(fail) => return failed(format!("could not fetch snapshot: {}", fail.message)),
    };
    if let Err(fail) = unpack(&archive, run_dir).await {
        reporter.system(format!("Snapshot could not be unpacked: {}", fail.message));
        return failed(format!("snapshot could not be unpacked: {}", fail.message));
    }
    let script_path = run_dir.join(&assignment.script);
    if !script_path.is_file() {
        let message = format!(
            "script `{}` does not exist in the snapshot",
            assignment.script
        );
        reporter.system(message.clone());
        return failed(message);
    }
    let outputs = run_dir.join("outputs");
    if let Err(error) = std::fs::create_dir_all(&outputs) {
        return failed(format!("could not create outputs/: {error}"));
    }

    // Start.
    let metrics_listener = match bind_metrics_socket(socket) {
        Ok(listener) => listener,
        Err(error) => return failed(format!("could not open the metrics socket: {error:#}")),
    };
    let mut command = match build_command(agent, assignment, &script_path) {
        Ok(command) => command,
        Err(fail) => {
            reporter.system(fail.message.clone());
            return failed(fail.message);
        }
    };
    command
        .current_dir(run_dir)
        .env("PYTHONPATH", python_path(&agent.python_dir))
        .env("PYTHONUNBUFFERED", "1")
        .env("KILN_RUN_ID", assignment.run_id.to_string())
        .env("KILN_ATTEMPT", assignment.attempt.to_string())
        .env("KILN_TARGET", agent.config.target.as_str())
        .env("KILN_OUTPUTS_DIR", &outputs)
        .env("KILN_METRICS_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that stopping the run reaches every process it started.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let message = format!("could not start `{}`: {error}", assignment.script);
            reporter.system(message.clone());
            return failed(message);
        }
    };
    let pid = child.id().unwrap_or(0);
    info!(pid, "Script started.");
    let _ = agent
        .uplink
        .send(up(Up::RunEvent(v1::RunEvent {
            run_id: assignment.run_id,
            attempt: assignment.attempt,
            kind: Some(v1::run_event::Kind::Started(v1::Started { pid })),
        })))
        .await;

    let stdout = tokio::spawn(read_lines(
        child.stdout.take().expect("piped"),
        v1::LogStream::Stdout,
        reporter.lines.clone(),
    ));
    let stderr = tokio::spawn(read_lines(
        child.stderr.take().expect("piped"),
        v1::LogStream::Stderr,
        reporter.lines.clone(),
    ));
    let metrics_done = CancellationToken::new();
    let user_metrics = tokio::spawn(accept_metrics(
        metrics_listener,
        reporter.points.clone(),
        metrics_done.clone(),
    ));
    let system_metrics = tokio::spawn(sample_system_metrics(
        pid,
        agent.gpus.clone(),
        agent.config.metrics_interval,
        reporter.points.clone(),
        metrics_done.clone(),
    ));

    // Wait.
    let (status, stop_reason) = tokio::select! {
        status = child.wait() => (status, None),
        _ = stop.cancelled() => {
            let why = reason.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(StopReason::Cancelled);
            reporter.system(match why {
                StopReason::Cancelled => "Run cancelled: stopping its processes.".to_string(),
                StopReason::AgentStopping => "The agent is stopping: stopping the run's processes.".to_string(),
            });
            (terminate(pid, &mut child).await, Some(why))
        }
    };
    // Whatever the script left behind in its group goes too, so the pipes close.
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    for reader in [stdout, stderr] {
        if tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .is_err()
        {
            warn!("A log pipe stayed open after the run's processes ended.");
        }
    }
    metrics_done.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), user_metrics).await;
    let _ = system_metrics.await;

    let (exit_code, exit_text) = match &status {
        Ok(status) => describe_exit(status),
        Err(error) => (None, format!("could not wait for the script: {error}")),
    };

    // Upload outputs.
    let outputs_digest = match upload_outputs(agent, &outputs).await {
        Ok(digest) => digest,
        Err(error) => {
            reporter.system(format!("Outputs could not be uploaded: {error:#}"));
            String::new()
        }
    };
    let (status, message) = match stop_reason {
        Some(StopReason::Cancelled) => (v1::RunStatus::Cancelled, "cancelled by user".to_string()),
        Some(StopReason::AgentStopping) => (
            v1::RunStatus::Failed,
            "the agent stopped while the run was in progress".to_string(),
        ),
        None if exit_code == Some(0) => (v1::RunStatus::Succeeded, String::new()),
        None => (v1::RunStatus::Failed, exit_text),
    };
    v1::Finished {
        status: status as i32,
        exit_code,
        message,
        outputs_digest,
    }
}

fn stopped_before_start(reason: &Mutex<Option<StopReason>>) -> v1::Finished {
    let why = reason
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(StopReason::Cancelled);
    let (status, message) = match why {
        StopReason::Cancelled => (v1::RunStatus::Cancelled, "cancelled by user"),
        StopReason::AgentStopping => (
            v1::RunStatus::Failed,
            "the agent stopped before the run started",
        ),
    };
    v1::Finished {
        status: status as i32,
        exit_code: None,
        message: message.to_string(),
        outputs_digest: String::new(),
    }
}

/// (exit code, description). A run killed by a signal exits with 128 + the signal number,
/// as a shell would report it.
fn describe_exit(status: &std::process::ExitStatus) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => (Some(code), format!("exited with code {code}")),
        (None, Some(signal)) => (Some(128 + signal), format!("killed by signal {signal}")),
        (None, None) => (None, "ended without an exit status".to_string()),
    }
}

/// SIGTERM to the whole group, then SIGKILL after the grace period.
async fn terminate(
    pid: u32,
    child: &mut tokio::process::Child,
) -> std::io::Result<std::process::ExitStatus> {
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = killpg(group, Signal::SIGKILL);
            child.wait().await
        }
    }
}

fn build_command(
    agent: &Agent,
    assignment: &v1::Assignment,
    script: &Path,
) -> Result<tokio::process::Command, Fail> {
    use std::os::unix::fs::PermissionsExt as _;
    if assignment.script.ends_with(".py") {
        let mut command = tokio::process::Command::new(&agent.config.python);
        command.arg(&assignment.script).args(&assignment.args);
        return Ok(command);
    }
    let mode = std::fs::metadata(script)?.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(Fail {
            message: format!(
                "script `{}` is neither a .py file nor executable: `chmod +x {}` before submitting",
                assignment.script, assignment.script
            ),
        });
    }
    let mut command = tokio::process::Command::new(script);
    command.args(&assignment.args);
    Ok(command)
}

fn python_path(kiln_module_dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![kiln_module_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| kiln_module_dir.as_os_str().to_owned())
}

// ---- snapshot ----

/// The snapshot archive in the local cache, downloading it first if needed.
async fn fetch_snapshot(agent: &Agent, digest: &str, reporter: &Reporter) -> Result<PathBuf, Fail> {
    if !snapshot::is_valid_digest(digest) {
        return Err(Fail {
            message: format!("invalid snapshot digest `{digest}`"),
        });
    }
    let hex = &digest[DIGEST_PREFIX.len()..];
    let cached = agent
        .config
        .data_dir
        .join("snapshots")
        .join(format!("{hex}.tar.zst"));
    if cached.is_file() {
        reporter.system(format!(
            "Snapshot {} found in the agent's cache.",
            short(digest)
        ));
        return Ok(cached);
    }
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel);
    let mut stream = client
        .download_blob(v1::DownloadBlobRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|s| Fail {
            message: s.message().to_string(),
        })?
        .into_inner();
    let mut file = tokio::fs::File::from_std(temp.reopen()?);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| Fail {
            message: s.message().to_string(),
        })?;
        bytes += chunk.data.len() as u64;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.data).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    drop(file);
    let path = temp.path().to_path_buf();
    let actual = tokio::task::spawn_blocking(move || snapshot::digest_file(&path)).await??;
    if actual != digest {
        return Err(Fail {
            message: format!("downloaded snapshot hashes to {actual}, expected {digest}"),
        });
    }
    temp.persist(&cached).map_err(|e| e.error)?;
    reporter.system(format!(
        "Snapshot {} fetched ({bytes} bytes).",
        short(digest)
    ));
    Ok(cached)
}

fn short(digest: &str) -> &str {
    let end = (DIGEST_PREFIX.len() + 12).min(digest.len());
    &digest[..end]
}

async fn unpack(archive: &Path, run_dir: &Path) -> Result<(), Fail> {
    let archive = archive.to_path_buf();
    let run_dir = run_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(), Fail> {
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)?;
        }
        std::fs::create_dir_all(&run_dir)?;
        let mut file = std::io::BufReader::new(std::fs::File::open(&archive)?);
        snapshot::unpack(&mut file, &run_dir, &UnpackLimits::default())?;
        Ok(())
    })
    .await?
}

async fn upload_outputs(agent: &Agent, outputs: &Path) -> anyhow::Result<String> {
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let (dir, dest) = (outputs.to_path_buf(), temp.path().to_path_buf());
    let packed = tokio::task::spawn_blocking(move || {
        let options = PackOptions {
            use_ignore_files: false,
            ..PackOptions::default()
        };
        snapshot::pack_dir_to_file(&dir, &options, &dest)
    })
    .await??;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel.clone());
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

// ---- logs and metrics ----

/// Numbers and batches a run's log lines and metric points and hands them to the uplink.
struct Reporter {
    lines: mpsc::Sender<(v1::LogStream, String)>,
    points: mpsc::Sender<(String, f64, Option<i64>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    fn new(agent: &Arc<Agent>, assignment: &v1::Assignment) -> Reporter {
        let (lines, lines_rx) = mpsc::channel(4096);
        let (points, points_rx) = mpsc::channel(4096);
        let (run_id, attempt) = (assignment.run_id, assignment.attempt);
        let log_seq = Arc::new(AtomicU64::new(0));
        let metric_seq = Arc::new(AtomicU64::new(0));
        let uplink = agent.uplink.clone();
        let log_task = tokio::spawn(batch(lines_rx, {
            let uplink = uplink.clone();
            move |items: Vec<(v1::LogStream, String)>| {
                let now = now_ms();
                let lines = items
                    .into_iter()
                    .map(|(stream, text)| v1::LogLine {
                        seq: log_seq.fetch_add(1, Ordering::Relaxed) + 1,
                        stream: stream as i32,
                        text,
                        time_unix_ms: now,
                        cursor: 0,
                        attempt,
                    })
                    .collect();
                let uplink = uplink.clone();
                async move {
                    let _ = uplink
                        .send(up(Up::Logs(v1::LogBatch {
                            run_id,
                            attempt,
                            lines,
                        })))
                        .await;
                }
            }
        }));
        let metric_task = tokio::spawn(batch(
            points_rx,
            move |items: Vec<(String, f64, Option<i64>)>| {
                let now = now_ms();
                let points = items
                    .into_iter()
                    .map(|(name, value, step)| v1::MetricPoint {
                        seq: metric_seq.fetch_add(1, Ordering::Relaxed) + 1,
                        name,
                        value,
                        step,
                        time_unix_ms: now,
                    })
                    .collect();
                let uplink = uplink.clone();
                async move {
                    let _ = uplink
                        .send(up(Up::Metrics(v1::MetricBatch {
                            run_id,
                            attempt,
                            points,
                        })))
                        .await;
                }
            },
        ));
        Reporter {
            lines,
            points,
            tasks: vec![log_task, metric_task],
        }
    }

    /// A line from Kiln itself about the run.
    fn system(&self, text: String) {
        let _ = self.lines.try_send((v1::LogStream::System, text));
    }

    /// Flushes everything reported so far into the uplink.
    async fn close(self) {
        drop(self.lines);
        drop(self.points);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Sends items as soon as they arrive, together with whatever else is already waiting:
/// no added latency when idle, large batches under load.
async fn batch<T, F, Fut>(mut rx: mpsc::Receiver<T>, mut send: F)
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const MAX_BATCH: usize = 1000;
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        send(items).await;
    }
}

async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    stream: v1::LogStream,
    lines: mpsc::Sender<(v1::LogStream, String)>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let n = match (&mut reader)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut buffer)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if buffer.last() == Some(&b'\n') {
            buffer.pop();
            if buffer.last() == Some(&b'\r') {
                buffer.pop();
            }
        }
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if lines.send((stream, text)).await.is_err() {
            return;
        }
    }
}

fn bind_metrics_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))
}

#[derive(serde::Deserialize)]
struct UserPoint {
    name: String,
    value: f64,
    step: Option<i64>,
}

/// Accepts the script's metric connections (one per process that logs) until `done`; each
/// connection is read to its end, so nothing the script sent before exiting is lost.
async fn accept_metrics(
    listener: tokio::net::UnixListener,
    points: mpsc::Sender<(String, f64, Option<i64>)>,
    done: CancellationToken,
) {
    let readers = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { break };
                let points = points.clone();
                readers.spawn(async move {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match serde_json::from_str::<UserPoint>(&line) {
                            Ok(p) if p.value.is_finite() && !p.name.is_empty() => {
                                if points.send((p.name, p.value, p.step)).await.is_err() {
                                    return;
                                }
                            }
                            _ => warn!(line = %line, "Ignoring a malformed metric point."),
                        }
                    }
                });
            }
        }
    }
    readers.close();
    readers.wait().await;
}

async fn sample_system_metrics(
    pid: u32,
    gpus: Arc<dyn crate::gpu::GpuProbe>,
    interval: Duration,
    points: mpsc::Sender<(String, f64, Option<i64>)>,
    done: CancellationToken,
) {
    let mut sampler = crate::telemetry::TreeSampler::new(pid);
    // The first sample comes soon, so that even a short run has one with a CPU reading.
    let first = tokio::time::Instant::now() + interval.min(Duration::from_millis(500));
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (sample, sampler_back, gpu_samples) = {
            let gpus = gpus.clone();
            match tokio::task::spawn_blocking(move || {
                let sample = sampler.sample();
                (sample, sampler, gpus.sample())
            })
            .await
            {
                Ok(result) => result,
                Err(_) => return,
            }
        };
        sampler = sampler_back;
        if sample.n_processes == 0 {
            continue;
        }
        let mut batch = vec![
            ("system/cpu_percent".to_string(), sample.cpu_percent),
            (
                "system/memory_rss_bytes".to_string(),
                sample.memory_rss_bytes as f64,
            ),
        ];
        batch.extend(crate::gpu::sample_points(&gpu_samples));
        for (name, value) in batch {
            if points.send((name, value, None)).await.is_err() {
                return;
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
