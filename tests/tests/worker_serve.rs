//! The real worker on a real Unix socket, with the test playing the supervisor: handshake,
//! loading, heartbeats, streaming, and the persistent session across SIGKILL.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use belljar_protocol::worker::{
    Prompt, Ready, RestoredFrom, Shutdown, SupervisorMsg, Welcome, WorkerMsg,
};
use belljar_testkit::link::WorkerLink;
use belljar_testkit::{ModelShape, TestDir, tiny_shape};

/// Loads until Ready; asserts Loading fractions never go backwards and end at 1.0.
fn until_ready(w: &WorkerLink) -> Ready {
    let mut last = 0.0f32;
    let mut loadings = 0;
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Loading(l)) => {
                assert!(
                    l.fraction >= last,
                    "progress went backwards: {} after {last}",
                    l.fraction
                );
                last = l.fraction;
                loadings += 1;
            }
            Some(WorkerMsg::Ready(r)) => {
                assert!(loadings >= 1, "no Loading before Ready");
                assert_eq!(last, 1.0, "loading ends at 1.0");
                return r;
            }
            other => panic!(
                "expected Loading/Ready, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    }
}

fn prompt(w: &mut WorkerLink, id: u64, text: &str, max_tokens: u32) -> (usize, u32) {
    w.send(&SupervisorMsg::Prompt(Prompt {
        id,
        text: text.into(),
        max_tokens,
        ignore_eos: true,
        ..Prompt::default()
    }));
    let mut tokens = 0;
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(t)) => {
                assert_eq!(t.id, id);
                tokens += 1;
            }
            Some(WorkerMsg::Done(d)) => {
                assert_eq!(d.id, id);
                return (tokens, d.tokens);
            }
            other => panic!(
                "expected Token/Done, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    }
}

/// Tokens in the context according to the session log (the documented JSON-lines format).
fn log_tokens(state: &Path) -> (u64, u64) {
    log_tokens_of(&state.join("session.log"))
}

/// (turns, tokens) of a session log file.
fn log_tokens_of(path: &Path) -> (u64, u64) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let turns: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("tokens").is_some()) // the header line names the model
        .collect();
    let tokens = turns
        .iter()
        .map(|t| t["tokens"].as_array().unwrap().len() as u64)
        .sum();
    (turns.len() as u64, tokens)
}

fn start(t: &TestDir, model: &Path, extra: &[&str]) -> WorkerLink {
    WorkerLink::start(t.path(), "subject", model, &t.join("state"), extra)
}

#[test]
fn hello_loading_ready_heartbeats_stream_and_survive_sigkill() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(
        &t,
        &model,
        &["--heartbeat-interval", "100ms", "--ctx", "512"],
    );
    let pid = w.handshake();
    assert_eq!(pid, w.child.id(), "Hello carries the worker's own pid");
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::New);
    assert_eq!(ready.session.turns, 0);
    assert_eq!(ready.ctx, 512);
    assert!(ready.rss > 0 && ready.model_bytes > 0);
    // Heartbeats keep coming while idle.
    for _ in 0..2 {
        assert!(matches!(w.recv(), Some(WorkerMsg::Heartbeat(_))));
    }

    let (streamed, done) = prompt(&mut w, 1, "hello there", 16);
    assert_eq!((streamed, done), (16, 16), "one Token per generated token");
    let (turns, tokens) = log_tokens(&t.join("state"));
    assert_eq!(turns, 1);

    w.child.kill().unwrap();
    assert_eq!(w.wait().signal(), Some(9));
    drop(w);

    let mut w = start(
        &t,
        &model,
        &["--heartbeat-interval", "100ms", "--ctx", "512"],
    );
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(
        ready.session.restored_from,
        RestoredFrom::State,
        "no re-prefill: stderr:\n{}",
        w.stderr()
    );
    assert_eq!((ready.session.turns, ready.session.tokens), (turns, tokens));
    // The conversation goes on in the same context.
    assert_eq!(prompt(&mut w, 2, "and then?", 4), (4, 4));
    assert_eq!(log_tokens(&t.join("state")).0, 2);
    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
    assert_eq!(w.wait().code(), Some(0), "clean shutdown");
}

/// Runs one prompt, kills the worker, applies `damage` to the state dir, restarts with
/// `model_after`; returns the second Ready and the log's (turns, tokens).
fn restart_after(damage: impl FnOnce(&Path), model_after: Option<&Path>) -> (Ready, (u64, u64)) {
    let t = TestDir::new();
    let (ready, _, log) = restart_in(&t, &tiny_shape(), damage, model_after);
    (ready, log)
}

/// [`restart_after`] in `t`, with a first model of `shape`; also returns the restarted worker.
fn restart_in(
    t: &TestDir,
    shape: &ModelShape,
    damage: impl FnOnce(&Path),
    model_after: Option<&Path>,
) -> (Ready, WorkerLink, (u64, u64)) {
    let model = t.model("m.gguf", shape);
    let mut w = start(t, &model, &[]);
    w.handshake();
    until_ready(&w);
    prompt(&mut w, 1, "first turn", 8);
    prompt(&mut w, 2, "second turn", 8);
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    damage(&t.join("state"));
    let mut w = start(t, model_after.unwrap_or(&model), &[]);
    w.handshake();
    let ready = until_ready(&w);
    let log = log_tokens(&t.join("state"));
    (ready, w, log)
}

#[test]
fn corrupt_state_file_is_rebuilt_from_the_log() {
    let (ready, (turns, tokens)) = restart_after(
        |state| {
            let path = state.join("session.state");
            let mut bytes = std::fs::read(&path).unwrap();
            let n = bytes.len();
            bytes[n - 10] ^= 0x5a;
            std::fs::write(&path, bytes).unwrap();
        },
        None,
    );
    assert_eq!(ready.session.restored_from, RestoredFrom::Log);
    assert_eq!((ready.session.turns, ready.session.tokens), (turns, tokens));
    assert_eq!(turns, 2);
}

