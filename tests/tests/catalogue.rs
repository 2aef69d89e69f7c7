//! The bad-input catalogue (issue 17, "beyond the list"): one table per way input reaches
//! belljar — budgets.toml, the command line, raw control-socket frames, worker-link frames from
//! a fake worker under a real daemon, GGUF files and session files — each row a hostile or broken
//! input with what must happen: the exit code or error reply, a needle the message must contain
//! naming the problem, no panic (never exit 101, no "panicked", a daemon still answers `status`)
//! and no state change (the state dir's files, instances.json, status and the cgroups as
//! before; nothing started where nothing should be).
//!
//! A table runs every row and fails once at the end with the list of rows that failed, so one
//! broken row never hides another. A row whose input could hang (a FIFO) runs under a deadline.
//! Needles: every needle must appear; `a|b` means either.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use belljar_testkit::daemon::{Daemon, all_in, instance, unique_parent};
use belljar_testkit::raw::{
    RawReply, control_raw, frame, run_with_timeout, snapshot, snapshot_diff, subdirs,
};
use belljar_testkit::{Run, TestDir, bin, tiny_shape};
use serde_json::Value;

/// How long a CLI row may take before it counts as a hang.
const DEADLINE: Duration = Duration::from_secs(10);

// --- the verdicts of one table ----------------------------------------------------------------

/// The rows of one table that failed, reported together at the end.
#[derive(Debug)]
struct Verdicts {
    table: &'static str,
    passed: usize,
    failed: Vec<String>,
}

impl Verdicts {
    fn new(table: &'static str) -> Verdicts {
        Verdicts {
            table,
            passed: 0,
            failed: Vec::new(),
        }
    }

    fn record(&mut self, case: &str, verdict: Result<(), String>) {
        match verdict {
            Ok(()) => {
                self.passed += 1;
                eprintln!("ok    {}/{case}", self.table);
            }
            Err(why) => {
                eprintln!("FAIL  {}/{case}: {why}", self.table);
                self.failed.push(format!("{case}: {why}"));
            }
        }
    }

    #[track_caller]
    fn finish(self) {
        let total = self.passed + self.failed.len();
        eprintln!("{}: {} of {total} rows passed", self.table, self.passed);
        assert!(
            self.failed.is_empty(),
            "{} of {total} {} rows failed:\n{}",
            self.failed.len(),
            self.table,
            self.failed.join("\n")
        );
    }
}

/// The first `n` characters of `s`, on one line, for failure reports.
fn short(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(700) {
        Some((i, _)) => format!("{}…", &one[..i]),
        None => one,
    }
}

/// Every needle (`a|b`: either) is in `text`.
fn says(text: &str, needles: &[&str]) -> Result<(), String> {
    for n in needles {
        if !n.split('|').any(|alt| text.contains(alt)) {
            return Err(format!(
                "the message does not mention {n:?}: {}",
                short(text)
            ));
        }
    }
    Ok(())
}

/// The exit code, the needles and no panic.
fn judge(r: &Run, timed_out: bool, code: i32, needles: &[&str]) -> Result<(), String> {
    let all = format!("{}\n{}", r.stderr, r.stdout);
    if timed_out {
        return Err(format!(
            "hung: killed after {DEADLINE:?}; said: {}",
            short(&all)
        ));
    }
    if r.code == Some(101) || all.contains("panicked") {
        return Err(format!("panicked ({:?}): {}", r.code, short(&all)));
    }
    if r.code != Some(code) {
        return Err(format!(
            "exit {:?}, expected {code}; said: {}",
            r.code,
            short(&all)
        ));
    }
    says(&all, needles)
}

fn supervisor(args: &[&str]) -> Command {
    let mut c = Command::new(bin("supervisor"));
    c.args(args).env("BELLJAR_LOG_FORMAT", "text");
    c
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the catalogue runs real daemons (cgroups): run it as root"
    );
}

/// A boxed row of a table: its name and its check.
type Row<'a> = (String, Box<dyn Fn() -> Result<(), String> + Sync + 'a>);

/// Runs the rows on `n` threads; the verdicts in the rows' order.
fn parallel(rows: &[Row<'_>], n: usize) -> Vec<(String, Result<(), String>)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, check)) = rows.get(i) else {
                        return;
                    };
                    // A row that panics (a test-side timeout) is that row's failure only.
                    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
                        .unwrap_or_else(|p| {
                            Err(format!(
                                "the row panicked: {}",
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                    .unwrap_or_default()
                            ))
                        });
                    out.lock().unwrap().push((i, name.clone(), verdict));
                }
            });
        }
    });
    let mut out = out.into_inner().unwrap();
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, n, v)| (n, v)).collect()
}

// --- budgets.toml -----------------------------------------------------------------------------

/// What is given as the config file.
#[derive(Debug)]
enum Input {
    Toml(String),
    Bytes(Vec<u8>),
    Fifo,
    Dir,
    Missing,
}

#[derive(Debug)]
struct ConfigCase {
    name: &'static str,
    input: Input,
    /// `validate --mode m` and `run --mode m` exit with this.
    code: i32,
    needles: Vec<&'static str>,
    /// Through `validate` only (`run` legitimately acts on it).
    validate_only: bool,
}

/// A valid config with `budget`, `defaults` and `instance` lines added to those tables and
/// `tail` appended. Line 2 is the first line of `budget`.
fn cfg(model: &str, budget: &str, defaults: &str, instance: &str, tail: &str) -> String {
    format!(
        "[budget]\n{budget}\nmin_required = \"32MiB\"\nheadroom = \"64MiB\"\n\n[defaults]\nmodel = \"{model}\"\nctx = 256\n{defaults}\n\n[instances.a]\nram_limit = \"64MiB\"\n{instance}\n\n[modes.m]\ninstances = [\"a\"]\n{tail}"
    )
}

