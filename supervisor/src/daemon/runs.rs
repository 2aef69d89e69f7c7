//! The I/O of one run: its link (reader and writer tasks), its output, its OOM watch, and its
//! cgroup's removal on the blocking pool. A deferred start (the last run's cgroup still going)
//! is made when the removal is over.

use std::sync::Arc;

use belljar_budget::lifecycle::Input;
use belljar_budget::ratelimit::LineLimiter;
use belljar_host::spawn::Spawned;
use belljar_protocol::tokio_io::{read_frame, write_frame};
use belljar_protocol::worker::{SupervisorMsg, WorkerMsg};
use belljar_protocol::{MAX_FRAME, decode};
use tokio::sync::mpsc;

use super::events::{Entry, Event as Lifecycle};
use super::instance::Link;
use super::{CGROUP_TIMEOUT, Daemon, Event, OOM_SETTLE, SUPERVISOR_LEAF, output, refused};

impl Daemon {
    /// A worker was spawned: its link, its output forwarding and its OOM watch.
    pub(super) fn attach_run(&mut self, name: &str, s: Spawned) {
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(e) = self.attach_link(name, generation, s.link, rx) {
            tracing::error!(instance = %name, "cannot watch the worker's link: {e}");
        }
        let logging = &self.cfg.config.logging;
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let limiter = inst
            .output_limiter
            .get_or_insert_with(|| {
                Arc::new(std::sync::Mutex::new(LineLimiter::new(
                    logging.worker_output_burst,
                    logging.worker_output_interval.0,
                )))
            })
            .clone();
        for (stream, pipe) in [
            (output::Stream::Stdout, s.stdout),
            (output::Stream::Stderr, s.stderr),
        ] {
            let Some(pipe) = pipe else { continue };
            if let Err(e) = output::forward(name, stream, pipe, limiter.clone(), self.epoch) {
                tracing::warn!(instance = %name, "cannot forward the worker's {stream:?}: {e}");
            }
        }
        let oom_watch = self.watch_oom(name, generation, &s.cgroup);
        if let Some(inst) = self.instances.get_mut(name) {
            inst.link = Some(Link {
                pid: s.pid,
                generation,
                cgroup: s.cgroup,
                tx,
                oom_watch,
                exited: false,
            });
        }
    }

