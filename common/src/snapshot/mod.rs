//! The snapshot format: a directory packed as tar + zstd and named by the sha256 of the compressed bytes.
//!
//! The CLI packs a user's source directory with [`plan`] and [`pack`]; the agent checks the digest with
//! [`digest_file`] and unpacks with [`unpack`]; the agent packs a run's `outputs/` and checkpoints the same
//! way with [`pack_untrusted_dir`]. Both ends use this one implementation, so they always agree on what a
//! snapshot holds.
//!
//! Promises:
//! - Packing is deterministic: the same directory content gives byte-identical archives (and so the same
//!   digest) whatever the walk order, mtimes, owners or umask. Entries are sorted by path; headers carry
//!   mtime 0, uid/gid 0, no user or group names, and mode 0o755 (directories and executable files) or 0o644.
//! - A snapshot holds regular files, directories and relative symlinks that stay inside it. Anything that
//!   [`unpack`] would refuse as unsafe is already refused by [`plan`], so a snapshot that packs also
//!   unpacks, unless it passes one of the [`UnpackLimits`] (size, entry count, depth, path length).
//! - Packing never reads outside the directory packed: every file, directory and symlink is opened relative
//!   to its parent's descriptor without following symlinks (`openat` with `O_NOFOLLOW`), so a tree that
//!   changes while it is packed (a file or directory swapped for a symlink) fails the pack instead of
//!   reading what the link points at. [`pack_untrusted_dir`], for trees a run's script wrote, also refuses
//!   a root that is a symlink and skips symlinks that point outside instead of refusing the tree.
//! - [`unpack`] never writes outside its destination, and is all or nothing: it builds the tree in a fresh
//!   private directory that replaces the destination only when complete. It refuses the whole archive for
//!   absolute paths, `..`, NUL bytes in names, duplicate paths, symlinks that point outside, paths through
//!   symlinks, hard links and special files, and stops at [`UnpackLimits`] (entries, depth, name lengths,
//!   bytes, zstd window) before the disk or memory fills up.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest, Sha256};

mod unpack;

pub use unpack::{UnpackLimits, Unpacked, unpack};

/// The prefix of every snapshot digest.
pub const DIGEST_PREFIX: &str = "sha256:";

/// Default patterns never worth snapshotting (gitignore syntax), documented in README.
///
/// They have the lowest precedence: a negation in the root `.kilnignore` (e.g. `!venv/`) brings a match back.
pub const DEFAULT_IGNORES: &[&str] = &[
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.pyc",
    ".venv/",
    "venv/",
    ".ipynb_checkpoints/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".tox/",
    ".DS_Store",
    // The top-level `outputs/` is where a run's outputs are made: a stale local copy must
    // never come back as a run's outputs.
    "/outputs/",
];

/// The per-directory ignore file that only Kiln reads (gitignore syntax).
pub const KILNIGNORE: &str = ".kilnignore";

/// What went wrong while planning, packing, unpacking or hashing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a local file failed.
    #[error("`{}`: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The directory to snapshot (or unpack into) is not a directory.
    #[error("`{}` is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Walking the directory failed, e.g. a subdirectory could not be read or an ignore file is malformed.
    #[error("cannot list the files to snapshot: {0}")]
    Walk(String),
    /// A file name is not UTF-8, so it cannot be stored portably.
    #[error("`{}`: the name is not valid UTF-8; rename it or add it to {KILNIGNORE}", .0.display())]
    NonUtf8Path(PathBuf),
    /// An entry that could escape the destination or is not a plain file, directory or safe symlink.
    #[error("refusing snapshot entry `{path}`: {reason}")]
    Unsafe { path: String, reason: String },
    /// An unpack limit was reached; the archive is too big or a decompression bomb.
    #[error("snapshot is too large to unpack: it holds more than {limit} {what}")]
    TooLarge { limit: u64, what: String },
    /// The archive's digest is not the one it was asked for under.
    #[error(
        "snapshot digest mismatch: expected {expected}, got {actual}; the archive is damaged or was replaced"
    )]
    BadDigest { expected: String, actual: String },
    /// A zstd frame declares a window over [`UnpackLimits::max_window_log`]; decoding it would allocate
    /// that much memory.
    #[error(
        "snapshot is too large to unpack: a zstd frame needs a window over 2^{max_log} bytes (`max_window_log`)"
    )]
    WindowTooLarge { max_log: u32 },
    /// [`unpack`] was asked to write into a directory that already holds something.
    #[error("`{}` is not empty; a snapshot is only unpacked into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// The archive is not valid tar + zstd, or is truncated.
    #[error("snapshot archive is corrupt: {0}")]
    Corrupt(String),
    /// Writing the packed archive to its destination stream failed.
    #[error("cannot write the snapshot archive: {0}")]
    Output(io::Error),
}

/// How to choose and compress the files of a snapshot.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Apply .gitignore (even outside a git repo), .kilnignore, and DEFAULT_IGNORES.
    pub use_ignore_files: bool,
    /// zstd level (default 3).
    pub level: i32,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            use_ignore_files: true,
            level: 3,
        }
    }
}

/// One file/dir/symlink chosen for the snapshot.
#[derive(Debug, Clone)]
pub struct PlanEntry {
    /// The path relative to the snapshot root, '/'-separated, without a trailing '/'.
    pub rel_path: String,
    pub kind: EntryKind,
    /// The file size in bytes; 0 for directories and symlinks.
    pub size: u64,
}

/// The kinds of entry a snapshot can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// The result of walking a directory: what would go into the snapshot, sorted by rel_path (byte order),
/// so packing is deterministic.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: PathBuf,
    pub entries: Vec<PlanEntry>,
    /// The sum of file sizes.
    pub total_bytes: u64,
}

/// Walks `dir` and decides what goes into its snapshot.
///
/// With `use_ignore_files`, `.gitignore` files are honoured even outside a git repository, `.kilnignore`
/// files (gitignore syntax, higher precedence) too, and then [`DEFAULT_IGNORES`] and any virtualenv (a
/// directory holding `pyvenv.cfg`) or conda environment (holding `conda-meta/`) are dropped unless the root
/// `.kilnignore` re-includes them with a `!` line. Ignore files above `dir` are not read, so the snapshot
/// depends only on what is inside `dir`. Hidden files are included; symlinks are not followed. Sockets
/// and FIFOs are skipped.
///
/// Refuses (with [`SnapshotError::Unsafe`]) symlinks that point outside `dir`, since no agent would
/// unpack them; the message suggests adding them to `.kilnignore`.
pub fn plan(dir: &Path, options: &PackOptions) -> Result<Plan, SnapshotError> {
    let metadata = fs::metadata(dir).map_err(|source| io_error(dir, source))?;
    if !metadata.is_dir() {
        return Err(SnapshotError::NotADirectory(dir.to_path_buf()));
    }

    let mut builder = ignore::WalkBuilder::new(dir);
    builder
        .standard_filters(false)
        .hidden(false)
        .follow_links(false);
    if options.use_ignore_files {
        builder
            .git_ignore(true)
            .require_git(false)
            .git_global(false)
            .git_exclude(false)
            .ignore(false)
            .parents(false)
            .add_custom_ignore_filename(KILNIGNORE);
        let filter = DefaultFilter::new(dir)?;
        builder.filter_entry(move |entry| filter.keep(entry));
    }

    let mut entries = Vec::new();
    let mut total_bytes = 0u64;
    for item in builder.build() {
        let entry = item.map_err(|err| SnapshotError::Walk(err.to_string()))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel_path = relative_path(dir, entry.path())?;
        let Some(file_type) = entry.file_type() else {
            continue;
        };
        let (kind, size) = if file_type.is_dir() {
            (EntryKind::Dir, 0)
        } else if file_type.is_file() {
            let metadata = entry
                .metadata()
                .map_err(|err| SnapshotError::Walk(err.to_string()))?;
            (EntryKind::File, metadata.len())
        } else if file_type.is_symlink() {
            let target = read_link_utf8(entry.path())?;
            check_symlink_target(&rel_path, &target).map_err(|reason| SnapshotError::Unsafe {
                path: rel_path.clone(),
                reason: format!("{reason}; add it to {KILNIGNORE} or replace it with a copy"),
            })?;
            (EntryKind::Symlink, 0)
        } else {
            // Sockets, FIFOs and devices have no content worth shipping.
            continue;
        };
        total_bytes += size;
        entries.push(PlanEntry {
            rel_path,
            kind,
            size,
        });
    }
    entries.sort_unstable_by(|a, b| a.rel_path.cmp(&b.rel_path));
    Ok(Plan {
        root: dir.to_path_buf(),
        entries,
        total_bytes,
    })
}

