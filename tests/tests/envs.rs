//! Environments the agent builds (venv, conda), with a real coordinator and agent: a real
//! `python -m venv` + pip installing a wheel the test builds, and a real conda solve and
//! install from a channel the test builds, all offline. Runs are submitted through the API
//! (`kiln_tests::grpc`), which is what `kiln.yaml`'s `environment:` becomes.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_proto::v1;
use kiln_tests::conda::{CHECK_CONDA, write_channel};
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

fn conda(file: &str) -> v1::Environment {
    v1::Environment {
        kind: Some(v1::environment::Kind::Conda(v1::CondaEnvironment {
            file: file.to_string(),
        })),
    }
}

fn submit(cluster: &Cluster, dir: &Path, script: &str, environment: v1::Environment) -> i64 {
    grpc::submit(&cluster.address, "envs", dir, script, environment)
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

/// Like [`cache_entries`], but empty before the cache directory exists.
fn cache_entries_if_any(cluster: &Cluster) -> Vec<String> {
    if envs_dir(cluster).is_dir() {
        cache_entries(cluster)
    } else {
        Vec::new()
    }
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
    // The build's output streams while it runs: once its first line can be read, the build
    // (seconds: venv + pip) is still going — no complete cache entry yet.
    wait_for("a preparation line", BUILD_TIMEOUT, || {
        let (_, kiln_lines) = logs(&cluster, first);
        kiln_lines.contains("Preparing environment").then_some(())
    });
    assert_eq!(
        cache_entries_if_any(&cluster),
        Vec::<String>::new(),
        "the first preparation line arrived only after the build had finished"
    );
    let mut outcomes = Vec::new();
    let mut prefixes = Vec::new();
    for run_id in [first, second] {
        let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
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
    let run = cluster.wait_ended(third, BUILD_TIMEOUT);
    let (stdout, kiln_lines) = logs(&cluster, third);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{kiln_lines}");
    assert_eq!(env_outcome(&kiln_lines), "reused");
    assert_eq!(printed_prefix(&stdout), prefixes[0]);
    assert_eq!(std::fs::metadata(&prefix).unwrap().ino(), inode);

    // The agent reports its cache: `kiln agents show` lists the environment.
    let name = entries[0].trim_end_matches(".json").to_string();
    let shown = wait_for(
        "the agent to report its cache",
        Duration::from_secs(20),
        || {
            let agent = cluster.json(&["agents", "show", "host0", "--json"]);
            let listed = agent["environments"]
                .as_array()?
                .iter()
                .any(|e| e["name"] == name.as_str());
            listed.then_some(agent)
        },
    );
    let environment = shown["environments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name.as_str())
        .unwrap()
        .clone();
    assert!(
        environment["size_bytes"].as_u64().unwrap() > 0,
        "{environment}"
    );
    let text = text(&cluster.kiln(&["agents", "show", "host0"]).stdout);
    assert!(text.contains(&name) && text.contains("LAST USED"), "{text}");
    cluster.stop();
}

#[test]
fn an_unsatisfiable_requirement_fails_the_run_with_pips_message_and_caches_nothing() {
    let cluster = one_agent(1);
    let src = venv_source("kilnwheel==9.9");
    let run_id = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
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
    let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("`missing.txt` does not exist"),
        "{message}"
    );
    cluster.stop();
}

#[test]
fn a_conda_environment_is_solved_installed_activated_and_reused() {
    let cluster = one_agent(1);
    let channel = tempfile::tempdir().unwrap();
    write_channel(channel.path());
    let src = tempfile::tempdir().unwrap();
    write_tree(
        src.path(),
        &[
            (
                "environment.yml",
                &format!(
                    "name: greet\nchannels:\n  - file://{}\ndependencies:\n  - hello-kiln\n",
                    channel.path().display()
                ),
            ),
            ("check.py", CHECK_CONDA),
        ],
    );
    let mut prefixes = Vec::new();
    for expected in ["built", "reused"] {
        let run_id = submit(&cluster, src.path(), "check.py", conda("environment.yml"));
        let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
        let (stdout, kiln_lines) = logs(&cluster, run_id);
        assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{kiln_lines}");
        assert_eq!(env_outcome(&kiln_lines), expected, "{kiln_lines}");
        let prefix = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CONDA_PREFIX "))
            .unwrap_or_else(|| panic!("{stdout}"))
            .to_string();
        assert!(stdout.contains("CONDA_DEFAULT_ENV greet"), "{stdout}");
        assert!(
            stdout.contains(&format!("which {prefix}/bin/hello-kiln")),
            "the environment's bin/ comes first on PATH: {stdout}"
        );
        assert!(
            stdout.contains(&format!("installed in {prefix}\nhello from conda")),
            "the dependency is installed and the prefix replaced: {stdout}"
        );
        if expected == "built" {
            assert!(kiln_lines.contains("Solved: 2 packages."), "{kiln_lines}");
            assert!(kiln_lines.contains("+ kiln-greeting 1.0 0"), "{kiln_lines}");
        }
        prefixes.push(prefix);
    }
    assert_eq!(prefixes[0], prefixes[1]);
    assert_eq!(cache_entries(&cluster).len(), 1);
    cluster.stop();
}

#[test]
fn a_conda_dependency_that_does_not_exist_fails_with_the_solvers_message() {
    let cluster = one_agent(1);
    let src = tempfile::tempdir().unwrap();
    // A channel inside the submitted directory, named relative to it.
    write_channel(&src.path().join("channel"));
    write_tree(
        src.path(),
        &[
            (
                "environment.yml",
                "channels:\n  - ./channel\ndependencies:\n  - hello-kiln\n  - no-such-package >=2\n",
            ),
            ("check.py", CHECK_CONDA),
        ],
    );
    let run_id = submit(&cluster, src.path(), "check.py", conda("environment.yml"));
    let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(message.contains("cannot be solved"), "{message}");
    assert!(
        message.contains("no-such-package"),
        "the solver names it: {message}"
    );
    let (stdout, _) = logs(&cluster, run_id);
    assert!(stdout.is_empty(), "the script never ran: {stdout}");
    assert!(cache_entries(&cluster).is_empty());
    assert!(
        cache_dirs(&cluster).is_empty(),
        "{:?}",
        cache_dirs(&cluster)
    );

    // Bad YAML is named, with the problem.
    write_tree(
        src.path(),
        &[("environment.yml", "dependencies: [hello-kiln\n")],
    );
    let run_id = submit(&cluster, src.path(), "check.py", conda("environment.yml"));
    let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    assert!(
        message.contains("`environment.yml` is not a valid environment.yml"),
        "{message}"
    );
    cluster.stop();
}

/// Waits until the run's log shows its environment build has started.
fn wait_building(cluster: &Cluster, run_id: i64) {
    wait_for("the environment build to start", BUILD_TIMEOUT, || {
        let (_, kiln_lines) = logs(cluster, run_id);
        kiln_lines.contains("Preparing environment").then_some(())
    });
}

/// Processes whose command line mentions `path` (an environment being built there).
fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle) && !cmdline.contains("cargo"))
        .collect()
}

