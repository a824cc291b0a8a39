//! Distributed (gang) runs, end to end: a real coordinator and several real agents, each
//! advertising its own loopback address (127.0.0.2, 127.0.0.3, ...), so that every rank
//! connects from its own "host" and the rendezvous crosses addresses as it would across VMs.

use std::path::Path;
use std::time::Duration;

use kiln_tests::{AgentSpec, Cluster, process_alive, text, wait_for, write_tree};
use serde_json::Value;

const ADDRESSES: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

fn gang_cluster(n: usize) -> Cluster {
    let specs: Vec<AgentSpec> = ADDRESSES[..n]
        .iter()
        .map(|address| AgentSpec {
            target: "gpu",
            slots: 1,
            advertise: Some(address),
        })
        .collect();
    Cluster::start(&specs)
}

fn allreduce_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/distributed/allreduce.py");
    std::fs::copy(example, dir.path().join("allreduce.py")).unwrap();
    dir
}

fn logs(cluster: &Cluster, run_id: i64, extra: &[&str]) -> String {
    let id = run_id.to_string();
    let mut args = vec!["logs", id.as_str()];
    args.extend_from_slice(extra);
    let output = cluster.kiln(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

fn metric(cluster: &Cluster, run_id: i64, rank: Option<u32>, name: &str) -> Option<f64> {
    let id = run_id.to_string();
    let rank = rank.map(|r| r.to_string());
    let mut args = vec!["metrics", id.as_str(), "--json"];
    if let Some(rank) = &rank {
        args.extend(["--rank", rank.as_str()]);
    }
    let metrics = cluster.json(&args);
    metrics
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["last_value"].as_f64())
}

/// The pids the ranks printed ("rank R of W: ... pid P").
fn rank_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|line| line.split(", pid ").nth(1))
        .map(|pid| pid.trim().parse().unwrap())
        .collect()
}

/// The pid that rank `rank` printed first.
fn rank_pid(log: &str, rank: u32) -> i32 {
    let prefix = format!("[rank {rank}] ");
    log.lines()
        .filter(|line| line.starts_with(&prefix))
        .find_map(|line| line.split(", pid ").nth(1))
        .map(|pid| pid.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("rank {rank} printed no pid:\n{log}"))
}

fn wait_all_dead(pids: &[i32]) {
    wait_for(
        "every rank's process to be gone",
        Duration::from_secs(30),
        || pids.iter().all(|&pid| !process_alive(pid)).then_some(()),
    );
}

#[test]
fn a_three_node_gang_rendezvouses_and_all_reduces_across_every_rank() {
    let cluster = gang_cluster(3);
    let src = allreduce_dir();
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "gpu",
        "--nodes",
        "3",
        "--procs-per-node",
        "2",
        src.path().to_str().unwrap(),
        "allreduce.py",
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    // One stream, every line tagged with its rank; every rank saw the full sum (1+..+6).
    for rank in 0..6 {
        assert!(
            stdout.contains(&format!("[rank {rank}] rank {rank}: all-reduce sum 21 ok")),
            "rank {rank} missing:\n{stdout}"
        );
    }
    let run_id = kiln_tests::submitted_run_id(&output.stderr);
    let run = cluster.run(run_id);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["nodes"], 3);
    assert_eq!(run["procs_per_node"], 2);
    // Ranks 0 and 1 ran on node 0, 2 and 3 on node 1, 4 and 5 on node 2: each node on its
    // own agent's address.
    let mut node_addresses = Vec::new();
    for rank in 0..6 {
        let prefix = format!("[rank {rank}] rank {rank} of 6: node {} (", rank / 2);
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{stdout}"));
        let address = line[prefix.len()..].split(')').next().unwrap().to_string();
        assert!(
            line.contains(&format!("local rank {},", rank % 2)),
            "{line}"
        );
        assert!(ADDRESSES.contains(&address.as_str()), "{line}");
        node_addresses.push(address);
    }
    node_addresses.dedup();
    assert_eq!(node_addresses.len(), 3, "{node_addresses:?}");

    // Filter one rank's lines.
    let rank3 = logs(&cluster, run_id, &["--rank", "3"]);
    assert!(!rank3.is_empty());
    assert!(
        rank3.lines().all(|line| line.starts_with("[rank 3] ")),
        "{rank3}"
    );

    // Metrics are per rank; rank 0's by default.
    assert_eq!(metric(&cluster, run_id, None, "rank"), Some(0.0));
    assert_eq!(metric(&cluster, run_id, Some(5), "rank"), Some(5.0));
    assert_eq!(metric(&cluster, run_id, Some(5), "allreduce"), Some(21.0));
    // A rank the run does not have is named as such, not shown as an empty table.
    let missing = cluster.kiln(&["metrics", &run_id.to_string(), "--rank", "6"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("has 6 ranks (0–5): there is no rank 6"),
        "{}",
        text(&missing.stderr)
    );
    cluster.stop();
}

