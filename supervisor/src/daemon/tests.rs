//! The loop driven in-process through its seams: a test cgroup backend and a spawner whose
//! "workers" are socketpair ends held by the test. No root, no real cgroups or processes, and
//! (but for the blocking-destroy test) no real time: tokio's clock is paused, so backoffs,
//! the breaker's window, the watchdog and stop timeouts are measured exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use belljar_host::cgroup::{CgroupBackend, CgroupError, Limits, MemoryStats, Version};
use belljar_host::proc_ctl::Exit;
use belljar_host::spawn::{SpawnRequest, Spawned};
use belljar_protocol::control::{
    AddRequest, ClientHello, Command, InstanceStatus, RemoveRequest, Response, ServerHello,
    StatusQuery, StatusReport,
};
use belljar_protocol::tokio_io::{read_frame, write_frame};
use belljar_protocol::worker::{
    Heartbeat, Hello, Loading, Ready, RestoredFrom, SessionInfo, SupervisorMsg, WorkerMsg,
    WorkerState,
};
use belljar_protocol::{MAX_FRAME, PROTOCOL_VERSION, decode};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::host::{ExitSink, Spawner};
use super::{Access, Admitted, DaemonConfig};

/// A destroy the test holds: the cgroup, a signal that it has begun, and the release.
type Gate = (
    PathBuf,
    mpsc::UnboundedSender<()>,
    std::sync::mpsc::Receiver<()>,
);

/// What the fake host knows: the cgroups, which fake pid lives in which, and where exits go.
#[derive(Debug, Default)]
pub(super) struct World {
    pub(super) dirs: BTreeSet<PathBuf>,
    pub(super) pids: BTreeMap<PathBuf, u32>,
    exits: Option<ExitSink>,
    gate: Option<Gate>,
    /// Every cgroup kill, by cgroup.
    kills: Vec<PathBuf>,
}

impl World {
    /// The process in `dir` ends (as the kernel would report it).
    pub(super) fn end(&mut self, dir: &Path, how: Exit) {
        if let Some(pid) = self.pids.remove(dir) {
            if let Some(exits) = &self.exits {
                let _ = exits.send((pid, how));
            }
        }
    }
}

type Shared = Arc<Mutex<World>>;

