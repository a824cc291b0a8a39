//! Docker runs: the script runs in a container, through the Docker Engine API (bollard).
//!
//! Two halves, on either side of `spec.json`:
//! - **Preparation** ([`prepare`], in the agent, before the supervisor starts): pick the
//!   image ([`select_image`]: `auto`, `cpu`, `gpu` or a reference), check that the engine can
//!   give the container GPUs when the run has some ([`gpu_access`]), and pull the image when
//!   it is missing, with the pull's progress in the run's log. Every failure is an
//!   [`EnvError`]: the run ends `env_failed` with a message that names the image.
//! - **Running** ([`run_container`], in the run's supervisor process): create the container
//!   under a deterministic name ([`container_name`]; a create that meets an existing
//!   container of the same attempt adopts it instead of starting a second copy), start it,
//!   stream its demultiplexed stdout/stderr into the spool, wait for its exit code, remove
//!   it. SIGTERM to the supervisor stops the container (Docker's grace period, then SIGKILL).
//!
//! [`container_config`] is the one place that decides what the container gets (mounts,
//! variables, limits, GPUs, labels, user); it is pure so a test can check the exact request.
//! Every container carries the labels [`LABEL_RUN_ID`], [`LABEL_ATTEMPT`], [`LABEL_AGENT_ID`];
//! the agent removes only containers with its own agent id ([`remove_run_containers`],
//! [`reap_orphans`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, Mount, MountType,
    SystemInfo,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::StreamExt as _;
use kiln_proto::v1;
use serde::{Deserialize, Serialize};

use crate::env::EnvError;
use crate::spool::Spec;

/// The image for CPU runs unless configured (`docker_cpu_image`).
pub const DEFAULT_CPU_IMAGE: &str = "python:3.12-slim";
/// The image for GPU runs unless configured (`docker_gpu_image`).
pub const DEFAULT_GPU_IMAGE: &str = "nvidia/cuda:12.4.1-runtime-ubuntu22.04";

/// Where things are inside the container.
pub const CONTAINER_WORK_DIR: &str = "/kiln/work";
pub const CONTAINER_PYTHON_DIR: &str = "/kiln/python";
pub const CONTAINER_METRICS_SOCKET: &str = "/kiln/metrics.sock";
pub const CONTAINER_CHECKPOINT_DIR: &str = "/kiln/checkpoint";

pub const LABEL_RUN_ID: &str = "kiln.run_id";
pub const LABEL_ATTEMPT: &str = "kiln.attempt";
pub const LABEL_AGENT_ID: &str = "kiln.agent_id";

/// Seconds a stopped container gets between SIGTERM and SIGKILL (as a process run's group).
pub const STOP_GRACE_S: i32 = 10;

/// The agent's Docker settings (`docker_*` keys of its configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The image of `image: cpu` (and of `auto` without GPUs).
    pub cpu_image: String,
    /// The image of `image: gpu` (and of `auto` with GPUs).
    pub gpu_image: String,
    /// The engine: `unix:///PATH` or `tcp://HOST:PORT`; `None`: the local socket.
    pub host: Option<String>,
    /// Credentials used when pulling from one registry.
    pub registry_auth: Option<RegistryAuth>,
    /// Most processes one container may have.
    pub pids_limit: u32,
    /// The network containers join: [`RUN_NETWORK`] (one of the attempt's own), `none`, or
    /// an existing network's name.
    pub network: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cpu_image: DEFAULT_CPU_IMAGE.to_string(),
            gpu_image: DEFAULT_GPU_IMAGE.to_string(),
            host: None,
            registry_auth: None,
            pids_limit: CONTAINER_PIDS_LIMIT,
            network: RUN_NETWORK.to_string(),
        }
    }
}

/// A registry login: used for pulls of images from `server` only.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryAuth {
    /// The registry's host (and port), e.g. `registry.example.org:5000` or `docker.io`.
    pub server: String,
    pub username: String,
    /// A file holding the password (or token); read at each pull, so it can be rotated.
    pub password_file: PathBuf,
}

/// What the supervisor needs to run a container: written into `spec.json` by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerSpec {
    /// The image, as found on (or pulled to) the engine.
    pub image: String,
    /// The engine (`None`: the local socket).
    pub host: Option<String>,
    pub agent_id: String,
    /// Host GPU indices the container gets; empty: none.
    pub gpus: Vec<u32>,
    /// How the engine hands GPUs over (`nvidia` runtime or CDI), when there are GPUs.
    #[serde(default)]
    pub gpu_driver: Option<GpuDriver>,
    /// Limits (0: none).
    pub cpus: u32,
    pub memory_bytes: u64,
    pub shm_size_bytes: u64,
    /// `UID:GID` the script runs as: the agent's own, or `nobody` when the agent is root
    /// (never root; the run's directories are handed to it).
    pub user: String,
    /// Most processes the container may have (0: the default, [`CONTAINER_PIDS_LIMIT`]).
    #[serde(default)]
    pub pids_limit: u32,
    /// The host directory holding the `kiln` Python module.
    pub python_dir: PathBuf,
    /// The network setting ([`Settings::network`]); empty (a spec written by an older
    /// agent): [`RUN_NETWORK`].
    #[serde(default)]
    pub network: String,
}

/// `docker_network = "run"`: every attempt gets a bridge network of its own.
pub const RUN_NETWORK: &str = "run";

impl DockerSpec {
    /// The network the container joins (its `network_mode`), and whether it is the
    /// attempt's own (made before the container, removed after it).
    pub fn network(&self, run_id: i64, attempt: u32) -> (String, bool) {
        match self.network.as_str() {
            "" | RUN_NETWORK => (run_network_name(&self.agent_id, run_id, attempt), true),
            other => (other.to_string(), false),
        }
    }
}

/// The network of one attempt's own: named like its container.
pub fn run_network_name(agent_id: &str, run_id: i64, attempt: u32) -> String {
    format!("{}-net", container_name(agent_id, run_id, attempt))
}

/// How the engine gives a container GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuDriver {
    /// The NVIDIA container runtime (nvidia-container-toolkit): `--gpus device=1`.
    Nvidia,
    /// Container Device Interface specs for `nvidia.com/gpu` devices.
    Cdi,
}

/// The image a run gets and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectedImage {
    pub image: String,
    /// Host GPU indices to hand to the container.
    pub gpus: Vec<u32>,
    /// For the run's log: "the agent's GPU image (the run has GPUs 1)".
    pub reason: String,
}

