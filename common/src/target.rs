//! Compute target names: the one place that decides what a valid name is.

use std::fmt;
use std::str::FromStr;

/// The target that `kiln submit` uses when no coordinator is configured.
pub const LOCAL_TARGET: &str = "local";

/// A validated compute target name: 2–16 characters, lowercase ASCII letters, digits or '-',
/// starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "target name `{name}` is invalid: {reason}; use 2–16 lowercase letters, digits or '-', starting with a letter (e.g. `gpu-a100`)"
)]
pub struct InvalidTargetName {
    pub name: String,
    pub reason: &'static str,
}

impl TargetName {
    pub fn new(name: &str) -> Result<TargetName, InvalidTargetName> {
        let invalid = |reason| InvalidTargetName {
            name: name.to_string(),
            reason,
        };
        let n_chars = name.chars().count();
        if n_chars < 2 {
            return Err(invalid("it is shorter than 2 characters"));
        }
        if n_chars > 16 {
            return Err(invalid("it is longer than 16 characters"));
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(invalid("it does not start with a lowercase letter"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(
                "it contains a character other than a-z, 0-9 or '-'",
            ));
        }
        Ok(TargetName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TargetName {
    type Err = InvalidTargetName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetName::new(s)
    }
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, expected: Result<(), &str>) {
        let got = TargetName::new(name).map(|_| ()).map_err(|e| e.reason);
        assert_eq!(got, expected, "name {name:?}");
    }

    #[test]
    fn target_names() {
        check("gpu", Ok(()));
        check("gpu-a100", Ok(()));
        check("a1", Ok(()));
        check("abcdefghijklmnop", Ok(()));
        check("a", Err("it is shorter than 2 characters"));
        check("", Err("it is shorter than 2 characters"));
        check("abcdefghijklmnopq", Err("it is longer than 16 characters"));
        check("1gpu", Err("it does not start with a lowercase letter"));
        check("-gpu", Err("it does not start with a lowercase letter"));
        check("Gpu", Err("it does not start with a lowercase letter"));
        check(
            "gpu_a",
            Err("it contains a character other than a-z, 0-9 or '-'"),
        );
        check(
            "gpU",
            Err("it contains a character other than a-z, 0-9 or '-'"),
        );
        check(
            "gpué",
            Err("it contains a character other than a-z, 0-9 or '-'"),
        );
    }

    #[test]
    fn message_tells_what_to_do() {
        let message = TargetName::new("Bad_Name!").unwrap_err().to_string();
        assert!(message.contains("`Bad_Name!`"), "{message}");
        assert!(message.contains("2–16 lowercase letters"), "{message}");
    }
}
