//! budgets.toml on any text: `Config::parse` gives an error or a config, never a panic; a config
//! that parses resolves every mode it defines and its budget policy without panicking, within
//! the heap limit.
#![no_main]

use std::path::Path;

use belljar_config::Config;
use belljar_fuzz::start_case;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, Path::new("/etc/belljar/budgets.toml")) else {
        return;
    };
    let _ = config.budget_policy();
    for name in config.modes.keys() {
        for cpus in [1, 2, 64] {
            let specs = config.mode(name, cpus).expect("a defined mode resolves");
            for spec in &specs {
                let _ = spec.restart_config();
            }
        }
    }
});
