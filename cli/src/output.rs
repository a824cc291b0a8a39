//! How the CLI prints things: aligned tables for people, JSON (snake_case fields, arrays for
//! lists) for scripts.
//!
//! Text that others wrote (run names and messages, log lines, metric names, host names, agent
//! ids, error messages) reaches the terminal only through [`sanitize`], so it cannot move the
//! cursor, retitle the window, write the clipboard or start a line that looks like Kiln's own.
//! JSON needs nothing more: serde escapes control characters.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::HumanBytes;
use kiln_proto::v1;
use serde_json::{Value, json};

/// The exit status when stdout or stderr is a pipe whose reader has gone (`kiln runs | head
/// -1`): what a shell reports for a process that SIGPIPE ended, as other Unix tools end.
pub const BROKEN_PIPE_EXIT: i32 = 128 + 13;

/// `println!` that ends the CLI quietly with [`BROKEN_PIPE_EXIT`] when stdout's reader has
/// gone, instead of panicking (the standard library ignores SIGPIPE and `println!` panics on
/// `EPIPE`). Every line the CLI prints goes through [`outln!`], [`out!`] or [`errln!`].
macro_rules! outln {
    () => {
        $crate::output::write_or_exit(false, "\n".to_owned())
    };
    ($($arg:tt)*) => {
        $crate::output::write_or_exit(false, format!("{}\n", format_args!($($arg)*)))
    };
}
/// `print!`, ending quietly on a closed pipe like [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_or_exit(false, format!($($arg)*))
    };
}
/// `eprintln!`, ending quietly on a closed pipe like [`outln!`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_or_exit(true, format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use {errln, out, outln};

/// Writes `text` to stdout (or stderr) at once. A reader that has gone ends the process with
/// [`BROKEN_PIPE_EXIT`]; any other failure (a full disk) with an error and status 1.
pub fn write_or_exit(to_stderr: bool, text: String) {
    let written = if to_stderr {
        io::stderr().lock().write_all(text.as_bytes())
    } else {
        io::stdout().lock().write_all(text.as_bytes())
    };
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {
            std::process::exit(BROKEN_PIPE_EXIT)
        }
        Err(error) => {
            let stream = if to_stderr { "stderr" } else { "stdout" };
            let _ = writeln!(io::stderr(), "error: cannot write to {stream}: {error}");
            std::process::exit(1)
        }
    }
}

/// Set by `kiln submit --json`: the followed log's stdout lines go to stderr, so stdout
/// holds only the run's JSON.
pub static LOG_TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `text` with every character a terminal would act on escaped: C0 controls but the tab (so
/// ESC, BEL, CR and LF too), DEL and C1 controls as `\x1b`, `\u{9b}`; and the Unicode
/// controls that reorder or break lines (bidi overrides, embeddings and isolates, the line
/// and paragraph separators) as `\u{202e}`. Borrowed when there is nothing to escape.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for ch in text.chars() {
        if !needs_escape(ch) {
            out.push(ch);
        } else if ch.is_ascii() {
            let _ = write!(out, "\\x{:02x}", u32::from(ch));
        } else {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(ch));
        }
    }
    Cow::Owned(out)
}

fn needs_escape(ch: char) -> bool {
    (ch.is_control() && ch != '\t')
        || matches!(
            ch,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

pub fn time(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|ms| Value::String(time(ms))).unwrap_or(Value::Null)
}

pub fn duration_s(run: &v1::Run) -> Option<f64> {
    seconds_since(run.started_unix_ms?, run)
}

/// From the first attempt's start to the end (or now): what a retried run took in all,
/// waits between attempts included. `None` before it started, or for runs stored before
/// coordinators kept the first start.
pub fn total_duration_s(run: &v1::Run) -> Option<f64> {
    seconds_since(run.first_started_unix_ms?, run)
}

fn seconds_since(start: i64, run: &v1::Run) -> Option<f64> {
    let end = run.finished_unix_ms.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(start)
    });
    Some((end - start).max(0) as f64 / 1000.0)
}

