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

#[test]
fn http_defaults() {
    let c = parse("").unwrap();
    let h = &c.http;
    assert_eq!(h.listen, None);
    assert!(!h.explicit());
    assert_eq!(h.listen_addr(), Some(DEFAULT_HTTP_LISTEN.parse().unwrap()));
    assert_eq!(DEFAULT_HTTP_LISTEN, "127.0.0.1:8080");
    assert_eq!(h.queue, 64);
    assert_eq!(h.queue_timeout.0, Duration::from_secs(60));
    assert_eq!(h.api_key_file, None);
    assert_eq!(h.max_body, Size(4 << 20));
    assert_eq!(h.max_connections, 256);
    assert_eq!(*h, HttpSection::default());
}

#[test]
fn http_keys_parse_and_resolve() {
    let c = parse(
        "[http]\nlisten = \"0.0.0.0:9000\"\nqueue = 4096\nqueue_timeout = \"1day\"\n\
         api_key_file = \"keys/api.key\"\nmax_body = \"64MiB\"\nmax_connections = 65536\n",
    )
    .unwrap();
    let h = &c.http;
    assert!(h.explicit());
    assert_eq!(h.listen_addr(), Some("0.0.0.0:9000".parse().unwrap()));
    assert_eq!(h.queue, 4096);
    assert_eq!(h.queue_timeout.0, Duration::from_secs(86400));
    assert_eq!(
        h.api_key_file.as_deref(),
        Some(Path::new("/etc/belljar/keys/api.key")),
        "relative to the config's dir"
    );
    assert_eq!(h.max_body, Size(64 << 20));
    assert_eq!(h.max_connections, 65536);
    let c = parse("[http]\napi_key_file = \"/run/keys/k\"\nlisten = \"[::]:0\"\n").unwrap();
    assert_eq!(
        c.http.api_key_file.as_deref(),
        Some(Path::new("/run/keys/k"))
    );
    assert_eq!(c.http.listen_addr(), Some("[::]:0".parse().unwrap()));

    let off = parse("[http]\nlisten = \"off\"\n").unwrap();
    assert!(off.http.explicit());
    assert_eq!(off.http.listen_addr(), None);
    for ok in [
        "127.0.0.1:8080",
        "[::1]:8080",
        "127.3.4.5:0",
        "[::ffff:127.0.0.1]:80",
    ] {
        let c = parse(&format!("[http]\nlisten = \"{ok}\"\n")).unwrap();
        assert_eq!(c.http.listen_addr(), Some(ok.parse().unwrap()), "{ok}");
    }
}

#[test]
fn http_listen_must_be_off_or_an_address() {
    for bad in [
        "localhost:8080",
        "8080",
        "127.0.0.1",
        ":8080",
        "",
        "OFF",
        "::1:8080",
    ] {
        let e = parse(&format!("[http]\nlisten = \"{bad}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:"), "{bad}: line: {e}");
        assert!(e.contains("listen"), "{bad}: names the key: {e}");
        assert!(
            e.contains("\"127.0.0.1:8080\"")
                && e.contains("\"[::1]:8080\"")
                && e.contains("\"off\""),
            "{bad}: examples: {e}"
        );
    }
}

#[test]
fn http_exposure_needs_an_api_key() {
    for addr in [
        "0.0.0.0:8080",
        "[::]:8080",
        "192.168.1.2:80",
        "[2001:db8::1]:80",
    ] {
        let e = parse(&format!("[http]\nlisten = \"{addr}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[http] listen"), "{addr}: names the key: {e}");
        assert!(e.contains("not a loopback address"), "{addr}: {e}");
        assert!(
            e.contains("set [http] api_key_file, or listen on 127.0.0.1"),
            "{addr}: the fix: {e}"
        );
        parse(&format!(
            "[http]\nlisten = \"{addr}\"\napi_key_file = \"k\"\n"
        ))
        .unwrap();
    }
    // The same rule for `--http ADDR`.
    let any: std::net::SocketAddr = "0.0.0.0:1".parse().unwrap();
    let e = check_exposure(&any, None).unwrap_err();
    assert!(
        e.contains("set [http] api_key_file, or listen on 127.0.0.1"),
        "{e}"
    );
    assert!(check_exposure(&any, Some(Path::new("k"))).is_ok());
    for lo in [
        "127.0.0.1:1",
        "127.255.0.9:1",
        "[::1]:1",
        "[::ffff:127.0.0.1]:1",
    ] {
        assert!(check_exposure(&lo.parse().unwrap(), None).is_ok(), "{lo}");
    }
    // A section built in code gets the same checks.
    let mut h = HttpSection {
        listen: Some("10.0.0.1:80".into()),
        ..HttpSection::default()
    };
    assert!(h.check().unwrap_err().contains("api_key_file"));
    h.api_key_file = Some("k".into());
    h.check().unwrap();
    h.queue = 0;
    assert!(h.check().unwrap_err().contains("queue"));
}

