//! Blob transfers of an attempt: the snapshot (cached by digest, verified at every use),
//! checkpoints, and packing and uploading a directory the script wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::snapshot::{self, DIGEST_PREFIX, PackOptions, UnpackLimits};
use kiln_proto::v1::{self, agent_message::Kind as Up};
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

use super::SystemLines;
use crate::Agent;
use crate::session::up;

/// The snapshot archive in the local cache, downloading it first if needed.
pub(super) async fn fetch_snapshot(
    agent: &Agent,
    digest: &str,
    system: &mut SystemLines,
) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        snapshot::is_valid_digest(digest),
        "invalid snapshot digest `{digest}`"
    );
    let hex = &digest[DIGEST_PREFIX.len()..];
    let cached = agent
        .config
        .data_dir
        .join("snapshots")
        .join(format!("{hex}.tar.zst"));
    if cached.is_file() {
        // Verified at every use: a damaged archive (bit rot, a half-written copy, a careless
        // hand) must cost one download, not fail every later run of this snapshot here.
        let path = cached.clone();
        let actual = tokio::task::spawn_blocking(move || snapshot::digest_file(&path)).await?;
        match actual {
            Ok(actual) if actual == digest => {
                // Its last use, for the cache's least-recently-used order.
                let path = cached.clone();
                let _ = tokio::task::spawn_blocking(move || touch(&path)).await;
                system.line(&format!(
                    "Snapshot {} found in the agent's cache.",
                    short(digest)
                ));
                return Ok(cached);
            }
            Ok(_) | Err(_) => {
                warn!(path = %cached.display(), "Cached snapshot is damaged; fetching it again.");
                system.line(&format!(
                    "Snapshot {} in the agent's cache is damaged (it no longer hashes to its digest); fetching it again.",
                    short(digest)
                ));
                let path = cached.clone();
                tokio::task::spawn_blocking(move || std::fs::remove_file(path))
                    .await?
                    .with_context(|| format!("remove the damaged {}", cached.display()))?;
            }
        }
    }
    let (temp, bytes) =
        download_blob(agent, digest, "Snapshot", &mut |line| system.line(line)).await?;
    temp.persist(&cached).map_err(|e| e.error)?;
    let (dir, max) = (
        agent.config.data_dir.join("snapshots"),
        agent.config.snapshot_cache_max_bytes,
    );
    let evicted = tokio::task::spawn_blocking(move || evict_snapshots(&dir, max, EVICT_NOT_BEFORE))
        .await
        .unwrap_or_default();
    if !evicted.is_empty() {
        let bytes: u64 = evicted.iter().map(|(_, bytes)| bytes).sum();
        info!(
            archives = evicted.len(),
            bytes, "Snapshot cache over snapshot_cache_max_bytes: removed the least recently used."
        );
    }
    system.line(&format!(
        "Snapshot {} fetched ({bytes} bytes).",
        short(digest)
    ));
    Ok(cached)
}

/// A cached snapshot used this recently is never evicted: another attempt may be about to
/// unpack it.
const EVICT_NOT_BEFORE: Duration = Duration::from_secs(600);

fn touch(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .append(true)
        .open(path)?
        .set_modified(std::time::SystemTime::now())
}

/// Removes the least recently used (oldest mtime) snapshot archives of `dir` while their
/// total is over `max_bytes`, sparing those used within `not_before`. Returns what it
/// removed, with sizes.
fn evict_snapshots(dir: &Path, max_bytes: u64, not_before: Duration) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut archives: Vec<(std::time::SystemTime, PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.zst"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file()
                .then(|| Some((meta.modified().ok()?, e.path(), meta.len())))?
        })
        .collect();
    let mut total: u64 = archives.iter().map(|(_, _, bytes)| bytes).sum();
    archives.sort();
    let mut removed = Vec::new();
    for (used, path, bytes) in archives {
        if total <= max_bytes {
            break;
        }
        if used.elapsed().unwrap_or_default() < not_before {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= bytes;
            removed.push((path, bytes));
        }
    }
    removed
}

