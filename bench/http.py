#!/usr/bin/env python3
"""HTTP API overhead (issue 18): time to first token and tokens/s through the supervisor's
OpenAI-compatible HTTP API against the worker link directly, same model, ctx and threads, in the
same run; then 4 concurrent clients on 2 instances.

Sides:
  link  the real `worker serve --connect SOCK` started by this script (root, no cgroup), spoken
        to over its Unix socket (4-byte big-endian length + JSON frames), a `Prompt` with
        mode `completion`.
  http  `supervisor run --http 127.0.0.1:0` with one instance of the same model (the worker runs
        as the default worker_user `belljar-worker` in the supervisor's cgroup under
        `bench-http`), a streaming `POST /v1/completions` over a raw TCP socket.
This script, its client threads and the link-side worker run at nice 0 (--nice), the value the
supervisor's workers run at (the supervisor itself runs at -5). Both sides run the same worker binary and model (copied to a 0755 directory under
/var/lib/belljar-bench so that belljar-worker can read them). Repetitions alternate link, http,
link, http, ... after one warm-up request on each side.

TTFT: from just before the request is written (the TCP connection is already open) to the
arrival of the first token with non-empty text. Tokens/s: (generated tokens - 1) / (arrival of
the last non-empty token - arrival of the first), the generated tokens taken from `Done.tokens`
(link) and the stream's usage chunk (http). Frames and SSE events are only time-stamped while
streaming; their JSON is parsed after the request ends, so the client's per-token work is about
the same on both sides.

Needs root, Python 3.11 standard library only. Binaries: --bin DIR, else $BELLJAR_BIN, else
target/release under the repository, e.g.

    python3 bench/http.py --bin /work/cat-target/release
    python3 bench/http.py --bin /work/cat-target/release --threads 1,2 --reps 15 --gen 256

A real GGUF model in $BELLJAR_MODEL_CACHE or /var/cache/belljar/models (a SmolLM2 file) is run
too when present; skipped silently otherwise. Prints Markdown tables.
"""
import argparse
import glob
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/var/lib/belljar-bench"
# The instances' reservation (their cgroup memory limit), as in the shipped budgets.toml.
RAM_LIMIT = os.environ.get("BENCH_RAM_LIMIT", "256MiB")
# About 32 tokens on the demo model's tokenizer (the tables show the count the worker saw).
PROMPT = "Tell me about the bell jar, now."  # 31 tokens with the demo model


def now():
    return time.perf_counter()


# ---------------------------------------------------------------- the worker link, directly

def send_frame(conn, msg):
    data = json.dumps(msg).encode()
    conn.sendall(struct.pack(">I", len(data)) + data)


class FrameReader:
    def __init__(self, conn):
        self.conn = conn
        self.buf = bytearray()

    def frames(self):
        """Yields (arrival time, raw body) of each frame as it is complete."""
        while True:
            while len(self.buf) >= 4:
                (n,) = struct.unpack_from(">I", self.buf)
                if len(self.buf) < 4 + n:
                    break
                body = bytes(self.buf[4:4 + n])
                del self.buf[:4 + n]
                yield self.t, body
            chunk = self.conn.recv(1 << 16)
            self.t = now()
            if not chunk:
                raise EOFError("the worker closed the link")
            self.buf += chunk

    def next(self):
        for t, body in self.frames():
            m = json.loads(body)
            if m["type"] != "Heartbeat":
                return m


