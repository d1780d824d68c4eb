//! The agent's configuration file: strict YAML, every problem reported with the
//! key's path and a hint, all at once.
//!
//! [`schema`] holds the types and their defaults, [`validate`] the checks a
//! well-formed file must still pass, [`messages`] the translation of the YAML
//! decoder's errors into a key path and what to write instead.

mod decode;
mod messages;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::model::{AccessMode, VolumeMode};
pub use schema::{BlankCheck, Class, ClassKind, CleanupMethod, Config, FsType, Selector};

/// Exit code for any configuration problem.
pub const EXIT_CONFIG: i32 = 2;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `classes[0].selector.minSize`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass an existing file with --config)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid:\n{}", list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}
impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates; returns every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        let cfg = messages::decode(text).map_err(|p| vec![p])?;
        let problems = validate::validate(&cfg);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }
}
