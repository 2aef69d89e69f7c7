//! One module per subcommand; `dispatch` only routes.

pub mod run;
pub mod status;
pub mod validate;

use crate::cli::{Cli, Command};
use crate::error::{CliError, Exit};

pub fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    match cli.command {
        Command::Validate(args) => validate::run(&cli.global, &args),
        Command::Run(args) => run::run(&cli.global, &args),
        Command::Status(args) => status::run(&cli.global, &args),
    }
}
