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

    // ---- targets ----

    /// Makes the target exist (again, if it was deleted).
    pub fn ensure_target(&self, name: &str, now_ms: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO targets (name, created_ms) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET deleted_ms = NULL WHERE deleted_ms IS NOT NULL",
            params![name, now_ms],
        )?;
        Ok(())
    }

    /// Deletes a target that has no agents and no queued or active runs; its past runs keep
    /// its name. Returns why it cannot be deleted, if it cannot.
    pub fn delete_target(
        &mut self,
        name: &str,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), TargetRefusal>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT count(*) > 0 FROM targets WHERE name = ?1 AND deleted_ms IS NULL",
            [name],
            |row| row.get(0),
        )?;
        if !exists {
            return Ok(Err(TargetRefusal::NotFound(format!(
                "target `{name}` does not exist"
            ))));
        }
        let agents: Vec<String> = tx
            .prepare("SELECT id FROM agents WHERE target = ?1 ORDER BY id")?
            .query_map([name], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if !agents.is_empty() {
            return Ok(Err(TargetRefusal::InUse(format!(
                "target `{name}` still has agents ({}): stop them and `kiln agents forget` each first",
                agents.join(", ")
            ))));
        }
        let runs: i64 = tx.query_row(
            "SELECT count(*) FROM runs WHERE target = ?1
               AND status IN ('queued', 'assigned', 'running', 'stopping')",
            [name],
            |row| row.get(0),
        )?;
        if runs > 0 {
            return Ok(Err(TargetRefusal::InUse(format!(
                "target `{name}` has {runs} queued or active run(s): cancel them or let them end first"
            ))));
        }
        tx.execute(
            "UPDATE targets SET deleted_ms = ?2 WHERE name = ?1",
            params![name, now_ms],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    pub fn target_names(&self) -> anyhow::Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM targets WHERE deleted_ms IS NULL ORDER BY name")?;
        let names = stmt
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(names)
    }

    pub fn list_targets(&self) -> anyhow::Result<Vec<v1::Target>> {
        let mut stmt = self.conn.prepare(
            "SELECT t.name,
                (SELECT count(*) FROM agents a WHERE a.target = t.name AND a.state = 'online'),
                (SELECT count(*) FROM agents a WHERE a.target = t.name
                    AND a.state NOT IN ('revoked', 'stopped')),
                (SELECT count(*) FROM runs r WHERE r.target = t.name AND r.status = 'queued'),
                (SELECT count(*) FROM runs r WHERE r.target = t.name AND r.status IN ('assigned', 'running', 'stopping'))
             FROM targets t WHERE t.deleted_ms IS NULL ORDER BY t.name",
        )?;
        let targets = stmt
            .query_map([], |row| {
                Ok(v1::Target {
                    name: row.get(0)?,
                    agents_online: row.get(1)?,
                    agents_total: row.get(2)?,
                    runs_queued: row.get(3)?,
                    runs_active: row.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(targets)
    }

    // ---- agents ----

    pub fn upsert_agent(
        &self,
        id: &str,
        target: &str,
        host: &v1::HostInfo,
        slots: u32,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        self.ensure_target(target, now_ms)?;
        self.conn.execute(
            "INSERT INTO agents (id, target, host, slots, state, last_heartbeat_ms, registered_ms)
             VALUES (?1, ?2, ?3, ?4, 'online', ?5, ?5)
             ON CONFLICT (id) DO UPDATE SET target = ?2, host = ?3, slots = ?4, state = 'online',
                last_heartbeat_ms = ?5",
            params![id, target, host.encode_to_vec(), slots, now_ms],
        )?;
        Ok(())
    }

    pub fn heartbeat(&self, id: &str, now_ms: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE agents SET last_heartbeat_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }

    /// Records the environment cache an agent reported.
    pub fn set_agent_environments(
        &self,
        id: &str,
        environments: &[v1::CachedEnvironment],
    ) -> anyhow::Result<()> {
        let report = v1::Heartbeat {
            environments_included: true,
            environments: environments.to_vec(),
        };
        self.conn.execute(
            "UPDATE agents SET environments = ?2 WHERE id = ?1",
            params![id, report.encode_to_vec()],
        )?;
        Ok(())
    }

    /// Records a refused second session that looked like a copy of the agent's key.
    pub fn record_agent_conflict(&self, id: &str, what: &str, now_ms: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE agents SET conflict = ?2, conflict_ms = ?3 WHERE id = ?1",
            params![id, what, now_ms],
        )?;
        Ok(())
    }

    pub fn set_agent_state(&self, id: &str, state: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE agents SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    pub fn list_agents(&self) -> anyhow::Result<Vec<AgentRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, target, host, slots, state, last_heartbeat_ms, environments, conflict,
                conflict_ms FROM agents ORDER BY target, id",
        )?;
        let rows = stmt
            .query_map([], |row| {
                let host: Vec<u8> = row.get(2)?;
                Ok(AgentRow {
                    id: row.get(0)?,
                    target: row.get(1)?,
                    host: v1::HostInfo::decode(host.as_slice()).unwrap_or_default(),
                    slots: row.get(3)?,
                    state: row.get(4)?,
                    last_heartbeat_ms: row.get(5)?,
                    environments: row
                        .get::<_, Option<Vec<u8>>>(6)?
                        .and_then(|b| v1::Heartbeat::decode(b.as_slice()).ok())
                        .map(|report| report.environments)
                        .unwrap_or_default(),
                    conflict: row.get(7)?,
                    conflict_ms: row.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// How many runs each agent is holding a slot for.
    pub fn active_runs_per_agent(&self) -> anyhow::Result<HashMap<String, u32>> {
        let mut stmt = self.conn.prepare(
            "SELECT n.agent_id, count(*) FROM runs r
             JOIN run_nodes n ON n.run_id = r.id AND n.attempt = r.attempt
             WHERE r.status IN ('assigned', 'running', 'stopping') GROUP BY n.agent_id",
        )?;
        let counts = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(counts)
    }

    pub fn active_runs_of_agent(&self, agent_id: &str) -> anyhow::Result<Vec<v1::Run>> {
        self.query_runs(
            "WHERE status IN ('assigned', 'running', 'stopping') AND id IN (SELECT n.run_id FROM run_nodes n
                WHERE n.agent_id = ?1 AND n.attempt = runs.attempt) ORDER BY id",
            params![agent_id],
        )
    }

    /// Every node of every placed run: which agent holds it, what the run asked for per
    /// node, and the GPU indices it was given.
    pub fn active_allocations(&self) -> anyhow::Result<Vec<Allocation>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT n.agent_id, n.gpus, r.resources, r.gpus_per_node, r.target, r.owner FROM runs r
             JOIN run_nodes n ON n.run_id = r.id AND n.attempt = r.attempt
             WHERE r.status IN ('assigned', 'running', 'stopping')",
        )?;
        let rows = stmt
            .query_map([], |row| {
                let gpus: String = row.get(1)?;
                let resources: Option<Vec<u8>> = row.get(2)?;
                let resources = resources
                    .and_then(|b| v1::Resources::decode(b.as_slice()).ok())
                    .unwrap_or_default();
                let gpus_per_node: u32 = row.get(3)?;
                Ok(Allocation {
                    agent_id: row.get(0)?,
                    target: row.get(4)?,
                    owner: row.get(5)?,
                    gpus: serde_json::from_str(&gpus).unwrap_or_default(),
                    need: crate::scheduler::Need {
                        cpus: resources.cpus,
                        memory_bytes: resources.memory_bytes,
                        gpus: resources.gpus.max(gpus_per_node),
                    },
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The node rank `agent_id` has in the run's attempt, if it holds one.
    pub fn node_of(
        &self,
        run_id: i64,
        attempt: u32,
        agent_id: &str,
    ) -> anyhow::Result<Option<u32>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT node_rank FROM run_nodes WHERE run_id = ?1 AND attempt = ?2 AND agent_id = ?3",
            )?
            .query_row(params![run_id, attempt, agent_id], |row| row.get(0))
            .optional()?)
    }

    /// The node `agent_id` holds in the run's attempt, if any.
    pub fn node_row(
        &self,
        run_id: i64,
        attempt: u32,
        agent_id: &str,
    ) -> anyhow::Result<Option<NodeRow>> {
        Ok(self
            .run_nodes(run_id, attempt)?
            .into_iter()
            .find(|node| node.agent_id == agent_id))
    }

    /// The nodes of one attempt, in node-rank order.
    pub fn run_nodes(&self, run_id: i64, attempt: u32) -> anyhow::Result<Vec<NodeRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node_rank, agent_id, state, address, port, exit_code, gpus FROM run_nodes
             WHERE run_id = ?1 AND attempt = ?2 ORDER BY node_rank",
        )?;
        let rows = stmt
            .query_map(params![run_id, attempt], |row| {
                Ok(NodeRow {
                    node_rank: row.get(0)?,
                    agent_id: row.get(1)?,
                    state: row.get(2)?,
                    address: row.get(3)?,
                    port: row.get(4)?,
                    exit_code: row.get(5)?,
                    gpus: serde_json::from_str(&row.get::<_, String>(6)?).unwrap_or_default(),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Each node's outputs digest of one attempt, in node-rank order.
    fn node_outputs(&self, run_id: i64, attempt: u32) -> anyhow::Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT outputs_digest FROM run_nodes WHERE run_id = ?1 AND attempt = ?2
             ORDER BY node_rank",
        )?;
        let digests = stmt
            .query_map(params![run_id, attempt], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(digests)
    }

    /// A node of the attempt is prepared: records its address (and node 0's rendezvous port).
    pub fn node_ready(
        &self,
        run_id: i64,
        attempt: u32,
        node_rank: u32,
        address: &str,
        port: u32,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE run_nodes SET state = 'ready', address = ?4, port = ?5
             WHERE run_id = ?1 AND attempt = ?2 AND node_rank = ?3 AND state = 'assigned'",
            params![run_id, attempt, node_rank, address, port],
        )?;
        Ok(())
    }

    pub fn node_started(&self, run_id: i64, attempt: u32, node_rank: u32) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE run_nodes SET state = 'running'
             WHERE run_id = ?1 AND attempt = ?2 AND node_rank = ?3 AND state IN ('assigned', 'ready')",
            params![run_id, attempt, node_rank],
        )?;
        Ok(())
    }

    /// A node of the attempt has ended (and delivered everything): its exit code and the
    /// digest of its outputs ("" for none).
    pub fn node_exited(
        &self,
        run_id: i64,
        attempt: u32,
        node_rank: u32,
        exit_code: Option<i32>,
        outputs_digest: &str,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE run_nodes SET state = 'exited', exit_code = ?4, outputs_digest = ?5
             WHERE run_id = ?1 AND attempt = ?2 AND node_rank = ?3",
            params![run_id, attempt, node_rank, exit_code, outputs_digest],
        )?;
        Ok(())
    }

    // ---- runs ----

    pub fn insert_run(&self, new: &NewRun) -> anyhow::Result<v1::Run> {
        let args = serde_json::to_string(new.args).expect("strings serialise");
        self.conn.execute(
            "INSERT INTO runs (name, target, status, snapshot_digest, script, args, created_ms,
                max_retries, checkpoint_interval_s, nodes, procs_per_node, gpus_per_node,
                launcher, max_restarts, environment, resources, env, timeout_s, owner)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                ?16, ?17, ?18)",
            params![
                new.name,
                new.target,
                new.snapshot_digest,
                new.script,
                args,
                new.now_ms,
                new.max_retries,
                new.checkpoint_interval_s,
                new.gang.nodes,
                new.gang.procs_per_node,
                new.gang.gpus_per_node,
                new.gang.launcher,
                new.gang.max_restarts,
                new.environment.map(|e| e.encode_to_vec()),
                new.resources.map(|r| r.encode_to_vec()),
                serde_json::to_string(new.env).expect("strings serialise"),
                new.timeout_s,
                new.owner
            ],
        )?;
        let id = self.conn.last_insert_rowid();
        self.get_run(id)?
            .context("a run that was just inserted is missing")
    }

    /// How many runs were queued on `target` before run `id` and still wait.
    pub fn queued_before(&self, target: &str, id: i64) -> anyhow::Result<u64> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM runs WHERE target = ?1 AND status = 'queued' AND id < ?2",
            )?
            .query_row(params![target, id], |row| row.get(0))?)
    }

    /// How many runs `owner` has waiting in queues, on every target.
    /// Sets (or, with `None`, clears) a user's own cap on queued runs; false: no such user.
    pub fn set_user_max_queued(&self, name: &str, max_queued: Option<u32>) -> anyhow::Result<bool> {
        let changed = self.conn.execute(
            "UPDATE users SET max_queued = ?2 WHERE name = ?1",
            params![name, max_queued],
        )?;
        Ok(changed > 0)
    }

    /// A user's own cap on queued runs, if an admin set one.
    pub fn user_max_queued(&self, name: &str) -> anyhow::Result<Option<u32>> {
        Ok(self
            .conn
            .prepare_cached("SELECT max_queued FROM users WHERE name = ?1")?
            .query_row(params![name], |row| row.get::<_, Option<u32>>(0))
            .optional()?
            .flatten())
    }

    pub fn queued_runs_of(&self, owner: &str) -> anyhow::Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT count(*) FROM runs WHERE owner = ?1 AND status = 'queued'")?
            .query_row(params![owner], |row| row.get(0))?)
    }

    /// One run. An ended run also carries where its last attempt ran (`kiln show`): lists
    /// carry the placement only while a run is active.
    pub fn get_run(&self, id: i64) -> anyhow::Result<Option<v1::Run>> {
        let Some(mut run) = self.query_runs("WHERE id = ?1", params![id])?.pop() else {
            return Ok(None);
        };
        if run.attempt > 0 && run.status().domain().is_terminal() {
            run.placement = self
                .run_nodes(run.id, run.attempt)?
                .into_iter()
                .map(NodeRow::into_wire)
                .collect();
        }
        Ok(Some(run))
    }

    /// The newest runs first, older than `before_id` when given; with `owner`, only that
    /// user's. One page of at most `max_bytes` and `limit` runs.
    pub fn list_runs(
        &self,
        target: Option<&str>,
        owner: Option<&str>,
        before_id: Option<i64>,
        max_bytes: usize,
        limit: u32,
    ) -> anyhow::Result<Page<v1::Run>> {
        self.query_runs_page(
            "WHERE (?1 IS NULL OR target = ?1) AND (?2 IS NULL OR owner = ?2)
                AND (?3 IS NULL OR id < ?3)
             ORDER BY id DESC",
            params![target, owner, before_id],
            max_bytes,
            limit as usize,
        )
    }

    /// Queued runs of a target, oldest first.
    pub fn queued_runs(&self, target: &str, limit: u32) -> anyhow::Result<Vec<v1::Run>> {
        self.query_runs(
            "WHERE target = ?1 AND status = 'queued' ORDER BY id LIMIT ?2",
            params![target, limit],
        )
    }

    fn query_runs(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> anyhow::Result<Vec<v1::Run>> {
        Ok(self
            .query_runs_page(clause, params, usize::MAX, usize::MAX)?
            .items)
    }

    /// The runs `clause` selects, read lazily until a page of `max_bytes` and `max_runs` is
    /// full.
    fn query_runs_page(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
        max_bytes: usize,
        max_runs: usize,
    ) -> anyhow::Result<Page<v1::Run>> {
        let sql = format!(
            "SELECT id, name, target, status, agent_id, attempt, exit_code, message, snapshot_digest,
                script, args, created_ms, started_ms, finished_ms, outputs_digest, max_retries,
                checkpoint_interval_s, checkpoint_digest, nodes, procs_per_node, gpus_per_node,
                launcher, max_restarts, restarts, failed_rank, environment, resources, env,
                timeout_s, owner, outputs_error, first_started_ms
             FROM runs {clause}"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let runs = stmt
            .query_map(params, |row| {
                let status: String = row.get(3)?;
                let args: String = row.get(10)?;
                Ok(v1::Run {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    target: row.get(2)?,
                    status: v1::RunStatus::from(status.parse().unwrap_or(RunStatus::Failed)) as i32,
                    agent_id: row.get(4)?,
                    attempt: row.get(5)?,
                    exit_code: row.get(6)?,
                    message: row.get(7)?,
                    snapshot_digest: row.get(8)?,
                    script: row.get(9)?,
                    args: serde_json::from_str(&args).unwrap_or_default(),
                    created_unix_ms: row.get(11)?,
                    started_unix_ms: row.get(12)?,
                    finished_unix_ms: row.get(13)?,
                    outputs_digest: row.get(14)?,
                    max_retries: row.get(15)?,
                    checkpoint_interval_s: row.get(16)?,
                    checkpoint_digest: row.get(17)?,
                    nodes: row.get(18)?,
                    procs_per_node: row.get(19)?,
                    gpus_per_node: row.get(20)?,
                    launcher: row.get(21)?,
                    max_restarts: row.get(22)?,
                    restarts: row.get(23)?,
                    failed_rank: row.get(24)?,
                    placement: Vec::new(),
                    environment: row
                        .get::<_, Option<Vec<u8>>>(25)?
                        .and_then(|b| v1::Environment::decode(b.as_slice()).ok()),
                    resources: row
                        .get::<_, Option<Vec<u8>>>(26)?
                        .and_then(|b| v1::Resources::decode(b.as_slice()).ok()),
                    env: serde_json::from_str(&row.get::<_, String>(27)?).unwrap_or_default(),
                    timeout_s: row.get(28)?,
                    owner: row.get(29)?,
                    outputs_error: row.get(30)?,
                    first_started_unix_ms: row.get(31)?,
                    waiting: String::new(),
                    node_outputs_digests: Vec::new(),
                })
            })?
            // The placement and node outputs are part of the run's size: read them before
            // the run is measured.
            .map(|run| {
                let mut run = run?;
                if run.status().domain().is_active() {
                    run.placement = self
                        .run_nodes(run.id, run.attempt)?
                        .into_iter()
                        .map(NodeRow::into_wire)
                        .collect();
                } else if is_gang(&run) && run.status().domain().is_terminal() {
                    run.node_outputs_digests = self.node_outputs(run.id, run.attempt)?;
                }
                anyhow::Ok(run)
            });
        page::fill(runs, max_bytes, max_runs)
    }

    /// Moves a run through the state machine in one transaction. `attempt`, when given,
    /// must match the run's current attempt (fencing: a stale attempt changes nothing).
    pub fn transition(
        &mut self,
        run_id: i64,
        attempt: Option<u32>,
        event: RunEvent,
        fields: &EventFields,
    ) -> Result<v1::Run, TransitionError> {
        let tx = self.conn.transaction().map_err(anyhow::Error::from)?;
        let current: Option<(String, u32)> = tx
            .query_row(
                "SELECT status, attempt FROM runs WHERE id = ?1",
                [run_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(anyhow::Error::from)?;
        let (status, current_attempt) = current.ok_or(TransitionError::NoSuchRun(run_id))?;
        let from: RunStatus = status.parse().map_err(anyhow::Error::msg)?;
        if attempt.is_some_and(|attempt| attempt != current_attempt) {
            return Err(TransitionError::Invalid(run::InvalidTransition {
                from,
                event,
            }));
        }
        let to = run::next(from, event)?;
        let now = fields.now_ms;
        let update = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<(), TransitionError> {
            tx.execute(sql, p).map_err(anyhow::Error::from)?;
            Ok(())
        };
        match event {
            RunEvent::Assign => {
                let first = fields.placement.first().map(String::as_str);
                update(
                    "UPDATE runs SET status = ?2, agent_id = ?3, attempt = attempt + 1 WHERE id = ?1",
                    &[&run_id, &to.as_str(), &first.unwrap_or_default()],
                )?;
                for (node_rank, agent_id) in fields.placement.iter().enumerate() {
                    let gpus = fields.gpus.get(node_rank).cloned().unwrap_or_default();
                    let gpus = serde_json::to_string(&gpus).expect("numbers serialise");
                    update(
                        "INSERT INTO run_nodes (run_id, attempt, node_rank, agent_id, state, gpus)
                         VALUES (?1, ?2, ?3, ?4, 'assigned', ?5)",
                        &[
                            &run_id,
                            &(current_attempt + 1),
                            &(node_rank as u32),
                            agent_id,
                            &gpus,
                        ],
                    )?;
                }
            }
            RunEvent::Requeue => update(
                "UPDATE runs SET status = ?2, agent_id = '' WHERE id = ?1",
                &[&run_id, &to.as_str()],
            )?,
            RunEvent::Retry | RunEvent::Settle(run::Pending::Retry) => update(
                "UPDATE runs SET status = ?2, agent_id = '', started_ms = NULL, pending = '',
                    message = coalesce(?3, message),
                    restarts = restarts + (nodes > 1 OR procs_per_node > 1) WHERE id = ?1",
                &[&run_id, &to.as_str(), &fields.message],
            )?,
            RunEvent::Start => update(
                "UPDATE runs SET status = ?2, started_ms = ?3,
                    first_started_ms = coalesce(first_started_ms, ?3) WHERE id = ?1",
                &[&run_id, &to.as_str(), &now],
            )?,
            RunEvent::Cancel if to == RunStatus::Stopping => update(
                "UPDATE runs SET status = ?2, pending = 'cancelled', message = coalesce(?3, message)
                 WHERE id = ?1",
                &[&run_id, &to.as_str(), &fields.message],
            )?,
            RunEvent::Stop => update(
                "UPDATE runs SET status = ?2, pending = ?3,
                    exit_code = coalesce(?4, exit_code),
                    message = coalesce(?5, message),
                    failed_rank = coalesce(?6, failed_rank)
                 WHERE id = ?1",
                &[
                    &run_id,
                    &to.as_str(),
                    &fields.pending.unwrap_or(run::Pending::Failed).as_str(),
                    &fields.exit_code,
                    &fields.message,
                    &fields.failed_rank,
                ],
            )?,
            RunEvent::Finish(_) | RunEvent::Cancel | RunEvent::Lose | RunEvent::Settle(_) => {
                update(
                    // A success says only what its own attempt said: an earlier attempt's
                    // failure message (the reason for the retry) does not outlive it.
                    "UPDATE runs SET status = ?2, finished_ms = ?3, pending = '',
                        exit_code = coalesce(?4, exit_code),
                        message = CASE WHEN ?9 THEN coalesce(?5, '') ELSE coalesce(?5, message) END,
                        outputs_digest = coalesce(?6, outputs_digest),
                        failed_rank = coalesce(?7, failed_rank),
                        outputs_error = coalesce(?8, outputs_error)
                     WHERE id = ?1",
                    &[
                        &run_id,
                        &to.as_str(),
                        &now,
                        &fields.exit_code,
                        &fields.message,
                        &fields.outputs_digest,
                        &fields.failed_rank,
                        &fields.outputs_error,
                        &(to == RunStatus::Succeeded),
                    ],
                )?
            }
        }
        tx.commit().map_err(anyhow::Error::from)?;
        let run = self
            .get_run(run_id)?
            .ok_or(TransitionError::NoSuchRun(run_id))?;
        Ok(run)
    }

    /// Records what an agent reports about a run that already ended on the coordinator's side
    /// (for example the exit code and outputs of a run that was cancelled).
    pub fn record_late_result(
        &self,
        run_id: i64,
        attempt: u32,
        exit_code: Option<i32>,
        outputs_digest: &str,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE runs SET exit_code = coalesce(exit_code, ?3),
                outputs_digest = CASE WHEN outputs_digest = '' THEN ?4 ELSE outputs_digest END
             WHERE id = ?1 AND attempt = ?2",
            params![run_id, attempt, exit_code, outputs_digest],
        )?;
        Ok(())
    }

    /// How a `stopping` run ends once its nodes have stopped (`None` for any other run).
    pub fn pending(&self, run_id: i64) -> anyhow::Result<Option<run::Pending>> {
        let pending: Option<String> = self
            .conn
            .query_row("SELECT pending FROM runs WHERE id = ?1", [run_id], |row| {
                row.get(0)
            })
            .optional()?;
        Ok(pending.as_deref().and_then(run::Pending::parse))
    }

    /// Records the latest checkpoint of one node of a run's current attempt: the next
    /// attempt's node of the same rank restores it (`checkpoint_digest` is node 0's).
    pub fn set_checkpoint(
        &self,
        run_id: i64,
        attempt: u32,
        node_rank: u32,
        digest: &str,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            r#"UPDATE runs SET node_checkpoints = json_set(node_checkpoints, '$."' || ?3 || '"', ?4),
                checkpoint_digest = CASE WHEN ?3 = 0 THEN ?4 ELSE checkpoint_digest END
             WHERE id = ?1 AND attempt = ?2"#,
            params![run_id, attempt, node_rank, digest],
        )?;
        Ok(())
    }

    /// The last checkpoint each node rank uploaded, over all attempts of the run.
    pub fn node_checkpoints(&self, run_id: i64) -> anyhow::Result<HashMap<u32, String>> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT node_checkpoints FROM runs WHERE id = ?1",
                [run_id],
                |row| row.get(0),
            )
            .optional()?;
        let map: HashMap<String, String> = json
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        Ok(map
            .into_iter()
            .filter_map(|(rank, digest)| Some((rank.parse().ok()?, digest)))
            .collect())
    }

    // ---- blobs ----

    /// Records that `reader` uploaded the bytes of `digest` (once; repeated uploads change
    /// nothing).
    pub fn add_blob_owner(
        &self,
        digest: &str,
        reader: BlobReader<'_>,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO blob_owners (digest, owner, uploaded_ms) VALUES (?1, ?2, ?3)",
            params![digest, reader.owner_key(), now_ms],
        )?;
        Ok(())
    }

    /// Whether `reader` may learn of, download or submit with the blob `digest`: they
    /// uploaded it, or it is named by a run they may see. For a user that is a run they
    /// own (`auth::User::may_access`) whose snapshot, outputs (the run's or a node's) or
    /// checkpoint (any node's) it is; for an agent, a placed run (assigned, running or
    /// stopping) of which it holds a node of the current attempt, whose snapshot or
    /// checkpoint it is: what the agent fetches to run it.
    pub fn blob_readable(&self, digest: &str, reader: BlobReader<'_>) -> anyhow::Result<bool> {
        let uploaded = self
            .conn
            .prepare_cached("SELECT 1 FROM blob_owners WHERE digest = ?1 AND owner = ?2")?
            .exists(params![digest, reader.owner_key()])?;
        if uploaded {
            return Ok(true);
        }
        let named = match reader {
            BlobReader::User(name) => self
                .conn
                .prepare_cached(
                    "SELECT 1 FROM runs r WHERE r.owner = ?2 AND (
                        r.snapshot_digest = ?1 OR r.outputs_digest = ?1
                        OR r.checkpoint_digest = ?1
                        OR EXISTS (SELECT 1 FROM json_each(r.node_checkpoints) WHERE value = ?1)
                        OR EXISTS (SELECT 1 FROM run_nodes n
                                   WHERE n.run_id = r.id AND n.outputs_digest = ?1))
                     LIMIT 1",
                )?
                .exists(params![digest, name])?,
            BlobReader::Agent(id) => self
                .conn
                .prepare_cached(
                    "SELECT 1 FROM run_nodes n JOIN runs r ON r.id = n.run_id AND r.attempt = n.attempt
                     WHERE n.agent_id = ?2 AND r.status IN ('assigned', 'running', 'stopping') AND (
                        r.snapshot_digest = ?1 OR r.checkpoint_digest = ?1
                        OR EXISTS (SELECT 1 FROM json_each(r.node_checkpoints) WHERE value = ?1))
                     LIMIT 1",
                )?
                .exists(params![digest, id])?,
        };
        Ok(named)
    }

    // ---- logs and metrics ----

    /// Stores log lines in sequence order. Lines already stored are ignored; a batch that does
    /// not continue the stored sequence (a gap: an earlier batch was lost with a connection)
    /// is not stored at all, so an attempt's stored lines are always 1..=N with no hole and
    /// in cursor order. Returns N, the highest sequence number stored for the attempt: the
    /// agent resends everything after it.
    pub fn append_logs(
        &mut self,
        run_id: i64,
        attempt: u32,
        node: u32,
        lines: &[v1::LogLine],
    ) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        let stored = max_seq(&tx, "logs", run_id, attempt, node)?;
        let Some(lines) = continuing(lines, stored, |l| l.seq) else {
            return Ok(stored);
        };
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO logs (run_id, attempt, node, seq, stream, time_ms, text, rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for line in lines {
                stmt.execute(params![
                    run_id,
                    attempt,
                    node,
                    line.seq as i64,
                    line.stream,
                    line.time_unix_ms,
                    line.text,
                    line.rank
                ])?;
            }
        }
        let max = max_seq(&tx, "logs", run_id, attempt, node)?;
        tx.commit()?;
        Ok(max)
    }

    /// Lines after `after_cursor`, in cursor order; with `rank`, only that rank's lines.
    pub fn read_logs(
        &self,
        run_id: i64,
        after_cursor: i64,
        limit: u32,
        rank: Option<u32>,
    ) -> anyhow::Result<Vec<v1::LogLine>> {
        let page = self.read_logs_page(run_id, after_cursor, rank, usize::MAX, limit as usize)?;
        Ok(page.items)
    }

    /// Like [`Store::read_logs`], one page of at most `max_bytes` and `max_lines`, read
    /// lazily.
    pub fn read_logs_page(
        &self,
        run_id: i64,
        after_cursor: i64,
        rank: Option<u32>,
        max_bytes: usize,
        max_lines: usize,
    ) -> anyhow::Result<Page<v1::LogLine>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT cursor, attempt, seq, stream, time_ms, text, rank, node FROM logs
             WHERE run_id = ?1 AND cursor > ?2 AND (?3 IS NULL OR rank = ?3)
             ORDER BY cursor",
        )?;
        let lines = stmt.query_map(params![run_id, after_cursor, rank], |row| {
            Ok(v1::LogLine {
                cursor: row.get(0)?,
                attempt: row.get(1)?,
                seq: row.get::<_, i64>(2)? as u64,
                stream: row.get(3)?,
                time_unix_ms: row.get(4)?,
                text: row.get(5)?,
                rank: row.get(6)?,
                node: row.get(7)?,
            })
        })?;
        Ok(page::fill(lines, max_bytes, max_lines)?)
    }

    /// Stores metric points with the same sequence rules as [`Store::append_logs`].
    pub fn append_metrics(
        &mut self,
        run_id: i64,
        attempt: u32,
        node: u32,
        points: &[v1::MetricPoint],
    ) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        let stored = max_seq(&tx, "metrics", run_id, attempt, node)?;
        let Some(points) = continuing(points, stored, |p| p.seq) else {
            return Ok(stored);
        };
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO metrics (run_id, attempt, node, seq, name, value, step, time_ms, rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for point in points {
                stmt.execute(params![
                    run_id,
                    attempt,
                    node,
                    point.seq as i64,
                    point.name,
                    point.value,
                    point.step,
                    point.time_unix_ms,
                    point.rank
                ])?;
            }
        }
        let max = max_seq(&tx, "metrics", run_id, attempt, node)?;
        tx.commit()?;
        Ok(max)
    }

    /// One row per metric name: the last value and step (by arrival), and the point count.
    /// With `rank`, only the points that rank reported.
    pub fn metric_summaries(
        &self,
        run_id: i64,
        rank: Option<u32>,
    ) -> anyhow::Result<Vec<v1::MetricSummary>> {
        let page = self.metric_summaries_page(run_id, rank, None, usize::MAX)?;
        Ok(page.items)
    }

    /// Like [`Store::metric_summaries`], one page of at most `max_bytes`, of the names after
    /// `after_name` when given.
    pub fn metric_summaries_page(
        &self,
        run_id: i64,
        rank: Option<u32>,
        after_name: Option<&str>,
        max_bytes: usize,
    ) -> anyhow::Result<Page<v1::MetricSummary>> {
        // SQLite takes the bare columns of an aggregate query from the row that gave max().
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, value, step, max(id), count(*) FROM metrics
             WHERE run_id = ?1 AND (?2 IS NULL OR rank = ?2) AND (?3 IS NULL OR name > ?3)
             GROUP BY name ORDER BY name",
        )?;
        let summaries = stmt.query_map(params![run_id, rank, after_name], |row| {
            Ok(v1::MetricSummary {
                name: row.get(0)?,
                last_value: row.get(1)?,
                last_step: row.get(2)?,
                count: row.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(page::fill(summaries, max_bytes, usize::MAX)?)
    }

    /// One page of the points of metric `name` (of `rank`, when given) after store position
    /// `after_id`, oldest first, at most `max_bytes`.
    pub fn metric_points_page(
        &self,
        run_id: i64,
        name: &str,
        rank: Option<u32>,
        after_id: i64,
        max_bytes: usize,
    ) -> anyhow::Result<Page<v1::MetricPoint>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, seq, value, step, time_ms, rank FROM metrics
             WHERE run_id = ?1 AND name = ?2 AND (?3 IS NULL OR rank = ?3) AND id > ?4
             ORDER BY id",
        )?;
        let points = stmt.query_map(params![run_id, name, rank, after_id], |row| {
            Ok(v1::MetricPoint {
                cursor: row.get(0)?,
                seq: row.get::<_, i64>(1)? as u64,
                name: name.to_string(),
                value: row.get(2)?,
                step: row.get(3)?,
                time_unix_ms: row.get(4)?,
                rank: row.get(5)?,
            })
        })?;
        Ok(page::fill(points, max_bytes, usize::MAX)?)
    }

    // ---- join tokens ----
    // A join token is "ID.SECRET"; only the SHA-256 of the secret is stored, and it is
    // compared in constant time. `kiln-agent join` consumes one use (see `join.rs`).

    pub fn insert_join_token(&self, token: &NewJoinToken) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO join_tokens (id, secret_sha256, target, uses_left, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                &token.secret_sha256[..],
                token.target,
                token.uses,
                token.expires_ms,
                token.now_ms
            ],
        )?;
        Ok(())
    }

    /// Checks a presented token and, if it is good for `target`, consumes one use; the check
    /// and the update are one (immediate) transaction, so two joins never share a last use.
    /// An unknown id and a wrong secret are the same error.
    pub fn consume_join_token(
        &mut self,
        id: &str,
        secret_sha256: &[u8; 32],
        target: &str,
        now_ms: i64,
    ) -> Result<JoinTokenRow, JoinTokenError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(anyhow::Error::from)?;
        let row = consume_join_token_in(&tx, id, secret_sha256, target, now_ms)?;
        tx.commit().map_err(anyhow::Error::from)?;
        Ok(row)
    }

    /// Every join token, newest first (secrets are never read back).
    pub fn list_join_tokens(&self) -> anyhow::Result<Vec<JoinTokenRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, target, uses_left, expires_ms, created_ms, last_used_ms
             FROM join_tokens ORDER BY created_ms DESC, id",
        )?;
        let rows = stmt
            .query_map([], |row| {
                Ok(JoinTokenRow {
                    id: row.get(0)?,
                    target: row.get(1)?,
                    uses_left: row.get(2)?,
                    expires_ms: row.get(3)?,
                    created_ms: row.get(4)?,
                    last_used_ms: row.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes a join token; false when there was none with that id.
    pub fn revoke_join_token(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM join_tokens WHERE id = ?1", [id])?
            > 0)
    }

    /// Spends one use of a join token and creates the agent identity it pays for, in one
    /// (immediate) transaction: a token use never exists without its agent, nor an agent
    /// without a token use.
    pub fn enroll_agent(
        &mut self,
        token: (&str, &[u8; 32]),
        target: &str,
        identity: &NewIdentity,
    ) -> Result<JoinTokenRow, JoinTokenError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(anyhow::Error::from)?;
        let row = consume_join_token_in(&tx, token.0, token.1, target, identity.now_ms)?;
        tx.execute(
            "INSERT INTO agent_identities (agent_id, target, hostname, join_token_id, enrolled_ms,
                cert_not_after_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                identity.agent_id,
                target,
                identity.hostname,
                token.0,
                identity.now_ms,
                identity.cert_not_after_ms
            ],
        )
        .map_err(anyhow::Error::from)?;
        tx.commit().map_err(anyhow::Error::from)?;
        Ok(row)
    }

    /// An enrolled agent's identity, if it was ever enrolled.
    pub fn agent_identity(&self, agent_id: &str) -> anyhow::Result<Option<IdentityRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT agent_id, target, hostname, cert_not_after_ms, revoked_ms
                 FROM agent_identities WHERE agent_id = ?1",
                [agent_id],
                |row| {
                    Ok(IdentityRow {
                        agent_id: row.get(0)?,
                        target: row.get(1)?,
                        hostname: row.get(2)?,
                        cert_not_after_ms: row.get(3)?,
                        revoked_ms: row.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records a renewed certificate's expiry.
    pub fn renewed_identity(&self, agent_id: &str, not_after_ms: i64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE agent_identities SET cert_not_after_ms = ?2 WHERE agent_id = ?1",
            params![agent_id, not_after_ms],
        )?;
        Ok(())
    }

    /// Marks an agent revoked (its certificate is refused from now on); false when it was
    /// already revoked. An agent known only from an unauthenticated session (no identity)
    /// gets a revoked identity row all the same.
    pub fn revoke_agent(&self, agent_id: &str, target: &str, now_ms: i64) -> anyhow::Result<bool> {
        let changed = self.conn.execute(
            "INSERT INTO agent_identities (agent_id, target, hostname, join_token_id, enrolled_ms,
                cert_not_after_ms, revoked_ms) VALUES (?1, ?2, '', '', ?3, 0, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET revoked_ms = ?3 WHERE revoked_ms IS NULL",
            params![agent_id, target, now_ms],
        )?;
        self.conn.execute(
            "UPDATE agents SET state = 'revoked' WHERE id = ?1",
            [agent_id],
        )?;
        Ok(changed > 0)
    }

    /// Removes an agent's row (`kiln agents forget`); its past runs keep its id.
    pub fn forget_agent(&self, agent_id: &str) -> anyhow::Result<()> {
        self.conn
            .execute("DELETE FROM agents WHERE id = ?1", [agent_id])?;
        Ok(())
    }

    // ---- users ----
    // One API token per user, "ID.SECRET" like a join token: the id finds the row, the
    // SHA-256 of the secret is compared in constant time.

    pub fn insert_user(&self, user: &NewUser) -> anyhow::Result<()> {
        let result = self.conn.execute(
            "INSERT INTO users (name, role, token_id, token_sha256, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                user.name,
                user.role.as_str(),
                user.token_id,
                &user.token_sha256[..],
                user.now_ms
            ],
        );
        match result {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                anyhow::bail!(
                    "user `{}` already exists: `user token {}` gives it a new token",
                    user.name,
                    user.name
                )
            }
            other => {
                other?;
                Ok(())
            }
        }
    }

    /// Replaces a user's token (the old one stops working); false when there is no such user.
    pub fn replace_user_token(
        &self,
        name: &str,
        token_id: &str,
        token_sha256: &[u8; 32],
    ) -> anyhow::Result<bool> {
        Ok(self.conn.execute(
            "UPDATE users SET token_id = ?2, token_sha256 = ?3 WHERE name = ?1",
            params![name, token_id, &token_sha256[..]],
        )? > 0)
    }

    pub fn delete_user(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", [name])?
            > 0)
    }

    pub fn list_users(&self) -> anyhow::Result<Vec<UserRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM users ORDER BY name",
            UserRow::COLUMNS
        ))?;
        let rows = stmt
            .query_map([], UserRow::from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The user a presented API token belongs to; None for an unknown id or a wrong secret
    /// (the same answer, so that ids cannot be probed).
    pub fn user_by_token(
        &self,
        token_id: &str,
        secret_sha256: &[u8; 32],
        now_ms: i64,
    ) -> anyhow::Result<Option<UserRow>> {
        use subtle::ConstantTimeEq as _;
        let found = self
            .conn
            .query_row(
                &format!(
                    "SELECT {}, token_sha256 FROM users WHERE token_id = ?1",
                    UserRow::COLUMNS
                ),
                [token_id],
                |row| {
                    Ok((
                        UserRow::from_row(row)?,
                        row.get::<_, Vec<u8>>(UserRow::N_COLUMNS)?,
                    ))
                },
            )
            .optional()?;
        let Some((user, stored)) = found else {
            return Ok(None);
        };
        if !bool::from(stored.as_slice().ct_eq(&secret_sha256[..])) {
            return Ok(None);
        }
        // Last use to the minute: enough for `user list`, and no write per call.
        if user.last_used_ms.is_none_or(|t| now_ms - t > 60_000) {
            self.conn.execute(
                "UPDATE users SET last_used_ms = ?2 WHERE name = ?1",
                params![user.name, now_ms],
            )?;
        }
        Ok(Some(user))
    }
}

