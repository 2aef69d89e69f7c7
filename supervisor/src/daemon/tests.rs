//! The loop driven in-process through its seams: a test cgroup backend and a spawner whose
//! "workers" are socketpair ends held by the test. No root, no real cgroups or processes.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use belljar_host::cgroup::{CgroupBackend, CgroupError, Limits, MemoryStats, Version};
use belljar_host::proc_ctl::Exit;
use belljar_host::spawn::{SpawnRequest, Spawned};
use belljar_protocol::control::{ClientHello, Command, Response, ServerHello, StatusQuery};
use belljar_protocol::tokio_io::{read_frame, write_frame};
use belljar_protocol::worker::{Hello, Loading, SupervisorMsg, WorkerMsg};
use belljar_protocol::{MAX_FRAME, PROTOCOL_VERSION, decode};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::host::{ExitSink, Spawner};
use super::{Access, Admitted, DaemonConfig};

/// A destroy the test holds: the cgroup, a signal that it has begun, and the release.
type Gate = (
    PathBuf,
    mpsc::UnboundedSender<()>,
    std::sync::mpsc::Receiver<()>,
);

/// Cgroups as a set of paths. `destroy` of the gated cgroup blocks until the test releases it.
#[derive(Debug)]
struct TestCgroups {
    root: PathBuf,
    dirs: Mutex<BTreeSet<PathBuf>>,
    gate: Mutex<Option<Gate>>,
}

impl CgroupBackend for TestCgroups {
    fn version(&self) -> Version {
        Version::V2
    }
    fn root(&self) -> &Path {
        &self.root
    }
    fn prepare_parent(&self, _: &Path) -> Result<(), CgroupError> {
        Ok(())
    }
    fn apply_limits(&self, _: &Path, _: &Limits) -> Result<(), CgroupError> {
        Ok(())
    }
    fn kill_all(&self, _: &Path) -> Result<(), CgroupError> {
        Ok(())
    }
    fn memory(&self, _: &Path) -> Result<MemoryStats, CgroupError> {
        Ok(MemoryStats::default())
    }
    fn exists(&self, dir: &Path) -> bool {
        self.dirs.lock().unwrap().contains(dir)
    }
    fn create(&self, dir: &Path) -> Result<(), CgroupError> {
        assert!(
            self.dirs.lock().unwrap().insert(dir.to_path_buf()),
            "{dir:?} exists"
        );
        Ok(())
    }
    /// Always the slow path: `destroy`, on the blocking pool.
    fn remove_if_empty(&self, _: &Path) -> Result<bool, CgroupError> {
        Ok(false)
    }
    fn procs(&self, _: &Path) -> Result<Vec<u32>, CgroupError> {
        Ok(Vec::new())
    }
    fn subdirs(&self, dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.dirs.lock().unwrap();
        Ok(dirs
            .iter()
            .filter(|d| d.parent() == Some(dir))
            .cloned()
            .collect())
    }
    fn destroy(&self, dir: &Path, _: Duration) -> Result<(), CgroupError> {
        let gate = {
            let mut g = self.gate.lock().unwrap();
            match &*g {
                Some((d, _, _)) if d == dir => g.take(),
                _ => None,
            }
        };
        if let Some((_, entered, release)) = gate {
            let _ = entered.send(());
            let _ = release.recv();
        }
        self.dirs.lock().unwrap().remove(dir);
        Ok(())
    }
    fn oom_watch(&self, dir: &Path) -> Result<belljar_host::cgroup::OomWatch, CgroupError> {
        Err(CgroupError::NotEmpty(dir.to_path_buf()))
    }
    fn major_faults(&self, _: &Path) -> Option<u64> {
        None
    }
}

/// A spawned fake worker: its instance, its pid, and the worker's end of the link.
type FakeRun = (String, u32, StdStream);

