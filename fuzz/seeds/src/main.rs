//! `belljar-fuzz-seeds REPO_ROOT OUT_DIR`: writes `OUT_DIR/<target>/<seed>` for every fuzz target
//! and `OUT_DIR/<target>.dict` where a dictionary helps. Deterministic: the same sources give the
//! same files, so nothing generated is committed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use belljar_gguf::{ModelShape, read_header};
use belljar_protocol::control::*;
use belljar_protocol::worker::*;
use belljar_protocol::{MAX_FRAME, encode};
use serde::Serialize;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, out] = &args[..] else {
        eprintln!("usage: belljar-fuzz-seeds REPO_ROOT OUT_DIR");
        std::process::exit(2);
    };
    let (root, out) = (Path::new(root), Path::new(out));
    let mut seeds = Seeds {
        out: out.to_path_buf(),
    };
    protocol(&mut seeds);
    gguf(&mut seeds, root);
    config(&mut seeds, root);
}

struct Seeds {
    out: PathBuf,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.out.join(target);
        fs::create_dir_all(&dir).expect("create the seed directory");
        fs::write(dir.join(name), bytes).expect("write a seed");
    }

    /// One libFuzzer dictionary entry per token, quoted and escaped.
    fn dict(&mut self, target: &str, tokens: &BTreeSet<String>) {
        let mut text = String::new();
        for t in tokens {
            text.push('"');
            for b in t.bytes() {
                match b {
                    b'"' | b'\\' => text.push_str(&format!("\\{}", b as char)),
                    0x20..=0x7e => text.push(b as char),
                    _ => text.push_str(&format!("\\x{b:02x}")),
                }
            }
            text.push_str("\"\n");
        }
        fs::create_dir_all(&self.out).expect("create the seed directory");
        fs::write(self.out.join(format!("{target}.dict")), text).expect("write a dictionary");
    }
}

fn json<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("a message serializes")
}

/// JSON object keys and `"type"` tags of the seeds, quoted as they appear on the wire.
fn json_tokens(payloads: &[Vec<u8>], tokens: &mut BTreeSet<String>) {
    fn walk(v: &serde_json::Value, tokens: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    tokens.insert(format!("\"{k}\":"));
                    if let (
                        "type" | "level" | "restored_from" | "state",
                        serde_json::Value::String(s),
                    ) = (k.as_str(), v)
                    {
                        tokens.insert(format!("\"{s}\""));
                    }
                    walk(v, tokens);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, tokens)),
            _ => {}
        }
    }
    for p in payloads {
        walk(&serde_json::from_slice(p).expect("a seed is JSON"), tokens);
    }
    for t in [
        "null",
        "true",
        "false",
        "1e39",
        "-0",
        "1.5",
        "4294967296",
        "\"\\u0000\"",
    ] {
        tokens.insert(t.to_owned());
    }
}

fn status() -> StatusReport {
    StatusReport {
        host: HostStatus {
            total: 24 << 30,
            available: 20 << 30,
            level: "normal".into(),
            psi_some_avg10: Some(0.25),
            source: "host".into(),
        },
        budget: BudgetStatus {
            usable: 16 << 30,
            allocated: 1 << 30,
        },
        instances: vec![InstanceStatus {
            name: "subject".into(),
            state: "ready".into(),
            thrashing: false,
            reason: "serving".into(),
            pid: Some(4242),
            restarts: 1,
            oom_kills: 0,
            last_exit: Some("oom-kill".into()),
            load_progress: 1.0,
            allocated: 256 << 20,
            estimate_source: "file".into(),
            memory: MemoryStatus {
                current: Some(100 << 20),
                limit: Some(256 << 20),
                reservation: None,
                peak: Some(120 << 20),
                last_peak: None,
            },
            uptime_s: Some(12),
            gpu_memory: None,
            cpu_fallback: false,
            gpu_release: Some("pending".into()),
            queued: 3,
            aliases: vec!["gpt-test".into()],
            chat_template: Some("/etc/belljar/chat.jinja".into()),
            last_used_unix: Some(1_764_300_000),
            load: "on-demand".into(),
            pinned: true,
            loads: 4,
            evictions: 2,
        }],
        metrics_addr: Some("127.0.0.1:9464".into()),
        http_addr: Some("127.0.0.1:8080".into()),
        gpus: vec![GpuStatus {
            index: 0,
            name: "H100".into(),
            used: 1 << 30,
            total: 80 << 30,
            level: "warning".into(),
        }],
        omitted: 1,
    }
}

