//! End-to-end behaviour a user sees, with a real coordinator, real agents on two targets and
//! the real CLI, all as processes on loopback.

use std::time::Duration;

use kiln_tests::*;

const TWO_TARGETS: &[AgentSpec] = &[
    AgentSpec {
        target: "alpha",
        slots: 1,
        advertise: None,
    },
    AgentSpec {
        target: "beta",
        slots: 1,
        advertise: None,
    },
];

fn source_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    dir
}

#[test]
fn logs_stream_in_order_and_the_exit_code_comes_back() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "train.py",
        "import sys\nfor i in range(300):\n    print(f'line {i}')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let output = cluster.kiln(&["submit", "--target", "alpha", dir, "train.py"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    let expected: Vec<String> = (0..300).map(|i| format!("line {i}")).collect();
    assert_eq!(text(&output.stdout).lines().collect::<Vec<_>>(), expected);
    assert!(text(&output.stderr).contains("to stderr"));

    let run_id = submitted_run_id(&output.stderr);
    let run = cluster.run(run_id);
    assert_eq!(run["status"], "failed");
    assert_eq!(run["exit_code"], 3);
    assert_eq!(run["target"], "alpha");
    assert_eq!(run["agent"], cluster.agent_id(0));
    assert!(
        run["snapshot_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // The stored log replays the same lines.
    let logs = cluster.kiln(&["logs", &run_id.to_string()]);
    assert_eq!(text(&logs.stdout).lines().collect::<Vec<_>>(), expected);
    // Followers and waiters exit with the run's code, as `submit` did.
    let followed = cluster.kiln(&["logs", "--follow", &run_id.to_string()]);
    assert_eq!(
        followed.status.code(),
        Some(3),
        "{}",
        text(&followed.stderr)
    );
    assert_eq!(text(&followed.stdout).lines().count(), 300);
    let waited = cluster.kiln(&["wait", &run_id.to_string()]);
    assert_eq!(waited.status.code(), Some(3), "{}", text(&waited.stderr));
    assert!(text(&waited.stdout).is_empty());
    assert!(
        text(&waited.stderr).contains(&format!("run {run_id} failed")),
        "{}",
        text(&waited.stderr)
    );
    // `kiln wait` on a run still going waits for its end.
    let slow = source_dir(&[("ok.py", "import time\ntime.sleep(2)\n")]);
    let id =
        cluster.submit_detached(&["--target", "alpha", slow.path().to_str().unwrap(), "ok.py"]);
    let waited = cluster.kiln(&["wait", &id.to_string()]);
    assert_eq!(waited.status.code(), Some(0), "{}", text(&waited.stderr));
    assert_eq!(cluster.run(id)["status"], "succeeded");

    // `submit --json`: stdout is the ended run as JSON, the log goes to stderr; with
    // --detach, the submitted run.
    let output = cluster.kiln(&["submit", "--json", "--target", "alpha", dir, "train.py"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    let ended: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)));
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["exit_code"], 3, "{ended}");
    assert!(text(&output.stderr).contains("line 299\n"));
    let output = cluster.kiln(&[
        "submit", "--json", "--detach", "--target", "alpha", dir, "train.py",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let submitted: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)));
    assert!(
        submitted["id"]
            .as_i64()
            .is_some_and(|id| id > ended["id"].as_i64().unwrap())
    );
    assert_eq!(submitted["target"], "alpha");
    cluster.stop();
}

#[test]
fn a_metrics_whole_history_pages_charts_exports_and_compares() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "train.py",
        r#"
import os, kiln
lr = float(os.environ["LR"])
for step in range(300):
    kiln.log("loss", 10.0 / (1 + lr * step), step=step)
"#,
    )]);
    let dir = src.path().to_str().unwrap();
    let submit = |lr: &str| {
        let output = cluster.kiln(&[
            "submit",
            "--target",
            "alpha",
            "--env",
            &format!("LR={lr}"),
            dir,
            "train.py",
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        submitted_run_id(&output.stderr)
    };
    let (fast, slow) = (submit("1"), submit("0.1"));

    // Every point, oldest first, over many small pages (KILN_PAGE_BYTES).
    let csv = cluster
        .kiln_command(&["metrics", &fast.to_string(), "loss", "--csv"])
        .env("KILN_PAGE_BYTES", "512")
        .output()
        .expect("run kiln");
    assert!(csv.status.success(), "{}", text(&csv.stderr));
    let csv = text(&csv.stdout);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "name,step,value,time_unix_ms,rank");
    assert_eq!(rows.len(), 301, "{csv}");
    for (step, row) in rows[1..].iter().enumerate() {
        let fields: Vec<&str> = row.split(',').collect();
        assert_eq!(
            (fields[0], fields[1]),
            ("loss", step.to_string().as_str()),
            "{row}"
        );
        let value: f64 = fields[2].parse().unwrap();
        assert!((value - 10.0 / (1.0 + step as f64)).abs() < 1e-9, "{row}");
    }
    let json = cluster.json(&["metrics", &fast.to_string(), "loss", "--json"]);
    assert_eq!(
        json[0]["points"].as_array().map(Vec::len),
        Some(300),
        "{json}"
    );
    assert_eq!(json[0]["points"][299]["step"], 299);

    // The chart: a falling sparkline and the extremes with their steps.
    let chart = text(&cluster.kiln(&["metrics", &fast.to_string(), "loss"]).stdout);
    assert!(chart.contains("loss  300 points, steps 0–299"), "{chart}");
    let spark = chart.lines().nth(1).unwrap().trim();
    assert!(spark.starts_with('█') && spark.ends_with('▁'), "{chart}");
    assert!(chart.contains("max 10 (step 0)"), "{chart}");
    // A name with no points says so and fails.
    let missing = cluster.kiln(&["metrics", &fast.to_string(), "lost"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stdout).contains("no points"),
        "{}",
        text(&missing.stdout)
    );

    // Compare: the setting that differs, and each run's last value.
    let table = text(
        &cluster
            .kiln(&["compare", &fast.to_string(), &slow.to_string()])
            .stdout,
    );
    let line = |label: &str| {
        table
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row in\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("env LR")[2..],
        ["1".to_string(), "0.1".to_string()],
        "{table}"
    );
    let last = line("loss (last)");
    let (a, b): (f64, f64) = (last[2].parse().unwrap(), last[3].parse().unwrap());
    assert!(
        (a - 10.0 / 300.0).abs() < 1e-5 && (b - 10.0 / 30.9).abs() < 1e-5,
        "{table}"
    );
    assert!(
        !table.contains("script"),
        "the scripts are the same: {table}"
    );
    let json = cluster.json(&["compare", &fast.to_string(), &slow.to_string(), "--json"]);
    assert_eq!(json["differences"][0]["setting"], "env LR", "{json}");
    cluster.stop();
}

#[test]
fn metrics_are_stored_and_outputs_download_byte_identical() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "train.py",
        r#"
import os, random, time, kiln
for step in range(1, 6):
    kiln.log("loss", 1.0 / step, step=step)
    kiln.log_many({"acc": step / 10}, step=step)
    time.sleep(0.15)
