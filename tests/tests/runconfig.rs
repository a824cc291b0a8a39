//! The run configuration file (`kiln.yaml`) end to end: a real coordinator and agent, the
//! real CLI, directories with real files.

use std::process::{Command, Stdio};

use kiln_tests::*;

const ONE_AGENT: &[AgentSpec] = &[AgentSpec {
    target: "alpha",
    slots: 2,
    advertise: None,
}];

fn source_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    dir
}

/// Prints its arguments and two variables, one per line.
const SHOW_PY: &str = r#"
import os, sys
print("args=" + "|".join(sys.argv[1:]))
print("GREETING=" + os.environ.get("GREETING", "<unset>"))
print("SEED=" + os.environ.get("SEED", "<unset>"))
"#;

#[test]
fn a_kiln_yaml_names_the_script_args_env_and_timeout_and_flags_override_it() {
    let cluster = Cluster::start(ONE_AGENT);
    let src = source_dir(&[
        ("show.py", SHOW_PY),
        (
            "kiln.yaml",
            r#"# The run, as a file.
script: show.py
args: [--lr, 0.5, "two words"]
target: alpha
env:
  GREETING: hello from kiln.yaml
  SEED: 7
timeout: 10m
"#,
        ),
    ]);
    let dir = src.path().to_str().unwrap();

    // No script and no target on the command line: both come from the file.
    let output = cluster.kiln(&["submit", dir]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout).lines().collect::<Vec<_>>(),
        [
            "args=--lr|0.5|two words",
            "GREETING=hello from kiln.yaml",
            "SEED=7"
        ]
    );
    let run = cluster.run(submitted_run_id(&output.stderr));
    assert_eq!(run["script"], "show.py");
    assert_eq!(run["target"], "alpha");
    assert_eq!(
        run["env"],
        serde_json::json!({"GREETING": "hello from kiln.yaml", "SEED": "7"})
    );
    assert_eq!(run["timeout_seconds"], 600);
    assert_eq!(
        run["environment"],
        serde_json::json!({"user": {"python": null}})
    );
    let shown = text(&cluster.kiln(&["show", &run["id"].to_string()]).stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("timeout") && l.contains("10m")),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("env") && l.contains("GREETING=hello from kiln.yaml")),
        "{shown}"
    );

    // Flags win: one variable replaced, the other kept; arguments after -- replace args.
    let output = cluster.kiln(&["submit", "--env", "SEED=8", dir, "--", "--epochs", "1"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout).lines().collect::<Vec<_>>(),
        ["args=--epochs|1", "GREETING=hello from kiln.yaml", "SEED=8"]
    );
    cluster.stop();
}

