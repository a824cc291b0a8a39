//! Fault injection with real processes: skewed agent clocks (libfaketime), the coordinator
//! SIGKILLed at random points under load (then its SQLite file checked), network partitions
//! (an agent in its own network namespace whose link goes down), and hundreds of simulated
//! agents reconnecting at once.
//!
//! They need root, `faketime` and `iproute2`, so they are ignored by default; `tests/run`
//! runs them when `KILN_FAULT_TESTS=1` (`.ci/run` installs the tools and sets it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_tests::{AgentSpec, Cluster, text, wait_for, write_tree};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn agent(target: &'static str) -> AgentSpec {
    AgentSpec {
        target,
        slots: 2,
        advertise: None,
    }
}

/// Prints a numbered line every 0.2 s for `seconds`.
const TICK: &str = r#"
import sys, time
n = int(sys.argv[1])
for i in range(n):
    print("tick %d" % i, flush=True)
    time.sleep(0.2)
"#;

#[test]
#[ignore = "fault injection: tests/run runs it with KILN_FAULT_TESTS=1"]
fn agents_with_clocks_ten_minutes_off_are_never_marked_lost() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "install faketime (apt-get install faketime)"
    );
    // A short TTL, so the runs below last several TTLs.
    let mut cluster = Cluster::start_with_ttl(&[], 2);
    for offset in ["+10m", "-10m"] {
        cluster.add_agent_with_env(
            agent("skew"),
            &[("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", offset)],
        );
    }
    cluster.wait_agents_online(2);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("tick.py", TICK)]);
    let dir = src.path().to_str().unwrap();
    let runs: Vec<i64> = (0..2)
        .map(|_| cluster.submit_detached(&["--target", "skew", dir, "tick.py", "--", "40"]))
        .collect();
    // For the ~8 s (4 TTLs) the runs last, no agent is ever judged silent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let agents = cluster.json(&["agents", "--json"]);
        for a in agents.as_array().unwrap() {
            assert_eq!(a["state"], "online", "{a}");
        }
        let statuses: Vec<_> = runs
            .iter()
            .map(|&r| cluster.run(r)["status"].clone())
            .collect();
        if statuses.iter().all(|s| s == "succeeded") {
            break;
        }
        assert!(
            statuses.iter().all(|s| s != "lost" && s != "failed"),
            "{statuses:?}"
        );
        assert!(
            Instant::now() < deadline,
            "runs did not finish: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for run in runs {
        let log = text(&cluster.kiln(&["logs", &run.to_string()]).stdout);
        let ticks: Vec<_> = log.lines().filter(|l| l.starts_with("tick ")).collect();
        assert_eq!(ticks.len(), 40, "{log}");
    }
    cluster.stop();
}

/// The SQL invariants of the coordinator's database, checked on the file itself.
fn check_database(path: &std::path::Path, submitted: &BTreeSet<i64>) {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |row| row.get(0)).unwrap() };
    // Every run id a client was given exists.
    let stored: BTreeSet<i64> = db
        .prepare("SELECT id FROM runs")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let missing: Vec<_> = submitted.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "runs returned to clients but not stored: {missing:?}"
    );
    // No run is in an impossible state.
    assert_eq!(
        count(
            "SELECT count(*) FROM runs WHERE status NOT IN
             ('queued','assigned','running','succeeded','failed','cancelled','lost','env_failed')"
        ),
        0,
        "unknown status"
    );
    assert_eq!(
        count("SELECT count(*) FROM runs WHERE status IN ('assigned','running') AND attempt < 1"),
        0,
        "placed without an attempt"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM runs r WHERE status IN ('assigned','running') AND NOT EXISTS
             (SELECT 1 FROM run_nodes n WHERE n.run_id = r.id AND n.attempt = r.attempt)"
        ),
        0,
        "placed without a node"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM runs WHERE status IN ('succeeded','failed','cancelled','lost','env_failed')
             AND finished_ms IS NULL"
        ),
        0,
        "ended without an end time"
    );
    assert_eq!(
        count("SELECT count(*) FROM runs WHERE status = 'succeeded' AND started_ms IS NULL"),
        0,
        "succeeded without starting"
    );
    // Log sequences have no holes and no repeats: per (run, attempt, node), 1..=N.
    assert_eq!(
        count(
            "SELECT count(*) FROM (SELECT run_id, attempt, node, count(*) AS n, max(seq) AS m,
             count(DISTINCT seq) AS d FROM logs GROUP BY run_id, attempt, node)
             WHERE n != m OR d != n"
        ),
        0,
        "a log sequence has a hole or a repeat"
    );
}

