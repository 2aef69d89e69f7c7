//! Instances added at run time, kept in `<state dir>/instances.json` so they come back after the
//! supervisor restarts. Written atomically: temp file, fsync, rename, fsync of the directory; read
//! only when this user owns it.

use std::path::{Path, PathBuf};

use belljar_protocol::control::AddRequest;

pub const ADDED_FILE: &str = "instances.json";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(ADDED_FILE)
}

/// The persisted instances; none when the file does not exist. A file that cannot be parsed is
/// moved aside (never silently overwritten) and reported.
pub fn load(state_dir: &Path) -> Result<Vec<AddRequest>, String> {
    let file = path(state_dir);
    let text = match belljar_host::safe_fs::read_own_file(state_dir, ADDED_FILE) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    serde_json::from_str(&text).map_err(|e| {
        let aside = file.with_extension("json.corrupt");
        let _ = std::fs::rename(&file, &aside);
        format!(
            "{} is not valid ({e}); moved it to {} and started without the instances it listed",
            file.display(),
            aside.display()
        )
    })
}

pub fn save(state_dir: &Path, added: &[AddRequest]) -> std::io::Result<()> {
    write_atomic(
        state_dir,
        ADDED_FILE,
        &serde_json::to_vec_pretty(added).map_err(std::io::Error::other)?,
    )
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new file, never half
/// of one: temp file, fsync, rename, fsync of the directory; never through a link
/// (`belljar_host::safe_fs::write_atomic`).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    belljar_host::safe_fs::write_atomic(dir, name, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let req = AddRequest {
            name: "a".into(),
            model: "/m.gguf".into(),
            ram_limit: Some(5),
            ctx: None,
            gpu_layers: None,
            gpu_device: None,
            priority: Some(-1),
            chat_template: Some("/etc/belljar/chat.jinja".into()),
            load: None,
        };
        save(dir.path(), std::slice::from_ref(&req)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![req]);
        std::fs::write(path(dir.path()), "{not json").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.contains("moved it to"), "{e}");
        assert!(dir.path().join("instances.json.corrupt").exists());
        assert!(load(dir.path()).unwrap().is_empty());
    }

    /// A file written before `chat_template` existed still loads (none: the model's own
    /// template), and one without a template is written as before.
    #[test]
    fn a_file_from_before_chat_templates_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"[{"name": "a", "model": "/m.gguf", "ram_limit": null, "ctx": 512,
            "gpu_layers": null, "gpu_device": null, "priority": null}]"#;
        write_atomic(dir.path(), ADDED_FILE, old.as_bytes()).unwrap();
        let list = load(dir.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].chat_template, None);
        save(dir.path(), &list).unwrap();
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(!text.contains("chat_template"), "{text}");
    }

    /// Issue 16: a `.instances.json.tmp` symlink planted in the state dir made root overwrite the
    /// link's target.
    #[test]
    fn a_planted_temp_symlink_does_not_redirect_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "root's file").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::symlink(&victim, state.join(".instances.json.tmp")).unwrap();
        save(&state, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
        assert!(load(&state).unwrap().is_empty());
    }
}
