#!/usr/bin/env python3
"""Swap latency (issue 21): a request to an unloaded on-demand instance whose load needs another
instance evicted, request to first token, against the cold load of the same model alone (the
same request with nothing to evict), in the same supervisor run.

Setup: `supervisor run` with two on-demand instances of the same model, `victim` and `subject`,
and a `[budget] total` that holds one of them and not two (1.5 x the reservation `supervisor
validate` computes), `min_loaded = "0s"` (the policy's wait is not what is measured) and
`idle_unload = "1s"` (how the bench gets back to nothing loaded). One repetition:

  cold  wait until both are unloaded; stream a completion from `subject`: request -> first token.
  swap  wait until both are unloaded; ask `victim` (loads it); then stream the same completion
        from `subject`: its load must evict `victim` first.

The victim's own stop is taken apart from the swap: its worker's exit is seen through a pidfd
(poll(2) on pidfd_open of its pid: the moment it exits, before it is reaped), the supervisor's
decision and the release from the log (`--log-format json`: the "evicting" line, `evicted`
logged once the victim's cgroup is gone, the subject's `spawned`). So

  stop      = victim exit - decision          (the worker's own shutdown)
  overhead  = swap TTFT - cold TTFT - stop    (the decision, the release check, and the rest)

and the goal is overhead <= 50 ms. Medians over --reps repetitions, with min and max.

Models: the generated one (`worker make-model`, as bench/http.py) and SmolLM2-135M from the model
cache (scripts/fetch-models smollm2-135m-instruct; skipped with a note when missing). Binaries and
models are private copies under /var/lib/belljar-bench (0755: the workers run as belljar-worker).

Needs root and Python 3.11's standard library. Each measurement is appended to
bench/data/swap-DATE.jsonl; a Markdown table is printed.

    python3 bench/swap.py --bin /work/p2-target/release --reps 10
"""
import argparse
import datetime
import glob
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/var/lib/belljar-bench"
PROMPT = "Tell me about the bell jar, now."
GEN = 8
GOAL_MS = 50.0


def wall():
    return time.time()


# ---------------------------------------------------------------- the supervisor