/// How many times a blob download is tried before the run fails, and the first wait
/// between tries (doubling: 0.5 + 1 + 2 + 4 + 8 s, enough for a coordinator restart).
const DOWNLOAD_TRIES: u32 = 6;

const DOWNLOAD_RETRY_FIRST: Duration = Duration::from_millis(500);

use kiln_proto::transfer::{TransferFailure, failure as transfer_failure};

/// Downloads a blob into a temporary file and checks that it hashes to its digest, trying
/// again with backoff when the transfer broke (a coordinator restart, a reset connection,
/// bytes that do not hash to the digest); each retry is said in the run's log through
/// `say`. `what` names the blob there ("Snapshot", "Checkpoint").
async fn download_blob(
    agent: &Agent,
    digest: &str,
    what: &str,
    say: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<(tempfile::NamedTempFile, u64)> {
    let mut wait = DOWNLOAD_RETRY_FIRST;
    let mut tries = 0;
    loop {
        tries += 1;
        let error = match download_blob_once(agent, digest).await {
            Ok(downloaded) => return Ok(downloaded),
            Err(error) => error,
        };
        let transient = error
            .chain()
            .find_map(|e| e.downcast_ref::<TransferFailure>())
            .is_none_or(|failure| failure.transient);
        if !transient || tries >= DOWNLOAD_TRIES {
            return Err(error.context(format!(
                "{what} {} could not be downloaded (try {tries} of {DOWNLOAD_TRIES})",
                short(digest)
            )));
        }
        say(&format!(
            "{what} {} download failed: {error:#}; trying again in {:.1}s (try {} of {DOWNLOAD_TRIES}).",
            short(digest),
            wait.as_secs_f64(),
            tries + 1
        ));
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}

/// One try of [`download_blob`].
async fn download_blob_once(
    agent: &Agent,
    digest: &str,
) -> anyhow::Result<(tempfile::NamedTempFile, u64)> {
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel, kiln_proto::Bearer::none());
    let mut stream = client
        .download_blob(v1::DownloadBlobRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|s| transfer_failure(&s))?
        .into_inner();
    let mut file = tokio::fs::File::from_std(temp.reopen()?);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| transfer_failure(&s))?;
        bytes += chunk.data.len() as u64;
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.data).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    drop(file);
    let path = temp.path().to_path_buf();
    let actual = tokio::task::spawn_blocking(move || snapshot::digest_file(&path)).await??;
    if actual != digest {
        return Err(TransferFailure {
            words: format!(
                "the bytes received hash to {actual}, not to {digest} (damaged in transit)"
            ),
            transient: true,
        }
        .into());
    }
    Ok((temp, bytes))
}

/// Restores a checkpoint blob into `dir` (empty).
pub(super) async fn restore_checkpoint(
    agent: &Agent,
    digest: &str,
    dir: &Path,
    system: &mut SystemLines,
) -> anyhow::Result<u64> {
    let (archive, _) =
        download_blob(agent, digest, "Checkpoint", &mut |line| system.line(line)).await?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut file = std::io::BufReader::new(std::fs::File::open(archive.path())?);
        Ok(snapshot::unpack(&mut file, &dir, &UnpackLimits::default())?.n_files)
    })
    .await?
}

/// Packs `dir` and, if it differs from `last`, uploads it and tells the coordinator.
/// Returns the new digest.
pub(super) async fn upload_checkpoint(
    agent: Arc<Agent>,
    run_id: i64,
    attempt: u32,
    dir: PathBuf,
    last: Option<String>,
) -> anyhow::Result<Option<String>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let digest = upload_dir(&agent, &dir)
        .await
        .context("upload the checkpoint")?;
    if last.as_deref() == Some(digest.as_str()) {
        return Ok(None);
    }
    let event = up(Up::RunEvent(v1::RunEvent {
        run_id,
        attempt,
        kind: Some(v1::run_event::Kind::Checkpointed(v1::Checkpointed {
            digest: digest.clone(),
        })),
    }));
    let _ = agent.uplink.send(event).await;
    Ok(Some(digest))
}

