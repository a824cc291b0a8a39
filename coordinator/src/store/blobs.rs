//! Who may read which blob.

use super::*;

impl Store {
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
}
