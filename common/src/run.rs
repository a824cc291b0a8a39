//! The run state machine. The coordinator is the only owner of run state; it moves a run
//! only through [`next`], so every transition that can happen is listed here.
//!
//! ```text
//!            assign             start
//!   queued ─────────▶ assigned ───────▶ running ──finish──▶ succeeded | failed
//!     ▲  │              │  │               │
//!     │  │   requeue    │  └──finish───────┼─────────────▶ failed (did not start)
//!     └──┼──────────────┘                  │
//!   assigned ──finish(env_failed)──▶ env_failed (the environment could not be built)
//!        │ cancel (from queued)                             ──▶ cancelled
//!        │ lose   (from assigned or running: agent gone)    ──▶ lost
//!        │ retry  (from assigned or running: agent gone, retry budget left) ──▶ queued
//!
//!   assigned | running ──cancel | stop──▶ stopping ──finish(outcome)──▶ that outcome
//!                                            │ └─settle(pending)──▶ cancelled | failed |
//!                                            │                      env_failed | lost | queued
//!                                            └─cancel──▶ stopping (the pending outcome
//!                                                        becomes cancelled)
//! ```
//! `stopping` is how a placed run ends when the coordinator decides its end (a cancel, a
//! gang node's failure): every node is told to stop, and the run reaches its end only once
//! the nodes have stopped and delivered their last lines (`finish` from a single node, or
//! `settle` with the recorded [`Pending`] outcome once every node of a gang has reported or
//! its agent is gone). A stopping run still holds its agents' slots and GPUs.
//! Each assignment is a new *attempt* (numbered from 1); a retry does not change the number
//! until the run is assigned again.
//! Terminal states (succeeded, failed, cancelled, lost) never change again.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Lost,
    EnvFailed,
    /// Told to stop (cancelled, or a gang node failed); ends once its nodes have stopped.
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEvent {
    /// The scheduler placed the run on an agent.
    Assign,
    /// The placement was undone before the script started (the agent went away).
    Requeue,
    /// The agent started the script.
    Start,
    /// The agent reports the end of the run with this outcome.
    Finish(Outcome),
    /// A user cancelled the run.
    Cancel,
    /// The agent holding the run was lost.
    Lose,
    /// The agent holding the run was lost and the run may be tried again.
    Retry,
    /// The coordinator decided how a placed run ends (a gang node failed): its nodes are
    /// told to stop and the run waits in `stopping` for them.
    Stop,
    /// Every node of a stopping run has stopped (or is gone): the run takes its pending
    /// outcome.
    Settle(Pending),
}

/// How a `stopping` run ends once its nodes have stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    Cancelled,
    Failed,
    EnvFailed,
    Lost,
    /// Queued again for a new attempt (a gang restart).
    Retry,
}

