//! The control server. Each connection runs in its own task with deadlines, so garbage, an
//! oversized frame or a silent client never holds up the event loop or other clients.
//!
//! Access is checked twice: by file modes (a 0700 runtime dir, a 0600 socket; 0750/0660 with
//! `[control] group`) and by the peer's credentials (SO_PEERCRED), so a socket whose modes were
//! opened up still refuses strangers.

use std::time::Duration;

use belljar_protocol::control::{ClientHello, Command, ControlError, Response, ServerHello};
use belljar_protocol::tokio_io::{read_frame, write_frame};
use belljar_protocol::{PROTOCOL_VERSION, decode};
use nix::unistd::{Gid, Uid, User};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::Event;

/// A client must complete the handshake within this time...
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);
/// ...and send its command within this time after it.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Largest control frame accepted from a client (prompts included).
const MAX_CONTROL_FRAME: usize = 256 * 1024;

/// Who may talk to the supervisor: root, the supervisor's own user, and members of the
/// configured group.
#[derive(Debug, Clone)]
pub struct Access {
    pub own_uid: Uid,
    pub group: Option<Gid>,
}

impl Access {
    /// Whether the peer may control the supervisor. The supplementary-group check looks the
    /// user up (NSS: files, but maybe LDAP or sssd), which can block: it runs on the blocking
    /// pool, since connection tasks share the event loop's thread.
    async fn allows(&self, uid: u32, gid: u32) -> bool {
        let uid = Uid::from_raw(uid);
        if uid.is_root() || uid == self.own_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if Gid::from_raw(gid) == group {
            return true;
        }
        tokio::task::spawn_blocking(move || in_supplementary_group(uid, group))
            .await
            .unwrap_or(false)
    }
}

/// Whether `group` is one of the supplementary groups of the user `uid` (blocking lookups).
fn in_supplementary_group(uid: Uid, group: Gid) -> bool {
    User::from_uid(uid).ok().flatten().is_some_and(|u| {
        std::ffi::CString::new(u.name)
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
            .is_some_and(|groups| groups.contains(&group))
    })
}

/// At most this many control connections are served at once; further ones wait in the
/// kernel's listen queue (costing the supervisor no file descriptor) until one ends. A stranger
/// is refused at once by its peer credentials and an idle client is dropped after
/// [`HANDSHAKE_DEADLINE`], so only allowed users streaming answers (`ask`) hold a slot for long.
pub const MAX_CONTROL_CONNECTIONS: usize = 64;

pub(super) async fn accept_loop(
    listener: UnixListener,
    events: mpsc::UnboundedSender<Event>,
    access: Access,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        // A slot first, then the connection: beyond the cap, clients queue in the kernel.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let (events, access) = (events.clone(), access.clone());
                tokio::spawn(async move {
                    serve_one(stream, events, access).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_one(mut stream: UnixStream, events: mpsc::UnboundedSender<Event>, access: Access) {
    let Some((command, peer)) = handshake(&mut stream, &access).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    if events.send(Event::Control(command, tx, peer)).is_err() {
        let _ = send(
            &mut stream,
            &error("the supervisor is shutting down".into(), 3),
        )
        .await;
        return;
    }
    while let Some(mut response) = rx.recv().await {
        let last = !matches!(response, Response::Token(_));
        if let Response::Status(report) = &mut response {
            // Off the loop: a status of many instances leaves the last out rather than fail.
            report.fit(belljar_protocol::MAX_FRAME - STATUS_ENVELOPE);
        }
        if send(&mut stream, &response).await.is_err() || last {
            return;
        }
    }
}

/// Bytes a status report's frame adds around the report (the response's tag).
const STATUS_ENVELOPE: usize = 64;

/// Who sent a command (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    /// The supervisor's own requests (a metrics scrape's status).
    pub const SUPERVISOR: Peer = Peer { uid: 0, gid: 0 };
}

/// Peer check, hello exchange and the command; answers and returns None when any of it fails.
async fn handshake(stream: &mut UnixStream, access: &Access) -> Option<(Command, Peer)> {
    let cred = stream.peer_cred().ok()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
    };
    if !access.allows(cred.uid(), cred.gid()).await {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "control connection refused: not root, the supervisor's user or the control group");
        let _ = send(stream, &error(
            format!("permission denied: uid {} may not control this supervisor (root, its own user, or members of [control] group only)", cred.uid()),
            1,
        ))
        .await;
        return None;
    }
    let hello: ClientHello = match receive(stream, HANDSHAKE_DEADLINE).await {
        Ok(h) => h,
        Err(e) => {
            let _ = send(stream, &error(format!("bad handshake: {e}"), 2)).await;
            return None;
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let _ = send(stream, &error(
            format!(
                "protocol mismatch: the supervisor speaks version {PROTOCOL_VERSION}, the client {}; use matching binaries",
                hello.protocol_version
            ),
            2,
        ))
        .await;
        return None;
    }
    send(
        stream,
        &ServerHello {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await
    .ok()?;
    match receive(stream, REQUEST_DEADLINE).await {
        Ok(c) => Some((c, peer)),
        Err(e) => {
            let _ = send(stream, &error(format!("bad request: {e}"), 2)).await;
            None
        }
    }
}

async fn receive<T: serde::de::DeserializeOwned>(
    stream: &mut UnixStream,
    deadline: Duration,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, read_frame(stream, MAX_CONTROL_FRAME)).await {
        Err(_) => Err(format!("nothing received within {deadline:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Err("connection closed".into()),
        Ok(Ok(Some(p))) => decode(&p).map_err(|e| e.to_string()),
    }
}

async fn send<T: serde::Serialize>(stream: &mut UnixStream, msg: &T) -> Result<(), ()> {
    match tokio::time::timeout(REQUEST_DEADLINE, write_frame(stream, msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn error(message: String, exit_code: u8) -> Response {
    Response::Error(ControlError { message, exit_code })
}
