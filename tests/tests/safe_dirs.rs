//! Issue 16, defects 1 and 3: the runtime and state dirs are refused when a link, another user's
//! or group/world-writable (exit 2, nothing started), and conversations stay private to the
//! worker's user. User `nobody` plays the local attacker.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use belljar_testkit::daemon::{Daemon, all_in, unique_parent};
use belljar_testkit::{TestDir, bin, run_cmd, tiny_shape};

const CONFIG: &str = r#"
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

[modes.single]
instances = ["subject"]
"#;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (a root daemon, a nobody attacker)"
    );
}

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody").unwrap().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// `supervisor run` on these dirs; asserts it refused with exit 2 naming `dir`, and started
/// nothing (no cgroup parent, no socket).
fn expect_refused(t: &TestDir, runtime: &Path, state: &Path, dir: &Path, says: &str) {
    let config = t.write("budgets.toml", CONFIG);
    t.model("models/a.gguf", &tiny_shape());
    let parent = unique_parent("refused");
    let r = run_cmd(
        Command::new(bin("supervisor"))
            .args(["run", "--mode", "single", "--cgroup-parent", &parent])
            .arg("--config")
            .arg(&config)
            .arg("--runtime-dir")
            .arg(runtime)
            .arg("--state-dir")
            .arg(state)
            .env("BELLJAR_LOG_FORMAT", "text"),
    );
    r.expect_code(2)
        .expect_says(&[&dir.display().to_string(), says, "nothing was started"]);
    let cgroups = belljar_host::cgroup::detect(None).unwrap();
    assert!(
        !cgroups.root().join(&parent).exists(),
        "no cgroup parent was made"
    );
    assert!(!runtime.join("control.sock").exists(), "no socket");
}

#[test]
fn a_state_dir_owned_by_another_user_is_refused() {
    require_root();
    let t = TestDir::new();
    let state = t.join("state");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(nobody().uid), Some(nobody().gid)).unwrap();
    // What nobody planted there is never read, let alone started.
    std::fs::write(state.join("instances.json"), "[]").unwrap();
    expect_refused(&t, &t.join("run"), &state, &state, "owned by uid");
}

#[test]
fn a_symlinked_runtime_dir_is_refused_and_its_target_is_not_chmodded() {
    require_root();
    let t = TestDir::new();
    // nobody's dir, and the link to it that nobody planted where root's runtime dir goes.
    let target = t.join("nobodys");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&target, Some(nobody().uid), Some(nobody().gid)).unwrap();
    let link = t.join("run");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    expect_refused(&t, &link, &t.join("state"), &link, "symbolic link");
    assert_eq!(
        mode(&target),
        0o755,
        "root never chmodded the link's target"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().uid(),
        nobody().uid.as_raw()
    );
}

#[test]
fn a_group_writable_state_dir_is_refused() {
    require_root();
    let t = TestDir::new();
    let state = t.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).unwrap();
    expect_refused(&t, &t.join("run"), &state, &state, "chmod go-w");
}

/// Defect 3: with an unprivileged worker, the state dir was 0711, instances/ 0755 and the
/// session files 0644: any local user could read the conversations.
#[test]
fn conversations_are_private_to_the_worker_user() {
    require_root();
    let t = TestDir::new();
    let config = CONFIG.replace(
        "[instances.subject]\n",
        "[instances.subject]\nworker_user = \"nobody\"\n",
    );
    t.model("models/a.gguf", &tiny_shape());
    // The model must be readable by the unprivileged worker.
    for p in [
        t.path().to_path_buf(),
        t.join("models"),
        t.join("models/a.gguf"),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut d = Daemon::start(&t, &config, "single", &[]);
    d.wait_status("subject ready", |s| all_in(s, "ready"));
    d.cli(&["ask", "subject", "hello", "--max-tokens", "4"])
        .expect_code(0);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    assert_eq!(mode(&d.state), 0o700, "the state dir");
    assert_eq!(mode(&d.state.join("instances")), 0o700, "instances/");
    let session = d.state.join("instances/subject");
    assert_eq!(mode(&session), 0o700, "the session dir");
    assert_eq!(
        std::fs::metadata(&session).unwrap().uid(),
        nobody().uid.as_raw(),
        "the session dir is the worker's"
    );
    let files: Vec<_> = std::fs::read_dir(&session)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty(), "the conversation was saved");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}
