//! A user of its own for every run (process environments: user, venv, conda).
//!
//! An agent running as root gives each attempt a uid from a range no one else uses
//! (`run_users`, default [`DEFAULT_RANGE`]), with the same number as its gid and no
//! supplementary groups. The attempt's `work/` (snapshot, `outputs/`), checkpoint directory,
//! `home/` and metrics socket belong to that uid with mode 0700; its `state/` (spec.json
//! with the run's environment, the spool) and the agent's identity stay root's, 0700. So a
//! script cannot read the agent's key, another run's files or another run's
//! `/proc/PID/environ`, and cannot write into another run's outputs.
//!
//! Nothing of a run outlives it: after the script ends, every process of its uid is killed
//! (`kill(-1)` from a process that took the uid: a double-forked `setsid` daemon included),
//! and a uid is killed clean again before it is given to the next attempt.
//!
//! Claims are files `/run/kiln/run-users/<uid>` naming the attempt's directory, shared by
//! every agent on the host (uids are the host's); a claim whose directory is gone is free
//! again, and claimers take turns on an `flock`.
//!
//! An agent that is not root cannot switch users: its runs run as the agent's own user, and
//! it says so at start (SECURITY.md).

use std::io::Write as _;
use std::ops::RangeInclusive;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The uids runs get when `run_users` is not set: far above any login user's, below 2^31
/// (some tools read uids as signed), and outside the subordinate ranges (`/etc/subuid`)
/// that user namespaces hand out from 100000 upwards.
pub const DEFAULT_RANGE: RangeInclusive<u32> = 1_900_000_000..=1_900_000_999;

/// The user one attempt runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunUser {
    pub uid: u32,
    pub gid: u32,
}

impl RunUser {
    /// `uid:gid`, as [`crate::docker::hand_over`] takes it.
    pub fn owner(&self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// Parses `run_users`: `FIRST-LAST` (inclusive) or `off`.
pub fn parse_range(text: &str) -> anyhow::Result<Option<RangeInclusive<u32>>> {
    if text.trim() == "off" {
        return Ok(None);
    }
    let (first, last) = text
        .split_once('-')
        .context("use FIRST-LAST (e.g. 1900000000-1900000999) or off")?;
    let first: u32 = first
        .trim()
        .parse()
        .context("the first uid is not a number")?;
    let last: u32 = last
        .trim()
        .parse()
        .context("the last uid is not a number")?;
    anyhow::ensure!(
        first >= 1000 && first <= last && last < i32::MAX as u32,
        "the range must lie within 1000..2147483646 and go upwards"
    );
    Ok(Some(first..=last))
}

/// Whether this agent can give runs users of their own.
pub fn available() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether runs of an agent with `config` get users of their own: a range is set, the agent
/// is root, and the user namespace maps the range (see [`range_mapped`]).
pub fn enabled(config: &crate::Config) -> bool {
    config
        .run_users
        .as_ref()
        .is_some_and(|range| available() && range_mapped(range))
}

/// Whether every uid of `range` exists in this process's user namespace
/// (`/proc/self/uid_map`): in a container with a short map (rootless, userns-remap, LXC) a
/// chown to an unmapped uid fails, so runs could not start. Without the file (no user
/// namespaces), every uid exists.
pub fn range_mapped(range: &RangeInclusive<u32>) -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map_covers(&map, range),
        Err(_) => true,
    }
}

fn map_covers(map: &str, range: &RangeInclusive<u32>) -> bool {
    map.lines().any(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        let [inside, _outside, count] = fields[..] else {
            return false;
        };
        inside <= u64::from(*range.start()) && u64::from(*range.end()) < inside + count
    })
}

/// Where the claims of every agent on this host live: uids are a host-wide resource, and
/// two agents (or a test's many) must never hand one uid to two runs. Root's, 0700, and
/// cleared by a reboot, which also ends every run. `KILN_RUN_USER_CLAIMS` overrides it.
pub const CLAIMS_DIR: &str = "/run/kiln/run-users";

