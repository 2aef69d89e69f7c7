//! `supervisor remove`: stop an instance (Shutdown, SIGKILL of its cgroup after stop_timeout),
//! remove its cgroup, give its budget back and move its session aside (unless
//! `--keep-session`); returns once it is gone.

use belljar_protocol::control::{Command, RemoveRequest};

use crate::cli::{GlobalArgs, RemoveArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

pub fn run(global: &GlobalArgs, args: &RemoveArgs) -> Result<Exit, CliError> {
    super::print_ok(request(
        global,
        &Command::Remove(RemoveRequest {
            name: args.name.clone(),
            keep_session: args.keep_session,
        }),
        None,
    )?)
}
