//! The environment cache: environments the agent built, under `DATA_DIR/envs/`, named by a
//! hash of everything they were built from ([`Key`]), built once and reused by every run
//! that asks for the same thing.
//!
//! Layout, per entry `NAME` (`venv-<hex>`, `conda-<hex>`):
//! - `NAME/` — the environment itself (a venv or a conda prefix);
//! - `NAME.json` — [`EntryInfo`], written (atomically) only after the build succeeded: an
//!   entry exists when this file does. Its mtime is the entry's last use;
//! - `NAME.lock` — the lock file builders and evictors `flock`.
//!
//! Environments are built **in place**, not in a temporary directory renamed at the end:
//! venvs and conda prefixes record their own absolute path (script shebangs, `pyvenv.cfg`,
//! conda's prefix replacement), so a renamed environment would be broken. What makes an
//! entry appear atomically is the rename of `NAME.json`; a failed, cancelled or crashed build
//! leaves no `NAME.json`, and its directory is removed (at once, or by the next builder).
//!
//! Promises:
//! - One build per key at a time, across tasks (an async mutex per key) and across agent
//!   processes sharing the data directory (`flock` on `NAME.lock`); the others wait for it and
//!   reuse the result.
//! - A hit reads only the spec (hashed by the caller) and two small files: no walk of the
//!   environment.
//! - Eviction removes least-recently-used entries while the cache is over its size limit, but
//!   never one a run directory names as in use (`runs/<run>.<attempt>/env`, written before
//!   the lookup and gone with the run directory).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::EnvError;

/// Bump when the way environments are built changes, so old entries are not reused.
const FORMAT_VERSION: &str = "kiln-env-1";
/// The file in a run directory that names the environment the run uses.
pub const IN_USE_FILE: &str = "env";

/// What identifies an environment: a hash of the kind and every input of its build.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    name: String,
}

impl Key {
    /// Starts a key for an environment of `kind` (`venv`, `conda`).
    pub fn builder(kind: &str) -> KeyBuilder {
        let mut builder = KeyBuilder {
            kind: kind.to_string(),
            hasher: Sha256::new(),
        };
        builder.part("format", FORMAT_VERSION.as_bytes());
        builder.part("kind", kind.as_bytes());
        builder
    }

    /// `KIND-<32 hex digits>`: the entry's directory name (128 bits of the hash, which keeps
    /// paths short enough for shebang lines).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

pub struct KeyBuilder {
    kind: String,
    hasher: Sha256,
}

impl KeyBuilder {
    /// Adds one labelled input. Labels and values are length-prefixed, so no two different
    /// sequences of parts hash alike.
    pub fn part(&mut self, label: &str, value: &[u8]) -> &mut KeyBuilder {
        for bytes in [label.as_bytes(), value] {
            self.hasher.update((bytes.len() as u64).to_le_bytes());
            self.hasher.update(bytes);
        }
        self
    }

    pub fn finish(self) -> Key {
        let digest = hex::encode(self.hasher.finalize());
        Key {
            name: format!("{}-{}", self.kind, &digest[..32]),
        }
    }
}

/// `NAME.json`: written when an entry's build succeeded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryInfo {
    pub name: String,
    /// Bytes on disk (allocated blocks; hard links counted once).
    pub size_bytes: u64,
    pub built_unix_ms: u64,
    /// What it was built from, for people reading the cache (e.g. `requirements.txt`).
    pub source: String,
}

/// The result of [`Cache::get_or_build`].
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The environment's directory.
    pub prefix: PathBuf,
    /// Found in the cache (possibly after waiting for another run's build of it).
    pub reused: bool,
    /// Entries evicted after this build to get the cache under its limit.
    pub evicted: Vec<String>,
}

/// The cache of one data directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    runs: PathBuf,
    max_bytes: u64,
}

