//! `supervisor run` for real: root, real cgroups (v1 here), real workers on generated models,
//! each test with its own cgroup parent, runtime and state dirs.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use belljar_testkit::daemon::{Daemon, all_in, instance, unique_parent};
use belljar_testkit::{TestDir, run, tiny_shape, wait_for};

const MIB: u64 = 1 << 20;

/// Three instances on two generated models; a small min_required keeps the test's reservations
/// small.
fn matrix_config(t: &TestDir) -> String {
    t.model("models/a.gguf", &tiny_shape());
    t.model(
        "models/b.gguf",
        &belljar_testkit::ModelShape {
            seed: 2,
            ..tiny_shape()
        },
    );
    r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"

[defaults]
model = "models/a.gguf"
ctx = 256
heartbeat_interval = "200ms"
stop_timeout = "5s"

[instances.subject]
ram_limit = "96MiB"

[instances.observer]
model = "models/b.gguf"
ram_limit = "128MiB"
priority = 1

[instances.god]
priority = 2

[modes.matrix]
instances = ["subject", "observer", "god"]

[modes.single]
instances = ["subject"]
"#
    .to_owned()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn matrix_mode_runs_each_worker_in_its_own_cgroup_and_stops_cleanly() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let mut d = Daemon::start(&t, &matrix_config(&t), "matrix", &[]);
    let status = d.wait_status("all instances ready", |s| all_in(s, "ready"));
    let v1 = d.cgroups.version() == belljar_host::cgroup::Version::V1;
    // god has no ram_limit: it reserves the GGUF-aware estimate (the default), the same number
    // `supervisor estimate` prints for its model at its ctx.
    let est = belljar_testkit::run(
        "supervisor",
        &[
            "estimate",
            t.join("models/a.gguf").to_str().unwrap(),
            "--ctx",
            "256",
            "--json",
        ],
    );
    assert_eq!(est.code, Some(0), "{}", est.stderr);
    let god: u64 = serde_json::from_str::<serde_json::Value>(&est.stdout).unwrap()["total"]
        .as_u64()
        .unwrap();
    assert!(god > 8 * MIB && god < 32 * MIB, "a tiny model: {god}");
    let expected = [("subject", 96 * MIB), ("observer", 128 * MIB), ("god", god)];
    let mut pids = Vec::new();
    for (name, required) in expected {
        let i = instance(&status, name);
        let pid = i["pid"].as_u64().unwrap() as u32;
        pids.push(pid);
        let dir = d.parent().join(name);
        assert_eq!(
            read(&dir, "cgroup.procs"),
            pid.to_string(),
            "{name}: the worker alone is in its cgroup"
        );
        let limit: u64 = read(
            &dir,
            if v1 {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            },
        )
        .parse()
        .unwrap();
        assert_eq!(limit, required, "{name}: limit = required");
        assert_eq!(
            i["memory"]["limit"], limit,
            "{name}: status matches the cgroup"
        );
        assert_eq!(i["allocated"], required);
        let low: u64 = read(
            &dir,
            if v1 {
                "memory.soft_limit_in_bytes"
            } else {
                "memory.low"
            },
        )
        .parse()
        .unwrap();
        assert_eq!(i["memory"]["reservation"], low);
        assert!(i["memory"]["current"].as_u64().unwrap() > 0);
        assert_eq!(i["last_exit"], serde_json::Value::Null);
        assert_eq!(i["estimate_source"], "gguf");
        assert_eq!(i["load_progress"], 1.0);
    }
    assert_eq!(status["budget"]["allocated"], (96 + 128) * MIB + god);
    // The kernel's OOM killer takes the lowest priority first and never the supervisor.
    let adj = |pid: u32| {
        read(Path::new(&format!("/proc/{pid}")), "oom_score_adj")
            .parse::<i32>()
            .unwrap()
    };
    let can_lower = std::process::Command::new("sh")
        .args(["-c", "echo -1 > /proc/self/oom_score_adj"])
        .status()
        .unwrap()
        .success();
    if can_lower {
        assert_eq!(adj(d.child.id()), -900);
    } else {
        // Some sandboxes (this CI's included) refuse negative scores even to root: say so.
        assert!(
            d.stderr().contains("cannot set oom_score_adj -900"),
            "{}",
            d.stderr()
        );
    }
    let scores: Vec<i32> = pids.iter().map(|p| adj(*p)).collect();
    assert_eq!(
        scores,
        [500, 400, 300],
        "subject (0), observer (1), god (2)"
    );
    let mut unique = pids.clone();
    unique.dedup();
    assert_eq!(unique.len(), 3);

    // A second supervisor on the same directories refuses and touches nothing.
    let second = run(
        "supervisor",
        &[
            "run",
            "--mode",
            "matrix",
            "--cgroup-parent",
            &unique_parent("second"),
            "--config",
            d.config.to_str().unwrap(),
            "--runtime-dir",
            d.runtime.to_str().unwrap(),
            "--state-dir",
            d.state.to_str().unwrap(),
        ],
    );
    second
        .expect_code(1)
        .expect_says(&["another supervisor is already running"]);
    assert!(
        all_in(&d.status().unwrap(), "ready"),
        "the first one is undisturbed"
    );

    let exit = d.terminate();
    assert_eq!(exit.code(), Some(0), "log:\n{}", d.stderr());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} is gone"
        );
    }
    assert!(!d.parent().exists(), "the cgroup parent is removed");
    assert!(
        !d.runtime.join("control.sock").exists(),
        "the control socket is removed"
    );
    assert_eq!(
        d.cli(&["status"]).code,
        Some(3),
        "status now says unreachable"
    );
}