/// Directories in the cache that are not a complete entry's (a build's leftovers).
fn stray_directories(cluster: &Cluster) -> Vec<String> {
    let complete = cache_entries_if_any(cluster);
    let Ok(dir) = std::fs::read_dir(envs_dir(cluster)) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !complete.contains(name))
        .collect()
}

#[test]
fn killing_the_agent_during_an_environment_build_builds_it_once_and_runs_the_script_once() {
    let mut cluster = one_agent(1);
    let src = venv_source("kilnwheel==1.0");
    let run_id = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    wait_building(&cluster, run_id);
    // SIGKILL mid-build: the build's processes die with the agent (nothing goes on writing
    // into the environment); the restarted agent takes the same attempt up again from its
    // environment phase (see `run::Phase`) and builds once, whole.
    cluster.crash_and_restart_agent(0);
    let run = cluster.wait_ended(run_id, BUILD_TIMEOUT);
    let (stdout, kiln_lines) = logs(&cluster, run_id);
    assert_eq!(run["status"], "succeeded", "{run}\n{stdout}\n{kiln_lines}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert!(
        kiln_lines.contains("The agent restarted during this attempt's environment phase"),
        "{kiln_lines}"
    );
    assert_eq!(
        stdout.matches("value from the wheel").count(),
        1,
        "the script ran once: {stdout}"
    );
    assert_eq!(cache_entries(&cluster).len(), 1);
    assert_eq!(stray_directories(&cluster), Vec::<String>::new());
    assert_eq!(processes_using(&envs_dir(&cluster)), Vec::<String>::new());
    cluster.stop();
}