/// Cgroups as a set of paths. A kill ends the fake process in it with SIGKILL; `destroy` of
/// the gated cgroup blocks until the test releases it.
#[derive(Debug)]
struct TestCgroups {
    root: PathBuf,
    world: Shared,
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
    fn kill_all(&self, dir: &Path) -> Result<(), CgroupError> {
        let mut w = self.world.lock().unwrap();
        w.kills.push(dir.to_path_buf());
        w.end(dir, Exit::Signal(9));
        Ok(())
    }
    fn memory(&self, _: &Path) -> Result<MemoryStats, CgroupError> {
        Ok(MemoryStats::default())
    }
    fn exists(&self, dir: &Path) -> bool {
        self.world.lock().unwrap().dirs.contains(dir)
    }
    fn create(&self, dir: &Path) -> Result<(), CgroupError> {
        assert!(
            self.world.lock().unwrap().dirs.insert(dir.to_path_buf()),
            "{dir:?} exists: two runs in one cgroup"
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
        let w = self.world.lock().unwrap();
        Ok(w.dirs
            .iter()
            .filter(|d| d.parent() == Some(dir))
            .cloned()
            .collect())
    }
    fn destroy(&self, dir: &Path, _: Duration) -> Result<(), CgroupError> {
        let gate = {
            let mut w = self.world.lock().unwrap();
            match &w.gate {
                Some((d, _, _)) if d == dir => w.gate.take(),
                _ => None,
            }
        };
        if let Some((_, entered, release)) = gate {
            let _ = entered.send(());
            let _ = release.recv();
        }
        let mut w = self.world.lock().unwrap();
        w.end(dir, Exit::Signal(9));
        w.dirs.remove(dir);
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
pub(super) type FakeRun = (String, u32, StdStream);

/// Hands the worker's end of each run's socketpair to the test; a fake process ends when the
/// test says so or its cgroup is killed.
#[derive(Debug)]
struct FakeSpawner {
    next_pid: u32,
    runs: mpsc::UnboundedSender<FakeRun>,
    world: Shared,
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
        {
            let mut w = self.world.lock().unwrap();
            assert!(
                !w.pids.values().any(|p| *p == pid),
                "pid {pid} reused while alive"
            );
            w.pids.insert(req.cgroup.clone(), pid);
        }
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
        self.world.lock().unwrap().exits = Some(exits);
        Ok(())
    }
}

/// A fake worker past its handshake.
pub(super) struct FakeWorker {
    pub(super) pid: u32,
    link: UnixStream,
}

impl FakeWorker {
    pub(super) async fn greet(name: &str, pid: u32, link: StdStream) -> FakeWorker {
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
    pub(super) async fn send(&mut self, msg: &WorkerMsg) {
        write_frame(&mut self.link, msg).await.unwrap();
    }
    pub(super) async fn receive(&mut self) -> SupervisorMsg {
        let frame = read_frame(&mut self.link, MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        decode(&frame).unwrap()
    }
    async fn loading(&mut self, fraction: f32) {
        self.send(&WorkerMsg::Loading(Loading { fraction })).await;
    }
    pub(super) async fn ready(&mut self) {
        self.send(&WorkerMsg::Ready(Ready {
            load_ms: 1,
            rss: 0,
            model_bytes: 0,
            ctx: 512,
            session: SessionInfo {
                turns: 0,
                tokens: 0,
                restored_from: RestoredFrom::New,
                note: None,
            },
            state_bytes: 0,
        }))
        .await;
    }
    async fn heartbeat(&mut self) {
        self.send(&WorkerMsg::Heartbeat(Heartbeat {
            rss: 0,
            state: WorkerState::Ready,
        }))
        .await;
    }
}

/// One control command over the socket, and its first response.
pub(super) async fn control(socket: &Path, cmd: &Command) -> Response {
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
    write_frame(&mut s, cmd).await.unwrap();
    decode(&read_frame(&mut s, MAX_FRAME).await.unwrap().unwrap()).unwrap()
}

async fn status(socket: &Path) -> StatusReport {
    match control(socket, &Command::Status(StatusQuery {})).await {
        Response::Status(r) => *r,
        other => panic!("expected a status, got {other:?}"),
    }
}

/// Polls `status` (real time) until `ok` holds; each answer is itself proof that the loop runs.
async fn status_until(
    socket: &Path,
    what: &str,
    ok: impl Fn(&StatusReport) -> bool,
) -> StatusReport {
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

pub(super) fn instance<'a>(s: &'a StatusReport, name: &str) -> &'a InstanceStatus {
    s.instances.iter().find(|i| i.name == name).unwrap()
}

/// A daemon on the fake host, with the test's ends of everything.
pub(super) struct Harness {
    _tmp: tempfile::TempDir,
    pub(super) socket: PathBuf,
    pub(super) parent: PathBuf,
    pub(super) world: Shared,
    pub(super) runs: mpsc::UnboundedReceiver<FakeRun>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    daemon: tokio::task::JoinHandle<Result<(), super::DaemonError>>,
}

impl Harness {
    /// `serve` on `toml` (its mode `m`), every instance admitted with 64 MiB.
    fn start(toml: &str) -> Harness {
        Harness::start_with(toml, 1 << 30)
    }

    /// `start` with a budget of `usable` bytes.
    pub(super) fn start_with(toml: &str, usable: u64) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cgroup");
        let parent = root.join("belljar");
        let config_path = tmp.path().join("budgets.toml");
        std::fs::create_dir(tmp.path().join("state")).unwrap();
        let config = belljar_config::Config::parse(toml, &config_path).unwrap();
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
        let world = Shared::default();
        let (runs_tx, runs) = mpsc::unbounded_channel();
        let cfg = DaemonConfig {
            cgroups: Arc::new(TestCgroups {
                root,
                world: world.clone(),
            }),
            spawner: Box::new(FakeSpawner {
                next_pid: 4_000_000,
                runs: runs_tx,
                world: world.clone(),
            }),
            parent: parent.clone(),
            remove_parent: false,
            state_dir: tmp.path().join("state"),
            worker_bin: PathBuf::from("/nonexistent/worker"),
            headroom: 0,
            usable,
            proc_root: belljar_host::ProcRoot::default(),
            instances,
            config,
            access: Access {
                own_uid: nix::unistd::geteuid(),
                group: None,
            },
            metrics: None,
            gpus: None,
            http: None,
        };
        let socket = tmp.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(super::serve(cfg, listener, async {
            let _ = stop_rx.await;
        }));
        Harness {
            _tmp: tmp,
            socket,
            parent,
            world,
            runs,
            stop: Some(stop_tx),
            daemon,
        }
    }

    /// The next run the loop starts (waiting as long as the lifecycle makes it wait).
    pub(super) async fn next_run(&mut self) -> FakeRun {
        tokio::time::timeout(Duration::from_secs(3600), self.runs.recv())
            .await
            .expect("a run within the hour")
            .unwrap()
    }

    /// The next run, greeted.
    pub(super) async fn next_worker(&mut self) -> (String, FakeWorker) {
        let (name, pid, link) = self.next_run().await;
        let w = FakeWorker::greet(&name, pid, link).await;
        (name, w)
    }

    /// Ends a fake worker's process, then lets the loop handle it, its cgroup's removal on the
    /// blocking pool included, without the paused clock moving.
    pub(super) async fn exit(&self, w: &FakeWorker, name: &str, how: Exit) {
        let dir = self.parent.join(name);
        {
            let mut world = self.world.lock().unwrap();
            assert_eq!(world.pids.get(&dir), Some(&w.pid));
            world.end(&dir, how);
        }
        self.settle(|w| !w.dirs.contains(&dir)).await;
    }

    /// Yields (the clock stays still: the runtime is never idle) until `ok` holds.
    pub(super) async fn settle(&self, ok: impl Fn(&World) -> bool) {
        for _ in 0..1_000_000 {
            if ok(&self.world.lock().unwrap()) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the fake host did not settle");
    }

    pub(super) async fn status(&self) -> StatusReport {
        status(&self.socket).await
    }

    /// Shutdown; `workers` are the fake workers still running, which obey the Shutdown.
    pub(super) async fn stop(mut self, workers: Vec<(String, FakeWorker)>) {
        self.stop.take().unwrap().send(()).unwrap();
        for (name, mut w) in workers {
            while !matches!(w.receive().await, SupervisorMsg::Shutdown(_)) {}
            self.world
                .lock()
                .unwrap()
                .end(&self.parent.join(&name), Exit::Code(0));
        }
        tokio::time::timeout(Duration::from_secs(3600), self.daemon)
            .await
            .expect("the loop ends")
            .unwrap()
            .unwrap();
        assert!(
            self.world.lock().unwrap().dirs.is_empty(),
            "every cgroup removed"
        );
    }
}

fn config(defaults: &str) -> String {
    format!(
        "[defaults]\nmodel = \"m.gguf\"\n{defaults}\n[instances.a]\n\
         [modes.m]\ninstances = [\"a\"]\n[pressure]\nenabled = false\n"
    )
}

fn within(d: Duration, expected: Duration, jitter: f64) -> bool {
    let lo = expected.as_secs_f64() * (1.0 - jitter) - 0.001;
    let hi = expected.as_secs_f64() * (1.0 + jitter) + 0.001;
    (lo..=hi).contains(&d.as_secs_f64())
}

/// Consecutive crashes are restarted after backoff_initial × factor^(n-1), ±10% jitter, on
/// the paused clock.
#[tokio::test(start_paused = true)]
async fn backoff_delays_grow_exponentially() {
    let mut h = Harness::start(&config(
        "backoff_initial = \"1s\"\nbackoff_factor = 2.0\nbackoff_max = \"3s\"\n\
         start_limit_burst = 10\nload_stall_timeout = \"1h\"",
    ));
    let (_, mut w) = h.next_worker().await;
    for (n, expected) in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)] {
        let t0 = Instant::now();
        h.exit(&w, "a", Exit::Signal(11)).await;
        let s = h.status().await;
        assert_eq!(instance(&s, "a").state, "backoff");
        assert_eq!(instance(&s, "a").last_exit.as_deref(), Some("signal:11"));
        (_, w) = h.next_worker().await;
        let delay = t0.elapsed();
        assert!(
            within(delay, Duration::from_secs_f64(expected), 0.1),
            "restart {n} after {delay:?}, expected {expected}s ±10% (capped at backoff_max)"
        );
        assert_eq!(instance(&h.status().await, "a").restarts, n);
    }
    h.stop(vec![("a".into(), w)]).await;
}

/// The breaker counts starts within its window: with a window shorter than the backoffs the
/// 4th start is allowed; with a long one it fails the instance.
#[tokio::test(start_paused = true)]
async fn the_breaker_fails_a_crash_loop_within_its_window_only() {
    for (window, fails) in [("60s", true), ("2500ms", false)] {
        let mut h = Harness::start(&config(&format!(
            "backoff_initial = \"1s\"\nbackoff_factor = 2.0\nstart_limit_burst = 3\n\
             start_limit_interval = \"{window}\"\nload_stall_timeout = \"1h\""
        )));
        // Starts at 0, ~1 s and ~3 s: 3 within the window either way.
        // Each run gets ready before it crashes: starts that never get ready have a breaker of
        // their own (row 43), whatever the window.
        let (_, mut w) = h.next_worker().await;
        for _ in 0..2 {
            w.ready().await;
            h.status().await;
            h.exit(&w, "a", Exit::Code(1)).await;
            (_, w) = h.next_worker().await;
        }
        w.ready().await;
        h.status().await;
        h.exit(&w, "a", Exit::Code(1)).await;
        let s = h.status().await;
        let a = instance(&s, "a");
        if fails {
            assert_eq!(a.state, "failed", "{window}");
            assert!(a.reason.contains("crash loop"), "{}", a.reason);
            assert_eq!(s.budget.allocated, 0, "failed releases its allocation");
            // Nothing starts again, however long we wait.
            tokio::time::sleep(Duration::from_secs(600)).await;
            assert!(h.runs.try_recv().is_err());
            h.stop(vec![]).await;
        } else {
            assert_eq!(a.state, "backoff", "{window}: {}", a.reason);
            let (_, w) = h.next_worker().await;
            assert_eq!(instance(&h.status().await, "a").restarts, 3);
            h.stop(vec![("a".into(), w)]).await;
        }
    }
}

/// The watchdog kills a load that stalls for load_stall_timeout and a ready worker that misses
/// 3 heartbeats, through its cgroup, and the exit reads `watchdog`.
#[tokio::test(start_paused = true)]
async fn the_watchdog_kills_a_stalled_load_and_a_silent_worker() {
    let mut h = Harness::start(&config(
        "backoff_initial = \"0s\"\nheartbeat_interval = \"2s\"\nload_stall_timeout = \"10s\"",
    ));
    let (_, mut w) = h.next_worker().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    w.loading(0.5).await;
    let progressed = Instant::now();
    // Killed 10 s after the last progress, not after the start.
    let (_, pid, link) = h.next_run().await;
    assert!(within(progressed.elapsed(), Duration::from_secs(10), 0.0));
    let s = h.status().await;
    assert_eq!(instance(&s, "a").last_exit.as_deref(), Some("watchdog"));
    assert_eq!(h.world.lock().unwrap().kills.len(), 1);

    let mut w = FakeWorker::greet("a", pid, link).await;
    w.ready().await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.heartbeat().await;
    }
    let beat = Instant::now();
    let (_, pid, link) = h.next_run().await;
    assert!(within(beat.elapsed(), Duration::from_secs(6), 0.0));
    assert_eq!(
        instance(&h.status().await, "a").last_exit.as_deref(),
        Some("watchdog")
    );
    let w = FakeWorker::greet("a", pid, link).await;
    h.stop(vec![("a".into(), w)]).await;
}