fn claims_dir() -> PathBuf {
    std::env::var_os("KILN_RUN_USER_CLAIMS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CLAIMS_DIR))
}

/// Claims a free uid of `range` for the attempt whose directory is `run_dir` (which must
/// exist), and kills whatever still runs under it (with `program`, see [`kill_all`]).
/// A claim is a file `<uid>` in [`CLAIMS_DIR`] naming the attempt's directory; it is free
/// again once that directory is gone. Claimers on this host take turns (`flock`).
pub fn claim(
    range: &RangeInclusive<u32>,
    run_dir: &Path,
    program: &Path,
) -> anyhow::Result<RunUser> {
    claim_in(&claims_dir(), range, run_dir, program)
}

fn claim_in(
    dir: &Path,
    range: &RangeInclusive<u32>,
    run_dir: &Path,
    program: &Path,
) -> anyhow::Result<RunUser> {
    kiln_common::private::private_dir(dir, 0)
        .with_context(|| format!("create {}", dir.display()))?;
    let run_dir =
        std::fs::canonicalize(run_dir).with_context(|| format!("resolve {}", run_dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("lock {}", lock_path.display()))?;
    for uid in range.clone() {
        let path = dir.join(uid.to_string());
        let free = match std::fs::read_to_string(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => true,
            Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
            Ok(holder) => {
                let holder = holder.trim_end_matches('\n');
                holder.is_empty() || !Path::new(holder).exists()
            }
        };
        if !free {
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("write {}", path.display()))?;
        writeln!(file, "{}", run_dir.display())
            .with_context(|| format!("write {}", path.display()))?;
        kill_all(program, uid);
        return Ok(RunUser { uid, gid: uid });
    }
    anyhow::bail!(
        "every run user in {}-{} is taken (run_users): widen the range or lower slots",
        range.start(),
        range.end()
    )
}

/// Gives the claim of `user` up, if `run_dir` still holds it (its directory is being
/// removed).
pub fn release(user: RunUser, run_dir: &Path) {
    release_in(&claims_dir(), user, run_dir)
}

fn release_in(dir: &Path, user: RunUser, run_dir: &Path) {
    let path = dir.join(user.uid.to_string());
    let Ok(holder) = std::fs::read_to_string(&path) else {
        return;
    };
    let ours = std::fs::canonicalize(run_dir)
        .map(|run_dir| run_dir.display().to_string() == holder.trim_end_matches('\n'))
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// The hidden subcommand of the agent's binary that [`kill_all`] runs as the run's user.
pub const KILL_SUBCOMMAND: &str = "__kill_own_user";

/// Kills every process running as `uid`: `program` (the agent's own binary, see
/// [`kill_own_user`]) runs as that uid and signals all it may — exactly that uid's
/// processes. Never used with the agent's own uid.
pub fn kill_all(program: &Path, uid: u32) {
    use std::os::unix::process::CommandExt as _;
    if uid == 0 || uid == nix::unistd::getuid().as_raw() {
        return;
    }
    let status = std::process::Command::new(program)
        .arg(KILL_SUBCOMMAND)
        .uid(uid)
        .gid(uid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if let Err(error) = status {
        tracing::warn!(uid, error = %error, "Could not stop the processes of a run's user.");
    }
}

/// The body of [`KILL_SUBCOMMAND`]: `kill(-1, SIGKILL)` (every process this uid may signal,
/// but not the caller) until there is none; a process forking meanwhile is caught by the
/// next pass, its children having the same uid. Never returns.
pub fn kill_own_user() -> ! {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let code = if nix::unistd::getuid().is_root() {
        2
    } else {
        for _ in 0..1000 {
            if kill(Pid::from_raw(-1), Signal::SIGKILL).is_err() {
                break;
            }
        }
        0
    };
    std::process::exit(code)
}

pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("set the mode of {} to {mode:o}", path.display()))
}

/// Lets every user read (and, where the owner may, execute) the tree at `root`, without
/// following symlinks: what runs share, such as a built environment.
pub fn open_for_reading(root: &Path) -> anyhow::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("inspect {}", path.display()))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() || mode & 0o100 != 0 {
            mode | 0o055
        } else {
            mode | 0o044
        };
        if wanted != mode {
            set_mode(&path, wanted)?;
        }
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(&path).with_context(|| format!("read {}", path.display()))?
            {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Makes the agent's data directory reachable (search, not read) by run users, which
/// need to get to their own `runs/<run>.<attempt>/work`, the metrics socket directory and
/// the `kiln` Python module; and checks that every directory above it lets them through.
pub fn open_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    for (dir, mode) in [
        (data_dir.to_path_buf(), 0o711),
        (data_dir.join("runs"), 0o711),
        (data_dir.join("sock"), 0o711),
        (data_dir.join("python"), 0o755),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        set_mode(&dir, mode)?;
    }
    let mut above = data_dir.parent();
    while let Some(dir) = above {
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("inspect {}", dir.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o001 != 0,
            "runs get users of their own, who cannot pass through {} (mode {:o}) to reach \
             the data directory {}: chmod o+x it, move the data directory, or set run_users = \
             \"off\"",
            dir.display(),
            mode & 0o7777,
            data_dir.display()
        );
        above = dir.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_usable_only_where_the_user_namespace_maps_it() {
        let range = DEFAULT_RANGE;
        assert!(map_covers("         0          0 4294967295\n", &range));
        // A typical rootless or userns-remap container: 65536 uids.
        assert!(!map_covers("         0     100000      65536\n", &range));
        assert!(map_covers(
            "0 100000 65536\n65536 200000 65536\n",
            &(60000..=60010)
        ));
        assert!(!map_covers("0 100000 65536\n", &(65530..=65540)));
        assert!(!map_covers("", &range));
    }

    #[test]
    fn ranges_parse_or_say_what_is_wrong() {
        assert_eq!(parse_range("off").unwrap(), None);
        assert_eq!(
            parse_range("1900000000-1900000999").unwrap(),
            Some(DEFAULT_RANGE)
        );
        for bad in ["", "5", "2000-1000", "0-10", "1000-x", "1000-4294967295"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_claim_is_free_again_once_its_run_directory_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("claims");
        let runs = dir.path().join("runs");
        let run = |key: &str| {
            let path = runs.join(key);
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let range = 1_900_000_000..=1_900_000_001;
        let prog = PathBuf::from("/bin/true");
        let first = claim_in(&claims, &range, &run("1.1"), &prog).unwrap();
        // Another agent's run (another data directory) on this host.
        let second = claim_in(&claims, &range, &run("other/2.1"), &prog).unwrap();
        assert_ne!(first.uid, second.uid);
        assert_eq!(first.uid, first.gid);
        let error = claim_in(&claims, &range, &run("3.1"), &prog)
            .unwrap_err()
            .to_string();
        assert!(error.contains("every run user"), "{error}");
        std::fs::remove_dir_all(runs.join("1.1")).unwrap();
        assert_eq!(
            claim_in(&claims, &range, &run("3.1"), &prog).unwrap(),
            first
        );
        // Only the holder gives a claim up.
        release_in(&claims, second, &runs.join("3.1"));
        assert!(claim_in(&claims, &range, &run("4.1"), &prog).is_err());
        release_in(&claims, second, &runs.join("other/2.1"));
        assert_eq!(
            claim_in(&claims, &range, &run("4.1"), &prog).unwrap(),
            second
        );
    }
}
