//! The CLI's side of the control socket: connect, handshake, one command, the answers.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use belljar_protocol::control::{ClientHello, Command, ControlError, Response, ServerHello};
use belljar_protocol::{FrameReader, MAX_FRAME, PROTOCOL_VERSION, decode, write_frame};

use crate::cli::GlobalArgs;
use crate::error::CliError;
use crate::paths;

/// The control socket's name inside the runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// How long the client waits for the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    stream: UnixStream,
    frames: FrameReader<UnixStream>,
}

impl Client {
    /// Connects to the supervisor of `global`'s runtime dir and completes the handshake.
    pub fn connect(global: &GlobalArgs) -> Result<Client, CliError> {
        let dir = paths::resolve(
            global.runtime_dir.clone(),
            None,
            false,
            paths::DEFAULT_RUNTIME_DIR,
        );
        let socket = dir.join(CONTROL_SOCKET);
        let unreachable = |e: std::io::Error| {
            CliError::Unreachable(format!(
                "cannot reach the supervisor at {}: {e}; is `supervisor run` running with the same --runtime-dir?",
                socket.display()
            ))
        };
        let stream = UnixStream::connect(&socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(unreachable)?;
        let frames = FrameReader::new(stream.try_clone().map_err(unreachable)?, MAX_FRAME);
        let mut client = Client {
            socket,
            stream,
            frames,
        };
        // A refused peer is answered and cut off at once: a failed write still has that answer.
        let sent = client.write(&ClientHello {
            protocol_version: PROTOCOL_VERSION,
        });
        let payload = match (sent, client.read_payload()) {
            (_, Ok(p)) => p,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
        };
        if let Ok(Response::Error(e)) = decode::<Response>(&payload) {
            return Err(exit_for(e));
        }
        let hello: ServerHello = decode(&payload).map_err(|e| client.bad_answer(e))?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(CliError::Usage(format!(
                "protocol mismatch: the supervisor speaks version {}, this client {PROTOCOL_VERSION}; use matching binaries",
                hello.protocol_version
            )));
        }
        Ok(client)
    }

    /// Sends the command; `wait` bounds how long each answer may take (None: as long as it takes,
    /// e.g. a model load or a long generation).
    pub fn send(&mut self, command: &Command, wait: Option<Duration>) -> Result<(), CliError> {
        self.stream
            .set_read_timeout(wait)
            .map_err(|e| CliError::Unreachable(e.to_string()))?;
        self.write(command)
    }

    /// The next answer; an `Error` answer becomes the matching CLI error.
    pub fn answer(&mut self) -> Result<Response, CliError> {
        let payload = self.read_payload()?;
        match decode::<Response>(&payload).map_err(|e| self.bad_answer(e))? {
            Response::Error(e) => Err(exit_for(e)),
            r => Ok(r),
        }
    }

    fn write<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), CliError> {
        write_frame(&mut self.stream, msg).map_err(|e| {
            CliError::Unreachable(format!("cannot send to {}: {e}", self.socket.display()))
        })
    }

    fn read_payload(&mut self) -> Result<Vec<u8>, CliError> {
        self.frames
            .read_frame()
            .map_err(|e| {
                CliError::Unreachable(format!("no answer from {}: {e}", self.socket.display()))
            })?
            .ok_or_else(|| {
                CliError::Unreachable(format!(
                    "{} closed the connection without answering",
                    self.socket.display()
                ))
            })
    }

    fn bad_answer(&self, e: belljar_protocol::FrameError) -> CliError {
        CliError::Unreachable(format!(
            "bad answer from the supervisor at {}: {e}",
            self.socket.display()
        ))
    }
}

/// Maps an error answer to the CLI's exit code.
pub fn exit_for(e: ControlError) -> CliError {
    match e.exit_code {
        2 => CliError::Usage(e.message),
        3 => CliError::Unreachable(e.message),
        _ => CliError::Refused(e.message),
    }
}

/// One command with one answer.
pub fn request(
    global: &GlobalArgs,
    command: &Command,
    wait: Option<Duration>,
) -> Result<Response, CliError> {
    let mut client = Client::connect(global)?;
    client.send(command, wait)?;
    client.answer()
}
