//! Delivery of what a run produces — every log line, metric point, output file and
//! checkpoint, and the run's last words — through script exits, coordinator crashes and
//! outages, agent crashes, freezes and host reboots, with real processes throughout.
//!
//! Each test asserts what a user sees (`kiln logs`, `kiln metrics`, `kiln show --json`,
//! `kiln download`, `kiln submit`'s exit code). Volumes are kept small enough for CI on two
//! cores; the full-size versions belong in `bench/`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kiln_tests::secure::SecureCluster;
use kiln_tests::*;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

fn alpha(slots: u32) -> AgentSpec {
    AgentSpec {
        target: "alpha",
        slots,
        advertise: None,
    }
}

fn source_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    dir
}

/// When a test ends, also by a failed assertion, kills the run supervisors its cluster left
/// behind and their scripts: the agents die with the cluster but by design their runs do
/// not, and a chatty script would write on forever.
struct Leftovers(String);

impl Leftovers {
    fn of(dir: &Path) -> Leftovers {
        Leftovers(format!("{}/", dir.display()))
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let parent = |pid: i32| -> Option<i32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let supervisors: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&pid| {
                let line = text(&cmdline(pid));
                line.contains("__supervise") && line.contains(&self.0)
            })
            .collect();
        for &pid in &pids {
            if parent(pid).is_some_and(|p| supervisors.contains(&p)) {
                // A script leads its own process group.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for pid in supervisors {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `kiln logs RUN`, which must succeed: its stdout.
fn logs(cluster: &Cluster, run_id: i64) -> String {
    let output = cluster.kiln(&["logs", &run_id.to_string()]);
    assert!(
        output.status.success(),
        "kiln logs {run_id}: {}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Asserts that `got` holds exactly the `expected` lines, naming the first difference (the
/// streams here are too long to print whole).
fn assert_same_lines(what: &str, got: &str, expected: &[String]) {
    let got: Vec<&str> = got.lines().collect();
    let first_difference = got
        .iter()
        .zip(expected)
        .position(|(g, e)| *g != e.as_str())
        .or_else(|| (got.len() != expected.len()).then(|| got.len().min(expected.len())));
    if let Some(i) = first_difference {
        let short = |line: Option<&str>| match line {
            None => "<none>".to_string(),
            Some(line) if line.len() > 80 => {
                format!("{}... ({} bytes)", &line[..80], line.len())
            }
            Some(line) => line.to_string(),
        };
        panic!(
            "{what}: {} lines stored, {} expected; first difference at line {i}: stored {:?}, expected {:?}",
            got.len(),
            expected.len(),
            short(got.get(i).copied()),
            short(expected.get(i).map(String::as_str)),
        );
    }
}

/// The `count` of metric `name` in `kiln metrics RUN --json` (0 when it has none).
fn metric_count(cluster: &Cluster, run_id: i64, name: &str) -> u64 {
    let metrics = cluster.json(&["metrics", &run_id.to_string(), "--json"]);
    metrics
        .as_array()
        .expect("an array")
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["count"].as_u64())
        .unwrap_or(0)
}

/// Whether `pid` is a live process. Unlike `process_alive`, a zombie counts as gone: it
/// has exited and only waits for a parent to reap it (an orphan's may never be reaped in
/// a container whose pid 1 does not reap).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The number that follows `prefix` on the first stored line that starts with it.
fn logged_number(cluster: &Cluster, run_id: i64, prefix: &str) -> i32 {
    wait_for(
        &format!("run {run_id} to log `{prefix}N`"),
        Duration::from_secs(30),
        || {
            logs(cluster, run_id)
                .lines()
                .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        },
    )
}

/// The pid in an attempt's `state/supervisor.json` on agent `index`.
fn supervisor_pid(cluster: &Cluster, index: usize, run_id: i64, attempt: u32) -> i32 {
    let path = cluster
        .agent_data(index)
        .join(format!("runs/{run_id}.{attempt}/state/supervisor.json"));
    let record: Value = wait_for(
        &format!("{}", path.display()),
        Duration::from_secs(20),
        || serde_json::from_slice(&std::fs::read(&path).ok()?).ok(),
    );
    record["pid"].as_i64().expect("supervisor.json has a pid") as i32
}

fn sha256_of(path: &Path) -> String {
    let output = std::process::Command::new(python())
        .args([
            "-c",
            "import hashlib,sys; h=hashlib.sha256()\nwith open(sys.argv[1],'rb') as f:\n    for b in iter(lambda: f.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout).trim().to_string()
}

fn download(cluster: &Cluster, run_id: i64, dest: &Path) -> Output {
    cluster.kiln(&["download", &run_id.to_string(), dest.to_str().unwrap()])
}

// ---------------------------------------------------------------------------------------
// 1. Nothing is lost at the tail: what a script wrote just before it exited is stored.

/// Prints N short numbered lines in one burst, then `RESULT ok`, and exits 0.
const BURST: &str = r#"
import sys
n = int(sys.argv[1])
out = sys.stdout
for start in range(0, n, 10000):
    out.write("".join("line %06d\n" % i for i in range(start, min(n, start + 10000))))
out.write("RESULT ok\n")
out.flush()
"#;

fn burst_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("line {i:06}"))
        .chain(["RESULT ok".to_string()])
        .collect()
}

#[test]
fn a_burst_of_200k_lines_just_before_exit_is_stored_whole() {
    let cluster = Cluster::start(&[alpha(1)]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("burst.py", BURST)]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "burst.py",
        "--",
        "200000",
    ]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(120));
    let stored = logs(&cluster, run_id);
    assert_same_lines("the burst", &stored, &burst_lines(200_000));
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.stop();
}

#[test]
fn a_burst_of_200k_metric_points_just_before_exit_is_stored_whole() {
    let cluster = Cluster::start(&[alpha(1)]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "points.py",
        "import kiln\nfor i in range(200000):\n    kiln.log('burst', i, step=i)\nprint('RESULT ok')\n",
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "points.py",
    ]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(120));
    assert_eq!(metric_count(&cluster, run_id, "burst"), 200_000, "{run}");
    assert_eq!(logs(&cluster, run_id), "RESULT ok\n");
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.stop();
}

/// Prints N numbered lines at about 10,000 a second, then `RESULT ok`; writes the file
/// `argv[2]` once it has printed everything.
const STEADY: &str = r#"
import sys, time
n = int(sys.argv[1])
for i in range(n):
    print("tick %06d" % i)
    if i % 100 == 99:
        time.sleep(0.01)
print("RESULT ok", flush=True)
open(sys.argv[2], "w").close()
"#;

#[test]
fn lines_written_while_the_coordinator_is_down_are_all_stored() {
    // A long TTL: the outage must not lose the agent. The script writes more during the
    // outage (60,000 lines) than the agent holds unacknowledged in memory (50,000 lines
    // today); at 3,000 lines a second the outage would never reach that.
    let mut cluster = Cluster::start_with_ttl(&[alpha(1)], 30);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("steady.py", STEADY)]);
    let signals = shared_dir();
    let done = signals.path().join("script-done");
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "steady.py",
        "--",
        "60000",
        done.to_str().unwrap(),
    ]);
    wait_for("the first lines", Duration::from_secs(30), || {
        logs(&cluster, run_id)
            .starts_with("tick 000000\n")
            .then_some(())
    });
    cluster.kill_coordinator();
    let down_at = Instant::now();
    // The script ends during the outage.
    wait_for(
        "the script to end while the coordinator is down",
        Duration::from_secs(30),
        || done.exists().then_some(()),
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(down_at.elapsed()));
    cluster.start_coordinator();
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    let expected: Vec<String> = (0..60000)
        .map(|i| format!("tick {i:06}"))
        .chain(["RESULT ok".to_string()])
        .collect();
    assert_same_lines("the outage", &logs(&cluster, run_id), &expected);
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.stop();
}

