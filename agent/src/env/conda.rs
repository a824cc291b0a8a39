//! Conda environments from a standard `environment.yml` in the snapshot:
//! `conda: {file: environment.yml}`.
//!
//! The agent solves and installs them itself with rattler: repodata from the file's channels
//! through `rattler_repodata_gateway` (a `file://` channel works offline; a relative path such
//! as `./channel` is a channel inside the submitted directory), a resolvo solve against the
//! host's virtual packages, rattler's installer into the cache's prefix, then the `pip:`
//! entries with the environment's own Python. With the agent setting `conda_command` an
//! external conda, mamba or micromamba builds it instead (`CMD env create -p PREFIX -f FILE`),
//! for sites whose `.condarc` (mirrors, proxies, credentials) must apply.
//!
//! Cached by the file's content, the platform, each channel as written plus, for local
//! channels, the content of their `repodata.json`, and the external command if any.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_proto::v1;
use rattler::install::Installer;
use rattler::package_cache::PackageCache;
use rattler_conda_types::{
    Channel, ChannelConfig, GenericVirtualPackage, MatchSpec, ParseStrictness, RepoDataRecord,
    Subdir,
};
use rattler_repodata_gateway::Gateway;
use rattler_solve::{SolverImpl as _, SolverTask, resolvo};
use serde::Deserialize;

use super::cache::Key;
use super::command;
use super::{Context, EnvError, Prepared};

/// Channels used when the file lists none (conda's own default needs a `.condarc`).
const DEFAULT_CHANNEL: &str = "conda-forge";
/// Where named channels are found unless the agent says otherwise (conda's default).
pub const DEFAULT_CHANNEL_ALIAS: &str = "https://conda.anaconda.org";
/// What `defaults` means unless the agent says otherwise (conda's default on Linux).
pub const DEFAULT_DEFAULT_CHANNELS: [&str; 2] = [
    "https://repo.anaconda.com/pkgs/main",
    "https://repo.anaconda.com/pkgs/r",
];

/// [`DEFAULT_DEFAULT_CHANNELS`], owned (the settings' default).
pub fn default_default_channels() -> Vec<String> {
    DEFAULT_DEFAULT_CHANNELS.map(String::from).to_vec()
}

/// The channels a file's list stands for, as conda reads it: `defaults` becomes the agent's
/// `conda_default_channels`, every other entry stays (named ones resolve under the channel
/// alias, paths and URLs as written).
fn expand_channels(written: &[String], default_channels: &[String]) -> Vec<String> {
    let mut channels = Vec::new();
    for channel in written {
        if channel == "defaults" {
            channels.extend(default_channels.iter().cloned());
        } else {
            channels.push(channel.clone());
        }
    }
    channels
}

/// What to say when the channels cannot be read: where they were looked for, and what an
/// agent without that network can do instead.
fn unreachable_advice(channels: &[Channel]) -> String {
    let urls: Vec<String> = channels
        .iter()
        .map(|c| c.base_url.url().as_str().trim_end_matches('/').to_string())
        .collect();
    format!(
        "the channels were looked for at {}. If this agent cannot reach them (offline, a \
         proxy, a firewall): list a local channel in the file (file:///PATH, or a ./channel \
         directory in the submitted files), point the agent's conda_channel_alias (named \
         channels) or conda_default_channels (`defaults`) at a mirror, or set conda_command \
         to a conda configured for this network",
        urls.join(", ")
    )
}

/// A parsed `environment.yml`.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentFile {
    pub name: Option<String>,
    pub channels: Vec<String>,
    /// Conda match specs (`python=3.11`, `numpy >=2`).
    pub specs: Vec<String>,
    /// The `pip:` entries, in order (requirements, or pip options such as `-r file`).
    pub pip: Vec<String>,
    /// `variables:`, set in the run's environment.
    pub variables: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    dependencies: Vec<RawDependency>,
    /// conda's own; the agent decides where environments live.
    #[allow(dead_code)]
    prefix: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDependency {
    Spec(String),
    Section(BTreeMap<String, Vec<String>>),
}

