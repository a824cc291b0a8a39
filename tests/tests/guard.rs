//! Daemons that guard themselves (issue 14): ordinary faults (a stalled coordinator, a
//! database write that fails, two processes on one data directory, a damaged cache, a
//! damaged database) must not end healthy runs, hang, or need a person to read the code.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::*;

const ONE: &[AgentSpec] = &[AgentSpec {
    target: "box",
    slots: 1,
    advertise: None,
}];

fn source_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    dir
}

fn logs(cluster: &Cluster, run_id: i64) -> String {
    text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout)
}

/// Waits for `kiln logs RUN` to contain `needle`; on a timeout, says what the run, its log
/// and the agents' logs show.
fn wait_for_log(cluster: &Cluster, run_id: i64, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if logs(cluster, run_id).contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let agents: Vec<String> = cluster
        .agents
        .iter()
        .map(|agent| tail(&agent.log_text(), 30))
        .collect();
    panic!(
        "timed out after 60s waiting for run {run_id} to print {needle:?}\nrun: {}\nlog:\n{}\nagents:\n{}",
        cluster.run(run_id),
        logs(cluster, run_id),
        agents.join("\n---\n")
    );
}

/// Runs `command` and waits up to `within` for it to exit; kills it (and panics) if it
/// does not, so that a refusal that never comes fails the test instead of hanging it.
fn exits_within(mut command: Command, within: Duration) -> (i32, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(log.path()).unwrap();
            return (status.code().unwrap_or(-1), stderr);
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(log.path()).unwrap();
            panic!("still running after {within:?}; its log:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_coordinator_stalled_longer_than_the_ttl_does_not_end_healthy_runs() {
    let cluster = Cluster::start_with_ttl(ONE, 4);
    let src = source_dir(&[(
        "train.py",
        "import time\nprint('started', flush=True)\ntime.sleep(16)\nprint('done', flush=True)\n",
    )]);
    let run_id =
        cluster.submit_detached(&["--target", "box", src.path().to_str().unwrap(), "train.py"]);
    wait_for_log(&cluster, run_id, "started");
    // A VM pause, a SIGSTOP, a long GC-like stall: 9 s with a 4 s TTL. The agent kept
    // heartbeating into the socket the whole time.
    cluster.coordinator.pause(true);
    std::thread::sleep(Duration::from_secs(9));
    cluster.coordinator.pause(false);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert!(logs(&cluster, run_id).contains("done"));
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "online", "{agents}");
    assert!(
        !cluster.coordinator.log_text().contains("marking it lost"),
        "{}",
        cluster.coordinator.log_text()
    );
    cluster.stop();
}