#[test]
fn cancelling_during_an_environment_build_stops_it_twice_harmlessly() {
    let cluster = one_agent(1);
    let src = venv_source("kilnwheel==1.0");
    let run_id = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    wait_building(&cluster, run_id);
    let id = run_id.to_string();
    let first = cluster.kiln(&["cancel", &id]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("cancelled"));
    // Cancelling again is harmless: same answer, nothing else happens.
    let second = cluster.kiln(&["cancel", &id]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("cancelled"));
    assert_eq!(cluster.run(run_id)["status"], "cancelled");
    // The build stops and leaves nothing in the cache.
    wait_for("the build to stop", Duration::from_secs(30), || {
        processes_using(&envs_dir(&cluster))
            .is_empty()
            .then_some(())
    });
    wait_for(
        "the cancelled build to be cleaned up",
        Duration::from_secs(30),
        || stray_directories(&cluster).is_empty().then_some(()),
    );
    assert_eq!(cache_entries_if_any(&cluster), Vec::<String>::new());
    // The agent goes on: the same environment builds and runs afterwards.
    let again = submit(&cluster, src.path(), "check.py", venv("requirements.txt"));
    let run = cluster.wait_ended(again, BUILD_TIMEOUT);
    assert_eq!(run["status"], "succeeded", "{run}");
    cluster.stop();
}

#[test]
fn defaults_and_named_channels_follow_the_agents_mirror_settings_and_offline_says_what_to_do() {
    // A mirror on this host: `defaults` and the named channel `mirrored` both live there.
    let mirror = tempfile::tempdir().unwrap();
    write_channel(&mirror.path().join("main"));
    write_channel(&mirror.path().join("mirrored"));
    let mirrored = Cluster::start_with_agent_args(
        &[AgentSpec {
            target: "envs",
            slots: 1,
            advertise: None,
        }],
        &[
            "--conda-default-channels",
            &format!("file://{}/main", mirror.path().display()),
            "--conda-channel-alias",
            &format!("file://{}", mirror.path().display()),
        ],
    );
    for channel in ["defaults", "mirrored"] {
        let src = tempfile::tempdir().unwrap();
        write_tree(
            src.path(),
            &[
                (
                    "environment.yml",
                    &format!("channels:\n  - {channel}\ndependencies:\n  - hello-kiln\n"),
                ),
                ("check.py", CHECK_CONDA),
            ],
        );
        let run_id = submit(&mirrored, src.path(), "check.py", conda("environment.yml"));
        let run = mirrored.wait_ended(run_id, BUILD_TIMEOUT);
        let (stdout, kiln_lines) = logs(&mirrored, run_id);
        assert_eq!(run["status"], "succeeded", "{channel}: {run}\n{kiln_lines}");
        assert!(stdout.contains("hello from conda"), "{stdout}");
    }
    mirrored.stop();

    // An agent with conda's defaults and no network: the run fails saying where it looked
    // and what the agent can use instead.
    let offline = one_agent(1);
    let src = tempfile::tempdir().unwrap();
    write_tree(
        src.path(),
        &[
            (
                "environment.yml",
                "channels:\n  - defaults\ndependencies:\n  - hello-kiln\n",
            ),
            ("check.py", CHECK_CONDA),
        ],
    );
    let run_id = submit(&offline, src.path(), "check.py", conda("environment.yml"));
    let run = offline.wait_ended(run_id, BUILD_TIMEOUT);
    assert_eq!(run["status"], "env_failed", "{run}");
    let message = run["message"].as_str().unwrap();
    for needed in [
        "https://repo.anaconda.com/pkgs/main",
        "conda_default_channels",
        "conda_channel_alias",
        "file:///",
    ] {
        assert!(
            message.contains(needed),
            "{needed:?} missing from: {message}"
        );
    }
    offline.stop();
}
