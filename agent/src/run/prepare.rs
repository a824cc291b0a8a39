//! The phases before the script starts: the snapshot in `work/`, the environment, the
//! command and environment of the script, its user, `spec.json`, and the supervisor.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context as _;
use kiln_proto::v1;

use super::gang::{gang_env, join, reserve_port, torchrun_defaults, wait_for_launch};
use super::transfer::{fetch_snapshot, restore_checkpoint, short, unpack};
use super::{Phase, RunControl, SystemLines, enter, save_assignment};
use crate::Agent;
use crate::spool::{self, Spec, StateDir};

pub(super) async fn prepare(
    agent: &Arc<Agent>,
    assignment: &v1::Assignment,
    root: &Path,
    state: &StateDir,
    control: &RunControl,
    resume: Option<Phase>,
) -> anyhow::Result<()> {
    let mut system = SystemLines::new(state);
    match resume {
        None => {
            if root.exists() {
                std::fs::remove_dir_all(root)
                    .with_context(|| format!("clear {}", root.display()))?;
            }
            std::fs::create_dir_all(&state.0)
                .with_context(|| format!("create {}", state.0.display()))?;
            save_assignment(state, assignment).context("keep the assignment")?;
        }
        Some(phase) => system.line(&format!(
            "The agent restarted during this attempt's {} phase; preparing it again from there.",
            phase.name()
        )),
    }
    enter(state, Phase::Fetch).await;
    let archive = tokio::select! {
        _ = control.cancel.cancelled() => anyhow::bail!("cancelled before the run started"),
        archive = fetch_snapshot(agent, &assignment.snapshot_digest, &mut system) => {
            archive.context("could not fetch the snapshot")?
        }
    };
    let work = root.join("work");
    // A resumed attempt keeps the `work/` it finished unpacking.
    if resume.is_none_or(|phase| phase <= Phase::Unpack) || !work.is_dir() {
        enter(state, Phase::Unpack).await;
        if work.exists() {
            let partial = work.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(partial))
                .await?
                .context("remove a partly unpacked work/")?;
        }
        unpack(&archive, &work)
            .await
            .context("the snapshot could not be unpacked")?;
    }
    let script = work.join(&assignment.script);
    anyhow::ensure!(
        script.is_file(),
        "script `{}` does not exist in the snapshot",
        assignment.script
    );
    let outputs = work.join("outputs");
    std::fs::create_dir_all(&outputs).context("create outputs/")?;
    enter(state, Phase::Environment).await;
    // A Docker run gets its image ready here; its script runs with the image's python3, or
    // with the conda environment's python baked into a derived image (`docker.conda`).
    let mut docker_image = match docker_environment(assignment) {
        Some(environment) => {
            Some(prepare_docker(agent, assignment, environment, &mut system).await?)
        }
        None => None,
    };
    let docker_conda = docker_environment(assignment)
        .map(|docker| docker.conda.clone())
        .filter(|conda| !conda.is_empty());
    let environment = match &docker_conda {
        Some(file) => Some(v1::Environment {
            kind: Some(v1::environment::Kind::Conda(v1::CondaEnvironment {
                file: file.clone(),
            })),
        }),
        None => assignment.environment.clone(),
    };
    let prepared = if docker_image.is_some() && docker_conda.is_none() {
        crate::env::Prepared {
            python: PathBuf::from("python3"),
            env: Vec::new(),
        }
    } else {
        let mut log = |line: &str| system.line(line);
        crate::env::prepare(
            environment.as_ref(),
            crate::env::Context {
                default_python: &agent.config.python,
                data_dir: &agent.config.data_dir,
                work: &work,
                settings: &agent.config.env,
                cancel: &control.cancel,
                log: &mut log,
            },
        )
        .await?
    };
    if let (Some(image), Some(_)) = (docker_image.as_mut(), &docker_conda) {
        let prefix = prepared
            .env
            .iter()
            .find(|(key, _)| key == "CONDA_PREFIX")
            .map(|(_, value)| PathBuf::from(value))
            .ok_or_else(|| crate::env::EnvError("the conda environment has no prefix".into()))?;
        let mut log = |line: &str| system.line(line);
        image.image = crate::docker::derive_conda_image(
            &agent.config.docker,
            &image.image,
            &prefix,
            &mut log,
        )
        .await?;
    }
    let (program, args) = command_line(&prepared.python, assignment, &script)?;
    let socket = agent
        .config
        .data_dir
        .join("sock")
        .join(format!("{}.{}.sock", assignment.run_id, assignment.attempt));
    // What the run inherits of the agent's own environment (the supervisor starts the
    // script with nothing else), then Kiln's variables, the environment's, the run's own.
    // (A container's environment is its image's: nothing of the host's.)
    let mut env = match &docker_image {
        None => inherited_env(std::env::vars_os(), &agent.config.pass_env),
        Some(_) => Vec::new(),
    };
    env.extend([
        ("PYTHONPATH".to_string(), python_path(&agent.python_dir)),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("KILN_RUN_ID".to_string(), assignment.run_id.to_string()),
        ("KILN_ATTEMPT".to_string(), assignment.attempt.to_string()),
        ("KILN_TARGET".to_string(), agent.config.target.to_string()),
        (
            "KILN_OUTPUTS_DIR".to_string(),
            outputs.to_string_lossy().into_owned(),
        ),
        (
            "KILN_METRICS_SOCKET".to_string(),
            socket.to_string_lossy().into_owned(),
        ),
    ]);
    env.extend(prepared.env.iter().cloned());
    let mut user_env: Vec<_> = assignment
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    user_env.sort();
    env.extend(user_env);
    // Secrets after everything: the coordinator refused a name that is also in `env`.
    let mut secrets: Vec<_> = assignment
        .secrets
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    secrets.sort();
    let secret_names: Vec<String> = secrets.iter().map(|(k, _)| k.clone()).collect();
    env.extend(secrets);
    // A container sees only its GPUs (renumbered from 0): no CUDA_VISIBLE_DEVICES there.
    if assignment.gang.is_none() && !assignment.gpus.is_empty() && docker_image.is_none() {
        env.push(("CUDA_VISIBLE_DEVICES".to_string(), join(&assignment.gpus)));
    }
    // A process run of a root agent gets a user of its own (see `sandbox`).
    let run_user = match (&agent.config.run_users, &docker_image) {
        (Some(range), None) => {
            let user = crate::sandbox::claim(range, root, &agent.config.supervisor_program)
                .context("claim a user for the run")?;
            let home = root.join("home");
            std::fs::create_dir_all(&home).context("create the run's home directory")?;
            env.push(("HOME".to_string(), home.to_string_lossy().into_owned()));
            Some(user)
        }
        _ => None,
    };
    let checkpoint_dir = (assignment.checkpoint_interval_s > 0).then(|| root.join("checkpoint"));
    if let Some(dir) = &checkpoint_dir {
        if resume.is_some() && dir.exists() {
            // What an earlier try of this preparation restored (perhaps partly).
            std::fs::remove_dir_all(dir).context("clear the checkpoint directory")?;
        }
        std::fs::create_dir_all(dir).context("create the checkpoint directory")?;
        if !assignment.checkpoint_digest.is_empty() {
            let n_files =
                restore_checkpoint(agent, &assignment.checkpoint_digest, dir, &mut system)
                    .await
                    .context("could not restore the last checkpoint")?;
            system.line(&format!(
                "Checkpoint {} restored ({n_files} files).",
                short(&assignment.checkpoint_digest)
            ));
        }
        env.push((
            "KILN_CHECKPOINT_DIR".to_string(),
            dir.to_string_lossy().into_owned(),
        ));
    }
    let mut procs = Vec::new();
    let mut metrics_rank = None;
    let mut port_reservation = None;
    if let Some(gang) = &assignment.gang {
        enter(state, Phase::Rendezvous).await;
        let reservation = (gang.node_rank == 0)
            .then(|| reserve_port(agent))
            .transpose()
            .context("reserve a rendezvous port")?;
        let port = reservation
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| u32::from(a.port()));
        port_reservation = reservation;
        let launch = wait_for_launch(agent, assignment, gang, port, control, &mut system).await?;
        let hostfile = root.join("hostfile");
        let lines: String = launch
            .node_addresses
            .iter()
            .map(|address| format!("{address} slots={}\n", gang.procs_per_node.max(1)))
            .collect();
        std::fs::write(&hostfile, lines).context("write the hostfile")?;
        let (mut common, per_proc) = gang_env(gang, &launch, &hostfile, &assignment.gpus);
        // `env` is all the script will see (the agent's own variables only as `pass_env`
        // lets them through): set there is set for the script.
        let (defaults, note) =
            torchrun_defaults(gang, assignment.run_id, assignment.max_retries, |name| {
                env.iter().any(|(k, _)| k == name)
            });
        common.extend(defaults);
        if let Some(note) = note {
            system.line(&note);
        }
        env.extend(common);
        procs = per_proc;
        metrics_rank = Some(gang.node_rank * gang.procs_per_node.max(1));
    }
    enter(state, Phase::Launch).await;
    let spec = Spec {
        env_clear: true,
        run_as: run_user,
        run_id: assignment.run_id,
        attempt: assignment.attempt,
        program,
        args,
        cwd: work,
        env,
        metrics_socket: socket,
        metrics_interval_ms: agent.config.metrics_interval.as_millis() as u64,
        max_retries: assignment.max_retries,
        checkpoint_dir,
        checkpoint_interval_ms: u64::from(assignment.checkpoint_interval_s) * 1000,
        procs,
        metrics_rank,
        fenceable: Some(assignment.fenceable),
        lease_file: Some(agent.lease_file()),
        timeout_s: assignment.timeout_s,
        gpus: assignment.gpus.clone(),
        secret_names,
        docker: docker_image.map(|image| crate::docker::DockerSpec {
            image: image.image,
            host: agent.config.docker.host.clone(),
            agent_id: agent.agent_id.clone(),
            gpus: image.gpus,
            gpu_driver: image.gpu_driver,
            cpus: assignment.resources.map_or(0, |r| r.cpus),
            memory_bytes: assignment.resources.map_or(0, |r| r.memory_bytes),
            shm_size_bytes: environment_shm_size(assignment),
            user: crate::docker::container_user(),
            pids_limit: agent.config.docker.pids_limit,
            python_dir: agent.python_dir.clone(),
            network: agent.config.docker.network.clone(),
        }),
    };
    if let Some(docker) = &spec.docker {
        // The container's user (never root) writes outputs/ and checkpoints.
        let mut paths = vec![spec.cwd.as_path()];
        paths.extend(spec.checkpoint_dir.as_deref());
        crate::docker::hand_over(&paths, &docker.user)
            .context("give the run's directories to the container's user")?;
    }
    if let Some(user) = &spec.run_as {
        // The run's user owns its work, home and checkpoint directories, and nothing else:
        // `state/` (spec.json holds the run's environment) stays the agent's.
        let mut paths = vec![spec.cwd.clone(), root.join("home")];
        paths.extend(spec.checkpoint_dir.clone());
        let owner = user.owner();
        let state_dir = state.0.clone();
        let root_dir = root.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            crate::docker::hand_over(&refs, &owner)
                .context("give the run's directories to the run's user")?;
            for path in &paths {
                crate::sandbox::set_mode(path, 0o700)?;
            }
            crate::sandbox::set_mode(&state_dir, 0o700)?;
            crate::sandbox::set_mode(&root_dir, 0o711)
        })
        .await??;
    }
    spool::write_json(&state.spec(), &spec).context("write spec.json")?;
    anyhow::ensure!(
        !control.cancel.is_cancelled(),
        "cancelled before the run started"
    );
    // Node 0's script binds the port next.
    drop(port_reservation);
    start_supervisor(agent, state)
}

