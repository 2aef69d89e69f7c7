//! The control plane for real: the CLI binary against a running supervisor (root, real cgroups,
//! real workers), each test with its own cgroup parent and directories.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use belljar_testkit::daemon::{Daemon, all_in, instance};
use belljar_testkit::{TestDir, tiny_shape};

const MIB: u64 = 1 << 20;

fn config(t: &TestDir, extra_budget: &str) -> String {
    t.model("models/a.gguf", &tiny_shape());
    t.model(
        "models/b.gguf",
        &belljar_testkit::ModelShape {
            seed: 9,
            ..tiny_shape()
        },
    );
    format!(
        r#"
[budget]
min_required = "32MiB"
headroom = "64MiB"
{extra_budget}

[defaults]
model = "models/a.gguf"
ctx = 256
stop_timeout = "5s"

[instances.subject]
ram_limit = "64MiB"

[modes.single]
instances = ["subject"]
"#
    )
}

fn started(t: &TestDir, extra_budget: &str) -> Daemon {
    assert!(
        nix::unistd::geteuid().is_root(),
        "control tests create real cgroups: run them as root"
    );
    let mut d = Daemon::start(t, &config(t, extra_budget), "single", &[]);
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    d
}

fn model(t: &TestDir, name: &str) -> String {
    t.join(name).to_str().unwrap().to_owned()
}

