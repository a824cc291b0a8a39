//! Runs are contained (issue 13): on a real TLS cluster whose agent runs as root (as the
//! tests do), a member's hostile script running next to another member's run gets nothing
//! of the agent's or the other run's, cannot tamper with the other run's outputs, and
//! leaves nothing running behind it.

use std::time::Duration;

use kiln_tests::secure::SecureCluster;
use kiln_tests::{process_alive, shared_dir, text, wait_for, write_tree};

const VICTIM_PY: &str = r#"import os, sys, time
os.makedirs("outputs", exist_ok=True)
open("outputs/model.bin", "w").write("genuine weights")
print("victim ready", flush=True)
gate = sys.argv[1]
while not os.path.exists(os.path.join(gate, "go")):
    time.sleep(0.1)
print("victim done", flush=True)
"#;

/// Tries everything a member's script could try against its neighbours and prints one
/// line per attempt: `GOT what` or `DENIED what`.
const ATTACKER_PY: &str = r#"import glob, os, subprocess, sys, time
gate = sys.argv[1]
data = os.path.dirname(os.path.dirname(os.path.dirname(os.getcwd())))
print("uid", os.getuid(), "data", data, flush=True)

def attempt(what, action):
    try:
        got = action()
        print("GOT", what, repr(got)[:200], flush=True)
    except Exception as error:
        print("DENIED", what, type(error).__name__, flush=True)

def read(path):
    return open(path, "rb").read()

attempt("agent key", lambda: read(os.path.join(data, "identity", "agent.pem")))
attempt("agent id dir", lambda: os.listdir(os.path.join(data, "identity")))
attempt("runs listing", lambda: os.listdir(os.path.join(data, "runs")))
victim = os.path.join(data, "runs", sys.argv[2] + ".1")
attempt("victim spec", lambda: read(os.path.join(victim, "state", "spec.json")))
attempt("victim logs", lambda: read(os.path.join(victim, "state", "logs.spool")))
attempt("victim outputs", lambda: read(os.path.join(victim, "work", "outputs", "model.bin")))
def tamper():
    with open(os.path.join(victim, "work", "outputs", "model.bin"), "w") as f:
        f.write("tampered")
    return "written"
attempt("victim outputs write", tamper)
def environ():
    found = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            if b"hunter2" in open(path, "rb").read():
                found.append(path)
        except Exception:
            pass
    if not found:
        raise PermissionError("no readable environ holds the secret")
    return found
attempt("victim environ", environ)
# A daemon that leaves the process group and the session, and outlives the script if
# nothing stops it.
daemon = subprocess.Popen(
    [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
    start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
with open(os.path.join(gate, "daemon.pid"), "w") as f:
    f.write(str(daemon.pid))
print("attacker done", flush=True)
"#;

#[test]
fn a_hostile_run_gets_nothing_of_the_agent_or_its_neighbour_and_leaves_nothing_behind() {
    let mut cluster = SecureCluster::start(&[]);
    // Two slots: the victim's and the attacker's runs side by side on one host.
    std::fs::write(
        cluster.dir.path().join("agent0.toml"),
        format!(
            "data_dir = \"{}\"\npython = \"{}\"\nhostname = \"host0\"\nslots = 2\n\
             heartbeat_interval = 0.5\nmetrics_interval = 0.3\n",
            cluster.agent_data(0).display(),
            kiln_tests::python()
        ),
    )
    .unwrap();
    let agent = cluster.add_agent("cpu");
    let admin = cluster.login("root", "admin");
    cluster.wait_agent_state(&admin, &cluster.agent_id(agent), "online");
    let victim = cluster.login("vera", "member");
    let attacker = cluster.login("mallory", "member");

    let gate = shared_dir();
    let gate_arg = gate.path().to_str().unwrap();
    let src = tempfile::tempdir().unwrap();
    write_tree(
        src.path(),
        &[("victim.py", VICTIM_PY), ("attacker.py", ATTACKER_PY)],
    );
    let dir = src.path().to_str().unwrap();

    let victim_run = victim.submit_detached(&[
        "--target",
        "cpu",
        "--env",
        "API_KEY=hunter2",
        dir,
        "victim.py",
        "--",
        gate_arg,
    ]);
    wait_for("the victim's run to start", Duration::from_secs(30), || {
        let logs = text(&victim.kiln(&["logs", &victim_run.to_string()]).stdout);
        logs.contains("victim ready").then_some(())
    });

    let attack = attacker.submit_detached(&[
        "--target",
        "cpu",
        dir,
        "attacker.py",
        "--",
        gate_arg,
        &victim_run.to_string(),
    ]);
    let ended = attacker.wait_status(attack, "succeeded");
    assert_eq!(ended["status"], "succeeded", "{ended}");
    let logs = text(&attacker.kiln(&["logs", &attack.to_string()]).stdout);
    assert!(logs.contains("attacker done"), "{logs}");
    for what in [
        "agent key",
        "agent id dir",
        "runs listing",
        "victim spec",
        "victim logs",
        "victim outputs",
        "victim outputs write",
        "victim environ",
    ] {
        assert!(
            logs.contains(&format!("DENIED {what} ")),
            "the attacker got `{what}`:\n{logs}"
        );
    }
    assert!(!logs.contains("GOT"), "{logs}");
    assert!(!logs.contains("hunter2"), "{logs}");
    assert!(!logs.contains("PRIVATE KEY"), "{logs}");
    // Its own user, not the agent's.
    assert!(!logs.contains("uid 0 "), "{logs}");

    // The daemon it left went with its run.
    let pid: i32 = std::fs::read_to_string(gate.path().join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for(
        "the attacker's daemon to be gone",
        Duration::from_secs(10),
        || (!process_alive(pid)).then_some(()),
    );

    // The victim's run is untouched: it finishes, its outputs are its own.
    std::fs::write(gate.path().join("go"), "").unwrap();
    let done = victim.wait_status(victim_run, "succeeded");
    assert_eq!(done["status"], "succeeded", "{done}");
    let dest = tempfile::tempdir().unwrap();
    let download = victim.kiln(&[
        "download",
        &victim_run.to_string(),
        dest.path().to_str().unwrap(),
    ]);
    assert!(download.status.success(), "{}", text(&download.stderr));
    let model = walk_find(dest.path(), "model.bin").expect("model.bin downloaded");
    assert_eq!(std::fs::read_to_string(model).unwrap(), "genuine weights");
}

fn walk_find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = walk_find(&path, name)
        {
            return Some(found);
        }
    }
    None
}