/// The check and the spending of one use of a join token, inside the caller's transaction.
/// An unknown id and a wrong secret are the same error.
fn consume_join_token_in(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    secret_sha256: &[u8; 32],
    target: &str,
    now_ms: i64,
) -> Result<JoinTokenRow, JoinTokenError> {
    use subtle::ConstantTimeEq as _;
    let found = tx
        .query_row(
            "SELECT secret_sha256, target, uses_left, expires_ms, created_ms, last_used_ms
             FROM join_tokens WHERE id = ?1",
            [id],
            |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    JoinTokenRow {
                        id: id.to_string(),
                        target: row.get(1)?,
                        uses_left: row.get(2)?,
                        expires_ms: row.get(3)?,
                        created_ms: row.get(4)?,
                        last_used_ms: row.get(5)?,
                    },
                ))
            },
        )
        .optional()
        .map_err(anyhow::Error::from)?;
    let Some((stored, mut row)) = found else {
        return Err(JoinTokenError::Unknown);
    };
    if !bool::from(stored.as_slice().ct_eq(&secret_sha256[..])) {
        return Err(JoinTokenError::Unknown);
    }
    if row.expires_ms <= now_ms {
        return Err(JoinTokenError::Expired);
    }
    if row.uses_left == 0 {
        return Err(JoinTokenError::UsedUp);
    }
    if row.target != target {
        return Err(JoinTokenError::OtherTarget(row.target));
    }
    tx.execute(
        "UPDATE join_tokens SET uses_left = uses_left - 1, last_used_ms = ?2 WHERE id = ?1",
        params![id, now_ms],
    )
    .map_err(anyhow::Error::from)?;
    row.uses_left -= 1;
    row.last_used_ms = Some(now_ms);
    Ok(row)
}

