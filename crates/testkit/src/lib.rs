//! Dev-only helpers for the end-to-end tests: finding the built binaries, temp dirs with a
//! generated model and a config, running a binary and capturing what it said.

pub mod daemon;
pub mod http;
pub mod link;
pub mod raw;
pub mod real;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use belljar_gguf::ModelShape;

/// The directory holding the built binaries: the test executable lives in `<dir>/deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe
        .parent()
        .expect("test executables live in target/<profile>/deps");
    deps.parent().expect("target/<profile>").to_path_buf()
}

/// Path of a workspace binary; panics with the fix when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --release --workspace --bins` \
         (the tests run them as a user would)",
        path.display()
    );
    path
}

/// A temp directory for one test, removed when dropped.
#[derive(Debug)]
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    /// A fresh temp dir, 0711: workers run as `belljar-worker` by default and must pass through
    /// it to the models the test writes (files 0644, dirs 0755 under the usual umask).
    pub fn new() -> TestDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("belljar-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod the temp dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `text` to `rel` (creating parent dirs) and returns its path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, text).expect("write test file");
        path
    }

    /// Generates a model of `shape` at `rel` through the same generator `worker make-model` uses.
    pub fn model(&self, rel: &str, shape: &ModelShape) -> PathBuf {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        let file = std::fs::File::create(&path).expect("create model file");
        shape
            .write(std::io::BufWriter::new(file))
            .expect("write model");
        path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// A small model that loads in milliseconds.
pub fn tiny_shape() -> ModelShape {
    ModelShape {
        layers: 1,
        width: 64,
        ff: 128,
        heads: 2,
        kv_heads: 2,
        vocab: 300,
        context_length: 512,
        f16: false,
        seed: 1,
    }
}

/// A ~16 MiB model whose KV cache outgrows its file at long contexts (4 layers of width 256:
/// 4 MiB of f16 KV per 1024 cells), for OOM and estimate tests.
pub fn kv_heavy_shape(context_length: u32, seed: u64) -> ModelShape {
    ModelShape {
        layers: 4,
        width: 256,
        ff: 768,
        heads: 4,
        kv_heads: 4,
        vocab: 1024,
        context_length,
        f16: false,
        seed,
    }
}

/// What a finished process said.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code and that nothing panicked; returns self for more checks.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked:\n{}",
            self.stderr
        );
        self
    }

    /// Asserts that stdout or stderr contains each of `needles`.
    #[track_caller]
    pub fn expect_says(&self, needles: &[&str]) -> &Run {
        for n in needles {
            assert!(
                self.stdout.contains(n) || self.stderr.contains(n),
                "expected output to contain {n:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout,
                self.stderr
            );
        }
        self
    }
}

/// Runs a built binary with `args` and waits for it.
pub fn run(name: &str, args: &[&str]) -> Run {
    run_cmd(Command::new(bin(name)).args(args))
}

pub fn run_cmd(cmd: &mut Command) -> Run {
    Run::from(cmd.output().expect("spawn the binary"))
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout` naming `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel's OOM kills so far, machine-wide (`oom_kill` in /proc/vmstat). On cgroup v1 a kill
/// is counted in the victim's own cgroup only, so tests that must see every kill compare this
/// (and run in the `serial_` group, so the count is theirs).
pub fn kernel_oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .expect("/proc/vmstat")
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .expect("an oom_kill line in /proc/vmstat")
}