class LinkWorker:
    def __init__(self, worker, model, tmp, ctx, threads):
        sock = os.path.join(tmp, "link.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock)
        srv.listen(1)
        args = [worker, "serve", "--connect", sock, "--instance", "link", "--model", model,
                "--state-dir", os.path.join(tmp, "link-state"), "--ctx", str(ctx),
                "--threads", str(threads), "--required", "0", "--headroom", "0"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        srv.settimeout(60)
        self.conn, _ = srv.accept()
        srv.close()
        self.conn.settimeout(600)
        self.reader = FrameReader(self.conn)
        hello = self.reader.next()
        assert hello["type"] == "Hello", hello
        send_frame(self.conn, {"type": "Welcome", "protocol_version": hello["protocol_version"]})
        while True:
            m = self.reader.next()
            if m["type"] == "Ready":
                break
            if m["type"] != "Loading":
                raise RuntimeError(f"worker did not get ready: {m}")
        self.next_id = 1

    def request(self, prompt, gen):
        rid = self.next_id
        self.next_id += 1
        msg = {"type": "Prompt", "id": rid, "mode": "completion", "text": prompt, "max_tokens": gen,
               "ignore_eos": True, "sampling": {"temperature": 0}}
        data = json.dumps(msg).encode()
        data = struct.pack(">I", len(data)) + data
        events = []
        t0 = now()
        self.conn.sendall(data)
        for t, body in self.reader.frames():
            events.append((t, body))
            if b'"Done"' in body or b'"Error"' in body:
                break
        toks = []
        done = None
        for t, body in events:
            m = json.loads(body)
            if m["type"] == "Token" and m["id"] == rid:
                if m["text"]:
                    toks.append(t)
            elif m["type"] == "Done" and m["id"] == rid:
                done = m
            elif m["type"] == "Error":
                raise RuntimeError(f"worker error: {m}")
        return result(t0, toks, done["tokens"], done.get("prompt_tokens", 0))

    def close(self):
        try:
            send_frame(self.conn, {"type": "Shutdown"})
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- HTTP

def http_stream(addr, model, prompt, gen):
    host, port = addr.rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": gen, "ignore_eos": True,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(600)
    events = []  # (arrival time, raw SSE event)
    head = bytearray()
    buf = bytearray()
    chunked = None
    t0 = now()
    s.sendall(req)
    try:
        while True:
            data = s.recv(1 << 16)
            t = now()
            if not data:
                break
            if chunked is None:
                head += data
                i = head.find(b"\r\n\r\n")
                if i < 0:
                    continue
                headers = bytes(head[:i]).decode("latin-1")
                status = headers.split(" ", 2)[1]
                if status != "200":
                    raise RuntimeError(f"HTTP {status}: {bytes(head[i + 4:])[:500]!r}")
                if "transfer-encoding: chunked" not in headers.lower():
                    raise RuntimeError(f"not chunked: {headers}")
                chunked = Chunked()
                data = bytes(head[i + 4:])
            buf += chunked.feed(data)
            while True:
                j = buf.find(b"\n\n")
                if j < 0:
                    break
                events.append((t, bytes(buf[:j])))
                del buf[:j + 2]
            if events and events[-1][1].endswith(b"[DONE]"):
                break
            if chunked.end:
                break
    finally:
        s.close()
    toks = []
    usage = None
    for t, ev in events:
        for line in ev.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            m = json.loads(payload)
            if "error" in m:
                raise RuntimeError(f"stream error: {m}")
            if m.get("choices") and m["choices"][0].get("text"):
                toks.append(t)
            if m.get("usage"):
                usage = m["usage"]
    if usage is None:
        raise RuntimeError("no usage chunk in the stream")
    return result(t0, toks, usage["completion_tokens"], usage.get("prompt_tokens", 0))


class Chunked:
    """Incremental HTTP/1.1 chunked-transfer decoder (state machine over bytes)."""

    def __init__(self):
        self.raw = bytearray()
        self.left = 0       # data bytes left in the current chunk
        self.state = "size"  # size | data | crlf
        self.end = False

    def feed(self, data):
        self.raw += data
        out = bytearray()
        while self.raw and not self.end:
            if self.state == "size":
                i = self.raw.find(b"\r\n")
                if i < 0:
                    break
                self.left = int(bytes(self.raw[:i]).split(b";")[0], 16)
                del self.raw[:i + 2]
                if self.left == 0:
                    self.end = True
                    break
                self.state = "data"
            elif self.state == "data":
                take = min(self.left, len(self.raw))
                out += self.raw[:take]
                del self.raw[:take]
                self.left -= take
                if self.left == 0:
                    self.state = "crlf"
            else:
                if len(self.raw) < 2:
                    break
                del self.raw[:2]
                self.state = "size"
        return bytes(out)


class Supervisor:
    def __init__(self, sup, worker, model, tmp, ctx, threads, instances):
        self.tmp = tmp
        conf = os.path.join(tmp, "budgets.toml")
        with open(conf, "w") as f:
            f.write('[budget]\nmin_required = "16MiB"\nheadroom = "64MiB"\n[defaults]\n'
                    f'model = "{model}"\nctx = {ctx}\nthreads = {threads}\n'
                    f'ram_limit = "{RAM_LIMIT}"\n')
            for nm in instances:
                f.write(f"[instances.{nm}]\n")
            f.write(f"[modes.bench]\ninstances = {json.dumps(instances)}\n")
        self.runtime = os.path.join(tmp, "run")
        self.sup = sup
        self.log = open(os.path.join(tmp, "supervisor.log"), "w")
        self.proc = subprocess.Popen(
            [sup, "run", "--mode", "bench", "--config", conf, "--runtime-dir", self.runtime,
             "--state-dir", os.path.join(tmp, "sup-state"), "--cgroup-parent", "bench-http",
             "--http", "127.0.0.1:0", "--worker", worker],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("supervisor exited: " + open(self.log.name).read()[-2000:])
            st = self.status()
            if st and st.get("http_addr") and all(i["state"] == "ready" for i in st["instances"]):
                self.addr = st["http_addr"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisor not ready: {st}")
            time.sleep(0.1)

    def status(self):
        r = subprocess.run([self.sup, "status", "--json", "--runtime-dir", self.runtime],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- measurement

def result(t0, toks, tokens, prompt_tokens):
    if not toks:
        raise RuntimeError("no token with text")
    span = toks[-1] - toks[0]
    return {"ttft_ms": (toks[0] - t0) * 1e3, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "tps": (tokens - 1) / span if span > 0 and tokens > 1 else float("nan"),
            "first": toks[0], "last": toks[-1], "t0": t0}


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def single(bins, model, label, tmp, args, threads):
    worker = os.path.join(bins, "worker")
    ldir = os.path.join(tmp, f"link-{threads}")
    os.makedirs(ldir, exist_ok=True)
    link = LinkWorker(worker, model, ldir, args.ctx, threads)
    sdir = os.path.join(tmp, f"sup-{threads}")
    os.makedirs(sdir, exist_ok=True)
    sup = Supervisor(os.path.join(bins, "supervisor"), worker, model, sdir, args.ctx, threads, ["a"])
    runs = {"link": [], "http": []}
    try:
        link.request(PROMPT, args.gen)  # warm-up
        http_stream(sup.addr, "a", PROMPT, args.gen)
        for i in range(args.reps):
            order = ("link", "http") if i % 2 == 0 else ("http", "link")
            for side in order:
                r = link.request(PROMPT, args.gen) if side == "link" else \
                    http_stream(sup.addr, "a", PROMPT, args.gen)
                runs[side].append(r)
    finally:
        link.close()
        sup.close()
    return summarize(label, threads, args, runs)


def summarize(label, threads, args, runs):
    s = {"model": label, "threads": threads, "gen": args.gen,
         "prompt_tokens": sorted({r["prompt_tokens"] for side in runs.values() for r in side}),
         "tokens": sorted({r["tokens"] for side in runs.values() for r in side})}
    for side, rs in runs.items():
        s[side] = {"ttft_med": statistics.median(r["ttft_ms"] for r in rs),
                   "ttft_p90": pct([r["ttft_ms"] for r in rs], 0.9),
                   "tps_med": statistics.median(r["tps"] for r in rs),
                   "tps_p90": pct([r["tps"] for r in rs], 0.1),  # the slow tail: 10th percentile
                   "ttft_all": [round(r["ttft_ms"], 3) for r in rs],
                   "tps_all": [round(r["tps"], 1) for r in rs]}
    return s


def concurrent(bins, model, label, tmp, args, threads):
    worker = os.path.join(bins, "worker")
    sdir = os.path.join(tmp, "sup-conc")
    os.makedirs(sdir, exist_ok=True)
    sup = Supervisor(os.path.join(bins, "supervisor"), worker, model, sdir, args.ctx, threads, ["a", "b"])
    results = []
    errors = []
    lock = threading.Lock()
    try:
        for inst in ("a", "b"):
            http_stream(sup.addr, inst, PROMPT, args.gen)  # warm-up
        start = threading.Barrier(4)

        def client(inst):
            try:
                start.wait()
                for _ in range(args.conc_reqs):
                    r = http_stream(sup.addr, inst, PROMPT, args.gen)
                    r["inst"] = inst
                    with lock:
                        results.append(r)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))

        ths = [threading.Thread(target=client, args=(inst,)) for inst in ("a", "a", "b", "b")]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    finally:
        sup.close()
    if errors:
        raise RuntimeError(f"concurrent clients failed: {errors}")
    t_begin = min(r["t0"] for r in results)
    t_end = max(r["last"] for r in results)
    total = sum(r["tokens"] for r in results)
    # Time a request spent generating (first to last token) vs. waiting (send to first token).
    ttfts = [r["ttft_ms"] for r in results]
    return {"model": label, "threads": threads, "requests": len(results), "tokens": total,
            "wall_s": t_end - t_begin, "agg_tps": total / (t_end - t_begin),
            "ttft_med": statistics.median(ttfts), "ttft_p90": pct(ttfts, 0.9),
            "ttft_min": min(ttfts), "ttft_max": max(ttfts),
            "tps_med": statistics.median(r["tps"] for r in results),
            "gen_ms_med": statistics.median((r["last"] - r["first"]) * 1e3 for r in results)}


def machine():
    model_name = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({model_name}), {mem:.1f} GiB, "
            f"Linux {platform.release()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.environ.get("BELLJAR_BIN", os.path.join(ROOT, "target", "release")),
                    help="directory with the release `worker` and `supervisor` (default: $BELLJAR_BIN or target/release)")
    ap.add_argument("--threads", default="1,2", help="llama.cpp threads, a comma-separated list (each measured)")
    ap.add_argument("--conc-threads", type=int, default=1, help="threads per instance in the concurrency run")
    ap.add_argument("--reps", type=int, default=12, help="measured requests per side")
    ap.add_argument("--gen", type=int, default=256, help="tokens generated per request")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--conc-reqs", type=int, default=5, help="requests per client in the concurrency run")
    ap.add_argument("--nice", type=int, default=0,
                    help="nice value of this client and the link-side worker (the supervisor's workers run at 0)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/http.py needs root (cgroups, the supervisor, worker_user)")
    # The supervisor runs itself at nice -5 and its workers at 0; the client and the link-side
    # worker get 0 too, so both workers compete alike with the rest of the machine.
    os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    bins = os.path.abspath(args.bin)
    for b in ("worker", "supervisor"):
        if not os.access(os.path.join(bins, b), os.X_OK):
            sys.exit(f"no {b} in {bins}: build with cargo build --release --workspace --bins, or pass --bin DIR")

    os.makedirs(WORK, mode=0o755, exist_ok=True)
    os.chmod(WORK, 0o755)
    tmp = tempfile.mkdtemp(prefix="http-", dir=WORK)
    os.chmod(tmp, 0o755)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "single": [], "concurrent": []}
    try:
        # Copies the workers (and so the belljar-worker user) can reach.
        binc = os.path.join(tmp, "bin")
        os.mkdir(binc, 0o755)
        for b in ("worker", "supervisor"):
            shutil.copy2(os.path.join(bins, b), os.path.join(binc, b))
        models = []
        demo = os.path.join(tmp, "demo.gguf")
        subprocess.run([os.path.join(binc, "worker"), "make-model", demo], check=True,
                       stdout=subprocess.DEVNULL)
        os.chmod(demo, 0o644)
        models.append(("demo (generated, 2 layers, width 256, vocab 1024)", demo))
        cache = os.environ.get("BELLJAR_MODEL_CACHE", "/var/cache/belljar/models")
        real = sorted(glob.glob(os.path.join(cache, "*[Ss]mol[Ll][Mm]2*.gguf")))
        if real:
            dst = os.path.join(tmp, os.path.basename(real[0]))
            shutil.copy(real[0], dst)
            os.chmod(dst, 0o644)
            models.append((os.path.basename(real[0]), dst))
        threads = [int(t) for t in args.threads.split(",")]
        for label, path in models:
            for th in threads:
                print(f"# {label}, threads {th}: {args.reps} x (link, http) ...", file=sys.stderr, flush=True)
                out["single"].append(single(binc, path, label, tmp, args, th))
            print(f"# {label}: 4 clients on 2 instances ...", file=sys.stderr, flush=True)
            out["concurrent"].append(concurrent(binc, path, label, tmp, args, args.conc_threads))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    report(out, args)


def report(out, args):
    print(f"Measured {out['date']} by `python3 bench/http.py` on {out['machine']}.\n")
    print("| model | threads | prompt / gen tokens | TTFT median link / HTTP (ms) | difference | "
          "TTFT p90 link / HTTP (ms) | difference | tokens/s median link / HTTP | ratio | "
          "tokens/s p10 link / HTTP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in out["single"]:
        ln, ht = s["link"], s["http"]
        print(f"| {s['model']} | {s['threads']} | {'/'.join(map(str, s['prompt_tokens']))} / "
              f"{'/'.join(map(str, s['tokens']))} | {ln['ttft_med']:.3f} / {ht['ttft_med']:.3f} | "
              f"{ht['ttft_med'] - ln['ttft_med']:+.3f} ms | {ln['ttft_p90']:.3f} / {ht['ttft_p90']:.3f} | "
              f"{ht['ttft_p90'] - ln['ttft_p90']:+.3f} ms | {ln['tps_med']:.0f} / {ht['tps_med']:.0f} | "
              f"{ht['tps_med'] / ln['tps_med'] * 100:.1f}% | {ln['tps_p90']:.0f} / {ht['tps_p90']:.0f} |")
    print()
    print("| model | threads per instance | requests | tokens | wall (s) | aggregate tokens/s | "
          "TTFT median (ms) | TTFT p90 (ms) | TTFT min / max (ms) | per-request tokens/s median |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in out["concurrent"]:
        print(f"| {c['model']} | {c['threads']} | {c['requests']} | {c['tokens']} | {c['wall_s']:.2f} | "
              f"{c['agg_tps']:.0f} | {c['ttft_med']:.1f} | {c['ttft_p90']:.1f} | "
              f"{c['ttft_min']:.1f} / {c['ttft_max']:.1f} | {c['tps_med']:.0f} |")
    print()
    for s in out["single"]:
        for side in ("link", "http"):
            print(f"<!-- {s['model']} t{s['threads']} {side} ttft {s[side]['ttft_all']} tps {s[side]['tps_all']} -->")


if __name__ == "__main__":
    main()
