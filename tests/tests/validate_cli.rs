//! `supervisor validate` as a user runs it: verdicts, the report, the what-if flags, and one
//! test per kind of bad input (exit 2, a message naming the problem and the fix, no panic).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use belljar_testkit::{Run, TestDir, run, tiny_shape};

/// A valid config around a generated model; `extra` is appended verbatim.
fn setup(extra: &str) -> TestDir {
    let t = TestDir::new();
    t.model("models/m.gguf", &tiny_shape());
    t.write(
        "budgets.toml",
        &format!(
            r#"
[defaults]
model = "models/m.gguf"

[instances.subject]
ram_limit = "256MiB"

[instances.observer]
ram_limit = "256MiB"
priority = 1

[instances.god]
ram_limit = "512MiB"
priority = 2

[modes.matrix]
instances = ["subject", "observer", "god"]
{extra}"#
        ),
    );
    t
}

fn validate(t: &TestDir, args: &[&str]) -> Run {
    let config = t.join("budgets.toml");
    let mut all = vec!["validate", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run("supervisor", &all)
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", r.stdout))
}

#[test]
fn fits_on_a_machine_of_16g() {
    let t = setup("");
    validate(&t, &["--mode", "matrix", "--assume-total", "16G"])
        .expect_code(0)
        .expect_says(&[
            "PASSED",
            "subject",
            "observer",
            "god",
            "models/m.gguf",
            "1.0 GiB",
        ]);
}

#[test]
fn too_big_fails_with_by_how_much_and_what_to_change() {
    let t = setup("");
    // 1 GiB machine: usable 870.4 MiB, cap 435.2 MiB, need 1 GiB.
    validate(&t, &["--mode", "matrix", "--assume-total", "1G"])
        .expect_code(1)
        .expect_says(&[
            "FAILED",
            "over the usable 870.4 MiB by 153.6 MiB",
            "instance god requires 512.0 MiB, over the per-instance cap of 435.2 MiB",
            "lower instances.god.ram_limit from 512.0 MiB to at most 435.2 MiB",
            "lower instances.subject.ram_limit",
            "-153.6 MiB",
        ]);
}

#[test]
fn short_of_available_memory_fails_and_says_how_much_to_free() {
    let t = setup("");
    validate(
        &t,
        &[
            "--mode",
            "matrix",
            "--assume-total",
            "64G",
            "--assume-available",
            "768M",
        ],
    )
    .expect_code(1)
    .expect_says(&[
        "only 768.0 MiB is available now: short by 256.0 MiB",
        "free at least 256.0 MiB",
    ]);
}

#[test]
fn budget_total_replaces_the_machine() {
    let t = setup("[budget]\ntotal = \"900MiB\"\n");
    validate(&t, &["--assume-total", "64G"])
        .expect_code(1)
        .expect_says(&["[budget] total", "raise [budget] total to at least 1.0 GiB"]);
}

/// The what-if planner is deterministic: the same verdict for the same machine size, whatever
/// machine runs it, and the verdict follows usable = total x 0.85, cap = usable / 2.
#[test]
fn what_if_verdicts_follow_the_machine_size() {
    let t = setup("");
    // god needs 512 MiB <= cap = total x 0.85 / 2  <=>  total >= 1204.7 MiB.
    for (total, fits) in [
        ("1G", false),
        ("1200M", false),
        ("1210M", true),
        ("2G", true),
        ("64G", true),
        ("1T", true),
    ] {
        let text = validate(&t, &["--mode", "matrix", "--assume-total", total]);
        let again = validate(&t, &["--mode", "matrix", "--assume-total", total, "--json"]);
        let code = if fits { 0 } else { 1 };
        text.expect_code(code);
        again.expect_code(code);
        let v = json(&again);
        assert_eq!(v["passed"], fits, "{total}");
        assert_eq!(
            v["modes"][0]["host"]["total"], v["modes"][0]["host"]["available"],
            "{total}: empty machine"
        );
    }
}

#[test]
fn json_report_has_the_numbers() {
    let t = setup("");
    let r = validate(&t, &["--mode", "matrix", "--assume-total", "8G", "--json"]);
    r.expect_code(0);
    let v = json(&r);
    let m = &v["modes"][0];
    assert_eq!(m["mode"], "matrix");
    assert_eq!(m["total_required"], 1u64 << 30);
    assert_eq!(m["usable"], ((8u64 << 30) as f64 * 0.85).floor() as u64);
    assert_eq!(m["instances"].as_array().unwrap().len(), 3);
    assert_eq!(m["instances"][2]["name"], "god");
    assert_eq!(m["instances"][2]["required"], 512u64 << 20);
    assert_eq!(m["models"].as_array().unwrap().len(), 1);
    assert!(m["margin"].as_i64().unwrap() > 0);
}

#[test]
fn all_modes_are_checked_without_mode() {
    let t = setup("[modes.single]\ninstances = [\"subject\"]\n");
    let r = validate(&t, &["--assume-total", "1G", "--json"]);
    r.expect_code(1);
    let v = json(&r);
    let modes: Vec<&str> = v["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["matrix", "single"]);
    assert_eq!(v["modes"][1]["passed"], true, "single fits on 1 GiB");
}

// --- bad input: one test each ---------------------------------------------------------------

/// Asserts that `config` (a complete file, written beside a valid model) is refused with exit 2
/// and a message containing every needle.
fn refused(config: &str, needles: &[&str]) {
    let t = TestDir::new();
    t.model("models/m.gguf", &tiny_shape());
    t.write("budgets.toml", config);
    validate(&t, &["--assume-total", "16G"])
        .expect_code(2)
        .expect_says(needles);
}

const INSTANCE: &str = "[instances.a]\nmodel = \"models/m.gguf\"\n[modes.m]\ninstances = [\"a\"]\n";

#[test]
fn bad_malformed_toml() {
    refused(
        "[budget]\nheadroom = \n",
        &["budgets.toml:2:12", "string values must be quoted"],
    );
}

#[test]
fn bad_unknown_key_suggests_the_nearest() {
    refused(
        &format!("[budget]\nsafety_marign = 0.1\n{INSTANCE}"),
        &[
            "budgets.toml:2:1",
            "unknown field `safety_marign`",
            "did you mean `safety_margin`?",
        ],
    );
}

#[test]
fn bad_wrong_type() {
    refused(&format!("{INSTANCE}[instances.a.x]\n"), &["budgets.toml:"]);
    refused(
        "[instances.a]\nmodel = \"models/m.gguf\"\nctx = \"big\"\n",
        &[
            "budgets.toml:3:7",
            "invalid type: string \"big\", expected u32",
        ],
    );
}

#[test]
fn bad_zero_size() {
    refused(
        &format!("[budget]\nheadroom = 0\n{INSTANCE}"),
        &["budgets.toml:2:12", "a size of zero is not allowed here"],
    );
}

#[test]
fn bad_negative_size() {
    refused(
        &format!("[budget]\nmin_required = -5\n{INSTANCE}"),
        &["budgets.toml:2:16", "sizes cannot be negative"],
    );
}

#[test]
fn bad_unparsable_size() {
    refused(
        &format!("[budget]\nheadroom = \"lots\"\n{INSTANCE}"),
        &["budgets.toml:2:12", "invalid size \"lots\""],
    );
}

#[test]
fn bad_decimal_unit_8gb() {
    refused(
        &format!("[budget]\nheadroom = \"8GB\"\n{INSTANCE}"),
        &[
            "budgets.toml:2:12",
            "sizes are base 1024: did you mean 8GiB?",
        ],
    );
}

#[test]
fn bad_duration() {
    refused(
        &format!("[defaults]\nbackoff_max = \"soon\"\n{INSTANCE}"),
        &["budgets.toml:2:15", "invalid duration \"soon\"", "\"5min\""],
    );
}

#[test]
fn bad_duplicate_instance() {
    refused(
        &format!("{INSTANCE}[instances.a]\nmodel = \"models/m.gguf\"\n"),
        &["budgets.toml:5:", "duplicate"],
    );
}

#[test]
fn bad_instance_name_path_traversal() {
    refused(
        "[instances.\"../../etc\"]\nmodel = \"models/m.gguf\"\n",
        &[
            "budgets.toml:1:12",
            "invalid instance name \"../../etc\"",
            "a-z, 0-9",
        ],
    );
}

#[test]
fn bad_mode_names_unknown_instance() {
    refused(
        &format!("{INSTANCE}[modes.x]\ninstances = [\"a\", \"ghost\"]\n"),
        &[
            "budgets.toml:6:19",
            "unknown instance \"ghost\"",
            "define [instances.ghost] or use one of: a",
        ],
    );
}

#[test]
fn bad_empty_mode() {
    refused(
        &format!("{INSTANCE}[modes.x]\ninstances = []\n"),
        &["budgets.toml:5:8", "mode x has no instances"],
    );
}

#[test]
fn bad_unknown_mode_flag() {
    let t = setup("");
    validate(&t, &["--mode", "nope"])
        .expect_code(2)
        .expect_says(&["unknown mode \"nope\"", "the config defines: matrix"]);
}

#[test]
fn bad_model_missing() {
    refused(
        "[instances.a]\nmodel = \"models/none.gguf\"\n[modes.m]\ninstances = [\"a\"]\n",
        &[
            "instance a",
            "models/none.gguf does not exist",
            "worker make-model",
        ],
    );
}

#[test]
fn bad_model_is_a_directory() {
    refused(
        "[instances.a]\nmodel = \"models\"\n[modes.m]\ninstances = [\"a\"]\n",
        &["is a directory"],
    );
}

#[test]
fn bad_model_not_gguf() {
    let t = setup("");
    t.write("models/m.gguf", "this is not a model");
    // The refusal names the file but never echoes its bytes ([privilege]: the same probe serves
    // `add` for control-socket clients, who must not learn what any file begins with).
    let o = validate(&t, &["--assume-total", "16G"]);
    o.expect_code(2).expect_says(&["not a GGUF file", "m.gguf"]);
    assert!(!o.stderr.contains("this"), "{}", o.stderr);
}

/// Root reads any file, so the unreadable case runs the supervisor as `nobody` when we are root.
#[test]
fn bad_model_unreadable() {
    use std::os::unix::fs::PermissionsExt;
    let t = setup("");
    let perm = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    perm(t.path(), 0o755);
    perm(&t.join("models"), 0o755);
    perm(&t.join("budgets.toml"), 0o644);
    perm(&t.join("models/m.gguf"), 0o000);
    let supervisor = belljar_testkit::bin("supervisor");
    let config = t.join("budgets.toml");
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&supervisor);
        c
    } else {
        std::process::Command::new(&supervisor)
    };
    cmd.args(["validate", "--assume-total", "16G", "--config"])
        .arg(&config);
    belljar_testkit::run_cmd(&mut cmd)
        .expect_code(2)
        .expect_says(&["cannot be read", "Permission denied", "fix its permissions"]);
}

