#!/usr/bin/env python3
"""Chat against llama-cpp-python (issue 19): time to first token and tokens/s of streaming
`POST /v1/chat/completions` through belljar and through llama-cpp-python's OpenAI server, on the
same real model (SmolLM2-135M-Instruct, from scripts/fetch-models), ctx, threads and prompts, in
the same run; the answers both give to two questions at temperature 0; and a 10-turn chat that
resends its history, to see what prefix reuse saves.

Sides:
  belljar           `supervisor run --http 127.0.0.1:0` with one instance of the model (the worker
                    runs as the default worker_user `belljar-worker` in the supervisor's cgroup
                    under `bench-chat`; binaries and model copied to a 0755 directory under
                    /var/lib/belljar-bench so that belljar-worker can read them).
  llama-cpp-python  `python -m llama_cpp.server --model M --n_ctx CTX --n_threads T
                    --n_threads_batch T` (it renders the GGUF's own chat template), from a venv at
                    target/bench-venv that this script builds once when it is missing (pip
                    compiles llama.cpp from source: many minutes; CMAKE_BUILD_PARALLEL_LEVEL is
                    passed on).
Both are spoken to with the same raw-socket client: TTFT is from just before the request is
written (the TCP connection is already open) to the arrival of the first chunk with non-empty
`delta.content`; tokens/s is (completion tokens - 1) / (last content chunk - first content
chunk). Completion tokens come from the stream's usage chunk (`stream_options.include_usage`);
where a server sends none (llama-cpp-python), from the usage of the same request made once
without streaming (temperature 0, so the same answer). Chunks are only time-stamped while
streaming and parsed after the request ends. After one warm-up request per prompt and side,
--reps requests per prompt alternate belljar, llama-cpp-python, llama-cpp-python, belljar, ...;
before each, a one-token request on the same server replaces its cached prompt, so that no
measured request reuses the previous copy of itself (both servers keep the last prompt's KV and
reuse the longest common prefix: only the chat template's opening is shared).

The chat: 10 user turns, each request sending the whole history (earlier replies as assistant
messages), max_tokens 48, on belljar (prefix reuse on), belljar with `"cache_prompt": false`
(llama.cpp server's name; a belljar that does not know it ignores it) and llama-cpp-python;
--chat-reps conversations per side, per-turn medians. Cached tokens per turn come from
`usage.prompt_tokens_details.cached_tokens` where the server reports it ("-" where not); for
llama-cpp-python, from its verbose log ("N prefix-match hit"), marked "log".

Needs root, Python 3.11 standard library only. Binaries: --bin DIR, else $BELLJAR_BIN, else
target/release under the repository, e.g.

    python3 bench/chat.py --bin /work/cat-target/release
    python3 bench/chat.py --threads 2 --reps 10 --chat-reps 3

Prints Markdown tables.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
# No urllib: bench/http.py, beside this script, shadows the standard library's http package.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/var/lib/belljar-bench"
MODEL_NAME = "smollm2-135m-instruct"
# llama-cpp-python: the version this script builds (it bundles llama.cpp 0c1e57098, ggml 0.25.3).
LLCP_VERSION = "0.3.36"
# What the venv's llama-cpp-python is and which llama.cpp it built (ggml's own version and commit).
LLCP_PROBE = """
import ctypes, os, llama_cpp
lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
out = [llama_cpp.__version__]
for fn in ("ggml_version", "ggml_commit"):
    try:
        f = getattr(lib, fn)
        f.restype = ctypes.c_char_p
        out.append(f().decode())
    except AttributeError:
        out.append("?")
