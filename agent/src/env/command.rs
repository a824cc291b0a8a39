//! Running the programs that build environments (python -m venv, pip, uv, an external
//! conda): their output goes line by line into the run's log as it comes, and a failure
//! carries the last lines of it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::EnvError;

/// How many of a failed command's last output lines its error carries.
pub const TAIL_LINES: usize = 20;

/// Runs `command` to completion, passing each line of its output (stdout and stderr, in the
/// order written) to `log` as it is printed. `what` names the step in errors ("pip install -r requirements.txt"). The process
/// is killed if the returned future is dropped (the run was cancelled).
pub async fn run(
    mut command: tokio::process::Command,
    what: &str,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    // One pipe for both streams: lines arrive in the order the program wrote them.
    let (reader, writer) =
        std::io::pipe().map_err(|e| EnvError(format!("could not start {what}: {e}")))?;
    let writer_too = writer
        .try_clone()
        .map_err(|e| EnvError(format!("could not start {what}: {e}")))?;
    command
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_too)
        .kill_on_drop(true);
    // If the agent itself dies (SIGKILL, OOM), the build must not go on writing into an
    // environment that the restarted agent builds again.
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe, between fork and
    // exec; it allocates nothing and touches no lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| EnvError(format!("could not start {what}: {e}")))?;
    // The command holds the pipe's write ends: drop them, or the output never ends.
    drop(command);
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| EnvError(format!("could not read the output of {what}: {e}")))?;
    let mut lines = BufReader::new(reader).lines();
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    while let Ok(Some(line)) = lines.next_line().await {
        log(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| EnvError(format!("could not wait for {what}: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let lines: Vec<String> = tail.into_iter().collect();
    Err(EnvError(format!(
        "{what} failed ({status}); its last lines of output:\n{}",
        lines.join("\n")
    )))
}

/// Finds a program as a shell would: a name with a `/` is a path, any other is looked up in
/// `PATH`. Returns the path found (not resolved through links).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| executable(candidate))
}

/// `PATH` with `dir` first.
pub fn path_with(dir: &Path) -> String {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| dir.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_logged_line_by_line_and_a_failure_carries_the_tail() {
        let mut lines = Vec::new();
        let mut command = tokio::process::Command::new("sh");
        command.args([
            "-c",
            "for i in $(seq 1 30); do echo out $i; done; echo oops >&2; exit 3",
        ]);
        let error = run(command, "the step", &mut |line: &str| {
            lines.push(line.to_string())
        })
        .await
        .unwrap_err();
        assert_eq!(lines.len(), 31);
        assert!(lines.contains(&"oops".to_string()));
        let message = error.0;
        assert!(
            message.starts_with("the step failed (exit status: 3)"),
            "{message}"
        );
        assert!(message.contains("oops"), "{message}");
        assert!(
            !message.lines().any(|l| l == "out 5"),
            "only the tail: {message}"
        );
        assert_eq!(message.lines().count(), 1 + TAIL_LINES, "{message}");
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let command = tokio::process::Command::new("/nonexistent/kiln-test-tool");
        let error = run(command, "the tool", &mut |_: &str| {})
            .await
            .unwrap_err();
        assert!(error.0.starts_with("could not start the tool"), "{error}");
    }
}
