//! A gang node's rendezvous (ready → the coordinator's launch) and the environment
//! `torchrun` would give its processes.

use std::path::Path;

use kiln_proto::v1::{self, agent_message::Kind as Up};

use super::{RunControl, SystemLines};
use crate::Agent;
use crate::session::up;
use crate::spool;

/// Binds a free port on this node's advertised address (any address when none is set) and
/// holds it until the gang launches, so that nothing else takes it meanwhile.
pub(super) fn reserve_port(agent: &Agent) -> std::io::Result<std::net::TcpListener> {
    let ip: std::net::IpAddr = agent
        .config
        .advertise_address
        .as_deref()
        .and_then(|a| a.parse().ok())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    std::net::TcpListener::bind((ip, 0))
}

/// Tells the coordinator this node is ready (node 0: with its rendezvous port) and waits for
/// the whole gang to be: no process of a gang starts before every node has its snapshot.
pub(super) async fn wait_for_launch(
    agent: &Agent,
    assignment: &v1::Assignment,
    gang: &v1::Gang,
    port: u32,
    control: &RunControl,
    system: &mut SystemLines,
) -> anyhow::Result<v1::Launch> {
    let ready = up(Up::RunEvent(v1::RunEvent {
        run_id: assignment.run_id,
        attempt: assignment.attempt,
        kind: Some(v1::run_event::Kind::Ready(v1::Ready { port })),
    }));
    system.line(&format!(
        "Node {} of {} ready; waiting for the other nodes of the gang.",
        gang.node_rank, gang.nodes
    ));
    let mut sessions = agent.session_generation.subscribe();
    sessions.mark_unchanged();
    let mut launch = control.launch.clone();
    let _ = agent.uplink.send(ready.clone()).await;
    loop {
        if let Some(launch) = launch.borrow_and_update().clone() {
            system.line(&format!(
                "Gang launched: MASTER_ADDR={} MASTER_PORT={} WORLD_SIZE={}",
                launch.master_addr,
                launch.master_port,
                gang.nodes * gang.procs_per_node.max(1)
            ));
            return Ok(launch);
        }
        tokio::select! {
            _ = control.cancel.cancelled() => anyhow::bail!("cancelled before the run started"),
            _ = control.detach.cancelled() => {
                anyhow::bail!("the agent stopped before the gang launched")
            }
            changed = launch.changed() => {
                anyhow::ensure!(changed.is_ok(), "the agent stopped before the gang launched");
            }
            changed = sessions.changed() => {
                // A new session (the coordinator may have restarted): say it again.
                if changed.is_ok() {
                    let _ = agent.uplink.send(ready.clone()).await;
                }
            }
        }
    }
}

/// The environment `torchrun` would give each process, plus Kiln's own: variables shared by
/// the node's processes, and one [`spool::ProcSpec`] per process with its rank's.
pub(super) fn gang_env(
    gang: &v1::Gang,
    launch: &v1::Launch,
    hostfile: &Path,
    allocated_gpus: &[u32],
) -> (Vec<(String, String)>, Vec<spool::ProcSpec>) {
    // This node's GPUs, in order (the coordinator's allocation); each local rank gets its
    // share.
    let gpus: Vec<u32> = if allocated_gpus.is_empty() {
        (0..gang.gpus_per_node).collect()
    } else {
        allocated_gpus.to_vec()
    };
    let nodes = gang.nodes.max(1);
    let per_node = gang.procs_per_node.max(1);
    let world = nodes * per_node;
    let var = |k: &str, v: String| (k.to_string(), v);
    let mut common = vec![
        var("MASTER_ADDR", launch.master_addr.clone()),
        var("MASTER_PORT", launch.master_port.to_string()),
        var("NODE_RANK", gang.node_rank.to_string()),
        var("GROUP_RANK", gang.node_rank.to_string()),
        var("GROUP_WORLD_SIZE", nodes.to_string()),
        var("KILN_NUM_NODES", nodes.to_string()),
        var("KILN_NODE_RANK", gang.node_rank.to_string()),
        var("KILN_NODES", launch.node_addresses.join(",")),
        var("KILN_HOSTFILE", hostfile.to_string_lossy().into_owned()),
        var("KILN_PROCS_PER_NODE", per_node.to_string()),
        var("KILN_GPUS_PER_NODE", gpus.len().to_string()),
        var("KILN_RESTART_COUNT", gang.restart_count.to_string()),
        var("TORCHELASTIC_RESTART_COUNT", gang.restart_count.to_string()),
    ];
    if gang.launcher == "none" {
        common.extend([
            var("PET_NNODES", nodes.to_string()),
            var("PET_NPROC_PER_NODE", per_node.to_string()),
            var("PET_NODE_RANK", gang.node_rank.to_string()),
            var("PET_MASTER_ADDR", launch.master_addr.clone()),
            var("PET_MASTER_PORT", launch.master_port.to_string()),
        ]);
        let mut env = Vec::new();
        if !gpus.is_empty() {
            env.push(var("CUDA_VISIBLE_DEVICES", join(&gpus)));
        }
        return (common, vec![spool::ProcSpec { rank: None, env }]);
    }
    common.extend([
        var("WORLD_SIZE", world.to_string()),
        var("LOCAL_WORLD_SIZE", per_node.to_string()),
        var("ROLE_WORLD_SIZE", world.to_string()),
        var("ROLE_NAME", "default".to_string()),
    ]);
    let procs = (0..per_node)
        .map(|local| {
            let rank = gang.node_rank * per_node + local;
            let mut env = vec![
                var("RANK", rank.to_string()),
                var("LOCAL_RANK", local.to_string()),
                var("ROLE_RANK", rank.to_string()),
                var("KILN_RANK", rank.to_string()),
                var("KILN_LOCAL_RANK", local.to_string()),
            ];
            if !gpus.is_empty() {
                env.push(var(
                    "CUDA_VISIBLE_DEVICES",
                    join(&gpus_of_local_rank(&gpus, local, per_node)),
                ));
            }
            spool::ProcSpec {
                rank: Some(rank),
                env,
            }
        })
        .collect();
    (common, procs)
}

