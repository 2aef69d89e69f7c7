//! What a prompt may hold: everything in it comes from a client, so each field is checked
//! before the context is touched, and a bad one is answered with an `invalid` error naming the
//! problem and the fix.

use belljar_protocol::worker::{CHAT_ROLES, ChatMessage, Prompt, PromptMode};

/// Why `p` cannot be served, if it cannot (its sizes against the context are checked later,
/// once it is tokenized).
pub fn check(p: &Prompt) -> Result<(), String> {
    p.sampling
        .check()
        .map_err(|e| format!("invalid sampling: {e}"))?;
    belljar_protocol::worker::check_stops(&p.stop)?;
    match p.mode {
        PromptMode::Session | PromptMode::Completion => {
            if !p.messages.is_empty() {
                return Err(format!(
                    "messages are only for mode chat; send this {} request's prompt as text",
                    mode_name(p.mode)
                ));
            }
            if p.text.is_empty() {
                return Err("empty prompt; send some text".into());
            }
        }
        PromptMode::Chat => {
            if !p.text.is_empty() {
                return Err("a chat request has no text; send the conversation as messages".into());
            }
            check_messages(&p.messages)?;
        }
    }
    Ok(())
}

/// Why these chat messages cannot be rendered, if they cannot.
fn check_messages(messages: &[ChatMessage]) -> Result<(), String> {
    if messages.is_empty() {
        return Err("a chat request has no messages; send at least one".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            let mut role = m.role.clone();
            belljar_protocol::cut(&mut role, 64);
            return Err(format!(
                "message {i} has role {role:?}; use one of {}",
                CHAT_ROLES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The wire spelling of a mode.
pub fn mode_name(mode: PromptMode) -> &'static str {
    match mode {
        PromptMode::Session => "session",
        PromptMode::Completion => "completion",
        PromptMode::Chat => "chat",
    }
}

#[cfg(test)]
mod tests {
    use belljar_protocol::worker::Sampling;

    use super::*;

    fn prompt(mode: PromptMode) -> Prompt {
        Prompt {
            mode,
            text: "hi".into(),
            max_tokens: 4,
            ..Prompt::default()
        }
    }

    #[test]
    fn checks_every_client_field() {
        assert!(check(&prompt(PromptMode::Session)).is_ok());
        assert!(check(&prompt(PromptMode::Completion)).is_ok());
        let empty = Prompt {
            text: String::new(),
            ..prompt(PromptMode::Completion)
        };
        assert!(check(&empty).unwrap_err().contains("empty prompt"));
        let hot = Prompt {
            sampling: Sampling {
                temperature: 3.0,
                ..Sampling::default()
            },
            ..prompt(PromptMode::Session)
        };
        assert!(check(&hot).unwrap_err().contains("temperature"));
        let zero_penalty = Prompt {
            sampling: Sampling {
                repeat_penalty: 0.0,
                ..Sampling::default()
            },
            ..prompt(PromptMode::Session)
        };
        assert!(check(&zero_penalty).unwrap_err().contains("above 0"));
        let stops = Prompt {
            stop: vec!["x".into(); 5],
            ..prompt(PromptMode::Completion)
        };
        assert!(check(&stops).unwrap_err().contains("at most 4"));
        let chat = Prompt {
            mode: PromptMode::Chat,
            text: String::new(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hello".into(),
            }],
            ..Prompt::default()
        };
        assert!(check(&chat).is_ok());
        let with_text = Prompt {
            text: "x".into(),
            ..chat.clone()
        };
        assert!(check(&with_text).unwrap_err().contains("messages"));
        let no_messages = Prompt {
            messages: vec![],
            ..chat.clone()
        };
        assert!(check(&no_messages).unwrap_err().contains("no messages"));
        let session_with_messages = Prompt {
            mode: PromptMode::Session,
            text: "x".into(),
            ..chat
        };
        assert!(
            check(&session_with_messages)
                .unwrap_err()
                .contains("only for mode chat")
        );
    }
}