const FAIL_RANK_3: &str = r#"
import os, sys, time
rank = int(os.environ["RANK"])
print("rank %d of %s, pid %d" % (rank, os.environ["WORLD_SIZE"], os.getpid()), flush=True)
print("rank %d: ready" % rank, flush=True)
if rank == 3:
    time.sleep(1.5)
    print("rank 3 giving up", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(1000)
"#;

#[test]
fn one_failing_rank_stops_the_whole_gang_and_is_named() {
    let cluster = gang_cluster(2);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("fail.py", FAIL_RANK_3)]);
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "gpu",
        "--nodes",
        "2",
        "--procs-per-node",
        "2",
        src.path().to_str().unwrap(),
        "fail.py",
    ]);
    // kiln submit exits with the failing rank's code.
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    let run_id = kiln_tests::submitted_run_id(&output.stderr);
    let run = cluster.run(run_id);
    assert_eq!(run["status"], "failed");
    assert_eq!(run["failed_rank"], 3);
    assert_eq!(run["exit_code"], 3);
    let message = run["message"].as_str().unwrap();
    assert!(message.contains("rank 3"), "{message}");
    // Every other rank, on both nodes, was stopped: no process is left anywhere.
    let log = logs(&cluster, run_id, &[]);
    let pids = rank_pids(&log);
    assert_eq!(pids.len(), 4, "{log}");
    wait_all_dead(&pids);
    cluster.stop();
}

const SLEEP_THEN_PASS_ON_RESTART: &str = r#"
import os, time
restart = int(os.environ["KILN_RESTART_COUNT"])
print("rank %s of %s: restart %d, pid %d" % (os.environ["RANK"], os.environ["WORLD_SIZE"], restart, os.getpid()), flush=True)
if restart == 0:
    time.sleep(1000)
"#;

fn node_agent(cluster: &Cluster, run: &Value, node: usize) -> usize {
    let agent = run["placement"][node]["agent"]
        .as_str()
        .unwrap()
        .to_string();
    (0..cluster.agents.len())
        .find(|&i| cluster.agent_id(i) == agent)
        .unwrap()
}

#[test]
fn a_node_killed_mid_gang_stops_the_others_and_the_gang_restarts() {
    let mut cluster = gang_cluster(3);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("train.py", SLEEP_THEN_PASS_ON_RESTART)]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        "--max-restarts",
        "1",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    let first_log = wait_for("both ranks to start", Duration::from_secs(30), || {
        let log = logs(&cluster, run_id, &[]);
        (rank_pids(&log).len() == 2).then_some(log)
    });
    let run = cluster.wait_status(run_id, "running");
    let victim = node_agent(&cluster, &run, 1);
    cluster.agents[victim].kill();
    // After the TTL (5 s in tests) node 1 is lost: node 0's rank is stopped and the gang
    // restarts on the two agents left, with a new rendezvous.
    let run = wait_for(
        "the restarted gang to succeed",
        Duration::from_secs(60),
        || {
            let run = cluster.run(run_id);
            (run["status"] == "succeeded").then_some(run)
        },
    );
    assert_eq!(run["restarts"], 1);
    assert!(run["attempt"].as_u64().unwrap() >= 2);
    let log = logs(&cluster, run_id, &[]);
    assert!(log.contains("restart 1"), "{log}");
    // Node 0's rank was stopped by Kiln; the killed agent's rank (an orphan on its host) is
    // stopped once that agent is back and learns that its attempt was replaced.
    assert!(!process_alive(rank_pid(&first_log, 0)));
    cluster.restart_agent(victim);
    wait_all_dead(&[rank_pid(&first_log, 1)]);
    cluster.stop();
}

#[test]
fn a_node_lost_with_no_restarts_left_fails_the_gang_within_the_ttl() {
    let mut cluster = gang_cluster(2);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("train.py", SLEEP_THEN_PASS_ON_RESTART)]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    let log = wait_for("both ranks to start", Duration::from_secs(30), || {
        let log = logs(&cluster, run_id, &[]);
        (rank_pids(&log).len() == 2).then_some(log)
    });
    let run = cluster.wait_status(run_id, "running");
    let victim = node_agent(&cluster, &run, 1);
    cluster.agents[victim].kill();
    let killed_at = std::time::Instant::now();
    let run = wait_for("the gang to be lost", Duration::from_secs(30), || {
        let run = cluster.run(run_id);
        (run["status"] == "lost").then_some(run)
    });
    assert!(
        run["message"].as_str().unwrap().contains("node_lost"),
        "{run}"
    );
    // The surviving node's rank is stopped within the TTL (5 s) plus a few seconds.
    wait_all_dead(&[rank_pid(&log, 0)]);
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(5 + 10), "took {took:?}");
    cluster.restart_agent(victim);
    wait_all_dead(&[rank_pid(&log, 1)]);
    cluster.stop();
}

