//! How large the fields of a submission may be. A run is stored, listed, shown and sent to
//! agents whole, so none of its user-supplied fields may grow without bound: these limits
//! keep every run far below a reply page (`kiln_proto::page::PAGE_BYTES`), and the ones on
//! arguments and environment variables match what Linux `exec` accepts. The README's
//! "Limits" section lists them; keep the two in step.

use kiln_proto::v1;

/// The run's name.
pub const MAX_NAME_BYTES: usize = 256;
/// The target's name (valid names are far shorter; this keeps a huge one out of messages).
pub const MAX_TARGET_BYTES: usize = 64;
/// The script's path, and every path or image name of the environment (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// One argument, or one `KEY=VALUE` variable (Linux MAX_ARG_STRLEN: `exec` refuses longer).
pub const MAX_ARG_BYTES: usize = 128 * 1024;
/// An environment variable's name.
pub const MAX_ENV_KEY_BYTES: usize = 256;
/// All arguments together, and all variables together (each counted with its terminating
/// NUL, as `exec` counts them): both fit in Linux's 2 MiB ARG_MAX with room for the
/// variables the agent adds.
pub const MAX_ARGS_BYTES: usize = 512 * 1024;
pub const MAX_ENV_BYTES: usize = 512 * 1024;

/// Checks the sizes of a submission's user-supplied fields; the error names the field, its
/// size and the limit, and never repeats an oversized value.
pub fn check_submission(request: &v1::SubmitRunRequest) -> Result<(), String> {
    let over = |what: &str, n_bytes: usize, limit: usize, advice: &str| {
        Err(format!(
            "{what} is {}, over the limit of {}: {advice}",
            size(n_bytes),
            size(limit)
        ))
    };
    if request.name.len() > MAX_NAME_BYTES {
        return over(
            "the run name",
            request.name.len(),
            MAX_NAME_BYTES,
            "choose a shorter name (--name, or `name:` in kiln.yaml)",
        );
    }
    if request.target.len() > MAX_TARGET_BYTES {
        return over(
            "the target name",
            request.target.len(),
            MAX_TARGET_BYTES,
            "name a target that `kiln targets` lists",
        );
    }
    if request.script.len() > MAX_PATH_BYTES {
        return over(
            "the script path",
            request.script.len(),
            MAX_PATH_BYTES,
            "give a path relative to the submitted directory",
        );
    }
    let mut args_bytes = 0usize;
    for (index, arg) in request.args.iter().enumerate() {
        if arg.len() > MAX_ARG_BYTES {
            return over(
                &format!("argument {} of the script", index + 1),
                arg.len(),
                MAX_ARG_BYTES,
                "pass large inputs as files in the submitted directory",
            );
        }
        args_bytes += arg.len() + 1;
    }
    if args_bytes > MAX_ARGS_BYTES {
        return over(
            "the total size of the script's arguments",
            args_bytes,
            MAX_ARGS_BYTES,
            "pass large inputs as files in the submitted directory",
        );
    }
    let mut env_bytes = 0usize;
    // Secrets are environment variables too, and count with them.
    for (key, value) in request.env.iter().chain(&request.secrets) {
        if key.len() > MAX_ENV_KEY_BYTES {
            return over(
                "an environment variable's name",
                key.len(),
                MAX_ENV_KEY_BYTES,
                "use a shorter name",
            );
        }
        let variable = key.len() + 1 + value.len();
        if variable > MAX_ARG_BYTES {
            return over(
                &format!("environment variable `{key}` (KEY=VALUE)"),
                variable,
                MAX_ARG_BYTES,
                "pass large inputs as files in the submitted directory",
            );
        }
        env_bytes += variable + 1;
    }
    if env_bytes > MAX_ENV_BYTES {
        return over(
            "the total size of the environment variables",
            env_bytes,
            MAX_ENV_BYTES,
            "pass large inputs as files in the submitted directory",
        );
    }
    for (what, path) in environment_paths(request.environment.as_ref()) {
        if path.len() > MAX_PATH_BYTES {
            return over(what, path.len(), MAX_PATH_BYTES, "give a shorter one");
        }
    }
    Ok(())
}