class Supervisor:
    def __init__(self, bins, model, tmp, ctx, threads):
        self.bins = bins
        self.sup = os.path.join(bins, "supervisor")
        self.tmp = tmp
        self.runtime = os.path.join(tmp, "run")
        base = self.config(model, ctx, threads, 64 << 30)
        required = self.reservation(base)
        self.required = required
        self.total = required * 3 // 2
        conf = os.path.join(tmp, "budgets.toml")
        with open(conf, "w") as f:
            f.write(self.config(model, ctx, threads, self.total))
        self.log_path = os.path.join(tmp, "supervisor.jsonl")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [self.sup, "run", "--mode", "bench", "--config", conf, "--runtime-dir", self.runtime,
             "--state-dir", os.path.join(tmp, "state"), "--cgroup-parent", f"bench-swap-{os.getpid()}",
             "--http", "127.0.0.1:0", "--log-format", "json",
             "--worker", os.path.join(bins, "worker")],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("supervisor exited: " + open(self.log_path).read()[-2000:])
            st = self.status()
            if st and st.get("http_addr") and all(i["state"] == "unloaded" for i in st["instances"]):
                self.addr = st["http_addr"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisor not up: {st}")
            time.sleep(0.05)

    @staticmethod
    def config(model, ctx, threads, total):
        return (f'[budget]\ntotal = "{total}"\nper_instance_max = 1.0\nmin_required = "16MiB"\n'
                f'headroom = "64MiB"\n[defaults]\nmodel = "{model}"\nctx = {ctx}\n'
                f'threads = {threads}\nload = "on-demand"\nmin_loaded = "0s"\nidle_unload = "1s"\n'
                '[instances.victim]\n[instances.subject]\n'
                '[modes.bench]\ninstances = ["victim", "subject"]\n')

    def reservation(self, text):
        path = os.path.join(self.tmp, "validate.toml")
        with open(path, "w") as f:
            f.write(text)
        r = subprocess.run([self.sup, "validate", "--config", path, "--mode", "bench", "--json"],
                           capture_output=True, text=True, check=True)
        req = {i["name"]: i["required"] for i in json.loads(r.stdout)["modes"][0]["instances"]}
        assert req["victim"] == req["subject"], req
        return req["subject"]

    def status(self):
        r = subprocess.run([self.sup, "status", "--json", "--runtime-dir", self.runtime],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def wait(self, what, pred, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st and pred(st):
                return st
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {st}")
            time.sleep(0.02)

    def instance(self, st, name):
        return next(i for i in st["instances"] if i["name"] == name)

    def all_unloaded(self):
        return self.wait("both unloaded",
                         lambda st: all(i["state"] == "unloaded" for i in st["instances"]))

    def entries(self):
        """The JSON log so far, one dict per line (the supervisor's own lines)."""
        self.log.flush()
        out = []
        with open(self.log_path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def stamp(entry):
    """The entry's wall time in seconds since the epoch."""
    return datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- the client

def first_token(addr, model):
    """Streams a completion; returns (wall time sent, wall time of the first token with text)."""
    host, port = addr.rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": GEN, "ignore_eos": True,
                       "temperature": 0, "stream": True}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(120)
    buf = bytearray()
    first = None
    t0 = wall()
    s.sendall(req)
    try:
        while True:
            data = s.recv(1 << 16)
            t = wall()
            if not data:
                break
            buf += data
            if first is None:
                # A data line whose JSON has non-empty text (chunk framing may split it: look
                # for the field, not a whole line).
                if b'"text":"' in buf and b'"text":""' not in buf[buf.index(b'"text":"'):][:9]:
                    first = t
                elif b'"error"' in buf:
                    raise RuntimeError(f"stream error: {bytes(buf)[:500]!r}")
    finally:
        s.close()
    head = bytes(buf[:buf.find(b"\r\n")]).decode("latin-1")
    if " 200 " not in head + " ":
        raise RuntimeError(f"{model}: {head}: {bytes(buf)[:500]!r}")
    if first is None:
        raise RuntimeError(f"{model}: no token with text: {bytes(buf)[:500]!r}")
    return t0, first


def exit_watch(pid):
    """A thread that records the wall time `pid` exits (pidfd readable); returns (thread, box)."""
    fd = os.pidfd_open(pid)
    box = {}

    def watch():
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.poll(60_000)
        box["exit"] = wall()
        os.close(fd)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- one model

def measure(bins, label, model, tmp, args):
    sup = Supervisor(bins, model, tmp, args.ctx, args.threads)
    rows = []
    try:
        # Warm-up: both paths once (page cache of the model and the binary).
        sup.all_unloaded()
        first_token(sup.addr, "subject")
        sup.all_unloaded()
        first_token(sup.addr, "victim")
        first_token(sup.addr, "subject")
        for rep in range(args.reps):
            sup.all_unloaded()
            mark = len(sup.entries())
            t0, t1 = first_token(sup.addr, "subject")
            cold = (t1 - t0) * 1e3
            cold_spawn = next(stamp(e) for e in sup.entries()[mark:]
                              if e.get("instance") == "subject" and e.get("event") == "spawned")
            cold_spawn_ms = (cold_spawn - t0) * 1e3

            sup.all_unloaded()
            first_token(sup.addr, "victim")
            st = sup.wait("victim ready", lambda s: sup.instance(s, "victim")["state"] == "ready")
            pid = sup.instance(st, "victim")["pid"]
            watcher, box = exit_watch(pid)
            mark = len(sup.entries())
            t0, t1 = first_token(sup.addr, "subject")
            watcher.join(5)
            swap = (t1 - t0) * 1e3
            new = sup.entries()[mark:]
            decision = next(stamp(e) for e in new
                            if e.get("instance") == "subject" and "evicting victim" in e.get("message", ""))
            evicted = next(stamp(e) for e in new
                           if e.get("instance") == "victim" and e.get("event") == "evicted")
            spawned = next(stamp(e) for e in new
                           if e.get("instance") == "subject" and e.get("event") == "spawned")
            # The watcher thread may wake a little late on a busy machine; the worker has
            # exited by the time its cgroup is gone (`evicted`), so that bounds it.
            exited = min(box.get("exit", evicted), evicted)
            row = {"model": label, "rep": rep, "ctx": args.ctx, "threads": args.threads,
                   "required": sup.required, "total": sup.total,
                   "cold_ms": cold, "swap_ms": swap,
                   "decision_ms": (decision - t0) * 1e3,
                   "stop_ms": (exited - decision) * 1e3,
                   "release_ms": (evicted - exited) * 1e3,
                   "spawn_ms": (spawned - evicted) * 1e3,
                   "cold_spawn_ms": cold_spawn_ms,
                   "swap_spawn_ms": (spawned - t0) * 1e3,
                   "overhead_ms": swap - cold - (exited - decision) * 1e3,
                   "spawn_overhead_ms": (spawned - t0) * 1e3 - cold_spawn_ms - (exited - decision) * 1e3}
            rows.append(row)
            print(f"# {label} rep {rep}: cold {cold:.1f} ms, swap {swap:.1f} ms, stop "
                  f"{row['stop_ms']:.1f} ms, overhead {row['overhead_ms']:+.1f} ms (to spawn "
                  f"{row['spawn_overhead_ms']:+.1f} ms)",
                  file=sys.stderr, flush=True)
        st = sup.status()
        for i in st["instances"]:
            if i["oom_kills"]:
                raise RuntimeError(f"an OOM kill during the bench: {i}")
    finally:
        sup.close()
    return rows


def machine():
    name = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({name}), {mem:.1f} GiB, "
            f"Linux {platform.release()}")


def spread(xs):
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def table(rows, when, args):
    out = [f"Measured {when} by `python3 bench/swap.py --reps {args.reps}` on {machine()}; "
           f"ctx {args.ctx}, {args.threads} thread(s), {GEN} tokens per request. "
           "Median (min–max) in ms over the repetitions.", "",
           "| model | reservation | cold: request → first token | swap: request → first token | "
           "victim stop | overhead (swap − cold − stop) | cold: request → spawn | "
           "swap: request → spawn | overhead to spawn (swap − cold − stop) | goal ≤ 50 ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label]
        col = {k: [r[k] for r in rs] for k in rs[0] if k.endswith("_ms")}
        ok = (statistics.median(col["spawn_overhead_ms"]) <= GOAL_MS
              and statistics.median(col["overhead_ms"]) <= GOAL_MS)
        out.append(f"| {label} | {rs[0]['required'] / 2**20:.0f} MiB | {spread(col['cold_ms'])} | "
                   f"{spread(col['swap_ms'])} | {spread(col['stop_ms'])} | "
                   f"{spread(col['overhead_ms'])} | {spread(col['cold_spawn_ms'])} | "
                   f"{spread(col['swap_spawn_ms'])} | {spread(col['spawn_overhead_ms'])} | "
                   f"{'met' if ok else 'missed'} |")
    out += ["", "The swap's steps (median, min–max, ms): the decision (request → the \"evicting\" log "
            "line), the release check (the victim's exit → `evicted`, logged once its cgroup is "
            "gone), the newcomer's spawn (`evicted` → `spawned`).", "",
            "| model | decision | release check | release → spawn |", "|---|---|---|---|"]
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label]
        out.append(f"| {label} | {spread([r['decision_ms'] for r in rs])} | "
                   f"{spread([r['release_ms'] for r in rs])} | {spread([r['spawn_ms'] for r in rs])} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.environ.get("BELLJAR_BIN", os.path.join(ROOT, "target", "release")),
                    help="directory with the release `worker` and `supervisor`")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["generated", "smollm2"])
    ap.add_argument("--out", help="the JSONL file (default bench/data/swap-DATE.jsonl)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/swap.py needs root (cgroups, the supervisor, worker_user)")
    bins = os.path.abspath(args.bin)
    for b in ("worker", "supervisor"):
        if not os.access(os.path.join(bins, b), os.X_OK):
            sys.exit(f"no {b} in {bins}: build with cargo build --release --workspace --bins, or pass --bin DIR")
    now = datetime.datetime.now(datetime.timezone.utc)
    when = f"{now:%Y-%m-%d %H:%M} UTC"
    out = args.out or os.path.join(ROOT, "bench", "data", f"swap-{now:%Y-%m-%d}.jsonl")
    os.makedirs(WORK, mode=0o755, exist_ok=True)
    os.chmod(WORK, 0o755)
    tmp = tempfile.mkdtemp(prefix="swap-", dir=WORK)
    os.chmod(tmp, 0o755)
    rows = []
    try:
        binc = os.path.join(tmp, "bin")
        os.mkdir(binc, 0o755)
        for b in ("worker", "supervisor"):
            shutil.copy2(os.path.join(bins, b), os.path.join(binc, b))
        models = []
        if args.only in (None, "generated"):
            demo = os.path.join(tmp, "demo.gguf")
            subprocess.run([os.path.join(binc, "worker"), "make-model", demo], check=True,
                           stdout=subprocess.DEVNULL)
            os.chmod(demo, 0o644)
            models.append(("generated (worker make-model)", demo))
        if args.only in (None, "smollm2"):
            cache = os.environ.get("BELLJAR_MODEL_CACHE", "/var/cache/belljar/models")
            real = sorted(glob.glob(os.path.join(cache, "SmolLM2-135M*.gguf")))
            if real:
                dst = os.path.join(tmp, os.path.basename(real[0]))
                shutil.copy(real[0], dst)
                os.chmod(dst, 0o644)
                models.append((os.path.basename(real[0]), dst))
            else:
                print("# SmolLM2-135M is not in the model cache: scripts/fetch-models smollm2-135m-instruct",
                      file=sys.stderr)
        for label, path in models:
            d = os.path.join(tmp, f"m{len(rows)}")
            os.mkdir(d, 0o755)
            got = measure(binc, label, path, d, args)
            with open(out, "a") as f:
                for r in got:
                    f.write(json.dumps({"date": when, "machine": machine(), **r}) + "\n")
            rows += got
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows, when, args))


if __name__ == "__main__":
    main()
