//! `supervisor load` and `supervisor unload`: load an instance now (returns once it is ready)
//! or unload it (returns once its worker has stopped and its memory is back).

use belljar_protocol::control::{Command, NameRequest};

use crate::cli::{GlobalArgs, LoadArgs, UnloadArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

pub fn load(global: &GlobalArgs, args: &LoadArgs) -> Result<Exit, CliError> {
    super::print_ok(request(
        global,
        &Command::Load(NameRequest {
            name: args.name.clone(),
        }),
        None,
    )?)
}

pub fn unload(global: &GlobalArgs, args: &UnloadArgs) -> Result<Exit, CliError> {
    super::print_ok(request(
        global,
        &Command::Unload(NameRequest {
            name: args.name.clone(),
        }),
        None,
    )?)
}