print(" ".join(out))
"""
# The instance's reservation (its cgroup memory limit): weights 98 MB + KV at ctx 2048.
RAM_LIMIT = os.environ.get("BENCH_RAM_LIMIT", "256MiB")
INSTANCE = "smollm2"

SHORT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PASSAGE = (
    "The bell jar is one of the oldest tools of the laboratory. It is a heavy dome of glass, open "
    "at the bottom, that rests on a flat plate and closes off a small volume of air from the room "
    "around it. In the seventeenth century Robert Boyle and Robert Hooke used a bell jar connected "
    "to an air pump to show that sound does not travel through a vacuum: a ringing bell placed "
    "under the glass grew fainter and fainter as the air was drawn out, until it could be seen "
    "striking but no longer heard. The same apparatus showed that a candle flame dies without "
    "air, that a small animal cannot breathe in it, and that the boiling point of water falls as "
    "the pressure drops. Victorian households later borrowed the shape for a gentler purpose. "
    "Clocks, stuffed birds, wax flowers and delicate collections of shells were kept under glass "
    "domes on the mantelpiece, protected from dust, curious fingers and the soot of coal fires. "
    "Gardeners used a similar glass, the cloche, to shelter seedlings from frost in early spring, "
    "trapping the warmth of the day around a single plant. In the twentieth century the bell jar "
    "became a metaphor as well as an instrument. Sylvia Plath gave the title The Bell Jar to her "
    "only novel, in which the narrator describes depression as living under a glass that sours "
    "the air she breathes and separates her from everyone outside it. Engineers today still use "
    "vacuum chambers that descend directly from the bell jar to test spacecraft parts, to coat "
    "lenses with thin films of metal and to study how materials behave when the air around them "
    "is removed. A modern chamber may be made of steel rather than glass, and its pumps may reach "
    "pressures a billion times lower than Boyle could, but the idea is unchanged: close off a "
    "small world, control what is inside it, and watch carefully what happens. The jar isolates, "
    "protects and reveals, all at once, which is why the image has lasted so long in both science "
    "and literature."
)
LONG = PASSAGE + "\n\nSummarize the passage above in a few sentences."
PROMPTS = [("short", SHORT), ("long", LONG)]
QUESTIONS = [("What is 2 + 2?", "4"), ("What color is the sky on a clear day?", "blue")]
CHAT = [
    "Hi! I want to start a small vegetable garden on my balcony. Where should I begin?",
    "My balcony faces south and gets sun most of the day. Which vegetables would do well?",
    "I like tomatoes. How big should the pots be?",
    "What kind of soil should I buy for them?",
    "How often should I water the tomatoes in summer?",
    "Some leaves are turning yellow at the bottom. What could that mean?",
    "Should I use fertilizer? Which kind?",
    "Can I grow basil in the same pot as the tomatoes?",
    "When will the first tomatoes be ready to pick?",
    "Thanks! Can you summarize the most important tips in a short list?",
]


def now():
    return time.perf_counter()


# ---------------------------------------------------------------- HTTP client

class Chunked:
    """Incremental HTTP/1.1 chunked-transfer decoder (state machine over bytes)."""

    def __init__(self):
        self.raw = bytearray()
        self.left = 0
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


def stream_chat(addr, body):
    """One streaming chat request over a fresh TCP connection. Returns the time-stamped result:
    ttft_ms, content chunk arrival times, the text, the usage chunk (or None)."""
    host, port = addr.rsplit(":", 1)
    data = json.dumps(dict(body, stream=True, stream_options={"include_usage": True})).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
           f"Accept: text/event-stream\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
           ).encode() + data
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(600)
    events = []  # (arrival time, raw SSE event)
    head = bytearray()
    buf = bytearray()
    decoder = None  # Chunked, or "raw" (read to EOF)
    pending_cr = b""
    t0 = now()
    s.sendall(req)
    try:
        while True:
            chunk = s.recv(1 << 16)
            t = now()
            if not chunk:
                break
            if decoder is None:
                head += chunk
                i = head.find(b"\r\n\r\n")
                if i < 0:
                    continue
                headers = bytes(head[:i]).decode("latin-1")
                status = headers.split(" ", 2)[1]
                rest = bytes(head[i + 4:])
                if status != "200":
                    raise RuntimeError(f"HTTP {status} from {addr}: {rest[:500]!r}")
                decoder = Chunked() if "transfer-encoding: chunked" in headers.lower() else "raw"
                chunk = rest
            payload = chunk if decoder == "raw" else decoder.feed(chunk)
            # SSE lines may end in \r\n (llama-cpp-python's sse-starlette) or \n (belljar).
            payload = pending_cr + payload
            pending_cr = b""
            if payload.endswith(b"\r"):
                payload, pending_cr = payload[:-1], b"\r"
            buf += payload.replace(b"\r\n", b"\n")
            while True:
                j = buf.find(b"\n\n")
                if j < 0:
                    break
                events.append((t, bytes(buf[:j])))
                del buf[:j + 2]
            if events and events[-1][1].endswith(b"[DONE]"):
                break
            if decoder != "raw" and decoder.end:
                break
    finally:
        s.close()
    toks = []
    text = []
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
                raise RuntimeError(f"stream error from {addr}: {m}")
            for ch in m.get("choices") or []:
                c = (ch.get("delta") or {}).get("content")
                if c:
                    toks.append(t)
                    text.append(c)
            if m.get("usage"):
                usage = m["usage"]
    if not toks:
        raise RuntimeError(f"no content from {addr} for {body.get('messages', [])[-1:]}")
    return {"t0": t0, "ttft_ms": (toks[0] - t0) * 1e3, "first": toks[0], "last": toks[-1],
            "chunks": len(toks), "text": "".join(text), "usage": usage}


def request_json(addr, method, path, body=None, timeout=600):
    """A plain (not streamed) request; the JSON answer of a 200, else RuntimeError."""
    host, port = addr.rsplit(":", 1)
    data = b"" if body is None else json.dumps(body).encode()
    req = (f"{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(req)
        raw = bytearray()
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            raw += chunk
    i = raw.find(b"\r\n\r\n")
    if i < 0:
        raise RuntimeError(f"no HTTP answer from {addr}{path}")
    headers = bytes(raw[:i]).decode("latin-1")
    payload = bytes(raw[i + 4:])
    if "transfer-encoding: chunked" in headers.lower():
        payload = Chunked().feed(payload)
    status = headers.split(" ", 2)[1]
    if status != "200":
        raise RuntimeError(f"HTTP {status} from {addr}{path}: {payload[:500]!r}")
    return json.loads(payload)


def post_json(addr, path, body):
    return request_json(addr, "POST", path, body)


def cached_tokens(usage):
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    v = details.get("cached_tokens")
    return v if isinstance(v, int) else None


# ---------------------------------------------------------------- the servers

class Belljar:
    name = "belljar"

    def __init__(self, sup, worker, model, tmp, ctx, threads):
        self.tmp = tmp
        conf = os.path.join(tmp, "budgets.toml")
        with open(conf, "w") as f:
            f.write('[budget]\nmin_required = "16MiB"\nheadroom = "64MiB"\n[defaults]\n'
                    f'model = "{model}"\nctx = {ctx}\nthreads = {threads}\n'
                    f'ram_limit = "{RAM_LIMIT}"\n'
                    f'[instances.{INSTANCE}]\n[modes.bench]\ninstances = ["{INSTANCE}"]\n')
        self.runtime = os.path.join(tmp, "run")
        self.sup = sup
        self.log = open(os.path.join(tmp, "supervisor.log"), "w")
        self.proc = subprocess.Popen(
            [sup, "run", "--mode", "bench", "--config", conf, "--runtime-dir", self.runtime,
             "--state-dir", os.path.join(tmp, "sup-state"), "--cgroup-parent", "bench-chat",
             "--http", "127.0.0.1:0", "--worker", worker, "--log-format", "text"],
            stdout=self.log, stderr=self.log)
        self.model = INSTANCE
        deadline = time.monotonic() + 120
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

    def log_cached(self):
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


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LlamaCppPython:
    name = "llama-cpp-python"

    def __init__(self, python, model, tmp, ctx, threads):
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.logpath = os.path.join(tmp, "llama-cpp-python.log")
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx),
             "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=self.log, stderr=self.log, cwd=tmp)  # not bench/: its http.py shadows the stdlib's
        self.logpos = 0
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited: " + open(self.logpath).read()[-2000:])
            try:
                self.model = request_json(self.addr, "GET", "/v1/models", timeout=5)["data"][0]["id"]
                break
            except (OSError, ValueError, KeyError, IndexError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server not ready: " + open(self.logpath).read()[-2000:])
            time.sleep(0.2)
        self.log_cached()

    def log_cached(self):
        """(prompt tokens reused, prompt tokens or None) of the last request since the last
        call, from the verbose log's "N prefix-match hit, remaining M prompt tokens to eval"."""
        with open(self.logpath, "rb") as f:
            f.seek(self.logpos)
            new = f.read()
            self.logpos = f.tell()
        hits = re.findall(rb"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens", new)
        if not hits:
            return (0, None)
        return (int(hits[-1][0]), int(hits[-1][0]) + int(hits[-1][1]))

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def llcp_python(venv):
    return os.path.join(venv, "bin", "python")