impl Cache {
    /// The cache under `data_dir/envs`, whose in-use markers are in `data_dir/runs/*/env`.
    pub fn new(data_dir: &Path, max_bytes: u64) -> Cache {
        Cache {
            root: data_dir.join("envs"),
            runs: data_dir.join("runs"),
            max_bytes,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The environment of `key`, built with `build` (given the directory to create) unless
    /// it is in the cache. `run_dir` is the directory of the run that will use it: it is
    /// marked in use there (before the lookup) so that no eviction removes it while the run
    /// lives. `source` is recorded in the entry's info.
    pub async fn get_or_build<F, Fut>(
        &self,
        key: &Key,
        run_dir: &Path,
        source: &str,
        cancel: &CancellationToken,
        build: F,
    ) -> Result<Entry, EnvError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), EnvError>>,
    {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| io_error(&format!("create {}", self.root.display()), e))?;
        // Runs of a root agent have users of their own (`sandbox`): they pass through to
        // the environment they were given, without listing the others.
        crate::sandbox::set_mode(&self.root, 0o711).map_err(|e| EnvError(format!("{e:#}")))?;
        std::fs::create_dir_all(run_dir)
            .map_err(|e| io_error(&format!("create {}", run_dir.display()), e))?;
        std::fs::write(run_dir.join(IN_USE_FILE), key.name())
            .map_err(|e| io_error("mark the environment in use", e))?;

        let prefix = self.root.join(key.name());
        let info_path = self.info_path(key.name());
        let guard = tokio::select! {
            _ = cancel.cancelled() => {
                return Err(EnvError("cancelled while waiting for the environment".into()));
            }
            guard = self.lock(key.name()) => guard?,
        };
        if info_path.is_file() && prefix.is_dir() {
            touch(&info_path);
            drop(guard);
            return Ok(Entry {
                prefix,
                reused: true,
                evicted: Vec::new(),
            });
        }
        // A build that crashed (or an entry half-removed) leaves a directory without info.
        remove_entry(&self.root, key.name())?;
        let mut cleanup = RemoveOnDrop(Some(prefix.clone()));
        tokio::select! {
            _ = cancel.cancelled() => {
                return Err(EnvError("cancelled while the environment was being built".into()));
            }
            built = build(prefix.clone()) => built?,
        }
        if !prefix.is_dir() {
            return Err(EnvError("the environment's build created nothing".into()));
        }
        // Built under the agent's umask (0o077): open it to the runs' users for reading and
        // executing, as a system interpreter is. It holds nothing private.
        let opened = prefix.clone();
        tokio::task::spawn_blocking(move || crate::sandbox::open_for_reading(&opened))
            .await
            .map_err(|e| EnvError(format!("open the environment to runs: {e}")))?
            .map_err(|e| EnvError(format!("open the environment to runs: {e:#}")))?;
        let measured = prefix.clone();
        let size_bytes = tokio::task::spawn_blocking(move || disk_usage(&measured))
            .await
            .map_err(|e| EnvError(format!("measure the environment: {e}")))?;
        let info = EntryInfo {
            name: key.name().to_string(),
            size_bytes,
            built_unix_ms: unix_ms(SystemTime::now()),
            source: source.to_string(),
        };
        write_info(&info_path, &info)?;
        cleanup.0 = None;
        drop(guard);

        let cache = self.clone();
        let evicted = tokio::task::spawn_blocking(move || cache.evict())
            .await
            .map_err(|e| EnvError(format!("evict environments: {e}")))?;
        Ok(Entry {
            prefix,
            reused: false,
            evicted,
        })
    }

