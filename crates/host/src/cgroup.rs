//! Instance cgroups: cgroup v1 (memory controller) and cgroup v2 behind one trait, chosen by
//! detection. The supervisor only ever touches cgroups under its own parent.
//!
//! Common to both versions: a cgroup is a directory; `cgroup.procs` lists and attaches its
//! processes (writing `0` attaches the writer, which is how a worker joins its cgroup in the
//! pre-exec step, before it runs an instruction of its own); removal is `rmdir` once empty.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
pub const DEFAULT_CGROUP_MOUNT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "no cgroup memory controller under {0}: need cgroup v2 with the memory controller, or cgroup v1 with a memory hierarchy (pass --cgroup-root to point at it)"
    )]
    NoMemoryController(PathBuf),
    #[error("cgroup {0} still has processes after they were killed")]
    NotEmpty(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The memory settings of one instance cgroup, in bytes: the lifecycle computes them
/// (crates/budget), this module writes them.
pub use belljar_budget::lifecycle::Limits;

/// What the kernel says about an instance cgroup's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    pub current: u64,
    /// Highest usage of this cgroup's life (`None` where the kernel has no such file).
    pub peak: Option<u64>,
    /// `None` means unlimited.
    pub limit: Option<u64>,
    pub reservation: u64,
    /// The kernel's `oom_kill` counter for this cgroup.
    pub oom_kill: u64,
}

/// Everything the supervisor does with cgroups, for one cgroup version. The supervisor calls
/// only this trait (a test backend can stand in for the kernel); `V1` and `V2` implement the
/// version-specific files and share the rest (the provided methods: cgroup directories and
/// `cgroup.procs` work the same on both).
///
/// Every method but `destroy` is quick (a few small reads or writes); `destroy` waits for the
/// cgroup's processes to go and may block for up to its timeout: call it on a blocking thread.
pub trait CgroupBackend: std::fmt::Debug + Send + Sync {
    fn version(&self) -> Version;
    /// The hierarchy root this backend works under.
    fn root(&self) -> &Path;
    /// Prepares `parent` (a directory under the root) to hold instance cgroups.
    fn prepare_parent(&self, parent: &Path) -> Result<(), CgroupError>;
    fn apply_limits(&self, dir: &Path, limits: &Limits) -> Result<(), CgroupError>;
    /// Kills every process in `dir` (not waiting for them to go).
    fn kill_all(&self, dir: &Path) -> Result<(), CgroupError>;
    fn memory(&self, dir: &Path) -> Result<MemoryStats, CgroupError>;

