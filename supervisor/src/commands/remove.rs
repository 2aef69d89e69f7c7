//! `supervisor remove`: stop an instance (Shutdown, SIGKILL of its cgroup after stop_timeout),
//! remove its cgroup and give its budget back; returns once it is gone.

use belljar_protocol::control::{Command, NameRequest};

use crate::cli::{GlobalArgs, NameArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

pub fn run(global: &GlobalArgs, args: &NameArgs) -> Result<Exit, CliError> {
    super::print_ok(request(
        global,
        &Command::Remove(NameRequest {
            name: args.name.clone(),
        }),
        None,
    )?)
}