/// Fills the file system holding `dir` (a tmpfs) with one file; returns its path.
fn fill_disk(dir: &Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[test]
fn a_dead_agent_is_declared_lost_once_the_database_can_be_written_again() {
    let mut cluster = Cluster::start_with_ttl(ONE, 3);
    // Move the coordinator's data onto a small disk of its own.
    cluster.kill_coordinator();
    let data = cluster.coordinator_data();
    let saved = cluster.dir.path().join("coordinator-saved");
    std::fs::rename(&data, &saved).unwrap();
    let _disk = SmallDisk::mount(data.clone(), "16m");
    copy_dir(&saved, &data);
    cluster.start_coordinator();
    cluster.wait_agents_online(1);

    let src = source_dir(&[(
        "train.py",
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n",
    )]);
    let run_id =
        cluster.submit_detached(&["--target", "box", src.path().to_str().unwrap(), "train.py"]);
    wait_for_log(&cluster, run_id, "started");

    // The disk fills up, then the agent dies while nothing can be written.
    let filler = fill_disk(&data);
    cluster.agents[0].kill();
    std::thread::sleep(Duration::from_secs(8));
    // Space comes back: within a few liveness periods the agent is lost and so is its run.
    std::fs::remove_file(&filler).unwrap();
    let run = cluster.wait_ended(run_id, Duration::from_secs(15));
    assert_eq!(run["status"], "lost", "{run}");
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "lost", "{agents}");
    cluster.coordinator.stop_cleanly();
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_second_agent_or_coordinator_on_one_data_dir_is_refused_naming_the_holder() {
    let cluster = Cluster::start(ONE);
    let src = source_dir(&[(
        "train.py",
        "import time\nprint('started', flush=True)\ntime.sleep(4)\nprint('done', flush=True)\n",
    )]);
    let run_id =
        cluster.submit_detached(&["--target", "box", src.path().to_str().unwrap(), "train.py"]);
    wait_for_log(&cluster, run_id, "started");

    let mut agent = Command::new(bin("kiln-agent"));
    agent
        .args(["--coordinator", &cluster.address, "--target", "box"])
        .args(["--python", &python(), "--hostname", "host0"])
        .arg("--data-dir")
        .arg(cluster.agent_data(0));
    let (code, stderr) = exits_within(agent, Duration::from_secs(15));
    assert_ne!(code, 0);
    let holder = format!("pid {}", cluster.agents[0].pid());
    assert!(
        stderr.contains(&cluster.agent_data(0).display().to_string()) && stderr.contains(&holder),
        "the refusal names the directory and {holder}: {stderr}"
    );

    let mut coordinator = Command::new(bin("kiln-coordinator"));
    coordinator
        .args(["--insecure", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(cluster.coordinator_data());
    let (code, stderr) = exits_within(coordinator, Duration::from_secs(15));
    assert_ne!(code, 0);
    let holder = format!("pid {}", cluster.coordinator.pid());
    assert!(
        stderr.contains(&cluster.coordinator_data().display().to_string())
            && stderr.contains(&holder),
        "the refusal names the directory and {holder}: {stderr}"
    );

    // The one that holds it never noticed.
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(
        cluster
            .coordinator
            .log_text()
            .matches("Agent online.")
            .count(),
        1,
        "{}",
        cluster.coordinator.log_text()
    );
    cluster.stop();
}

#[test]
fn a_damaged_cached_snapshot_is_fetched_again() {
    let cluster = Cluster::start(ONE);
    let src = source_dir(&[("train.py", "print('hello from the snapshot')\n")]);
    let dir = src.path().to_str().unwrap();
    let first = cluster.kiln(&["submit", "--target", "box", dir, "train.py"]);
    assert!(first.status.success(), "{}", text(&first.stderr));

    // Bit rot, a half-written file, a careless admin: the cached archive is damaged.
    let cache = cluster.agent_data(0).join("snapshots");
    let cached: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let length = std::fs::metadata(&cached[0]).unwrap().len();
    std::fs::write(&cached[0], vec![0u8; length as usize]).unwrap();

    for _ in 0..2 {
        let again = cluster.kiln(&["submit", "--target", "box", dir, "train.py"]);
        assert!(again.status.success(), "{}", text(&again.stderr));
        assert!(text(&again.stdout).contains("hello from the snapshot"));
    }
    cluster.stop();
}

#[test]
fn a_damaged_database_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("kiln.db");
    for damage in [vec![0u8; 8192], b"SQLite format 3\0truncated".to_vec()] {
        std::fs::write(&db, &damage).unwrap();
        let mut coordinator = Command::new(bin("kiln-coordinator"));
        coordinator
            .args(["--insecure", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data);
        let (code, stderr) = exits_within(coordinator, Duration::from_secs(15));
        assert_ne!(code, 0);
        assert!(
            stderr.contains(&db.display().to_string()),
            "the error names {}: {stderr}",
            db.display()
        );
        // Nothing was written over what the admin may still want to recover.
        assert_eq!(std::fs::read(&db).unwrap(), damage);
    }
}

#[test]
fn a_reconnect_after_a_good_session_does_not_wait_out_an_earlier_outages_backoff() {
    let mut cluster = Cluster::start_with_ttl(ONE, 60);
    let connected = |cluster: &Cluster| {
        cluster.agents[0]
            .log_text()
            .matches("Connected to the coordinator")
            .count()
    };
    // A long outage: the agent's backoff grows to several seconds.
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_secs(9));
    let before = connected(&cluster);
    cluster.start_coordinator();
    wait_for("the agent back", Duration::from_secs(30), || {
        (connected(&cluster) > before).then_some(())
    });
    // A blip after a good session: the agent is back at once, not after the old backoff
    // (which had grown past 6 s).
    let before = connected(&cluster);
    cluster.kill_coordinator();
    cluster.start_coordinator();
    let started = Instant::now();
    wait_for("the agent back", Duration::from_secs(30), || {
        (connected(&cluster) > before).then_some(())
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the agent took {took:?} to reconnect after a blip"
    );
    cluster.stop();
}

#[test]
fn a_graceful_stop_kills_a_preparing_runs_build_and_the_next_agent_takes_it_up_again() {
    // An environment build that never ends: an external conda that sleeps.
    let tools = shared_dir();
    let conda = tools.path().join("slow-conda");
    let started = tools.path().join("build.pid");
    std::fs::write(
        &conda,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            started.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&conda, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cluster =
        Cluster::start_with_agent_args(ONE, &["--conda-command", conda.to_str().unwrap()]);
    let src = source_dir(&[
        ("train.py", "print('never')\n"),
        ("environment.yml", "name: slow\ndependencies:\n  - python\n"),
        (
            "kiln.yaml",
            "script: train.py\ntarget: box\nenvironment:\n  conda:\n    file: environment.yml\n",
        ),
    ]);
    let run_id = cluster.submit_detached(&[src.path().to_str().unwrap()]);
    let pid: i32 = wait_for("the build to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&started).ok()?.trim().parse().ok()
    });

    let agent_pid = nix::unistd::Pid::from_raw(cluster.agents[0].pid() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let code = wait_for("the agent to stop", Duration::from_secs(15), || {
        cluster.agents[0].try_exit()
    });
    assert_eq!(code, Some(0), "{}", cluster.agents[0].log_text());
    wait_for("the build to be killed", Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });
    // Nothing ran, and the run is not over: the next agent process takes its preparation
    // up again (before phases were kept, the restarted agent said hello without it and
    // the coordinator ended it `lost`).
    std::fs::remove_file(&started).unwrap();
    cluster.restart_agent(0);
    let again: i32 = wait_for("the build to start again", Duration::from_secs(30), || {
        std::fs::read_to_string(&started).ok()?.trim().parse().ok()
    });
    assert_ne!(again, pid);
    let run = cluster.run(run_id);
    assert_eq!(run["attempt"], 1, "{run}");
    assert!(
        !ENDED.contains(&run["status"].as_str().unwrap_or_default()),
        "{run}"
    );
    wait_for(
        "the restart said in the run's log",
        Duration::from_secs(10),
        || {
            let output = cluster.kiln(&["logs", &run_id.to_string()]);
            text(&output.stderr)
                .contains("The agent restarted during this attempt's environment phase")
                .then_some(())
        },
    );
    let cancel = cluster.kiln(&["cancel", &run_id.to_string()]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "cancelled", "{run}");
    wait_for(
        "the second build to be killed",
        Duration::from_secs(10),
        || (!process_alive(again)).then_some(()),
    );
    cluster.coordinator.stop_cleanly();
}

const GATED: &str = r#"import os, sys, time
gate = sys.argv[1]
open(os.path.join(gate, "script.pid"), "w").write(str(os.getpid()))
print("started", flush=True)
while not os.path.exists(os.path.join(gate, "go")):
    time.sleep(0.2)
print("done", flush=True)
"#;

/// Submits `train.py` of `src` on `box` with `flags`, `gate` as its argument; waits until
/// it printed `started` and returns the run id and the script's pid (from `script.pid`).
fn submit_gated(
    cluster: &Cluster,
    flags: &[&str],
    src: &tempfile::TempDir,
    gate: &tempfile::TempDir,
) -> (i64, i32) {
    let mut args = vec!["--target", "box"];
    args.extend_from_slice(flags);
    args.extend([
        src.path().to_str().unwrap(),
        "train.py",
        "--",
        gate.path().to_str().unwrap(),
    ]);
    let run_id = cluster.submit_detached(&args);
    wait_for_log(cluster, run_id, "started");
    let pid = std::fs::read_to_string(gate.path().join("script.pid"))
        .unwrap()
        .parse()
        .unwrap();
    (run_id, pid)
}

fn stop_agent(cluster: &mut Cluster) {
    let pid = nix::unistd::Pid::from_raw(cluster.agents[0].pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let code = wait_for("the agent to stop", Duration::from_secs(15), || {
        cluster.agents[0].try_exit()
    });
    assert_eq!(code, Some(0), "{}", cluster.agents[0].log_text());
}

#[test]
fn an_announced_agent_stop_keeps_its_runs_for_the_disconnect_grace() {
    let mut cluster = Cluster::start_with_coordinator_args(ONE, 3, &["--disconnect-grace", "60"]);
    let gate = shared_dir();
    let src = source_dir(&[("train.py", GATED)]);
    // Within its retry budget: without the grace, the TTL would give it to another attempt
    // and its own supervisor would fence it off.
    let (run_id, script) = submit_gated(&cluster, &["--max-retries", "1"], &src, &gate);

    // `systemctl stop kiln-agent` (or the first half of a restart, or an upgrade).
    stop_agent(&mut cluster);
    std::thread::sleep(Duration::from_secs(8));
    let run = cluster.run(run_id);
    assert_eq!(run["status"], "running", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "away", "{agents}");
    assert!(
        process_alive(script),
        "the script was stopped while its agent was away"
    );

    // The agent comes back: the run finishes as the one attempt it always was.
    cluster.restart_agent(0);
    std::fs::write(gate.path().join("go"), "").unwrap();
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert!(logs(&cluster, run_id).contains("done"));
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "online", "{agents}");
    cluster.stop();
}

#[test]
fn an_agent_that_stays_away_past_the_grace_is_lost_with_its_runs() {
    let mut cluster = Cluster::start_with_coordinator_args(ONE, 2, &["--disconnect-grace", "4"]);
    let gate = shared_dir();
    let src = source_dir(&[("train.py", GATED)]);
    let (run_id, _) = submit_gated(&cluster, &[], &src, &gate);
    stop_agent(&mut cluster);
    let run = cluster.wait_ended(run_id, Duration::from_secs(20));
    assert_eq!(run["status"], "lost", "{run}");
    assert!(
        run["message"]
            .as_str()
            .unwrap_or_default()
            .contains("did not come back within 4s"),
        "{run}"
    );
    // Let the orphaned script end.
    std::fs::write(gate.path().join("go"), "").unwrap();
    cluster.coordinator.stop_cleanly();
}

/// 4 MB that zstd cannot shrink, so that the transfer is long enough to be cut.
fn incompressible_tree(dir: &std::path::Path) {
    let mut bytes = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    std::fs::write(dir.join("weights.bin"), bytes).unwrap();
    std::fs::write(
        dir.join("train.py"),
        "import os\nprint('weights', os.path.getsize('weights.bin'), flush=True)\n",
    )
    .unwrap();
}

#[test]
fn a_snapshot_upload_cut_mid_transfer_is_tried_again_and_said_in_words() {
    let cluster = Cluster::start(ONE);
    let proxy = CuttingProxy::start(&cluster.address, 1 << 20);
    let src = tempfile::tempdir().unwrap();
    incompressible_tree(src.path());
    let output = cluster
        .kiln_command(&[
            "submit",
            "--target",
            "box",
            src.path().to_str().unwrap(),
            "train.py",
        ])
        .env("KILN_COORDINATOR", &proxy.address)
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        "{stderr}"
    );
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("snapshot upload failed: the connection to the coordinator broke")
            && stderr.contains("trying again"),
        "{stderr}"
    );
    assert!(text(&output.stdout).contains(&format!("weights {}", 4 << 20)));
    cluster.stop();
}

#[test]
fn a_snapshot_download_cut_mid_transfer_is_tried_again_and_said_in_the_runs_log() {
    let mut cluster = Cluster::start(&[]);
    let proxy = CuttingProxy::start(&cluster.address, 1 << 20);
    // The agent reaches the coordinator through the proxy; the CLI directly.
    let direct = std::mem::replace(&mut cluster.address, proxy.address.clone());
    cluster.add_agent(ONE[0].clone());
    cluster.address = direct;
    cluster.wait_agents_online(1);
    let src = tempfile::tempdir().unwrap();
    incompressible_tree(src.path());
    let run_id =
        cluster.submit_detached(&["--target", "box", src.path().to_str().unwrap(), "train.py"]);
    let run = cluster.wait_ended(run_id, Duration::from_secs(60));
    // Kiln's own lines (`[kiln] ...`) go to stderr.
    let output = cluster.kiln(&["logs", &run_id.to_string()]);
    let log = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), "{log}");
    assert_eq!(run["status"], "succeeded", "{run}\n{log}");
    assert!(
        log.contains("download failed: the connection to the coordinator broke")
            && log.contains("trying again"),
        "{log}"
    );
    assert!(log.contains(&format!("weights {}", 4 << 20)), "{log}");
    cluster.stop();
}