    /// Whether the cgroup `dir` exists.
    fn exists(&self, dir: &Path) -> bool {
        dir.is_dir()
    }
    /// Creates the fresh, empty cgroup `dir` for one run (an error when it already exists).
    fn create(&self, dir: &Path) -> Result<(), CgroupError> {
        fs::create_dir(dir).map_err(io_err("create cgroup", dir))
    }
    /// Creates `dir` and its missing parents (a cgroup the supervisor moves itself into).
    fn create_all(&self, dir: &Path) -> Result<(), CgroupError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))
    }
    /// What a child needs to join `dir` between fork and exec: a descriptor it writes `0` to
    /// (`cgroup.procs`, opened for writing), so it is in its cgroup before it runs an
    /// instruction of its own.
    fn attach_handle(&self, dir: &Path) -> Result<OwnedFd, CgroupError> {
        open_procs(dir)
    }
    /// Moves process `pid` into `dir`.
    fn attach(&self, dir: &Path, pid: u32) -> Result<(), CgroupError> {
        attach(dir, pid)
    }
    /// The pids in `dir` (empty when it does not exist).
    fn procs(&self, dir: &Path) -> Result<Vec<u32>, CgroupError> {
        procs(dir)
    }
    /// The child cgroups of `dir`, sorted.
    fn subdirs(&self, dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
        subdirs(dir)
    }
    /// Removes `dir` now if nothing is left in it (no processes, no child cgroups): true when
    /// it is gone (or was never there), false when it needs `destroy`. Never waits: the common
    /// case, a run whose worker exited alone, costs a read and an rmdir.
    fn remove_if_empty(&self, dir: &Path) -> Result<bool, CgroupError> {
        if !self.exists(dir) {
            return Ok(true);
        }
        if !self.procs(dir)?.is_empty() || !self.subdirs(dir)?.is_empty() {
            return Ok(false);
        }
        match fs::remove_dir(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(false),
            Err(e) => Err(io_err("remove", dir)(e)),
        }
    }
    /// Kills everything in `dir` and its sub-cgroups, waits (at most `timeout`) until they are
    /// gone and removes the directories; a missing `dir` is fine. Blocks: run it off the loop.
    fn destroy(&self, dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
        destroy(self, dir, timeout)
    }
    /// A descriptor that becomes readable when `dir`'s OOM state may have changed.
    fn oom_watch(&self, dir: &Path) -> Result<OomWatch, CgroupError> {
        OomWatch::new(self.version(), dir)
    }
    /// Major page faults charged to `dir` so far (`None` where the kernel does not say).
    fn major_faults(&self, dir: &Path) -> Option<u64> {
        crate::pressure::major_faults(self.version(), dir)
    }
}

/// Finds the memory hierarchy: `root` is the cgroup mount (default /sys/fs/cgroup), a v2 mount,
/// or a v1 memory mount.
pub fn detect(root: Option<&Path>) -> Result<Box<dyn CgroupBackend>, CgroupError> {
    let root = root.unwrap_or(Path::new(DEFAULT_CGROUP_MOUNT));
    let controllers = root.join("cgroup.controllers");
    if let Ok(text) = fs::read_to_string(&controllers) {
        if text.split_whitespace().any(|c| c == "memory") {
            return Ok(Box::new(V2 {
                root: root.to_path_buf(),
            }));
        }
    }
    for candidate in [root.join("memory"), root.to_path_buf()] {
        if candidate.join("memory.limit_in_bytes").exists() {
            return Ok(Box::new(V1 { root: candidate }));
        }
    }
    Err(CgroupError::NoMemoryController(root.to_path_buf()))
}

/// cgroup v2.
#[derive(Debug, Clone)]
pub struct V2 {
    pub root: PathBuf,
}

/// cgroup v1, memory controller.
#[derive(Debug, Clone)]
pub struct V1 {
    pub root: PathBuf,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(io_err("write", &path))
}

pub(crate) fn read_u64(dir: &Path, file: &str) -> Result<Option<u64>, CgroupError> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// A `key value` line from a flat-keyed file (`memory.events`, `memory.oom_control`).
pub(crate) fn read_key(dir: &Path, file: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

impl CgroupBackend for V2 {
    fn version(&self) -> Version {
        Version::V2
    }
    fn root(&self) -> &Path {
        &self.root
    }
    fn prepare_parent(&self, parent: &Path) -> Result<(), CgroupError> {
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        // The memory controller must be enabled on every level from the root down to the
        // parent, so that instance cgroups get memory.* files.
        let mut dir = self.root.clone();
        let rel = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
        let mut levels = vec![dir.clone()];
        for part in rel.components() {
            dir.push(part);
            levels.push(dir.clone());
        }
        for level in levels {
            let enabled =
                fs::read_to_string(level.join("cgroup.subtree_control")).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                write(&level, "cgroup.subtree_control", "+memory")?;
            }
        }
        Ok(())
    }
    fn apply_limits(&self, dir: &Path, l: &Limits) -> Result<(), CgroupError> {
        write(dir, "memory.max", &l.max.to_string())?;
        write(dir, "memory.high", &l.high.to_string())?;
        write(dir, "memory.low", &l.low.to_string())?;
        if dir.join("memory.swap.max").exists() {
            write(dir, "memory.swap.max", &l.swap_max.to_string())?;
        }
        write(dir, "memory.oom.group", "1")
    }
    fn kill_all(&self, dir: &Path) -> Result<(), CgroupError> {
        if dir.join("cgroup.kill").exists() {
            write(dir, "cgroup.kill", "1")
        } else {
            kill_listed(dir)
        }
    }
    fn memory(&self, dir: &Path) -> Result<MemoryStats, CgroupError> {
        Ok(MemoryStats {
            current: read_u64(dir, "memory.current")?.unwrap_or(0),
            peak: read_u64(dir, "memory.peak")?,
            limit: read_u64(dir, "memory.max")?,
            reservation: read_u64(dir, "memory.low")?.unwrap_or(0),
            oom_kill: read_key(dir, "memory.events", "oom_kill")?.unwrap_or(0),
        })
    }
}