os.makedirs(os.path.join(kiln.outputs_dir(), "ckpt"), exist_ok=True)
rng = random.Random(7)
with open(os.path.join(kiln.outputs_dir(), "ckpt", "model.bin"), "wb") as f:
    f.write(bytes(rng.getrandbits(8) for _ in range(300000)))
print("done")
"#,
    )]);
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "beta",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let run_id = submitted_run_id(&output.stderr);

    let metrics = cluster.json(&["metrics", &run_id.to_string(), "--json"]);
    let metric = |name: &str| {
        metrics
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no metric {name} in {metrics}"))
    };
    assert_eq!(metric("loss")["count"], 5);
    assert_eq!(metric("loss")["last_step"], 5);
    assert_eq!(metric("loss")["last_value"], 0.2);
    assert_eq!(metric("acc")["last_value"], 0.5);
    assert!(
        metric("system/memory_rss_bytes")["last_value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    metric("system/cpu_percent");
    let table = text(&cluster.kiln(&["metrics", &run_id.to_string()]).stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("loss") && l.contains("0.2")),
        "{table}"
    );

    // Outputs come back byte for byte: the script's RNG is seeded, so rebuild the bytes here.
    let dest = cluster.dir.path().join("downloaded");
    let download = cluster.kiln(&["download", &run_id.to_string(), dest.to_str().unwrap()]);
    assert!(download.status.success(), "{}", text(&download.stderr));
    let got = std::fs::read(dest.join("ckpt/model.bin")).unwrap();
    let expected = std::process::Command::new(python())
        .args(["-c", "import random,sys; r=random.Random(7); sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(300000)))"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(got.len(), 300000);
    assert!(
        got == expected,
        "downloaded outputs differ from what the script wrote"
    );
    cluster.stop();
}

#[test]
fn an_unchanged_directory_uploads_zero_snapshot_bytes_the_second_time() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[("train.py", "print('hi')\n"), ("lib/util.py", "X = 1\n")]);
    let dir = src.path().to_str().unwrap();
    let uploaded = |output: &std::process::Output| -> u64 {
        let stderr = text(&output.stderr);
        stderr
            .lines()
            .find_map(|l| l.split("uploaded ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no upload count in: {stderr}"))
    };
    let first = cluster.kiln(&["submit", "--target", "alpha", dir, "train.py"]);
    assert!(first.status.success());
    assert!(uploaded(&first) > 0);
    // Touching files changes nothing that matters.
    std::fs::write(src.path().join("train.py"), "print('hi')\n").unwrap();
    let second = cluster.kiln(&["submit", "--target", "alpha", dir, "train.py"]);
    assert!(second.status.success());
    assert_eq!(uploaded(&second), 0);
    let digests: Vec<_> = [&first, &second]
        .iter()
        .map(|o| cluster.run(submitted_run_id(&o.stderr))["snapshot_digest"].clone())
        .collect();
    assert_eq!(digests[0], digests[1]);
    // A real change uploads again.
    std::fs::write(src.path().join("train.py"), "print('hello')\n").unwrap();
    let third = cluster.kiln(&["submit", "--target", "alpha", dir, "train.py"]);
    assert!(uploaded(&third) > 0);
    assert_eq!(text(&third.stdout), "hello\n");
    cluster.stop();
}

#[test]
fn ignore_files_and_default_ignores_shape_the_snapshot() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[
        (
            "list.py",
            "import os\nfor root, dirs, files in sorted(os.walk('.')):\n    for f in sorted(files):\n        print(os.path.relpath(os.path.join(root, f)))\n",
        ),
        (".gitignore", "data/\n*.log\n"),
        (".kilnignore", "secret.txt\n"),
        ("data/big.csv", "1,2,3\n"),
        ("train.log", "noise\n"),
        ("secret.txt", "password\n"),
        (".git/HEAD", "ref: refs/heads/main\n"),
        ("__pycache__/x.pyc", "bytecode"),
        ("myenv/pyvenv.cfg", "home = /usr\n"),
        ("myenv/lib/site.py", "x"),
        ("src/model.py", "W = 1\n"),
        // A stale local outputs/ (say, from a local run) stays home; a nested one is data.
        ("outputs/model.pt", "stale weights"),
        ("src/outputs/table.csv", "kept"),
    ]);
    let dry = cluster.kiln(&[
        "submit",
        "--dry-run",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "list.py",
    ]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("left out       outputs/"),
        "{}",
        text(&dry.stdout)
    );
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "list.py",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut files: Vec<_> = text(&output.stdout).lines().map(str::to_string).collect();
    files.sort();
    assert_eq!(
        files,
        [
            ".gitignore",
            ".kilnignore",
            "list.py",
            "src/model.py",
            "src/outputs/table.csv"
        ]
    );
    cluster.stop();
}

#[test]
fn a_snapshot_over_the_cap_is_refused_before_upload_with_advice() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("train.py", "print(1)\n")]);
    std::fs::create_dir_all(src.path().join("data")).unwrap();
    std::fs::write(src.path().join("data/a.bin"), vec![7u8; 3_000_000]).unwrap();
    std::fs::write(src.path().join("weights.pt"), vec![1u8; 2_000_000]).unwrap();
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "alpha",
        "--max-snapshot-size",
        "1MB",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("over the limit"), "{stderr}");
    // The biggest items first, each with the .kilnignore line that drops it.
    let data_line = stderr
        .lines()
        .position(|l| l.contains("data/") && l.contains(".kilnignore: /data/"));
    let weights_line = stderr
        .lines()
        .position(|l| l.contains("weights.pt") && l.contains(".kilnignore: /weights.pt"));
    assert!(
        data_line.is_some() && weights_line.is_some() && data_line < weights_line,
        "{stderr}"
    );
    // Nothing was uploaded or submitted.
    let blobs = std::fs::read_dir(cluster.dir.path().join("coordinator/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
    assert_eq!(cluster.json(&["runs", "--json"]), serde_json::json!([]));
    cluster.stop();
}

#[test]
fn bad_targets_and_missing_inputs_get_clear_errors() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[("train.py", "print(1)\n")]);
    let dir = src.path().to_str().unwrap();
    let check = |args: &[&str], expected: &[&str]| {
        let output = cluster.kiln(args);
        assert!(!output.status.success(), "kiln {args:?} succeeded");
        let stderr = text(&output.stderr);
        for part in expected {
            assert!(
                stderr.contains(part),
                "kiln {args:?}: expected {part:?} in: {stderr}"
            );
        }
    };
    check(
        &["submit", "--target", "Bad_Name!", dir, "train.py"],
        &["`Bad_Name!` is invalid", "2–16 lowercase"],
    );
    check(
        &["submit", "--target", "a", dir, "train.py"],
        &["shorter than 2"],
    );
    check(
        &["submit", "--target", "gamma", dir, "train.py"],
        &["`gamma` does not exist", "alpha, beta"],
    );
    check(
        &["submit", "--target", "alpha", "/no/such/dir", "train.py"],
        &["`/no/such/dir` does not exist"],
    );
    check(
        &["submit", "--target", "alpha", dir, "missing.py"],
        &["`missing.py` does not exist"],
    );
    check(&["submit", dir, "train.py"], &["--target is required"]);
    check(&["show", "999"], &["run 999 does not exist"]);
    // An agent with an invalid target refuses to start.
    let output = std::process::Command::new(bin("kiln-agent"))
        .args(["--target", "GPU_1", "--coordinator", &cluster.address])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("`GPU_1` is invalid"));
    // An unreachable coordinator is named.
    let output = std::process::Command::new(bin("kiln"))
        .args(["runs"])
        .env("KILN_COORDINATOR", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("cannot reach the coordinator at http://127.0.0.1:9"),
        "{}",
        text(&output.stderr)
    );
    cluster.stop();
}