impl Plan {
    /// The number of regular files in the snapshot.
    pub fn n_files(&self) -> usize {
        self.entries
            .iter()
            .filter(|entry| entry.kind == EntryKind::File)
            .count()
    }

    /// Whether the snapshot holds an entry (file, directory or symlink) at `rel_path`.
    pub fn contains(&self, rel_path: &str) -> bool {
        let rel_path = rel_path.trim_end_matches('/');
        self.entries
            .binary_search_by(|entry| entry.rel_path.as_str().cmp(rel_path))
            .is_ok()
    }

    /// The biggest top-level items (a top-level dir's size is the sum of its files), largest first, at most n.
    /// Dirs are named with a trailing '/', e.g. ("data/", 1_200_000_000), ("big.bin", 5).
    pub fn biggest_items(&self, n: usize) -> Vec<(String, u64)> {
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for entry in &self.entries {
            let key = match entry.rel_path.split_once('/') {
                Some((top, _)) => format!("{top}/"),
                None if entry.kind == EntryKind::Dir => format!("{}/", entry.rel_path),
                None => entry.rel_path.clone(),
            };
            *sizes.entry(key).or_default() += entry.size;
        }
        let mut items: Vec<(String, u64)> = sizes.into_iter().collect();
        items.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        items.truncate(n);
        items
    }
}

/// The `.kilnignore` line that would drop a top-level item as returned by biggest_items: "/data/" for dir
/// "data/", "/big.bin" for a file. Glob characters and trailing spaces in the name are escaped.
pub fn ignore_line_for(item: &str) -> String {
    let (name, dir_suffix) = match item.strip_suffix('/') {
        Some(name) => (name, "/"),
        None => (item, ""),
    };
    let n_trailing_spaces = name.len() - name.trim_end_matches(' ').len();
    let mut line = String::with_capacity(item.len() + 2);
    line.push('/');
    for (idx, ch) in name.char_indices() {
        let is_trailing_space = ch == ' ' && idx >= name.len() - n_trailing_spaces;
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') || is_trailing_space {
            line.push('\\');
        }
        line.push(ch);
    }
    line.push_str(dir_suffix);
    line
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// "sha256:<64 hex>" of the compressed archive.
    pub digest: String,
    /// The size of the compressed archive.
    pub compressed_bytes: u64,
    /// The number of regular files packed.
    pub n_files: usize,
    /// The sum of the sizes of the files packed (not counting tar headers).
    pub uncompressed_bytes: u64,
}

/// Packs the plan as tar+zstd into `out`, hashing as it writes. `progress` is called with the number of
/// *input* file bytes read so far (for a progress bar), about once per MiB.
///
/// Files are read and framed as tar on a helper thread while this thread compresses, hashes and writes,
/// so packing runs at about the speed of zstd alone. A file's size is taken when `pack` opens it; a file
/// that gets shorter while it is read is an error (try again). On error, `out` holds a partial archive
/// that must be discarded.
pub fn pack(
    plan: &Plan,
    options: &PackOptions,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Packed, SnapshotError> {
    let root = nix::fcntl::open(
        &plan.root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| io_error(&plan.root, errno.into()))?;
    pack_at(root.as_fd(), plan, options.level, out, progress)
}

/// [`pack`], reading the plan's entries relative to the directory `root` (the plan's root, opened).
fn pack_at(
    root: BorrowedFd<'_>,
    plan: &Plan,
    level: i32,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Packed, SnapshotError> {
    let input_bytes = AtomicU64::new(0);
    let (chunk_tx, chunk_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();

    std::thread::scope(|scope| {
        let tar_thread = std::thread::Builder::new()
            .name("kiln-snapshot-tar".to_owned())
            .spawn_scoped(scope, || {
                let sender = ChunkSender::new(chunk_tx, free_rx, &input_bytes);
                write_tar(root, plan, sender)
            })
            .map_err(|source| io_error(&plan.root, source))?;

        let compressed = compress(chunk_rx, free_tx, level, out, progress, &input_bytes);
        let tarred = match tar_thread.join() {
            Ok(tarred) => tarred,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match (compressed, tarred) {
            // The tar thread stops with `Disconnected` only after the compressor stopped with an error.
            (Err(err), _) => Err(err),
            (Ok(_), Err(TarError::Snapshot(err))) => Err(err),
            (Ok(_), Err(TarError::Disconnected)) => Err(SnapshotError::Output(io::Error::other(
                "the compressor stopped early",
            ))),
            (Ok((digest, compressed_bytes)), Ok((n_files, uncompressed_bytes))) => Ok(Packed {
                digest,
                compressed_bytes,
                n_files,
                uncompressed_bytes,
            }),
        }
    })
}

/// Convenience: plan + pack `dir` into the file `dest` (created/truncated), for a directory the caller
/// trusts as much as [`plan`] does (its root may be a symlink). A tree a run's script wrote goes through
/// [`pack_untrusted_dir`] instead.
pub fn pack_dir_to_file(
    dir: &Path,
    options: &PackOptions,
    dest: &Path,
) -> Result<Packed, SnapshotError> {
    let plan = plan(dir, options)?;
    let mut file = File::create(dest).map_err(|source| io_error(dest, source))?;
    pack(&plan, options, &mut file, &mut |_| {}).map_err(|err| match err {
        SnapshotError::Output(source) => io_error(dest, source),
        other => other,
    })
}

/// What [`pack_untrusted_dir`] wrote, and what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedUntrusted {
    pub packed: Packed,
    /// Entries left out, each as "`path`: why" (symlinks that point outside the tree, names that are not
    /// UTF-8), in path order.
    pub skipped: Vec<String>,
}

/// Packs a directory written by a run's script (its `outputs/`, its checkpoints) into the file `dest`
/// (created/truncated), with no ignore rules, never reading anything outside it.
///
/// The script may still be running (checkpoints), may have left a daemon behind, and in a container it
/// writes paths that mean something else on the host, so nothing in the tree is trusted:
/// - `dir` itself is opened with `O_NOFOLLOW | O_DIRECTORY`: a symlink there (say to the agent's identity)
///   is refused with [`SnapshotError::NotADirectory`] and nothing is packed;
/// - the tree is walked from that descriptor, each directory opened relative to its parent without
///   following symlinks; symlinks are stored as symlinks when they stay inside the tree (as [`plan`]
///   requires) and left out otherwise, as are names that are not UTF-8 ([`PackedUntrusted::skipped`]
///   says which); sockets, FIFOs and devices are left out as by [`plan`];
/// - every file is opened relative to its parent's descriptor with `O_NOFOLLOW | O_NONBLOCK` and must
///   still be a regular file, so a file or directory swapped for a symlink (or a FIFO) between the walk
///   and the read fails the pack with [`SnapshotError::Unsafe`] instead of reading its target.
pub fn pack_untrusted_dir(
    dir: &Path,
    level: i32,
    dest: &Path,
) -> Result<PackedUntrusted, SnapshotError> {
    let root = open_untrusted_root(dir)?;
    let (plan, skipped) = plan_untrusted(root.as_fd(), dir)?;
    let mut file = File::create(dest).map_err(|source| io_error(dest, source))?;
    let packed =
        pack_at(root.as_fd(), &plan, level, &mut file, &mut |_| {}).map_err(|err| match err {
            SnapshotError::Output(source) => io_error(dest, source),
            other => other,
        })?;
    Ok(PackedUntrusted { packed, skipped })
}

/// Opens the root of an untrusted tree: a directory, not a symlink to one.
fn open_untrusted_root(dir: &Path) -> Result<OwnedFd, SnapshotError> {
    nix::fcntl::open(dir, DIR_FLAGS, Mode::empty()).map_err(|errno| match errno {
        Errno::ELOOP | Errno::ENOTDIR => SnapshotError::NotADirectory(dir.to_path_buf()),
        errno => io_error(dir, errno.into()),
    })
}

/// The flags every directory of a tree being packed is opened with: never through a symlink.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens the directory at `rel` ('/'-separated, "" for the root itself) below `root`, one component at a
/// time, never following a symlink: a component that is not a directory fails with [`SnapshotError::Unsafe`].
fn open_dir_beneath(root: BorrowedFd<'_>, rel: &str) -> Result<OwnedFd, SnapshotError> {
    let mut dir = root
        .try_clone_to_owned()
        .map_err(|source| io_error(Path::new(rel), source))?;
    for (idx, name) in rel.split('/').filter(|name| !name.is_empty()).enumerate() {
        dir = nix::fcntl::openat(&dir, name, DIR_FLAGS, Mode::empty()).map_err(|errno| {
            let path = rel.split('/').take(idx + 1).collect::<Vec<_>>().join("/");
            changed_while_packing(&path, errno)
        })?;
    }
    Ok(dir)
}

/// The error for `path` that could not be opened as the kind of entry the walk found.
fn changed_while_packing(path: &str, errno: Errno) -> SnapshotError {
    match errno {
        Errno::ELOOP | Errno::ENOTDIR | Errno::ENXIO => SnapshotError::Unsafe {
            path: path.to_owned(),
            reason: "it was replaced (by a symlink or a special file) while it was being packed"
                .to_owned(),
        },
        errno => io_error(Path::new(path), errno.into()),
    }
}

/// Walks the untrusted tree open at `root` (whose path is `dir`, for messages) into a plan, returning the
/// entries it left out too. See [`pack_untrusted_dir`].
fn plan_untrusted(root: BorrowedFd<'_>, dir: &Path) -> Result<(Plan, Vec<String>), SnapshotError> {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let mut total_bytes = 0u64;
    // Directories still to list, by path below the root; each is opened afresh from the root, so the
    // walk holds one descriptor per level it is in, not one per directory it has seen.
    let mut pending = vec![String::new()];
    while let Some(rel_dir) = pending.pop() {
        let fd = open_dir_beneath(root, &rel_dir)?;
        // A second descriptor of the same directory for `fstatat`/`readlinkat` while `listing` reads it.
        let parent = fd
            .try_clone()
            .map_err(|source| io_error(&dir.join(&rel_dir), source))?;
        let mut listing =
            nix::dir::Dir::from_fd(fd).map_err(|errno| io_error(dir, errno.into()))?;
        for item in listing.iter() {
            let item = item.map_err(|errno| io_error(&dir.join(&rel_dir), errno.into()))?;
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                skipped.push(format!(
                    "`{}`: the name is not valid UTF-8",
                    join_rel(&rel_dir, &String::from_utf8_lossy(name))
                ));
                continue;
            };
            let rel_path = join_rel(&rel_dir, name);
            let stat =
                nix::sys::stat::fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|errno| io_error(&dir.join(&rel_path), errno.into()))?;
            let (kind, size) = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => {
                    pending.push(rel_path.clone());
                    (EntryKind::Dir, 0)
                }
                SFlag::S_IFREG => (EntryKind::File, u64::try_from(stat.st_size).unwrap_or(0)),
                SFlag::S_IFLNK => {
                    let target = nix::fcntl::readlinkat(&parent, name)
                        .map_err(|errno| io_error(&dir.join(&rel_path), errno.into()))?;
                    let Some(target) = target.to_str() else {
                        skipped.push(format!(
                            "`{rel_path}`: the symlink target is not valid UTF-8"
                        ));
                        continue;
                    };
                    if let Err(reason) = check_symlink_target(&rel_path, target) {
                        skipped.push(format!("`{rel_path}`: {reason}"));
                        continue;
                    }
                    (EntryKind::Symlink, 0)
                }
                // Sockets, FIFOs and devices have no content worth shipping.
                _ => continue,
            };
            total_bytes += size;
            entries.push(PlanEntry {
                rel_path,
                kind,
                size,
            });
        }
    }
    entries.sort_unstable_by(|a, b| a.rel_path.cmp(&b.rel_path));
    skipped.sort_unstable();
    let plan = Plan {
        root: dir.to_path_buf(),
        entries,
        total_bytes,
    };
    Ok((plan, skipped))
}

