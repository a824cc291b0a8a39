//! The content-addressed blob directory: snapshots and run outputs, stored under their
//! sha256 digest. A blob becomes visible only after its bytes were hashed and matched the
//! digest the uploader claimed, so nothing corrupt is ever served under a digest.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_common::snapshot::{DIGEST_PREFIX, is_valid_digest};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

#[derive(Clone)]
pub struct BlobStore {
    root: PathBuf,
    max_blob_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("`{0}` is not a valid digest: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    #[error("blob {0} is not stored on the coordinator")]
    NotFound(String),
    #[error("upload of {claimed} is corrupt: its bytes hash to {actual}")]
    DigestMismatch { claimed: String, actual: String },
    #[error("upload is larger than the coordinator's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// An upload in progress: bytes go to a temporary file and are hashed as they arrive.
pub struct BlobWriter {
    file: tokio::fs::File,
    temp_path: PathBuf,
    hasher: Sha256,
    bytes: u64,
    claimed: String,
    max_blob_bytes: u64,
}

impl BlobStore {
    pub fn open(root: &Path, max_blob_bytes: u64) -> anyhow::Result<BlobStore> {
        for dir in ["sha256", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .with_context(|| format!("create blob directory {}", root.join(dir).display()))?;
        }
        // Leftovers of uploads that were interrupted by a crash.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
            max_blob_bytes,
        })
    }

    /// The file holding `digest`, if the digest is well-formed (never a path from the user).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        if !is_valid_digest(digest) {
            return Err(BlobError::BadDigest(digest.to_string()));
        }
        let hex = &digest[DIGEST_PREFIX.len()..];
        Ok(self.root.join("sha256").join(hex))
    }

    /// Marks a stored blob as just used, so that the sweep's grace counts from now (a
    /// client that was told the blob is present may submit a run on it next).
    pub async fn touch(&self, digest: &str) {
        if let Ok(path) = self.path(digest) {
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|file| file.set_modified(std::time::SystemTime::now()))
            })
            .await;
        }
    }

    /// Removes the blobs not in `keep` that were not written or touched for `grace`.
    /// Returns the removed digests and their bytes. Blocking: call on the blocking pool.
    pub fn sweep(
        &self,
        keep: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> anyhow::Result<(Vec<String>, u64)> {
        let mut removed = Vec::new();
        let mut bytes = 0;
        for entry in std::fs::read_dir(self.root.join("sha256"))? {
            let entry = entry?;
            let digest = format!("{DIGEST_PREFIX}{}", entry.file_name().to_string_lossy());
            if keep.contains(&digest) || !is_valid_digest(&digest) {
                continue;
            }
            // Looked at just before the removal: a blob touched since `keep` was read is kept.
            let Ok(meta) = entry.metadata() else { continue };
            let idle = meta
                .modified()
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .unwrap_or_default();
            if idle < grace {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                bytes += meta.len();
                removed.push(digest);
            }
        }
        Ok((removed, bytes))
    }

    /// The size of a stored blob, or `None`.
    pub async fn size(&self, digest: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path(digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlobError::Io(anyhow::Error::from(e).context("stat blob"))),
        }
    }

    pub async fn writer(&self, claimed: &str) -> Result<BlobWriter, BlobError> {
        self.path(claimed)?;
        let temp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.root.join("tmp"))
            .context("create upload file")?;
        let (file, temp_path) = temp.keep().context("keep upload file")?;
        Ok(BlobWriter {
            file: tokio::fs::File::from_std(file),
            temp_path,
            hasher: Sha256::new(),
            bytes: 0,
            claimed: claimed.to_string(),
            max_blob_bytes: self.max_blob_bytes,
        })
    }

    pub async fn open_read(&self, digest: &str) -> Result<tokio::fs::File, BlobError> {
        let path = self.path(digest)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(digest.to_string()))
            }
            Err(e) => Err(BlobError::Io(anyhow::Error::from(e).context("open blob"))),
        }
    }

    pub async fn commit(&self, mut writer: BlobWriter) -> Result<u64, BlobError> {
        let result = writer.finish().await;
        let outcome = match result {
            Ok(()) => {
                let actual = format!(
                    "{DIGEST_PREFIX}{}",
                    hex::encode(writer.hasher.clone().finalize())
                );
                if actual != writer.claimed {
                    Err(BlobError::DigestMismatch {
                        claimed: writer.claimed.clone(),
                        actual,
                    })
                } else {
                    let dest = self.path(&writer.claimed)?;
                    tokio::fs::rename(&writer.temp_path, &dest)
                        .await
                        .context("move upload into place")?;
                    return Ok(writer.bytes);
                }
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&writer.temp_path).await;
        outcome
    }

    /// Throws an unfinished upload away.
    pub async fn abort(&self, writer: BlobWriter) {
        let _ = tokio::fs::remove_file(&writer.temp_path).await;
    }
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.max_blob_bytes {
            return Err(BlobError::TooLarge {
                limit: self.max_blob_bytes,
            });
        }
        self.hasher.update(data);
        self.file.write_all(data).await.context("write upload")?;
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), BlobError> {
        self.file.flush().await.context("flush upload")?;
        self.file.sync_data().await.context("sync upload")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        format!("{DIGEST_PREFIX}{}", hex::encode(Sha256::digest(data)))
    }

    #[tokio::test]
    async fn stores_only_what_matches_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1024).unwrap();
        let good = digest_of(b"hello");
        let mut writer = blobs.writer(&good).await.unwrap();
        writer.write(b"hel").await.unwrap();
        writer.write(b"lo").await.unwrap();
        assert_eq!(blobs.commit(writer).await.unwrap(), 5);
        assert_eq!(blobs.size(&good).await.unwrap(), Some(5));

        let lie = digest_of(b"something else");
        let mut writer = blobs.writer(&lie).await.unwrap();
        writer.write(b"hello").await.unwrap();
        assert!(matches!(
            blobs.commit(writer).await,
            Err(BlobError::DigestMismatch { .. })
        ));
        assert_eq!(blobs.size(&lie).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn refuses_path_like_digests_and_oversized_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 4).unwrap();
        assert!(matches!(
            blobs.path("sha256:../../etc/passwd"),
            Err(BlobError::BadDigest(_))
        ));
        let mut writer = blobs.writer(&digest_of(b"hello")).await.unwrap();
        assert!(matches!(
            writer.write(b"hello").await,
            Err(BlobError::TooLarge { limit: 4 })
        ));
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[tokio::test]
    async fn the_sweep_removes_unnamed_blobs_past_their_grace_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let digest = |n: u8| format!("{DIGEST_PREFIX}{}", hex::encode([n; 32]));
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for n in 1..=4 {
            let path = blobs.path(&digest(n)).unwrap();
            std::fs::write(&path, vec![n; 100]).unwrap();
            if n != 3 {
                std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(long_ago)
                    .unwrap();
            }
        }
        // 4 was idle too, but a client asked for it just now.
        blobs.touch(&digest(4)).await;
        let keep = std::collections::HashSet::from([digest(2)]);
        let (removed, bytes) = blobs
            .sweep(&keep, std::time::Duration::from_secs(3600))
            .unwrap();
        // 1: unnamed and idle. 2: named by a run. 3: young. 4: touched.
        assert_eq!(removed, [digest(1)]);
        assert_eq!(bytes, 100);
        for n in 2..=4 {
            assert!(blobs.size(&digest(n)).await.unwrap().is_some(), "{n}");
        }
        assert!(blobs.size(&digest(1)).await.unwrap().is_none());
    }
}