impl Pending {
    pub fn as_str(self) -> &'static str {
        match self {
            Pending::Cancelled => "cancelled",
            Pending::Failed => "failed",
            Pending::EnvFailed => "env_failed",
            Pending::Lost => "lost",
            Pending::Retry => "retry",
        }
    }

    pub fn parse(text: &str) -> Option<Pending> {
        [
            Pending::Cancelled,
            Pending::Failed,
            Pending::EnvFailed,
            Pending::Lost,
            Pending::Retry,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }

    fn status(self) -> RunStatus {
        match self {
            Pending::Cancelled => RunStatus::Cancelled,
            Pending::Failed => RunStatus::Failed,
            Pending::EnvFailed => RunStatus::EnvFailed,
            Pending::Lost => RunStatus::Lost,
            Pending::Retry => RunStatus::Queued,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    /// The environment (Conda, venv, image) could not be built; the script never started.
    EnvFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a run that is {from} cannot take the event {event:?}")]
pub struct InvalidTransition {
    pub from: RunStatus,
    pub event: RunEvent,
}

/// The status a run moves to when `event` happens in status `from`.
pub fn next(from: RunStatus, event: RunEvent) -> Result<RunStatus, InvalidTransition> {
    use RunEvent as E;
    use RunStatus as S;
    let to = match (from, event) {
        (S::Queued, E::Assign) => S::Assigned,
        (S::Assigned, E::Requeue) => S::Queued,
        (S::Assigned, E::Start) => S::Running,
        (S::Assigned | S::Running, E::Finish(outcome)) => match outcome {
            Outcome::Succeeded if from == S::Running => S::Succeeded,
            Outcome::Succeeded | Outcome::Failed => S::Failed,
            Outcome::Cancelled => S::Cancelled,
            Outcome::EnvFailed => S::EnvFailed,
        },
        (S::Queued, E::Cancel) => S::Cancelled,
        (S::Assigned | S::Running | S::Stopping, E::Cancel) => S::Stopping,
        (S::Assigned | S::Running, E::Stop) => S::Stopping,
        (S::Stopping, E::Finish(outcome)) => match outcome {
            Outcome::Succeeded => S::Succeeded,
            Outcome::Failed => S::Failed,
            Outcome::Cancelled => S::Cancelled,
            Outcome::EnvFailed => S::EnvFailed,
        },
        (S::Stopping, E::Settle(pending)) => pending.status(),
        (S::Assigned | S::Running, E::Lose) => S::Lost,
        (S::Assigned | S::Running, E::Retry) => S::Queued,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

impl RunStatus {
    pub const ALL: [RunStatus; 9] = [
        RunStatus::Queued,
        RunStatus::Assigned,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Lost,
        RunStatus::EnvFailed,
        RunStatus::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Assigned => "assigned",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Lost => "lost",
            RunStatus::EnvFailed => "env_failed",
            RunStatus::Stopping => "stopping",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::Lost
                | RunStatus::EnvFailed
        )
    }

    /// Placed on an agent and not yet ended: the run holds one of the agent's slots.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RunStatus::Assigned | RunStatus::Running | RunStatus::Stopping
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown run status `{s}`"))
    }
}

/// What `kiln submit` exits with when a run did not give an exit code of its own.
pub mod exit_codes {
    /// The run could not start (script missing, snapshot unusable, agent lost before start).
    pub const DID_NOT_START: i32 = 125;
    /// The run was cancelled.
    pub const CANCELLED: i32 = 130;
    /// The run was lost with its agent.
    pub const LOST: i32 = 137;
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunEvent as E;
    use RunStatus as S;

    #[test]
    fn transitions() {
        let cases = [
            (S::Queued, E::Assign, Some(S::Assigned)),
            (S::Queued, E::Start, None),
            (S::Queued, E::Cancel, Some(S::Cancelled)),
            (S::Assigned, E::Start, Some(S::Running)),
            (S::Assigned, E::Requeue, Some(S::Queued)),
            (S::Assigned, E::Finish(Outcome::Failed), Some(S::Failed)),
            // A run that never started cannot have succeeded.
            (S::Assigned, E::Finish(Outcome::Succeeded), Some(S::Failed)),
            (
                S::Running,
                E::Finish(Outcome::Succeeded),
                Some(S::Succeeded),
            ),
            (
                S::Running,
                E::Finish(Outcome::Cancelled),
                Some(S::Cancelled),
            ),
            (S::Running, E::Lose, Some(S::Lost)),
            // A cancel of a placed run waits for its nodes to stop and deliver.
            (S::Running, E::Cancel, Some(S::Stopping)),
            (S::Assigned, E::Cancel, Some(S::Stopping)),
            (S::Stopping, E::Cancel, Some(S::Stopping)),
            (S::Running, E::Stop, Some(S::Stopping)),
            (S::Queued, E::Stop, None),
            (
                S::Stopping,
                E::Finish(Outcome::Cancelled),
                Some(S::Cancelled),
            ),
            (S::Stopping, E::Settle(Pending::Retry), Some(S::Queued)),
            (S::Stopping, E::Settle(Pending::Failed), Some(S::Failed)),
            (S::Stopping, E::Settle(Pending::Lost), Some(S::Lost)),
            (S::Running, E::Settle(Pending::Failed), None),
            // A stopping run ends by settling, not by being lost or retried directly.
            (S::Stopping, E::Lose, None),
            (S::Stopping, E::Retry, None),
            (S::Stopping, E::Start, None),
            (
                S::Assigned,
                E::Finish(Outcome::EnvFailed),
                Some(S::EnvFailed),
            ),
            (S::Running, E::Retry, Some(S::Queued)),
            (S::Queued, E::Retry, None),
            (S::Running, E::Requeue, None),
            (S::Queued, E::Lose, None),
        ];
        for (from, event, expected) in cases {
            assert_eq!(next(from, event).ok(), expected, "{from} + {event:?}");
        }
    }

    #[test]
    fn terminal_states_never_change() {
        let events = [
            E::Assign,
            E::Requeue,
            E::Start,
            E::Finish(Outcome::Succeeded),
            E::Cancel,
            E::Lose,
            E::Retry,
            E::Stop,
            E::Settle(Pending::Retry),
        ];
        for from in S::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in events {
                assert!(next(from, event).is_err(), "{from} + {event:?}");
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for status in S::ALL {
            assert_eq!(status.as_str().parse::<S>(), Ok(status));
        }
    }
}
