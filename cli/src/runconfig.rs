//! The run configuration file: `kiln.yaml` in the submitted directory (or `--config PATH`)
//! says what `kiln submit` runs and how — script, arguments, target, environment, resources,
//! variables, time limit, retries and the distributed keys — so that `kiln submit DIR`
//! repeats a run without a long command line.
//!
//! [`load`] reads the file into a [`Layer`] (every key optional); a problem in it names the
//! file, the line and, for an unknown key, the keys valid at that level. The flags of
//! `kiln submit` make a second [`Layer`]; [`Layer::or`] lays the flags over the file and
//! [`Layer::resolve`] fills in the defaults, giving the [`RunConfig`] that is submitted and
//! that `--dry-run` prints. Precedence: flag (or its environment variable) > file > default.
//!
//! Reading the file is the only I/O here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln_common::target::TargetName;
use kiln_proto::v1;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file `kiln submit` reads from the submitted directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "kiln.yaml";

/// One layer of run configuration (the file, or the flags): every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// The script to run, relative to the submitted directory.
    pub script: Option<String>,
    /// Arguments for the script.
    pub args: Option<Vec<Text>>,
    /// The compute target.
    pub target: Option<String>,
    /// A name for the run (default: the script's file name).
    pub name: Option<String>,
    /// What the script runs in (default: the agent's Python).
    pub environment: Option<Environment>,
    /// What each node of the run needs.
    pub resources: Option<Resources>,
    /// Extra environment variables for the script.
    pub env: Option<BTreeMap<String, Text>>,
    /// Secret variables for the script, by name: each value is read from the submitter's
    /// own environment, stored encrypted, masked in the run's logs and never shown.
    pub secrets: Option<Vec<String>>,
    /// Place the run again, up to this many times, when its agent is lost.
    pub max_retries: Option<u32>,
    /// Stop the run after this long (seconds, or "90s", "30m", "2h"; 0: no limit).
    pub timeout: Option<Seconds>,
    /// Distributed runs: how many agents run it together.
    pub nodes: Option<u32>,
    /// Distributed runs: processes per node.
    pub procs_per_node: Option<u32>,
    /// Distributed runs: GPUs each node needs.
    pub gpus_per_node: Option<u32>,
    /// Distributed runs: `kiln` or `none`.
    pub launcher: Option<Launcher>,
    /// Distributed runs: whole-gang restarts before the run fails.
    pub max_restarts: Option<u32>,
    /// Upload $KILN_CHECKPOINT_DIR this often (0: off).
    pub checkpoint_interval: Option<Seconds>,
}

/// The environment a run's script runs in: exactly one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Environment {
    User(UserEnv),
    Conda(CondaEnv),
    Venv(VenvEnv),
    Docker(DockerEnv),
}

/// An interpreter that already exists on the agent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserEnv {
    /// Default: the agent's configured Python.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
}

/// A conda environment the agent builds from a file in the snapshot.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CondaEnv {
    /// The environment.yml, relative to the submitted directory.
    pub file: String,
}

/// A virtual environment the agent builds from a requirements file in the snapshot.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VenvEnv {
    /// The requirements file, relative to the submitted directory.
    pub requirements: String,
    /// The interpreter that creates it (default: python3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
}

/// A container the script runs in.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerEnv {
    /// `auto` (default), `cpu`, `gpu` or an image reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An environment.yml (relative to the submitted directory) baked into the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conda: Option<String>,
    /// The container's /dev/shm, e.g. 8GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Size>,
}

/// What one node of a run needs; unset: no requirement.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Bytes, or a size such as 500MB or 16GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

/// How a distributed run's processes are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// Kiln starts procs_per_node processes per node, with torchrun's variables.
    Kiln,
    /// One process per node, which starts its own workers (e.g. `torchrun train.py`).
    #[serde(rename = "none")]
    #[value(name = "none")]
    Own,
}

impl Launcher {
    pub fn as_str(self) -> &'static str {
        match self {
            Launcher::Kiln => "kiln",
            Launcher::Own => "none",
        }
    }
}

/// A number of bytes, written as a plain number or a size string (500MB, 16GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// A number of seconds, written as a plain number or a duration string (90s, 30m, 2h, 1h30m).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seconds(pub u32);

/// A YAML scalar taken as text: `5`, `0.01` and `true` are the strings "5", "0.01", "true"
/// (quote a value to keep it exactly as written, e.g. `"1e-3"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

/// The configuration that is submitted: the layers merged and the defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    pub script: String,
    pub args: Vec<String>,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub environment: Environment,
    pub resources: Resources,
    pub env: BTreeMap<String, String>,
    /// Names only: the values come from the submitter's environment at submit time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub timeout: Seconds,
    pub max_retries: u32,
    pub checkpoint_interval: Seconds,
    pub nodes: u32,
    pub procs_per_node: u32,
    pub gpus_per_node: u32,
    pub launcher: Launcher,
    pub max_restarts: u32,
}

/// Reads the run configuration for `dir`: `explicit` (`--config`, relative to the current
/// directory), which must exist, else `dir/kiln.yaml` if it exists. Returns the layer and
/// the file it came from (`None`: no file).
pub fn load(dir: &Path, explicit: Option<&Path>) -> anyhow::Result<(Layer, Option<PathBuf>)> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => dir.join(DEFAULT_FILE),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok((Layer::default(), None));
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "run configuration `{}` (--config) does not exist; the path is relative to the current directory",
                path.display()
            )
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("read run configuration `{}`", path.display()));
        }
    };
    let layer = parse(&text, &path)?;
    Ok((layer, Some(path)))
}

