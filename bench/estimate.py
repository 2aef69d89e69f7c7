#!/usr/bin/env python3
"""Accuracy of belljar's memory estimates against the real worker's peak.

For every generated model x ctx x mmap cell: evict the model file and the worker binary from the
page cache (posix_fadvise DONTNEED, so their pages are charged to this run), start the real
worker in a fresh cgroup with no limit, speak the worker protocol over a Unix socket (Welcome, a
32-token prompt, 16 generated tokens), read the cgroup's peak, and compare it with
`supervisor estimate` ("gguf" rule) and the file x 1.5 rule. Writes the table into
docs/benchmarks.md between markers. Root and cgroup v1 memory or cgroup v2.

Usage: python3 bench/estimate.py [--quick] [--no-write]
"""
import datetime
import json
import platform
import os
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
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN = "<!-- bench/estimate.py: begin -->"
END = "<!-- bench/estimate.py: end -->"

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


def cgroup_root():
    if os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes") or os.path.isdir("/sys/fs/cgroup/memory"):
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
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise EOFError("worker closed the link")
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = conn.recv(n - len(body))
        if not chunk:
            raise EOFError("worker closed the link")
        body += chunk
    return json.loads(body)


def measure(model, ctx, mmap):
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
    for p in (model, WORKER):
        evict(p)
    procs = os.path.join(cg, "cgroup.procs")
    args = [WORKER, "serve", "--connect", sock_path, "--instance", "bench", "--model", model,
            "--state-dir", os.path.join(tmp, "state"), "--ctx", str(ctx), "--threads", "2",
            "--required", "0", "--headroom", "0"]
    if not mmap:
        args.append("--no-mmap")

    def join_cgroup():
        with open(procs, "w") as f:
            f.write("0")

    start = time.monotonic()
    # BENCH_WORKER_LOG=FILE keeps the worker's log (with RUST_LOG=info: llama.cpp's buffer sizes).
    log = os.environ.get("BENCH_WORKER_LOG")
    err = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, preexec_fn=join_cgroup, stdout=subprocess.DEVNULL, stderr=err)
    try:
        srv.settimeout(60)
        conn, _ = srv.accept()
        conn.settimeout(600)
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
        prompt = " ".join(["word"] * 31)
        send(conn, {"type": "Prompt", "id": 1, "text": prompt, "max_tokens": 16, "ignore_eos": True})
        while True:
            m = recv(conn)
            if m["type"] == "Done":
                break
            if m["type"] == "Error":
                raise RuntimeError(m)
        with open(os.path.join(cg, peak_file)) as f:
            peak = int(f.read())
        send(conn, {"type": "Shutdown"})
        proc.wait(60)
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
    return peak, load_ms


def estimate(model, ctx, mmap):
    out = subprocess.run([SUPERVISOR, "estimate", model, "--ctx", str(ctx), "--mmap" if mmap else "--no-mmap", "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def mib(b):
    return f"{b / 2**20:.1f}"


def main():
    quick = "--quick" in sys.argv
    os.makedirs(MODELS, exist_ok=True)
    shapes = {k: v for k, v in SHAPES.items() if not quick or k in ("1M", "30M")}
    rows = []
    for name, (flags, fit) in shapes.items():
        path = os.path.join(MODELS, f"{name}.gguf")
        if not os.path.exists(path):
            subprocess.run([WORKER, "make-model", path] + flags, check=True, stdout=subprocess.DEVNULL)
        size = os.path.getsize(path)
        for ctx in CTXS:
            for mmap in (True, False):
                peak, load_ms = measure(path, ctx, mmap)
                est = estimate(path, ctx, mmap)
                gguf = est["total"]
                file_rule = est["file_rule"]
                row = {"model": name, "file": size, "ctx": ctx, "mmap": mmap, "fit": fit, "peak": peak,
                       "gguf": gguf, "file_rule": file_rule, "load_ms": load_ms,
                       "err": (gguf - peak) / peak * 100, "file_err": (file_rule - peak) / peak * 100,
                       "terms": est}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "terms"}), flush=True)
    held = [r for r in rows if not r["fit"]]
    ok = all(-3.0 <= r["err"] <= 10.0 for r in rows)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cgroup = "v2" if cgroup_root()[1] == "memory.peak" else "v1 (memory)"
    lines = [BEGIN, "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             f"`python3 bench/estimate.py{' --quick' if quick else ''}` on {platform.node()}: "
             f"{platform.machine()}, {os.cpu_count()} CPUs, {mem:.1f} GiB, Linux {platform.release()}, "
             f"cgroup {cgroup}.", "",
             "| model | file MiB | ctx | mmap | set | measured peak MiB | gguf estimate MiB | error | file x 1.5 MiB | its error | load ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {mib(r['file'])} | {r['ctx']} | {'on' if r['mmap'] else 'off'} | {'fit' if r['fit'] else 'held out'} | "
                     f"{mib(r['peak'])} | {mib(r['gguf'])} | {r['err']:+.1f}% | {mib(r['file_rule'])} | {r['file_err']:+.1f}% | {r['load_ms']:.0f} |")
    worst_under = min(r["err"] for r in rows)
    worst_over = max(r["err"] for r in rows)
    lines += ["",
              f"{len(rows)} cells ({len(held)} held out from the fit). gguf estimate error: from {worst_under:+.1f}% to {worst_over:+.1f}%; "
              f"goal (every cell within -3%..+10%): {'met' if ok else 'NOT met'}. "
              f"file x 1.5 rule: from {min(r['file_err'] for r in rows):+.1f}% to {max(r['file_err'] for r in rows):+.1f}%.",
              "", END]
    if "--no-write" not in sys.argv:
        text = open(DOC).read()
        block = "\n".join(lines)
        if BEGIN in text:
            pre = text[: text.index(BEGIN)]
            post = text[text.index(END) + len(END):]
            text = pre + block + post
        else:
            text = text.rstrip("\n") + "\n\n## Memory estimate accuracy (bench/estimate.py)\n\n" + block + "\n"
        open(DOC, "w").write(text)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