/// What [`Store::enroll_agent`] creates with a token use.
pub struct NewIdentity<'a> {
    pub agent_id: &'a str,
    pub hostname: &'a str,
    pub cert_not_after_ms: i64,
    pub now_ms: i64,
}

#[derive(Debug, Clone)]
pub struct IdentityRow {
    pub agent_id: String,
    pub target: String,
    pub hostname: String,
    pub cert_not_after_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// What a user may do: members submit, view and cancel their own runs; admins everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

pub struct NewUser<'a> {
    pub name: &'a str,
    pub role: Role,
    pub token_id: &'a str,
    pub token_sha256: [u8; 32],
    pub now_ms: i64,
}

#[derive(Debug, Clone)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
    /// Most runs this user may have queued; `None`: the coordinator's max_queued_per_user.
    pub max_queued: Option<u32>,
}

impl UserRow {
    /// The columns `from_row` reads, in its order.
    const COLUMNS: &'static str = "name, role, created_ms, last_used_ms, max_queued";
    /// How many columns [`UserRow::COLUMNS`] names: a query's next column is at this index.
    const N_COLUMNS: usize = 5;

    /// A role this coordinator does not know reads as the least privileged one.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
        Ok(UserRow {
            name: row.get(0)?,
            role: Role::parse(&row.get::<_, String>(1)?).unwrap_or(Role::Member),
            created_ms: row.get(2)?,
            last_used_ms: row.get(3)?,
            max_queued: row.get(4)?,
        })
    }
}

