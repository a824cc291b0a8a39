//! One daemon per data directory. Two agents (or two coordinators) sharing a directory
//! would each take the other's sessions, runs and files; instead the second one is refused
//! with a message that names the directory and the process holding it.
//!
//! The lock is an exclusive `flock` on `DIR/.lock`, held for the life of the process: the
//! kernel drops it when the process exits, however it exits, so a crash never leaves a
//! stale lock behind. The file holds the holder's pid, for the message only. The file is
//! opened close-on-exec, so processes the daemon starts (run supervisors) do not inherit it
//! and a restarted daemon is never locked out by its own runs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = ".lock";

/// Holds a data directory for as long as it lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes `dir` (creating it) for this process, or says who has it. `daemon` names
    /// what holds it, e.g. `kiln-agent`, for the message.
    pub fn acquire(dir: &Path, daemon: &str) -> anyhow::Result<DirLock> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("create data directory {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = match written_pid(&mut file) {
                    Some(pid) => format!("pid {pid}"),
                    None => NO_PID_YET.to_string(),
                };
                anyhow::bail!(
                    "data directory {} is in use by another {daemon} ({holder}); stop it \
                     first, or give this one a data directory of its own (--data-dir)",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                anyhow::bail!("lock {}: {e}", path.display());
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid of the live process holding `dir`, or `None` when nobody holds it (no lock file,
/// or a lock left by a process that has exited). For `kiln-agent drain`, which signals it.
pub fn holder(dir: &Path) -> anyhow::Result<Option<u32>> {
    let path = dir.join(LOCK_FILE);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("open the lock file {}: {e}", path.display()),
    };
    match file.try_lock_shared() {
        // Nobody holds it exclusively: no daemon runs on this directory.
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => match written_pid(&mut file) {
            Some(pid) => Ok(Some(pid)),
            None => anyhow::bail!("{} is held by {NO_PID_YET}", path.display()),
        },
        Err(TryLockError::Error(e)) => anyhow::bail!("lock {}: {e}", path.display()),
    }
}

/// How a holder that has locked the file but not written its pid yet is named.
const NO_PID_YET: &str = "a process that has not written its pid yet";

/// The pid a holder wrote into the lock file, if it has.
fn written_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_a_released_lock_can_be_taken() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data, "kiln-agent").unwrap();
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        // A second open file description conflicts even within one process.
        let error = DirLock::acquire(&data, "kiln-agent")
            .unwrap_err()
            .to_string();
        assert!(error.contains(&data.display().to_string()), "{error}");
        assert!(
            error.contains(&format!("kiln-agent (pid {})", std::process::id())),
            "{error}"
        );
        drop(first);
        DirLock::acquire(&data, "kiln-agent").unwrap();
    }

    #[test]
    fn holder_names_the_live_holder_and_nobody_once_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(holder(&data).unwrap(), None);
        let lock = DirLock::acquire(&data, "kiln-agent").unwrap();
        assert_eq!(holder(&data).unwrap(), Some(std::process::id()));
        drop(lock);
        // The file stays, with the old pid in it; the lock does not.
        assert!(data.join(LOCK_FILE).exists());
        assert_eq!(holder(&data).unwrap(), None);
    }
}
