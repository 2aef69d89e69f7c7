//! Where the supervisor keeps its runtime files (sockets, lock) and state (persisted
//! instances, sessions). Precedence: flag > BELLJAR_* variable > systemd's
//! `$RUNTIME_DIRECTORY` / `$STATE_DIRECTORY` (for `run` only) > the default.

use std::path::PathBuf;

pub const DEFAULT_RUNTIME_DIR: &str = "/run/belljar";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/belljar";

/// Picks a directory. `flag_or_env` is what clap resolved from the flag and the BELLJAR_*
/// variable; `systemd` is the value of `$RUNTIME_DIRECTORY` / `$STATE_DIRECTORY`, consulted only
/// by `run` (a CLI command beside the daemon must not follow a unit's private variable).
pub fn resolve(
    flag_or_env: Option<PathBuf>,
    systemd: Option<String>,
    is_run: bool,
    default: &str,
) -> PathBuf {
    flag_or_env
        .or_else(|| {
            // systemd passes a colon-separated list when several directories are configured.
            systemd.filter(|_| is_run).and_then(|s| {
                s.split(':')
                    .next()
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            })
        })
        .unwrap_or_else(|| PathBuf::from(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            resolve(p("/flag"), Some("/sd".into()), true, "/def"),
            PathBuf::from("/flag")
        );
        assert_eq!(
            resolve(None, Some("/sd:/other".into()), true, "/def"),
            PathBuf::from("/sd")
        );
        assert_eq!(
            resolve(None, Some("/sd".into()), false, "/def"),
            PathBuf::from("/def"),
            "only run follows systemd"
        );
        assert_eq!(resolve(None, None, true, "/def"), PathBuf::from("/def"));
    }
}