#[test]
fn missing_state_file_is_rebuilt_from_the_log() {
    let (ready, (turns, _)) = restart_after(
        |state| std::fs::remove_file(state.join("session.state")).unwrap(),
        None,
    );
    assert_eq!(ready.session.restored_from, RestoredFrom::Log);
    assert_eq!(ready.session.turns, turns);
}

#[test]
fn state_file_of_another_ctx_is_not_used_and_the_log_is_re_prefilled() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &["--ctx", "512"]);
    w.handshake();
    until_ready(&w);
    prompt(&mut w, 1, "first turn", 8);
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    let mut w = start(&t, &model, &["--ctx", "256"]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(
        ready.session.restored_from,
        RestoredFrom::Log,
        "a state saved at another ctx must not be loaded"
    );
    assert_eq!(
        (ready.session.turns, ready.session.tokens),
        log_tokens(&t.join("state"))
    );
    assert_eq!(ready.session.note, None);
}

/// A context shorter than the re-prefill's smallest piece (32 tokens) re-prefills from the log
/// like any other (the piece size is also bounded by the context's batch).
#[test]
fn a_tiny_context_re_prefills_from_the_log() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &["--ctx", "24"]);
    w.handshake();
    until_ready(&w);
    prompt(&mut w, 1, "hi", 4);
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    std::fs::remove_file(t.join("state").join("session.state")).unwrap();
    let mut w = start(&t, &model, &["--ctx", "24"]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::Log, "{ready:?}");
    assert_eq!(ready.session.note, None, "nothing moved aside: {ready:?}");
    assert_eq!(
        (ready.session.turns, ready.session.tokens),
        log_tokens(&t.join("state"))
    );
}

/// The files in `dir` whose names end in `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// Issue #17, 7: pointing an instance at another model (here with a smaller vocabulary, so the
/// old token ids are invalid for it) used to re-prefill the old ids, which llama.cpp refused,
/// and the worker exited 69: failed for good.
#[test]
fn a_session_of_another_model_is_moved_aside_and_a_new_one_starts() {
    let t = TestDir::new();
    let other = t.model("other.gguf", &tiny_shape());
    let big_vocab = ModelShape {
        vocab: 2048,
        seed: 99,
        ..tiny_shape()
    };
    let (ready, mut w, (turns, _)) = restart_in(&t, &big_vocab, |_| {}, Some(&other));
    assert_eq!(
        ready.session.restored_from,
        RestoredFrom::New,
        "{}",
        w.stderr()
    );
    assert_eq!((ready.session.turns, ready.session.tokens), (0, 0));
    assert_eq!(turns, 0, "the new log has no turns");
    let note = ready
        .session
        .note
        .clone()
        .expect("a note says what happened");
    assert!(note.contains("another model"), "{note}");
    let state = t.join("state");
    let stale = files_ending(&state, ".stale");
    assert_eq!(stale.len(), 3, "log, state and KV moved aside: {stale:?}");
    for s in &stale {
        assert!(note.contains(s.as_str()), "{note} names {s}");
    }
    let old_log = stale
        .iter()
        .find(|n| n.starts_with("session.log."))
        .unwrap();
    assert_eq!(
        log_tokens_of(&state.join(old_log)).0,
        2,
        "the old conversation is kept aside"
    );
    // The new session goes on with the new model and survives a restart.
    assert_eq!(prompt(&mut w, 3, "hello", 4), (4, 4));
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    let mut w = start(&t, &other, &[]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::State);
    assert_eq!((ready.session.turns, ready.session.note), (1, None));
}

/// Issue #17, 7: a restore that llama.cpp refuses is never permanent. Here the log names this
/// very model but holds a token id its vocabulary does not have, and the state is gone, so the
/// worker must re-prefill: it used to exit 69.
#[test]
fn a_session_llama_cpp_refuses_is_moved_aside_instead_of_failing_the_start() {
    let t = TestDir::new();
    let (ready, _, _) = restart_in(
        &t,
        &tiny_shape(),
        |state| {
            std::fs::remove_file(state.join("session.state")).unwrap();
            let log = std::fs::read_to_string(state.join("session.log")).unwrap();
            let mut lines: Vec<String> = log.lines().map(str::to_owned).collect();
            let last = lines.last_mut().unwrap();
            let mut turn: serde_json::Value = serde_json::from_str(last).unwrap();
            turn["tokens"][0] = 999_999.into();
            *last = turn.to_string();
            std::fs::write(state.join("session.log"), lines.join("\n") + "\n").unwrap();
        },
        None,
    );
    assert_eq!(ready.session.restored_from, RestoredFrom::New);
    let note = ready.session.note.expect("a note says what happened");
    assert!(note.contains("cannot be restored"), "{note}");
    assert_eq!(
        files_ending(&t.join("state"), ".stale").len(),
        2,
        "log and KV"
    );
}

#[test]
fn heartbeats_keep_coming_during_a_long_decode() {
    let t = TestDir::new();
    // Big enough that prefilling a long prompt takes well over a second on 2 cores.
    let shape = ModelShape {
        layers: 4,
        width: 512,
        ff: 1536,
        heads: 8,
        kv_heads: 8,
        vocab: 1024,
        context_length: 4096,
        f16: false,
        seed: 3,
    };
    let model = t.model("m.gguf", &shape);
    let mut w = start(
        &t,
        &model,
        &[
            "--heartbeat-interval",
            "100ms",
            "--ctx",
            "4096",
            "--threads",
            "1",
        ],
    );
    w.handshake();
    until_ready(&w);
    let text = "the quick brown fox jumps over the lazy dog ".repeat(60);
    let sent = Instant::now();
    w.send(&SupervisorMsg::Prompt(Prompt {
        id: 7,
        text,
        max_tokens: 1,
        ignore_eos: true,
        ..Prompt::default()
    }));
    let mut beats = Vec::new();
    let first_token = loop {
        match w.recv() {
            Some(WorkerMsg::Heartbeat(h)) => beats.push((Instant::now(), h.state)),
            Some(WorkerMsg::Token(_)) => break Instant::now(),
            other => panic!("unexpected {other:?}"),
        }
    };
    let decode = first_token - sent;
    assert!(
        decode > Duration::from_secs(1),
        "the decode took only {decode:?}: make the prompt longer"
    );
    // ~10 per second at 100 ms; allow a loaded machine half of that.
    let expected = decode.as_millis() as usize / 100;
    assert!(
        beats.len() * 2 >= expected,
        "{} heartbeats during a {decode:?} decode",
        beats.len()
    );
    assert!(
        beats
            .iter()
            .any(|(_, s)| *s == belljar_protocol::worker::WorkerState::Busy)
    );
    let gaps = beats
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    assert!(
        gaps < Duration::from_millis(600),
        "a {gaps:?} gap between heartbeats"
    );
}

