//! Resource requests and GPU allocation, end to end. The agents here have no GPU; one of them
//! replays recorded NVML values of two H100s (`KILN_FAKE_GPUS=2`), which is all the
//! coordinator and the run supervisor see of GPUs.

use std::path::Path;
use std::time::Duration;

use kiln_tests::{AgentSpec, Cluster, shared_dir, text, wait_for, write_tree};

/// Prints its CUDA_VISIBLE_DEVICES, then waits until `release-<run id>` exists next to the
/// snapshot (the test creates it).
const HOLD_GPU: &str = r#"
import os, time
print("gpus=%s" % os.environ.get("CUDA_VISIBLE_DEVICES", "none"), flush=True)
release = os.path.join(os.environ["RELEASE_DIR"], "release-" + os.environ["KILN_RUN_ID"])
while not os.path.exists(release):
    time.sleep(0.05)
"#;

/// One agent with two (recorded) GPUs and one without, both on target `gpu`; their runs see
/// `RELEASE_DIR`.
fn cluster(release_dir: &Path) -> Cluster {
    let mut cluster = Cluster::start(&[]);
    let spec = AgentSpec {
        target: "gpu",
        slots: 4,
        advertise: None,
    };
    let release_dir = release_dir.to_str().unwrap();
    // Runs inherit only the agent variables it passes on (`pass_env`).
    let pass = ("KILN_PASS_ENV", "PATH,HOME,LANG,LC_*,RELEASE_DIR");
    cluster.add_agent_with_env(
        spec.clone(),
        &[("KILN_FAKE_GPUS", "2"), ("RELEASE_DIR", release_dir), pass],
    );
    cluster.add_agent_with_env(spec, &[("RELEASE_DIR", release_dir), pass]);
    cluster.wait_agents_online(2);
    cluster
}

fn log_of(cluster: &Cluster, run: i64) -> String {
    text(&cluster.kiln(&["logs", &run.to_string()]).stdout)
}

fn release(dir: &Path, run: i64) {
    std::fs::write(dir.join(format!("release-{run}")), "").unwrap();
}

#[test]
fn gpu_runs_get_their_own_gpus_and_queue_when_all_are_taken() {
    let hold = shared_dir();
    let cluster = cluster(hold.path());
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), &[("hold.py", HOLD_GPU)]);
    let dir = src.path().to_str().unwrap();
    let submit = |extra: &[&str]| {
        let mut args = vec!["--target", "gpu"];
        args.extend_from_slice(extra);
        args.extend([dir, "hold.py"]);
        cluster.submit_detached(&args)
    };
    let gpu_agent = cluster.agent_id(0);

    // More GPUs than any agent has: refused at submit, naming the largest agent.
    let output = cluster.kiln(&[
        "submit",
        "--target",
        "gpu",
        "--gpus-per-node",
        "3",
        dir,
        "hold.py",
    ]);
    assert!(!output.status.success());
    let error = text(&output.stderr);
    assert!(
        error.contains("2 GPUs") && error.contains("largest agent"),
        "{error}"
    );

    let first = submit(&["--gpus-per-node", "1"]);
    let second = submit(&["--gpus-per-node", "1"]);
    let third = submit(&["--gpus-per-node", "1"]);
    for run in [first, second] {
        let run = cluster.wait_status(run, "running");
        assert_eq!(run["agent"], gpu_agent.as_str(), "{run}");
    }
    let seen = |run: i64| {
        wait_for("the run to print its GPUs", Duration::from_secs(20), || {
            log_of(&cluster, run)
                .lines()
                .find_map(|l| l.strip_prefix("gpus=").map(str::to_string))
        })
    };
    let (a, b) = (seen(first), seen(second));
    let mut both = [a.clone(), b.clone()];
    both.sort();
    assert_eq!(both, ["0".to_string(), "1".to_string()]);
    // Both GPUs are taken: the third waits (the GPU-less agent has free slots but no GPU).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.run(third)["status"], "queued");
    // A run with no GPU request still runs meanwhile.
    let cpu = submit(&[]);
    cluster.wait_status(cpu, "running");
    assert_eq!(seen(cpu), "none");

    // The GPU metrics of a run are its own GPU's, named by UUID.
    let names: Vec<String> = wait_for("GPU metrics", Duration::from_secs(20), || {
        let metrics = cluster.json(&["metrics", &first.to_string(), "--json"]);
        let names: Vec<String> = metrics
            .as_array()?
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_string))
            .filter(|n| n.starts_with("system/gpu/"))
            .collect();
        (!names.is_empty()).then_some(names)
    });
    let uuid_suffix = if a == "0" { "5a6b" } else { "5a6c" };
    assert!(
        names.iter().all(|n| n.contains(uuid_suffix)),
        "run {first} had GPU {a} but reports {names:?}"
    );

    // Freeing the first run's GPU lets the third start on it.
    release(hold.path(), first);
    cluster.wait_status(first, "succeeded");
    cluster.wait_status(third, "running");
    assert_eq!(seen(third), a);
    for run in [second, third, cpu] {
        release(hold.path(), run);
    }
    for run in [second, third, cpu] {
        cluster.wait_status(run, "succeeded");
    }
    cluster.stop();
}
