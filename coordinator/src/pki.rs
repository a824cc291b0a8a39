//! The coordinator's PKI: a CA (created in `DATA_DIR/pki/` on first start, or an existing
//! one from configured PEM files), the server certificate it serves with, and the client
//! certificates it issues to agents from their CSRs.
//!
//! Layout of `DATA_DIR/pki/` (0700):
//! - `ca.crt`, `ca.key` (0600): the CA, ECDSA P-256, valid 10 years. Its SHA-256 is the pin
//!   that join commands and `kiln login` carry.
//! - `server.crt` (leaf + CA), `server.key` (0600): made anew at each start, valid one year,
//!   for the names in `tls_names` plus localhost and the loopback addresses.
//!
//! An agent certificate names the agent in one URI SAN, `kiln://CLUSTER/agent/ID`, where
//! CLUSTER is the first 16 hex digits of the CA's SHA-256, so a certificate of another Kiln
//! cluster never passes for one of this cluster even under a shared CA. It is valid for
//! `agent_cert_ttl` (default 30 days) and for client authentication only.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

/// How long an agent certificate is valid unless configured.
pub const DEFAULT_AGENT_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates start up to this long before they are made, for clocks a little behind (a
/// tenth of the lifetime at most, so that two thirds of it, when agents renew, stays ahead).
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Where the PKI comes from.
#[derive(Debug, Clone, Default)]
pub struct PkiConfig {
    /// `DATA_DIR/pki`.
    pub dir: PathBuf,
    /// An existing CA (certificate and key, PEM) instead of the one made in `dir`.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// An existing server certificate (chain) and key instead of one made at start.
    pub server_cert: Option<PathBuf>,
    pub server_key: Option<PathBuf>,
    /// Host names and IP addresses the server certificate is made for.
    pub server_names: Vec<String>,
    pub agent_cert_ttl: Option<Duration>,
}

pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca_key: KeyPair,
    cluster_id: String,
    server_chain_pem: String,
    server_key_pem: String,
    agent_cert_ttl: Duration,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

/// A certificate just issued.
pub struct Issued {
    pub certificate_pem: String,
    pub not_after_ms: i64,
}

impl Pki {
    /// Loads the CA (making it on first use), and makes or loads the server certificate.
    pub fn load_or_create(config: &PkiConfig) -> anyhow::Result<Pki> {
        let mut pki = Pki::load_ca(config)?;
        match (&config.server_cert, &config.server_key) {
            (Some(cert), Some(key)) => {
                let mut chain = read(cert)?;
                // Clients pin the CA at the end of the chain: make sure it is there.
                let certs = kiln_proto::tls::certificates(&chain)?;
                if !certs.iter().any(|c| c.as_ref() == pki.ca_der.as_ref()) {
                    if !chain.ends_with('\n') {
                        chain.push('\n');
                    }
                    chain.push_str(&pki.ca_pem);
                }
                pki.server_chain_pem = chain;
                pki.server_key_pem = read(key)?;
            }
            (None, None) => {
                let (chain, key) = pki.make_server_certificate(&config.server_names)?;
                std::fs::create_dir_all(&config.dir)?;
                write_file(&config.dir.join("server.crt"), chain.as_bytes(), 0o644)?;
                write_file(&config.dir.join("server.key"), key.as_bytes(), 0o600)?;
                pki.server_chain_pem = chain;
                pki.server_key_pem = key;
            }
            _ => anyhow::bail!("tls_cert and tls_key must be set together"),
        }
        Ok(pki)
    }

    /// Loads the CA only (making it on first use): enough to issue certificates and tell
    /// its hash, with no server certificate.
    pub fn load_ca(config: &PkiConfig) -> anyhow::Result<Pki> {
        let (ca_pem, ca_key) = match (&config.ca_cert, &config.ca_key) {
            (Some(cert), Some(key)) => (read(cert)?, read(key)?),
            (None, None) => load_or_create_ca(&config.dir)?,
            _ => anyhow::bail!("tls_ca_cert and tls_ca_key must be set together"),
        };
        let ca_der = kiln_proto::tls::certificates(&ca_pem)?
            .into_iter()
            .next()
            .context("the CA file holds no certificate")?;
        let ca_key = KeyPair::from_pem(&ca_key).context("parse the CA's private key")?;
        let cluster_id = kiln_proto::tls::ca_hash(&ca_der)["sha256:".len()..][..16].to_string();
        Ok(Pki {
            ca_pem,
            ca_der,
            ca_key,
            cluster_id,
            server_chain_pem: String::new(),
            server_key_pem: String::new(),
            agent_cert_ttl: config.agent_cert_ttl.unwrap_or(DEFAULT_AGENT_CERT_TTL),
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `sha256:HEX` of the CA certificate: the pin for joins and logins.
    pub fn ca_hash(&self) -> String {
        kiln_proto::tls::ca_hash(&self.ca_der)
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The server's chain (leaf, then CA) and key, PEM.
    pub fn server_identity(&self) -> (&str, &str) {
        (&self.server_chain_pem, &self.server_key_pem)
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_der(&self.ca_der, &self.ca_key).context("load the CA as issuer")
    }

    fn make_server_certificate(&self, names: &[String]) -> anyhow::Result<(String, String)> {
        let mut all: Vec<String> = names.to_vec();
        for name in ["localhost", "127.0.0.1", "::1"] {
            all.push(name.to_string());
        }
        all.sort();
        all.dedup();
        let mut params = CertificateParams::new(all).context("server certificate names")?;
        params.distinguished_name = name("Kiln coordinator");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, SERVER_VALIDITY);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generate the server key")?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        ))
    }

    /// Signs a client certificate for `agent_id` with the public key of `csr_pem`. Nothing
    /// else of the request is used: the coordinator decides the names, usages and validity.
    pub fn sign_agent(&self, csr_pem: &str, agent_id: &str) -> anyhow::Result<Issued> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|error| {
            anyhow::anyhow!("the certificate signing request is invalid: {error}")
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("kiln agent {agent_id}"));
        params.subject_alt_names = vec![SanType::URI(
            agent_uri(&self.cluster_id, agent_id)
                .try_into()
                .context("agent URI")?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = validity(&mut params, self.agent_cert_ttl);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            not_after_ms: ms(not_after),
        })
    }

    /// The agent id a client certificate names, if it is an agent certificate of this
    /// cluster. (The TLS layer has already checked that this CA signed it and that it is
    /// valid now.)
    pub fn agent_of(&self, cert_der: &[u8]) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let prefix = format!("kiln://{}/agent/", self.cluster_id);
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri
                .strip_prefix(&prefix)
                .filter(|id| valid_agent_id(id))
                .map(str::to_string),
            _ => None,
        })
    }
}