def ensure_llcp(venv):
    """The llama-cpp-python venv: built once (pip compiles llama.cpp). Returns its facts."""
    py = llcp_python(venv)
    facts_path = os.path.join(venv, ".belljar-build.json")
    ok = os.access(py, os.X_OK) and subprocess.run(
        [py, "-c", "import llama_cpp.server.app"], capture_output=True, cwd="/").returncode == 0
    if not ok:
        print(f"# building llama-cpp-python {LLCP_VERSION} into {venv} (compiles llama.cpp; "
              f"CMAKE_BUILD_PARALLEL_LEVEL={os.environ.get('CMAKE_BUILD_PARALLEL_LEVEL', 'unset')}) ...",
              file=sys.stderr, flush=True)
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                        f"llama-cpp-python[server]=={LLCP_VERSION}"], check=True)
        with open(facts_path, "w") as f:
            json.dump({"build_s": round(time.monotonic() - t), "date": time.strftime("%Y-%m-%d")}, f)
    probe = subprocess.run([py, "-c", LLCP_PROBE], capture_output=True, text=True, cwd="/")
    version, ggml, commit = (probe.stdout.split() + ["?"] * 3)[:3] if probe.returncode == 0 else ("?", "?", "?")
    facts = {"version": version, "llama_cpp": f"llama.cpp {commit}, ggml {ggml}"}
    try:
        with open(facts_path) as f:
            facts.update(json.load(f))
    except (OSError, ValueError):
        pass
    return facts