/// Hands the worker's end of each run's socketpair to the test; exits happen when the test
/// sends them.
#[derive(Debug)]
struct FakeSpawner {
    next_pid: u32,
    runs: mpsc::UnboundedSender<FakeRun>,
    exits: Arc<Mutex<Option<ExitSink>>>,
}

impl Spawner for FakeSpawner {
    fn spawn(
        &mut self,
        req: &SpawnRequest,
        cgroups: &dyn CgroupBackend,
    ) -> Result<Spawned, String> {
        cgroups.create(&req.cgroup).map_err(|e| e.to_string())?;
        let (ours, theirs) = StdStream::pair().map_err(|e| e.to_string())?;
        self.next_pid += 1;
        let pid = self.next_pid;
        self.runs
            .send((req.name.clone(), pid, theirs))
            .map_err(|e| e.to_string())?;
        Ok(Spawned {
            pid,
            cgroup: req.cgroup.clone(),
            link: ours,
            stdout: None,
            stderr: None,
        })
    }
    fn watch_exits(&mut self, exits: ExitSink) -> std::io::Result<()> {
        *self.exits.lock().unwrap() = Some(exits);
        Ok(())
    }
}

/// A fake worker past its handshake.
struct FakeWorker {
    pid: u32,
    link: UnixStream,
}

impl FakeWorker {
    async fn greet(name: &str, pid: u32, link: StdStream) -> FakeWorker {
        link.set_nonblocking(true).unwrap();
        let mut w = FakeWorker {
            pid,
            link: UnixStream::from_std(link).unwrap(),
        };
        w.send(&WorkerMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            instance: name.to_owned(),
            pid,
        }))
        .await;
        assert!(matches!(w.receive().await, SupervisorMsg::Welcome(_)));
        w
    }
    async fn send(&mut self, msg: &WorkerMsg) {
        write_frame(&mut self.link, msg).await.unwrap();
    }
    async fn receive(&mut self) -> SupervisorMsg {
        let frame = read_frame(&mut self.link, MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        decode(&frame).unwrap()
    }
    async fn loading(&mut self, fraction: f32) {
        self.send(&WorkerMsg::Loading(Loading { fraction })).await;
    }
}

