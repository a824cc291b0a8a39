//! The coordinator's database: the only module that speaks SQL. One SQLite file in WAL mode
//! holds targets, agents, runs, log lines and metric points. Every write that an agent may
//! repeat (log lines, metric points) is idempotent on (run_id, attempt, seq).
//!
//! Calls are synchronous and short; async callers go through [`crate::Db`], which runs them
//! on the blocking pool.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use kiln_common::run::{self, RunEvent, RunStatus};
use kiln_proto::page::{self, Page};
use kiln_proto::v1;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE targets (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL REFERENCES targets(name),
    host BLOB NOT NULL,
    slots INTEGER NOT NULL,
    state TEXT NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    target TEXT NOT NULL REFERENCES targets(name),
    status TEXT NOT NULL,
    agent_id TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    message TEXT NOT NULL DEFAULT '',
    snapshot_digest TEXT NOT NULL,
    script TEXT NOT NULL,
    args TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    outputs_digest TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_by_target_status ON runs(target, status, id);
CREATE INDEX runs_by_agent_status ON runs(agent_id, status);
CREATE TABLE logs (
    cursor INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    text TEXT NOT NULL,
    UNIQUE (run_id, attempt, seq)
);
CREATE INDEX logs_by_run ON logs(run_id, cursor);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    step INTEGER,
    time_ms INTEGER NOT NULL,
    UNIQUE (run_id, attempt, seq)
);
CREATE INDEX metrics_by_run_name ON metrics(run_id, name, id);
"#,
    r#"
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL,
    target TEXT NOT NULL,
    uses_left INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER
);
"#,
    r#"
ALTER TABLE runs ADD COLUMN max_retries INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE runs ADD COLUMN checkpoint_interval_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN checkpoint_digest TEXT NOT NULL DEFAULT '';
"#,
    // Gang runs: a run's placement moves into `run_nodes` (one row per node and attempt, a
    // single-node run has one), and logs and metrics get a sequence per node.
    r#"
ALTER TABLE runs ADD COLUMN nodes INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN procs_per_node INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN gpus_per_node INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN launcher TEXT NOT NULL DEFAULT 'kiln';
ALTER TABLE runs ADD COLUMN max_restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN failed_rank INTEGER;
CREATE TABLE run_nodes (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    node_rank INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    state TEXT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    port INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    PRIMARY KEY (run_id, attempt, node_rank)
);
CREATE INDEX run_nodes_by_agent ON run_nodes(agent_id, run_id);
INSERT INTO run_nodes (run_id, attempt, node_rank, agent_id, state)
    SELECT id, attempt, 0, agent_id, CASE status WHEN 'running' THEN 'running' ELSE 'assigned' END
    FROM runs WHERE status IN ('assigned', 'running');
CREATE TABLE logs_v5 (
    cursor INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    node INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    text TEXT NOT NULL,
    rank INTEGER,
    UNIQUE (run_id, attempt, node, seq)
);
INSERT INTO logs_v5 (cursor, run_id, attempt, seq, stream, time_ms, text)
    SELECT cursor, run_id, attempt, seq, stream, time_ms, text FROM logs;
DROP TABLE logs;
ALTER TABLE logs_v5 RENAME TO logs;
CREATE INDEX logs_by_run ON logs(run_id, cursor);
CREATE TABLE metrics_v5 (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    attempt INTEGER NOT NULL,
    node INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    step INTEGER,
    time_ms INTEGER NOT NULL,
    rank INTEGER,
    UNIQUE (run_id, attempt, node, seq)
);
INSERT INTO metrics_v5 (id, run_id, attempt, seq, name, value, step, time_ms)
    SELECT id, run_id, attempt, seq, name, value, step, time_ms FROM metrics;
DROP TABLE metrics;
ALTER TABLE metrics_v5 RENAME TO metrics;
CREATE INDEX metrics_by_run_name ON metrics(run_id, name, id);
"#,
    // Environments and resources: the run configuration (prost-encoded messages), and the
    // GPU indices each node of an attempt was given.
    r#"
ALTER TABLE runs ADD COLUMN environment BLOB;
ALTER TABLE runs ADD COLUMN resources BLOB;
ALTER TABLE runs ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
ALTER TABLE runs ADD COLUMN timeout_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE run_nodes ADD COLUMN gpus TEXT NOT NULL DEFAULT '[]';
"#,
    // What each agent keeps in its environment cache (a prost-encoded Heartbeat).
    r#"