/// The environment's user-supplied paths and image names, with their run configuration keys.
fn environment_paths(environment: Option<&v1::Environment>) -> Vec<(&'static str, &str)> {
    use v1::environment::Kind;
    match environment.and_then(|e| e.kind.as_ref()) {
        Some(Kind::User(user)) => vec![("environment.python", user.python.as_str())],
        Some(Kind::Conda(conda)) => vec![("environment.conda.file", conda.file.as_str())],
        Some(Kind::Venv(venv)) => vec![
            ("environment.venv.requirements", venv.requirements.as_str()),
            ("environment.venv.python", venv.python.as_str()),
        ],
        Some(Kind::Docker(docker)) => vec![
            ("environment.docker.image", docker.image.as_str()),
            ("environment.docker.conda", docker.conda.as_str()),
        ],
        None => Vec::new(),
    }
}

/// A size as people read it: "256 bytes", "128 KiB", "9 MiB", "9437185 bytes".
fn size(n_bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if n_bytes >= MIB && n_bytes.is_multiple_of(MIB) {
        format!("{} MiB", n_bytes / MIB)
    } else if n_bytes >= KIB && n_bytes.is_multiple_of(KIB) {
        format!("{} KiB", n_bytes / KIB)
    } else {
        format!("{n_bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> v1::SubmitRunRequest {
        v1::SubmitRunRequest {
            name: "train".into(),
            target: "gpu".into(),
            script: "train.py".into(),
            ..Default::default()
        }
    }

    /// Applies `change` to a valid request and checks the outcome: `None` accepted, else
    /// the error's text.
    fn check(change: impl FnOnce(&mut v1::SubmitRunRequest), expected: Option<&str>) {
        let mut request = request();
        change(&mut request);
        assert_eq!(check_submission(&request).err().as_deref(), expected);
    }

    #[test]
    fn oversized_fields_are_refused_naming_field_size_and_limit() {
        let text = |n: usize| "x".repeat(n);
        check(|_| {}, None);
        check(|r| r.name = text(256), None);
        check(
            |r| r.name = text(257),
            Some(
                "the run name is 257 bytes, over the limit of 256 bytes: choose a shorter name (--name, or `name:` in kiln.yaml)",
            ),
        );
        check(
            |r| r.name = text(9 << 20),
            Some(
                "the run name is 9 MiB, over the limit of 256 bytes: choose a shorter name (--name, or `name:` in kiln.yaml)",
            ),
        );
        check(
            |r| r.target = text(65),
            Some(
                "the target name is 65 bytes, over the limit of 64 bytes: name a target that `kiln targets` lists",
            ),
        );
        check(
            |r| r.script = text(4097),
            Some(
                "the script path is 4097 bytes, over the limit of 4 KiB: give a path relative to the submitted directory",
            ),
        );
        check(|r| r.args = vec![text(128 * 1024)], None);
        check(
            |r| r.args = vec!["--ok".into(), text(128 * 1024 + 1)],
            Some(
                "argument 2 of the script is 131073 bytes, over the limit of 128 KiB: pass large inputs as files in the submitted directory",
            ),
        );
        // Four arguments of 128 KiB are 512 KiB and 4 NULs.
        check(
            |r| r.args = vec![text(128 * 1024); 4],
            Some(
                "the total size of the script's arguments is 524292 bytes, over the limit of 512 KiB: pass large inputs as files in the submitted directory",
            ),
        );
        check(
            |r| {
                r.env.insert(text(257), "1".into());
            },
            Some(
                "an environment variable's name is 257 bytes, over the limit of 256 bytes: use a shorter name",
            ),
        );
        check(
            |r| {
                r.env.insert("SEED".into(), text(128 * 1024 - 5));
            },
            None,
        );
        check(
            |r| {
                r.env.insert("SEED".into(), text(128 * 1024 - 4));
            },
            Some(
                "environment variable `SEED` (KEY=VALUE) is 131073 bytes, over the limit of 128 KiB: pass large inputs as files in the submitted directory",
            ),
        );
        check(
            |r| {
                for i in 0..5 {
                    r.env.insert(format!("V{i}"), text(120 * 1024));
                }
            },
            Some(
                "the total size of the environment variables is 614420 bytes, over the limit of 512 KiB: pass large inputs as files in the submitted directory",
            ),
        );
        check(
            |r| {
                r.environment = Some(v1::Environment {
                    kind: Some(v1::environment::Kind::Docker(v1::DockerEnvironment {
                        image: text(5000),
                        ..Default::default()
                    })),
                })
            },
            Some(
                "environment.docker.image is 5000 bytes, over the limit of 4 KiB: give a shorter one",
            ),
        );
    }
}
