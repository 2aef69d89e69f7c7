//! One module per subcommand; `dispatch` only routes.

pub mod add;
pub mod ask;
pub mod completions;
pub mod estimate;
pub mod load;
pub mod remove;
pub mod restart;
pub mod run;
pub mod status;
pub mod validate;

use crate::cli::{Cli, Command};
use crate::error::{CliError, Exit};

pub fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    match cli.command {
        Command::Validate(args) => validate::run(&cli.global, &args),
        Command::Estimate(args) => estimate::run(&cli.global, &args),
        Command::Run(args) => run::run(&cli.global, &args),
        Command::Status(args) => status::run(&cli.global, &args),
        Command::Add(args) => add::run(&cli.global, &args),
        Command::Remove(args) => remove::run(&cli.global, &args),
        Command::Restart(args) => restart::run(&cli.global, &args),
        Command::Load(args) => load::load(&cli.global, &args),
        Command::Unload(args) => load::unload(&cli.global, &args),
        Command::Ask(args) => ask::run(&cli.global, &args),
        Command::Completions(args) => completions::completions(&args),
        Command::Man => completions::man(),
    }
}

/// Prints the message of an `Ok` answer.
fn print_ok(r: belljar_protocol::control::Response) -> Result<Exit, CliError> {
    match r {
        belljar_protocol::control::Response::Ok(ok) => {
            println!("{}", ok.message);
            Ok(Exit::Ok)
        }
        other => Err(CliError::Unreachable(format!(
            "unexpected answer: {other:?}"
        ))),
    }
}
