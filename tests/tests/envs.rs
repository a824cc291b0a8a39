//! Environments the agent builds, with a real coordinator and agent: a real
//! `python -m venv` + pip installing a wheel the test builds, offline. Runs are submitted through the API
//! (`kiln_tests::grpc`): the CLI has no flag for environments yet.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_proto::v1;
use kiln_tests::*;

/// Environment builds run pip or a solver on a two-core machine next to other tests.
const BUILD_TIMEOUT: Duration = Duration::from_secs(240);

fn one_agent(slots: u32) -> Cluster {
    Cluster::start(&[AgentSpec {
        target: "envs",
        slots,
        advertise: None,
    }])
}

fn venv(requirements: &str) -> v1::Environment {
    v1::Environment {
        kind: Some(v1::environment::Kind::Venv(v1::VenvEnvironment {
            requirements: requirements.to_string(),
            python: python(),
        })),
    }
}

fn submit(cluster: &Cluster, dir: &Path, script: &str, environment: v1::Environment) -> i64 {
    grpc::submit(&cluster.address, "envs", dir, script, environment)
}

/// Waits until the run has ended, however long its environment takes to build.
fn wait_ended(cluster: &Cluster, run_id: i64) -> serde_json::Value {
    wait_for(&format!("run {run_id} to end"), BUILD_TIMEOUT, || {
        let run = cluster.run(run_id);
        let status = run["status"].as_str().unwrap_or_default().to_string();
        (!["queued", "assigned", "running"].contains(&status.as_str())).then_some(run)
    })
}

/// The run's stored log: (the script's stdout, Kiln's own `[kiln]` lines).
fn logs(cluster: &Cluster, run_id: i64) -> (String, String) {
    let output = cluster.kiln(&["logs", &run_id.to_string()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    (text(&output.stdout), text(&output.stderr))
}

fn envs_dir(cluster: &Cluster) -> PathBuf {
    cluster.dir.path().join("agent0/envs")
}

/// Names of the complete cache entries (`NAME.json`).
fn cache_entries(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(envs_dir(cluster))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".json")
                        .filter(|_| !name.starts_with('.'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Environment directories in the cache, complete or not (a failed build must leave none).
fn cache_dirs(cluster: &Cluster) -> Vec<String> {
    std::fs::read_dir(envs_dir(cluster))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The line of `kiln_lines` that says what happened to the environment ("Environment … built
/// in …" or "… reused in …").
fn env_outcome(kiln_lines: &str) -> &'static str {
    let line = kiln_lines
        .lines()
        .find(|l| l.starts_with("[kiln] Environment ") && l.contains(" in "))
        .unwrap_or_else(|| panic!("no environment line in:\n{kiln_lines}"));
    if line.contains(" reused in ") {
        "reused"
    } else if line.contains(" built in ") {
        "built"
    } else {
        panic!("unexpected environment line: {line}")
    }
}

/// A wheel of package `name` (module `name` with `VALUE = value`), built with Python's
/// zipfile the way a build backend lays it out.
fn write_wheel(dir: &Path, name: &str, version: &str, value: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
import sys, zipfile
out, name, version, value = sys.argv[1:]
dist = f"{name}-{version}.dist-info"
files = {
    f"{name}/__init__.py": f"VALUE = {value!r}\n",
    f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: kiln-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as whl:
    for path, text in files.items():
        whl.writestr(path, text)
    whl.writestr(f"{dist}/RECORD", record)
"#;
    let status = std::process::Command::new(python())
        .args(["-c", script])
        .arg(dir)
        .args([name, version, value])
        .status()
        .unwrap();
    assert!(status.success(), "building the test wheel failed");
}

const CHECK_VENV: &str = "import os, sys\nimport kilnwheel\nprint('value', kilnwheel.VALUE)\n\
print('prefix', sys.prefix)\nprint('venv', os.environ['VIRTUAL_ENV'])\n";

fn venv_source(requirement: &str) -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    write_wheel(
        &src.path().join("wheels"),
        "kilnwheel",
        "1.0",
        "from the wheel",
    );
    write_tree(
        src.path(),
        &[
            (
                "requirements.txt",
                &format!("--no-index\n--find-links wheels\n{requirement}\n"),
            ),
            ("check.py", CHECK_VENV),
        ],
    );
    src
}

/// `prefix …` from the script's output.
fn printed_prefix(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("prefix "))
        .unwrap_or_else(|| panic!("no prefix in: {stdout}"))
        .to_string()
}

#[test]
fn a_venv_is_built_once_for_concurrent_runs_and_reused_later() {
    let cluster = one_agent(2);
    let src = venv_source("kilnwheel==1.0");

    // Two runs at once on a two-slot agent: one builds, the other waits and reuses.
    let first = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let second = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let mut outcomes = Vec::new();
    let mut prefixes = Vec::new();
    for run_id in [first, second] {
        let run = wait_ended(&cluster, run_id);
        let (stdout, kiln_lines) = logs(&cluster, run_id);
        assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{kiln_lines}");
        assert!(stdout.contains("value from the wheel"), "{stdout}");
        outcomes.push(env_outcome(&kiln_lines));
        let prefix = printed_prefix(&stdout);
        assert!(stdout.contains(&format!("venv {prefix}")), "{stdout}");
        prefixes.push(prefix);
    }
    outcomes.sort();
    assert_eq!(outcomes, ["built", "reused"], "built once for both runs");
    assert_eq!(prefixes[0], prefixes[1]);
    let entries = cache_entries(&cluster);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let prefix = envs_dir(&cluster).join(&entries[0]);
    assert_eq!(Path::new(&prefixes[0]), prefix);
    let inode = std::fs::metadata(&prefix).unwrap().ino();

    // A later run with the same requirements reuses the same directory.
    let third = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let run = wait_ended(&cluster, third);
    let (stdout, kiln_lines) = logs(&cluster, third);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{kiln_lines}");
    assert_eq!(env_outcome(&kiln_lines), "reused");
    assert_eq!(printed_prefix(&stdout), prefixes[0]);
    assert_eq!(std::fs::metadata(&prefix).unwrap().ino(), inode);
    cluster.stop();
}

#[test]
fn an_unsatisfiable_requirement_fails_the_run_with_pips_message_and_caches_nothing() {
    let cluster = one_agent(1);
    let src = venv_source("kilnwheel==9.9");
    let run_id = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let run = wait_ended(&cluster, run_id);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("pip install -r requirements.txt failed"),
        "{message}"
    );
    assert!(
        message.contains("No matching distribution found for kilnwheel==9.9"),
        "pip's own words reach the user: {message}"
    );
    let (stdout, kiln_lines) = logs(&cluster, run_id);
    assert!(stdout.is_empty(), "the script never ran: {stdout}");
    assert!(
        kiln_lines.contains("Preparing environment venv-"),
        "{kiln_lines}"
    );
    assert!(cache_entries(&cluster).is_empty());
    assert!(
        cache_dirs(&cluster).is_empty(),
        "{:?}",
        cache_dirs(&cluster)
    );

    // A requirements file that is not in the snapshot is named.
    let run_id = submit(&cluster, src.path(), "check.py", venv("missing.txt"));
    let run = wait_ended(&cluster, run_id);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("`missing.txt` does not exist"),
        "{message}"
    );
    cluster.stop();
}