/// The run's Docker environment, if it asked for one.
fn docker_environment(assignment: &v1::Assignment) -> Option<&v1::DockerEnvironment> {
    match assignment.environment.as_ref()?.kind.as_ref()? {
        v1::environment::Kind::Docker(docker) => Some(docker),
        _ => None,
    }
}

fn environment_shm_size(assignment: &v1::Assignment) -> u64 {
    docker_environment(assignment).map_or(0, |docker| docker.shm_size_bytes)
}

/// Picks, checks and (if missing) pulls the run's image; the pull's progress goes into the
/// run's log.
async fn prepare_docker(
    agent: &Agent,
    assignment: &v1::Assignment,
    environment: &v1::DockerEnvironment,
    system: &mut SystemLines,
) -> Result<crate::docker::PreparedImage, crate::env::EnvError> {
    if assignment.gang.is_some() {
        return Err(crate::env::EnvError(
            "docker environments are not supported for distributed runs (--nodes or \
             --procs-per-node above 1) yet: use a user-managed environment"
                .into(),
        ));
    }
    let mut log = |line: &str| system.line(line);
    crate::docker::prepare(
        crate::docker::PrepareRequest {
            environment,
            allocated_gpus: &assignment.gpus,
            host_gpus: agent.host.gpus.len(),
            settings: &agent.config.docker,
        },
        &mut log,
    )
    .await
}

