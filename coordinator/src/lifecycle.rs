//! The run lifecycle's rules, in one place: how much retry budget a run has, whether an
//! attempt is fenceable, which attempts an agent may keep running, what an agent's
//! `Finished` does to a run, how a gang ends, and how a run is taken from a lost agent.
//! `lib.rs` calls these and sends the messages they imply; `store/` applies the chosen
//! event through the state machine (`kiln_common::run::next`). Nothing here does I/O except
//! through the `Store` it is handed (inside one `Db::call`).
//!
//! The agent never re-derives any of this: it is told (`Assignment.fenceable`, `CancelRun`,
//! `Ack.discard`).

use kiln_common::run::{Outcome, Pending, RunEvent, RunStatus};
use kiln_proto::v1;

use crate::store::{EventFields, NodeRow, Store, is_gang};

/// Whether a run would be placed again if the agent running `attempt` were lost: a gang
/// while `restarts < max_restarts`, a single-node run while `attempt <= max_retries`.
pub fn retry_budget_left(run: &v1::Run) -> bool {
    if is_gang(run) {
        run.restarts < run.max_restarts
    } else {
        run.attempt <= run.max_retries
    }
}

/// Whether an attempt must stop itself when its agent loses the coordinator: exactly when
/// the coordinator would give it to someone else (two copies must never run at once).
/// Sent to the agent in the `Assignment`; the agent does not guess.
pub fn fenceable(run: &v1::Run) -> bool {
    retry_budget_left(run)
}

/// Whether the coordinator still wants `attempt` of `run` running on an agent that holds
/// node `node` of it (found at hello, or when a message of it arrives). Anything else is
/// stopped, whatever the run's state: a retried run waiting in the queue does not want its
/// old attempt back.
pub fn wanted(run: &v1::Run, attempt: u32, node: Option<&NodeRow>) -> bool {
    run.attempt == attempt
        && run.status().domain().is_active()
        && node.is_some_and(|node| node.state != "exited")
}

/// How a message about an attempt relates to the run.
pub enum Ownership {
    /// The run's current, active attempt, and this agent's node rank in it.
    Current(v1::Run, u32),
    /// An attempt this agent held once that is no longer wanted: its lines and points are
    /// still stored (under their own attempt), but it must stop.
    Stale(v1::Run, u32),
    /// The coordinator has no record of this attempt on this agent.
    Unknown,
}

/// Classifies a message of `attempt` from the agent holding `node` of it.
pub fn ownership(run: Option<v1::Run>, attempt: u32, node: Option<NodeRow>) -> Ownership {
    match (run, node) {
        (Some(run), Some(node)) => {
            let rank = node.node_rank;
            if run.attempt == attempt && run.status().domain().is_active() {
                Ownership::Current(run, rank)
            } else {
                Ownership::Stale(run, rank)
            }
        }
        _ => Ownership::Unknown,
    }
}

/// The event a single-node run takes when its agent reports `Finished`.
pub fn finish_event(run: &v1::Run, finished: &v1::Finished) -> RunEvent {
    let stopping = run.status().domain() == RunStatus::Stopping;
    if finished.drained {
        // An operator took the agent out of service: queued again whatever the budget.
        return if stopping {
            RunEvent::Finish(Outcome::Cancelled)
        } else {
            RunEvent::Retry
        };
    }
    if finished.lost || finished.fenced {
        // Node loss (the supervisor vanished) or self-fencing: like a lost agent.
        return if stopping {
            RunEvent::Finish(Outcome::Cancelled)
        } else if retry_budget_left(run) {
            RunEvent::Retry
        } else if finished.lost {
            RunEvent::Lose
        } else {
            RunEvent::Finish(Outcome::Failed)
        };
    }
    RunEvent::Finish(outcome_of(finished))
}

fn outcome_of(finished: &v1::Finished) -> Outcome {
    match finished.status() {
        // A cancel that interrupted the environment's build is a cancel, not a broken
        // environment.
        v1::RunStatus::Cancelled => Outcome::Cancelled,
        _ if finished.env_failed => Outcome::EnvFailed,
        v1::RunStatus::Succeeded => Outcome::Succeeded,
        _ => Outcome::Failed,
    }
}

/// The run's message for an agent's report: its own, or why the outputs were not kept.
pub fn finish_message(finished: &v1::Finished) -> String {
    if finished.outputs_error.is_empty() {
        finished.message.clone()
    } else if finished.message.is_empty() {
        format!("outputs not kept: {}", finished.outputs_error)
    } else {
        format!(
            "{}; outputs not kept: {}",
            finished.message, finished.outputs_error
        )
    }
}