/// v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
pub(crate) const V1_UNLIMITED: u64 = 1 << 62;

impl CgroupBackend for V1 {
    fn version(&self) -> Version {
        Version::V1
    }
    fn root(&self) -> &Path {
        &self.root
    }
    fn prepare_parent(&self, parent: &Path) -> Result<(), CgroupError> {
        fs::create_dir_all(parent).map_err(io_err("create", parent))
    }
    fn apply_limits(&self, dir: &Path, l: &Limits) -> Result<(), CgroupError> {
        write(dir, "memory.limit_in_bytes", &l.max.to_string())?;
        write(dir, "memory.soft_limit_in_bytes", &l.low.to_string())?;
        // memsw counts memory + swap and may not be below the memory limit.
        if dir.join("memory.memsw.limit_in_bytes").exists() {
            write(
                dir,
                "memory.memsw.limit_in_bytes",
                &l.max.saturating_add(l.swap_max).to_string(),
            )?;
        }
        Ok(())
    }
    fn kill_all(&self, dir: &Path) -> Result<(), CgroupError> {
        kill_listed(dir)
    }
    fn memory(&self, dir: &Path) -> Result<MemoryStats, CgroupError> {
        Ok(MemoryStats {
            current: read_u64(dir, "memory.usage_in_bytes")?.unwrap_or(0),
            peak: read_u64(dir, "memory.max_usage_in_bytes")?,
            limit: read_u64(dir, "memory.limit_in_bytes")?.filter(|l| *l < V1_UNLIMITED),
            reservation: read_u64(dir, "memory.soft_limit_in_bytes")?
                .filter(|l| *l < V1_UNLIMITED)
                .unwrap_or(0),
            oom_kill: read_key(dir, "memory.oom_control", "oom_kill")?.unwrap_or(0),
        })
    }
}

