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

/// Every stored login and which one commands use when no coordinator is named. The file
/// of older versions held one [`Credentials`] at its top level; it reads as a store with
/// that one login, current.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// The coordinator of the login in use; empty: none (the local target).
    #[serde(default)]
    pub current: String,
    #[serde(default, rename = "login")]
    pub logins: Vec<Credentials>,
}

impl Store {
    /// The login for `coordinator` (as `Address` normalises it), if stored.
    pub fn for_coordinator(&self, coordinator: &kiln_proto::Address) -> Option<&Credentials> {
        self.logins.iter().find(|login| {
            kiln_proto::Address::parse(&login.coordinator).ok().as_ref() == Some(coordinator)
        })
    }

    /// The login commands use when no coordinator is named.
    pub fn current(&self) -> Option<&Credentials> {
        let current = kiln_proto::Address::parse(&self.current).ok()?;
        self.for_coordinator(&current)
    }

    /// Adds (or replaces) the login for its coordinator and makes it current.
    pub fn log_in(&mut self, credentials: Credentials) {
        let address = kiln_proto::Address::parse(&credentials.coordinator).ok();
        self.logins
            .retain(|login| kiln_proto::Address::parse(&login.coordinator).ok() != address);
        self.current = credentials.coordinator.clone();
        self.logins.push(credentials);
    }

    /// Forgets the login for `coordinator` (the current one when `None`); returns it. When
    /// the current login goes, no login is current (commands go to the local target).
    pub fn log_out(&mut self, coordinator: Option<&kiln_proto::Address>) -> Option<Credentials> {
        let wanted = match coordinator {
            Some(address) => address.clone(),
            None => kiln_proto::Address::parse(&self.current).ok()?,
        };
        let index = self.logins.iter().position(|login| {
            kiln_proto::Address::parse(&login.coordinator).ok().as_ref() == Some(&wanted)
        })?;
        let removed = self.logins.remove(index);
        if kiln_proto::Address::parse(&self.current).ok().as_ref() == Some(&wanted) {
            self.current.clear();
        }
        Some(removed)
    }
}

/// The stored logins (none when the file does not exist).
pub fn load() -> anyhow::Result<Store> {
    let path = path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Store::default()),
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    parse(&text).with_context(|| format!("parse {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Store> {
    if let Ok(single) = toml::from_str::<Credentials>(text) {
        return Ok(Store {
            current: single.coordinator.clone(),
            logins: vec![single],
        });
    }
    Ok(toml::from_str(text)?)
}

/// Stores the logins, readable by this user only.
pub fn save(store: &Store) -> anyhow::Result<PathBuf> {
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
    file.write_all(toml::to_string(store)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(coordinator: &str, user: &str) -> Credentials {
        Credentials {
            coordinator: coordinator.into(),
            user: user.into(),
            token: format!("{user}.secret"),
            ca: String::new(),
        }
    }

    #[test]
    fn logins_to_several_coordinators_are_kept_and_the_old_file_still_reads() {
        let old = toml::to_string(&login("https://a.example:7070", "ana")).unwrap();
        let mut store = parse(&old).unwrap();
        assert_eq!(store.current().unwrap().user, "ana");
        store.log_in(login("https://b.example:7070", "bo"));
        assert_eq!(store.current().unwrap().user, "bo");
        let a = kiln_proto::Address::parse("https://a.example:7070").unwrap();
        assert_eq!(store.for_coordinator(&a).unwrap().user, "ana");
        // Logging in again to one replaces its login only.
        store.log_in(login("https://a.example:7070", "ana2"));
        assert_eq!(store.logins.len(), 2);
        let reread = parse(&toml::to_string(&store).unwrap()).unwrap();
        assert_eq!(reread, store);
        // Logging out of the current one leaves the other stored, none current.
        assert_eq!(store.log_out(None).unwrap().user, "ana2");
        assert!(store.current().is_none());
        let b = kiln_proto::Address::parse("https://b.example:7070").unwrap();
        assert_eq!(store.for_coordinator(&b).unwrap().user, "bo");
        assert!(store.log_out(Some(&a)).is_none());
    }
}