fn join_rel(rel_dir: &str, name: &str) -> String {
    if rel_dir.is_empty() {
        name.to_owned()
    } else {
        format!("{rel_dir}/{name}")
    }
}

/// The parent directory of the entry [`write_tar`] is at, kept open while the entries of one directory
/// follow each other (they mostly do, in path order).
struct ParentDir {
    rel: String,
    fd: OwnedFd,
}

impl ParentDir {
    /// The open parent directory of `rel_path` and the entry's name in it.
    fn of<'c, 'p>(
        cached: &'c mut Option<ParentDir>,
        root: BorrowedFd<'_>,
        rel_path: &'p str,
    ) -> Result<(BorrowedFd<'c>, &'p str), SnapshotError> {
        let (parent, name) = rel_path.rsplit_once('/').unwrap_or(("", rel_path));
        if cached.as_ref().is_none_or(|dir| dir.rel != parent) {
            *cached = Some(ParentDir {
                rel: parent.to_owned(),
                fd: open_dir_beneath(root, parent)?,
            });
        }
        let dir = cached.as_ref().expect("set just above");
        Ok((dir.fd.as_fd(), name))
    }
}

/// sha256 of a file, as "sha256:<hex>", streamed.
pub fn digest_file(path: &Path) -> Result<String, SnapshotError> {
    let mut file = File::open(path).map_err(|source| io_error(path, source))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; COPY_BUFFER_BYTES];
    loop {
        let n_read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n_read) => n_read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(io_error(path, source)),
        };
        hasher.update(&buffer[..n_read]);
    }
    Ok(format_digest(hasher))
}

