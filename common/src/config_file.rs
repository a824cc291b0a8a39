//! Reading the daemons' TOML config files: one implementation for every `Settings` type.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::de::DeserializeOwned;

/// Parses a config file's text; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &Path) -> anyhow::Result<T> {
    toml::from_str(text).with_context(|| format!("config file {}", origin.display()))
}

/// Reads the config file: `explicit` (which must exist) or else `default` when it exists.
/// Returns the path read, if any, and its settings (`T::default()` when no file is read).
pub fn load<T: DeserializeOwned + Default>(
    explicit: Option<&Path>,
    default: &Path,
) -> anyhow::Result<(Option<PathBuf>, T)> {
    let path = match explicit {
        Some(path) => path,
        None if default.exists() => default,
        None => return Ok((None, T::default())),
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    Ok((Some(path.to_path_buf()), parse(&text, path)?))
}