pub fn run_json(run: &v1::Run) -> Value {
    json!({
        "id": run.id,
        "name": run.name,
        "status": run.status().domain().as_str(),
        "target": run.target,
        "owner": if run.owner.is_empty() { Value::Null } else { Value::String(run.owner.clone()) },
        "agent": if run.agent_id.is_empty() { Value::Null } else { Value::String(run.agent_id.clone()) },
        "exit_code": run.exit_code,
        "message": run.message,
        "waiting": if run.waiting.is_empty() { Value::Null } else { Value::String(run.waiting.clone()) },
        "script": run.script,
        "args": run.args,
        "attempt": run.attempt,
        "max_retries": run.max_retries,
        "nodes": run.nodes,
        "procs_per_node": run.procs_per_node,
        "gpus_per_node": run.gpus_per_node,
        "launcher": run.launcher,
        "max_restarts": run.max_restarts,
        "restarts": run.restarts,
        "failed_rank": run.failed_rank,
        "placement": run.placement.iter().map(|node| json!({
            "node_rank": node.node_rank,
            "agent": node.agent_id,
            "state": node.state,
            "address": node.address,
            "exit_code": node.exit_code,
        })).collect::<Vec<_>>(),
        "environment": run.environment.as_ref().and_then(environment_json),
        "resources": run.resources.as_ref().map(|r| json!({
            "cpus": r.cpus,
            "memory_bytes": r.memory_bytes,
            "gpus": r.gpus,
        })),
        "env": run.env.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "secrets": run.secret_names,
        "pruned_at": opt_time(run.pruned_unix_ms),
        "timeout_seconds": (run.timeout_s > 0).then_some(run.timeout_s),
        "checkpoint_digest": if run.checkpoint_digest.is_empty() { Value::Null } else { Value::String(run.checkpoint_digest.clone()) },
        "snapshot_digest": run.snapshot_digest,
        "outputs_digest": if run.outputs_digest.is_empty() { Value::Null } else { Value::String(run.outputs_digest.clone()) },
        "created_at": time(run.created_unix_ms),
        "started_at": opt_time(run.started_unix_ms),
        "finished_at": opt_time(run.finished_unix_ms),
        "duration_seconds": duration_s(run),
        "first_started_at": opt_time(run.first_started_unix_ms),
        "total_duration_seconds": total_duration_s(run),
    })
}

/// A run's environment as the run configuration file writes it: `{"conda": {"file": ...}}`.
fn environment_json(environment: &v1::Environment) -> Option<Value> {
    use v1::environment::Kind;
    Some(match environment.kind.as_ref()? {
        Kind::User(user) => json!({"user": {"python": non_empty(&user.python)}}),
        Kind::Conda(conda) => json!({"conda": {"file": conda.file}}),
        Kind::Venv(venv) => json!({"venv": {
            "requirements": venv.requirements,
            "python": non_empty(&venv.python),
        }}),
        Kind::Docker(docker) => json!({"docker": {
            "image": non_empty(&docker.image),
            "conda": non_empty(&docker.conda),
            "shm_size_bytes": (docker.shm_size_bytes > 0).then_some(docker.shm_size_bytes),
        }}),
    })
}

fn non_empty(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_string())
    }
}

/// A run's environment in one line for people.
pub(crate) fn environment_text(environment: Option<&v1::Environment>) -> String {
    use v1::environment::Kind;
    let or = |text: &str, default: &str| {
        if text.is_empty() {
            default.to_string()
        } else {
            text.to_string()
        }
    };
    match environment.and_then(|e| e.kind.as_ref()) {
        None => "user (the agent's Python)".into(),
        Some(Kind::User(user)) => format!("user ({})", or(&user.python, "the agent's Python")),
        Some(Kind::Conda(conda)) => format!("conda ({})", conda.file),
        Some(Kind::Venv(venv)) => format!(
            "venv ({}, created with {})",
            venv.requirements,
            or(&venv.python, "python3")
        ),
        Some(Kind::Docker(docker)) => {
            let mut parts = vec![format!("image {}", or(&docker.image, "auto"))];
            if !docker.conda.is_empty() {
                parts.push(format!("conda {}", docker.conda));
            }
            if docker.shm_size_bytes > 0 {
                parts.push(format!("shm {}", HumanBytes(docker.shm_size_bytes)));
            }
            format!("docker ({})", parts.join(", "))
        }
    }
}

