//! The Docker driver: the script runs in a container of the run's image (see `docker.rs`
//! for the engine's side: creating, adopting, following, stopping and removing it). The
//! supervisor runs the container on a thread of its own; SIGTERM to the supervisor stops
//! the container (Docker sends SIGKILL after its grace period).

use std::path::Path;
use std::sync::{Mutex, mpsc};

use anyhow::Context as _;
use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Driver, Ended, Output, Record, Recovered, Started, recover_supervisor};
use crate::docker::{ContainerEvents, ContainerExit, DockerSpec};
use crate::spool::{self, ProcessRecord, Spec, StateDir};

pub(crate) struct ContainerDriver {
    spec: Spec,
    docker: DockerSpec,
    state: StateDir,
    /// The thread running the container, once started (in the supervisor).
    running: Mutex<Option<std::thread::JoinHandle<anyhow::Result<ContainerExit>>>>,
}

impl ContainerDriver {
    pub fn new(spec: &Spec, docker: &DockerSpec, state: &StateDir) -> ContainerDriver {
        ContainerDriver {
            spec: spec.clone(),
            docker: docker.clone(),
            state: state.clone(),
            running: Mutex::new(None),
        }
    }

    /// How the container's thread says the container ended (it has, or is about to).
    fn ended(thread: std::thread::JoinHandle<anyhow::Result<ContainerExit>>) -> Ended {
        let ran = thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the container's thread panicked")));
        match ran {
            Ok(ended) => Ended {
                exit_code: ended.exit_code,
                description: ended.description,
                // A container that could not be created or started is the environment's
                // fault (no such command in the image, a device the engine cannot give).
                env_failed: ended.start_error.is_some(),
                start_error: ended.start_error,
                failed_rank: None,
            },
            Err(error) => Ended::not_started(
                format!("the container could not be run: {error:#}"),
                true,
                None,
            ),
        }
    }
}

/// What the container's thread hears from `docker::run_container`.
struct Events {
    output: Output,
    started: Option<mpsc::Sender<i32>>,
}

impl ContainerEvents for Events {
    fn line(&mut self, stream: i32, text: String) {
        let _ = self.output.send(Record::Log(stream, None, text));
    }

    fn started(&mut self, pid: i32) {
        if let Some(started) = self.started.take() {
            let _ = started.send(pid);
        }
    }
}

impl Driver for ContainerDriver {
    fn grant_metrics_socket(&self, path: &Path) -> anyhow::Result<()> {
        // The container's user connects to the metrics socket.
        crate::docker::hand_over(&[path], &self.docker.user)
            .context("give the metrics socket to the container's user")
    }

    fn start(&self, output: Output) -> Result<Started, Ended> {
        let (started, started_rx) = mpsc::channel();
        let (spec, docker) = (self.spec.clone(), self.docker.clone());
        let thread = std::thread::spawn(move || {
            let mut events = Events {
                output,
                started: Some(started),
            };
            crate::docker::run_container(&spec, &docker, &mut events)
        });
        match started_rx.recv() {
            Ok(pid) => {
                *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
                // The container's processes are the tree under its init process.
                Ok(Started {
                    pid,
                    sample_root: pid as u32,
                })
            }
            // The thread ended without a start: it says why.
            Err(_) => Err(Self::ended(thread)),
        }
    }

    fn wait(&self) -> anyhow::Result<Ended> {
        let thread = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .context("the container was not started")?;
        Ok(Self::ended(thread))
    }

    fn stop(&self, signal: Signal) {
        // The supervisor stops the container on SIGTERM (Docker kills it after the grace
        // period), so any stop is a SIGTERM to the supervisor; killing the supervisor would
        // leave the container running.
        let _ = signal;
        if let Ok(Some(supervisor)) = spool::read_json::<ProcessRecord>(&self.state.supervisor())
            && supervisor.boot_id == spool::boot_id()
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(supervisor.pid), Signal::SIGTERM);
        }
    }

    fn recover(&self) -> Recovered {
        // The container is removed by `destroy`, by its labels.
        recover_supervisor(&self.state, || {
            "the run's supervisor process is gone (killed, or the machine restarted); its \
             container was stopped and removed"
                .to_string()
        })
    }

    fn destroy(&self) -> BoxFuture<'static, anyhow::Result<usize>> {
        let (host, agent_id) = (self.docker.host.clone(), self.docker.agent_id.clone());
        let (run_id, attempt) = (self.spec.run_id, self.spec.attempt);
        Box::pin(async move {
            crate::docker::remove_run_containers(host.as_deref(), &agent_id, run_id, attempt).await
        })
    }
}