// ---- join tokens ----

/// A join token as `token create` stores it.
pub struct NewJoinToken<'a> {
    pub id: &'a str,
    pub secret_sha256: [u8; 32],
    pub target: &'a str,
    pub uses: u32,
    pub expires_ms: i64,
    pub now_ms: i64,
}

/// A stored join token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    pub id: String,
    pub target: String,
    pub uses_left: u32,
    pub expires_ms: i64,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
}

/// Why a presented join token was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    #[error("the join token is not valid (unknown, revoked or mistyped)")]
    Unknown,
    #[error("the join token has expired: create a new one with `kiln-coordinator token create`")]
    Expired,
    #[error(
        "the join token has no uses left: create a new one with `kiln-coordinator token create`"
    )]
    UsedUp,
    #[error("the join token is for target `{0}`, not this one")]
    OtherTarget(String),
    #[error(transparent)]
    Db(#[from] anyhow::Error),
}

/// The highest sequence number stored in `table` ("logs" or "metrics") for a node of an
/// attempt.
fn max_seq(
    tx: &rusqlite::Transaction,
    table: &str,
    run_id: i64,
    attempt: u32,
    node: u32,
) -> anyhow::Result<u64> {
    let sql =
        format!("SELECT max(seq) FROM {table} WHERE run_id = ?1 AND attempt = ?2 AND node = ?3");
    let max: Option<i64> = tx.query_row(&sql, params![run_id, attempt, node], |row| row.get(0))?;
    Ok(max.unwrap_or(0) as u64)
}