/// A worker that ignores Shutdown is killed through its cgroup after stop_timeout; the
/// `remove` is answered once it is gone.
#[tokio::test(start_paused = true)]
async fn a_stop_timeout_kills_a_worker_that_does_not_stop() {
    let mut h = Harness::start(&config(
        "stop_timeout = \"5s\"\nheartbeat_interval = \"1h\"",
    ));
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    let socket = h.socket.clone();
    let t0 = Instant::now();
    let remove = tokio::spawn(async move {
        control(
            &socket,
            &Command::Remove(RemoveRequest {
                name: "a".into(),
                keep_session: false,
            }),
        )
        .await
    });
    assert!(matches!(w.receive().await, SupervisorMsg::Shutdown(_)));
    let answer = remove.await.unwrap();
    assert!(
        within(t0.elapsed(), Duration::from_secs(5), 0.0),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        matches!(&answer, Response::Ok(ok) if ok.message == "a removed"),
        "{answer:?}"
    );
    assert_eq!(h.world.lock().unwrap().kills.len(), 1);
    assert!(h.status().await.instances.is_empty());
    h.stop(vec![]).await;
}

/// While a worker's cgroup takes its time to go (its destroy blocks on the blocking pool), the
/// loop answers `status` and processes the other worker's messages and heartbeats; the exit
/// is classified, and the restart spawned, once the cgroup is gone. (Real time, two runtime threads: were
/// the destroy run on the loop, the loop's thread would block and the status requests time
/// out, rather than the whole test hang.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cgroup_destroy_does_not_block_the_loop() {
    let mut h = Harness::start(
        "[defaults]\nmodel = \"m.gguf\"\nbackoff_initial = \"0s\"\nheartbeat_interval = \"100ms\"\n\
         [instances.a]\n[instances.b]\n[modes.m]\ninstances = [\"a\", \"b\"]\n\
         [pressure]\nenabled = false\n",
    );
    let mut workers = BTreeMap::new();
    for _ in 0..2 {
        let (name, w) = h.next_worker().await;
        workers.insert(name, w);
    }
    let progress = |s: &StatusReport, name: &str| instance(s, name).load_progress;
    workers.get_mut("b").unwrap().loading(0.25).await;
    status_until(&h.socket, "b loading", |s| progress(s, "b") == 0.25).await;

    // a's worker crashes; its cgroup's removal blocks until released.
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, gate) = std::sync::mpsc::channel();
    h.world.lock().unwrap().gate = Some((h.parent.join("a"), entered_tx, gate));
    let a = workers.remove("a").unwrap();
    h.world
        .lock()
        .unwrap()
        .end(&h.parent.join("a"), Exit::Code(1));
    entered.recv().await.unwrap();

    // Meanwhile the loop answers and b's messages are processed.
    workers.get_mut("b").unwrap().loading(0.75).await;
    let s = status_until(&h.socket, "b's progress while a's cgroup goes", |s| {
        progress(s, "b") == 0.75
    })
    .await;
    assert_eq!(
        instance(&s, "a").last_exit,
        None,
        "a's exit is classified once its cgroup is gone"
    );
    assert!(h.world.lock().unwrap().dirs.contains(&h.parent.join("a")));
    assert!(
        h.runs.try_recv().is_err(),
        "no second run in the same cgroup"
    );
    // b becomes ready and beats for 6 heartbeat intervals (twice the watchdog's 3): its
    // heartbeats are processed, so the watchdog leaves it alone.
    let b = workers.get_mut("b").unwrap();
    b.ready().await;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.heartbeat().await;
    }
    let s = status(&h.socket).await;
    assert_eq!(
        instance(&s, "b").state,
        "ready",
        "{}",
        instance(&s, "b").reason
    );
    assert_eq!(instance(&s, "b").pid, Some(b.pid));
    assert!(
        h.world.lock().unwrap().kills.is_empty(),
        "the watchdog killed nothing"
    );
    assert_eq!(instance(&s, "a").last_exit, None, "a's cgroup still goes");

    release.send(()).unwrap();
    let (name, pid, link) = h.next_run().await;
    let s = status(&h.socket).await;
    assert_eq!(instance(&s, "a").last_exit.as_deref(), Some("exit:1"));
    assert_eq!(name, "a");
    assert_ne!(pid, a.pid);
    let a = FakeWorker::greet("a", pid, link).await;
    let b = workers.remove("b").unwrap();
    h.stop(vec![("a".into(), a), ("b".into(), b)]).await;
}

