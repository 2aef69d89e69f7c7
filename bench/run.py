#!/usr/bin/env python3
"""belljar's benchmark harness: restart latency, OOM detection latency, start-50, RSS and idle CPU,
for belljar and, in the same run, for peer supervisors (a C fork/wait loop, daemontools, runit,
s6, supervisord, pm2) supervising `sleep`. Installs the peers itself (apt, pip, npm). Writes a
markdown report (docs/benchmarks.md by default). Run as root on an otherwise idle machine:

    python3 bench/run.py                # everything
    python3 bench/run.py --quick        # fewer kills, shorter idle window
    python3 bench/run.py --only belljar # just belljar
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
MARK = "86399.5"  # the argument every supervised `sleep` gets, to tell them apart
POLL = 0.001  # 1 ms polling, as in the reference numbers


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


SERVICE = re.compile(r"(^|/)sleep " + re.escape(MARK) + r"\s*$")


def supervised_sleeps():
    """The supervised `sleep MARK` processes (argv[0] may be a full path, as under pm2)."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and SERVICE.search(cmdline(int(d)))]


def wait_until(what, f, timeout=60.0, step=POLL):
    deadline = time.monotonic() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class Sut:
    """A supervisor under test: start(n) launches it with n services."""

    name = "?"

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None

    def services(self):
        return supervised_sleeps()

    def main_pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.services():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def popen(self, cmd, **kw):
        self.proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **kw)


class CLoop(Sut):
    name = "C fork/wait loop"

    def start(self, n):
        exe = os.path.join(self.tmp, "cloop")
        sh("cc", "-O2", "-o", exe, os.path.join(ROOT, "bench", "cloop.c"))
        self.popen([exe, str(n), "sleep", MARK])


class ServiceDirs(Sut):
    """runit, daemontools and s6 all scan a directory of service dirs with a `run` script."""

    scanner = []

    def start(self, n):
        d = os.path.join(self.tmp, "services")
        os.makedirs(d)
        for i in range(n):
            s = os.path.join(d, f"s{i}")
            os.makedirs(s)
            with open(os.path.join(s, "run"), "w") as f:
                f.write(f"#!/bin/sh\nexec sleep {MARK}\n")
            os.chmod(os.path.join(s, "run"), 0o755)
        self.popen(self.scanner + [d])


class Runit(ServiceDirs):
    name = "runit"
    scanner = ["runsvdir"]


class Daemontools(ServiceDirs):
    name = "daemontools"
    scanner = ["svscan"]


class S6(ServiceDirs):
    name = "s6"
    scanner = ["s6-svscan"]


class Supervisord(Sut):
    name = "supervisord"

    def start(self, n):
        conf = os.path.join(self.tmp, "supervisord.conf")
        with open(conf, "w") as f:
            f.write(f"[supervisord]\nnodaemon=true\nlogfile={self.tmp}/sd.log\npidfile={self.tmp}/sd.pid\n")
            for i in range(n):
                f.write(f"[program:s{i}]\ncommand=sleep {MARK}\nstartsecs=0\nautorestart=true\n"
                        "startretries=1000000\n")
        self.popen(["supervisord", "-c", conf])