#[test]
fn a_workers_orphan_is_reaped_and_dies_with_its_cgroup() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let config = matrix_config(&t).replace("[defaults]\n", "[defaults]\nrestart = \"never\"\n");
    let mut d = Daemon::start(
        &t,
        &config,
        "single",
        &[("BELLJAR_DEBUG_SPAWN_ORPHAN", "true")],
    );
    let status = d.wait_status("subject ready", |s| all_in(s, "ready"));
    let worker = instance(&status, "subject")["pid"].as_u64().unwrap() as u32;
    let dir = d.parent().join("subject");
    let orphan: u32 = wait_for("the orphan in the cgroup", Duration::from_secs(10), || {
        read(&dir, "cgroup.procs")
            .lines()
            .map(|l| l.parse().unwrap())
            .find(|p| *p != worker)
    });
    let ppid = read(Path::new(&format!("/proc/{orphan}")), "status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("PPid:")
                .map(|p| p.trim().parse::<u32>().unwrap())
        })
        .unwrap();
    assert_eq!(
        ppid,
        d.child.id(),
        "the double-forked child was re-parented to the supervisor (subreaper)"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = d.wait_status("the worker's death", |s| {
        instance(s, "subject")["last_exit"] == "signal:9"
    });
    assert_eq!(instance(&status, "subject")["state"], "failed");
    assert_eq!(
        instance(&status, "subject")["allocated"],
        0,
        "a failed instance releases its allocation"
    );
    wait_for(
        "the orphan to be killed and reaped",
        Duration::from_secs(10),
        || (!Path::new(&format!("/proc/{orphan}")).exists()).then_some(()),
    );
    assert!(!dir.exists(), "the instance cgroup is removed");
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn leftover_cgroups_of_a_crashed_run_are_cleaned_at_start() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let parent_rel = unique_parent("leftover");
    let cgroups = belljar_host::cgroup::detect(None).unwrap();
    let ghost = cgroups.root().join(&parent_rel).join("ghost");
    cgroups.prepare_parent(&ghost).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    belljar_host::cgroup::attach(&ghost, sleeper.id()).unwrap();

    let mut d = Daemon::start_with_parent(&t, &matrix_config(&t), "single", &[], parent_rel);
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        sleeper.wait().unwrap().signal(),
        Some(9),
        "the leftover process was killed"
    );
    assert!(!ghost.exists(), "the leftover cgroup was removed");
    assert!(
        d.stderr().contains("removing a leftover instance cgroup"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_mode_that_does_not_fit_starts_nothing() {
    let t = TestDir::new();
    let config = matrix_config(&t) + "";
    let config = config.replace("[budget]\n", "[budget]\ntotal = \"200MiB\"\n");
    let mut d = Daemon::start(&t, &config, "matrix", &[]);
    let exit = d.wait();
    assert_eq!(exit.code(), Some(1));
    assert!(d.stderr().contains("does not fit"), "{}", d.stderr());
    assert!(!d.parent().exists(), "no cgroup was created");
}

#[test]
fn a_runtime_dir_too_long_for_a_socket_is_a_usage_error() {
    let t = TestDir::new();
    let config = t.write("budgets.toml", &matrix_config(&t));
    let long = t.join(&"r".repeat(120));
    let r = run(
        "supervisor",
        &[
            "run",
            "--mode",
            "single",
            "--config",
            config.to_str().unwrap(),
            "--runtime-dir",
            long.to_str().unwrap(),
            "--state-dir",
            t.join("s").to_str().unwrap(),
        ],
    );
    r.expect_code(2)
        .expect_says(&["longer than a Unix socket allows", "shorter --runtime-dir"]);
}

#[test]
fn status_without_a_supervisor_is_exit_3() {
    let t = TestDir::new();
    run(
        "supervisor",
        &["status", "--runtime-dir", t.path().to_str().unwrap()],
    )
    .expect_code(3)
    .expect_says(&["cannot reach the supervisor", "--runtime-dir"]);
}

/// By default workers run as `belljar-worker` (packaging/belljar.sysusers), never as root;
/// a worker user that does not exist is refused before anything starts, naming the fix.
#[test]
fn workers_run_as_belljar_worker_by_default_and_a_missing_user_is_refused() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let mut d = Daemon::start(&t, &matrix_config(&t), "single", &[]);
    let status = d.wait_status("subject ready", |s| all_in(s, "ready"));
    let pid = instance(&status, "subject")["pid"].as_u64().unwrap();
    let uid: u32 = read(Path::new(&format!("/proc/{pid}")), "status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap();
    let expected = nix::unistd::User::from_name("belljar-worker")
        .unwrap()
        .expect("scripts/deps.sh creates belljar-worker")
        .uid
        .as_raw();
    assert_eq!(uid, expected, "the worker runs as belljar-worker");
    assert_eq!(d.terminate().code(), Some(0));

    let t = TestDir::new();
    let config = matrix_config(&t).replace(
        "[defaults]\n",
        "[defaults]\nworker_user = \"belljar-no-such-user\"\n",
    );
    let mut d = Daemon::start(&t, &config, "single", &[]);
    assert_eq!(d.wait().code(), Some(2));
    let said = d.stderr();
    assert!(
        said.contains("worker_user \"belljar-no-such-user\" does not exist")
            && said.contains("nothing was started"),
        "{said}"
    );
    assert!(!d.parent().exists(), "no cgroup was created");

    // A model the worker's user cannot read is refused at start, naming the fix.
    use std::os::unix::fs::PermissionsExt;
    let t = TestDir::new();
    let config = matrix_config(&t);
    let private = t.join("models");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut d = Daemon::start(&t, &config, "single", &[]);
    assert_eq!(d.wait().code(), Some(2));
    let said = d.stderr();
    assert!(
        said.contains("worker_user \"belljar-worker\" cannot read the model"),
        "{said}"
    );
    assert!(!d.parent().exists(), "no cgroup was created");
}

#[test]
fn worker_user_runs_the_worker_unprivileged_in_its_cgroup() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let config = matrix_config(&t).replace(
        "[instances.subject]\n",
        "[instances.subject]\nworker_user = \"nobody\"\n",
    );
    // The model must be readable by the unprivileged worker.
    for p in [
        t.path().to_path_buf(),
        t.join("models"),
        t.join("models/a.gguf"),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut d = Daemon::start(&t, &config, "single", &[]);
    let status = d.wait_status("subject ready", |s| all_in(s, "ready"));
    let pid = instance(&status, "subject")["pid"].as_u64().unwrap();
    let meta = std::fs::metadata(format!("/proc/{pid}")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw(), "the worker runs as nobody");
    let owner = std::fs::metadata(d.state.join("instances/subject"))
        .unwrap()
        .uid();
    assert_eq!(owner, nobody.uid.as_raw(), "its state dir belongs to it");
    assert_eq!(
        read(&d.parent().join("subject"), "cgroup.procs"),
        pid.to_string()
    );
    // The supervisor runs at nice -5 (as root), ahead of its workers; they run at 0 (they used
    // to inherit -5 and compete with the loop and everything else on the machine).
    let nice = |pid: u64| -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    };
    assert_eq!(nice(u64::from(d.child.id())), -5, "the supervisor's nice");
    assert_eq!(nice(pid), 0, "the worker's nice");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A Ctrl-C in a terminal signals the whole foreground process group. The workers have their own
/// session, so only the supervisor gets it and it stops them gracefully (sessions saved), instead
/// of every worker dying of SIGINT.
#[test]
fn ctrl_c_to_the_process_group_stops_the_workers_gracefully() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let mut d = Daemon::start(&t, &matrix_config(&t), "matrix", &[]);
    let status = d.wait_status("all instances ready", |s| all_in(s, "ready"));
    let sup = d.child.id() as i32;
    for name in ["subject", "observer", "god"] {
        let pid = instance(&status, name)["pid"].as_u64().unwrap() as i32;
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
        assert_eq!(sid.as_raw(), pid, "{name} leads its own session");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-sup),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(d.wait().code(), Some(0), "{}", d.stderr());
    let log = d.stderr();
    assert!(
        !log.contains("signal:2"),
        "no worker died of the SIGINT: {log}"
    );
    assert_eq!(
        log.matches("exit_reason=\"stopped\"").count(),
        3,
        "each worker was stopped by the supervisor: {log}"
    );
}

/// The worker's arguments, from /proc.
fn worker_args(pid: u64) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split('\0')
        .map(str::to_owned)
        .collect()
}

