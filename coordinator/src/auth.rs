//! Who is calling, and what they may do.
//!
//! A coordinator with TLS authenticates every call: agents by their client certificate
//! (checked by rustls against the CA, then here: the URI SAN names an enrolled agent of this
//! cluster that is not revoked), users by `authorization: Bearer ID.SECRET` (the id finds
//! the user, the SHA-256 of the secret is compared in constant time). A coordinator started
//! `--insecure`, or the local target's Unix socket, authenticates nobody: every caller is
//! [`Caller::Open`], which may do everything.
//!
//! The rules: the user API (`Kiln`) takes users only, the agent API (`AgentApi`, `Renew`)
//! agents only; `Blobs` takes both. Members see, follow and cancel their own runs; admins
//! everyone's, and only admins revoke agents. Blobs have owners: a member reads (learns of,
//! downloads, submits with) a blob they uploaded or one named by a run of theirs, an agent
//! one it uploaded or one it needs for a run it holds, admins every blob
//! (`Coordinator::may_read_blob`); anything else answers as a missing blob would.

use rand::TryRngCore as _;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Status};

use crate::Coordinator;
use crate::store::{BlobReader, Role};

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 16;

/// A new `ID.SECRET` token from the operating system's CSPRNG: 64-bit id, 128-bit secret,
/// both hex. Returns (token, id, SHA-256 of the secret).
pub fn new_token() -> anyhow::Result<(String, String, [u8; 32])> {
    use anyhow::Context as _;
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    let mut rng = rand::rngs::OsRng;
    rng.try_fill_bytes(&mut id)
        .and_then(|()| rng.try_fill_bytes(&mut secret))
        .context("read random bytes from the operating system")?;
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let hash = secret_hash(&secret);
    Ok((format!("{id}.{secret}"), id, hash))
}

/// Splits `ID.SECRET`, checking the shape (not the value).
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.trim().split_once('.')?;
    let hex = |s: &str, bytes: usize| {
        s.len() == 2 * bytes && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(id, ID_BYTES) && hex(secret, SECRET_BYTES)).then_some((id, secret))
}

pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No authentication on this coordinator (`--insecure`, or a Unix socket).
    Open,
    User {
        name: String,
        role: Role,
    },
    Agent {
        id: String,
        target: String,
    },
}

/// A caller of the user API.
#[derive(Debug, Clone)]
pub struct User {
    /// "" when the coordinator does not authenticate.
    pub name: String,
    pub admin: bool,
}

impl User {
    /// Whether this user may see, follow and cancel a run of `owner`.
    pub fn may_access(&self, owner: &str) -> bool {
        self.admin || self.name == owner
    }
}

impl Caller {
    /// The caller as a user of the user API; agents are refused.
    pub fn user(self) -> Result<User, Status> {
        match self {
            Caller::Open => Ok(User {
                name: String::new(),
                admin: true,
            }),
            Caller::User { name, role } => Ok(User {
                name,
                admin: role == Role::Admin,
            }),
            Caller::Agent { id, .. } => Err(Status::permission_denied(format!(
                "agent {id}'s certificate cannot call the user API: use a user's API token \
                 (kiln login)"
            ))),
        }
    }

    /// The caller as an admin; members and agents are refused.
    pub fn admin(self, what: &str) -> Result<User, Status> {
        let user = self.user()?;
        if !user.admin {
            return Err(Status::permission_denied(format!(
                "only admins may {what}; `{}` is a member",
                user.name
            )));
        }
        Ok(user)
    }

    /// Who this caller's uploads are recorded for: `None` on an open coordinator, which
    /// records no owners.
    pub fn blob_reader(&self) -> Option<BlobReader<'_>> {
        match self {
            Caller::Open => None,
            Caller::User { name, .. } => Some(BlobReader::User(name)),
            Caller::Agent { id, .. } => Some(BlobReader::Agent(id)),
        }
    }

    /// The caller as an agent: `Some(id)` when authenticated, `None` on an open coordinator
    /// (the agent names itself in hello). Users are refused.
    pub fn agent(self) -> Result<Option<(String, String)>, Status> {
        match self {
            Caller::Open => Ok(None),
            Caller::Agent { id, target } => Ok(Some((id, target))),
            Caller::User { name, .. } => Err(Status::permission_denied(format!(
                "a user token (user `{name}`) cannot call the agent API: agents authenticate \
                 with the certificate `kiln-agent join` gets"
            ))),
        }
    }
}

