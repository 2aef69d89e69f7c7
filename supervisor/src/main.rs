//! `supervisor`: parses the command line and hands it to the library.

use std::io::Write;
use std::process::ExitCode;

use belljar_supervisor::cli::Cli;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match belljar_supervisor::commands::dispatch(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            // Never a panic on a closed stderr: the exit code still tells.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            e.exit().into()
        }
    }
}