#[test]
#[ignore = "fault injection: tests/run runs it with KILN_FAULT_TESTS=1"]
fn killing_the_coordinator_at_random_points_under_load_keeps_its_database_consistent() {
    let mut cluster = Cluster::start(&[agent("load"), agent("load")]);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("tick.py", TICK)]);
    let dir = src.path().to_str().unwrap().to_string();
    let mut submitted = BTreeSet::new();
    // A simple deterministic "random" sequence of kill delays (xorshift), so a failure can
    // be replayed.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..6 {
        // Submit a few runs (each prints 5 lines), then kill the coordinator after a
        // random delay while they are placed, started, streaming or finishing.
        for _ in 0..4 {
            let output = cluster.kiln(&[
                "submit", "--detach", "--target", "load", &dir, "tick.py", "--", "5",
            ]);
            if output.status.success() {
                submitted.insert(text(&output.stdout).trim().parse::<i64>().unwrap());
            }
        }
        let delay = Duration::from_millis(next() % 1500);
        std::thread::sleep(delay);
        eprintln!("round {round}: SIGKILL after {delay:?}");
        cluster.crash_coordinator();
        check_database(&cluster.dir.path().join("coordinator/kiln.db"), &submitted);
    }
    // After the chaos every run finishes, exactly once, with all its lines.
    for &run in &submitted {
        let run = wait_for("every run to end", Duration::from_secs(120), || {
            let run = cluster.run(run);
            (run["status"] == "succeeded").then_some(run)
        });
        let id = run["id"].as_i64().unwrap();
        let log = text(&cluster.kiln(&["logs", &id.to_string()]).stdout);
        let ticks: Vec<_> = log.lines().filter(|l| l.starts_with("tick ")).collect();
        assert_eq!(
            ticks,
            ["tick 0", "tick 1", "tick 2", "tick 3", "tick 4"],
            "run {id}"
        );
    }
    cluster.coordinator.stop_cleanly();
    check_database(&cluster.dir.path().join("coordinator/kiln.db"), &submitted);
    for agent in &mut cluster.agents {
        agent.stop_cleanly();
    }
}

/// A network namespace with a veth link to the host: the host side has `HOST_IP`, the
/// namespace `NS_IP` (a /30 the test creates; nothing else uses it). Removed on drop.
struct Netns {
    name: String,
    host_link: String,
}

