//! Submitting through the gRPC API directly, for run settings the CLI has no flag for yet
//! (environments): pack the directory, upload the snapshot unless present, `SubmitRun`.

use std::path::Path;

use kiln_common::snapshot::{self, PackOptions};
use kiln_proto::{Address, v1};

/// Packs `dir`, uploads it and submits `script` on `target` with `environment`; returns the
/// run id.
pub fn submit(
    address: &str,
    target: &str,
    dir: &Path,
    script: &str,
    environment: v1::Environment,
) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime
        .block_on(submit_async(address, target, dir, script, environment))
        .unwrap_or_else(|e| panic!("submit {script} from {}: {e:#}", dir.display()))
}

async fn submit_async(
    address: &str,
    target: &str,
    dir: &Path,
    script: &str,
    environment: v1::Environment,
) -> anyhow::Result<i64> {
    let channel = kiln_proto::connect(&Address::parse(address)?).await?;
    let archive = tempfile::NamedTempFile::new()?;
    let options = PackOptions::default();
    let plan = snapshot::plan(dir, &options)?;
    let packed = {
        let mut out = std::io::BufWriter::new(std::fs::File::create(archive.path())?);
        let packed = snapshot::pack(&plan, &options, &mut out, &mut |_| {})?;
        std::io::Write::flush(&mut out)?;
        packed
    };
    let mut blobs = kiln_proto::clients::blobs(channel.clone());
    let present = blobs
        .has_blob(v1::HasBlobRequest {
            digest: packed.digest.clone(),
        })
        .await?
        .into_inner()
        .present;
    if !present {
        let chunks =
            kiln_proto::blob_chunks(archive.path(), &packed.digest, packed.compressed_bytes)
                .await?;
        blobs.upload_blob(chunks).await?;
    }
    let run = kiln_proto::clients::kiln(channel)
        .submit_run(v1::SubmitRunRequest {
            target: target.to_string(),
            snapshot_digest: packed.digest,
            script: script.to_string(),
            environment: Some(environment),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(run.id)
}