    /// Removes a cgroup on the blocking pool (it may wait up to `CGROUP_TIMEOUT` for its
    /// processes to go); `Event::CgroupGone` says when it is over.
    pub(super) fn destroy_later(&mut self, dir: std::path::PathBuf) {
        if !self.destroying.insert(dir.clone()) {
            return; // already under way
        }
        let cgroups = Arc::clone(&self.cfg.cgroups);
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let result = cgroups
                .destroy(&dir, CGROUP_TIMEOUT)
                .map_err(|e| e.to_string());
            let _ = events.send(Event::CgroupGone { dir, result });
        });
    }

    /// A cgroup is gone (or could not be removed): a start that waited for it goes ahead (or
    /// fails with the reason), if the lifecycle still wants it.
    pub(super) fn on_cgroup_gone(&mut self, dir: std::path::PathBuf, result: Result<(), String>) {
        self.destroying.remove(&dir);
        let exiting = self.exiting.remove(&dir);
        if let Err(e) = &result {
            match &exiting {
                Some(x) => tracing::error!(instance = %x.name, "cannot remove cgroup: {e}"),
                None => tracing::error!(cgroup = %dir.display(), "cannot remove cgroup: {e}"),
            }
        }
        if let Some(x) = exiting {
            self.on_exit(x);
        }
        let waiting: Vec<String> = self
            .deferred_starts
            .keys()
            .filter(|n| super::spawn::cgroup_dir(&self.cfg.parent, n) == dir)
            .cloned()
            .collect();
        for name in waiting {
            let Some((limits, gpu_layers)) = self.deferred_starts.remove(&name) else {
                continue;
            };
            let pending = self
                .instances
                .get(&name)
                .and_then(|i| i.machine.run.as_ref())
                .is_some_and(|r| r.pid.is_none());
            if !pending {
                continue; // stopped or removed meanwhile
            }
            let input = match &result {
                Ok(()) => self.spawn_run(&name, limits, gpu_layers),
                Err(e) => Some(Input::SpawnFailed(e.clone())),
            };
            if let Some(input) = input {
                self.drive(&name, input);
            }
        }
    }

    /// A task that turns the cgroup's OOM notifications into events, so an OOM kill is known
    /// (and logged) the moment the kernel acts, before the worker is even reaped.
    fn watch_oom(
        &self,
        name: &str,
        generation: u64,
        dir: &std::path::Path,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let watch = match self
            .cfg
            .cgroups
            .oom_watch(dir)
            .map_err(|e| e.to_string())
            .and_then(|w| {
                // SAFETY: the OomWatch owns its descriptor (eventfd or inotify), keeps it open for
                // its whole life and always returns the same one from as_raw_fd.
                unsafe { tokio::io::unix::AsyncFd::register(w) }.map_err(|e| e.to_string())
            }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(instance = %name, "no OOM notifications for this run ({e}); OOM kills are still classified at exit");
                return None;
            }
        };
        let events = self.events.clone();
        let name = name.to_owned();
        Some(tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let Ok(mut ready) = watch.readable().await else {
                    return;
                };
                watch.get_ref().drain();
                ready.clear_ready();
                // The notification can come as the OOM starts, before the kill is counted: give
                // the kernel a few milliseconds (yielding, so the loop keeps running).
                let noticed = std::time::Instant::now();
                while watch.get_ref().kills() <= seen && noticed.elapsed() < OOM_SETTLE {
                    tokio::task::yield_now().await;
                }
                seen = watch.get_ref().kills();
                if events
                    .send(Event::Oom {
                        name: name.clone(),
                        generation,
                    })
                    .is_err()
                {
                    return;
                }
            }
        }))
    }

    /// Reader and writer tasks for one worker link.
    fn attach_link(
        &self,
        name: &str,
        generation: u64,
        link: std::os::unix::net::UnixStream,
        mut outbox: mpsc::UnboundedReceiver<SupervisorMsg>,
    ) -> std::io::Result<()> {
        link.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(link)?;
        let (rd, mut wr) = stream.into_split();
        // Buffered: a token's frame (length, then body) and the frames behind it come in one
        // read, not two or three.
        let mut rd = tokio::io::BufReader::with_capacity(16 * 1024, rd);
        let events = self.events.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let msg = match read_frame(&mut rd, MAX_FRAME).await {
                    Ok(Some(payload)) => match decode::<WorkerMsg>(&payload) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(instance = %name, "bad frame from the worker: {e}");
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(instance = %name, "worker link error: {e}");
                        break;
                    }
                };
                let event = Event::Worker {
                    name: name.clone(),
                    generation,
                    msg,
                };
                if events.send(event).is_err() {
                    return;
                }
            }
            let _ = events.send(Event::LinkClosed { name, generation });
        });
        tokio::spawn(async move {
            while let Some(msg) = outbox.recv().await {
                if write_frame(&mut wr, &msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Every instance cgroup (and the parent, when ours) goes, on the blocking pool.
    pub(super) async fn final_cleanup(&mut self) {
        for (name, (_, reply)) in std::mem::take(&mut self.adding) {
            let _ = reply.send(refused(format!(
                "the supervisor is shutting down; {name} was not added"
            )));
        }
        let cgroups = Arc::clone(&self.cfg.cgroups);
        let parent = self.cfg.parent.clone();
        let remove_parent = self.cfg.remove_parent;
        let cleanup = tokio::task::spawn_blocking(move || {
            let dirs = cgroups.subdirs(&parent).unwrap_or_default();
            for dir in dirs.iter().filter(|d| !d.ends_with(SUPERVISOR_LEAF)) {
                if let Err(e) = cgroups.destroy(dir, CGROUP_TIMEOUT) {
                    tracing::error!("cannot remove {}: {e}", dir.display());
                }
            }
            if remove_parent {
                if let Err(e) = cgroups.destroy(&parent, CGROUP_TIMEOUT) {
                    tracing::error!("cannot remove {}: {e}", parent.display());
                }
            }
        });
        if let Err(e) = cleanup.await {
            tracing::error!("the cgroup clean-up did not finish: {e}");
        }
        // Whatever died in the clean-up is ours to reap.
        self.cfg.spawner.reap_remaining();
        Entry::new(Lifecycle::Stopped).log(format_args!("stopped"));
    }
}