impl EnvironmentFile {
    /// Parses the text of an environment.yml; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<EnvironmentFile, EnvError> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|e| {
            EnvError(format!(
                "`{origin}` is not a valid environment.yml: {e} (expected the keys name, \
                 channels, dependencies, variables)"
            ))
        })?;
        let mut specs = Vec::new();
        let mut pip = Vec::new();
        for dependency in raw.dependencies {
            match dependency {
                RawDependency::Spec(spec) => specs.push(spec),
                RawDependency::Section(section) => {
                    for (key, entries) in section {
                        if key != "pip" {
                            return Err(EnvError(format!(
                                "`{origin}`: dependencies may hold package specs and one \
                                 `pip:` list, not `{key}:`"
                            )));
                        }
                        pip.extend(entries);
                    }
                }
            }
        }
        let mut variables = Vec::new();
        for (name, value) in raw.variables {
            let value = match value {
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(EnvError(format!(
                        "`{origin}`: variable `{name}` must be a string, number or boolean"
                    )));
                }
            };
            variables.push((name, value));
        }
        let channels = raw
            .channels
            .into_iter()
            .filter(|c| c != "nodefaults")
            .collect();
        Ok(EnvironmentFile {
            name: raw.name,
            channels,
            specs,
            pip,
            variables,
        })
    }
}

/// Prepares (builds or reuses) the conda environment `spec` asks for.
pub async fn prepare(
    spec: &v1::CondaEnvironment,
    context: &mut Context<'_>,
) -> Result<Prepared, EnvError> {
    if spec.file.is_empty() {
        return Err(EnvError(
            "conda environment: `file` is not set: name an environment.yml in the submitted \
             directory"
                .into(),
        ));
    }
    let path = super::spec_file(context.work, &spec.file)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EnvError(format!("could not read `{}`: {e}", spec.file)))?;
    let file = EnvironmentFile::parse(&text, &spec.file)?;
    let subdir = Subdir::current().ok_or_else(|| {
        EnvError("conda environments are not supported on this agent's platform".into())
    })?;
    let external = context.settings.conda_command.clone();
    let mut channels = expand_channels(&file.channels, &context.settings.conda_default_channels);
    if channels.is_empty() && external.is_none() {
        channels.push(DEFAULT_CHANNEL.to_string());
    }
    let mut channel_config = ChannelConfig::default_with_root_dir(context.work.to_path_buf());
    let alias = &context.settings.conda_channel_alias;
    channel_config.channel_alias = url::Url::parse(&format!("{}/", alias.trim_end_matches('/')))
        .map_err(|e| {
            EnvError(format!(
                "the agent's conda_channel_alias `{alias}` is invalid: {e}"
            ))
        })?;

    let mut key = Key::builder("conda");
    key.part("file", text.as_bytes())
        .part("subdir", subdir.as_str().as_bytes());
    if let Some(external) = &external {
        key.part("conda_command", external.as_os_str().as_encoded_bytes());
    }
    let mut parsed_channels = Vec::new();
    for written in &channels {
        let channel = Channel::from_str(written, &channel_config).map_err(|e| {
            EnvError(format!(
                "`{}`: channel `{written}` is invalid: {e}",
                spec.file
            ))
        })?;
        key.part("channel", written.as_bytes());
        // A named channel is found under the alias: another alias is another channel. (The
        // default alias adds nothing, so keys from before the setting stay valid.)
        let named = !written.contains('/') && !written.contains(':');
        if named && context.settings.conda_channel_alias != DEFAULT_CHANNEL_ALIAS {
            key.part(
                "channel_alias",
                context.settings.conda_channel_alias.as_bytes(),
            );
        }
        // A local channel can change under the same name: its index is part of the key.
        if let Ok(dir) = channel.base_url.url().to_file_path() {
            for sub in [subdir.as_str(), "noarch"] {
                let index = std::fs::read(dir.join(sub).join("repodata.json")).unwrap_or_default();
                key.part("repodata", &index);
            }
        }
        parsed_channels.push(channel);
    }
    let key = key.finish();

    let cache = context.cache();
    let run_dir = context.run_dir().to_path_buf();
    let work = context.work.to_path_buf();
    let conda_dir = context.data_dir.join("conda");
    let cancel = context.cancel.clone();
    let log = &mut *context.log;
    log(&format!("Preparing environment {key} from {}.", spec.file));
    let started = std::time::Instant::now();
    let entry = cache
        .get_or_build(&key, &run_dir, &spec.file, &cancel, |prefix| async {
            match &external {
                Some(program) => external_build(program, prefix, &path, &work, &mut *log).await,
                None => {
                    let solve = Solve {
                        channels: parsed_channels,
                        specs: &file.specs,
                        origin: &spec.file,
                        subdir,
                        conda_dir: &conda_dir,
                    };
                    rattler_build(solve, &prefix, &mut *log).await?;
                    pip_install(&prefix, &file.pip, &work, &mut *log).await
                }
            }
        })
        .await?;
    super::report(&mut *log, &key, &entry, started);
    let env_name = file.name.clone().unwrap_or_else(|| key.to_string());
    Ok(activate(
        &entry.prefix,
        &env_name,
        context.default_python,
        &file.variables,
    ))
}

