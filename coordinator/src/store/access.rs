//! Join tokens, agent identities and users.

use super::*;

impl Store {
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