/// Parses the text of a run configuration file; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Layer> {
    serde_norway::from_str::<Layer>(text).map_err(|error| anyhow::anyhow!(describe(&error, origin)))
}

/// A parse error as a user should read it: the file, the line, what is wrong, and for an
/// unknown key the keys valid at that level.
fn describe(error: &serde_norway::Error, origin: &Path) -> String {
    let full = error.to_string();
    let location = error.location();
    // serde_norway says " at line L column C" in its message when it knows where it is;
    // the line goes first here instead.
    let position = location
        .as_ref()
        .map(|at| format!(" at line {} column {}", at.line(), at.column()));
    let (message, positioned) = match position.filter(|p| full.contains(p.as_str())) {
        Some(position) => (full.replacen(&position, "", 1), true),
        None => (full, false),
    };
    let message = reword(&message);
    // Errors about the top level that are raised after its keys were read (a duplicate key)
    // carry no position: serde_norway reports line 1 for them, which would mislead.
    let line = location
        .map(|location| location.line())
        .filter(|_| positioned || !message.starts_with("duplicate key"));
    match line {
        Some(line) => format!("{} line {line}: {message}", origin.display()),
        None => format!("{}: {message}", origin.display()),
    }
}

/// serde's wording ("unknown field `x`, expected one of `a`, `b`") in the file's terms:
/// "unknown key `x` in `environment.conda`; valid keys there: a, b".
fn reword(message: &str) -> String {
    // serde_norway puts the path to the value first ("environment.conda: ...").
    let (path, rest) = match message.find(": ") {
        Some(at) if !message[..at].contains(' ') => (Some(&message[..at]), &message[at + 2..]),
        _ => (None, message),
    };
    let Some(after) = rest.strip_prefix("unknown field `") else {
        let rest = rest
            .replacen("duplicate field", "duplicate key", 1)
            .replacen("missing field", "missing key", 1);
        return match path {
            Some(path) => format!("{path}: {rest}"),
            None => rest,
        };
    };
    let (key, expected) = after.split_once('`').unwrap_or((after, ""));
    let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let valid = if valid.is_empty() {
        "none".to_string()
    } else {
        valid.join(", ")
    };
    match path {
        Some(path) => format!("unknown key `{key}` in `{path}`; valid keys there: {valid}"),
        None => format!("unknown key `{key}`; valid keys: {valid}"),
    }
}

impl Layer {
    /// This layer over `lower`: each key this layer sets wins; `resources` and `env` merge
    /// key by key; `environment` is replaced whole.
    pub fn or(self, lower: Layer) -> Layer {
        let resources = match (self.resources, lower.resources) {
            (Some(upper), Some(lower)) => Some(Resources {
                cpus: upper.cpus.or(lower.cpus),
                memory: upper.memory.or(lower.memory),
                gpus: upper.gpus.or(lower.gpus),
            }),
            (upper, lower) => upper.or(lower),
        };
        let env = match (self.env, lower.env) {
            (Some(upper), Some(mut lower)) => {
                lower.extend(upper);
                Some(lower)
            }
            (upper, lower) => upper.or(lower),
        };
        let secrets = match (self.secrets, lower.secrets) {
            (Some(mut upper), Some(lower)) => {
                upper.extend(lower);
                Some(upper)
            }
            (upper, lower) => upper.or(lower),
        };
        // The lower layer's args belong to its script: naming another script on top (e.g.
        // `kiln submit . eval.py` next to `script: train.py` in kiln.yaml) drops them.
        let other_script = self.script.is_some() && self.script != lower.script;
        let lower_args = if other_script { None } else { lower.args };
        Layer {
            script: self.script.or(lower.script),
            args: self.args.or(lower_args),
            target: self.target.or(lower.target),
            name: self.name.or(lower.name),
            environment: self.environment.or(lower.environment),
            resources,
            env,
            secrets,
            max_retries: self.max_retries.or(lower.max_retries),
            timeout: self.timeout.or(lower.timeout),
            nodes: self.nodes.or(lower.nodes),
            procs_per_node: self.procs_per_node.or(lower.procs_per_node),
            gpus_per_node: self.gpus_per_node.or(lower.gpus_per_node),
            launcher: self.launcher.or(lower.launcher),
            max_restarts: self.max_restarts.or(lower.max_restarts),
            checkpoint_interval: self.checkpoint_interval.or(lower.checkpoint_interval),
        }
    }