/// The agent's environment variables a run inherits unless `pass_env` says otherwise.
pub const DEFAULT_PASS_ENV: [&str; 20] = [
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "NVIDIA_*",
    "HOME",
];

/// [`DEFAULT_PASS_ENV`], owned (the settings' default).
pub fn default_pass_env() -> Vec<String> {
    DEFAULT_PASS_ENV.map(String::from).to_vec()
}

/// The variables of `agent_env` that `pass_env` lets through (a name, or a prefix ending in
/// `*`), in name order; the agent's own `KILN_*` variables never (its coordinator, token,
/// settings). Not UTF-8: left out.
pub fn inherited_env(
    agent_env: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    pass_env: &[String],
) -> Vec<(String, String)> {
    let passes = |name: &str| {
        pass_env
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    };
    let mut env: Vec<(String, String)> = agent_env
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(name, _)| !name.starts_with("KILN_") && passes(name))
        .collect();
    env.sort();
    env
}

fn command_line(
    python: &Path,
    assignment: &v1::Assignment,
    script: &Path,
) -> anyhow::Result<(PathBuf, Vec<String>)> {
    use std::os::unix::fs::PermissionsExt as _;
    if assignment.script.ends_with(".py") {
        let mut args = vec![assignment.script.clone()];
        args.extend(assignment.args.iter().cloned());
        return Ok((python.to_path_buf(), args));
    }
    let mode = std::fs::metadata(script)?.permissions().mode();
    anyhow::ensure!(
        mode & 0o111 != 0,
        "script `{}` is neither a .py file nor executable: `chmod +x {}` before submitting",
        assignment.script,
        assignment.script
    );
    Ok((script.to_path_buf(), assignment.args.clone()))
}

