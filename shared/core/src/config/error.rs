//! What a refused configuration looks like: the load error of a role, and the [`Problem`]s the
//! checks find, each naming the dotted key it is about.

use std::fmt;
use std::path::PathBuf;

/// A configuration a role refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment does not parse into [`Settings`](super::Settings): a wrong type,
    /// an unknown key, a missing required key.
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// The configuration file named on the command line is missing.
    #[error("invalid configuration: config file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    /// The values parse but break a rule of [`Settings::validate`](super::Settings::validate);
    /// every problem found is listed.
    #[error("invalid configuration: {}", Listed(.0))]
    Invalid(Vec<Problem>),
}

/// One refused setting: its dotted key (`worker.concurrency`, `tenants[acme].weight`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the setting; list entries are named by their `name` or `id`.
    pub key: String,
    /// What is wrong with its value, e.g. `must be at least 1`.
    pub reason: String,
}

impl Problem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Problems on one line, as a role's start-up error prints them.
struct Listed<'a>(&'a [Problem]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
