//! [swap] through the loop's seams on tokio's paused clock: on-demand loads, evictions by the
//! one ordering, `min_loaded`, pinned and busy instances, idle unloads and the two races.

use std::time::Duration;

use belljar_host::proc_ctl::Exit;
use belljar_protocol::control::Response;
use belljar_protocol::worker::{Done, SupervisorMsg, Token, WorkerMsg};
use tokio::time::Instant;

use super::tests::{FakeWorker, Harness, ask, instance};

const MIB: u64 = 1 << 20;

/// Instances a, b and c loaded on demand with `keys`; mode m has them all. Each is admitted
/// with 64 MiB, so a budget of 150 MiB holds two of them.
fn config(keys: &str, pinned_a: bool) -> String {
    let a = if pinned_a { "pinned = true\n" } else { "" };
    format!(
        "[defaults]\nmodel = \"m.gguf\"\nheartbeat_interval = \"1h\"\nload = \"on-demand\"\n{keys}\n\
         [instances.a]\n{a}[instances.b]\n[instances.c]\n\
         [modes.m]\ninstances = [\"a\", \"b\", \"c\"]\n[pressure]\nenabled = false\n"
    )
}

/// Serves the next prompt: one token, then done.
async fn serve(w: &mut FakeWorker) {
    let SupervisorMsg::Prompt(p) = w.receive().await else {
        panic!("expected a prompt");
    };
    answer(w, p.id).await;
}

async fn answer(w: &mut FakeWorker, id: u64) {
    w.send(&WorkerMsg::Token(Token {
        id,
        text: "ok".into(),
    }))
    .await;
    w.send(&WorkerMsg::Done(Done {
        id,
        tokens: 1,
        ms: 1,
        ..Done::default()
    }))
    .await;
}

fn answered(got: &[Response]) -> bool {
    matches!(got.last(), Some(Response::Done(_)))
}

/// A request in the background.
fn spawn_ask(h: &Harness, name: &'static str) -> tokio::task::JoinHandle<Vec<Response>> {
    let socket = h.socket.clone();
    tokio::spawn(async move { ask(&socket, name).await })
}

/// The next run, which must be `name`'s, greeted and ready.
async fn loads(h: &mut Harness, name: &str) -> FakeWorker {
    let (n, mut w) = h.next_worker().await;
    assert_eq!(n, name, "the run that started");
    w.ready().await;
    w
}

/// Waits for the worker's Shutdown (the eviction), then its process exits and its cgroup goes.
async fn evicted(h: &Harness, mut w: FakeWorker, name: &str) {
    loop {
        match w.receive().await {
            SupervisorMsg::Shutdown(_) => break,
            SupervisorMsg::Prompt(p) => panic!("{name} got a prompt ({}) while a victim", p.id),
            _ => {}
        }
    }
    h.exit(&w, name, Exit::Code(0)).await;
}

