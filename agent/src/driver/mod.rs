//! Drivers: how one attempt's script is started, waited for, stopped, recovered and
//! destroyed — as processes of the supervisor ([`ProcessDriver`]) or as a Docker container
//! ([`ContainerDriver`]). The shape is Nomad's task driver's.
//!
//! A driver is built from the attempt's `spec.json` and state directory
//! ([`for_attempt`]), in two places: the run's supervisor (`supervisor.rs`) calls
//! [`Driver::start`] and [`Driver::wait`] and holds the running script; the agent
//! (`run/follow.rs`) calls [`Driver::stop`], [`Driver::recover`] and [`Driver::destroy`],
//! which work from what the supervisor recorded in the state directory
//! (`supervisor.json`, `child.json`), so they work the same after an agent restart.
//! Nothing outside this module asks which kind of run it is.

use std::path::Path;
use std::sync::mpsc;

use futures::future::BoxFuture;
use nix::sys::signal::Signal;

use crate::spool::{Exit, Spec, StateDir};

mod container;
mod process;

pub(crate) use container::ContainerDriver;
pub(crate) use process::ProcessDriver;

/// What the script produced, on its way to the spool writer.
pub(crate) enum Record {
    /// stream, rank, text
    Log(i32, Option<u32>, String),
    /// name, value, step, rank
    Metric(String, f64, Option<i64>, Option<u32>),
}

/// Where a driver sends the script's output lines.
pub(crate) type Output = mpsc::SyncSender<Record>;

/// A script that started.
pub(crate) struct Started {
    /// What a stop signals and `child.json` records: the process group of the script's
    /// processes, or the container's init process.
    pub pid: i32,
    /// The root of the process tree whose CPU and memory are the run's.
    pub sample_root: u32,
}

/// How the script ended, or why it never started.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    /// The exit code, or 128 + the signal number.
    pub exit_code: Option<i32>,
    pub description: String,
    /// The script never started: why.
    pub start_error: Option<String>,
    /// The environment (image, devices) is at fault, not the script.
    pub env_failed: bool,
    /// The gang rank whose failure ended the node.
    pub failed_rank: Option<u32>,
}

impl Ended {
    /// A script that could not be started.
    pub fn not_started(message: String, env_failed: bool, failed_rank: Option<u32>) -> Ended {
        Ended {
            exit_code: None,
            description: message.clone(),
            start_error: Some(message),
            env_failed,
            failed_rank,
        }
    }
}

/// What became of an attempt whose agent looks at it again.
#[derive(Debug)]
pub(crate) enum Recovered {
    /// Its supervisor has not recorded itself yet: it is starting.
    Starting,
    /// Its supervisor lives: the script runs (or is being reported).
    Running,
    /// The supervisor is gone; this is how the attempt ended (its own `exit.json`, or, when
    /// it vanished without one, a lost end; what it left running was stopped).
    Ended(Exit),
}

pub(crate) trait Driver: Send + Sync {
    /// Gives the metrics socket to whoever the script runs as (and no one else).
    fn grant_metrics_socket(&self, path: &Path) -> anyhow::Result<()>;
    /// Starts the script; its output goes to `output` until [`Driver::wait`] returns.
    /// `Err`: it did not start (or was stopped first), and this is its end.
    fn start(&self, output: Output) -> Result<Started, Ended>;
    /// Waits for the script to end; nothing it started is left running after.
    fn wait(&self) -> anyhow::Result<Ended>;
    /// Asks the script to stop (SIGTERM) or makes it (SIGKILL); from the supervisor or
    /// from the agent.
    fn stop(&self, signal: Signal);
    /// The agent looks at the attempt again (each time it follows it, and after its own
    /// restart): see [`Recovered`].
    fn recover(&self) -> Recovered;
    /// Removes what the attempt may have left behind once it has ended (containers and
    /// networks of a supervisor that died); how many things were removed.
    fn destroy(&self) -> BoxFuture<'static, anyhow::Result<usize>>;
}

/// The driver of the attempt that `spec` describes, its state in `state`.
pub(crate) fn for_attempt(spec: &Spec, state: &StateDir) -> Box<dyn Driver> {
    match &spec.docker {
        Some(docker) => Box::new(ContainerDriver::new(spec, docker, state)),
        None => Box::new(ProcessDriver::new(spec, state)),
    }
}

/// Shared by the drivers' `recover`: the supervisor's state, and its exit when it is gone.
fn recover_supervisor(state: &StateDir, vanished: impl FnOnce() -> String) -> Recovered {
    use crate::spool::{self, ProcessRecord};
    let record: ProcessRecord = match spool::read_json(&state.supervisor()) {
        Ok(Some(record)) => record,
        _ => return Recovered::Starting,
    };
    if record.alive() {
        return Recovered::Running;
    }
    // It may have written exit.json just before exiting.
    if let Ok(Some(exit)) = spool::read_json::<Exit>(&state.exit()) {
        return Recovered::Ended(exit);
    }
    let message = vanished();
    Recovered::Ended(Exit {
        exit_code: None,
        description: message.clone(),
        start_error: Some(message),
        lost: true,
        ..Default::default()
    })
}