/// `kiln://CLUSTER/agent/ID`.
pub fn agent_uri(cluster_id: &str, agent_id: &str) -> String {
    format!("kiln://{cluster_id}/agent/{agent_id}")
}

/// Agent ids the coordinator makes: `a-` and 16 hex digits; older agents made their own
/// (1 to 64 characters of letters, digits, `-`, `_`, `.`).
pub fn valid_agent_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn load_or_create_ca(dir: &Path) -> anyhow::Result<(String, String)> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    if key_path.exists() || cert_path.exists() {
        return read_ca_written_by_another(&cert_path, &key_path);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let key = KeyPair::generate().context("generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name("Kiln CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    // Of two processes making a CA at once (the service starting while an admin runs
    // `user create`), the one whose complete key file links into place first wins; the
    // other waits for the winner's certificate and uses that CA.
    let key_tmp = dir.join(format!("ca.key.{}.tmp", rand::random::<u64>()));
    write_new(&key_tmp, key_pem.as_bytes(), 0o600)
        .with_context(|| format!("write {}", key_tmp.display()))?;
    let won = std::fs::hard_link(&key_tmp, &key_path);
    let _ = std::fs::remove_file(&key_tmp);
    match won {
        Ok(()) => {
            write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
            tracing::info!(dir = %dir.display(), "Created the cluster's CA.");
            Ok((cert_pem, key_pem))
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            read_ca_written_by_another(&cert_path, &key_path)
        }
        Err(error) => Err(error).with_context(|| format!("write {}", key_path.display())),
    }
}

/// The CA exists or is being made: read its key and its certificate, which the process
/// that made the key writes just after it. A certificate without its key is an error.
fn read_ca_written_by_another(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cert_path.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} exists but {} does not; restore the CA's certificate, or remove both to make a new CA \
             (every agent must then join again)",
            key_path.display(),
            cert_path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((read(cert_path)?, read(key_path)?))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Kiln");
    name.push(DnType::CommonName, common_name);
    name
}

/// Sets not_before (backdated an hour, or a tenth of `lifetime` if less) and not_after
/// (now + `lifetime`); returns not_after.
fn validity(params: &mut CertificateParams, lifetime: Duration) -> SystemTime {
    let now = SystemTime::now();
    let not_after = now + lifetime;
    params.not_before = (now - BACKDATE.min(lifetime / 10)).into();
    params.not_after = not_after.into();
    not_after
}

