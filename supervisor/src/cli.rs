//! The command line: global flags shared by every subcommand, and one struct per subcommand.

use std::path::PathBuf;

use belljar_budget::Size;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "supervisor",
    version,
    about = "belljar: run several local LLMs on one machine without losing one to the OOM killer",
    long_about = "belljar budgets memory for llama.cpp worker processes, one GGUF model each, places \
every worker in its own cgroup and restarts it with backoff when it dies.",
    after_help = "Examples:\n  supervisor validate --mode matrix\n  supervisor run --mode matrix\n  supervisor status --json\n\n\
Exit codes: 0 ok, 1 refused (does not fit), 2 usage or config error, 3 daemon unreachable."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The config file.
    #[arg(long, global = true, value_name = "PATH", default_value = belljar_config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Sockets and the lock [default: $RUNTIME_DIRECTORY for `run`, else /run/belljar].
    #[arg(long, global = true, value_name = "DIR", env = "BELLJAR_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Persisted instances and sessions [default: $STATE_DIRECTORY for `run`, else /var/lib/belljar].
    #[arg(long, global = true, value_name = "DIR", env = "BELLJAR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
    Status(StatusArgs),
    Add(AddArgs),
    Remove(RemoveArgs),
    Restart(NameArgs),
    Load(LoadArgs),
    Unload(UnloadArgs),
    Ask(AskArgs),
    Validate(ValidateArgs),
    Estimate(EstimateArgs),
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout.
    #[command(after_help = "Example:\n  supervisor man > /usr/local/share/man/man1/supervisor.1")]
    Man,
}

/// Print shell completions to stdout.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor completions bash > /etc/bash_completion.d/supervisor\n  supervisor completions zsh > \"${fpath[1]}/_supervisor\""
)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Add an instance to the running supervisor (kept across supervisor restarts); returns when
/// it is ready.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor add helper --model models/demo.gguf --ram-limit 256M\n  \
supervisor add big --model /srv/models/q4.gguf --ctx 8192 --priority 5\n  \
supervisor add chat --model models/demo.gguf --chat-template ./chat.jinja\n  \
supervisor add coder --model /srv/models/coder.gguf --load on-demand\n\n\
The budget (layer 2) and the free memory (layer 3) are checked first: a refusal names the \
shortfall, exits 1 and changes nothing. Adding an existing name exits 1 (an identical retry is \
harmless). With --load on-demand the instance must fit beside the always-loaded instances; it \
is added unloaded, and its first request (or `supervisor load`) loads it."
)]
pub struct AddArgs {
    /// The new instance's name ([a-z0-9][a-z0-9_-]{0,62}).
    pub name: String,
    /// The GGUF model file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Reserve at least this much (never less than the model's estimate).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ram_limit: Option<Size>,
    /// Context length, 1 to 16777216 [default: from [defaults]].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(belljar_budget::limits::MAX_CTX)))]
    pub ctx: Option<u32>,
    /// Layers offloaded to a GPU.
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// The GPU for the offloaded layers (NVML/CUDA index) [default: [defaults] or 0].
    #[arg(long, value_name = "N")]
    pub gpu_device: Option<u32>,
    /// Higher is more important; the lowest is shed first.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i64>,
    /// The chat template: a built-in's name (chatml, llama3, mistral, gemma, phi3, zephyr) or
    /// a Jinja file's path, which has a / (./chat.jinja) [default: from [defaults], else the
    /// model's own, else chatml].
    #[arg(long, value_name = "NAME|PATH")]
    pub chat_template: Option<String>,
    /// `always`: start it now and keep it loaded; `on-demand`: add it unloaded, loaded by its
    /// first request and unloaded when idle or to make room [default: from [defaults], else
    /// always].
    #[arg(long, value_name = "MODE", value_parser = ["always", "on-demand"])]
    pub load: Option<String>,
}

/// Load an instance now (an on-demand one, or one stopped by `unload`), making room by
/// evicting idle on-demand instances as a request would; returns once it is ready.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  supervisor load coder\n\n\
Exits 1 for an unknown instance, or when it cannot be loaded (it waits while busy or recently \
loaded instances hold the memory it needs; it fails when nothing could ever make room).")]
pub struct LoadArgs {
    pub name: String,
}

/// Unload an instance: stop its worker and give its memory back; returns once it is stopped.
/// An on-demand instance comes back with its next request; an `always` one stays unloaded until
/// `supervisor load NAME` or a restart of the supervisor.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  supervisor unload coder\n\nExits 1 for an unknown instance.")]
pub struct UnloadArgs {
    pub name: String,
}

/// An instance by name.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor restart subject\n\nExits 1 for an unknown instance."
)]
pub struct NameArgs {
    pub name: String,
}

/// Stop an instance and forget it; returns once it is gone.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor remove helper\n  supervisor remove helper --keep-session\n\n\
Its conversation is moved aside to <state dir>/instances/NAME.removed-<UTC stamp> (adding the \
name again starts a new one) unless --keep-session is given. Exits 1 for an unknown instance."
)]
pub struct RemoveArgs {
    pub name: String,
    /// Leave the session where it is: adding the same name again (with the same model)
    /// continues the conversation.
    #[arg(long)]
    pub keep_session: bool,
}

