//! The worker's exit codes and what each one means to the supervisor: the one table both sides
//! use (docs/protocol.md). Values follow sysexits.h so they read the same in `systemctl status`
//! and shell scripts. "Temporary" means try again when memory is free; "permanent" means
//! retrying cannot help.

/// Clean shutdown, or a one-shot command that succeeded.
pub const OK: u8 = 0;
/// Permanent: bad arguments (a bad flag, a zero ctx, an impossible model shape).
pub const USAGE: u8 = 64;
/// Permanent: the model file is missing, truncated or not GGUF.
pub const BAD_MODEL: u8 = 65;
/// Permanent: the file is GGUF but llama.cpp cannot load it (unsupported architecture...).
pub const UNSUPPORTED_MODEL: u8 = 69;
/// A failure to retry: loading or running with layers on a GPU failed (GPU memory allocation).
/// The supervisor retries with backoff and, after 3 of these, runs the instance on the CPU.
pub const GPU_ALLOC: u8 = 71;
/// I/O error: make-model cannot write its output, or serve cannot move an unusable session's
/// files aside; a plain failure to the supervisor (retried).
pub const IO_ERROR: u8 = 74;
/// Temporary: the pre-load memory check refused (retry when memory is free).
pub const TEMPORARY: u8 = 75;
/// Permanent: the supervisor speaks another protocol version (or no protocol at all).
pub const PROTOCOL: u8 = 76;

/// What an exit code means to the supervisor's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 0: the worker ended cleanly.
    Clean,
    /// 64, 65, 69, 76: retrying cannot help; the instance is `failed`.
    Permanent,
    /// 75: the pre-load check refused; wait for memory (not counted as a start).
    Temporary,
    /// 71: a GPU allocation failed; a failure, counted toward the CPU fallback.
    GpuAlloc,
    /// Anything else (74 included): a failure, retried with backoff.
    Failure,
}

impl ExitKind {
    /// The class as docs/protocol.md's table spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::Clean => "clean",
            ExitKind::Permanent => "permanent",
            ExitKind::Temporary => "temporary",
            ExitKind::GpuAlloc => "gpu-alloc",
            ExitKind::Failure => "failure",
        }
    }
}

/// Every documented code with its kind and meaning, for docs and `--help`.
pub const TABLE: [(u8, ExitKind, &str); 8] = [
    (OK, ExitKind::Clean, "clean shutdown"),
    (USAGE, ExitKind::Permanent, "bad arguments"),
    (
        BAD_MODEL,
        ExitKind::Permanent,
        "model file missing, truncated or not GGUF",
    ),
    (
        UNSUPPORTED_MODEL,
        ExitKind::Permanent,
        "llama.cpp cannot load the model",
    ),
    (
        GPU_ALLOC,
        ExitKind::GpuAlloc,
        "GPU memory allocation failed",
    ),
    (
        IO_ERROR,
        ExitKind::Failure,
        "I/O error: cannot write an output file (make-model) or set an unusable session aside",
    ),
    (
        TEMPORARY,
        ExitKind::Temporary,
        "the pre-load memory check refused",
    ),
    (PROTOCOL, ExitKind::Permanent, "protocol mismatch"),
];

/// The kind of a worker's exit code.
pub fn kind(code: i32) -> ExitKind {
    match u8::try_from(code) {
        Ok(c) => TABLE
            .iter()
            .find(|(v, _, _)| *v == c)
            .map_or(ExitKind::Failure, |(_, k, _)| *k),
        Err(_) => ExitKind::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_kind() {
        assert_eq!(kind(0), ExitKind::Clean);
        for c in [64, 65, 69, 76] {
            assert_eq!(kind(c), ExitKind::Permanent, "{c}");
        }
        assert_eq!(kind(75), ExitKind::Temporary);
        assert_eq!(kind(71), ExitKind::GpuAlloc);
        for c in [1, 74, 101, 255, -1, 1000] {
            assert_eq!(kind(c), ExitKind::Failure, "{c}");
        }
        let mut codes: Vec<u8> = TABLE.iter().map(|t| t.0).collect();
        codes.dedup();
        assert_eq!(codes.len(), TABLE.len());
    }

    /// docs/protocol.md's exit-code table is this table: same codes, same classes, same order.
    #[test]
    fn the_documented_table_is_this_one() {
        let doc = include_str!("../../../docs/protocol.md");
        let section = doc
            .split("## Worker exit codes")
            .nth(1)
            .expect("docs/protocol.md has a Worker exit codes section");
        let rows: Vec<(u8, &str)> = section
            .lines()
            .skip_while(|l| !l.starts_with("|---"))
            .skip(1)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let mut cells = l.split('|').skip(1).map(str::trim);
                let code = cells.next().unwrap().parse().unwrap();
                (code, cells.next().unwrap())
            })
            .collect();
        let ours: Vec<(u8, &str)> = TABLE.iter().map(|(c, k, _)| (*c, k.as_str())).collect();
        assert_eq!(rows, ours);
    }
}
