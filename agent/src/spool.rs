//! The on-disk spool of one run attempt: its log lines and metric points as JSON lines with
//! per-attempt sequence numbers, written by the run's supervisor process and read by the
//! agent. Because the spool is a file, nothing the script printed is lost when the agent
//! restarts or the coordinator is away: the agent re-reads it and resends what the
//! coordinator has not acknowledged.
//!
//! Files in a run's state directory:
//! - `spec.json` — what to run ([`Spec`]), written by the agent before starting the supervisor.
//! - `supervisor.json` — the supervisor's pid and the boot id it started under.
//! - `child.json` — the script's pid (also its process group id), once started; for a Docker
//!   run, the container's init process (signals go to the supervisor instead, see `docker.rs`).
//! - `logs.spool`, `metrics.spool` — [`LogRecord`]s and [`MetricRecord`]s, one per line.
//! - `exit.json` — how the script ended ([`Exit`]), written once everything was spooled.
//! - `acked.json` — the highest sequence numbers the coordinator acknowledged.
//! - `finished.json` — the final report, kept until the coordinator acknowledges it.
//!
//! And one file for the whole agent, `DATA_DIR/lease.json` ([`Lease`]): until when the
//! agent's link to the coordinator vouches for its fenceable attempts. A supervisor stops
//! its fenceable attempt once the lease has run out, so that an agent that froze or died
//! cannot leave an attempt running beside the retry the coordinator starts elsewhere.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// What the supervisor runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub run_id: i64,
    pub attempt: u32,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// The script starts with `env` only, not the supervisor's environment (specs written
    /// by older agents: unset, and the script inherited it).
    #[serde(default)]
    pub env_clear: bool,
    pub metrics_socket: PathBuf,
    pub metrics_interval_ms: u64,
    /// The run's retry budget: an attempt within it may be fenced off (see `Agent::fence`).
    #[serde(default)]
    pub max_retries: u32,
    /// `$KILN_CHECKPOINT_DIR` and how often to upload it (0: checkpoints are off).
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(default)]
    pub checkpoint_interval_ms: u64,
    /// Gang runs: the processes to start, each with the variables that differ between them
    /// (an empty list: one process, a single-node run). All share one process group.
    #[serde(default)]
    pub procs: Vec<ProcSpec>,
    /// Gang runs: the rank that the node's system metrics (and user metrics that name no
    /// rank) are reported under.
    #[serde(default)]
    pub metrics_rank: Option<u32>,
    /// Whether the agent stops the attempt when it loses the coordinator (see
    /// `Agent::fence_watchdog`); unset: within `max_retries`.
    #[serde(default)]
    pub fenceable: Option<bool>,
    /// Stop the run this many seconds after it was set up (0: no limit).
    #[serde(default)]
    pub timeout_s: u32,
    /// The GPU indices allocated to the run: only these are sampled.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Docker runs: the container to run the program in (see `docker.rs`); `None`: the
    /// program runs as a process of the supervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<crate::docker::DockerSpec>,
    /// The agent's [`Lease`] file, which a fenceable attempt's supervisor watches.
    #[serde(default)]
    pub lease_file: Option<PathBuf>,
    /// Process runs of a root agent: the user the script runs as (see `sandbox`); `None`:
    /// the supervisor's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<crate::sandbox::RunUser>,
    /// The variables of `env` that are the run's secrets: their values are masked in its
    /// output (see `supervisor::Masks`).
    #[serde(default)]
    pub secret_names: Vec<String>,
}

impl Spec {
    /// The values to mask in the run's output: its secrets' values of at least
    /// [`MIN_MASKED_BYTES`] bytes (a shorter one would mask every `1` or `on`), longest
    /// first.
    pub fn masked_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self
            .env
            .iter()
            .filter(|(name, value)| {
                value.len() >= MIN_MASKED_BYTES && self.secret_names.contains(name)
            })
            .map(|(_, value)| value.clone())
            .collect();
        values.sort_by_key(|value| std::cmp::Reverse(value.len()));
        values.dedup();
        values
    }
}

/// Secret values shorter than this are not masked in a run's output.
pub const MIN_MASKED_BYTES: usize = 3;