/// Nothing arrives on the worker's link for `d` (the paused clock moves).
async fn quiet(w: &mut FakeWorker, d: Duration) {
    if let Ok(msg) = tokio::time::timeout(d, w.receive()).await {
        panic!("expected nothing, got {msg:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_on_demand_instance_loads_with_its_first_request_and_unloads_when_idle() {
    let mut h = Harness::start_with(&config("idle_unload = \"10s\"", false), 1 << 30);
    let s = h.status().await;
    for n in ["a", "b", "c"] {
        let i = instance(&s, n);
        assert_eq!((i.state.as_str(), i.allocated, i.loads), ("unloaded", 0, 0));
        assert_eq!(i.load, "on-demand");
    }
    assert!(h.runs.try_recv().is_err(), "nothing loads before a request");
    let client = spawn_ask(&h, "a");
    let mut a = loads(&mut h, "a").await;
    serve(&mut a).await;
    let done = Instant::now();
    assert!(answered(&client.await.unwrap()));
    let s = h.status().await;
    let i = instance(&s, "a");
    assert_eq!(
        (i.state.as_str(), i.loads, i.allocated),
        ("ready", 1, 64 * MIB)
    );
    // Idle for idle_unload: unloaded, its memory back.
    evicted(&h, a, "a").await;
    let idle = done.elapsed();
    assert!(
        idle >= Duration::from_secs(10) && idle < Duration::from_millis(10_100),
        "unloaded after {idle:?} idle, expected 10 s"
    );
    let s = h.status().await;
    let i = instance(&s, "a");
    assert_eq!(
        (i.state.as_str(), i.allocated, i.evictions),
        ("unloaded", 0, 0)
    );
    assert!(i.reason.contains("idle_unload"), "{}", i.reason);
    assert_eq!(s.budget.allocated, 0);
    h.stop(vec![]).await;
}

#[tokio::test(start_paused = true)]
async fn idle_unload_never_keeps_it_and_a_pinned_one_stays_too() {
    for keys in [
        "idle_unload = \"never\"",
        "idle_unload = \"1s\"\npinned = true",
    ] {
        let mut h = Harness::start_with(&config(keys, false), 1 << 30);
        let client = spawn_ask(&h, "b");
        let mut b = loads(&mut h, "b").await;
        serve(&mut b).await;
        assert!(answered(&client.await.unwrap()));
        quiet(&mut b, Duration::from_secs(3000)).await;
        assert_eq!(instance(&h.status().await, "b").state, "ready", "{keys}");
        h.stop(vec![("b".into(), b)]).await;
    }
}

/// With room for two, a third waits out `min_loaded` of the loaded ones, then evicts the least
/// recently used; the victim's cgroup is gone before the newcomer's run exists.
#[tokio::test(start_paused = true)]
async fn a_load_evicts_the_least_recently_used_once_min_loaded_has_passed() {
    let mut h = Harness::start_with(
        &config("min_loaded = \"5s\"\nidle_unload = \"never\"", false),
        150 * MIB,
    );
    let client = spawn_ask(&h, "a");
    let mut a = loads(&mut h, "a").await;
    let a_loaded = Instant::now();
    serve(&mut a).await;
    assert!(answered(&client.await.unwrap()));
    let client = spawn_ask(&h, "b");
    let mut b = loads(&mut h, "b").await;
    serve(&mut b).await;
    assert!(answered(&client.await.unwrap()));
    // c needs room: both were loaded less than 5 s ago.
    let client = spawn_ask(&h, "c");
    while !instance(&h.status().await, "c")
        .reason
        .contains("min_loaded")
    {
        tokio::task::yield_now().await;
    }
    assert_eq!(instance(&h.status().await, "c").queued, 1);
    evicted(&h, a, "a").await;
    let waited = a_loaded.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5_100),
        "evicted {waited:?} after its load, expected min_loaded (5 s)"
    );
    let (n, pid, link) = h.next_run().await;
    assert_eq!(n, "c");
    assert!(
        !h.world.lock().unwrap().dirs.contains(&h.parent.join("a")),
        "the victim's cgroup is gone before the newcomer's run exists"
    );
    let mut c = FakeWorker::greet("c", pid, link).await;
    c.ready().await;
    serve(&mut c).await;
    assert!(answered(&client.await.unwrap()));
    let s = h.status().await;
    assert_eq!(
        [("a", 1), ("b", 0), ("c", 0)].map(|(n, _)| instance(&s, n).evictions),
        [1, 0, 0]
    );
    assert_eq!(instance(&s, "a").state, "unloaded");
    assert!(instance(&s, "a").reason.contains("make room for c"));
    assert_eq!(s.budget.allocated, 128 * MIB);
    quiet(&mut b, Duration::from_millis(1)).await;
    h.stop(vec![("b".into(), b), ("c".into(), c)]).await;
}

/// A pinned instance is never evicted, nor a busy one: the load waits until the busy one's
/// request is over, then evicts it.
#[tokio::test(start_paused = true)]
async fn pinned_and_busy_instances_are_not_evicted() {
    let mut h = Harness::start_with(
        &config("min_loaded = \"0s\"\nidle_unload = \"never\"", true),
        150 * MIB,
    );
    let client = spawn_ask(&h, "a");
    let mut a = loads(&mut h, "a").await;
    serve(&mut a).await;
    assert!(answered(&client.await.unwrap()));
    let long = spawn_ask(&h, "b");
    let mut b = loads(&mut h, "b").await;
    let SupervisorMsg::Prompt(p) = b.receive().await else {
        panic!("b gets its prompt");
    };
    // b generates; c waits: a is pinned, b is busy.
    let client = spawn_ask(&h, "c");
    while !instance(&h.status().await, "c").reason.contains("busy") {
        tokio::task::yield_now().await;
    }
    // (Less than [http] queue_timeout, which would fail c's request.)
    quiet(&mut a, Duration::from_secs(30)).await;
    quiet(&mut b, Duration::from_millis(1)).await;
    assert!(h.runs.try_recv().is_err(), "c waits");
    answer(&mut b, p.id).await;
    assert!(answered(&long.await.unwrap()), "b's request completes");
    evicted(&h, b, "b").await;
    let mut c = loads(&mut h, "c").await;
    serve(&mut c).await;
    assert!(answered(&client.await.unwrap()));
    let s = h.status().await;
    assert_eq!(instance(&s, "a").evictions, 0);
    assert_eq!(instance(&s, "b").evictions, 1);
    assert!(instance(&s, "a").pinned);
    h.stop(vec![("a".into(), a), ("c".into(), c)]).await;
}

