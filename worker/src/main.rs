//! `worker`: hosts one GGUF model with llama.cpp for the belljar supervisor, and the tools
//! around it (`make-model`, `inspect`, `chat-template`).

mod engine;
mod inspect;
mod link;
mod make_model;
mod request;
mod serve;
mod session;
mod stop;
mod template;

use std::process::ExitCode;

use belljar_protocol::exit;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "belljar's model host: one GGUF model per process, started by the supervisor",
    after_help = "Examples:\n  worker make-model models/demo.gguf\n  worker inspect models/demo.gguf\n  worker chat-template --model models/demo.gguf --messages chat.json\n  worker serve --help"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    MakeModel(make_model::MakeModelArgs),
    Inspect(inspect::InspectArgs),
    ChatTemplate(template::ChatTemplateArgs),
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
        Command::Serve(args) => {
            // Conversations are private: session files 0600, dirs 0700, whoever the worker
            // runs as. (Only for serve: a model made by make-model is for workers to read.)
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            backend().and_then(|b| serve::run(args, &b))
        }
        Command::MakeModel(args) => make_model::run(args),
        Command::Inspect(args) => backend().and_then(|b| inspect::run(args, &b)),
        Command::ChatTemplate(args) => template::run(args, backend),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// The process's one llama.cpp backend.
fn backend() -> Result<llama_cpp_2::llama_backend::LlamaBackend, serve::Failure> {
    llama_cpp_2::llama_backend::LlamaBackend::init().map_err(|e| {
        (
            exit::UNSUPPORTED_MODEL,
            format!("cannot initialise llama.cpp: {e}"),
        )
    })
}

/// Everything (llama.cpp's own logs included) goes through `tracing` to stderr, filtered by
/// RUST_LOG (default: warnings). When stderr is not a terminal (under the supervisor, which
/// forwards it to the journal line by line) lines carry no time and no colour: the journal
/// stamps them and the supervisor reads the level from the line's start.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.without_time().with_ansi(false).init();
    }

    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}
