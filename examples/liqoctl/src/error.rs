//! What went wrong and what to do next.

use std::fmt;

/// A failed command: what failed and, when known, what to do next.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command ran and failed (exit code 1).
    #[error("{what}")]
    Failed {
        /// What failed, naming the object or step.
        what: String,
        /// What to check or do next.
        next: Option<String>,
    },
    /// The command line was wrong in a way clap could not tell (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// A failure with a hint.
    pub fn failed(what: impl fmt::Display, next: impl fmt::Display) -> Self {
        Self::Failed {
            what: what.to_string(),
            next: Some(next.to_string()),
        }
    }

    /// A failure without a hint.
    pub fn plain(what: impl fmt::Display) -> Self {
        Self::Failed {
            what: what.to_string(),
            next: None,
        }
    }

    /// The process exit code: 1 for failures, 2 for usage errors.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Failed { .. } => 1,
            Self::Usage(_) => 2,
        }
    }

    /// Prints the error (and the hint) to stderr.
    pub fn print(&self) {
        match self {
            Self::Failed { what, next } => {
                eprintln!("error: {what}");
                if let Some(next) = next {
                    eprintln!("next:  {next}");
                }
            }
            Self::Usage(m) => eprintln!("error: {m}\n\nFor more information, try '--help'."),
        }
    }
}
