//! Placement: which queued run goes to which agent. [`assign`] is a pure function of the
//! agents' free slots and the queue, so the policy is tested without a database or network;
//! [`crate::Coordinator::schedule`] runs it whenever something changed.
//!
//! Policy: each target's queue is served first-in first-out; a run goes to a regular agent of
//! its target with the most free slots, and to a low-priority (preemptible) agent only when
//! every regular agent is full (ties: the agent id, for determinism). A run never goes to an
//! agent of another target.
//!
//! Gang runs (several nodes) are placed all at once or not at all: `nodes` distinct agents,
//! each with a free slot, chosen by the same preference, in one decision (so two gangs can
//! never each hold half of what they need and wait for each other). A gang at the head of its
//! target's queue that does not fit yet holds back the runs behind it (no backfill): slots
//! free up as runs end, so the gang starts as soon as enough of them have, and nothing behind
//! it waits longer than it does. A gang that more agents than are online could not satisfy
//! does not hold the queue back (it waits for agents to come back; runs behind it go on).

use std::collections::{HashMap, HashSet};

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
    /// How many distinct agents the run needs at once (1: a single-node run).
    pub nodes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub run_id: i64,
    /// In node-rank order: node 0 first.
    pub agent_ids: Vec<String>,
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
    let mut online: HashMap<&str, usize> = HashMap::new();
    for agent in agents {
        *online.entry(agent.target.as_str()).or_default() += 1;
    }
    let mut blocked: HashSet<&str> = HashSet::new();
    let mut assignments = Vec::new();
    for run in queue {
        if blocked.contains(run.target.as_str()) {
            continue;
        }
        let Some(pool) = free.get_mut(run.target.as_str()) else {
            continue;
        };
        // Preferred first: regular agents, most free slots, then by id.
        pool.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)).then_with(|| a.2.cmp(b.2)));
        let nodes = run.nodes.max(1) as usize;
        let chosen: Vec<usize> = pool
            .iter()
            .enumerate()
            .filter(|(_, (_, n_free, _))| *n_free > 0)
            .map(|(index, _)| index)
            .take(nodes)
            .collect();
        if chosen.len() < nodes {
            if nodes > 1 && online.get(run.target.as_str()).copied().unwrap_or(0) >= nodes {
                blocked.insert(run.target.as_str());
            }
            continue;
        }
        let agent_ids = chosen
            .into_iter()
            .map(|index| {
                pool[index].1 -= 1;
                pool[index].2.to_string()
            })
            .collect();
        assignments.push(Assignment {
            run_id: run.run_id,
            agent_ids,
        });
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
        gang(run_id, target, 1)
    }
    fn gang(run_id: i64, target: &str, nodes: u32) -> QueuedRun {
        QueuedRun {
            run_id,
            target: target.into(),
            nodes,
        }
    }
    fn check(agents: &[AgentSlots], queue: &[QueuedRun], expected: &[(i64, &str)]) {
        let got: Vec<_> = assign(agents, queue)
            .into_iter()
            .map(|a| (a.run_id, a.agent_ids.join(",")))
            .collect();
        let expected: Vec<_> = expected.iter().map(|(r, a)| (*r, a.to_string())).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn gangs_are_placed_whole_on_distinct_agents_or_not_at_all() {
        // Three agents, two 2-node gangs: the first gets two agents, the second waits (no
        // half placement that could deadlock the two).
        check(
            &[
                agent("a", "gpu", 1),
                agent("b", "gpu", 1),
                agent("c", "gpu", 1),
            ],
            &[gang(1, "gpu", 2), gang(2, "gpu", 2)],
            &[(1, "a,b")],
        );
        // One agent with many slots is still one node.
        check(&[agent("a", "gpu", 8)], &[gang(1, "gpu", 2)], &[]);
        // Regular agents before low-priority ones, then the most free slots.
        check(
            &[
                spot("s", "gpu", 4),
                agent("a", "gpu", 1),
                agent("b", "gpu", 2),
            ],
            &[gang(1, "gpu", 3)],
            &[(1, "b,a,s")],
        );
    }

    #[test]
    fn a_waiting_gang_holds_back_the_runs_behind_it_only_when_it_can_fit() {
        // Two of three agents are busy: the 3-node gang at the head waits, and the single
        // run behind it does not take the free slot (it would delay the gang forever).
        check(
            &[
                agent("a", "gpu", 0),
                agent("b", "gpu", 0),
                agent("c", "gpu", 1),
            ],
            &[gang(1, "gpu", 3), run(2, "gpu")],
            &[],
        );
        // A 4-node gang with only three agents online cannot fit now: the queue goes on.
        check(
            &[
                agent("a", "gpu", 1),
                agent("b", "gpu", 1),
                agent("c", "gpu", 1),
            ],
            &[gang(1, "gpu", 4), run(2, "gpu")],
            &[(2, "a")],
        );
        // Other targets are not held back.
        check(
            &[
                agent("a", "gpu", 0),
                agent("b", "gpu", 1),
                agent("c", "cpu", 1),
            ],
            &[gang(1, "gpu", 2), run(2, "cpu")],
            &[(2, "c")],
        );
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