/// What one node needs, for people: "8 CPUs, 16.00 GiB memory, 1 GPU"; "-" when nothing.
pub(crate) fn resources_text(resources: Option<&v1::Resources>) -> String {
    let Some(resources) = resources else {
        return "-".into();
    };
    let plural = |n: u32, one: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {one}s")
        }
    };
    let mut parts = Vec::new();
    if resources.cpus > 0 {
        parts.push(plural(resources.cpus, "CPU"));
    }
    if resources.memory_bytes > 0 {
        parts.push(format!("{} memory", HumanBytes(resources.memory_bytes)));
    }
    if resources.gpus > 0 {
        parts.push(plural(resources.gpus, "GPU"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

pub fn print_json(value: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

/// Prints rows as a table with a header, columns padded to their widest cell. Every cell is
/// [`sanitize`]d.
pub(crate) fn table(header: &[impl AsRef<str>], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|cell| sanitize(&cell).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.as_ref().chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.as_ref().to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

pub fn runs(runs: &[v1::Run], as_json: bool) {
    if as_json {
        print_json(&Value::Array(runs.iter().map(run_json).collect()));
        return;
    }
    let rows = runs
        .iter()
        .map(|run| {
            vec![
                run.id.to_string(),
                run.name.clone(),
                run.target.clone(),
                run.status().domain().to_string(),
                dash(&run.agent_id),
                run.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                time(run.created_unix_ms),
                duration_s(run)
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                run.waiting.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "TARGET", "STATUS", "AGENT", "EXIT", "CREATED", "DURATION", "WAITING",
        ],
        rows,
    );
}

pub fn show(run: &v1::Run, as_json: bool) {
    if as_json {
        print_json(&run_json(run));
        return;
    }
    let field = |name: &str, value: String| outln!("{name:<16}{}", sanitize(&value));
    field("id", run.id.to_string());
    field("name", run.name.clone());
    field("status", run.status().domain().to_string());
    if !run.message.is_empty() {
        field("message", run.message.clone());
    }
    if !run.waiting.is_empty() {
        field("waiting", run.waiting.clone());
    }
    field("target", run.target.clone());
    if !run.owner.is_empty() {
        field("owner", run.owner.clone());
    }
    field("agent", dash(&run.agent_id));
    field(
        "attempt",
        format!("{} (max retries {})", run.attempt, run.max_retries),
    );
    if run.nodes > 1 || run.procs_per_node > 1 {
        field(
            "gang",
            format!(
                "{} nodes x {} processes (launcher {}), restarts {} of {}",
                run.nodes, run.procs_per_node, run.launcher, run.restarts, run.max_restarts
            ),
        );
        for node in &run.placement {
            field(
                &format!("  node {}", node.node_rank),
                format!("{} {} {}", node.agent_id, dash(&node.address), node.state),
            );
        }
    }
    if let Some(rank) = run.failed_rank {
        field("failed rank", rank.to_string());
    }
    field(
        "script",
        format!("{} {}", run.script, run.args.join(" "))
            .trim_end()
            .to_string(),
    );
    field("environment", environment_text(run.environment.as_ref()));
    field("resources", resources_text(run.resources.as_ref()));
    let env: std::collections::BTreeMap<_, _> = run.env.iter().collect();
    if env.is_empty() {
        field("env", "-".into());
    }
    for (index, (key, value)) in env.into_iter().enumerate() {
        field(
            if index == 0 { "env" } else { "" },
            format!("{key}={value}"),
        );
    }
    if let Some(pruned) = run.pruned_unix_ms {
        field(
            "pruned",
            format!(
                "{} (logs, metrics, outputs and checkpoints removed: run_retention)",
                time(pruned)
            ),
        );
    }
    if !run.secret_names.is_empty() {
        // Names only: the coordinator never sends a secret's value back.
        field("secrets", run.secret_names.join(", "));
    }
    field(
        "timeout",
        if run.timeout_s > 0 {
            let limit = Duration::from_secs(u64::from(run.timeout_s));
            format!("{} ({}s)", humantime::format_duration(limit), run.timeout_s)
        } else {
            "-".into()
        },
    );
    field(
        "exit code",
        run.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    field("created", time(run.created_unix_ms));
    field(
        "started",
        run.started_unix_ms.map(time).unwrap_or_else(|| "-".into()),
    );
    field(
        "finished",
        run.finished_unix_ms.map(time).unwrap_or_else(|| "-".into()),
    );
    field(
        "duration",
        duration_s(run)
            .map(|s| format!("{s:.2}s"))
            .unwrap_or_else(|| "-".into()),
    );
    // A retried run: the current attempt's duration above, the whole run's here.
    if run.attempt > 1
        && let Some(total) = total_duration_s(run)
    {
        field(
            "total duration",
            format!("{total:.2}s over {} attempts", run.attempt),
        );
    }
    field("snapshot", run.snapshot_digest.clone());
    field("outputs", dash(&run.outputs_digest));
    if run.checkpoint_interval_s > 0 {
        field(
            "checkpoint",
            format!(
                "{} (every {}s)",
                dash(&run.checkpoint_digest),
                run.checkpoint_interval_s
            ),
        );
    }
}

pub fn metrics(metrics: &[v1::MetricSummary], as_json: bool) {
    if as_json {
        let values = metrics
            .iter()
            .map(|m| json!({"name": m.name, "last_value": m.last_value, "last_step": m.last_step, "count": m.count}))
            .collect();
        print_json(&Value::Array(values));
        return;
    }
    let rows = metrics
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                number(m.last_value),
                m.last_step
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                m.count.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "LAST", "STEP", "COUNT"], rows);
}

/// A metric value for people: integers as integers, others with up to 6 decimals.
pub fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        return format!("{}", value as i64);
    }
    let text = format!("{value:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn targets(targets: &[v1::Target], as_json: bool) {
    if as_json {
        let values = targets
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "agents_online": t.agents_online,
                    "agents_total": t.agents_total,
                    "runs_queued": t.runs_queued,
                    "runs_active": t.runs_active,
                })
            })
            .collect();
        print_json(&Value::Array(values));
        return;
    }
    let rows = targets
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                format!("{}/{}", t.agents_online, t.agents_total),
                t.runs_queued.to_string(),
                t.runs_active.to_string(),
            ]
        })
        .collect();
    table(&["TARGET", "AGENTS ONLINE", "QUEUED", "ACTIVE"], rows);
}

