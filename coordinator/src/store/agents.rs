//! Targets, agents and the nodes of placed runs.

use super::*;

impl Store {
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
    pub(super) fn node_outputs(&self, run_id: i64, attempt: u32) -> anyhow::Result<Vec<String>> {
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
}