/// Picks the image for `requested` (`auto` or empty, `cpu`, `gpu`, or a reference).
/// `auto` is the GPU image when the run was allocated GPUs *and* this agent's GPU probe found
/// GPUs, else the CPU image. GPUs allocated to the run always reach the container, whatever
/// the image: a run that asked for GPUs never runs silently without them.
pub fn select_image(
    requested: &str,
    allocated_gpus: &[u32],
    host_gpus: usize,
    settings: &Settings,
) -> Result<SelectedImage, EnvError> {
    let requested = requested.trim();
    let gpus = allocated_gpus.to_vec();
    let gpu_list = || {
        allocated_gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (image, reason) = match requested {
        "" | "auto" if !allocated_gpus.is_empty() && host_gpus > 0 => (
            settings.gpu_image.clone(),
            format!(
                "the agent's GPU image (image: auto; the run has GPU {})",
                gpu_list()
            ),
        ),
        "" | "auto" => (
            settings.cpu_image.clone(),
            "the agent's CPU image (image: auto; the run has no GPUs)".to_string(),
        ),
        "cpu" => (
            settings.cpu_image.clone(),
            "the agent's CPU image (image: cpu)".to_string(),
        ),
        "gpu" => (
            settings.gpu_image.clone(),
            "the agent's GPU image (image: gpu)".to_string(),
        ),
        reference => {
            check_reference(reference)?;
            (reference.to_string(), "the run's image".to_string())
        }
    };
    Ok(SelectedImage {
        image,
        gpus,
        reason,
    })
}

/// Refuses what cannot be an image reference, before the engine is asked.
fn check_reference(reference: &str) -> Result<(), EnvError> {
    let bad = reference.starts_with('-')
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\');
    if bad {
        return Err(EnvError(format!(
            "`{reference}` is not a Docker image reference: use auto, cpu, gpu or a name such \
             as python:3.12-slim or registry.example.org/team/train:1"
        )));
    }
    Ok(())
}

/// The registry an image reference pulls from (`docker.io` for `python:3.12`).
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            normalize_registry(first)
        }
        _ => "docker.io".to_string(),
    }
}

fn normalize_registry(server: &str) -> String {
    let server = server
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let server = server.split('/').next().unwrap_or(server);
    match server {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// How this engine can give a container GPUs, if it can.
pub fn gpu_access(info: &SystemInfo) -> Option<GpuDriver> {
    let runtimes = info.runtimes.as_ref();
    if runtimes.is_some_and(|r| r.contains_key("nvidia")) {
        return Some(GpuDriver::Nvidia);
    }
    let cdi = info.discovered_devices.iter().flatten().any(|device| {
        device.source.as_deref() == Some("cdi")
            && device
                .id
                .as_deref()
                .is_some_and(|id| id.starts_with("nvidia.com/gpu"))
    });
    cdi.then_some(GpuDriver::Cdi)
}

/// The message of a GPU run on an engine without GPU support.
pub const NO_NVIDIA_RUNTIME: &str = "the Docker engine on this agent has no NVIDIA runtime: \
     install nvidia-container-toolkit (and run `nvidia-ctk runtime configure --runtime=docker`, \
     then restart Docker), or run without GPUs";

/// The container's name for one attempt on one agent: `kiln-<agent id, 8 chars>-<run>-<attempt>`.
pub fn container_name(agent_id: &str, run_id: i64, attempt: u32) -> String {
    let short: String = agent_id
        .trim_start_matches("ag-")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!("kiln-{short}-{run_id}-{attempt}")
}

/// The labels every container of an attempt carries.
pub fn labels(agent_id: &str, run_id: i64, attempt: u32) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_RUN_ID.to_string(), run_id.to_string()),
        (LABEL_ATTEMPT.to_string(), attempt.to_string()),
        (LABEL_AGENT_ID.to_string(), agent_id.to_string()),
    ])
}

/// Variables whose host value means nothing in the container: [`container_config`] gives
/// them the in-container value. (The runner sets no CUDA_VISIBLE_DEVICES for a container:
/// it sees only its own GPUs, renumbered from 0.)
const TRANSLATED_VARIABLES: &[&str] = &[
    "PYTHONPATH",
    "KILN_OUTPUTS_DIR",
    "KILN_METRICS_SOCKET",
    "KILN_CHECKPOINT_DIR",
];

/// The container for `spec`: its name and the create request. Pure: everything comes from
/// the spec.
pub fn container_config(spec: &Spec, docker: &DockerSpec) -> (String, ContainerCreateBody) {
    let name = container_name(&docker.agent_id, spec.run_id, spec.attempt);
    let bind = |source: &Path, target: &str, read_only: bool| Mount {
        source: Some(source.to_string_lossy().into_owned()),
        target: Some(target.to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    };
    let mut mounts = vec![
        bind(&spec.cwd, CONTAINER_WORK_DIR, false),
        bind(&docker.python_dir, CONTAINER_PYTHON_DIR, true),
        bind(&spec.metrics_socket, CONTAINER_METRICS_SOCKET, false),
    ];
    if let Some(dir) = &spec.checkpoint_dir {
        mounts.push(bind(dir, CONTAINER_CHECKPOINT_DIR, false));
    }

    // The first value of a translated variable is Kiln's (replaced); a later one is the
    // user's and wins, as it does for a process run.
    let mut seen_kiln = std::collections::HashSet::new();
    let mut env: Vec<(String, String)> = Vec::new();
    for (key, value) in &spec.env {
        let value = if TRANSLATED_VARIABLES.contains(&key.as_str()) && seen_kiln.insert(key) {
            match key.as_str() {
                "PYTHONPATH" => CONTAINER_PYTHON_DIR.to_string(),
                "KILN_OUTPUTS_DIR" => format!("{CONTAINER_WORK_DIR}/outputs"),
                "KILN_METRICS_SOCKET" => CONTAINER_METRICS_SOCKET.to_string(),
                "KILN_CHECKPOINT_DIR" => CONTAINER_CHECKPOINT_DIR.to_string(),
                _ => value.clone(),
            }
        } else {
            value.clone()
        };
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(existing) => existing.1 = value,
            None => env.push((key.clone(), value)),
        }
    }
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();

    let program = in_container(&spec.program, &spec.cwd);
    let mut cmd = vec![program];
    cmd.extend(spec.args.iter().cloned());

    let device_requests = (!docker.gpus.is_empty()).then(|| {
        let ids: Vec<String> = docker.gpus.iter().map(u32::to_string).collect();
        vec![match docker.gpu_driver.unwrap_or(GpuDriver::Nvidia) {
            GpuDriver::Nvidia => DeviceRequest {
                driver: Some("nvidia".to_string()),
                device_ids: Some(ids),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            },
            GpuDriver::Cdi => DeviceRequest {
                driver: Some("cdi".to_string()),
                device_ids: Some(
                    ids.iter()
                        .map(|id| format!("nvidia.com/gpu={id}"))
                        .collect(),
                ),
                ..Default::default()
            },
        }]
    });
    let positive = |value: u64| (value > 0).then(|| value.min(i64::MAX as u64) as i64);
    let memory = positive(docker.memory_bytes);
    let host_config = HostConfig {
        mounts: Some(mounts),
        init: Some(true),
        // Other people's code on a shared machine: no capabilities, no privilege gain
        // through setuid binaries, the engine's default seccomp profile, never privileged,
        // a network of its own (not the host's, nor one shared with other runs), a bounded
        // number of processes (a fork bomb stops at it), and never the Docker socket.
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".to_string()]),
        security_opt: Some(vec!["no-new-privileges".to_string()]),
        pids_limit: Some(i64::from(if docker.pids_limit == 0 {
            CONTAINER_PIDS_LIMIT
        } else {
            docker.pids_limit
        })),
        memory,
        // Swap = memory: the limit is a limit, not a hint to swap.
        memory_swap: memory,
        nano_cpus: positive(u64::from(docker.cpus) * 1_000_000_000),
        shm_size: positive(docker.shm_size_bytes),
        device_requests,
        // The attempt's own bridge network unless configured otherwise (`docker_network`):
        // on Docker's default bridge every container could reach every other one.
        network_mode: Some(docker.network(spec.run_id, spec.attempt).0),
        // The supervisor reads the output back through the logs API: a driver that keeps it.
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_string()),
            config: None,
        }),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(docker.image.clone()),
        cmd: Some(cmd),
        env: Some(env),
        working_dir: Some(CONTAINER_WORK_DIR.to_string()),
        user: Some(docker.user.clone()),
        labels: Some(labels(&docker.agent_id, spec.run_id, spec.attempt)),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    };
    (name, body)
}