    /// Removes least-recently-used entries not in use until the cache's entries add up to
    /// at most its limit. Entries being built or looked up (locked) are skipped. Returns the
    /// names removed, oldest first.
    pub fn evict(&self) -> Vec<String> {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1.size_bytes).sum();
        entries.sort_by_key(|e| e.0);
        let mut evicted = Vec::new();
        for (_, info) in entries {
            if total <= self.max_bytes {
                break;
            }
            if self.in_use().contains(&info.name) {
                continue;
            }
            let Some(_guard) = self.try_lock(&info.name) else {
                continue;
            };
            // A run may have marked it between the check above and the lock.
            if self.in_use().contains(&info.name) || !self.info_path(&info.name).is_file() {
                continue;
            }
            match remove_entry(&self.root, &info.name) {
                Ok(()) => {
                    total = total.saturating_sub(info.size_bytes);
                    tracing::info!(env = %info.name, size_bytes = info.size_bytes, "Environment evicted.");
                    evicted.push(info.name);
                }
                Err(error) => {
                    tracing::warn!(env = %info.name, error = %error, "Could not evict an environment.");
                }
            }
        }
        evicted
    }

    /// Every complete entry with its last use, in no particular order.
    pub fn entries(&self) -> Vec<(SystemTime, EntryInfo)> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(".json") && !name.starts_with('.')
            })
            .filter_map(|e| {
                let used = e.metadata().ok()?.modified().ok()?;
                let info: EntryInfo =
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((used, info))
            })
            .collect()
    }

    /// Names of the entries some run directory marks as in use.
    fn in_use(&self) -> HashSet<String> {
        let Ok(runs) = std::fs::read_dir(&self.runs) else {
            return HashSet::new();
        };
        runs.filter_map(Result::ok)
            .filter_map(|run| std::fs::read_to_string(run.path().join(IN_USE_FILE)).ok())
            .map(|name| name.trim().to_string())
            .collect()
    }

    fn info_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.lock"))
    }

    /// Waits for the key's lock: first this process's, then the file lock other processes
    /// take too.
    async fn lock(&self, name: &str) -> Result<KeyGuard, EnvError> {
        let path = self.lock_path(name);
        let local = local_lock(&path).lock_owned().await;
        let file = open_lock_file(&path)?;
        let flock = tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno)
        })
        .await
        .map_err(|e| EnvError(format!("lock the environment: {e}")))?
        .map_err(|errno| EnvError(format!("lock {}: {errno}", path.display())))?;
        Ok(KeyGuard {
            _flock: flock,
            _local: local,
        })
    }

    /// The key's lock if nobody holds it.
    fn try_lock(&self, name: &str) -> Option<KeyGuard> {
        let path = self.lock_path(name);
        let local = local_lock(&path).try_lock_owned().ok()?;
        let file = open_lock_file(&path).ok()?;
        let flock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        Some(KeyGuard {
            _flock: flock,
            _local: local,
        })
    }
}

/// Held while an entry is looked up, built or removed. Field order: the file lock is released
/// before the in-process one, so a waiting task of this process does not find it still held.
struct KeyGuard {
    _flock: Flock<File>,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// This process's lock for one lock file.
fn local_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Mutex::default);
    let mut locks = LOCKS.lock().expect("the lock table is never poisoned");
    if let Some(lock) = locks.get(path).and_then(Weak::upgrade) {
        return lock;
    }
    locks.retain(|_, lock| lock.strong_count() > 0);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(path.to_path_buf(), Arc::downgrade(&lock));
    lock
}

fn open_lock_file(path: &Path) -> Result<File, EnvError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error(&format!("open {}", path.display()), e))
}

/// Removes a directory when dropped unless disarmed: a failed or cancelled build leaves
/// nothing behind.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && path.exists()
            && let Err(error) = std::fs::remove_dir_all(&path)
        {
            tracing::warn!(path = %path.display(), error = %error, "Could not remove a failed environment build.");
        }
    }
}

/// Removes an entry: its info first (so it stops existing), then its directory.
fn remove_entry(root: &Path, name: &str) -> Result<(), EnvError> {
    let info = root.join(format!("{name}.json"));
    match std::fs::remove_file(&info) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&format!("remove {}", info.display()), e)),
    }
    let dir = root.join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(&format!("remove {}", dir.display()), e)),
    }
}