/// Stops slowly on SIGTERM (a second run is submitted meanwhile), writing a checkpoint the
/// next attempt resumes from.
const DRAINABLE: &str = r#"import os, signal, sys, time
ckpt = os.path.join(os.environ["KILN_CHECKPOINT_DIR"], "step")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
attempt = os.environ["KILN_ATTEMPT"]
print(f"attempt {attempt} resumes at {start}", flush=True)
if start:
    print("done", flush=True)
    sys.exit(0)
def stop(signum, frame):
    print(f"attempt {attempt} got SIGTERM", flush=True)
    time.sleep(2)
    with open(ckpt, "w") as f:
        f.write("7")
    print("checkpoint written", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(sys.argv[1], "script.pid"), "w").write(str(os.getpid()))
print("started", flush=True)
while True:
    time.sleep(0.1)
"#;

fn drain_command(cluster: &Cluster, index: usize) -> Command {
    let mut command = Command::new(bin("kiln-agent"));
    command
        .arg("--data-dir")
        .arg(cluster.agent_data(index))
        .args(["drain", "--timeout", "60"]);
    command
}

#[test]
fn a_drained_agent_stops_and_gives_back_its_runs_and_takes_no_new_ones() {
    let mut cluster = Cluster::start(ONE);
    let gate = shared_dir();
    let src = source_dir(&[("train.py", DRAINABLE), ("second.py", "print('second')\n")]);
    // No retry budget: a fault would end it; a drain gives it back all the same.
    let (run_id, script) = submit_gated(&cluster, &["--checkpoint-interval", "60"], &src, &gate);

    // What the package's prerm does on removal.
    let drain = drain_command(&cluster, 0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log(&cluster, run_id, "got SIGTERM");
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "draining", "{agents}");
    // While the script takes its time to stop, a new run must not go to the draining agent.
    let second =
        cluster.submit_detached(&["--target", "box", src.path().to_str().unwrap(), "second.py"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(cluster.run(second)["status"], "queued");

    let drained = drain.wait_with_output().unwrap();
    assert!(
        drained.status.success(),
        "{}{}",
        text(&drained.stdout),
        text(&drained.stderr)
    );
    assert!(
        text(&drained.stdout).contains("Drained in"),
        "{}",
        text(&drained.stdout)
    );
    let code = wait_for("the drained agent to exit", Duration::from_secs(10), || {
        cluster.agents[0].try_exit()
    });
    assert_eq!(code, Some(0), "{}", cluster.agents[0].log_text());
    assert!(
        !process_alive(script),
        "the drained run's script still runs"
    );
    // Given back with every line of its first attempt, and nothing else.
    let run = cluster.run(run_id);
    assert_eq!(run["status"], "queued", "{run}");
    assert!(
        run["message"]
            .as_str()
            .unwrap_or_default()
            .contains("drained"),
        "{run}"
    );
    let first = logs(&cluster, run_id);
    assert!(first.contains("checkpoint written"), "{first}");
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents[0]["state"], "stopped", "{agents}");
    // Nothing left to drain.
    let again = drain_command(&cluster, 0).output().unwrap();
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("nothing to drain"),
        "{}",
        text(&again.stdout)
    );

    // Another agent takes both: the drained run resumes from the checkpoint its SIGTERM
    // handler wrote.
    cluster.add_agent(ONE[0].clone());
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    let all = logs(&cluster, run_id);
    assert!(all.contains("attempt 2 resumes at 7"), "{all}");
    let second = cluster.wait_ended(second, Duration::from_secs(30));
    assert_eq!(second["status"], "succeeded", "{second}");
    cluster.stop();
}