#[test]
fn a_burst_just_before_exit_is_stored_whole_over_tls() {
    let mut cluster = SecureCluster::start(&[]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let agent = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    cluster.wait_agent_state(&admin, &cluster.agent_id(agent), "online");
    let src = source_dir(&[("burst.py", BURST)]);
    let run_id = admin.submit_detached(&[
        "--target",
        "cpu",
        src.path().to_str().unwrap(),
        "burst.py",
        "--",
        "200000",
    ]);
    let run = wait_for(
        &format!("run {run_id} to end"),
        Duration::from_secs(120),
        || {
            let run = admin.json(&["show", &run_id.to_string(), "--json"]);
            ENDED.iter().any(|s| run["status"] == *s).then_some(run)
        },
    );
    let output = admin.kiln(&["logs", &run_id.to_string()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_same_lines(
        "the burst over TLS",
        &text(&output.stdout),
        &burst_lines(200_000),
    );
    assert_eq!(run["status"], "succeeded", "{run}");
}

// ---------------------------------------------------------------------------------------
// 2. Outputs: kept across a coordinator crash during their upload, or said to be lost.

#[test]
fn outputs_survive_a_coordinator_crash_during_their_upload() {
    let mut cluster = Cluster::start_with_ttl(&[alpha(1)], 30);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "weights.py",
        r#"
import hashlib, os
data = os.urandom(100 * 1024 * 1024)
with open(os.path.join(os.environ["KILN_OUTPUTS_DIR"], "weights.bin"), "wb") as f:
    f.write(data)
print("sha256 " + hashlib.sha256(data).hexdigest(), flush=True)
"#,
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "weights.py",
    ]);
    // The snapshot's upload finished before `submit --detach` returned: the first file in
    // blobs/tmp/ is the outputs' upload.
    let uploads = cluster.coordinator_data().join("blobs/tmp");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let uploading = std::fs::read_dir(&uploads)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if uploading {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upload ever appeared in {}; run: {}",
            uploads.display(),
            cluster.run(run_id)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    cluster.crash_coordinator();
    let run = cluster.wait_ended(run_id, Duration::from_secs(120));
    assert_eq!(run["status"], "succeeded", "{run}");
    let printed = logs(&cluster, run_id)
        .lines()
        .find_map(|l| l.strip_prefix("sha256 ").map(str::to_string))
        .expect("the script printed its sha256");
    let dest = cluster.dir.path().join("downloaded");
    let output = download(&cluster, run_id, &dest);
    assert!(
        output.status.success(),
        "kiln download: {}",
        text(&output.stderr)
    );
    assert_eq!(sha256_of(&dest.join("weights.bin")), printed);
    cluster.stop();
}

#[test]
fn outputs_over_the_blob_limit_are_reported_as_not_kept() {
    let cluster =
        Cluster::start_with_coordinator_args(&[alpha(1)], 5, &["--max-blob-bytes", "1000000"]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "big.py",
        "import os\nwith open(os.path.join(os.environ['KILN_OUTPUTS_DIR'], 'big.bin'), 'wb') as f:\n    f.write(os.urandom(3000000))\nprint('done')\n",
    )]);
    let run_id =
        cluster.submit_detached(&["--target", "alpha", src.path().to_str().unwrap(), "big.py"]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    // The script succeeded; its outputs could not be kept, and the run says so.
    assert_eq!(run["status"], "succeeded", "{run}");
    let message = run["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("outputs not kept:") && message.contains("1000000"),
        "the message should say the outputs were not kept and name the limit: {run}"
    );
    let output = download(&cluster, run_id, &cluster.dir.path().join("downloaded"));
    assert!(!output.status.success(), "kiln download succeeded");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("outputs not kept:"), "{stderr}");
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 3. Never two copies of one run at once.

/// Records its pid in the directory `argv[1]` and reports which earlier attempts' scripts
/// are still alive. Attempt 1 sleeps, and (with `argv[2]` = `slow`) takes 2 s to exit on
/// SIGTERM, as a job saving its state would; later attempts exit 0 at once.
const COPIES: &str = r#"
import os, signal, sys, time
attempt = os.environ["KILN_ATTEMPT"]
marks = sys.argv[1]
def running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
alive = sorted(int(p) for p in os.listdir(marks) if running(int(p)))
open(os.path.join(marks, str(os.getpid())), "w").close()
print("attempt %s pid %d" % (attempt, os.getpid()), flush=True)
print("attempt %s sees alive: %s" % (attempt, alive), flush=True)
if attempt == "1":
    if sys.argv[2] == "slow":
        def stop(*_):
            time.sleep(2)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
    time.sleep(1000)
print("RESULT ok", flush=True)
"#;

#[test]
fn a_restarted_agent_stops_the_old_attempt_before_the_retry_runs() {
    let mut cluster = Cluster::start_with_ttl(&[alpha(1)], 4);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("copies.py", COPIES)]);
    let marks = shared_dir();
    let run_id = cluster.submit_detached(&[
        "--max-retries",
        "1",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "copies.py",
        "--",
        marks.path().to_str().unwrap(),
        "slow",
    ]);
    let first = logged_number(&cluster, run_id, "attempt 1 pid ");
    cluster.agents[0].kill();
    cluster.wait_status(run_id, "queued");
    // The dead agent's lease ran out before the TTL: attempt 1's supervisor stopped it
    // (SIGTERM at 2/3 of the TTL, SIGKILL at 9/10), before the run was queued again.
    assert!(
        !running(first),
        "attempt 1's script {first} outlived its agent's lease"
    );
    cluster.restart_agent(0);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    let log = logs(&cluster, run_id);
    assert!(
        log.lines().any(|l| l == "attempt 2 sees alive: []"),
        "attempt 2 ran while attempt 1's script ({first}) was alive:\n{log}"
    );
    assert!(!running(first), "attempt 1's script {first} is still alive");
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    cluster.stop();
}

