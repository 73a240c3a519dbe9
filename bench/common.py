"""Shared plumbing for the benchmarks: building, the agent under test,
sysctls, tracefs, BPF objects, statistics, machine-noise detection.

Everything started here is registered and torn down in ``cleanup()``; every
sysctl changed is restored there too (and on SIGTERM/SIGINT).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
LOADGEN = BUILD / "loadgen"
AGENT_OBJ = ROOT / "agent" / "connwatch" / "bpf" / "connwatch.bpf.o"
TRACEFS = Path("/sys/kernel/tracing")

_procs: list[subprocess.Popen] = []
_restores: list = []  # callables, run in reverse order by cleanup()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- build ---------------------------------------------------------------------


def _stale(out: Path, *srcs: Path) -> bool:
    return not out.exists() or any(s.stat().st_mtime > out.stat().st_mtime for s in srcs)


def _arch() -> str:
    m = os.uname().machine
    return {"x86_64": "x86", "aarch64": "arm64"}.get(m, m)


def _multiarch() -> str:
    try:
        return subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True,
                              check=True).stdout.strip() or f"{os.uname().machine}-linux-gnu"
    except (OSError, subprocess.CalledProcessError):
        return f"{os.uname().machine}-linux-gnu"


def build() -> dict[str, Path]:
    """Compile the load generator (gcc) and the bench-only BPF objects (clang,
    same flags as the Makefile's rule for bpf/connwatch.bpf.c)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    src = ROOT / "bench" / "c" / "loadgen.c"
    if _stale(LOADGEN, src):
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(src)], check=True)
    vmlinux = ROOT / "build" / "vmlinux.h"
    if not vmlinux.exists():
        vmlinux = BUILD / "vmlinux.h"
        if not vmlinux.exists():
            with open(f"{vmlinux}.tmp", "w") as f:
                subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                               stdout=f, check=True)
            os.rename(f"{vmlinux}.tmp", vmlinux)
    objs = {}
    for name in ("empty", "alt"):
        c = ROOT / "bench" / "bpf" / f"{name}.bpf.c"
        o = BUILD / f"{name}.bpf.o"
        deps = [c, ROOT / "bpf" / "connwatch.h"] + ([ROOT / "bpf" / "connwatch.bpf.c"] if name == "alt" else [])
        if _stale(o, *deps):
            subprocess.run(["clang", "-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3",
                            f"-D__TARGET_ARCH_{_arch()}", f"-I{vmlinux.parent}", f"-I{ROOT / 'bpf'}",
                            f"-I/usr/include/{_multiarch()}", "-c", str(c), "-o", f"{o}.tmp"], check=True)
            subprocess.run(["llvm-strip", "-g", f"{o}.tmp"], check=False)
            os.rename(f"{o}.tmp", o)
        objs[name] = o
    if not AGENT_OBJ.exists():
        raise SystemExit(f"bench: {AGENT_OBJ} missing: run `make bpf` (make bench does)")
    return objs


# ---- processes and cleanup ------------------------------------------------------------


def spawn(args, **kw) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], **kw)
    _procs.append(p)
    return p


