//! The Docker tests' image and `docker` CLI helpers. The image (`TEST_IMAGE`: Debian 12
//! minbase with python3 (minimal + standard library) and a marker file `/etc/kiln-test-image`) is built once per
//! machine by `tests/docker-test-image` (debootstrap + `docker import`, no registry) and
//! reused whenever `docker image inspect` finds it.

use std::path::Path;
use std::process::Command;

/// The image Docker tests run scripts in.
pub const TEST_IMAGE: &str = "kiln-test/python:bookworm-1";

/// Makes sure the test image exists, building it (debootstrap + `docker import`) when it
/// does not; panics saying what is missing otherwise.
pub fn ensure_test_image() {
    // One build at a time across test processes.
    let lock = std::fs::File::create(std::env::temp_dir().join("kiln-docker-test-image.lock"))
        .expect("create the image lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the image lock file");
    if image_exists(TEST_IMAGE) {
        return;
    }
    let which = Command::new("sh")
        .args(["-c", "command -v debootstrap"])
        .output()
        .expect("run sh");
    assert!(
        which.status.success(),
        "the Docker test image {TEST_IMAGE} is missing and debootstrap is not installed to build \
         it (apt-get install debootstrap; .ci/run does)"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-test-image");
    let status = Command::new(&script)
        .arg(TEST_IMAGE)
        .status()
        .expect("run tests/docker-test-image");
    assert!(status.success(), "{} failed", script.display());
}

pub fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `docker ARGS`, which must succeed; its stdout.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Names of the containers (running or not) of run `run_id` on agent `agent_id`, by label.
pub fn containers_of_run(agent_id: &str, run_id: i64) -> Vec<String> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=kiln.run_id={run_id}"),
        "--filter",
        &format!("label=kiln.agent_id={agent_id}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}
