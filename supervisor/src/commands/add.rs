//! `supervisor add`: a new instance at run time; returns once it is ready.

use belljar_protocol::control::{AddRequest, Command};

use crate::cli::{AddArgs, GlobalArgs};
use crate::client::request;
use crate::error::{CliError, Exit};

pub fn run(global: &GlobalArgs, args: &AddArgs) -> Result<Exit, CliError> {
    // The supervisor may run in another directory: send an absolute, resolved path.
    let model = std::fs::canonicalize(&args.model).map_err(|e| {
        CliError::Usage(format!(
            "model file {}: {e}; check the path",
            args.model.display()
        ))
    })?;
    let req = AddRequest {
        name: args.name.clone(),
        model,
        ram_limit: args.ram_limit.map(|s| s.bytes()),
        ctx: args.ctx,
        gpu_layers: args.gpu_layers,
        gpu_device: args.gpu_device,
        priority: args.priority,
    };
    super::print_ok(request(global, &Command::Add(req), None)?)
}