# ---------------------------------------------------------------- measurement

def pct(xs, p):
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def flush(server):
    """A one-token request, so the server's cached prompt is no longer the next request's."""
    stream_chat(server.addr, {"model": server.model, "temperature": 0, "max_tokens": 1,
                              "messages": [{"role": "user", "content": "Hello."}]})
    server.log_cached()


def measure(server, prompt, args, calib):
    flush(server)
    body = {"model": server.model, "temperature": 0, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    r = stream_chat(server.addr, body)
    if r["usage"]:
        tokens, ptoks = r["usage"]["completion_tokens"], r["usage"].get("prompt_tokens")
    else:
        tokens, ptoks = calib["tokens"], calib["prompt_tokens"]
    span = r["last"] - r["first"]
    r.update(tokens=tokens, prompt_tokens=ptoks,
             tps=(tokens - 1) / span if span > 0 and tokens > 1 else float("nan"))
    return r


def calibrate(server, prompt, args):
    """The warm-up: one streamed request, and where the stream has no usage chunk, the same
    request without streaming for its token counts (temperature 0: the same answer)."""
    flush(server)
    body = {"model": server.model, "temperature": 0, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    r = stream_chat(server.addr, body)
    if r["usage"]:
        return {"tokens": r["usage"]["completion_tokens"], "prompt_tokens": r["usage"].get("prompt_tokens"),
                "from": "stream usage"}
    flush(server)
    full = post_json(server.addr, "/v1/chat/completions", body)
    text = full["choices"][0]["message"]["content"]
    if text != r["text"]:
        print(f"# note: {server.name} streamed and unstreamed answers differ", file=sys.stderr)
    return {"tokens": full["usage"]["completion_tokens"], "prompt_tokens": full["usage"]["prompt_tokens"],
            "from": "unstreamed usage", "chunks": r["chunks"]}


def correctness(server):
    out = []
    for q, want in QUESTIONS:
        body = {"model": server.model, "temperature": 0, "messages": [{"role": "user", "content": q}]}
        ans = post_json(server.addr, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        out.append({"question": q, "answer": ans, "ok": want in ans.lower()})
    return out


def chat(server, extra, args):
    """One conversation of len(CHAT) turns, each resending the history."""
    flush(server)
    msgs = []
    turns = []
    for q in CHAT[:args.turns]:
        msgs.append({"role": "user", "content": q})
        body = dict({"model": server.model, "temperature": 0, "max_tokens": args.turn_tokens,
                     "messages": msgs}, **extra)
        r = stream_chat(server.addr, body)
        from_log = server.log_cached()
        cached, src = cached_tokens(r["usage"]), "usage"
        ptoks = (r["usage"] or {}).get("prompt_tokens")
        if cached is None and from_log is not None:
            cached, src = from_log[0], "log"
            ptoks = ptoks or from_log[1]
        turns.append({"ttft_ms": r["ttft_ms"], "cached": cached,
                      "cached_from": src if cached is not None else None, "prompt_tokens": ptoks})
        msgs.append({"role": "assistant", "content": r["text"]})
    return turns


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


def model_path():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fetch-models"), "--path", MODEL_NAME],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip() or f"scripts/fetch-models --path {MODEL_NAME} failed")
    return r.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.environ.get("BELLJAR_BIN", os.path.join(ROOT, "target", "release")),
                    help="directory with the release `worker` and `supervisor` (default: $BELLJAR_BIN or target/release)")
    ap.add_argument("--venv", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "bench-venv"),
                    help="llama-cpp-python's venv, built when missing (default: target/bench-venv)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads on both sides")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10, help="measured requests per prompt and side")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=len(CHAT), help=f"chat turns (at most {len(CHAT)})")
    ap.add_argument("--turn-tokens", type=int, default=48, help="max_tokens of each chat turn")
    ap.add_argument("--chat-reps", type=int, default=3, help="conversations per chat side")
    ap.add_argument("--nice", type=int, default=0,
                    help="nice value of this client and llama-cpp-python's server (belljar's workers run at 0)")
    ap.add_argument("--sides", default="belljar,llama-cpp-python",
                    help="which sides to run, comma-separated (default: both)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    want = set(args.sides.split(","))
    if not want or want - {"belljar", "llama-cpp-python"}:
        sys.exit(f"--sides: belljar and/or llama-cpp-python, not {args.sides!r}")
    if os.geteuid() != 0:
        sys.exit("bench/chat.py needs root (cgroups, the supervisor, worker_user)")
    args.turns = max(1, min(args.turns, len(CHAT)))
    bins = os.path.abspath(args.bin)
    for b in ("worker", "supervisor"):
        if not os.access(os.path.join(bins, b), os.X_OK):
            sys.exit(f"no {b} in {bins}: build with cargo build --release --workspace --bins, or pass --bin DIR")
    model = model_path()
    llcp = ensure_llcp(os.path.abspath(args.venv)) if "llama-cpp-python" in want else None
    os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    # SIGTERM (timeout, kill) unwinds like Ctrl-C: the servers are stopped, the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    os.makedirs(WORK, mode=0o755, exist_ok=True)
    os.chmod(WORK, 0o755)
    tmp = tempfile.mkdtemp(prefix="chat-", dir=WORK)
    os.chmod(tmp, 0o755)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_start": os.getloadavg()[0],
           "model": os.path.basename(model), "llcp": llcp, "args": vars(args)}
    servers = []
    try:
        binc = os.path.join(tmp, "bin")
        os.mkdir(binc, 0o755)
        for b in ("worker", "supervisor"):
            shutil.copy2(os.path.join(bins, b), os.path.join(binc, b))
        mcopy = os.path.join(tmp, os.path.basename(model))
        shutil.copy(model, mcopy)
        os.chmod(mcopy, 0o644)
        out["belljar_version"] = subprocess.run([os.path.join(binc, "supervisor"), "--version"],
                                                capture_output=True, text=True).stdout.strip()
        print(f"# starting {' and '.join(sorted(want))} ...", file=sys.stderr, flush=True)
        if "belljar" in want:
            servers.append(Belljar(os.path.join(binc, "supervisor"), os.path.join(binc, "worker"),
                                   mcopy, tmp, args.ctx, args.threads))
        if llcp:
            servers.append(LlamaCppPython(llcp_python(os.path.abspath(args.venv)), mcopy, tmp,
                                          args.ctx, args.threads))
        sides = list(servers)

        print("# correctness ...", file=sys.stderr, flush=True)
        out["answers"] = {s.name: correctness(s) for s in sides}

        out["single"] = []
        for label, prompt in PROMPTS:
            print(f"# {label} prompt: warm-up, then {args.reps} x ({', '.join(s.name for s in sides)}) ...",
                  file=sys.stderr, flush=True)
            calib = {s.name: calibrate(s, prompt, args) for s in sides}
            runs = {s.name: [] for s in sides}
            for i in range(args.reps):
                for s in (sides if i % 2 == 0 else sides[::-1]):
                    runs[s.name].append(measure(s, prompt, args, calib[s.name]))
            out["single"].append(summarize(label, runs, calib))

        variants = []
        for s in sides:
            variants.append((s.name, s, {}))
            if s.name == "belljar":
                variants.append(("belljar, cache_prompt false", s, {"cache_prompt": False}))
        print(f"# chat: {args.chat_reps} x {args.turns} turns on each of {len(variants)} sides ...",
              file=sys.stderr, flush=True)
        convs = {v[0]: [] for v in variants}
        for r in range(args.chat_reps):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, server, extra in order:
                convs[name].append(chat(server, extra, args))
        out["chat"] = {name: chat_summary(cs) for name, cs in convs.items()}
    finally:
        for s in servers:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    report(out, args)


