"""Shared fixtures: a real agent attached to the real kernel, and scraping."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
# The deadlines in these tests are sized for the development host. Under an
# emulated kernel (tests/kernels/run-in-vm: QEMU's TCG) everything, the tests
# included, runs 10-100x slower, and a CI machine may be busier than a
# developer's, so there every deadline is stretched. A deadline only bounds
# how long a failing poll takes to say so: no assertion is about speed.
DEADLINE_SCALE = 5.0 if os.environ.get("CONNWATCH_VM_KERNEL") else 1.0


def deadline(seconds: float) -> float:
    """A deadline of `seconds` on the host, stretched under an emulated kernel."""
    return seconds * DEADLINE_SCALE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
             what: str | Callable[[], str] = ""):
    """Poll until condition() is truthy; return its value or fail saying `what`."""
    timeout = deadline(timeout)
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    description = what() if callable(what) else what
    pytest.fail(f"timed out after {timeout}s waiting for {description or condition} (last: {last!r})")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM; SIGKILL if it has not exited within timeout; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(deadline(timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER on, 0 s): the socket goes straight to
    TCP_CLOSE instead of through FIN_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def close_ends_the_server_closed(clients: list[socket.socket], n: int) -> list[socket.socket]:
    """The server closed n of these connections: close our ends of those n and
    return the others. Until our end closes too, a server socket can wait in
    FIN_WAIT2 for tcp_fin_timeout (60 s) before TCP_CLOSE, and connwatch counts
    a connection until TCP_CLOSE (docs/metrics.md)."""
    def at_eof(c: socket.socket) -> bool:
        try:
            return c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False

    wait_for(lambda: sum(map(at_eof, clients)) == n, what=f"{n} connections to see the server's FIN")
    done = {c for c in clients if at_eof(c)}
    for c in done:
        c.close()
    return [c for c in clients if c not in done]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> None:
    """d/name.crt and d/name.key: a self-signed CA for two days."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, san: str | None = None, usage: str = "serverAuth") -> None:
    """d/name.crt and d/name.key, signed by the CA d/ca.crt."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


class Metrics:
    """One parsed scrape."""

    def __init__(self, text: str):
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def select(self, name: str, **labels: str) -> list:
        return [s for s in self.samples
                if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items())]

    def value(self, name: str, **labels) -> float | None:
        """Sum of the matching samples, None if there are none."""
        found = self.select(name, **labels)
        return sum(s.value for s in found) if found else None


class AgentProcess:
    def __init__(self, tmp: Path, config: str = "", extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.config_path = tmp / "connwatch.yml"
        fast = "" if "refresh_interval_seconds:" in config else "refresh_interval_seconds: 0.1\n"
        self.config_path.write_text(fast + config)
        self.log_path = tmp / "agent.log"
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [CONNWATCH, "run", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--config.file={self.config_path}", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        # loading and verifying the programs takes over a minute in an emulated VM
        wait_for(self._ready, timeout=60, what="agent ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return self.scrape().value("connwatch_ready") == 1
        except OSError:
            return False

    def scrape(self) -> Metrics:
        with urllib.request.urlopen(self.url, timeout=deadline(10)) as r:
            return Metrics(r.read().decode())

    def wait_for_value(self, name: str, expected: float, timeout: float = 20.0, **labels) -> Metrics:
        """Poll scrapes until the summed value of name{labels} equals expected."""
        holder = {}

        def check():
            m = self.scrape()
            holder["last"] = m.value(name, **labels)
            return m if holder["last"] == expected else None

        return wait_for(check, timeout, what=lambda: f"{name}{labels} == {expected} (last {holder.get('last')})")

    def scrape_after(self, t: float, timeout: float = 20.0) -> Metrics:
        """The first scrape whose snapshot was read after Unix time t."""
        def newer():
            m = self.scrape()
            return m if m.value("connwatch_snapshot_timestamp_seconds") > t else None

        return wait_for(newer, timeout, what=f"a snapshot read after {t:.3f}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("agent"))
    yield a
    a.stop()


@pytest.fixture(scope="session")
def hooked_agent(tmp_path_factory):
    """An agent that counts EMFILE/ENFILE, port exhaustion and listen()'s
    backlog from the start whatever the kernel: where only the syscall hook
    can see them (no fentry, no kprobes: the development host), it is
    attached for good instead of on demand; elsewhere the setting changes
    nothing."""
    a = AgentProcess(tmp_path_factory.mktemp("hooked_agent"), "syscall_tracing: always\n")
    yield a
    a.stop()


@pytest.fixture
def start_agent(tmp_path):
    """Start agents with a given config; all are stopped after the test."""
    started: list[AgentProcess] = []

    def start(config: str = "", extra_args: tuple[str, ...] = ()) -> AgentProcess:
        d = tmp_path / f"agent{len(started)}"
        d.mkdir()
        a = AgentProcess(d, config, extra_args)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@contextlib.contextmanager
def network_namespace():
    """A throwaway network namespace with loopback up; always deleted."""
    name = f"cwtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns():
    with network_namespace() as name:
        yield name


class ServerProcess:
    """tests/servers/hold_server.py in a child process, driven over stdin."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "servers" / "hold_server.py"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self.info = self.readline().split()  # "ready <port> [<port6>]"
        assert self.info[0] == "ready", self.info
        self.ports = [int(p) for p in self.info[1:]]

    def readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited with {self.proc.wait()}")
        return line.strip()

    def send(self, cmd: str) -> None:
        """Start a command without waiting for its reply (see readline)."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def command(self, cmd: str) -> str:
        self.send(cmd)
        return self.readline()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server():
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        s = ServerProcess(*args, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
