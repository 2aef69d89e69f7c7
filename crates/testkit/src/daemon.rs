//! A real `supervisor run` in a temp dir with its own cgroup parent, runtime and state dirs, so
//! daemon tests run in parallel without touching each other. Dropping it kills what is left.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use belljar_host::cgroup::{self, CgroupBackend};
use serde_json::Value;

use crate::{Run, TestDir, bin, run_cmd, wait_for};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long a daemon test waits for a state (tiny models load in milliseconds).
pub const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub runtime: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    /// `--cgroup-parent`, relative to the hierarchy root.
    pub parent_rel: String,
    pub cgroups: Box<dyn CgroupBackend>,
    pub stderr_path: PathBuf,
}

/// A cgroup parent name unique to this test process and call.
pub fn unique_parent(tag: &str) -> String {
    format!(
        "belljar-test-{}-{tag}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Daemon {
    /// Writes `config` to `t/budgets.toml` and starts `supervisor run --mode MODE` on it.
    pub fn start(t: &TestDir, config: &str, mode: &str, env: &[(&str, &str)]) -> Daemon {
        let parent_rel = unique_parent(mode);
        Self::start_with_parent(t, config, mode, env, parent_rel)
    }

    pub fn start_with_parent(
        t: &TestDir,
        config: &str,
        mode: &str,
        env: &[(&str, &str)],
        parent_rel: String,
    ) -> Daemon {
        Self::start_wrapped(t, config, mode, env, parent_rel, &[])
    }

    /// As [`Daemon::start_with_parent`], with the supervisor started through `wrapper` (for
    /// example `nsenter -m -t PID --`).
    pub fn start_wrapped(
        t: &TestDir,
        config: &str,
        mode: &str,
        env: &[(&str, &str)],
        parent_rel: String,
        wrapper: &[&str],
    ) -> Daemon {
        let launch = Launch {
            env,
            wrapper,
            ..Launch::default()
        };
        Self::spawn(t, config, mode, parent_rel, launch)
    }

    /// As [`Daemon::start`], with `extra` arguments for `supervisor run` (`--worker FAKE`).
    pub fn start_with_args(
        t: &TestDir,
        config: &str,
        mode: &str,
        extra: &[&std::ffi::OsStr],
    ) -> Daemon {
        let launch = Launch {
            extra,
            ..Launch::default()
        };
        Self::spawn(t, config, mode, unique_parent(mode), launch)
    }

    /// As [`Daemon::start`], with the supervisor's stdout and stderr given (for example a pipe
    /// whose reader is gone); [`Daemon::stderr`] is then empty.
    pub fn start_with_output(
        t: &TestDir,
        config: &str,
        mode: &str,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Daemon {
        let launch = Launch {
            output: Some((stdout, stderr)),
            ..Launch::default()
        };
        Self::spawn(t, config, mode, unique_parent(mode), launch)
    }

    fn spawn(t: &TestDir, config: &str, mode: &str, parent_rel: String, launch: Launch) -> Daemon {
        let Launch {
            env,
            wrapper,
            output,
            extra,
        } = launch;
        let config_path = t.write("budgets.toml", config);
        let runtime = t.join("run");
        let state = t.join("state");
        let stderr_path = t.join(&format!(
            "supervisor-{}.stderr",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let (stdout, stderr) = match output {
            Some(o) => o,
            None => (
                Stdio::null(),
                std::fs::File::create(&stderr_path)
                    .expect("stderr file")
                    .into(),
            ),
        };
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("supervisor"));
                c
            }
            None => Command::new(bin("supervisor")),
        };
        cmd.args([
            "run",
            "--mode",
            mode,
            "--cgroup-parent",
            &parent_rel,
            "--config",
        ])
        .arg(&config_path)
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
        // Tests read the log from stderr, also on machines where journald is reachable.
        cmd.env("BELLJAR_LOG_FORMAT", "text");
        // Every test daemon serves its HTTP API on a free port of its own (`http_addr`), unless
        // the test says otherwise (`BELLJAR_HTTP` in `env`; empty: unset, the config decides).
        cmd.env("BELLJAR_HTTP", "127.0.0.1:0");
        // Its own process group, as a shell job is: a test can signal the group like a terminal.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        for (k, v) in env {
            if *k == "BELLJAR_HTTP" && v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().expect("spawn supervisor");

        Daemon {
            child,
            runtime,
            state,
            config: config_path,
            parent_rel,
            cgroups: cgroup::detect(None).expect("a cgroup memory controller"),
            stderr_path,
        }
    }

    /// The absolute cgroup parent directory.
    pub fn parent(&self) -> PathBuf {
        self.cgroups.root().join(&self.parent_rel)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs a CLI subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> Run {
        run_cmd(
            Command::new(bin("supervisor"))
                .args(args)
                .arg("--runtime-dir")
                .arg(&self.runtime)
                .arg("--config")
                .arg(&self.config),
        )
    }

    /// Where its HTTP API listens (`http_addr` in status), once the daemon answers.
    pub fn http_addr(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(a) = self
                .status()
                .and_then(|s| s["http_addr"].as_str().map(str::to_owned))
            {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no http_addr in status; log:\n{}",
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `status --json`, or None while the daemon is not reachable.
    pub fn status(&self) -> Option<Value> {
        let r = self.cli(&["status", "--json"]);
        (r.code == Some(0)).then(|| serde_json::from_str(&r.stdout).expect("status --json is JSON"))
    }

    /// Polls status until `pred` holds; panics with the last status and the log otherwise.
    #[track_caller]
    pub fn wait_status(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_status_for(what, SETTLE, pred)
    }

    /// [`Daemon::wait_status`] with its own deadline, for states that take long on a loaded
    /// machine (a thrashing model's first tokens).
    #[track_caller]
    pub fn wait_status_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "the supervisor exited ({exit}) while waiting for {what}; log:\n{}",
                    self.stderr()
                );
            }
            if let Some(status) = self.status() {
                if pred(&status) {
                    return status;
                }
                last = Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {last:#?}\nlog:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    pub fn wait(&mut self) -> ExitStatus {
        wait_for("the supervisor to exit", SETTLE, || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = cgroup::destroy(&*self.cgroups, &self.parent(), Duration::from_secs(5));
    }
}

/// How a test's supervisor is started beyond its config and mode.
#[derive(Default)]
struct Launch<'a> {
    env: &'a [(&'a str, &'a str)],
    /// A command the supervisor runs under (`nsenter -m -t PID --`).
    wrapper: &'a [&'a str],
    /// Its stdout and stderr; by default none and a file ([`Daemon::stderr`]).
    output: Option<(Stdio, Stdio)>,
    /// More arguments for `supervisor run`.
    extra: &'a [&'a std::ffi::OsStr],
}

/// Every instance in `status` is in `state`.
pub fn all_in(status: &Value, state: &str) -> bool {
    status["instances"]
        .as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(|i| i["state"] == state))
}

