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
/// existing one gives to other users (not to its group, which an operator may have chosen),
/// except `others_keep` (0, or 0o001 where other users must pass through it: the run users
/// of a root agent, see `kiln_agent::sandbox`). Returns a warning to log when it had to.
pub fn private_dir(dir: &Path, others_keep: u32) -> io::Result<Option<String>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    let taken = mode & 0o007 & !others_keep;
    if taken == 0 {
        return Ok(None);
    }
    let now = mode & 0o7777 & !taken;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(now))?;
    Ok(Some(format!(
        "`{}` was open to other users (mode {:o}); took their permissions away (now {:o})",
        dir.display(),
        mode & 0o7777,
        now
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_creates_0700_and_closes_an_open_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let new = tmp.path().join("a/b");
        assert_eq!(private_dir(&new, 0).expect("create"), None);
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&new), 0o700);

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let warning = private_dir(&open, 0).expect("tighten").expect("a warning");
        assert!(
            warning.contains("755") && warning.contains("750"),
            "{warning}"
        );
        assert_eq!(mode(&open), 0o750);
        assert_eq!(private_dir(&open, 0).expect("again"), None);

        // A directory others must pass through keeps only that: no warning at each start.
        let passable = tmp.path().join("passable");
        std::fs::create_dir(&passable).expect("mkdir");
        std::fs::set_permissions(&passable, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let warning = private_dir(&passable, 0o001)
            .expect("tighten")
            .expect("a warning");
        assert!(warning.contains("751"), "{warning}");
        assert_eq!(mode(&passable), 0o751);
        assert_eq!(private_dir(&passable, 0o001).expect("again"), None);
    }
}

/// The most bytes [`read_token_file`] reads: a token is about 50.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A token (join or API: `what`) from `--token-file PATH`, or from standard input for `-`, so
/// that it appears neither in the process list nor in the shell's history: the first line,
/// trimmed. On a terminal, standard input is asked for it and read up to Enter.
pub fn read_token_file(path: &Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
    let mut text = String::new();
    if path == Path::new("-") {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprint!("Paste the {what} and press Enter: ");
            let _ = std::io::stderr().flush();
        }
        stdin
            .lock()
            .take(MAX_TOKEN_FILE_BYTES)
            .read_line(&mut text)
            .context("read the token from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_TOKEN_FILE_BYTES).read_to_string(&mut text))
            .with_context(|| format!("read the token from {}", path.display()))?;
    }
    let token = text.lines().next().unwrap_or_default().trim();
    anyhow::ensure!(
        !token.is_empty(),
        "{} holds no token: expected ID.SECRET on its first line",
        if path == Path::new("-") {
            "standard input".to_string()
        } else {
            format!("`{}`", path.display())
        }
    );
    Ok(token.to_string())
}

#[cfg(test)]
mod token_file_tests {
    use super::*;

    #[test]
    fn a_token_file_gives_its_first_line_trimmed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("token");
        std::fs::write(&path, "  0123.abcd  \nignored\n").expect("write");
        assert_eq!(read_token_file(&path, "token").expect("read"), "0123.abcd");
        std::fs::write(&path, "\n").expect("write");
        let error = read_token_file(&path, "token")
            .expect_err("empty")
            .to_string();
        assert!(error.contains("holds no token"), "{error}");
        let error = format!(
            "{:#}",
            read_token_file(&tmp.path().join("missing"), "token").expect_err("missing")
        );
        assert!(error.contains("read the token from"), "{error}");
    }
}
