//! Run environments: what a run's script runs in. The run configuration's `environment:`
//! arrives in the assignment (`v1::Environment`); [`prepare`] turns it into a [`Prepared`]
//! environment before the supervisor starts: the interpreter for `.py` scripts and the
//! variables to add. User-managed environments are an existing interpreter; system-managed
//! ones are built by the agent, cached by content and reused ([`cache`]): virtual
//! environments from a requirements file ([`venv`]) and conda environments from an
//! environment.yml ([`conda`]); Docker runs the script in a container.
//!
//! A build that fails is an [`EnvError`]: the run ends `env_failed` with the tail of the
//! build output in its message.

pub mod cache;
mod command;
pub use command::find_program;
pub mod conda;
pub mod venv;

use std::path::{Path, PathBuf};

use kiln_proto::v1;
use tokio_util::sync::CancellationToken;

/// Default limit of the environment cache (`env_cache_max_bytes`): 50 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 50 << 30;

/// The agent's settings for environments.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Least-recently-used environments not in use are removed while the cache is larger.
    pub cache_max_bytes: u64,
    /// An external conda, mamba or micromamba that builds conda environments instead of the
    /// agent's built-in solver (`CMD env create -p PREFIX -f FILE`).
    pub conda_command: Option<PathBuf>,
    /// Where named conda channels are found (conda's `channel_alias`).
    pub conda_channel_alias: String,
    /// What the channel `defaults` stands for (conda's `default_channels`).
    pub conda_default_channels: Vec<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            conda_command: None,
            conda_channel_alias: conda::DEFAULT_CHANNEL_ALIAS.to_string(),
            conda_default_channels: conda::default_default_channels(),
        }
    }
}

/// The environment a run's processes start in.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The interpreter for `.py` scripts.
    pub python: PathBuf,
    /// Variables to add (PATH, CONDA_PREFIX, VIRTUAL_ENV, ...), in order.
    pub env: Vec<(String, String)>,
}

/// The environment could not be prepared; the message is for the user (it ends the run
/// with status `env_failed`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(pub String);

/// What prepares environments: the agent's configuration and a sink for the lines of the
/// preparation phase (they go into the run's log, marked as Kiln's own).
pub struct Context<'a> {
    /// The agent's configured interpreter (`--python`).
    pub default_python: &'a str,
    /// The agent's data directory: caches live under it.
    pub data_dir: &'a Path,
    /// The unpacked snapshot, `runs/<run>.<attempt>/work` (spec files such as
    /// environment.yml are relative to it). Its parent, the run directory, records which
    /// cached environment the run uses.
    pub work: &'a Path,
    pub settings: &'a Settings,
    /// Cancelled when the run is: a build in progress is stopped (and leaves nothing).
    pub cancel: &'a CancellationToken,
    pub log: &'a mut (dyn FnMut(&str) + Send),
}

impl Context<'_> {
    /// The run's directory (the parent of `work`).
    fn run_dir(&self) -> &Path {
        self.work.parent().unwrap_or(self.work)
    }

    fn cache(&self) -> cache::Cache {
        cache::Cache::new(self.data_dir, self.settings.cache_max_bytes)
    }
}

/// Prepares the environment a run asked for (unset: user-managed with the agent's Python).
pub async fn prepare(
    environment: Option<&v1::Environment>,
    mut context: Context<'_>,
) -> Result<Prepared, EnvError> {
    use v1::environment::Kind;
    match environment.and_then(|e| e.kind.as_ref()) {
        None => Ok(user(None, context.default_python)),
        Some(Kind::User(user_env)) => Ok(user(Some(&user_env.python), context.default_python)),
        Some(Kind::Conda(spec)) => conda::prepare(spec, &mut context).await,
        Some(Kind::Venv(spec)) => venv::prepare(spec, &mut context).await,
        Some(Kind::Docker(_)) => Err(EnvError(
            "docker environments are not supported by this agent yet".into(),
        )),
    }
}

/// A user-managed environment: the interpreter as given. When it is a venv's or a conda
/// environment's (`PREFIX/bin/python` beside `PREFIX/pyvenv.cfg` or `PREFIX/conda-meta`), the
/// run gets that prefix as if activated: its `bin/` first on `PATH` (so a launcher script
/// finds the environment's `torchrun`, `accelerate`, …) and `VIRTUAL_ENV` / `CONDA_PREFIX`.
/// The path is not resolved through links: a venv's `python` links to the base interpreter.
fn user(python: Option<&str>, default_python: &str) -> Prepared {
    let python = PathBuf::from(python.filter(|p| !p.is_empty()).unwrap_or(default_python));
    let mut env = Vec::new();
    if let Some(bin) = python.parent().filter(|_| python.is_absolute())
        && let Some(prefix) = bin.parent()
    {
        let prefix_text = prefix.to_string_lossy().into_owned();
        if prefix.join("pyvenv.cfg").is_file() {
            env.push(("VIRTUAL_ENV".to_string(), prefix_text));
            env.push(("PATH".to_string(), command::path_with(bin)));
        } else if prefix.join("conda-meta").is_dir() {
            env.push(("CONDA_PREFIX".to_string(), prefix_text));
            env.push(("PATH".to_string(), command::path_with(bin)));
        }
    }
    Prepared { python, env }
}

/// The run's log lines about a cache lookup: built or reused (and how long it took), and
/// what was evicted to make room.
fn report(
    log: &mut (dyn FnMut(&str) + Send),
    key: &impl std::fmt::Display,
    entry: &cache::Entry,
    started: std::time::Instant,
) {
    let verb = if entry.reused { "reused" } else { "built" };
    log(&format!(
        "Environment {key} {verb} in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        entry.prefix.display()
    ));
    for name in &entry.evicted {
        log(&format!(
            "Environment {name} evicted from the cache (least recently used)."
        ));
    }
}

/// A path inside the snapshot named by the run configuration, refused if it leaves it.
pub fn spec_file(work: &Path, name: &str) -> Result<PathBuf, EnvError> {
    let relative = Path::new(name);
    let inside = !name.is_empty()
        && relative.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    if !inside {
        return Err(EnvError(format!(
            "`{name}` must be a path inside the submitted directory"
        )));
    }
    let path = work.join(relative);
    if !path.is_file() {
        return Err(EnvError(format!(
            "`{name}` does not exist in the submitted directory"
        )));
    }
    Ok(path)
}

/// The agent's platform as cache keys record it (`linux-x86_64`).
fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_or_conda_interpreter_puts_its_bin_first_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        let python = venv.join("bin/python");
        let prepared = user(Some(python.to_str().unwrap()), "python3");
        assert_eq!(prepared.python, python);
        let var = |name: &str| {
            prepared
                .env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            var("VIRTUAL_ENV"),
            Some(venv.to_string_lossy().into_owned())
        );
        let path = var("PATH").expect("PATH set");
        assert_eq!(
            std::env::split_paths(&path).next(),
            Some(venv.join("bin")),
            "{path}"
        );

        let conda = dir.path().join("conda");
        std::fs::create_dir_all(conda.join("bin")).unwrap();
        std::fs::create_dir_all(conda.join("conda-meta")).unwrap();
        let prepared = user(Some(conda.join("bin/python").to_str().unwrap()), "python3");
        assert!(
            prepared
                .env
                .iter()
                .any(|(k, v)| k == "CONDA_PREFIX" && Path::new(v) == conda)
        );

        // A system interpreter or a bare name changes nothing.
        assert!(user(Some("/usr/bin/python3"), "python3").env.is_empty());
        assert!(user(None, "python3").env.is_empty());
    }
}
