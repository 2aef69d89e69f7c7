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
    let chat_template = args
        .chat_template
        .as_deref()
        .map(chat_template)
        .transpose()?;
    let req = AddRequest {
        name: args.name.clone(),
        model,
        ram_limit: args.ram_limit.map(|s| s.bytes()),
        ctx: args.ctx,
        gpu_layers: args.gpu_layers,
        gpu_device: args.gpu_device,
        priority: args.priority,
        chat_template,
        load: args.load.clone(),
    };
    super::print_ok(request(global, &Command::Add(req), None)?)
}

/// `--chat-template`: a built-in's name as it is; a file's path resolved here like `--model`
/// (the supervisor checks the file itself). A value that can never be right is refused before
/// anything is sent.
fn chat_template(value: &str) -> Result<String, CliError> {
    belljar_config::rules::chat_template(value)
        .map_err(|e| CliError::Usage(format!("--chat-template: {e}")))?;
    if !crate::chat_template::is_file(value) {
        return Ok(value.to_owned());
    }
    let path = std::fs::canonicalize(value).map_err(|e| {
        CliError::Usage(format!(
            "chat template {value}: {e}; check the path (a relative one is resolved against the working directory)"
        ))
    })?;
    path.into_os_string().into_string().map_err(|p| {
        CliError::Usage(format!(
            "chat template {}: the path is not UTF-8; give a path that is",
            std::path::Path::new(&p).display()
        ))
    })
}
