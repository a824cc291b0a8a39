//! Unpacking a snapshot: all or nothing, never outside the destination, within
//! [`UnpackLimits`] (see the promises in [`super`]).

use super::*;

/// Bounds on what [`unpack`] accepts, so that a hostile or broken archive fails early: before it fills the
/// disk, runs out of inodes or memory, or makes paths the file system cannot hold.
///
/// Every limit is checked while the archive streams in. Headers are never trusted except to refuse early:
/// a file that announces more bytes than are left is refused before it is created.
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    /// The most file bytes written in all. The decompressed stream as a whole is capped too, at this plus a
    /// fixed allowance per entry for tar headers, so that data which is never written (skipped or padding)
    /// cannot keep the decompressor busy without end either.
    pub max_total_bytes: u64,
    /// The most entries: files, directories and symlinks, counting directories that are created only
    /// because a deeper path needs them (so an archive cannot make millions of inodes with few entries).
    pub max_entries: u64,
    /// The most directories, explicit or implicit: each costs an inode, a `mkdir` and, when the
    /// run ends, its removal, so a small archive of empty directories (a million of them fit in
    /// 3 MB) must not keep an agent busy for minutes. Real source trees have far fewer.
    pub max_dirs: u64,
    /// The most components in one path (`a/b/c` is 3 deep).
    pub max_depth: u32,
    /// The longest path of an entry, or target of a symlink, in bytes. Linux refuses 4096 and more.
    pub max_path_bytes: u32,
    /// The longest single component of a path, in bytes. Linux file systems refuse names over 255 bytes.
    pub max_name_bytes: u32,
    /// The largest zstd window accepted, as a power of two (10 to 31). The decoder allocates the window a
    /// frame declares, so one declaring 2^31 would take 2 GiB of memory. 27 (128 MiB) is zstd's own
    /// default and what its highest level (`--ultra -22`) uses.
    pub max_window_log: u32,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_total_bytes: 64 << 30,
            max_entries: 1_000_000,
            max_dirs: 100_000,
            max_depth: 256,
            max_path_bytes: 4095,
            max_name_bytes: 255,
            max_window_log: 27,
        }
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The number of regular files written.
    pub n_files: u64,
    /// The number of file bytes written.
    pub total_bytes: u64,
}