def reap(p: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 10.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        if f:
            with contextlib.suppress(Exception):
                f.close()
    if p in _procs:
        _procs.remove(p)


def cleanup() -> None:
    for p in list(reversed(_procs)):
        reap(p, signal.SIGTERM if getattr(p, "graceful", False) else signal.SIGKILL)
    while _restores:
        fn = _restores.pop()
        try:
            fn()
        except Exception as e:  # keep restoring the rest
            log(f"cleanup: {e}")


def install_signal_handlers() -> None:
    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def loadgen(*args, timeout: float = 300) -> dict[str, float]:
    """Run the C load generator; parse its `k=v ...` result line."""
    out = subprocess.run([str(LOADGEN), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {args}: exit {out.returncode}: {out.stderr.strip()}")
    line = out.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split())}


# ---- sysctls and tracefs ----------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def sysctl_get(name: str) -> str:
    return _sysctl_path(name).read_text().strip()


@contextlib.contextmanager
def sysctl(name: str, value: str):
    """Set a sysctl for the duration of the block; restore it afterwards, also
    on errors and signals (cleanup() runs the restore if the block is torn)."""
    old = sysctl_get(name)
    path = _sysctl_path(name)

    def restore():
        path.write_text(old)

    _restores.append(restore)
    path.write_text(value)
    try:
        yield old
    finally:
        if restore in _restores:
            _restores.remove(restore)
            restore()


@contextlib.contextmanager
def tracefs():
    """Mount tracefs at /sys/kernel/tracing if absent (classic tracepoints need
    it to be attached by name); unmount afterwards only if we mounted it."""
    mounted = (TRACEFS / "events").is_dir()
    if not mounted:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)

        def umount():
            subprocess.run(["umount", str(TRACEFS)], check=False, capture_output=True)

        _restores.append(umount)
    try:
        yield TRACEFS
    finally:
        if not mounted and umount in _restores:
            _restores.remove(umount)
            umount()


# ---- BPF ---------------------------------------------------------------------


class Bpf:
    """A BPF object loaded and attached through the project's ctypes loader."""

    def __init__(self, path: Path, only: set[str] | None = None):
        import logging

        from connwatch.libbpf import BpfObject, LibbpfError  # noqa: needs root at use

        logging.getLogger("connwatch.libbpf").setLevel(logging.ERROR)  # libbpf's chatter

        self.obj = BpfObject(str(path))
        self.skipped: dict[str, str] = {}
        try:
            if only is not None:
                for name, prog in self.obj.programs.items():
                    prog.autoload = name in only
            self.obj.load()
            for name, prog in self.obj.programs.items():
                if not prog.autoload:
                    continue
                try:
                    prog.attach()
                except LibbpfError as e:  # e.g. a syscall this arch does not have
                    self.skipped[name] = e.strerror
        except Exception:
            self.obj.close()
            raise
        _restores.append(self.close)

    @property
    def attached(self) -> list[str]:
        return [n for n, p in self.obj.programs.items() if p.attached]

    def run_stats(self) -> dict[str, tuple[int, int]]:
        return {n: p.run_stats() for n, p in self.obj.programs.items() if p.attached}

    def close(self) -> None:
        if self.close in _restores:
            _restores.remove(self.close)
        self.obj.close()


