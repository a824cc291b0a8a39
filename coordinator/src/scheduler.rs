//! Placement: which queued run goes to which agent. [`assign`] is a pure function of the
//! agents' free slots and the queue, so the policy is tested without a database or network;
//! [`crate::Coordinator::schedule`] runs it whenever something changed.
//!
//! Policy: each target's queue is served first-in first-out; a run goes to a regular agent of
//! its target with the most free slots, and to a low-priority (preemptible) agent only when
//! every regular agent is full (ties: the agent id, for determinism). A run never goes to an
//! agent of another target.

use std::collections::HashMap;

/// An online agent and how many more runs it can take.
#[derive(Debug, Clone)]
pub struct AgentSlots {
    pub agent_id: String,
    pub target: String,
    pub free: u32,
    pub low_priority: bool,
}

/// A queued run, in queue order.
#[derive(Debug, Clone)]
pub struct QueuedRun {
    pub run_id: i64,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub run_id: i64,
    pub agent_id: String,
}

pub fn assign(agents: &[AgentSlots], queue: &[QueuedRun]) -> Vec<Assignment> {
    // (regular, free slots, id): the largest tuple wins, ids compared in reverse.
    let mut free: HashMap<&str, Vec<(bool, u32, &str)>> = HashMap::new();
    for agent in agents.iter().filter(|a| a.free > 0) {
        free.entry(agent.target.as_str()).or_default().push((
            !agent.low_priority,
            agent.free,
            agent.agent_id.as_str(),
        ));
    }
    let mut assignments = Vec::new();
    for run in queue {
        let Some(pool) = free.get_mut(run.target.as_str()) else {
            continue;
        };
        // Most free slots first, then by id.
        let best = pool
            .iter_mut()
            .filter(|(_, n_free, _)| *n_free > 0)
            .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| b.2.cmp(a.2)));
        if let Some((_, n_free, agent_id)) = best {
            *n_free -= 1;
            assignments.push(Assignment {
                run_id: run.run_id,
                agent_id: agent_id.to_string(),
            });
        }
    }
    assignments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, target: &str, free: u32) -> AgentSlots {
        AgentSlots {
            agent_id: id.into(),
            target: target.into(),
            free,
            low_priority: false,
        }
    }
    fn spot(id: &str, target: &str, free: u32) -> AgentSlots {
        AgentSlots {
            low_priority: true,
            ..agent(id, target, free)
        }
    }
    fn run(run_id: i64, target: &str) -> QueuedRun {
        QueuedRun {
            run_id,
            target: target.into(),
        }
    }
    fn check(agents: &[AgentSlots], queue: &[QueuedRun], expected: &[(i64, &str)]) {
        let got: Vec<_> = assign(agents, queue)
            .into_iter()
            .map(|a| (a.run_id, a.agent_id))
            .collect();
        let expected: Vec<_> = expected.iter().map(|(r, a)| (*r, a.to_string())).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn fifo_per_target_onto_free_slots() {
        // Oldest runs first; the third waits for a slot.
        check(
            &[agent("a", "cpu", 1), agent("b", "cpu", 1)],
            &[run(1, "cpu"), run(2, "cpu"), run(3, "cpu")],
            &[(1, "a"), (2, "b")],
        );
        // Runs only go to their own target's agents.
        check(
            &[agent("a", "cpu", 2)],
            &[run(1, "gpu"), run(2, "cpu")],
            &[(2, "a")],
        );
        // The least loaded agent gets the run.
        check(
            &[agent("a", "cpu", 1), agent("b", "cpu", 3)],
            &[run(1, "cpu"), run(2, "cpu")],
            &[(1, "b"), (2, "b")],
        );
        // Low-priority agents get runs only once the regular ones are full.
        check(
            &[spot("s", "cpu", 4), agent("a", "cpu", 1)],
            &[run(1, "cpu"), run(2, "cpu"), run(3, "cpu")],
            &[(1, "a"), (2, "s"), (3, "s")],
        );
        // Full agents take nothing.
        check(&[agent("a", "cpu", 0)], &[run(1, "cpu")], &[]);
    }
}