/// Unpacks a tar+zstd archive into `dest`, all or nothing.
///
/// `dest` must be an empty directory, or not exist yet in an existing directory. The archive is unpacked
/// into a fresh private (0o700) directory next to `dest` that replaces `dest` with one `rename` only once
/// every entry has been checked and written; on any error it is removed, so `dest` stays as it was. Since
/// the tree is always built from nothing, no entry ever meets a file or symlink it did not create itself
/// (such as a link planted by an earlier snapshot), and nothing of a refused archive is ever visible. The
/// new `dest` gets the permission bits of the directory it replaces (0o755 if there was none) and belongs
/// to the unpacking user. The directory holding `dest` must be writable.
///
/// The whole archive is refused:
/// - with [`SnapshotError::Unsafe`], naming the entry, for an absolute path, a `..` component, a NUL byte
///   in a name or link target (including bytes hidden after the NUL that ends a header field), a name
///   that is not UTF-8, a path that appears twice, a path that goes through a symlink (even one inside
///   the snapshot), a path deeper than [`UnpackLimits::max_depth`], longer than `max_path_bytes`, or with
///   a component longer than `max_name_bytes`; for a hard link, a character or block device, a FIFO, a
///   PAX header (which could override sizes, owners or add xattrs), or any entry type other than regular
///   file, directory and symlink; for a symlink whose target is empty, absolute, leaves the snapshot or
///   uses `..` after a name; and for a directory or symlink entry that carries data;
/// - with [`SnapshotError::TooLarge`] when the entries, the file bytes or the decompressed stream pass
///   `limits`, and with [`SnapshotError::WindowTooLarge`] for a zstd frame that declares a window over
///   `2^max_window_log` bytes, before that memory is allocated;
/// - with [`SnapshotError::Corrupt`] when it is not zstd, fails a checksum, is truncated (including a tar
///   stream without its end-of-archive blocks), or has anything but zeros after its last entry;
/// - with [`SnapshotError::NotEmpty`] when `dest` holds anything.
///
/// Modes are normalised: files get 0o755 if any executable bit is set in the archive, else 0o644, and
/// directories 0o755, whatever the archive says (so never setuid, setgid or sticky, and never unreadable).
/// Owners, group and user names, times and extended attributes in the archive are ignored: everything
/// belongs to the unpacking user and gets the current time.
pub fn unpack(
    archive: &mut dyn Read,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<Unpacked, SnapshotError> {
    let target = UnpackTarget::new(dest)?;
    let staging = Staging::create(&target.parent)?;
    let unpacked = unpack_into(archive, &staging.path, limits)?;
    staging.finish(&target)?;
    Ok(unpacked)
}

/// Where [`unpack`] puts the finished tree: `dest` with its symlinks resolved, so that the staging
/// directory lands on the same file system and the final `rename` replaces the right directory.
struct UnpackTarget {
    /// What the caller asked for, for messages.
    dest: PathBuf,
    /// The canonical path that the staging directory is renamed to.
    path: PathBuf,
    /// The directory holding `path`, where the staging directory is made.
    parent: PathBuf,
    /// The permission bits the finished tree's root gets.
    mode: u32,
}

impl UnpackTarget {
    fn new(dest: &Path) -> Result<Self, SnapshotError> {
        let not_a_dir = || SnapshotError::NotADirectory(dest.to_path_buf());
        let (path, mode) = match fs::metadata(dest) {
            Ok(metadata) if metadata.is_dir() => {
                let mut listing = fs::read_dir(dest).map_err(|source| io_error(dest, source))?;
                if listing.next().is_some() {
                    return Err(SnapshotError::NotEmpty(dest.to_path_buf()));
                }
                let path = fs::canonicalize(dest).map_err(|source| io_error(dest, source))?;
                (path, metadata.mode() & 0o777)
            }
            Ok(_) => return Err(not_a_dir()),
            // A dangling symlink would be replaced by the tree, not followed: refuse it as the file it is.
            Err(err)
                if err.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(dest).is_err() =>
            {
                let name = dest.file_name().ok_or_else(not_a_dir)?;
                let parent = match dest.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent,
                    _ => Path::new("."),
                };
                let parent = fs::canonicalize(parent).map_err(|source| io_error(parent, source))?;
                (parent.join(name), 0o755)
            }
            Err(_) if fs::symlink_metadata(dest).is_ok() => return Err(not_a_dir()),
            Err(source) => return Err(io_error(dest, source)),
        };
        let parent = path.parent().ok_or_else(not_a_dir)?.to_path_buf();
        Ok(UnpackTarget {
            dest: dest.to_path_buf(),
            path,
            parent,
            mode,
        })
    }
}