/// What `torchrun` sets besides ranks and addresses, for Kiln's launcher (with `--launcher
/// none` the user's own torchrun does it): `OMP_NUM_THREADS=1` when a node runs several
/// processes and the run does not get it already (its `--env`, or the agent's through
/// `pass_env`) (torchrun's rule: N processes each spawning a thread per core oversubscribe
/// the CPUs; CPU DDP ran 1.9× slower without it),
/// said in the run's log; and the `TORCHELASTIC_*` variables scripts read to know they
/// run under an elastic launcher. Returns the variables and the line for the run's log.
pub(super) fn torchrun_defaults(
    gang: &v1::Gang,
    run_id: i64,
    max_retries: u32,
    is_set: impl Fn(&str) -> bool,
) -> (Vec<(String, String)>, Option<String>) {
    if gang.launcher == "none" {
        return (Vec::new(), None);
    }
    let mut env = vec![
        ("TORCHELASTIC_RUN_ID".to_string(), run_id.to_string()),
        (
            "TORCHELASTIC_MAX_RESTARTS".to_string(),
            max_retries.to_string(),
        ),
        // No launcher-hosted store: rank 0 hosts it at MASTER_ADDR:MASTER_PORT.
        (
            "TORCHELASTIC_USE_AGENT_STORE".to_string(),
            "False".to_string(),
        ),
    ];
    let mut note = None;
    if gang.procs_per_node > 1 && !is_set("OMP_NUM_THREADS") {
        env.push(("OMP_NUM_THREADS".to_string(), "1".to_string()));
        note = Some(format!(
            "OMP_NUM_THREADS=1 for each of this node's {} processes (torchrun's default; \
             set it with --env OMP_NUM_THREADS=N to tune).",
            gang.procs_per_node
        ));
    }
    (env, note)
}

/// The GPUs local rank `local` of `per_node` gets: an equal share when they divide evenly,
/// else one each, round-robin.
fn gpus_of_local_rank(gpus: &[u32], local: u32, per_node: u32) -> Vec<u32> {
    let (n, p) = (gpus.len() as u32, per_node.max(1));
    if n >= p && n % p == 0 {
        let share = n / p;
        gpus[(local * share) as usize..((local + 1) * share) as usize].to_vec()
    } else {
        vec![gpus[(local % n) as usize]]
    }
}