#[test]
fn add_ask_remove() {
    let t = TestDir::new();
    let mut d = started(&t, "");
    let b = model(&t, "models/b.gguf");
    d.cli(&[
        "add",
        "helper",
        "--model",
        &b,
        "--ram-limit",
        "96M",
        "--priority",
        "-1",
    ])
    .expect_code(0)
    .expect_says(&["helper is ready"]);
    let status = d.status().unwrap();
    let h = instance(&status, "helper");
    assert_eq!(h["state"], "ready");
    assert_eq!(h["allocated"], 96 * MIB);
    assert_eq!(status["budget"]["allocated"], (64 + 96) * MIB);
    assert!(d.parent().join("helper").exists());

    let r = d.cli(&[
        "ask",
        "helper",
        "hello there",
        "--max-tokens",
        "16",
        "--ignore-eos",
    ]);
    r.expect_code(0).expect_says(&["(16 tokens in"]);
    assert!(!r.stdout.trim().is_empty(), "the reply streamed to stdout");

    d.cli(&["remove", "helper"])
        .expect_code(0)
        .expect_says(&["helper removed"]);
    let status = d.status().unwrap();
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["name"] != "helper"),
        "gone"
    );
    assert_eq!(status["budget"]["allocated"], 64 * MIB, "budget back");
    assert!(!d.parent().join("helper").exists(), "cgroup removed");

    // Duplicate add and unknown remove are refusals.
    d.cli(&["add", "subject", "--model", &b])
        .expect_code(1)
        .expect_says(&["instance subject already exists"]);
    d.cli(&["remove", "ghost"])
        .expect_code(1)
        .expect_says(&["unknown instance ghost"]);
    d.cli(&["ask", "ghost", "hi"])
        .expect_code(1)
        .expect_says(&["unknown instance ghost"]);
    d.cli(&["add", "Bad/Name", "--model", &b])
        .expect_code(2)
        .expect_says(&["invalid instance name"]);
    d.cli(&["add", "x", "--model", "/nonexistent.gguf"])
        .expect_code(2)
        .expect_says(&["/nonexistent.gguf"]);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_refused_add_names_the_shortfall_and_changes_nothing() {
    let t = TestDir::new();
    let mut d = started(&t, "total = \"300MiB\"");
    let b = model(&t, "models/b.gguf");
    d.cli(&["add", "first", "--model", &b, "--ram-limit", "140M"])
        .expect_code(0);
    let before = d.status().unwrap();
    let persisted = std::fs::read_to_string(d.state.join("instances.json")).unwrap();
    // Layer 2: the budget (300 MiB, 204 MiB used) cannot hold 120 MiB more.
    let r = d.cli(&["add", "greedy", "--model", &b, "--ram-limit", "120M"]);
    r.expect_code(1).expect_says(&[
        "greedy needs 120.0 MiB",
        "only 96.0 MiB of the budget's 300.0 MiB is free",
    ]);
    let r = d.cli(&["add", "greedy", "--model", &b, "--ram-limit", "200M"]);
    r.expect_code(1).expect_says(&["per_instance_max"]);
    let after = d.status().unwrap();
    assert_eq!(before["budget"], after["budget"], "nothing allocated");
    assert_eq!(after["instances"].as_array().unwrap().len(), 2);
    assert!(!d.parent().join("greedy").exists(), "no cgroup");
    assert_eq!(
        std::fs::read_to_string(d.state.join("instances.json")).unwrap(),
        persisted,
        "nothing persisted"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn serial_a_precheck_refusal_names_the_shortfall() {
    let t = TestDir::new();
    let mut d = started(&t, "total = \"64GiB\"");
    // Layer 3: the budget has room, the machine has not (available < required + headroom).
    let available = d.status().unwrap()["host"]["available"].as_u64().unwrap();
    let too_much = format!("{}M", available / MIB + 1024);
    let b = model(&t, "models/b.gguf");
    d.cli(&["add", "hungry", "--model", &b, "--ram-limit", &too_much])
        .expect_code(1)
        .expect_says(&["pre-load check refused", "short by"]);
    assert_eq!(
        d.status().unwrap()["instances"].as_array().unwrap().len(),
        1
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn added_instances_and_their_sessions_survive_a_supervisor_restart() {
    let t = TestDir::new();
    let mut d = started(&t, "");
    let b = model(&t, "models/b.gguf");
    d.cli(&["add", "keeper", "--model", &b]).expect_code(0);
    d.cli(&["add", "goner", "--model", &b]).expect_code(0);
    d.cli(&[
        "ask",
        "keeper",
        "remember this",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ])
    .expect_code(0);
    d.cli(&["remove", "goner"]).expect_code(0);
    assert_eq!(d.terminate().code(), Some(0));
    let parent = d.parent_rel.clone();
    drop(d);

    let mut d = Daemon::start_with_parent(
        &t,
        &std::fs::read_to_string(t.join("budgets.toml")).unwrap(),
        "single",
        &[],
        parent,
    );
    let status = d.wait_status("keeper back and ready", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "keeper" && i["state"] == "ready")
    });
    let names: Vec<&str> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keeper", "subject"], "removed ones stay removed");
    let reason = instance(&status, "keeper")["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("1 turns restored from state"),
        "the session came back: {reason}"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

/// The `reason` of `name` once it is ready.
fn ready_reason(d: &mut Daemon, name: &str) -> String {
    let status = d.wait_status("ready", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == name && i["state"] == "ready")
    });
    instance(&status, name)["reason"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Issue #17, 10: `remove` kept the session, so adding the name again silently restored the old
/// conversation (and with another model replayed its token ids). Now `remove` moves it aside
/// once the worker has stopped; `remove --keep-session` keeps it.
#[test]
fn remove_moves_the_session_aside_unless_it_is_kept() {
    let t = TestDir::new();
    let mut d = started(&t, "");
    let a = model(&t, "models/a.gguf");
    let b = model(&t, "models/b.gguf");
    let instances = d.state.join("instances");
    let ask = |d: &Daemon| {
        d.cli(&[
            "ask",
            "helper",
            "hello",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ])
        .expect_code(0);
    };
    d.cli(&["add", "helper", "--model", &a]).expect_code(0);
    ask(&d);
    d.cli(&["remove", "helper"])
        .expect_code(0)
        .expect_says(&["helper removed", "moved aside"]);
    assert!(
        !instances.join("helper").exists(),
        "the session dir is gone"
    );
    let aside: Vec<std::path::PathBuf> = std::fs::read_dir(&instances)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("helper.removed-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        aside[0].join("session.log").exists(),
        "kept aside, not deleted"
    );
    // The name again, with another model: a new conversation.
    d.cli(&["add", "helper", "--model", &b]).expect_code(0);
    let reason = ready_reason(&mut d, "helper");
    assert!(reason.contains("0 turns restored from new"), "{reason}");
    ask(&d);
    // --keep-session: the conversation stays and comes back with the name.
    d.cli(&["remove", "helper", "--keep-session"])
        .expect_code(0)
        .expect_says(&["helper removed", "kept"]);
    assert!(instances.join("helper/session.log").exists());
    d.cli(&["add", "helper", "--model", &b]).expect_code(0);
    let reason = ready_reason(&mut d, "helper");
    assert!(reason.contains("1 turns restored from state"), "{reason}");
    assert_eq!(d.terminate().code(), Some(0));
}

fn as_nobody(d: &Daemon, args: &[&str]) -> belljar_testkit::Run {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(belljar_testkit::bin("supervisor"))
        .args(args)
        .arg("--runtime-dir")
        .arg(&d.runtime);
    belljar_testkit::run_cmd(&mut cmd)
}

#[test]
fn an_unauthorized_uid_is_refused_by_modes_and_by_peer_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestDir::new();
    let mut d = started(&t, "");
    let sock = d.runtime.join("control.sock");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.runtime), 0o700);
    assert_eq!(mode(&sock), 0o600);
    // As shipped: the directory keeps nobody out.
    as_nobody(&d, &["status"])
        .expect_code(3)
        .expect_says(&["Permission denied"]);
    // Opened up by hand: SO_PEERCRED still refuses.
    for p in [t.path(), &d.runtime] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    as_nobody(&d, &["status"])
        .expect_code(1)
        .expect_says(&["permission denied: uid 65534"]);
    as_nobody(&d, &["remove", "subject"])
        .expect_code(1)
        .expect_says(&["permission denied"]);
    assert!(all_in(&d.status().unwrap(), "ready"), "nothing changed");
    assert_eq!(d.terminate().code(), Some(0));
}

/// `[control] group`: the runtime dir is 0750 and the socket 0660, both in the group, so a
/// member (here `nobody`, whose group is `nogroup`) may use the CLI. (The socket used to stay
/// 0600 root:root, and a member got "Permission denied".)
#[test]
fn a_member_of_the_control_group_may_use_the_socket() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let t = TestDir::new();
    let mut d = started(&t, "[control]\ngroup = \"nogroup\"\n");
    let sock = d.runtime.join("control.sock");
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("Debian's nogroup")
        .gid
        .as_raw();
    assert_eq!(meta(&d.runtime).permissions().mode() & 0o777, 0o750);
    assert_eq!(meta(&d.runtime).gid(), nogroup);
    assert_eq!(meta(&sock).permissions().mode() & 0o777, 0o660);
    assert_eq!(meta(&sock).gid(), nogroup);
    // The test's own temp dir must let nobody pass through to the runtime dir.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let o = as_nobody(&d, &["status", "--json"]);
    o.expect_code(0);
    assert!(o.stdout.contains("\"subject\""), "{}", o.stdout);
    assert_eq!(d.terminate().code(), Some(0));
}