#[test]
fn http_values_past_their_bounds_are_refused_with_the_bound() {
    let cases = [
        (
            "queue = 0",
            "queue = 0 is out of range: give a number from 1 to 4096",
        ),
        ("queue = 4097", "from 1 to 4096"),
        ("max_connections = 0", "max_connections = 0 is out of range"),
        ("max_connections = 65537", "from 1 to 65536"),
        (
            "queue_timeout = \"0s\"",
            "queue_timeout: a duration of zero",
        ),
        ("queue_timeout = \"2days\"", "at most 1day"),
        ("max_body = 0", "max_body: a size of zero"),
        (
            "max_body = \"65MiB\"",
            "max_body 65.0 MiB is too large: at most 64.0 MiB",
        ),
        ("api_key_file = \"\"", "api_key_file is empty"),
    ];
    for (line, want) in cases {
        let e = parse(&format!("[http]\n{line}\n")).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
        assert!(e.contains(":2:"), "{line}: the error has its line: {e}");
    }
    let e = parse("[http]\nlistn = \"off\"\n").unwrap_err().to_string();
    assert!(e.contains("did you mean `listen`?"), "{e}");
}

const TWO: &str = "[defaults]\nmodel = \"m.gguf\"\n[instances.a]\n[instances.b]\n";

#[test]
fn aliases_resolve_per_instance() {
    let c = parse(&format!(
        "{TWO}aliases = [\"gpt-4o-mini\", \"llama3:8b\", \"Ünïcode.Q4_K_M\"]\n[modes.m]\ninstances = [\"a\", \"b\"]\n"
    ))
    .unwrap();
    let m = c.mode("m", 2).unwrap();
    assert_eq!(m[0].aliases, Vec::<String>::new());
    assert_eq!(m[1].aliases, ["gpt-4o-mini", "llama3:8b", "Ünïcode.Q4_K_M"]);
    let max = format!("\"{}\"", "x".repeat(128));
    let sixteen: Vec<String> = (0..16).map(|i| format!("\"a{i}\"")).collect();
    parse(&format!("{TWO}aliases = [{max}]\n")).unwrap();
    parse(&format!("{TWO}aliases = [{}]\n", sixteen.join(", "))).unwrap();
    parse(&format!("{TWO}aliases = []\n")).unwrap();
}

