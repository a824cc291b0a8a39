//! Following an attempt: the spool's lines and points go to the coordinator until it has
//! acknowledged all of them; cancel, fencing, drain and the time limit stop the script.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::v1::{self, agent_message::Kind as Up};
use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::report::{FinishedRecord, Outcome, finish, remove_attempt};
use super::transfer::upload_checkpoint;
use super::{AckState, Phase, RunControl, enter, phase_of};
use crate::Agent;
use crate::driver::{Driver, Recovered};
use crate::session::up;
use crate::spool::{self, Acked, Exit, LogRecord, MetricRecord, ProcessRecord, Spec, StateDir};

/// Time a cancelled run gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often the spool is checked for new lines: every [`POLL_MIN`] while lines come, the
/// wait doubling up to [`POLL_MAX`] while the run is quiet (a quiet run used to cost a
/// spool read, an `exit.json` probe and a `/proc` read every 5 ms; see bench/idle). A line
/// written after a quiet stretch waits at most `POLL_MAX`.
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(100);

/// Most bytes of unacknowledged lines and points one attempt holds in memory, sent or not;
/// the rest waits in the spool file. Bounds the agent's memory per run and what one
/// session's resend puts on the wire.
pub(crate) const MAX_UNACKED_BYTES: usize = 8 << 20;

/// Most spool bytes read at once.
const MAX_READ_BYTES: usize = 4 << 20;

/// The largest spool record (a 64 KiB line and its JSON escaping and fields): a read needs
/// at least this much room to make progress.
const MAX_LINE_RECORD_BYTES: usize = 400 << 10;

/// Largest batch message, in bytes: well below the 16 MiB gRPC message limit.
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// [`enter`]s `phase` unless the agent stops first (a test may hold the attempt there):
/// whether it did.
async fn enter_unless_detached(state: &StateDir, phase: Phase, control: &RunControl) -> bool {
    tokio::select! {
        _ = control.detach.cancelled() => false,
        _ = enter(state, phase) => true,
    }
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
    if phase_of(&state).is_none_or(|phase| phase < Phase::Follow)
        && !enter_unless_detached(&state, Phase::Follow, &control).await
    {
        return;
    }
    let mut sessions = agent.session_generation.subscribe();
    sessions.mark_changed();
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    let spec: Option<Spec> = spool::read_json(&state.spec()).ok().flatten();
    follower.driver = spec
        .as_ref()
        .map(|spec| crate::driver::for_attempt(spec, &state));
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
    let mut poll = POLL_MIN;
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
            follower.stop(Signal::SIGTERM);
            stopping = Some(Instant::now());
            timed_out = true;
        }
        if let Some(since) = stopping
            && !killed
            && since.elapsed() > STOP_GRACE
        {
            follower.stop(Signal::SIGKILL);
            killed = true;
        }
        let idle = if follower.more_to_read() {
            poll = POLL_MIN;
            Duration::ZERO
        } else if progressed || stopping.is_some() {
            poll = POLL_MIN;
            poll
        } else {
            let wait = poll;
            poll = (poll * 2).min(POLL_MAX);
            wait
        };
        tokio::select! {
            _ = control.detach.cancelled() => return,
            _ = control.cancel.cancelled(), if stopping.is_none() && ended.is_none() => {
                info!("Cancel: stopping the run's processes.");
                follower.stop(Signal::SIGTERM);
                stopping = Some(Instant::now());
            }
            _ = control.fence.cancelled(), if stopping.is_none() && ended.is_none() => {
                warn!("No coordinator for too long: fencing the attempt off, stopping its processes.");
                follower.stop(Signal::SIGTERM);
                stopping = Some(Instant::now());
            }
            _ = control.drain.cancelled(), if stopping.is_none() && ended.is_none() => {
                info!("Agent draining: stopping the run's processes; the run goes back to the queue.");
                follower.stop(Signal::SIGTERM);
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
    if phase_of(&state).is_none_or(|phase| phase < Phase::Collect)
        && !enter_unless_detached(&state, Phase::Collect, &control).await
    {
        return;
    }
    // The supervisor cleans up after its script; if it died, nothing else would: the
    // driver removes what is left of this attempt (a Docker run's containers, by label).
    if let Some(driver) = &follower.driver {
        match driver.destroy().await {
            Ok(0) => {}
            Ok(n) => warn!(removed = n, "Removed what the run's supervisor left."),
            Err(error) => {
                warn!(error = %format!("{error:#}"), "Could not check for what the run's supervisor left.")
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
        if !enter_unless_detached(&state, Phase::Report, &control).await {
            return;
        }
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
    /// How the script is stopped and found again; `None` until `spec.json` exists.
    driver: Option<Box<dyn Driver>>,
}

/// Approximate encoded size of a log line (its text plus the fields around it).
fn line_bytes(line: &v1::LogLine) -> usize {
    line.text.len() + 32
}

fn point_bytes(point: &v1::MetricPoint) -> usize {
    point.name.len() + 48
}

impl Follower {
    pub(super) fn new(agent: &Arc<Agent>, run_id: i64, attempt: u32, state: &StateDir) -> Follower {
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
            driver: None,
        }
    }

    /// Reads new spool records while the attempt's byte budget allows; returns whether
    /// anything new was read. Back-pressure: with the budget spent, nothing is read until
    /// acknowledgements free it (the records wait in the spool file, nothing is dropped).
    pub(super) fn read_spool(&mut self) -> bool {
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
    pub(super) fn has_unsent(&self) -> bool {
        (!self.started_sent && self.child.is_some())
            || self.sent_logs < self.unacked_logs.len()
            || self.sent_metrics < self.unacked_metrics.len()
    }

    /// The next message to send on this session (`Started`, then log batches, then metric
    /// batches), each at most [`MAX_BATCH_BYTES`]; marks it sent.
    pub(super) fn next_message(&mut self) -> Option<v1::AgentMessage> {
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
    pub(super) fn resend(&mut self) {
        self.sent_logs = 0;
        self.sent_metrics = 0;
        self.started_sent = false;
    }

    pub(super) fn acknowledged(&mut self, ack: AckState) {
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
    /// rebooted): the script cannot be followed any more. (Its driver stopped what was left.)
    fn supervisor_vanished(&self) -> Option<Exit> {
        match self.driver.as_ref()?.recover() {
            Recovered::Starting | Recovered::Running => None,
            Recovered::Ended(exit) => Some(exit),
        }
    }

    /// Stops the script through its driver (nothing to stop before `spec.json` exists).
    fn stop(&self, signal: Signal) {
        if let Some(driver) = &self.driver {
            driver.stop(signal);
        }
    }
}
