//! The client side of Kiln's TLS: what a client trusts (the coordinator's CA, or only a
//! pinned SHA-256 of it while it has not got the CA yet), and the certificate it presents
//! (agents). Servers and certificates are made in `kiln-coordinator` (`pki.rs`).
//!
//! Pinning works as kubeadm's discovery hash: the coordinator sends its CA certificate at
//! the end of its chain; [`PinnedCa`] accepts the connection only if that CA's SHA-256 is
//! the pin, and then verifies the server's certificate against it like any other root
//! (signature, validity, host name). Nothing is trusted before the pin matched.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};

/// What a client trusts as the coordinator's CA.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The CA certificate(s), PEM: the normal case once joined or logged in.
    CaPem(String),
    /// Only the SHA-256 of the CA certificate's DER (`kiln-agent join --ca-hash`, `kiln login
    /// --ca-hash`).
    Pinned([u8; 32]),
}

/// A client's TLS settings.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub trust: Trust,
    /// The client certificate chain and key, PEM (agents only).
    pub identity: Option<(String, String)>,
}

impl ClientTls {
    pub fn trusting(trust: Trust) -> ClientTls {
        ClientTls {
            trust,
            identity: None,
        }
    }

    pub(crate) fn configure(
        &self,
        endpoint: tonic::transport::Endpoint,
        host: &str,
    ) -> anyhow::Result<tonic::transport::Endpoint> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new()
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
            .assume_http2(true)
            .timeout(std::time::Duration::from_secs(10));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        let endpoint = match &self.trust {
            Trust::CaPem(pem) => {
                anyhow::ensure!(
                    !certificates(pem)?.is_empty(),
                    "the CA file holds no PEM certificate"
                );
                endpoint.tls_config(config.ca_certificate(Certificate::from_pem(pem)))
            }
            Trust::Pinned(pin) => {
                endpoint.tls_config_with_verifier(config, Arc::new(PinnedCa::new(*pin, provider())))
            }
        };
        endpoint.context("configure TLS")
    }
}

/// Makes ring the process's rustls provider. Both providers are compiled in (rattler's HTTP
/// stack brings aws-lc-rs), so rustls cannot pick one by itself; every binary calls this
/// first thing. Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider Kiln uses everywhere (ring), whether or not one was installed as the
/// process default.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The SHA-256 of a certificate's DER, as `sha256:HEX` (what `token create` prints).
pub fn ca_hash(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Parses `sha256:HEX` (or bare HEX) into the pin.
pub fn parse_ca_hash(text: &str) -> anyhow::Result<[u8; 32]> {
    let hex_part = text.trim().strip_prefix("sha256:").unwrap_or(text.trim());
    let bytes = hex::decode(hex_part).ok().filter(|b| b.len() == 32);
    let bytes = bytes.with_context(|| {
        format!(
            "`{text}` is not a CA hash: expected sha256: and 64 hex digits, as `kiln-coordinator \
             token create` prints it"
        )
    })?;
    Ok(bytes.try_into().expect("32 bytes"))
}

/// The certificates in a PEM text.
pub fn certificates(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parse PEM certificates")
}

/// The hash of the first certificate of `pem`, `sha256:HEX`.
pub fn pem_ca_hash(pem: &str) -> anyhow::Result<String> {
    let certs = certificates(pem)?;
    let first = certs.first().context("no PEM certificate")?;
    Ok(ca_hash(first))
}

/// Trusts a server whose chain ends in the CA with the pinned hash, verified against that
/// CA as the only root.
#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    pub fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> PinnedCa {
        PinnedCa { pin, provider }
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| Sha256::digest(cert.as_ref()).as_slice() == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA certificate does not have the pinned hash (--ca-hash): \
                     check the hash, or someone is in the middle"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|error| rustls::Error::General(error.to_string()))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|cert| cert.as_ref() != ca.as_ref())
            .cloned()
            .collect();
        verifier.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_hashes_parse_with_or_without_their_prefix() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_ca_hash(&format!("sha256:{hex}")).unwrap(), [0xab; 32]);
        assert_eq!(parse_ca_hash(&hex).unwrap(), [0xab; 32]);
        for bad in ["", "sha256:", "sha256:abcd", &"zz".repeat(32)] {
            let error = parse_ca_hash(bad).unwrap_err().to_string();
            assert!(error.contains("not a CA hash"), "{error}");
        }
    }
}
