//! Join tokens and agent certificates: `kiln-coordinator token create` makes a token,
//! `kiln-agent join` presents it to the `Enrollment` service here with a CSR, and gets its
//! client certificate; `Renew` replaces a certificate before it expires.
//!
//! A token is `ID.SECRET` ([`crate::auth::new_token`]): ID names it in `token list` and
//! `token revoke`, SECRET is 128 bits from the operating system's CSPRNG. The database keeps
//! only the SHA-256 of the secret and compares it in constant time; the use is spent in the
//! same transaction that creates the agent's identity (`Store::enroll_agent`). The agent id
//! is chosen here, never by the agent, and bound to the certificate's URI SAN.

use std::sync::Arc;
use std::time::Duration;

use kiln_common::target::TargetName;
use kiln_proto::v1::{self, enrollment_server::EnrollmentServer};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::Coordinator;
use crate::auth::{new_token, parse_token, secret_hash};
use crate::store::{JoinTokenError, NewIdentity, NewJoinToken, Store};

/// How long a token lives unless `--ttl` says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

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
    let (token, id, secret_sha256) = new_token()?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_ms = now_ms.saturating_add(ttl_ms);
    store.insert_join_token(&NewJoinToken {
        id: &id,
        secret_sha256,
        target: target.as_str(),
        uses,
        expires_ms,
        now_ms,
    })?;
    Ok(CreatedToken {
        token,
        id,
        expires_ms,
    })
}

/// A new agent id: `a-` and 16 random hex digits.
fn new_agent_id() -> String {
    format!("a-{:016x}", rand::random::<u64>())
}

/// The `Enrollment` gRPC service, to add to the coordinator's server next to `Kiln`,
/// `AgentApi` and `Blobs`.
pub fn enrollment_service(coordinator: Arc<Coordinator>) -> EnrollmentServer<Enrollment> {
    EnrollmentServer::new(Enrollment(coordinator))
}

pub struct Enrollment(Arc<Coordinator>);

const MAX_CSR_BYTES: usize = 16 * 1024;

#[tonic::async_trait]
impl v1::enrollment_server::Enrollment for Enrollment {
    async fn get_ca(
        &self,
        _: Request<v1::GetCaRequest>,
    ) -> Result<Response<v1::GetCaReply>, Status> {
        let Some(pki) = &self.0.config.pki else {
            return Err(Status::failed_precondition(
                "this coordinator runs without TLS (--insecure): there is no CA",
            ));
        };
        Ok(Response::new(v1::GetCaReply {
            ca_pem: pki.ca_pem().to_string(),
            cluster_id: pki.cluster_id().to_string(),
        }))
    }

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
        let pki = self.0.config.pki.clone();
        if pki.is_some() && request.csr_pem.is_empty() {
            return Err(Status::invalid_argument(
                "this coordinator uses TLS: the join must carry a certificate signing request \
                 (upgrade kiln-agent)",
            ));
        }
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(
                "the certificate signing request is too large",
            ));
        }
        let agent_id = new_agent_id();
        // Signed before the token is spent (a bad CSR spends nothing); the certificate is
        // handed out only if the token checks out.
        let issued = match &pki {
            Some(pki) => Some(
                pki.sign_agent(&request.csr_pem, &agent_id)
                    .map_err(|e| Status::invalid_argument(format!("{e:#}")))?,
            ),
            None => None,
        };
        let (id, hash) = (id.to_string(), secret_hash(secret));
        let target_name = target.as_str().to_string();
        let hostname = request.hostname.chars().take(255).collect::<String>();
        let now = crate::now_ms();
        let result = {
            let (agent_id, hostname) = (agent_id.clone(), hostname.clone());
            let not_after = issued.as_ref().map_or(0, |i| i.not_after_ms);
            self.0
                .db()
                .call(move |store| {
                    store.enroll_agent(
                        (&id, &hash),
                        &target_name,
                        &NewIdentity {
                            agent_id: &agent_id,
                            hostname: &hostname,
                            cert_not_after_ms: not_after,
                            now_ms: now,
                        },
                    )
                })
                .await
        };
        match result {
            Ok(row) => {
                info!(target = %target, token_id = %row.id, uses_left = row.uses_left, %hostname, agent_id = %agent_id, "Host joined with a join token.");
                Ok(Response::new(v1::JoinReply {
                    target: row.target,
                    coordinator_version: kiln_common::VERSION.to_string(),
                    uses_left: row.uses_left,
                    agent_id,
                    not_after_unix_ms: issued.as_ref().map_or(0, |i| i.not_after_ms),
                    certificate_pem: issued.map(|i| i.certificate_pem).unwrap_or_default(),
                    ca_pem: pki.map(|p| p.ca_pem().to_string()).unwrap_or_default(),
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

    async fn renew(
        &self,
        request: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::RenewReply>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let Some(pki) = self.0.config.pki.clone() else {
            return Err(Status::failed_precondition(
                "this coordinator runs without TLS (--insecure): there is nothing to renew",
            ));
        };
        let Some((agent_id, _)) = caller.agent()? else {
            return Err(Status::unauthenticated(
                "renewal needs the agent's certificate",
            ));
        };
        let csr = request.into_inner().csr_pem;
        if csr.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(
                "the certificate signing request is too large",
            ));
        }
        let issued = pki
            .sign_agent(&csr, &agent_id)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let (id, not_after) = (agent_id.clone(), issued.not_after_ms);
        self.0
            .db()
            .call(move |s| s.renewed_identity(&id, not_after))
            .await
            .map_err(crate::service::internal)?;
        info!(agent_id = %agent_id, not_after_ms = not_after, "Agent certificate renewed.");
        Ok(Response::new(v1::RenewReply {
            certificate_pem: issued.certificate_pem,
            not_after_unix_ms: issued.not_after_ms,
        }))
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
}