/// One `status` over the control socket.
async fn status(socket: &Path) -> belljar_protocol::control::StatusReport {
    let mut s = UnixStream::connect(socket).await.unwrap();
    write_frame(
        &mut s,
        &ClientHello {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await
    .unwrap();
    let hello: ServerHello =
        decode(&read_frame(&mut s, MAX_FRAME).await.unwrap().unwrap()).unwrap();
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    write_frame(&mut s, &Command::Status(StatusQuery {}))
        .await
        .unwrap();
    match decode(&read_frame(&mut s, MAX_FRAME).await.unwrap().unwrap()).unwrap() {
        Response::Status(r) => *r,
        other => panic!("expected a status, got {other:?}"),
    }
}

/// Polls `status` until `ok` holds (each answer is itself proof that the loop runs).
async fn status_until(
    socket: &Path,
    what: &str,
    ok: impl Fn(&belljar_protocol::control::StatusReport) -> bool,
) -> belljar_protocol::control::StatusReport {
    let wait = async {
        loop {
            let s = status(socket).await;
            if ok(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn progress(s: &belljar_protocol::control::StatusReport, name: &str) -> f32 {
    s.instances
        .iter()
        .find(|i| i.name == name)
        .unwrap()
        .load_progress
}

fn instance<'a>(
    s: &'a belljar_protocol::control::StatusReport,
    name: &str,
) -> &'a belljar_protocol::control::InstanceStatus {
    s.instances.iter().find(|i| i.name == name).unwrap()
}

/// While a worker's cgroup takes its time to go (its destroy blocks on the blocking pool), the
/// loop answers `status` and processes the other worker's messages; the exit is classified once
/// the cgroup is gone. (Two runtime threads: were the destroy run on the loop, the loop's thread
/// would block and the status requests time out, rather than the whole test hang.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cgroup_destroy_does_not_block_the_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cgroup");
    let parent = root.join("belljar");
    let config_path = tmp.path().join("budgets.toml");
    let config = belljar_config::Config::parse(
        "[defaults]\nmodel = \"m.gguf\"\n[instances.a]\n[instances.b]\n\
         [modes.m]\ninstances = [\"a\", \"b\"]\n[pressure]\nenabled = false\n",
        &config_path,
    )
    .unwrap();
    let admitted = Admitted {
        estimate: 64 << 20,
        required: 64 << 20,
        source: belljar_budget::estimate::Origin::File,
        protected: 0,
        identity: None,
        vram: 0,
    };
    let instances = config
        .mode("m", 2)
        .unwrap()
        .into_iter()
        .map(|s| (s, admitted.clone()))
        .collect();
    let cgroups = Arc::new(TestCgroups {
        root,
        dirs: Mutex::new(BTreeSet::new()),
        gate: Mutex::new(None),
    });
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let exits = Arc::new(Mutex::new(None));
    let cfg = DaemonConfig {
        cgroups: cgroups.clone(),
        spawner: Box::new(FakeSpawner {
            next_pid: 4_000_000,
            runs: runs_tx,
            exits: exits.clone(),
        }),
        parent: parent.clone(),
        remove_parent: false,
        state_dir: tmp.path().join("state"),
        worker_bin: PathBuf::from("/nonexistent/worker"),
        headroom: 0,
        usable: 1 << 30,
        proc_root: belljar_host::ProcRoot::default(),
        instances,
        config,
        access: Access {
            own_uid: nix::unistd::geteuid(),
            group: None,
        },
        metrics: None,
        gpus: None,
    };
    let socket = tmp.path().join("control.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(super::serve(cfg, listener, async {
        let _ = stop_rx.await;
    }));

    let mut workers = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (name, pid, link) = runs.recv().await.unwrap();
        workers.insert(name.clone(), FakeWorker::greet(&name, pid, link).await);
    }
    let exit = |pid: u32, how: Exit| {
        exits
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .send((pid, how))
            .unwrap();
    };
    workers.get_mut("b").unwrap().loading(0.25).await;
    status_until(&socket, "b loading", |s| progress(s, "b") == 0.25).await;

    // a's worker exits; its cgroup's removal blocks until released.
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, gate) = std::sync::mpsc::channel();
    *cgroups.gate.lock().unwrap() = Some((parent.join("a"), entered_tx, gate));
    let a = workers.remove("a").unwrap();
    exit(a.pid, Exit::Code(0));
    entered.recv().await.unwrap();

    // Meanwhile the loop answers and b's messages are processed.
    workers.get_mut("b").unwrap().loading(0.75).await;
    let s = status_until(&socket, "b's progress while a's cgroup goes", |s| {
        progress(s, "b") == 0.75
    })
    .await;
    assert_eq!(
        instance(&s, "a").last_exit,
        None,
        "a's exit is classified once its cgroup is gone"
    );
    assert!(cgroups.exists(&parent.join("a")), "still being destroyed");

    release.send(()).unwrap();
    let s = status_until(&socket, "a's exit classified", |s| {
        instance(s, "a").last_exit.is_some()
    })
    .await;
    assert_eq!(instance(&s, "a").last_exit.as_deref(), Some("exit:0"));
    assert_eq!(instance(&s, "a").state, "stopped", "restart = on-failure");
    assert!(!cgroups.exists(&parent.join("a")));

    // Shutdown: b is asked to stop, exits, and the loop ends with every cgroup gone.
    stop_tx.send(()).unwrap();
    let mut b = workers.remove("b").unwrap();
    loop {
        if let SupervisorMsg::Shutdown(_) = b.receive().await {
            break;
        }
    }
    exit(b.pid, Exit::Code(0));
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("the loop ends")
        .unwrap()
        .unwrap();
    assert!(
        cgroups.dirs.lock().unwrap().is_empty(),
        "every cgroup removed"
    );
}
