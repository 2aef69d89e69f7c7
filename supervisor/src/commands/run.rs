//! `supervisor run --mode NAME`: validate, take the directory locks, prepare the cgroup parent
//! (cleaning up after a crashed run), bind the control socket and run the daemon until
//! SIGTERM/SIGINT.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use belljar_budget::validate;
use belljar_host::cgroup::{self, CgroupBackend, Version};
use belljar_host::proc_ctl::{self, LockError, MAX_SOCKET_PATH};
use belljar_host::{ProcRoot, cpu_count, read_host_memory};

use crate::cli::{GlobalArgs, RunArgs};
use crate::daemon::events::{Entry, Event};
use crate::daemon::{self, DaemonConfig, SUPERVISOR_LEAF};
use crate::error::{CliError, Exit};
use crate::paths;

pub use crate::client::CONTROL_SOCKET;
/// The supervisor's nice value: ahead of the workers it supervises.
pub const SUPERVISOR_NICE: i32 = -5;
/// The supervisor's own `oom_score_adj`: far below any worker's (0..=1000).
pub const SUPERVISOR_OOM_SCORE_ADJ: i32 = -900;
/// The default cgroup parent, relative to the cgroup root.
pub const DEFAULT_PARENT: &str = "belljar";

pub fn run(global: &GlobalArgs, args: &RunArgs) -> Result<Exit, CliError> {
    crate::logging::init(args.log_format);

    let config = super::validate::load_config(&global.config)?;
    let specs = config.mode(&args.mode, cpu_count())?;
    let state_dir = paths::resolve(
        global.state_dir.clone(),
        std::env::var("STATE_DIRECTORY").ok(),
        true,
        paths::DEFAULT_STATE_DIR,
    );
    let estimated = super::validate::plan(&config, &specs, &crate::learn::load(&state_dir))?;
    let planned: Vec<_> = estimated.iter().map(|e| e.planned.clone()).collect();
    let proc_root = ProcRoot::default();
    let host = read_host_memory(&proc_root).map_err(|e| CliError::Refused(e.to_string()))?;
    // The GPU guard: NVML or, with one info line, none.
    let gpus = if config.gpu.enabled {
        match belljar_host::gpu::Gpus::init() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::info!("no NVML ({e}): the GPU guard is off");
                None
            }
        }
    } else {
        tracing::info!("[gpu] enabled = false: the GPU guard is off");
        None
    };
    let mut report = validate(&args.mode, &config.budget_policy(), host, &planned);
    report.apply_vram(super::validate::vram_verdicts(
        &config,
        &specs,
        &estimated,
        &super::validate::gpu_totals(gpus.as_ref(), &specs),
    )?);
    if !report.passed {
        print!("{report}");
        return Err(CliError::Refused(format!(
            "mode {} does not fit in memory (report above); nothing was started",
            args.mode
        )));
    }

    let runtime_dir = paths::resolve(
        global.runtime_dir.clone(),
        std::env::var("RUNTIME_DIRECTORY").ok(),
        true,
        paths::DEFAULT_RUNTIME_DIR,
    );
    let socket = runtime_dir.join(CONTROL_SOCKET);
    if socket.as_os_str().len() >= MAX_SOCKET_PATH {
        return Err(CliError::Usage(format!(
            "the control socket path {} is {} bytes, longer than a Unix socket allows ({}); use a shorter --runtime-dir",
            socket.display(),
            socket.as_os_str().len(),
            MAX_SOCKET_PATH - 1
        )));
    }
    // [control] group: members may use the socket (dir 0750, socket 0660, both in the group).
    let group = match &config.control.group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .map_err(|e| CliError::Usage(format!("cannot look up [control] group {g:?}: {e}")))?
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "[control] group {g:?} does not exist; create it or unset it"
                    ))
                })?
                .gid,
        ),
        None => None,
    };
    let worker_bin = match &args.worker {
        // Workers start in their session dir: a relative path is made absolute here.
        Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.clone()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("worker")))
            .unwrap_or_else(|| PathBuf::from("worker")),
    };
    if !worker_bin.is_file() {
        return Err(CliError::Usage(format!(
            "the worker binary {} does not exist; build it (cargo build --release --workspace --bins) or pass --worker PATH",
            worker_bin.display()
        )));
    }
    // Workers run as `worker_user` (default belljar-worker): it must exist before anything
    // starts.
    let mut users: Vec<&str> = specs
        .iter()
        .filter_map(|s| s.worker_user.as_deref())
        .collect();
    users.sort_unstable();
    users.dedup();
    for user in users {
        let found = nix::unistd::User::from_name(user)
            .map_err(|e| CliError::Usage(format!("cannot look up worker_user {user:?}: {e}")))?;
        let Some(found) = found else {
            return Err(CliError::Usage(missing_worker_user(user)));
        };
        // The worker opens its model as that user: a model it cannot read is refused now,
        // rather than as a crash loop of exit 65.
        for spec in specs
            .iter()
            .filter(|s| s.worker_user.as_deref() == Some(user))
        {
            let readable = belljar_host::model_file::readable_by(
                &spec.model,
                found.uid.as_raw(),
                found.gid.as_raw(),
            )
            .map_err(CliError::Usage)?;
            let runnable = belljar_host::model_file::executable_by(
                &worker_bin,
                found.uid.as_raw(),
                found.gid.as_raw(),
            )
            .map_err(CliError::Usage)?;
            if !runnable {
                return Err(CliError::Usage(format!(
                    "worker_user {user:?} cannot execute the worker binary {} (workers run unprivileged): make it and every directory on its path accessible to that user, or install the binaries under /usr/local/bin; nothing was started",
                    worker_bin.display()
                )));
            }
            if !readable {
                return Err(CliError::Usage(format!(
                    "instance {}: worker_user {user:?} cannot read the model {} (workers run unprivileged): make the file readable by it and every directory on its path searchable (for example chmod o+r on the file and o+x on the directories), or move the model under /var/lib/belljar; nothing was started",
                    spec.name,
                    spec.model.display()
                )));
            }
            // The worker reads its chat template file as that user too, before the model.
            if let Some(template) = spec
                .chat_template
                .as_deref()
                .filter(|t| crate::chat_template::is_file(t))
            {
                let readable = belljar_host::model_file::readable_by(
                    Path::new(template),
                    found.uid.as_raw(),
                    found.gid.as_raw(),
                )
                .map_err(CliError::Usage)?;
                if !readable {
                    return Err(CliError::Usage(format!(
                        "instance {}: worker_user {user:?} cannot read the chat template {template} (workers run unprivileged): make the file readable by it and every directory on its path searchable (for example chmod o+r on the file and o+x on the directories), or move it under /etc/belljar; nothing was started",
                        spec.name
                    )));
                }
            }
        }
    }
    // Refused when a link, another user's or group/world-writable (belljar_host::safe_fs).
    private_dir(
        &runtime_dir,
        if group.is_some() { 0o750 } else { 0o700 },
        group,
    )?;
    // 0700 even with `worker_user`: a worker starts in its own session dir (its cwd).
    private_dir(&state_dir, 0o700, None)?;
    let lock = |dir: &Path| {
        proc_ctl::lock_dir(dir).map_err(|e| match e {
            LockError::Held(..) => CliError::Refused(e.to_string()),
            LockError::Io { .. } => CliError::Usage(e.to_string()),
        })
    };
    let _runtime_lock = lock(&runtime_dir)?;
    let _state_lock = lock(&state_dir)?;
    // Connections, pipes and cgroup files each take a descriptor: a soft limit of 1024 is
    // soon reached, so take the hard limit (connections are also capped per listener).
    match proc_ctl::raise_nofile_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!("raised the open-files limit from {before} to {after}");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
    proc_ctl::set_child_subreaper()
        .map_err(|e| CliError::Refused(format!("cannot become a subreaper: {e}")))?;
    // The kernel's OOM killer must never pick the supervisor first.
    if let Err(e) = proc_ctl::set_own_oom_score_adj(SUPERVISOR_OOM_SCORE_ADJ) {
        tracing::warn!(
            "cannot set oom_score_adj {SUPERVISOR_OOM_SCORE_ADJ}: {e} (needs CAP_SYS_RESOURCE)"
        );
    }
    // Stay responsive while workers load and compute: the event loop is what restarts, kills
    // and sheds, so it runs ahead of them (needs privilege; otherwise the nice value stays).
    if let Err(e) = proc_ctl::set_own_nice(SUPERVISOR_NICE) {
        tracing::debug!("cannot raise the supervisor's scheduling priority: {e}");
    }

    let cgroups = cgroup::detect(args.cgroup_root.as_deref())
        .map_err(|e| CliError::Refused(e.to_string()))?;
    let (parent, remove_parent) =
        cgroup_parent(&*cgroups, args.cgroup_parent.as_deref(), &proc_root)?;
    cgroups
        .prepare_parent(&parent)
        .map_err(|e| CliError::Refused(e.to_string()))?;
    // One supervisor per cgroup parent, before any leftover is removed: a second one would
    // destroy the first one's workers.
    let _parent_lock = proc_ctl::lock_cgroup_parent(&parent, proc_root.path())
        .map_err(|e| CliError::Refused(e.to_string()))?;
    for leftover in cgroups
        .subdirs(&parent)
        .map_err(|e| CliError::Refused(e.to_string()))?
    {
        if leftover.ends_with(SUPERVISOR_LEAF) {
            continue;
        }
        let procs = cgroups.procs(&leftover).map(|p| p.len()).unwrap_or(0);
        tracing::warn!(cgroup = %leftover.display(), processes = procs, "removing a leftover instance cgroup from a previous run");
        cgroups
            .destroy(&leftover, std::time::Duration::from_secs(5))
            .map_err(|e| CliError::Refused(e.to_string()))?;
    }
    Entry::new(Event::Started).log(format_args!(
        "starting mode {} with {} instance(s) in {} (cgroup {:?})",
        args.mode,
        specs.len(),
        parent.display(),
        cgroups.version()
    ));

    let metrics = match args.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| {
                CliError::Refused(format!(
                    "cannot serve metrics at {addr}: {e}; pick another port (0 picks a free one)"
                ))
            })?;
            let bound = l
                .local_addr()
                .map_err(|e| CliError::Refused(e.to_string()))?;
            tracing::info!(addr = %bound, "serving Prometheus metrics at http://{bound}/metrics");
            Some((l, bound))
        }
        None => None,
    };
    let http = http_listener(args.http, &config)?;
    let instances = specs
        .into_iter()
        .zip(&report.instances)
        .zip(estimated)
        .map(|((spec, row), e)| {
            let protected = crate::estimating::protected(
                row.estimate,
                row.estimate_source,
                e.breakdown.as_ref(),
            );
            let vram = crate::estimating::vram(&spec, &e).unwrap_or(0);
            (
                spec,
                daemon::Admitted {
                    estimate: row.estimate,
                    required: row.required,
                    source: row.estimate_source,
                    protected,
                    identity: e.identity,
                    vram,
                },
            )
        })
        .collect();
    let cfg = DaemonConfig {
        cgroups: cgroups.into(),
        spawner: Box::new(daemon::host::Processes),
        parent,
        remove_parent,
        state_dir,
        worker_bin,
        headroom: config.budget.headroom.bytes(),
        usable: report.usable,
        proc_root,
        instances,
        config,
        access: daemon::Access {
            own_uid: nix::unistd::geteuid(),
            group,
        },
        metrics,
        gpus,
        http,
    };
    let _ = std::fs::remove_file(&socket); // stale: we hold the lock, so nobody serves it
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| CliError::Refused(format!("cannot bind {}: {e}", socket.display())))?;
    // 0600, or 0660 in the control group: its members may connect (SO_PEERCRED decides what
    // they may do).
    let control_group = cfg.access.group;
    if let Some(gid) = control_group {
        nix::unistd::chown(&socket, None, Some(gid)).map_err(|e| {
            CliError::Refused(format!(
                "cannot give {} to the control group: {e}",
                socket.display()
            ))
        })?;
    }
    let socket_mode = if control_group.is_some() {
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(socket_mode)).map_err(
        |e| CliError::Refused(format!("cannot set the mode of {}: {e}", socket.display())),
    )?;
    listener
        .set_nonblocking(true)
        .map_err(|e| CliError::Refused(e.to_string()))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Refused(format!("cannot start the event loop: {e}")))?;
    let result = rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        daemon::serve(cfg, listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    let _ = std::fs::remove_file(&socket);
    result.map_err(CliError::Refused)?;
    Ok(Exit::Ok)
}

