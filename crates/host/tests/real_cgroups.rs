//! The cgroup backends on this machine's real hierarchies (root): v1's memory controller, and
//! v2's procs/kill/events logic on the cgroup2 mount at /sys/fs/cgroup/unified (which has no
//! memory controller here; the memory files are covered by the fixture tests in the crate).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use belljar_host::cgroup::{self, CgroupBackend, Limits, V2, Version};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A unique parent per test, removed (with everything in it) on drop.
struct Parent<'a> {
    backend: &'a dyn CgroupBackend,
    path: PathBuf,
}

impl<'a> Parent<'a> {
    fn new(backend: &'a dyn CgroupBackend, name: &str) -> Parent<'a> {
        let path = backend
            .root()
            .join(format!("belljar-test-{}-{name}", std::process::id()));
        backend.prepare_parent(&path).unwrap();
        Parent { backend, path }
    }
}

impl Drop for Parent<'_> {
    fn drop(&mut self) {
        let _ = cgroup::destroy(self.backend, &self.path, Duration::from_secs(5));
    }
}

fn sleeper_in(dir: &Path) -> std::process::Child {
    let child = Command::new("sleep")
        .arg("600")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    cgroup::attach(dir, child.id()).unwrap();
    child
}

#[test]
fn v1_memory_controller_for_real() {
    if !is_root() {
        eprintln!("skipped: needs root for real cgroups");
        return;
    }
    let backend = cgroup::detect(None).unwrap();
    if backend.version() != Version::V1 {
        eprintln!("skipped: this machine's memory controller is v2 (covered by the v2 test)");
        return;
    }
    let parent = Parent::new(&*backend, "v1");
    let inst = parent.path.join("a");
    std::fs::create_dir(&inst).unwrap();
    backend
        .apply_limits(
            &inst,
            &Limits {
                max: 256 << 20,
                high: 243 << 20,
                low: 96 << 20,
                swap_max: 0,
            },
        )
        .unwrap();
    let mut child = sleeper_in(&inst);
    assert_eq!(cgroup::procs(&inst).unwrap(), vec![child.id()]);
    let m = backend.memory(&inst).unwrap();
    assert_eq!(m.limit, Some(256 << 20));
    assert_eq!(m.reservation, 96 << 20);
    assert_eq!(m.oom_kill, 0);
    cgroup::destroy(&*backend, &inst, Duration::from_secs(5)).unwrap();
    assert!(!inst.exists());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        child.wait().unwrap().signal(),
        Some(9),
        "killed with its cgroup"
    );
}

#[test]
fn v2_procs_kill_and_events_on_the_real_cgroup2_mount() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !is_root() || !unified.join("cgroup.procs").exists() {
        eprintln!(
            "skipped: needs root and a cgroup2 mount at {}",
            unified.display()
        );
        return;
    }
    let v2 = V2 {
        root: unified.to_path_buf(),
    };
    let parent_path = unified.join(format!("belljar-test-{}-v2", std::process::id()));
    std::fs::create_dir_all(&parent_path).unwrap();
    let parent = Parent {
        backend: &v2,
        path: parent_path,
    };
    let inst = parent.path.join("a");
    std::fs::create_dir(&inst).unwrap();
    assert!(inst.join("cgroup.kill").exists());
    let mut first = sleeper_in(&inst);
    let mut second = sleeper_in(&inst);
    let mut procs = cgroup::procs(&inst).unwrap();
    procs.sort();
    let mut expected = vec![first.id(), second.id()];
    expected.sort();
    assert_eq!(procs, expected);
    let events = std::fs::read_to_string(inst.join("cgroup.events")).unwrap();
    assert!(events.contains("populated 1"), "{events}");
    // cgroup.kill takes everything at once.
    v2.kill_all(&inst).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(first.wait().unwrap().signal(), Some(9));
    assert_eq!(second.wait().unwrap().signal(), Some(9));
    let events = std::fs::read_to_string(inst.join("cgroup.events")).unwrap();
    assert!(events.contains("populated 0"), "{events}");
    cgroup::destroy(&v2, &parent.path.clone(), Duration::from_secs(5)).unwrap();
    assert!(!parent.path.exists());
}

/// A real OOM kill in a v1 cgroup wakes the eventfd registered in cgroup.event_control.
#[test]
fn serial_v1_oom_watch_fires_on_a_real_oom_kill() {
    use std::os::fd::AsRawFd;
    if !is_root() {
        eprintln!("skipped: needs root for real cgroups");
        return;
    }
    let backend = cgroup::detect(None).unwrap();
    if backend.version() != Version::V1 {
        eprintln!("skipped: v1 only here; v2 uses inotify on memory.events");
        return;
    }
    let parent = Parent::new(&*backend, "oomwatch");
    let inst = parent.path.join("a");
    std::fs::create_dir(&inst).unwrap();
    backend
        .apply_limits(
            &inst,
            &Limits {
                max: 32 << 20,
                high: 30 << 20,
                low: 0,
                swap_max: 0,
            },
        )
        .unwrap();
    let watch = cgroup::OomWatch::new(Version::V1, &inst).unwrap();
    assert!(!watch.drain(), "nothing yet");
    // python allocates and touches 256 MiB inside a 32 MiB limit: the kernel kills it.
    let mut hog = Command::new("python3")
        .args(["-c", "import time; b = b'x' * (256 << 20); time.sleep(60)"])
        .spawn()
        .unwrap();
    cgroup::attach(&inst, hog.id()).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(hog.wait().unwrap().signal(), Some(9), "OOM-killed");
    // SAFETY: `watch` owns the descriptor and outlives `fds`.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(watch.as_raw_fd()) };
    let mut fds = [nix::poll::PollFd::new(
        borrowed,
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, 5000u16).unwrap(),
        1,
        "the eventfd became readable"
    );
    assert!(watch.drain());
    assert!(backend.memory(&inst).unwrap().oom_kill >= 1);
}
