//! `supervisor ask`: one prompt to an instance, the reply streamed to stdout as it is generated.

use std::io::Write;

use belljar_protocol::control::{AskRequest, Command, Response};

use crate::cli::{AskArgs, GlobalArgs};
use crate::client::Client;
use crate::error::{CliError, Exit};

pub fn run(global: &GlobalArgs, args: &AskArgs) -> Result<Exit, CliError> {
    let mut client = Client::connect(global)?;
    let req = AskRequest {
        name: args.name.clone(),
        prompt: args.prompt.clone(),
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        raw: args.raw,
    };
    client.send(&Command::Ask(req), None)?;
    let mut out = std::io::stdout().lock();
    loop {
        match client.answer()? {
            Response::Token(t) => {
                let _ = out.write_all(t.text.as_bytes());
                let _ = out.flush();
            }
            Response::Done(d) => {
                let _ = writeln!(out);
                eprintln!("({} tokens in {} ms)", d.tokens, d.ms);
                return Ok(Exit::Ok);
            }
            other => {
                return Err(CliError::Unreachable(format!(
                    "unexpected answer to ask: {other:?}"
                )));
            }
        }
    }
}