const HOST_IP: &str = "10.231.7.1";
const NS_IP: &str = "10.231.7.2";

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(
        status.success(),
        "ip {args:?} failed (root and iproute2 needed)"
    );
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let name = format!("kiln-part-{id}");
        let host_link = format!("kp{id}h");
        let ns_link = format!("kp{id}n");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &ns_link,
        ]);
        ip(&["link", "set", &ns_link, "netns", &name]);
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        let exec = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        exec(&["addr", "add", &format!("{NS_IP}/30"), "dev", &ns_link]);
        exec(&["link", "set", &ns_link, "up"]);
        exec(&["link", "set", "lo", "up"]);
        Netns { name, host_link }
    }

    /// Cuts (or restores) the link: packets stop in both directions, connections stay
    /// open on both ends (no reset), as when a switch or a VM's network fails.
    fn link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_link,
            if up { "up" } else { "down" },
        ]);
    }

    fn wrapper(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Prints `attempt=A tick I pid P` every 0.2 s for `argv[1]` ticks.
const ATTEMPT_TICK: &str = r#"
import os, sys, time
for i in range(int(sys.argv[1])):
    print("attempt=%s tick %d pid %d" % (os.environ["KILN_ATTEMPT"], i, os.getpid()), flush=True)
    time.sleep(0.2)
"#;

fn ticks_of(log: &str, attempt: u32) -> Vec<u32> {
    let prefix = format!("attempt={attempt} tick ");
    log.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

fn pid_of(log: &str, attempt: u32) -> i32 {
    let prefix = format!("attempt={attempt} tick ");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.rsplit(' ').next())
        .map(|pid| pid.parse().unwrap())
        .expect("the attempt printed its pid")
}

#[test]
#[ignore = "fault injection: tests/run runs it with KILN_FAULT_TESTS=1"]
fn partitions_shorter_than_the_ttl_backfill_and_longer_ones_requeue_and_fence() {
    const TTL: u32 = 6;
    let netns = Netns::new();
    let mut cluster = Cluster::start_listening(&format!("{HOST_IP}:0"), &[], TTL);
    let cut_off = cluster.add_agent_wrapped(agent("part"), &netns.wrapper());
    cluster.wait_agents_online(1);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("tick.py", ATTEMPT_TICK)]);
    let dir = src.path().to_str().unwrap();

    // 1. A 2 s partition (under the TTL, and under the agent's fencing time of 2/3 TTL):
    // the run goes on, its lines from the partition arrive after it, none lost or doubled.
    let run = cluster.submit_detached(&[
        "--target",
        "part",
        "--max-retries",
        "1",
        dir,
        "tick.py",
        "--",
        "40",
    ]);
    cluster.wait_status(run, "running");
    std::thread::sleep(Duration::from_secs(1));
    netns.link(false);
    std::thread::sleep(Duration::from_secs(2));
    netns.link(true);
    let ended = cluster.wait_status(run, "succeeded");
    assert_eq!(ended["attempt"], 1);
    let log = text(&cluster.kiln(&["logs", &run.to_string()]).stdout);
    assert_eq!(ticks_of(&log, 1), (0..40).collect::<Vec<_>>(), "{log}");

    // 2. A partition longer than the TTL: the coordinator declares the agent lost and
    // retries the run on another agent; the cut-off agent fences its attempt off itself,
    // and when the link comes back its stale attempt can write nothing into the new one.
    let run = cluster.submit_detached(&[
        "--target",
        "part",
        "--max-retries",
        "1",
        dir,
        "tick.py",
        "--",
        "60",
    ]);
    cluster.wait_status(run, "running");
    let _other = cluster.add_agent(agent("part"));
    cluster.wait_agents_online(2);
    let first = wait_for("the first attempt's pid", Duration::from_secs(20), || {
        let log = text(&cluster.kiln(&["logs", &run.to_string()]).stdout);
        log.contains("attempt=1 tick").then(|| pid_of(&log, 1))
    });
    netns.link(false);
    let retried = wait_for(
        "the run to be retried elsewhere",
        Duration::from_secs(30),
        || {
            let r = cluster.run(run);
            (r["attempt"] == 2 && r["status"] == "running").then_some(r)
        },
    );
    assert_ne!(retried["agent"], cluster.agent_id(cut_off));
    // The cut-off agent stopped its attempt without being told (2/3 of the TTL).
    wait_for(
        "the stale attempt to be fenced off",
        Duration::from_secs(20),
        || (!kiln_tests::process_alive(first)).then_some(()),
    );
    netns.link(true);
    let ended = cluster.wait_status(run, "succeeded");
    assert_eq!(ended["attempt"], 2);
    let log = text(&cluster.kiln(&["logs", &run.to_string()]).stdout);
    assert_eq!(ticks_of(&log, 2), (0..60).collect::<Vec<_>>(), "{log}");
    // What attempt 1 managed to send before the cut is a clean prefix, nothing after.
    let stale = ticks_of(&log, 1);
    assert_eq!(stale, (0..stale.len() as u32).collect::<Vec<_>>(), "{log}");
    // The healed agent's old session was closed when it was declared lost: it reconnects,
    // says hello and is online again.
    cluster.wait_agents_online(2);
    cluster.stop();
}