/// Most processes (and threads) one container may have.
pub const CONTAINER_PIDS_LIMIT: u32 = 4096;
/// The user a container runs as when the agent itself runs as root: `nobody`, never root.
pub const UNPRIVILEGED_USER: &str = "65534:65534";

/// The user a run's container runs as: the agent's own uid:gid, or `nobody` when the agent
/// is root (a container never runs as root).
pub fn container_user() -> String {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    if uid.is_root() {
        UNPRIVILEGED_USER.to_string()
    } else {
        format!("{uid}:{gid}")
    }
}

/// Gives the container's user the run's directories and socket it must write (the agent's
/// files otherwise), when that user is not the agent's.
pub fn hand_over(paths: &[&Path], user: &str) -> std::io::Result<()> {
    let Some((uid, gid)) = user.split_once(':') else {
        return Ok(());
    };
    let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
        return Ok(());
    };
    if uid == nix::unistd::getuid().as_raw() {
        return Ok(());
    }
    let owner = (
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    );
    for path in paths {
        if !path.exists() {
            continue;
        }
        let mut stack = vec![path.to_path_buf()];
        while let Some(path) = stack.pop() {
            std::os::unix::fs::lchown(
                &path,
                owner.0.map(|u| u.as_raw()),
                owner.1.map(|g| g.as_raw()),
            )?;
            if path.is_dir() && !path.is_symlink() {
                for entry in std::fs::read_dir(&path)? {
                    stack.push(entry?.path());
                }
            }
        }
    }
    Ok(())
}

/// A host path under the work directory, as the container sees it; other paths (a
/// program on the image's PATH such as `python3`) unchanged.
fn in_container(path: &Path, work: &Path) -> String {
    match path.strip_prefix(work) {
        Ok(relative) => Path::new(CONTAINER_WORK_DIR)
            .join(relative)
            .to_string_lossy()
            .into_owned(),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

// ---- the engine ----

/// Connects to the engine and agrees on an API version (older engines speak older ones).
pub async fn connect(host: Option<&str>) -> Result<Docker, EnvError> {
    let where_ = host.unwrap_or("the local socket (/var/run/docker.sock)");
    let unreachable = |error: bollard::errors::Error| {
        EnvError(format!(
            "cannot reach the Docker engine at {where_}: {error}. Is Docker installed and \
             running, and may the agent's user use it (group `docker`)?"
        ))
    };
    let docker = match host {
        Some(host) => Docker::connect_with_host(host),
        None => Docker::connect_with_socket_defaults(),
    }
    .map_err(unreachable)?;
    docker.negotiate_version().await.map_err(unreachable)
}

/// Preparation's inputs.
pub struct PrepareRequest<'a> {
    pub environment: &'a v1::DockerEnvironment,
    pub allocated_gpus: &'a [u32],
    /// How many GPUs this agent's probe found.
    pub host_gpus: usize,
    pub settings: &'a Settings,
}

/// The image is on the engine and, for a GPU run, the engine can hand GPUs over.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    pub image: String,
    pub gpus: Vec<u32>,
    pub gpu_driver: Option<GpuDriver>,
}

/// Selects the image, checks GPU support when the run has GPUs, pulls the image when the
/// engine does not have it. Lines for the run's log go to `log`.
pub async fn prepare(
    request: PrepareRequest<'_>,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<PreparedImage, EnvError> {
    let selected = select_image(
        &request.environment.image,
        request.allocated_gpus,
        request.host_gpus,
        request.settings,
    )?;
    log(&format!(
        "Docker image {}: {}.",
        selected.image, selected.reason
    ));
    let docker = connect(request.settings.host.as_deref()).await?;
    let mut gpu_driver = None;
    if !selected.gpus.is_empty() {
        let info = docker
            .info()
            .await
            .map_err(|e| EnvError(format!("could not ask the Docker engine about GPUs: {e}")))?;
        gpu_driver = Some(gpu_access(&info).ok_or_else(|| EnvError(NO_NVIDIA_RUNTIME.into()))?);
    }
    ensure_image(&docker, &selected.image, request.settings, log).await?;
    Ok(PreparedImage {
        image: selected.image,
        gpus: selected.gpus,
        gpu_driver,
    })
}