    /// Fills in the defaults. `default_target` is the target used when none is named (the
    /// local target; `None` with a coordinator); `file` is where the configuration file is
    /// or would be, for errors.
    pub fn resolve(self, default_target: Option<&str>, file: &Path) -> anyhow::Result<RunConfig> {
        let in_file = || format!("`{}`", file.display());
        let Some(script) = self.script else {
            anyhow::bail!(
                "no script to run: name it after the directory (kiln submit DIR SCRIPT) or set `script:` in {}",
                in_file()
            );
        };
        let script = script.trim_start_matches("./").to_string();
        anyhow::ensure!(!script.is_empty(), "the script name is empty");
        let Some(target) = self.target.or(default_target.map(str::to_string)) else {
            anyhow::bail!(
                "--target is required with a coordinator: name the compute target to run on (see `kiln targets`), or set `target:` in {}",
                in_file()
            );
        };
        let target = TargetName::new(&target)?.to_string();
        let mut secrets = self.secrets.unwrap_or_default();
        secrets.sort();
        secrets.dedup();
        for name in &secrets {
            anyhow::ensure!(
                self.env.as_ref().is_none_or(|env| !env.contains_key(name)),
                "`{name}` is both in `secrets:`/--secret and in `env:`/--env: give it once, as a secret"
            );
        }
        Ok(RunConfig {
            script,
            args: self
                .args
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.0)
                .collect(),
            target,
            name: self.name,
            environment: self
                .environment
                .unwrap_or(Environment::User(UserEnv::default())),
            resources: self.resources.unwrap_or_default(),
            env: self
                .env
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.0))
                .collect(),
            secrets,
            timeout: self.timeout.unwrap_or_default(),
            max_retries: self.max_retries.unwrap_or(0),
            checkpoint_interval: self.checkpoint_interval.unwrap_or_default(),
            nodes: self.nodes.unwrap_or(1),
            procs_per_node: self.procs_per_node.unwrap_or(1),
            gpus_per_node: self.gpus_per_node.unwrap_or(0),
            launcher: self.launcher.unwrap_or(Launcher::Kiln),
            max_restarts: self.max_restarts.unwrap_or(0),
        })
    }
}

impl RunConfig {
    /// The configuration as YAML in the file's own format (`kiln submit --dry-run`).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a run configuration serialises to YAML")
    }

    /// Files in the snapshot the environment names (key, path): they must be in it.
    pub fn spec_files(&self) -> Vec<(&'static str, &str)> {
        match &self.environment {
            Environment::Conda(conda) => vec![("environment.conda.file", conda.file.as_str())],
            Environment::Venv(venv) => {
                vec![("environment.venv.requirements", venv.requirements.as_str())]
            }
            Environment::Docker(DockerEnv {
                conda: Some(file), ..
            }) => vec![("environment.docker.conda", file.as_str())],
            Environment::User(_) | Environment::Docker(_) => Vec::new(),
        }
    }

    /// The values of the run's secrets, from `lookup` (the submitter's environment): a
    /// secret's value never appears on a command line or in a file Kiln reads.
    pub fn secret_values(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<HashMap<String, String>> {
        self.secrets
            .iter()
            .map(|name| match lookup(name) {
                Some(value) => Ok((name.clone(), value)),
                None => anyhow::bail!(
                    "secret `{name}` is not set: Kiln reads a secret's value from your \
                     environment (`export {name}=...` or `read -s {name}; export {name}`), \
                     never from the command line"
                ),
            })
            .collect()
    }

    /// The submit request for this configuration and a snapshot (without the secrets'
    /// values: see [`RunConfig::secret_values`]).
    pub fn to_request(&self, snapshot_digest: String) -> v1::SubmitRunRequest {
        let resources = &self.resources;
        let resources = (resources != &Resources::default()).then(|| v1::Resources {
            cpus: resources.cpus.unwrap_or(0),
            memory_bytes: resources.memory.map_or(0, |size| size.0),
            gpus: resources.gpus.unwrap_or(0),
        });
        v1::SubmitRunRequest {
            name: self.name.clone().unwrap_or_default(),
            target: self.target.clone(),
            snapshot_digest,
            script: self.script.clone(),
            args: self.args.clone(),
            max_retries: self.max_retries,
            checkpoint_interval_s: self.checkpoint_interval.0,
            nodes: self.nodes,
            procs_per_node: self.procs_per_node,
            launcher: self.launcher.as_str().to_string(),
            max_restarts: self.max_restarts,
            gpus_per_node: self.gpus_per_node,
            environment: Some(self.environment.to_wire()),
            resources,
            env: self.env.clone().into_iter().collect(),
            secrets: HashMap::new(),
            timeout_s: self.timeout.0,
        }
    }
}

impl Environment {
    pub fn to_wire(&self) -> v1::Environment {
        use v1::environment::Kind;
        let kind = match self {
            Environment::User(user) => Kind::User(v1::UserEnvironment {
                python: user.python.clone().unwrap_or_default(),
            }),
            Environment::Conda(conda) => Kind::Conda(v1::CondaEnvironment {
                file: conda.file.clone(),
            }),
            Environment::Venv(venv) => Kind::Venv(v1::VenvEnvironment {
                requirements: venv.requirements.clone(),
                python: venv.python.clone().unwrap_or_default(),
            }),
            Environment::Docker(docker) => Kind::Docker(v1::DockerEnvironment {
                image: docker.image.clone().unwrap_or_default(),
                conda: docker.conda.clone().unwrap_or_default(),
                shm_size_bytes: docker.shm_size.map_or(0, |size| size.0),
            }),
        };
        v1::Environment { kind: Some(kind) }
    }
}

impl Serialize for Environment {
    /// As the file writes it: a map with the kind as its one key (`conda: {file: ...}`).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Environment::User(user) => map.serialize_entry("user", user)?,
            Environment::Conda(conda) => map.serialize_entry("conda", conda)?,
            Environment::Venv(venv) => map.serialize_entry("venv", venv)?,
            Environment::Docker(docker) => map.serialize_entry("docker", docker)?,
        }
        map.end()
    }
}

