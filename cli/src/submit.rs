//! `kiln submit` and the commands that move run data: snapshot → upload → submit → follow,
//! following logs with reconnects, and downloading outputs.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_common::run::exit_codes;
use kiln_common::snapshot::{self, PackOptions, UnpackLimits};
use kiln_common::target::{LOCAL_TARGET, TargetName};
use kiln_proto::v1::{self, kiln_client::KilnClient};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::{Connection, status_error};

/// Default snapshot size cap, checked before anything is uploaded.
const DEFAULT_MAX_SNAPSHOT: &str = "2GiB";
/// Above this a snapshot's biggest items are listed even when it is under the cap.
const LARGE_SNAPSHOT_BYTES: u64 = 100 << 20;

/// Snapshot DIR, upload it if the coordinator lacks it, submit SCRIPT and follow its output.
///
/// Exits with the script's exit code (125 when the run could not start, 130 when it was
/// cancelled). Ctrl-C stops following, not the run. DIR's .gitignore and .kilnignore are
/// honoured; .git/, virtualenvs and __pycache__/ are left out unless re-included with a
/// `!pattern` line in .kilnignore.
///
/// Examples:
///   kiln submit examples/quickstart train.py
///   kiln submit --target gpu --name lr-sweep . train.py -- --lr 0.01
///   kiln submit --detach . train.py
///   kiln submit --dry-run . train.py      # what would be uploaded, nothing sent
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct SubmitArgs {
    /// The compute target (default: `local` without a coordinator).
    #[arg(long, env = "KILN_TARGET")]
    target: Option<String>,
    /// A name for the run (default: the script's file name).
    #[arg(long)]
    name: Option<String>,
    /// Return once submitted; print the run id on stdout.
    #[arg(long)]
    detach: bool,
    /// Place the run again, up to this many times, when its agent is lost.
    #[arg(long, default_value_t = 0)]
    max_retries: u32,
    /// Upload $KILN_CHECKPOINT_DIR every this many seconds (and when the script ends), and
    /// restore the last upload when the run is retried (see --max-retries). 0: off.
    #[arg(long, default_value_t = 0)]
    checkpoint_interval: u32,
    /// Run on this many agents of the target at once (a distributed run: every process gets
    /// torchrun's variables MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, ...).
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Processes to start on each node (one per GPU, typically).
    #[arg(long, default_value_t = 1)]
    procs_per_node: u32,
    /// GPUs each node needs; CUDA_VISIBLE_DEVICES gives each local rank its share.
    #[arg(long, default_value_t = 0)]
    gpus_per_node: u32,
    /// `kiln`: Kiln starts --procs-per-node processes per node. `none`: one process per node
    /// that starts its own workers (e.g. `torchrun train.py`, which reads the PET_* variables).
    #[arg(long, default_value = "kiln")]
    launcher: String,
    /// Restart the whole gang (new rendezvous) this many times when a rank fails or a node
    /// is lost, before the run fails.
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// Plan and pack the snapshot and print what would be submitted; contact no coordinator.
    #[arg(long)]
    dry_run: bool,
    /// Refuse snapshots larger than this before uploading (e.g. 500MB, 2GiB).
    #[arg(long, env = "KILN_MAX_SNAPSHOT_SIZE", default_value = DEFAULT_MAX_SNAPSHOT)]
    max_snapshot_size: String,
    /// The source directory to snapshot.
    dir: PathBuf,
    /// The script to run, relative to DIR (a .py file runs with the agent's Python; an
    /// executable file runs directly).
    script: String,
    /// Arguments for the script (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

pub async fn submit(connection: &Connection, args: SubmitArgs) -> anyhow::Result<i32> {
    let target = match (&args.target, connection.local) {
        (Some(target), _) => target.clone(),
        (None, true) => LOCAL_TARGET.to_string(),
        (None, false) => anyhow::bail!(
            "--target is required with a coordinator: name the compute target to run on (see `kiln targets`)"
        ),
    };
    let target = TargetName::new(&target)?;
    let max_bytes = parse_size(&args.max_snapshot_size)?;
    let dir = args.dir.clone();
    anyhow::ensure!(dir.is_dir(), "directory `{}` does not exist", dir.display());
    let script = args.script.trim_start_matches("./").to_string();
    let interactive = std::io::stderr().is_terminal();

    // Plan the snapshot: what goes in, and whether it is too big, before any upload.
    let options = PackOptions::default();
    let plan = {
        let (dir, options) = (dir.clone(), options.clone());
        tokio::task::spawn_blocking(move || snapshot::plan(&dir, &options)).await??
    };
    if !plan.contains(&script) {
        if dir.join(&script).is_file() {
            anyhow::bail!(
                "script `{script}` is excluded from the snapshot by an ignore rule (.gitignore, .kilnignore or a default); add `!{script}` to {}/.kilnignore",
                dir.display()
            );
        }
        anyhow::bail!("script `{script}` does not exist in `{}`", dir.display());
    }
    if plan.total_bytes > max_bytes {
        anyhow::bail!(
            "snapshot of `{}` is {} ({} files), over the limit of {}.\n{}\nRaise the limit with --max-snapshot-size if this is intended.",
            dir.display(),
            HumanBytes(plan.total_bytes),
            plan.n_files(),
            HumanBytes(max_bytes),
            biggest_items_advice(&plan, &dir)
        );
    }
    if plan.total_bytes > LARGE_SNAPSHOT_BYTES {
        eprintln!(
            "note: the snapshot is large ({}).\n{}",
            HumanBytes(plan.total_bytes),
            biggest_items_advice(&plan, &dir)
        );
    }

    if args.dry_run {
        let biggest = plan.biggest_items(5);
        let (_archive, packed) = pack_snapshot(plan, options, interactive).await?;
        println!("target          {target}");
        println!("script          {script} {}", args.args.join(" "));
        println!("snapshot        {}", packed.digest);
        println!("files           {}", packed.n_files);
        println!(
            "size            {} ({} compressed)",
            HumanBytes(packed.uncompressed_bytes),
            HumanBytes(packed.compressed_bytes)
        );
        for (item, bytes) in biggest {
            println!("  {item:<30} {:>10}", HumanBytes(bytes).to_string());
        }
        return Ok(0);
    }

    // Connect and check the target before packing and uploading.
    let channel = connection.channel().await?;
    let mut client = kiln_proto::clients::kiln(channel.clone());
    let targets = client
        .list_targets(v1::ListTargetsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .targets;
    if !targets.iter().any(|t| t.name == target.as_str()) {
        let known: Vec<_> = targets.iter().map(|t| t.name.as_str()).collect();
        anyhow::bail!(
            "target `{target}` does not exist on the coordinator at {} (known targets: {})",
            connection.address,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }

    let (archive, packed) = pack_snapshot(plan, options, interactive).await?;

    // Upload unless the coordinator already has this digest.
    let mut blobs = kiln_proto::clients::blobs(channel.clone());
    let present = blobs
        .has_blob(v1::HasBlobRequest {
            digest: packed.digest.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .present;
    let uploaded = if present {
        0
    } else {
        let bar = progress_bar(interactive, packed.compressed_bytes, "uploading");
        let chunks =
            kiln_proto::blob_chunks(archive.path(), &packed.digest, packed.compressed_bytes)
                .await?;
        let bar_in = bar.clone();
        let mut sent = 0u64;
        let chunks = chunks.map(move |chunk| {
            sent += chunk.data.len() as u64;
            bar_in.set_position(sent);
            chunk
        });
        blobs
            .upload_blob(chunks)
            .await
            .map_err(status_error)
            .context("upload the snapshot")?;
        bar.finish_and_clear();
        packed.compressed_bytes
    };
    eprintln!(
        "snapshot {} ({} files, {}): uploaded {uploaded} bytes",
        packed.digest,
        packed.n_files,
        HumanBytes(packed.uncompressed_bytes),
    );

    let run = client
        .submit_run(v1::SubmitRunRequest {
            name: args.name.unwrap_or_default(),
            target: target.to_string(),
            snapshot_digest: packed.digest,
            script,
            args: args.args,
            max_retries: args.max_retries,
            checkpoint_interval_s: args.checkpoint_interval,
            nodes: args.nodes,
            procs_per_node: args.procs_per_node,
            launcher: args.launcher,
            max_restarts: args.max_restarts,
            gpus_per_node: args.gpus_per_node,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!("run {} submitted to target {}", run.id, run.target);
    if args.detach {
        println!("{}", run.id);
        return Ok(0);
    }
    match follow(connection, run.id, 0, None).await? {
        Followed::Ended(code) => {
            print_metrics_summary(&mut client, run.id).await;
            Ok(code)
        }
        Followed::Detached => Ok(exit_codes::CANCELLED),
    }
}

/// One line with the last value of each user metric, after a followed run ended.
async fn print_metrics_summary(client: &mut KilnClient<Channel>, run_id: i64) {
    let request = v1::ListMetricsRequest { run_id, rank: None };
    let Ok(reply) = client.list_metrics(request).await else {
        return;
    };
    let user: Vec<String> = reply
        .into_inner()
        .metrics
        .iter()
        .filter(|m| !m.name.starts_with("system/"))
        .map(|m| match m.last_step {
            Some(step) => format!(
                "{}={} (step {step})",
                m.name,
                crate::output::number(m.last_value)
            ),
            None => format!("{}={}", m.name, crate::output::number(m.last_value)),
        })
        .collect();
    if !user.is_empty() {
        eprintln!(
            "[kiln] metrics: {}; all of them: kiln metrics {run_id}",
            user.join(", ")
        );
    }
}

/// Packs the plan into a temporary file, hashing as it goes, with a progress bar on a terminal.
async fn pack_snapshot(
    plan: snapshot::Plan,
    options: PackOptions,
    interactive: bool,
) -> anyhow::Result<(tempfile::NamedTempFile, snapshot::Packed)> {
    let archive =
        tempfile::NamedTempFile::new().context("create a temporary file for the snapshot")?;
    let bar = progress_bar(interactive, plan.total_bytes, "packing");
    let path = archive.path().to_path_buf();
    let bar_in = bar.clone();
    let packed = tokio::task::spawn_blocking(move || -> anyhow::Result<snapshot::Packed> {
        let file = std::fs::File::create(&path)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let packed = snapshot::pack(&plan, &options, &mut out, &mut |bytes| {
            bar_in.set_position(bytes)
        })?;
        std::io::Write::flush(&mut out)?;
        Ok(packed)
    })
    .await??;
    bar.finish_and_clear();
    Ok((archive, packed))
}

fn biggest_items_advice(plan: &snapshot::Plan, dir: &Path) -> String {
    let mut lines = vec![format!(
        "Biggest items (add a line to {}/.kilnignore to leave one out):",
        dir.display()
    )];
    for (item, bytes) in plan.biggest_items(5) {
        lines.push(format!(
            "  {item:<30} {:>10}   .kilnignore: {}",
            HumanBytes(bytes).to_string(),
            snapshot::ignore_line_for(&item)
        ));
    }
    lines.join("\n")
}

fn progress_bar(interactive: bool, total: u64, what: &'static str) -> ProgressBar {
    if !interactive {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

/// Parses sizes as users write them: 1000, 500MB, 2GiB, 1.5G.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("`{text}` is not a size: write e.g. 500MB or 2GiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => anyhow::bail!("`{other}` is not a size unit: use B, KB, MB, GB, KiB, MiB or GiB"),
    };
    Ok((number * multiplier as f64) as u64)
}

/// Prints a run's log as stored so far (one rank's lines only, with `rank`).
pub async fn print_logs(
    client: &mut KilnClient<Channel>,
    run_id: i64,
    rank: Option<u32>,
) -> anyhow::Result<()> {
    let mut stream = client
        .stream_logs(v1::StreamLogsRequest {
            run_id,
            after_cursor: 0,
            follow: false,
            rank,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(item) = stream.next().await {
        for line in item.map_err(status_error)?.lines {
            print_line(&line);
        }
    }
    Ok(())
}

/// Prints a line to stdout or stderr as the script wrote it; a distributed run's lines start
/// with their rank (`[rank 3] `), Kiln's own lines with `[kiln]` (and the node, past node 0).
fn print_line(line: &v1::LogLine) {
    let rank = line
        .rank
        .map(|r| format!("[rank {r}] "))
        .unwrap_or_default();
    match line.stream() {
        v1::LogStream::Stdout => println!("{rank}{}", line.text),
        v1::LogStream::Stderr => eprintln!("{rank}{}", line.text),
        _ if line.node > 0 => eprintln!("[kiln node {}] {}", line.node, line.text),
        _ => eprintln!("[kiln] {}", line.text),
    }
}

/// How following a run stopped.
pub enum Followed {
    /// The run ended; `kiln submit` exits with this code.
    Ended(i32),
    /// The user pressed Ctrl-C; the run goes on.
    Detached,
}

/// Follows a run's log until it ends (or the user detaches with Ctrl-C).
/// A broken stream (coordinator restart) is resumed after the last line shown; Ctrl-C stops
/// following and leaves the run alone.
pub async fn follow(
    connection: &Connection,
    run_id: i64,
    mut cursor: i64,
    rank: Option<u32>,
) -> anyhow::Result<Followed> {
    let mut backoff = Duration::from_millis(200);
    let mut broken_since: Option<Instant> = None;
    let mut announced = false;
    loop {
        let attempt = async {
            let channel = connection.channel().await?;
            let mut client = kiln_proto::clients::kiln(channel);
            let mut stream = client
                .stream_logs(v1::StreamLogsRequest {
                    run_id,
                    after_cursor: cursor,
                    follow: true,
                    rank,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(item) = stream.next().await {
                let item = item.map_err(status_error)?;
                for line in &item.lines {
                    print_line(line);
                    cursor = line.cursor;
                }
                if let Some(run) = item.finished {
                    return anyhow::Ok(Some(run));
                }
            }
            Ok(None)
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = tokio::signal::ctrl_c() => {
                eprintln!(
                    "\nStopped following; run {run_id} keeps running. Re-attach with: kiln logs {run_id} --follow"
                );
                return Ok(Followed::Detached);
            }
        };
        match result {
            Ok(Some(run)) => return Ok(Followed::Ended(report_end(&run))),
            Ok(None) | Err(_) => {
                if let Err(error) = &result {
                    let since = *broken_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(600) {
                        return Err(
                            anyhow::anyhow!("{error:#}").context("gave up following the run")
                        );
                    }
                    if error.to_string().contains("does not exist") {
                        return Err(anyhow::anyhow!("{error:#}"));
                    }
                }
                if !announced {
                    eprintln!("[kiln] log stream interrupted; reconnecting…");
                    announced = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Prints how the run ended and returns the exit code for it.
fn report_end(run: &v1::Run) -> i32 {
    let took = crate::output::duration_s(run)
        .map(|s| format!(" in {s:.1}s"))
        .unwrap_or_default();
    let status = run.status().domain();
    let detail = if run.message.is_empty() {
        String::new()
    } else {
        format!(": {}", run.message)
    };
    eprintln!("[kiln] run {} {status}{took}{detail}", run.id);
    match run.status() {
        v1::RunStatus::Succeeded => 0,
        v1::RunStatus::Cancelled => exit_codes::CANCELLED,
        v1::RunStatus::Lost => exit_codes::LOST,
        _ => match run.exit_code {
            Some(code) if code != 0 => code,
            _ => exit_codes::DID_NOT_START,
        },
    }
}

/// Downloads a run's outputs into `dest` (created; must be empty if it exists).
pub async fn download(connection: &Connection, run_id: i64, dest: &Path) -> anyhow::Result<()> {
    let channel = connection.channel().await?;
    let run = kiln_proto::clients::kiln(channel.clone())
        .get_run(v1::GetRunRequest { run_id })
        .await
        .map_err(status_error)?
        .into_inner();
    if run.outputs_digest.is_empty() {
        anyhow::bail!(
            "run {run_id} has no outputs yet (status: {}); outputs are uploaded when a run ends",
            run.status().domain()
        );
    }
    if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
        anyhow::bail!(
            "`{}` is not empty: choose another destination",
            dest.display()
        );
    }
    let archive = tempfile::NamedTempFile::new()?;
    let mut file = tokio::fs::File::from_std(archive.reopen()?);
    let mut stream = kiln_proto::clients::blobs(channel)
        .download_blob(v1::DownloadBlobRequest {
            digest: run.outputs_digest.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(chunk) = stream.next().await {
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.map_err(status_error)?.data).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file).await?;
    drop(file);
    let (path, dest_owned, digest) = (
        archive.path().to_path_buf(),
        dest.to_path_buf(),
        run.outputs_digest.clone(),
    );
    let unpacked = tokio::task::spawn_blocking(move || -> anyhow::Result<snapshot::Unpacked> {
        let actual = snapshot::digest_file(&path)?;
        anyhow::ensure!(
            actual == digest,
            "downloaded outputs hash to {actual}, expected {digest}"
        );
        std::fs::create_dir_all(&dest_owned)?;
        let mut reader = std::io::BufReader::new(std::fs::File::open(&path)?);
        Ok(snapshot::unpack(
            &mut reader,
            &dest_owned,
            &UnpackLimits::default(),
        )?)
    })
    .await??;
    eprintln!(
        "downloaded outputs of run {run_id} to {} ({} files, {})",
        dest.display(),
        unpacked.n_files,
        HumanBytes(unpacked.total_bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5 G").unwrap(), 1_500_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