/// The private directory an archive is unpacked into; removed on drop unless [`Staging::finish`] moved it
/// into place, so an error (or a panic) leaves nothing behind.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Staging {
    /// Makes a new, empty, 0o700 directory in `parent`, with a name no other unpack uses.
    fn create(parent: &Path) -> Result<Self, SnapshotError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let mut attempt = 0;
        loop {
            let path = parent.join(format!(
                ".kiln-unpack-{}-{nanos:08x}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            // `create` fails if anything, even a dangling symlink, already has the name.
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Staging { path, done: false }),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(source) => return Err(io_error(&path, source)),
            }
        }
    }

    /// Gives the finished tree its final mode and renames it over the (empty or missing) target.
    fn finish(mut self, target: &UnpackTarget) -> Result<(), SnapshotError> {
        fs::set_permissions(&self.path, fs::Permissions::from_mode(target.mode))
            .map_err(|source| io_error(&self.path, source))?;
        // rename(2) replaces an empty directory and fails on one that is not, so if something appeared in
        // `dest` since it was checked, it is kept and the unpack fails.
        fs::rename(&self.path, &target.path).map_err(|source| match source.kind() {
            io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists => {
                SnapshotError::NotEmpty(target.dest.clone())
            }
            _ => io_error(&target.dest, source),
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            // Only ever our own private directory; remove_dir_all does not follow symlinks.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Unpacks into `dir`, a fresh empty directory; see [`unpack`] for what is refused.
fn unpack_into(
    archive: &mut dyn Read,
    dir: &Path,
    limits: &UnpackLimits,
) -> Result<Unpacked, SnapshotError> {
    let mut decoder = zstd::stream::read::Decoder::new(archive).map_err(corrupt)?;
    let max_window_log = limits.max_window_log.clamp(10, 31);
    decoder.window_log_max(max_window_log).map_err(corrupt)?;
    let stream = LimitedStream {
        inner: decoder,
        n_read: 0,
        limit: stream_limit(limits),
        max_window_log,
        at_eof: false,
    };
    let mut tar = tar::Archive::new(stream);
    let mut unpacker = Unpacker {
        dest: dir,
        limits,
        real_dirs: HashSet::new(),
        seen: HashSet::new(),
        buffer: vec![0; COPY_BUFFER_BYTES],
        n_entries: 0,
        n_dirs: 0,
        unpacked: Unpacked {
            n_files: 0,
            total_bytes: 0,
        },
    };

    // Raw mode: this loop, not the tar crate, interprets GNU long names, and PAX headers reach
    // `unpack_entry` as entries (and are refused) instead of silently overriding sizes, owners or xattrs.
    let entries = tar.entries().map_err(corrupt)?.raw(true);
    let long_name_limit = u64::from(limits.max_path_bytes) + TAR_BLOCK_BYTES;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(corrupt)?;
        let entry_type = entry.header().entry_type();
        if entry_type.is_gnu_longname() || entry_type.is_gnu_longlink() {
            let slot = if entry_type.is_gnu_longname() {
                &mut long_name
            } else {
                &mut long_link
            };
            if slot.is_some() {
                return Err(SnapshotError::Corrupt(
                    "two long-name records for one entry".to_owned(),
                ));
            }
            *slot = Some(read_long_name(&mut entry, long_name_limit)?);
            continue;
        }
        let path = long_name
            .take()
            .unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let link = long_link.take().or_else(|| {
            entry
                .header()
                .link_name_bytes()
                .map(|link| link.into_owned())
        });
        unpacker.unpack_entry(&mut entry, &path, link.as_deref())?;
    }
    if long_name.is_some() || long_link.is_some() {
        return Err(SnapshotError::Corrupt(
            "the archive ends with a long-name record".to_owned(),
        ));
    }

    let mut stream = tar.into_inner();
    // tar stops at the first zero block, or quietly at the end of the data; only the first is complete.
    if stream.at_eof {
        return Err(SnapshotError::Corrupt(
            "the archive is truncated: the tar stream ends without its end-of-archive blocks"
                .to_owned(),
        ));
    }
    // Read the zstd frames to their end so that their checksums are verified; only zeros (the rest of tar's
    // end blocks and record padding) may remain.
    let mut rest = (&mut stream).take(TRAILER_LIMIT_BYTES + 1);
    let mut n_trailing = 0u64;
    loop {
        let n_read = match rest.read(&mut unpacker.buffer) {
            Ok(0) => break,
            Ok(n_read) => n_read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(corrupt(err)),
        };
        n_trailing += n_read as u64;
        if n_trailing > TRAILER_LIMIT_BYTES || unpacker.buffer[..n_read].iter().any(|&b| b != 0) {
            return Err(SnapshotError::Corrupt(
                "unexpected data after the end of the tar archive".to_owned(),
            ));
        }
    }
    Ok(unpacker.unpacked)
}

/// The most bytes the decompressed stream may hold: the file bytes, plus per entry a header, a long-name
/// and a long-link record of the longest allowed path, and padding, plus the end blocks.
fn stream_limit(limits: &UnpackLimits) -> u64 {
    let long_record = TAR_BLOCK_BYTES
        + (u64::from(limits.max_path_bytes) + TAR_BLOCK_BYTES).div_ceil(TAR_BLOCK_BYTES)
            * TAR_BLOCK_BYTES;
    let per_entry = 2 * TAR_BLOCK_BYTES + 2 * long_record;
    limits
        .max_total_bytes
        .saturating_add(
            limits
                .max_entries
                .saturating_add(1)
                .saturating_mul(per_entry),
        )
        .saturating_add(TRAILER_LIMIT_BYTES)
}

/// Why [`LimitedStream`] stopped; carried inside an `io::Error` through the tar crate and turned back into
/// a [`SnapshotError`] by [`corrupt`].
#[derive(Debug, thiserror::Error)]
enum StreamLimit {
    #[error("the decompressed archive is over {0} bytes")]
    Bytes(u64),
    #[error("a zstd frame needs a window over 2^{0} bytes")]
    Window(u32),
}

/// The decompressed archive, counted so that a bomb stops at the limit whatever tar does with the bytes,
/// and watched for its end so that a tar stream that stops between entries is seen as truncated.
struct LimitedStream<R> {
    inner: R,
    n_read: u64,
    limit: u64,
    max_window_log: u32,
    /// Whether a read has returned end-of-file.
    at_eof: bool,
}

impl<R: Read> Read for LimitedStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n_read = match self.inner.read(buf) {
            Ok(n_read) => n_read,
            // libzstd's only words for "frameParameter_windowTooLarge"; the zstd crate gives no code.
            Err(err) if err.to_string().contains("too much memory") => {
                return Err(io::Error::other(StreamLimit::Window(self.max_window_log)));
            }
            Err(err) => return Err(err),
        };
        if n_read == 0 && !buf.is_empty() {
            self.at_eof = true;
        }
        self.n_read += n_read as u64;
        if self.n_read > self.limit {
            return Err(io::Error::other(StreamLimit::Bytes(self.limit)));
        }
        Ok(n_read)
    }
}