#[test]
fn a_run_that_cannot_start_fails_with_a_message() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[("run.sh", "echo never\n")]);
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "run.sh",
    ]);
    assert_eq!(output.status.code(), Some(125));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("neither a .py file nor executable"),
        "{stderr}"
    );
    let run = cluster.run(submitted_run_id(&output.stderr));
    assert_eq!(run["status"], "failed");
    assert_eq!(run["exit_code"], serde_json::Value::Null);
    cluster.stop();
}

#[test]
fn cancelling_a_running_run_stops_its_whole_process_tree() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "train.py",
        "import os, subprocess, time\nchild = subprocess.Popen(['sleep', '1000'])\nprint(f'pids {os.getpid()} {child.pid}', flush=True)\ntime.sleep(1000)\n",
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    let pids: Vec<i32> = wait_for("the pids line", Duration::from_secs(20), || {
        let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
        let line = logs.lines().find(|l| l.starts_with("pids "))?.to_string();
        Some(
            line.split_whitespace()
                .skip(1)
                .map(|p| p.parse().unwrap())
                .collect(),
        )
    });
    assert!(pids.iter().all(|&p| process_alive(p)));
    let cancel = cluster.kiln(&["cancel", &run_id.to_string()]);
    assert!(cancel.status.success());
    assert!(
        text(&cancel.stderr).contains("cancelled"),
        "{}",
        text(&cancel.stderr)
    );
    assert_eq!(cluster.run(run_id)["status"], "cancelled");
    wait_for(
        "the run's processes to be gone",
        Duration::from_secs(20),
        || pids.iter().all(|&p| !process_alive(p)).then_some(()),
    );
    // Cancelling again is harmless, and the agent takes new work.
    assert!(
        cluster
            .kiln(&["cancel", &run_id.to_string()])
            .status
            .success()
    );
    let src2 = source_dir(&[("ok.py", "print('next')\n")]);
    let next = cluster.kiln(&[
        "submit",
        "--target",
        "alpha",
        src2.path().to_str().unwrap(),
        "ok.py",
    ]);
    assert_eq!(text(&next.stdout), "next\n");
    cluster.stop();
}

#[test]
fn a_queued_run_can_be_cancelled_before_it_starts() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "wait.py",
        "import time\nprint('busy', flush=True)\ntime.sleep(1000)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let busy = cluster.kiln(&["submit", "--detach", "--target", "alpha", dir, "wait.py"]);
    let busy_id: i64 = text(&busy.stdout).trim().parse().unwrap();
    cluster.wait_status(busy_id, "running");
    let queued = cluster.kiln(&["submit", "--detach", "--target", "alpha", dir, "wait.py"]);
    let queued_id: i64 = text(&queued.stdout).trim().parse().unwrap();
    assert_eq!(cluster.run(queued_id)["status"], "queued");
    assert!(
        cluster
            .kiln(&["cancel", &queued_id.to_string()])
            .status
            .success()
    );
    let run = cluster.run(queued_id);
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["started_at"], serde_json::Value::Null);
    assert!(
        cluster
            .kiln(&["cancel", &busy_id.to_string()])
            .status
            .success()
    );
    // The cancelled queued run never starts, even once the agent is free.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cluster.run(queued_id)["started_at"],
        serde_json::Value::Null
    );
    cluster.stop();
}

#[test]
fn runs_go_to_their_own_target_and_agents_describe_their_hosts() {
    let cluster = Cluster::start(TWO_TARGETS);
    let agents = cluster.json(&["agents", "--json"]);
    for agent in agents.as_array().unwrap() {
        assert!(agent["cpus"].as_u64().unwrap() >= 1, "{agent}");
        assert!(agent["memory_bytes"].as_u64().unwrap() > 0, "{agent}");
        // No GPU on this machine: reported as none, with the reason.
        assert_eq!(agent["gpus"], serde_json::json!([]));
        assert!(
            agent["gpu_probe_error"].as_str().unwrap().contains("NVML"),
            "{agent}"
        );
        assert_eq!(agent["state"], "online");
    }
    let src = source_dir(&[("t.py", "import os\nprint(os.environ['KILN_TARGET'])\n")]);
    let dir = src.path().to_str().unwrap();
    for (target, index) in [("alpha", 0), ("beta", 1)] {
        let output = cluster.kiln(&["submit", "--target", target, dir, "t.py"]);
        assert_eq!(text(&output.stdout).trim(), target);
        assert_eq!(
            cluster.run(submitted_run_id(&output.stderr))["agent"],
            cluster.agent_id(index)
        );
    }
    let runs = cluster.json(&["runs", "--target", "beta", "--json"]);
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let targets = cluster.json(&["targets", "--json"]);
    let names: Vec<_> = targets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    cluster.stop();
}

#[test]
fn ctrl_c_stops_following_but_not_the_run() {
    let cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "slow.py",
        "import time\nfor i in range(6):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.3)\n",
    )]);
    let mut submit = cluster.spawn_kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "slow.py",
    ]);
    assert_eq!(submit.line(), "tick 0\n");
    submit.signal(nix::sys::signal::Signal::SIGINT);
    let (_, output) = submit.finish();
    assert_eq!(output.status.code(), Some(130));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Re-attach with: kiln logs"), "{stderr}");
    let run_id = submitted_run_id(&output.stderr);
    // Re-attaching follows to the end; the run finished normally.
    let logs = cluster.kiln(&["logs", &run_id.to_string(), "--follow"]);
    let lines: Vec<_> = text(&logs.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        (0..6).map(|i| format!("tick {i}")).collect::<Vec<_>>()
    );
    assert_eq!(cluster.run(run_id)["status"], "succeeded");
    cluster.stop();
}

