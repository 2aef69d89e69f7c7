use super::*;
use std::time::Duration;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/belljar/budgets.toml"))
}

const GOOD: &str = r#"
[budget]
headroom = "1GiB"
total = "8G"

[defaults]
model = "models/demo.gguf"
ctx = 1024

[instances.subject]
ram_limit = "256MiB"
priority = 1

[instances.god]
model = "/abs/other.gguf"
ram_limit = 536870912
threads = 3
restart = "always"

[modes.matrix]
instances = ["subject", "god"]
"#;

#[test]
fn resolves_defaults_and_paths() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.budget.total, Some(Size(8 << 30)));
    assert_eq!(c.budget.safety_margin, 0.15, "builtin default");
    let m = c.mode("matrix", 8).unwrap();
    assert_eq!(m.len(), 2);
    let subject = &m[0];
    assert_eq!(subject.name.as_str(), "subject");
    assert_eq!(
        subject.model,
        PathBuf::from("/etc/belljar/models/demo.gguf"),
        "relative to the config's dir"
    );
    assert_eq!(subject.ctx, 1024, "from [defaults]");
    assert_eq!(subject.threads, 4, "8 cpus / 2 instances");
    assert_eq!(subject.backoff_max.0, Duration::from_secs(60));
    let god = &m[1];
    assert_eq!(god.model, PathBuf::from("/abs/other.gguf"));
    assert_eq!(god.ram_limit, Some(Size(512 << 20)));
    assert_eq!(god.threads, 3);
    assert_eq!(god.restart, RestartMode::Always);
    assert_eq!(
        c.mode("matrix", 1).unwrap()[0].threads,
        1,
        "never below one thread"
    );
}

#[test]
fn pressure_defaults_and_floors() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.pressure.warning, Threshold::PercentUsed(80.0));
    assert_eq!(c.pressure.restore, Threshold::PercentUsed(60.0));
    let floors = "[pressure]\nwarning_available = \"4G\"\ncritical_available = \"2G\"\nemergency_available = \"1G\"\nrestore_available = \"8G\"\n";
    let c = parse(floors).unwrap();
    assert_eq!(
        c.pressure.critical,
        Threshold::Available(Size(2 << 30).bytes())
    );
    let e = parse("[pressure]\nwarning = 80\nwarning_available = \"1G\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("either the percent keys"), "{e}");
    let e = parse("[pressure]\nwarning = 96\n").unwrap_err().to_string();
    assert!(
        e.contains("restore < warning < critical < emergency"),
        "{e}"
    );
}

#[test]
fn gpu_section_defaults_and_level_order() {
    let c = parse("").unwrap();
    assert!(c.gpu.enabled);
    assert_eq!(
        (
            c.gpu.warning,
            c.gpu.critical,
            c.gpu.emergency,
            c.gpu.restore
        ),
        (80.0, 90.0, 95.0, 60.0)
    );
    let e = parse("[gpu]\nemergency = 85\n").unwrap_err().to_string();
    assert!(e.contains("[gpu]: the levels must satisfy"), "{e}");
    let e = parse("[gpu]\nemergncy = 85\n").unwrap_err().to_string();
    assert!(e.contains("emergency"), "did you mean: {e}");
}

#[test]
fn unknown_key_suggests_the_nearest() {
    let e = parse("[budget]\nsafty_margin = 0.1\n").unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("/etc/belljar/budgets.toml:2:1: unknown field `safty_margin`"),
        "{s}"
    );
    assert!(s.contains("did you mean `safety_margin`?"), "{s}");
    let s = parse("[instances.a]\nmodel = \"m\"\nrestart = \"sometimes\"\n")
        .unwrap_err()
        .to_string();
    assert!(s.contains("unknown variant `sometimes`"), "{s}");
    let s = parse("[nonsense]\n").unwrap_err().to_string();
    assert!(!s.contains("did you mean"), "nothing close: {s}");
}