/// Reads the name carried by a GNU long-name or long-link record, refusing one over `limit` bytes.
fn read_long_name(entry: &mut dyn Read, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut name = Vec::new();
    entry
        .take(limit + 1)
        .read_to_end(&mut name)
        .map_err(corrupt)?;
    if name.len() as u64 > limit {
        return Err(SnapshotError::Unsafe {
            path: display_name(&name),
            reason: format!("the long-name record is over {limit} bytes; the path is too long"),
        });
    }
    while name.last() == Some(&0) {
        name.pop();
    }
    Ok(name)
}

/// The state of one [`unpack`] call.
struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a UnpackLimits,
    /// Relative paths checked or created as real directories (not symlinks) during this unpack, by
    /// [`path_key`] so that memory stays small whatever the path lengths.
    real_dirs: HashSet<[u8; 16]>,
    /// The paths of the entries met so far, by [`path_key`], to refuse duplicates.
    seen: HashSet<[u8; 16]>,
    buffer: Vec<u8>,
    /// Entries met plus directories created implicitly for deeper paths.
    n_entries: u64,
    /// Directories created, explicit or implicit.
    n_dirs: u64,
    unpacked: Unpacked,
}

impl Unpacker<'_> {
    /// Counts one more entry (or implicit directory) against the limit.
    fn count_entry(&mut self) -> Result<(), SnapshotError> {
        self.n_entries += 1;
        if self.n_entries > self.limits.max_entries {
            return Err(SnapshotError::TooLarge {
                limit: self.limits.max_entries,
                what: "entries".to_owned(),
            });
        }
        Ok(())
    }

    /// Validates one entry and writes it below `dest`.
    fn unpack_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        link: Option<&[u8]>,
    ) -> Result<(), SnapshotError> {
        self.count_entry()?;
        let display = display_name(raw_path);
        let refuse = |reason: String| SnapshotError::Unsafe {
            path: display.clone(),
            reason,
        };
        let limits = self.limits;
        let header = entry.header();
        // A header field ends at its first NUL; bytes hidden after it (`evil\0/../../x`) are read
        // differently by other tools, so they are refused like a NUL inside a long name.
        let old = header.as_old();
        let prefix = header.as_ustar().map_or(&[][..], |ustar| &ustar.prefix[..]);
        if raw_path.contains(&0)
            || link.is_some_and(|link| link.contains(&0))
            || [&old.name[..], &old.linkname[..], prefix]
                .iter()
                .any(|field| has_bytes_after_nul(field))
        {
            return Err(refuse(
                "the name or link target contains a NUL byte".to_owned(),
            ));
        }
        let path = std::str::from_utf8(raw_path)
            .map_err(|_| refuse("the name is not valid UTF-8".to_owned()))?;
        let parts = entry_parts(path).map_err(|reason| refuse(reason.to_owned()))?;
        if parts.len() > limits.max_depth as usize {
            return Err(refuse(format!(
                "the path is {} levels deep; the limit is {}",
                parts.len(),
                limits.max_depth
            )));
        }
        if raw_path.len() > limits.max_path_bytes as usize {
            return Err(refuse(format!(
                "the path is {} bytes long; the limit is {}",
                raw_path.len(),
                limits.max_path_bytes
            )));
        }
        if let Some(part) = parts
            .iter()
            .find(|part| part.len() > limits.max_name_bytes as usize)
        {
            return Err(refuse(format!(
                "a name in the path is {} bytes long; the limit is {}",
                part.len(),
                limits.max_name_bytes
            )));
        }
        let entry_type = header.entry_type();
        let size = header.entry_size().map_err(corrupt)?;
        let mode = header.mode().map_err(corrupt)?;
        let rel_path = parts.join("/");
        if !self.seen.insert(path_key(&rel_path)) {
            return Err(refuse(
                "the path appears twice in the archive (duplicate entry)".to_owned(),
            ));
        }

        let Some((_, parents)) = parts.split_last() else {
            // "./" names the destination itself, which exists already.
            return match entry_type {
                tar::EntryType::Directory if size == 0 => Ok(()),
                tar::EntryType::Directory => {
                    Err(refuse("a directory entry carries data".to_owned()))
                }
                _ => Err(refuse("the path is empty".to_owned())),
            };
        };
        match entry_type {
            tar::EntryType::Regular => {
                self.ensure_dirs(parents, &display, false)?;
                self.write_file(entry, &rel_path, size, mode, &display)
            }
            tar::EntryType::Directory => {
                if size != 0 {
                    return Err(refuse("a directory entry carries data".to_owned()));
                }
                self.ensure_dirs(&parts, &display, true)
            }
            tar::EntryType::Symlink => {
                if size != 0 {
                    return Err(refuse("a symlink entry carries data".to_owned()));
                }
                let target = link.ok_or_else(|| refuse("the symlink has no target".to_owned()))?;
                if target.len() > limits.max_path_bytes as usize {
                    return Err(refuse(format!(
                        "the symlink target is {} bytes long; the limit is {}",
                        target.len(),
                        limits.max_path_bytes
                    )));
                }
                let target = std::str::from_utf8(target)
                    .map_err(|_| refuse("the symlink target is not valid UTF-8".to_owned()))?;
                check_symlink_target(&rel_path, target).map_err(refuse)?;
                self.ensure_dirs(parents, &display, false)?;
                let full_path = self.dest.join(&rel_path);
                std::os::unix::fs::symlink(target, &full_path).map_err(|source| {
                    match source.kind() {
                        io::ErrorKind::AlreadyExists => {
                            refuse("the path already exists".to_owned())
                        }
                        _ => io_error(&full_path, source),
                    }
                })
            }
            tar::EntryType::Link => Err(refuse("hard links are not allowed".to_owned())),
            tar::EntryType::Char | tar::EntryType::Block => {
                Err(refuse("device files are not allowed".to_owned()))
            }
            tar::EntryType::Fifo => Err(refuse("FIFOs are not allowed".to_owned())),
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => Err(refuse(
                "PAX headers are not supported; this archive was not made by Kiln".to_owned(),
            )),
            other => Err(refuse(format!(
                "entry type {:?} is not allowed; a snapshot holds only files, directories and symlinks",
                other.as_byte() as char
            ))),
        }
    }

    /// Makes sure each prefix of `parts` is a real directory below `dest`, creating missing ones. Created
    /// parents count as entries; the last part does not when `last_is_entry` (it was counted as one).
    fn ensure_dirs(
        &mut self,
        parts: &[&str],
        display: &str,
        last_is_entry: bool,
    ) -> Result<(), SnapshotError> {
        let mut prefix = String::new();
        for (index, part) in parts.iter().enumerate() {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            let key = path_key(&prefix);
            if self.real_dirs.contains(&key) {
                continue;
            }
            let full_path = self.dest.join(&prefix);
            let refuse = |what: &str| SnapshotError::Unsafe {
                path: display.to_owned(),
                reason: format!(
                    "`{}` already exists as {what}, not a directory",
                    display_name(prefix.as_bytes())
                ),
            };
            match fs::symlink_metadata(&full_path) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(refuse("a symlink"));
                }
                Ok(_) => return Err(refuse("a file")),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    if !(last_is_entry && index + 1 == parts.len()) {
                        self.count_entry()?;
                    }
                    self.n_dirs += 1;
                    if self.n_dirs > self.limits.max_dirs {
                        return Err(SnapshotError::TooLarge {
                            limit: self.limits.max_dirs,
                            what: "directories".to_owned(),
                        });
                    }
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&full_path)
                        .and_then(|()| {
                            fs::set_permissions(&full_path, fs::Permissions::from_mode(0o755))
                        })
                        .map_err(|source| io_error(&full_path, source))?;
                }
                Err(source) => return Err(io_error(&full_path, source)),
            }
            self.real_dirs.insert(key);
        }
        Ok(())
    }

    /// Writes a regular file's data, counting bytes against the limit as they are written.
    fn write_file(
        &mut self,
        entry: &mut dyn Read,
        rel_path: &str,
        size: u64,
        mode: u32,
        display: &str,
    ) -> Result<(), SnapshotError> {
        let too_large = || SnapshotError::TooLarge {
            limit: self.limits.max_total_bytes,
            what: "bytes of file data".to_owned(),
        };
        let budget = self
            .limits
            .max_total_bytes
            .saturating_sub(self.unpacked.total_bytes);
        if size > budget {
            return Err(too_large());
        }
        let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let full_path = self.dest.join(rel_path);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&full_path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => SnapshotError::Unsafe {
                    path: display.to_owned(),
                    reason: "the path already exists".to_owned(),
                },
                _ => io_error(&full_path, source),
            })?;
        let mut written = 0u64;
        loop {
            let n_read = match entry.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n_read) => n_read,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(corrupt(err)),
            };
            written += n_read as u64;
            if written > budget {
                return Err(too_large());
            }
            file.write_all(&self.buffer[..n_read])
                .map_err(|source| io_error(&full_path, source))?;
        }
        if written != size {
            return Err(SnapshotError::Corrupt(format!("`{display}` is truncated")));
        }
        // The umask may have narrowed the mode at creation; snapshots promise 0o755 or 0o644.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|source| io_error(&full_path, source))?;
        self.unpacked.n_files += 1;
        self.unpacked.total_bytes += written;
        Ok(())
    }
}

