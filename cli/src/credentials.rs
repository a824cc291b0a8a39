//! The user's credentials: `kiln login` stores the coordinator, the API token and the
//! coordinator's CA in `$XDG_CONFIG_HOME/kiln/credentials.toml` (0600, in a 0700
//! directory); every later command reads them. `KILN_TOKEN` and `KILN_CA_FILE` override the
//! token and the CA for one command (scripts, CI).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub coordinator: String,
    pub user: String,
    pub token: String,
    /// The coordinator's CA certificate, PEM (checked against the pinned hash at login).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca: String,
}

pub fn path() -> anyhow::Result<PathBuf> {
    let dir = dirs::config_dir()
        .context("no configuration directory ($HOME is not set): set XDG_CONFIG_HOME")?;
    Ok(dir.join("kiln").join("credentials.toml"))
}

/// The stored credentials, if any.
pub fn load() -> anyhow::Result<Option<Credentials>> {
    let path = path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    let credentials = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    Ok(Some(credentials))
}

/// Stores the credentials, readable by this user only.
pub fn save(credentials: &Credentials) -> anyhow::Result<PathBuf> {
    let path = path()?;
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    file.write_all(toml::to_string(credentials)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Deletes the stored credentials; false when there were none.
pub fn remove() -> anyhow::Result<bool> {
    match std::fs::remove_file(path()?) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error.into()),
    }
}