/// The image of a Docker run with `conda:`: `base` plus the conda environment the agent
/// built at `prefix` (cached like any conda environment), copied into the image at the same
/// absolute path — so the paths conda wrote into it at install time hold — and committed as
/// `kiln-env/<environment>:<base image id>`. Built once; every later run with the same
/// environment and base finds it by that tag.
pub async fn derive_conda_image(
    settings: &Settings,
    base: &str,
    prefix: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<String, EnvError> {
    use bollard::query_parameters::{CommitContainerOptions, UploadToContainerOptions};
    let docker = connect(settings.host.as_deref()).await?;
    let base_id = docker
        .inspect_image(base)
        .await
        .map_err(|e| EnvError(format!("image {base}: {}", engine_message(&e))))?
        .id
        .unwrap_or_default();
    let environment = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short_id: String = base_id
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect();
    let repo = format!("kiln-env/{environment}");
    let tag = format!("{repo}:{short_id}");
    // One build per derived image at a time; a waiting run finds it done.
    let lock = pull_lock(&tag);
    let _building = lock.lock().await;
    if docker.inspect_image(&tag).await.is_ok() {
        log(&format!(
            "Image {tag} ({base} + the conda environment) reused."
        ));
        return Ok(tag);
    }
    log(&format!(
        "Building image {tag}: {base} + the conda environment at {}.",
        prefix.display()
    ));
    let started = std::time::Instant::now();
    let archive = tempfile::NamedTempFile::new()
        .map_err(|e| EnvError(format!("could not create a temporary file: {e}")))?;
    {
        let (prefix, path) = (prefix.to_path_buf(), archive.path().to_path_buf());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut builder =
                tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&path)?));
            builder.follow_symlinks(false);
            let inside = prefix.strip_prefix("/").unwrap_or(&prefix);
            builder.append_dir_all(inside, &prefix)?;
            builder.into_inner()?.into_inner()?.sync_all()
        })
        .await
        .map_err(|e| EnvError(format!("packing the conda environment failed: {e}")))?
        .map_err(|e| EnvError(format!("could not pack the conda environment: {e}")))?;
    }
    let body = ContainerCreateBody {
        image: Some(base.to_string()),
        cmd: Some(vec!["true".to_string()]),
        labels: Some(HashMap::from([(
            "kiln.derived-image".to_string(),
            tag.clone(),
        )])),
        ..Default::default()
    };
    let container = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .map_err(|e| EnvError(format!("could not derive {tag}: {}", engine_message(&e))))?
        .id;
    let result = async {
        let file = tokio::fs::File::open(archive.path())
            .await
            .map_err(|e| EnvError(format!("could not read the packed environment: {e}")))?;
        let stream = tokio_util::io::ReaderStream::new(file);
        docker
            .upload_to_container(
                &container,
                Some(UploadToContainerOptions {
                    path: "/".to_string(),
                    ..Default::default()
                }),
                bollard::body_try_stream(stream),
            )
            .await
            .map_err(|e| {
                EnvError(format!(
                    "could not copy the environment into {tag}: {}",
                    engine_message(&e)
                ))
            })?;
        docker
            .commit_container(
                CommitContainerOptions {
                    container: Some(container.clone()),
                    repo: Some(repo.clone()),
                    tag: Some(short_id.clone()),
                    ..Default::default()
                },
                bollard::models::ContainerConfig::default(),
            )
            .await
            .map_err(|e| EnvError(format!("could not commit {tag}: {}", engine_message(&e))))?;
        Ok::<(), EnvError>(())
    }
    .await;
    let _ = docker
        .remove_container(
            &container,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    result?;
    log(&format!(
        "Built image {tag} in {:.1}s.",
        started.elapsed().as_secs_f64()
    ));
    Ok(tag)
}

/// One pull per image at a time on this agent: a second run waiting for the same image
/// finds it present when the first pull ends.
fn pull_lock(image: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: Mutex<Option<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = Mutex::new(None);
    let mut locks = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    locks
        .get_or_insert_with(HashMap::new)
        .entry(image.to_string())
        .or_default()
        .clone()
}

async fn ensure_image(
    docker: &Docker,
    image: &str,
    settings: &Settings,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    let lock = pull_lock(image);
    let _pulling = lock.lock().await;
    match docker.inspect_image(image).await {
        Ok(found) => {
            let id = found.id.unwrap_or_default();
            log(&format!(
                "Image {image} found on this agent ({}).",
                id.get(..19).unwrap_or(&id)
            ));
            return Ok(());
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(error) => {
            return Err(EnvError(format!(
                "could not look up image `{image}` on the Docker engine: {error}"
            )));
        }
    }
    let credentials = match &settings.registry_auth {
        Some(auth) if normalize_registry(&auth.server) == registry_of(image) => {
            let password = std::fs::read_to_string(&auth.password_file).map_err(|e| {
                EnvError(format!(
                    "could not read the registry password file {} (docker_registry_password_file): {e}",
                    auth.password_file.display()
                ))
            })?;
            Some(bollard::auth::DockerCredentials {
                username: Some(auth.username.clone()),
                password: Some(password.trim_end_matches(['\r', '\n']).to_string()),
                serveraddress: Some(auth.server.clone()),
                ..Default::default()
            })
        }
        _ => None,
    };
    log(&format!("Pulling image {image} ..."));
    let options = CreateImageOptions {
        from_image: Some(image.to_string()),
        ..Default::default()
    };
    let mut pull = docker.create_image(Some(options), None, credentials);
    let mut last = String::new();
    while let Some(progress) = pull.next().await {
        match progress {
            Ok(info) => {
                // Progress-bar updates (with progress_detail) would flood the log: keep the
                // status changes ("Pulling fs layer", "Pull complete", "Digest: ...").
                if info
                    .progress_detail
                    .as_ref()
                    .is_some_and(|d| d.total.is_some())
                {
                    continue;
                }
                let line = match (info.id, info.status) {
                    (Some(id), Some(status)) => format!("{id}: {status}"),
                    (None, Some(status)) => status,
                    _ => continue,
                };
                if line != last {
                    log(&line);
                    last = line;
                }
            }
            Err(error) => {
                return Err(EnvError(format!(
                    "image `{image}` is not on this agent and could not be pulled: {}. {}",
                    engine_message(&error),
                    PROVIDE_IMAGE
                )));
            }
        }
    }
    docker.inspect_image(image).await.map_err(|error| {
        EnvError(format!(
            "image `{image}` could not be pulled: {}",
            engine_message(&error)
        ))
    })?;
    log(&format!("Image {image} pulled."));
    Ok(())
}

/// How to get an image onto an agent that cannot pull it (offline, no registry access).
const PROVIDE_IMAGE: &str = "To run offline, put the image on this host (`docker save` it \
    where it can be pulled and `docker load` it here, or build one), or set the agent's \
    docker_cpu_image / docker_gpu_image (what `image: cpu`, `gpu` and `auto` mean) to an \
    image it has";

/// The engine's own words for an error, without bollard's wrapping.
fn engine_message(error: &bollard::errors::Error) -> String {
    use bollard::errors::Error;
    match error {
        Error::DockerResponseServerError { message, .. } => message.clone(),
        Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Stops and removes every container of one attempt of this agent (by label). Idempotent.
pub async fn remove_run_containers(
    host: Option<&str>,
    agent_id: &str,
    run_id: i64,
    attempt: u32,
) -> anyhow::Result<usize> {
    let docker = connect(host).await?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_AGENT_ID}={agent_id}"),
            format!("{LABEL_RUN_ID}={run_id}"),
            format!("{LABEL_ATTEMPT}={attempt}"),
        ],
    )]);
    remove_labelled(&docker, filters, |_| true).await
}

