//! `supervisor completions SHELL` and `supervisor man`: generated from the CLI definition, so
//! they never drift from it.

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::error::{CliError, Exit};

pub fn completions(args: &CompletionsArgs) -> Result<Exit, CliError> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "supervisor", &mut std::io::stdout());
    Ok(Exit::Ok)
}

pub fn man() -> Result<Exit, CliError> {
    let page = clap_mangen::Man::new(Cli::command());
    page.render(&mut std::io::stdout())
        .map_err(|e| CliError::Refused(format!("cannot write the man page: {e}")))?;
    Ok(Exit::Ok)
}