def summarize(label, runs, calib):
    s = {"prompt": label, "sides": {}}
    for side, rs in runs.items():
        s["sides"][side] = {
            "prompt_tokens": sorted({r["prompt_tokens"] for r in rs if r["prompt_tokens"] is not None}),
            "tokens": sorted({r["tokens"] for r in rs}), "tokens_from": calib[side]["from"],
            "ttft_med": statistics.median(r["ttft_ms"] for r in rs),
            "ttft_p90": pct([r["ttft_ms"] for r in rs], 0.9),
            "tps_med": statistics.median(r["tps"] for r in rs),
            "tps_p90": pct([r["tps"] for r in rs], 0.1),  # the slow tail: 10th percentile of the rate
            "ttft_all": [round(r["ttft_ms"], 1) for r in rs], "tps_all": [round(r["tps"], 1) for r in rs]}
    return s


def chat_summary(convs):
    turns = []
    for t in range(len(convs[0])):
        xs = [c[t] for c in convs]
        cached = [x["cached"] for x in xs if x["cached"] is not None]
        turns.append({"ttft_med": statistics.median(x["ttft_ms"] for x in xs),
                      "ttft_all": [round(x["ttft_ms"], 1) for x in xs],
                      "cached": statistics.median(cached) if cached else None,
                      "cached_from": next((x["cached_from"] for x in xs if x["cached_from"]), None),
                      "prompt_tokens": next((x["prompt_tokens"] for x in xs if x["prompt_tokens"]), None)})
    return turns


