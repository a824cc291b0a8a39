//! Placement: which queued run goes to which agent. [`assign`] is a pure function of the
//! agents' free slots and the queue, so the policy is tested without a database or network;
//! [`crate::Coordinator::schedule`] runs it whenever something changed.
//!
//! Policy: each target's queue is served in [`fair_order`] (first-in first-out for one user;
//! between users, whoever holds the fewest nodes of the target goes next); a run goes to a
//! regular agent of its target with the most free slots, and to a low-priority (preemptible)
//! agent only when every regular agent is full (ties: the agent id, for determinism). A run never goes to an
//! agent of another target.
//!
//! A run goes only where its request (CPUs, memory, GPUs per node) fits in what the agent
//! has left after the runs it already holds; GPUs are allocated by index (the lowest free
//! ones), so no GPU is ever given to two runs.
//!
//! Gang runs (several nodes) are placed all at once or not at all: `nodes` distinct agents,
//! each with a free slot, chosen by the same preference, in one decision (so two gangs can
//! never each hold half of what they need and wait for each other). A gang at the head of its
//! target's queue that does not fit yet holds back the runs behind it (no backfill): slots
//! free up as runs end, so the gang starts as soon as enough of them have, and nothing behind
//! it waits longer than it does. A gang that more agents than are online could not satisfy
//! does not hold the queue back (it waits for agents to come back; runs behind it go on).

use std::collections::{HashMap, HashSet};

/// An online agent and what it has left: run slots, CPUs, memory and GPU indices.
#[derive(Debug, Clone)]
pub struct AgentSlots {
    pub agent_id: String,
    pub target: String,
    pub free: u32,
    pub low_priority: bool,
    pub free_cpus: u32,
    pub free_memory_bytes: u64,
    /// Free GPU indices, ascending.
    pub free_gpus: Vec<u32>,
}

/// What one node of a run asks for (zero: nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
}

impl Need {
    /// Whether one node fits in what `agent` has left now (a slot, CPUs, memory, GPUs).
    pub fn fits(&self, agent: &AgentSlots) -> bool {
        agent.free > 0
            && self.fits_within(
                agent.free_cpus,
                agent.free_memory_bytes,
                agent.free_gpus.len(),
            )
    }

    /// Whether one node fits on an agent of this size at all (when it holds nothing).
    pub fn fits_host(&self, host: &kiln_proto::v1::HostInfo) -> bool {
        self.fits_within(host.cpus, host.memory_bytes, host.gpus.len())
    }

    fn fits_within(&self, cpus: u32, memory_bytes: u64, gpus: usize) -> bool {
        self.cpus <= cpus && self.memory_bytes <= memory_bytes && self.gpus as usize <= gpus
    }
}

/// A queued run, in queue order.
#[derive(Debug, Clone)]
pub struct QueuedRun {
    pub run_id: i64,
    pub target: String,
    /// How many distinct agents the run needs at once (1: a single-node run).
    pub nodes: u32,
    /// Per node.
    pub need: Need,
}

/// What one user holds on one target, for [`fair_order`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Nodes of the user's runs placed on the target now (a gang counts each node).
    pub nodes: u32,
    /// When the user last had a run placed there, as a counter that only grows (0: not
    /// since the coordinator started).
    pub last_placed: u64,
}

/// A queued run as fair share sees it.
#[derive(Debug, Clone, Copy)]
pub struct Queued<'a> {
    pub target: &'a str,
    pub owner: &'a str,
    pub nodes: u32,
}