#[test]
fn a_frozen_agents_attempt_is_stopped_when_its_retry_starts_elsewhere() {
    let cluster = Cluster::start(&[alpha(1), alpha(1)]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("copies.py", COPIES)]);
    let marks = shared_dir();
    let run_id = cluster.submit_detached(&[
        "--max-retries",
        "1",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "copies.py",
        "--",
        marks.path().to_str().unwrap(),
        "plain",
    ]);
    let pid = logged_number(&cluster, run_id, "attempt 1 pid ");
    let run = cluster.run(run_id);
    let holder = (0..2)
        .find(|&i| run["agent"] == cluster.agent_id(i))
        .expect("the run's agent is one of the cluster's");
    let supervisor = supervisor_pid(&cluster, holder, run_id, 1);
    // Frozen for longer than the TTL (5 s): the coordinator gives the run to the other
    // agent, which the frozen one cannot hear.
    cluster.agents[holder].pause(true);
    let second = logged_number(&cluster, run_id, "attempt 2 pid ");
    let stopped = std::panic::catch_unwind(|| {
        wait_for(
            "attempt 1's script to be stopped",
            Duration::from_secs(5),
            || (!running(pid)).then_some(()),
        )
    });
    let overlap_seen = running(pid);
    cluster.agents[holder].pause(false);
    assert!(
        stopped.is_ok(),
        "attempt 2 ({second}) runs on the other agent while attempt 1's script ({pid}) on the \
         frozen agent is still alive (still alive now: {overlap_seen})"
    );
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    // Thawed, the agent learns its attempt was given away: nothing of it is left.
    wait_for(
        "attempt 1's processes to be gone",
        Duration::from_secs(30),
        || (!running(pid) && !running(supervisor)).then_some(()),
    );
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 4. Big lines, and the control loop while the uplink is blocked.