fn write_info(path: &Path, info: &EntryInfo) -> Result<(), EnvError> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .expect("an info path has a file name")
            .to_string_lossy()
    ));
    let json = serde_json::to_vec_pretty(info).expect("EntryInfo serializes");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| io_error(&format!("write {}", path.display()), e))
}

/// Records a use: the info file's mtime is the entry's last use.
fn touch(path: &Path) {
    let now = SystemTime::now();
    if let Err(error) = File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(now))
    {
        tracing::warn!(path = %path.display(), error = %error, "Could not record an environment's use.");
    }
}

/// Bytes allocated under `dir`, each inode once (conda links files from its package cache).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(children) = std::fs::read_dir(&path)
        {
            stack.extend(children.filter_map(Result::ok).map(|c| c.path()));
        }
    }
    total
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io_error(what: &str, error: std::io::Error) -> EnvError {
    EnvError(format!("could not {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn key(kind: &str, parts: &[(&str, &str)]) -> Key {
        let mut builder = Key::builder(kind);
        for (label, value) in parts {
            builder.part(label, value.as_bytes());
        }
        builder.finish()
    }

    /// A build that writes `size` bytes into the environment and counts its calls.
    fn build_of(
        size: usize,
        calls: &AtomicUsize,
    ) -> impl FnOnce(PathBuf) -> std::future::Ready<Result<(), EnvError>> + '_ {
        move |prefix: PathBuf| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::fs::create_dir_all(&prefix).unwrap();
            std::fs::write(prefix.join("payload"), vec![1u8; size]).unwrap();
            std::future::ready(Ok(()))
        }
    }

    #[test]
    fn keys_depend_on_every_part_and_nothing_else() {
        let base = key("venv", &[("spec", "numpy==2"), ("python", "3.11")]);
        assert_eq!(
            base,
            key("venv", &[("spec", "numpy==2"), ("python", "3.11")]),
            "same inputs, same key"
        );
        assert!(base.name().starts_with("venv-"), "{base}");
        assert_eq!(base.name().len(), "venv-".len() + 32);
        for other in [
            key("conda", &[("spec", "numpy==2"), ("python", "3.11")]),
            key("venv", &[("spec", "numpy==1"), ("python", "3.11")]),
            key("venv", &[("spec", "numpy==2"), ("python", "3.12")]),
            key("venv", &[("spec", "numpy==2python"), ("", "3.11")]),
        ] {
            assert_ne!(base, other);
        }
    }

    #[tokio::test]
    async fn a_second_lookup_reuses_the_entry_and_marks_it_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path(), u64::MAX);
        let key = key("venv", &[("spec", "a")]);
        let calls = AtomicUsize::new(0);
        let run1 = dir.path().join("runs/1.1");
        let first = cache
            .get_or_build(
                &key,
                &run1,
                "r.txt",
                &CancellationToken::new(),
                build_of(10, &calls),
            )
            .await
            .unwrap();
        assert!(!first.reused);
        assert_eq!(first.prefix, dir.path().join("envs").join(key.name()));
        assert!(first.prefix.join("payload").is_file());
        let run2 = dir.path().join("runs/2.1");
        let second = cache
            .get_or_build(
                &key,
                &run2,
                "r.txt",
                &CancellationToken::new(),
                build_of(10, &calls),
            )
            .await
            .unwrap();
        assert!(second.reused);
        assert_eq!(second.prefix, first.prefix);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            std::fs::read_to_string(run2.join(IN_USE_FILE)).unwrap(),
            key.name()
        );
        let entries = cache.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1.source, "r.txt");
        assert!(entries[0].1.size_bytes > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_of_one_key_build_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path(), u64::MAX);
        let key = key("venv", &[("spec", "slow")]);
        let calls = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for run in 0..2 {
            let (cache, key, calls, started) =
                (cache.clone(), key.clone(), calls.clone(), started.clone());
            let run_dir = dir.path().join(format!("runs/{run}.1"));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_build(
                        &key,
                        &run_dir,
                        "r.txt",
                        &CancellationToken::new(),
                        |prefix| async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            started.notify_one();
                            std::fs::create_dir_all(&prefix).unwrap();
                            // Long enough for the other task to arrive and wait for the lock.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            std::fs::write(prefix.join("payload"), b"x").unwrap();
                            Ok(())
                        },
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut reused = Vec::new();
        for task in tasks {
            reused.push(task.await.unwrap().reused);
        }
        reused.sort();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "built once");
        assert_eq!(reused, [false, true], "one built it, the other reused it");
    }

    #[tokio::test]
    async fn a_failed_or_cancelled_build_leaves_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path(), u64::MAX);
        let key = key("venv", &[("spec", "broken")]);
        let run = dir.path().join("runs/1.1");
        let error = cache
            .get_or_build(
                &key,
                &run,
                "r.txt",
                &CancellationToken::new(),
                |prefix| async move {
                    std::fs::create_dir_all(prefix.join("lib")).unwrap();
                    Err(EnvError("no matching distribution".into()))
                },
            )
            .await
            .unwrap_err();
        assert_eq!(error.0, "no matching distribution");
        assert!(!cache.root().join(key.name()).exists(), "directory removed");
        assert!(cache.entries().is_empty());

        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        let error = cache
            .get_or_build(&key, &run, "r.txt", &cancel, |prefix| async move {
                std::fs::create_dir_all(&prefix).unwrap();
                canceller.cancel();
                std::future::pending::<()>().await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(error.0.contains("cancelled"), "{error}");
        assert!(!cache.root().join(key.name()).exists(), "directory removed");

        // A crashed build's leftover directory is replaced by the next build.
        std::fs::create_dir_all(cache.root().join(key.name()).join("junk")).unwrap();
        let calls = AtomicUsize::new(0);
        let entry = cache
            .get_or_build(
                &key,
                &run,
                "r.txt",
                &CancellationToken::new(),
                build_of(1, &calls),
            )
            .await
            .unwrap();
        assert!(!entry.reused);
        assert!(!entry.prefix.join("junk").exists());
    }

    #[tokio::test]
    async fn eviction_removes_the_least_recently_used_entries_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let calls = AtomicUsize::new(0);
        // Four entries of ~64 KiB, built and last used in the order a, b, c, d.
        let unlimited = Cache::new(dir.path(), u64::MAX);
        let mut names = Vec::new();
        for (i, spec) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let key = key("venv", &[("spec", spec)]);
            let run = dir.path().join(format!("runs/{spec}.1"));
            unlimited
                .get_or_build(
                    &key,
                    &run,
                    spec,
                    &CancellationToken::new(),
                    build_of(64 << 10, &calls),
                )
                .await
                .unwrap();
            let used = SystemTime::now() - Duration::from_secs(100 - i as u64);
            File::options()
                .write(true)
                .open(unlimited.info_path(key.name()))
                .unwrap()
                .set_modified(used)
                .unwrap();
            names.push(key.name().to_string());
        }
        let size = unlimited.entries()[0].1.size_bytes;
        // Runs of a and d have ended; b and c are still running. `a` was used least recently.
        std::fs::remove_dir_all(dir.path().join("runs/a.1")).unwrap();
        std::fs::remove_dir_all(dir.path().join("runs/d.1")).unwrap();

        let limited = Cache::new(dir.path(), 3 * size);
        assert_eq!(
            limited.evict(),
            [names[0].clone()],
            "one over: the oldest goes"
        );
        assert!(!dir.path().join("envs").join(&names[0]).exists());

        let tiny = Cache::new(dir.path(), 0);
        assert_eq!(
            tiny.evict(),
            [names[3].clone()],
            "b and c are in use, so only d goes"
        );
        let left: HashSet<String> = tiny.entries().into_iter().map(|e| e.1.name).collect();
        assert_eq!(left, HashSet::from([names[1].clone(), names[2].clone()]));
    }
}