#[test]
fn bad_aliases_are_refused() {
    let long = "x".repeat(129);
    let seventeen: Vec<String> = (0..17).map(|i| format!("\"a{i}\"")).collect();
    let seventeen = seventeen.join(", ");
    let cases = [
        ("[\"\"]", "an alias is empty"),
        (&format!("[\"{long}\"]"), "129 bytes long: at most 128"),
        ("[\"a b\"]", "contains ' '"),
        ("[\"a\\tb\"]", "contains '\\t'"),
        ("[\"a\\u0007\"]", "contains '\\u{7}'"),
        (
            "[\"a\\u00a0b\"]",
            "may not contain whitespace, control characters or '/'",
        ),
        ("[\"../etc\"]", "contains '/'"),
        ("[\"..\"]", "alias \"..\" is not allowed"),
        (
            &format!("[{seventeen}]"),
            "17 aliases are too many: at most 16",
        ),
        ("[\"x\", \"x\"]", "alias \"x\" is listed twice"),
    ];
    for (list, want) in cases {
        let e = parse(&format!("{TWO}aliases = {list}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("aliases: "), "{list}: names the key: {e}");
        assert!(e.contains(want), "{list}: {e}");
        assert!(e.contains(":5:"), "{list}: the error has its line: {e}");
    }
    // The same rule for a run-time add.
    let s = InstanceSection {
        aliases: Some(vec!["a/b".into()]),
        ..InstanceSection::default()
    };
    let e = s.check().unwrap_err();
    assert!(e.starts_with("aliases: ") && e.contains("'/'"), "{e}");
}

#[test]
fn aliases_are_unique_across_the_config() {
    let e = parse(&format!("{TWO}aliases = [\"a\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[instances.b] aliases: alias \"a\" is the name of instance a"),
        "{e}"
    );
    assert!(e.contains("rename or remove one of them"), "{e}");
    let e = parse("[defaults]\nmodel = \"m\"\n[instances.a]\naliases = [\"a\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is the name of instance a"), "its own name: {e}");
    let e = parse(
        "[defaults]\nmodel = \"m\"\n[instances.a]\naliases = [\"x\"]\n[instances.b]\naliases = [\"y\", \"x\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("[instances.b] aliases: alias \"x\" is already an alias of instance a"),
        "both instances: {e}"
    );
    // An alias that later becomes an instance's name: the instance names are known first.
    let e = parse("[defaults]\nmodel = \"m\"\n[instances.a]\naliases = [\"b\"]\n[instances.b]\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[instances.a] aliases: alias \"b\" is the name of instance b"),
        "{e}"
    );
}

