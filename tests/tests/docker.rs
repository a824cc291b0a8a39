//! Docker runs against the real engine: a real coordinator and agent (as processes), the
//! script in a container of the test image (`kiln_tests::docker::TEST_IMAGE`, built once
//! per machine). #[ignore]d by default: `tests/run` runs them when `KILN_DOCKER_TESTS=1`
//! (`.ci/run` sets it), and reports them as skipped otherwise.

use std::time::Duration;

use kiln_proto::v1;
use kiln_tests::docker::{TEST_IMAGE, containers_of_run, docker, ensure_test_image};
use kiln_tests::grpc::{docker_run, submit_request as submit};
use kiln_tests::*;

const ONE_AGENT: &[AgentSpec] = &[AgentSpec {
    target: "box",
    slots: 1,
    advertise: None,
}];

/// A GPU image that does not exist: a run that picked it would fail, so a passing run
/// shows the CPU image was chosen.
const MISSING_GPU_IMAGE: &str = "kiln-test/no-gpu-image-here:1";

fn docker_cluster() -> Cluster {
    Cluster::start_with_agent_args(
        ONE_AGENT,
        &[
            "--docker-cpu-image",
            TEST_IMAGE,
            "--docker-gpu-image",
            MISSING_GPU_IMAGE,
        ],
    )
}

fn source_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    dir
}

/// stdout and stderr of `kiln logs RUN` (Kiln's own lines are on stderr, `[kiln] ...`).
fn logs(cluster: &Cluster, run_id: i64) -> (String, String) {
    let output = cluster.kiln(&["logs", &run_id.to_string()]);
    (text(&output.stdout), text(&output.stderr))
}

