//! `kiln submit` and the commands that move run data: snapshot → upload → submit → follow,
//! following logs with reconnects, and downloading outputs.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_common::run::exit_codes;
use kiln_common::snapshot::{self, PackOptions, UnpackLimits};
use kiln_common::target::LOCAL_TARGET;
use kiln_proto::v1::{self, kiln_client::KilnClient};
use tokio_stream::StreamExt as _;

use crate::output::{errln, out, outln};

/// How many times `kiln submit` tries to upload a snapshot when the transfer breaks (waits
/// 0.5 + 1 + 2 + 4 + 8 s between tries: a coordinator restart fits).
const UPLOAD_TRIES: u32 = 6;
use crate::{Connection, runconfig, status_error};

/// Default snapshot size cap, checked before anything is uploaded.
const DEFAULT_MAX_SNAPSHOT: &str = "2GiB";
/// Above this a snapshot's biggest items are listed even when it is under the cap.
const LARGE_SNAPSHOT_BYTES: u64 = 100 << 20;

/// Snapshot DIR, upload it if the coordinator lacks it, submit SCRIPT and follow its output.
///
/// DIR/kiln.yaml (or --config FILE), when present, configures the run: script, args, target,
/// environment, resources, env, timeout, retries, distributed keys. Flags override it.
///
/// Exits with the script's exit code (125 when the run could not start, 130 when it was
/// cancelled). Ctrl-C stops following, not the run. DIR's .gitignore and .kilnignore are
/// honoured; .git/, virtualenvs and __pycache__/ are left out unless re-included with a
/// `!pattern` line in .kilnignore.
///
/// Examples:
///   kiln submit examples/quickstart train.py
///   kiln submit examples/quickstart          # script and args from examples/quickstart/kiln.yaml
///   kiln submit --target gpu --name lr-sweep . train.py -- --lr 0.01
///   kiln submit --env SEED=7 --timeout 2h --gpus 1 . train.py
///   kiln submit --detach . train.py
///   kiln submit --json . train.py > run.json   # the ended run as JSON; the log on stderr
///   kiln submit --dry-run .                  # the effective configuration and snapshot, nothing sent
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct SubmitArgs {
    /// The run configuration file (default: DIR/kiln.yaml when it exists), relative to the
    /// current directory.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The compute target (default: `local` without a coordinator).
    #[arg(long, env = "KILN_TARGET")]
    target: Option<String>,
    /// A name for the run (default: the script's file name).
    #[arg(long)]
    name: Option<String>,
    /// Return once submitted; print the run id on stdout.
    #[arg(long)]
    detach: bool,
    /// Print the run as JSON on stdout (the fields of `kiln show --json`): once submitted
    /// with --detach, else once it ended; the followed log then goes to stderr.
    #[arg(long)]
    json: bool,
    /// An environment variable for the script (repeatable; adds to and overrides `env:`).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = runconfig::parse_env_flag)]
    env: Vec<(String, String)>,
    /// A secret variable for the script, by name (repeatable; adds to `secrets:`): its value
    /// is read from your environment, stored encrypted, masked in the run's logs and never
    /// shown by `kiln show`.
    #[arg(long = "secret", value_name = "NAME")]
    secret: Vec<String>,
    /// Run with this interpreter on the agent (a user-managed environment; replaces the
    /// file's `environment:`).
    #[arg(long, value_name = "PATH")]
    python: Option<String>,
    /// CPUs each node of the run needs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory each node of the run needs (e.g. 16GiB, 500MB, or bytes).
    #[arg(long)]
    memory: Option<runconfig::Size>,
    /// GPUs each node of the run needs.
    #[arg(long)]
    gpus: Option<u32>,
    /// Stop the run after this long: seconds, or e.g. 90s, 30m, 2h (0: no limit).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<runconfig::Seconds>,
    /// Place the run again, up to this many times, when its agent is lost (default 0).
    #[arg(long)]
    max_retries: Option<u32>,
    /// Upload $KILN_CHECKPOINT_DIR every this long (seconds, or e.g. 5m) and when the script
    /// ends, and restore the last upload when the run is retried (see --max-retries). 0: off.
    #[arg(long, value_name = "DURATION")]
    checkpoint_interval: Option<runconfig::Seconds>,
    /// Run on this many agents of the target at once (a distributed run: every process gets
    /// torchrun's variables MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, ...).
    /// Default 1.
    #[arg(long)]
    nodes: Option<u32>,
    /// Processes to start on each node (one per GPU, typically). Default 1.
    #[arg(long)]
    procs_per_node: Option<u32>,
    /// GPUs each node needs; CUDA_VISIBLE_DEVICES gives each local rank its share.
    #[arg(long)]
    gpus_per_node: Option<u32>,
    /// `kiln` (default): Kiln starts --procs-per-node processes per node. `none`: one process
    /// per node that starts its own workers (e.g. `torchrun train.py`, which reads the PET_*
    /// variables).
    #[arg(long)]
    launcher: Option<runconfig::Launcher>,
    /// Restart the whole gang (new rendezvous) this many times when a rank fails or a node
    /// is lost, before the run fails (default 0).
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Print the effective run configuration (file and flags merged) and plan and pack the
    /// snapshot; contact no coordinator.
    #[arg(long)]
    dry_run: bool,
    /// Refuse snapshots larger than this before uploading (e.g. 500MB, 2GiB).
    #[arg(long, env = "KILN_MAX_SNAPSHOT_SIZE", default_value = DEFAULT_MAX_SNAPSHOT)]
    max_snapshot_size: String,
    /// The source directory to snapshot.
    dir: PathBuf,
    /// The script to run, relative to DIR (a .py file runs with the agent's Python; an
    /// executable file runs directly). Optional when the run configuration names one.
    script: Option<String>,
    /// Arguments for the script (after `--`; they replace the configuration's `args:`).
    #[arg(last = true)]
    args: Vec<String>,
}