/// SIGKILLs every pid listed in `cgroup.procs`. A listed pid belongs to the cgroup at the time
/// of reading; callers repeat until the cgroup is empty.
fn kill_listed(dir: &Path) -> Result<(), CgroupError> {
    for pid in procs(dir)? {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    Ok(())
}

/// The pids in a cgroup (empty when the cgroup does not exist).
pub fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Opens `cgroup.procs` for the pre-exec attach: the child writes `0` to it (itself) between
/// fork and exec, so it is in its cgroup before it runs an instruction of its own.
pub fn open_procs(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let path = dir.join("cgroup.procs");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    Ok(OwnedFd::from(f))
}

/// Moves process `pid` into `dir`.
pub fn attach(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    f.write_all(pid.to_string().as_bytes())
        .map_err(io_err("write", &path))
}

/// Kills everything in `dir` and its sub-cgroups, waits (bounded) until they are gone, and
/// removes the directories. A missing `dir` is fine.
pub fn destroy<B: CgroupBackend + ?Sized>(
    backend: &B,
    dir: &Path,
    timeout: Duration,
) -> Result<(), CgroupError> {
    if !backend.exists(dir) {
        return Ok(());
    }
    for child in backend.subdirs(dir)? {
        destroy(backend, &child, timeout)?;
    }
    // Checked: a timeout past what the clock can add waits "forever" (until the far end).
    let deadline = belljar_budget::lifecycle::later(Instant::now(), timeout);
    loop {
        if backend.procs(dir)?.is_empty() {
            break;
        }
        backend.kill_all(dir)?;
        if Instant::now() >= deadline {
            return Err(CgroupError::NotEmpty(dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // rmdir can briefly fail with EBUSY while the last task is being torn down.
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err("remove", dir)(e)),
        }
    }
}

/// The child cgroups (directories) of `dir`.
pub fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry
            .file_type()
            .map_err(io_err("stat", &entry.path()))?
            .is_dir()
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// This process's cgroup path relative to the v2 root, from `<proc>/self/cgroup` (`0::/path`).
pub fn own_v2_cgroup(proc_root: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(proc_root.join("self/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_memory_files_on_a_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = V2 {
            root: dir.path().into(),
        };
        let inst = dir.path().join("belljar/a");
        fs::create_dir_all(&inst).unwrap();
        fs::write(inst.join("memory.swap.max"), "max").unwrap();
        let limits = Limits {
            max: 1000,
            high: 950,
            low: 600,
            swap_max: 0,
        };
        v2.apply_limits(&inst, &limits).unwrap();
        let read = |f: &str| fs::read_to_string(inst.join(f)).unwrap();
        assert_eq!(read("memory.max"), "1000");
        assert_eq!(read("memory.high"), "950");
        assert_eq!(read("memory.low"), "600");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("memory.oom.group"), "1");
        fs::write(inst.join("memory.current"), "123\n").unwrap();
        fs::write(inst.join("memory.peak"), "456\n").unwrap();
        fs::write(
            inst.join("memory.events"),
            "low 0\nhigh 3\nmax 1\noom 1\noom_kill 2\noom_group_kill 1\n",
        )
        .unwrap();
        let m = v2.memory(&inst).unwrap();
        assert_eq!(
            m,
            MemoryStats {
                current: 123,
                peak: Some(456),
                limit: Some(1000),
                reservation: 600,
                oom_kill: 2
            }
        );
        fs::write(inst.join("memory.max"), "max\n").unwrap();
        assert_eq!(v2.memory(&inst).unwrap().limit, None, "max means unlimited");
    }

    #[test]
    fn v2_prepare_parent_enables_memory_on_every_level() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = V2 {
            root: dir.path().into(),
        };
        fs::write(dir.path().join("cgroup.subtree_control"), "cpu memory").unwrap();
        let parent = dir.path().join("a/b");
        v2.prepare_parent(&parent).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "cpu memory",
            "already on"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("a/cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(
            fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
    }

    #[test]
    fn v1_files_on_a_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = V1 {
            root: dir.path().into(),
        };
        let inst = dir.path().join("a");
        fs::create_dir_all(&inst).unwrap();
        fs::write(inst.join("memory.memsw.limit_in_bytes"), "").unwrap();
        v1.apply_limits(
            &inst,
            &Limits {
                max: 1000,
                high: 950,
                low: 600,
                swap_max: 24,
            },
        )
        .unwrap();
        let read = |f: &str| fs::read_to_string(inst.join(f)).unwrap();
        assert_eq!(read("memory.limit_in_bytes"), "1000");
        assert_eq!(read("memory.soft_limit_in_bytes"), "600");
        assert_eq!(read("memory.memsw.limit_in_bytes"), "1024");
        fs::write(
            inst.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        fs::write(inst.join("memory.usage_in_bytes"), "10").unwrap();
        fs::write(inst.join("memory.max_usage_in_bytes"), "20").unwrap();
        let m = v1.memory(&inst).unwrap();
        assert_eq!(
            (m.current, m.peak, m.limit, m.oom_kill),
            (10, Some(20), Some(1000), 3)
        );
    }

    #[test]
    fn detection() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            detect(Some(dir.path())),
            Err(CgroupError::NoMemoryController(_))
        ));
        fs::write(dir.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        assert_eq!(detect(Some(dir.path())).unwrap().version(), Version::V2);
        let v1 = tempfile::tempdir().unwrap();
        fs::create_dir(v1.path().join("memory")).unwrap();
        fs::write(v1.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        let b = detect(Some(v1.path())).unwrap();
        assert_eq!(b.version(), Version::V1);
        assert_eq!(b.root(), v1.path().join("memory"));
    }

    #[test]
    fn own_cgroup_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("self")).unwrap();
        fs::write(
            dir.path().join("self/cgroup"),
            "4:memory:/x\n0::/system.slice/belljar.service\n",
        )
        .unwrap();
        assert_eq!(
            own_v2_cgroup(dir.path()),
            Some(PathBuf::from("system.slice/belljar.service"))
        );
    }
}