/// Stops and removes every container of a previous identity of this host (the agent joined
/// again after its certificate expired or was revoked): that identity's runs were given
/// away long ago. Containers of other agent ids are never touched.
pub async fn remove_agent_containers(host: Option<&str>, agent_id: &str) -> anyhow::Result<usize> {
    let docker = connect(host).await?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_AGENT_ID}={agent_id}")],
    )]);
    remove_labelled(&docker, filters, |_| true).await
}

/// At agent start-up: removes this agent's containers whose attempt has no run directory
/// any more (left by a crash between container and bookkeeping). Other agents' containers
/// are never touched.
pub async fn reap_orphans(
    host: Option<&str>,
    agent_id: &str,
    runs_dir: &Path,
) -> anyhow::Result<usize> {
    let docker = connect(host).await?;
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_AGENT_ID}={agent_id}")],
    )]);
    let gone = |labels: &HashMap<String, String>| {
        let run = labels.get(LABEL_RUN_ID).map(String::as_str).unwrap_or("");
        let attempt = labels.get(LABEL_ATTEMPT).map(String::as_str).unwrap_or("");
        !runs_dir.join(format!("{run}.{attempt}")).exists()
    };
    remove_labelled(&docker, filters, gone).await
}

/// Removes the containers, then the attempts' own networks (a network goes only once
/// nothing is attached), that `filters` selects and `wanted` accepts by their labels;
/// returns how many containers.
async fn remove_labelled(
    docker: &Docker,
    filters: HashMap<String, Vec<String>>,
    wanted: impl Fn(&HashMap<String, String>) -> bool,
) -> anyhow::Result<usize> {
    let removed = remove_matching(docker, filters.clone(), &wanted).await?;
    remove_matching_networks(docker, filters, &wanted).await?;
    Ok(removed)
}

/// Removes the attempts' own networks that `filters` selects and `wanted` accepts (by
/// their labels); one still in use (a container attached) is left for a later pass.
async fn remove_matching_networks(
    docker: &Docker,
    filters: HashMap<String, Vec<String>>,
    wanted: impl Fn(&HashMap<String, String>) -> bool,
) -> anyhow::Result<usize> {
    let networks = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: Some(filters),
        }))
        .await?;
    let mut removed = 0;
    for network in networks {
        let labels = network.labels.unwrap_or_default();
        let Some(name) = network.name.filter(|_| wanted(&labels)) else {
            continue;
        };
        match remove_network(docker, &name).await {
            Ok(true) => removed += 1,
            Ok(false) => {}
            // Still in use (a container attached): left for a later pass.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 403 | 409,
                ..
            }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(removed)
}

async fn remove_matching(
    docker: &Docker,
    filters: HashMap<String, Vec<String>>,
    wanted: impl Fn(&HashMap<String, String>) -> bool,
) -> anyhow::Result<usize> {
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    let mut removed = 0;
    for container in containers {
        let labels = container.labels.unwrap_or_default();
        let Some(id) = container.id.filter(|_| wanted(&labels)) else {
            continue;
        };
        if remove_container(docker, &id).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

// ---- in the supervisor ----

/// What the supervisor hears from a running container.
pub trait ContainerEvents {
    /// Output: stream 1 stdout, 2 stderr, 3 Kiln's own; whole lines joined by `\n` (one
    /// record of [`crate::lines::LineChunker`]).
    fn line(&mut self, stream: i32, text: String);
    /// The container started; `pid` is its init process on the host.
    fn started(&mut self, pid: i32);
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerExit {
    pub exit_code: Option<i32>,
    pub description: String,
    /// The container could not be created or started (the message says why).
    pub start_error: Option<String>,
}

/// Runs the attempt's container to its end and removes it; `stop` resolving (SIGTERM to the
/// supervisor) stops it first. Blocking: builds its own single-threaded runtime.
pub fn run_container(
    spec: &Spec,
    docker_spec: &DockerSpec,
    events: &mut dyn ContainerEvents,
) -> anyhow::Result<ContainerExit> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut stop = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let docker = connect(docker_spec.host.as_deref()).await?;
        let (name, body) = container_config(spec, docker_spec);
        let (network, own_network) = docker_spec.network(spec.run_id, spec.attempt);
        if own_network
            && let Err(error) =
                create_run_network(&docker, &network, &docker_spec.agent_id, spec).await
        {
            let message = format!(
                "could not create the run's network {network}: {} (is Docker's pool of \
                 network addresses used up? `docker network ls`)",
                engine_message(&error)
            );
            return Ok(ContainerExit {
                exit_code: None,
                description: message.clone(),
                start_error: Some(message),
            });
        }
        let result = drive(&docker, &name, body, spec, docker_spec, events, &mut stop).await;
        let result = remove_after(&docker, &name, result).await;
        if own_network && let Err(error) = remove_network(&docker, &network).await {
            eprintln!("kiln supervisor: could not remove network {network}: {error}");
        }
        result
    })
}

