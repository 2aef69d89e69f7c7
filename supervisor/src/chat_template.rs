//! Chat templates named by `chat_template` (budgets.toml) or `supervisor add --chat-template`,
//! checked before any worker starts: the rule over the value (`belljar_config::rules`) and, for
//! a file, its text, read through belljar_host (bounded, never blocking on a FIFO) and compiled
//! as the worker will. Shared by `validate`, `run` and `add`, so that all three accept the same
//! templates and the worker never meets one that fails.

use std::collections::BTreeSet;
use std::path::Path;

use belljar_config::{Config, rules};

use crate::error::CliError;

/// Whether `value` names a file (it has a `/`) rather than a built-in, as the worker tells them
/// apart.
pub fn is_file(value: &str) -> bool {
    value.contains('/')
}

/// Checks one value: not empty, a built-in's name or a file that exists, is a regular file of
/// at most [`rules::MAX_CHAT_TEMPLATE`] bytes of UTF-8 and compiles. The error names the path
/// and the fix. Reads the file: blocking, so never on the event loop.
pub fn check(value: &str) -> Result<(), String> {
    rules::chat_template(value)?;
    if !is_file(value) {
        return Ok(());
    }
    let path = Path::new(value);
    let bytes =
        belljar_host::chat_template::read_chat_template(path, rules::MAX_CHAT_TEMPLATE as u64)
            .map_err(|e| e.to_string())?;
    rules::chat_template_source(path, &bytes)
}

/// Checks every chat template the config names, `[defaults]` first, then each instance's own
/// (each file read once): a usage error naming the config file, the table and the file.
pub fn check_config(config: &Config) -> Result<(), CliError> {
    let tables = std::iter::once(("[defaults]".to_owned(), &config.defaults)).chain(
        config
            .instances
            .iter()
            .map(|(name, section)| (format!("[instances.{name}]"), section)),
    );
    let mut checked = BTreeSet::new();
    for (table, section) in tables {
        let Some(value) = &section.chat_template else {
            continue;
        };
        if !checked.insert(value.as_str()) {
            continue;
        }
        check(value).map_err(|e| {
            CliError::Usage(format!(
                "{}: {table} chat_template: {e}",
                config.path.display()
            ))
        })?;
    }
    Ok(())
}