#[test]
fn bad_safety_margin() {
    refused(
        &format!("[budget]\nsafety_margin = 1.0\n{INSTANCE}"),
        &["budgets.toml:2:17", "outside [0, 1)"],
    );
    refused(
        &format!("[budget]\nsafety_margin = -0.1\n{INSTANCE}"),
        &["outside [0, 1)"],
    );
}

#[test]
fn bad_per_instance_max() {
    refused(
        &format!("[budget]\nper_instance_max = 0\n{INSTANCE}"),
        &["budgets.toml:2:20", "outside (0, 1]"],
    );
    refused(
        &format!("[budget]\nper_instance_max = 1.5\n{INSTANCE}"),
        &["outside (0, 1]"],
    );
}

#[test]
fn bad_config_path() {
    run(
        "supervisor",
        &["validate", "--config", "/nonexistent/budgets.toml"],
    )
    .expect_code(2)
    .expect_says(&[
        "cannot read config /nonexistent/budgets.toml",
        "--config PATH",
    ]);
}

#[test]
fn bad_cli_size() {
    let t = setup("");
    validate(&t, &["--assume-total", "8GB"])
        .expect_code(2)
        .expect_says(&["did you mean 8GiB?"]);
    validate(&t, &["--assume-total", "1G", "--assume-available", "2G"])
        .expect_code(2)
        .expect_says(&["larger than the total memory"]);
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    run("supervisor", &["completions", "bash"])
        .expect_code(0)
        .expect_says(&["_supervisor", "validate", "--cgroup-parent"]);
    run("supervisor", &["completions", "zsh"])
        .expect_code(0)
        .expect_says(&["#compdef supervisor"]);
    run("supervisor", &["man"])
        .expect_code(0)
        .expect_says(&[".TH supervisor", "belljar"]);
    run("supervisor", &["completions", "tcsh"])
        .expect_code(2)
        .expect_says(&["possible values"]);
}