#[test]
fn bad_frames_get_an_error_and_the_worker_keeps_serving() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &[]);
    w.handshake();
    until_ready(&w);
    // Malformed JSON in a well-formed frame.
    w.send_raw(&[0, 0, 0, 5, b'{', b'n', b'o', b'p', b'e']);
    assert!(
        matches!(w.recv_skip_heartbeats(), Some(WorkerMsg::Error(e)) if e.message.contains("malformed"))
    );
    // An oversized frame (2 MiB > 1 MiB limit).
    let mut big = (2u32 << 20).to_be_bytes().to_vec();
    big.extend(vec![b' '; 2 << 20]);
    w.send_raw(&big);
    assert!(
        matches!(w.recv_skip_heartbeats(), Some(WorkerMsg::Error(e)) if e.message.contains("exceeds the maximum"))
    );
    // A prompt longer than the context.
    w.send(&SupervisorMsg::Prompt(Prompt {
        id: 3,
        text: "x".into(),
        max_tokens: 100_000,
        ignore_eos: true,
        ..Prompt::default()
    }));
    assert!(
        matches!(w.recv_skip_heartbeats(), Some(WorkerMsg::Error(e)) if e.id == Some(3) && e.message.contains("exceeds ctx"))
    );
    assert_eq!(prompt(&mut w, 4, "still there?", 3), (3, 3));
}

#[test]
fn context_full_compacts_instead_of_failing() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &["--ctx", "64"]);
    w.handshake();
    let ctx = u64::from(until_ready(&w).ctx); // llama.cpp may round the context up
    let mut id = 0;
    while log_tokens(&t.join("state")).1 < 2 * ctx {
        assert_eq!(
            prompt(&mut w, id, "tell me more", 16),
            (16, 16),
            "turn {id}"
        );
        id += 1;
    }
    let (turns, _) = log_tokens(&t.join("state"));
    assert_eq!(turns, id, "every turn is in the log");
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    let mut w = start(&t, &model, &["--ctx", "64"]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::State);
    assert_eq!(ready.session.turns, turns);
    assert!(
        ready.session.tokens <= ctx,
        "the context holds only what fits"
    );
    assert!(ready.session.tokens >= 19, "the newest turn is kept");
}

#[test]
fn supervisor_gone_means_the_worker_exits() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &[]);
    w.handshake();
    until_ready(&w);
    w.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(w.wait().code(), Some(0));
}

// --- refusals and bad input: the message over the socket and the exit code class ---------------

/// Starts a worker that is expected to fail after the handshake; returns (Failed/Refused, code).
fn failing(model: &Path, extra: &[&str], welcome_version: Option<u32>) -> (WorkerMsg, i32) {
    let t = TestDir::new();
    let mut w = start(&t, model, extra);
    match welcome_version {
        Some(v) => {
            assert!(matches!(w.recv(), Some(WorkerMsg::Hello(_))));
            w.send(&SupervisorMsg::Welcome(Welcome {
                protocol_version: v,
            }));
        }
        None => {
            w.handshake();
        }
    }
    let msg = loop {
        match w.recv() {
            Some(m @ (WorkerMsg::Failed(_) | WorkerMsg::Refused(_))) => break m,
            Some(WorkerMsg::Heartbeat(_) | WorkerMsg::Loading(_)) => {}
            other => panic!(
                "expected Failed/Refused, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    };
    let code = w.wait().code().expect("exited, not killed");
    assert!(!w.stderr().contains("panicked"), "{}", w.stderr());
    (msg, code)
}

#[track_caller]
fn expect_failed(m: &WorkerMsg, code: i32, expected_code: i32, needle: &str) {
    let WorkerMsg::Failed(f) = m else {
        panic!("expected Failed, got {m:?}")
    };
    assert_eq!(code, expected_code, "{f:?}");
    assert_eq!(i32::from(f.exit_code), expected_code);
    assert!(f.permanent(), "retrying cannot help: {f:?}");
    assert!(
        f.reason.contains(needle),
        "{:?} should mention {needle:?}",
        f.reason
    );
}

#[test]
fn bad_model_missing() {
    let t = TestDir::new();
    let (m, code) = failing(&t.join("none.gguf"), &[], None);
    expect_failed(&m, code, 65, "does not exist");
}

#[test]
fn bad_model_not_gguf() {
    let t = TestDir::new();
    let junk = t.write("junk.gguf", "definitely not a model");
    let (m, code) = failing(&junk, &[], None);
    expect_failed(&m, code, 65, "not a GGUF file");
}

#[test]
fn bad_model_truncated() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (m, code) = failing(&model, &[], None);
    expect_failed(&m, code, 65, "truncated");
}

#[test]
fn bad_model_unsupported_architecture() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut bytes = std::fs::read(&model).unwrap();
    // general.architecture = "llama" -> "llamz": same length, unknown to llama.cpp.
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let at = at
        + bytes[at + 5..]
            .windows(5)
            .position(|w| w == b"llama")
            .unwrap()
        + 5;
    bytes[at + 4] = b'z';
    std::fs::write(&model, bytes).unwrap();
    let (m, code) = failing(&model, &[], None);
    expect_failed(&m, code, 69, "cannot load");
}

#[test]
fn bad_ctx_zero() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let (m, code) = failing(&model, &["--ctx", "0"], None);
    expect_failed(&m, code, 64, "ctx 0");
}

