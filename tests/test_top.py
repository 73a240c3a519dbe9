"""`connwatch top` against a real agent, real processes and a real terminal.

The agent of this module keeps every process in its own series
(`max_process_series` at its maximum), so that on a busy host no process of
the test is folded into `comm="other"`. What it must show:

- a process holding 90 % of a 100-fd RLIMIT_NOFILE (set with prlimit), known
  to the agent through its listening socket, listed in fd-usage order;
- a server whose clients closed and that never closes their connections:
  its CLOSE_WAIT count;
- EMFILE failures, with what each counter gained since the previous frame;
- the live view in tmux at 80x30: every table fits, frames refresh, keys
  change the sort, `q` quits with status 0;
- scraping through TLS, client certificates and basic auth (the server code
  of the agent, in-process), and one line plus exit 2 when it cannot.
"""

from __future__ import annotations

import http.server
import os
import re
import queue
import shutil
import socket
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from conftest import AgentProcess, free_port, make_ca, make_cert, stop_process, wait_for
from connwatch import top, web, webconfig
from dashboards.params import DEFAULT

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
SERVERS = ROOT / "tests" / "servers"
FD_LIMIT = 100
FD_SHARE_PERCENT = 90
PROCESS_TITLE = "Processes by"
TABLE_TITLES = (PROCESS_TITLE, "Listeners by", "EMFILE, ENFILE, EADDRNOTAVAIL")


