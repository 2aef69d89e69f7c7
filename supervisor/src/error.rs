//! Exit codes (documented in docs/operations.md) and the error that carries one.

use std::process::ExitCode;

/// The supervisor's exit codes. Scripts and systemd (`RestartPreventExitStatus=2`) rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Everything went as asked.
    Ok = 0,
    /// Refused: the mode does not fit, a pre-check refused, an unknown instance.
    Refused = 1,
    /// Usage or config error: fix the command line or the config; retrying cannot help.
    Usage = 2,
    /// The daemon could not be reached.
    Unreachable = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// A failure of a subcommand, printed as `error: ...` on stderr with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Refused(_) => Exit::Refused,
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable(_) => Exit::Unreachable,
        }
    }
}

impl From<belljar_config::ConfigError> for CliError {
    fn from(e: belljar_config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}
