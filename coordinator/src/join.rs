//! Join tokens: `kiln-coordinator token create` makes one, `kiln-agent join` presents it to the
//! `Enrollment` service here, which consumes one use before the agent writes its config.
//!
//! A token is `ID.SECRET`: ID is 8 random bytes in hex (it names the token in `token list`
//! and `token revoke`), SECRET is 16 random bytes (128 bits) in hex from the operating
//! system's CSPRNG. The database keeps only the SHA-256 of the secret and compares it in
//! constant time (`Store::consume_join_token`).
//!
//! What a token does **not** do in this version: agent sessions are not authenticated, so a
//! host that can reach the coordinator can still run `kiln-agent` without joining. The token
//! gates `join` only; the TLS issue turns the join reply into credentials.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::target::TargetName;
use kiln_proto::v1::{self, enrollment_server::EnrollmentServer};
use rand::TryRngCore as _;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::Coordinator;
use crate::store::{JoinTokenError, NewJoinToken, Store};

/// How long a token lives unless `--ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 16;

/// A token just made: the only moment its secret exists outside the admin's terminal.
pub struct CreatedToken {
    /// `ID.SECRET`, to hand to `kiln-agent join --token`.
    pub token: String,
    pub id: String,
    pub expires_ms: i64,
}

/// Makes a join token for `target`, good for `uses` joins until `ttl` from `now_ms`, and
/// stores its id and the hash of its secret.
pub fn create_token(
    store: &Store,
    target: &TargetName,
    ttl: Duration,
    uses: u32,
    now_ms: i64,
) -> anyhow::Result<CreatedToken> {
    anyhow::ensure!(uses >= 1, "--uses must be at least 1");
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    let mut rng = rand::rngs::OsRng;
    rng.try_fill_bytes(&mut id)
        .and_then(|()| rng.try_fill_bytes(&mut secret))
        .context("read random bytes from the operating system")?;
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_ms = now_ms.saturating_add(ttl_ms);
    store.insert_join_token(&NewJoinToken {
        id: &id,
        secret_sha256: secret_hash(&secret),
        target: target.as_str(),
        uses,
        expires_ms,
        now_ms,
    })?;
    Ok(CreatedToken {
        token: format!("{id}.{secret}"),
        id,
        expires_ms,
    })
}

/// Splits `ID.SECRET`, checking the shape (not the value).
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.trim().split_once('.')?;
    let hex = |s: &str, bytes: usize| {
        s.len() == 2 * bytes && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(id, ID_BYTES) && hex(secret, SECRET_BYTES)).then_some((id, secret))
}

fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The `Enrollment` gRPC service, to add to the coordinator's server next to `Kiln`,
/// `AgentApi` and `Blobs`.
pub fn enrollment_service(coordinator: Arc<Coordinator>) -> EnrollmentServer<Enrollment> {
    EnrollmentServer::new(Enrollment(coordinator))
}

pub struct Enrollment(Arc<Coordinator>);

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for Enrollment {
    async fn join(
        &self,
        request: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinReply>, Status> {
        let request = request.into_inner();
        let target = TargetName::new(&request.target)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let (id, secret) = parse_token(&request.token).ok_or_else(|| {
            Status::invalid_argument(
                "the join token is malformed: expected ID.SECRET as `kiln-coordinator token \
                 create` printed it",
            )
        })?;
        let (id, hash) = (id.to_string(), secret_hash(secret));
        let target_name = target.as_str().to_string();
        let now = crate::now_ms();
        let result = self
            .0
            .db()
            .call(move |store| store.consume_join_token(&id, &hash, &target_name, now))
            .await;
        let hostname = request.hostname.chars().take(255).collect::<String>();
        match result {
            Ok(row) => {
                info!(target = %target, token_id = %row.id, uses_left = row.uses_left, %hostname, "Host joined with a join token.");
                Ok(Response::new(v1::JoinReply {
                    target: row.target,
                    coordinator_version: kiln_common::VERSION.to_string(),
                    uses_left: row.uses_left,
                }))
            }
            Err(JoinTokenError::Db(error)) => {
                warn!(error = %format!("{error:#}"), "Join failed.");
                Err(Status::internal(format!("{error:#}")))
            }
            Err(error) => {
                warn!(target = %target, %hostname, reason = %error, "Join refused.");
                Err(match error {
                    JoinTokenError::Unknown => Status::unauthenticated(error.to_string()),
                    _ => Status::permission_denied(error.to_string()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("kiln.db")).unwrap();
        let target = TargetName::new("gpu").unwrap();
        let a = create_token(&store, &target, Duration::from_secs(60), 1, 1_000).unwrap();
        let b = create_token(&store, &target, Duration::from_secs(60), 1, 1_000).unwrap();
        assert_ne!(a.token, b.token);
        assert_eq!(a.expires_ms, 61_000);
        let (id, secret) = parse_token(&a.token).expect("well formed");
        assert_eq!((id.len(), secret.len()), (16, 32));
        assert_eq!(id, a.id);
        let row = store
            .consume_join_token(id, &secret_hash(secret), "gpu", 2_000)
            .unwrap();
        assert_eq!(row.uses_left, 0);
    }

    #[test]
    fn malformed_tokens_are_told_apart_from_wrong_ones() {
        for bad in ["", "abc", "0123456789abcdef", "0123456789abcdef.", "x.y"] {
            assert_eq!(parse_token(bad), None, "{bad:?}");
        }
        let upper = format!("{}.{}", "A".repeat(16), "0".repeat(32));
        assert_eq!(parse_token(&upper), None);
        let good = format!("{}.{}", "a".repeat(16), "0".repeat(32));
        assert!(parse_token(&good).is_some());
    }
}
