//! The belljar supervisor as a library: the CLI definition, one module per subcommand, and the
//! error type that maps every failure to the documented exit codes. `main` only parses and wires.

pub mod chat_template;
pub mod cli;
pub mod client;
pub mod commands;
pub mod daemon;
pub mod error;
pub mod estimating;
pub mod learn;
pub mod logging;
pub mod paths;

pub use error::{CliError, Exit};