fn config_cases(model: &str, dir: &Path) -> Vec<ConfigCase> {
    let toml = |name, text: String, code, needles: &[&'static str]| ConfigCase {
        name,
        input: Input::Toml(text),
        code,
        needles: needles.to_vec(),
        validate_only: false,
    };
    let b = |name, line: &str, needles: &[&'static str]| {
        toml(name, cfg(model, line, "", "", ""), 2, needles)
    };
    let d = |name, line: &str, needles: &[&'static str]| {
        toml(name, cfg(model, "", line, "", ""), 2, needles)
    };
    let i = |name, line: &str, needles: &[&'static str]| {
        toml(name, cfg(model, "", "", line, ""), 2, needles)
    };
    let t = |name, tail: &str, needles: &[&'static str]| {
        toml(name, cfg(model, "", "", "", tail), 2, needles)
    };
    let fifo_model = dir.join("model.fifo");
    mkfifo(&fifo_model);
    let tpl = chat_templates(dir);
    let deep = format!("a = {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let mut garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    garbage[0] = 0xff;
    vec![
        // syntax and keys
        toml(
            "syntax_unclosed_table",
            "[budget\nheadroom = \"1G\"\n".into(),
            2,
            &["budgets.toml:1"],
        ),
        b("syntax_missing_value", "headroom = ", &["budgets.toml:2"]),
        t("unknown_table", "[bugdet]\ntotal = \"1G\"\n", &["bugdet"]),
        i(
            "unknown_instance_key",
            "ram_limt = \"1G\"",
            &["ram_limt", "ram_limit"],
        ),
        d("unknown_defaults_key", "treads = 4", &["treads", "threads"]),
        t(
            "duplicate_table",
            "[instances.a]\nctx = 512\n",
            &["duplicate"],
        ),
        t(
            "instance_name_traversal",
            "[instances.\"../../etc\"]\nctx = 1\n",
            &["invalid instance name"],
        ),
        i("wrong_type", "ctx = \"big\"", &["invalid type"]),
        // sizes
        b("size_unparsable", "total = \"lots\"", &["invalid size"]),
        d(
            "size_overflow_99999999999T",
            "ram_limit = \"99999999999T\"",
            &["too large"],
        ),
        d("size_16_eib", "ram_limit = \"16777216T\"", &["too large"]),
        d(
            "size_past_u64_bytes",
            "ram_limit = \"18446744073709551616\"",
            &["too large"],
        ),
        b("size_negative", "total = -5", &["negative"]),
        b(
            "size_decimal_unit",
            "total = \"8GB\"",
            &["did you mean 8GiB"],
        ),
        i(
            "swap_max_overflow",
            "swap_max = \"99999999999T\"",
            &["too large"],
        ),
        toml(
            "two_8_eib_instances",
            format!(
                "[budget]\nper_instance_max = 1.0\ntotal = \"16777215T\"\nmin_required = \"32MiB\"\n\n[defaults]\nmodel = \"{model}\"\nctx = 256\n\n[instances.a]\nram_limit = \"8388608T\"\n\n[instances.b]\nram_limit = \"8388608T\"\n\n[modes.m]\ninstances = [\"a\", \"b\"]\n"
            ),
            1,
            &["16 EiB"],
        ),
        // durations
        d(
            "duration_unparsable",
            "backoff_max = \"soon\"",
            &["invalid duration"],
        ),
        d(
            "duration_huge_stop_timeout",
            "stop_timeout = \"100000000years\"",
            &["at most"],
        ),
        d(
            "duration_huge_heartbeat",
            "heartbeat_interval = \"1000000h\"",
            &["at most"],
        ),
        d(
            "duration_huge_backoff_initial",
            "backoff_initial = \"500000000years\"",
            &["at most"],
        ),
        d(
            "duration_overflowing",
            "backoff_max = \"99999999999999999999s\"",
            &["invalid duration|too large|at most"],
        ),
        t(
            "pressure_settle_huge",
            "[pressure]\nsettle = \"100000000years\"\n",
            &["at most"],
        ),
        t(
            "logging_interval_zero",
            "[logging]\nworker_output_interval = \"0s\"\n",
            &["zero"],
        ),
        // counts and numbers
        d("threads_u32_max", "threads = 4294967295", &["at most"]),
        d("threads_zero", "threads = 0", &["budgets.toml:"]),
        i("ctx_zero", "ctx = 0", &["budgets.toml:"]),
        i("ctx_u32_max", "ctx = 4294967295", &["at most"]),
        i(
            "gpu_layers_u32_max",
            "gpu_layers = 4294967295",
            &["at most"],
        ),
        d(
            "start_limit_burst_u32_max",
            "start_limit_burst = 4294967295",
            &["at most"],
        ),
        i(
            "priority_i64_min",
            "priority = -9223372036854775808",
            &["priority"],
        ),
        i(
            "priority_i64_max",
            "priority = 9223372036854775807",
            &["priority"],
        ),
        d(
            "backoff_factor_huge",
            "backoff_factor = 1e308",
            &["at most"],
        ),
        d(
            "backoff_factor_nan",
            "backoff_factor = nan",
            &["backoff_factor|at least 1"],
        ),
        b(
            "safety_margin_nan",
            "safety_margin = nan",
            &["outside [0, 1)"],
        ),
        b(
            "per_instance_max_nan",
            "per_instance_max = nan",
            &["outside (0, 1]"],
        ),
        b(
            "estimate_factor_inf",
            "estimate_factor = inf",
            &["estimate_factor|finite|at most"],
        ),
        // levels, modes, instances, models
        t(
            "pressure_levels_out_of_order",
            "[pressure]\nwarning = 90\ncritical = 80\n",
            &["[pressure]"],
        ),
        t(
            "pressure_percent_and_floor",
            "[pressure]\nwarning = 80\nwarning_available = \"1G\"\n",
            &["[pressure]"],
        ),
        t(
            "gpu_levels_out_of_order",
            "[gpu]\nwarning = 99\nemergency = 50\n",
            &["[gpu]"],
        ),
        t(
            "mode_unknown_instance",
            "[modes.x]\ninstances = [\"a\", \"ghost\"]\n",
            &["unknown instance \"ghost\""],
        ),
        t(
            "mode_empty",
            "[modes.x]\ninstances = []\n",
            &["has no instances"],
        ),
        toml(
            "mode_not_defined",
            cfg(model, "", "", "", "").replace("[modes.m]", "[modes.other]"),
            2,
            &["unknown mode \"m\""],
        ),
        toml(
            "missing_model",
            cfg(model, "", "", "", "").replace(&format!("model = \"{model}\""), ""),
            2,
            &["has no model"],
        ),
        i(
            "model_file_missing",
            "model = \"/nonexistent/none.gguf\"",
            &["does not exist"],
        ),
        i(
            "model_is_a_directory",
            "model = \"/tmp\"",
            &["is a directory"],
        ),
        i(
            "model_is_a_fifo",
            &format!("model = \"{}\"", fifo_model.display()),
            &["not a regular file"],
        ),
        i(
            "model_is_dev_zero",
            "model = \"/dev/zero\"",
            &["not a regular file"],
        ),
        // chat templates (checked when the config is loaded: before anything starts)
        i(
            "chat_template_unknown_name",
            "chat_template = \"llama-3\"",
            &[
                "chat_template",
                "\"llama-3\" is not a built-in",
                "chatml",
                "needs a /",
            ],
        ),
        i(
            "chat_template_empty",
            "chat_template = \"\"",
            &["chat_template", "empty"],
        ),
        i(
            "chat_template_missing_file",
            &format!("chat_template = \"{}\"", tpl.missing),
            &["[instances.a] chat_template", "none.jinja does not exist"],
        ),
        i(
            "chat_template_relative_missing_file",
            "chat_template = \"./none.jinja\"",
            &["none.jinja does not exist", "config file's directory"],
        ),
        i(
            "chat_template_is_a_directory",
            "chat_template = \"/tmp\"",
            &["chat template /tmp is a directory"],
        ),
        i(
            "chat_template_is_a_fifo",
            &format!("chat_template = \"{}\"", tpl.fifo),
            &["not a regular file"],
        ),
        i(
            "chat_template_is_dev_zero",
            "chat_template = \"/dev/zero\"",
            &["not a regular file"],
        ),
        i(
            "chat_template_not_utf8",
            &format!("chat_template = \"{}\"", tpl.latin1),
            &["latin1.jinja is not UTF-8"],
        ),
        i(
            "chat_template_syntax_error",
            &format!("chat_template = \"{}\"", tpl.syntax),
            &["syntax.jinja does not compile", "line 2"],
        ),
        i(
            "chat_template_too_large",
            &format!("chat_template = \"{}\"", tpl.huge),
            &["huge.jinja is 1048577 bytes, larger than the 1048576 accepted"],
        ),
        d(
            "chat_template_in_defaults_syntax_error",
            &format!("chat_template = \"{}\"", tpl.syntax),
            &["[defaults] chat_template", "does not compile"],
        ),
        // the file itself
        ConfigCase {
            name: "config_is_a_fifo",
            input: Input::Fifo,
            code: 2,
            needles: vec!["regular file"],
            validate_only: false,
        },
        ConfigCase {
            name: "config_is_a_directory",
            input: Input::Dir,
            code: 2,
            needles: vec!["directory"],
            validate_only: false,
        },
        ConfigCase {
            name: "config_missing",
            input: Input::Missing,
            code: 2,
            needles: vec!["cannot read config"],
            validate_only: false,
        },
        ConfigCase {
            name: "config_binary_garbage",
            input: Input::Bytes(garbage),
            code: 2,
            needles: vec!["UTF-8"],
            validate_only: false,
        },
        ConfigCase {
            name: "config_nul_bytes",
            input: Input::Bytes(b"\0\0\0[budget]\n".to_vec()),
            code: 2,
            needles: vec!["budgets.toml:1"],
            validate_only: false,
        },
        toml("config_empty", String::new(), 2, &["unknown mode \"m\""]),
        toml("config_deeply_nested", deep, 2, &["budgets.toml:"]),
        ConfigCase {
            name: "observations_corrupt_left_alone_by_validate",
            input: Input::Toml(cfg(model, "", "", "", "")),
            code: 0,
            needles: vec!["PASSED"],
            validate_only: true,
        },
    ]
}

/// Chat template files that must be refused, by absolute path.
#[derive(Debug)]
struct Templates {
    missing: String,
    fifo: String,
    latin1: String,
    syntax: String,
    huge: String,
}

/// Writes the bad chat templates under `dir/templates`.
fn chat_templates(dir: &Path) -> Templates {
    let dir = dir.join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let fifo = dir.join("fifo.jinja");
    if !fifo.exists() {
        mkfifo(&fifo);
    }
    Templates {
        missing: dir.join("none.jinja").to_str().unwrap().to_owned(),
        fifo: fifo.to_str().unwrap().to_owned(),
        latin1: file("latin1.jinja", b"caf\xe9 {{ messages }}\n"),
        syntax: file("syntax.jinja", b"line one\n{% for x in %}{% endfor %}\n"),
        huge: file("huge.jinja", &vec![b'x'; (1 << 20) + 1]),
    }
}

/// Writes a row's config at `dir/budgets.toml` (or makes it a FIFO, a directory, nothing).
fn write_config(dir: &Path, input: &Input) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("budgets.toml");
    match input {
        Input::Toml(text) => std::fs::write(&path, text).unwrap(),
        Input::Bytes(b) => std::fs::write(&path, b).unwrap(),
        Input::Fifo => mkfifo(&path),
        Input::Dir => std::fs::create_dir(&path).unwrap(),
        Input::Missing => {}
    }
    path
}

/// A state dir as a real one looks: instances.json and observations.json (corrupt when
/// `corrupt`), 0700.
fn state_dir(dir: &Path, corrupt: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(state.join("instances.json"), "[]").unwrap();
    let obs = if corrupt { "{ not json" } else { "[]" };
    std::fs::write(state.join("observations.json"), obs).unwrap();
    for f in ["instances.json", "observations.json"] {
        std::fs::set_permissions(state.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    state
}

fn validate_row(dir: &Path, case: &ConfigCase) -> Result<(), String> {
    let config = write_config(dir, &case.input);
    let state = state_dir(dir, case.validate_only);
    let before = snapshot(&state);
    let (r, hung) = run_with_timeout(
        supervisor(&[
            "validate",
            "--mode",
            "m",
            "--assume-total",
            "16G",
            "--config",
        ])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state),
        DEADLINE,
    );
    judge(&r, hung, case.code, &case.needles)?;
    let diff = snapshot_diff(&before, &snapshot(&state));
    if !diff.is_empty() {
        return Err(format!("the state dir changed: {diff}"));
    }
    Ok(())
}

/// `run` on the row's config: refused with the row's code, and nothing started — no cgroup
/// parent, no control socket, the state dir as it was. (A run that starts anyway is killed and
/// cleaned up.) `/bin/false` stands in for the worker, so a wrongly accepted config loads no
/// model.
fn run_row(dir: &Path, case: &ConfigCase) -> Result<(), String> {
    let config = write_config(dir, &case.input);
    let state = state_dir(dir, false);
    let runtime = dir.join("run");
    let before = snapshot(&state);
    let parent = unique_parent("cat");
    let cgroups = belljar_host::cgroup::detect(None).unwrap();
    let (r, hung) = run_with_timeout(
        supervisor(&[
            "run",
            "--mode",
            "m",
            "--worker",
            "/bin/false",
            "--cgroup-parent",
            &parent,
        ])
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .arg("--runtime-dir")
        .arg(&runtime),
        Duration::from_secs(5),
    );
    let parent_dir = cgroups.root().join(&parent);
    let started = parent_dir.exists();
    if started {
        let _ = belljar_host::cgroup::destroy(&*cgroups, &parent_dir, Duration::from_secs(5));
    }
    if hung && started {
        return Err(format!(
            "accepted: the supervisor started on it (killed after 5 s); said: {}",
            short(&r.stderr)
        ));
    }
    let code = if case.code == 1 { 1 } else { 2 };
    judge(&r, hung, code, &case.needles)?;
    if started {
        return Err("a cgroup parent was made".into());
    }
    if runtime.join("control.sock").exists() {
        return Err("a control socket was made".into());
    }
    let diff = snapshot_diff(&before, &snapshot(&state));
    if !diff.is_empty() {
        return Err(format!("the state dir changed: {diff}"));
    }
    Ok(())
}

#[test]
fn config_rows_through_validate_and_run() {
    require_root();
    let t = TestDir::new();
    let model = t.model("models/m.gguf", &tiny_shape());
    let cases = config_cases(model.to_str().unwrap(), t.path());
    assert!(cases.len() >= 50, "{} rows", cases.len());
    let mut v = Verdicts::new("config");
    let mut rows: Vec<Row<'_>> = Vec::new();
    for case in &cases {
        let base = t.join(&format!("cases/{}", case.name));
        let vdir = base.join("v");
        rows.push((
            format!("validate/{}", case.name),
            Box::new(move || validate_row(&vdir, case)),
        ));
        if !case.validate_only {
            let rdir = base.join("r");
            rows.push((
                format!("run/{}", case.name),
                Box::new(move || run_row(&rdir, case)),
            ));
        }
    }
    let results = parallel(&rows, 6);
    for (name, r) in results {
        v.record(&name, r);
    }
    v.finish();
}

// --- the command line, no daemon ------------------------------------------------------------

#[derive(Debug)]
struct CliCase {
    name: &'static str,
    args: Vec<String>,
    code: i32,
    needles: Vec<&'static str>,
}

fn cli_case(name: &'static str, args: &[&str], code: i32, needles: &[&'static str]) -> CliCase {
    CliCase {
        name,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        code,
        needles: needles.to_vec(),
    }
}