const PAIR: &str = r#"
import os, time
print("rank %s of %s: start %.3f" % (os.environ["RANK"], os.environ["WORLD_SIZE"], time.time()), flush=True)
time.sleep(1.5)
print("rank %s: end %.3f" % (os.environ["RANK"], time.time()), flush=True)
"#;

/// (first start, last end) of a run's ranks, from their own clocks.
fn window(log: &str) -> (f64, f64) {
    let times = |key: &str| -> Vec<f64> {
        log.lines()
            .filter_map(|line| line.split(key).nth(1))
            .map(|t| t.trim().parse().unwrap())
            .collect()
    };
    let starts = times(": start ");
    let ends = times(": end ");
    assert_eq!((starts.len(), ends.len()), (2, 2), "{log}");
    (
        starts.iter().copied().fold(f64::MAX, f64::min),
        ends.iter().copied().fold(0.0, f64::max),
    )
}

#[test]
fn two_gangs_competing_for_three_agents_both_finish_and_never_start_half() {
    let cluster = gang_cluster(3);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("pair.py", PAIR)]);
    let dir = src.path().to_str().unwrap();

    // A gang no target agent count could ever satisfy is refused at submit.
    let output = cluster.kiln(&["submit", "--target", "gpu", "--nodes", "4", dir, "pair.py"]);
    assert!(!output.status.success());
    let error = text(&output.stderr);
    assert!(
        error.contains("needs 4 nodes") && error.contains("3 agents"),
        "{error}"
    );
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "gpu",
        "--nodes",
        "2",
        "--launcher",
        "mpi",
        dir,
        "pair.py",
    ]);
    // Refused by the CLI itself, before anything is packed or uploaded.
    let error = text(&output.stderr);
    assert!(
        error.contains("invalid value 'mpi' for '--launcher") && error.contains("kiln, none"),
        "{error}"
    );

    let a = cluster.submit_detached(&["--target", "gpu", "--nodes", "2", dir, "pair.py"]);
    let b = cluster.submit_detached(&["--target", "gpu", "--nodes", "2", dir, "pair.py"]);
    for run in [a, b] {
        wait_for("both gangs to finish", Duration::from_secs(60), || {
            let run = cluster.run(run);
            (run["status"] == "succeeded").then_some(())
        });
    }
    // Three agents hold one 2-node gang at a time: the second started only after the first
    // had ended (no node of it ran early, holding an agent the first needed).
    let (a_start, a_end) = window(&logs(&cluster, a, &[]));
    let (b_start, b_end) = window(&logs(&cluster, b, &[]));
    assert!(
        b_start >= a_end || a_start >= b_end,
        "the gangs overlapped: a {a_start}..{a_end}, b {b_start}..{b_end}"
    );
    cluster.stop();
}

#[test]
fn a_node_whose_agent_is_killed_at_the_rendezvous_takes_it_up_again_and_the_gang_runs_once() {
    // The agent of one node is killed (SIGKILL) while its attempt waits for the gang's
    // launch: the restarted agent says ready again and the gang launches as attempt 1.
    let mut cluster = Cluster::start(&[]);
    let spec = |address| AgentSpec {
        target: "gpu",
        slots: 1,
        advertise: Some(address),
    };
    cluster.add_agent_with_env(
        spec(ADDRESSES[0]),
        &[("KILN_AGENT_HOLD_PHASE", "rendezvous")],
    );
    cluster.add_agent(spec(ADDRESSES[1]));
    cluster.wait_agents_online(2);
    let src = allreduce_dir();
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        src.path().to_str().unwrap(),
        "allreduce.py",
    ]);
    wait_for(
        "agent 0 to hold its node at the rendezvous",
        Duration::from_secs(60),
        || {
            cluster.agents[0]
                .log_text()
                .contains("Holding the attempt at this phase")
                .then_some(())
        },
    );
    cluster.agents[0].kill();
    cluster.set_agent_env(0, &[]);
    cluster.restart_agent(0);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    let log = logs(&cluster, run_id, &[]);
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(run["restarts"], 0, "{run}");
    for rank in 0..2 {
        assert_eq!(
            log.matches(&format!("rank {rank}: all-reduce sum 3 ok"))
                .count(),
            1,
            "rank {rank} ran once:\n{log}"
        );
    }
    cluster.stop();
}