/// What happens to a gang run when one of its nodes reports `Finished`.
#[derive(Debug, PartialEq)]
pub enum GangStep {
    /// Nothing yet: other nodes are still running (or stopping).
    Wait,
    /// Every node ended with 0.
    Succeed,
    /// The first failure: the run stops every other node, then takes `pending`.
    Stop {
        pending: Pending,
        message: String,
        rank: u32,
    },
    /// A stopping gang whose last node has now ended: take the pending outcome.
    Settle,
}

/// Decides a gang's next step after node `node` reported `finished`; `nodes` are the
/// attempt's nodes with this one already marked exited.
pub fn gang_step(run: &v1::Run, node: u32, finished: &v1::Finished, nodes: &[NodeRow]) -> GangStep {
    let all_exited = nodes.iter().all(|n| n.state == "exited");
    if run.status().domain() == RunStatus::Stopping {
        return if all_exited {
            GangStep::Settle
        } else {
            GangStep::Wait
        };
    }
    // A node whose outputs were not kept still succeeded (the run's message says so).
    let succeeded = finished.status() == v1::RunStatus::Succeeded
        && !finished.fenced
        && !finished.lost
        && !finished.drained;
    if succeeded {
        let all_zero = nodes
            .iter()
            .all(|n| n.state == "exited" && n.exit_code == Some(0));
        return if all_zero {
            GangStep::Succeed
        } else {
            GangStep::Wait
        };
    }
    let rank = finished
        .failed_rank
        .unwrap_or(node * run.procs_per_node.max(1));
    let agent_id = nodes
        .iter()
        .find(|n| n.node_rank == node)
        .map(|n| n.agent_id.as_str())
        .unwrap_or_default();
    let cause = format!(
        "rank {rank} (node {node}, agent {agent_id}) failed: {}",
        finished.message
    );
    let restart = retry_budget_left(run);
    let (pending, message) = if finished.drained {
        // A drained node is not a failure: the gang starts again elsewhere, whatever the budget.
        (
            Pending::Retry,
            format!("restarting the gang: node {node} (agent {agent_id}) was drained"),
        )
    } else if restart {
        (
            Pending::Retry,
            format!(
                "restarting the gang ({} of {}): {cause}",
                run.restarts + 1,
                run.max_restarts
            ),
        )
    } else if finished.env_failed {
        (Pending::EnvFailed, cause)
    } else if finished.lost {
        (Pending::Lost, cause)
    } else {
        (Pending::Failed, cause)
    };
    GangStep::Stop {
        pending,
        message,
        rank,
    }
}

/// A run attempt taken away from its agents: the nodes that must be told to stop.
pub struct Released {
    pub run_id: i64,
    pub attempt: u32,
    pub agents: Vec<String>,
}

/// Takes a run away from an agent that no longer has it (lost, revoked, or restarted
/// without it): a run that never started goes back to the queue (nothing of it ran); a
/// running one is queued again for a new attempt while its retry budget lasts, and is lost
/// after that; a stopping one takes its pending outcome (nothing more will come from that
/// node). Every node of the attempt is released with it (a gang never runs with a node
/// missing). With `requeue`, a running run is queued again whatever its budget.
pub fn release_run(
    store: &mut Store,
    run: &v1::Run,
    fields: &EventFields,
    requeue: bool,
) -> Option<Released> {
    let event = match run.status().domain() {
        RunStatus::Assigned => RunEvent::Requeue,
        RunStatus::Stopping => RunEvent::Settle(
            store
                .pending(run.id)
                .ok()
                .flatten()
                .unwrap_or(Pending::Cancelled),
        ),
        _ if requeue || retry_budget_left(run) => RunEvent::Retry,
        _ => RunEvent::Lose,
    };
    let agents = store
        .run_nodes(run.id, run.attempt)
        .map(|nodes| {
            nodes
                .into_iter()
                .filter(|n| n.state != "exited")
                .map(|n| n.agent_id)
                .collect()
        })
        .unwrap_or_default();
    store
        .transition(run.id, Some(run.attempt), event, fields)
        .ok()
        .map(|run| Released {
            run_id: run.id,
            attempt: run.attempt,
            agents,
        })
}