#[test]
fn the_local_target_works_with_no_coordinator_and_keeps_history() {
    let home = tempfile::tempdir().unwrap();
    let kiln = |args: &[&str]| {
        std::process::Command::new(bin("kiln"))
            .args(args)
            .env_remove("KILN_COORDINATOR")
            .env("XDG_DATA_HOME", home.path())
            .env("KILN_PYTHON", python())
            // An agent setting, as `kiln-agent` reads it: the local agent honours it too.
            .env("KILN_HOSTNAME", "laptop-under-test")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let output = kiln(&[
        "submit",
        example.to_str().unwrap(),
        "train.py",
        "--",
        "--epochs",
        "3",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("epoch 3: loss="), "{stdout}");
    let run_id = submitted_run_id(&output.stderr);
    let metrics = text(&kiln(&["metrics", &run_id.to_string()]).stdout);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("accuracy") && l.contains(" 3 ")),
        "{metrics}"
    );

    // Stop the daemon; history is still there when the next command starts a new one.
    let pid: i32 = std::fs::read_to_string(home.path().join("kiln/local/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("the local daemon to exit", Duration::from_secs(20), || {
        (!process_alive(pid)).then_some(())
    });
    let runs: serde_json::Value =
        serde_json::from_slice(&kiln(&["runs", "--json"]).stdout).unwrap();
    assert_eq!(runs[0]["id"], run_id);
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["target"], "local");
    let agents: serde_json::Value =
        serde_json::from_slice(&kiln(&["agents", "--json"]).stdout).unwrap();
    assert_eq!(agents[0]["hostname"], "laptop-under-test", "{agents}");
    let dest = home.path().join("model");
    assert!(
        kiln(&["download", &run_id.to_string(), dest.to_str().unwrap()])
            .status
            .success()
    );
    let model: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("model.json")).unwrap()).unwrap();
    assert!(model["accuracy"].as_f64().unwrap() > 0.8);
    let pid: i32 = std::fs::read_to_string(home.path().join("kiln/local/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("the local daemon to exit", Duration::from_secs(20), || {
        (!process_alive(pid)).then_some(())
    });
}

#[test]
fn an_agent_that_vanishes_loses_its_run_after_the_heartbeat_ttl() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "wait.py",
        "import os, time\nprint(f'up {os.getpid()}', flush=True)\ntime.sleep(1000)\n",
    )]);
    let mut submit = cluster.spawn_kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "wait.py",
    ]);
    let pid: i32 = submit
        .line()
        .strip_prefix("up ")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    cluster.agents[0].kill();
    // The coordinator runs with a 5 s TTL in tests; the follower learns the run was lost.
    let (_, output) = submit.finish();
    assert_eq!(output.status.code(), Some(137), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("node_lost"),
        "{}",
        text(&output.stderr)
    );
    let run = cluster.run(submitted_run_id(&output.stderr));
    assert_eq!(run["status"], "lost");
    let agents = cluster.json(&["agents", "--json"]);
    let lost = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["hostname"] == "host0")
        .unwrap();
    assert_eq!(lost["state"], "lost");
    // Only the agent process died; its run went on. When the agent comes back, the
    // coordinator fences the lost attempt off and the agent stops it.
    assert!(process_alive(pid));
    cluster.restart_agent(0);
    wait_for(
        "the fenced-off run to stop",
        Duration::from_secs(30),
        || (!process_alive(pid)).then_some(()),
    );
    assert_eq!(run["status"], "lost");
    cluster.stop();
}

#[test]
fn a_coordinator_restart_keeps_history_and_running_runs_finish() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let quick = source_dir(&[("ok.py", "print('done')\n")]);
    let before = cluster.kiln(&[
        "submit",
        "--target",
        "beta",
        quick.path().to_str().unwrap(),
        "ok.py",
    ]);
    let before_id = submitted_run_id(&before.stderr);
    let src = source_dir(&[(
        "slow.py",
        "import time\nfor i in range(30):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\n",
    )]);
    let mut submit = cluster.spawn_kiln(&[
        "submit",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "slow.py",
    ]);
    assert_eq!(submit.line(), "tick 0\n");
    cluster.restart_coordinator();
    // The follower reconnects and sees the run to its end; the agent kept running it.
    let (rest, output) = submit.finish();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(rest.ends_with("tick 29\n"), "{rest}");
    let run_id = submitted_run_id(&output.stderr);
    assert_eq!(cluster.run(run_id)["status"], "succeeded");
    assert_eq!(cluster.run(before_id)["status"], "succeeded");
    cluster.stop();
}

#[test]
fn killing_the_agent_repeatedly_never_restarts_or_loses_the_run() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "ticks.py",
        "import os, time, kiln\nfor i in range(40):\n    print(f'tick {i} pid {os.getpid()}', flush=True)\n    kiln.log('i', i, step=i)\n    time.sleep(0.1)\n",
    )]);
    let run_id = cluster.submit_detached(&[
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "ticks.py",
    ]);
    cluster.wait_status(run_id, "running");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        cluster.crash_and_restart_agent(0);
    }
    let run = cluster.wait_status(run_id, "succeeded");
    assert_eq!(run["attempt"], 1, "the run was never retried");
    let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 40, "{logs}");
    let pid = lines[0].split_whitespace().last().unwrap();
    for (i, line) in lines.iter().enumerate() {
        // Every tick once, in order, from the same process: it was never restarted.
        assert_eq!(*line, format!("tick {i} pid {pid}"));
    }
    let metrics = cluster.json(&["metrics", &run_id.to_string(), "--json"]);
    let i = metrics
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "i")
        .unwrap();
    assert_eq!(
        (i["count"].as_u64(), i["last_value"].as_f64()),
        (Some(40), Some(39.0))
    );
    cluster.stop();
}

#[test]
fn a_crashed_coordinator_loses_no_log_line_or_metric_point() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "stream.py",
        "import time, kiln\nfor i in range(300):\n    print(f'line {i}', flush=True)\n    kiln.log('n', i, step=i)\n    time.sleep(0.01)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let ids: Vec<i64> = ["alpha", "beta"]
        .iter()
        .map(|target| cluster.submit_detached(&["--target", target, dir, "stream.py"]))
        .collect();
    for &id in &ids {
        cluster.wait_status(id, "running");
    }
    std::thread::sleep(Duration::from_millis(800));
    cluster.crash_coordinator();
    let expected: Vec<String> = (0..300).map(|i| format!("line {i}")).collect();
    for &id in &ids {
        cluster.wait_status(id, "succeeded");
        let logs = text(&cluster.kiln(&["logs", &id.to_string()]).stdout);
        assert_eq!(
            logs.lines().collect::<Vec<_>>(),
            expected,
            "run {id}: a gap or a duplicate"
        );
        let metrics = cluster.json(&["metrics", &id.to_string(), "--json"]);
        let n = metrics
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "n")
            .unwrap();
        assert_eq!(n["count"], 300, "run {id}");
    }
    cluster.stop();
}

/// Index of the agent (in `cluster.agents`) that holds a run.
fn agent_index_of(cluster: &Cluster, run: &serde_json::Value) -> usize {
    (0..cluster.agents.len())
        .find(|&i| run["agent"] == cluster.agent_id(i))
        .expect("the run's agent is one of the cluster's")
}

const TWO_ON_ALPHA: &[AgentSpec] = &[
    AgentSpec {
        target: "alpha",
        slots: 1,
        advertise: None,
    },
    AgentSpec {
        target: "alpha",
        slots: 1,
        advertise: None,
    },
];