/// 300 lines of 60 KiB, then waits for the file `argv[1]`/go, then 300 more; writes
/// `argv[1]`/half in between and `argv[1]`/done at the end.
const BIG_LINES: &str = r#"
import os, sys, time
gate = sys.argv[1]
def line(i):
    return ("%06d:" % i) + chr(97 + i % 26) * (60 * 1024 - 7)
for i in range(300):
    print(line(i), flush=True)
open(os.path.join(gate, "half"), "w").close()
while not os.path.exists(os.path.join(gate, "go")):
    time.sleep(0.05)
for i in range(300, 600):
    print(line(i), flush=True)
print("RESULT ok", flush=True)
open(os.path.join(gate, "done"), "w").close()
"#;

#[test]
fn lines_of_60_kib_are_stored_whole_across_a_coordinator_crash() {
    let mut cluster = Cluster::start_with_ttl(&[alpha(1)], 30);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("big.py", BIG_LINES)]);
    let gate = shared_dir();
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "big.py",
        "--",
        gate.path().to_str().unwrap(),
    ]);
    wait_for("the first 300 lines", Duration::from_secs(30), || {
        gate.path().join("half").exists().then_some(())
    });
    // The second half is written while the coordinator is down, so that it is sent again,
    // all at once, when the coordinator is back.
    cluster.kill_coordinator();
    std::fs::write(gate.path().join("go"), "").unwrap();
    wait_for("the script to end", Duration::from_secs(30), || {
        gate.path().join("done").exists().then_some(())
    });
    cluster.start_coordinator();
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    let expected: Vec<String> = (0..600)
        .map(|i| {
            format!(
                "{i:06}:{}",
                ((b'a' + (i % 26) as u8) as char)
                    .to_string()
                    .repeat(60 * 1024 - 7)
            )
        })
        .chain(["RESULT ok".to_string()])
        .collect();
    let agent_log = cluster.agents[0].log_text();
    assert!(
        !agent_log.contains("message length too large"),
        "the agent sent a message over the limit:\n{}",
        tail(&agent_log, 20)
    );
    assert_same_lines("the 60 KiB lines", &logs(&cluster, run_id), &expected);
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.stop();
}