ALTER TABLE agents ADD COLUMN environments BLOB;
"#,
    // Authentication: users with one API token each (its secret stored as SHA-256 only),
    // agent identities created when a join token is spent (bound to their certificate's
    // URI SAN), and the user who submitted each run.
    r#"
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'member')),
    token_id TEXT NOT NULL UNIQUE,
    token_sha256 BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER
);
CREATE TABLE agent_identities (
    agent_id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    hostname TEXT NOT NULL,
    join_token_id TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL,
    cert_not_after_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
"#,
    // 8: runs that end once their nodes have stopped (`stopping` with a pending outcome),
    // outputs that could not be kept, and each node's outputs and checkpoint.
    r#"
ALTER TABLE runs ADD COLUMN pending TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN outputs_error TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN node_checkpoints TEXT NOT NULL DEFAULT '{}';
ALTER TABLE run_nodes ADD COLUMN outputs_digest TEXT NOT NULL DEFAULT '';
"#,
    // 9: who uploaded each blob (`user:NAME` or `agent:ID`; nobody on an open coordinator).
    // An upload proves possession of the bytes; what else a caller may read follows from
    // the runs they may see (`Store::blob_readable`). Blobs stored before this migration
    // have no uploader: they stay readable through the runs that name them.
    r#"
CREATE TABLE blob_owners (
    digest TEXT NOT NULL,
    owner TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    PRIMARY KEY (digest, owner)
) WITHOUT ROWID;
CREATE INDEX runs_by_owner ON runs(owner);
"#,
    // 10: the last second session refused for a live agent from another host or boot: a
    // possible copy of its key (`sessions::judge`), shown by `kiln agents`.
    r#"
ALTER TABLE agents ADD COLUMN conflict TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN conflict_ms INTEGER NOT NULL DEFAULT 0;
"#,
    // 11: when the run's first attempt started (`started_ms` is the current attempt's), so
    // that a retried run reports its whole duration. Runs from before: unknown.
    r#"
ALTER TABLE runs ADD COLUMN first_started_ms INTEGER;
"#,
    // 12: deleted targets (`kiln targets delete`) stay as rows, for the runs that name them;
    // an agent joining one again brings it back.
    r#"
ALTER TABLE targets ADD COLUMN deleted_ms INTEGER;
"#,
    // 13: a user's own cap on queued runs, set by an admin (NULL: the coordinator's
    // max_queued_per_user).
    r#"
ALTER TABLE users ADD COLUMN max_queued INTEGER;
"#,
    // 14: run secrets: their names (JSON), and their values sealed with the coordinator's
    // key (`secrets.rs`), erased once the run has ended.
    r#"
ALTER TABLE runs ADD COLUMN secret_names TEXT NOT NULL DEFAULT '[]';
ALTER TABLE runs ADD COLUMN secrets BLOB;
"#,
    // 15: when housekeeping pruned an ended run (its logs, metrics, outputs, checkpoints).
    r#"
ALTER TABLE runs ADD COLUMN pruned_ms INTEGER;
"#,
];

pub struct Store {
    conn: Connection,
}

/// Why [`Store::delete_target`] did not delete a target (the message is for the admin).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetRefusal {
    NotFound(String),
    /// It still has agents, or queued or active runs.
    InUse(String),
}

/// Who uploads or asks to read a blob (see [`Store::blob_readable`]). Admins and callers
/// of an open coordinator read every blob without asking (`auth.rs`).
#[derive(Debug, Clone, Copy)]
pub enum BlobReader<'a> {
    /// A user (of any role), by name.
    User(&'a str),
    /// An agent, by id.
    Agent(&'a str),
}

impl BlobReader<'_> {
    /// The `blob_owners.owner` of what this caller uploads.
    pub fn owner_key(self) -> String {
        match self {
            BlobReader::User(name) => format!("user:{name}"),
            BlobReader::Agent(id) => format!("agent:{id}"),
        }
    }
}

/// A run as submitted, before the database gives it an id.
pub struct NewRun<'a> {
    pub name: &'a str,
    pub target: &'a str,
    pub snapshot_digest: &'a str,
    pub script: &'a str,
    pub args: &'a [String],
    pub max_retries: u32,
    pub checkpoint_interval_s: u32,
    pub gang: GangSpec,
    pub environment: Option<&'a v1::Environment>,
    pub resources: Option<&'a v1::Resources>,
    pub env: &'a HashMap<String, String>,
    /// The names of the run's secrets, and their values sealed (`secrets::SecretBox`).
    pub secret_names: &'a [String],
    pub sealed_secrets: Option<&'a [u8]>,
    pub timeout_s: u32,
    /// The submitting user ("" without authentication).
    pub owner: &'a str,
    pub now_ms: i64,
}