#[test]
fn a_lost_agents_run_is_retried_elsewhere_and_its_old_attempt_fenced_off() {
    let mut cluster = Cluster::start(TWO_ON_ALPHA);
    let src = source_dir(&[(
        "job.py",
        "import os, time\nprint(f'attempt {os.environ[\"KILN_ATTEMPT\"]} pid {os.getpid()}', flush=True)\ntime.sleep(2 if os.environ['KILN_ATTEMPT'] != '1' else 1000)\nprint('done', flush=True)\n",
    )]);
    let run_id = cluster.submit_detached(&[
        "--max-retries",
        "1",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "job.py",
    ]);
    let run = cluster.wait_status(run_id, "running");
    let first = agent_index_of(&cluster, &run);
    let pid: i32 = wait_for("attempt 1's pid", Duration::from_secs(20), || {
        let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
        logs.lines()
            .find_map(|l| l.strip_prefix("attempt 1 pid ")?.parse().ok())
    });
    cluster.agents[first].kill();
    // After the TTL the run is queued again and placed on the other agent.
    let run = wait_for("attempt 2 to succeed", Duration::from_secs(40), || {
        let run = cluster.run(run_id);
        (run["status"] == "succeeded").then_some(run)
    });
    assert_eq!(run["attempt"], 2);
    assert_eq!(agent_index_of(&cluster, &run), 1 - first);
    let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
    assert!(
        logs.lines().any(|l| l.starts_with("attempt 2 pid ")),
        "{logs}"
    );
    assert!(logs.ends_with("done\n"), "{logs}");
    // Attempt 1's supervisor stopped it when the dead agent's lease ran out (2/3 of the
    // TTL), before the coordinator gave the run to the other agent: never two copies.
    assert!(!process_alive(pid), "attempt 1 still runs beside attempt 2");
    // The first agent comes back, reports attempt 1 (fenced) and the run stays succeeded.
    cluster.restart_agent(first);
    cluster.wait_agents_online(2);
    assert_eq!(cluster.run(run_id)["status"], "succeeded");
    cluster.stop();
}

#[test]
fn an_agent_cut_off_from_the_coordinator_stops_only_runs_that_will_be_retried() {
    // TTL 9 s: agents fence retryable attempts off after 6 s without the coordinator.
    let cluster = Cluster::start_with_ttl(TWO_TARGETS, 9);
    let src = source_dir(&[(
        "job.py",
        "import os, time\nprint(f'attempt {os.environ[\"KILN_ATTEMPT\"]} pid {os.getpid()}', flush=True)\ntime.sleep(12 if os.environ['KILN_ATTEMPT'] == '1' else 1)\nprint('done', flush=True)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let submit = |target: &str, retries: &str| -> i64 {
        cluster.submit_detached(&["--max-retries", retries, "--target", target, dir, "job.py"])
    };
    let retryable = submit("alpha", "1");
    let not_retryable = submit("beta", "0");
    let pid_of = |run_id: i64| -> i32 {
        wait_for("the run's pid", Duration::from_secs(20), || {
            let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
            logs.lines()
                .find_map(|l| l.strip_prefix("attempt 1 pid ")?.parse().ok())
        })
    };
    let (pid_retryable, pid_kept) = (pid_of(retryable), pid_of(not_retryable));
    // A frozen coordinator: connections stay open, nothing answers.
    cluster.coordinator.pause(true);
    let fenced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "the retryable attempt to be fenced off",
            Duration::from_secs(8),
            || (!process_alive(pid_retryable)).then_some(()),
        )
    }));
    let kept = process_alive(pid_kept);
    cluster.coordinator.pause(false);
    assert!(
        fenced.is_ok(),
        "the agent did not fence the attempt off in time"
    );
    assert!(kept, "a run without a retry budget must keep running");
    // The fenced attempt is retried; the other run finishes its first attempt.
    let run = wait_for("the retry to succeed", Duration::from_secs(40), || {
        let run = cluster.run(retryable);
        (run["status"] == "succeeded").then_some(run)
    });
    assert_eq!(run["attempt"], 2);
    let run = cluster.wait_status(not_retryable, "succeeded");
    assert_eq!(run["attempt"], 1);
    cluster.stop();
}

#[test]
fn a_retried_run_resumes_from_its_last_checkpoint() {
    let mut cluster = Cluster::start(TWO_ON_ALPHA);
    let src = source_dir(&[(
        "train.py",
        r#"
import os, time
path = os.path.join(os.environ["KILN_CHECKPOINT_DIR"], "step")
start = int(open(path).read()) if os.path.exists(path) else 0
attempt = os.environ["KILN_ATTEMPT"]
print(f"attempt {attempt} resumes at {start}", flush=True)
for step in range(start, 40):
    with open(path + ".tmp", "w") as f:
        f.write(str(step + 1))
    os.replace(path + ".tmp", path)
    time.sleep(0.2 if attempt == "1" else 0.01)
print("done", flush=True)
"#,
    )]);
    let run_id = cluster.submit_detached(&[
        "--max-retries",
        "1",
        "--checkpoint-interval",
        "1",
        "--target",
        "alpha",
        src.path().to_str().unwrap(),
        "train.py",
    ]);
    let run = cluster.wait_status(run_id, "running");
    let first = agent_index_of(&cluster, &run);
    // Let a few checkpoints reach the coordinator, then lose the node.
    wait_for("a checkpoint", Duration::from_secs(20), || {
        cluster.run(run_id)["checkpoint_digest"]
            .as_str()
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(1500));
    cluster.agents[first].kill();
    let run = wait_for("the retry to succeed", Duration::from_secs(40), || {
        let run = cluster.run(run_id);
        (run["status"] == "succeeded").then_some(run)
    });
    assert_eq!(run["attempt"], 2);
    // The run's whole duration counts from attempt 1's start (it ran for seconds before
    // its node was lost), not only attempt 2's.
    let (total, this) = (
        run["total_duration_seconds"]
            .as_f64()
            .expect("a total duration"),
        run["duration_seconds"].as_f64().expect("a duration"),
    );
    assert!(
        total > this + 1.0,
        "total {total}s vs attempt 2 {this}s: {run}"
    );
    let show = text(&cluster.kiln(&["show", &run_id.to_string()]).stdout);
    assert!(show.contains("over 2 attempts"), "{show}");
    let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
    let resumed: u32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("attempt 2 resumes at ")?.parse().ok())
        .unwrap_or_else(|| panic!("no resume line in {logs}"));
    assert!(
        resumed >= 5,
        "attempt 2 should resume from a checkpoint, resumed at {resumed}:\n{logs}"
    );
    assert!(logs.ends_with("done\n"), "{logs}");
    // The run says what its successful attempt said (not why attempt 1 was retried), and
    // where it ran stays shown after it ended.
    assert_eq!(run["message"], "", "{run}");
    let placed = &run["placement"][0]["agent"];
    assert_eq!(
        placed,
        &serde_json::json!(cluster.agent_id(1 - first)),
        "{run}"
    );
    // The first agent comes back and stops what is left of attempt 1.
    cluster.restart_agent(first);
    cluster.stop();
}