/// Prints its pid, then a short line about every millisecond, forever.
const CHATTY: &str = r#"
import os, time
print("pid %d" % os.getpid(), flush=True)
i = 0
while True:
    print("chatter %09d" % i, flush=True)
    i += 1
    time.sleep(0.001)
"#;

#[test]
fn a_time_limit_is_enforced_while_the_coordinator_is_down() {
    // Three chatty runs beside the timed one: while the coordinator is down, what the four
    // send piles up in the agent's queue to the coordinator until it is full, long before
    // the time limit. Stopping the run must not wait for room in that queue.
    let mut cluster = Cluster::start_with_ttl(&[alpha(4)], 30);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("chatty.py", CHATTY)]);
    let dir = src.path().to_str().unwrap();
    let chatty: Vec<i64> = (0..3)
        .map(|_| cluster.submit_detached(&["--target", "alpha", dir, "chatty.py"]))
        .collect();
    let timed =
        cluster.submit_detached(&["--timeout", "12s", "--target", "alpha", dir, "chatty.py"]);
    for &run_id in &chatty {
        logged_number(&cluster, run_id, "pid ");
    }
    let pid = logged_number(&cluster, timed, "pid ");
    cluster.kill_coordinator();
    let stopped = std::panic::catch_unwind(|| {
        wait_for(
            "the script to be stopped at its time limit",
            Duration::from_secs(25),
            || (!running(pid)).then_some(()),
        )
    });
    cluster.start_coordinator();
    assert!(
        stopped.is_ok(),
        "the run outlived its 12 s time limit while the coordinator was down:\n{}",
        tail(&cluster.agents[0].log_text(), 20)
    );
    let run = cluster.wait_ended(timed, Duration::from_secs(90));
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["message"]
            .as_str()
            .unwrap_or_default()
            .contains("time limit"),
        "{run}"
    );
    for run_id in chatty {
        let cancel = cluster.kiln(&["cancel", &run_id.to_string()]);
        assert!(cancel.status.success(), "{}", text(&cancel.stderr));
        cluster.wait_ended(run_id, Duration::from_secs(60));
    }
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 5. A quick host reboot: the agent, the supervisor and the script all vanish at once.

const REBOOTED: &str = r#"
import os, time
attempt = os.environ["KILN_ATTEMPT"]
print("attempt %s pid %d" % (attempt, os.getpid()), flush=True)
if attempt == "1":
    time.sleep(1000)