impl Spec {
    pub fn fenceable(&self) -> bool {
        self.fenceable.unwrap_or(self.attempt <= self.max_retries)
    }
}

/// One process of a gang run on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcSpec {
    /// The global rank whose output lines are tagged with it; `None` for a process that
    /// starts its own workers (`--launcher none`).
    pub rank: Option<u32>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    /// The wire `LogStream` value: 1 stdout, 2 stderr, 3 Kiln itself.
    pub stream: i32,
    pub time_ms: i64,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub seq: u64,
    pub name: String,
    pub value: f64,
    pub step: Option<i64>,
    pub time_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, or 128 + the signal number when a signal ended the script.
    pub exit_code: Option<i32>,
    pub description: String,
    /// Set when the script could not be started at all.
    pub start_error: Option<String>,
    /// Gang runs: the global rank of the first process that failed.
    #[serde(default)]
    pub failed_rank: Option<u32>,
    /// The environment could not be built (the script never started).
    #[serde(default)]
    pub env_failed: bool,
    /// The supervisor stopped the attempt because the agent's lease ran out (fencing).
    #[serde(default)]
    pub fenced: bool,
    /// The supervisor vanished (killed, or the host rebooted): node loss.
    #[serde(default)]
    pub lost: bool,
}

/// Until when the agent's contact with the coordinator vouches for its fenceable attempts:
/// `CLOCK_BOOTTIME` milliseconds under one boot id (a clock every process of the host
/// shares, that wall-clock changes do not move, and that counts time suspended).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// From then on a fenceable attempt is stopped (SIGTERM).
    pub until_boottime_ms: u64,
    /// And killed (SIGKILL) from then on: before the coordinator's TTL runs out, so the
    /// attempt is gone before its retry can start elsewhere.
    #[serde(default)]
    pub kill_boottime_ms: u64,
}

/// What a lease says about a fenceable attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Valid,
    Stop,
    Kill,
}

impl Lease {
    /// The lease in `path` now. A missing or unreadable file is valid: an agent that never
    /// reached the coordinator vouches for nothing, and nothing was given away either.
    pub fn state(path: &Path) -> LeaseState {
        match read_json::<Lease>(path) {
            Ok(Some(lease)) => {
                let now = boottime_ms();
                let kill = if lease.kill_boottime_ms > 0 {
                    lease.kill_boottime_ms
                } else {
                    lease.until_boottime_ms + 10_000
                };
                if now > kill {
                    LeaseState::Kill
                } else if now > lease.until_boottime_ms {
                    LeaseState::Stop
                } else {
                    LeaseState::Valid
                }
            }
            _ => LeaseState::Valid,
        }
    }
}

/// Milliseconds of `CLOCK_BOOTTIME`.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Acked {
    pub log_seq: u64,
    pub metric_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: i32,
    pub boot_id: String,
}

impl ProcessRecord {
    /// Whether the recorded process still runs: same boot, and its `/proc` entry is there
    /// and not a zombie (one that has exited and only waits to be reaped counts as gone).
    /// Only a missing entry means gone; any other failure to read it (a transient error)
    /// is no evidence of that.
    pub fn alive(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(error) => error.kind() != std::io::ErrorKind::NotFound,
        }
    }
}

/// Paths of one attempt's state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn spec(&self) -> PathBuf {
        self.0.join("spec.json")
    }
    pub fn supervisor(&self) -> PathBuf {
        self.0.join("supervisor.json")
    }
    pub fn child(&self) -> PathBuf {
        self.0.join("child.json")
    }
    pub fn logs(&self) -> PathBuf {
        self.0.join("logs.spool")
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.spool")
    }
    pub fn exit(&self) -> PathBuf {
        self.0.join("exit.json")
    }
    pub fn acked(&self) -> PathBuf {
        self.0.join("acked.json")
    }
    pub fn finished(&self) -> PathBuf {
        self.0.join("finished.json")
    }
}