pub(super) fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(String, String)], key: &str) -> Option<String> {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn launch() -> v1::Launch {
        v1::Launch {
            run_id: 7,
            attempt: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29511,
            node_addresses: vec!["10.0.0.1".into(), "10.0.0.2".into()],
        }
    }

    #[test]
    fn every_process_gets_torchruns_variables_and_its_own_gpus() {
        let gang = v1::Gang {
            nodes: 2,
            node_rank: 1,
            procs_per_node: 4,
            launcher: "kiln".into(),
            restart_count: 2,
            gpus_per_node: 8,
            restartable: true,
        };
        let (common, procs) = gang_env(&gang, &launch(), Path::new("/r/hostfile"), &[]);
        for (key, value) in [
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29511"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("NODE_RANK", "1"),
            ("GROUP_RANK", "1"),
            ("KILN_NUM_NODES", "2"),
            ("KILN_NODES", "10.0.0.1,10.0.0.2"),
            ("KILN_HOSTFILE", "/r/hostfile"),
            ("KILN_GPUS_PER_NODE", "8"),
            ("KILN_RESTART_COUNT", "2"),
        ] {
            assert_eq!(env_of(&common, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(env_of(&common, "PET_NNODES"), None);
        let ranks: Vec<_> = procs.iter().map(|p| p.rank).collect();
        assert_eq!(ranks, [Some(4), Some(5), Some(6), Some(7)]);
        let last = &procs[3].env;
        assert_eq!(env_of(last, "RANK").as_deref(), Some("7"));
        assert_eq!(env_of(last, "LOCAL_RANK").as_deref(), Some("3"));
        // 8 GPUs over 4 local ranks: two each, in order.
        assert_eq!(env_of(last, "CUDA_VISIBLE_DEVICES").as_deref(), Some("6,7"));
    }

    #[test]
    fn with_launcher_none_one_process_per_node_gets_the_pet_variables() {
        let gang = v1::Gang {
            nodes: 2,
            node_rank: 0,
            procs_per_node: 8,
            launcher: "none".into(),
            restart_count: 0,
            gpus_per_node: 0,
            restartable: false,
        };
        let (common, procs) = gang_env(&gang, &launch(), Path::new("/r/hostfile"), &[]);
        assert_eq!(procs.len(), 1);
        assert_eq!(procs[0].rank, None);
        assert_eq!(env_of(&procs[0].env, "CUDA_VISIBLE_DEVICES"), None);
        for (key, value) in [
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "8"),
            ("PET_NODE_RANK", "0"),
            ("PET_MASTER_ADDR", "10.0.0.1"),
            ("PET_MASTER_PORT", "29511"),
        ] {
            assert_eq!(env_of(&common, key).as_deref(), Some(value), "{key}");
        }
        // torchrun computes the per-worker ranks itself.
        assert_eq!(env_of(&common, "RANK"), None);
        assert_eq!(env_of(&common, "WORLD_SIZE"), None);
    }

    #[test]
    fn several_processes_per_node_get_one_omp_thread_unless_it_was_set() {
        let mut gang = v1::Gang {
            nodes: 2,
            node_rank: 0,
            procs_per_node: 4,
            launcher: "kiln".into(),
            ..Default::default()
        };
        let (env, note) = torchrun_defaults(&gang, 42, 2, |_| false);
        assert_eq!(env_of(&env, "OMP_NUM_THREADS").as_deref(), Some("1"));
        assert!(note.is_some_and(|n| n.contains("OMP_NUM_THREADS=1")));
        assert_eq!(env_of(&env, "TORCHELASTIC_RUN_ID").as_deref(), Some("42"));
        assert_eq!(
            env_of(&env, "TORCHELASTIC_MAX_RESTARTS").as_deref(),
            Some("2")
        );
        // Set by the run (or the agent's environment): left alone, nothing said.
        let (env, note) = torchrun_defaults(&gang, 42, 2, |name| name == "OMP_NUM_THREADS");
        assert_eq!(env_of(&env, "OMP_NUM_THREADS"), None);
        assert_eq!(note, None);
        // One process per node: torchrun leaves the default thread count.
        gang.procs_per_node = 1;
        assert_eq!(
            env_of(
                &torchrun_defaults(&gang, 42, 2, |_| false).0,
                "OMP_NUM_THREADS"
            ),
            None
        );
        // The user's own torchrun applies its rules itself.
        gang.procs_per_node = 4;
        gang.launcher = "none".into();
        assert!(torchrun_defaults(&gang, 42, 2, |_| false).0.is_empty());
    }

    #[test]
    fn gpus_are_shared_out_evenly_or_round_robin() {
        assert_eq!(gpus_of_local_rank(&[0, 1, 2, 3], 1, 2), [2, 3]);
        assert_eq!(gpus_of_local_rank(&[0, 1], 2, 3), [0]);
        assert_eq!(gpus_of_local_rank(&[0, 1, 2], 1, 2), [1]);
    }
}
