//! One run attempt on this agent, in named phases (see [`Phase`]): fetch the snapshot
//! (cache by digest, verified) → unpack it into a fresh `work/` → build the environment →
//! rendezvous with the gang's other nodes → launch the run's supervisor (`supervisor.rs`),
//! which starts the script through its [`Driver`](crate::driver::Driver) → follow the
//! attempt's spool until the script has ended → collect its outputs and last checkpoint →
//! report `Finished` and wait for its ack. Only then is the attempt's directory removed.
//!
//! - `prepare.rs`: the phases up to the launch (the script's command, environment, user).
//! - `gang.rs`: the rendezvous and the torchrun-style environment of a gang node.
//! - `transfer.rs`: snapshot and checkpoint downloads and uploads.
//! - `follow.rs`: the spool follower, and the loop that follows an attempt to its report.
//! - `report.rs`: the outputs upload, the final report, and removing the attempt.
//!
//! Stopping the agent leaves supervisors and scripts running; the next agent process finds
//! them in `runs/` and attaches again ([`Agent::reattach_runs`](crate::Agent)). A cancel
//! from the coordinator stops the script through its driver (SIGTERM, SIGKILL after
//! [`STOP_GRACE`](follow::STOP_GRACE)).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::Agent;
use crate::spool::{self, Exit, LogRecord, StateDir};

mod follow;
mod gang;
mod prepare;
mod report;
mod transfer;

use follow::Follower;
pub(crate) use follow::attach;
pub(crate) use prepare::start_supervisor;
pub use prepare::{DEFAULT_PASS_ENV, default_pass_env, inherited_env};
pub(crate) use report::remove_attempt;

/// How often the spool is read while the attempt is being prepared.
const PREPARE_POLL: Duration = Duration::from_millis(100);

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

/// The phases of an attempt, in order. `state/phase.json` holds the one the attempt is in
/// (written as it enters it) and `state/assignment.pb` what the coordinator assigned, so
/// that an agent restarted in any phase takes the attempt up where it was instead of
/// losing it ([`resume`]): before [`Phase::Launch`] it prepares again from that phase (the
/// snapshot and environment caches make the finished steps cheap; `work/` is kept once
/// unpacked); at the launch it starts the supervisor if it never started; from
/// [`Phase::Follow`] on, the supervisor and the spool, `exit.json` and `finished.json`
/// carry the attempt.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The snapshot is fetched into the agent's cache (or found there, verified).
    Fetch,
    /// The snapshot is unpacked into a fresh `work/`.
    Unpack,
    /// The environment is built or found (conda, venv, Docker image), the run's user
    /// claimed, its checkpoint restored.
    Environment,
    /// A gang node waits for the coordinator's launch.
    Rendezvous,
    /// `spec.json` is written and the supervisor started.
    Launch,
    /// The script runs; its spool is followed.
    Follow,
    /// The script has ended: its last checkpoint and its outputs are uploaded.
    Collect,
    /// The final report is sent until the coordinator acknowledges it.
    Report,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Fetch,
        Phase::Unpack,
        Phase::Environment,
        Phase::Rendezvous,
        Phase::Launch,
        Phase::Follow,
        Phase::Collect,
        Phase::Report,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Unpack => "unpack",
            Phase::Environment => "environment",
            Phase::Rendezvous => "rendezvous",
            Phase::Launch => "launch",
            Phase::Follow => "follow",
            Phase::Collect => "collect",
            Phase::Report => "report",
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PhaseRecord {
    phase: Phase,
}

/// The phase an attempt's state directory says it is in; `None` when it never said (an
/// attempt of an agent from before phases, or one that had not begun).
pub(crate) fn phase_of(state: &StateDir) -> Option<Phase> {
    spool::read_json::<PhaseRecord>(&state.0.join("phase.json"))
        .ok()
        .flatten()
        .map(|record| record.phase)
}

/// Records that the attempt enters `phase`, then (a test's hook, see [`held`]) may hold it
/// there.
async fn enter(state: &StateDir, phase: Phase) {
    if let Err(error) = spool::write_json(&state.0.join("phase.json"), &PhaseRecord { phase }) {
        // A restart would then resume from the phase before: more work, nothing lost.
        warn!(phase = phase.name(), error = %error, "Could not record the attempt's phase.");
    }
    tracing::debug!(phase = phase.name(), "Attempt phase.");
    if held(phase) {
        info!(
            phase = phase.name(),
            "Holding the attempt at this phase (KILN_AGENT_HOLD_PHASE)."
        );
        std::future::pending::<()>().await;
    }
}