class Pm2(Sut):
    name = "pm2"

    def start(self, n):
        self.env = dict(os.environ, PM2_HOME=os.path.join(self.tmp, "pm2"))
        eco = os.path.join(self.tmp, "eco.config.js")
        apps = ",".join(
            f'{{name:"s{i}",script:"sleep",args:"{MARK}",interpreter:"none",autorestart:true,'
            f'min_uptime:0,restart_delay:0,max_restarts:1000000}}' for i in range(n))
        with open(eco, "w") as f:
            f.write(f"module.exports={{apps:[{apps}]}};\n")
        self.proc = None
        sh("pm2", "start", eco, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def main_pid(self):
        with open(os.path.join(self.env["PM2_HOME"], "pm2.pid")) as f:
            return int(f.read().strip())

    def stop(self):
        subprocess.run(["pm2", "kill"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().stop()


class Belljar(Sut):
    name = "belljar"

    def start(self, n):
        model = os.path.join(self.tmp, "tiny.gguf")
        sh(os.path.join(BIN, "worker"), "make-model", model, "--layers", "1", "--width", "64", "--ff", "128",
           "--heads", "2", "--vocab", "300", stdout=subprocess.DEVNULL)
        conf = os.path.join(self.tmp, "budgets.toml")
        names = [f"b{i}" for i in range(n)]
        with open(conf, "w") as f:
            f.write('[budget]\nmin_required = "16MiB"\nheadroom = "64MiB"\n[defaults]\n'
                    f'model = "{model}"\nctx = 64\nbackoff_initial = "0s"\nstart_limit_burst = 1000000\n'
                    'start_limit_interval = "1s"\nthreads = 1\n')
            for nm in names:
                f.write(f"[instances.{nm}]\n")
            f.write(f"[modes.bench]\ninstances = {names!r}\n".replace("'", '"'))
        self.runtime = os.path.join(self.tmp, "run")
        self.popen([os.path.join(BIN, "supervisor"), "run", "--mode", "bench", "--config", conf,
                    "--runtime-dir", self.runtime, "--state-dir", os.path.join(self.tmp, "state"),
                    "--cgroup-parent", f"belljar-bench-{os.getpid()}"])

    def services(self):
        return [p for p in children(self.proc.pid) if "worker serve" in cmdline(p)]

    def stop(self):
        # A clean shutdown removes the instance cgroups; SIGKILL would leave them behind.
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        super().stop()


PEERS = [Belljar, CLoop, Daemontools, Runit, S6, Pm2, Supervisord]


def measure_restart(cls, kills):
    with tempfile.TemporaryDirectory(prefix="bj-bench-") as tmp:
        sut = cls(tmp)
        try:
            sut.start(1)
            wait_until("the service", lambda: sut.services())
            time.sleep(1.1)
            lat = []
            for _ in range(kills):
                victim = wait_until("the service", lambda: sut.services())[0]
                parent = ppid(victim)
                t0 = time.perf_counter()
                os.kill(victim, signal.SIGKILL)
                wait_until("a new service pid", lambda: [p for p in children(parent) if p != victim], timeout=30)
                lat.append((time.perf_counter() - t0) * 1000)
                # Let the new one run past every supervisor's minimum uptime (runsv and supervise
                # delay a restart when a service dies within a second of its start).
                time.sleep(1.1)
            return lat
        finally:
            sut.stop()


def measure_start(cls, n, idle_s):
    with tempfile.TemporaryDirectory(prefix="bj-bench-") as tmp:
        sut = cls(tmp)
        try:
            t0 = time.perf_counter()
            sut.start(n)
            wait_until(f"{n} services", lambda: len(sut.services()) >= n, timeout=120, step=0.002)
            start_ms = (time.perf_counter() - t0) * 1000
            time.sleep(2)  # let it settle (belljar: workers finish loading)
            pid = sut.main_pid()
            rss = rss_kib(pid)
            c0, w0 = cpu_ticks(pid), time.monotonic()
            time.sleep(idle_s)
            cpu = (cpu_ticks(pid) - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - w0) * 100
            return start_ms, rss, cpu
        finally:
            sut.stop()


def kernel_offset():
    """realtime - printk time, from a marker written to /dev/kmsg."""
    tag = f"belljar-bench-mark-{os.getpid()}-{time.monotonic_ns()}"
    t_before = time.time()
    with open("/dev/kmsg", "w") as f:
        f.write(tag + "\n")
    t_after = time.time()
    for line in subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines():
        if tag in line:
            ts = float(line.split("]", 1)[0].strip("[ "))
            return (t_before + t_after) / 2 - ts
    raise RuntimeError("marker not found in dmesg")


def measure_oom(count):
    """Kernel OOM kill (dmesg) -> the supervisor's `oom-kill` event (its log), per kill."""
    with tempfile.TemporaryDirectory(prefix="bj-bench-") as tmp:
        model = os.path.join(tmp, "kv.gguf")
        sh(os.path.join(BIN, "worker"), "make-model", model, "--layers", "4", "--width", "256", "--ff", "768",
           "--vocab", "1024", stdout=subprocess.DEVNULL)
        conf = os.path.join(tmp, "budgets.toml")
        with open(conf, "w") as f:
            f.write('[budget]\nestimate_factor = 1.0\nmin_required = "8MiB"\nheadroom = "64MiB"\ntotal = "36MiB"\n'
                    'per_instance_max = 0.5\n'
                    f'[defaults]\nmodel = "{model}"\nuse_mmap = false\nctx = 4096\nbackoff_initial = "200ms"\n'
                    f'backoff_factor = 1\nstart_limit_burst = {count}\nstart_limit_interval = "1h"\n'
                    '[instances.oom]\n[modes.m]\ninstances = ["oom"]\n')
        log = open(os.path.join(tmp, "log"), "w")
        offset = kernel_offset()
        proc = subprocess.Popen([os.path.join(BIN, "supervisor"), "run", "--mode", "m", "--config", conf,
                                 "--runtime-dir", os.path.join(tmp, "run"), "--state-dir", os.path.join(tmp, "st"),
                                 "--cgroup-parent", f"belljar-bench-oom-{os.getpid()}"],
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            def events():
                with open(log.name) as f:
                    return re.findall(r'^(\S+Z) .*event="oom-kill" pid=(\d+)', f.read(), re.M)
            wait_until(f"{count} OOM kills", lambda: len(events()) >= count, timeout=120, step=0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        kills = {}
        for line in subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines():
            m = re.match(r"\[\s*([\d.]+)\] Memory cgroup out of memory: Killed process (\d+)", line)
            if m:
                kills[int(m.group(2))] = float(m.group(1)) + offset
        lat = []
        for ts, pid in events():
            t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if int(pid) in kills:
                lat.append((t - kills[int(pid)]) * 1000)
        return lat


def install_peers():
    need_apt = [p for p, exe in [("daemontools", "svscan"), ("runit", "runsvdir"), ("s6", "s6-svscan")]
                if not shutil.which(exe)]
    if need_apt:
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *need_apt, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not shutil.which("supervisord"):
        sh(sys.executable, "-m", "pip", "install", "-q", "supervisor")
    if not shutil.which("pm2"):
        sh("npm", "install", "-g", "pm2")


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated subset: belljar,c,daemontools,runit,s6,pm2,supervisord")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = ap.parse_args()
    kills = 20 if args.quick else 30
    idle = 5 if args.quick else 10
    keys = {"belljar": Belljar, "c": CLoop, "daemontools": Daemontools, "runit": Runit, "s6": S6,
            "pm2": Pm2, "supervisord": Supervisord}
    suts = [keys[k] for k in args.only.split(",")] if args.only else PEERS
    if any(s not in (Belljar, CLoop) for s in suts):
        install_peers()
    sh("cargo", "build", "--release", "--workspace", "--bins", cwd=ROOT, stdout=subprocess.DEVNULL)

    rows = []
    for cls in suts:
        print(f"== {cls.name}", flush=True)
        lat = measure_restart(cls, kills)
        start_ms, rss, cpu = measure_start(cls, 50, idle)
        rows.append((cls.name, min(lat), statistics.median(lat), max(lat), start_ms, rss / 1024, cpu))
        print(f"   restart min/median/max {min(lat):.2f}/{statistics.median(lat):.2f}/{max(lat):.2f} ms; "
              f"start-50 {start_ms:.0f} ms; RSS {rss / 1024:.1f} MiB; idle CPU {cpu:.2f}%", flush=True)
    oom = measure_oom(8 if args.quick else 12) if Belljar in suts else []

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# Benchmarks", "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `python3 bench/run.py"
        f"{' --quick' if args.quick else ''}` on {platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mem:.1f} GiB, Linux {platform.release()}, cgroup "
        f"{'v2' if os.path.exists('/sys/fs/cgroup/cgroup.controllers') else 'v1 (memory) + v2 (no memory)'}.",
        "", "Method: each supervisor runs `sleep` (belljar: its real `worker` on a tiny generated model, "
        "each in its own cgroup). Restart latency: SIGKILL of the service process until a new child of its "
        f"supervising process exists, polled every 1 ms, {kills} kills, each at least 1.1 s after the previous restart. Start-50: from launching the supervisor "
        "until 50 services exist. RSS and idle CPU: the supervisor's main process with 50 services, CPU over "
        f"{idle} s after a 2 s settle (belljar's workers heartbeat once a second).", "",
        "| supervisor | restart min (ms) | median (ms) | max (ms) | start-50 (ms) | RSS at 50 (MiB) | idle CPU (% of a core) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, mn, med, mx, st, rss, cpu in rows:
        lines.append(f"| {name} | {fmt(mn, 2)} | {fmt(med, 2)} | {fmt(mx, 2)} | {fmt(st, 0)} | {fmt(rss)} | {fmt(cpu, 2)} |")
    if oom:
        lines += ["", f"OOM detection latency (belljar, {len(oom)} real OOM kills; kernel's kill time from dmesg "
                  "aligned to the wall clock through a /dev/kmsg marker, to the supervisor's `oom-kill` event): "
                  f"min {min(oom):.2f} ms, median {statistics.median(oom):.2f} ms, max {max(oom):.2f} ms."]
    text = "\n".join(lines) + "\n"
    marker = "<!-- bench/run.py output above; notes below are kept -->"
    notes = ""
    if os.path.exists(args.out):
        old = open(args.out).read()
        if marker in old:
            notes = old.split(marker, 1)[1]
    with open(args.out, "w") as f:
        f.write(text + "\n" + marker + notes)
    print(text)


if __name__ == "__main__":
    main()
