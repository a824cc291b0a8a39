//! Housekeeping: pruning runs past `run_retention`, and the digests every kept run still
//! names (the blob sweep keeps those).

use std::collections::HashSet;

use super::*;

impl Store {
    /// Prunes runs that ended before `ended_before_ms` and are not pruned yet: deletes their
    /// log lines and metric points and forgets their outputs and checkpoints (the blobs go
    /// with the next sweep). The run rows stay, marked `pruned_ms`. Returns their ids.
    pub fn prune_runs(&mut self, ended_before_ms: i64, now_ms: i64) -> anyhow::Result<Vec<i64>> {
        let tx = self.conn.transaction()?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM runs WHERE pruned_ms IS NULL AND finished_ms IS NOT NULL
                    AND finished_ms < ?1
                    AND status IN ('succeeded', 'failed', 'cancelled', 'lost', 'env_failed')",
            )?;
            stmt.query_map([ended_before_ms], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for id in &ids {
            tx.execute("DELETE FROM logs WHERE run_id = ?1", [id])?;
            tx.execute("DELETE FROM metrics WHERE run_id = ?1", [id])?;
            tx.execute(
                "UPDATE run_nodes SET outputs_digest = '' WHERE run_id = ?1",
                [id],
            )?;
            tx.execute(
                "UPDATE runs SET pruned_ms = ?2, outputs_digest = '', checkpoint_digest = '',
                    node_checkpoints = '{}' WHERE id = ?1",
                params![id, now_ms],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Every blob digest a run that is not pruned still names: its snapshot, outputs (each
    /// node's too) and checkpoints.
    pub fn referenced_digests(&self) -> anyhow::Result<HashSet<String>> {
        let mut digests = HashSet::new();
        let mut stmt = self.conn.prepare(
            "SELECT snapshot_digest, outputs_digest, checkpoint_digest, node_checkpoints
             FROM runs WHERE pruned_ms IS NULL",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for column in 0..3 {
                digests.insert(row.get::<_, String>(column)?);
            }
            let checkpoints: HashMap<String, String> =
                serde_json::from_str(&row.get::<_, String>(3)?).unwrap_or_default();
            digests.extend(checkpoints.into_values());
        }
        let mut stmt = self.conn.prepare(
            "SELECT n.outputs_digest FROM run_nodes n JOIN runs r ON r.id = n.run_id
             WHERE r.pruned_ms IS NULL AND n.outputs_digest != ''",
        )?;
        for digest in stmt.query_map([], |row| row.get::<_, String>(0))? {
            digests.insert(digest?);
        }
        digests.remove("");
        Ok(digests)
    }

    /// Forgets who uploaded blobs that were removed.
    pub fn forget_blob_owners(&mut self, digests: &[String]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        for digest in digests {
            tx.execute("DELETE FROM blob_owners WHERE digest = ?1", [digest])?;
        }
        tx.commit()?;
        Ok(())
    }
}