/// Writes `value` as JSON to `path` atomically (temporary file, rename): a reader sees the
/// old or the new content, never a mix, whenever a *process* dies. There is no fsync: these
/// files describe processes, which a machine crash ends anyway.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    // A temporary file of its own: two writers of one file (the agent and the supervisor
    // both record `supervisor.json`) must not rename each other's.
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".write-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    temp.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    temp.persist(path).map(drop).map_err(|e| e.error)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// This boot's id: a pid recorded under another boot id names a process that is gone.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Appends one record as a JSON line. The line is written with one `write` call so a reader
/// never sees half of it unless the writer died mid-call (then the reader ignores the tail).
pub fn append<T: Serialize>(file: &mut std::fs::File, record: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)
}

/// Reads complete records appended to a spool file since the last call.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    at_end: bool,
}

impl Tail {
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
            at_end: false,
        }
    }

    /// Whether the last [`Tail::read`] reached the end of the file (it read less than it
    /// was allowed to). `false` until a read did.
    pub fn at_end(&self) -> bool {
        self.at_end
    }

    /// Forgets that the end was reached (nothing was read since, so it is not known).
    pub fn unknown_end(&mut self) {
        self.at_end = false;
    }

    /// New complete records, at most about `max_bytes` of them per call. A missing file reads
    /// as empty; an unreadable line is skipped (it can only be the torn tail of a crash).
    pub fn read<T: DeserializeOwned>(&mut self, max_bytes: usize) -> std::io::Result<Vec<T>> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.at_end = true;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buffer = Vec::new();
        let n = file.take(max_bytes as u64).read_to_end(&mut buffer)?;
        self.at_end = n < max_bytes;
        self.offset += n as u64;
        self.partial.extend_from_slice(&buffer);
        let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        Ok(complete
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect())
    }
}

/// The highest sequence number in a spool file (0 when empty or missing).
pub fn last_seq(path: &Path) -> std::io::Result<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let mut tail = Tail::new(path.to_path_buf());
    let mut last = 0;
    loop {
        let records: Vec<Seq> = tail.read(1 << 20)?;
        if records.is_empty() {
            return Ok(last);
        }
        last = records
            .iter()
            .map(|r| r.seq)
            .max()
            .unwrap_or(last)
            .max(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_only_complete_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.spool");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let record = |seq| LogRecord {
            seq,
            stream: 1,
            time_ms: 0,
            text: format!("line {seq}\nwith newline"),
            rank: None,
        };
        append(&mut file, &record(1)).unwrap();
        // A torn write: half a record.
        file.write_all(br#"{"seq":2,"stream":1,"#).unwrap();
        let mut tail = Tail::new(path.clone());
        assert_eq!(tail.read::<LogRecord>(1 << 20).unwrap(), vec![record(1)]);
        file.write_all(b"\"time_ms\":0,\"text\":\"x\"}\n").unwrap();
        append(&mut file, &record(3)).unwrap();
        let got: Vec<LogRecord> = tail.read(1 << 20).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
        assert!(tail.read::<LogRecord>(1 << 20).unwrap().is_empty());
        assert_eq!(last_seq(&path).unwrap(), 3);
    }

    #[test]
    fn a_lease_stops_then_kills_once_it_has_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        // No lease yet: nothing was ever vouched for, nothing was given away.
        assert_eq!(Lease::state(&path), LeaseState::Valid);
        let now = boottime_ms();
        let check = |until: u64, kill: u64, expected: LeaseState| {
            let lease = Lease {
                until_boottime_ms: until,
                kill_boottime_ms: kill,
            };
            write_json(&path, &lease).unwrap();
            assert_eq!(Lease::state(&path), expected, "{lease:?}");
        };
        check(now + 60_000, now + 80_000, LeaseState::Valid);
        check(now - 1_000, now + 60_000, LeaseState::Stop);
        check(now - 2_000, now - 1_000, LeaseState::Kill);
    }

    #[test]
    fn json_files_are_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acked.json");
        assert_eq!(read_json::<Acked>(&path).unwrap(), None);
        write_json(
            &path,
            &Acked {
                log_seq: 5,
                metric_seq: 2,
            },
        )
        .unwrap();
        write_json(
            &path,
            &Acked {
                log_seq: 9,
                metric_seq: 2,
            },
        )
        .unwrap();
        assert_eq!(
            read_json::<Acked>(&path).unwrap(),
            Some(Acked {
                log_seq: 9,
                metric_seq: 2
            })
        );
    }
}