impl Coordinator {
    /// Whether `caller` may learn of, download or submit with the blob `digest` (see the
    /// module docs and [`crate::store::Store::blob_readable`]). Whether it is stored is not
    /// asked here: a caller who may not read a blob is told it is missing.
    pub async fn may_read_blob(&self, caller: &Caller, digest: &str) -> anyhow::Result<bool> {
        match caller {
            Caller::Open
            | Caller::User {
                role: Role::Admin, ..
            } => Ok(true),
            Caller::User { .. } | Caller::Agent { .. } => {
                let (caller, digest) = (caller.clone(), digest.to_string());
                self.db
                    .call(move |s| {
                        let reader = caller.blob_reader().expect("users and agents read as such");
                        s.blob_readable(&digest, reader)
                    })
                    .await
            }
        }
    }

    /// Whether agent `agent_id` may name the blob `digest` in a run event (outputs, a
    /// checkpoint): one it may read, so that a forged digest cannot hand the run's owner
    /// someone else's blob. Always on an open coordinator, whose agents are not
    /// authenticated and whose uploads have no owners.
    pub async fn agent_may_name_blob(&self, agent_id: &str, digest: &str) -> anyhow::Result<bool> {
        if self.config.pki.is_none() {
            return Ok(true);
        }
        let (agent_id, digest) = (agent_id.to_string(), digest.to_string());
        self.db
            .call(move |s| s.blob_readable(&digest, BlobReader::Agent(&agent_id)))
            .await
    }

    /// Records that `caller` uploaded the bytes of `digest` (nothing on an open coordinator).
    pub async fn blob_uploaded(&self, caller: &Caller, digest: &str) -> anyhow::Result<()> {
        if caller.blob_reader().is_none() {
            return Ok(());
        }
        let (caller, digest) = (caller.clone(), digest.to_string());
        self.db
            .call(move |s| {
                let reader = caller.blob_reader().expect("checked above");
                s.add_blob_owner(&digest, reader, crate::now_ms())
            })
            .await
    }

    /// Authenticates a request (see the module docs).
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let Some(pki) = self.config.pki.clone() else {
            return Ok(Caller::Open);
        };
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            let Some(agent_id) = pki.agent_of(leaf.as_ref()) else {
                return Err(Status::unauthenticated(
                    "the client certificate does not name an agent of this cluster",
                ));
            };
            let id = agent_id.clone();
            let identity = self
                .db
                .call(move |s| s.agent_identity(&id))
                .await
                .map_err(crate::service::internal)?;
            return match identity {
                Some(identity) if identity.revoked_ms.is_none() => Ok(Caller::Agent {
                    id: agent_id,
                    target: identity.target,
                }),
                Some(_) => Err(Status::permission_denied(format!(
                    "agent {agent_id}'s certificate was revoked: join again with a new token"
                ))),
                None => Err(Status::unauthenticated(format!(
                    "agent {agent_id} is not enrolled with this coordinator"
                ))),
            };
        }
        let Some(header) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this coordinator requires authentication: users log in with `kiln login` \
                 (an admin makes the token with `kiln-coordinator user create`); agents join \
                 with `kiln-agent join`",
            ));
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .and_then(parse_token);
        let Some((id, secret)) = token else {
            return Err(Status::unauthenticated(
                "the API token is malformed: expected `Bearer ID.SECRET`",
            ));
        };
        let (id, hash) = (id.to_string(), secret_hash(secret));
        let user = self
            .db
            .call(move |s| s.user_by_token(&id, &hash, crate::now_ms()))
            .await
            .map_err(crate::service::internal)?;
        match user {
            Some(user) => Ok(Caller::User {
                name: user.name,
                role: user.role,
            }),
            None => Err(Status::unauthenticated(
                "the API token is not valid (replaced, its user deleted, or mistyped): \
                 ask an admin for a new one and run `kiln login` again",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_well_formed() {
        let (a, id, hash) = new_token().unwrap();
        let (b, _, _) = new_token().unwrap();
        assert_ne!(a, b);
        let (parsed_id, secret) = parse_token(&a).unwrap();
        assert_eq!(parsed_id, id);
        assert_eq!((id.len(), secret.len()), (16, 32));
        assert_eq!(secret_hash(secret), hash);
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

    #[test]
    fn members_reach_their_own_runs_admins_all_and_agents_no_user_call() {
        let member = Caller::User {
            name: "ana".into(),
            role: Role::Member,
        };
        let user = member.clone().user().unwrap();
        assert!(user.may_access("ana"));
        assert!(!user.may_access("bo"));
        let error = member.clone().admin("revoke agents").unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            member.agent().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let admin = Caller::User {
            name: "root".into(),
            role: Role::Admin,
        };
        assert!(admin.admin("x").unwrap().may_access("ana"));
        let agent = Caller::Agent {
            id: "a-1".into(),
            target: "gpu".into(),
        };
        assert_eq!(
            agent.clone().user().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(agent.agent().unwrap(), Some(("a-1".into(), "gpu".into())));
        assert!(Caller::Open.admin("x").unwrap().may_access("anyone"));
    }
}