impl SubmitArgs {
    /// The flags as a configuration layer: only what was given on the command line (or, for
    /// --target, in KILN_TARGET).
    fn layer(&self) -> runconfig::Layer {
        let resources = runconfig::Resources {
            cpus: self.cpus,
            memory: self.memory,
            gpus: self.gpus,
        };
        runconfig::Layer {
            script: self.script.clone(),
            args: (!self.args.is_empty())
                .then(|| self.args.iter().cloned().map(runconfig::Text).collect()),
            target: self.target.clone(),
            name: self.name.clone(),
            environment: self.python.clone().map(|python| {
                runconfig::Environment::User(runconfig::UserEnv {
                    python: Some(python),
                })
            }),
            resources: (resources != runconfig::Resources::default()).then_some(resources),
            env: (!self.env.is_empty()).then(|| {
                self.env
                    .iter()
                    .map(|(key, value)| (key.clone(), runconfig::Text(value.clone())))
                    .collect()
            }),
            secrets: (!self.secret.is_empty()).then(|| self.secret.clone()),
            max_retries: self.max_retries,
            timeout: self.timeout,
            nodes: self.nodes,
            procs_per_node: self.procs_per_node,
            gpus_per_node: self.gpus_per_node,
            launcher: self.launcher,
            max_restarts: self.max_restarts,
            checkpoint_interval: self.checkpoint_interval,
        }
    }
}