#[test]
fn protocol_mismatch_is_permanent() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let (m, code) = failing(&model, &[], Some(999));
    expect_failed(&m, code, 76, "protocol mismatch");
}

#[test]
fn precheck_refusal_is_temporary_and_loads_nothing() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let (m, code) = failing(&model, &["--required", "1T"], None);
    let WorkerMsg::Refused(r) = m else {
        panic!("expected Refused, got {m:?}")
    };
    assert_eq!(code, 75);
    assert_eq!(r.required, 1 << 40);
    assert!(r.reason.contains("short by"), "{}", r.reason);
}

/// The supervisor's way: one end of a socketpair inherited as `--fd N`.
#[test]
fn inherited_socketpair_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;

    use belljar_protocol::{FrameReader, MAX_FRAME, PROTOCOL_VERSION, decode, write_frame};

    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(belljar_testkit::bin("worker"));
    cmd.args([
        "serve",
        "--fd",
        &fd.to_string(),
        "--instance",
        "subject",
        "--model",
    ])
    .arg(&model)
    .arg("--state-dir")
    .arg(t.join("state"));
    // SAFETY: only fcntl (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let borrowed = std::os::fd::BorrowedFd::borrow_raw(fd);
            nix::fcntl::fcntl(
                borrowed,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(drop)
            .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let mut frames = FrameReader::new(ours.try_clone().unwrap(), MAX_FRAME);
    let hello: WorkerMsg = decode(&frames.read_frame().unwrap().unwrap()).unwrap();
    assert!(
        matches!(hello, WorkerMsg::Hello(ref h) if h.instance == "subject" && h.pid == child.id())
    );
    write_frame(
        &mut ours,
        &SupervisorMsg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
        }),
    )
    .unwrap();
    loop {
        match decode::<WorkerMsg>(&frames.read_frame().unwrap().unwrap()).unwrap() {
            WorkerMsg::Ready(_) => break,
            WorkerMsg::Loading(_) | WorkerMsg::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    write_frame(&mut ours, &SupervisorMsg::Shutdown(Shutdown {})).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Under critical pressure an idle worker frees its context; the next prompt reloads it from
/// the saved session and the conversation goes on.
#[test]
fn critical_pressure_frees_the_context_and_the_next_prompt_restores_it() {
    use belljar_protocol::worker::{Level, PressureNotice};
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &[]);
    w.handshake();
    until_ready(&w);
    assert_eq!(prompt(&mut w, 1, "first", 4), (4, 4));
    w.send(&SupervisorMsg::Pressure(PressureNotice {
        level: Level::Critical,
    }));
    assert_eq!(
        prompt(&mut w, 2, "second", 4),
        (4, 4),
        "served after the reload"
    );
    let (turns, _) = log_tokens(&t.join("state"));
    assert_eq!(turns, 2);
    assert!(w.stderr().contains("freed the context"), "{}", w.stderr());
    assert!(w.stderr().contains("context reloaded"), "{}", w.stderr());
    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
    assert_eq!(w.wait().code(), Some(0));
}

/// The metadata of `session.state` (`BJSESS02`, a little-endian u32 length, JSON).
fn state_meta(state: &Path) -> serde_json::Value {
    let bytes = std::fs::read(state.join("session.state")).unwrap();
    assert_eq!(&bytes[..8], b"BJSESS02");
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[12..12 + len]).unwrap()
}

/// Issue #17, 11: a reply cut off by Shutdown is answered with an error, so it is not part of
/// the conversation: not in the log, not in the saved context. It used to be logged as a turn.
#[test]
fn a_reply_cut_off_by_shutdown_is_not_kept() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let state = t.join("state");
    let mut w = start(&t, &model, &["--ctx", "2048"]);
    w.handshake();
    until_ready(&w);
    assert_eq!(prompt(&mut w, 1, "a whole turn", 8), (8, 8));
    let saved = state_meta(&state);
    w.send(&SupervisorMsg::Prompt(Prompt {
        id: 2,
        text: "a long one".into(),
        max_tokens: 2000,
        ignore_eos: true,
        // Raw: through the (ChatML fallback) template the prompt would not fit beside 2000.
        raw: true,
        ..Prompt::default()
    }));
    let mut streamed = 0;
    let error = loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(t)) => {
                assert_eq!(t.id, 2);
                if streamed == 0 {
                    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
                }
                streamed += 1;
            }
            Some(WorkerMsg::Error(e)) => break e,
            other => panic!("expected Token/Error, got {other:?}"),
        }
    };
    assert_eq!(error.id, Some(2));
    assert!(streamed < 2000, "cut off: {streamed} tokens");
    assert!(error.message.contains("not kept"), "{}", error.message);
    assert_eq!(w.wait().code(), Some(0));
    drop(w);
    assert_eq!(
        log_tokens(&state).0,
        1,
        "only the finished turn is in the log"
    );
    assert_eq!(
        state_meta(&state),
        saved,
        "the saved context is the finished turn's"
    );
    let mut w = start(&t, &model, &["--ctx", "2048"]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::State);
    assert_eq!(
        (ready.session.turns, ready.session.tokens),
        log_tokens(&state)
    );
}

/// Issue #17, 13: a kill during a save leaves `.session.kv.tmp` (20 MB on a real model) and
/// `.session.state.tmp` behind; they used to stay forever, even across clean shutdowns.
#[test]
fn temp_files_left_by_a_kill_are_removed_and_a_clean_shutdown_leaves_none() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let state = t.join("state");
    let mut w = start(&t, &model, &[]);
    w.handshake();
    until_ready(&w);
    prompt(&mut w, 1, "first", 4);
    w.child.kill().unwrap();
    w.wait();
    drop(w);
    std::fs::write(state.join(".session.kv.tmp"), vec![0u8; 20 << 20]).unwrap();
    std::fs::write(state.join(".session.state.tmp"), b"BJSESS02").unwrap();
    let mut w = start(&t, &model, &[]);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::State);
    assert_eq!(files_ending(&state, ".tmp"), Vec::<String>::new());
    prompt(&mut w, 2, "second", 4);
    w.send(&SupervisorMsg::Shutdown(Shutdown {}));
    assert_eq!(w.wait().code(), Some(0));
    assert_eq!(files_ending(&state, ".tmp"), Vec::<String>::new());
}

