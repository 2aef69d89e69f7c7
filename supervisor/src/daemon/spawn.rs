//! What one run of an instance is: its cgroup limits and the worker's command line, resolved
//! into a `belljar_host::spawn::SpawnRequest` that the spawner (daemon/host.rs) carries out.

use std::ffi::OsString;
use std::path::Path;

use belljar_host::cgroup::Limits;
use belljar_host::spawn::{LINK_FD, SpawnRequest};

use belljar_config::InstanceSpec;

/// Everything a spawn needs besides the instance.
#[derive(Debug)]
pub struct SpawnEnv<'a> {
    pub parent: &'a Path,
    pub worker_bin: &'a Path,
    pub state_dir: &'a Path,
    pub headroom: u64,
}

/// The cgroup of an instance's runs (one run at a time: the next is created once the last is
/// removed).
pub fn cgroup_dir(parent: &Path, name: &str) -> std::path::PathBuf {
    parent.join(name)
}

/// The next run of an instance: `worker serve` on its model with the limits and GPU layers the
/// lifecycle chose, in its own cgroup.
pub fn request(
    env: &SpawnEnv<'_>,
    spec: &InstanceSpec,
    limits: Limits,
    gpu_layers: u32,
) -> SpawnRequest {
    let name = spec.name.as_str();
    let state_dir = env.state_dir.join("instances").join(name);
    let mut args: Vec<OsString> = vec!["serve".into(), "--fd".into(), LINK_FD.into()];
    let mut push = |k: &str, v: OsString| {
        args.push(k.into());
        args.push(v);
    };
    push("--instance", name.into());
    // The worker starts in its session dir (belljar_host::spawn), which is all it may reach
    // when it runs as `worker_user` (the state dir is root's, 0700): a relative model path is
    // made absolute first.
    push(
        "--model",
        std::path::absolute(&spec.model)
            .unwrap_or_else(|_| spec.model.clone())
            .into(),
    );
    push("--state-dir", ".".into());
    push("--ctx", spec.ctx.to_string().into());
    push("--gpu-layers", gpu_layers.to_string().into());
    push("--gpu-device", spec.gpu_device.to_string().into());
    push("--threads", spec.threads.to_string().into());
    push(
        "--heartbeat-interval",
        spec.heartbeat_interval.to_string().into(),
    );
    push("--required", limits.max.to_string().into());
    push("--headroom", env.headroom.to_string().into());
    if let Some(template) = &spec.chat_template {
        // A file's path, like the model's, is made absolute for the worker in its session dir;
        // a built-in's name goes as it is.
        let value: OsString = if crate::chat_template::is_file(template) {
            std::path::absolute(template)
                .map_or_else(|_| template.into(), std::path::PathBuf::into_os_string)
        } else {
            template.into()
        };
        args.push("--chat-template".into());
        args.push(value);
    }
    if !spec.use_mmap {
        args.push("--no-mmap".into());
    }
    SpawnRequest {
        name: name.to_owned(),
        program: env.worker_bin.to_path_buf(),
        args,
        // The supervisor's RUST_LOG is for the supervisor; workers (llama.cpp included) log
        // at BELLJAR_WORKER_LOG, warnings by default.
        env: vec![(
            "RUST_LOG".into(),
            std::env::var_os("BELLJAR_WORKER_LOG").unwrap_or_else(|| "warn".into()),
        )],
        cgroup: cgroup_dir(env.parent, name),
        limits,
        user: spec.worker_user.clone(),
        oom_score_adj: belljar_budget::restart::oom_score_adj(spec.priority),
        state_dir,
    }
}
