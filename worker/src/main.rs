//! `worker`: hosts one GGUF model with llama.cpp for the belljar supervisor, and the tools
//! around it (`make-model`, `inspect`).

mod exit;
mod inspect;
mod make_model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "belljar's model host: one GGUF model per process, started by the supervisor",
    after_help = "Examples:\n  worker make-model models/demo.gguf\n  worker inspect models/demo.gguf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    MakeModel(make_model::MakeModelArgs),
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    init_logging();
    let result = match &cli.command {
        Command::MakeModel(args) => make_model::run(args),
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// Everything (llama.cpp's own logs included) goes through `tracing` to stderr, filtered by
/// RUST_LOG (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}