/// Issue #17, 9 (the worker's part): a kill between a turn's log append and its state save
/// (`--fault after-log-append:N`, the test aid behind BELLJAR_FAULT) left a state one turn
/// behind the log, so every later start re-prefilled the whole conversation: the repaired state
/// was never written back. It is now written back right after the re-prefill (the daemon test
/// `failures::a_kill_between_log_append_and_state_save_comes_back_ready` shows the progress).
#[test]
fn a_kill_between_log_append_and_state_save_is_repaired_once() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let state = t.join("state");
    let args = ["--ctx", "2048", "--fault", "after-log-append:3"];
    let mut w = start(&t, &model, &args);
    w.handshake();
    until_ready(&w);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(5);
    prompt(&mut w, 1, &long, 8);
    prompt(&mut w, 2, &long, 8);
    w.send(&SupervisorMsg::Prompt(Prompt {
        id: 3,
        text: long.clone(),
        max_tokens: 8,
        ignore_eos: true,
        ..Prompt::default()
    }));
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(_)) => {}
            None => break,
            other => panic!("expected the worker to die after the log append, got {other:?}"),
        }
    }
    assert_eq!(w.wait().signal(), Some(9), "{}", w.stderr());
    drop(w);
    let (turns, tokens) = log_tokens(&state);
    assert_eq!(turns, 3, "the turn is in the log");
    assert_eq!(
        state_meta(&state)["turns"],
        2,
        "the state is one turn behind"
    );

    let mut w = start(&t, &model, &args);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(ready.session.restored_from, RestoredFrom::Log);
    assert_eq!((ready.session.turns, ready.session.tokens), (turns, tokens));
    let meta = state_meta(&state);
    assert_eq!(meta["turns"], 3, "the re-prefilled state was written back");
    assert_eq!(meta["tokens"].as_array().unwrap().len() as u64, tokens);
    w.child.kill().unwrap();
    w.wait();
    drop(w);

    let mut w = start(&t, &model, &args);
    w.handshake();
    let ready = until_ready(&w);
    assert_eq!(
        ready.session.restored_from,
        RestoredFrom::State,
        "no second re-prefill"
    );
}

// --- requests outside the session, sampling, stop texts, Cancel (protocol 2) -------------------

use belljar_protocol::worker::{
    Cancel, ChatMessage, Done, ErrorKind, ErrorReply, Finish, PromptMode, Sampling,
};

/// What a request got: the streamed text, the number of Token frames, and its Done.
#[derive(Debug)]
struct Reply {
    text: String,
    frames: usize,
    done: Done,
}

/// Sends `p` and collects its reply (Tokens then Done), or its Error.
#[track_caller]
fn request(w: &mut WorkerLink, p: Prompt) -> Result<Reply, ErrorReply> {
    let id = p.id;
    w.send(&SupervisorMsg::Prompt(p));
    collect(w, id)
}

/// The reply to request `id`, which was already sent.
#[track_caller]
fn collect(w: &WorkerLink, id: u64) -> Result<Reply, ErrorReply> {
    let mut text = String::new();
    let mut frames = 0;
    loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(t)) if t.id == id => {
                text.push_str(&t.text);
                frames += 1;
            }
            Some(WorkerMsg::Done(done)) if done.id == id => {
                return Ok(Reply { text, frames, done });
            }
            Some(WorkerMsg::Error(e)) if e.id == Some(id) => return Err(e),
            other => panic!(
                "expected Token/Done/Error for {id}, got {other:?}; stderr:\n{}",
                w.stderr()
            ),
        }
    }
}

fn completion(id: u64, text: &str, max_tokens: u32) -> Prompt {
    Prompt {
        id,
        mode: PromptMode::Completion,
        text: text.into(),
        max_tokens,
        ignore_eos: true,
        ..Prompt::default()
    }
}

fn turn(id: u64, text: &str, max_tokens: u32) -> Prompt {
    Prompt {
        id,
        text: text.into(),
        max_tokens,
        ignore_eos: true,
        ..Prompt::default()
    }
}

fn chat(id: u64, messages: &[(&str, &str)], max_tokens: u32) -> Prompt {
    Prompt {
        id,
        mode: PromptMode::Chat,
        messages: messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect(),
        max_tokens,
        ignore_eos: true,
        ..Prompt::default()
    }
}

/// A started, ready worker on the tiny generated model (one thread: tests run side by side).
fn ready_worker(t: &TestDir, extra: &[&str]) -> WorkerLink {
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(t, &model, &[extra, &["--threads", "1"]].concat());
    w.handshake();
    until_ready(&w);
    w
}

#[test]
fn completion_and_chat_are_served_outside_the_session() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = start(&t, &model, &["--ctx", "128", "--threads", "1"]);
    w.handshake();
    let ctx = until_ready(&w).ctx; // llama.cpp may round the context up
    let r = request(&mut w, completion(1, "once upon a time", 8)).unwrap();
    assert_eq!((r.frames, r.done.tokens), (8, 8), "one Token per token");
    assert_eq!(r.done.finish, Finish::Length, "max_tokens ran out");
    assert!(r.done.prompt_tokens > 0, "{:?}", r.done);

    let c = request(
        &mut w,
        chat(
            2,
            &[("system", "be brief"), ("user", "once upon a time")],
            8,
        ),
    )
    .unwrap();
    assert_eq!(c.done.tokens, 8);
    assert_eq!(c.done.finish, Finish::Length);
    assert!(
        c.done.prompt_tokens > r.done.prompt_tokens,
        "the rendered chat is longer than its text: {:?} vs {:?}",
        c.done,
        r.done
    );
    // Without ignore_eos a chat ends at the model's end of turn or at max_tokens.
    let free = request(
        &mut w,
        Prompt {
            ignore_eos: false,
            ..chat(3, &[("user", "hi")], 8)
        },
    )
    .unwrap();
    assert!(free.done.tokens <= 8);
    assert_eq!(
        free.done.finish,
        if free.done.tokens < 8 {
            Finish::Stop
        } else {
            Finish::Length
        }
    );

    // max_tokens is clamped to what the context has left after the prompt.
    let long = request(&mut w, completion(4, "once upon a time", 100_000)).unwrap();
    assert_eq!(long.done.finish, Finish::Length);
    assert_eq!(
        long.done.prompt_tokens + long.done.tokens,
        ctx,
        "the context is used to its end: {:?}",
        long.done
    );
    assert!(
        !t.join("state").join("session.log").exists(),
        "nothing logged"
    );
    assert_eq!(log_tokens(&t.join("state")), (0, 0));
}