/// Resolves once SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot watch SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The directory that holds the instance cgroups, and whether it is ours to remove.
///
/// `--cgroup-parent` is relative to the hierarchy root. Without it, a supervisor that systemd
/// started with `Delegate=yes` on cgroup v2 uses its own cgroup: it moves itself into a
/// `supervisor` leaf (no processes in inner nodes) and creates instance cgroups beside it.
/// Otherwise the parent is `belljar`.
fn cgroup_parent(
    cgroups: &dyn CgroupBackend,
    given: Option<&Path>,
    proc_root: &ProcRoot,
) -> Result<(PathBuf, bool), CliError> {
    if let Some(rel) = given {
        if rel.components().any(|c| !matches!(c, Component::Normal(_)))
            || rel.as_os_str().is_empty()
        {
            return Err(CliError::Usage(format!(
                "--cgroup-parent {} must be a relative path without '..' (it is resolved under the cgroup root {})",
                rel.display(),
                cgroups.root().display()
            )));
        }
        return Ok((cgroups.root().join(rel), true));
    }
    if cgroups.version() == Version::V2 && std::env::var_os("INVOCATION_ID").is_some() {
        if let Some(own) =
            cgroup::own_v2_cgroup(proc_root.path()).filter(|p| !p.as_os_str().is_empty())
        {
            let own = cgroups.root().join(own);
            let leaf = own.join(SUPERVISOR_LEAF);
            cgroups
                .create_all(&leaf)
                .map_err(|e| CliError::Refused(e.to_string()))?;
            cgroups.attach(&leaf, std::process::id()).map_err(|e| {
                CliError::Refused(format!(
                    "{e}; is the unit started with Delegate=yes? (or pass --cgroup-parent)"
                ))
            })?;
            return Ok((own, false));
        }
    }
    Ok((cgroups.root().join(DEFAULT_PARENT), true))
}

