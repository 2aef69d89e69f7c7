#!/usr/bin/env python3
"""Accuracy of belljar's memory estimates against the real worker's peak.

For every model x ctx x mmap cell: evict the model file and the worker binary from the page cache
(posix_fadvise DONTNEED, so their pages are charged to this run), start the real worker in a
fresh cgroup with no limit, speak the worker protocol over a Unix socket (Welcome, a prompt, 16
generated tokens), read the cgroup's peak, and compare it with `supervisor estimate` ("gguf"
rule) and the file x 1.5 rule. Two prompts per cell: a short one (31 words) and, where the bench
runs it, a long one that fills 80% of the context (it is sized in tokens from the short one's
count). The estimate is the reservation for any prompt, so a cell's error is against the higher
of its measured peaks.

Two tables, written into docs/benchmarks.md between markers:
- generated: f32 llama models from `worker make-model` (some used to fit the constants, the
  others held out);
- real: the quantized models of models/registry.toml (scripts/fetch-models fetches them), with
  each term of the estimate beside the buffer that llama.cpp's log states (model, CPU_REPACK, KV,
  output, compute), read from the worker's log at RUST_LOG=info.

Root and cgroup v1 memory or cgroup v2.

Usage: python3 bench/estimate.py [--only generated|real] [--quick] [--no-long] [--no-write]
                                 [--from FILE] [--resume]
  --quick     two small generated models, and only ctx 512/4096 of the real ones
  --no-long   short prompts only
  --from FILE the tables again from stored measurements (each cell measured is appended to
              target/bench-estimate.jsonl), with the current `supervisor estimate`: for refitting
  --resume    keep the cells already in target/bench-estimate.jsonl (measure the others)
"""
import atexit
import datetime
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
WORKER = os.path.join(BIN, "worker")
SUPERVISOR = os.path.join(BIN, "supervisor")
MODELS = os.path.join(ROOT, "target", "bench-models")
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(ROOT, "target", "bench-estimate.jsonl")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN = "<!-- bench/estimate.py: begin -->"
END = "<!-- bench/estimate.py: end -->"
BEGIN_REAL = "<!-- bench/estimate.py real: begin -->"
END_REAL = "<!-- bench/estimate.py real: end -->"

# name: (make-model flags, used to fit the constants?)
SHAPES = {
    "1M": (["--layers", "2", "--width", "128", "--ff", "256", "--heads", "4", "--vocab", "300"], True),
    "30M": (["--layers", "4", "--width", "320", "--ff", "1024", "--heads", "5", "--vocab", "4096"], True),
    "130M": (["--layers", "4", "--width", "640", "--ff", "1792", "--heads", "10", "--vocab", "8192"], False),
    "290M": (["--layers", "6", "--width", "896", "--ff", "2432", "--heads", "14", "--vocab", "8192"], True),
    "290M-gqa": (["--layers", "6", "--width", "896", "--ff", "2432", "--heads", "14", "--kv-heads", "2", "--vocab", "8192"], False),
    "1.1G": (["--layers", "8", "--width", "1536", "--ff", "4096", "--heads", "12", "--vocab", "16384"], False),
}
CTXS = [512, 4096, 16384]
SHORT_WORDS = 31
LONG_FILL = 0.8
# A prompt of 13,000 tokens takes 10-30 minutes on 2 cores for a model of 100 MB and up
# (attention over the whole context, on the CPU). At ctx 16384 the long prompt runs only for
# models under this size, and for the real ones with mmap on (its compute is the same without).
LONG_16K_MAX_FILE = 64 << 20
# ... and with mmap on for generated models under this size (the error of the others' short
# prompt is small beside their size).
LONG_16K_MMAP_MAX_FILE = 400 << 20


def long_wanted(path, ctx, mmap, real_model):
    if ctx < 16384:
        return True
    if real_model:
        return mmap
    size = os.path.getsize(path)
    return size < LONG_16K_MAX_FILE or (mmap and size < LONG_16K_MMAP_MAX_FILE)


def measured():
    """--resume: the cells already in RESULTS, by (model, ctx, mmap, long prompt run)."""
    done = {}
    if "--resume" in sys.argv and os.path.exists(RESULTS):
        with open(RESULTS) as f:
            for line in f:
                c = json.loads(line)
                done[(c["model"], c["ctx"], c["mmap"], c["long_peak"] is not None)] = c
    return done


def cgroup_root():
    if os.path.isdir("/sys/fs/cgroup/memory"):
        return "/sys/fs/cgroup/memory", "memory.max_usage_in_bytes"
    return "/sys/fs/cgroup", "memory.peak"


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def send(conn, msg):
    data = json.dumps(msg).encode()
    conn.sendall(struct.pack(">I", len(data)) + data)