#[test]
fn an_attempt_directory_no_run_holds_is_swept_while_the_agent_runs() {
    let mut cluster = Cluster::start(&[]);
    cluster.add_agent_with_env(ONE[0].clone(), &[("KILN_AGENT_SWEEP_SECS", "0.5")]);
    cluster.wait_agents_online(1);
    let gate = shared_dir();
    let src = source_dir(&[("train.py", GATED)]);
    let (run_id, _) = submit_gated(&cluster, &[], &src, &gate);
    // What an attempt that ended abnormally leaves: a directory no run task holds, its
    // supervisor long gone.
    let runs = cluster.agent_data(0).join("runs");
    let stale = runs.join("999.1");
    std::fs::create_dir_all(stale.join("state")).unwrap();
    std::fs::create_dir_all(stale.join("work/outputs")).unwrap();
    std::fs::write(stale.join("work/outputs/model.bin"), vec![0u8; 1 << 20]).unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::write(
        stale.join("state/supervisor.json"),
        format!(r#"{{"pid": 2147483000, "boot_id": "{}"}}"#, boot_id.trim()),
    )
    .unwrap();
    wait_for(
        "the stale directory to be swept",
        Duration::from_secs(20),
        || (!stale.exists()).then_some(()),
    );
    // The running run's directory is its task's: untouched, and the run finishes.
    assert!(runs.join(format!("{run_id}.1/work/train.py")).exists());
    std::fs::write(gate.path().join("go"), "").unwrap();
    let run = cluster.wait_ended(run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(
        cluster.agents[0]
            .log_text()
            .contains("Removed a stale attempt directory")
    );
    cluster.stop();
}

#[test]
fn an_upload_that_stalls_is_ended_and_leaves_no_partial_blob() {
    let cluster = Cluster::start_with_coordinator_args(&[], 5, &["--upload-stall-timeout", "2"]);
    let uploads = cluster.coordinator_data().join("blobs/tmp");
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let channel =
                kiln_proto::connect(&kiln_proto::Address::parse(&cluster.address).unwrap())
                    .await
                    .unwrap();
            let mut blobs = kiln_proto::clients::blobs(channel, kiln_proto::Bearer::none());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            // The first chunk of a bigger blob, then nothing, with the stream held open.
            tx.send(kiln_proto::v1::BlobChunk {
                digest: format!("sha256:{}", "ab".repeat(32)),
                data: vec![7u8; 200 * 1024],
                ..Default::default()
            })
            .await
            .unwrap();
            let started = Instant::now();
            let call = blobs.upload_blob(tokio_stream::wrappers::ReceiverStream::new(rx));
            let ended = tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("the coordinator ends a stalled upload");
            drop(tx);
            (
                ended.expect_err("a stalled upload fails"),
                started.elapsed(),
            )
        });
    let (status, took) = status;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("upload stalled"), "{status:?}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let left: Vec<_> = std::fs::read_dir(&uploads).unwrap().collect();
    assert!(
        left.is_empty(),
        "partial uploads left in {}: {left:?}",
        uploads.display()
    );
    cluster.stop();
}

