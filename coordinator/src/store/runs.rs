//! Runs: submission, queue, transitions, checkpoints.

use super::*;

impl Store {
    // ---- runs ----

    pub fn insert_run(&self, new: &NewRun) -> anyhow::Result<v1::Run> {
        let args = serde_json::to_string(new.args).expect("strings serialise");
        self.conn.execute(
            "INSERT INTO runs (name, target, status, snapshot_digest, script, args, created_ms,
                max_retries, checkpoint_interval_s, nodes, procs_per_node, gpus_per_node,
                launcher, max_restarts, environment, resources, env, timeout_s, owner,
                secret_names, secrets)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                ?16, ?17, ?18, ?19, ?20)",
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
                new.owner,
                serde_json::to_string(new.secret_names).expect("strings serialise"),
                new.sealed_secrets,
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

    pub(super) fn query_runs(
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
                timeout_s, owner, outputs_error, first_started_ms, secret_names, pruned_ms
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
                    secret_names: serde_json::from_str(&row.get::<_, String>(32)?)
                        .unwrap_or_default(),
                    pruned_unix_ms: row.get(33)?,
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
        if to.is_terminal() {
            // An ended run needs its secrets no more: they are not kept, even sealed.
            update("UPDATE runs SET secrets = NULL WHERE id = ?1", &[&run_id])?;
        }
        tx.commit().map_err(anyhow::Error::from)?;
        let run = self
            .get_run(run_id)?
            .ok_or(TransitionError::NoSuchRun(run_id))?;
        Ok(run)
    }

    /// A run's sealed secrets (`None`: it has none, or has ended).
    pub fn sealed_secrets(&self, run_id: i64) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .prepare_cached("SELECT secrets FROM runs WHERE id = ?1")?
            .query_row([run_id], |row| row.get::<_, Option<Vec<u8>>>(0))
            .optional()?
            .flatten())
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
}