fn python_path(kiln_module_dir: &Path) -> String {
    let mut paths = vec![kiln_module_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths)
        .unwrap_or_else(|_| kiln_module_dir.as_os_str().to_owned())
        .to_string_lossy()
        .into_owned()
}

/// Starts the supervisor in its own process group and records it (`supervisor.json`; the
/// supervisor writes the same record itself): from then on an agent restart finds it. A
/// task reaps it when it exits.
pub(crate) fn start_supervisor(agent: &Agent, state: &StateDir) -> anyhow::Result<()> {
    let log =
        std::fs::File::create(state.0.join("supervisor.log")).context("create supervisor.log")?;
    let mut child = tokio::process::Command::new(&agent.config.supervisor_program)
        .arg(crate::supervisor::SUBCOMMAND)
        .arg(&state.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| {
            format!(
                "start the run supervisor {}",
                agent.config.supervisor_program.display()
            )
        })?;
    let record = spool::ProcessRecord {
        pid: child.id().context("the supervisor's pid")? as i32,
        boot_id: spool::boot_id(),
    };
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    spool::write_json(&state.supervisor(), &record).context("record the supervisor")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inherit_only_the_agent_variables_pass_env_names() {
        let agent_env = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("KILN_TOKEN", "abc.def"),
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("MY_CACHE", "/cache"),
        ]
        .map(|(k, v)| (std::ffi::OsString::from(k), std::ffi::OsString::from(v)));
        let defaults: Vec<String> = DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect();
        let names =
            |env: Vec<(String, String)>| env.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            names(inherited_env(agent_env.clone().into_iter(), &defaults)),
            ["LC_ALL", "NVIDIA_VISIBLE_DEVICES", "PATH"]
        );
        assert_eq!(
            names(inherited_env(
                agent_env.clone().into_iter(),
                &["MY_CACHE".to_string()]
            )),
            ["MY_CACHE"]
        );
        // Everything but the agent's own KILN_* variables.
        assert_eq!(
            names(inherited_env(agent_env.into_iter(), &["*".to_string()])),
            [
                "AWS_SECRET_ACCESS_KEY",
                "LC_ALL",
                "MY_CACHE",
                "NVIDIA_VISIBLE_DEVICES",
                "PATH"
            ]
        );
    }
}