pub fn agents(agents: &[v1::Agent], as_json: bool) {
    let default_host = v1::HostInfo::default();
    if as_json {
        let values = agents.iter().map(agent_json).collect();
        print_json(&Value::Array(values));
        return;
    }
    agents_table(agents, &default_host);
}

fn cached_environment_json(e: &v1::CachedEnvironment) -> Value {
    json!({
        "name": e.name,
        "source": e.source,
        "size_bytes": e.size_bytes,
        "built_at": time(e.built_unix_ms),
        "last_used_at": time(e.last_used_unix_ms),
    })
}

fn agent_json(a: &v1::Agent) -> Value {
    let default_host = v1::HostInfo::default();
    let host = a.host.as_ref().unwrap_or(&default_host);
    let mut value = agent_json_fields(a, host);
    value["environments"] =
        Value::Array(a.environments.iter().map(cached_environment_json).collect());
    value
}

/// `kiln agents show AGENT`: the agent's host and its cached environments.
pub fn agent(a: &v1::Agent, as_json: bool) {
    if as_json {
        print_json(&agent_json(a));
        return;
    }
    let default_host = v1::HostInfo::default();
    let host = a.host.as_ref().unwrap_or(&default_host);
    let field = |name: &str, value: String| outln!("{name:<16}{}", sanitize(&value));
    field("id", a.id.clone());
    field("host", host.hostname.clone());
    field("target", a.target.clone());
    field("state", a.state.clone());
    field("os", host.os.clone());
    field("agent version", host.agent_version.clone());
    field("cpus", host.cpus.to_string());
    field("memory", HumanBytes(host.memory_bytes).to_string());
    field("slots", format!("{} ({} active)", a.slots, a.runs_active));
    if host.gpus.is_empty() {
        field("gpus", format!("none ({})", dash(&host.gpu_probe_error)));
    } else {
        field(
            "gpus",
            format!(
                "{} (driver CUDA {})",
                host.gpus.len(),
                dash(&host.cuda_driver_version)
            ),
        );
        for gpu in &host.gpus {
            field(
                &format!("  gpu {}", gpu.index),
                format!("{} {} {}", gpu.name, HumanBytes(gpu.memory_bytes), gpu.uuid),
            );
        }
    }
    field("last heartbeat", time(a.last_heartbeat_unix_ms));
    if !a.conflict.is_empty() {
        field(
            "conflict",
            format!(
                "{}: {} (revoke it if that was not this agent: kiln agents revoke {})",
                time(a.conflict_unix_ms),
                a.conflict,
                a.id
            ),
        );
    }
    outln!();
    if a.environments.is_empty() {
        outln!("No cached environments.");
        return;
    }
    let rows = a
        .environments
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.source.clone(),
                HumanBytes(e.size_bytes).to_string(),
                time(e.built_unix_ms),
                time(e.last_used_unix_ms),
            ]
        })
        .collect();
    table(
        &["ENVIRONMENT", "SOURCE", "SIZE", "BUILT", "LAST USED"],
        rows,
    );
}