print("RESULT ok", flush=True)
"#;

/// Submits REBOOTED with `retries`, "reboots" the agent's host while attempt 1 runs and
/// starts the agent again before the TTL; returns the run once it ended.
fn reboot_during_attempt_1(retries: &str) -> (Cluster, Leftovers, i64, Value) {
    let mut cluster = Cluster::start_with_ttl(&[alpha(1)], 20);
    let leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("job.py", REBOOTED)]);
    let run_id = cluster.submit_detached(&[
        "--max-retries",
        retries,
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "job.py",
    ]);
    let script = logged_number(&cluster, run_id, "attempt 1 pid ");
    let supervisor = supervisor_pid(&cluster, 0, run_id, 1);
    // Everything at once, supervisor before script so that nobody sees the script end.
    cluster.agents[0].kill();
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).expect("kill the supervisor");
    killpg(Pid::from_raw(script), Signal::SIGKILL).expect("kill the script's group");
    cluster.restart_agent(0);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    (cluster, leftovers, run_id, run)
}

#[test]
fn a_run_whose_host_rebooted_quickly_is_retried() {
    let (cluster, _leftovers, run_id, run) = reboot_during_attempt_1("2");
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    let log = logs(&cluster, run_id);
    assert!(log.ends_with("RESULT ok\n"), "{log}");
    cluster.stop();
}

#[test]
fn a_run_whose_host_rebooted_quickly_with_no_retries_left_is_lost() {
    let (cluster, _leftovers, _, run) = reboot_during_attempt_1("0");
    assert_eq!(run["status"], "lost", "{run}");
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 6. A stopped run's last words are kept.

#[test]
fn a_cancelled_runs_last_words_reach_the_follower_and_the_log() {
    let cluster = Cluster::start(&[alpha(1)]);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "trap.py",
        r#"
import signal, sys, time
def stop(*_):
    time.sleep(0.5)
    print("last words", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(1000)
"#,
    )]);
    let mut submit = cluster.spawn_kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "trap.py",
    ]);
    assert_eq!(submit.line(), "ready\n");
    let runs = cluster.json(&["runs", "--json"]);
    let run_id = runs[0]["id"].as_i64().expect("the run is listed");
    let cancel = cluster.kiln(&["cancel", &run_id.to_string()]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let (rest, output) = submit.finish();
    assert!(
        rest.contains("last words"),
        "the follower ended without the last words: {rest:?}\n{}",
        text(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(130), "{}", text(&output.stderr));
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "cancelled", "{run}");
    let log = logs(&cluster, run_id);
    assert!(log.contains("last words"), "{log}");
    cluster.stop();
}

const GANG_ADDRESSES: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

fn gang_cluster() -> Cluster {
    let specs: Vec<AgentSpec> = GANG_ADDRESSES
        .iter()
        .map(|address| AgentSpec {
            target: "gpu",
            slots: 1,
            advertise: Some(address),
        })
        .collect();
    Cluster::start(&specs)
}

#[test]
fn a_failed_gangs_last_words_are_kept() {
    let cluster = gang_cluster();
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "gang.py",
        r#"
import os, signal, sys, time
rank = os.environ["RANK"]
if rank == "0":
    def stop(*_):
        time.sleep(0.5)
        print("rank 0 last words", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("rank 0 ready", flush=True)
    time.sleep(1000)
else:
    time.sleep(2)
    print("rank 1 fails", flush=True)
    sys.exit(3)
"#,
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        src.path().to_str().unwrap(),
        "gang.py",
    ]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3, "{run}");
    let log = logs(&cluster, run_id);
    assert!(log.contains("rank 0 ready"), "{log}");
    assert!(log.contains("rank 0 last words"), "{log}");
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 7. Every node's outputs and checkpoints.

