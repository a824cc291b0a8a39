//! Times `kiln_agent::env::prepare` as the agent calls it, for `bench/envs`.
//!
//! Usage: env_prepare venv|conda SPEC_FILE WORK_DIR DATA_DIR PYTHON REPEAT
//!
//! Prepares the environment REPEAT times in this one process (the first call may build it,
//! the others find it in the cache) and prints one line per call: milliseconds and whether
//! the environment was built or reused.

use std::path::Path;
use std::time::Instant;

use kiln_proto::v1;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, spec, work, data_dir, python, repeat] = args.as_slice() else {
        anyhow::bail!("usage: env_prepare venv|conda SPEC_FILE WORK_DIR DATA_DIR PYTHON REPEAT");
    };
    let kind = match kind.as_str() {
        "venv" => v1::environment::Kind::Venv(v1::VenvEnvironment {
            requirements: spec.clone(),
            python: python.clone(),
        }),
        "conda" => v1::environment::Kind::Conda(v1::CondaEnvironment { file: spec.clone() }),
        other => anyhow::bail!("unknown kind `{other}`: use venv or conda"),
    };
    let environment = v1::Environment { kind: Some(kind) };
    let settings = kiln_agent::env::Settings::default();
    let cancel = CancellationToken::new();
    for _ in 0..repeat.parse::<u32>()? {
        let mut outcome = "?";
        let mut log = |line: &str| {
            if line.starts_with("Environment ") && line.contains(" reused in ") {
                outcome = "reused";
            } else if line.starts_with("Environment ") && line.contains(" built in ") {
                outcome = "built";
            }
        };
        let started = Instant::now();
        kiln_agent::env::prepare(
            Some(&environment),
            kiln_agent::env::Context {
                default_python: python,
                data_dir: Path::new(data_dir),
                work: Path::new(work),
                settings: &settings,
                cancel: &cancel,
                log: &mut log,
            },
        )
        .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        println!("{ms:.2} {outcome}");
    }
    Ok(())
}