/// The value after `flag` in `args`, if the flag is there.
fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// `chat_template` reaches the worker: a built-in's name as it is, a file named relative to the
/// config file's directory as an absolute path that the worker (as belljar-worker) reads and
/// compiles before it gets ready; unset, no flag (the model's own template). `status --json`
/// shows the value, and `add --chat-template` resolves a relative path against the CLI's
/// working directory.
#[test]
fn chat_templates_reach_the_worker_on_its_command_line() {
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
                    {% if add_generation_prompt %}<assistant>{% endif %}";
    t.write("templates/chat.jinja", template);
    t.write("cwd/helper.jinja", template);
    let config = matrix_config(&t)
        .replace(
            "[instances.subject]\n",
            "[instances.subject]\nchat_template = \"chatml\"\n",
        )
        .replace(
            "[instances.observer]\n",
            "[instances.observer]\nchat_template = \"./templates/chat.jinja\"\n",
        );
    let mut d = Daemon::start(&t, &config, "matrix", &[]);
    let s = d.wait_status("all ready", |s| all_in(s, "ready"));
    let pid = |s: &serde_json::Value, name| instance(s, name)["pid"].as_u64().unwrap();

    let subject = worker_args(pid(&s, "subject"));
    assert_eq!(
        after(&subject, "--chat-template"),
        Some("chatml"),
        "{subject:?}"
    );
    assert_eq!(instance(&s, "subject")["chat_template"], "chatml");

    let file = t.join("templates/chat.jinja");
    let observer = worker_args(pid(&s, "observer"));
    assert_eq!(
        after(&observer, "--chat-template"),
        Some(file.to_str().unwrap()),
        "absolute, for a worker that starts in its session dir: {observer:?}"
    );
    let shown = instance(&s, "observer")["chat_template"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        std::fs::canonicalize(&shown).unwrap(),
        std::fs::canonicalize(&file).unwrap(),
        "{shown}"
    );

    let god = worker_args(pid(&s, "god"));
    assert_eq!(after(&god, "--chat-template"), None, "unset: {god:?}");
    assert!(instance(&s, "god").get("chat_template").is_none(), "{s:#}");

    // `add`: a relative --chat-template is the CLI's working directory's.
    let b = t.join("models/b.gguf");
    let r = belljar_testkit::run_cmd(
        std::process::Command::new(belljar_testkit::bin("supervisor"))
            .current_dir(t.join("cwd"))
            .args(["add", "helper", "--model"])
            .arg(&b)
            .args(["--ram-limit", "64MiB", "--chat-template", "./helper.jinja"])
            .arg("--runtime-dir")
            .arg(&d.runtime)
            .arg("--config")
            .arg(&d.config),
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let s = d.wait_status("helper ready", |s| all_in(s, "ready"));
    let helper_file = std::fs::canonicalize(t.join("cwd/helper.jinja")).unwrap();
    let helper = worker_args(pid(&s, "helper"));
    assert_eq!(
        after(&helper, "--chat-template"),
        Some(helper_file.to_str().unwrap()),
        "{helper:?}"
    );
    assert_eq!(
        instance(&s, "helper")["chat_template"],
        helper_file.to_str().unwrap()
    );
    let persisted = read(&d.state, "instances.json");
    assert!(persisted.contains("helper.jinja"), "{persisted}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A chat template file the worker's user cannot read is refused at `run`, like such a model:
/// exit 2 naming the instance, the file and the fix; nothing is started.
#[test]
fn a_chat_template_the_worker_user_cannot_read_is_refused_at_run() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        is_root(),
        "daemon tests create real cgroups: run them as root"
    );
    let t = TestDir::new();
    let file = t.write("private/chat.jinja", "{{ messages }}");
    std::fs::set_permissions(t.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = matrix_config(&t).replace(
        "[instances.subject]\n",
        "[instances.subject]\nchat_template = \"private/chat.jinja\"\n",
    );
    let mut d = Daemon::start(&t, &config, "single", &[]);
    assert_eq!(d.wait().code(), Some(2));
    let said = d.stderr();
    assert!(
        said.contains(&format!(
            "instance subject: worker_user \"belljar-worker\" cannot read the chat template {}",
            t.path().join("private/chat.jinja").display()
        )) && said.contains("nothing was started"),
        "{said}"
    );
    assert!(file.exists());
    assert!(!d.parent().exists(), "no cgroup was created");
}

/// The main job passes `--worker target/release/worker`: a relative worker path is resolved
/// against the supervisor's working directory (a worker starts in its session dir, where the
/// relative path would find nothing: every start failed and the instance ended `failed`).
#[test]
fn a_relative_worker_path_is_resolved_against_the_working_directory() {
    let t = TestDir::new();
    let cwd = std::env::current_dir().unwrap();
    let worker = belljar_testkit::bin("worker");
    // The worker's path relative to this test's working directory: up to the common ancestor,
    // then down.
    let common = cwd
        .components()
        .zip(worker.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = std::path::PathBuf::new();
    for _ in cwd.components().skip(common) {
        rel.push("..");
    }
    rel.extend(worker.components().skip(common));
    assert!(
        rel.is_relative() && cwd.join(&rel).is_file(),
        "{}",
        rel.display()
    );
    let model = t.model("models/m.gguf", &tiny_shape());
    let config = format!(
        "[defaults]\nmodel = \"{}\"\n[instances.one]\nram_limit = \"128MiB\"\n[modes.m]\ninstances = [\"one\"]\n",
        model.display()
    );
    let mut d = Daemon::start_with_args(
        &t,
        &config,
        "m",
        &[std::ffi::OsStr::new("--worker"), rel.as_os_str()],
    );
    d.wait_status("one ready", |s| all_in(s, "ready"));
    assert_eq!(d.terminate().code(), Some(0));
}