#[test]
fn a_gangs_outputs_download_node_by_node() {
    let cluster = gang_cluster();
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "out.py",
        r#"
import json, os
rank = os.environ["RANK"]
out = os.environ["KILN_OUTPUTS_DIR"]
with open(os.path.join(out, "rank-%s.txt" % rank), "w") as f:
    f.write("written by rank %s\n" % rank)
if rank == "0":
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"layers": 2}, f)
print("rank %s done" % rank, flush=True)
"#,
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        src.path().to_str().unwrap(),
        "out.py",
    ]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run}");
    let dest = cluster.dir.path().join("downloaded");
    let output = download(&cluster, run_id, &dest);
    assert!(
        output.status.success(),
        "kiln download: {}",
        text(&output.stderr)
    );
    let read = |path: &str| {
        std::fs::read_to_string(dest.join(path)).unwrap_or_else(|e| {
            panic!(
                "{path}: {e}; downloaded: {:?}",
                files_under(&dest)
                    .iter()
                    .map(|p| p.strip_prefix(&dest).unwrap().display().to_string())
                    .collect::<Vec<_>>()
            )
        })
    };
    assert_eq!(read("node-0/rank-0.txt"), "written by rank 0\n");
    assert_eq!(read("node-1/rank-1.txt"), "written by rank 1\n");
    assert_eq!(read("node-0/model.json"), r#"{"layers": 2}"#);
    cluster.stop();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_rank_restores_its_own_checkpoint_when_the_gang_restarts() {
    let cluster = gang_cluster();
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[(
        "ckpt.py",
        r#"
import os, sys, time
rank = os.environ["RANK"]
restart = int(os.environ["KILN_RESTART_COUNT"])
ckpt = os.path.join(os.environ["KILN_CHECKPOINT_DIR"], "rank-%s.txt" % rank)
gate = sys.argv[1]
if restart == 0:
    with open(ckpt, "w") as f:
        f.write("checkpoint of rank %s" % rank)
    print("rank %s wrote its checkpoint" % rank, flush=True)
    while not os.path.exists(os.path.join(gate, "go")):
        time.sleep(0.05)
    if rank == "1":
        sys.exit(1)
    time.sleep(1000)
else:
    print("rank %s finds %s" % (rank, sorted(os.listdir(os.environ["KILN_CHECKPOINT_DIR"]))), flush=True)
    if not os.path.exists(ckpt):
        print("rank %s has no checkpoint" % rank, flush=True)
        sys.exit(2)
    with open(ckpt) as f:
        print("rank %s restored: %s" % (rank, f.read()), flush=True)
"#,
    )]);
    let gate = shared_dir();
    let run_id = cluster.submit_detached(&[
        "--target",
        "gpu",
        "--nodes",
        "2",
        "--checkpoint-interval",
        "1s",
        "--max-restarts",
        "1",
        src.path().to_str().unwrap(),
        "ckpt.py",
        "--",
        gate.path().to_str().unwrap(),
    ]);
    wait_for("both ranks to checkpoint", Duration::from_secs(30), || {
        let log = logs(&cluster, run_id);
        (log.contains("rank 0 wrote its checkpoint") && log.contains("rank 1 wrote its checkpoint"))
            .then_some(())
    });
    // A few checkpoint intervals, so that both nodes' checkpoints are uploaded.
    std::thread::sleep(Duration::from_secs(4));
    std::fs::write(gate.path().join("go"), "").unwrap();
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    let log = logs(&cluster, run_id);
    assert!(
        log.contains("rank 0 restored: checkpoint of rank 0"),
        "{run}\n{log}"
    );
    assert!(
        log.contains("rank 1 restored: checkpoint of rank 1"),
        "{run}\n{log}"
    );
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["restarts"], 1, "{run}");
    cluster.stop();
}

// ---------------------------------------------------------------------------------------
// 8. A seeded soak: random volumes, random coordinator crashes, every byte accounted for.

/// Prints a stream derived from its seed (`argv[1]`), in one of three shapes: many tiny
/// lines (up to 60,000), lines of random length (up to 60,000 bytes), or only big lines;
/// at most 20 MB in all, written in random bursts; then metric points and a summary line.
/// Outside Kiln it only prints, so the test can reproduce the stream.
const SOAK: &str = r#"
import os, random, sys
rng = random.Random(int(sys.argv[1]))
under_kiln = bool(os.environ.get("KILN_METRICS_SOCKET"))
if under_kiln:
    import kiln, time
alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/#"
shape = rng.choice(["tiny", "mixed", "big"])
lines = rng.choice([rng.randrange(1, 10), rng.randrange(10, 5000), rng.randrange(5000, 60000)])
budget = 20_000_000
points = rng.choice([0, 10, 1000, 30000])
out = sys.stdout
written = 0
for i in range(lines):
    if shape == "tiny":
        length = rng.randrange(0, 100)
    elif shape == "mixed":
        length = int(10 ** rng.uniform(0, 4.78))
    else:
        length = rng.randrange(30000, 60000)
    length = min(length, max(0, budget - written))
    unit = rng.choice(alphabet)
    out.write("%d:%s\n" % (i, unit * length))
    written += length
    # Draw whether under Kiln or not, so that both print the same stream.
    pause = rng.random() < 0.01
    if under_kiln and pause:
        out.flush()
        time.sleep(0.01)
if under_kiln:
    for p in range(points):
        kiln.log("soak", p, step=p)
out.write("RESULT shape=%s lines=%d points=%d\n" % (shape, lines, points))
out.flush()
"#;

#[test]
fn a_seeded_soak_with_coordinator_crashes_stores_every_stream_byte_for_byte() {
    let seed: u64 = std::env::var("KILN_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak seed {seed} (replay with KILN_SOAK_SEED={seed})");
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut cluster = Cluster::start_with_ttl(&[alpha(2)], 30);
    let _leftovers = Leftovers::of(cluster.dir.path());
    let src = source_dir(&[("soak.py", SOAK)]);
    let dir = src.path().to_str().unwrap().to_string();
    let mut runs = Vec::new();
    for _ in 0..6 {
        let run_seed = (next() % 1_000_000).to_string();
        let output = cluster.kiln(&[
            "submit", "--detach", "--target", "alpha", &dir, "soak.py", "--", &run_seed,
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let run_id: i64 = text(&output.stdout).trim().parse().expect("a run id");
        runs.push((run_id, run_seed));
        std::thread::sleep(Duration::from_millis(next() % 1500));
        if next() % 2 == 0 {
            eprintln!("crashing the coordinator after run {run_id}");
            cluster.crash_coordinator();
        }
    }
    // One bound for the whole soak, so that a stuck stream fails it once, not per run.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (run_id, run_seed) in runs {
        let expected = std::process::Command::new(python())
            .arg(src.path().join("soak.py"))
            .arg(&run_seed)
            .env_remove("KILN_METRICS_SOCKET")
            .output()
            .expect("run the soak script here");
        assert!(expected.status.success(), "{}", text(&expected.stderr));
        let expected = text(&expected.stdout);
        eprintln!(
            "run {run_id}: script seed {run_seed}, {} bytes, {}",
            expected.len(),
            expected.lines().last().unwrap_or_default()
        );
        let left = deadline.saturating_duration_since(Instant::now());
        let run = cluster.wait_ended(run_id, left.max(Duration::from_secs(1)));
        let stored = logs(&cluster, run_id);
        let expected_lines: Vec<String> = expected.lines().map(str::to_string).collect();
        assert_same_lines(
            &format!("run {run_id} (script seed {run_seed}, soak seed {seed})"),
            &stored,
            &expected_lines,
        );
        assert!(
            stored == expected,
            "run {run_id}: the stream differs from the script's (line endings?)"
        );
        let points: u64 = expected
            .lines()
            .last()
            .and_then(|l| l.rsplit("points=").next()?.parse().ok())
            .expect("a summary line");
        assert_eq!(
            metric_count(&cluster, run_id, "soak"),
            points,
            "run {run_id} (script seed {run_seed}, soak seed {seed}): {run}"
        );
        assert_eq!(run["status"], "succeeded", "run {run_id}: {run}");
    }
    cluster.stop();
}