#[test]
fn a_stop_text_ends_the_reply_before_it() {
    let t = TestDir::new();
    let mut w = ready_worker(&t, &[]);
    let first = request(&mut w, completion(1, "the quick brown fox", 48)).unwrap();
    let chars: Vec<char> = first.text.chars().collect();
    assert!(chars.len() >= 12, "{:?}", first.text);
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 3].iter().collect();
    let expected = &first.text[..first.text.find(&stop).unwrap()];

    let stopped = request(
        &mut w,
        Prompt {
            stop: vec!["never in this reply \u{1}".into(), stop.clone()],
            ..completion(2, "the quick brown fox", 48)
        },
    )
    .unwrap();
    assert_eq!(stopped.text, expected, "stop text {stop:?}");
    assert_eq!(stopped.done.finish, Finish::Stop);
    assert!(stopped.done.tokens < 48, "{:?}", stopped.done);

    // A session turn: the logged reply is the text before the stop text.
    let t2 = TestDir::new();
    let mut s = ready_worker(&t2, &[]);
    let plain = request(&mut s, turn(1, "the quick brown fox", 48)).unwrap();
    drop(s);
    let chars: Vec<char> = plain.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected = &plain.text[..plain.text.find(&stop).unwrap()];
    let t3 = TestDir::new();
    let mut s = ready_worker(&t3, &[]);
    let cut = request(
        &mut s,
        Prompt {
            stop: vec![stop.clone()],
            ..turn(1, "the quick brown fox", 48)
        },
    )
    .unwrap();
    assert_eq!(cut.text, expected);
    assert_eq!(cut.done.finish, Finish::Stop);
    let log = std::fs::read_to_string(t3.join("state").join("session.log")).unwrap();
    let logged: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(
        logged["reply"], expected,
        "the logged reply has no stop text"
    );
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_greedy_is_unchanged() {
    let t = TestDir::new();
    let mut w = ready_worker(&t, &[]);
    let sampled = |seed: u32| Prompt {
        sampling: Sampling {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.01,
            seed: Some(seed),
            repeat_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..Sampling::default()
        },
        ..completion(0, "the quick brown fox", 32)
    };
    let a = request(
        &mut w,
        Prompt {
            id: 1,
            ..sampled(42)
        },
    )
    .unwrap();
    let b = request(
        &mut w,
        Prompt {
            id: 2,
            ..sampled(42)
        },
    )
    .unwrap();
    let c = request(
        &mut w,
        Prompt {
            id: 3,
            ..sampled(43)
        },
    )
    .unwrap();
    assert_eq!(a.text, b.text, "the same seed gives the same text");
    assert_ne!(a.text, c.text, "another seed another text");
    let greedy = request(&mut w, completion(4, "the quick brown fox", 32)).unwrap();
    let again = request(&mut w, completion(5, "the quick brown fox", 32)).unwrap();
    assert_eq!(greedy.text, again.text);
    assert_ne!(greedy.text, a.text);
    // Sampling from the one most likely token is greedy: the chain is really applied.
    let top1 = request(
        &mut w,
        Prompt {
            sampling: Sampling {
                temperature: 0.8,
                top_k: 1,
                seed: Some(7),
                ..Sampling::default()
            },
            ..completion(6, "the quick brown fox", 32)
        },
    )
    .unwrap();
    assert_eq!(top1.text, greedy.text);
    // A raw session turn at the default (greedy) is what a completion of the same text gives:
    // the session's first turn is the same tokens in an empty context.
    let raw = Prompt {
        raw: true,
        ..turn(7, "the quick brown fox", 32)
    };
    let session = request(&mut w, raw).unwrap();
    assert_eq!(session.text, greedy.text);
}

/// A completion between two session turns does not change the session: the second turn's reply
/// is what it is without the completion (greedy makes that exact), and the session comes back
/// from its saved state.
#[test]
fn a_request_outside_the_session_leaves_the_session_as_it_was() {
    let turns = [
        "first turn",
        "second turn",
        "third turn",
        "fourth turn",
        "fifth turn",
    ];
    let run = |outside: bool| {
        let t = TestDir::new();
        let model = t.model("m.gguf", &tiny_shape());
        let mut w = WorkerLink::start_with_env(
            t.path(),
            "subject",
            &model,
            &t.join("state"),
            &["--threads", "1"],
            &[("RUST_LOG", "info")],
        );
        w.handshake();
        until_ready(&w);
        let mut replies = Vec::new();
        for (i, text) in turns.iter().enumerate() {
            replies.push(request(&mut w, turn(i as u64 * 10, text, 16)).unwrap().text);
            if outside {
                request(&mut w, completion(i as u64 * 10 + 1, "something else", 16)).unwrap();
                request(&mut w, chat(i as u64 * 10 + 2, &[("user", "more")], 16)).unwrap();
            }
        }
        let log = log_tokens(&t.join("state"));
        let stderr = w.stderr();
        w.send(&SupervisorMsg::Shutdown(Shutdown {}));
        assert_eq!(w.wait().code(), Some(0));
        (replies, log, stderr)
    };
    let (with, log_with, stderr) = run(true);
    let (without, log_without, _) = run(false);
    assert_eq!(
        with, without,
        "the session goes on as if nothing came between"
    );
    assert_eq!(log_with, log_without);
    assert_eq!(log_with.0, turns.len() as u64);
    let restores: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("session restored from state after a request outside it"))
        .collect();
    assert_eq!(restores.len(), turns.len() - 1, "{stderr}");
    for r in restores {
        eprintln!("{r}");
    }
}