fn wait_for_line(cluster: &Cluster, run_id: i64, line: &str) {
    wait_for(
        &format!("`{line}` in run {run_id}'s log"),
        Duration::from_secs(60),
        || {
            logs(cluster, run_id)
                .0
                .lines()
                .any(|l| l == line)
                .then_some(())
        },
    );
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_run_in_a_container_streams_logs_metrics_outputs_and_its_exit_code() {
    ensure_test_image();
    let cluster = docker_cluster();
    let src = source_dir(&[(
        "train.py",
        r#"
import os, sys, kiln
print(open("/etc/kiln-test-image").read().strip())
print([l for l in open("/etc/os-release") if l.startswith("VERSION_CODENAME=")][0].strip())
print("cwd", os.getcwd())
print("lr", os.environ["LR"])
for step in range(1, 4):
    kiln.log("loss", 1.0 / step, step=step)
print("to stderr", file=sys.stderr)
with open(os.path.join(kiln.outputs_dir(), "result.txt"), "w") as f:
    f.write("42")
sys.exit(3)
"#,
    )]);
    let mut request = docker_run("box", "train.py", "auto");
    request.env.insert("LR".into(), "0.25".into());
    let run_id = submit(&cluster.address, src.path(), request);
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3, "{run} {:?}", logs(&cluster, run_id));

    let (stdout, stderr) = logs(&cluster, run_id);
    // The script ran in the image (its marker file, Debian 12), in the mounted snapshot.
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "kiln test image",
            "VERSION_CODENAME=bookworm",
            "cwd /kiln/work",
            "lr 0.25"
        ],
        "{stderr}"
    );
    assert!(stderr.contains("to stderr"), "{stderr}");
    // image: auto on this GPU-less agent is the CPU image.
    assert!(
        stderr.contains(&format!(
            "Docker image {TEST_IMAGE}: the agent's CPU image (image: auto; the run has no GPUs)."
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("Image {TEST_IMAGE} found on this agent")),
        "{stderr}"
    );

    let metrics = cluster.json(&["metrics", &run_id.to_string(), "--json"]);
    let loss = metrics
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "loss")
        .unwrap_or_else(|| panic!("no loss metric in {metrics}"));
    assert_eq!(loss["count"], 3);
    assert_eq!(loss["last_step"], 3);

    let dest = cluster.dir.path().join("downloaded");
    let download = cluster.kiln(&["download", &run_id.to_string(), dest.to_str().unwrap()]);
    assert!(download.status.success(), "{}", text(&download.stderr));
    assert_eq!(
        std::fs::read_to_string(dest.join("result.txt")).unwrap(),
        "42"
    );
    assert_eq!(
        containers_of_run(&cluster.agent_id(0), run_id),
        Vec::<String>::new()
    );
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn cancel_stops_the_container_and_leaves_nothing() {
    ensure_test_image();
    let cluster = docker_cluster();
    let src = source_dir(&[(
        "train.py",
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n",
    )]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    wait_for_line(&cluster, run_id, "started");
    let agent_id = cluster.agent_id(0);
    assert_eq!(containers_of_run(&agent_id, run_id).len(), 1);

    let output = cluster.kiln(&["cancel", &run_id.to_string()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    cluster.wait_status(run_id, "cancelled");
    wait_for(
        "the cancelled run's container to be removed",
        Duration::from_secs(30),
        || {
            containers_of_run(&agent_id, run_id)
                .is_empty()
                .then_some(())
        },
    );
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn an_image_that_does_not_exist_ends_the_run_env_failed_naming_it() {
    ensure_test_image();
    let cluster = docker_cluster();
    let src = source_dir(&[("train.py", "print('never')\n")]);
    let image = "kiln-test/no-such-image:1";
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", image),
    );
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "image `{image}` is not on this agent and could not be pulled: "
        )),
        "{message}"
    );
    assert!(
        message.contains("docker load") && message.contains("docker_cpu_image"),
        "says how to provide it: {message}"
    );
    let (stdout, stderr) = logs(&cluster, run_id);
    assert_eq!(stdout, "");
    assert!(
        stderr.contains(&format!("Pulling image {image}")),
        "{stderr}"
    );
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_gpu_run_names_the_missing_gpu_image_and_a_cpu_run_is_unaffected() {
    ensure_test_image();
    // `image: gpu` forces the GPU image; this agent's is configured to one that does not
    // exist, and the message says so rather than falling back to the CPU image.
    let cluster = docker_cluster();
    let src = source_dir(&[("train.py", "print('ran')\n")]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "gpu"),
    );
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "env_failed", "{run}");
    assert!(
        run["message"]
            .as_str()
            .unwrap()
            .contains(&format!("image `{MISSING_GPU_IMAGE}`")),
        "{run}"
    );
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    let (stdout, stderr) = logs(&cluster, run_id);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{stderr}");
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_container_left_by_an_earlier_try_is_adopted_not_duplicated() {
    ensure_test_image();
    let cluster = docker_cluster();
    let agent_id = cluster.agent_id(0);
    // The agent's start-up reaper removes containers of attempts it has no directory for:
    // let it finish first, or it may take the container below as its own leftover.
    wait_for(
        "the agent's start-up check for leftovers",
        Duration::from_secs(30),
        || {
            cluster.agents[0]
                .log_text()
                .contains("Checked Docker for containers")
                .then_some(())
        },
    );
    // The first run of a new coordinator is run 1, attempt 1: its container's name is known.
    let name = format!("kiln-{}-1-1", agent_id.trim_start_matches("ag-"));
    docker(&[
        "create",
        "--name",
        &name,
        "--label",
        "kiln.run_id=1",
        "--label",
        "kiln.attempt=1",
        "--label",
        &format!("kiln.agent_id={agent_id}"),
        TEST_IMAGE,
        "python3",
        "-c",
        "print('the adopted container ran')",
    ]);
    let src = source_dir(&[("train.py", "print('a second container ran')\n")]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    assert_eq!(run_id, 1);
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    let (stdout, stderr) = logs(&cluster, run_id);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{stderr}");
    assert_eq!(stdout, "the adopted container ran\n", "{stderr}");
    assert!(
        stderr.contains(&format!("Adopted the existing container {name}")),
        "{stderr}"
    );
    assert!(containers_of_run(&agent_id, run_id).is_empty());
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_container_of_someone_else_under_the_name_is_refused_and_left_alone() {
    ensure_test_image();
    let cluster = docker_cluster();
    let agent_id = cluster.agent_id(0);
    let name = format!("kiln-{}-1-1", agent_id.trim_start_matches("ag-"));
    docker(&["create", "--name", &name, TEST_IMAGE, "true"]);
    let src = source_dir(&[("train.py", "print('ran')\n")]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    assert_eq!(run_id, 1);
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "env_failed", "{run}");
    assert!(
        run["message"].as_str().unwrap().contains(&format!(
            "a container named {name} already exists and is not this run's"
        )),
        "{run}"
    );
    // Still there: not ours to remove.
    docker(&["container", "inspect", &name]);
    docker(&["rm", "-f", &name]);
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn an_agent_restart_finds_the_container_run_again() {
    ensure_test_image();
    let mut cluster = docker_cluster();
    // The script waits for a file the test creates in its (mounted) work directory.
    let src = source_dir(&[(
        "train.py",
        "import os, time\nprint('before', flush=True)\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\nprint('after')\n",
    )]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    wait_for_line(&cluster, run_id, "before");
    cluster.crash_and_restart_agent(0);
    let work = cluster
        .dir
        .path()
        .join(format!("agent0/runs/{run_id}.1/work"));
    std::fs::write(work.join("go"), "").unwrap();
    assert_eq!(
        cluster.wait_ended(run_id, Duration::from_secs(90))["status"],
        "succeeded"
    );
    assert_eq!(logs(&cluster, run_id).0, "before\nafter\n");
    assert!(containers_of_run(&cluster.agent_id(0), run_id).is_empty());
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_dead_supervisor_does_not_leave_its_container_running() {
    ensure_test_image();
    let cluster = docker_cluster();
    let src = source_dir(&[(
        "train.py",
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n",
    )]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "train.py", "cpu"),
    );
    wait_for_line(&cluster, run_id, "started");
    let agent_id = cluster.agent_id(0);
    assert_eq!(containers_of_run(&agent_id, run_id).len(), 1);
    let record = cluster
        .dir
        .path()
        .join(format!("agent0/runs/{run_id}.1/state/supervisor.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // A vanished supervisor leaves the script's end unknown: `lost`, not `failed`.
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "lost", "{run}");
    assert!(
        run["message"]
            .as_str()
            .unwrap()
            .contains("supervisor process is gone"),
        "{run}"
    );
    assert!(containers_of_run(&agent_id, run_id).is_empty());
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_conda_environment_is_baked_into_a_derived_image_once_and_reused() {
    ensure_test_image();
    let cluster = docker_cluster();
    let channel = tempfile::tempdir().unwrap();
    kiln_tests::conda::write_channel(channel.path());
    let src = source_dir(&[
        (
            "environment.yml",
            &format!(
                "name: greet\nchannels:\n  - file://{}\ndependencies:\n  - hello-kiln\n",
                channel.path().display()
            ),
        ),
        ("check.py", kiln_tests::conda::CHECK_CONDA),
    ]);
    let request = || {
        let mut request = docker_run("box", "check.py", TEST_IMAGE);
        if let Some(v1::environment::Kind::Docker(docker)) =
            request.environment.as_mut().and_then(|e| e.kind.as_mut())
        {
            docker.conda = "environment.yml".into();
        }
        request
    };
    let mut derived = Vec::new();
    for expected in ["Built image", "reused"] {
        let run_id = submit(&cluster.address, src.path(), request());
        let run = cluster.wait_ended(run_id, Duration::from_secs(90));
        let (stdout, stderr) = logs(&cluster, run_id);
        assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{stderr}");
        // In the container, the environment is activated: its program runs from its prefix.
        assert!(stdout.contains("hello from conda"), "{stdout}");
        assert!(stdout.contains("CONDA_DEFAULT_ENV greet"), "{stdout}");
        let tag = stderr
            .lines()
            .find(|l| l.contains(expected) && l.contains("kiln-env/"))
            .unwrap_or_else(|| panic!("no `{expected}` line:\n{stderr}"))
            .split_whitespace()
            .find(|w| w.starts_with("kiln-env/"))
            .unwrap()
            .trim_end_matches([':', '.'])
            .to_string();
        derived.push(tag);
    }
    assert_eq!(derived[0], derived[1], "the second run used the same image");
    // The derived image is on the engine, built from the test image.
    docker(&["image", "inspect", &derived[0]]);
    cluster.stop();
    docker(&["image", "rm", &derived[0]]);
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_container_runs_unprivileged_and_a_fork_bomb_or_memory_hog_kills_only_its_run() {
    ensure_test_image();
    let cluster = Cluster::start_with_agent_args(
        ONE_AGENT,
        &[
            "--docker-cpu-image",
            TEST_IMAGE,
            "--docker-pids-limit",
            "64",
        ],
    );
    let src = source_dir(&[
        (
            "inside.py",
            r#"
import os
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print("uid", os.getuid())
print("capeff", status["CapEff"].strip())
print("nonewprivs", status["NoNewPrivs"].strip())
print("docker socket", any(os.path.exists(p) for p in ("/var/run/docker.sock", "/run/docker.sock")))
with open(os.path.join(os.environ["KILN_OUTPUTS_DIR"], "written.txt"), "w") as f:
    f.write("by the container")
"#,
        ),
        (
            "forkbomb.py",
            r#"
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as error:
    print("fork refused after", n, "processes:", error.strerror, flush=True)
    raise SystemExit(7)
"#,
        ),
        (
            "hog.py",
            "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n",
        ),
    ]);
    let run_id = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "inside.py", "auto"),
    );
    let run = cluster.wait_ended(run_id, Duration::from_secs(90));
    let (stdout, stderr) = logs(&cluster, run_id);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{stderr}");
    assert!(stdout.contains("uid 65534"), "not root inside: {stdout}");
    assert!(stdout.contains("capeff 0000000000000000"), "{stdout}");
    assert!(stdout.contains("nonewprivs 1"), "{stdout}");
    assert!(stdout.contains("docker socket False"), "{stdout}");
    let dest = tempfile::tempdir().unwrap();
    let out = dest.path().join("out");
    let download = cluster.kiln(&["download", &run_id.to_string(), out.to_str().unwrap()]);
    assert!(download.status.success(), "{}", text(&download.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("written.txt")).unwrap(),
        "by the container"
    );

    // A fork bomb stops at the container's process limit: only its run fails.
    let bomb = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "forkbomb.py", "auto"),
    );
    let run = cluster.wait_ended(bomb, Duration::from_secs(90));
    assert_eq!(run["exit_code"], 7, "{run} {:?}", logs(&cluster, bomb));
    assert!(logs(&cluster, bomb).0.contains("fork refused after"));

    // A memory hog over its run's memory limit is killed; only its run fails.
    let mut request = docker_run("box", "hog.py", "auto");
    request.resources = Some(v1::Resources {
        memory_bytes: 96 << 20,
        ..Default::default()
    });
    let hog = submit(&cluster.address, src.path(), request);
    let run = cluster.wait_ended(hog, Duration::from_secs(90));
    assert_eq!(run["exit_code"], 137, "{run} {:?}", logs(&cluster, hog));

    // The agent is fine and runs the next one.
    let again = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "inside.py", "auto"),
    );
    cluster.wait_ended(again, Duration::from_secs(90));
    cluster.stop();
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn a_container_cannot_export_host_files_through_outputs_symlinks() {
    ensure_test_image();
    let cluster = docker_cluster();
    // A secret of the agent's host, as its identity is: the container cannot see it, but a
    // symlink it leaves in outputs/ means that path on the host.
    let secret_dir = cluster.agent_data(0).join("planted");
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("agent.pem"), "PRIVATE KEY hunter2").unwrap();
    let src = source_dir(&[
        (
            "swap.py",
            "import os, shutil, kiln\no = kiln.outputs_dir()\nshutil.rmtree(o)\n\
             os.symlink(os.environ['SECRET_DIR'], o)\n",
        ),
        (
            "links.py",
            "import os, kiln\no = kiln.outputs_dir()\n\
             open(o + '/model.txt', 'w').write('weights')\n\
             os.symlink(os.environ['SECRET_DIR'] + '/agent.pem', o + '/key.pem')\n\
             os.symlink(os.environ['SECRET_DIR'], o + '/planted')\n",
        ),
    ]);
    for script in ["swap.py", "links.py"] {
        let mut request = docker_run("box", script, "auto");
        request
            .env
            .insert("SECRET_DIR".into(), secret_dir.display().to_string());
        let run_id = submit(&cluster.address, src.path(), request);
        let run = cluster.wait_ended(run_id, Duration::from_secs(90));
        assert_eq!(
            run["status"],
            "succeeded",
            "{run} {:?}",
            logs(&cluster, run_id)
        );
        let dest = cluster.dir.path().join(format!("downloaded-{script}"));
        let download = cluster.kiln(&["download", &run_id.to_string(), dest.to_str().unwrap()]);
        if script == "swap.py" {
            assert!(
                !download.status.success(),
                "the symlinked outputs/ was downloaded"
            );
            assert!(
                text(&download.stderr).contains("outputs not kept"),
                "{}",
                text(&download.stderr)
            );
        } else {
            assert!(download.status.success(), "{}", text(&download.stderr));
            assert_eq!(
                std::fs::read_to_string(dest.join("model.txt")).unwrap(),
                "weights"
            );
            assert!(std::fs::symlink_metadata(dest.join("key.pem")).is_err());
            assert!(std::fs::symlink_metadata(dest.join("planted")).is_err());
        }
    }
    cluster.stop();
}

/// Listens on port 8000 for up to 8 s and says whether anyone connected.
const LISTENER: &str = r#"import socket
s = socket.socket()
s.bind(("0.0.0.0", 8000))
s.listen()
print("ip", socket.gethostbyname(socket.gethostname()), flush=True)
s.settimeout(8)
try:
    s.accept()
    print("a peer reached this run", flush=True)
except socket.timeout:
    print("nobody reached this run", flush=True)
"#;

/// Tries to connect to the address given as its argument.
const CALLER: &str = r#"import socket, sys
try:
    socket.create_connection((sys.argv[1], 8000), timeout=3)
    print("reached", flush=True)
except OSError as error:
    print("unreachable:", error, flush=True)
"#;

/// Runs LISTENER, then CALLER against it, side by side on one agent; returns what the
/// caller printed.
fn call_between_runs(cluster: &Cluster) -> String {
    let src = source_dir(&[("listen.py", LISTENER), ("call.py", CALLER)]);
    let listener = submit(
        &cluster.address,
        src.path(),
        docker_run("box", "listen.py", "cpu"),
    );
    let ip = wait_for("the listener's address", Duration::from_secs(60), || {
        logs(cluster, listener)
            .0
            .lines()
            .find_map(|l| l.strip_prefix("ip ").map(str::to_string))
    });
    let caller = submit(
        &cluster.address,
        src.path(),
        v1::SubmitRunRequest {
            args: vec![ip],
            ..docker_run("box", "call.py", "cpu")
        },
    );
    let run = cluster.wait_ended(caller, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.wait_ended(listener, Duration::from_secs(60));
    logs(cluster, caller).0
}

#[test]
#[ignore = "needs a Docker engine and the test image: tests/run runs it with KILN_DOCKER_TESTS=1"]
fn runs_cannot_reach_each_others_containers() {
    ensure_test_image();
    let two_slots = &[AgentSpec {
        target: "box",
        slots: 2,
        advertise: None,
    }];
    let docker_args = ["--docker-cpu-image", TEST_IMAGE];
    // By default each attempt has a network of its own, removed with it.
    let cluster = Cluster::start_with_agent_args(two_slots, &docker_args);
    let called = call_between_runs(&cluster);
    assert!(called.starts_with("unreachable"), "{called}");
    let agent_id = cluster.agent_id(0);
    let networks = docker(&[
        "network",
        "ls",
        "--quiet",
        "--filter",
        &format!("label=kiln.agent_id={agent_id}"),
    ]);
    assert!(networks.trim().is_empty(), "networks left: {networks}");
    cluster.stop();
    // Control: on a network shared by every container (Docker's default bridge, what runs
    // joined before), the same call gets through.
    let shared = [&docker_args[..], &["--docker-network", "bridge"]].concat();
    let cluster = Cluster::start_with_agent_args(two_slots, &shared);
    let called = call_between_runs(&cluster);
    assert_eq!(called.trim(), "reached", "{called}");
    cluster.stop();
}