/// A descriptor that becomes readable when a cgroup's OOM state may have changed: on v1 an
/// eventfd registered for `memory.oom_control` in `cgroup.event_control`; on v2 an inotify watch
/// on `memory.events`. Readiness is a hint to read the counters now, not a count.
#[derive(Debug)]
pub enum OomWatch {
    V1 {
        event: nix::sys::eventfd::EventFd,
        /// Kept open for as long as the registration lives.
        _oom_control: fs::File,
        dir: PathBuf,
    },
    V2(nix::sys::inotify::Inotify, PathBuf),
}

impl OomWatch {
    /// Watches `dir` (an instance cgroup) of the given version.
    pub fn new(version: Version, dir: &Path) -> Result<OomWatch, CgroupError> {
        match version {
            Version::V1 => {
                use nix::sys::eventfd::{EfdFlags, EventFd};
                use std::os::fd::AsRawFd;
                let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| io_err("create an eventfd for", dir)(e.into()))?;
                let path = dir.join("memory.oom_control");
                let oom_control = fs::File::open(&path).map_err(io_err("open", &path))?;
                write(
                    dir,
                    "cgroup.event_control",
                    &format!("{} {}", event.as_raw_fd(), oom_control.as_raw_fd()),
                )?;
                Ok(OomWatch::V1 {
                    event,
                    _oom_control: oom_control,
                    dir: dir.to_path_buf(),
                })
            }
            Version::V2 => {
                use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
                let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                    .map_err(|e| io_err("create an inotify for", dir)(e.into()))?;
                let path = dir.join("memory.events");
                inotify
                    .add_watch(&path, AddWatchFlags::IN_MODIFY)
                    .map_err(|e| io_err("watch", &path)(e.into()))?;
                Ok(OomWatch::V2(inotify, dir.to_path_buf()))
            }
        }
    }

    /// Consumes pending notifications; true when there were any.
    pub fn drain(&self) -> bool {
        match self {
            OomWatch::V1 { event, .. } => event.read().is_ok(),
            OomWatch::V2(inotify, _) => inotify.read_events().is_ok_and(|e| !e.is_empty()),
        }
    }

    /// The cgroup's `oom_kill` counter now. On v1 the notification comes when the OOM starts,
    /// a moment before the kill is counted.
    pub fn kills(&self) -> u64 {
        let r = match self {
            OomWatch::V1 { dir, .. } => read_key(dir, "memory.oom_control", "oom_kill"),
            OomWatch::V2(_, dir) => read_key(dir, "memory.events", "oom_kill"),
        };
        r.ok().flatten().unwrap_or(0)
    }
}

impl std::os::fd::AsRawFd for OomWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        match self {
            OomWatch::V1 { event, .. } => event.as_fd().as_raw_fd(),
            OomWatch::V2(inotify, _) => inotify.as_fd().as_raw_fd(),
        }
    }
}