def syscall_links() -> list[dict]:
    """BPF links on the syscall tracepoints (raw sys_enter/sys_exit, or perf-event
    links, which is how classic syscalls:* tracepoint programs attach)."""
    try:
        out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, timeout=10)
        links = json.loads(out.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    return [lk for lk in links if lk.get("tp_name") in ("sys_exit", "sys_enter")
            or lk.get("type") == "perf_event"]


def own_link_ids(pids) -> set[int]:
    ids = set()
    for pid in pids:
        d = Path(f"/proc/{pid}/fdinfo")
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for e in entries:
            try:
                m = re.search(r"^link_id:\s*(\d+)", e.read_text(), re.M)
            except OSError:
                continue
            if m:
                ids.add(int(m.group(1)))
    return ids


def _foreign_ids(own_pids=()) -> set[int]:
    own = own_link_ids([os.getpid(), *own_pids])
    return {lk.get("id") for lk in syscall_links() if lk.get("id") not in own}


def foreign_syscall_links(own_pids=()) -> int:
    """Syscall-tracepoint BPF links that belong to someone else on this machine
    (other engineers' agents): they slow down our baseline too."""
    return len(_foreign_ids(own_pids))


_persistent: set[int] = set()  # foreign links that outlasted a full wait: not waited for again


def wait_quiet(max_wait: float, own_pids=()) -> int:
    """Wait (up to max_wait s) until nobody else has a program on the syscall
    tracepoints; returns how many foreign links remain. Links that already
    outlasted one full wait (e.g. a leaked agent) are not waited for again."""
    deadline = time.monotonic() + max_wait
    while True:
        ids = _foreign_ids(own_pids)
        if not ids or ids <= _persistent:
            return len(ids)
        if time.monotonic() >= deadline:
            log(f"{len(ids)} foreign syscall-tracepoint BPF links still attached after {max_wait:.0f} s")
            _persistent.update(ids)
            return len(ids)
        time.sleep(0.5)


def cpu_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


# ---- the agent under test ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_METRIC = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _METRIC.match(line)
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


class Agent:
    """`connwatch run` as a user runs it, on a private loopback port."""

    def __init__(self, config: dict | None = None, tag: str = "agent"):
        self.port = free_port()
        self.cfg_path = BUILD / f"{tag}-{os.getpid()}.yaml"
        import yaml

        self.cfg_path.write_text(yaml.safe_dump(config or {}))
        self.syscall_tracing = (config or {}).get("syscall_tracing", True)
        self.log_path = BUILD / f"{tag}-{os.getpid()}.log"
        exe = ROOT / ".venv" / "bin" / "connwatch"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "connwatch.cli"]
        self._log = open(self.log_path, "w")
        self.proc = spawn([*cmd, "run", "--web.listen-address", f"127.0.0.1:{self.port}",
                           "--config.file", self.cfg_path, "--log.level", "warn"],
                          stdout=self._log, stderr=subprocess.STDOUT)
        self.proc.graceful = True
        t0 = time.monotonic()
        self.probes: dict[str, bool] = {}
        self._wait_ready()
        self.startup_seconds = time.monotonic() - t0
        if self.startup_seconds > 10:
            log(f"agent start-up took {self.startup_seconds:.0f} s (probes: {self.probes})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                m = {(n, lab.get("probe")): v for n, lab, v in parse_metrics(self.scrape()[1])}
                if m.get(("connwatch_ready", None)) == 1:
                    self.probes = {p: v == 1 for (n, p), v in m.items() if n == "connwatch_probe_enabled"}
                    want = "sys_exit" if self.syscall_tracing else "inet_sock_set_state"
                    if m.get(("connwatch_probe_enabled", want)) != 1:
                        raise RuntimeError(f"agent ready but its {want} probe is not attached")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent not ready after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def scrape(self) -> tuple[float, str]:
        """One Prometheus-style scrape (new connection, GET /metrics): (seconds, body)."""
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", "/metrics")
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise OSError(f"/metrics: HTTP {r.status}")
        finally:
            c.close()
        return time.perf_counter() - t0, body.decode()

    def metrics(self):
        return parse_metrics(self.scrape()[1])

    def settle(self, busy_fraction: float = 0.05, window: float = 0.5, timeout: float = 20.0) -> float:
        """Wait until the agent's start-up work is over (its CPU use over one
        window below busy_fraction of a core), so a measurement that follows
        sees the agent's steady state, not its start-up. Returns the wait."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            c0 = self.cpu_ns()
            time.sleep(window)
            if self.cpu_ns() - c0 < busy_fraction * window * 1e9:
                break
        return time.monotonic() - t0

    def cpu_ns(self) -> int:
        """CPU time of all agent threads (ns, from schedstat)."""
        total = 0
        for t in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((t / "schedstat").read_text().split()[0])
        return total

    def memory(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def stop(self) -> None:
        reap(self.proc, signal.SIGTERM, timeout=30)
        self._log.close()
        with contextlib.suppress(OSError):
            self.cfg_path.unlink()


# ---- statistics ------------------------------------------------------------------------


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pctl(xs, q: float):
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs) -> dict:
    return {"median": median(xs), "min": min(xs) if xs else float("nan"),
            "max": max(xs) if xs else float("nan"), "n": len(xs), "values": list(xs)}


def which(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def drain_lines(stream, on_line) -> threading.Thread:
    def run():
        for line in stream:
            on_line(line.rstrip("\n"))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