def fmt_cached(t):
    if t["cached"] is None:
        return "-"
    c = f"{t['cached']:.0f}"
    return c + " (log)" if t["cached_from"] == "log" else c


def report(out, args):
    llcp = out["llcp"]
    lv = "" if not llcp else (f"; llama-cpp-python {llcp['version']} (bundles {llcp['llama_cpp']}"
                              + (f", built here in {llcp['build_s']} s" if "build_s" in llcp else "") + ")")
    print(f"Measured {out['date']} by `python3 bench/chat.py` on {out['machine']}: {out['model']}, "
          f"ctx {args.ctx}, {args.threads} threads on both sides, temperature 0, max_tokens "
          f"{args.max_tokens}, {args.reps} requests per prompt and side after a warm-up. belljar: "
          f"{out.get('belljar_version', '?')}{lv}. Load average (1 min) at start / end: "
          f"{out['load_start']:.1f} / {out['load_end']:.1f}.\n")
    print("| prompt | side | prompt / gen tokens | TTFT median (ms) | TTFT p90 (ms) | "
          "tokens/s median | tokens/s p90 (slow tail) |")
    print("|---|---|---|---|---|---|---|")
    for s in out["single"]:
        for side, v in s["sides"].items():
            note = "" if v["tokens_from"] == "stream usage" else "*"
            print(f"| {s['prompt']} | {side} | {'/'.join(map(str, v['prompt_tokens'])) or '?'} / "
                  f"{'/'.join(map(str, v['tokens']))}{note} | {v['ttft_med']:.1f} | {v['ttft_p90']:.1f} | "
                  f"{v['tps_med']:.1f} | {v['tps_p90']:.1f} |")
    star = any(v["tokens_from"] != "stream usage" for s in out["single"] for v in s["sides"].values())
    print("\n" + ("\\* token counts from the same request made once without streaming (the stream has no "
                  "usage chunk). " if star else "")
          + "tokens/s p90 is the rate of the 90th-percentile slowest request. Prompt tokens differ where "
          "the chat templates differ.\n")
    print("| side | question | answer | ok |")
    print("|---|---|---|---|")
    for side, answers in out["answers"].items():
        for a in answers:
            ans = a["answer"].strip().replace("\n", " ").replace("|", "\\|")
            print(f"| {side} | {a['question']} | {ans} | {'yes' if a['ok'] else 'NO'} |")
    print()
    names = list(out["chat"])
    print(f"Chat: {args.turns} turns resending the history, max_tokens {args.turn_tokens}, "
          f"median of {args.chat_reps} conversations per side; cached = prompt tokens reused.\n")
    print("| turn | " + " | ".join(f"{n}: prompt tokens | TTFT (ms) | cached" for n in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for t in range(args.turns):
        cells = []
        for n in names:
            x = out["chat"][n][t]
            cells.append(f"{x['prompt_tokens'] or '-'} | {x['ttft_med']:.1f} | {fmt_cached(x)}")
        print(f"| {t + 1} | " + " | ".join(cells) + " |")
    print()
    for s in out["single"]:
        for side, v in s["sides"].items():
            print(f"<!-- {s['prompt']} {side} ttft {v['ttft_all']} tps {v['tps_all']} -->")


if __name__ == "__main__":
    main()