def recv(conn):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError("worker closed the link")
            buf += chunk
        return buf

    (n,) = struct.unpack(">I", exactly(4))
    return json.loads(exactly(n))


BUFFER = re.compile(r"(\S+)\s+(model|output|KV|compute) buffer size =\s+([\d.]+) MiB")


def buffers(log_text):
    """llama.cpp's buffer sizes from the worker's log, in bytes: model (non-repack), repack, kv
    (summed over the caches: an SWA model has two), output, compute (allocated, not touched)."""
    out = {"model": 0, "repack": 0, "kv": 0, "output": 0, "compute": 0}
    for dev, kind, mib in BUFFER.findall(log_text):
        b = int(float(mib) * 2**20)
        if kind == "model":
            out["repack" if dev == "CPU_REPACK" else "model"] += b
        else:
            out[kind.lower()] += b
    out["swa_full"] = "using full-size SWA cache" in log_text
    return out


def private_copy(path):
    """A copy of a file (the worker binary, a model) for this run alone, removed at exit. Pages
    of a file mapped by a process of another run cannot be evicted and stay charged to that
    run's cgroup, so two runs sharing a file would each miss part of it."""
    d = tempfile.mkdtemp(prefix="belljar-est-copy-", dir=os.path.join(ROOT, "target"))
    copy = os.path.join(d, os.path.basename(path))
    subprocess.run(["cp", path, copy], check=True)
    atexit.register(lambda: subprocess.run(["rm", "-rf", d]))
    return copy


_PRIVATE_WORKER = []


def private_worker():
    """This run's copy of the worker binary (made once)."""
    if not _PRIVATE_WORKER:
        _PRIVATE_WORKER.append(private_copy(WORKER))
    return _PRIVATE_WORKER[0]


