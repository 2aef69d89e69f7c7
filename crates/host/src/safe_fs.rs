//! Directories and files that root creates where another local user could interfere: the
//! runtime and state directories, the `.lock` file, the persisted JSON files and the workers'
//! session directories.
//!
//! A directory is used only when it is not a symbolic link, is owned by the effective user and
//! is not writable by group or others; its mode is then set through the opened descriptor
//! (`fchmod`, never a chmod that follows a link). Files are created relative to the opened
//! directory with `O_NOFOLLOW|O_EXCL`, under an unpredictable temp name, then renamed into place.

use std::fs::File;
use std::hash::BuildHasher;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, geteuid, unlinkat};

/// Why a directory was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "{0} is a symbolic link; refusing to use it (root would follow it wherever it points): remove the link or pass a real directory"
    )]
    Symlink(PathBuf),
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {euid}); refusing to use it: remove it (it is recreated) or `chown {euid} {path}` if its contents are trusted, or pass another directory"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path} is writable by group or others (mode {mode:04o}); refusing to use it: `chmod go-w {path}` if its contents are trusted, or remove it, or pass another directory"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("{0} is not a directory; remove it or pass another directory")]
    NotDir(PathBuf),
    #[error("cannot create {path}: {source}; pass another directory")]
    Io { path: PathBuf, source: Errno },
}

/// A checked directory, held open: files are made relative to its descriptor.
#[derive(Debug)]
pub struct PrivateDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl PrivateDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `name` inside this directory, made as [`private_dir`] makes a directory.
    pub fn sub_dir(&self, name: &str, mode: u32) -> Result<PrivateDir, DirError> {
        let path = self.path.join(name);
        let fd = make_dir_at(self.fd(), name, &path)?;
        check(&fd, &path)?;
        set_mode(&fd, &path, mode)?;
        Ok(PrivateDir { fd, path })
    }
}

/// Creates `path` if it is missing (its parents as usual), refuses it if it is a symbolic link,
/// is not owned by the effective user or is writable by group or others, then gives it `mode`
/// and, with `group`, that group.
pub fn private_dir(path: &Path, mode: u32, group: Option<Gid>) -> Result<PrivateDir, DirError> {
    let (parent, name) = split(path)?;
    std::fs::create_dir_all(&parent).map_err(|e| DirError::Io {
        path: parent.clone(),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let parent_fd = open_parent(&parent)?;
    let fd = make_dir_at(parent_fd.as_fd(), &name, path)?;
    check(&fd, path)?;
    set_mode(&fd, path, mode)?;
    if let Some(gid) = group {
        fchown(&fd, None, Some(gid)).map_err(|source| DirError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(PrivateDir {
        fd,
        path: path.to_path_buf(),
    })
}

/// Opens the directory that holds the one being made or opened.
fn open_parent(parent: &Path) -> Result<OwnedFd, DirError> {
    nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| DirError::Io {
        path: parent.to_path_buf(),
        source,
    })
}

/// Opens an existing directory that [`private_dir`] made, with the same checks.
pub fn open_private_dir(path: &Path) -> Result<PrivateDir, DirError> {
    let (parent, name) = split(path)?;
    let parent_fd = open_parent(&parent)?;
    let fd = open_dir_at(parent_fd.as_fd(), &name, path)?;
    check(&fd, path)?;
    Ok(PrivateDir {
        fd,
        path: path.to_path_buf(),
    })
}

/// A worker's session directory `<state>/instances/<name>`: `instances` is made private (0700,
/// this user's), the session directory is given to `owner` (the worker's user; this user
/// without one) with mode 0700. Nothing follows a link.
pub fn session_dir(path: &Path, owner: Option<(Uid, Gid)>) -> Result<(), DirError> {
    let (instances, name) = split(path)?;
    let state = open_private_dir(instances.parent().unwrap_or(Path::new("/")))?;
    let instances = state.sub_dir(&name_of(&instances)?, 0o700)?;
    let fd = make_dir_at(instances.fd(), &name, path)?;
    let (uid, gid) = owner.unwrap_or_else(|| (geteuid(), nix::unistd::getegid()));
    let io = |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    };
    fchown(&fd, Some(uid), Some(gid)).map_err(io)?;
    fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(io)?;
    adopt_files(&fd, path, uid, gid).map_err(io)
}

/// The regular files in a session dir become the worker user's, 0600: sessions written by an
/// older version (as root, 0644) stay usable by an unprivileged worker and private. Links and
/// anything else are left alone; nothing is followed.
fn adopt_files(dir: &OwnedFd, path: &Path, uid: Uid, gid: Gid) -> nix::Result<()> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(file) = openat(
            dir,
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            continue; // a link (ELOOP) or gone
        };
        let st = fstat(&file)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            continue;
        }
        if st.st_uid != uid.as_raw() || st.st_gid != gid.as_raw() {
            fchown(&file, Some(uid), Some(gid))?;
        }
        if st.st_mode & 0o777 != 0o600 {
            fchmod(&file, Mode::from_bits_truncate(0o600))?;
        }
    }
    Ok(())
}