// --- issue #17: inputs that hung, passed or changed state -----------------------------------

/// Runs `supervisor ARGS`, killing it after 20 s: a hang is a failure, not a stuck suite.
fn run_bounded(args: &[&str]) -> Run {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(belljar_testkit::bin("supervisor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            // Not yet reaped, so the pid is still this child's.
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("supervisor {args:?} hung (killed after 20 s)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Run {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// A FIFO as the config once blocked `validate` forever in open(2).
#[test]
fn bad_config_is_a_fifo() {
    let t = TestDir::new();
    let fifo = t.join("budgets.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    run_bounded(&["validate", "--config", fifo.to_str().unwrap()])
        .expect_code(2)
        .expect_says(&["budgets.toml", "not a regular file", "--config"]);
}

/// A model whose tensor data runs past the end of the file is refused as a bad model file
/// (exit 2) before anything is planned around it; before, `validate` fell back to the file
/// rule with a warning and passed.
#[test]
fn bad_model_truncated() {
    let t = setup("");
    let model = t.join("models/m.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() * 2 / 3]).unwrap();
    validate(&t, &["--assume-total", "16G"])
        .expect_code(2)
        .expect_says(&["instance", "m.gguf", "truncated", "download it again"]);
}

/// `validate` is read-only: a corrupt observations.json is reported and left where it is
/// (only `run` moves it aside).
#[test]
fn validate_leaves_a_corrupt_observations_file_alone() {
    let t = setup("");
    let state = t.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("observations.json"), "{not json").unwrap();
    let config = t.join("budgets.toml");
    let o = run_bounded(&[
        "--state-dir",
        state.to_str().unwrap(),
        "validate",
        "--config",
        config.to_str().unwrap(),
        "--assume-total",
        "16G",
    ]);
    o.expect_code(0)
        .expect_says(&["observations.json", "not valid", "supervisor run"]);
    assert_eq!(
        std::fs::read_to_string(state.join("observations.json")).unwrap(),
        "{not json",
        "the file is untouched"
    );
    assert!(!state.join("observations.json.corrupt").exists());
}

/// Two reservations of 8 EiB once added up to "0 B" and passed.
#[test]
fn reservations_adding_up_past_16_eib_fail() {
    let t = setup("");
    t.write(
        "budgets.toml",
        "[budget]\ntotal = \"16777215T\"\nper_instance_max = 1.0\n\
         [defaults]\nmodel = \"models/m.gguf\"\nram_limit = \"8388608T\"\n\
         [instances.a]\n[instances.b]\n[modes.m]\ninstances = [\"a\", \"b\"]\n",
    );
    validate(&t, &["--assume-total", "16777215T"])
        .expect_code(1)
        .expect_says(&["FAILED", "more than 16 EiB"]);
}

// --- on-demand instances ([swap]) ------------------------------------------------------------

/// The matrix's subject always loaded (256 MiB) and three on-demand instances of 350 MiB in a
/// budget of 1 GiB: any two fit beside subject (768 MiB), never all three. `load` is the word for
/// x, y and z.
fn swap_setup(load: &str, extra: &str) -> TestDir {
    setup(&format!(
        r#"
[budget]
total = "1GiB"
{extra}
[instances.x]
ram_limit = "350MiB"
load = "{load}"

[instances.y]
ram_limit = "350MiB"
load = "{load}"

[instances.z]
ram_limit = "350MiB"
load = "{load}"

[modes.swap]
instances = ["subject", "x", "y", "z"]
"#
    ))
}

#[test]
fn on_demand_instances_fit_each_beside_the_always_loaded_and_the_report_lists_the_pairs() {
    let t = swap_setup("on-demand", "");
    validate(&t, &["--mode", "swap", "--assume-total", "64G"])
        .expect_code(0)
        .expect_says(&[
            "PASSED",
            "(the always-loaded instances)",
            "room",
            "768.0 MiB",
            "any 2 of the 3 on-demand instances fit together",
            "x + y",
            "x + z",
            "y + z",
        ]);
    let r = validate(&t, &["--mode", "swap", "--assume-total", "64G", "--json"]);
    r.expect_code(0);
    let m = &json(&r)["modes"][0];
    assert_eq!(m["total_required"], 256u64 << 20, "only subject starts");
    assert_eq!(m["instances"][1]["load"], "on-demand");
    assert_eq!(m["instances"][0]["load"], "always");
    let od = &m["on_demand"];
    assert_eq!(od["room"], 768u64 << 20);
    assert_eq!(od["any"], 2);
    assert_eq!(
        od["together"],
        serde_json::json!([["x", "y"], ["x", "z"], ["y", "z"]])
    );
    assert_eq!(od["never_fit"], serde_json::json!([]));
    // The same instances loaded always do not fit: the sum still counts for them.
    let t = swap_setup("always", "");
    let r = validate(&t, &["--mode", "swap", "--assume-total", "64G", "--json"]);
    r.expect_code(1);
    assert!(json(&r)["modes"][0].get("on_demand").is_none());
    validate(&t, &["--mode", "swap", "--assume-total", "64G"])
        .expect_code(1)
        .expect_says(&[
            "the mode requires 1.3 GiB in total",
            "load some of them on demand",
        ]);
}

#[test]
fn an_on_demand_instance_that_can_never_fit_is_refused_with_the_fix() {
    let t = setup(
        r#"
[budget]
total = "1GiB"
per_instance_max = 1.0

[instances.huge]
ram_limit = "900MiB"
load = "on-demand"

[modes.swap]
instances = ["subject", "huge"]
"#,
    );
    let r = validate(&t, &["--mode", "swap", "--assume-total", "64G"]);
    r.expect_code(1).expect_says(&[
        "FAILED",
        "on-demand instance huge requires 900.0 MiB, but only 768.0 MiB of the usable 1.0 GiB is left beside the always-loaded instances (256.0 MiB): it could never be loaded",
        "lower instances.huge.ram_limit from 900.0 MiB to at most 768.0 MiB",
        "raise [budget] total to at least 1.1 GiB",
        "load fewer instances always (load = \"on-demand\" on some of subject)",
        "never fits: huge",
    ]);
    let r = validate(&t, &["--mode", "swap", "--assume-total", "64G", "--json"]);
    r.expect_code(1);
    let v = json(&r);
    assert_eq!(v["passed"], false);
    assert_eq!(
        v["modes"][0]["on_demand"]["never_fit"],
        serde_json::json!(["huge"])
    );
}
