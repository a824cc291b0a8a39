//! The end of an attempt: its outputs uploaded, its final report (persisted so that a
//! restarted agent reports the same), and its directory removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_common::snapshot::SnapshotError;
use kiln_proto::v1;
use tracing::{info, warn};

use super::RunControl;
use super::transfer::upload_dir;
use crate::Agent;
use crate::spool::{self, Exit, Spec};

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
pub(super) struct Outcome {
    pub(super) cancelled: bool,
    pub(super) fenced: bool,
    pub(super) drained: bool,
    pub(super) timed_out_after_s: Option<u32>,
}

/// The final report for an attempt whose script has ended (or never started). Uploads the
/// outputs first, retrying until they are stored or refused for good (see
/// [`upload_outputs`]); `None` when the agent is stopping meanwhile.
pub(super) async fn finish(
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
pub(super) struct FinishedRecord {
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
    pub(super) fn from_wire(f: &v1::Finished) -> Self {
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
    pub(super) fn into_wire(self) -> v1::Finished {
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
}
