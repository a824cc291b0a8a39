//! Run secrets at rest: sealed with ChaCha20-Poly1305 (ring's AEAD) under a key of the
//! coordinator's own, `DATA_DIR/secrets.key` (32 random bytes, 0600, made on first start).
//! The database holds only sealed bytes (a fresh random nonce, then the ciphertext of the
//! secrets as JSON), so a copy of `kiln.db` — a backup, a file attached to a bug report —
//! reveals no secret without the key file. A run's sealed secrets are erased once it has
//! ended (see `Store::transition`).

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The file name of the key in the data directory.
pub const KEY_FILE: &str = "secrets.key";
const KEY_LEN: usize = 32;

pub struct SecretBox {
    key: LessSafeKey,
    path: PathBuf,
    random: SystemRandom,
}

impl SecretBox {
    /// The key in `path`, made (random, 0600) if there is none yet.
    pub fn load_or_create(path: &Path) -> anyhow::Result<SecretBox> {
        let random = SystemRandom::new();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; KEY_LEN];
                random
                    .fill(&mut bytes)
                    .map_err(|_| anyhow::anyhow!("no randomness for the secrets key"))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("create {}", path.display()))?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                bytes
            }
            Err(error) => {
                return Err(error).with_context(|| format!("read {}", path.display()));
            }
        };
        anyhow::ensure!(
            bytes.len() == KEY_LEN,
            "{} is not a secrets key ({} bytes, not {KEY_LEN}): restore it from a backup, or \
             move it aside to make a new one (runs' stored secrets then cannot be read)",
            path.display(),
            bytes.len()
        );
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| anyhow::anyhow!("{} is not a usable key", path.display()))?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
            path: path.to_path_buf(),
            random,
        })
    }

    /// Seals `secrets`; `None` when there are none (nothing is stored).
    pub fn seal(&self, secrets: &HashMap<String, String>) -> anyhow::Result<Option<Vec<u8>>> {
        if secrets.is_empty() {
            return Ok(None);
        }
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness for a nonce"))?;
        let mut sealed = serde_json::to_vec(secrets)?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut sealed,
            )
            .map_err(|_| anyhow::anyhow!("sealing the secrets failed"))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(Some(out))
    }

    /// Opens what [`SecretBox::seal`] made with this key.
    pub fn open(&self, sealed: &[u8]) -> anyhow::Result<HashMap<String, String>> {
        let refused = || {
            anyhow::anyhow!(
                "the run's stored secrets cannot be opened with {} (the key was replaced, or \
                 the database was changed)",
                self.path.display()
            )
        };
        anyhow::ensure!(sealed.len() > NONCE_LEN, refused());
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut buffer = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut buffer)
            .map_err(|_| refused())?;
        serde_json::from_slice(plain).map_err(|_| refused())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> HashMap<String, String> {
        [("HF_TOKEN".to_string(), "hf_s3cr3t_value".to_string())].into()
    }

    #[test]
    fn secrets_round_trip_and_the_sealed_bytes_do_not_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let sealer = SecretBox::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = sealer.seal(&secrets()).unwrap().unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"s3cr3t"));
        // Two seals of the same secrets differ (a fresh nonce each time).
        assert_ne!(sealed, sealer.seal(&secrets()).unwrap().unwrap());
        // The key is kept: a restarted coordinator opens what it sealed before.
        let again = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), secrets());
        assert_eq!(sealer.seal(&HashMap::new()).unwrap(), None);
    }

    #[test]
    fn another_key_or_a_changed_byte_cannot_open_them() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = SecretBox::load_or_create(&dir.path().join("a.key")).unwrap();
        let other = SecretBox::load_or_create(&dir.path().join("b.key")).unwrap();
        let sealed = sealer.seal(&secrets()).unwrap().unwrap();
        let error = other.open(&sealed).unwrap_err().to_string();
        assert!(error.contains("b.key"), "{error}");
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(sealer.open(&changed).is_err());
        assert!(sealer.open(&sealed[..5]).is_err());
        // A key file that is not one is named.
        std::fs::write(dir.path().join("bad.key"), b"short").unwrap();
        let error = SecretBox::load_or_create(&dir.path().join("bad.key"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("bad.key") && error.contains("not a secrets key"),
            "{error}"
        );
    }
}
