//! budgets.toml on any text: `Config::parse` gives an error or a config, never a panic. A config
//! that parses resolves every mode it defines, and each mode goes through layer 1 of the budget
//! (`validate`, what `supervisor validate` runs) on a fixed host and model size, report text
//! included, without panicking (overflow checks are on) and within the heap limit.
#![no_main]

use std::path::Path;

use belljar_budget::{HostMemory, PlannedInstance, validate};
use belljar_config::Config;
use belljar_fuzz::start_case;
use libfuzzer_sys::fuzz_target;

/// The demo model's file size (`worker make-model models/demo.gguf`).
const MODEL_BYTES: u64 = 8_940_832;

fuzz_target!(|data: &[u8]| {
    start_case();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, Path::new("/etc/belljar/budgets.toml")) else {
        return;
    };
    let policy = config.budget_policy();
    let host = HostMemory {
        total: 24 << 30,
        available: 20 << 30,
    };
    for name in config.modes.keys() {
        for cpus in [1, 2, 64] {
            let specs = config.mode(name, cpus).expect("a defined mode resolves");
            for spec in &specs {
                let _ = spec.restart_config();
            }
            if cpus != 2 {
                continue;
            }
            let planned: Vec<PlannedInstance> = specs
                .iter()
                .map(|s| PlannedInstance {
                    name: s.name.to_string(),
                    model: s.model.display().to_string(),
                    file_size: MODEL_BYTES,
                    ram_limit: s.ram_limit,
                    priority: s.priority,
                    gguf: None,
                    learned: None,
                    load: s.load,
                })
                .collect();
            let report = validate(name, &policy, host, &planned);
            let _ = report.to_string();
        }
    }
});