/// What node `node_rank` of a run's new attempt is told to run; `checkpoint` is the last
/// checkpoint that node rank uploaded in an earlier attempt.
pub fn assignment(run: &v1::Run, node_rank: u32, checkpoint: Option<String>) -> v1::Assignment {
    let gpus = run
        .placement
        .get(node_rank as usize)
        .map(|node| node.gpus.clone())
        .unwrap_or_default();
    v1::Assignment {
        environment: run.environment.clone(),
        resources: run.resources,
        env: run.env.clone(),
        // Opened from the store by the caller (they are not part of the run).
        secrets: Default::default(),
        timeout_s: run.timeout_s,
        gpus,
        run_id: run.id,
        attempt: run.attempt,
        name: run.name.clone(),
        snapshot_digest: run.snapshot_digest.clone(),
        script: run.script.clone(),
        args: run.args.clone(),
        max_retries: run.max_retries,
        checkpoint_interval_s: run.checkpoint_interval_s,
        checkpoint_digest: checkpoint.unwrap_or_else(|| {
            if node_rank == 0 {
                run.checkpoint_digest.clone()
            } else {
                String::new()
            }
        }),
        fenceable: fenceable(run),
        gang: is_gang(run).then(|| v1::Gang {
            nodes: run.nodes,
            node_rank,
            procs_per_node: run.procs_per_node.max(1),
            launcher: run.launcher.clone(),
            restart_count: run.restarts,
            gpus_per_node: run.gpus_per_node,
            restartable: fenceable(run),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: v1::RunStatus, attempt: u32, max_retries: u32) -> v1::Run {
        v1::Run {
            id: 1,
            status: status as i32,
            attempt,
            max_retries,
            nodes: 1,
            procs_per_node: 1,
            ..Default::default()
        }
    }

    fn node(state: &str, exit_code: Option<i32>, rank: u32) -> NodeRow {
        NodeRow {
            node_rank: rank,
            agent_id: format!("ag-{rank}"),
            state: state.into(),
            address: String::new(),
            port: 0,
            exit_code,
            gpus: Vec::new(),
        }
    }

    #[test]
    fn an_old_attempt_is_unwanted_whatever_the_runs_state() {
        let running = node("running", None, 0);
        // The case of issue 12: attempt 1 was given up and the run waits in the queue for
        // attempt 2; the agent comes back with attempt 1 still running.
        assert!(!wanted(
            &run(v1::RunStatus::Queued, 1, 1),
            1,
            Some(&running)
        ));
        assert!(!wanted(
            &run(v1::RunStatus::Running, 2, 1),
            1,
            Some(&running)
        ));
        assert!(!wanted(&run(v1::RunStatus::Lost, 1, 0), 1, Some(&running)));
        assert!(!wanted(&run(v1::RunStatus::Running, 1, 0), 1, None));
        assert!(wanted(
            &run(v1::RunStatus::Running, 1, 0),
            1,
            Some(&running)
        ));
        assert!(wanted(
            &run(v1::RunStatus::Stopping, 1, 0),
            1,
            Some(&running)
        ));
    }

    #[test]
    fn a_vanished_supervisor_is_node_loss() {
        let lost = v1::Finished {
            status: v1::RunStatus::Failed as i32,
            lost: true,
            ..Default::default()
        };
        assert_eq!(
            finish_event(&run(v1::RunStatus::Running, 1, 2), &lost),
            RunEvent::Retry
        );
        assert_eq!(
            finish_event(&run(v1::RunStatus::Running, 1, 0), &lost),
            RunEvent::Lose
        );
    }

    #[test]
    fn a_drained_attempt_is_queued_again_whatever_its_budget() {
        let drained = v1::Finished {
            status: v1::RunStatus::Failed as i32,
            drained: true,
            ..Default::default()
        };
        // No retries left: a fault would end the run; a drain is not a fault.
        assert_eq!(
            finish_event(&run(v1::RunStatus::Running, 1, 0), &drained),
            RunEvent::Retry
        );
        assert_eq!(
            finish_event(&run(v1::RunStatus::Stopping, 1, 0), &drained),
            RunEvent::Finish(Outcome::Cancelled)
        );
        let mut gang = run(v1::RunStatus::Running, 1, 0);
        gang.nodes = 2;
        let nodes = [node("running", None, 0), node("exited", Some(143), 1)];
        match gang_step(&gang, 1, &drained, &nodes) {
            GangStep::Stop {
                pending, message, ..
            } => {
                assert_eq!(pending, Pending::Retry);
                assert!(message.contains("drained"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gang_stops_every_node_before_it_ends() {
        let mut gang = run(v1::RunStatus::Running, 1, 0);
        gang.nodes = 2;
        gang.max_restarts = 1;
        let failed = v1::Finished {
            status: v1::RunStatus::Failed as i32,
            exit_code: Some(3),
            failed_rank: Some(1),
            ..Default::default()
        };
        let nodes = [node("running", None, 0), node("exited", Some(3), 1)];
        match gang_step(&gang, 1, &failed, &nodes) {
            GangStep::Stop { pending, rank, .. } => {
                assert_eq!((pending, rank), (Pending::Retry, 1));
            }
            other => panic!("{other:?}"),
        }
        gang.status = v1::RunStatus::Stopping as i32;
        let cancelled = v1::Finished {
            status: v1::RunStatus::Cancelled as i32,
            ..Default::default()
        };
        assert_eq!(gang_step(&gang, 0, &cancelled, &nodes), GangStep::Wait);
        let all = [node("exited", Some(143), 0), node("exited", Some(3), 1)];
        assert_eq!(gang_step(&gang, 0, &cancelled, &all), GangStep::Settle);
    }
}