fn protocol(seeds: &mut Seeds) {
    let commands: Vec<Vec<u8>> = vec![
        json(&ClientHello {
            protocol_version: 1,
        }),
        json(&Command::Status(StatusQuery {})),
        json(&Command::Add(AddRequest {
            name: "helper".into(),
            model: "/srv/models/demo.gguf".into(),
            ram_limit: Some(256 << 20),
            ctx: Some(2048),
            gpu_layers: None,
            gpu_device: Some(0),
            priority: Some(-1),
            chat_template: Some("llama3".into()),
            load: Some("on-demand".into()),
        })),
        json(&Command::Remove(RemoveRequest {
            name: "helper".into(),
            keep_session: false,
        })),
        json(&Command::Remove(RemoveRequest {
            name: "helper".into(),
            keep_session: true,
        })),
        json(&Command::Restart(NameRequest {
            name: "subject".into(),
        })),
        json(&Command::Load(NameRequest {
            name: "subject".into(),
        })),
        json(&Command::Unload(NameRequest {
            name: "subject".into(),
        })),
        json(&Command::Ask(AskRequest {
            name: "subject".into(),
            prompt: "hello \"world\"\n\u{e9}\u{1f600}".into(),
            max_tokens: 32,
            ignore_eos: true,
            raw: true,
        })),
    ];
    let responses: Vec<Vec<u8>> = vec![
        json(&ServerHello {
            protocol_version: 1,
        }),
        json(&Response::Status(Box::new(status()))),
        json(&Response::Ok(OkReply {
            message: "added helper".into(),
        })),
        json(&Response::Token(TokenText { text: " he".into() })),
        json(&Response::Done(AskDone {
            tokens: 32,
            ms: 410,
        })),
        json(&Response::Error(ControlError {
            message: "unknown instance".into(),
            exit_code: 1,
        })),
    ];
    let worker: Vec<Vec<u8>> = vec![
        json(&WorkerMsg::Hello(Hello {
            protocol_version: 1,
            instance: "subject".into(),
            pid: 77,
        })),
        json(&WorkerMsg::Refused(Refused {
            reason: "not enough memory".into(),
            available: 1 << 20,
            required: 1 << 30,
            headroom: 2 << 30,
        })),
        json(&WorkerMsg::Failed(Failed {
            reason: "bad model".into(),
            exit_code: 65,
            gpu_alloc: false,
        })),
        json(&WorkerMsg::Loading(Loading { fraction: 0.5 })),
        json(&WorkerMsg::Ready(Ready {
            load_ms: 40,
            rss: 30 << 20,
            model_bytes: 5 << 20,
            ctx: 2048,
            session: SessionInfo {
                turns: 3,
                tokens: 120,
                restored_from: RestoredFrom::State,
                note: Some("the old session was moved aside".into()),
            },
            state_bytes: 1 << 20,
        })),
        json(&WorkerMsg::Heartbeat(Heartbeat {
            rss: 31 << 20,
            state: WorkerState::Busy,
        })),
        json(&WorkerMsg::Token(Token {
            id: 9,
            text: "\u{fffd}".into(),
        })),
        json(&WorkerMsg::Done(Done {
            id: 9,
            tokens: 16,
            ms: 200,
            prompt_tokens: 40,
            cached_tokens: 31,
            ..Done::default()
        })),
        json(&WorkerMsg::Error(ErrorReply {
            id: None,
            message: "malformed message".into(),
            kind: belljar_protocol::worker::ErrorKind::Internal,
        })),
    ];
    let supervisor: Vec<Vec<u8>> = vec![
        json(&SupervisorMsg::Welcome(Welcome {
            protocol_version: 1,
        })),
        json(&SupervisorMsg::Prompt(Prompt {
            id: 9,
            text: "tell me".into(),
            max_tokens: 16,
            ignore_eos: false,
            ..Prompt::default()
        })),
        json(&SupervisorMsg::Prompt(Prompt {
            id: 10,
            mode: belljar_protocol::worker::PromptMode::Chat,
            messages: vec![belljar_protocol::worker::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 8,
            sampling: belljar_protocol::worker::Sampling {
                temperature: 0.7,
                seed: Some(42),
                ..Default::default()
            },
            stop: vec!["\n".into()],
            fresh: true,
            ..Prompt::default()
        })),
        json(&SupervisorMsg::Cancel(belljar_protocol::worker::Cancel {
            id: 10,
        })),
        json(&SupervisorMsg::Shutdown(Shutdown {})),
        json(&SupervisorMsg::Pressure(PressureNotice {
            level: Level::Critical,
        })),
    ];
    for (target, payloads) in [
        ("control_command", &commands),
        ("control_response", &responses),
        ("worker_msg", &worker),
        ("supervisor_msg", &supervisor),
    ] {
        for (i, p) in payloads.iter().enumerate() {
            seeds.put(target, &format!("seed-{i:02}"), p);
        }
        let mut tokens = BTreeSet::new();
        json_tokens(payloads, &mut tokens);
        seeds.dict(target, &tokens);
    }

    // The frame target: a cap byte, a chunking byte, then frames of real messages.
    let all: Vec<&Vec<u8>> = commands.iter().chain(&worker).chain(&supervisor).collect();
    for (i, chunk) in all.chunks(3).enumerate() {
        let mut stream = vec![255u8, i as u8 + 1];
        for p in chunk {
            stream.extend((p.len() as u32).to_be_bytes());
            stream.extend(*p);
        }
        seeds.put("frame", &format!("seed-{i:02}"), &stream);
    }
    // An oversized frame between two others, and a truncated tail.
    let mut stream = vec![1u8, 7];
    stream.extend(encode(&"a", MAX_FRAME).expect("encodes"));
    stream.extend(100u32.to_be_bytes());
    stream.extend([b'x'; 100]);
    stream.extend(encode(&"b", MAX_FRAME).expect("encodes"));
    stream.extend([0, 0, 0, 9, b'{']);
    seeds.put("frame", "oversized-then-truncated", &stream);
}

/// The header (metadata and tensor infos, no tensor data) of a model the writer makes.
fn header_of(shape: &ModelShape) -> Vec<u8> {
    let mut file = Vec::new();
    shape
        .write(&mut file)
        .expect("the writer writes a valid shape");
    let header = read_header(&file[..]).expect("the writer's header reads");
    file.truncate(header.header_len as usize);
    file
}

fn gguf(seeds: &mut Seeds, root: &Path) {
    let base = ModelShape::default();
    let shapes = [
        ("demo", base.clone()),
        (
            "min-vocab-f16",
            ModelShape {
                vocab: belljar_gguf::writer::MIN_VOCAB,
                f16: true,
                layers: 1,
                width: 8,
                ff: 8,
                heads: 2,
                kv_heads: 1,
                ..base.clone()
            },
        ),
    ];
    for (name, shape) in &shapes {
        seeds.put("gguf_header", name, &header_of(shape));
    }
    // Any model generated into models/ (`worker make-model models/demo.gguf`): its header.
    if let Ok(dir) = fs::read_dir(root.join("models")) {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        {
            let Ok(file) = fs::File::open(path) else {
                continue;
            };
            let Ok(header) = read_header(std::io::BufReader::new(file)) else {
                continue;
            };
            let bytes = fs::read(path).expect("read a model");
            let name = path.file_name().expect("a file name").to_string_lossy();
            seeds.put(
                "gguf_header",
                &format!("models-{name}"),
                &bytes[..header.header_len as usize],
            );
        }
    }
    // A small header with one of every value type, for the mutator to start from.
    seeds.put("gguf_header", "every-type", &every_type());

    let mut tokens: BTreeSet<String> = ["GGUF".to_owned()].into();
    let header = read_header(&header_of(&base)[..]).expect("reads");
    for (key, _) in &header.metadata {
        tokens.insert(key.clone());
    }
    for t in header.tensors.iter().take(12) {
        tokens.insert(t.name.clone());
    }
    seeds.dict("gguf_header", &tokens);
}

fn every_type() -> Vec<u8> {
    fn s(out: &mut Vec<u8>, text: &str) {
        out.extend((text.len() as u64).to_le_bytes());
        out.extend(text.as_bytes());
    }
    let mut h = b"GGUF".to_vec();
    h.extend(3u32.to_le_bytes());
    h.extend(1u64.to_le_bytes()); // tensors
    h.extend(14u64.to_le_bytes()); // metadata entries
    let scalars: [(u32, &[u8]); 12] = [
        (0, &[7]),
        (1, &[0xff]),
        (2, &[1, 2]),
        (3, &[0xff, 0xff]),
        (4, &[32, 0, 0, 0]),
        (5, &[0xff, 0xff, 0xff, 0xff]),
        (6, &[0, 0, 0x80, 0x3f]),
        (7, &[1]),
        (10, &[1, 0, 0, 0, 0, 0, 0, 0]),
        (11, &[0xff; 8]),
        (12, &[0, 0, 0, 0, 0, 0, 0xf0, 0x3f]),
        (4, &[64, 0, 0, 0]),
    ];
    for (i, (ty, bytes)) in scalars.iter().enumerate() {
        s(&mut h, if i == 11 { "general.alignment" } else { "k" });
        h.extend(ty.to_le_bytes());
        h.extend(*bytes);
    }
    s(&mut h, "general.architecture");
    h.extend(8u32.to_le_bytes());
    s(&mut h, "llama");
    s(&mut h, "tokenizer.ggml.scores");
    h.extend(9u32.to_le_bytes());
    h.extend(6u32.to_le_bytes());
    h.extend(2u64.to_le_bytes());
    h.extend(1f32.to_le_bytes());
    h.extend(2f32.to_le_bytes());
    s(&mut h, "token_embd.weight");
    h.extend(2u32.to_le_bytes());
    h.extend(8u64.to_le_bytes());
    h.extend(4u64.to_le_bytes());
    h.extend(12u32.to_le_bytes()); // Q4_K
    h.extend(0u64.to_le_bytes());
    h
}

fn config(seeds: &mut Seeds, root: &Path) {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string(root.join("budgets.toml")) {
        texts.push(("budgets.toml".to_owned(), t));
    }
    // Every ```toml block of docs/*.md.
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    docs.sort();
    for path in docs
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
    {
        let text = fs::read_to_string(path).unwrap_or_default();
        let stem = path.file_stem().expect("a name").to_string_lossy();
        let mut block: Option<String> = None;
        let mut n = 0;
        for line in text.lines() {
            match (&mut block, line.trim_start()) {
                (None, l) if l.starts_with("```toml") => block = Some(String::new()),
                (Some(b), l) if l.starts_with("```") => {
                    texts.push((format!("docs-{stem}-{n:02}.toml"), std::mem::take(b)));
                    block = None;
                    n += 1;
                }
                (Some(b), _) => {
                    b.push_str(line);
                    b.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    assert!(
        !texts.is_empty(),
        "no budgets.toml or TOML examples under {root:?}"
    );
    let mut tokens = BTreeSet::new();
    for (name, text) in &texts {
        seeds.put("config", name, text.as_bytes());
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.starts_with('[') {
                tokens.insert(line.to_owned());
            } else if let Some((key, value)) = line.split_once('=') {
                tokens.insert(format!("{} = ", key.trim()));
                tokens.insert(value.trim().to_owned());
            }
        }
    }
    for t in [
        "\"1EiB\"",
        "\"16777216TiB\"",
        "18446744073709551615",
        "1e308",
        "nan",
        "inf",
    ] {
        tokens.insert(t.to_owned());
    }
    seeds.dict("config", &tokens);
}
