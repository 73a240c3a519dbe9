"""Shared plumbing for the benchmarks: building, the agent under test,
sysctls, BPF objects and their run statistics, statistics.

Everything started here is registered and torn down in ``cleanup()``; every
sysctl changed is restored there too (and on SIGTERM/SIGINT/SIGHUP).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
LOADGEN = BUILD / "loadgen"
EMPTY_OBJ = BUILD / "empty.bpf.o"
AGENT_OBJ = ROOT / "agent" / "connwatch" / "bpf" / "connwatch.bpf.o"
# where agents' configuration files and logs go; the VM guest, whose
# checkout is read-only, points it at its own /tmp
RUN_DIR = BUILD

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


def build() -> None:
    """Compile the load generator (gcc) and the bench's empty BPF programs
    (clang, with the Makefile's flags for bpf/connwatch.bpf.c: the committed
    vmlinux.h of bpf/vmlinux/<arch>, not one generated from this host)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    src = ROOT / "bench" / "c" / "loadgen.c"
    if _stale(LOADGEN, src):
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(src)], check=True)
    vmlinux_dir = ROOT / "bpf" / "vmlinux" / _arch()
    c = ROOT / "bench" / "bpf" / "empty.bpf.c"
    if _stale(EMPTY_OBJ, c, vmlinux_dir / "vmlinux.h"):
        tmp = f"{EMPTY_OBJ}.tmp"
        subprocess.run(["clang", "-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3",
                        f"-D__TARGET_ARCH_{_arch()}", f"-I{vmlinux_dir}", f"-I{ROOT / 'bpf'}",
                        f"-I/usr/include/{_multiarch()}", "-c", str(c), "-o", tmp], check=True)
        subprocess.run(["llvm-strip", "-g", tmp], check=False)
        os.rename(tmp, EMPTY_OBJ)
    if not AGENT_OBJ.exists():
        raise SystemExit(f"bench: {AGENT_OBJ} missing: run `make bpf` (make bench does)")


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


def children() -> list[int]:
    """Pids of the processes the harness started and has not reaped."""
    return [p.pid for p in _procs if p.poll() is None]


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