/// The environment kinds, in the order the documentation lists them.
const ENVIRONMENT_KINDS: &[&str] = &["user", "conda", "venv", "docker"];

impl<'de> Deserialize<'de> for Environment {
    /// A map with exactly one of the keys user, conda, venv, docker. A second kind is refused
    /// while its key is read, so that the error points at its line. `user:` and `docker:`
    /// with no value mean their defaults.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvironmentVisitor;
        impl<'de> Visitor<'de> for EnvironmentVisitor {
            type Value = Environment;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map with one of the keys user, conda, venv, docker")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Environment, A::Error> {
                let mut chosen: Option<Environment> = None;
                let mut seen: Option<&'static str> = None;
                while let Some(kind) = map.next_key_seed(KindKey { seen })? {
                    chosen = Some(match kind {
                        "user" => Environment::User(
                            map.next_value::<Option<UserEnv>>()?.unwrap_or_default(),
                        ),
                        "conda" => Environment::Conda(map.next_value()?),
                        "venv" => Environment::Venv(map.next_value()?),
                        _ => Environment::Docker(
                            map.next_value::<Option<DockerEnv>>()?.unwrap_or_default(),
                        ),
                    });
                    seen = Some(kind);
                }
                chosen.ok_or_else(|| {
                    de::Error::custom(
                        "no environment kind given: use one of user, conda, venv, docker",
                    )
                })
            }
        }
        deserializer.deserialize_map(EnvironmentVisitor)
    }
}

/// Reads one key of `environment:`, refusing unknown kinds and a second kind.
struct KindKey {
    seen: Option<&'static str>,
}

impl<'de> DeserializeSeed<'de> for KindKey {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KindKey {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an environment kind")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<&'static str, E> {
        let Some(kind) = ENVIRONMENT_KINDS.iter().find(|kind| **kind == key) else {
            return Err(E::unknown_field(key, ENVIRONMENT_KINDS));
        };
        match self.seen {
            Some(seen) => Err(E::custom(format!(
                "both `{seen}` and `{key}` given: a run has one environment, keep one of them"
            ))),
            None => Ok(kind),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string such as 500MB or 16GiB")
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({bytes})")))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                // The message only: the cause under it is the float parser's.
                parse_size(text)
                    .map(Size)
                    .map_err(|error| E::custom(format!("{error}")))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl Serialize for Size {
    /// As the largest binary unit that divides it exactly (16GiB), else as bytes.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match binary_size(self.0) {
            Some(text) => serializer.serialize_str(&text),
            None => serializer.serialize_u64(self.0),
        }
    }
}

/// A size in the largest binary unit that divides it exactly (`16GiB`, `512MiB`), if any.
pub fn binary_size(bytes: u64) -> Option<String> {
    [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)]
        .into_iter()
        .find(|(_, factor)| bytes >= *factor && bytes.is_multiple_of(*factor))
        .map(|(unit, factor)| format!("{}{unit}", bytes / factor))
}

impl std::str::FromStr for Size {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Size> {
        parse_size(text).map(Size)
    }
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

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;
        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration: seconds as a number, or a string such as 90s, 30m or 2h")
            }

            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<Seconds, E> {
                seconds_from(seconds).map_err(|error| E::custom(format!("{error:#}")))
            }

            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Seconds, E> {
                let seconds = u64::try_from(seconds)
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({seconds})")))?;
                self.visit_u64(seconds)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Seconds, E> {
                text.parse()
                    .map_err(|error: anyhow::Error| E::custom(format!("{error:#}")))
            }
        }
        deserializer.deserialize_any(SecondsVisitor)
    }
}

impl Serialize for Seconds {
    /// 0 as 0 (no limit, off); otherwise as a duration string (`2h`, `1m 30s`).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 == 0 {
            return serializer.serialize_u32(0);
        }
        let duration = std::time::Duration::from_secs(u64::from(self.0));
        serializer.serialize_str(&humantime::format_duration(duration).to_string())
    }
}

impl std::str::FromStr for Seconds {
    type Err = anyhow::Error;

    /// `90`, `90s`, `30m`, `2h`, `1h30m`, `1h 30m`.
    fn from_str(text: &str) -> anyhow::Result<Seconds> {
        let text = text.trim();
        if let Ok(seconds) = text.parse::<u64>() {
            return seconds_from(seconds);
        }
        let duration = humantime::parse_duration(text).map_err(|_| {
            anyhow::anyhow!(
                "`{text}` is not a duration: write seconds (90) or e.g. 90s, 30m, 2h, 1h30m"
            )
        })?;
        anyhow::ensure!(
            duration.subsec_nanos() == 0,
            "`{text}` is not a whole number of seconds"
        );
        seconds_from(duration.as_secs())
    }
}