/// The shape of a run across nodes; `GangSpec::default()` is a single-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GangSpec {
    pub nodes: u32,
    pub procs_per_node: u32,
    pub gpus_per_node: u32,
    /// "kiln" or "none".
    pub launcher: String,
    pub max_restarts: u32,
}

impl Default for GangSpec {
    fn default() -> Self {
        GangSpec {
            nodes: 1,
            procs_per_node: 1,
            gpus_per_node: 0,
            launcher: "kiln".to_string(),
            max_restarts: 0,
        }
    }
}

/// Whether a run is a gang run: the agents rendezvous and start several ranks.
pub fn is_gang(run: &v1::Run) -> bool {
    run.nodes > 1 || run.procs_per_node > 1
}

/// Fields that an event sets besides the status.
#[derive(Default)]
pub struct EventFields<'a> {
    /// `Assign`: the agents of the new attempt in node-rank order (one for a single-node run).
    pub placement: &'a [String],
    /// `Assign`: the GPU indices allocated on each of those agents (same order; may be
    /// shorter, meaning none).
    pub gpus: &'a [Vec<u32>],
    pub exit_code: Option<i32>,
    pub message: Option<&'a str>,
    pub outputs_digest: Option<&'a str>,
    /// `Finish`/`Lose`: the global rank whose failure ended a gang run.
    pub failed_rank: Option<u32>,
    /// `Stop`: how the run ends once its nodes have stopped.
    pub pending: Option<run::Pending>,
    /// `Finish`: why the outputs were not kept.
    pub outputs_error: Option<&'a str>,
    pub now_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("run {0} does not exist")]
    NoSuchRun(i64),
    #[error(transparent)]
    Invalid(#[from] run::InvalidTransition),
    #[error(transparent)]
    Db(#[from] anyhow::Error),
}

/// One node of a placed run, as the scheduler counts it.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub agent_id: String,
    /// The run's target and owner (fair share counts what each user holds).
    pub target: String,
    pub owner: String,
    pub need: crate::scheduler::Need,
    pub gpus: Vec<u32>,
}

/// One node of a run attempt.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub node_rank: u32,
    pub agent_id: String,
    pub state: String,
    pub address: String,
    pub port: u32,
    pub exit_code: Option<i32>,
    pub gpus: Vec<u32>,
}

impl NodeRow {
    pub fn into_wire(self) -> v1::RunNode {
        v1::RunNode {
            node_rank: self.node_rank,
            agent_id: self.agent_id,
            state: self.state,
            address: self.address,
            exit_code: self.exit_code,
            gpus: self.gpus,
        }
    }
}

pub struct AgentRow {
    pub id: String,
    pub target: String,
    pub host: v1::HostInfo,
    pub slots: u32,
    pub state: String,
    pub last_heartbeat_ms: i64,
    pub environments: Vec<v1::CachedEnvironment>,
    /// The last refused second session that looked like a copy of the agent's key ("" if
    /// none), and when.
    pub conflict: String,
    pub conflict_ms: i64,
}

/// How long a statement waits for another process's lock on the database.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Switching a file to WAL needs an exclusive lock, and SQLite answers BUSY
/// at once, without calling the busy handler, when another process is opening
/// the same new file. Retry for as long as the busy timeout would wait.
fn switch_to_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`. Every failure names
    /// the file, so that an admin knows what to restore or move aside.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        Store::open_unnamed(path).with_context(|| {
            format!(
                "the database {} cannot be used (if it is damaged, restore it from a backup or move it aside to start empty)",
                path.display()
            )
        })
    }

    fn open_unnamed(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        switch_to_wal(&conn).context("switch the database to WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        anyhow::ensure!(
            check == "ok",
            "database {} failed its integrity check: {check}",
            path.display()
        );
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    /// Brings the schema up to date. The version is read inside an
    /// IMMEDIATE transaction so that two processes opening one database at
    /// once (the service starting while `kiln-coordinator user create`
    /// runs) take turns: the second sees the first one's version and applies
    /// nothing twice.
    fn migrate(&mut self) -> anyhow::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: usize = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        anyhow::ensure!(
            version <= MIGRATIONS.len(),
            "database schema version {version} is newer than this coordinator knows ({}); upgrade kiln-coordinator",
            MIGRATIONS.len()
        );
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql)
                .with_context(|| format!("apply migration {}", index + 1))?;
            tx.pragma_update(None, "user_version", index + 1)?;
        }
        tx.commit()?;
        Ok(())
    }
}

mod access;
mod agents;
mod blobs;
mod housekeeping;
mod logs;
mod runs;
#[cfg(test)]
mod tests;

pub use access::{
    IdentityRow, JoinTokenError, JoinTokenRow, NewIdentity, NewJoinToken, NewUser, Role, UserRow,
};