const ONCE: &str = r#"import os, sys
open(sys.argv[1], "a").write("ran\n")
open(os.path.join(os.environ["KILN_OUTPUTS_DIR"], "model.txt"), "w").write("weights")
print("the script ran", flush=True)
"#;

/// SIGKILLs agent `index` once it says it holds an attempt at `phase` (started with
/// `KILN_AGENT_HOLD_PHASE`), then starts it again without the hold.
fn kill_agent_held_at(cluster: &mut Cluster, index: usize, phase: &str) {
    wait_for(
        &format!("the agent to hold the attempt at {phase}"),
        Duration::from_secs(60),
        || {
            let log = cluster.agents[index].log_text();
            (log.contains("Holding the attempt at this phase") && log.contains(phase)).then_some(())
        },
    );
    cluster.agents[index].kill();
    cluster.set_agent_env(index, &[]);
    cluster.restart_agent(index);
}

#[test]
fn an_agent_killed_in_any_phase_takes_the_run_up_again_and_it_runs_once() {
    // Before phases were kept, an agent killed (or restarted) before the launch lost the
    // run ("the agent restarted without this run"); after it, each phase's files carry it.
    for phase in [
        "fetch",
        "unpack",
        "environment",
        "launch",
        "follow",
        "collect",
        "report",
    ] {
        let mut cluster = Cluster::start(&[]);
        cluster.add_agent_with_env(ONE[0].clone(), &[("KILN_AGENT_HOLD_PHASE", phase)]);
        cluster.wait_agents_online(1);
        let src = source_dir(&[("train.py", ONCE)]);
        let marks = shared_dir();
        let mark = marks.path().join("ran");
        let run_id = cluster.submit_detached(&[
            "--target",
            "box",
            src.path().to_str().unwrap(),
            "train.py",
            "--",
            mark.to_str().unwrap(),
        ]);
        kill_agent_held_at(&mut cluster, 0, phase);
        let run = cluster.wait_ended(run_id, Duration::from_secs(60));
        // Kiln's own lines (the restart's) are on stderr.
        let output = cluster.kiln(&["logs", &run_id.to_string()]);
        let log = text(&output.stdout) + &text(&output.stderr);
        let context = format!(
            "killed in {phase}: {run}\nlog:\n{log}\nagent:\n{}",
            tail(&cluster.agents[0].log_text(), 30)
        );
        assert_eq!(run["status"], "succeeded", "{context}");
        assert_eq!(run["attempt"], 1, "{context}");
        assert_eq!(
            std::fs::read_to_string(&mark).unwrap_or_default(),
            "ran\n",
            "the script ran once: {context}"
        );
        assert_eq!(log.matches("the script ran").count(), 1, "{context}");
        if ["fetch", "unpack", "environment", "launch"].contains(&phase) {
            assert!(
                log.contains(&format!(
                    "The agent restarted during this attempt's {phase} phase"
                )),
                "{context}"
            );
        }
        // The outputs came up once, whole.
        let dest = tempfile::tempdir().unwrap();
        let download = cluster.kiln(&[
            "download",
            &run_id.to_string(),
            dest.path().to_str().unwrap(),
        ]);
        assert!(download.status.success(), "{}", text(&download.stderr));
        assert_eq!(
            std::fs::read_to_string(dest.path().join("model.txt")).unwrap(),
            "weights",
            "{context}"
        );
        cluster.coordinator.stop_cleanly();
    }
}