/// Opens (creating it 0600 if missing) the file `name` in `dir` for writing, never through a
/// symbolic link: for lock files.
pub fn open_lock_file(dir: &Path, name: &str) -> std::io::Result<File> {
    let dir = open_dir_nofollow(dir)?;
    let fd = openat(
        &dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok(File::from(fd))
}

/// The contents of `dir/name`, read without following a link; refused unless the file belongs
/// to this user (a file planted by someone else is never trusted).
pub fn read_own_file(dir: &Path, name: &str) -> std::io::Result<String> {
    read_checked(dir, name, false)
}

/// As [`read_own_file`], and refused too when others may read it or its group may change it
/// (a secret: mode 0600 or 0640). The mode is that of the file read, not of a second lookup.
pub fn read_secret_file(dir: &Path, name: &str) -> std::io::Result<String> {
    read_checked(dir, name, true)
}

fn read_checked(dir: &Path, name: &str, secret: bool) -> std::io::Result<String> {
    let dir_fd = open_dir_nofollow(dir)?;
    let fd = openat(
        &dir_fd,
        name,
        // Non-blocking: a FIFO planted under the name must not hang the caller at open.
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is not a regular file; refusing to read it (remove it)",
                dir.join(name).display()
            ),
        ));
    }
    if st.st_uid != geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by this user; refusing to read it (remove it)",
                dir.join(name).display(),
                st.st_uid
            ),
        ));
    }
    if secret && st.st_mode & 0o027 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {:o}: others may read or change it; chmod 600 it",
                dir.join(name).display(),
                st.st_mode & 0o777
            ),
        ));
    }
    std::io::read_to_string(File::from(fd))
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new file, never half
/// of one: a fresh temp file (unpredictable name, `O_EXCL|O_NOFOLLOW`, mode 0600) relative to the
/// opened directory, fsync, rename into place, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir_fd = open_dir_nofollow(dir)?;
    let (tmp, fd) = create_temp(&dir_fd, name)?;
    let written = (|| -> std::io::Result<()> {
        let mut f = File::from(fd);
        f.write_all(bytes)?;
        f.sync_all()?;
        renameat(&dir_fd, tmp.as_str(), &dir_fd, name)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = unlinkat(&dir_fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written?;
    File::from(dir_fd).sync_all()
}

/// A new file `.<name>.<random>.tmp` in `dir`, created exclusively.
fn create_temp(dir: &OwnedFd, name: &str) -> std::io::Result<(String, OwnedFd)> {
    let hasher = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tag = hasher.hash_one((std::process::id(), attempt, nanos));
        let tmp = format!(".{name}.{tag:016x}.tmp");
        match openat(
            dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "cannot find a free temp name",
    ))
}

fn open_dir_nofollow(dir: &Path) -> std::io::Result<OwnedFd> {
    Ok(nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

fn split(path: &Path) -> Result<(PathBuf, String), DirError> {
    let name = name_of(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn name_of(path: &Path) -> Result<String, DirError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| DirError::NotDir(path.to_path_buf()))
}

/// `mkdir` (0700) unless it exists, then an open that refuses a link.
fn make_dir_at(parent: BorrowedFd<'_>, name: &str, path: &Path) -> Result<OwnedFd, DirError> {
    match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(source) => {
            return Err(DirError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    open_dir_at(parent, name, path)
}

fn open_dir_at(parent: BorrowedFd<'_>, name: &str, path: &Path) -> Result<OwnedFd, DirError> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| {
        let kind = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT);
        match kind {
            Ok(k) if k == SFlag::S_IFLNK => DirError::Symlink(path.to_path_buf()),
            Ok(k) if k != SFlag::S_IFDIR => DirError::NotDir(path.to_path_buf()),
            _ => DirError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    })
}

/// Owned by the effective user and not writable by group or others.
fn check(fd: &OwnedFd, path: &Path) -> Result<FileStat, DirError> {
    let st = fstat(fd).map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(DirError::Owner {
            path: path.to_path_buf(),
            owner: st.st_uid,
            euid,
        });
    }
    if st.st_mode & 0o022 != 0 {
        return Err(DirError::Writable {
            path: path.to_path_buf(),
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(st)
}

fn set_mode(fd: &OwnedFd, path: &Path, mode: u32) -> Result<(), DirError> {
    fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A UTC time as `YYYYmmddTHHMMSSZ` (ISO 8601's basic form): the stamp in the names of session
/// files and directories moved aside, sortable and free of `:`.
pub fn stamp(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect()
}

/// Moves the session directory `<instances>/<name>` aside to `<instances>/<name>.removed-STAMP`
/// (an instance name has no `.`, so the new name never collides with an instance's directory),
/// without following a link and without replacing anything: `instances` must pass the checks of
/// [`open_private_dir`]. Returns the new path, or `None` when there was no session directory.
pub fn move_session_aside(
    instances: &Path,
    name: &str,
    at: std::time::SystemTime,
) -> std::io::Result<Option<PathBuf>> {
    if std::fs::symlink_metadata(instances).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return Ok(None);
    }
    let dir = open_private_dir(instances).map_err(std::io::Error::other)?;
    match fstatat(dir.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is not a directory; remove it",
                instances.join(name).display()
            )));
        }
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let base = format!("{name}.removed-{}", stamp(at));
    for n in 0u32..100 {
        let to = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        match nix::fcntl::renameat2(
            dir.fd(),
            name,
            dir.fd(),
            to.as_str(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                File::from(dir.fd.try_clone()?).sync_all()?;
                return Ok(Some(instances.join(to)));
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "cannot find a free name to move the session to",
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn nobody() -> Option<nix::unistd::User> {
        if !geteuid().is_root() {
            return None;
        }
        nix::unistd::User::from_name("nobody").ok().flatten()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// A FIFO planted as a state file is refused at once: opening it used to block until a
    /// writer came.
    #[test]
    fn a_fifo_in_place_of_a_state_file_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&t.path().join("observations.json"), Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = t.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(read_own_file(&dir, "observations.json"));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read_own_file returned instead of blocking");
        let e = got.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_secret_file_others_may_read_or_change_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("api.key");
        std::fs::write(&key, "k\n").unwrap();
        for (m, ok) in [(0o600, true), (0o640, true), (0o644, false), (0o660, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).unwrap();
            let got = read_secret_file(t.path(), "api.key");
            assert_eq!(got.is_ok(), ok, "mode {m:o}: {got:?}");
            if !ok {
                assert!(got.unwrap_err().to_string().contains("chmod 600"));
            }
            assert!(read_own_file(t.path(), "api.key").is_ok(), "mode {m:o}");
        }
    }

    #[test]
    fn a_new_dir_is_made_with_its_mode_and_an_existing_one_is_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        private_dir(&d, 0o700, None).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        private_dir(&d, 0o700, None).unwrap();
        assert_eq!(mode(&d), 0o700, "an older 0711 state dir is tightened");
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_is_not_chmodded() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.path().join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = private_dir(&link, 0o700, None).unwrap_err();
        assert!(matches!(e, DirError::Symlink(_)), "{e}");
        assert!(e.to_string().contains(&link.display().to_string()), "{e}");
        assert_eq!(mode(&target), 0o755, "the link's target kept its mode");
    }

    #[test]
    fn a_group_or_world_writable_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&d, 0o700, None).unwrap_err();
        assert!(matches!(e, DirError::Writable { .. }), "{e}");
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        assert_eq!(mode(&d), 0o777, "left as it was");
    }

    #[test]
    fn a_dir_owned_by_another_user_is_refused() {
        let Some(nobody) = nobody() else { return };
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        std::fs::create_dir(&d).unwrap();
        nix::unistd::chown(&d, Some(nobody.uid), Some(nobody.gid)).unwrap();
        let e = private_dir(&d, 0o700, None).unwrap_err();
        assert!(matches!(e, DirError::Owner { .. }), "{e}");
    }

    #[test]
    fn a_planted_temp_link_is_never_written_through() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let dir = t.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".instances.json.tmp")).unwrap();
        write_atomic(&dir, "instances.json", b"[]").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            std::fs::read_to_string(dir.join("instances.json")).unwrap(),
            "[]"
        );
        assert_eq!(mode(&dir.join("instances.json")), 0o600);
        // A link in the file's own place is replaced, not written through.
        std::fs::remove_file(dir.join("instances.json")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("instances.json")).unwrap();
        write_atomic(&dir, "instances.json", b"[1]").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(read_own_file(&dir, "instances.json").unwrap() == "[1]");
    }

    #[test]
    fn a_session_dir_is_moved_aside_without_replacing_or_following_anything() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        private_dir(&state, 0o700, None).unwrap();
        let instances = state.join("instances");
        session_dir(&instances.join("a"), None).unwrap();
        std::fs::write(instances.join("a/session.log"), "turns").unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(stamp(at), "20231114T221320Z");
        let moved = move_session_aside(&instances, "a", at).unwrap().unwrap();
        assert_eq!(moved, instances.join("a.removed-20231114T221320Z"));
        assert_eq!(
            std::fs::read_to_string(moved.join("session.log")).unwrap(),
            "turns"
        );
        assert!(!instances.join("a").exists());
        // Nothing to move: no error. The same second again: a second name, nothing replaced.
        assert_eq!(move_session_aside(&instances, "a", at).unwrap(), None);
        session_dir(&instances.join("a"), None).unwrap();
        let again = move_session_aside(&instances, "a", at).unwrap().unwrap();
        assert_eq!(again, instances.join("a.removed-20231114T221320Z-1"));
        assert!(moved.join("session.log").exists(), "the first one is kept");
        // A link in the session's place is refused, not followed.
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, instances.join("b")).unwrap();
        assert!(move_session_aside(&instances, "b", at).is_err());
        assert!(outside.exists() && instances.join("b").is_symlink());
    }

    #[test]
    fn session_dirs_are_given_to_the_worker_and_private() {
        let Some(nobody) = nobody() else { return };
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        private_dir(&state, 0o700, None).unwrap();
        let s = state.join("instances/a");
        session_dir(&s, Some((nobody.uid, nobody.gid))).unwrap();
        assert_eq!(mode(&state.join("instances")), 0o700);
        assert_eq!(mode(&s), 0o700);
        assert_eq!(std::fs::metadata(&s).unwrap().uid(), nobody.uid.as_raw());
        // A session an older version left (root's, 0644) becomes the worker's, 0600; a link in
        // it is not followed.
        std::fs::write(s.join("session.log"), "old turns").unwrap();
        std::fs::set_permissions(
            s.join("session.log"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, "root's").unwrap();
        std::os::unix::fs::symlink(&outside, s.join("session.state")).unwrap();
        session_dir(&s, Some((nobody.uid, nobody.gid))).unwrap();
        let log = std::fs::metadata(s.join("session.log")).unwrap();
        assert_eq!(log.uid(), nobody.uid.as_raw());
        assert_eq!(log.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(&outside).unwrap().uid(),
            0,
            "not followed"
        );
        std::fs::remove_file(s.join("session.state")).unwrap();
        std::fs::remove_file(s.join("session.log")).unwrap();
        // A link planted in its place is refused, its target untouched.
        std::fs::remove_dir(&s).unwrap();
        let target = t.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, &s).unwrap();
        assert!(matches!(
            session_dir(&s, Some((nobody.uid, nobody.gid))),
            Err(DirError::Symlink(_))
        ));
        assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0);
    }
}