#[test]
fn a_soak_with_coordinator_crashes_accounts_for_every_run_once() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let src = source_dir(&[(
        "hello.py",
        "import os, kiln\nprint(f\"hello {os.environ['KILN_RUN_ID']}\", flush=True)\nkiln.log('one', 1)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let mut ids = Vec::new();
    for round in 0..4 {
        for i in 0..8 {
            let target = if i % 2 == 0 { "alpha" } else { "beta" };
            let output = cluster.kiln(&["submit", "--detach", "--target", target, dir, "hello.py"]);
            assert!(output.status.success(), "{}", text(&output.stderr));
            ids.push(text(&output.stdout).trim().parse::<i64>().unwrap());
        }
        // Crash the coordinator while those runs are queued, starting or running.
        std::thread::sleep(Duration::from_millis(100 * round));
        cluster.crash_coordinator();
    }
    for &id in &ids {
        // An assignment lost in a crash is placed again (a new attempt) but never ran
        // twice: exactly one line.
        cluster.wait_status(id, "succeeded");
        let logs = text(&cluster.kiln(&["logs", &id.to_string()]).stdout);
        assert_eq!(logs, format!("hello {id}\n"), "run {id}");
        let metrics = cluster.json(&["metrics", &id.to_string(), "--json"]);
        assert_eq!(metrics[0]["count"], 1, "run {id}: {metrics}");
    }
    let runs = cluster.json(&["runs", "--json", "--limit", "1000"]);
    assert_eq!(
        runs.as_array().unwrap().len(),
        ids.len(),
        "no run lost or invented"
    );
    cluster.stop();
}

#[test]
fn a_full_spool_disk_fails_the_run_clearly_and_the_agent_goes_on() {
    let mut cluster = Cluster::start(&[]);
    // The agent's data directory (spool included) is a 3 MB disk.
    let _disk = SmallDisk::mount(cluster.dir.path().join("agent0"), "3m");
    cluster.add_agent(AgentSpec {
        target: "small",
        slots: 1,
        advertise: None,
    });
    wait_for("the agent online", Duration::from_secs(20), || {
        let agents = cluster.json(&["agents", "--json"]);
        (agents[0]["state"] == "online").then_some(())
    });
    let src = source_dir(&[(
        "flood.py",
        "import sys\nline = 'x' * 1000\nfor i in range(20000):\n    print(line)\n",
    )]);
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "small",
        src.path().to_str().unwrap(),
        "flood.py",
    ]);
    assert_ne!(output.status.code(), Some(0));
    let run = cluster.run(submitted_run_id(&output.stderr));
    assert_eq!(run["status"], "failed");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("could not keep the run's output") && message.contains("No space left"),
        "{message}"
    );
    // The agent is still healthy and takes the next run.
    let ok = source_dir(&[("ok.py", "print('fine')\n")]);
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "small",
        ok.path().to_str().unwrap(),
        "ok.py",
    ]);
    assert_eq!(text(&output.stdout), "fine\n", "{}", text(&output.stderr));
    cluster.stop();
}

#[test]
fn killing_the_agent_while_it_fetches_a_snapshot_runs_the_script_once() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    // A 40 MB incompressible snapshot: fetching and unpacking it takes a while.
    let src = source_dir(&[(
        "once.py",
        "import os\nprint(f\"ran attempt {os.environ['KILN_ATTEMPT']}\", flush=True)\n",
    )]);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..40_000_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    std::fs::write(src.path().join("weights.bin"), noise).unwrap();
    let run_id =
        cluster.submit_detached(&["--target", "alpha", src.path().to_str().unwrap(), "once.py"]);
    cluster.wait_status(run_id, "assigned");
    cluster.crash_and_restart_agent(0);
    let run = cluster.wait_status(run_id, "succeeded");
    let logs = text(&cluster.kiln(&["logs", &run_id.to_string()]).stdout);
    // The script ran exactly once, in the attempt that succeeded.
    assert_eq!(logs, format!("ran attempt {}\n", run["attempt"]), "{logs}");
    cluster.stop();
}

/// Whether `bytes` hold something a terminal would act on: ESC, BEL, CR, or the C1 CSI/OSC.
fn raw_controls(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .filter(|c| matches!(c, '\x1b' | '\x07' | '\r' | '\u{9b}' | '\u{9d}' | '\u{202e}'))
        .map(|c| format!("{c:?}"))
        .collect()
}

#[test]
fn hostile_run_names_and_log_lines_reach_the_terminal_escaped() {
    let cluster = Cluster::start(&TWO_TARGETS[..1]);
    let src = source_dir(&[(
        "train.py",
        "import sys\n\
         print('title \\x1b]0;pwned\\x07 clear \\x1b[2J clip \\x1b]52;c;aGk=\\x07')\n\
         print('50%\\r[kiln] run 99 succeeded')\n\
         print('c1 \\u009b2J bidi \\u202etxt.exe', file=sys.stderr)\n",
    )]);
    let name = "n\x1b]0;pwned\x07\x1b[2J\r[kiln] run 99 succeeded";
    let dir = src.path().to_str().unwrap();
    let submit = cluster.kiln(&[
        "submit", "--target", "alpha", "--name", name, dir, "train.py",
    ]);
    assert!(submit.status.success(), "{}", text(&submit.stderr));
    let run_id = submitted_run_id(&submit.stderr).to_string();
    let outputs = [
        ("submit", submit),
        ("runs", cluster.kiln(&["runs"])),
        ("show", cluster.kiln(&["show", &run_id])),
        ("logs", cluster.kiln(&["logs", &run_id])),
        ("logs -f", cluster.kiln(&["logs", "-f", &run_id])),
    ];
    for (command, output) in &outputs {
        assert!(
            output.status.success(),
            "{command}: {}",
            text(&output.stderr)
        );
        for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            let found = raw_controls(bytes);
            assert!(found.is_empty(), "kiln {command} {stream}: {found:?}");
            // No line of it can pass for Kiln's report of another run.
            assert!(
                !text(bytes).lines().any(|l| l.starts_with("[kiln] run 99")),
                "kiln {command} {stream}: {}",
                text(bytes)
            );
        }
    }
    let logs = text(&outputs[3].1.stdout);
    assert!(
        logs.contains("title \\x1b]0;pwned\\x07 clear \\x1b[2J"),
        "{logs}"
    );
    assert!(logs.contains("50%\\x0d[kiln] run 99 succeeded"), "{logs}");
    let show = text(&outputs[2].1.stdout);
    assert!(
        show.contains("n\\x1b]0;pwned\\x07\\x1b[2J\\x0d[kiln]"),
        "{show}"
    );
    // JSON keeps the text as it is (escaped by JSON itself).
    assert_eq!(cluster.run(run_id.parse().unwrap())["name"], name);
    cluster.stop();
}