#[test]
fn aliases_are_refused_in_defaults() {
    let e = parse("[defaults]\nmodel = \"m\"\naliases = [\"x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("[defaults] aliases"), "{e}");
    assert!(
        e.contains("move `aliases = [...]` to the [instances.NAME]"),
        "{e}"
    );
}

/// A built-in's name is kept as it is; a file's path is resolved against the config file's
/// directory, like `model`, in `[defaults]` and per instance; unset is the model's own.
#[test]
fn chat_template_names_are_kept_and_paths_resolved() {
    let c = parse(
        "[defaults]\nmodel = \"m.gguf\"\nchat_template = \"./chat.jinja\"\n\
         [instances.a]\n\
         [instances.b]\nchat_template = \"llama3\"\n\
         [instances.c]\nchat_template = \"/srv/templates/x.jinja\"\n\
         [instances.d]\nchat_template = \"templates/x.jinja\"\n\
         [modes.m]\ninstances = [\"a\", \"b\", \"c\", \"d\"]\n",
    )
    .unwrap();
    let m = c.mode("m", 4).unwrap();
    let got: Vec<Option<&str>> = m.iter().map(|s| s.chat_template.as_deref()).collect();
    assert_eq!(
        got,
        [
            Some("/etc/belljar/./chat.jinja"),
            Some("llama3"),
            Some("/srv/templates/x.jinja"),
            Some("/etc/belljar/templates/x.jinja"),
        ]
    );
    assert_eq!(
        c.defaults.chat_template.as_deref(),
        Some("/etc/belljar/./chat.jinja")
    );
    for name in ["chatml", "llama3", "mistral", "gemma", "phi3", "zephyr"] {
        let c = parse(&format!("{TWO}chat_template = \"{name}\"\n")).unwrap();
        let b = &c.instances[&InstanceName::parse("b").unwrap()];
        assert_eq!(b.chat_template.as_deref(), Some(name));
    }
    // Unset: the model's own template (the worker decides), in every instance.
    let c = parse(&format!("{TWO}[modes.m]\ninstances = [\"a\", \"b\"]\n")).unwrap();
    assert!(
        c.mode("m", 2)
            .unwrap()
            .iter()
            .all(|s| s.chat_template.is_none())
    );
    // A config named relative to the working directory: the path stays a path (it keeps its
    // `/`, so the worker does not take it for a built-in's name).
    let c = Config::parse(
        &format!("{TWO}chat_template = \"./t.jinja\"\n"),
        Path::new("budgets.toml"),
    )
    .unwrap();
    let b = &c.instances[&InstanceName::parse("b").unwrap()];
    assert_eq!(b.chat_template.as_deref(), Some("./t.jinja"));
}

#[test]
fn bad_chat_template_values_are_refused_with_the_line_and_the_fix() {
    let e = parse(&format!("{TWO}chat_template = \"llama-3\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(":5:"), "the line: {e}");
    assert!(e.contains("chat_template: \"llama-3\" is not a built-in chat template (chatml, llama3, mistral, gemma, phi3, zephyr)"), "{e}");
    assert!(e.contains("did you mean \"llama3\"?"), "{e}");
    assert!(e.contains("needs a /") && e.contains("./my.jinja"), "{e}");
    let e = parse(&format!("{TWO}chat_template = \"vicuna\"\n"))
        .unwrap_err()
        .to_string();
    assert!(!e.contains("did you mean"), "nothing near: {e}");
    assert!(e.contains("which needs a / (e.g. \"./my.jinja\")"), "{e}");
    let e = parse(&format!("{TWO}chat_template = \"my.jinja\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean the file \"./my.jinja\"?"), "{e}");
    let e = parse(&format!("{TWO}chat_template = \"\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":5:") && e.contains("chat_template: the chat template is empty"),
        "{e}"
    );
    assert!(e.contains("remove the key"), "{e}");
    let e = parse("[defaults]\nmodel = \"m\"\nchat_template = \"ChatML\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":3:") && e.contains("\"ChatML\" is not a built-in"),
        "{e}"
    );
    assert!(e.contains("did you mean \"chatml\"?"), "{e}");
    let e = parse(&format!("{TWO}chat_template = 3\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid type"), "{e}");
    // The same rule for a run-time add.
    for (value, want) in [("bogus", "not a built-in"), ("", "empty")] {
        let s = InstanceSection {
            chat_template: Some(value.into()),
            ..InstanceSection::default()
        };
        let e = s.check().unwrap_err();
        assert!(e.starts_with("chat_template: ") && e.contains(want), "{e}");
    }
}

/// A template file's text, as `validate`, `run` and `add` check it once it is read.
#[test]
fn chat_template_files_must_be_small_utf8_and_compile() {
    use rules::{MAX_CHAT_TEMPLATE, chat_template_source};
    let path = Path::new("/etc/belljar/chat.jinja");
    let good = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
    chat_template_source(path, good.as_bytes()).unwrap();
    chat_template_source(path, &vec![b'x'; MAX_CHAT_TEMPLATE]).unwrap();

    let e = chat_template_source(path, b"line one\n{% for x in %}{% endfor %}\n").unwrap_err();
    assert!(
        e.contains("/etc/belljar/chat.jinja does not compile"),
        "{e}"
    );
    assert!(e.contains("line 2"), "names the line: {e}");
    let e = chat_template_source(path, b"{{ messages ").unwrap_err();
    assert!(e.contains("does not compile"), "{e}");
    let e = chat_template_source(path, b"caf\xe9").unwrap_err();
    assert!(
        e.contains("is not UTF-8 text (invalid byte at offset 3)"),
        "{e}"
    );
    let e = chat_template_source(path, &vec![b'x'; MAX_CHAT_TEMPLATE + 1]).unwrap_err();
    assert!(e.contains("larger than 1048576 bytes"), "{e}");
}

/// The shipped budgets.toml parses, and so does its commented `[http]` example.
#[test]
fn shipped_config_and_its_http_example_parse() {
    let shipped = include_str!("../../../budgets.toml");
    parse(shipped).unwrap();
    let (head, example) = shipped
        .split_once("# [http]\n")
        .expect("the [http] example");
    let example: String = example
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
        .collect();
    let c = parse(&format!("{head}[http]\n{example}")).unwrap();
    assert!(c.http.explicit());
    assert_eq!(
        c.http.api_key_file.as_deref(),
        Some(Path::new("/etc/belljar/api.key"))
    );
}

#[test]
fn swap_keys_have_built_in_defaults() {
    let c = parse("[instances.a]\nmodel = \"m.gguf\"\n[modes.x]\ninstances = [\"a\"]\n").unwrap();
    let a = &c.mode("x", 2).unwrap()[0];
    assert_eq!(a.load, LoadMode::Always);
    assert_eq!(a.idle_unload, IdleUnload::After(Duration::from_secs(600)));
    assert_eq!(a.idle_unload, IdleUnload::DEFAULT);
    assert!(!a.pinned);
    assert_eq!(a.min_loaded.0, Duration::from_secs(30));
}

#[test]
fn swap_keys_parse_and_inherit_from_defaults() {
    let c = parse(
        "[defaults]\nmodel = \"m.gguf\"\nload = \"on-demand\"\nidle_unload = \"never\"\n\
         pinned = true\nmin_loaded = \"1s\"\n\
         [instances.a]\n\
         [instances.b]\nload = \"always\"\nidle_unload = \"90s\"\npinned = false\nmin_loaded = \"0s\"\n\
         [modes.x]\ninstances = [\"a\", \"b\"]\n",
    )
    .unwrap();
    let m = c.mode("x", 2).unwrap();
    let (a, b) = (&m[0], &m[1]);
    assert_eq!(a.load, LoadMode::OnDemand, "from [defaults]");
    assert_eq!(a.idle_unload, IdleUnload::Never);
    assert!(a.pinned);
    assert_eq!(a.min_loaded.0, Duration::from_secs(1));
    assert_eq!(b.load, LoadMode::Always, "the instance's own value wins");
    assert_eq!(b.idle_unload, IdleUnload::After(Duration::from_secs(90)));
    assert!(!b.pinned);
    assert_eq!(b.min_loaded.0, Duration::ZERO, "0s: evictable at once");
}

#[test]
fn bad_swap_values_are_refused_with_the_key_the_line_and_the_fix() {
    let cases = [
        (
            "load = \"sometimes\"",
            &["load", "\"always\"", "\"on-demand\""][..],
        ),
        ("load = \"on_demand\"", &["load", "\"on-demand\""]),
        (
            "idle_unload = \"0s\"",
            &["idle_unload", "above zero", "\"never\""],
        ),
        (
            "idle_unload = \"soon\"",
            &["idle_unload", "\"never\"", "e.g. \"500ms\""],
        ),
        (
            "idle_unload = 600",
            &["idle_unload", "\"never\"", "duration string"],
        ),
        ("min_loaded = \"x\"", &["min_loaded", "e.g. \"500ms\""]),
        ("min_loaded = \"2days\"", &["min_loaded", "at most 1day"]),
        (
            "pinned = \"yes\"",
            &["pinned", "pinned = true or pinned = false"],
        ),
    ];
    for (line, wants) in cases {
        for section in ["[instances.a]", "[defaults]"] {
            let text = format!("{section}\nmodel = \"m.gguf\"\n{line}\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(":3:"), "{line}: the error has its line: {e}");
            for want in wants {
                assert!(e.contains(want), "{line}: wants {want:?} in: {e}");
            }
        }
    }
}

#[test]
fn run_keys_change_with_what_shapes_a_run_and_not_with_the_supervisor_side() {
    let keys = |extra: &str| {
        let c = parse(&format!(
            "[instances.a]\nmodel = \"/m.gguf\"\n{extra}\n[modes.x]\ninstances = [\"a\"]\n"
        ))
        .unwrap();
        c.mode("x", 2).unwrap()[0].run_keys()
    };
    let base = keys("");
    assert_eq!(base["ctx"], "2048");
    assert_eq!(base["model"], "/m.gguf");
    assert_eq!(base["ram_limit"], "(unset)");
    for changed in [
        "ctx = 4096",
        "ram_limit = \"300MiB\"",
        "gpu_layers = 4",
        "use_mmap = false",
        "threads = 1",
        "chat_template = \"chatml\"",
        "worker_user = \"root\"",
    ] {
        assert_ne!(keys(changed), base, "{changed} shapes a run");
    }
    for same in [
        "priority = 5",
        "restart = \"always\"",
        "stop_timeout = \"3s\"",
        "aliases = [\"x-a\"]",
        "load = \"on-demand\"",
        "pinned = true",
    ] {
        assert_eq!(keys(same), base, "{same} is the supervisor's side");
    }
}