def measure(model, ctx, mmap, words, word):
    root, peak_file = cgroup_root()
    parent = os.path.join(root, "belljar-bench-estimate")
    os.makedirs(parent, exist_ok=True)
    cg = os.path.join(parent, f"cell-{os.getpid()}")
    if os.path.isdir(cg):
        os.rmdir(cg)
    os.mkdir(cg)
    tmp = tempfile.mkdtemp(prefix="belljar-est-")
    sock_path = os.path.join(tmp, "link.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    worker = private_worker()
    for p in (model, worker):
        evict(p)
    procs = os.path.join(cg, "cgroup.procs")
    args = [worker, "serve", "--connect", sock_path, "--instance", "bench", "--model", model,
            "--state-dir", os.path.join(tmp, "state"), "--ctx", str(ctx), "--threads", "2",
            "--required", "0", "--headroom", "0"]
    if not mmap:
        args.append("--no-mmap")

    def join_cgroup():
        with open(procs, "w") as f:
            f.write("0")

    start = time.monotonic()
    log_path = os.path.join(tmp, "worker.log")
    env = dict(os.environ, RUST_LOG="info")
    with open(log_path, "w") as err:
        proc = subprocess.Popen(args, preexec_fn=join_cgroup, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        srv.settimeout(120)
        conn, _ = srv.accept()
        conn.settimeout(3600)
        hello = recv(conn)
        assert hello["type"] == "Hello", hello
        send(conn, {"type": "Welcome", "protocol_version": hello["protocol_version"]})
        while True:
            m = recv(conn)
            if m["type"] == "Ready":
                load_ms = (time.monotonic() - start) * 1000
                break
            if m["type"] in ("Failed", "Refused"):
                raise RuntimeError(m)
        prompt = " ".join([word] * words)
        # A completion outside the session (as the HTTP API serves): a session turn would also
        # write the context's state through the page cache (reclaimable, dropped after fsync).
        send(conn, {"type": "Prompt", "id": 1, "mode": "completion", "raw": True, "text": prompt,
                    "max_tokens": 16, "ignore_eos": True})
        while True:
            m = recv(conn)
            if m["type"] == "Done":
                prompt_tokens = m.get("prompt_tokens", 0)
                break
            if m["type"] == "Error":
                raise RuntimeError(m)
        with open(os.path.join(cg, peak_file)) as f:
            peak = int(f.read())
        send(conn, {"type": "Shutdown"})
        proc.wait(60)
        with open(log_path) as f:
            logged = buffers(f.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
        subprocess.run(["rm", "-rf", tmp])
        for _ in range(100):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.05)
    return {"peak": peak, "load_ms": load_ms, "prompt_tokens": prompt_tokens, "log": logged}


def estimate(model, ctx, mmap):
    out = subprocess.run([SUPERVISOR, "estimate", model, "--ctx", str(ctx), "--mmap" if mmap else "--no-mmap", "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def mib(b):
    return f"{b / 2**20:.1f}"


def pct(est, real):
    return (est - real) / real * 100 if real else 0.0


def run_cell(name, path, ctx, mmap, word, long_ok, fit=None, canonical=None):
    short = measure(path, ctx, mmap, SHORT_WORDS, word)
    per_word = max(short["prompt_tokens"], 1) / SHORT_WORDS
    long = None
    if long_ok:
        words = max(1, int(ctx * LONG_FILL / per_word) - 8)
        long = measure(path, ctx, mmap, words, word)
    cell = {"model": name, "path": canonical or path, "file": os.path.getsize(path), "ctx": ctx, "mmap": mmap, "fit": fit,
            "short_peak": short["peak"], "short_tokens": short["prompt_tokens"],
            "long_peak": long["peak"] if long else None, "long_tokens": long["prompt_tokens"] if long else None,
            "load_ms": short["load_ms"], "log": short["log"]}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(cell) + "\n")
    return judge(cell)


def judge(cell):
    """A measured cell with the current `supervisor estimate` beside it."""
    est = estimate(cell["path"], cell["ctx"], cell["mmap"])
    worst = max(cell["short_peak"], cell["long_peak"] or 0)
    row = dict(cell, peak=worst, gguf=est["total"], file_rule=est["file_rule"], terms=est,
               err=pct(est["total"], worst), file_err=pct(est["file_rule"], worst),
               short_err=pct(est["total"], cell["short_peak"]))
    print(json.dumps({k: v for k, v in row.items() if k not in ("terms", "log", "path")}), flush=True)
    return row


def generated(quick, long_prompts):
    os.makedirs(MODELS, exist_ok=True)
    shapes = {k: v for k, v in SHAPES.items() if not quick or k in ("1M", "30M")}
    done = measured()
    rows = []
    for name, (flags, fit) in shapes.items():
        path = os.path.join(MODELS, f"{name}.gguf")
        if not os.path.exists(path):
            subprocess.run([WORKER, "make-model", path] + flags, check=True, stdout=subprocess.DEVNULL)
        for ctx in CTXS:
            for mmap in (True, False):
                long_ok = long_prompts and long_wanted(path, ctx, mmap, False)
                if (name, ctx, mmap, long_ok) in done:
                    rows.append(judge(done[(name, ctx, mmap, long_ok)]))
                    continue
                # The generated vocabulary's word-initial pieces: "b" is one token ("▁b").
                rows.append(run_cell(name, path, ctx, mmap, "b", long_ok, fit))
    return rows


def real_models():
    reg = subprocess.run([sys.executable, "-c",
                          "import tomllib,sys; print('\\n'.join(sorted(tomllib.load(open(sys.argv[1],'rb'))['models'])))",
                          os.path.join(ROOT, "models", "registry.toml")], check=True, capture_output=True, text=True)
    out = []
    for name in reg.stdout.split():
        p = subprocess.run([os.path.join(ROOT, "scripts", "fetch-models"), "--path", name], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{name} is not in the model cache: run scripts/fetch-models first ({p.stderr.strip()})")
        out.append((name, p.stdout.strip()))
    return out


def real(quick, long_prompts):
    done = measured()
    rows = []
    for name, shared in real_models():
        path = None
        for ctx in CTXS if not quick else CTXS[:2]:
            for mmap in (True, False):
                long_ok = long_prompts and long_wanted(shared, ctx, mmap, True)
                if (name, ctx, mmap, long_ok) in done:
                    rows.append(judge(done[(name, ctx, mmap, long_ok)]))
                    continue
                path = path or private_copy(shared)
                row = run_cell(name, path, ctx, mmap, "word", long_ok, canonical=shared)
                rows.append(row)
    return rows


def header():
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cgroup = "v2" if cgroup_root()[1] == "memory.peak" else "v1 (memory)"
    args = "".join(" " + a for a in sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc)
    what = (f"Measured by `python3 bench/estimate.py` (cells stored, then judged {now:%Y-%m-%d %H:%M} UTC "
            f"by `python3 bench/estimate.py{args}` with this estimate)" if "--from" in sys.argv else
            f"Measured {now:%Y-%m-%d %H:%M} UTC by `python3 bench/estimate.py{args}`")
    return (what +
            f" on {platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, {mem:.1f} GiB, "
            f"Linux {platform.release()}, cgroup {cgroup}.")


def long_cell(r):
    if r["long_peak"] is None:
        return "—"
    return f"{mib(r['long_peak'])} ({r['long_tokens']} tok)"


def goal(rows):
    return [r for r in rows if not -3.0 <= r["err"] <= 10.0]


def accuracy_rows(rows, with_set):
    """The accuracy table's lines (header and one row per cell); `with_set`: the fit / held-out
    column of the generated models."""
    set_head, set_rule = ("set | ", "---|") if with_set else ("", "")
    lines = [f"| model | file MiB | ctx | mmap | {set_head}peak, short prompt | peak, long prompt | gguf estimate MiB | error | "
             f"file x 1.5{' MiB' if with_set else ''} | its error | load ms |",
             f"|---|---|---|---|{set_rule}---|---|---|---|---|---|---|"]
    for r in rows:
        set_cell = f"{'fit' if r['fit'] else 'held out'} | " if with_set else ""
        lines.append(f"| {r['model']} | {mib(r['file'])} | {r['ctx']} | {'on' if r['mmap'] else 'off'} | "
                     f"{set_cell}{mib(r['short_peak'])} | {long_cell(r)} | {mib(r['gguf'])} | "
                     f"{r['err']:+.1f}% | {mib(r['file_rule'])} | {r['file_err']:+.1f}% | {r['load_ms']:.0f} |")
    return lines


def generated_block(rows):
    held = [r for r in rows if not r["fit"]]
    lines = [BEGIN, "", header(), ""] + accuracy_rows(rows, True)
    misses = goal(rows)
    lines += ["",
              f"{len(rows)} cells ({len(held)} held out from the fit). The error is against the higher of the two peaks. "
              f"gguf estimate error: from {min(r['err'] for r in rows):+.1f}% to {max(r['err'] for r in rows):+.1f}% "
              f"(against the short prompt alone: {min(r['short_err'] for r in rows):+.1f}% to {max(r['short_err'] for r in rows):+.1f}%); "
              f"goal (every cell within -3%..+10%): {'met' if not misses else 'NOT met (' + str(len(misses)) + ' cells)'}. "
              f"file x 1.5 rule: from {min(r['file_err'] for r in rows):+.1f}% to {max(r['file_err'] for r in rows):+.1f}%.",
              "", END]
    return lines


def real_block(rows):
    lines = [BEGIN_REAL, "", header(), ""] + accuracy_rows(rows, False)
    misses = goal(rows)
    lines += ["",
              f"{len(rows)} cells; gguf estimate error from {min(r['err'] for r in rows):+.1f}% to {max(r['err'] for r in rows):+.1f}%; "
              f"goal (within -3%..+10%): {'met' if not misses else 'NOT met in ' + str(len(misses)) + ' cells'}.",
              "",
              "Each term against the buffer llama.cpp's log states (MiB; estimate / log, error). The weights "
              "term is the whole file with mmap (the header's pages are read too), the tensors less the "
              "repacked ones without; compute is the allocated buffer, of which a prompt touches only part.",
              "",
              "| model | ctx | mmap | weights | repack | KV | output | compute (allocated) | SWA cache |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, lg = r["terms"], r["log"]

        def cmp(est, logged):
            return f"{mib(est)} / {mib(logged)} ({pct(est, logged):+.1f}%)" if logged else f"{mib(est)} / —"
        lines.append(f"| {r['model']} | {r['ctx']} | {'on' if r['mmap'] else 'off'} | {cmp(t['weights'], lg['model'])} | "
                     f"{cmp(t['repack'], lg['repack'])} | {cmp(t['kv'], lg['kv'])} | {cmp(t['output'], lg['output'])} | "
                     f"{cmp(t['compute'], lg['compute'])} | {'full-size' if lg['swa_full'] else '—'} |")
    lines += ["", END_REAL]
    return lines


def write_block(lines, begin, end, title):
    text = open(DOC).read()
    block = "\n".join(lines)
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    open(DOC, "w").write(text)


def main():
    quick = "--quick" in sys.argv
    long_prompts = "--no-long" not in sys.argv
    only = None
    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1]
        if only not in ("generated", "real"):
            sys.exit("--only takes generated or real")
    stored = None
    if "--from" in sys.argv:
        with open(sys.argv[sys.argv.index("--from") + 1]) as f:
            cells = [json.loads(line) for line in f if line.strip()]
        # A cell measured again (with its long prompt, say) replaces the earlier one.
        latest = {}
        for c in cells:
            latest[(c["model"], c["ctx"], c["mmap"])] = c
        stored = list(latest.values())
    ok = True
    if only in (None, "real"):
        rows = [judge(c) for c in stored if c["fit"] is None] if stored is not None else real(quick, long_prompts)
        lines = real_block(rows)
        if "--no-write" not in sys.argv:
            write_block(lines, BEGIN_REAL, END_REAL, "Memory estimate on real models (bench/estimate.py)")
        print("\n".join(lines))
        ok = ok and len(goal(rows)) <= 2
    if only in (None, "generated"):
        rows = [judge(c) for c in stored if c["fit"] is not None] if stored is not None else generated(quick, long_prompts)
        lines = generated_block(rows)
        if "--no-write" not in sys.argv:
            write_block(lines, BEGIN, END, "Memory estimate accuracy (bench/estimate.py)")
        print("\n".join(lines))
        ok = ok and not goal(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
