//! Size and time at the edges a user reaches: logs and lists larger than one gRPC message
//! arrive whole through byte-capped pages, oversized submissions are refused with a message
//! that names the field, and followers ride out outages however long the run lasts.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_proto::{Address, v1};
use kiln_tests::*;

const ONE_AGENT: &[AgentSpec] = &[AgentSpec {
    target: "alpha",
    slots: 4,
    advertise: None,
}];

const TWO_AGENTS: &[AgentSpec] = &[
    AgentSpec {
        target: "alpha",
        slots: 4,
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

/// Runs `command` to its end, reading its output as it comes (it may be large); kills it
/// and fails the test if it has not ended after `timeout`.
fn output_within(mut command: Command, timeout: Duration) -> Output {
    use std::io::Read as _;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kiln");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).map(|_| bytes)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for kiln") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().expect("stderr reader").unwrap_or_default();
            panic!(
                "{command:?} did not end within {timeout:?}; its stderr ends with: {}",
                tail(&text(&stderr))
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader").expect("read stdout"),
        stderr: err.join().expect("stderr reader").expect("read stderr"),
    }
}

/// The last 2,000 characters of a text (enough to show an error, never megabytes).
fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(2000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn wait_status_within(cluster: &Cluster, run_id: i64, status: &str, timeout: Duration) {
    wait_for(&format!("run {run_id} to be {status}"), timeout, || {
        (cluster.run(run_id)["status"] == status).then_some(())
    });
}

/// Checks that `stdout` holds exactly lines `0..n` of the wide script, each intact.
fn check_wide_lines(what: &str, stdout: &[u8], n_lines: usize) {
    let stdout = text(stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        let expected = format!("{index:05} {}", "x".repeat(8994));
        assert!(
            *line == expected,
            "{what}: line {index} is not line {index} intact (it is {} bytes and starts with {:?})",
            line.len(),
            &line[..line.len().min(20)]
        );
    }
    assert_eq!(lines.len(), n_lines, "{what}: how many lines");
}

#[test]
fn a_log_larger_than_a_grpc_message_prints_whole_and_in_order() {
    let cluster = Cluster::start(ONE_AGENT);
    // 2,500 lines of 9,000 bytes: 22.5 MB, more than the 16 MiB a message may hold.
    let src = source_dir(&[(
        "wide.py",
        "import sys\nfor i in range(2500):\n    sys.stdout.write(f'{i:05} ' + 'x' * 8994 + '\\n')\n",
    )]);
    let run_id =
        cluster.submit_detached(&["--target", "alpha", src.path().to_str().unwrap(), "wide.py"]);
    wait_status_within(&cluster, run_id, "succeeded", Duration::from_secs(180));
    let run = run_id.to_string();
    for args in [vec!["logs", &run], vec!["logs", &run, "--follow"]] {
        let output = output_within(cluster.kiln_command(&args), Duration::from_secs(120));
        assert!(
            output.status.success(),
            "kiln {args:?} failed: {}",
            tail(&text(&output.stderr))
        );
        check_wide_lines(&format!("kiln {args:?}"), &output.stdout, 2500);
    }
    cluster.stop();
}

#[test]
fn an_absurdly_long_run_name_is_refused_and_runs_still_list() {
    let cluster = Cluster::start(ONE_AGENT);
    let ok = source_dir(&[("ok.py", "print('ok')\n")]);
    let ok_id =
        cluster.submit_detached(&["--target", "alpha", ok.path().to_str().unwrap(), "ok.py"]);
    // A 9 MiB name, from the run configuration file (a command line could not hold it).
    let name = "n".repeat(9 << 20);
    let big = source_dir(&[
        ("ok.py", "print('ok')\n"),
        ("kiln.yaml", &format!("name: {name}\n")),
    ]);
    let output = cluster.kiln(&[
        "submit",
        "--detach",
        "--target",
        "alpha",
        big.path().to_str().unwrap(),
        "ok.py",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", tail(&stderr));
    assert!(
        stderr.contains(
            "error: the run name is 9 MiB, over the limit of 256 bytes: choose a shorter name"
        ),
        "{}",
        tail(&stderr)
    );
    // The refusal does not repeat the name.
    assert!(stderr.len() < 2000, "{}", tail(&stderr));
    let runs = cluster.json(&["runs", "--json"]);
    let ids: Vec<i64> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [ok_id]);
    let table = cluster.kiln(&["runs"]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    wait_status_within(&cluster, ok_id, "succeeded", Duration::from_secs(30));
    cluster.stop();
}

/// One `ListRuns` call with `max_page_bytes`, straight through the API.
fn list_runs_page(address: &str, max_page_bytes: u32) -> v1::ListRunsReply {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let channel = kiln_proto::connect(&Address::parse(address).expect("address"))
            .await
            .expect("connect");
        kiln_proto::clients::kiln(channel, kiln_proto::Bearer::none())
            .list_runs(v1::ListRunsRequest {
                max_page_bytes,
                ..Default::default()
            })
            .await
            .expect("ListRuns")
            .into_inner()
    })
}

#[test]
fn lists_that_span_many_pages_show_every_item_once() {
    let cluster = Cluster::start(TWO_AGENTS);
    let src = source_dir(&[
        ("ok.py", "print('ok')\n"),
        (
            "metrics.py",
            "import kiln\nfor i in range(40):\n    kiln.log(f'metric-{i:02}', i, step=i)\n    print(f'line {i}')\n",
        ),
    ]);
    let dir = src.path().to_str().unwrap();
    let mut ids: Vec<i64> = (0..11)
        .map(|i| {
            // Long (but allowed) names make pages fill faster.
            let name = format!("run-{i:02}-{}", "x".repeat(240));
            cluster.submit_detached(&["--target", "alpha", "--name", &name, dir, "ok.py"])
        })
        .collect();
    let metrics_run = cluster.submit_detached(&["--target", "alpha", dir, "metrics.py"]);
    ids.push(metrics_run);
    for &id in &ids {
        wait_status_within(&cluster, id, "succeeded", Duration::from_secs(60));
    }
    let newest_first: Vec<i64> = ids.iter().rev().copied().collect();

    // The coordinator splits the list: a 2,000-byte page holds a few runs and a token.
    let first = list_runs_page(&cluster.address, 2000);
    assert!(
        !first.runs.is_empty() && first.runs.len() < 6,
        "{} runs in a 2,000-byte page",
        first.runs.len()
    );
    assert!(!first.next_page_token.is_empty());

    let small_pages = [("KILN_PAGE_BYTES", "2000")];
    let kiln_json = |args: &[&str]| {
        let output = cluster
            .kiln_command(args)
            .envs(small_pages)
            .output()
            .unwrap();
        json_of(args, &output)
    };
    let listed: Vec<i64> = kiln_json(&["runs", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, newest_first, "every run once, newest first");
    let limited = kiln_json(&["runs", "--json", "--limit", "5"]);
    assert_eq!(limited.as_array().unwrap().len(), 5);
    assert_eq!(limited[4]["id"], newest_first[4]);

    let metrics = kiln_json(&["metrics", &metrics_run.to_string(), "--json"]);
    let names: Vec<&str> = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|metric| metric["name"].as_str().unwrap())
        .filter(|name| name.starts_with("metric-"))
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("metric-{i:02}")).collect();
    assert_eq!(names, expected, "every metric once, by name");

    let tiny_pages = [("KILN_PAGE_BYTES", "1")];
    let output = cluster
        .kiln_command(&["agents", "--json"])
        .envs(tiny_pages)
        .output()
        .unwrap();
    let agents = json_of(&["agents", "--json"], &output);
    let hosts: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| agent["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["host0", "host1"], "one agent per page, each once");

    let output = cluster
        .kiln_command(&["logs", &metrics_run.to_string()])
        .envs(tiny_pages)
        .output()
        .unwrap();
    let expected: Vec<String> = (0..40).map(|i| format!("line {i}")).collect();
    assert_eq!(text(&output.stdout).lines().collect::<Vec<_>>(), expected);
    cluster.stop();
}

#[test]
fn a_follower_rides_out_a_short_outage_long_after_an_earlier_one() {
    // Followers give up after this long without the coordinator (10 minutes by default).
    const GIVE_UP_SECS: u64 = 12;
    // A heartbeat TTL that outlasts the outages: the run itself must not be lost.
    let mut cluster = Cluster::start_with_ttl(ONE_AGENT, 30);
    let src = source_dir(&[(
        "ticks.py",
        "import sys, time\nfor i in range(400):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.1)\nsys.exit(3)\n",
    )]);
    let give_up = GIVE_UP_SECS.to_string();
    let env = [("KILN_FOLLOW_GIVE_UP_SECS", give_up.as_str())];
    let mut submit = cluster.spawn_kiln_with_env(
        &[
            "submit",
            "--target",
            "alpha",
            src.path().to_str().unwrap(),
            "ticks.py",
        ],
        &env,
    );
    assert_eq!(submit.line(), "tick 0\n");
    let run_id = cluster.json(&["runs", "--json"])[0]["id"].to_string();
    let mut logs = cluster.spawn_kiln_with_env(&["logs", &run_id, "--follow"], &env);
    assert_eq!(logs.line(), "tick 0\n");
    let outage = |cluster: &mut Cluster, down: Duration| {
        cluster.coordinator.stop_cleanly();
        std::thread::sleep(down);
        cluster.start_coordinator();
    };
    outage(&mut cluster, Duration::from_secs(2));
    // The followers reconnect; the next outage starts more than the window after this one,
    // and lasts longer than their longest pause between tries (5 s), so they notice it.
    std::thread::sleep(Duration::from_secs(GIVE_UP_SECS + 1));
    outage(&mut cluster, Duration::from_secs(6));
    let expected: String = (1..400).map(|i| format!("tick {i}\n")).collect();
    // Both exit with the script's code.
    for (what, follower, code) in [("kiln submit", submit, 3), ("kiln logs --follow", logs, 3)] {
        let (rest, output) = follower.finish();
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{what}: {}",
            tail(&stderr)
        );
        assert!(rest == expected, "{what} printed:\n{}", tail(&rest));
    }
    cluster.stop();
}