/// Tests kill the agent in every phase: `KILN_AGENT_HOLD_PHASE=NAME` (not a documented
/// setting) makes the attempt wait forever once it has entered that phase.
fn held(phase: Phase) -> bool {
    std::env::var("KILN_AGENT_HOLD_PHASE").is_ok_and(|held| held == phase.name())
}

fn assignment_path(state: &StateDir) -> PathBuf {
    state.0.join("assignment.pb")
}

/// Keeps the assignment with the attempt (it holds the run's secrets: `state/` is the
/// agent's alone), for [`resume`].
fn save_assignment(state: &StateDir, assignment: &v1::Assignment) -> anyhow::Result<()> {
    use prost::Message as _;
    let path = assignment_path(state);
    let temp = path.with_extension("pb.tmp");
    std::fs::write(&temp, assignment.encode_to_vec())?;
    std::fs::rename(&temp, &path)?;
    Ok(())
}

/// The assignment of an attempt that had not launched when the agent stopped, and the
/// phase it was in: [`execute`] takes it up from there.
pub(crate) fn resumable(state: &StateDir) -> Option<(v1::Assignment, Phase)> {
    use prost::Message as _;
    let phase = phase_of(state)?;
    if phase > Phase::Launch {
        return None;
    }
    let bytes = std::fs::read(assignment_path(state)).ok()?;
    let assignment = v1::Assignment::decode(bytes.as_slice()).ok()?;
    Some((assignment, phase))
}

/// Prepares and starts a newly assigned attempt (or, with `resume`, one a previous agent
/// process was preparing, from the phase it was in), then follows it.
pub(crate) async fn execute(
    agent: Arc<Agent>,
    assignment: v1::Assignment,
    control: RunControl,
    resume: Option<Phase>,
) {
    let span = info_span!(
        "run",
        run_id = assignment.run_id,
        attempt = assignment.attempt
    );
    async move {
        match resume {
            None => {
                info!(script = %assignment.script, snapshot = %assignment.snapshot_digest, "Run assigned.")
            }
            Some(phase) => {
                info!(phase = phase.name(), "Resuming the preparation of a run left by the previous agent process.")
            }
        }
        let root = run_root(&agent, assignment.run_id, assignment.attempt);
        let state = StateDir(root.join("state"));
        // The preparation's own lines (snapshot fetch, environment build output, image pull)
        // stream to the coordinator while it runs, not only once the script has started.
        let mut follower = Follower::new(&agent, assignment.run_id, assignment.attempt, &state);
        let prepared = {
            let preparing =
                prepare::prepare(&agent, &assignment, &root, &state, &control, resume);
            tokio::pin!(preparing);
            let mut sessions = agent.session_generation.subscribe();
            let mut acks = control.acks.clone();
            loop {
                tokio::select! {
                    result = &mut preparing => break result,
                    // A stopping agent does not wait for a download, an environment build or
                    // a gang's launch: nothing runs yet, so the preparation stops (a build
                    // is killed with its future) and the next agent process takes it up
                    // again from the phase it was in (see `Phase`).
                    _ = control.detach.cancelled() => {
                        info!("Agent stopping: the run's preparation stops here; the next agent process resumes it.");
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
                time_ms: crate::identity::now_ms(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_attempt_is_resumable_with_its_assignment_until_it_has_launched() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir(dir.path().to_path_buf());
        assert_eq!(phase_of(&state), None);
        let assignment = v1::Assignment {
            run_id: 7,
            attempt: 2,
            script: "train.py".into(),
            env: [("TOKEN".to_string(), "s3cret".to_string())].into(),
            ..Default::default()
        };
        save_assignment(&state, &assignment).unwrap();
        // Not begun: nothing to resume.
        assert!(resumable(&state).is_none());
        for phase in Phase::ALL {
            enter(&state, phase).await;
            assert_eq!(phase_of(&state), Some(phase));
            match resumable(&state) {
                Some((kept, at)) => {
                    assert!(phase <= Phase::Launch, "{phase:?}");
                    assert_eq!((kept, at), (assignment.clone(), phase));
                }
                // From the follow phase on, the supervisor's files carry the attempt.
                None => assert!(phase > Phase::Launch, "{phase:?}"),
            }
        }
        // The phases are in the order the attempt goes through them.
        assert!(Phase::ALL.windows(2).all(|w| w[0] < w[1]));
    }
}