#[test]
fn cli_rows_without_a_daemon() {
    let t = TestDir::new();
    let model = t.model("models/m.gguf", &tiny_shape());
    let m = model.to_str().unwrap();
    let junk = t.write("models/junk.gguf", "this is not a model at all");
    let fifo = t.join("models/fifo.gguf");
    mkfifo(&fifo);
    let file_as_dir = t.write("not-a-dir", "x");
    // A socket file nobody listens on any more.
    let stale = t.join("stale");
    std::fs::create_dir(&stale).unwrap();
    drop(std::os::unix::net::UnixListener::bind(stale.join("control.sock")).unwrap());
    // A "supervisor" that answers the hello with garbage.
    let liar = t.join("liar");
    std::fs::create_dir(&liar).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(liar.join("control.sock")).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        for s in listener.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(&frame(b"\xff\xfe not json"));
        }
    });
    let (j, f, d) = (junk.to_str().unwrap(), fifo.to_str().unwrap(), "/tmp");
    let (fd, st, li) = (
        file_as_dir.to_str().unwrap(),
        stale.to_str().unwrap(),
        liar.to_str().unwrap(),
    );
    let nowhere = "/nonexistent/belljar-run";
    let cases = vec![
        cli_case("no_subcommand", &[], 2, &["Usage"]),
        cli_case(
            "unknown_subcommand",
            &["explode"],
            2,
            &["unrecognized subcommand"],
        ),
        cli_case("unknown_flag", &["status", "--bogus"], 2, &["--bogus"]),
        cli_case("run_without_mode", &["run"], 2, &["--mode"]),
        cli_case(
            "run_bad_log_format",
            &["run", "--mode", "m", "--log-format", "xml"],
            2,
            &["xml"],
        ),
        cli_case(
            "run_bad_metrics_addr",
            &["run", "--mode", "m", "--metrics", "not-an-addr"],
            2,
            &["not-an-addr"],
        ),
        cli_case(
            "validate_size_decimal_unit",
            &["validate", "--assume-total", "8GB"],
            2,
            &["did you mean 8GiB"],
        ),
        cli_case(
            "validate_size_overflow",
            &["validate", "--assume-total", "99999999999T"],
            2,
            &["too large"],
        ),
        cli_case(
            "validate_size_zero",
            &["validate", "--assume-total", "0"],
            2,
            &["zero"],
        ),
        cli_case(
            "validate_size_negative",
            &["validate", "--assume-total", "-1G"],
            2,
            &["-1"],
        ),
        cli_case(
            "estimate_ctx_zero",
            &["estimate", m, "--ctx", "0"],
            2,
            &["--ctx"],
        ),
        cli_case(
            "estimate_ctx_negative",
            &["estimate", m, "--ctx", "-1"],
            2,
            &["-1"],
        ),
        cli_case(
            "estimate_ctx_past_u32",
            &["estimate", m, "--ctx", "4294967296"],
            2,
            &["4294967296"],
        ),
        cli_case(
            "estimate_ctx_u32_max",
            &["estimate", m, "--ctx", "4294967295"],
            2,
            &["1..=16777216"],
        ),
        cli_case(
            "estimate_missing_file",
            &["estimate", "/nonexistent/m.gguf"],
            2,
            &["does not exist"],
        ),
        cli_case(
            "estimate_not_gguf",
            &["estimate", j],
            2,
            &["not a GGUF file"],
        ),
        cli_case(
            "estimate_directory",
            &["estimate", d],
            2,
            &["is a directory"],
        ),
        cli_case(
            "estimate_fifo",
            &["estimate", f],
            2,
            &["not a regular file"],
        ),
        cli_case(
            "estimate_dev_zero",
            &["estimate", "/dev/zero"],
            2,
            &["not a regular file"],
        ),
        cli_case(
            "estimate_gpu_layers_past_u32",
            &["estimate", m, "--gpu-layers", "4294967296"],
            2,
            &["4294967296"],
        ),
        cli_case("ask_without_prompt", &["ask", "x"], 2, &["<PROMPT>"]),
        cli_case(
            "ask_max_tokens_negative",
            &["ask", "x", "hi", "--max-tokens", "-1"],
            2,
            &["-1"],
        ),
        cli_case(
            "ask_max_tokens_past_u32",
            &["ask", "x", "hi", "--max-tokens", "4294967296"],
            2,
            &["4294967296"],
        ),
        cli_case(
            "add_priority_not_a_number",
            &["add", "x", "--model", m, "--priority", "high"],
            2,
            &["high"],
        ),
        cli_case(
            "add_priority_past_i64",
            &[
                "add",
                "x",
                "--model",
                m,
                "--priority",
                "9223372036854775808",
            ],
            2,
            &["9223372036854775808"],
        ),
        cli_case(
            "add_ram_limit_zero",
            &["add", "x", "--model", m, "--ram-limit", "0"],
            2,
            &["zero"],
        ),
        cli_case(
            "add_ram_limit_decimal_unit",
            &["add", "x", "--model", m, "--ram-limit", "8GB"],
            2,
            &["did you mean 8GiB"],
        ),
        cli_case(
            "add_ram_limit_overflow",
            &["add", "x", "--model", m, "--ram-limit", "99999999999T"],
            2,
            &["too large"],
        ),
        cli_case(
            "add_ctx_zero",
            &["add", "x", "--model", m, "--ctx", "0"],
            2,
            &["--ctx"],
        ),
        cli_case(
            "add_missing_model",
            &[
                "add",
                "x",
                "--model",
                "/nonexistent/m.gguf",
                "--runtime-dir",
                nowhere,
            ],
            2,
            &["/nonexistent/m.gguf"],
        ),
        cli_case(
            "add_relative_missing_model",
            &[
                "add",
                "x",
                "--model",
                "models/none.gguf",
                "--runtime-dir",
                nowhere,
            ],
            2,
            &["models/none.gguf"],
        ),
        cli_case("add_without_model", &["add", "x"], 2, &["--model"]),
        cli_case(
            "add_chat_template_unknown_name",
            &[
                "add",
                "x",
                "--model",
                m,
                "--chat-template",
                "llama-3",
                "--runtime-dir",
                nowhere,
            ],
            2,
            &["--chat-template", "not a built-in", "chatml", "needs a /"],
        ),
        cli_case(
            "add_chat_template_empty",
            &[
                "add",
                "x",
                "--model",
                m,
                "--chat-template",
                "",
                "--runtime-dir",
                nowhere,
            ],
            2,
            &["--chat-template", "empty"],
        ),
        cli_case(
            "add_chat_template_relative_missing",
            &[
                "add",
                "x",
                "--model",
                m,
                "--chat-template",
                "./templates/none.jinja",
                "--runtime-dir",
                nowhere,
            ],
            2,
            &["templates/none.jinja", "check the path"],
        ),
        cli_case("remove_without_name", &["remove"], 2, &["<NAME>"]),
        cli_case(
            "status_unreachable_runtime_dir",
            &["status", "--runtime-dir", nowhere],
            3,
            &["cannot reach the supervisor"],
        ),
        cli_case(
            "status_runtime_dir_is_a_file",
            &["status", "--runtime-dir", fd],
            3,
            &["cannot reach the supervisor"],
        ),
        cli_case(
            "status_stale_socket",
            &["status", "--runtime-dir", st],
            3,
            &["Connection refused"],
        ),
        cli_case(
            "status_peer_answers_garbage",
            &["status", "--runtime-dir", li],
            3,
            &["bad answer"],
        ),
        cli_case(
            "remove_unreachable",
            &["remove", "x", "--runtime-dir", nowhere],
            3,
            &["cannot reach the supervisor"],
        ),
        cli_case(
            "completions_unknown_shell",
            &["completions", "tcsh"],
            2,
            &["tcsh"],
        ),
    ];
    let rows: Vec<Row<'_>> = cases
        .iter()
        .map(|c| {
            let row: Row<'_> = (
                c.name.to_owned(),
                Box::new(move || {
                    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
                    let (r, hung) = run_with_timeout(&mut supervisor(&args), DEADLINE);
                    judge(&r, hung, c.code, &c.needles)
                }),
            );
            row
        })
        .collect();
    let mut v = Verdicts::new("cli");
    for (name, r) in parallel(&rows, 4) {
        v.record(&name, r);
    }
    v.finish();
}