/// Ask an instance one prompt; the reply streams to stdout as it is generated. The instance
/// keeps the conversation.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor ask subject \"hello, who are you?\"\n  supervisor ask god \"go on\" --max-tokens 64 --ignore-eos\n  supervisor ask god \"Once upon a time\" --raw"
)]
pub struct AskArgs {
    pub name: String,
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Keep generating past an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Send the prompt to the model as is, not through its chat template (a raw continuation
    /// of the conversation's text).
    #[arg(long)]
    pub raw: bool,
}

/// Run a mode's instances: each worker in its own cgroup, until SIGTERM/SIGINT.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  supervisor run --mode matrix\n  \
supervisor run --mode single --cgroup-parent belljar-dev --runtime-dir /tmp/bj/run --state-dir /tmp/bj/state\n\n\
Validates the budget first (exit 1 with the report when it does not fit). Exits 0 after a clean \
shutdown; 1 when refused (another supervisor on the same directories, no cgroup memory controller); \
2 on a config or usage error.")]
pub struct RunArgs {
    /// The mode to run (a [modes.NAME] table of the config).
    #[arg(long, value_name = "NAME")]
    pub mode: String,
    /// Where the cgroup hierarchy is mounted [default: /sys/fs/cgroup; v1 uses its memory/ mount].
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup (relative to the root) that holds the instance cgroups [default: belljar, or the
    /// supervisor's own cgroup under systemd with Delegate=yes on cgroup v2].
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<PathBuf>,
    /// The worker binary [default: `worker` beside this binary].
    #[arg(long, value_name = "PATH")]
    pub worker: Option<PathBuf>,
    /// Where logs go: journald (structured entries), text or json lines on stderr; auto picks
    /// journald when it is reachable (JOURNAL_STREAM set or its socket present).
    #[arg(
        long,
        value_name = "FORMAT",
        value_enum,
        default_value = "auto",
        env = "BELLJAR_LOG_FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
    /// Serve Prometheus metrics over HTTP at ADDR (off by default; port 0 picks a free port,
    /// shown in the log and as `metrics_addr` in `status --json`).
    #[arg(long, value_name = "ADDR", env = "BELLJAR_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the OpenAI-compatible HTTP API at ADDR, or `off` [default: `[http] listen`, else
    /// 127.0.0.1:8080]. Port 0 picks a free port (shown as `http_addr` in `status --json`). A
    /// non-loopback address needs `[http] api_key_file`.
    #[arg(long, value_name = "ADDR", env = "BELLJAR_HTTP", value_parser = parse_http)]
    pub http: Option<HttpListen>,
}

/// `--http`: an address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    At(std::net::SocketAddr),
}

fn parse_http(s: &str) -> Result<HttpListen, String> {
    if s == "off" {
        return Ok(HttpListen::Off);
    }
    s.parse().map(HttpListen::At).map_err(|_| {
        format!("{s:?} is not an address: give IP:PORT (127.0.0.1:8080, [::1]:8080, 127.0.0.1:0 for a free port) or off")
    })
}

/// Estimate a model's memory from its GGUF header: weights, KV cache at the context length,
/// compute, the worker's baseline, and the file-size rule beside it. Reads the header only.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  supervisor estimate models/demo.gguf\n  \
supervisor estimate /srv/models/q4.gguf --ctx 16384 --no-mmap\n  \
supervisor estimate model.gguf --ctx 8192 --json | jq .total\n\n\
Exits 2 when the file is missing or not a readable GGUF model.")]
pub struct EstimateArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Context length in tokens (1 to 16777216, the config's bound).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=i64::from(belljar_budget::limits::MAX_CTX)))]
    pub ctx: u32,
    /// The model is mapped (the default, as `use_mmap = true`).
    #[arg(long, overrides_with = "no_mmap")]
    pub mmap: bool,
    /// The model is read into memory (`use_mmap = false`).
    #[arg(long)]
    pub no_mmap: bool,
    /// Also estimate the VRAM that many offloaded layers reserve.
    #[arg(long, default_value_t = 0)]
    pub gpu_layers: u32,
    /// Print JSON (every term in bytes, and `total`).
    #[arg(long)]
    pub json: bool,
}

/// Show the running supervisor's instances, memory and budget.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  supervisor status\n  supervisor status --json | jq '.instances[] | {name, state}'\n\n\
Exits 3 when the supervisor cannot be reached."
)]
pub struct StatusArgs {
    /// Print the stable JSON form (docs/operations.md).
    #[arg(long)]
    pub json: bool,
}

/// Check that a mode's instances fit in memory (layer-1 validation) and print the report.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  supervisor validate --mode matrix\n  \
supervisor validate --mode matrix --assume-total 8G          # would it fit on an 8 GiB machine?\n  \
supervisor validate --assume-total 64G --assume-available 40G --json\n\n\
Exits 0 when every checked mode fits, 1 when one does not (the report says by how much and what to \
change), 2 on a config error.")]
pub struct ValidateArgs {
    /// The mode to check [default: every mode in the config].
    #[arg(long, value_name = "NAME")]
    pub mode: Option<String>,
    /// Pretend the machine has this much memory (MemTotal); safety_margin still applies.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub assume_total: Option<Size>,
    /// Pretend this much memory is available (MemAvailable) [default with --assume-total: all of it].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub assume_available: Option<Size>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<Size, String> {
    Size::parse_nonzero(s).map_err(|e| e.to_string())
}
