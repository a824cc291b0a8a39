//! Submitting runs through the public gRPC API, as `kiln submit` does (pack the directory,
//! upload the snapshot unless the coordinator has it, `SubmitRun`), for tests that build the
//! request themselves.

use std::path::Path;

use kiln_common::snapshot::{self, PackOptions};
use kiln_proto::{Address, v1};

/// Packs and uploads `dir`, then submits `request` with the snapshot filled in; returns the
/// run id. Panics with the coordinator's message if it refuses.
pub fn submit_request(address: &str, dir: &Path, mut request: v1::SubmitRunRequest) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let address = Address::parse(address).expect("coordinator address");
        let channel = kiln_proto::connect(&address).await.expect("connect");
        let archive = tempfile::NamedTempFile::new().expect("temp file");
        let packed = snapshot::pack_dir_to_file(dir, &PackOptions::default(), archive.path())
            .expect("pack the snapshot");
        let mut blobs = kiln_proto::clients::blobs(channel.clone(), kiln_proto::Bearer::none());
        let present = blobs
            .has_blob(v1::HasBlobRequest {
                digest: packed.digest.clone(),
            })
            .await
            .expect("HasBlob")
            .into_inner()
            .present;
        if !present {
            let chunks =
                kiln_proto::blob_chunks(archive.path(), &packed.digest, packed.compressed_bytes)
                    .await
                    .expect("read the snapshot");
            blobs.upload_blob(chunks).await.expect("UploadBlob");
        }
        request.snapshot_digest = packed.digest;
        kiln_proto::clients::kiln(channel, kiln_proto::Bearer::none())
            .submit_run(request)
            .await
            .unwrap_or_else(|status| panic!("SubmitRun refused: {}", status.message()))
            .into_inner()
            .id
    })
}

/// Submits `script` from `dir` on `target` with `environment`; returns the run id.
pub fn submit(
    address: &str,
    target: &str,
    dir: &Path,
    script: &str,
    environment: v1::Environment,
) -> i64 {
    submit_request(
        address,
        dir,
        v1::SubmitRunRequest {
            target: target.to_string(),
            script: script.to_string(),
            environment: Some(environment),
            ..Default::default()
        },
    )
}

/// A run request in a Docker environment with `image` (auto, cpu, gpu or a reference).
pub fn docker_run(target: &str, script: &str, image: &str) -> v1::SubmitRunRequest {
    v1::SubmitRunRequest {
        target: target.to_string(),
        script: script.to_string(),
        environment: Some(v1::Environment {
            kind: Some(v1::environment::Kind::Docker(v1::DockerEnvironment {
                image: image.to_string(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}
