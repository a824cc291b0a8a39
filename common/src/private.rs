//! What the daemons create is private to their user, whatever umask they were started with.
//!
//! The coordinator's database, blobs and CA key, the agent's identity, run state (`spec.json`
//! holds a run's environment variables, secrets included) and spools are nobody else's
//! business. Both daemons call [`restrict_umask`] first thing in `main`, so every file they
//! (and the processes they start) create is 0600 and every directory 0700 unless it is given
//! a mode explicitly, and [`private_dir`] on their data directory.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::Mode;

/// The umask of both daemons: no group or other permissions on anything they create.
pub const UMASK: Mode = Mode::S_IRWXG.union(Mode::S_IRWXO);

/// Sets the process's umask to [`UMASK`].
pub fn restrict_umask() {
    nix::sys::stat::umask(UMASK);
}

/// Creates `dir` (and its missing parents) with mode 0700, or takes away the permissions an
/// existing one gives to other users (not to its group, which an operator may have chosen).
/// Returns a warning to log when it had to.
pub fn private_dir(dir: &Path) -> io::Result<Option<String>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o007 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7770))?;
    Ok(Some(format!(
        "`{}` was open to other users (mode {:o}); took their permissions away (now {:o})",
        dir.display(),
        mode & 0o7777,
        mode & 0o7770
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_creates_0700_and_closes_an_open_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let new = tmp.path().join("a/b");
        assert_eq!(private_dir(&new).expect("create"), None);
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&new), 0o700);

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let warning = private_dir(&open).expect("tighten").expect("a warning");
        assert!(
            warning.contains("755") && warning.contains("750"),
            "{warning}"
        );
        assert_eq!(mode(&open), 0o750);
        assert_eq!(private_dir(&open).expect("again"), None);
    }
}