/// Checks that the file at `path` hashes to `expected` ("sha256:<hex>"), as a downloaded snapshot must
/// before it is unpacked.
pub fn verify_digest(path: &Path, expected: &str) -> Result<(), SnapshotError> {
    let actual = digest_file(path)?;
    if actual != expected {
        return Err(SnapshotError::BadDigest {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Whether `s` is a well-formed digest ("sha256:" + 64 lowercase hex). Used to refuse path-like digests
/// before they touch the filesystem.
pub fn is_valid_digest(s: &str) -> bool {
    s.strip_prefix(DIGEST_PREFIX).is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The size of the buffers passed from the tar thread to the compressor.
const CHUNK_BYTES: usize = 1 << 20;
/// How many full chunks may wait for the compressor; bounds memory to a few MiB.
const CHUNKS_IN_FLIGHT: usize = 2;
/// The buffer used to copy file data when unpacking and hashing.
const COPY_BUFFER_BYTES: usize = 256 << 10;
/// How much may follow the last entry in the decompressed stream (tar's zero blocks).
const TRAILER_LIMIT_BYTES: u64 = 1 << 20;
const TAR_BLOCK_BYTES: u64 = 512;

fn io_error(path: &Path, source: io::Error) -> SnapshotError {
    SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_digest(hasher: Sha256) -> String {
    format!("{DIGEST_PREFIX}{}", hex::encode(hasher.finalize()))
}

/// The '/'-separated path of `path` below `root`.
fn relative_path(root: &Path, path: &Path) -> Result<String, SnapshotError> {
    let rel = path.strip_prefix(root).map_err(|_| {
        SnapshotError::Walk(format!(
            "`{}` is not below `{}`",
            path.display(),
            root.display()
        ))
    })?;
    let mut out = String::new();
    for component in rel.components() {
        let name = component
            .as_os_str()
            .to_str()
            .ok_or_else(|| SnapshotError::NonUtf8Path(path.to_path_buf()))?;
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(name);
    }
    Ok(out)
}

fn read_link_utf8(path: &Path) -> Result<String, SnapshotError> {
    let target = fs::read_link(path).map_err(|source| io_error(path, source))?;
    target
        .into_os_string()
        .into_string()
        .map_err(|_| SnapshotError::NonUtf8Path(path.to_path_buf()))
}

/// Checks that a symlink at `link_rel` with `target` stays inside the snapshot, returning why not.
///
/// The target must be relative, and `..` may appear only at its start, at most as many times as the link
/// is deep. Since links are only ever created in real directories, resolving such a target can never leave
/// the snapshot, even through other links.
fn check_symlink_target(link_rel: &str, target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err("the symlink target is empty".to_owned());
    }
    if target.starts_with('/') {
        return Err(format!(
            "the symlink target `{target}` is absolute; only relative links inside the snapshot are allowed"
        ));
    }
    let parent_depth = link_rel
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .count()
        .saturating_sub(1);
    let mut n_up = 0usize;
    let mut seen_name = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if seen_name => {
                return Err(format!(
                    "the symlink target `{target}` uses '..' after a name; only leading '..' are allowed"
                ));
            }
            ".." => n_up += 1,
            _ => seen_name = true,
        }
    }
    if n_up > parent_depth {
        return Err(format!(
            "the symlink target `{target}` points outside the snapshot"
        ));
    }
    Ok(())
}

/// Drops, below the snapshot root, what [`DEFAULT_IGNORES`] and environment detection exclude, unless the
/// root `.kilnignore` whitelists it.
struct DefaultFilter {
    root: PathBuf,
    defaults: Gitignore,
    root_kilnignore: Gitignore,
}

impl DefaultFilter {
    fn new(root: &Path) -> Result<Self, SnapshotError> {
        let mut defaults = GitignoreBuilder::new(root);
        for pattern in DEFAULT_IGNORES {
            defaults
                .add_line(None, pattern)
                .map_err(|err| SnapshotError::Walk(err.to_string()))?;
        }
        let defaults = defaults
            .build()
            .map_err(|err| SnapshotError::Walk(err.to_string()))?;

        let mut root_kilnignore = GitignoreBuilder::new(root);
        let kilnignore_path = root.join(KILNIGNORE);
        if kilnignore_path.is_file()
            && let Some(err) = root_kilnignore.add(&kilnignore_path)
        {
            return Err(SnapshotError::Walk(err.to_string()));
        }
        let root_kilnignore = root_kilnignore
            .build()
            .map_err(|err| SnapshotError::Walk(err.to_string()))?;
        Ok(DefaultFilter {
            root: root.to_path_buf(),
            defaults,
            root_kilnignore,
        })
    }

    fn keep(&self, entry: &ignore::DirEntry) -> bool {
        if entry.depth() == 0 {
            return true;
        }
        let Ok(rel) = entry.path().strip_prefix(&self.root) else {
            return true;
        };
        let is_dir = entry
            .file_type()
            .is_some_and(|file_type| file_type.is_dir());
        let dropped = self.defaults.matched(rel, is_dir).is_ignore()
            || (is_dir && is_python_environment(entry.path()));
        !dropped || self.root_kilnignore.matched(rel, is_dir).is_whitelist()
    }
}

/// Whether `dir` is a virtualenv (holds `pyvenv.cfg`) or a conda environment (holds `conda-meta/`).
fn is_python_environment(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join("pyvenv.cfg")).is_ok() || dir.join("conda-meta").is_dir()
}

/// Why the tar thread stopped.
enum TarError {
    Snapshot(SnapshotError),
    /// The compressor hung up, so it has its own error to report.
    Disconnected,
}

/// Writes the tar stream of `plan` into `sender`, returning (number of files, file bytes).
///
/// Every entry is opened relative to `root` (the plan's root, open) without following symlinks.
fn write_tar(
    root: BorrowedFd<'_>,
    plan: &Plan,
    sender: ChunkSender<'_>,
) -> Result<(usize, u64), TarError> {
    let mut builder = tar::Builder::new(sender);
    let mut n_files = 0usize;
    let mut n_bytes = 0u64;
    let mut parent = None;
    for entry in &plan.entries {
        let full_path = plan.root.join(&entry.rel_path);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        let written = match entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                builder.append_data(&mut header, format!("{}/", entry.rel_path), io::empty())
            }
            EntryKind::Symlink => {
                let (dir, name) = ParentDir::of(&mut parent, root, &entry.rel_path)
                    .map_err(TarError::Snapshot)?;
                let target = nix::fcntl::readlinkat(dir, name)
                    .map_err(|errno| TarError::Snapshot(changed_while_packing_link(entry, errno)))?
                    .into_string()
                    .map_err(|_| {
                        TarError::Snapshot(SnapshotError::NonUtf8Path(full_path.clone()))
                    })?;
                check_symlink_target(&entry.rel_path, &target).map_err(|reason| {
                    TarError::Snapshot(SnapshotError::Unsafe {
                        path: entry.rel_path.clone(),
                        reason,
                    })
                })?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                builder.append_link(&mut header, &entry.rel_path, &target)
            }
            EntryKind::File => {
                let mut file =
                    open_file_beneath(root, &mut parent, entry).map_err(TarError::Snapshot)?;
                let metadata = file
                    .metadata()
                    .map_err(|source| TarError::Snapshot(io_error(&full_path, source)))?;
                if !metadata.is_file() {
                    return Err(TarError::Snapshot(changed_while_packing(
                        &entry.rel_path,
                        Errno::ENXIO,
                    )));
                }
                let size = metadata.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if metadata.mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                });
                header.set_size(size);
                // The header goes through the builder (it handles long names); the data is read straight
                // into the outgoing chunk, then padded to a whole block.
                builder
                    .append_data(&mut header, &entry.rel_path, io::empty())
                    .and_then(|()| builder.get_mut().fill_from(&mut file, size))
                    .and_then(|()| builder.get_mut().write_zeros(padding(size)))
                    .map_err(|err| match err.kind() {
                        io::ErrorKind::UnexpectedEof => io::Error::new(
                            err.kind(),
                            "the file got shorter while it was being packed; try again",
                        ),
                        _ => err,
                    })
                    .inspect(|()| {
                        n_files += 1;
                        n_bytes += size;
                    })
            }
        };
        written.map_err(|err| {
            if builder.get_ref().disconnected {
                TarError::Disconnected
            } else {
                TarError::Snapshot(io_error(&full_path, err))
            }
        })?;
    }
    let mut sender = builder.into_inner().map_err(|_| TarError::Disconnected)?;
    sender.send_chunk().map_err(|_| TarError::Disconnected)?;
    Ok((n_files, n_bytes))
}

/// Opens the regular file of `entry` relative to its parent directory, never through a symlink and
/// without blocking on a FIFO that took its place.
fn open_file_beneath(
    root: BorrowedFd<'_>,
    parent: &mut Option<ParentDir>,
    entry: &PlanEntry,
) -> Result<File, SnapshotError> {
    let (dir, name) = ParentDir::of(parent, root, &entry.rel_path)?;
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(dir, name, flags, Mode::empty())
        .map_err(|errno| changed_while_packing(&entry.rel_path, errno))?;
    Ok(File::from(fd))
}

/// The error for a symlink entry whose link could not be read: `EINVAL` means it is no longer a symlink.
fn changed_while_packing_link(entry: &PlanEntry, errno: Errno) -> SnapshotError {
    match errno {
        Errno::EINVAL => changed_while_packing(&entry.rel_path, Errno::ENXIO),
        errno => changed_while_packing(&entry.rel_path, errno),
    }
}

fn padding(size: u64) -> u64 {
    (TAR_BLOCK_BYTES - size % TAR_BLOCK_BYTES) % TAR_BLOCK_BYTES
}

/// A `Write` that cuts the tar stream into [`CHUNK_BYTES`] buffers and sends them to the compressor.
struct ChunkSender<'a> {
    /// Always `CHUNK_BYTES` long; `filled` bytes of it are data.
    buffer: Vec<u8>,
    filled: usize,
    chunks: mpsc::SyncSender<Vec<u8>>,
    free: mpsc::Receiver<Vec<u8>>,
    input_bytes: &'a AtomicU64,
    disconnected: bool,
}

impl<'a> ChunkSender<'a> {
    fn new(
        chunks: mpsc::SyncSender<Vec<u8>>,
        free: mpsc::Receiver<Vec<u8>>,
        input_bytes: &'a AtomicU64,
    ) -> Self {
        ChunkSender {
            buffer: vec![0; CHUNK_BYTES],
            filled: 0,
            chunks,
            free,
            input_bytes,
            disconnected: false,
        }
    }