pub async fn submit(connection: &Connection, args: SubmitArgs) -> anyhow::Result<i32> {
    let max_bytes = runconfig::parse_size(&args.max_snapshot_size)?;
    let dir = args.dir.clone();
    anyhow::ensure!(dir.is_dir(), "directory `{}` does not exist", dir.display());
    // The run configuration, before anything else: a bad file fails before any network I/O.
    let (from_file, file) = runconfig::load(&dir, args.config.as_deref())?;
    let default_target = connection.local.then_some(LOCAL_TARGET);
    let origin = file
        .clone()
        .unwrap_or_else(|| dir.join(runconfig::DEFAULT_FILE));
    let config = args
        .layer()
        .or(from_file)
        .resolve(default_target, &origin)?;
    // Read now: a secret that is not set fails before any upload.
    let secrets = config.secret_values(|name| std::env::var(name).ok())?;
    let script = config.script.clone();
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
    for (key, path) in config.spec_files() {
        let relative = path.trim_start_matches("./");
        anyhow::ensure!(
            plan.contains(relative),
            "{key} `{path}` is not in the snapshot of `{}`: name a file inside the directory, relative to it (and not excluded by an ignore rule)",
            dir.display()
        );
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
        errln!(
            "note: the snapshot is large ({}).\n{}",
            HumanBytes(plan.total_bytes),
            biggest_items_advice(&plan, &dir)
        );
    }

    if args.dry_run {
        let biggest = plan.biggest_items(5);
        let packs_outputs = plan
            .entries
            .iter()
            .any(|e| e.rel_path == "outputs" || e.rel_path.starts_with("outputs/"));
        let (_archive, packed) = pack_snapshot(plan, options, interactive).await?;
        let source = match &file {
            Some(path) => format!("{} and flags", path.display()),
            None => "flags; no run configuration file".to_string(),
        };
        outln!("# Run configuration ({source}):");
        out!("{}", config.to_yaml());
        outln!("# Snapshot:");
        outln!("snapshot        {}", packed.digest);
        outln!("files           {}", packed.n_files);
        outln!(
            "size            {} ({} compressed)",
            HumanBytes(packed.uncompressed_bytes),
            HumanBytes(packed.compressed_bytes)
        );
        for (item, bytes) in biggest {
            outln!("  {item:<30} {:>10}", HumanBytes(bytes).to_string());
        }
        if !packs_outputs && dir.join("outputs").is_dir() {
            outln!(
                "left out       outputs/ (a run makes its own outputs/; a local one is not sent \
                 unless the top-level .kilnignore says !/outputs/)"
            );
        }
        return Ok(0);
    }
    let target = config.target.as_str();
    // `--target local` while logged in to a cluster: this machine's local daemon (a cluster's
    // own target named `local` is reached by naming the coordinator).
    let switched;
    let connection = if target == LOCAL_TARGET && !connection.local && !connection.explicit {
        switched = Connection::local()?;
        &switched
    } else {
        connection
    };

    // Connect and check the target before packing and uploading.
    let channel = connection.channel().await?;
    let mut client = kiln_proto::clients::kiln(channel.clone(), connection.bearer.clone());
    let targets = client
        .list_targets(v1::ListTargetsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .targets;
    let offline_note = targets
        .iter()
        .find(|t| t.name == target && t.agents_online == 0)
        .map(|t| {
            if t.agents_total == 0 {
                // Stopped and revoked agents are not counted.
                format!(
                    "note: target {target} has no running agents (stopped, or none joined yet): \
                     the run waits in the queue until one comes online (`kiln agents`)"
                )
            } else {
                format!(
                    "note: 0 of {} agents of target {target} are online: the run waits in the \
                     queue until one is (`kiln agents`)",
                    t.agents_total
                )
            }
        });
    if !targets.iter().any(|t| t.name == target) {
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
    let mut blobs = kiln_proto::clients::blobs(channel.clone(), connection.bearer.clone());
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
        // A broken transfer (a coordinator restart, a reset connection) is tried again
        // with backoff and said in words; a refusal is not.
        let mut wait = Duration::from_millis(500);
        let mut tries = 0;
        loop {
            tries += 1;
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
            let result = blobs.upload_blob(chunks).await;
            bar.finish_and_clear();
            let status = match result {
                Ok(_) => break,
                Err(status) => status,
            };
            let failure = kiln_proto::transfer::failure(&status);
            if !failure.transient || tries >= UPLOAD_TRIES {
                return Err(status_error(status)).context(format!(
                    "upload the snapshot ({failure}; try {tries} of {UPLOAD_TRIES})"
                ));
            }
            errln!(
                "snapshot upload failed: {failure}; trying again in {:.1}s (try {} of {UPLOAD_TRIES})",
                wait.as_secs_f64(),
                tries + 1
            );
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        packed.compressed_bytes
    };
    errln!(
        "snapshot {} ({} files, {}): uploaded {uploaded} bytes",
        packed.digest,
        packed.n_files,
        HumanBytes(packed.uncompressed_bytes),
    );

    let mut request = config.to_request(packed.digest);
    request.secrets = secrets;
    let run = client
        .submit_run(request)
        .await
        .map_err(status_error)?
        .into_inner();
    errln!("run {} submitted to target {}", run.id, run.target);
    if let Some(note) = &offline_note {
        errln!("{note}");
    }
    if args.detach {
        if args.json {
            crate::output::print_json(&crate::output::run_json(&run));
        } else {
            outln!("{}", run.id);
        }
        return Ok(0);
    }
    if args.json {
        crate::output::LOG_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let followed = follow(connection, run.id, 0, None).await?;
    if let Followed::Ended(_) = followed {
        print_metrics_summary(&mut client, run.id).await;
        if args.json {
            let run = client
                .get_run(v1::GetRunRequest { run_id: run.id })
                .await
                .map_err(status_error)?
                .into_inner();
            crate::output::print_json(&crate::output::run_json(&run));
        }
    }
    Ok(followed.exit_code())
}

/// `kiln wait RUN`: polls the run until it ends (riding out coordinator outages for as
/// long as a follower does) and returns the exit code `kiln submit` would.
pub async fn wait(connection: &Connection, run_id: i64) -> anyhow::Result<i32> {
    let give_up = give_up_after();
    let mut outage = Outage::default();
    loop {
        let reply = match connection.kiln().await {
            Ok(mut client) => client
                .get_run(v1::GetRunRequest { run_id })
                .await
                .map(|reply| reply.into_inner()),
            Err(error) => Err(tonic::Status::unavailable(format!("{error:#}"))),
        };
        match reply {
            Ok(run) if run.status().domain().is_terminal() => return Ok(report_end(&run)),
            Ok(_) => outage.ended(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if outage.outlasts(give_up) {
                    return Err(status_error(status));
                }
            }
            Err(status) => return Err(status_error(status)),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One line with the last value of each user metric, after a followed run ended.
async fn print_metrics_summary(client: &mut KilnClient<kiln_proto::AuthChannel>, run_id: i64) {
    let Ok(metrics) = crate::listing::metrics(client, run_id, None).await else {
        return;
    };
    let user: Vec<String> = metrics
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
        errln!(
            "[kiln] metrics: {}; all of them: kiln metrics {run_id}",
            crate::output::sanitize(&user.join(", "))
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

/// Prints a run's log as stored so far (one rank's lines only, with `rank`).
pub async fn print_logs(
    client: &mut KilnClient<kiln_proto::AuthChannel>,
    run_id: i64,
    rank: Option<u32>,
) -> anyhow::Result<()> {
    let mut stream = client
        .stream_logs(v1::StreamLogsRequest {
            run_id,
            after_cursor: 0,
            follow: false,
            rank,
            max_page_bytes: crate::listing::page_bytes(),
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

/// Prints a log record's lines to stdout or stderr as the script wrote them (control
/// characters escaped: [`crate::output::sanitize`]), in one write; a distributed run's lines
/// start with their rank (`[rank 3] `), Kiln's own lines with `[kiln]` (and the node, past
/// node 0). A record holds one or more lines joined by `\n` (the agent spools whole reads).
fn print_line(line: &v1::LogLine) {
    let prefix = match (line.stream(), line.rank) {
        (v1::LogStream::Stdout | v1::LogStream::Stderr, Some(rank)) => format!("[rank {rank}] "),
        (v1::LogStream::Stdout | v1::LogStream::Stderr, None) => String::new(),
        _ if line.node > 0 => format!("[kiln node {}] ", line.node),
        _ => "[kiln] ".to_owned(),
    };
    let mut out = String::with_capacity(line.text.len() + 64);
    for text in line.text.split('\n') {
        out.push_str(&prefix);
        out.push_str(&crate::output::sanitize(text));
        out.push('\n');
    }
    let to_stderr = line.stream() != v1::LogStream::Stdout
        || crate::output::LOG_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed);
    crate::output::write_or_exit(to_stderr, out);
}

/// How following a run stopped.
pub enum Followed {
    /// The run ended; `kiln submit` exits with this code.
    Ended(i32),
    /// The user pressed Ctrl-C; the run goes on.
    Detached,
}

impl Followed {
    /// What a follower exits with: the run's code, or 130 for Ctrl-C.
    pub fn exit_code(self) -> i32 {
        match self {
            Followed::Ended(code) => code,
            Followed::Detached => exit_codes::CANCELLED,
        }
    }
}

/// One outage of the coordinator as a follower sees it: from its first failure until the
/// coordinator answers again.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// Records a failure; whether the outage it belongs to has lasted longer than `window`.
    fn outlasts(&mut self, window: Duration) -> bool {
        self.since.get_or_insert_with(Instant::now).elapsed() > window
    }

    /// The coordinator answered: the next failure starts a new outage.
    fn ended(&mut self) {
        self.since = None;
    }
}

/// How long a follower keeps trying to reach the coordinator before it gives up: 10 minutes,
/// or `KILN_FOLLOW_GIVE_UP_SECS` seconds (not a documented setting: tests shorten it).
fn give_up_after() -> Duration {
    std::env::var("KILN_FOLLOW_GIVE_UP_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

/// Follows a run's log until it ends (or the user detaches with Ctrl-C).
/// A broken stream (coordinator restart) is resumed after the last line shown; Ctrl-C stops
/// following and leaves the run alone. It gives up only when one outage lasts longer than
/// [`give_up_after`]: a stream that opens again ends the outage.
pub async fn follow(
    connection: &Connection,
    run_id: i64,
    mut cursor: i64,
    rank: Option<u32>,
) -> anyhow::Result<Followed> {
    let give_up = give_up_after();
    let mut backoff = Duration::from_millis(200);
    let mut outage = Outage::default();
    let mut announced = false;
    loop {
        // Set once the stream is open: whatever breaks after that is a new outage.
        let mut connected = false;
        let attempt = async {
            let channel = connection.channel().await?;
            let mut client = kiln_proto::clients::kiln(channel, connection.bearer.clone());
            let mut stream = client
                .stream_logs(v1::StreamLogsRequest {
                    run_id,
                    after_cursor: cursor,
                    follow: true,
                    rank,
                    max_page_bytes: crate::listing::page_bytes(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            connected = true;
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
                errln!(
                    "\nStopped following; run {run_id} keeps running. Re-attach with: kiln logs {run_id} --follow"
                );
                return Ok(Followed::Detached);
            }
        };
        if connected {
            outage.ended();
            backoff = Duration::from_millis(200);
            announced = false;
        }
        match result {
            Ok(Some(run)) => return Ok(Followed::Ended(report_end(&run))),
            Ok(None) | Err(_) => {
                if let Err(error) = &result {
                    if outage.outlasts(give_up) {
                        return Err(
                            anyhow::anyhow!("{error:#}").context("gave up following the run")
                        );
                    }
                    if error.to_string().contains("does not exist") {
                        return Err(anyhow::anyhow!("{error:#}"));
                    }
                }
                if !announced {
                    errln!("[kiln] log stream interrupted; reconnecting…");
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
    let total = crate::output::total_duration_s(run).filter(|_| run.attempt > 1);
    let took = match (crate::output::duration_s(run), total) {
        (Some(s), Some(total)) => {
            format!(" in {s:.1}s (attempt {}; {total:.1}s in all)", run.attempt)
        }
        (Some(s), None) => format!(" in {s:.1}s"),
        (None, _) => String::new(),
    };
    let status = run.status().domain();
    let detail = if run.message.is_empty() {
        String::new()
    } else {
        format!(": {}", crate::output::sanitize(&run.message))
    };
    errln!("[kiln] run {} {status}{took}{detail}", run.id);
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

/// Downloads a run's outputs into `dest` (created; must be empty if it exists). A
/// multi-node run's outputs come as one folder per node: `dest/node-0/`, `dest/node-1/`, …
pub async fn download(connection: &Connection, run_id: i64, dest: &Path) -> anyhow::Result<()> {
    let channel = connection.channel().await?;
    let run = kiln_proto::clients::kiln(channel.clone(), connection.bearer.clone())
        .get_run(v1::GetRunRequest { run_id })
        .await
        .map_err(status_error)?
        .into_inner();
    if !run.outputs_error.is_empty() {
        anyhow::bail!(
            "run {run_id} has no outputs: outputs not kept: {}",
            run.outputs_error
        );
    }
    // One archive per node for a multi-node run, else the run's one archive.
    let parts: Vec<(Option<usize>, String)> = if run.node_outputs_digests.is_empty() {
        vec![(None, run.outputs_digest.clone())]
    } else {
        run.node_outputs_digests
            .iter()
            .enumerate()
            .map(|(node, digest)| (Some(node), digest.clone()))
            .collect()
    };
    if parts.iter().all(|(_, digest)| digest.is_empty()) {
        let status = run.status().domain();
        if status.is_terminal() {
            anyhow::bail!(
                "run {run_id} ended ({status}) without outputs: nothing was written to outputs/"
            );
        }
        anyhow::bail!(
            "run {run_id} has no outputs yet (status: {status}); outputs are uploaded when a run ends"
        );
    }
    if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
        anyhow::bail!(
            "`{}` is not empty: choose another destination",
            dest.display()
        );
    }
    let (mut n_files, mut total_bytes) = (0, 0);
    for (node, digest) in parts {
        let into = match node {
            Some(node) => dest.join(format!("node-{node}")),
            None => dest.to_path_buf(),
        };
        if digest.is_empty() {
            std::fs::create_dir_all(&into)?;
            continue;
        }
        let unpacked = download_blob_into(connection, channel.clone(), &digest, &into).await?;
        n_files += unpacked.n_files;
        total_bytes += unpacked.total_bytes;
    }
    errln!(
        "downloaded outputs of run {run_id} to {} ({} files, {})",
        dest.display(),
        n_files,
        HumanBytes(total_bytes)
    );
    Ok(())
}

/// Downloads one outputs archive, checks its digest and unpacks it into `dest`.
async fn download_blob_into(
    connection: &Connection,
    channel: tonic::transport::Channel,
    digest: &str,
    dest: &Path,
) -> anyhow::Result<snapshot::Unpacked> {
    let archive = tempfile::NamedTempFile::new()?;
    let mut file = tokio::fs::File::from_std(archive.reopen()?);
    let mut stream = kiln_proto::clients::blobs(channel, connection.bearer.clone())
        .download_blob(v1::DownloadBlobRequest {
            digest: digest.to_string(),
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
        digest.to_string(),
    );
    tokio::task::spawn_blocking(move || -> anyhow::Result<snapshot::Unpacked> {
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
    .await?
}