/// The restore after a request outside the session, timed for a 10-turn session.
#[test]
fn a_ten_turn_session_comes_back_after_a_completion() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let mut w = WorkerLink::start_with_env(
        t.path(),
        "subject",
        &model,
        &t.join("state"),
        &["--ctx", "2048", "--threads", "1"],
        &[("RUST_LOG", "info")],
    );
    w.handshake();
    until_ready(&w);
    for i in 0..10 {
        request(&mut w, turn(i, "tell me a little more about it", 32)).unwrap();
    }
    request(&mut w, completion(100, "something else", 16)).unwrap();
    let sent = Instant::now();
    let r = request(&mut w, turn(11, "and then?", 1)).unwrap();
    let turn_ms = sent.elapsed().as_millis();
    assert_eq!(r.done.tokens, 1);
    let stderr = w.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("after a request outside it"))
        .unwrap_or_else(|| panic!("no restore logged: {stderr}"));
    assert!(line.contains("10 turns"), "{line}");
    eprintln!("{line} (the whole turn took {turn_ms} ms)");
    assert_eq!(log_tokens(&t.join("state")).0, 11);
}

#[test]
fn cancel_stops_the_request_and_the_worker_serves_on() {
    let t = TestDir::new();
    let state = t.join("state");
    let mut w = ready_worker(&t, &["--ctx", "4096"]);
    request(&mut w, turn(1, "a whole turn", 8)).unwrap();
    let saved = state_meta(&state);
    // Cancel when idle, and of an unknown id: ignored, no reply.
    w.send(&SupervisorMsg::Cancel(Cancel { id: 1 }));
    w.send(&SupervisorMsg::Cancel(Cancel { id: 99 }));

    // A long session turn, cancelled after a few tokens; a queued request is cancelled too.
    w.send(&SupervisorMsg::Prompt(turn(2, "a long one", 4000)));
    let mut streamed = 0;
    let mut queued_done = None;
    let done = loop {
        match w.recv_skip_heartbeats() {
            Some(WorkerMsg::Token(tok)) => {
                assert_eq!(tok.id, 2);
                streamed += 1;
                if streamed == 1 {
                    w.send(&SupervisorMsg::Prompt(turn(3, "queued", 8)));
                    w.send(&SupervisorMsg::Cancel(Cancel { id: 3 }));
                }
                if streamed == 3 {
                    w.send(&SupervisorMsg::Cancel(Cancel { id: 2 }));
                }
            }
            Some(WorkerMsg::Done(d)) if d.id == 3 => queued_done = Some(d),
            Some(WorkerMsg::Done(d)) if d.id == 2 => break d,
            other => panic!("expected Token/Done, got {other:?}; {}", w.stderr()),
        }
    };
    assert_eq!(done.finish, Finish::Cancelled);
    assert!(done.tokens >= 3 && done.tokens < 2000, "{done:?}");
    assert_eq!(done.tokens as usize, streamed);
    let queued = queued_done.expect("the queued request was answered");
    assert_eq!((queued.finish, queued.tokens), (Finish::Cancelled, 0));

    // A cancelled completion.
    w.send(&SupervisorMsg::Prompt(completion(4, "a long one", 4000)));
    let Some(WorkerMsg::Token(_)) = w.recv_skip_heartbeats() else {
        panic!("expected a Token")
    };
    w.send(&SupervisorMsg::Cancel(Cancel { id: 4 }));
    let r = collect(&w, 4).unwrap();
    assert_eq!(r.done.finish, Finish::Cancelled);
    assert!(r.done.tokens < 2000, "{:?}", r.done);

    // The worker serves on; the cancelled turn is in neither the log nor the saved context.
    assert_eq!(log_tokens(&state).0, 1);
    assert_eq!(state_meta(&state), saved);
    let next = request(&mut w, turn(5, "next", 4)).unwrap();
    assert_eq!((next.done.tokens, next.done.finish), (4, Finish::Length));
    assert_eq!(log_tokens(&state).0, 2);
    let log = std::fs::read_to_string(state.join("session.log")).unwrap();
    assert!(!log.contains("a long one"), "{log}");
}

#[test]
fn bad_requests_are_invalid_and_the_worker_keeps_serving() {
    let t = TestDir::new();
    let mut w = ready_worker(&t, &["--ctx", "64"]);
    let hot = Sampling {
        temperature: 5.0,
        ..Sampling::default()
    };
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let cases: Vec<(Prompt, &str)> = vec![
        (
            Prompt {
                sampling: hot,
                ..completion(0, "hi", 4)
            },
            "temperature",
        ),
        (
            Prompt {
                sampling: hot,
                ..turn(0, "hi", 4)
            },
            "temperature",
        ),
        (
            Prompt {
                sampling: Sampling {
                    repeat_penalty: 0.0,
                    ..Sampling::default()
                },
                ..completion(0, "hi", 4)
            },
            "repeat_penalty",
        ),
        (
            Prompt {
                stop: vec!["a".into(); 5],
                ..completion(0, "hi", 4)
            },
            "at most 4",
        ),
        (
            Prompt {
                stop: vec!["a".repeat(300)],
                ..turn(0, "hi", 4)
            },
            "256",
        ),
        (completion(0, &long, 4), "shorten the prompt"),
        (chat(0, &[("user", &long)], 4), "shorten the prompt"),
        (turn(0, &long, 4), "exceeds ctx"),
        (turn(0, "hi", 1000), "exceeds ctx"),
        (completion(0, "", 4), "empty prompt"),
        (turn(0, "", 4), "empty prompt"),
        (chat(0, &[], 4), "no messages"),
        (chat(0, &[("wizard", "hi")], 4), "role"),
        (
            Prompt {
                text: "hi".into(),
                ..chat(0, &[("user", "hi")], 4)
            },
            "messages",
        ),
    ];
    for (i, (p, needle)) in cases.into_iter().enumerate() {
        let id = 100 + i as u64;
        let e = request(&mut w, Prompt { id, ..p }).expect_err(needle);
        assert_eq!(e.kind, ErrorKind::Invalid, "{e:?}");
        assert!(e.message.contains(needle), "case {i}: {e:?}");
    }
    let r = request(&mut w, turn(1, "still there?", 4)).unwrap();
    assert_eq!(r.done.tokens, 4);
    assert_eq!(log_tokens(&t.join("state")).0, 1);
    assert!(!w.stderr().contains("panicked"), "{}", w.stderr());
}

