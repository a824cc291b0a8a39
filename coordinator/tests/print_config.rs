//! `kiln-coordinator --print-config` as a user runs it: flag > environment > file > default,
//! across the real binary (the unit tests in `config.rs` cover the merge itself).

use std::process::Command;

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-coordinator"));
    command.args(args).arg("--print-config");
    for name in [
        "KILN_LISTEN",
        "KILN_HEARTBEAT_TTL",
        "KILN_COORDINATOR_CONFIG",
        "RUST_LOG",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().expect("run kiln-coordinator");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1001\"\nheartbeat_ttl = 11\nlog = \"warn\"\ndata_dir = \"/srv/k\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let printed = print_config(
        &["--config", file, "--listen", "127.0.0.1:3003"],
        &[
            ("KILN_LISTEN", "127.0.0.1:2002"),
            ("KILN_HEARTBEAT_TTL", "22"),
        ],
    );
    for line in [
        "listen = \"127.0.0.1:3003\"", // flag over environment and file
        "heartbeat_ttl = 22",          // environment over file
        "log = \"warn\"",              // file over default
        "max_blob_bytes = 8589934592", // default
        "data_dir = \"/srv/k\"",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line} not in:\n{printed}"
        );
    }
    assert!(printed.starts_with(&format!("# config file: {file}\n")));

    // The config file can also be named by its environment variable.
    let printed = print_config(&[], &[("KILN_COORDINATOR_CONFIG", file)]);
    assert!(printed.contains("listen = \"127.0.0.1:1001\""), "{printed}");
}