/// What a run in the conda environment at `prefix` gets.
pub fn activate(
    prefix: &Path,
    name: &str,
    default_python: &str,
    variables: &[(String, String)],
) -> Prepared {
    let bin = prefix.join("bin");
    let python = bin.join("python");
    let python = if python.exists() {
        python
    } else {
        PathBuf::from(default_python)
    };
    let mut env = vec![
        ("PATH".to_string(), command::path_with(&bin)),
        (
            "CONDA_PREFIX".to_string(),
            prefix.to_string_lossy().into_owned(),
        ),
        ("CONDA_DEFAULT_ENV".to_string(), name.to_string()),
    ];
    env.extend(variables.iter().cloned());
    Prepared { python, env }
}

struct Solve<'a> {
    channels: Vec<Channel>,
    specs: &'a [String],
    origin: &'a str,
    subdir: Subdir,
    /// `DATA_DIR/conda`: the repodata and package caches.
    conda_dir: &'a Path,
}

/// Solves with resolvo and installs with rattler into `prefix`.
async fn rattler_build(
    solve: Solve<'_>,
    prefix: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    install_crypto_provider();
    let specs = solve
        .specs
        .iter()
        .map(|s| {
            MatchSpec::from_str(s, ParseStrictness::Lenient).map_err(|e| {
                EnvError(format!(
                    "`{}`: dependency `{s}` is invalid: {e}",
                    solve.origin
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channel_names: Vec<String> = solve.channels.iter().map(|c| c.canonical_name()).collect();
    log(&format!(
        "Solving {} for {} from {}.",
        solve.specs.join(", "),
        solve.subdir.as_str(),
        channel_names.join(", ")
    ));
    let package_cache = PackageCache::new(solve.conda_dir.join("pkgs"));
    let advice_channels = solve.channels.clone();
    let gateway = Gateway::builder()
        .with_cache_dir(solve.conda_dir.join("repodata"))
        .with_package_cache(package_cache.clone())
        .finish();
    let repodata = gateway
        .query(
            solve.channels,
            [solve.subdir, Subdir::NoArch],
            specs.clone(),
        )
        .recursive(true)
        .await
        .map_err(|e| {
            EnvError(format!(
                "could not read the channels' repodata: {}; {}",
                chain(&e),
                unreachable_advice(&advice_channels)
            ))
        })?;
    let virtual_packages: Vec<GenericVirtualPackage> =
        rattler_virtual_packages::VirtualPackages::detect(&Default::default(), None)
            .map_err(|e| EnvError(format!("could not detect virtual packages: {}", chain(&e))))?
            .into_generic_virtual_packages()
            .collect();
    let solve_specs = specs.clone();
    let records: Vec<RepoDataRecord> = tokio::task::spawn_blocking(move || {
        let task = SolverTask {
            virtual_packages,
            specs: solve_specs,
            ..SolverTask::from_iter(&repodata)
        };
        resolvo::Solver.solve(task).map(|solved| solved.records)
    })
    .await
    .map_err(|e| EnvError(format!("the solver stopped: {e}")))?
    .map_err(|e| EnvError(format!("the conda environment cannot be solved: {e}")))?;
    log(&format!("Solved: {} packages.", records.len()));
    for record in &records {
        let package = &record.package_record;
        log(&format!(
            "  + {} {} {}",
            package.name.as_normalized(),
            package.version,
            package.build
        ));
    }
    Installer::new()
        .with_package_cache(package_cache)
        .with_target_platform(solve.subdir)
        .with_requested_specs(specs)
        .with_execute_link_scripts(false)
        .install(prefix, records)
        .await
        .map_err(|e| {
            EnvError(format!(
                "could not install the conda packages: {}",
                chain(&e)
            ))
        })?;
    log("Conda packages installed.");
    Ok(())
}

/// Installs the file's `pip:` entries with the environment's own Python.
async fn pip_install(
    prefix: &Path,
    entries: &[String],
    work: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    if entries.is_empty() {
        return Ok(());
    }
    let python = prefix.join("bin/python");
    if !python.exists() {
        return Err(EnvError(
            "the environment has `pip:` dependencies but no Python: add python and pip to its \
             dependencies"
                .into(),
        ));
    }
    let mut install = tokio::process::Command::new(&python);
    install
        .args(["-m", "pip", "install"])
        .args(entries)
        .current_dir(work)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_NO_INPUT", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONPATH");
    command::run(install, "pip install (the environment's pip: entries)", log).await
}

/// `CMD env create -p PREFIX -f FILE` with an external conda, mamba or micromamba.
async fn external_build(
    program: &Path,
    prefix: PathBuf,
    file: &Path,
    work: &Path,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<(), EnvError> {
    log(&format!(
        "Building with {} (the agent's conda_command).",
        program.display()
    ));
    let mut create = tokio::process::Command::new(program);
    create
        .args(["env", "create", "-p"])
        .arg(&prefix)
        .arg("-f")
        .arg(file)
        .current_dir(work)
        // No one answers prompts (micromamba asks before it installs).
        .env("CONDA_ALWAYS_YES", "true")
        .env("MAMBA_ALWAYS_YES", "true")
        .env_remove("PYTHONPATH");
    let what = format!("{} env create", program.display());
    command::run(create, &what, log).await
}

/// rattler's HTTP stack (reqwest) brings both ring and aws-lc-rs; rustls needs one chosen
/// process-wide. Kiln uses ring everywhere (tonic, bollard).
fn install_crypto_provider() {
    // An error means a provider is installed already, which is all this wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_stands_for_the_agents_default_channels_in_place() {
        let defaults = vec![
            "file:///mirror/main".to_string(),
            "file:///mirror/r".to_string(),
        ];
        let written: Vec<String> = ["./channel", "defaults", "conda-forge"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            expand_channels(&written, &defaults),
            [
                "./channel",
                "file:///mirror/main",
                "file:///mirror/r",
                "conda-forge"
            ]
        );
        assert!(expand_channels(&[], &defaults).is_empty());
    }

    #[test]
    fn environment_files_parse_as_conda_writes_them() {
        let file = EnvironmentFile::parse(
            "name: train\nchannels:\n  - ./channel\n  - conda-forge\n  - nodefaults\n\
             dependencies:\n  - python=3.11\n  - numpy >=2\n  - pip\n  - pip:\n    - requests==2.32.0\n    \
             - -r requirements.txt\nvariables:\n  OMP_NUM_THREADS: 4\n  MODE: fast\n",
            "environment.yml",
        )
        .unwrap();
        assert_eq!(
            file,
            EnvironmentFile {
                name: Some("train".into()),
                channels: vec!["./channel".into(), "conda-forge".into()],
                specs: vec!["python=3.11".into(), "numpy >=2".into(), "pip".into()],
                pip: vec!["requests==2.32.0".into(), "-r requirements.txt".into()],
                variables: vec![
                    ("MODE".into(), "fast".into()),
                    ("OMP_NUM_THREADS".into(), "4".into())
                ],
            }
        );
    }

    #[test]
    fn bad_environment_files_are_named_with_the_problem() {
        let check = |text: &str, expected: &str| {
            let error = EnvironmentFile::parse(text, "env.yml").unwrap_err().0;
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("env.yml"), "{error}");
        };
        check("dependencies: [a\n", "not a valid environment.yml");
        check("name: x\ndepends:\n  - a\n", "unknown field `depends`");
        check("dependencies:\n  - npm:\n    - left-pad\n", "not `npm:`");
        check("variables:\n  A: [1, 2]\n", "variable `A`");
    }

    #[tokio::test]
    async fn an_external_conda_command_gets_the_prefix_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("args");
        let fake = dir.path().join("fake-conda");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" > {}\necho solving\nmkdir -p \"$4/bin\" \"$4/conda-meta\"\n",
                record.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let prefix = dir.path().join("envs/conda-x");
        let file = dir.path().join("environment.yml");
        let mut lines = Vec::new();
        external_build(&fake, prefix.clone(), &file, dir.path(), &mut |l: &str| {
            lines.push(l.to_string())
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&record).unwrap().trim(),
            format!("env create -p {} -f {}", prefix.display(), file.display())
        );
        assert!(prefix.join("conda-meta").is_dir());
        assert!(lines.contains(&"solving".to_string()), "{lines:?}");

        let prepared = activate(&prefix, "train", "python3", &[]);
        assert_eq!(
            prepared.python,
            PathBuf::from("python3"),
            "no python in the env"
        );
        assert!(prepared.env.contains(&(
            "CONDA_PREFIX".to_string(),
            prefix.to_string_lossy().into_owned()
        )));
    }
}