class LineProcess:
    """A helper process driven line by line over stdin/stdout (servers,
    holders): started with spawn(), so cleanup() stops it on every way out."""

    def __init__(self, args, env: dict | None = None, what: str = ""):
        self.what = what or Path(str(args[0])).name
        self.proc = spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                          env={**os.environ, **env} if env else None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.what} exited ({self.proc.wait()}) without answering")
        return line.strip()

    def expect(self, word: str) -> list[str]:
        """The next line, which must start with `word`: its fields."""
        fields = self.readline().split()
        if fields[:1] != [word]:
            raise RuntimeError(f"{self.what}: expected {word!r}, got {' '.join(fields)!r}")
        return fields

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        """EOF on stdin (every helper then cleans up and exits: idle-procs reaps
        its children), a kill if it has not exited within the timeout."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        reap(self.proc)


# ---- sysctls ----------------------------------------------------------------


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


# ---- BPF ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramStats:
    """Cumulative kernel run statistics of one BPF program (bpf_prog_info)."""

    run_ns: int
    runs: int

    def __sub__(self, before: ProgramStats) -> ProgramStats:
        return ProgramStats(self.run_ns - before.run_ns, self.runs - before.runs)

    @property
    def ns_per_run(self) -> float:
        return self.run_ns / self.runs if self.runs else float("nan")


def stats_delta(before: dict[str, ProgramStats], after: dict[str, ProgramStats]) -> dict[str, ProgramStats]:
    return {p: after[p] - before.get(p, ProgramStats(0, 0)) for p in after}


class Bpf:
    """Some programs of a BPF object, loaded and attached through the
    project's ctypes loader (the bench's empty programs, for instance)."""

    def __init__(self, path: Path, only: set[str]):
        import logging

        from connwatch.libbpf import BpfObject  # noqa: needs root at use

        logging.getLogger("connwatch.libbpf").setLevel(logging.ERROR)  # libbpf's chatter

        self.obj = BpfObject(str(path))
        try:
            missing = only - set(self.obj.programs)
            if missing:
                raise LookupError(f"{path.name} has no program {', '.join(sorted(missing))}")
            for name, prog in self.obj.programs.items():
                prog.autoload = name in only
            self.obj.load()
            for name in sorted(only):
                self.obj.programs[name].attach()
        except Exception:
            self.obj.close()
            raise
        _restores.append(self.close)
        note_own_links([os.getpid()])

    def run_stats(self) -> dict[str, ProgramStats]:
        out = {}
        for name, prog in self.obj.programs.items():
            if prog.attached:
                ns, runs, _misses = prog.run_stats()
                out[name] = ProgramStats(ns, runs)
        return out

    def close(self) -> None:
        if self.close in _restores:
            _restores.remove(self.close)
        self.obj.close()


def bpftool_json(*args: str) -> list | dict:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"bpftool {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout or "[]")


_FDINFO_ID = re.compile(r"^(prog_id|link_id|map_id):\s*(\d+)", re.M)


def fd_object_ids(pids) -> dict[str, set[int]]:
    """{"prog_id": {...}, "link_id": {...}, "map_id": {...}}: the BPF
    programs, links and maps the processes hold open (from /proc/<pid>/fdinfo)."""
    ids: dict[str, set[int]] = {"prog_id": set(), "link_id": set(), "map_id": set()}
    for pid in pids:
        d = Path(f"/proc/{pid}/fdinfo")
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for e in entries:
            try:
                text = e.read_text()
            except OSError:
                continue
            for kind, num in _FDINFO_ID.findall(text):
                ids[kind].add(int(num))
    return ids


# every BPF link the harness or an agent it started has held: noise.leftovers()
# checks at the end that none is still attached
OWN_LINKS: set[int] = set()


def note_own_links(pids) -> None:
    """Remember the links these processes hold now (the harness itself, an agent)."""
    OWN_LINKS.update(fd_object_ids(pids)["link_id"])


def program_stats_of(pid: int) -> dict[str, ProgramStats]:
    """Run statistics of every BPF program a process holds, by program name
    without the cw_ prefix (as connwatch_bpf_program_* names them). Read
    from the kernel at once, not from the agent's last snapshot, so phase
    boundaries are exact."""
    held = fd_object_ids([pid])["prog_id"]
    out = {}
    for p in bpftool_json("prog", "show"):
        if p.get("id") in held:
            out[p["name"].removeprefix("cw_")] = ProgramStats(p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


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


def metric(metrics, name: str, **labels) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None if none."""
    vals = [v for n, lab, v in metrics if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(vals) if vals else None


class Agent:
    """`connwatch run` as a user runs it, on a private loopback port."""

    def __init__(self, config: dict | None = None, tag: str = "agent"):
        import yaml

        self.config = dict(config or {})
        self.port = free_port()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.cfg_path = RUN_DIR / f"{tag}-{os.getpid()}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(self.config))
        self.log_path = RUN_DIR / f"{tag}-{os.getpid()}.log"
        exe = ROOT / ".venv" / "bin" / "connwatch"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "connwatch.cli"]
        self._log = open(self.log_path, "w")
        self.proc = spawn([*cmd, "run", "--web.listen-address", f"127.0.0.1:{self.port}",
                           "--config.file", self.cfg_path, "--log.level", "info"],
                          stdout=self._log, stderr=subprocess.STDOUT)
        self.proc.graceful = True
        t0 = time.monotonic()
        self.via: dict[str, str] = {}  # probe -> attach strategy (connwatch_probe_info)
        self._wait_ready()
        self.startup_seconds = time.monotonic() - t0
        if self.startup_seconds > 10:
            log(f"agent start-up took {self.startup_seconds:.0f} s")
        note_own_links([self.pid])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                m = self.metrics()
            except OSError:
                time.sleep(0.05)
                continue
            if metric(m, "connwatch_ready") == 1:
                self.via = {lab["probe"]: f"{lab['via']}: {lab['attach']}"
                            for n, lab, _ in m if n == "connwatch_probe_info"}
                if "connection_state" not in self.via:
                    raise RuntimeError("agent ready but its connection_state probe is not attached")
                if self.config.get("syscall_tracing") == "always" and self.hook_armed(m) is False:
                    raise RuntimeError("agent with syscall_tracing: always has no syscall hook attached")
                return
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

    def metrics_after(self, t: float, timeout: float = 30.0):
        """The metrics of the first snapshot read after Unix time t."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (metric(m, "connwatch_snapshot_timestamp_seconds") or 0) > t:
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent served no snapshot newer than {t:.1f} within {timeout:.0f} s")
            time.sleep(0.05)

    def hook_armed(self, metrics=None) -> bool | None:
        """Whether the syscall hook is attached (None on kernels where no
        probe needs it: connwatch_syscall_hook_armed is then absent)."""
        v = metric(metrics if metrics is not None else self.metrics(), "connwatch_syscall_hook_armed")
        return None if v is None else v == 1

    def refresh_failure(self, metrics) -> str | None:
        """None while the agent's snapshot is fresh; else why its refreshes
        fail (it keeps serving the last good snapshot, so its numbers would
        silently stop moving): the snapshot's age and the last exception the
        agent logged."""
        taken = metric(metrics, "connwatch_snapshot_timestamp_seconds") or 0
        interval = self.config.get("refresh_interval_seconds", 2.0)
        age = time.time() - taken
        if age < 3 * interval + 1:
            return None
        self._log.flush()
        errors = re.findall(r"^(\w+(?:Error|Exception)\b.*)$", self.log_path.read_text(), re.M)
        return f"snapshot {age:.0f} s old: refreshes fail ({errors[-1] if errors else 'see ' + str(self.log_path)})"

    def arm_reasons(self) -> list[str]:
        """Why the syscall hook was armed, each time (from the agent's log)."""
        self._log.flush()
        return re.findall(r"syscall hook armed \((.*?)\): counting", self.log_path.read_text())

    def program_stats(self) -> dict[str, ProgramStats]:
        return program_stats_of(self.pid)

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
        note_own_links([self.pid])  # an armed syscall hook came after start-up
        reap(self.proc, signal.SIGTERM, timeout=30)
        self._log.close()
        with contextlib.suppress(OSError):
            self.cfg_path.unlink()


def cpu_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


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
    xs = list(xs)
    return {"median": median(xs), "min": min(xs) if xs else float("nan"),
            "max": max(xs) if xs else float("nan"), "n": len(xs), "values": xs}


def which(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def drain_lines(stream, on_line) -> threading.Thread:
    def run():
        for line in stream:
            on_line(line.rstrip("\n"))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