/// A member of the control group may add only a model it could read itself: root's
/// 0600 copy is refused (before, the check was not made), the 0644 one is added.
#[test]
fn a_control_group_member_cannot_load_a_file_it_cannot_read() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestDir::new();
    let mut d = started(&t, "[control]\ngroup = \"nogroup\"\n");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let models = t.join("models");
    std::fs::set_permissions(&models, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = models.join("secret.gguf");
    std::fs::copy(model(&t, "models/b.gguf"), &secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open = model(&t, "models/b.gguf");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let add = |name: &str, path: &str| {
        as_nobody(&d, &["add", name, "--model", path, "--ram-limit", "64M"])
    };
    add("stolen", secret.to_str().unwrap())
        .expect_code(1)
        .expect_says(&["not readable by uid 65534"]);
    let status = d.status().unwrap();
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["name"] != "stolen"),
        "nothing added"
    );
    add("mine", &open)
        .expect_code(0)
        .expect_says(&["mine is ready"]);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn garbage_oversized_and_stalled_clients_do_not_disturb_status() {
    let t = TestDir::new();
    let mut d = started(&t, "");
    let sock = d.runtime.join("control.sock");
    let timed_status = |d: &Daemon| {
        let start = Instant::now();
        assert!(d.status().is_some());
        start.elapsed()
    };
    let baseline = (0..5).map(|_| timed_status(&d)).max().unwrap();

    let stalled: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let attacker = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            for i in 0..100u32 {
                if let Ok(mut s) = UnixStream::connect(&sock) {
                    let garbage: Vec<u8> = (0..64).map(|b| (b as u32 * 31 + i) as u8).collect();
                    let _ = s.write_all(&garbage);
                }
            }
            let mut s = UnixStream::connect(&sock).unwrap();
            let _ = s.write_all(&u32::MAX.to_be_bytes());
            let _ = s.write_all(&[b'x'; 4096]);
        })
    };
    let during: Vec<Duration> = (0..10).map(|_| timed_status(&d)).collect();
    attacker.join().unwrap();
    let worst = *during.iter().max().unwrap();
    assert!(
        worst < baseline * 10 + Duration::from_millis(500),
        "status took {worst:?} under attack (baseline {baseline:?})"
    );
    drop(stalled);
    assert!(all_in(&d.status().unwrap(), "ready"));
    assert_eq!(d.terminate().code(), Some(0));
}

