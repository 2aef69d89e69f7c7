//! The control server: one request per connection, each connection in its own task with a
//! deadline, so a slow or silent client never holds up the event loop or other clients.

use std::time::Duration;

use belljar_protocol::PROTOCOL_VERSION;
use belljar_protocol::control::{ControlError, Response};
use belljar_protocol::tokio_io::write_frame;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::{Event, read_request};

/// A client must send its whole request within this time.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

pub(super) async fn accept_loop(listener: UnixListener, events: mpsc::UnboundedSender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_one(stream, events.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_one(mut stream: UnixStream, events: mpsc::UnboundedSender<Event>) {
    let response = match tokio::time::timeout(REQUEST_DEADLINE, read_request(&mut stream)).await {
        Err(_) => error(format!("no request within {REQUEST_DEADLINE:?}"), 2),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => error(format!("bad request: {e}"), 2),
        Ok(Ok(Some(req))) if req.protocol_version != PROTOCOL_VERSION => error(
            format!(
                "protocol mismatch: the supervisor speaks version {PROTOCOL_VERSION}, the client {}; use matching binaries",
                req.protocol_version
            ),
            2,
        ),
        Ok(Ok(Some(req))) => {
            let (tx, rx) = oneshot::channel();
            if events.send(Event::Control(req.command, tx)).is_err() {
                return;
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => error("the supervisor is shutting down".into(), 3),
            }
        }
    };
    let _ = tokio::time::timeout(REQUEST_DEADLINE, write_frame(&mut stream, &response)).await;
}

fn error(message: String, exit_code: u8) -> Response {
    Response::Error(ControlError { message, exit_code })
}