/// A simulated agent: a real gRPC session (hello, heartbeats every second) and the real
/// agent's reconnect policy (exponential backoff from 100 ms to 5 s, with jitter). It runs
/// nothing; it counts its sessions.
async fn simulated_agent(
    address: kiln_proto::Address,
    id: usize,
    sessions: std::sync::Arc<Vec<std::sync::atomic::AtomicU32>>,
) {
    use kiln_proto::v1;
    use std::sync::atomic::Ordering;
    use tokio_stream::StreamExt as _;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = kiln_proto::connect(&address).await?;
            let mut client = kiln_proto::clients::agent(channel);
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let hello = v1::AgentMessage {
                kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
                    agent_id: format!("sim-{id:04}"),
                    target: "sim".into(),
                    host: Some(v1::HostInfo {
                        hostname: format!("sim-{id:04}"),
                        cpus: 1,
                        ..Default::default()
                    }),
                    slots: 1,
                    instance: format!("sim-{id:04}"),
                    ..Default::default()
                })),
            };
            tx.send(hello).await?;
            let mut inbound = client
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            inbound
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("no welcome"))??;
            sessions[id].fetch_add(1, Ordering::SeqCst);
            let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    message = inbound.next() => match message {
                        Some(Ok(_)) => {}
                        Some(Err(status)) => anyhow::bail!("{status}"),
                        None => anyhow::bail!("closed"),
                    },
                    _ = heartbeat.tick() => {
                        let beat = v1::AgentMessage {
                            kind: Some(v1::agent_message::Kind::Heartbeat(v1::Heartbeat::default())),
                        };
                        tx.send(beat).await?;
                    }
                }
            }
        };
        let result: anyhow::Result<()> = attempt.await;
        if result.is_ok() {
            backoff = Duration::from_millis(100);
        }
        // Jitter: spread reconnects so that hundreds of agents do not arrive in one burst.
        let jitter = Duration::from_millis((id as u64 * 7919) % (backoff.as_millis() as u64 + 1));
        tokio::time::sleep(backoff / 2 + jitter / 2).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[test]
#[ignore = "fault injection: tests/run runs it with KILN_FAULT_TESTS=1"]
fn five_hundred_agents_reconnect_after_a_coordinator_crash_with_no_false_lost_marks() {
    use std::sync::atomic::{AtomicU32, Ordering};
    const N: usize = 500;
    const TTL: u32 = 10;
    let mut cluster = Cluster::start_with_ttl(&[], TTL);
    let address = kiln_proto::Address::parse(&cluster.address).unwrap();
    let sessions: std::sync::Arc<Vec<AtomicU32>> =
        std::sync::Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for id in 0..N {
        runtime.spawn(simulated_agent(address.clone(), id, sessions.clone()));
    }
    let online = |cluster: &Cluster| -> (usize, usize) {
        let agents = cluster.json(&["agents", "--json"]);
        let agents = agents.as_array().unwrap();
        let count = |state: &str| agents.iter().filter(|a| a["state"] == state).count();
        (count("online"), count("lost"))
    };
    wait_for(
        "all simulated agents online",
        Duration::from_secs(60),
        || (online(&cluster).0 == N).then_some(()),
    );
    let before: Vec<u32> = sessions.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    cluster.crash_coordinator();
    let restarted = Instant::now();
    wait_for(
        "every simulated agent to reconnect",
        Duration::from_secs(60),
        || {
            sessions
                .iter()
                .zip(&before)
                .all(|(now, before)| now.load(Ordering::SeqCst) > *before)
                .then_some(())
        },
    );
    let took = restarted.elapsed();
    eprintln!("{N} agents reconnected {took:?} after the coordinator restarted");
    // Past the TTL after the restart, nobody was judged lost.
    std::thread::sleep(Duration::from_secs(u64::from(TTL) + 2).saturating_sub(took));
    let (up, lost) = online(&cluster);
    assert_eq!((up, lost), (N, 0), "{up} online, {lost} lost");
    runtime.shutdown_background();
    cluster.coordinator.stop_cleanly();
}