#[test]
fn errors_carry_line_and_column() {
    let e = parse("[budget]\nheadroom = \"8GB\"\n").unwrap_err();
    let ConfigError::At {
        line, col, message, ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!((*line, *col), (2, 12));
    assert!(message.contains("did you mean 8GiB?"), "{message}");
    let s = parse("[budget]\nsafety_margin = 1.0\n")
        .unwrap_err()
        .to_string();
    assert!(s.contains(":2:") && s.contains("outside [0, 1)"), "{s}");
    let s = parse("[budget]\nper_instance_max = 0\n")
        .unwrap_err()
        .to_string();
    assert!(s.contains("outside (0, 1]"), "{s}");
}

#[test]
fn swap_max_alone_may_be_zero() {
    assert!(parse("[defaults]\nswap_max = 0\n").is_ok());
    assert!(parse("[defaults]\nswap_max = \"0\"\n").is_ok());
    assert!(parse("[defaults]\nram_limit = 0\n").is_err());
    assert!(parse("[defaults]\nram_limit = \"0\"\n").is_err());
    assert!(parse("[defaults]\nctx = 0\n").is_err());
}

#[test]
fn mode_errors() {
    let base = "[instances.a]\nmodel = \"m.gguf\"\n";
    let s = parse(&format!("{base}[modes.x]\ninstances = []\n"))
        .unwrap_err()
        .to_string();
    assert!(s.contains("mode x has no instances"), "{s}");
    let s = parse(&format!("{base}[modes.x]\ninstances = [\"a\", \"b\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(
        s.contains("unknown instance \"b\"") && s.contains(":4:"),
        "{s}"
    );
    let s = parse(&format!("{base}[modes.x]\ninstances = [\"a\", \"a\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(s.contains("twice"), "{s}");
    let c = parse(&format!("{base}[modes.x]\ninstances = [\"a\"]\n")).unwrap();
    let s = c.mode("y", 2).unwrap_err().to_string();
    assert!(
        s.contains("unknown mode \"y\"; the config defines: x"),
        "{s}"
    );
}

#[test]
fn instance_names_are_checked() {
    let s = parse("[instances.\"../../etc\"]\nmodel = \"m\"\n")
        .unwrap_err()
        .to_string();
    assert!(s.contains("invalid instance name \"../../etc\""), "{s}");
    assert!(s.contains(":1:"), "{s}");
    let s = parse("[instances.a]\n").unwrap_err().to_string();
    assert!(s.contains("instance a has no model"), "{s}");
}

/// Values that once passed `validate` and then crashed `run` (exit 101) or the worker: each is
/// refused with its bound in the message.
#[test]
fn values_past_their_bounds_are_refused_with_the_bound() {
    let cases = [
        ("backoff_max = \"100000000years\"", "at most 1day"),
        ("stop_timeout = \"10000000000years\"", "at most 1day"),
        ("heartbeat_interval = \"100000000000years\"", "at most 1day"),
        ("load_stall_timeout = \"2days\"", "at most 1day"),
        ("backoff_initial = \"25h\"", "at most 1day"),
        ("backoff_reset_after = \"1000years\"", "at most 1day"),
        ("start_limit_interval = \"1000years\"", "at most 1day"),
        ("threads = 4294967295", "at most 1024"),
        ("ctx = 4294967295", "at most 16777216"),
        (
            "priority = -9223372036854775808",
            "between -1000000 and 1000000",
        ),
        (
            "priority = 9223372036854775807",
            "between -1000000 and 1000000",
        ),
        ("gpu_layers = 4294967295", "at most 65536"),
        ("backoff_factor = 1e300", "at most 100"),
        ("start_limit_burst = 4294967295", "at most 1000000"),
    ];
    for (line, bound) in cases {
        let text = format!("[defaults]\nmodel = \"m.gguf\"\n{line}\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(bound), "{line}: {e}");
        assert!(e.contains(":3:"), "{line}: the error has its line: {e}");
    }
    for (section, line) in [
        ("pressure", "interval = \"100000000000years\""),
        ("pressure", "settle = \"2days\""),
        ("pressure", "thrash_window = \"2days\""),
        ("gpu", "settle = \"2days\""),
        ("gpu", "release_timeout = \"2days\""),
        ("logging", "worker_output_interval = \"2days\""),
    ] {
        let e = parse(&format!("[{section}]\n{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1day"), "[{section}] {line}: {e}");
    }
    // The bounds themselves are accepted.
    parse(
        "[defaults]\nmodel = \"m.gguf\"\nbackoff_max = \"1day\"\nthreads = 1024\n\
         ctx = 16777216\npriority = -1000000\n[pressure]\ninterval = \"24h\"\n",
    )
    .unwrap();
}