fn agent_json_fields(a: &v1::Agent, host: &v1::HostInfo) -> Value {
    json!({
        "id": a.id,
        "hostname": host.hostname,
        "target": a.target,
        "cpus": host.cpus,
        "memory_bytes": host.memory_bytes,
        "gpus": host.gpus.iter().map(|g| json!({
            "index": g.index, "name": g.name, "uuid": g.uuid, "memory_bytes": g.memory_bytes,
        })).collect::<Vec<_>>(),
        "gpu_probe_error": if host.gpu_probe_error.is_empty() { Value::Null } else { Value::String(host.gpu_probe_error.clone()) },
        "cuda_driver_version": if host.cuda_driver_version.is_empty() { Value::Null } else { Value::String(host.cuda_driver_version.clone()) },
        "os": host.os,
        "agent_version": host.agent_version,
        "state": a.state,
        "slots": a.slots,
        "low_priority": host.low_priority,
        "runs_active": a.runs_active,
        "last_heartbeat": time(a.last_heartbeat_unix_ms),
        "conflict": if a.conflict.is_empty() { Value::Null } else { json!({
            "at": time(a.conflict_unix_ms), "what": a.conflict,
        }) },
    })
}

fn agents_table(agents: &[v1::Agent], default_host: &v1::HostInfo) {
    let rows = agents
        .iter()
        .map(|a| {
            let host = a.host.as_ref().unwrap_or(default_host);
            let gpus = match host.gpus.first() {
                Some(first) => format!("{}x {}", host.gpus.len(), first.name),
                None => "0".into(),
            };
            vec![
                a.id.clone(),
                host.hostname.clone(),
                a.target.clone(),
                host.cpus.to_string(),
                HumanBytes(host.memory_bytes).to_string(),
                gpus,
                format!("{}/{}", a.runs_active, a.slots),
                if host.low_priority { "low" } else { "normal" }.to_string(),
                time(a.last_heartbeat_unix_ms),
                if a.conflict.is_empty() {
                    a.state.clone()
                } else {
                    format!("{} (key conflict)", a.state)
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOST",
            "TARGET",
            "CPUS",
            "MEMORY",
            "GPUS",
            "RUNS",
            "PRIORITY",
            "LAST HEARTBEAT",
            "STATE",
        ],
        rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(sanitize(input), expected, "{input:?}");
    }

    #[test]
    fn sanitize_escapes_what_a_terminal_would_act_on() {
        check("plain run name", "plain run name");
        check("tab\tstays", "tab\tstays");
        check("ünïcödé 日本語 ok", "ünïcödé 日本語 ok");
        // Window title (OSC 0), clear screen (CSI 2J), clipboard write (OSC 52).
        check("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07");
        check("\x1b[2J", "\\x1b[2J");
        check("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07");
        // A carriage return or newline cannot start a line that looks like Kiln's own.
        check(
            "50%\r[kiln] run 99 succeeded",
            "50%\\x0d[kiln] run 99 succeeded",
        );
        check("a\nb", "a\\x0ab");
        check("nul\0del\x7f", "nul\\x00del\\x7f");
        // C1 controls: CSI (U+009B) and OSC (U+009D) as single characters.
        check("\u{9b}2J \u{9d}0;x\u{9c}", "\\u{9b}2J \\u{9d}0;x\\u{9c}");
        // Bidi overrides and isolates, line separators.
        check(
            "evil\u{202e}txt.exe\u{2066}\u{2069}\u{2028}",
            "evil\\u{202e}txt.exe\\u{2066}\\u{2069}\\u{2028}",
        );
    }

    #[test]
    fn sanitize_borrows_clean_text() {
        assert!(matches!(sanitize("clean"), Cow::Borrowed("clean")));
        assert!(matches!(sanitize("\x1b"), Cow::Owned(_)));
    }
}