/// The components of an entry path, without empty and `.` ones, or why the path is refused.
fn entry_parts(path: &str) -> Result<Vec<&str>, &'static str> {
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.contains(&"..") {
        return Err("the path contains '..'");
    }
    Ok(parts)
}

/// An entry name fit for an error message: lossy UTF-8 with control characters escaped, cut when long.
fn display_name(raw: &[u8]) -> String {
    const SHOWN_CHARS: usize = 120;
    let mut out = String::new();
    for (index, ch) in String::from_utf8_lossy(raw).chars().enumerate() {
        if index == SHOWN_CHARS {
            out.push_str(&format!("... ({} bytes)", raw.len()));
            break;
        }
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

/// Whether a NUL-terminated header field holds anything after its terminator.
fn has_bytes_after_nul(field: &[u8]) -> bool {
    field
        .iter()
        .position(|&byte| byte == 0)
        .is_some_and(|end| field[end..].iter().any(|&byte| byte != 0))
}

/// A fixed-size key for a relative path: the first 128 bits of its sha256, so that remembering a million
/// paths takes tens of MiB whatever their length, and no archive can be made to collide two of them.
fn path_key(rel_path: &str) -> [u8; 16] {
    let digest = Sha256::digest(rel_path.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Turns a read error into the snapshot error it stands for: a limit hit by [`LimitedStream`], else a
/// corrupt archive.
fn corrupt(err: io::Error) -> SnapshotError {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<StreamLimit>())
    {
        Some(StreamLimit::Bytes(limit)) => SnapshotError::TooLarge {
            limit: *limit,
            what: "bytes of decompressed archive".to_owned(),
        },
        Some(StreamLimit::Window(max_log)) => SnapshotError::WindowTooLarge { max_log: *max_log },
        None => SnapshotError::Corrupt(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_stream_stops_at_its_limit_and_sees_the_end() {
        let data = [7u8; 100];
        let mut stream = LimitedStream {
            inner: &data[..],
            n_read: 0,
            limit: 10,
            max_window_log: 27,
            at_eof: false,
        };
        let err = io::copy(&mut stream, &mut io::sink()).expect_err("over the limit");
        let err = corrupt(err);
        assert!(
            matches!(&err, SnapshotError::TooLarge { limit: 10, what } if what.contains("decompressed")),
            "{err:?}"
        );

        let mut stream = LimitedStream {
            inner: &data[..5],
            n_read: 0,
            limit: 10,
            max_window_log: 27,
            at_eof: false,
        };
        assert_eq!(io::copy(&mut stream, &mut io::sink()).expect("copy"), 5);
        assert!(stream.at_eof);
    }
}
