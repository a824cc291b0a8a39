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
//!        │ cancel (from queued, assigned or running)        ──▶ cancelled
//!        │ lose   (from assigned or running: agent gone)    ──▶ lost
//!        │ retry  (from assigned or running: agent gone, retry budget left) ──▶ queued
//! ```
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
        (S::Queued | S::Assigned | S::Running, E::Cancel) => S::Cancelled,
        (S::Assigned | S::Running, E::Lose) => S::Lost,
        (S::Assigned | S::Running, E::Retry) => S::Queued,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Assigned,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Lost,
        RunStatus::EnvFailed,
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
        matches!(self, RunStatus::Assigned | RunStatus::Running)
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
