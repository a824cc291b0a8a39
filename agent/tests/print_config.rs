//! `kiln-agent --print-config` as a user runs it: flag > environment > file > default,
//! across the real binary (the unit tests in `config.rs` cover the merge itself).

use std::process::Command;

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "target = \"file-target\"\nslots = 3\npython = \"/opt/py/bin/python\"\ndata_dir = \"/srv/a\"\n",
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    command
        .arg("--config")
        .arg(&file)
        .args(["--target", "flag-target", "--print-config"]);
    for name in [
        "KILN_TARGET",
        "KILN_SLOTS",
        "KILN_PYTHON",
        "KILN_COORDINATOR",
        "RUST_LOG",
    ] {
        command.env_remove(name);
    }
    command
        .env("KILN_TARGET", "env-target")
        .env("KILN_SLOTS", "5");
    let output = command.output().expect("run kiln-agent");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    for line in [
        "target = \"flag-target\"",        // flag over environment and file
        "slots = 5",                       // environment over file
        "python = \"/opt/py/bin/python\"", // file over default
        "coordinator = \"https://127.0.0.1:7070\"", // default
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line} not in:\n{printed}"
        );
    }
}