/// [swap] `add --load on-demand`: added unloaded (nothing reserved, no cgroup), persisted at
/// once, refused when it could never fit beside the always-loaded instances; `load` and
/// `unload` move it; a restarted supervisor brings it back unloaded.
#[test]
fn an_instance_added_on_demand_is_unloaded_until_loaded_and_survives_a_restart() {
    let t = TestDir::new();
    let mut d = started(&t, "total = \"300MiB\"\nper_instance_max = 1.0");
    let b = model(&t, "models/b.gguf");
    d.cli(&[
        "add",
        "od",
        "--model",
        &b,
        "--ram-limit",
        "96M",
        "--load",
        "on-demand",
    ])
    .expect_code(0)
    .expect_says(&["added od (on demand: its first request loads it)"]);
    let status = d.status().unwrap();
    let od = instance(&status, "od");
    assert_eq!(od["state"], "unloaded", "{od}");
    assert_eq!(od["load"], "on-demand");
    assert_eq!(od["allocated"], 0);
    assert_eq!(status["budget"]["allocated"], 64 * MIB, "nothing reserved");
    assert!(!d.parent().join("od").exists(), "no cgroup");
    let persisted = std::fs::read_to_string(d.state.join("instances.json")).unwrap();
    assert!(
        persisted.contains("\"od\"") && persisted.contains("\"on-demand\""),
        "persisted at once: {persisted}"
    );
    // The same add again changes nothing.
    d.cli(&[
        "add",
        "od",
        "--model",
        &b,
        "--ram-limit",
        "96M",
        "--load",
        "on-demand",
    ])
    .expect_code(0)
    .expect_says(&["already exists with this spec"]);

    // Beside subject (64 MiB) only 236 MiB of the 300 MiB is ever free.
    d.cli(&[
        "add", "big", "--model", &b, "--ram-limit", "250M", "--load", "on-demand",
    ])
    .expect_code(1)
    .expect_says(&[
        "big would need 250.0 MiB but only 236.0 MiB of the budget's 300.0 MiB is left beside the always-loaded instances",
        "could never be loaded",
        "lower --ram-limit",
    ]);
    d.cli(&["add", "bad", "--model", &b, "--load", "sometimes"])
        .expect_code(2)
        .expect_says(&["sometimes", "on-demand"]);
    let names = |s: &serde_json::Value| -> Vec<String> {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&d.status().unwrap()), ["od", "subject"]);

    // An always-loaded add beside it starts as before; od still fits beside the two (96 MiB).
    d.cli(&["add", "steady", "--model", &b, "--ram-limit", "140M"])
        .expect_code(0)
        .expect_says(&["steady is ready"]);
    d.cli(&["load", "od"]).expect_code(0);
    let status = d.status().unwrap();
    let od = instance(&status, "od");
    assert_eq!(od["state"], "ready", "{od}");
    assert_eq!(od["allocated"], 96 * MIB);
    assert_eq!(od["loads"], 1, "{od}");
    d.cli(&["status"])
        .expect_code(0)
        .expect_says(&["[on demand, 1 load, 0 evictions]"]);
    d.cli(&["unload", "od"]).expect_code(0);
    let status = d.status().unwrap();
    assert_eq!(instance(&status, "od")["state"], "unloaded");
    assert_eq!(
        status["budget"]["allocated"],
        (64 + 140) * MIB,
        "od's 96 MiB back"
    );
    d.cli(&["load", "ghost"])
        .expect_code(1)
        .expect_says(&["unknown instance ghost"]);
    d.cli(&["unload", "ghost"])
        .expect_code(1)
        .expect_says(&["unknown instance ghost"]);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    let parent = d.parent_rel.clone();
    drop(d);

    let mut d = Daemon::start_with_parent(
        &t,
        &std::fs::read_to_string(t.join("budgets.toml")).unwrap(),
        "single",
        &[],
        parent,
    );
    let status = d.wait_status("steady back and ready", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "steady" && i["state"] == "ready")
    });
    assert_eq!(names(&status), ["od", "steady", "subject"]);
    let od = instance(&status, "od");
    assert_eq!(od["state"], "unloaded", "restored, not loaded: {od}");
    assert_eq!(od["allocated"], 0);
    assert_eq!(status["budget"]["allocated"], (64 + 140) * MIB);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
}
