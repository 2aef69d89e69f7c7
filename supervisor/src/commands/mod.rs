//! One module per subcommand; `dispatch` only routes.

pub mod validate;

use crate::cli::{Cli, Command};
use crate::error::{CliError, Exit};

pub fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    match cli.command {
        Command::Validate(args) => validate::run(&cli.global, &args),
    }
}
