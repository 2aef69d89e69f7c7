//! `supervisor restart`: stop and start an instance again (also clears `failed`); returns once it
//! is ready.

use belljar_protocol::control::{Command, NameRequest};

use crate::cli::{GlobalArgs, NameArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

pub fn run(global: &GlobalArgs, args: &NameArgs) -> Result<Exit, CliError> {
    super::print_ok(request(
        global,
        &Command::Restart(NameRequest {
            name: args.name.clone(),
        }),
        None,
    )?)
}