fn seconds_from(seconds: u64) -> anyhow::Result<Seconds> {
    u32::try_from(seconds)
        .map(Seconds)
        .map_err(|_| anyhow::anyhow!("{seconds} seconds is too long: at most {}", u32::MAX))
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text, E> {
                Ok(Text(text.to_string()))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Text, E> {
                Ok(Text(n.to_string()))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Text, E> {
                Ok(Text(n.to_string()))
            }

            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Text, E> {
                Ok(Text(n.to_string()))
            }

            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Text, E> {
                Ok(Text(b.to_string()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Err(E::custom("no value given: write \"\" for an empty string"))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// Parses a `--env KEY=VALUE` flag.
pub fn parse_env_flag(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => anyhow::bail!("`{text}` is not KEY=VALUE: write e.g. --env SEED=7"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> &'static Path {
        Path::new("dir/kiln.yaml")
    }

    fn layer(yaml: &str) -> Layer {
        parse(yaml, file()).unwrap_or_else(|error| panic!("{yaml:?} should parse: {error:#}"))
    }

    /// The error for `yaml`, which must fail to parse.
    fn error(yaml: &str) -> String {
        match parse(yaml, file()) {
            Ok(layer) => panic!("{yaml:?} should be refused, parsed as {layer:?}"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn every_key_parses() {
        let parsed = layer(
            r#"
script: train.py
args: [--epochs, 5, --lr, 0.01, --fast, true]
target: gpu
name: sweep-1
environment:
  venv: {requirements: requirements.txt, python: python3.11}
resources:
  cpus: 8
  memory: 16GiB
  gpus: 2
env:
  SEED: 7
  MODE: fast
secrets: [HF_TOKEN]
max_retries: 3
timeout: 2h
nodes: 2
procs_per_node: 4
gpus_per_node: 4
launcher: none
max_restarts: 1
checkpoint_interval: 5m
"#,
        );
        let text = |s: &str| Text(s.to_string());
        assert_eq!(
            parsed,
            Layer {
                script: Some("train.py".into()),
                args: Some(
                    ["--epochs", "5", "--lr", "0.01", "--fast", "true"]
                        .map(text)
                        .to_vec()
                ),
                target: Some("gpu".into()),
                name: Some("sweep-1".into()),
                environment: Some(Environment::Venv(VenvEnv {
                    requirements: "requirements.txt".into(),
                    python: Some("python3.11".into()),
                })),
                resources: Some(Resources {
                    cpus: Some(8),
                    memory: Some(Size(16 << 30)),
                    gpus: Some(2),
                }),
                env: Some(BTreeMap::from([
                    ("SEED".into(), text("7")),
                    ("MODE".into(), text("fast")),
                ])),
                secrets: Some(vec!["HF_TOKEN".into()]),
                max_retries: Some(3),
                timeout: Some(Seconds(7200)),
                nodes: Some(2),
                procs_per_node: Some(4),
                gpus_per_node: Some(4),
                launcher: Some(Launcher::Own),
                max_restarts: Some(1),
                checkpoint_interval: Some(Seconds(300)),
            }
        );
    }

    #[test]
    fn an_empty_file_or_one_with_only_comments_sets_nothing() {
        assert_eq!(layer(""), Layer::default());
        assert_eq!(layer("# nothing yet\n"), Layer::default());
    }

    #[test]
    fn each_environment_kind_parses_and_empty_user_or_docker_means_defaults() {
        let environment = |yaml: &str| layer(yaml).environment.expect("an environment");
        assert_eq!(
            environment("environment:\n  user:\n"),
            Environment::User(UserEnv { python: None })
        );
        assert_eq!(
            environment("environment: {user: {python: /opt/py/bin/python}}"),
            Environment::User(UserEnv {
                python: Some("/opt/py/bin/python".into())
            })
        );
        assert_eq!(
            environment("environment: {conda: {file: environment.yml}}"),
            Environment::Conda(CondaEnv {
                file: "environment.yml".into()
            })
        );
        assert_eq!(
            environment("environment: {venv: {requirements: req.txt}}"),
            Environment::Venv(VenvEnv {
                requirements: "req.txt".into(),
                python: None
            })
        );
        assert_eq!(
            environment("environment:\n  docker:\n"),
            Environment::Docker(DockerEnv::default())
        );
        assert_eq!(
            environment("environment:\n  docker: {image: gpu, conda: env.yml, shm_size: 8GiB}\n"),
            Environment::Docker(DockerEnv {
                image: Some("gpu".into()),
                conda: Some("env.yml".into()),
                shm_size: Some(Size(8 << 30)),
            })
        );
    }

    #[test]
    fn sizes_and_durations_take_numbers_or_strings() {
        let memory = |yaml: &str| layer(yaml).resources.unwrap().memory.unwrap().0;
        assert_eq!(memory("resources: {memory: 1000}"), 1000);
        assert_eq!(memory("resources: {memory: 500MB}"), 500_000_000);
        assert_eq!(memory("resources: {memory: \"16GiB\"}"), 16 << 30);
        let timeout = |yaml: &str| layer(yaml).timeout.unwrap().0;
        assert_eq!(timeout("timeout: 90"), 90);
        assert_eq!(timeout("timeout: 90s"), 90);
        assert_eq!(timeout("timeout: 30m"), 1800);
        assert_eq!(timeout("timeout: 2h"), 7200);
        assert_eq!(timeout("timeout: 1h30m"), 5400);
        assert_eq!(timeout("timeout: \"45\""), 45);
        assert_eq!(timeout("timeout: 0"), 0);
    }

    /// One check per error: the message names the file, the line (when known) and the
    /// problem, and for unknown keys the valid keys at that level.
    #[test]
    fn every_error_names_the_file_line_and_problem() {
        let check = |yaml: &str, expected: &str| {
            assert_eq!(error(yaml), expected, "for {yaml:?}");
        };
        check(
            "script: train.py\nscirpt: train.py\n",
            "dir/kiln.yaml line 2: unknown key `scirpt`; valid keys: script, args, target, \
             name, environment, resources, env, secrets, max_retries, timeout, nodes, procs_per_node, \
             gpus_per_node, launcher, max_restarts, checkpoint_interval",
        );
        check(
            "scirpt: train.py\n",
            "dir/kiln.yaml line 1: unknown key `scirpt`; valid keys: script, args, target, \
             name, environment, resources, env, secrets, max_retries, timeout, nodes, procs_per_node, \
             gpus_per_node, launcher, max_restarts, checkpoint_interval",
        );
        check(
            "script: a.py\nenvironment:\n  conda:\n    file: environment.yml\n    channel: x\n",
            "dir/kiln.yaml line 5: unknown key `channel` in `environment.conda`; valid keys there: file",
        );
        check(
            "environment:\n  venv: {requirements: r.txt, pyhton: python3}\n",
            "dir/kiln.yaml line 2: unknown key `pyhton` in `environment.venv`; valid keys there: requirements, python",
        );
        check(
            "environment:\n  user: {interpreter: x}\n",
            "dir/kiln.yaml line 2: unknown key `interpreter` in `environment.user`; valid keys there: python",
        );
        check(
            "environment:\n  docker:\n    shm: 1GiB\n",
            "dir/kiln.yaml line 3: unknown key `shm` in `environment.docker`; valid keys there: image, conda, shm_size",
        );
        check(
            "environment:\n  pip: {}\n",
            "dir/kiln.yaml line 2: unknown key `pip` in `environment`; valid keys there: user, conda, venv, docker",
        );
        check(
            "resources:\n  cpu: 4\n",
            "dir/kiln.yaml line 2: unknown key `cpu` in `resources`; valid keys there: cpus, memory, gpus",
        );
        check(
            "script: a.py\n\nenvironment:\n  conda: {file: environment.yml}\n  docker: {image: gpu}\n",
            "dir/kiln.yaml line 5: environment: both `conda` and `docker` given: a run has one environment, keep one of them",
        );
        check(
            "environment: {}\n",
            "dir/kiln.yaml line 1: environment: no environment kind given: use one of user, conda, venv, docker",
        );
        check(
            "environment:\n  conda:\n",
            "dir/kiln.yaml line 2: environment.conda: missing key `file`",
        );
        check(
            "script: a.py\nnodes: two\n",
            "dir/kiln.yaml line 2: nodes: invalid type: string \"two\", expected u32",
        );
        check(
            "args: --epochs 5\n",
            "dir/kiln.yaml line 1: args: invalid type: string \"--epochs 5\", expected a sequence",
        );
        check(
            "\nresources:\n  memory: 16 parsecs\n",
            "dir/kiln.yaml line 3: resources.memory: `parsecs` is not a size unit: use B, KB, MB, GB, KiB, MiB or GiB",
        );
        check(
            "resources:\n  memory: -5\n",
            "dir/kiln.yaml line 2: resources.memory: a size cannot be negative (-5)",
        );
        check(
            "environment:\n  docker: {shm_size: lots}\n",
            "dir/kiln.yaml line 2: environment.docker.shm_size: `lots` is not a size: write e.g. 500MB or 2GiB",
        );
        check(
            "timeout: 2 fortnights\n",
            "dir/kiln.yaml line 1: timeout: `2 fortnights` is not a duration: write seconds (90) or e.g. 90s, 30m, 2h, 1h30m",
        );
        check(
            "timeout: -1\n",
            "dir/kiln.yaml line 1: timeout: a duration cannot be negative (-1)",
        );
        check(
            "checkpoint_interval: 1500ms\n",
            "dir/kiln.yaml line 1: checkpoint_interval: `1500ms` is not a whole number of seconds",
        );
        check(
            "launcher: mpirun\n",
            "dir/kiln.yaml line 1: launcher: unknown variant `mpirun`, expected `kiln` or `none`",
        );
        check(
            "env:\n  SEED:\n",
            "dir/kiln.yaml line 2: env.SEED: no value given: write \"\" for an empty string",
        );
        check(
            "- train.py\n",
            "dir/kiln.yaml line 1: invalid type: sequence, expected struct Layer",
        );
        check(
            "script: a.py\nargs: [a, b\ntarget: gpu\n",
            "dir/kiln.yaml line 3: did not find expected ',' or ']', while parsing a flow sequence at line 2 column 7",
        );
        // A repeated top-level key: serde_norway does not know where, so no line is claimed.
        check(
            "script: a.py\nnodes: 1\nscript: b.py\n",
            "dir/kiln.yaml: duplicate key `script`",
        );
    }

    #[test]
    fn another_script_on_the_command_line_does_not_take_the_files_args() {
        let from_file = || layer("script: train.py\nargs: [--epochs, 5]\ntarget: gpu\n");
        let flags = |script: &str| Layer {
            script: Some(script.into()),
            ..Layer::default()
        };
        let config = flags("eval.py")
            .or(from_file())
            .resolve(None, file())
            .unwrap();
        assert_eq!((config.script.as_str(), config.args.len()), ("eval.py", 0));
        // Naming the file's own script keeps its args.
        let config = flags("train.py")
            .or(from_file())
            .resolve(None, file())
            .unwrap();
        assert_eq!(config.args, ["--epochs", "5"]);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let from_file = layer(
            r#"
script: train.py
args: [--epochs, 5]
target: gpu
environment: {conda: {file: environment.yml}}
resources: {cpus: 8, memory: 16GiB}
env: {SEED: 7, MODE: fast}
timeout: 2h
max_retries: 2
"#,
        );
        let from_flags = Layer {
            target: Some("cpu".into()),
            args: Some(vec![Text("--epochs".into()), Text("1".into())]),
            environment: Some(Environment::User(UserEnv {
                python: Some("/usr/bin/python3".into()),
            })),
            resources: Some(Resources {
                memory: Some(Size(1 << 30)),
                ..Resources::default()
            }),
            env: Some(BTreeMap::from([("SEED".into(), Text("8".into()))])),
            timeout: Some(Seconds(60)),
            ..Layer::default()
        };
        let config = from_flags.or(from_file).resolve(None, file()).unwrap();
        assert_eq!(
            config,
            RunConfig {
                script: "train.py".into(),
                args: vec!["--epochs".into(), "1".into()],
                target: "cpu".into(),
                name: None,
                environment: Environment::User(UserEnv {
                    python: Some("/usr/bin/python3".into())
                }),
                resources: Resources {
                    cpus: Some(8),
                    memory: Some(Size(1 << 30)),
                    gpus: None
                },
                env: BTreeMap::from([("MODE".into(), "fast".into()), ("SEED".into(), "8".into())]),
                secrets: Vec::new(),
                timeout: Seconds(60),
                max_retries: 2,
                checkpoint_interval: Seconds(0),
                nodes: 1,
                procs_per_node: 1,
                gpus_per_node: 0,
                launcher: Launcher::Kiln,
                max_restarts: 0,
            }
        );
    }

    #[test]
    fn defaults_fill_what_neither_layer_sets() {
        let config = Layer {
            script: Some("./train.py".into()),
            ..Layer::default()
        }
        .or(Layer::default())
        .resolve(Some("local"), file())
        .unwrap();
        assert_eq!(config.script, "train.py");
        assert_eq!(config.target, "local");
        assert_eq!(config.environment, Environment::User(UserEnv::default()));
        assert_eq!(config.timeout, Seconds(0));
        assert_eq!((config.nodes, config.procs_per_node), (1, 1));
        assert_eq!(config.launcher, Launcher::Kiln);
        let request = config.to_request("sha256:x".into());
        assert_eq!(request.resources, None);
        assert_eq!(request.launcher, "kiln");
        assert_eq!(request.timeout_s, 0);
    }

    #[test]
    fn resolving_without_a_script_or_target_says_where_to_give_one() {
        let error = Layer::default()
            .resolve(Some("local"), file())
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "no script to run: name it after the directory (kiln submit DIR SCRIPT) or set `script:` in `dir/kiln.yaml`"
        );
        let error = layer("script: a.py")
            .resolve(None, file())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--target is required with a coordinator")
                && error.ends_with("or set `target:` in `dir/kiln.yaml`"),
            "{error}"
        );
        let error = layer("script: a.py\ntarget: Bad_Name!")
            .resolve(None, file())
            .unwrap_err()
            .to_string();
        assert!(error.contains("`Bad_Name!` is invalid"), "{error}");
    }

    #[test]
    fn the_request_carries_environment_resources_env_and_timeout() {
        let config = layer(
            "script: a.py\nenvironment: {docker: {image: gpu, shm_size: 2GiB}}\nresources: {gpus: 1}\nenv: {A: b}\ntimeout: 90s\nlauncher: none\n",
        )
        .resolve(Some("local"), file())
        .unwrap();
        let request = config.to_request("sha256:x".into());
        assert_eq!(
            request.environment,
            Some(v1::Environment {
                kind: Some(v1::environment::Kind::Docker(v1::DockerEnvironment {
                    image: "gpu".into(),
                    conda: String::new(),
                    shm_size_bytes: 2 << 30,
                }))
            })
        );
        assert_eq!(
            request.resources,
            Some(v1::Resources {
                cpus: 0,
                memory_bytes: 0,
                gpus: 1
            })
        );
        assert_eq!(request.env.get("A").map(String::as_str), Some("b"));
        assert_eq!(request.timeout_s, 90);
        assert_eq!(request.launcher, "none");
    }

    #[test]
    fn the_printed_configuration_reads_back_as_the_same_configuration() {
        let config = layer(
            r#"
script: train.py
args: [--epochs, "5"]
target: gpu
environment: {docker: {image: gpu, shm_size: 8GiB}}
resources: {cpus: 4, memory: 1500000000}
env: {SEED: "7"}
timeout: 90m
checkpoint_interval: 300
"#,
        )
        .resolve(None, file())
        .unwrap();
        let yaml = config.to_yaml();
        assert!(yaml.contains("timeout: 1h 30m\n"), "{yaml}");
        assert!(yaml.contains("shm_size: 8GiB\n"), "{yaml}");
        assert!(yaml.contains("memory: 1500000000\n"), "{yaml}");
        assert!(yaml.contains("environment:\n  docker:\n"), "{yaml}");
        let again = layer(&yaml).resolve(None, file()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn spec_files_are_the_ones_the_environment_names() {
        let spec = |yaml: &str| {
            let config = layer(&format!("script: a.py\n{yaml}"))
                .resolve(Some("local"), file())
                .unwrap();
            config
                .spec_files()
                .into_iter()
                .map(|(key, path)| format!("{key}={path}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            spec("environment: {conda: {file: env.yml}}"),
            ["environment.conda.file=env.yml"]
        );
        assert_eq!(
            spec("environment: {venv: {requirements: r.txt}}"),
            ["environment.venv.requirements=r.txt"]
        );
        assert_eq!(
            spec("environment: {docker: {conda: e.yml}}"),
            ["environment.docker.conda=e.yml"]
        );
        assert!(spec("environment: {docker: {image: cpu}}").is_empty());
        assert!(spec("").is_empty());
    }

    #[test]
    fn files_load_from_the_directory_or_the_config_flag() {
        let dir = tempfile::tempdir().unwrap();
        // No kiln.yaml: nothing set, no file.
        let (loaded, from) = load(dir.path(), None).unwrap();
        assert_eq!((loaded, from), (Layer::default(), None));
        // A missing --config file is an error.
        let missing = dir.path().join("other.yaml");
        let error = load(dir.path(), Some(&missing)).unwrap_err().to_string();
        assert!(
            error.contains("other.yaml") && error.contains("does not exist"),
            "{error}"
        );
        std::fs::write(dir.path().join(DEFAULT_FILE), "script: a.py\n").unwrap();
        std::fs::write(&missing, "script: b.py\n").unwrap();
        let (loaded, from) = load(dir.path(), None).unwrap();
        assert_eq!(loaded.script.as_deref(), Some("a.py"));
        assert_eq!(from, Some(dir.path().join(DEFAULT_FILE)));
        let (loaded, _) = load(dir.path(), Some(&missing)).unwrap();
        assert_eq!(loaded.script.as_deref(), Some("b.py"));
        // Errors name the file as it was found.
        std::fs::write(dir.path().join(DEFAULT_FILE), "scirpt: a.py\n").unwrap();
        let error = load(dir.path(), None).unwrap_err().to_string();
        let expected = format!(
            "{} line 1: unknown key `scirpt`",
            dir.path().join(DEFAULT_FILE).display()
        );
        assert!(error.starts_with(&expected), "{error}");
    }

    #[test]
    fn the_quickstart_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let (layer, from) = load(&dir, None).unwrap();
        assert_eq!(from, Some(dir.join(DEFAULT_FILE)));
        let config = layer.resolve(Some("local"), file()).unwrap();
        assert_eq!(config.script, "train.py");
        assert_eq!(config.args, ["--epochs", "8"]);
        assert!(dir.join(&config.script).is_file());
    }

    #[test]
    fn env_flags_and_sizes_and_durations_from_flags() {
        assert_eq!(
            parse_env_flag("A=b=c").unwrap(),
            ("A".to_string(), "b=c".to_string())
        );
        assert_eq!(
            parse_env_flag("A=").unwrap(),
            ("A".to_string(), String::new())
        );
        assert_eq!(
            parse_env_flag("A").unwrap_err().to_string(),
            "`A` is not KEY=VALUE: write e.g. --env SEED=7"
        );
        assert!(parse_env_flag("=b").is_err());
        assert_eq!("2h".parse::<Seconds>().unwrap(), Seconds(7200));
        assert_eq!("600".parse::<Seconds>().unwrap(), Seconds(600));
        assert!("soon".parse::<Seconds>().is_err());
        assert_eq!(
            "99999999999".parse::<Seconds>().unwrap_err().to_string(),
            "99999999999 seconds is too long: at most 4294967295"
        );
        assert_eq!("16GiB".parse::<Size>().unwrap(), Size(16 << 30));
        assert_eq!(binary_size(16 << 30).as_deref(), Some("16GiB"));
        assert_eq!(binary_size(512 << 20).as_deref(), Some("512MiB"));
        assert_eq!(binary_size(1_500_000_000), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5 G").unwrap(), 1_500_000_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn secrets_are_names_whose_values_come_from_the_environment() {
        let file = layer("script: train.py\ntarget: gpu\nsecrets: [HF_TOKEN]\n");
        let flags = Layer {
            secrets: Some(vec!["WANDB_API_KEY".into(), "HF_TOKEN".into()]),
            ..Layer::default()
        };
        let config = flags
            .or(file)
            .resolve(None, Path::new("kiln.yaml"))
            .unwrap();
        assert_eq!(config.secrets, ["HF_TOKEN", "WANDB_API_KEY"]);
        // --dry-run shows the names, never values.
        assert!(config.to_yaml().contains("- WANDB_API_KEY"));
        let values = config
            .secret_values(|name| Some(format!("value of {name}")))
            .unwrap();
        assert_eq!(values["HF_TOKEN"], "value of HF_TOKEN");
        let unset = config
            .secret_values(|name| (name == "HF_TOKEN").then(|| "x".to_string()))
            .unwrap_err()
            .to_string();
        assert!(
            unset.contains("secret `WANDB_API_KEY` is not set"),
            "{unset}"
        );
        // The request carries no value until the caller puts them in.
        assert!(config.to_request("sha256:x".into()).secrets.is_empty());
        // One name is a secret or a plain variable, not both.
        let both = layer("script: t.py\ntarget: gpu\nsecrets: [SEED]\nenv: {SEED: 1}\n")
            .resolve(None, Path::new("kiln.yaml"))
            .unwrap_err()
            .to_string();
        assert!(both.contains("`SEED` is both"), "{both}");
    }
}
