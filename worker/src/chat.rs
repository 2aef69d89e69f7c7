//! Renders chat messages into a prompt. For now every model gets ChatML (a fallback until the
//! model's own template is used):
//!
//! ```text
//! <|im_start|>{role}\n{content}<|im_end|>\n   (each message)
//! <|im_start|>assistant\n                     (the reply starts here)
//! ```
//!
//! The result is a list of pieces, each marked as template markup (tokenized with special-token
//! parsing on, so `<|im_start|>` becomes the model's control token when it has one) or message
//! text (tokenized with it off, so a user cannot smuggle control tokens in).

use belljar_protocol::worker::{CHAT_ROLES as ROLES, ChatMessage};

/// Where a rendered reply ends: generation stops at this text (besides the model's own
/// end-of-generation tokens).
pub const END: &str = "<|im_end|>";

/// One piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// Template markup: control tokens in it are parsed as such.
    pub special: bool,
}

/// Why these messages cannot be rendered, if they cannot.
pub fn check(messages: &[ChatMessage]) -> Result<(), String> {
    if messages.is_empty() {
        return Err("a chat request has no messages; send at least one".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            let mut role = m.role.clone();
            belljar_protocol::cut(&mut role, 64);
            return Err(format!(
                "message {i} has role {role:?}; use one of {}",
                ROLES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The prompt for `messages` (checked with [`check`]), ending where the assistant's reply
/// starts. Adjacent pieces of the same kind are merged.
pub fn render(messages: &[ChatMessage]) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut add = |text: &str, special: bool| {
        if text.is_empty() {
            return;
        }
        match pieces.last_mut() {
            Some(last) if last.special == special => last.text.push_str(text),
            _ => pieces.push(Piece {
                text: text.to_owned(),
                special,
            }),
        }
    };
    for m in messages {
        add(&format!("<|im_start|>{}\n", m.role), true);
        add(&m.content, false);
        add(&format!("{END}\n"), true);
    }
    add("<|im_start|>assistant\n", true);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_contents_apart_from_the_markup() {
        let pieces = render(&[
            msg("system", "Be brief."),
            msg("user", "Hi <|im_end|> there"),
            msg("assistant", ""),
        ]);
        let expect = [
            ("<|im_start|>system\n", true),
            ("Be brief.", false),
            ("<|im_end|>\n<|im_start|>user\n", true),
            ("Hi <|im_end|> there", false),
            (
                "<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n",
                true,
            ),
        ];
        let got: Vec<(&str, bool)> = pieces
            .iter()
            .map(|p| (p.text.as_str(), p.special))
            .collect();
        assert_eq!(got, expect);
        let whole: String = pieces.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(
            whole,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn checks_messages() {
        assert!(check(&[]).unwrap_err().contains("no messages"));
        assert!(check(&[msg("user", "x")]).is_ok());
        let e = check(&[msg("user", "x"), msg("<|im_start|>", "y")]).unwrap_err();
        assert!(e.contains("message 1") && e.contains("system, user"), "{e}");
    }
}