/// The instance named `name` in a status report.
pub fn instance<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no instance {name} in {status:#}"))
}

/// Asserts the ledger agrees with the kernel: every instance holding an allocation with a live
/// worker has exactly that limit in its cgroup's limit file, and the budget's total is the sum.
#[track_caller]
pub fn assert_ledger_matches_cgroups(d: &Daemon, status: &Value) {
    let v1 = d.cgroups.version() == cgroup::Version::V1;
    let mut sum = 0;
    for i in status["instances"].as_array().expect("instances") {
        let allocated = i["allocated"].as_u64().expect("allocated");
        sum += allocated;
        if i["pid"].is_null() {
            continue;
        }
        let dir = d.parent().join(i["name"].as_str().expect("name"));
        let file = dir.join(if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        });
        let limit: u64 = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(
            limit, allocated,
            "{}: the cgroup's limit is the ledger's allocation",
            i["name"]
        );
    }
    assert_eq!(
        status["budget"]["allocated"], sum,
        "the ledger total is the sum of allocations"
    );
}

/// Zombie children of the supervisor (there should be none once things settle).
pub fn zombies_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            let rest = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim().to_owned())
                .unwrap_or_default();
            let mut fields = rest.split_whitespace();
            fields.next() == Some("Z")
                && fields.next().and_then(|pp| pp.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}