#[test]
fn a_reader_that_goes_away_ends_the_cli_quietly() {
    let cluster = Cluster::start(&TWO_TARGETS[..1]);
    let src = source_dir(&[(
        "train.py",
        "import sys\nfor i in range(20000):\n    print(f'line {i}')\n    print(f'err {i}', file=sys.stderr)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let run_id = cluster.submit_detached(&["--target", "alpha", dir, "train.py"]);
    cluster.wait_status(run_id, "succeeded");
    let run = run_id.to_string();
    let check = |args: &[&str], output: std::process::Output| {
        let stderr = text(&output.stderr);
        assert!(!stderr.contains("panicked"), "kiln {args:?}: {stderr}");
        assert!(
            matches!(output.status.code(), Some(0 | 141)),
            "kiln {args:?}: {:?} {stderr}",
            output.status
        );
    };
    // `kiln ARGS | head -1`: the reader takes one line and goes.
    for args in [vec!["logs", run.as_str()], vec!["logs", "-f", run.as_str()]] {
        let mut child = cluster
            .kiln_command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert_eq!(first, "line 0\n");
        drop(stdout);
        let mut stderr = String::new();
        // stderr is a pipe too: read it all, so only stdout is closed.
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let status = child.wait().unwrap();
        check(
            &args,
            std::process::Output {
                status,
                stdout: Vec::new(),
                stderr: stderr.into_bytes(),
            },
        );
    }
    // A reader gone before the first line, on stdout or on stderr (`2>&1 | head -1`).
    for args in [
        vec!["runs"],
        vec!["show", run.as_str()],
        vec!["metrics", run.as_str()],
        vec!["agents"],
        vec!["targets"],
        vec!["logs", run.as_str()],
    ] {
        let mut child = cluster
            .kiln_command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        check(&args, child.wait_with_output().unwrap());
    }
    let mut child = cluster
        .kiln_command(&["logs", &run])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(matches!(status.code(), Some(0 | 141)), "{status:?}");
    cluster.stop();
}

#[test]
fn a_queued_run_says_why_it_waits() {
    let mut cluster = Cluster::start(TWO_TARGETS);
    let gate = shared_dir();
    let src = source_dir(&[(
        "gated.py",
        "import os, sys, time\nwhile not os.path.exists(os.path.join(sys.argv[1], 'go')):\n    time.sleep(0.1)\n",
    )]);
    let dir = src.path().to_str().unwrap();
    let gate_path = gate.path().to_str().unwrap();
    // beta's only agent stops: a run for beta says so when it is submitted, and waits.
    cluster.agents[1].stop_cleanly();
    wait_for(
        "beta's agent to be offline",
        Duration::from_secs(20),
        || {
            let agents = cluster.json(&["agents", "--json"]);
            agents
                .as_array()?
                .iter()
                .any(|a| a["target"] == "beta" && a["state"] != "online")
                .then_some(())
        },
    );
    let output = cluster.kiln(&[
        "submit", "--detach", "--target", "beta", dir, "gated.py", "--", gate_path,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("note: target beta has no running agents (stopped"),
        "{}",
        text(&output.stderr)
    );
    let stranded: i64 = text(&output.stdout).trim().parse().unwrap();
    assert_eq!(
        cluster.run(stranded)["waiting"],
        "no agent of target `beta` is online"
    );
    // On alpha (one slot): one runs, the next waits for capacity, the third behind it.
    let ids: Vec<i64> = (0..3)
        .map(|_| cluster.submit_detached(&["--target", "alpha", dir, "gated.py", "--", gate_path]))
        .collect();
    cluster.wait_status(ids[0], "running");
    assert!(cluster.run(ids[0])["waiting"].is_null());
    assert_eq!(
        cluster.run(ids[1])["waiting"],
        "waiting for free capacity on `alpha` (its online agents are busy)"
    );
    assert_eq!(
        cluster.run(ids[2])["waiting"],
        "1 run was queued on `alpha` before it"
    );
    let table = text(&cluster.kiln(&["runs"]).stdout);
    assert!(
        table.lines().next().unwrap().ends_with("WAITING"),
        "{table}"
    );
    assert!(
        table.contains("1 run was queued on `alpha` before it"),
        "{table}"
    );
    let shown = text(&cluster.kiln(&["show", &ids[2].to_string()]).stdout);
    assert!(
        shown.contains("waiting         1 run was queued"),
        "{shown}"
    );
    std::fs::write(gate.path().join("go"), "").unwrap();
    for id in ids {
        cluster.wait_ended(id, Duration::from_secs(30));
    }
    cluster.kiln(&["cancel", &stranded.to_string()]);
    cluster.agents[0].stop_cleanly();
    cluster.coordinator.stop_cleanly();
}

#[test]
fn a_cleanly_stopped_agent_is_stopped_and_agents_and_targets_can_be_removed() {
    // TTL 2 s: a stopped agent that were judged like a silent one would be lost by then.
    let mut cluster = Cluster::start_with_ttl(TWO_TARGETS, 2);
    let beta_agent = cluster.agent_id(1);
    let target_of = |cluster: &Cluster, name: &str| {
        let targets = cluster.json(&["targets", "--json"]);
        targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
    };
    assert_eq!(target_of(&cluster, "beta").unwrap()["agents_total"], 1);

    // An online agent can be neither forgotten nor its target deleted.
    let refused = cluster.kiln(&["agents", "forget", &beta_agent]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("stop it first"),
        "{}",
        text(&refused.stderr)
    );
    let refused = cluster.kiln(&["targets", "delete", "beta"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("still has agents"),
        "{}",
        text(&refused.stderr)
    );

    // SIGTERM with no runs: `stopped`, and still `stopped` well past the TTL.
    cluster.agents[1].stop_cleanly();
    std::thread::sleep(Duration::from_secs(5));
    let agents = cluster.json(&["agents", "--json"]);
    let beta = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == beta_agent.as_str())
        .cloned()
        .unwrap();
    assert_eq!(beta["state"], "stopped", "{agents}");
    assert_eq!(target_of(&cluster, "beta").unwrap()["agents_total"], 0);
    let table = text(&cluster.kiln(&["agents"]).stdout);
    assert!(
        table.lines().next().unwrap().contains("PRIORITY"),
        "{table}"
    );

    // Forget it, then delete its target: gone from the lists, submissions refused; the
    // other target is untouched.
    let forgot = cluster.kiln(&["agents", "forget", &beta_agent]);
    assert!(forgot.status.success(), "{}", text(&forgot.stderr));
    let agents = cluster.json(&["agents", "--json"]);
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let deleted = cluster.kiln(&["targets", "delete", "beta"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert!(target_of(&cluster, "beta").is_none());
    assert!(target_of(&cluster, "alpha").is_some());
    let src = source_dir(&[("ok.py", "print('ok')\n")]);
    let refused = cluster.kiln(&[
        "submit",
        "--target",
        "beta",
        src.path().to_str().unwrap(),
        "ok.py",
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("does not exist"),
        "{}",
        text(&refused.stderr)
    );
    let again = cluster.kiln(&["targets", "delete", "beta"]);
    assert!(
        text(&again.stderr).contains("does not exist"),
        "{}",
        text(&again.stderr)
    );

    // The agent coming back (its key still good) registers again, and its target with it.
    cluster.restart_agent(1);
    cluster.wait_agents_online(2);
    assert_eq!(target_of(&cluster, "beta").unwrap()["agents_online"], 1);
    cluster.stop();
}

#[test]
fn runs_inherit_only_the_agent_variables_it_passes_on() {
    let mut cluster = Cluster::start(&[]);
    let spec = |target: &'static str| AgentSpec {
        target,
        slots: 1,
        advertise: None,
    };
    // A secret an admin gave the agent (a unit's Environment=), and a locale.
    cluster.add_agent_with_env(
        spec("alpha"),
        &[("AGENT_SECRET", "hunter2"), ("LC_ALL", "C.UTF-8")],
    );
    // This agent passes the secret on on purpose, and nothing but PATH besides.
    cluster.add_agent_with_env(
        spec("beta"),
        &[
            ("AGENT_SECRET", "hunter2"),
            ("LC_ALL", "C.UTF-8"),
            ("KILN_PASS_ENV", "PATH,AGENT_SECRET"),
        ],
    );
    cluster.wait_agents_online(2);
    let src = source_dir(&[(
        "env.py",
        "import os\nfor name in ['AGENT_SECRET', 'LC_ALL', 'PATH', 'KILN_PASS_ENV', 'KILN_RUN_ID', 'OWN']:\n    print(name, 'set' if name in os.environ else 'unset', os.environ.get(name, '') if name != 'PATH' else '')\n",
    )]);
    let seen = |target: &str| {
        let output = cluster.kiln(&[
            "submit",
            "--target",
            target,
            "--env",
            "OWN=mine",
            src.path().to_str().unwrap(),
            "env.py",
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    let alpha = seen("alpha");
    for line in [
        "AGENT_SECRET unset",
        "LC_ALL set C.UTF-8",
        "PATH set",
        "KILN_PASS_ENV unset",
        "KILN_RUN_ID set",
        "OWN set mine",
    ] {
        assert!(
            alpha.lines().any(|l| l.trim_end().starts_with(line)),
            "{line:?} in\n{alpha}"
        );
    }
    let beta = seen("beta");
    for line in [
        "AGENT_SECRET set hunter2",
        "LC_ALL unset",
        "PATH set",
        "KILN_PASS_ENV unset",
    ] {
        assert!(
            beta.lines().any(|l| l.trim_end().starts_with(line)),
            "{line:?} in\n{beta}"
        );
    }
    cluster.stop();
}

const SECRET: &str = "tok-9f8e7d6c5b4a";

#[test]
fn a_secret_reaches_only_its_run_and_is_never_shown_logged_or_stored_in_the_clear() {
    let cluster = Cluster::start(&TWO_TARGETS[..1]);
    let target = TWO_TARGETS[0].target;
    let src = source_dir(&[(
        "train.py",
        r#"import os
value = os.environ["API_TOKEN"]
print("token:", value)
print("length", len(value))
print("intact" if value == "tok-9f8e7d6c5b4a" else "wrong")
"#,
    )]);
    let submit = |env: &[(&str, &str)]| {
        let mut command = cluster.kiln_command(&[
            "submit",
            "--target",
            target,
            "--secret",
            "API_TOKEN",
            src.path().to_str().unwrap(),
            "train.py",
        ]);
        command.env_remove("API_TOKEN");
        command.envs(env.iter().copied());
        command.output().unwrap()
    };
    // Not set in the submitter's environment: refused before anything is uploaded.
    let unset = submit(&[]);
    assert!(!unset.status.success());
    let stderr = text(&unset.stderr);
    assert!(stderr.contains("secret `API_TOKEN` is not set"), "{stderr}");
    assert!(!stderr.contains("uploaded"), "{stderr}");

    let output = submit(&[("API_TOKEN", SECRET)]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // The script got the value whole; its output shows it masked.
    assert!(stdout.contains("intact"), "{stdout}");
    assert!(stdout.contains("length 16"), "{stdout}");
    assert!(stdout.contains("token: ***"), "{stdout}");
    let run_id = submitted_run_id(&output.stderr);
    let id = run_id.to_string();
    let show = cluster.kiln(&["show", &id]);
    let shown = text(&show.stdout);
    assert!(shown.contains("API_TOKEN"), "{shown}");
    let json = cluster.run(run_id);
    assert_eq!(json["secrets"], serde_json::json!(["API_TOKEN"]), "{json}");
    let logs = cluster.kiln(&["logs", &id]);
    // Nowhere in what Kiln shows, logs or stores in the clear.
    let coordinator = cluster.dir.path().join("coordinator");
    let mut places = vec![
        ("submit's output", format!("{stdout}{stderr}").into_bytes()),
        ("kiln show", show.stdout.clone()),
        ("kiln show --json", json.to_string().into_bytes()),
        ("kiln logs", [logs.stdout, logs.stderr].concat()),
        (
            "the coordinator's log",
            cluster.coordinator.log_text().into_bytes(),
        ),
        ("the agent's log", cluster.agents[0].log_text().into_bytes()),
    ];
    for entry in std::fs::read_dir(&coordinator).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("kiln.db") {
            places.push(("the database", std::fs::read(entry.path()).unwrap()));
        }
    }
    assert!(places.len() > 6, "the database files were not found");
    for (place, bytes) in places {
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret's value is in {place}"
        );
    }
    // The key that seals secrets is the coordinator's alone.
    use std::os::unix::fs::PermissionsExt as _;
    let key = std::fs::metadata(coordinator.join("secrets.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    cluster.stop();
}

/// The files in the coordinator's blob directory.
fn stored_blobs(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(cluster.dir.path().join("coordinator/blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|entry| format!("sha256:{}", entry.file_name().to_string_lossy()))
            .collect();
    names.sort();
    names
}

#[test]
fn runs_past_their_retention_lose_logs_and_blobs_and_keep_their_record() {
    let cluster = Cluster::start_with_coordinator_args(
        &TWO_TARGETS[..1],
        5,
        &[
            "--run-retention",
            "2",
            "--blob-grace",
            "1",
            "--housekeeping-interval",
            "1",
        ],
    );
    let target = TWO_TARGETS[0].target;
    let src = source_dir(&[(
        "train.py",
        "import os\nprint('trained')\nopen(os.path.join(os.environ['KILN_OUTPUTS_DIR'], 'model.bin'), 'w').write('w' * 1000)\n",
    )]);
    let submit = || {
        let output = cluster.kiln(&[
            "submit",
            "--target",
            target,
            src.path().to_str().unwrap(),
            "train.py",
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(text(&output.stdout).contains("trained"));
        submitted_run_id(&output.stderr)
    };
    let first = submit();
    let run = cluster.run(first);
    let (snapshot, outputs) = (
        run["snapshot_digest"].as_str().unwrap().to_string(),
        run["outputs_digest"].as_str().unwrap().to_string(),
    );
    assert!(stored_blobs(&cluster).contains(&outputs), "{run}");
    // Two seconds after it ended, housekeeping prunes it; a second later its blobs go.
    let pruned = wait_for("the run to be pruned", Duration::from_secs(30), || {
        let run = cluster.run(first);
        run["pruned_at"].is_string().then_some(run)
    });
    assert_eq!(pruned["status"], "succeeded", "{pruned}");
    wait_for("its blobs to be swept", Duration::from_secs(30), || {
        let blobs = stored_blobs(&cluster);
        (!blobs.contains(&snapshot) && !blobs.contains(&outputs)).then_some(())
    });
    let logs = cluster.kiln(&["logs", &first.to_string()]);
    assert!(!logs.status.success());
    let said = text(&logs.stderr);
    assert!(said.contains("logs were removed by housekeeping"), "{said}");
    assert!(said.contains("run_retention"), "{said}");
    let show = text(&cluster.kiln(&["show", &first.to_string()]).stdout);
    assert!(show.contains("pruned"), "{show}");
    // The same directory again: its snapshot is uploaded anew and the run works.
    let second = submit();
    assert_eq!(cluster.run(second)["status"], "succeeded");
    cluster.stop();
}
