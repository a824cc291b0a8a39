//! The agent's credentials for a TLS coordinator, in `DATA_DIR/identity/` (0700):
//! `ca.crt` (the coordinator's CA, pinned by hash at join) and `agent.pem` (the client
//! certificate followed by its private key, 0600, one file so that a renewal replaces both
//! with one rename). The key is made here and never leaves the host.
//!
//! `kiln-agent join` writes them ([`save`]); the agent renews the certificate at two thirds
//! of its lifetime ([`renew_at`]) with a new key, and deletes the key when the coordinator
//! says it was revoked ([`wipe`]).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use kiln_proto::tls::{ClientTls, Trust};

/// Agent ids of earlier identities of this host, one per line: their containers are removed
/// once the agent runs under its new identity.
pub const PREVIOUS_IDS: &str = "previous-agent-ids";

/// The agent's credentials.
#[derive(Clone, Debug)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

impl Identity {
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            trust: Trust::CaPem(self.ca_pem.clone()),
            identity: Some((self.cert_pem.clone(), self.key_pem.clone())),
        }
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.not_after_ms
    }

    /// When to renew: two thirds into the certificate's lifetime.
    pub fn renew_at_ms(&self) -> i64 {
        self.not_before_ms + (self.not_after_ms - self.not_before_ms) * 2 / 3
    }
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

/// The stored credentials; `Ok(None)` when there are none (never joined, or revoked).
pub fn load(data_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let dir = dir(data_dir);
    let pem = match std::fs::read_to_string(dir.join("agent.pem")) {
        Ok(pem) => pem,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("read {}", dir.display())),
    };
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt"))
        .with_context(|| format!("read {}/ca.crt", dir.display()))?;
    let split = pem
        .find("-----BEGIN PRIVATE KEY-----")
        .context("agent.pem holds no private key")?;
    let (cert_pem, key_pem) = pem.split_at(split);
    let (not_before_ms, not_after_ms) = validity(cert_pem)?;
    Ok(Some(Identity {
        ca_pem,
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_before_ms,
        not_after_ms,
    }))
}

/// Writes the credentials (each file atomically; the key only ever in a 0600 file).
pub fn save(data_dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    validity(cert_pem).context("the coordinator sent an unreadable certificate")?;
    write_atomic(&dir.join("ca.crt"), ca_pem.as_bytes(), 0o644)?;
    let mut both = cert_pem.to_string();
    if !both.ends_with('\n') {
        both.push('\n');
    }
    both.push_str(key_pem);
    write_atomic(&dir.join("agent.pem"), both.as_bytes(), 0o600)
}

/// Deletes the key and certificate (the CA stays: it is public).
pub fn wipe(data_dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(dir(data_dir).join("agent.pem")) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).context("delete the agent's key")
        }
        _ => Ok(()),
    }
}

/// A new key pair (ECDSA P-256) and a CSR for it, PEM. The CSR names nothing: the
/// coordinator decides what the certificate says.
pub fn new_key_and_csr() -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generate a key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("make a certificate signing request")?
        .pem()
        .context("encode the certificate signing request")?;
    Ok((key.serialize_pem(), csr))
}

/// (not before, not after) of the first certificate of `pem`, in Unix milliseconds.
pub fn validity(pem: &str) -> anyhow::Result<(i64, i64)> {
    let certs = kiln_proto::tls::certificates(pem)?;
    let first = certs.first().context("no certificate")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(first.as_ref()).context("parse the certificate")?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp() * 1000,
        validity.not_after.timestamp() * 1000,
    ))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long to wait from now until `at_ms` (zero if past).
pub fn until(at_ms: i64) -> Duration {
    Duration::from_millis((at_ms - now_ms()).max(0) as u64)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(key_pem: &str, days: u64) -> String {
        let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + Duration::from_secs(days * 86_400)).into();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn credentials_round_trip_privately_and_wipe_removes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let (key, csr) = new_key_and_csr().unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        let cert = self_signed(&key, 30);
        save(dir.path(), &cert, &cert, &key).unwrap();
        let mode = std::fs::metadata(dir.path().join("identity/agent.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let identity = load(dir.path()).unwrap().unwrap();
        assert_eq!(identity.key_pem, key);
        assert!(!identity.expired(now_ms()));
        let lifetime = identity.not_after_ms - identity.not_before_ms;
        assert!((lifetime - 30 * 86_400_000).abs() < 2_000, "{lifetime}");
        assert_eq!(
            identity.renew_at_ms(),
            identity.not_before_ms + lifetime * 2 / 3
        );
        wipe(dir.path()).unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        assert!(dir.path().join("identity/ca.crt").exists());
    }
}