/// Issue [chat]: a request keeps the longest prefix of its tokens that the context holds, and
/// the reply does not depend on it (greedy: the same with and without reuse); `fresh` reuses
/// nothing; a different start reuses only the common part.
#[test]
fn prompt_prefix_reuse_counts_cached_tokens_and_changes_no_reply() {
    let t = TestDir::new();
    let mut w = ready_worker(&t, &[]);
    let greedy = |id, text: &str| Prompt {
        ignore_eos: true,
        ..completion(id, text, 8)
    };
    let first = request(&mut w, greedy(1, "the quick brown fox jumps")).unwrap();
    assert_eq!(
        first.done.cached_tokens, 0,
        "an empty context reuses nothing"
    );
    let n = first.done.prompt_tokens;
    assert!(n > 2, "{first:?}");
    let again = request(&mut w, greedy(2, "the quick brown fox jumps")).unwrap();
    assert_eq!(
        again.done.cached_tokens,
        n - 1,
        "all but the last prompt token are reused (its logits start the reply)"
    );
    assert_eq!(
        again.text, first.text,
        "reuse does not change a greedy reply"
    );
    // The prompt plus the reply is in the context: a continuation of both reuses both.
    let longer = format!("the quick brown fox jumps{} over", first.text);
    let cont = request(&mut w, greedy(3, &longer)).unwrap();
    assert!(
        cont.done.cached_tokens >= n,
        "the earlier prompt is reused: {:?}",
        cont.done
    );
    let fresh = request(
        &mut w,
        Prompt {
            fresh: true,
            ..greedy(4, &longer)
        },
    )
    .unwrap();
    assert_eq!(fresh.done.cached_tokens, 0);
    assert_eq!(fresh.text, cont.text, "fresh or reused, the same reply");
    let other = request(&mut w, greedy(5, "a slow green turtle")).unwrap();
    assert!(
        other.done.cached_tokens <= 1,
        "only a BOS can be shared: {:?}",
        other.done
    );
}

/// Issue [chat]: a chat resent with one more turn reuses every earlier turn, reply included;
/// session turns report the conversation before them as cached.
#[test]
fn a_resent_chat_and_session_turns_reuse_the_earlier_turns() {
    let t = TestDir::new();
    let mut w = ready_worker(&t, &[]);
    let one = request(&mut w, chat(1, &[("user", "hello there")], 6)).unwrap();
    assert_eq!(one.done.cached_tokens, 0);
    let two = request(
        &mut w,
        chat(
            2,
            &[
                ("user", "hello there"),
                ("assistant", &one.text),
                ("user", "and again"),
            ],
            6,
        ),
    )
    .unwrap();
    // The reply's text may tokenize differently from the tokens generated (random weights):
    // at least the whole first prompt is reused.
    assert!(
        two.done.cached_tokens >= one.done.prompt_tokens,
        "{:?} after {:?}",
        two.done,
        one.done
    );
    let a = request(&mut w, turn(3, "first turn", 4)).unwrap();
    let b = request(&mut w, turn(4, "second turn", 4)).unwrap();
    assert_eq!(a.done.cached_tokens, 0, "a new session's first turn");
    assert_eq!(
        b.done.cached_tokens,
        a.done.prompt_tokens + a.done.tokens,
        "the second turn evaluates only itself"
    );
}

/// Issue [chat]: `--chat-template` takes a built-in or a file; a template's
/// `raise_exception` fails the request as invalid with its words, and the worker goes on.
#[test]
fn a_chat_template_from_a_file_renders_and_its_exceptions_are_invalid_requests() {
    let t = TestDir::new();
    let file = t.write(
        "t.jinja",
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages, please') }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    );
    let mut w = ready_worker(&t, &["--chat-template", file.to_str().unwrap()]);
    let ok = request(&mut w, chat(1, &[("user", "hi")], 4)).unwrap();
    let whole = request(&mut w, completion(2, "[user] hi\n[assistant] ", 4)).unwrap();
    assert_eq!(
        ok.done.prompt_tokens, whole.done.prompt_tokens,
        "the chat renders to the template's text"
    );
    let e = request(&mut w, chat(3, &[("system", "x"), ("user", "hi")], 4)).unwrap_err();
    assert_eq!(e.kind, belljar_protocol::worker::ErrorKind::Invalid);
    assert!(
        e.message.contains("no system messages, please"),
        "{}",
        e.message
    );
    request(&mut w, chat(4, &[("user", "still here")], 2)).unwrap();
}

/// Issue [chat]: a bad `--chat-template` stops the start before the model loads.
#[test]
fn a_bad_chat_template_is_a_usage_error() {
    let t = TestDir::new();
    let model = t.model("m.gguf", &tiny_shape());
    let bad = t.write("bad.jinja", "{% for m in %}");
    for (arg, needle) in [
        ("nope", "not a built-in"),
        (bad.to_str().unwrap(), "bad.jinja"),
        ("/nonexistent/t.jinja", "does not exist"),
    ] {
        let (m, code) = failing(&model, &["--chat-template", arg], None);
        expect_failed(&m, code, 64, needle);
    }
}