fn random_serial() -> anyhow::Result<SerialNumber> {
    use rand::TryRngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("read random bytes from the operating system")?;
    bytes[0] &= 0x7f; // a positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

fn ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Writes `data` to `path` atomically (temporary file + rename) with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, data, mode).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki(dir: &Path) -> Pki {
        Pki::load_or_create(&PkiConfig {
            dir: dir.join("pki"),
            server_names: vec!["coordinator.example".into(), "10.0.0.5".into()],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_ca_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("pki"), 0o700);
        assert_eq!(mode("pki/ca.key"), 0o600);
        assert_eq!(mode("pki/server.key"), 0o600);
        let second = pki(dir.path());
        assert_eq!(first.ca_hash(), second.ca_hash());
        assert_eq!(first.cluster_id(), second.cluster_id());
        // The server certificate is new at each start, and ends with the CA (for pinning).
        assert_ne!(first.server_identity().0, second.server_identity().0);
        assert!(second.server_identity().0.ends_with(second.ca_pem()));
        let other = tempfile::tempdir().unwrap();
        assert_ne!(pki(other.path()).ca_hash(), first.ca_hash());
    }

    #[test]
    fn a_ca_certificate_without_its_key_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = pki(dir.path()).ca_pem().to_string();
        std::fs::remove_file(dir.path().join("pki/ca.key")).unwrap();
        let config = PkiConfig {
            dir: dir.path().join("pki"),
            ..Default::default()
        };
        let Err(err) = Pki::load_ca(&config) else {
            panic!("a new CA was made over the existing certificate");
        };
        assert!(format!("{err:#}").contains("ca.key"), "{err:#}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pki/ca.crt")).unwrap(),
            ca_pem
        );
    }

    #[test]
    fn processes_making_the_ca_at_once_all_use_one_ca() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let config = PkiConfig {
                dir: dir.path().join("pki"),
                ..Default::default()
            };
            let hashes = {
                let config = config.clone();
                crate::at_once(4, move || Pki::load_ca(&config).unwrap().ca_hash())
            };
            assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
            assert_eq!(Pki::load_ca(&config).unwrap().ca_hash(), hashes[0]);
            let left: Vec<_> = std::fs::read_dir(&config.dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.ends_with(".tmp"))
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    #[test]
    fn an_existing_ca_and_server_certificate_can_be_configured() {
        let dir = tempfile::tempdir().unwrap();
        let made = pki(dir.path());
        // Another data directory, pointed at the first one's files as "an existing PKI".
        let other = tempfile::tempdir().unwrap();
        let configured = Pki::load_or_create(&PkiConfig {
            dir: other.path().join("pki"),
            ca_cert: Some(dir.path().join("pki/ca.crt")),
            ca_key: Some(dir.path().join("pki/ca.key")),
            server_cert: Some(dir.path().join("pki/server.crt")),
            server_key: Some(dir.path().join("pki/server.key")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(configured.ca_hash(), made.ca_hash());
        assert_eq!(configured.server_identity(), made.server_identity());
        assert!(
            !other.path().join("pki/ca.key").exists(),
            "no CA of its own"
        );
        let half = PkiConfig {
            dir: other.path().join("pki"),
            ca_cert: Some(dir.path().join("pki/ca.crt")),
            ..Default::default()
        };
        let error = Pki::load_or_create(&half).unwrap_err().to_string();
        assert!(error.contains("together"), "{error}");
    }

    #[test]
    fn agent_certificates_name_the_agent_and_only_this_cluster_accepts_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let key = KeyPair::generate().unwrap();
        let mut request = CertificateParams::default();
        // Whatever the agent asks for is ignored: it cannot name itself.
        request.subject_alt_names = vec![SanType::URI(
            agent_uri(pki.cluster_id(), "a-admin").try_into().unwrap(),
        )];
        let csr = request.serialize_request(&key).unwrap().pem().unwrap();
        let issued = pki.sign_agent(&csr, "a-0123456789abcdef").unwrap();
        let der = kiln_proto::tls::certificates(&issued.certificate_pem).unwrap();
        assert_eq!(
            pki.agent_of(der[0].as_ref()).as_deref(),
            Some("a-0123456789abcdef")
        );
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
        assert_eq!(
            cert.public_key().raw,
            x509_parser::parse_x509_certificate(&{
                let params = CertificateParams::default();
                params.self_signed(&key).unwrap().der().to_vec()
            })
            .unwrap()
            .1
            .public_key()
            .raw
        );
        let lifetime = issued.not_after_ms - ms(SystemTime::now());
        assert!((lifetime - DEFAULT_AGENT_CERT_TTL.as_millis() as i64).abs() < 60_000);
        let other = tempfile::tempdir().unwrap();
        assert_eq!(self::pki(other.path()).agent_of(der[0].as_ref()), None);
        assert!(pki.sign_agent("not a csr", "a-1").is_err());
    }
}