/// Fair share between the users of a target: the order in which to offer `queue` (given in
/// submission order) to [`assign`], as indices into it. Each user's own runs keep their
/// order; between users, the next run comes from the user who would then hold the fewest
/// nodes of that target (counting what they hold now and what this order has already
/// offered them), ties going to the user served least recently, then to the earliest
/// submission. So a user who queued a hundred runs does not make another user's one run
/// wait behind them all: with one slot, the two alternate. Targets are independent.
pub fn fair_order(queue: &[Queued], usage: &HashMap<(String, String), Usage>) -> Vec<usize> {
    use std::collections::VecDeque;
    // Per target (in order of first appearance), per owner: their runs, in order.
    type Owners<'a> = Vec<(&'a str, VecDeque<usize>)>;
    let mut targets: Vec<(&str, Owners)> = Vec::new();
    for (index, run) in queue.iter().enumerate() {
        let position = match targets.iter().position(|(t, _)| *t == run.target) {
            Some(position) => position,
            None => {
                targets.push((run.target, Vec::new()));
                targets.len() - 1
            }
        };
        let owners = &mut targets[position].1;
        match owners.iter_mut().find(|(o, _)| *o == run.owner) {
            Some((_, runs)) => runs.push_back(index),
            None => owners.push((run.owner, VecDeque::from([index]))),
        }
    }
    let mut order = Vec::with_capacity(queue.len());
    for (target, mut owners) in targets {
        let mut held: Vec<Usage> = owners
            .iter()
            .map(|(owner, _)| {
                usage
                    .get(&(target.to_string(), owner.to_string()))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();
        let mut tick = held.iter().map(|u| u.last_placed).max().unwrap_or(0);
        loop {
            let next = owners
                .iter()
                .enumerate()
                .filter_map(|(i, (_, runs))| runs.front().map(|&first| (i, first)))
                .min_by_key(|&(i, first)| (held[i].nodes, held[i].last_placed, first));
            let Some((i, _)) = next else { break };
            let index = owners[i].1.pop_front().expect("a front was seen");
            order.push(index);
            tick += 1;
            held[i].nodes += queue[index].nodes.max(1);
            held[i].last_placed = tick;
        }
    }
    order
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub run_id: i64,
    /// In node-rank order: node 0 first.
    pub agent_ids: Vec<String>,
    /// The GPU indices allocated on each of those agents (same order).
    pub gpus: Vec<Vec<u32>>,
}

pub fn assign(agents: &[AgentSlots], queue: &[QueuedRun]) -> Vec<Assignment> {
    let mut pool: Vec<AgentSlots> = agents.to_vec();
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
        // Preferred first: regular agents, most free slots, then by id.
        let mut fitting: Vec<usize> = (0..pool.len())
            .filter(|&i| pool[i].target == run.target && run.need.fits(&pool[i]))
            .collect();
        fitting.sort_by(|&a, &b| {
            let (a, b) = (&pool[a], &pool[b]);
            (!b.low_priority, b.free)
                .cmp(&(!a.low_priority, a.free))
                .then_with(|| a.agent_id.cmp(&b.agent_id))
        });
        let nodes = run.nodes.max(1) as usize;
        if fitting.len() < nodes {
            if nodes > 1 && online.get(run.target.as_str()).copied().unwrap_or(0) >= nodes {
                blocked.insert(run.target.as_str());
            }
            continue;
        }
        let mut agent_ids = Vec::with_capacity(nodes);
        let mut gpus = Vec::with_capacity(nodes);
        for index in fitting.into_iter().take(nodes) {
            let agent = &mut pool[index];
            agent.free -= 1;
            agent.free_cpus -= run.need.cpus;
            agent.free_memory_bytes -= run.need.memory_bytes;
            gpus.push(agent.free_gpus.drain(..run.need.gpus as usize).collect());
            agent_ids.push(agent.agent_id.clone());
        }
        assignments.push(Assignment {
            run_id: run.run_id,
            agent_ids,
            gpus,
        });
    }
    assignments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued<'a>(target: &'a str, owner: &'a str) -> Queued<'a> {
        Queued {
            target,
            owner,
            nodes: 1,
        }
    }

    #[test]
    fn fair_order_alternates_users_and_keeps_each_users_order() {
        // alice queued three before bob's one; with nothing running, they alternate.
        let queue = [
            queued("gpu", "alice"),
            queued("gpu", "alice"),
            queued("gpu", "alice"),
            queued("gpu", "bob"),
        ];
        assert_eq!(fair_order(&queue, &HashMap::new()), vec![0, 3, 1, 2]);
        // alice holds two nodes: bob's run goes first.
        let usage = HashMap::from([(
            ("gpu".to_string(), "alice".to_string()),
            Usage {
                nodes: 2,
                last_placed: 5,
            },
        )]);
        assert_eq!(fair_order(&queue, &usage), vec![3, 0, 1, 2]);
        // Equal holdings: the user served least recently goes first.
        let usage = HashMap::from([
            (
                ("gpu".to_string(), "alice".to_string()),
                Usage {
                    nodes: 0,
                    last_placed: 7,
                },
            ),
            (
                ("gpu".to_string(), "bob".to_string()),
                Usage {
                    nodes: 0,
                    last_placed: 3,
                },
            ),
        ]);
        assert_eq!(fair_order(&queue, &usage), vec![3, 0, 1, 2]);
    }

    #[test]
    fn fair_order_counts_a_gangs_nodes_and_keeps_targets_apart() {
        let queue = [
            Queued {
                target: "gpu",
                owner: "alice",
                nodes: 4,
            },
            queued("gpu", "alice"),
            queued("cpu", "bob"),
            queued("gpu", "bob"),
            queued("gpu", "bob"),
        ];
        // alice's 4-node gang counts as four: bob's two runs come before her next one.
        // The cpu target's run is ordered on its own (after gpu's, which came first).
        assert_eq!(fair_order(&queue, &HashMap::new()), vec![0, 3, 4, 1, 2]);
    }

    fn agent(id: &str, target: &str, free: u32) -> AgentSlots {
        AgentSlots {
            agent_id: id.into(),
            target: target.into(),
            free,
            low_priority: false,
            free_cpus: 64,
            free_memory_bytes: 1 << 40,
            free_gpus: Vec::new(),
        }
    }
    fn gpu_agent(id: &str, gpus: &[u32]) -> AgentSlots {
        AgentSlots {
            free_gpus: gpus.to_vec(),
            ..agent(id, "gpu", 8)
        }
    }
    fn needing(run_id: i64, nodes: u32, need: Need) -> QueuedRun {
        QueuedRun {
            need,
            ..gang(run_id, "gpu", nodes)
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
            need: Need::default(),
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
    fn gpus_are_allocated_by_index_and_never_shared() {
        let two = Need {
            gpus: 2,
            ..Need::default()
        };
        let got = assign(
            &[gpu_agent("a", &[0, 1, 2]), gpu_agent("b", &[1])],
            &[
                needing(1, 1, two),
                needing(2, 1, two),
                needing(
                    3,
                    1,
                    Need {
                        gpus: 1,
                        ..Need::default()
                    },
                ),
            ],
        );
        let got: Vec<_> = got
            .into_iter()
            .map(|a| (a.run_id, a.agent_ids.join(","), a.gpus))
            .collect();
        // Run 1 takes GPUs 0 and 1 of a; run 2 cannot get two GPUs anywhere now and waits;
        // run 3 gets b's GPU 1 (b has more free slots left than a).
        assert_eq!(
            got,
            vec![
                (1, "a".to_string(), vec![vec![0, 1]]),
                (3, "b".to_string(), vec![vec![1]]),
            ]
        );
    }

    #[test]
    fn cpus_and_memory_must_fit_what_is_left() {
        let mut small = agent("small", "cpu", 4);
        small.free_cpus = 2;
        small.free_memory_bytes = 4 << 30;
        let need = |cpus, gib: u64| QueuedRun {
            need: Need {
                cpus,
                memory_bytes: gib << 30,
                gpus: 0,
            },
            ..run(0, "cpu")
        };
        let queue = [
            QueuedRun {
                run_id: 1,
                ..need(2, 2)
            },
            QueuedRun {
                run_id: 2,
                ..need(1, 1)
            },
            QueuedRun {
                run_id: 3,
                ..need(0, 2)
            },
        ];
        // Run 1 takes both CPUs; run 2 needs a CPU and waits; run 3 needs none and fits in
        // the memory left.
        let got: Vec<_> = assign(&[small], &queue)
            .into_iter()
            .map(|a| a.run_id)
            .collect();
        assert_eq!(got, [1, 3]);
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