/// An `ask` over the control socket: every response until the last.
pub(super) async fn ask(socket: &Path, name: &str) -> Vec<Response> {
    use belljar_protocol::control::AskRequest;
    let mut s = UnixStream::connect(socket).await.unwrap();
    write_frame(
        &mut s,
        &ClientHello {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await
    .unwrap();
    let _: ServerHello = decode(&read_frame(&mut s, MAX_FRAME).await.unwrap().unwrap()).unwrap();
    let ask = Command::Ask(AskRequest {
        name: name.into(),
        prompt: "hi".into(),
        max_tokens: 4,
        ignore_eos: false,
        raw: false,
    });
    write_frame(&mut s, &ask).await.unwrap();
    let mut got = Vec::new();
    loop {
        let r: Response = decode(&read_frame(&mut s, MAX_FRAME).await.unwrap().unwrap()).unwrap();
        let done = !matches!(r, Response::Token(_));
        got.push(r);
        if done {
            return got;
        }
    }
}

/// A worker cannot answer another instance's request: a's Token and Done carrying the id of an
/// `ask` sent to b are dropped; b's own answer reaches the client. (Replies used to be matched
/// by id alone.)
#[tokio::test(start_paused = true)]
async fn a_worker_cannot_answer_for_another_instance() {
    use belljar_protocol::worker::{Done, Token};
    let mut h = Harness::start(
        "[defaults]\nmodel = \"m.gguf\"\nheartbeat_interval = \"1h\"\n[instances.a]\n\
         [instances.b]\n[modes.m]\ninstances = [\"a\", \"b\"]\n[pressure]\nenabled = false\n",
    );
    let mut workers = BTreeMap::new();
    for _ in 0..2 {
        let (name, mut w) = h.next_worker().await;
        w.ready().await;
        workers.insert(name, w);
    }
    // Ready is processed: status says so.
    while instance(&h.status().await, "b").state != "ready" {}
    let socket = h.socket.clone();
    let client = tokio::spawn(async move { ask(&socket, "b").await });
    let b = workers.get_mut("b").unwrap();
    let SupervisorMsg::Prompt(p) = b.receive().await else {
        panic!("b gets the prompt");
    };
    let a = workers.get_mut("a").unwrap();
    a.send(&WorkerMsg::Token(Token {
        id: p.id,
        text: "[injected by a]".into(),
    }))
    .await;
    a.send(&WorkerMsg::Done(Done {
        id: p.id,
        tokens: 1,
        ms: 1,
        ..Done::default()
    }))
    .await;
    // a's frames are processed before b's (the loop handles each link in order; a status round
    // trip after them proves they were read).
    h.status().await;
    let b = workers.get_mut("b").unwrap();
    b.send(&WorkerMsg::Token(Token {
        id: p.id,
        text: "from b".into(),
    }))
    .await;
    b.send(&WorkerMsg::Done(Done {
        id: p.id,
        tokens: 1,
        ms: 2,
        ..Done::default()
    }))
    .await;
    let got = client.await.unwrap();
    let text: Vec<String> = got
        .iter()
        .filter_map(|r| match r {
            Response::Token(t) => Some(t.text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(text, ["from b"], "{got:?}");
    assert!(
        matches!(got.last(), Some(Response::Done(d)) if d.ms == 2),
        "b's Done, not a's: {got:?}"
    );
    h.stop(workers.into_iter().collect()).await;
}

/// A worker cannot break `status` for every client: a reason near the frame cap is cut to
/// `MAX_TEXT` before it is kept, and a load fraction of 1e39 (infinite as an f32, which JSON
/// spells null) is refused at decoding, which ends the link (the watchdog then kills the
/// worker). Both used to make every `status` fail.
#[tokio::test(start_paused = true)]
async fn a_worker_cannot_break_status_with_a_huge_reason_or_an_infinite_fraction() {
    use belljar_protocol::worker::Failed;
    let mut h = Harness::start(
        "[defaults]\nmodel = \"m.gguf\"\nrestart = \"never\"\n[instances.a]\n\
         [instances.b]\n[modes.m]\ninstances = [\"a\", \"b\"]\n[pressure]\nenabled = false\n",
    );
    let mut workers = BTreeMap::new();
    for _ in 0..2 {
        let (name, w) = h.next_worker().await;
        workers.insert(name, w);
    }
    let a = workers.get_mut("a").unwrap();
    a.loading(0.25).await;
    write_frame(
        &mut a.link,
        &serde_json::json!({"type": "Loading", "fraction": 1e39}),
    )
    .await
    .unwrap();
    let s = h.status().await;
    assert_eq!(instance(&s, "a").load_progress, 0.25);
    let b = workers.get_mut("b").unwrap();
    b.send(&WorkerMsg::Failed(Failed {
        reason: "x".repeat(1_000_000),
        exit_code: 65,
        gpu_alloc: false,
    }))
    .await;
    h.status().await; // the Failed frame is handled before the exit
    let b = workers.remove("b").unwrap();
    h.exit(&b, "b", Exit::Code(65)).await;
    let s = h.status().await;
    let i = instance(&s, "b");
    assert_eq!(i.state, "failed");
    assert!(i.reason.contains("bytes cut]"), "{}", i.reason);
    assert!(
        i.reason.len() < 2 * belljar_protocol::MAX_TEXT,
        "{}",
        i.reason.len()
    );
    assert_eq!(instance(&s, "a").load_progress, 0.25);
    let a = workers.remove("a").unwrap();
    h.exit(&a, "a", Exit::Signal(9)).await;
    h.stop(vec![]).await;
}

/// An `add` is kept only once its first run is ready: a worker that fails on the model (a
/// permanent exit) makes the add exit 2 and leaves nothing behind (no instance, nothing in
/// instances.json); one that gets ready is persisted. (A failed add used to stay, `failed`,
/// persisted, and the client exited 1.)
#[tokio::test(start_paused = true)]
async fn an_add_that_never_gets_ready_leaves_nothing_and_a_bad_model_is_exit_2() {
    use belljar_protocol::worker::Failed;
    let mut h = Harness::start(&config("heartbeat_interval = \"1h\""));
    let (_, a) = h.next_worker().await;
    let model = h._tmp.path().join("added.gguf");
    belljar_gguf::ModelShape::default()
        .write(std::fs::File::create(&model).unwrap())
        .unwrap();
    let add = |name: &str| {
        Command::Add(AddRequest {
            name: name.into(),
            model: model.clone(),
            ram_limit: Some(64 << 20),
            ctx: None,
            gpu_layers: None,
            gpu_device: None,
            priority: None,
            chat_template: None,
            load: None,
        })
    };
    let persisted = |dir: &Path| std::fs::read_to_string(dir.join("state/instances.json"));
    let socket = h.socket.clone();
    let cmd = add("bad");
    let client = tokio::spawn(async move { control(&socket, &cmd).await });
    let (name, mut w) = h.next_worker().await;
    assert_eq!(name, "bad");
    w.send(&WorkerMsg::Failed(Failed {
        reason: "not a model llama.cpp can load".into(),
        exit_code: 65,
        gpu_alloc: false,
    }))
    .await;
    h.status().await; // the Failed frame is handled before the exit
    h.exit(&w, "bad", Exit::Code(65)).await;
    match client.await.unwrap() {
        Response::Error(e) => {
            assert_eq!(e.exit_code, 2, "{}", e.message);
            assert!(e.message.contains("nothing was added"), "{}", e.message);
            assert!(e.message.contains("not a model"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let s = h.status().await;
    assert!(s.instances.iter().all(|i| i.name != "bad"), "{s:?}");
    assert!(!persisted(h._tmp.path()).unwrap_or_default().contains("bad"));
    assert_eq!(s.budget.allocated, 64 << 20, "only a's reservation is held");

    let socket = h.socket.clone();
    let cmd = add("good");
    let client = tokio::spawn(async move { control(&socket, &cmd).await });
    let (name, mut g) = h.next_worker().await;
    assert_eq!(name, "good");
    assert!(
        !persisted(h._tmp.path())
            .unwrap_or_default()
            .contains("good")
    );
    g.ready().await;
    let r = client.await.unwrap();
    assert!(matches!(r, Response::Ok(_)), "{r:?}");
    assert!(persisted(h._tmp.path()).unwrap().contains("\"good\""));
    h.stop(vec![("a".into(), a), ("good".into(), g)]).await;
}

/// An `add` of instance "added" with `model`, changed by `f`.
fn added(model: &Path, f: &dyn Fn(&mut AddRequest)) -> Command {
    let mut r = AddRequest {
        name: "added".into(),
        model: model.to_path_buf(),
        ram_limit: None,
        ctx: None,
        gpu_layers: None,
        gpu_device: None,
        priority: None,
        chat_template: None,
        load: None,
    };
    f(&mut r);
    Command::Add(r)
}

/// Each command is refused with a usage error whose message has every needle, and nothing is
/// added.
async fn refused_as_usage(h: &Harness, cases: Vec<(Command, &[&str])>) {
    for (cmd, needles) in cases {
        let answer = tokio::time::timeout(Duration::from_secs(10), control(&h.socket, &cmd))
            .await
            .unwrap_or_else(|_| panic!("{cmd:?} was accepted (no refusal within 10 s)"));
        let Response::Error(e) = answer else {
            panic!("{cmd:?} was accepted: {answer:?}");
        };
        assert_eq!(e.exit_code, 2, "a usage error: {e:?}");
        for n in needles {
            assert!(
                e.message.contains(n),
                "{cmd:?}: {n:?} not in {:?}",
                e.message
            );
        }
    }
    let s = h.status().await;
    assert!(
        s.instances.iter().all(|i| i.name != "added"),
        "nothing added"
    );
    assert!(!h._tmp.path().join("state").join("added.json").exists());
}

/// A generated model in the harness's temp dir, for `add`.
fn model_to_add(h: &Harness) -> PathBuf {
    let model = h._tmp.path().join("added.gguf");
    belljar_gguf::ModelShape::default()
        .write(std::fs::File::create(&model).unwrap())
        .unwrap();
    model
}

/// `add` applies the config's per-instance checks on the server side and wants an absolute
/// model path: `ctx 0`, `ram_limit 0`, a ctx past its bound and a path relative to wherever the
/// daemon runs were accepted and persisted before. Each is refused, naming the key and the fix,
/// and nothing is added.
#[tokio::test]
async fn add_is_checked_like_the_config() {
    // Instance `a` never gets a worker here: a short stop_timeout ends the test quickly.
    let h = Harness::start(&config("stop_timeout = \"50ms\""));
    let model = model_to_add(&h);
    // The same file, relative to this process's working directory.
    let cwd = std::env::current_dir().unwrap();
    let up = cwd.components().count() - 1;
    let relative = PathBuf::from("../".repeat(up)).join(model.strip_prefix("/").unwrap());
    assert!(relative.exists() && relative.is_relative());
    let req = |f: &dyn Fn(&mut AddRequest)| added(&model, f);
    let cases: Vec<(Command, &[&str])> = vec![
        (req(&|r| r.ctx = Some(0)), &["ctx", "at least 1"]),
        (
            req(&|r| r.ctx = Some(u32::MAX)),
            &["ctx", "at most 16777216"],
        ),
        (req(&|r| r.ram_limit = Some(0)), &["ram_limit", "zero"]),
        (
            req(&|r| r.priority = Some(i64::MIN)),
            &["priority", "between -1000000 and 1000000"],
        ),
        (
            req(&|r| r.model = relative.clone()),
            &["relative", "absolute path"],
        ),
    ];
    refused_as_usage(&h, cases).await;
    h.stop(Vec::new()).await;
}

/// `add --chat-template` is checked on the server side as `validate` checks the config's: a
/// built-in's name, or an absolute path of a regular file of at most 1 MiB of UTF-8 that
/// compiles. Each bad value is refused as a usage error naming the problem; nothing is added.
#[tokio::test]
async fn add_checks_its_chat_template_like_the_config() {
    let h = Harness::start(&config("stop_timeout = \"50ms\""));
    let model = model_to_add(&h);
    let template = |name: &str, bytes: &[u8]| {
        let p = h._tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let syntax = template("syntax.jinja", b"line one\n{% for x in %}{% endfor %}\n");
    let latin1 = template("latin1.jinja", b"caf\xe9 {{ messages }}\n");
    let huge = template("huge.jinja", &vec![b'x'; (1 << 20) + 1]);
    let dir = h._tmp.path().to_str().unwrap().to_owned();
    let tpl = |v: &str| {
        let v = v.to_owned();
        added(&model, &move |r| r.chat_template = Some(v.clone()))
    };
    let cases: Vec<(Command, &[&str])> = vec![
        (tpl("bogus"), &["chat_template", "not a built-in", "chatml"]),
        (tpl(""), &["chat_template", "empty"]),
        (
            tpl("templates/chat.jinja"),
            &["chat template path", "relative", "absolute path"],
        ),
        (tpl(&syntax), &["does not compile", "line 2"]),
        (tpl(&latin1), &["not UTF-8"]),
        (tpl(&huge), &["larger than"]),
        (tpl(&dir), &["is a directory"]),
        (tpl("/nonexistent/chat.jinja"), &["does not exist"]),
    ];
    refused_as_usage(&h, cases).await;
    h.stop(Vec::new()).await;
}

/// A `remove` while an `add` still loads wins: the worker's Ready, which arrives after the
/// Shutdown was sent, neither confirms nor persists the instance (it used to be written back
/// to instances.json and come back at the next start).
#[tokio::test(start_paused = true)]
async fn a_remove_during_an_add_is_never_undone_by_a_late_ready() {
    let mut h = Harness::start(&config("heartbeat_interval = \"1h\""));
    let (_, a) = h.next_worker().await;
    let model = h._tmp.path().join("added.gguf");
    belljar_gguf::ModelShape::default()
        .write(std::fs::File::create(&model).unwrap())
        .unwrap();
    let socket = h.socket.clone();
    let add = Command::Add(AddRequest {
        name: "x".into(),
        model,
        ram_limit: Some(64 << 20),
        ctx: None,
        gpu_layers: None,
        gpu_device: None,
        priority: None,
        chat_template: None,
        load: None,
    });
    let adding = tokio::spawn(async move { control(&socket, &add).await });
    let (name, mut x) = h.next_worker().await;
    assert_eq!(name, "x");
    x.loading(0.5).await;
    let socket = h.socket.clone();
    let removing = tokio::spawn(async move {
        control(
            &socket,
            &Command::Remove(RemoveRequest {
                name: "x".into(),
                keep_session: true,
            }),
        )
        .await
    });
    assert!(matches!(x.receive().await, SupervisorMsg::Shutdown(_)));
    x.ready().await;
    h.status().await; // the Ready is handled
    h.exit(&x, "x", Exit::Code(0)).await;
    match adding.await.unwrap() {
        Response::Error(e) => assert!(e.message.contains("nothing was added"), "{}", e.message),
        other => panic!("the add must not succeed: {other:?}"),
    }
    assert!(matches!(removing.await.unwrap(), Response::Ok(_)));
    let persisted =
        std::fs::read_to_string(h._tmp.path().join("state/instances.json")).unwrap_or_default();
    assert!(!persisted.contains("\"x\""), "{persisted}");
    assert!(h.status().await.instances.iter().all(|i| i.name != "x"));
    h.stop(vec![("a".into(), a)]).await;
}

/// An `ask` in flight when its worker dies, having sent nothing to its client, goes back to the
/// head of the queue and is served by the next run (the same request id); an `ask` sent during
/// the backoff waits in the queue (it used to be refused as "not ready"), and `queued` counts
/// it.
#[tokio::test(start_paused = true)]
async fn requests_wait_through_a_restart_and_the_one_in_flight_is_served_again() {
    use belljar_protocol::worker::{Done, Token};
    let mut h = Harness::start(&config(
        "heartbeat_interval = \"1h\"\nbackoff_initial = \"1s\"\nbackoff_factor = 1.0",
    ));
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    while instance(&h.status().await, "a").state != "ready" {}
    assert_eq!(
        instance(&h.status().await, "a").last_used_unix,
        None,
        "not used yet"
    );
    let socket = h.socket.clone();
    let first = tokio::spawn(async move { ask(&socket, "a").await });
    let SupervisorMsg::Prompt(p) = w.receive().await else {
        panic!("the worker gets the prompt");
    };
    h.exit(&w, "a", Exit::Signal(9)).await;
    let s = h.status().await;
    assert_eq!(instance(&s, "a").state, "backoff");
    let socket = h.socket.clone();
    let second = tokio::spawn(async move { ask(&socket, "a").await });
    // Both wait: the retried one at the head, the new one behind it.
    while instance(&h.status().await, "a").queued != 2 {
        tokio::task::yield_now().await;
    }
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    let SupervisorMsg::Prompt(again) = w.receive().await else {
        panic!("the next run gets the prompt again");
    };
    assert_eq!(again.id, p.id, "the same request, first");
    for (id, text) in [(again.id, "one")] {
        w.send(&WorkerMsg::Token(Token {
            id,
            text: text.into(),
        }))
        .await;
        w.send(&WorkerMsg::Done(Done {
            id,
            tokens: 1,
            ms: 1,
            ..Done::default()
        }))
        .await;
    }
    let got = first.await.unwrap();
    assert!(
        matches!(&got[..], [Response::Token(t), Response::Done(_)] if t.text == "one"),
        "{got:?}"
    );
    let SupervisorMsg::Prompt(next) = w.receive().await else {
        panic!("then the second");
    };
    assert_ne!(next.id, p.id);
    w.send(&WorkerMsg::Done(Done {
        id: next.id,
        tokens: 0,
        ms: 1,
        ..Done::default()
    }))
    .await;
    assert!(matches!(
        second.await.unwrap().last(),
        Some(Response::Done(_))
    ));
    // Taking and finishing requests is "use" (shedding's least-recently-used order).
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let used = instance(&h.status().await, "a").last_used_unix.unwrap();
    assert!(
        used <= wall + 1 && used + 3600 >= wall,
        "{used} vs now {wall}"
    );
    h.stop(vec![("a".into(), w)]).await;
}

/// A request that already streamed part of its answer is not served again: its run's death
/// fails it (the client hears why); and a request to a failed instance is refused at once.
#[tokio::test(start_paused = true)]
async fn a_request_that_streamed_tokens_fails_with_its_run_and_a_failed_instance_refuses() {
    use belljar_protocol::worker::Token;
    let mut h = Harness::start(&config("heartbeat_interval = \"1h\"\nrestart = \"never\""));
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    while instance(&h.status().await, "a").state != "ready" {}
    let socket = h.socket.clone();
    let asked = tokio::spawn(async move { ask(&socket, "a").await });
    let SupervisorMsg::Prompt(p) = w.receive().await else {
        panic!("the worker gets the prompt");
    };
    w.send(&WorkerMsg::Token(Token {
        id: p.id,
        text: "half".into(),
    }))
    .await;
    h.status().await;
    h.exit(&w, "a", Exit::Signal(9)).await;
    let got = asked.await.unwrap();
    assert!(
        matches!(&got[..], [Response::Token(_), Response::Error(e)] if e.message.contains("incomplete")),
        "{got:?}"
    );
    while instance(&h.status().await, "a").state != "stopped"
        && instance(&h.status().await, "a").state != "failed"
    {}
    let got = ask(&h.socket, "a").await;
    assert!(
        matches!(&got[..], [Response::Error(e)] if e.message.contains("supervisor restart")),
        "{got:?}"
    );
    h.stop(vec![]).await;
}

/// A `restart` while a request is in flight: the worker aborts it as it stops (`Error`, kind
/// `aborted`), and the next run serves it; the client never hears of the restart.
#[tokio::test(start_paused = true)]
async fn a_request_aborted_by_a_restart_is_served_by_the_next_run() {
    use belljar_protocol::control::NameRequest;
    use belljar_protocol::worker::{Done, ErrorKind, ErrorReply};
    let mut h = Harness::start(&config("heartbeat_interval = \"1h\""));
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    while instance(&h.status().await, "a").state != "ready" {}
    let socket = h.socket.clone();
    let asked = tokio::spawn(async move { ask(&socket, "a").await });
    let SupervisorMsg::Prompt(p) = w.receive().await else {
        panic!("the worker gets the prompt");
    };
    let socket = h.socket.clone();
    let restart = tokio::spawn(async move {
        control(&socket, &Command::Restart(NameRequest { name: "a".into() })).await
    });
    while !matches!(w.receive().await, SupervisorMsg::Shutdown(_)) {}
    w.send(&WorkerMsg::Error(ErrorReply {
        id: Some(p.id),
        message: "request aborted: the worker is shutting down".into(),
        kind: ErrorKind::Aborted,
    }))
    .await;
    h.exit(&w, "a", Exit::Code(0)).await;
    let (_, mut w) = h.next_worker().await;
    w.ready().await;
    let SupervisorMsg::Prompt(again) = w.receive().await else {
        panic!("the next run gets the prompt again");
    };
    assert_eq!(again.id, p.id);
    w.send(&WorkerMsg::Done(Done {
        id: again.id,
        tokens: 0,
        ms: 1,
        ..Done::default()
    }))
    .await;
    let got = asked.await.unwrap();
    assert!(matches!(&got[..], [Response::Done(_)]), "{got:?}");
    assert!(matches!(restart.await.unwrap(), Response::Ok(_)));
    h.stop(vec![("a".into(), w)]).await;
}