def run_top(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CONNWATCH, "top", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def tables(frame: str) -> dict[str, list[list[str]]]:
    """The rows of each table of one frame, by title, split on whitespace (the
    processes here have one-word names and no container)."""
    found: dict[str, list[list[str]]] = {}
    rows = None
    lines = iter(frame.splitlines())
    for line in lines:
        title = next((t for t in TABLE_TITLES if line.startswith(t)), None)
        if title:
            rows = found.setdefault(title, [])
            next(lines)  # the column header
        elif not line.strip():
            rows = None
        elif rows is not None:
            rows.append(line.split())
    return found


def process_row(frame: str, pid: int) -> dict[str, str] | None:
    """PID, COMM, FDS, LIMIT, USE%, CONNS, CLOSE_WAIT of one process."""
    for row in tables(frame).get(PROCESS_TITLE, []):
        if row[0] == str(pid):
            return dict(zip(("PID", "COMM", "FDS", "LIMIT", "USE%", "CONNS", "CLOSE_WAIT"), row[:2] + row[-5:]))
    return None


def usage_percent(row: list[str]) -> float | None:
    return None if row[-3] == "-" else float(row[-3].rstrip("%"))


# ---- the agent and the processes it sees -----------------------------------------------------


@pytest.fixture(scope="module")
def top_agent(tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("top_agent"), "max_process_series: 100000\n")
    yield a
    a.stop()


@pytest.fixture
def fd_hog(top_agent):
    proc = subprocess.Popen(["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", sys.executable,
                             str(SERVERS / "fd_hog.py"), str(FD_SHARE_PERCENT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, fds = proc.stdout.readline().split()
        assert ready == "ready" and int(fds) == FD_LIMIT * FD_SHARE_PERCENT // 100
        top_agent.wait_for_value("connwatch_process_open_fds", int(fds), pid=str(proc.pid))
        top_agent.wait_for_value("connwatch_process_max_fds", FD_LIMIT, pid=str(proc.pid))
        yield proc
    finally:
        stop_process(proc)


class LeakingServer:
    """A server that accepted `held` connections and never closes one; the
    client side of `peer_closed` of them is closed, so those sit in
    CLOSE_WAIT on the server."""

    def __init__(self, start_server, agent: AgentProcess, held: int, peer_closed: int):
        self.agent = agent
        self.server = start_server()
        self.pid = self.server.pid
        self.clients = [socket.create_connection(("127.0.0.1", self.server.ports[0])) for _ in range(held)]
        assert self.server.command(f"accept {held}") == f"accepted {held}"
        agent.wait_for_value("connwatch_connections", held, pid=str(self.pid))
        self.close_clients(peer_closed)

    def close_clients(self, n: int) -> None:
        for c in self.clients[:n]:
            c.close()
        del self.clients[:n]
        held = self.agent.scrape().value("connwatch_connections", pid=str(self.pid))
        self.agent.wait_for_value("connwatch_connections_close_wait", held - len(self.clients), pid=str(self.pid))

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.server.stop()


@pytest.fixture
def leaking_server(server, top_agent):
    started = []

    def start(held: int, peer_closed: int) -> LeakingServer:
        s = LeakingServer(server, top_agent, held, peer_closed)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ---- one frame: --once ---------------------------------------------------------------------


def test_once_lists_the_process_nearest_its_fd_limit(top_agent, fd_hog):
    result = run_top("--once", "--agent", top_agent.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = tables(result.stdout)[PROCESS_TITLE]
    index = next(i for i, row in enumerate(rows) if row[0] == str(fd_hog.pid))
    assert process_row(result.stdout, fd_hog.pid) == {
        "PID": str(fd_hog.pid), "COMM": Path(sys.executable).name[:15], "FDS": "90", "LIMIT": "100", "USE%": "90.0%",
        "CONNS": "0", "CLOSE_WAIT": "0"}
    # fd-usage order: nothing listed before it is further from its limit
    assert all(usage_percent(row) >= FD_SHARE_PERCENT for row in rows[:index]), rows[:index]
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_once_shows_the_close_wait_of_a_leaking_server(top_agent, leaking_server):
    leak = leaking_server(held=30, peer_closed=20)
    result = run_top("--once", "--agent", top_agent.url)
    assert result.returncode == 0, result.stderr
    row = process_row(result.stdout, leak.pid)
    assert row is not None, result.stdout
    assert (row["CONNS"], row["CLOSE_WAIT"]) == ("30", "20")
    listener = next(r for r in tables(result.stdout)["Listeners by"] if r[0] == str(leak.pid))
    assert listener[2] == str(leak.server.ports[0])


def test_once_without_an_agent_is_one_line_and_exit_2():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    for args in (["--once"], []):  # the live view refuses to start the same way
        result = run_top(*args, "--agent", url)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (f"connwatch: error: {url}: connection refused: is the agent running, "
                                 "and listening there? (see --agent)\n")


def test_something_else_than_an_agent_is_one_line_and_exit_2():
    class NotAnAgent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"# HELP up a metric, but not connwatch's\n# TYPE up gauge\nup 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotAnAgent)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = run_top("--once", "--agent", f"127.0.0.1:{httpd.server_port}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 2
    assert result.stderr == ("connwatch: error: the answer has no connwatch_build_info: is this a connwatch "
                             "agent? (see --agent)\n")


@pytest.mark.parametrize("args, says", [
    (["--agent", "ftp://host/metrics"], "--agent 'ftp://host/metrics': expected http(s)://host:port[/path]"),
    (["--agent", "host:99999"], "--agent 'host:99999': Port out of range 0-65535"),
    (["--web.tls-ca", "/etc/hostname"], "--web.tls-* options need an https:// agent URL, not "
                                        "http://localhost:9476/metrics"),
    (["--agent", "https://localhost:9476", "--web.tls-key", "k.pem"], "--web.tls-key needs --web.tls-cert"),
    (["--agent", "https://localhost:9476", "--web.tls-ca", "/nonexistent/ca.crt"], "--web.tls-ca /nonexistent/ca.crt: no such file"),
    (["--web.basic-auth-user", "prometheus"], "--web.basic-auth-user prometheus: no password: set "
                                              "$CONNWATCH_BASIC_AUTH_PASSWORD or pass --web.basic-auth-password-file"),
    (["--web.basic-auth-password-file", "/etc/hostname"], "--web.basic-auth-password-file needs "
                                                          "--web.basic-auth-user"),
])
def test_bad_flags_are_one_line_and_exit_2(args, says):
    env = {k: v for k, v in os.environ.items() if k != "CONNWATCH_BASIC_AUTH_PASSWORD"}
    result = subprocess.run([CONNWATCH, "top", "--once", *args], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 2
    assert result.stderr == f"connwatch: error: {says}\n"


def test_the_agent_does_not_load_rich():
    """rich is for `connwatch top` only: the agent on every node does not carry it."""
    code = "import sys, connwatch.cli, connwatch.agent; print(sorted(m for m in sys.modules if m.startswith('rich')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "[]\n"


def test_colours_follow_the_default_alert_thresholds():
    assert top.FD_USAGE_WARNING == DEFAULT.fd_usage_warning
    assert top.FD_USAGE_CRITICAL == DEFAULT.fd_usage_critical
    assert top.ACCEPT_QUEUE_WARNING == DEFAULT.accept_queue_fill


# ---- frames in a row: what counters gained ---------------------------------------------------


class FrameReader:
    """Frames of `connwatch top` printing into a pipe (not a terminal: one frame after another)."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen([CONNWATCH, "top", "--agent", url], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._pending: list[str] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output

    def next_frame(self, timeout: float = 30) -> str:
        """The next whole frame: from one header line to the next."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no frame within {timeout} s; so far: {''.join(self._pending)}")
            if not line:
                pytest.fail(f"connwatch top exited with {self.proc.wait()}: {self.proc.stderr.read()}")
            if line.startswith("connwatch top ") and self._pending:
                frame, self._pending = "".join(self._pending), [line]
                return frame
            self._pending.append(line)

    def stop(self) -> None:
        stop_process(self.proc)


def failure_rows(frame: str, pid: int) -> dict[tuple[str, str], tuple[str, str]]:
    """(ERROR, SYSCALL) -> (NEW, TOTAL) of one process."""
    return {(r[-4], r[-3]): (r[-2], r[-1])
            for r in tables(frame).get("EMFILE, ENFILE, EADDRNOTAVAIL", []) if r[0] == str(pid)}


def test_failures_show_what_they_gained_since_the_previous_frame(start_agent, server):
    # the syscall hook always on: EMFILE is counted from the first failure, not
    # from when an on-demand hook has been armed
    agent = start_agent("syscall_tracing: always\nmax_process_series: 100000\n")
    srv = server("--backlog", "16")
    subprocess.run(["prlimit", f"--pid={srv.pid}", "--nofile=64:64"], check=True)
    reader = FrameReader(agent.url)
    try:
        first = reader.next_frame()
        assert "NEW: gained since the previous frame; this is the first" in first
        assert failure_rows(first, srv.pid) == {}
        assert srv.command("emfile") == "emfile 2 2 3"  # failed openat, socket, accept4 calls
        want = {("EMFILE", "openat"): 2, ("EMFILE", "socket"): 2, ("EMFILE", "accept4"): 3}
        gained = dict.fromkeys(want, 0)
        while True:
            frame = reader.next_frame()
            assert "NEW: gained since the previous frame, 2 s before" in frame
            rows = failure_rows(frame, srv.pid)
            for key, (new, _) in rows.items():
                gained[key] += int(new)
            if {key: int(total) for key, (_, total) in rows.items()} == want:
                break
        assert gained == want  # what the NEW columns added up to is what was counted
    finally:
        reader.stop()


# ---- the live view in a terminal -----------------------------------------------------------


class Tmux:
    """A tmux server of its own (not the user's), one 80x30 window running a command."""

    def __init__(self, command: list[str]):
        # a socket path short enough for sun_path, gone with the directory
        self.dir = Path(tempfile.mkdtemp(prefix="cwtest-tmux-"))
        (self.dir / "tmux.conf").write_text("set -g remain-on-exit on\n")  # the exit status stays readable
        # the command's exit status, written by the pane's shell: tmux's own
        # #{pane_dead_status} stays empty on hosts where the server never
        # gets to reap the command (seen on the development host)
        self._status = self.dir / "status"
        self._tmux("-f", str(self.dir / "tmux.conf"), "new-session", "-d", "-s", "top", "-x", "80", "-y", "30",
                   f"{' '.join(command)}; echo $? > {self._status}")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.dir / "socket"), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def screen(self) -> str:
        """What the window shows, lines a terminal wrapped joined again (-J)."""
        return self._tmux("capture-pane", "-p", "-J", "-t", "top")

    def wait_for(self, condition, what: str, timeout: float = 30) -> str:
        def check():
            screen = self.screen()
            return screen if condition(screen) else None
        return wait_for(check, timeout, 0.2, what=lambda: f"{what}; the screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def exit_status(self) -> int | None:
        """The command's exit status once it has exited, None while it runs."""
        status = self._status.read_text() if self._status.exists() else ""
        return int(status) if status.endswith("\n") else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.dir / "socket"), "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(self.dir)


@pytest.fixture
def tmux():
    started = []

    def start(command: list[str]) -> Tmux:
        t = Tmux(command)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def order(screen: str, *pids: int) -> list[int]:
    """The given pids in the order the process table shows them (absent ones left out)."""
    shown = [row[0] for row in tables(screen).get(PROCESS_TITLE, [])]
    return sorted((p for p in pids if str(p) in shown), key=lambda p: shown.index(str(p)))


@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux not installed (make deps)")
def test_live_view_fits_80_columns_refreshes_sorts_and_quits(top_agent, fd_hog, leaking_server, tmux):
    leak = leaking_server(held=30, peer_closed=20)
    term = tmux([CONNWATCH, "top", "--agent", top_agent.url])
    screen = term.wait_for(lambda s: "Processes by fd usage" in s and str(fd_hog.pid) in s,
                           "the first frame, with the fd hog")
    lines = screen.splitlines()
    assert len(lines) <= 30 and all(len(line) <= 80 for line in lines), screen
    assert re.search(r"PID +COMM +CONTAINER +FDS +LIMIT +USE% +CONNS +CLOSE_WAIT", screen), screen
    assert re.search(r"PID +COMM +PORT +QUEUE +BACKLOG +FILL% +DROPS +NEW", screen), screen
    assert re.search(r"PID +COMM +ERROR +SYSCALL +NEW +TOTAL", screen), screen
    assert order(screen, fd_hog.pid, leak.pid)[0] == fd_hog.pid  # 90 % of its fds: the top of the list

    term.keys("w")  # sort by CLOSE_WAIT: the leaking server comes first of the two
    screen = term.wait_for(lambda s: "Processes by CLOSE_WAIT" in s and str(leak.pid) in s, "the CLOSE_WAIT sort")
    assert order(screen, fd_hog.pid, leak.pid)[0] == leak.pid
    assert process_row(screen, leak.pid)["CLOSE_WAIT"] == "20"

    leak.close_clients(10)  # the next frame has the agent's new count
    term.wait_for(lambda s: (process_row(s, leak.pid) or {}).get("CLOSE_WAIT") == "30",
                  "a refreshed frame with 30 connections in CLOSE_WAIT")

    term.keys("u")
    term.wait_for(lambda s: "Processes by fd usage" in s, "the fd-usage sort again")
    term.keys("q")
    wait_for(lambda: term.exit_status() is not None, 10, what="connwatch top to quit on q")
    assert term.exit_status() == 0


# ---- TLS, client certificates, basic auth --------------------------------------------------


USER, PASSWORD = "prometheus", "correct horse battery staple"


class OneProcess:
    """What the in-process endpoint serves: enough of an agent for top."""

    def collect(self):
        info = GaugeMetricFamily("connwatch_build_info", "build", labels=["version", "kernel"])
        info.add_metric(["test", os.uname().release], 1)
        yield info
        yield GaugeMetricFamily("connwatch_ready", "ready", value=1)
        fds = GaugeMetricFamily("connwatch_process_open_fds", "fds", labels=["pid", "comm", "container"])
        fds.add_metric(["4242", "behind-tls", ""], 10)
        yield fds


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("top_pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", san="IP:127.0.0.1")
    make_cert(d, "client", "ca", usage="clientAuth")
    make_cert(d, "rogue-client", "rogue-ca", usage="clientAuth")
    (d / "password").write_text(PASSWORD + "\n")
    return d


@pytest.fixture(scope="module")
def locked_agent(pki):
    """The agent's HTTP server with mutual TLS and basic auth (the exporter-toolkit web config)."""
    web_yml = pki / "web.yml"
    web_yml.write_text(
        "tls_server_config:\n"
        f"  cert_file: {pki / 'server.crt'}\n"
        f"  key_file: {pki / 'server.key'}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki / 'ca.crt'}\n"
        "basic_auth_users:\n"
        f"  {USER}: '{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}'\n")
    registry = CollectorRegistry()
    registry.register(OneProcess())
    server = web.MetricsServer("127.0.0.1:0", "/metrics", registry, webconfig.load(str(web_yml)))
    server.start()
    yield server.address[1]
    server.stop()


def tls_args(pki: Path, ca: str | None = "ca", client: str | None = "client") -> list[str]:
    args = ["--web.tls-ca", str(pki / f"{ca}.crt")] if ca else []
    if client:
        args += ["--web.tls-cert", str(pki / f"{client}.crt"), "--web.tls-key", str(pki / f"{client}.key")]
    return args


def test_tls_client_certificate_and_basic_auth(locked_agent, pki):
    url = f"https://127.0.0.1:{locked_agent}/metrics"
    with_file = run_top("--once", "--agent", url, *tls_args(pki), "--web.basic-auth-user", USER,
                        "--web.basic-auth-password-file", str(pki / "password"))
    assert with_file.returncode == 0, with_file.stderr
    assert process_row(with_file.stdout, 4242)["FDS"] == "10"
    from_env = run_top("--once", "--agent", url, *tls_args(pki, ca=None), "--web.tls-insecure-skip-verify",
                       "--web.basic-auth-user", USER, env={"CONNWATCH_BASIC_AUTH_PASSWORD": PASSWORD})
    assert from_env.returncode == 0, from_env.stderr
    assert process_row(from_env.stdout, 4242)["FDS"] == "10"


@pytest.mark.parametrize("case, says", [
    ("no CA", "TLS: the agent's certificate is not trusted (*): pass the CA that signed it with --web.tls-ca"),
    # the alert, or the end of the connection if the agent closes it before the alert is read
    ("no client certificate", "TLS: the agent requires a client certificate (*): pass --web.tls-cert and "
                              "--web.tls-key"),
    ("untrusted client certificate", "TLS: the agent refused the client certificate (*): use one signed by "
                                     "the CA in its client_ca_file"),
    ("no password", "401 Unauthorized: the agent wants basic auth: pass --web.basic-auth-user, the password "
                    "in $CONNWATCH_BASIC_AUTH_PASSWORD or --web.basic-auth-password-file"),
    ("wrong password", "401 Unauthorized: the agent refused this user and password"),
    ("plain HTTP", "400 Bad Request: the agent serves HTTPS: use an https:// URL"),
])
def test_tls_and_auth_failures_name_the_problem(locked_agent, pki, case, says):
    url = f"https://127.0.0.1:{locked_agent}/metrics"
    auth = ["--web.basic-auth-user", USER]
    args, env = {
        "no CA": ([*tls_args(pki, ca=None), *auth], {"CONNWATCH_BASIC_AUTH_PASSWORD": PASSWORD}),
        "no client certificate": ([*tls_args(pki, client=None), *auth], {"CONNWATCH_BASIC_AUTH_PASSWORD": PASSWORD}),
        "untrusted client certificate": ([*tls_args(pki, client="rogue-client"), *auth],
                                         {"CONNWATCH_BASIC_AUTH_PASSWORD": PASSWORD}),
        "no password": (tls_args(pki), {}),
        "wrong password": ([*tls_args(pki), *auth], {"CONNWATCH_BASIC_AUTH_PASSWORD": "wrong"}),
        "plain HTTP": ([], {}),
    }[case]
    if case == "plain HTTP":
        url = url.replace("https://", "http://")
    result = run_top("--once", "--agent", url, *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    # * stands for OpenSSL's own words
    assert re.fullmatch(re.escape(f"connwatch: error: {url}: {says}\n").replace(r"\*", ".+"), result.stderr), \
        result.stderr


def test_https_to_a_plain_http_agent(top_agent):
    url = top_agent.url.replace("http://", "https://")
    result = run_top("--once", "--agent", url)
    assert result.returncode == 2
    assert result.stderr == f"connwatch: error: {url}: TLS: the agent does not speak TLS there: use an http:// URL\n"