// --- GGUF files -------------------------------------------------------------------------------

/// GGUF pieces, little-endian as the format is.
mod g {
    pub const U32: u32 = 4;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;

    pub fn u32(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    pub fn u64(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    pub fn string(s: &[u8]) -> Vec<u8> {
        [u64(s.len() as u64), s.to_vec()].concat()
    }
    /// Magic, version and the two counts.
    pub fn head(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        [b"GGUF".to_vec(), u32(version), u64(tensors), u64(kvs)].concat()
    }
    pub fn kv_str(key: &str, v: &str) -> Vec<u8> {
        [string(key.as_bytes()), u32(STRING), string(v.as_bytes())].concat()
    }
    pub fn kv_u32(key: &str, v: u32) -> Vec<u8> {
        [string(key.as_bytes()), u32(U32), u32(v)].concat()
    }
    pub fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut out = [string(name.as_bytes()), u32(dims.len() as u32)].concat();
        for d in dims {
            out.extend(u64(*d));
        }
        [out, u32(ty), u64(offset)].concat()
    }
    /// The metadata a llama header needs for the estimate, with `block_count` and `heads`.
    pub fn llama(block_count: u32, embedding: u32, heads: u32) -> Vec<Vec<u8>> {
        vec![
            kv_str("general.architecture", "llama"),
            kv_u32("llama.block_count", block_count),
            kv_u32("llama.embedding_length", embedding),
            kv_u32("llama.attention.head_count", heads),
        ]
    }
    /// A whole file: the head, `kvs`, `tensors`, padded to 32 bytes, then `data`.
    pub fn file(kvs: &[Vec<u8>], tensors: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
        let mut out = head(3, tensors.len() as u64, kvs.len() as u64);
        for kv in kvs {
            out.extend(kv);
        }
        for t in tensors {
            out.extend(t);
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(data);
        out
    }
}

#[derive(Debug)]
struct GgufCase {
    name: &'static str,
    bytes: Vec<u8>,
    /// Exit 2 naming the problem; or (empty) a file that is fine and must be read within the
    /// address-space limit: exit 0.
    needles: Vec<&'static str>,
}

fn gguf_cases() -> Vec<GgufCase> {
    use g::*;
    let case = |name, bytes, needles: &[&'static str]| GgufCase {
        name,
        bytes,
        needles: needles.to_vec(),
    };
    let ok = llama(1, 64, 2);
    let with = |extra: Vec<u8>| {
        let mut kvs = ok.clone();
        kvs.push(extra);
        file(&kvs, &[], &[])
    };
    // 16 Mi one-byte elements: a few MiB of file, hundreds of MiB if each became a value.
    let big_array = [
        string(b"tokenizer.ggml.scores"),
        u32(ARRAY),
        u32(0),
        u64(1 << 24),
        vec![7u8; 1 << 24],
    ]
    .concat();
    let mut huge_string_value = [string(b"general.name"), u32(STRING), u64(1 << 40)].concat();
    huge_string_value.extend(b"short");
    vec![
        case("empty_file", Vec::new(), &["not a GGUF file"]),
        case("three_bytes", b"GGU".to_vec(), &["not a GGUF file"]),
        case(
            "bad_magic",
            [b"GGML".to_vec(), u32(3), u64(0), u64(0)].concat(),
            &["not a GGUF file"],
        ),
        case(
            "version_1",
            file(&ok, &[], &[])[..4]
                .iter()
                .copied()
                .chain(u32(1))
                .chain(file(&ok, &[], &[])[8..].iter().copied())
                .collect(),
            &["version"],
        ),
        case(
            "version_u32_max",
            [head(u32::MAX, 0, 0)].concat(),
            &["version"],
        ),
        case("truncated_after_magic", b"GGUF".to_vec(), &["truncated"]),
        case(
            "truncated_in_a_key",
            [head(3, 0, 1), u64(40), b"general.arch".to_vec()].concat(),
            &["truncated"],
        ),
        case(
            "truncated_in_the_tensor_infos",
            [file(&ok, &[], &[])[..20].to_vec()].concat(),
            &["truncated"],
        ),
        case("tensor_count_u64_max", head(3, u64::MAX, 0), &["tensor"]),
        case(
            "metadata_count_u64_max",
            head(3, 0, u64::MAX),
            &["metadata"],
        ),
        case(
            "key_length_2_pow_40",
            [head(3, 0, 1), u64(1 << 40), b"k".to_vec()].concat(),
            &["key"],
        ),
        case(
            "string_value_length_2_pow_40",
            [head(3, 0, 1), huge_string_value].concat(),
            &["string"],
        ),
        case(
            "array_count_u64_max",
            [
                head(3, 0, 1),
                string(b"a"),
                u32(ARRAY),
                u32(0),
                u64(u64::MAX),
            ]
            .concat(),
            &["array"],
        ),
        // A valid header: read in bounded memory (arrays skipped), it estimates fine.
        case("array_of_16_mi_elements", with(big_array), &[]),
        case(
            "nested_array",
            [
                head(3, 0, 1),
                string(b"a"),
                u32(ARRAY),
                u32(ARRAY),
                u64(1),
                u32(0),
                u64(0),
            ]
            .concat(),
            &["nested"],
        ),
        case(
            "unknown_value_type",
            [head(3, 0, 1), string(b"a"), u32(99)].concat(),
            &["type"],
        ),
        case(
            "bool_value_7",
            [head(3, 0, 1), string(b"a"), u32(7), vec![7]].concat(),
            &["bool"],
        ),
        case(
            "key_not_utf8",
            [head(3, 0, 1), string(b"\xff\xfe"), u32(U32), u32(1)].concat(),
            &["UTF-8"],
        ),
        case(
            "tensor_with_5_dims",
            file(&ok, &[tensor("t", &[1, 1, 1, 1, 1], 0, 0)], &[]),
            &["dimensions"],
        ),
        case(
            "tensor_data_past_the_end",
            file(&ok, &[tensor("t", &[64], 0, 1 << 40)], &[]),
            &["truncated"],
        ),
        case(
            "tensor_offset_u64_max",
            file(&ok, &[tensor("t", &[64], 0, u64::MAX)], &[]),
            &["truncated|overflow"],
        ),
        case(
            "tensor_dims_overflow",
            file(&ok, &[tensor("t", &[1 << 40, 1 << 40, 1 << 40], 0, 0)], &[]),
            &["truncated|overflow"],
        ),
        case(
            "tensor_type_unknown",
            file(&ok, &[tensor("t", &[64], 999, 0)], &[]),
            &["type"],
        ),
        case(
            "alignment_u64_max",
            with([string(b"general.alignment"), u32(10), u64(u64::MAX)].concat()),
            &["truncated|alignment"],
        ),
        case(
            "no_architecture",
            file(&ok[1..], &[], &[]),
            &["general.architecture"],
        ),
        case(
            "block_count_zero",
            file(&llama(0, 64, 2), &[], &[]),
            &["block_count"],
        ),
        case(
            "head_count_zero",
            file(&llama(1, 64, 0), &[], &[]),
            &["head_count"],
        ),
        case(
            "kv_term_overflows",
            file(&llama(u32::MAX, u32::MAX, 1), &[], &[]),
            &["overflows"],
        ),
    ]
}

/// Each file through `estimate` and through `validate` (as a mode's model): exit 2 naming the
/// problem, within the deadline, with at most 256 MiB of address space (a reader that turned a
/// crafted count into allocations would abort; a plain estimate needs less than 128 MiB).
#[test]
fn gguf_rows_through_estimate_and_validate() {
    let t = TestDir::new();
    let cases = gguf_cases();
    // The builder makes headers the reader takes: the rows fail for their one flaw.
    let sane = t.join("sane.gguf");
    std::fs::write(&sane, g::file(&g::llama(1, 64, 2), &[], &[])).unwrap();
    let (r, hung) = run_with_timeout(
        &mut supervisor(&["estimate", sane.to_str().unwrap()]),
        DEADLINE,
    );
    judge(&r, hung, 0, &["kv cache"]).unwrap();
    let mut rows: Vec<Row<'_>> = Vec::new();
    for c in &cases {
        let dir = t.join(&format!("cases/{}", c.name));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        std::fs::write(&model, &c.bytes).unwrap();
        let config = dir.join("budgets.toml");
        std::fs::write(&config, cfg(model.to_str().unwrap(), "", "", "", "")).unwrap();
        let limited = |args: &[&str]| {
            let mut cmd = Command::new("prlimit");
            cmd.arg("--as=268435456")
                .arg("--")
                .arg(bin("supervisor"))
                .args(args);
            cmd
        };
        let m = model.clone();
        rows.push((
            format!("estimate/{}", c.name),
            Box::new(move || {
                let (r, hung) =
                    run_with_timeout(&mut limited(&["estimate", m.to_str().unwrap()]), DEADLINE);
                match c.needles.is_empty() {
                    true => judge(&r, hung, 0, &["kv cache"]),
                    false => judge(&r, hung, 2, &c.needles),
                }
            }),
        ));
        rows.push((
            format!("validate/{}", c.name),
            Box::new(move || {
                let state = state_dir(&dir, false);
                let before = snapshot(&state);
                let (r, hung) = run_with_timeout(
                    &mut limited(&[
                        "validate",
                        "--mode",
                        "m",
                        "--assume-total",
                        "16G",
                        "--config",
                        config.to_str().unwrap(),
                        "--state-dir",
                        state.to_str().unwrap(),
                    ]),
                    DEADLINE,
                );
                match c.needles.is_empty() {
                    true => judge(&r, hung, 0, &["PASSED"])?,
                    false => judge(&r, hung, 2, &c.needles)?,
                }
                let diff = snapshot_diff(&before, &snapshot(&state));
                if !diff.is_empty() {
                    return Err(format!("the state dir changed: {diff}"));
                }
                Ok(())
            }),
        ));
    }
    let mut v = Verdicts::new("gguf");
    for (name, r) in parallel(&rows, 4) {
        v.record(&name, r);
    }
    v.finish();
}

// --- a real daemon: what must not change ------------------------------------------------------

const DAEMON_CONFIG: &str = r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
stop_timeout = "5s"

[instances.subject]
ram_limit = "64MiB"

[modes.single]
instances = ["subject"]
"#;

fn ready_daemon(t: &TestDir) -> Daemon {
    require_root();
    t.model("models/a.gguf", &tiny_shape());
    let mut d = Daemon::start(t, DAEMON_CONFIG, "single", &[]);
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    d
}

/// What a refused input must leave as it was.
#[derive(Debug, PartialEq)]
struct Baseline {
    /// (name, state, pid) of every instance.
    instances: Vec<(Value, Value, Value)>,
    allocated: Value,
    state_files: BTreeMap<PathBuf, Vec<u8>>,
    cgroups: Vec<String>,
}

fn baseline(d: &Daemon) -> Option<Baseline> {
    let s = d.status()?;
    Some(Baseline {
        instances: s["instances"]
            .as_array()?
            .iter()
            .map(|i| (i["name"].clone(), i["state"].clone(), i["pid"].clone()))
            .collect(),
        allocated: s["budget"]["allocated"].clone(),
        state_files: snapshot(&d.state),
        cgroups: subdirs(&d.parent()),
    })
}

/// The daemon still answers and nothing changed (a rollback may take a moment: up to 5 s);
/// `never` must not have been spawned at all.
fn unchanged(d: &Daemon, before: &Baseline, never: Option<&str>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let now = loop {
        let now = baseline(d);
        if now.as_ref() == Some(before) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = d.stderr();
    if log.contains("panicked") {
        return Err(format!("the supervisor panicked: {}", short(&log)));
    }
    let Some(now) = now else {
        return Err("the supervisor no longer answers status".into());
    };
    if let Some(name) = never {
        if log.lines().any(|l| l.contains("spawned") && about(l, name)) {
            return Err(format!("a worker was started for {name}"));
        }
    }
    if now.instances != before.instances {
        return Err(format!(
            "the instances changed: {:?} -> {:?}",
            before.instances, now.instances
        ));
    }
    if now.allocated != before.allocated {
        return Err(format!(
            "the allocation changed: {} -> {}",
            before.allocated, now.allocated
        ));
    }
    if now.cgroups != before.cgroups {
        return Err(format!(
            "the cgroups changed: {:?} -> {:?}",
            before.cgroups, now.cgroups
        ));
    }
    let diff = snapshot_diff(&before.state_files, &now.state_files);
    if !diff.is_empty() {
        return Err(format!("the state dir changed: {diff}"));
    }
    Ok(())
}

/// Whether a line of the supervisor's text log is about instance `name` (its `instance` field).
fn about(line: &str, name: &str) -> bool {
    let (bare, quoted) = (format!("instance={name}"), format!("instance=\"{name}\""));
    line.split_whitespace()
        .any(|w| w == bare || w == quoted || w.strip_suffix(':').is_some_and(|w| w == bare))
}

/// Puts the daemon back as it was after a row that wrongly added an instance.
fn undo(d: &Daemon, before: &Baseline) {
    if let Some(s) = d.status() {
        for i in s["instances"].as_array().into_iter().flatten() {
            if !before.instances.iter().any(|(n, _, _)| *n == i["name"]) {
                let _ = d.cli(&["remove", i["name"].as_str().unwrap_or_default()]);
            }
        }
    }
    // A removed run's observation is written after the reply: wait until the files settle.
    let mut last = snapshot(&d.state);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = snapshot(&d.state);
        if now == last {
            return;
        }
        last = now;
    }
}

/// (name, arguments, exit code, needles, the instance that must never start)
type DaemonCliRow<'a> = (&'a str, Vec<&'a str>, i32, Vec<&'a str>, Option<&'a str>);

// --- the command line against a daemon ---------------------------------------------------

#[test]
fn cli_rows_against_a_daemon() {
    let t = TestDir::new();
    let d = ready_daemon(&t);
    let b = t.model(
        "models/b.gguf",
        &belljar_testkit::ModelShape {
            seed: 9,
            ..tiny_shape()
        },
    );
    let b = b.to_str().unwrap();
    let bad = |name: &str, bytes: &[u8]| {
        let p = t.join(&format!("models/{name}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let full = std::fs::read(b).unwrap();
    let truncated = bad("truncated", &full[..full.len() / 2]);
    let empty = bad("empty", b"");
    let junk = bad("junk", b"definitely not a model");
    let huge = bad("huge", &g::head(3, u64::MAX, u64::MAX));
    let fifo = t.join("models/fifo.gguf");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let long = "n".repeat(64);
    let tpl = chat_templates(t.path());
    // One argument may hold 128 KiB: a prompt of 100 KiB is far past the context.
    let big_prompt = "word ".repeat(20 * 1024);
    // (name, args, code, needles, the instance that must never start)
    let rows: Vec<DaemonCliRow<'_>> = vec![
        (
            "remove_unknown",
            vec!["remove", "ghost"],
            1,
            vec!["unknown instance ghost"],
            None,
        ),
        (
            "restart_unknown",
            vec!["restart", "ghost"],
            1,
            vec!["unknown instance ghost"],
            None,
        ),
        (
            "ask_unknown",
            vec!["ask", "ghost", "hi"],
            1,
            vec!["unknown instance ghost"],
            None,
        ),
        (
            "ask_traversal_name",
            vec!["ask", "../../etc", "hi"],
            1,
            vec!["unknown instance"],
            None,
        ),
        (
            "add_existing_name",
            vec!["add", "subject", "--model", b],
            1,
            vec!["already exists"],
            None,
        ),
        (
            "add_bad_name",
            vec!["add", "Bad/Name", "--model", b],
            2,
            vec!["invalid instance name"],
            Some("Bad/Name"),
        ),
        (
            "add_name_too_long",
            vec!["add", &long, "--model", b],
            2,
            vec!["invalid instance name"],
            Some(&long),
        ),
        (
            "add_model_directory",
            vec!["add", "dir", "--model", "/tmp"],
            2,
            vec!["is a directory"],
            Some("dir"),
        ),
        (
            "add_model_fifo",
            vec!["add", "fifo", "--model", fifo],
            2,
            vec!["not a regular file"],
            Some("fifo"),
        ),
        (
            "add_model_dev_zero",
            vec!["add", "zero", "--model", "/dev/zero"],
            2,
            vec!["not a regular file"],
            Some("zero"),
        ),
        (
            "add_model_empty",
            vec!["add", "empty", "--model", &empty],
            2,
            vec!["not a GGUF file"],
            Some("empty"),
        ),
        (
            "add_model_not_gguf",
            vec!["add", "junk", "--model", &junk],
            2,
            vec!["not a GGUF file"],
            Some("junk"),
        ),
        (
            "add_model_truncated",
            vec!["add", "trunc", "--model", &truncated],
            2,
            vec!["truncated"],
            Some("trunc"),
        ),
        (
            "add_model_huge_counts",
            vec!["add", "huge", "--model", &huge],
            2,
            vec!["tensor|metadata"],
            Some("huge"),
        ),
        (
            "add_ram_limit_over_the_cap",
            vec!["add", "greedy", "--model", b, "--ram-limit", "1T"],
            1,
            vec!["per_instance_max"],
            Some("greedy"),
        ),
        (
            "add_priority_i64_min",
            vec![
                "add",
                "low",
                "--model",
                b,
                "--priority",
                "-9223372036854775808",
            ],
            2,
            vec!["priority"],
            Some("low"),
        ),
        (
            "add_ctx_u32_max",
            vec!["add", "wide", "--model", b, "--ctx", "4294967295"],
            2,
            vec!["1..=16777216"],
            Some("wide"),
        ),
        (
            "add_gpu_layers_u32_max",
            vec!["add", "gpu", "--model", b, "--gpu-layers", "4294967295"],
            2,
            vec!["at most"],
            Some("gpu"),
        ),
        (
            "add_chat_template_directory",
            vec!["add", "tdir", "--model", b, "--chat-template", "/tmp"],
            2,
            vec!["cannot add tdir", "is a directory"],
            Some("tdir"),
        ),
        (
            "add_chat_template_fifo",
            vec!["add", "tfifo", "--model", b, "--chat-template", &tpl.fifo],
            2,
            vec!["not a regular file"],
            Some("tfifo"),
        ),
        (
            "add_chat_template_not_utf8",
            vec![
                "add",
                "tlatin",
                "--model",
                b,
                "--chat-template",
                &tpl.latin1,
            ],
            2,
            vec!["not UTF-8"],
            Some("tlatin"),
        ),
        (
            "add_chat_template_syntax_error",
            vec![
                "add",
                "tsyntax",
                "--model",
                b,
                "--chat-template",
                &tpl.syntax,
            ],
            2,
            vec!["does not compile", "line 2"],
            Some("tsyntax"),
        ),
        (
            "add_chat_template_too_large",
            vec!["add", "thuge", "--model", b, "--chat-template", &tpl.huge],
            2,
            vec!["larger than the 1048576 accepted"],
            Some("thuge"),
        ),
        (
            "ask_empty_prompt",
            vec!["ask", "subject", ""],
            2,
            vec!["empty"],
            None,
        ),
        (
            "ask_max_tokens_over_ctx",
            vec!["ask", "subject", "hi", "--max-tokens", "4294967295"],
            2,
            vec!["exceeds ctx"],
            None,
        ),
        (
            "ask_prompt_of_100_kib",
            vec!["ask", "subject", &big_prompt],
            2,
            vec!["exceeds ctx"],
            None,
        ),
    ];
    let mut v = Verdicts::new("daemon-cli");
    for (name, args, code, needles, never) in &rows {
        let before = baseline(&d).expect("the daemon answers");
        let verdict = (|| {
            let mut cmd = supervisor(args);
            cmd.arg("--runtime-dir")
                .arg(&d.runtime)
                .arg("--config")
                .arg(&d.config);
            let (r, hung) = run_with_timeout(&mut cmd, Duration::from_secs(20));
            judge(&r, hung, *code, needles)?;
            unchanged(&d, &before, *never)
        })();
        if verdict.is_err() {
            undo(&d, &before);
        }
        v.record(name, verdict);
    }
    v.finish();
}

// --- raw control-socket frames ----------------------------------------------------------------

#[derive(Debug)]
struct ControlCase {
    name: &'static str,
    /// Send a correct hello first.
    hello: bool,
    bytes: Vec<u8>,
    /// Shut our write side after the bytes.
    close: bool,
    /// The error reply's exit code; None: the supervisor may instead just close.
    code: Option<u64>,
    needles: Vec<&'static str>,
    never: Option<&'static str>,
}

fn add_json(name: &str, model: &str, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut v = serde_json::json!({
        "type": "Add", "name": name, "model": model, "ram_limit": null, "ctx": null,
        "gpu_layers": null, "gpu_device": null, "priority": null
    });
    for (k, x) in extra {
        v[*k] = x.clone();
    }
    frame(&serde_json::to_vec(&v).unwrap())
}

fn control_cases(model: &str) -> Vec<ControlCase> {
    let row = |name, hello, bytes: Vec<u8>, code, needles: &[&'static str]| ControlCase {
        name,
        hello,
        bytes,
        close: false,
        code: Some(code),
        needles: needles.to_vec(),
        never: None,
    };
    let add = |name,
               inst: &'static str,
               model: &str,
               extra: &[(&str, Value)],
               code,
               needles: &[&'static str]| ControlCase {
        never: Some(inst),
        ..row(name, true, add_json(inst, model, extra), code, needles)
    };
    // A relative path that names the model from any working directory: enough `..` to reach /.
    let relative = format!("{}{}", "../".repeat(40), model.trim_start_matches('/'));
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut over_cap = (300u32 * 1024).to_be_bytes().to_vec();
    over_cap.extend(vec![b' '; 300 * 1024]);
    vec![
        row(
            "no_hello_command_first",
            false,
            frame(br#"{"type":"Status"}"#),
            2,
            &["bad handshake"],
        ),
        row(
            "wrong_protocol_version",
            false,
            frame(br#"{"protocol_version":999}"#),
            2,
            &["protocol mismatch"],
        ),
        row(
            "hello_version_negative",
            false,
            frame(br#"{"protocol_version":-1}"#),
            2,
            &["bad handshake"],
        ),
        row(
            "hello_garbage_json",
            false,
            frame(b"{{{ not json"),
            2,
            &["bad handshake"],
        ),
        row(
            "hello_not_utf8",
            false,
            frame(b"\xff\xfe\xfd"),
            2,
            &["bad handshake"],
        ),
        row(
            "hello_zero_length",
            false,
            frame(b""),
            2,
            &["bad handshake"],
        ),
        row(
            "hello_deeply_nested",
            false,
            frame(nested.as_bytes()),
            2,
            &["bad handshake"],
        ),
        row(
            "hello_over_the_cap",
            false,
            over_cap.clone(),
            2,
            &["exceeds the maximum"],
        ),
        row(
            "hello_length_u32_max",
            false,
            u32::MAX.to_be_bytes().to_vec(),
            2,
            &["exceeds the maximum"],
        ),
        ControlCase {
            close: true,
            code: None,
            ..row(
                "hello_truncated_then_close",
                false,
                [100u32.to_be_bytes().to_vec(), b"{\"proto".to_vec()].concat(),
                2,
                &["bad handshake"],
            )
        },
        ControlCase {
            close: true,
            code: None,
            ..row(
                "connect_and_close",
                false,
                Vec::new(),
                2,
                &["bad handshake"],
            )
        },
        row(
            "silence_after_connect",
            false,
            Vec::new(),
            2,
            &["nothing received"],
        ),
        row(
            "command_unknown",
            true,
            frame(br#"{"type":"Explode"}"#),
            2,
            &["bad request"],
        ),
        row(
            "command_wrong_types",
            true,
            frame(br#"{"type":"Add","name":5}"#),
            2,
            &["bad request"],
        ),
        row(
            "command_garbage",
            true,
            frame(b"\x00\x01\x02"),
            2,
            &["bad request"],
        ),
        row(
            "command_over_the_cap",
            true,
            over_cap,
            2,
            &["exceeds the maximum"],
        ),
        ControlCase {
            close: true,
            code: None,
            ..row(
                "command_truncated_then_close",
                true,
                [64u32.to_be_bytes().to_vec(), b"{\"type\":\"Rem".to_vec()].concat(),
                2,
                &["bad request"],
            )
        },
        row(
            "remove_unknown",
            true,
            frame(br#"{"type":"Remove","name":"ghost"}"#),
            1,
            &["unknown instance ghost"],
        ),
        row(
            "restart_unknown",
            true,
            frame(br#"{"type":"Restart","name":"../../etc"}"#),
            1,
            &["unknown instance"],
        ),
        row(
            "ask_unknown",
            true,
            frame(br#"{"type":"Ask","name":"ghost","prompt":"hi","max_tokens":1}"#),
            1,
            &["unknown instance"],
        ),
        row(
            "ask_max_tokens_over_ctx",
            true,
            frame(br#"{"type":"Ask","name":"subject","prompt":"hi","max_tokens":4294967295}"#),
            2,
            &["exceeds ctx"],
        ),
        row(
            "ask_empty_prompt",
            true,
            frame(br#"{"type":"Ask","name":"subject","prompt":"","max_tokens":4}"#),
            2,
            &["empty"],
        ),
        add(
            "add_relative_model_path",
            "rel",
            &relative,
            &[],
            2,
            &["absolute"],
        ),
        add(
            "add_ctx_zero",
            "ctx0",
            model,
            &[("ctx", 0.into())],
            2,
            &["ctx"],
        ),
        add(
            "add_ram_limit_zero",
            "ram0",
            model,
            &[("ram_limit", 0.into())],
            2,
            &["ram_limit"],
        ),
        add(
            "add_priority_i64_min",
            "prio",
            model,
            &[("priority", i64::MIN.into())],
            2,
            &["priority"],
        ),
        add(
            "add_ctx_u32_max",
            "ctxmax",
            model,
            &[("ctx", u32::MAX.into())],
            2,
            &["at most"],
        ),
        add(
            "add_bad_name",
            "../../etc",
            model,
            &[],
            2,
            &["invalid instance name"],
        ),
        add(
            "add_empty_name",
            "",
            model,
            &[],
            2,
            &["invalid instance name"],
        ),
        add(
            "add_model_empty_path",
            "nopath",
            "",
            &[],
            2,
            &["absolute|does not exist"],
        ),
        add(
            "add_chat_template_unknown_name",
            "tname",
            model,
            &[("chat_template", Value::from("llama-3"))],
            2,
            &["chat_template", "not a built-in"],
        ),
        add(
            "add_chat_template_empty",
            "tempty",
            model,
            &[("chat_template", Value::from(""))],
            2,
            &["chat_template", "empty"],
        ),
        add(
            "add_chat_template_relative",
            "trel",
            model,
            &[("chat_template", Value::from("templates/chat.jinja"))],
            2,
            &["relative", "absolute path"],
        ),
        add(
            "add_chat_template_not_a_string",
            "ttype",
            model,
            &[("chat_template", Value::from(7))],
            2,
            &["bad request"],
        ),
        add(
            "add_model_dev_zero",
            "devzero",
            "/dev/zero",
            &[],
            2,
            &["not a regular file"],
        ),
        add(
            "add_model_proc_self_mem",
            "procmem",
            "/proc/self/mem",
            &[],
            2,
            &["cannot be read|not a regular file|not a GGUF"],
        ),
    ]
}

fn judge_reply(reply: &RawReply, case: &ControlCase) -> Result<(), String> {
    match (reply.error(), case.code) {
        (Some((message, code)), want) => {
            if let Some(want) = want {
                if code != want {
                    return Err(format!("exit code {code}, expected {want}: {message}"));
                }
            }
            says(&message, &case.needles)
        }
        (None, None) if reply.closed => Ok(()),
        (None, _) => Err(format!(
            "no error reply (closed: {}): {:?}",
            reply.closed,
            reply
                .frames
                .iter()
                .map(|f| short(&f.to_string()))
                .collect::<Vec<_>>()
        )),
    }
}

#[test]
fn control_socket_rows() {
    let t = TestDir::new();
    let d = ready_daemon(&t);
    let model = t.model(
        "models/b.gguf",
        &belljar_testkit::ModelShape {
            seed: 9,
            ..tiny_shape()
        },
    );
    let sock = d.runtime.join("control.sock");
    let mut v = Verdicts::new("control");
    for case in control_cases(model.to_str().unwrap()) {
        let before = baseline(&d).expect("the daemon answers");
        let reply = control_raw(
            &sock,
            case.hello,
            &case.bytes,
            case.close,
            Duration::from_secs(10),
        );
        let verdict = judge_reply(&reply, &case).and_then(|()| unchanged(&d, &before, case.never));
        if verdict.is_err() {
            undo(&d, &before);
        }
        v.record(case.name, verdict);
    }
    v.finish();
}

// --- worker-link frames from a fake worker under a real daemon --------------------------------

/// Set by the fake worker's wrapper script: the arguments `supervisor run` gave the worker.
const FAKE_ARGS: &str = "BELLJAR_CATALOGUE_FAKE_ARGS";

/// Not a row: the fake worker. The daemon runs a script that re-executes this test binary with
/// [`FAKE_ARGS`] set; the instance's name picks how it misbehaves on its link (`--fd N`).
#[test]
fn fake_worker() {
    if let Ok(args) = std::env::var(FAKE_ARGS) {
        fake::main(&args);
    }
}

mod fake {
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use belljar_protocol::{FrameReader, MAX_FRAME};
    use serde_json::{Value, json};

    use belljar_testkit::raw::frame;

    #[derive(Clone)]
    struct Link(Arc<Mutex<UnixStream>>);

    impl Link {
        fn raw(&self, bytes: &[u8]) {
            if self.0.lock().unwrap().write_all(bytes).is_err() {
                std::process::exit(1);
            }
        }
        fn send(&self, v: Value) {
            self.raw(&frame(&serde_json::to_vec(&v).unwrap()));
        }
    }

    pub fn main(args: &str) -> ! {
        let words: Vec<&str> = args.split_whitespace().collect();
        let after = |k: &str| {
            let i = words.iter().position(|w| *w == k).unwrap();
            words[i + 1]
        };
        let fd: i32 = after("--fd").parse().unwrap();
        let name = after("--instance").to_owned();
        // SAFETY: `supervisor run` passed this descriptor, open, to this process alone.
        let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut frames = FrameReader::new(stream.try_clone().unwrap(), MAX_FRAME);
        let link = Link(Arc::new(Mutex::new(stream)));
        let pid = std::process::id();
        let hello = |instance: &str, pid: u32| {
            link.send(
                json!({"type": "Hello", "protocol_version": 1, "instance": instance, "pid": pid}),
            );
        };
        let mut welcome = || match frames.read_frame() {
            Ok(Some(_)) => {}
            _ => std::process::exit(1),
        };
        let ready = json!({"type": "Ready", "load_ms": 1, "rss": 1 << 20, "model_bytes": 1,
            "ctx": 256, "session": {"turns": 0, "tokens": 0, "restored_from": "new"}, "state_bytes": 0});
        let huge = MAX_FRAME - 200;
        match name.as_str() {
            "wrongname" => hello("someone-else", pid),
            "wrongpid" => hello(&name, 1),
            "early" => link.send(ready),
            "garbage" => link.raw(&frame(b"\xff\xfe{{{ not json")),
            "zerolen" => link.raw(&[0, 0, 0, 0]),
            "oversized" => {
                link.raw(&0x7fff_ffffu32.to_be_bytes());
                link.raw(&vec![b' '; 64 * 1024]);
            }
            "truncated" => {
                link.raw(&[0, 0, 0, 100]);
                link.raw(b"{\"type\":");
                std::process::exit(1);
            }
            "bigreason" => {
                hello(&name, pid);
                welcome();
                link.send(json!({"type": "Failed", "reason": "r".repeat(huge), "exit_code": 65}));
                std::process::exit(65);
            }
            "nanload" => {
                hello(&name, pid);
                welcome();
                link.raw(&frame(br#"{"type":"Loading","fraction":NaN}"#));
            }
            "infload" => {
                hello(&name, pid);
                welcome();
                link.raw(&frame(br#"{"type":"Loading","fraction":1e39}"#));
                link.raw(&frame(br#"{"type":"Loading","fraction":-0.5}"#));
                serve(&link, frames, ready, u64::from(1u32 << 20), "good");
            }
            "hugeerror" => {
                hello(&name, pid);
                welcome();
                link.send(ready.clone());
                link.send(json!({"type": "Error", "id": null, "message": "e".repeat(huge)}));
                serve(&link, frames, Value::Null, 1 << 20, "good");
            }
            "dupehello" => {
                hello(&name, pid);
                welcome();
                hello("someone-else", 1);
                serve(&link, frames, ready, 1 << 20, "good");
            }
            "stray" => {
                hello(&name, pid);
                welcome();
                let spam = link.clone();
                std::thread::spawn(move || {
                    loop {
                        for id in 0..8u64 {
                            spam.send(json!({"type": "Token", "id": id, "text": "STRAY"}));
                            spam.send(json!({"type": "Done", "id": id, "tokens": 1, "ms": 1}));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
                serve(&link, frames, ready, 1 << 20, "STRAY");
            }
            "bogusready" => {
                hello(&name, pid);
                welcome();
                let bogus = json!({"type": "Ready", "load_ms": u64::MAX, "rss": u64::MAX,
                    "model_bytes": u64::MAX, "ctx": 0, "session": {"turns": u64::MAX,
                    "tokens": u64::MAX, "restored_from": "new"}, "state_bytes": u64::MAX});
                serve(&link, frames, bogus, u64::MAX, "good");
            }
            _ => {
                hello(&name, pid);
                welcome();
                serve(&link, frames, ready, 1 << 20, "good");
            }
        }
        // Misbehaved: wait to be killed, else give up.
        std::thread::sleep(Duration::from_secs(5));
        std::process::exit(1)
    }

    /// Sends `ready` (unless null), heartbeats every 100 ms, answers each prompt with one token
    /// `reply`; exits 0 on Shutdown or when the link closes.
    fn serve(
        link: &Link,
        mut frames: FrameReader<UnixStream>,
        ready: Value,
        rss: u64,
        reply: &str,
    ) -> ! {
        if !ready.is_null() {
            link.send(ready);
        }
        let beat = link.clone();
        std::thread::spawn(move || {
            loop {
                beat.send(json!({"type": "Heartbeat", "rss": rss, "state": "ready"}));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        while let Ok(Some(payload)) = frames.read_frame() {
            let msg: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            match msg["type"].as_str() {
                Some("Prompt") => {
                    let id = msg["id"].clone();
                    link.send(json!({"type": "Token", "id": id, "text": reply}));
                    link.send(json!({"type": "Done", "id": id, "tokens": 1, "ms": 1}));
                }
                Some("Shutdown") => std::process::exit(0),
                _ => {}
            }
        }
        std::process::exit(0)
    }
}

/// (instance, ends ready, a needle of the supervisor's log lines about it)
const LINK_ROWS: &[(&str, bool, &str)] = &[
    ("wrongname", false, "did not introduce itself"),
    ("wrongpid", false, "did not introduce itself"),
    ("early", false, "did not introduce itself"),
    ("garbage", false, "bad frame"),
    ("zerolen", false, "bad frame"),
    ("oversized", false, "exceeds the maximum"),
    ("truncated", false, "middle of a frame"),
    ("bigreason", false, "bytes cut"),
    ("nanload", false, "bad frame"),
    ("infload", true, "fraction"),
    ("hugeerror", true, "bytes cut"),
    ("dupehello", true, "second hello"),
    ("stray", true, ""),
    ("bogusready", true, ""),
];

#[test]
fn worker_link_rows() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let t = TestDir::new();
    let model = t.model("models/a.gguf", &tiny_shape());
    let script = t.join("fake-worker");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{FAKE_ARGS}=\"$*\" exec {} --exact fake_worker --nocapture --test-threads=1 -q\n",
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let names: Vec<&str> = std::iter::once("good")
        .chain(LINK_ROWS.iter().map(|r| r.0))
        .collect();
    let mut config = format!(
        "[budget]\nestimate = \"file\"\nmin_required = \"8MiB\"\nheadroom = \"8MiB\"\ntotal = \"8GiB\"\nper_instance_max = 1.0\n\n[defaults]\nmodel = \"{}\"\nram_limit = \"64MiB\"\nrestart = \"never\"\nworker_user = \"root\"\nheartbeat_interval = \"300ms\"\nload_stall_timeout = \"3s\"\nstop_timeout = \"2s\"\n\n",
        model.display()
    );
    for n in &names {
        config.push_str(&format!("[instances.{n}]\n"));
    }
    config.push_str(&format!(
        "[modes.fake]\ninstances = [{}]\n",
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut d = Daemon::start_with_args(
        &t,
        &config,
        "fake",
        &["--worker".as_ref(), script.as_os_str()],
    );
    let settled = |s: &Value| {
        let state = |n: &str| {
            instance(s, n)["state"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        state("good") == "ready"
            && LINK_ROWS.iter().all(|(n, ready, _)| {
                let st = state(n);
                if *ready {
                    st == "ready" || (*n == "infload" && st == "failed")
                } else {
                    st == "failed" || st == "stopped"
                }
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = None;
    while Instant::now() < deadline {
        status = d.status();
        if status.as_ref().is_some_and(settled) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.expect("the daemon answers status");
    let good_pid = instance(&status, "good")["pid"].clone();
    // A stray worker's Token/Done for ids it was never sent reach nobody: `ask good` hears
    // only good's reply.
    let asked = d.cli(&["ask", "good", "hello", "--max-tokens", "4"]);
    let log = d.stderr();
    let mut v = Verdicts::new("worker-link");
    for (name, ready, needle) in LINK_ROWS {
        let verdict = (|| {
            let i = instance(&status, name);
            let state = i["state"].as_str().unwrap_or_default();
            let ok_state = if *ready {
                state == "ready" || (*name == "infload" && state == "failed")
            } else {
                state == "failed" || state == "stopped"
            };
            if !ok_state {
                return Err(format!(
                    "state {state}, expected {}: {}",
                    if *ready { "ready" } else { "failed" },
                    short(&i.to_string())
                ));
            }
            let p = &i["load_progress"];
            if !p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)) {
                return Err(format!("load_progress {p} is not a number from 0 to 1"));
            }
            let reason = i["reason"].as_str().unwrap_or_default();
            if reason.len() > 2048 {
                return Err(format!("a reason of {} bytes", reason.len()));
            }
            let about: Vec<&str> = log.lines().filter(|l| about(l, name)).collect();
            if let Some(long) = about.iter().find(|l| l.len() > 4096) {
                return Err(format!("a log line of {} bytes", long.len()));
            }
            if !needle.is_empty() {
                let text = format!("{}\n{reason}", about.join("\n"));
                says(&text, &[needle])?;
            }
            if *name == "stray" {
                judge(&asked, false, 0, &["good"])?;
                if asked.stdout.contains("STRAY") {
                    return Err(format!(
                        "ask good heard the stray worker: {}",
                        short(&asked.stdout)
                    ));
                }
            }
            Ok(())
        })();
        v.record(name, verdict);
    }
    let after = d.status();
    let verdict = match after {
        None => Err("the supervisor no longer answers status".into()),
        Some(s)
            if instance(&s, "good")["pid"] != good_pid
                || instance(&s, "good")["state"] != "ready" =>
        {
            Err(format!(
                "the well-behaved worker was disturbed: {}",
                short(&instance(&s, "good").to_string())
            ))
        }
        Some(_) if log.contains("panicked") => {
            Err(format!("the supervisor panicked: {}", short(&log)))
        }
        Some(_) => Ok(()),
    };
    v.record("good_worker_undisturbed", verdict);
    assert_eq!(d.terminate().code(), Some(0), "{}", short(&d.stderr()));
    v.finish();
}

// --- session files through the real worker ----------------------------------------------------

use belljar_protocol::worker::{Prompt, Ready, RestoredFrom, Shutdown, SupervisorMsg, WorkerMsg};
use belljar_testkit::link::WorkerLink;

/// The worker's start: Ready, or what it said instead.
fn until_ready(w: &WorkerLink) -> Result<Ready, String> {
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Loading(_)) => {}
            Some(WorkerMsg::Ready(r)) => return Ok(r),
            other => return Err(format!("{other:?}; stderr: {}", short(&w.stderr()))),
        }
    }
}

/// One prompt, answered to the end.
fn turn(w: &mut WorkerLink, id: u64) -> Result<(), String> {
    w.send(&SupervisorMsg::Prompt(Prompt {
        id,
        text: "tell me more".into(),
        max_tokens: 4,
        ignore_eos: true,
        ..Prompt::default()
    }));
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(_)) => {}
            Some(WorkerMsg::Done(_)) => return Ok(()),
            other => return Err(format!("{other:?}; stderr: {}", short(&w.stderr()))),
        }
    }
}

#[derive(Debug)]
struct SessionCase {
    name: &'static str,
    damage: fn(&Path),
    /// Start with the other model (same shape, other weights).
    other_model: bool,
    ctx: &'static str,
    restored_from: RestoredFrom,
    turns: u64,
    /// A needle of the worker's log, naming what it found.
    needle: &'static str,
}

fn session_cases() -> Vec<SessionCase> {
    let case = |name, damage: fn(&Path), restored_from, turns, needle| SessionCase {
        name,
        damage,
        other_model: false,
        ctx: "256",
        restored_from,
        turns,
        needle,
    };
    vec![
        case(
            "log_garbage_line_in_the_middle",
            |d| {
                let log = std::fs::read_to_string(d.join("session.log")).unwrap();
                let (first, rest) = log.split_once('\n').unwrap();
                std::fs::write(
                    d.join("session.log"),
                    format!("{first}\nnot json at all\n{rest}"),
                )
                .unwrap();
            },
            RestoredFrom::State,
            2,
            "unreadable line",
        ),
        case(
            "log_torn_last_line",
            |d| {
                let mut log = std::fs::read(d.join("session.log")).unwrap();
                log.extend(b"{\"prompt\":\"half a tu");
                std::fs::write(d.join("session.log"), log).unwrap();
            },
            RestoredFrom::State,
            2,
            "torn",
        ),
        case(
            "log_binary_garbage",
            |d| {
                std::fs::write(
                    d.join("session.log"),
                    [0xffu8, 0, 0xfe, 0x80, 1, 2, 3].repeat(1000),
                )
                .unwrap();
            },
            RestoredFrom::New,
            0,
            "torn|unreadable",
        ),
        case(
            "log_token_ids_outside_the_vocabulary",
            |d| {
                std::fs::write(
                    d.join("session.log"),
                    "{\"prompt\":\"a\",\"reply\":\"b\",\"tokens\":[999999,-7,2147483647]}\n",
                )
                .unwrap();
                std::fs::remove_file(d.join("session.state")).unwrap();
            },
            RestoredFrom::New,
            0,
            "token",
        ),
        case(
            "log_line_of_4_mib",
            |d| {
                let mut log = std::fs::read(d.join("session.log")).unwrap();
                log.extend(vec![b'x'; 4 << 20]);
                log.push(b'\n');
                std::fs::write(d.join("session.log"), log).unwrap();
            },
            RestoredFrom::State,
            2,
            "unreadable line",
        ),
        case(
            "state_random_bytes",
            |d| {
                std::fs::write(d.join("session.state"), [7u8, 1, 200, 3].repeat(4096)).unwrap();
            },
            RestoredFrom::Log,
            2,
            "corrupt",
        ),
        case(
            "state_truncated",
            |d| {
                let b = std::fs::read(d.join("session.state")).unwrap();
                std::fs::write(d.join("session.state"), &b[..10]).unwrap();
            },
            RestoredFrom::Log,
            2,
            "corrupt",
        ),
        case(
            "state_meta_length_u32_max",
            |d| {
                let mut b = b"BJSESS02".to_vec();
                b.extend(u32::MAX.to_le_bytes());
                b.extend(b"{}");
                std::fs::write(d.join("session.state"), b).unwrap();
            },
            RestoredFrom::Log,
            2,
            "corrupt",
        ),
        case(
            "state_meta_not_json",
            |d| {
                let mut b = b"BJSESS02".to_vec();
                b.extend(4u32.to_le_bytes());
                b.extend(b"{{{{");
                std::fs::write(d.join("session.state"), b).unwrap();
            },
            RestoredFrom::Log,
            2,
            "corrupt",
        ),
        case(
            "kv_missing",
            |d| std::fs::remove_file(d.join("session.kv")).unwrap(),
            RestoredFrom::Log,
            2,
            "missing",
        ),
        case(
            "kv_zeroed",
            |d| {
                let len = std::fs::metadata(d.join("session.kv")).unwrap().len();
                std::fs::write(d.join("session.kv"), vec![0u8; len as usize]).unwrap();
            },
            RestoredFrom::Log,
            2,
            "checksum",
        ),
        SessionCase {
            ctx: "512",
            ..case("state_of_another_ctx", |_| {}, RestoredFrom::Log, 2, "ctx")
        },
        // Issue 17 defect 7: a conversation held with another model is not fed to this one;
        // its files are moved aside (kept) and a new session starts.
        SessionCase {
            other_model: true,
            ..case(
                "session_of_another_model",
                |_| {},
                RestoredFrom::New,
                0,
                "another model|moved aside",
            )
        },
    ]
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn session_row(t: &TestDir, seed: &Path, c: &SessionCase) -> Result<(), String> {
    let dir = t.join(&format!("cases/{}", c.name));
    let state = dir.join("state");
    copy_files(seed, &state);
    let old_log = std::fs::read(seed.join("session.log")).unwrap();
    (c.damage)(&state);
    let model = t.join(if c.other_model {
        "other.gguf"
    } else {
        "m.gguf"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = WorkerLink::start(&dir, "subject", &model, &state, &["--ctx", c.ctx]);
    w.handshake();
    let ready = until_ready(&w);
    let log = w.stderr();
    if log.contains("panicked") {
        return Err(format!("the worker panicked: {}", short(&log)));
    }
    let ready = ready?;
    if ready.session.restored_from != c.restored_from || ready.session.turns != c.turns {
        return Err(format!(
            "restored from {:?} with {} turns, expected {:?} with {}; stderr: {}",
            ready.session.restored_from,
            ready.session.turns,
            c.restored_from,
            c.turns,
            short(&log)
        ));
    }
    says(&log, &[c.needle])?;
    if c.other_model {
        // The old conversation is kept, moved aside, not lost.
        let kept = snapshot(&state).values().any(|b| *b == old_log);
        if !kept {
            return Err("the other model's conversation was not kept aside".into());
        }
    }
    turn(&mut w, 100)?;
    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
    match w.wait().code() {
        Some(0) => Ok(()),
        code => Err(format!(
            "exit {code:?} after Shutdown; stderr: {}",
            short(&w.stderr())
        )),
    }
}

#[test]
fn session_rows_through_the_real_worker() {
    let t = TestDir::new();
    t.model("m.gguf", &tiny_shape());
    t.model(
        "other.gguf",
        &belljar_testkit::ModelShape {
            seed: 99,
            ..tiny_shape()
        },
    );
    // A real session of two turns to damage.
    let seed = t.join("seed");
    {
        let mut w = WorkerLink::start(
            t.path(),
            "subject",
            &t.join("m.gguf"),
            &seed,
            &["--ctx", "256"],
        );
        w.handshake();
        until_ready(&w).unwrap();
        turn(&mut w, 1).unwrap();
        turn(&mut w, 2).unwrap();
        w.send(&SupervisorMsg::Shutdown(Shutdown {}));
        assert_eq!(w.wait().code(), Some(0));
    }
    let cases = session_cases();
    let rows: Vec<Row<'_>> = cases
        .iter()
        .map(|c| {
            let row: Row<'_> = (c.name.to_owned(), Box::new(|| session_row(&t, &seed, c)));
            row
        })
        .collect();
    let mut v = Verdicts::new("session");
    for (name, r) in parallel(&rows, 4) {
        v.record(&name, r);
    }
    v.finish();
}