/// Creates `dir` (and parents) and gives it `mode` (0700: private to this user) and `group`,
/// or refuses it (exit 2): see `belljar_host::safe_fs::private_dir`.
fn private_dir(dir: &Path, mode: u32, group: Option<nix::unistd::Gid>) -> Result<(), CliError> {
    belljar_host::safe_fs::private_dir(dir, mode, group)
        .map(drop)
        .map_err(|e| CliError::Usage(format!("{e}; nothing was started")))
}

/// The refusal when a worker's user does not exist, with the one command that creates it.
fn missing_worker_user(user: &str) -> String {
    if user == belljar_config::DEFAULT_WORKER_USER {
        format!(
            "worker_user {user:?} (the default) does not exist: create it with `systemd-sysusers packaging/belljar.sysusers` (the file ships with belljar; `useradd --system --no-create-home --shell /usr/sbin/nologin {user}` does the same), or set worker_user = \"root\" to run workers as root; nothing was started"
        )
    } else {
        format!(
            "worker_user {user:?} does not exist: create it (`useradd --system --no-create-home --shell /usr/sbin/nologin {user}`) or choose another worker_user; nothing was started"
        )
    }
}

/// Binds the HTTP API: `--http` wins over `[http] listen`. A taken default port only warns (the
/// supervisor runs without HTTP); a taken explicit address is an error, as for `--metrics`.
fn http_listener(
    flag: Option<crate::cli::HttpListen>,
    config: &belljar_config::Config,
) -> Result<Option<daemon::http::HttpServe>, CliError> {
    use crate::cli::HttpListen;
    let h = &config.http;
    let (addr, explicit) = match flag {
        Some(HttpListen::Off) => return Ok(None),
        Some(HttpListen::At(a)) => (a, true),
        None => match h.listen_addr() {
            None => return Ok(None),
            Some(a) => (a, h.explicit()),
        },
    };
    belljar_config::check_exposure(&addr, h.api_key_file.as_deref()).map_err(CliError::Usage)?;
    let key = match &h.api_key_file {
        Some(path) => Some(read_api_key(path)?),
        None => None,
    };
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if !explicit => {
            tracing::warn!(
                "cannot serve the HTTP API at the default {addr}: {e}; running without it (set [http] listen or --http to another address, or --http off)"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(CliError::Refused(format!(
                "cannot serve the HTTP API at {addr}: {e}; pick another address with --http or [http] listen (port 0 picks a free one), or --http off"
            )));
        }
    };
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Refused(e.to_string()))?;
    tracing::info!(addr = %bound, "serving the OpenAI-compatible API at http://{bound}/v1");
    Ok(Some(daemon::http::HttpServe {
        listener,
        addr: bound,
        key,
        max_body: usize::try_from(h.max_body.bytes()).unwrap_or(usize::MAX),
        max_connections: h.max_connections as usize,
    }))
}

/// The API key: the file's first line, from a regular file the supervisor's user owns that
/// nobody else can read (mode 0600 or 0640: `safe_fs::read_secret_file`).
fn read_api_key(path: &Path) -> Result<Vec<u8>, CliError> {
    let fix = "create it owned by the supervisor's user, mode 0600, with the key on one line";
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(CliError::Usage(format!(
            "[http] api_key_file {} is not a file path; {fix}",
            path.display()
        )));
    };
    let text = belljar_host::safe_fs::read_secret_file(dir, name).map_err(|e| {
        CliError::Usage(format!(
            "cannot read [http] api_key_file {}: {e}; {fix}",
            path.display()
        ))
    })?;
    let key = text.lines().next().unwrap_or("").trim();
    if key.len() < 16 {
        return Err(CliError::Usage(format!(
            "[http] api_key_file {} holds a key of {} characters; use at least 16 (for example `openssl rand -hex 32`)",
            path.display(),
            key.len()
        )));
    }
    Ok(key.as_bytes().to_vec())
}