/// The attempt's own bridge network, labelled like its container; one left by an earlier
/// try of this attempt is used again.
async fn create_run_network(
    docker: &Docker,
    name: &str,
    agent_id: &str,
    spec: &Spec,
) -> Result<(), bollard::errors::Error> {
    let request = bollard::models::NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("bridge".to_string()),
        labels: Some(labels(agent_id, spec.run_id, spec.attempt)),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Removes the attempt's container whatever `drive` ended with, except one of another owner.
async fn remove_after(
    docker: &Docker,
    name: &str,
    result: anyhow::Result<(ContainerExit, Ownership)>,
) -> anyhow::Result<ContainerExit> {
    // A container of another owner that holds the name is left alone.
    if let Ok((_, Ownership::Foreign)) = &result {
        return result.map(|(exit, _)| exit);
    }
    // Whatever happened, nothing of ours is left behind.
    if let Err(error) = remove_container(docker, name).await {
        eprintln!("kiln supervisor: could not remove container {name}: {error}");
    }
    result.map(|(exit, _)| exit)
}

/// Force-removes a container (stopping it): whether it was there; one that is already
/// gone is not an error.
async fn remove_container(docker: &Docker, name: &str) -> Result<bool, bollard::errors::Error> {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    gone_is_fine(docker.remove_container(name, Some(options)).await)
}

/// Removes a network: whether it was there; one that is already gone is not an error.
async fn remove_network(docker: &Docker, name: &str) -> Result<bool, bollard::errors::Error> {
    gone_is_fine(docker.remove_network(name).await)
}

/// A removal's result: `Ok(true)` removed, `Ok(false)` already gone (the engine's 404).
fn gone_is_fine(
    result: Result<(), bollard::errors::Error>,
) -> Result<bool, bollard::errors::Error> {
    match result {
        Ok(()) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// The engine's 404: the object does not exist.
fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Whether the container under the attempt's name is this attempt's.
enum Ownership {
    Ours,
    Foreign,
}

async fn drive(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
    spec: &Spec,
    docker_spec: &DockerSpec,
    events: &mut dyn ContainerEvents,
    stop: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<(ContainerExit, Ownership)> {
    let start_failed = |what: &str, error: &bollard::errors::Error| {
        let message = format!("could not {what} the container: {}", engine_message(error));
        ContainerExit {
            exit_code: None,
            description: message.clone(),
            start_error: Some(message),
        }
    };
    let options = CreateContainerOptions {
        name: Some(name.to_string()),
        ..Default::default()
    };
    match docker.create_container(Some(options), body).await {
        Ok(_) => {}
        // The name is taken: a container of this very attempt (an earlier try whose answer
        // was lost) is adopted; anything else is refused.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => {
            let existing = docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await?;
            let theirs = existing.config.and_then(|c| c.labels).unwrap_or_default();
            let ours = labels(&docker_spec.agent_id, spec.run_id, spec.attempt);
            if ours.iter().any(|(k, v)| theirs.get(k) != Some(v)) {
                let message = format!(
                    "a container named {name} already exists and is not this run's: remove it \
                     (`docker rm -f {name}`)"
                );
                return Ok((
                    ContainerExit {
                        exit_code: None,
                        description: message.clone(),
                        start_error: Some(message),
                    },
                    Ownership::Foreign,
                ));
            }
            events.line(
                3,
                format!("Adopted the existing container {name} of this attempt."),
            );
        }
        Err(error) => return Ok((start_failed("create", &error), Ownership::Ours)),
    }
    let state = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await?
        .state
        .unwrap_or_default();
    let never_started = state
        .started_at
        .as_deref()
        .is_none_or(|t| t.starts_with("0001-"));
    if never_started {
        // A stop that came before the start: nothing runs.
        if futures::FutureExt::now_or_never(stop.recv()).is_some() {
            let exit = ContainerExit {
                exit_code: None,
                description: "stopped before the container started".to_string(),
                start_error: None,
            };
            return Ok((exit, Ownership::Ours));
        }
        if let Err(error) = docker.start_container(name, None).await {
            return Ok((start_failed("start", &error), Ownership::Ours));
        }
    }
    // The container started. One that has already ended (a script that only prints) has no
    // pid any more, and without a start the run's end read as a failure with exit code 0
    // (docker.rs tests, now and then on CI): it is reported started all the same, under the
    // supervisor's pid, which is what a Docker run's signals go to anyway.
    let pid = match docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    {
        Ok(inspected) => inspected.state.and_then(|s| s.pid).filter(|&pid| pid > 0),
        Err(_) => None,
    };
    events.started(pid.map_or(std::process::id() as i32, |pid| pid as i32));

    let mut logs = docker.logs(
        name,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let mut stdout = crate::lines::LineChunker::default();
    let mut stderr = crate::lines::LineChunker::default();
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            chunk = logs.next() => match chunk {
                Some(Ok(bollard::container::LogOutput::StdOut { message })) => {
                    for line in stdout.push(&message) { events.line(1, line); }
                }
                Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                    for line in stderr.push(&message) { events.line(2, line); }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    events.line(3, format!("Reading the container's output failed: {}", engine_message(&error)));
                    break;
                }
                None => break,
            },
            _ = stop.recv(), if stopping.is_none() => {
                // SIGTERM to the script (through docker-init), SIGKILL after the grace period;
                // the output keeps coming until the container is gone.
                let (docker, name) = (docker.clone(), name.to_string());
                stopping = Some(tokio::spawn(async move {
                    let options = StopContainerOptions { t: Some(STOP_GRACE_S), ..Default::default() };
                    let _ = docker.stop_container(&name, Some(options)).await;
                }));
            }
        }
    }
    if let Some(line) = stdout.finish() {
        events.line(1, line);
    }
    if let Some(line) = stderr.finish() {
        events.line(2, line);
    }
    let mut wait = docker.wait_container(
        name,
        Some(WaitContainerOptions {
            condition: "not-running".to_string(),
        }),
    );
    let code = match wait.next().await {
        Some(Ok(response)) => Some(response.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Some(code),
        _ => None,
    };
    let state = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.state);
    let code = code.or_else(|| state.as_ref().and_then(|s| s.exit_code));
    let oom = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false);
    let exit_code = code.map(|c| c as i32);
    let description = match exit_code {
        Some(137) if oom => format!(
            "killed: out of memory (the run's memory limit is {} bytes)",
            docker_spec.memory_bytes
        ),
        Some(code) if code > 128 && code < 160 => {
            format!("killed by signal {}", code - 128)
        }
        Some(code) => format!("exited with code {code}"),
        None => "ended without an exit status".to_string(),
    };
    let exit = ContainerExit {
        exit_code,
        description,
        start_error: None,
    };
    Ok((exit, Ownership::Ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuProbe as _;

    fn settings() -> Settings {
        Settings {
            cpu_image: "cpu-image:1".into(),
            gpu_image: "gpu-image:1".into(),
            ..Settings::default()
        }
    }

    #[test]
    fn image_selection() {
        let h100_gpus = crate::gpu::RecordedProbe::h100().inventory().gpus.len();
        assert_eq!(h100_gpus, 1);
        // (requested, allocated GPUs, GPUs the probe found) → image.
        let cases: &[(&str, &[u32], usize, &str)] = &[
            ("auto", &[1], h100_gpus, "gpu-image:1"),
            ("", &[0], h100_gpus, "gpu-image:1"),
            ("auto", &[], h100_gpus, "cpu-image:1"),
            // A GPU-less agent (this machine's probe finds none).
            ("auto", &[], 0, "cpu-image:1"),
            ("auto", &[0], 0, "cpu-image:1"),
            ("cpu", &[1], h100_gpus, "cpu-image:1"),
            ("gpu", &[], 0, "gpu-image:1"),
            (
                "registry.example.org/team/train:3",
                &[],
                0,
                "registry.example.org/team/train:3",
            ),
            (" python:3.12 ", &[], 0, "python:3.12"),
        ];
        for (requested, allocated, host, expected) in cases {
            let selected = select_image(requested, allocated, *host, &settings()).unwrap();
            assert_eq!(
                selected.image, *expected,
                "{requested:?} {allocated:?} {host}"
            );
            assert_eq!(selected.gpus, allocated.to_vec());
        }
        for bad in ["two words", "--privileged", "a\\b"] {
            let error = select_image(bad, &[], 0, &settings()).unwrap_err().0;
            assert!(
                error.contains(&format!("`{bad}` is not a Docker image reference")),
                "{error}"
            );
        }
    }

    #[test]
    fn registries_of_image_references() {
        for (image, registry) in [
            ("python:3.12-slim", "docker.io"),
            ("nvidia/cuda:12.4.1-runtime-ubuntu22.04", "docker.io"),
            ("docker.io/library/python:3", "docker.io"),
            ("registry.example.org/team/train:1", "registry.example.org"),
            ("localhost:5000/x", "localhost:5000"),
            ("localhost/x", "localhost"),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
        assert_eq!(
            normalize_registry("https://index.docker.io/v1/"),
            "docker.io"
        );
    }

    fn spec(work: &Path) -> Spec {
        Spec {
            env_clear: false,
            run_as: None,
            secret_names: Vec::new(),
            run_id: 42,
            attempt: 2,
            program: PathBuf::from("python3"),
            args: vec!["train.py".into(), "--epochs".into(), "3".into()],
            cwd: work.to_path_buf(),
            env: vec![
                ("PYTHONPATH".into(), "/var/lib/kiln/agent/python".into()),
                ("PYTHONUNBUFFERED".into(), "1".into()),
                ("KILN_RUN_ID".into(), "42".into()),
                (
                    "KILN_OUTPUTS_DIR".into(),
                    format!("{}/outputs", work.display()),
                ),
                (
                    "KILN_METRICS_SOCKET".into(),
                    "/var/lib/kiln/agent/sock/42.2.sock".into(),
                ),
                ("LR".into(), "0.1".into()),
                (
                    "KILN_CHECKPOINT_DIR".into(),
                    "/var/lib/kiln/agent/runs/42.2/checkpoint".into(),
                ),
            ],
            metrics_socket: PathBuf::from("/var/lib/kiln/agent/sock/42.2.sock"),
            metrics_interval_ms: 5000,
            max_retries: 0,
            checkpoint_dir: Some(PathBuf::from("/var/lib/kiln/agent/runs/42.2/checkpoint")),
            checkpoint_interval_ms: 60_000,
            procs: Vec::new(),
            metrics_rank: None,
            fenceable: None,
            timeout_s: 0,
            gpus: Vec::new(),
            lease_file: None,
            docker: None,
        }
    }

    fn docker_spec(gpus: Vec<u32>) -> DockerSpec {
        DockerSpec {
            image: "gpu-image:1".into(),
            host: None,
            agent_id: "ag-1a2b3c4d".into(),
            gpu_driver: (!gpus.is_empty()).then_some(GpuDriver::Nvidia),
            gpus,
            cpus: 4,
            memory_bytes: 8 << 30,
            shm_size_bytes: 1 << 30,
            user: "998:997".into(),
            pids_limit: 0,
            python_dir: PathBuf::from("/var/lib/kiln/agent/python"),
            // As written by an older agent: the default, a network of the attempt's own.
            network: String::new(),
        }
    }

    #[test]
    fn the_network_setting_picks_the_containers_network() {
        let mut docker = docker_spec(Vec::new());
        assert_eq!(
            docker.network(7, 2),
            ("kiln-1a2b3c4d-7-2-net".to_string(), true)
        );
        docker.network = RUN_NETWORK.into();
        assert!(docker.network(7, 2).1);
        docker.network = "none".into();
        assert_eq!(docker.network(7, 2), ("none".to_string(), false));
        docker.network = "bridge".into();
        assert_eq!(docker.network(7, 2), ("bridge".to_string(), false));
    }

    #[test]
    fn the_container_request_for_a_gpu_run_on_the_recorded_h100() {
        // The recorded H100 agent, GPU 1 allocated to the run: the GPU image, and a device
        // request for GPU 1 only.
        let host_gpus = crate::gpu::RecordedProbe::h100().inventory().gpus.len();
        let selected = select_image("auto", &[1], host_gpus, &settings()).unwrap();
        assert_eq!(selected.image, "gpu-image:1");
        let work = Path::new("/var/lib/kiln/agent/runs/42.2/work");
        let mut docker = docker_spec(selected.gpus);
        docker.image = selected.image;
        let (name, body) = container_config(&spec(work), &docker);
        assert_eq!(name, "kiln-1a2b3c4d-42-2");
        assert_eq!(body.image.as_deref(), Some("gpu-image:1"));
        assert_eq!(
            body.cmd,
            Some(vec![
                "python3".into(),
                "train.py".into(),
                "--epochs".into(),
                "3".into()
            ])
        );
        assert_eq!(body.working_dir.as_deref(), Some("/kiln/work"));
        assert_eq!(body.user.as_deref(), Some("998:997"));
        assert_eq!(body.tty, Some(false));
        assert_eq!(
            body.labels,
            Some(HashMap::from([
                ("kiln.run_id".to_string(), "42".to_string()),
                ("kiln.attempt".to_string(), "2".to_string()),
                ("kiln.agent_id".to_string(), "ag-1a2b3c4d".to_string()),
            ]))
        );
        assert_eq!(
            body.env,
            Some(
                [
                    "PYTHONPATH=/kiln/python",
                    "PYTHONUNBUFFERED=1",
                    "KILN_RUN_ID=42",
                    "KILN_OUTPUTS_DIR=/kiln/work/outputs",
                    "KILN_METRICS_SOCKET=/kiln/metrics.sock",
                    "LR=0.1",
                    "KILN_CHECKPOINT_DIR=/kiln/checkpoint",
                ]
                .map(String::from)
                .to_vec()
            )
        );
        let host = body.host_config.unwrap();
        // Hardening: no capabilities, no privilege gain, never privileged, bounded
        // processes, a network of the attempt's own, no Docker socket among the mounts.
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_string()])
        );
        assert_eq!(host.pids_limit, Some(i64::from(CONTAINER_PIDS_LIMIT)));
        assert_eq!(host.network_mode.as_deref(), Some("kiln-1a2b3c4d-42-2-net"));
        assert!(host.mounts.iter().flatten().all(|m| {
            !m.source
                .as_deref()
                .unwrap_or_default()
                .ends_with("docker.sock")
        }));
        assert_eq!(
            host.device_requests,
            Some(vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(vec!["1".into()]),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }])
        );
        let mounts: Vec<_> = host
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| {
                assert_eq!(m.typ, Some(MountType::BIND));
                (m.source.unwrap(), m.target.unwrap(), m.read_only.unwrap())
            })
            .collect();
        let mount = |s: &str, t: &str, ro| (s.to_string(), t.to_string(), ro);
        assert_eq!(
            mounts,
            vec![
                mount("/var/lib/kiln/agent/runs/42.2/work", "/kiln/work", false),
                mount("/var/lib/kiln/agent/python", "/kiln/python", true),
                mount(
                    "/var/lib/kiln/agent/sock/42.2.sock",
                    "/kiln/metrics.sock",
                    false
                ),
                mount(
                    "/var/lib/kiln/agent/runs/42.2/checkpoint",
                    "/kiln/checkpoint",
                    false
                ),
            ]
        );
        assert_eq!(host.memory, Some(8 << 30));
        assert_eq!(host.memory_swap, Some(8 << 30));
        assert_eq!(host.nano_cpus, Some(4_000_000_000));
        assert_eq!(host.shm_size, Some(1 << 30));
        assert_eq!(host.init, Some(true));
    }

    #[test]
    fn a_cpu_run_has_no_devices_or_limits_and_user_variables_win() {
        let work = Path::new("/w");
        let mut spec = spec(work);
        spec.program = PathBuf::from("/w/tools/run.sh");
        spec.checkpoint_dir = None;
        spec.env.push(("PYTHONPATH".into(), "/opt/mine".into()));
        spec.env.push(("CUDA_VISIBLE_DEVICES".into(), "3".into()));
        let mut docker = docker_spec(Vec::new());
        docker.cpus = 0;
        docker.memory_bytes = 0;
        docker.shm_size_bytes = 0;
        let (_, body) = container_config(&spec, &docker);
        assert_eq!(body.cmd.as_ref().unwrap()[0], "/kiln/work/tools/run.sh");
        let env = body.env.unwrap();
        assert!(env.contains(&"PYTHONPATH=/opt/mine".to_string()), "{env:?}");
        // A user's own CUDA_VISIBLE_DEVICES is theirs to set.
        assert_eq!(
            env.iter()
                .filter(|v| v.starts_with("CUDA_VISIBLE_DEVICES="))
                .count(),
            1
        );
        let host = body.host_config.unwrap();
        assert_eq!(host.device_requests, None);
        assert_eq!(
            (host.memory, host.memory_swap, host.nano_cpus, host.shm_size),
            (None, None, None, None)
        );
        assert_eq!(host.mounts.unwrap().len(), 3);
    }

    #[test]
    fn cdi_devices_are_requested_by_name() {
        let (_, body) = container_config(
            &spec(Path::new("/w")),
            &DockerSpec {
                gpu_driver: Some(GpuDriver::Cdi),
                ..docker_spec(vec![0, 3])
            },
        );
        let requests = body.host_config.unwrap().device_requests.unwrap();
        assert_eq!(requests[0].driver.as_deref(), Some("cdi"));
        assert_eq!(
            requests[0].device_ids,
            Some(vec!["nvidia.com/gpu=0".into(), "nvidia.com/gpu=3".into()])
        );
    }

    #[test]
    fn gpu_support_is_read_from_the_engines_info() {
        use bollard::models::{DeviceInfo, Runtime};
        let with_runtimes = |names: &[&str]| SystemInfo {
            runtimes: Some(
                names
                    .iter()
                    .map(|n| (n.to_string(), Runtime::default()))
                    .collect(),
            ),
            ..Default::default()
        };
        assert_eq!(gpu_access(&with_runtimes(&["runc"])), None);
        assert_eq!(
            gpu_access(&with_runtimes(&["runc", "nvidia"])),
            Some(GpuDriver::Nvidia)
        );
        let cdi = SystemInfo {
            discovered_devices: Some(vec![DeviceInfo {
                source: Some("cdi".into()),
                id: Some("nvidia.com/gpu=0".into()),
            }]),
            ..with_runtimes(&["runc"])
        };
        assert_eq!(gpu_access(&cdi), Some(GpuDriver::Cdi));
    }

    #[test]
    fn container_names_are_deterministic_per_attempt() {
        assert_eq!(container_name("ag-0badf00d", 7, 1), "kiln-0badf00d-7-1");
        assert_eq!(container_name("ag-0badf00d", 7, 2), "kiln-0badf00d-7-2");
        assert_eq!(container_name("weird id/!", 1, 1), "kiln-weirdid-1-1");
    }

    #[tokio::test]
    #[ignore = "needs a Docker engine: tests/run runs it with KILN_DOCKER_TESTS=1"]
    async fn a_gpu_run_on_an_engine_without_nvidia_runtime_fails_with_the_reason() {
        // This engine has no NVIDIA runtime: a run given GPU 1 on the recorded H100 must not
        // run on the CPU silently.
        let host_gpus = crate::gpu::RecordedProbe::h100().inventory().gpus.len();
        let mut lines = Vec::new();
        let mut log = |line: &str| lines.push(line.to_string());
        let error = prepare(
            PrepareRequest {
                environment: &v1::DockerEnvironment {
                    image: "auto".into(),
                    ..Default::default()
                },
                allocated_gpus: &[1],
                host_gpus,
                settings: &settings(),
            },
            &mut log,
        )
        .await
        .unwrap_err();
        assert_eq!(error.0, NO_NVIDIA_RUNTIME);
        assert!(
            error.0.starts_with("the Docker engine on this agent has no NVIDIA runtime: install nvidia-container-toolkit"),
            "{error}"
        );
        assert!(lines[0].contains("gpu-image:1"), "{lines:?}");
    }

    #[tokio::test]
    #[ignore = "needs a Docker engine: tests/run runs it with KILN_DOCKER_TESTS=1"]
    async fn an_image_that_cannot_be_pulled_is_named() {
        let mut log = |_: &str| {};
        let error = prepare(
            PrepareRequest {
                environment: &v1::DockerEnvironment {
                    image: "kiln-test/does-not-exist:1".into(),
                    ..Default::default()
                },
                allocated_gpus: &[],
                host_gpus: 0,
                settings: &settings(),
            },
            &mut log,
        )
        .await
        .unwrap_err();
        assert!(
            error.0.starts_with(
                "image `kiln-test/does-not-exist:1` is not on this agent and could not be pulled: "
            ),
            "{error}"
        );
    }

    #[tokio::test]
    #[ignore = "needs a Docker engine: tests/run runs it with KILN_DOCKER_TESTS=1"]
    async fn a_previous_identitys_containers_are_removed_and_no_one_elses() {
        // The image tests/docker-test-image builds (the containers are created, not run).
        let create = |agent: &str| {
            let output = std::process::Command::new("docker")
                .args(["create", "--label", &format!("{LABEL_AGENT_ID}={agent}")])
                .args(["--label", &format!("{LABEL_RUN_ID}=7"), "--label"])
                .args([
                    &format!("{LABEL_ATTEMPT}=1"),
                    "kiln-test/python:bookworm-1",
                    "true",
                ])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        let suffix = std::process::id();
        let (old, other) = (format!("a-old-{suffix}"), format!("a-other-{suffix}"));
        let (old_container, other_container) = (create(&old), create(&other));
        assert_eq!(remove_agent_containers(None, &old).await.unwrap(), 1);
        let exists = |id: &str| {
            std::process::Command::new("docker")
                .args(["inspect", id])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(!exists(&old_container));
        assert!(
            exists(&other_container),
            "another agent's container was removed"
        );
        assert_eq!(remove_agent_containers(None, &other).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_engine_is_a_clear_error() {
        let error = connect(Some("unix:///nonexistent/docker.sock"))
            .await
            .unwrap_err();
        assert!(
            error
                .0
                .starts_with("cannot reach the Docker engine at unix:///nonexistent/docker.sock"),
            "{error}"
        );
    }
}
