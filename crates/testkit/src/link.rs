//! Plays the supervisor's side of a worker link on a real Unix socket: binds a listener, starts
//! the real `worker serve --connect`, and exchanges real frames with it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use belljar_protocol::worker::{SupervisorMsg, Welcome, WorkerMsg};
use belljar_protocol::{FrameReader, MAX_FRAME, PROTOCOL_VERSION, decode, write_frame};

/// A running worker and our end of its link.
#[derive(Debug)]
pub struct WorkerLink {
    pub child: Child,
    pub stream: UnixStream,
    rx: Receiver<Option<WorkerMsg>>,
    pub stderr_path: PathBuf,
}

/// How long any single expected message may take (loading a tiny model takes milliseconds).
pub const STEP: Duration = Duration::from_secs(30);

impl WorkerLink {
    /// Starts `worker serve --connect SOCK --instance NAME ... extra` and accepts its connection.
    pub fn start(
        dir: &Path,
        instance: &str,
        model: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> WorkerLink {
        WorkerLink::start_with_env(dir, instance, model, state_dir, extra, &[])
    }

    /// [`WorkerLink::start`] with environment variables set for the worker (e.g. `RUST_LOG`).
    pub fn start_with_env(
        dir: &Path,
        instance: &str,
        model: &Path,
        state_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerLink {
        let sock = dir.join(format!("{instance}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).expect("bind the test socket");
        let stderr_path = dir.join(format!("{instance}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(crate::bin("worker"))
            .arg("serve")
            .arg("--connect")
            .arg(&sock)
            .args(["--instance", instance, "--model"])
            .arg(model)
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn worker");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let deadline = Instant::now() + STEP;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the worker never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking stream");
        let _ = std::fs::remove_file(&sock);
        let reader = stream.try_clone().expect("clone stream");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut frames = FrameReader::new(reader, MAX_FRAME);
            while let Ok(Some(payload)) = frames.read_frame() {
                let msg: WorkerMsg = decode(&payload).expect("the worker sends valid frames");
                if tx.send(Some(msg)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        WorkerLink {
            child,
            stream,
            rx,
            stderr_path,
        }
    }

    pub fn send(&mut self, msg: &SupervisorMsg) {
        write_frame(&mut self.stream, msg).expect("send to worker");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).expect("send raw bytes");
    }

    /// The next message, or None when the worker closed the link.
    #[track_caller]
    pub fn recv(&self) -> Option<WorkerMsg> {
        match self.rx.recv_timeout(STEP) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => panic!(
                "no message from the worker within {STEP:?}; stderr:\n{}",
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next message that is not a Heartbeat.
    #[track_caller]
    pub fn recv_skip_heartbeats(&self) -> Option<WorkerMsg> {
        loop {
            match self.recv() {
                Some(WorkerMsg::Heartbeat(_)) => {}
                other => return other,
            }
        }
    }

    /// Answers Hello with Welcome; returns the Hello's pid.
    #[track_caller]
    pub fn handshake(&mut self) -> u32 {
        let Some(WorkerMsg::Hello(h)) = self.recv() else {
            panic!("expected Hello; stderr:\n{}", self.stderr())
        };
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        self.send(&SupervisorMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
        }));
        h.pid
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