/// The part of a batch (in sequence order) that continues a stored sequence ending at
/// `stored`: items already stored are skipped; `None` if the rest does not start at
/// `stored + 1` or is not contiguous (storing it would leave a hole).
fn continuing<T>(items: &[T], stored: u64, seq: impl Fn(&T) -> u64) -> Option<&[T]> {
    let start = items.iter().position(|item| seq(item) > stored)?;
    let rest = &items[start..];
    let contiguous = rest
        .iter()
        .enumerate()
        .all(|(i, item)| seq(item) == stored + 1 + i as u64);
    contiguous.then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::run::Outcome;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        store.ensure_target("cpu", 0).unwrap();
        (dir, store)
    }

    fn submit(store: &Store) -> v1::Run {
        store
            .insert_run(&NewRun {
                name: "n",
                target: "cpu",
                snapshot_digest: "sha256:00",
                script: "train.py",
                args: &["--lr".into(), "0.1".into()],
                max_retries: 0,
                checkpoint_interval_s: 0,
                gang: GangSpec::default(),
                environment: None,
                resources: None,
                env: &HashMap::new(),
                timeout_s: 0,
                owner: "ana",
                now_ms: 1,
            })
            .unwrap()
    }

    #[test]
    fn a_blob_is_readable_by_its_uploaders_and_through_the_runs_that_name_it() {
        let (_dir, mut store) = store();
        store.ensure_target("cpu", 0).unwrap();
        let (ana, bo) = (BlobReader::User("ana"), BlobReader::User("bo"));
        let (ag1, ag2) = (BlobReader::Agent("ag-1"), BlobReader::Agent("ag-2"));
        let readable =
            |store: &Store, digest: &str, reader| store.blob_readable(digest, reader).unwrap();
        // The uploader, and nobody else.
        store.add_blob_owner("sha256:up", bo, 1).unwrap();
        store.add_blob_owner("sha256:up", bo, 2).unwrap();
        assert!(readable(&store, "sha256:up", bo));
        assert!(!readable(&store, "sha256:up", ana));
        assert!(!readable(&store, "sha256:up", BlobReader::Agent("bo")));
        // A run's snapshot: its owner, and the agent holding it while it is placed.
        let run = submit(&store);
        assert!(readable(&store, "sha256:00", ana));
        assert!(!readable(&store, "sha256:00", bo));
        assert!(!readable(&store, "sha256:00", ag1), "not placed yet");
        let placed = EventFields {
            placement: &["ag-1".to_string()],
            now_ms: 2,
            ..Default::default()
        };
        store
            .transition(run.id, None, RunEvent::Assign, &placed)
            .unwrap();
        store.set_checkpoint(run.id, 1, 0, "sha256:ck").unwrap();
        for digest in ["sha256:00", "sha256:ck"] {
            assert!(readable(&store, digest, ag1), "{digest}");
            assert!(!readable(&store, digest, ag2), "{digest}");
            assert!(readable(&store, digest, ana), "{digest}");
            assert!(!readable(&store, digest, bo), "{digest}");
        }
        // Outputs, the run's and a node's: its owner; the agent only what it uploaded.
        store
            .node_exited(run.id, 1, 0, Some(0), "sha256:node-out")
            .unwrap();
        let done = EventFields {
            exit_code: Some(0),
            outputs_digest: Some("sha256:out"),
            now_ms: 3,
            ..Default::default()
        };
        store
            .transition(run.id, Some(1), RunEvent::Start, &done)
            .unwrap();
        store
            .transition(run.id, Some(1), RunEvent::Finish(Outcome::Succeeded), &done)
            .unwrap();
        for digest in ["sha256:out", "sha256:node-out", "sha256:00", "sha256:ck"] {
            assert!(readable(&store, digest, ana), "{digest}");
            assert!(!readable(&store, digest, bo), "{digest}");
            assert!(!readable(&store, digest, ag1), "{digest}: the run ended");
        }
    }

    #[test]
    fn a_run_moves_through_its_life_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let run_id = {
            let mut store = Store::open(&path).unwrap();
            store.ensure_target("cpu", 0).unwrap();
            let run = submit(&store);
            assert_eq!(run.args, vec!["--lr", "0.1"]);
            let fields = EventFields {
                placement: &["ag-1".to_string()],
                now_ms: 2,
                ..Default::default()
            };
            let run = store
                .transition(run.id, None, RunEvent::Assign, &fields)
                .unwrap();
            assert_eq!((run.attempt, run.agent_id.as_str()), (1, "ag-1"));
            // A stale attempt is fenced off.
            assert!(
                store
                    .transition(run.id, Some(0), RunEvent::Start, &fields)
                    .is_err()
            );
            store
                .transition(run.id, Some(1), RunEvent::Start, &fields)
                .unwrap();
            let done = EventFields {
                exit_code: Some(3),
                now_ms: 5,
                ..Default::default()
            };
            store
                .transition(run.id, Some(1), RunEvent::Finish(Outcome::Failed), &done)
                .unwrap();
            run.id
        };
        let store = Store::open(&path).unwrap();
        let run = store.get_run(run_id).unwrap().unwrap();
        assert_eq!(run.status(), v1::RunStatus::Failed);
        assert_eq!(run.exit_code, Some(3));
        assert_eq!(
            (run.started_unix_ms, run.finished_unix_ms),
            (Some(2), Some(5))
        );
    }

    #[test]
    fn a_gang_holds_a_slot_on_every_node_and_each_node_has_its_own_log_sequence() {
        let (_dir, mut store) = store();
        let run = store
            .insert_run(&NewRun {
                name: "ddp",
                target: "cpu",
                snapshot_digest: "sha256:00",
                script: "train.py",
                args: &[],
                max_retries: 0,
                checkpoint_interval_s: 0,
                gang: GangSpec {
                    nodes: 2,
                    procs_per_node: 4,
                    max_restarts: 1,
                    ..GangSpec::default()
                },
                environment: None,
                resources: None,
                env: &HashMap::new(),
                timeout_s: 0,
                owner: "",
                now_ms: 1,
            })
            .unwrap();
        assert!(is_gang(&run));
        let placement = ["ag-a".to_string(), "ag-b".to_string()];
        let fields = EventFields {
            placement: &placement,
            now_ms: 2,
            ..Default::default()
        };
        let run = store
            .transition(run.id, None, RunEvent::Assign, &fields)
            .unwrap();
        assert_eq!(
            run.placement
                .iter()
                .map(|n| (n.node_rank, n.agent_id.as_str()))
                .collect::<Vec<_>>(),
            [(0, "ag-a"), (1, "ag-b")]
        );
        let per_agent = store.active_runs_per_agent().unwrap();
        assert_eq!((per_agent["ag-a"], per_agent["ag-b"]), (1, 1));
        assert_eq!(store.active_runs_of_agent("ag-b").unwrap().len(), 1);
        assert_eq!(store.node_of(run.id, 1, "ag-b").unwrap(), Some(1));
        assert_eq!(store.node_of(run.id, 1, "ag-c").unwrap(), None);
        // Both nodes number their lines from 1; neither hides the other's.
        let line = |seq: u64, rank: u32| v1::LogLine {
            seq,
            rank: Some(rank),
            text: format!("rank {rank} line {seq}"),
            ..Default::default()
        };
        assert_eq!(
            store
                .append_logs(run.id, 1, 0, &[line(1, 0), line(2, 1)])
                .unwrap(),
            2
        );
        assert_eq!(store.append_logs(run.id, 1, 1, &[line(1, 4)]).unwrap(), 1);
        assert_eq!(store.read_logs(run.id, 0, 100, None).unwrap().len(), 3);
        let rank4 = store.read_logs(run.id, 0, 100, Some(4)).unwrap();
        assert_eq!(rank4.len(), 1);
        assert_eq!(
            (rank4[0].text.as_str(), rank4[0].node),
            ("rank 4 line 1", 1)
        );
        // A restart frees both nodes and counts the restart.
        store
            .transition(run.id, Some(1), RunEvent::Start, &fields)
            .unwrap();
        let run = store
            .transition(run.id, Some(1), RunEvent::Retry, &fields)
            .unwrap();
        assert_eq!((run.status(), run.restarts), (v1::RunStatus::Queued, 1));
        assert!(store.active_runs_per_agent().unwrap().is_empty());
    }

    #[test]
    fn a_stopping_gang_holds_its_nodes_until_it_settles_and_keeps_each_nodes_results() {
        let (_dir, mut store) = store();
        let run = store
            .insert_run(&NewRun {
                name: "ddp",
                target: "cpu",
                snapshot_digest: "sha256:00",
                script: "train.py",
                args: &[],
                max_retries: 0,
                checkpoint_interval_s: 1,
                gang: GangSpec {
                    nodes: 2,
                    max_restarts: 1,
                    ..GangSpec::default()
                },
                environment: None,
                resources: None,
                env: &HashMap::new(),
                timeout_s: 0,
                owner: "",
                now_ms: 1,
            })
            .unwrap();
        let placement = ["ag-a".to_string(), "ag-b".to_string()];
        let fields = EventFields {
            placement: &placement,
            now_ms: 2,
            ..Default::default()
        };
        store
            .transition(run.id, None, RunEvent::Assign, &fields)
            .unwrap();
        store
            .transition(run.id, Some(1), RunEvent::Start, &fields)
            .unwrap();
        // Each node's checkpoint is kept for its own rank.
        store.set_checkpoint(run.id, 1, 0, "sha256:c0").unwrap();
        store.set_checkpoint(run.id, 1, 1, "sha256:c1").unwrap();
        let checkpoints = store.node_checkpoints(run.id).unwrap();
        assert_eq!(
            (checkpoints[&0].as_str(), checkpoints[&1].as_str()),
            ("sha256:c0", "sha256:c1")
        );
        // Node 1 fails: the run stops, still holding both agents, until node 0 reports.
        store
            .node_exited(run.id, 1, 1, Some(3), "sha256:o1")
            .unwrap();
        let stop = EventFields {
            pending: Some(run::Pending::Retry),
            message: Some("rank 1 failed"),
            now_ms: 3,
            ..Default::default()
        };
        let run = store
            .transition(run.id, Some(1), RunEvent::Stop, &stop)
            .unwrap();
        assert_eq!(run.status(), v1::RunStatus::Stopping);
        assert_eq!(store.pending(run.id).unwrap(), Some(run::Pending::Retry));
        assert_eq!(store.active_runs_per_agent().unwrap().len(), 2);
        store
            .node_exited(run.id, 1, 0, Some(143), "sha256:o0")
            .unwrap();
        let run = store
            .transition(
                run.id,
                Some(1),
                RunEvent::Settle(run::Pending::Retry),
                &stop,
            )
            .unwrap();
        assert_eq!((run.status(), run.restarts), (v1::RunStatus::Queued, 1));
        assert_eq!(store.pending(run.id).unwrap(), None);
        assert!(store.active_runs_per_agent().unwrap().is_empty());
        // The next attempt fails for good: the run keeps every node's outputs.
        store
            .transition(run.id, None, RunEvent::Assign, &fields)
            .unwrap();
        store
            .node_exited(run.id, 2, 0, Some(0), "sha256:p0")
            .unwrap();
        store.node_exited(run.id, 2, 1, Some(1), "").unwrap();
        let stop = EventFields {
            pending: Some(run::Pending::Failed),
            now_ms: 4,
            ..Default::default()
        };
        store
            .transition(run.id, Some(2), RunEvent::Stop, &stop)
            .unwrap();
        let run = store
            .transition(
                run.id,
                Some(2),
                RunEvent::Settle(run::Pending::Failed),
                &stop,
            )
            .unwrap();
        assert_eq!(run.status(), v1::RunStatus::Failed);
        assert_eq!(run.node_outputs_digests, ["sha256:p0", ""]);
    }

    #[test]
    fn processes_opening_a_new_database_at_once_migrate_it_once() {
        // The packaged service and `kiln-coordinator user create` may open a
        // database that does not exist yet at the same moment.
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kiln.db");
            let opened = {
                let path = path.clone();
                crate::at_once(4, move || {
                    Store::open(&path).map(|_| ()).map_err(|e| format!("{e:#}"))
                })
            };
            for result in opened {
                result.unwrap();
            }
            let store = Store::open(&path).unwrap();
            let version: usize = store
                .conn
                .query_row("PRAGMA user_version", [], |row| row.get(0))
                .unwrap();
            assert_eq!(version, MIGRATIONS.len());
        }
    }

    #[test]
    fn a_database_from_before_gangs_keeps_its_placed_runs_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            // The schema as the previous release left it, with one running run.
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 4).unwrap();
            conn.execute_batch(
                "INSERT INTO targets VALUES ('cpu', 0);
                 INSERT INTO runs (name, target, status, agent_id, attempt, snapshot_digest,
                    script, args, created_ms)
                 VALUES ('old', 'cpu', 'running', 'ag-1', 1, 'sha256:00', 'a.py', '[]', 0);
                 INSERT INTO logs (run_id, attempt, seq, stream, time_ms, text)
                 VALUES (1, 1, 1, 1, 0, 'before the upgrade');",
            )
            .unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.node_of(1, 1, "ag-1").unwrap(), Some(0));
        assert_eq!(store.active_runs_of_agent("ag-1").unwrap().len(), 1);
        let line = v1::LogLine {
            seq: 2,
            text: "after".into(),
            ..Default::default()
        };
        assert_eq!(store.append_logs(1, 1, 0, &[line]).unwrap(), 2);
        let texts: Vec<_> = store
            .read_logs(1, 0, 10, None)
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(texts, ["before the upgrade", "after"]);
    }

    #[test]
    fn repeated_log_lines_are_stored_once() {
        let (_dir, mut store) = store();
        let run = submit(&store);
        let line = |seq: u64| v1::LogLine {
            seq,
            text: format!("line {seq}"),
            ..Default::default()
        };
        assert_eq!(
            store
                .append_logs(run.id, 1, 0, &[line(1), line(2)])
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .append_logs(run.id, 1, 0, &[line(2), line(3)])
                .unwrap(),
            3
        );
        let texts: Vec<_> = store
            .read_logs(run.id, 0, 100, None)
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(texts, ["line 1", "line 2", "line 3"]);
    }

    #[test]
    fn a_batch_after_a_gap_is_refused_until_the_gap_is_filled() {
        let (_dir, mut store) = store();
        let run = submit(&store);
        let line = |seq: u64| v1::LogLine {
            seq,
            text: format!("line {seq}"),
            ..Default::default()
        };
        assert_eq!(
            store
                .append_logs(run.id, 1, 0, &[line(1), line(2)])
                .unwrap(),
            2
        );
        // Lines 3-4 were lost with a connection; 5-6 arrive first and are refused.
        assert_eq!(
            store
                .append_logs(run.id, 1, 0, &[line(5), line(6)])
                .unwrap(),
            2
        );
        // The agent resends from 3 (with 2 again, already stored): all is stored in order.
        let resent: Vec<_> = (2..=6).map(line).collect();
        assert_eq!(store.append_logs(run.id, 1, 0, &resent).unwrap(), 6);
        let texts: Vec<_> = store
            .read_logs(run.id, 0, 100, None)
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(
            texts,
            (1..=6).map(|i| format!("line {i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn metric_summary_keeps_the_last_point() {
        let (_dir, mut store) = store();
        let run = submit(&store);
        let point = |seq: u64, name: &str, value: f64| v1::MetricPoint {
            seq,
            name: name.into(),
            value,
            step: Some(seq as i64),
            time_unix_ms: 0,
            rank: None,
            cursor: 0,
        };
        store
            .append_metrics(
                run.id,
                1,
                0,
                &[
                    point(1, "loss", 0.9),
                    point(2, "acc", 0.5),
                    point(3, "loss", 0.4),
                ],
            )
            .unwrap();
        let summaries = store.metric_summaries(run.id, None).unwrap();
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[1].name, "loss");
        assert_eq!(
            (
                summaries[1].last_value,
                summaries[1].last_step,
                summaries[1].count
            ),
            (0.4, Some(3), 2)
        );
    }
}

#[cfg(test)]
mod join_token_tests {
    use super::*;

    fn store_with_token(uses: u32) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        store
            .insert_join_token(&NewJoinToken {
                id: "t1",
                secret_sha256: [7; 32],
                target: "gpu",
                uses,
                expires_ms: 1_000,
                now_ms: 10,
            })
            .unwrap();
        (dir, store)
    }

    #[test]
    fn a_token_is_good_for_its_uses_its_target_and_its_lifetime_only() {
        let (_dir, mut store) = store_with_token(2);
        let row = store.consume_join_token("t1", &[7; 32], "gpu", 20).unwrap();
        assert_eq!((row.uses_left, row.last_used_ms), (1, Some(20)));
        let check = |result: Result<JoinTokenRow, JoinTokenError>, expected: &str| {
            let error = result.unwrap_err();
            assert_eq!(format!("{error:?}"), expected, "{error}");
        };
        check(
            store.consume_join_token("t1", &[8; 32], "gpu", 30),
            "Unknown",
        );
        check(
            store.consume_join_token("t2", &[7; 32], "gpu", 30),
            "Unknown",
        );
        check(
            store.consume_join_token("t1", &[7; 32], "cpu", 30),
            "OtherTarget(\"gpu\")",
        );
        check(
            store.consume_join_token("t1", &[7; 32], "gpu", 1_000),
            "Expired",
        );
        // Refusals consumed nothing: the second use is still there, and then none.
        assert_eq!(
            store
                .consume_join_token("t1", &[7; 32], "gpu", 40)
                .unwrap()
                .uses_left,
            0
        );
        check(
            store.consume_join_token("t1", &[7; 32], "gpu", 50),
            "UsedUp",
        );
        assert_eq!(store.list_join_tokens().unwrap()[0].last_used_ms, Some(40));
    }

    #[test]
    fn a_revoked_token_is_unknown() {
        let (_dir, mut store) = store_with_token(5);
        assert!(store.revoke_join_token("t1").unwrap());
        assert!(!store.revoke_join_token("t1").unwrap());
        assert!(matches!(
            store.consume_join_token("t1", &[7; 32], "gpu", 20),
            Err(JoinTokenError::Unknown)
        ));
        assert!(store.list_join_tokens().unwrap().is_empty());
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        (dir, store)
    }

    fn token(store: &Store, id: &str, uses: u32) {
        store
            .insert_join_token(&NewJoinToken {
                id,
                secret_sha256: [7; 32],
                target: "gpu",
                uses,
                expires_ms: 1_000,
                now_ms: 10,
            })
            .unwrap();
    }

    fn identity(agent_id: &str) -> NewIdentity<'_> {
        NewIdentity {
            agent_id,
            hostname: "h",
            cert_not_after_ms: 5_000,
            now_ms: 20,
        }
    }

    #[test]
    fn enrolling_spends_a_use_and_creates_the_identity_together_or_not_at_all() {
        let (_dir, mut store) = store();
        token(&store, "t1", 1);
        let row = store
            .enroll_agent(("t1", &[7; 32]), "gpu", &identity("a-1"))
            .unwrap();
        assert_eq!(row.uses_left, 0);
        let found = store.agent_identity("a-1").unwrap().unwrap();
        assert_eq!((found.target.as_str(), found.revoked_ms), ("gpu", None));
        // The used-up token creates nothing.
        assert!(matches!(
            store.enroll_agent(("t1", &[7; 32]), "gpu", &identity("a-2")),
            Err(JoinTokenError::UsedUp)
        ));
        assert!(store.agent_identity("a-2").unwrap().is_none());
        // A failed insert (same agent id) spends nothing.
        token(&store, "t2", 2);
        assert!(matches!(
            store.enroll_agent(("t2", &[7; 32]), "gpu", &identity("a-1")),
            Err(JoinTokenError::Db(_))
        ));
        assert_eq!(
            store
                .list_join_tokens()
                .unwrap()
                .iter()
                .find(|t| t.id == "t2")
                .unwrap()
                .uses_left,
            2
        );
    }

    #[test]
    fn revoking_is_recorded_once_and_marks_the_agent() {
        let (_dir, mut store) = store();
        token(&store, "t1", 1);
        store
            .enroll_agent(("t1", &[7; 32]), "gpu", &identity("a-1"))
            .unwrap();
        store
            .upsert_agent("a-1", "gpu", &v1::HostInfo::default(), 1, 30)
            .unwrap();
        assert!(store.revoke_agent("a-1", "gpu", 40).unwrap());
        assert!(!store.revoke_agent("a-1", "gpu", 50).unwrap());
        assert_eq!(
            store.agent_identity("a-1").unwrap().unwrap().revoked_ms,
            Some(40)
        );
        assert_eq!(store.list_agents().unwrap()[0].state, "revoked");
        // An agent that never enrolled (an --insecure coordinator) can be revoked too.
        assert!(store.revoke_agent("ag-old", "gpu", 60).unwrap());
        assert!(
            store
                .agent_identity("ag-old")
                .unwrap()
                .unwrap()
                .revoked_ms
                .is_some()
        );
    }

    #[test]
    fn users_are_found_by_token_id_and_secret_hash_only() {
        let (_dir, store) = store();
        let new = |name, token_id, hash| NewUser {
            name,
            role: Role::Member,
            token_id,
            token_sha256: hash,
            now_ms: 1,
        };
        store.insert_user(&new("ana", "i1", [1; 32])).unwrap();
        let error = store.insert_user(&new("ana", "i2", [2; 32])).unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
        assert_eq!(
            store
                .user_by_token("i1", &[1; 32], 100)
                .unwrap()
                .unwrap()
                .name,
            "ana"
        );
        assert!(store.user_by_token("i1", &[2; 32], 100).unwrap().is_none());
        assert!(store.user_by_token("i9", &[1; 32], 100).unwrap().is_none());
        assert_eq!(store.list_users().unwrap()[0].last_used_ms, Some(100));
        assert!(store.replace_user_token("ana", "i3", &[3; 32]).unwrap());
        assert!(store.user_by_token("i1", &[1; 32], 200).unwrap().is_none());
        assert!(store.user_by_token("i3", &[3; 32], 200).unwrap().is_some());
        assert!(store.delete_user("ana").unwrap());
        assert!(store.user_by_token("i3", &[3; 32], 300).unwrap().is_none());
        assert!(!store.replace_user_token("ana", "i4", &[4; 32]).unwrap());
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn store_with_runs(n_runs: usize) -> (tempfile::TempDir, Store, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        store.ensure_target("cpu", 0).unwrap();
        let ids = (0..n_runs)
            .map(|i| {
                store
                    .insert_run(&NewRun {
                        name: &format!("run-{i}"),
                        target: "cpu",
                        snapshot_digest: "sha256:00",
                        script: "train.py",
                        args: &[],
                        max_retries: 0,
                        checkpoint_interval_s: 0,
                        gang: GangSpec::default(),
                        environment: None,
                        resources: None,
                        env: &HashMap::new(),
                        timeout_s: 0,
                        owner: "ana",
                        now_ms: 1,
                    })
                    .unwrap()
                    .id
            })
            .collect();
        (dir, store, ids)
    }

    #[test]
    fn runs_come_in_byte_capped_pages_each_once_newest_first() {
        let (_dir, store, ids) = store_with_runs(10);
        let run_bytes = page::element_len(&store.get_run(ids[0]).unwrap().unwrap());
        let mut before = None;
        let mut seen = Vec::new();
        let mut n_pages = 0;
        loop {
            let page = store
                .list_runs(None, None, before, 3 * run_bytes, 100)
                .unwrap();
            assert!(page.items.len() <= 3, "{} runs in a page", page.items.len());
            seen.extend(page.items.iter().map(|run| run.id));
            n_pages += 1;
            if !page.more {
                break;
            }
            before = page.items.last().map(|run| run.id);
        }
        let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
        assert_eq!((seen, n_pages), (newest_first, 4));
        // The run limit ends a page too, and says that more follow.
        let page = store.list_runs(None, None, None, usize::MAX, 4).unwrap();
        assert_eq!((page.items.len(), page.more), (4, true));
        // A page smaller than one run still holds one.
        let page = store.list_runs(None, None, None, 1, 100).unwrap();
        assert_eq!((page.items.len(), page.more), (1, true));
    }

    #[test]
    fn log_lines_come_in_byte_capped_pages_in_order() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let lines: Vec<v1::LogLine> = (1..=10)
            .map(|seq| v1::LogLine {
                seq,
                text: format!("{seq:04} {}", "x".repeat(995)),
                ..Default::default()
            })
            .collect();
        assert_eq!(store.append_logs(ids[0], 1, 0, &lines).unwrap(), 10);
        let mut cursor = 0;
        let mut texts = Vec::new();
        let mut n_pages = 0;
        loop {
            // Three 1000-byte lines and their fields fit; four do not.
            let page = store
                .read_logs_page(ids[0], cursor, None, 3500, 2000)
                .unwrap();
            assert!(page.items.len() <= 3);
            texts.extend(page.items.iter().map(|line| line.text.clone()));
            n_pages += 1;
            cursor = page.items.last().map_or(cursor, |line| line.cursor);
            if !page.more {
                break;
            }
        }
        let expected: Vec<String> = lines.into_iter().map(|line| line.text).collect();
        assert_eq!((texts, n_pages), (expected, 4));
        let page = store
            .read_logs_page(ids[0], 0, None, usize::MAX, 2)
            .unwrap();
        assert_eq!((page.items.len(), page.more), (2, true));
    }

    #[test]
    fn a_metrics_points_come_in_byte_capped_pages_oldest_first() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let run_id = ids[0];
        let points: Vec<v1::MetricPoint> = (1..=500u64)
            .map(|seq| v1::MetricPoint {
                seq,
                name: if seq % 2 == 0 { "loss" } else { "acc" }.into(),
                value: seq as f64,
                step: Some(seq as i64),
                time_unix_ms: 1_000 + seq as i64,
                ..Default::default()
            })
            .collect();
        store.append_metrics(run_id, 1, 0, &points).unwrap();
        let (mut after, mut pages, mut values) = (0, 0, Vec::new());
        loop {
            let page = store
                .metric_points_page(run_id, "loss", None, after, 1024)
                .unwrap();
            pages += 1;
            assert!(!page.items.is_empty());
            after = page.items.last().unwrap().cursor;
            values.extend(page.items.iter().map(|p| (p.name.clone(), p.value, p.step)));
            if !page.more {
                break;
            }
        }
        assert!(pages > 1, "1 KiB pages of 250 points");
        let expected: Vec<_> = (1..=250)
            .map(|i| ("loss".to_string(), (2 * i) as f64, Some(2 * i as i64)))
            .collect();
        assert_eq!(values, expected);
        assert!(
            store
                .metric_points_page(run_id, "missing", None, 0, 1024)
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn metric_summaries_come_in_byte_capped_pages_by_name() {
        let (_dir, mut store, ids) = store_with_runs(1);
        let points: Vec<v1::MetricPoint> = (1..=7)
            .map(|seq| v1::MetricPoint {
                seq,
                name: format!("metric-{seq}"),
                value: seq as f64,
                ..Default::default()
            })
            .collect();
        store.append_metrics(ids[0], 1, 0, &points).unwrap();
        let mut after: Option<String> = None;
        let mut names = Vec::new();
        let mut n_pages = 0;
        loop {
            // A summary here takes 24 bytes: two fit in 50.
            let page = store
                .metric_summaries_page(ids[0], None, after.as_deref(), 50)
                .unwrap();
            assert!(page.items.len() <= 2);
            names.extend(page.items.iter().map(|m| m.name.clone()));
            n_pages += 1;
            if !page.more {
                break;
            }
            after = page.items.last().map(|m| m.name.clone());
        }
        let expected: Vec<String> = (1..=7).map(|i| format!("metric-{i}")).collect();
        assert_eq!((names, n_pages), (expected, 4));
    }
}