/// Race 1: two requests for the same unloaded instance start one load.
#[tokio::test(start_paused = true)]
async fn two_requests_for_an_unloaded_instance_start_one_load() {
    let mut h = Harness::start_with(&config("idle_unload = \"never\"", false), 1 << 30);
    let first = spawn_ask(&h, "a");
    let second = spawn_ask(&h, "a");
    while instance(&h.status().await, "a").queued != 2 {
        tokio::task::yield_now().await;
    }
    let mut a = loads(&mut h, "a").await;
    serve(&mut a).await;
    serve(&mut a).await;
    assert!(answered(&first.await.unwrap()));
    assert!(answered(&second.await.unwrap()));
    assert!(h.runs.try_recv().is_err(), "one run");
    assert_eq!(instance(&h.status().await, "a").loads, 1);
    h.stop(vec![("a".into(), a)]).await;
}

/// Race 2: a just-loaded instance is not evicted before the request that loaded it has been
/// dispatched; a request for a victim waits for its next load and is served then.
#[tokio::test(start_paused = true)]
async fn a_just_loaded_instance_serves_its_request_first_and_a_victim_keeps_new_requests() {
    let mut h = Harness::start_with(
        &config("min_loaded = \"0s\"\nidle_unload = \"never\"", false),
        100 * MIB,
    );
    let for_a = spawn_ask(&h, "a");
    let (n, mut a) = h.next_worker().await;
    assert_eq!(n, "a");
    // b wants the room while a loads: a is busy until its request is dispatched.
    let for_b = spawn_ask(&h, "b");
    while instance(&h.status().await, "b").queued != 1 {
        tokio::task::yield_now().await;
    }
    a.ready().await;
    let SupervisorMsg::Prompt(p) = a.receive().await else {
        panic!("a's first message after ready is its request, not a Shutdown");
    };
    answer(&mut a, p.id).await;
    assert!(answered(&for_a.await.unwrap()));
    // Now a is idle: evicted for b. A request for a meanwhile waits.
    loop {
        if let SupervisorMsg::Shutdown(_) = a.receive().await {
            break;
        }
    }
    let again = spawn_ask(&h, "a");
    while instance(&h.status().await, "a").queued != 1 {
        tokio::task::yield_now().await;
    }
    h.exit(&a, "a", Exit::Code(0)).await;
    let mut b = loads(&mut h, "b").await;
    serve(&mut b).await;
    assert!(answered(&for_b.await.unwrap()));
    // b is idle now: a's waiting request evicts it in turn.
    evicted(&h, b, "b").await;
    let mut a = loads(&mut h, "a").await;
    serve(&mut a).await;
    assert!(answered(&again.await.unwrap()));
    let s = h.status().await;
    assert_eq!(
        (instance(&s, "a").loads, instance(&s, "a").evictions),
        (2, 1)
    );
    assert_eq!(
        (instance(&s, "b").loads, instance(&s, "b").evictions),
        (1, 1)
    );
    h.stop(vec![("a".into(), a)]).await;
}

/// `supervisor load` and `unload` through the control socket.
#[tokio::test(start_paused = true)]
async fn load_and_unload_commands() {
    use belljar_protocol::control::{Command, NameRequest};
    let mut h = Harness::start_with(&config("idle_unload = \"never\"", false), 1 << 30);
    let socket = h.socket.clone();
    let load = tokio::spawn(async move {
        super::tests::control(&socket, &Command::Load(NameRequest { name: "c".into() })).await
    });
    let c = loads(&mut h, "c").await;
    assert!(matches!(load.await.unwrap(), Response::Ok(_)));
    assert_eq!(instance(&h.status().await, "c").loads, 1);
    let socket = h.socket.clone();
    let unload = tokio::spawn(async move {
        super::tests::control(&socket, &Command::Unload(NameRequest { name: "c".into() })).await
    });
    evicted(&h, c, "c").await;
    assert!(matches!(unload.await.unwrap(), Response::Ok(_)));
    let s = h.status().await;
    assert_eq!(
        (
            instance(&s, "c").state.as_str(),
            instance(&s, "c").evictions
        ),
        ("unloaded", 0)
    );
    let r = super::tests::control(
        &h.socket,
        &Command::Unload(NameRequest { name: "c".into() }),
    )
    .await;
    assert!(
        matches!(r, Response::Ok(ref o) if o.message.contains("already")),
        "{r:?}"
    );
    let r =
        super::tests::control(&h.socket, &Command::Load(NameRequest { name: "zz".into() })).await;
    assert!(matches!(r, Response::Error(_)), "{r:?}");
    h.stop(vec![]).await;
}
