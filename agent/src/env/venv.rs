//! Virtual environments from a requirements file in the snapshot:
//! `venv: {requirements: requirements.txt, python: python3}`.
//!
//! Built with `uv venv --seed` + `uv pip install -r` when `uv` is on the agent's `PATH`, else
//! with `PYTHON -m venv` + `PREFIX/bin/python -m pip install -r`, in the snapshot directory
//! (so relative paths in the file, e.g. `--find-links wheels`, work: pip also resolves them
//! against the requirements file's directory). Cached by the file's content, the
//! interpreter's real path and version, and the platform.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

use kiln_proto::v1;

use super::cache::Key;
use super::command::{self, find_program};
use super::{Context, EnvError, Prepared};

/// Prepares (builds or reuses) the virtual environment `spec` asks for.
pub async fn prepare(
    spec: &v1::VenvEnvironment,
    context: &mut Context<'_>,
) -> Result<Prepared, EnvError> {
    if spec.requirements.is_empty() {
        return Err(EnvError(
            "venv environment: `requirements` is not set: name a requirements file in the \
             submitted directory, e.g. requirements.txt"
                .into(),
        ));
    }
    let requirements = super::spec_file(context.work, &spec.requirements)?;
    let requirements_text = std::fs::read(&requirements)
        .map_err(|e| EnvError(format!("could not read `{}`: {e}", spec.requirements)))?;
    let python = if spec.python.is_empty() {
        context.default_python
    } else {
        &spec.python
    };
    let interpreter = interpreter(python).await?;
    let mut key = Key::builder("venv");
    key.part("requirements", &requirements_text)
        .part("python", interpreter.identity.as_bytes())
        .part("platform", super::platform().as_bytes());
    let key = key.finish();

    let uv = find_program("uv");
    let cache = context.cache();
    let run_dir = context.run_dir().to_path_buf();
    let work = context.work.to_path_buf();
    let cancel = context.cancel.clone();
    let log = &mut *context.log;
    log(&format!(
        "Preparing environment {key} from {} with {} ({}).",
        spec.requirements,
        interpreter.path.display(),
        interpreter.version
    ));
    let started = std::time::Instant::now();
    let entry = cache
        .get_or_build(&key, &run_dir, &spec.requirements, &cancel, |prefix| {
            build(
                prefix,
                &interpreter.path,
                &requirements,
                &work,
                uv,
                &mut *log,
            )
        })
        .await?;
    super::report(&mut *log, &key, &entry, started);
    Ok(activate(&entry.prefix))
}

/// What a run in the venv at `prefix` gets.
pub fn activate(prefix: &Path) -> Prepared {
    let bin = prefix.join("bin");
    Prepared {
        python: bin.join("python"),
        env: vec![
            (
                "VIRTUAL_ENV".to_string(),
                prefix.to_string_lossy().into_owned(),
            ),
            ("PATH".to_string(), command::path_with(&bin)),
        ],
    }
}

async fn build(
    prefix: PathBuf,
    python: &Path,
    requirements: &Path,
    work: &Path,
    uv: Option<PathBuf>,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    let venv_python = prefix.join("bin/python");
    let quiet = |command: &mut tokio::process::Command| {
        command
            .current_dir(work)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PIP_NO_INPUT", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONPATH");
    };
    let requirements_name = requirements
        .strip_prefix(work)
        .unwrap_or(requirements)
        .display()
        .to_string();
    if let Some(uv) = uv {
        log(&format!("Using {} (found on PATH).", uv.display()));
        let mut create = tokio::process::Command::new(&uv);
        create
            .arg("venv")
            .arg("--seed")
            .arg("--python")
            .arg(python)
            .arg(&prefix);
        quiet(&mut create);
        command::run(create, "uv venv", log).await?;
        let mut install = tokio::process::Command::new(&uv);
        install
            .args(["pip", "install", "--python"])
            .arg(&venv_python)
            .arg("-r")
            .arg(requirements);
        quiet(&mut install);
        command::run(
            install,
            &format!("uv pip install -r {requirements_name}"),
            log,
        )
        .await
    } else {
        let mut create = tokio::process::Command::new(python);
        create.args(["-m", "venv"]).arg(&prefix);
        quiet(&mut create);
        command::run(create, &format!("{} -m venv", python.display()), log).await?;
        let mut install = tokio::process::Command::new(&venv_python);
        install
            .args(["-m", "pip", "install", "-r"])
            .arg(requirements);
        quiet(&mut install);
        command::run(install, &format!("pip install -r {requirements_name}"), log).await
    }
}

/// An interpreter as the cache key sees it.
#[derive(Debug, Clone)]
struct Interpreter {
    /// Where it was found (what builds the venv).
    path: PathBuf,
    /// Its version, for people (`3.11.2`).
    version: String,
    /// Its real executable and full `sys.version`: what the key hashes.
    identity: String,
}

/// Finds `python` and asks it who it is. The answer is remembered per executable and
/// modification time, so a cache hit starts no interpreter after the first.
async fn interpreter(python: &str) -> Result<Interpreter, EnvError> {
    static KNOWN: LazyLock<Mutex<HashMap<(PathBuf, SystemTime), Interpreter>>> =
        LazyLock::new(Mutex::default);
    let path = find_program(python).ok_or_else(|| {
        EnvError(format!(
            "venv environment: interpreter `{python}` was not found on this agent: name an \
             interpreter on its PATH (e.g. python3) or an absolute path"
        ))
    })?;
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let modified = std::fs::metadata(&real)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let memo_key = (real.clone(), modified);
    if let Some(known) = KNOWN
        .lock()
        .expect("never poisoned")
        .get(&memo_key)
        .cloned()
    {
        return Ok(Interpreter { path, ..known });
    }
    let output = tokio::process::Command::new(&path)
        .args([
            "-c",
            "import os, platform, sys; print(os.path.realpath(sys.executable)); \
             print(platform.python_version()); print(sys.version)",
        ])
        .env_remove("PYTHONPATH")
        .output()
        .await
        .map_err(|e| EnvError(format!("could not start `{python}`: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let (Some(executable), Some(version), true) =
        (lines.next(), lines.next(), output.status.success())
    else {
        return Err(EnvError(format!(
            "`{python}` does not work as a Python interpreter ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    };
    let interpreter = Interpreter {
        path,
        version: version.to_string(),
        identity: format!("{executable}\n{}", lines.collect::<Vec<_>>().join("\n")),
    };
    KNOWN
        .lock()
        .expect("never poisoned")
        .insert(memo_key, interpreter.clone());
    Ok(interpreter)
}