    /// Sends the filled part of the buffer, if any, and takes a fresh one.
    fn send_chunk(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let next = match self.free.try_recv() {
            Ok(buffer) => buffer,
            Err(_) => vec![0; CHUNK_BYTES],
        };
        let mut full = std::mem::replace(&mut self.buffer, next);
        full.truncate(self.filled);
        self.filled = 0;
        if self.chunks.send(full).is_err() {
            self.disconnected = true;
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the compressor stopped",
            ));
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of `reader` into the stream, counting them as input progress.
    fn fill_from(&mut self, reader: &mut dyn Read, size: u64) -> io::Result<()> {
        let mut remaining = size;
        while remaining > 0 {
            if self.filled == CHUNK_BYTES {
                self.send_chunk()?;
            }
            let space =
                (CHUNK_BYTES - self.filled).min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let n_read = match reader.read(&mut self.buffer[self.filled..self.filled + space]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n_read) => n_read,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            self.filled += n_read;
            remaining -= n_read as u64;
            self.input_bytes.fetch_add(n_read as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_zeros(&mut self, n: u64) -> io::Result<()> {
        let zeros = [0u8; TAR_BLOCK_BYTES as usize];
        self.write_all(&zeros[..usize::try_from(n).unwrap_or(0).min(zeros.len())])
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.filled == CHUNK_BYTES {
            self.send_chunk()?;
        }
        let n = data.len().min(CHUNK_BYTES - self.filled);
        self.buffer[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compresses the chunks into `out`, returning the digest and size of what was written.
fn compress(
    chunks: mpsc::Receiver<Vec<u8>>,
    free: mpsc::Sender<Vec<u8>>,
    level: i32,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
    input_bytes: &AtomicU64,
) -> Result<(String, u64), SnapshotError> {
    let hashing = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        n_bytes: 0,
    };
    let mut encoder =
        zstd::stream::write::Encoder::new(hashing, level).map_err(SnapshotError::Output)?;
    encoder
        .include_checksum(true)
        .map_err(SnapshotError::Output)?;
    let mut reported = 0u64;
    for mut chunk in chunks {
        encoder.write_all(&chunk).map_err(SnapshotError::Output)?;
        chunk.resize(CHUNK_BYTES, 0);
        // The tar thread may have finished already; then the buffer is simply dropped.
        let _ = free.send(chunk);
        let read = input_bytes.load(Ordering::Relaxed);
        if read != reported {
            reported = read;
            progress(read);
        }
    }
    let hashing = encoder.finish().map_err(SnapshotError::Output)?;
    hashing.inner.flush().map_err(SnapshotError::Output)?;
    let read = input_bytes.load(Ordering::Relaxed);
    if read != reported {
        progress(read);
    }
    Ok((format_digest(hashing.hasher), hashing.n_bytes))
}

/// A `Write` adapter that hashes and counts the bytes passing through it.
struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: Sha256,
    n_bytes: u64,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.n_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// What a user sees of an unpacked tree: every path with its kind, content, exec bit or link target.
    #[derive(Debug, PartialEq, Eq)]
    enum Node {
        File { content: Vec<u8>, mode: u32 },
        Dir,
        Symlink(PathBuf),
    }

    fn listing(root: &Path) -> BTreeMap<String, Node> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let path = entry.expect("dir entry").path();
                let rel = path
                    .strip_prefix(root)
                    .expect("below root")
                    .to_str()
                    .expect("utf-8")
                    .to_owned();
                let metadata = fs::symlink_metadata(&path).expect("lstat");
                if metadata.file_type().is_symlink() {
                    out.insert(rel, Node::Symlink(fs::read_link(&path).expect("readlink")));
                } else if metadata.is_dir() {
                    out.insert(rel, Node::Dir);
                    walk(root, &path, out);
                } else {
                    let content = fs::read(&path).expect("read");
                    out.insert(
                        rel,
                        Node::File {
                            content,
                            mode: metadata.mode() & 0o7777,
                        },
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// Creates `rel` below `root`: a directory when it ends with '/', else a file holding `content`.
    fn put(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        if rel.ends_with('/') {
            fs::create_dir_all(&path).expect("create dir");
        } else {
            fs::create_dir_all(path.parent().expect("parent")).expect("create parent");
            fs::write(&path, content).expect("write file");
        }
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn pack_to_vec(dir: &Path, options: &PackOptions) -> (Packed, Vec<u8>) {
        let plan = plan(dir, options).expect("plan");
        let mut out = Vec::new();
        let packed = pack(&plan, options, &mut out, &mut |_| {}).expect("pack");
        (packed, out)
    }

    fn no_ignores() -> PackOptions {
        PackOptions {
            use_ignore_files: false,
            ..PackOptions::default()
        }
    }

    /// A tree with nested dirs, an empty dir, an executable, symlinks, a long path and unicode names.
    fn sample_tree(root: &Path) {
        put(root, "train.py", "print('hi')\n");
        put(root, "src/model/net.py", "import torch\n");
        put(root, "empty/", "");
        put(root, "run.sh", "#!/bin/sh\necho run\n");
        set_mode(&root.join("run.sh"), 0o755);
        put(root, "private.txt", "secret\n");
        set_mode(&root.join("private.txt"), 0o600);
        let long_dir = format!("{}/{}", "d".repeat(60), "e".repeat(60));
        put(
            root,
            &format!("{long_dir}/{}.txt", "f".repeat(80)),
            "deep\n",
        );
        put(root, "données/résumé-日本語.txt", "unicode\n");
        symlink("src/model", root.join("model")).expect("symlink");
        symlink("../train.py", root.join("src/train.py")).expect("symlink");
        symlink(
            format!("../../{long_dir}"),
            root.join("src/model/long_link"),
        )
        .expect("symlink");
    }

    #[test]
    fn round_trip_keeps_contents_modes_and_links() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        fs::create_dir(&src).expect("mkdir");
        fs::create_dir(&dest).expect("mkdir");
        sample_tree(&src);

        let (packed, bytes) = pack_to_vec(&src, &PackOptions::default());
        let unpacked =
            unpack(&mut bytes.as_slice(), &dest, &UnpackLimits::default()).expect("unpack");

        let mut expected = listing(&src);
        for node in expected.values_mut() {
            if let Node::File { mode, .. } = node {
                *mode = if *mode & 0o111 != 0 { 0o755 } else { 0o644 };
            }
        }
        assert_eq!(listing(&dest), expected);
        assert_eq!(
            expected["run.sh"],
            Node::File {
                content: b"#!/bin/sh\necho run\n".to_vec(),
                mode: 0o755
            }
        );
        assert_eq!(expected["empty"], Node::Dir);
        let n_files = expected
            .values()
            .filter(|node| matches!(node, Node::File { .. }))
            .count();
        assert_eq!(packed.n_files, n_files);
        assert_eq!(unpacked.n_files, n_files as u64);
        assert_eq!(unpacked.total_bytes, packed.uncompressed_bytes);
        assert_eq!(packed.compressed_bytes, bytes.len() as u64);
    }

    #[test]
    fn packing_is_deterministic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
        let files = [
            ("b/z.txt", "z"),
            ("a.txt", "a"),
            ("b/y.txt", "y"),
            ("c/", ""),
            ("b/x/w.txt", "w"),
        ];
        for (rel, content) in files {
            put(&first, rel, content);
        }
        // The same content created in the opposite order, with other permissions that mean the same thing.
        for (rel, content) in files.iter().rev() {
            put(&second, rel, content);
        }
        set_mode(&second.join("a.txt"), 0o600);
        let (packed, bytes) = pack_to_vec(&first, &no_ignores());

        assert_eq!(pack_to_vec(&first, &no_ignores()).1, bytes, "packing twice");
        assert_eq!(
            pack_to_vec(&second, &no_ignores()).0.digest,
            packed.digest,
            "other creation order"
        );
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(first.join("b/y.txt"))
            .expect("open")
            .set_modified(old)
            .expect("touch");
        assert_eq!(
            pack_to_vec(&first, &no_ignores()).0.digest,
            packed.digest,
            "other mtime"
        );

        fs::write(first.join("b/y.txt"), "Y").expect("write");
        assert_ne!(
            pack_to_vec(&first, &no_ignores()).0.digest,
            packed.digest,
            "one byte changed"
        );
        fs::write(first.join("b/y.txt"), "y").expect("write");
        set_mode(&first.join("a.txt"), 0o755);
        assert_ne!(
            pack_to_vec(&first, &no_ignores()).0.digest,
            packed.digest,
            "exec bit changed"
        );
    }

    struct IgnoreCase {
        name: &'static str,
        /// Paths to create (directories end with '/') and file contents.
        files: &'static [(&'static str, &'static str)],
        use_ignore_files: bool,
        included: &'static [&'static str],
        excluded: &'static [&'static str],
    }

    fn check(case: &IgnoreCase) {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (rel, content) in case.files {
            put(tmp.path(), rel, content);
        }
        let options = PackOptions {
            use_ignore_files: case.use_ignore_files,
            ..PackOptions::default()
        };
        let plan = plan(tmp.path(), &options).expect("plan");
        for rel in case.included {
            assert!(
                plan.contains(rel),
                "{}: `{rel}` should be in the snapshot",
                case.name
            );
        }
        for rel in case.excluded {
            assert!(
                !plan.contains(rel),
                "{}: `{rel}` should not be in the snapshot",
                case.name
            );
        }
    }

    #[test]
    fn ignore_rules() {
        let cases = [
            IgnoreCase {
                name: ".gitignore outside a git repository",
                files: &[
                    (".gitignore", "*.log\n/build/\n"),
                    ("main.py", ""),
                    ("a.log", ""),
                    ("src/b.log", ""),
                    ("build/x", ""),
                    ("src/build/y", ""),
                ],
                use_ignore_files: true,
                included: &[".gitignore", "main.py", "src", "src/build/y"],
                excluded: &["a.log", "src/b.log", "build", "build/x"],
            },
            IgnoreCase {
                name: "nested .kilnignore",
                files: &[
                    ("sub/.kilnignore", "data/\n"),
                    ("sub/data/x", ""),
                    ("sub/keep", ""),
                    ("data/y", ""),
                ],
                use_ignore_files: true,
                included: &["sub/.kilnignore", "sub/keep", "data/y"],
                excluded: &["sub/data", "sub/data/x"],
            },
            IgnoreCase {
                name: ".kilnignore overrides .gitignore",
                files: &[
                    (".gitignore", "*.csv\n"),
                    (".kilnignore", "!small.csv\n"),
                    ("small.csv", ""),
                    ("big.csv", ""),
                ],
                use_ignore_files: true,
                included: &[".kilnignore", "small.csv"],
                excluded: &["big.csv"],
            },
            IgnoreCase {
                name: "defaults",
                files: &[
                    (".git/HEAD", ""),
                    ("__pycache__/m.cpython-312.pyc", ""),
                    ("src/__pycache__/n.pyc", ""),
                    ("src/stale.pyc", ""),
                    ("venv/bin/python", ""),
                    ("myenv/pyvenv.cfg", ""),
                    ("myenv/lib/site.py", ""),
                    ("conda_env/conda-meta/history", ""),
                    (".DS_Store", ""),
                    (".env", "hidden files are kept"),
                    ("train.py", ""),
                ],
                use_ignore_files: true,
                included: &[".env", "train.py", "src"],
                excluded: &[
                    ".git",
                    ".git/HEAD",
                    "__pycache__",
                    "src/__pycache__/n.pyc",
                    "src/stale.pyc",
                    "venv",
                    "venv/bin/python",
                    "myenv",
                    "myenv/lib/site.py",
                    "conda_env",
                    ".DS_Store",
                ],
            },
            IgnoreCase {
                name: "root .kilnignore re-includes defaults",
                files: &[
                    (".kilnignore", "!venv/\n!myenv/\n"),
                    (".git/HEAD", ""),
                    ("venv/bin/python", ""),
                    ("myenv/pyvenv.cfg", ""),
                ],
                use_ignore_files: true,
                included: &["venv/bin/python", "myenv/pyvenv.cfg"],
                excluded: &[".git/HEAD"],
            },
            IgnoreCase {
                name: "use_ignore_files = false includes everything",
                files: &[
                    (".gitignore", "*.log\n"),
                    (".kilnignore", "data/\n"),
                    ("a.log", ""),
                    ("data/x", ""),
                    (".git/HEAD", ""),
                    ("venv/bin/python", ""),
                    ("__pycache__/m.pyc", ""),
                ],
                use_ignore_files: false,
                included: &[
                    "a.log",
                    "data/x",
                    ".git/HEAD",
                    "venv/bin/python",
                    "__pycache__/m.pyc",
                ],
                excluded: &[],
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    #[test]
    fn plan_refuses_symlinks_that_leave_the_directory() {
        for target in ["/etc/passwd", "../outside", "sub/../../x"] {
            let tmp = tempfile::tempdir().expect("tempdir");
            put(tmp.path(), "sub/", "");
            symlink(target, tmp.path().join("link")).expect("symlink");
            let err = plan(tmp.path(), &no_ignores()).expect_err(target);
            assert!(
                matches!(&err, SnapshotError::Unsafe { path, .. } if path == "link"),
                "{target}: {err}"
            );
            assert!(err.to_string().contains(KILNIGNORE), "{err}");
        }
    }

    #[test]
    fn biggest_items_and_ignore_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        put(tmp.path(), "data/a", &"x".repeat(1000));
        put(tmp.path(), "data/sub/b", &"x".repeat(500));
        put(tmp.path(), "big.bin", &"x".repeat(1200));
        put(tmp.path(), "small.txt", "12345");
        put(tmp.path(), "empty/", "");
        let plan = plan(tmp.path(), &no_ignores()).expect("plan");
        assert_eq!(plan.total_bytes, 2705);
        assert_eq!(plan.n_files(), 4);
        assert_eq!(
            plan.biggest_items(3),
            vec![
                ("data/".to_owned(), 1500),
                ("big.bin".to_owned(), 1200),
                ("small.txt".to_owned(), 5)
            ]
        );
        assert_eq!(plan.biggest_items(10).len(), 4);

        for (item, line) in [
            ("data/", "/data/"),
            ("big.bin", "/big.bin"),
            ("a*b?", "/a\\*b\\?"),
            ("[x]", "/\\[x\\]"),
            ("#notes", "/#notes"),
            ("trailing ", "/trailing\\ "),
        ] {
            assert_eq!(ignore_line_for(item), line, "{item}");
        }
    }

    #[test]
    fn ignore_lines_drop_their_items() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let items = [
            "data/",
            "big.bin",
            "a*b",
            "[x]",
            "#notes",
            "!bang",
            "trailing ",
        ];
        for item in items {
            put(
                tmp.path(),
                &format!("{item}{}", if item.ends_with('/') { "f" } else { "" }),
                "x",
            );
        }
        put(tmp.path(), "ab", "not matched by the escaped glob");
        put(tmp.path(), "x", "not matched by the escaped class");
        let lines: Vec<String> = items.iter().map(|item| ignore_line_for(item)).collect();
        put(tmp.path(), KILNIGNORE, &(lines.join("\n") + "\n"));
        let plan = plan(tmp.path(), &PackOptions::default()).expect("plan");
        let kept: Vec<&str> = plan
            .entries
            .iter()
            .map(|entry| entry.rel_path.as_str())
            .collect();
        assert_eq!(kept, [KILNIGNORE, "ab", "x"]);
    }

    /// One entry of a hand-made archive; names are written into the header bytes unchecked.
    struct RawEntry<'a> {
        path: &'a str,
        entry_type: tar::EntryType,
        link: &'a str,
        data: &'a [u8],
        mode: u32,
    }

    fn raw(path: &str, entry_type: tar::EntryType) -> RawEntry<'_> {
        RawEntry {
            path,
            entry_type,
            link: "",
            data: b"",
            mode: 0o644,
        }
    }

    fn raw_file<'a>(path: &'a str, data: &'a [u8]) -> RawEntry<'a> {
        RawEntry {
            data,
            ..raw(path, tar::EntryType::Regular)
        }
    }

    fn raw_dir(path: &str) -> RawEntry<'_> {
        RawEntry {
            mode: 0o755,
            ..raw(path, tar::EntryType::Directory)
        }
    }

    fn raw_link<'a>(path: &'a str, target: &'a str) -> RawEntry<'a> {
        RawEntry {
            link: target,
            ..raw(path, tar::EntryType::Symlink)
        }
    }

    fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            let old = header.as_old_mut();
            old.name[..entry.path.len()].copy_from_slice(entry.path.as_bytes());
            old.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
            header.set_entry_type(entry.entry_type);
            header.set_mode(entry.mode);
            header.set_size(entry.data.len() as u64);
            header.set_cksum();
            builder.append(&header, entry.data).expect("append");
        }
        let tar = builder.into_inner().expect("finish tar");
        zstd::encode_all(tar.as_slice(), 3).expect("compress")
    }

    /// Unpacks into `<tmp>/dest` and checks that nothing appeared next to `dest`.
    fn unpack_in_tmp(
        archive: &[u8],
        limits: &UnpackLimits,
    ) -> (tempfile::TempDir, Result<Unpacked, SnapshotError>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        let result = unpack(&mut &archive[..], &dest, limits);
        let outside: Vec<_> = fs::read_dir(tmp.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(outside, ["dest"], "unpack wrote outside dest");
        (tmp, result)
    }

    #[test]
    fn unpack_refuses_unsafe_entries() {
        use tar::EntryType;
        let tmp = tempfile::tempdir().expect("tempdir");
        let absolute = format!("{}/dest/../abs", tmp.path().display());
        let cases: Vec<(&str, Vec<RawEntry<'_>>, &str, &str)> = vec![
            (
                "absolute path",
                vec![raw_file(&absolute, b"x")],
                &absolute,
                "absolute",
            ),
            ("parent dir", vec![raw_file("../x", b"x")], "../x", "'..'"),
            (
                "parent dir inside",
                vec![raw_file("a/../../x", b"x")],
                "a/../../x",
                "'..'",
            ),
            (
                "absolute symlink",
                vec![raw_link("passwd", "/etc/passwd")],
                "passwd",
                "absolute",
            ),
            (
                "escaping symlink",
                vec![raw("a/", EntryType::Directory), raw_link("a/up", "../..")],
                "a/up",
                "outside",
            ),
            (
                "symlink to parent",
                vec![raw_link("evil", ".."), raw_file("evil/x", b"x")],
                "evil",
                "outside",
            ),
            // `a/up` resolves to dest, so `up/..` is dest's parent although it looks like `a`.
            (
                "'..' after a name",
                vec![
                    raw("a/", EntryType::Directory),
                    raw_link("a/up", ".."),
                    raw_link("a/x", "up/.."),
                ],
                "a/x",
                "after a name",
            ),
            (
                "write through symlink",
                vec![
                    raw("sub/", EntryType::Directory),
                    raw_link("link", "sub"),
                    raw_file("link/x", b"x"),
                ],
                "link/x",
                "symlink",
            ),
            (
                "over a symlink",
                vec![raw_link("link", "f"), raw_file("link", b"x")],
                "link",
                "duplicate",
            ),
            (
                "over an implicit directory",
                vec![raw_file("d/x", b"x"), raw_file("d", b"x")],
                "d",
                "already exists",
            ),
            (
                "hard link",
                vec![
                    raw_file("a", b"x"),
                    RawEntry {
                        link: "a",
                        ..raw("h", EntryType::Link)
                    },
                ],
                "h",
                "hard link",
            ),
            (
                "char device",
                vec![raw("dev", EntryType::Char)],
                "dev",
                "device",
            ),
            (
                "block device",
                vec![raw("blk", EntryType::Block)],
                "blk",
                "device",
            ),
            ("fifo", vec![raw("fifo", EntryType::Fifo)], "fifo", "FIFO"),
        ];
        for (name, entries, bad_path, bad_reason) in cases {
            let (_tmp, result) = unpack_in_tmp(&raw_archive(&entries), &UnpackLimits::default());
            match result {
                Err(SnapshotError::Unsafe { path, reason }) => {
                    assert_eq!(path, bad_path, "{name}: {reason}");
                    assert!(reason.contains(bad_reason), "{name}: {reason}");
                }
                other => panic!("{name}: expected Unsafe, got {other:?}"),
            }
        }
    }

    #[test]
    fn unpack_modes_never_keep_setuid() {
        let archive = raw_archive(&[
            RawEntry {
                mode: 0o4755,
                ..raw_file("suid", b"x")
            },
            RawEntry {
                mode: 0o2700,
                ..raw_file("sgid", b"x")
            },
            RawEntry {
                mode: 0o600,
                ..raw_file("plain", b"x")
            },
            RawEntry {
                mode: 0o700,
                ..raw("dir/", tar::EntryType::Directory)
            },
        ]);
        let (tmp, result) = unpack_in_tmp(&archive, &UnpackLimits::default());
        result.expect("unpack");
        let mode = |rel: &str| {
            fs::metadata(tmp.path().join("dest").join(rel))
                .expect("stat")
                .mode()
                & 0o7777
        };
        assert_eq!(
            (mode("suid"), mode("sgid"), mode("plain"), mode("dir")),
            (0o755, 0o755, 0o644, 0o755)
        );
    }

    #[test]
    fn unpack_enforces_entry_limit() {
        let names = ["a", "b", "c", "d", "e"];
        let archive = raw_archive(&names.map(|name| raw_file(name, b"x")));
        let limits = UnpackLimits {
            max_entries: 3,
            ..UnpackLimits::default()
        };
        let (tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(&result, Err(SnapshotError::TooLarge { limit: 3, what }) if what == "entries"),
            "{result:?}"
        );
        // All or nothing: the three entries written before the limit are gone with the staging directory.
        assert_eq!(
            fs::read_dir(tmp.path().join("dest"))
                .expect("read_dir")
                .count(),
            0
        );

        // Directories made only for a deeper path count too.
        let archive = raw_archive(&[raw_file("a/b/c/d", b"x")]);
        let (_tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(&result, Err(SnapshotError::TooLarge { limit: 3, what }) if what == "entries"),
            "{result:?}"
        );
    }

    #[test]
    fn unpack_enforces_a_directory_limit_whether_directories_are_entries_or_implied() {
        let limits = UnpackLimits {
            max_dirs: 50,
            ..UnpackLimits::default()
        };
        // Many empty directories: cheap to archive, costly to make and remove.
        let names: Vec<String> = (0..60).map(|i| format!("d{i}/")).collect();
        let archive = raw_archive(&names.iter().map(|n| raw_dir(n)).collect::<Vec<_>>());
        let (tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(&result, Err(SnapshotError::TooLarge { limit: 50, what }) if what == "directories"),
            "{result:?}"
        );
        assert_eq!(listing(&tmp.path().join("dest")), BTreeMap::new());
        // Under the limit, all is well.
        let archive = raw_archive(&names[..40].iter().map(|n| raw_dir(n)).collect::<Vec<_>>());
        let (_tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(result.is_ok(), "{result:?}");
        // Directories implied by a deep path count too.
        let limits = UnpackLimits {
            max_dirs: 5,
            ..UnpackLimits::default()
        };
        let archive = raw_archive(&[raw_file("a/b/c/d/e/f/g/h", b"x")]);
        let (_tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(&result, Err(SnapshotError::TooLarge { limit: 5, what }) if what == "directories"),
            "{result:?}"
        );
    }

    #[test]
    fn unpack_enforces_byte_limit_before_filling_the_disk() {
        // 64 MiB of zeros compresses to a few KiB: a small decompression bomb.
        let zeros = vec![0u8; 64 << 20];
        let archive = raw_archive(&[raw_file("small", &[1; 600]), raw_file("bomb", &zeros)]);
        assert!(archive.len() < 64 << 10);
        let limits = UnpackLimits {
            max_total_bytes: 1 << 20,
            ..UnpackLimits::default()
        };
        let (tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(result, Err(SnapshotError::TooLarge { limit, .. }) if limit == 1 << 20),
            "{result:?}"
        );
        assert_eq!(listing(&tmp.path().join("dest")), BTreeMap::new());

        // Bytes add up across files.
        let archive = raw_archive(&[raw_file("one", &[1; 600]), raw_file("two", &[2; 600])]);
        let limits = UnpackLimits {
            max_total_bytes: 1000,
            ..UnpackLimits::default()
        };
        let (_tmp, result) = unpack_in_tmp(&archive, &limits);
        assert!(
            matches!(result, Err(SnapshotError::TooLarge { limit: 1000, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn unpack_reports_corrupt_archives() {
        let tmp = tempfile::tempdir().expect("tempdir");
        put(tmp.path(), "src/file", &"data ".repeat(10_000));
        let (_, bytes) = pack_to_vec(&tmp.path().join("src"), &no_ignores());
        for (name, archive) in [
            ("not zstd", b"this is not a snapshot".to_vec()),
            ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ] {
            let (_tmp, result) = unpack_in_tmp(&archive, &UnpackLimits::default());
            assert!(
                matches!(result, Err(SnapshotError::Corrupt(_))),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn digest_file_matches_packed_digest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("outputs");
        sample_tree(&src);
        put(&src, ".git/HEAD", "outputs are packed without ignore rules");
        let dest = tmp.path().join("outputs.tar.zst");
        let packed = pack_dir_to_file(&src, &no_ignores(), &dest).expect("pack");
        assert!(is_valid_digest(&packed.digest), "{}", packed.digest);
        assert_eq!(digest_file(&dest).expect("digest"), packed.digest);
        assert_eq!(
            fs::metadata(&dest).expect("stat").len(),
            packed.compressed_bytes
        );
        assert!(
            plan(&src, &no_ignores())
                .expect("plan")
                .contains(".git/HEAD")
        );

        let mut progress = Vec::new();
        let plan = plan(&src, &no_ignores()).expect("plan");
        pack(&plan, &no_ignores(), &mut io::sink(), &mut |n| {
            progress.push(n)
        })
        .expect("pack");
        assert_eq!(progress.last(), Some(&plan.total_bytes));
    }

    /// The decompressed tar stream of a packed archive, to look for bytes that must not be in it.
    fn tar_bytes(archive: &[u8]) -> Vec<u8> {
        zstd::decode_all(archive).expect("zstd")
    }

    fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle)
    }

    /// A secret next to `outputs/`, as the agent's identity is next to a run directory.
    fn secret_beside(tmp: &Path) -> (PathBuf, &'static str) {
        let secret_dir = tmp.join("identity");
        put(
            &secret_dir,
            "agent.pem",
            "-----BEGIN PRIVATE KEY----- hunter2",
        );
        (secret_dir, "hunter2")
    }

    #[test]
    fn untrusted_pack_refuses_a_symlinked_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (secret_dir, secret) = secret_beside(tmp.path());
        let outputs = tmp.path().join("outputs");
        let dest = tmp.path().join("outputs.tar.zst");
        for target in [secret_dir.clone(), secret_dir.join("agent.pem")] {
            let _ = fs::remove_file(&outputs);
            symlink(&target, &outputs).expect("symlink");
            let err = pack_untrusted_dir(&outputs, 3, &dest).expect_err("a symlinked root");
            assert!(
                matches!(&err, SnapshotError::NotADirectory(path) if path == &outputs),
                "{err}"
            );
            let written = fs::read(&dest).unwrap_or_default();
            assert!(!contains_bytes(
                &tar_bytes_or_empty(&written),
                secret.as_bytes()
            ));
        }
    }

    fn tar_bytes_or_empty(archive: &[u8]) -> Vec<u8> {
        if archive.is_empty() {
            Vec::new()
        } else {
            tar_bytes(archive)
        }
    }

    #[test]
    fn untrusted_pack_skips_symlinks_that_leave_the_tree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (secret_dir, secret) = secret_beside(tmp.path());
        let outputs = tmp.path().join("outputs");
        put(&outputs, "model.bin", "weights");
        put(&outputs, "sub/", "");
        symlink(secret_dir.join("agent.pem"), outputs.join("key.pem")).expect("symlink");
        symlink("../../identity/agent.pem", outputs.join("sub/relative.pem")).expect("symlink");
        symlink(&secret_dir, outputs.join("identity")).expect("symlink");
        symlink("../model.bin", outputs.join("sub/model.bin")).expect("symlink");
        let dest = tmp.path().join("outputs.tar.zst");

        let packed = pack_untrusted_dir(&outputs, 3, &dest).expect("pack");

        assert_eq!(packed.packed.n_files, 1);
        assert_eq!(packed.skipped.len(), 3, "{:?}", packed.skipped);
        for name in ["`identity`", "`key.pem`", "`sub/relative.pem`"] {
            assert!(
                packed.skipped.iter().any(|line| line.starts_with(name)),
                "{name}: {:?}",
                packed.skipped
            );
        }
        let archive = fs::read(&dest).expect("read archive");
        assert!(!contains_bytes(&tar_bytes(&archive), secret.as_bytes()));
        let unpacked = tmp.path().join("unpacked");
        unpack(&mut archive.as_slice(), &unpacked, &UnpackLimits::default()).expect("unpack");
        let mut expected = BTreeMap::new();
        expected.insert(
            "model.bin".to_owned(),
            Node::File {
                content: b"weights".to_vec(),
                mode: 0o644,
            },
        );
        expected.insert("sub".to_owned(), Node::Dir);
        expected.insert(
            "sub/model.bin".to_owned(),
            Node::Symlink(PathBuf::from("../model.bin")),
        );
        assert_eq!(listing(&unpacked), expected);
    }

    #[test]
    fn untrusted_pack_never_reads_through_an_entry_swapped_after_the_walk() {
        type Swap = fn(&Path, &Path);
        let swaps: [(&str, Swap); 3] = [
            ("a file swapped for a symlink", |outputs, secret_dir| {
                fs::remove_file(outputs.join("sub/log.txt")).expect("rm");
                symlink(secret_dir.join("agent.pem"), outputs.join("sub/log.txt"))
                    .expect("symlink");
            }),
            (
                "a directory swapped for a symlink",
                |outputs, secret_dir| {
                    fs::remove_dir_all(outputs.join("sub")).expect("rm");
                    symlink(secret_dir, outputs.join("sub")).expect("symlink");
                },
            ),
            ("a file swapped for a FIFO", |outputs, _| {
                fs::remove_file(outputs.join("sub/log.txt")).expect("rm");
                nix::unistd::mkfifo(&outputs.join("sub/log.txt"), Mode::S_IRWXU).expect("mkfifo");
            }),
        ];
        for (what, swap) in swaps {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (secret_dir, secret) = secret_beside(tmp.path());
            // The secret under the same name, so a swapped directory would pass for the old one.
            fs::copy(secret_dir.join("agent.pem"), secret_dir.join("log.txt")).expect("copy");
            let outputs = tmp.path().join("outputs");
            put(&outputs, "sub/log.txt", "step 1");
            let root = open_untrusted_root(&outputs).expect("open");
            let (plan, skipped) = plan_untrusted(root.as_fd(), &outputs).expect("plan");
            assert!(skipped.is_empty(), "{skipped:?}");
            swap(&outputs, &secret_dir);

            let mut out = Vec::new();
            let err = pack_at(root.as_fd(), &plan, 3, &mut out, &mut |_| {}).expect_err(what);
            assert!(
                matches!(&err, SnapshotError::Unsafe { path, .. } if path.starts_with("sub")),
                "{what}: {err}"
            );
            assert!(
                !contains_bytes(&out, secret.as_bytes())
                    && !contains_bytes(
                        &zstd::stream::decode_all(out.as_slice()).unwrap_or_default(),
                        secret.as_bytes()
                    ),
                "{what}"
            );
        }
    }

    #[test]
    fn digest_validation() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let cases = [
            (good.as_str(), true),
            ("sha256:", false),
            (&good[..good.len() - 1], false),
            ("sha256:../../../../etc/passwd", false),
            ("sha512:0123", false),
        ];
        for (digest, valid) in cases {
            assert_eq!(is_valid_digest(digest), valid, "{digest}");
        }
        assert!(!is_valid_digest(&good.to_uppercase()));
        assert!(!is_valid_digest(&format!("{good}0")));
        assert!(!is_valid_digest(&good.replace('a', "g")));
    }
}