pub(super) fn short(digest: &str) -> &str {
    let end = (DIGEST_PREFIX.len() + 12).min(digest.len());
    &digest[..end]
}

pub(super) async fn unpack(archive: &Path, work: &Path) -> anyhow::Result<()> {
    let archive = archive.to_path_buf();
    let work = work.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::create_dir_all(&work)?;
        let mut file = std::io::BufReader::new(std::fs::File::open(&archive)?);
        snapshot::unpack(&mut file, &work, &UnpackLimits::default())?;
        Ok(())
    })
    .await?
}

/// Packs a directory the run's script wrote (no ignore rules, nothing outside it: see
/// [`snapshot::pack_untrusted_dir`]) and uploads it unless the coordinator has it.
/// How many entries left out of a packed directory are logged one by one.
const MAX_SKIPPED_LOGGED: usize = 10;

pub(super) async fn upload_dir(agent: &Agent, outputs: &Path) -> anyhow::Result<String> {
    let temp = tempfile::NamedTempFile::new_in(agent.config.data_dir.join("snapshots/tmp"))?;
    let (dir, dest) = (outputs.to_path_buf(), temp.path().to_path_buf());
    let untrusted = tokio::task::spawn_blocking(move || {
        snapshot::pack_untrusted_dir(&dir, PackOptions::default().level, &dest)
    })
    .await??;
    for skipped in untrusted.skipped.iter().take(MAX_SKIPPED_LOGGED) {
        warn!(dir = %outputs.display(), entry = %skipped, "Left out of the packed directory.");
    }
    if untrusted.skipped.len() > MAX_SKIPPED_LOGGED {
        warn!(dir = %outputs.display(), n_more = untrusted.skipped.len() - MAX_SKIPPED_LOGGED, "More entries were left out of the packed directory.");
    }
    let packed = untrusted.packed;
    let channel = agent.coordinator_channel().await;
    let mut client = kiln_proto::clients::blobs(channel.clone(), kiln_proto::Bearer::none());
    let present = client
        .has_blob(v1::HasBlobRequest {
            digest: packed.digest.clone(),
        })
        .await?
        .into_inner()
        .present;
    if !present {
        let chunks =
            kiln_proto::blob_chunks(temp.path(), &packed.digest, packed.compressed_bytes).await?;
        client.upload_blob(chunks).await.context("upload outputs")?;
    }
    Ok(packed.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_cache_evicts_the_least_recently_used_and_spares_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let archive = |name: &str, bytes: usize, hours_ago: u64| {
            let path = dir.path().join(format!("{name}.tar.zst"));
            std::fs::write(&path, vec![0u8; bytes]).unwrap();
            std::fs::File::options()
                .append(true)
                .open(&path)
                .unwrap()
                .set_modified(now - Duration::from_secs(hours_ago * 3600))
                .unwrap();
            path
        };
        let oldest = archive("a", 400, 5);
        let old = archive("b", 400, 3);
        let recent = archive("c", 400, 0);
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        // 1200 bytes, limit 500: the two old ones go, oldest first; the one used just now
        // stays even though the cache is still over.
        let removed = evict_snapshots(dir.path(), 500, Duration::from_secs(600));
        assert_eq!(removed, [(oldest.clone(), 400), (old.clone(), 400)]);
        assert!(recent.exists());
        // Under the limit: nothing goes. Touched: it counts as used now.
        let b = archive("b", 400, 3);
        touch(&b).unwrap();
        assert!(evict_snapshots(dir.path(), 1000, Duration::ZERO).is_empty());
        assert_eq!(
            evict_snapshots(dir.path(), 500, Duration::ZERO),
            [(recent, 400)]
        );
    }
}