#[test]
fn a_run_over_its_timeout_is_stopped_and_fails_saying_timed_out() {
    let cluster = Cluster::start(ONE_AGENT);
    let src = source_dir(&[
        (
            "sleep.py",
            "import time\nprint('started', flush=True)\ntime.sleep(600)\nprint('woke up')\n",
        ),
        ("kiln.yaml", "script: sleep.py\ntarget: alpha\ntimeout: 2\n"),
    ]);
    let output = cluster.kiln(&["submit", src.path().to_str().unwrap()]);
    assert_ne!(output.status.code(), Some(0));
    assert_eq!(text(&output.stdout), "started\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("timed out"), "{stderr}");
    let run = cluster.run(submitted_run_id(&output.stderr));
    assert_eq!(run["status"], "failed");
    assert!(
        run["message"].as_str().unwrap().starts_with("timed out"),
        "{run}"
    );
    assert_eq!(run["timeout_seconds"], 2);
    cluster.stop();
}

#[test]
fn dry_run_prints_the_effective_configuration_and_contacts_no_coordinator() {
    let src = source_dir(&[
        ("train.py", "print('hi')\n"),
        (
            "kiln.yaml",
            "script: train.py\ntarget: gpu\nenv: {SEED: 7, MODE: fast}\ntimeout: 2h\nresources: {memory: 16GiB}\n",
        ),
    ]);
    // A coordinator that cannot be reached: a dry run must not need one.
    let output = Command::new(bin("kiln"))
        .args(["submit", "--dry-run", "--timeout", "30s", "--env", "SEED=8"])
        .arg(src.path())
        .env("KILN_COORDINATOR", "unix:///nonexistent/kiln.sock")
        .env_remove("KILN_TARGET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let (config, snapshot) = stdout
        .split_once("# Snapshot:\n")
        .unwrap_or_else(|| panic!("no snapshot section in:\n{stdout}"));
    let config: Vec<&str> = config.lines().collect();
    for line in [
        "script: train.py",
        "target: gpu",
        "timeout: 30s",
        "  MODE: fast",
        "  SEED: '8'",
        "  memory: 16GiB",
        "  user: {}",
    ] {
        assert!(config.contains(&line), "no `{line}` in:\n{stdout}");
    }
    assert!(snapshot.starts_with("snapshot        sha256:"), "{stdout}");
    assert!(
        snapshot.lines().any(|l| l == "files           2"),
        "{stdout}"
    );
}

#[test]
fn a_bad_run_configuration_fails_before_anything_is_uploaded() {
    let cluster = Cluster::start(ONE_AGENT);
    let check = |files: &[(&str, &str)], extra: &[&str], expected: &[&str]| {
        let src = source_dir(files);
        let mut args = vec!["submit"];
        args.extend_from_slice(extra);
        args.push(src.path().to_str().unwrap());
        let output = cluster.kiln(&args);
        assert_eq!(output.status.code(), Some(1));
        let stderr = text(&output.stderr);
        for part in expected {
            assert!(stderr.contains(part), "no `{part}` in: {stderr}");
        }
    };
    check(
        &[
            ("train.py", "print('hi')\n"),
            (
                "kiln.yaml",
                "script: train.py\ntarget: alpha\nresources:\n  cpus: 2\n  gpu: 1\n",
            ),
        ],
        &[],
        &[
            "kiln.yaml line 5: unknown key `gpu` in `resources`",
            "valid keys there: cpus, memory, gpus",
        ],
    );
    check(
        &[
            ("train.py", "print('hi')\n"),
            (
                "kiln.yaml",
                "script: train.py\ntarget: alpha\nenvironment: {conda: {file: environment.yml}}\n",
            ),
        ],
        &[],
        &["environment.conda.file `environment.yml` is not in the snapshot"],
    );
    check(
        &[("train.py", "print('hi')\n")],
        &["--config", "/nonexistent/run.yaml", "--target", "alpha"],
        &["run configuration `/nonexistent/run.yaml` (--config) does not exist"],
    );
    // Nothing reached the coordinator: no run, no snapshot blob.
    assert_eq!(cluster.json(&["runs", "--json"]), serde_json::json!([]));
    let blobs = cluster.dir.path().join("coordinator/blobs/sha256");
    let stored = std::fs::read_dir(&blobs)
        .expect("the coordinator's blob directory")
        .count();
    assert_eq!(stored, 0, "blobs were uploaded to {}", blobs.display());
    cluster.stop();
}

/// The agent does not build conda environments yet: the configuration reaches it and the run
/// ends `env_failed`. When conda environments land, this test should expect the run to
/// succeed in the environment instead.
#[test]
fn a_conda_environment_in_kiln_yaml_is_built_and_activated() {
    let cluster = Cluster::start(ONE_AGENT);
    let channel = tempfile::tempdir().unwrap();
    kiln_tests::conda::write_channel(channel.path());
    let src = source_dir(&[
        ("check.py", kiln_tests::conda::CHECK_CONDA),
        (
            "environment.yml",
            &format!(
                "name: greet\nchannels: [\"file://{}\"]\ndependencies: [hello-kiln]\n",
                channel.path().display()
            ),
        ),
        (
            "kiln.yaml",
            "script: check.py\ntarget: alpha\nenvironment:\n  conda:\n    file: environment.yml\n",
        ),
    ]);
    let output = cluster.kiln(&["submit", src.path().to_str().unwrap()]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    // The script ran in the environment kiln.yaml named: its program is on PATH.
    assert!(stdout.contains("CONDA_DEFAULT_ENV greet"), "{stdout}");
    assert!(stdout.contains("hello from conda"), "{stdout}");
    let run = cluster.run(kiln_tests::submitted_run_id(&output.stderr));
    assert_eq!(
        run["environment"],
        serde_json::json!({"conda": {"file": "environment.yml"}})
    );
    cluster.stop();
}
