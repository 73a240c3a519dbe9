"""`connwatch top`: who on a host is nearest a limit, live from a running agent.

It scrapes the agent's metrics endpoint like Prometheus does (no privileges,
no BPF here) every REFRESH_SECONDS and shows three tables that fit 80
columns:

- processes by fd usage (open fds / soft RLIMIT_NOFILE), with their open
  connections and how many of those are in CLOSE_WAIT;
- listeners by accept-queue fill (queue / effective backlog), with their
  drops;
- EMFILE/ENFILE and EADDRNOTAVAIL failures, with what each counter gained
  since the previous frame.

On a terminal the view is live (keys change the process sort, q quits).
`--once` prints one frame and exits; with stdout not a terminal frames are
printed one after the other, like `top -b`.
"""

from __future__ import annotations

import base64
import http.client
import os
import select
import ssl
import sys
import termios
import time
import tty
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import metrics
from .cli import BASIC_AUTH_PASSWORD_ENV

REFRESH_SECONDS = 2.0
SCRAPE_TIMEOUT_SECONDS = 10.0

# Colours follow the default alert thresholds (dashboards/params.py
# fd_usage_warning/critical and accept_queue_fill; tests/test_top.py keeps
# them equal).
FD_USAGE_WARNING = 0.80
FD_USAGE_CRITICAL = 0.95
ACCEPT_QUEUE_WARNING = 0.80
ACCEPT_QUEUE_FULL = 1.0  # the kernel drops once the queue is longer than the backlog

# Screen lines that are not table rows: the two header lines, and per table
# the blank line before it, its title and its column header.
HEADER_LINES = 2
LINES_PER_TABLE = 3


class TopError(Exception):
    """Something the user can fix; the message is one line saying what."""


# ---- scraping ---------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    """Where the metrics are and how to authenticate (the agent's web config)."""

    url: str
    tls: ssl.SSLContext | None = None
    client_cert: bool = False  # tls presents one: says which side a refused handshake lacks
    authorization: str | None = None  # the Authorization header's value

    def scrape(self) -> str:
        request = urllib.request.Request(self.url, headers={
            # the classic text format, the one prometheus_client's parser reads
            "Accept": "text/plain; version=0.0.4",
            **({"Authorization": self.authorization} if self.authorization else {}),
        })
        # no ProxyHandler: like Prometheus, ignore http_proxy for a scrape
        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(context=self.tls),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
            opener.add_handler(handler)
        try:
            with opener.open(request, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            raise TopError(f"{self.url}: {self._http_error(e)}") from None
        except urllib.error.URLError as e:  # wraps what happened while sending the request
            raise TopError(f"{self.url}: {self._connection_error(e.reason)}") from None
        except (OSError, http.client.HTTPException) as e:  # while reading the answer
            raise TopError(f"{self.url}: {self._connection_error(e)}") from None

    def _http_error(self, e: urllib.error.HTTPError) -> str:
        body = e.read(200).decode("utf-8", "replace")
        if e.code == 401:
            if self.authorization:
                return "401 Unauthorized: the agent refused this user and password"
            return ("401 Unauthorized: the agent wants basic auth: pass --web.basic-auth-user, "
                    f"the password in ${BASIC_AUTH_PASSWORD_ENV} or --web.basic-auth-password-file")
        if e.code == 400 and "HTTPS" in body:
            return "400 Bad Request: the agent serves HTTPS: use an https:// URL"
        return f"HTTP {e.code} {e.reason}"

    def _connection_error(self, reason: object) -> str:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return (f"TLS: the agent's certificate is not trusted ({reason.verify_message}): "
                    "pass the CA that signed it with --web.tls-ca")
        if self.url.startswith("https://") and isinstance(reason, (ssl.SSLEOFError, ConnectionResetError)):
            # a server that refuses the client's certificate may close before
            # its alert is read: the client sees the connection end instead
            return self._client_certificate_refused("it closed the connection")
        if isinstance(reason, ssl.SSLError):
            code = reason.reason or ""
            if code.endswith(("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "UNKNOWN_CA", "BAD_CERTIFICATE",
                              "CERTIFICATE_UNKNOWN")):
                return self._client_certificate_refused(code)
            if code == "WRONG_VERSION_NUMBER":
                return "TLS: the agent does not speak TLS there: use an http:// URL"
            return f"TLS: {code or reason}"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused: is the agent running, and listening there? (see --agent)"
        if isinstance(reason, TimeoutError):
            return f"no answer within {SCRAPE_TIMEOUT_SECONDS:g} s"
        if isinstance(reason, OSError) and reason.strerror:
            return reason.strerror
        return str(reason) or type(reason).__name__

    def _client_certificate_refused(self, how: str) -> str:
        if self.client_cert:
            return (f"TLS: the agent refused the client certificate ({how}): use one signed by the CA in its "
                    "client_ca_file")
        return f"TLS: the agent requires a client certificate ({how}): pass --web.tls-cert and --web.tls-key"


def agent_url(typed: str) -> str:
    """--agent as typed: host:port, a URL without a path (/metrics then), or a full URL."""
    parts = urllib.parse.urlsplit(typed if "://" in typed else "http://" + typed)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TopError(f"--agent {typed!r}: expected http(s)://host:port[/path]")
    try:
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError as e:
        raise TopError(f"--agent {typed!r}: {e}") from None
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def tls_context(url: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
                insecure_skip_verify: bool) -> ssl.SSLContext | None:
    """The client side of the agent's tls_server_config (None for http://)."""
    if key_file and not cert_file:
        raise TopError("--web.tls-key needs --web.tls-cert")
    if not url.startswith("https://"):
        if ca_file or cert_file or insecure_skip_verify:
            raise TopError(f"--web.tls-* options need an https:// agent URL, not {url}")
        return None
    # verified against --web.tls-ca only when given, as Prometheus' tls_config.ca_file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        _load("--web.tls-ca", ca_file, lambda: context.load_verify_locations(ca_file))
    else:
        context.load_default_certs()
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file:
        _load("--web.tls-cert", cert_file, lambda: context.load_cert_chain(cert_file, key_file))
    return context


def _load(flag: str, path: str, load: Callable[[], None]) -> None:
    try:
        load()
    except FileNotFoundError as e:
        raise TopError(f"{flag} {e.filename or path}: no such file") from None
    except (OSError, ssl.SSLError) as e:
        raise TopError(f"{flag} {path}: {getattr(e, 'reason', None) or e.strerror or e}") from None


def basic_auth(user: str | None, password_file: str | None) -> str | None:
    """The Authorization header for --web.basic-auth-user, or None.

    The password never comes from a flag (every user on the host can read
    the command line): from a file, whitespace-trimmed as Prometheus reads a
    scrape config's password_file, or from $CONNWATCH_BASIC_AUTH_PASSWORD.
    """
    if not user:
        if password_file:
            raise TopError("--web.basic-auth-password-file needs --web.basic-auth-user")
        return None
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            raise TopError(f"--web.basic-auth-password-file {password_file}: {e.strerror}") from None
    elif BASIC_AUTH_PASSWORD_ENV in os.environ:
        password = os.environ[BASIC_AUTH_PASSWORD_ENV]
    else:
        raise TopError(f"--web.basic-auth-user {user}: no password: set ${BASIC_AUTH_PASSWORD_ENV} or pass "
                       "--web.basic-auth-password-file")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- what a scrape says ---------------------------------------------------------------


@dataclass
class Process:
    pid: str  # "" for the series the agent folds beyond max_process_series (comm "other")
    comm: str
    container: str
    open_fds: float | None = None
    max_fds: float | None = None
    connections: float = 0
    close_wait: float = 0

    @property
    def fd_usage(self) -> float | None:
        if self.open_fds is None or not self.max_fds:
            return None
        return self.open_fds / self.max_fds


@dataclass
class Listener:
    pid: str
    comm: str
    port: str
    queue: float | None = None
    backlog: float | None = None
    drops: float = 0  # SYNs dropped on the full queue and handshake ACKs dropped (counters)

    @property
    def fill(self) -> float | None:
        if self.queue is None or not self.backlog:
            return None
        return self.queue / self.backlog


@dataclass(frozen=True)
class FailureKey:
    pid: str
    comm: str
    error: str  # EMFILE, ENFILE or EADDRNOTAVAIL
    syscall: str


@dataclass
class Reading:
    """One scrape of the agent, by process, listener and failure counter."""

    processes: dict[str, Process] = field(default_factory=dict)
    listeners: dict[tuple[str, str], Listener] = field(default_factory=dict)
    failures: dict[FailureKey, float] = field(default_factory=dict)
    taken_at: float = 0.0
    ready: bool = False  # connwatch_ready: the agent has read its first snapshot


def parse(text: str, taken_at: float) -> Reading:
    """A scrape's text -> Reading. Series are matched on pid (and port), so
    labels the agent may add later (pod_uid) change nothing."""
    reading = Reading(taken_at=taken_at)
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as e:
        raise TopError(f"the answer is not Prometheus metrics ({e})") from None
    if not any(s.name == metrics.BUILD_INFO.name for s in samples):
        raise TopError("the answer has no connwatch_build_info: is this a connwatch agent? (see --agent)")

    def process(labels: dict[str, str]) -> Process:
        pid = labels.get("pid", "")
        if pid not in reading.processes:
            reading.processes[pid] = Process(pid, labels.get("comm", ""), labels.get("container", ""))
        return reading.processes[pid]

    def listener(labels: dict[str, str]) -> Listener:
        key = (labels.get("pid", ""), labels.get("port", ""))
        if key not in reading.listeners:
            reading.listeners[key] = Listener(key[0], labels.get("comm", ""), key[1])
        return reading.listeners[key]

    def add_failure(labels: dict[str, str], error: str, value: float) -> None:
        key = FailureKey(labels.get("pid", ""), labels.get("comm", ""), error, labels.get("syscall", ""))
        reading.failures[key] = reading.failures.get(key, 0) + value

    for s in samples:
        labels, value = s.labels, s.value
        if s.name == metrics.READY.name:
            reading.ready = value == 1
        elif s.name == metrics.PROCESS_OPEN_FDS.name:
            process(labels).open_fds = value
        elif s.name == metrics.PROCESS_MAX_FDS.name:
            process(labels).max_fds = value
        elif s.name == metrics.CONNECTIONS.name:
            process(labels).connections += value
        elif s.name == metrics.CONNECTIONS_CLOSE_WAIT.name:
            process(labels).close_wait += value
        elif s.name == metrics.LISTEN_QUEUE_LENGTH.name:
            listener(labels).queue = value
        elif s.name == metrics.LISTEN_BACKLOG.name:
            listener(labels).backlog = value
        elif s.name in (metrics.LISTEN_DROPS.name, metrics.LISTEN_OVERFLOW_DROPS.name):
            listener(labels).drops += value
        elif s.name == metrics.FD_ALLOC_FAILURES.name:
            add_failure(labels, labels.get("errno", ""), value)
        elif s.name == metrics.PORT_EXHAUSTION_FAILURES.name:
            add_failure(labels, "EADDRNOTAVAIL", value)
    return reading


def increase(now: float, before: float) -> float:
    """What a counter gained between two frames. One that went down was reset
    (its process or the agent restarted): all of it is new, as for
    Prometheus' increase()."""
    return now - before if now >= before else now


# ---- sorting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sort:
    key: str  # the key press that selects it
    title: str
    value: Callable[[Process], float]


def _known_first(value: float | None) -> float:
    return -1 if value is None else value


SORTS = (
    Sort("u", "fd usage", lambda p: _known_first(p.fd_usage)),  # the first is the default
    Sort("f", "open fds", lambda p: _known_first(p.open_fds)),
    Sort("c", "connections", lambda p: p.connections),
    Sort("w", "CLOSE_WAIT", lambda p: p.close_wait),
)
SORT_BY_KEY = {s.key: s for s in SORTS}


def sorted_processes(reading: Reading, sort: Sort) -> list[Process]:
    return sorted(reading.processes.values(),
                  key=lambda p: (-sort.value(p), -_known_first(p.fd_usage), p.pid))


def sorted_listeners(reading: Reading) -> list[Listener]:
    return sorted(reading.listeners.values(),
                  key=lambda lst: (-_known_first(lst.fill), -lst.drops, lst.pid, lst.port))


# ---- drawing -------------------------------------------------------------------------


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    # the agent's folded "other" row sums many processes' fds and limits
    return f"{value:.0f}" if value < 1e6 else f"{value / 1e6:.1f}M"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _level(value: float | None, warning: float, critical: float) -> str:
    """The colour of a usage: none, yellow from `warning`, red from `critical`."""
    if value is None or value < warning:
        return ""
    return "bold red" if value >= critical else "yellow"


def _table(title: str) -> Table:
    # one space between columns: 80 columns hold every table
    return Table(title=title, title_justify="left", title_style="bold", box=None, padding=(0, 1),
                 pad_edge=False, collapse_padding=True, header_style="bold reverse")


def _title(what: str, shown: int, total: int) -> str:
    if not total:
        return f"{what} (none)"
    return f"{what} ({shown} of {total})" if shown < total else what


def process_table(reading: Reading, sort: Sort, rows: int | None) -> Table:
    processes = sorted_processes(reading, sort)
    shown = processes[:rows]
    table = _table(_title(f"Processes by {sort.title}", len(shown), len(processes)))
    table.add_column("PID", justify="right", width=7, no_wrap=True)
    table.add_column("COMM", width=15, no_wrap=True, overflow="ellipsis")
    table.add_column("CONTAINER", width=12, no_wrap=True, overflow="ellipsis")
    table.add_column("FDS", justify="right", width=7, no_wrap=True)
    table.add_column("LIMIT", justify="right", width=7, no_wrap=True)
    table.add_column("USE%", justify="right", width=6, no_wrap=True)
    table.add_column("CONNS", justify="right", width=7, no_wrap=True)
    table.add_column("CLOSE_WAIT", justify="right", width=10, no_wrap=True)
    for p in shown:
        table.add_row(p.pid or "-", p.comm, p.container, _count(p.open_fds), _count(p.max_fds),
                      Text(_percent(p.fd_usage), style=_level(p.fd_usage, FD_USAGE_WARNING, FD_USAGE_CRITICAL)),
                      _count(p.connections),
                      Text(_count(p.close_wait), style="yellow" if p.close_wait else ""))
    return table


def listener_table(reading: Reading, previous: Reading | None, rows: int | None) -> Table:
    listeners = sorted_listeners(reading)
    shown = listeners[:rows]
    table = _table(_title("Listeners by accept-queue fill", len(shown), len(listeners)))
    table.add_column("PID", justify="right", width=7, no_wrap=True)
    table.add_column("COMM", width=15, no_wrap=True, overflow="ellipsis")
    table.add_column("PORT", justify="right", width=5, no_wrap=True)
    table.add_column("QUEUE", justify="right", width=7, no_wrap=True)
    table.add_column("BACKLOG", justify="right", width=7, no_wrap=True)
    table.add_column("FILL%", justify="right", width=6, no_wrap=True)
    table.add_column("DROPS", justify="right", width=9, no_wrap=True)
    table.add_column("NEW", justify="right", width=7, no_wrap=True)
    for lst in shown:
        new = None
        if previous is not None:
            before = previous.listeners.get((lst.pid, lst.port))
            new = increase(lst.drops, before.drops if before else 0)  # a listener born since: all new
        table.add_row(lst.pid or "-", lst.comm, lst.port, _count(lst.queue), _count(lst.backlog),
                      Text(_percent(lst.fill), style=_level(lst.fill, ACCEPT_QUEUE_WARNING, ACCEPT_QUEUE_FULL)),
                      _count(lst.drops), Text(_count(new), style="bold red" if new else ""))
    return table


def failure_table(reading: Reading, previous: Reading | None, rows: int | None) -> Table:
    def new(key: FailureKey) -> float | None:
        if previous is None:
            return None
        return increase(reading.failures[key], previous.failures.get(key, 0))  # a series born since: all new

    failures = sorted((k for k, v in reading.failures.items() if v > 0),
                      key=lambda k: (-_known_first(new(k)), -reading.failures[k], k.pid, k.error, k.syscall))
    shown = failures[:rows]
    table = _table(_title("EMFILE, ENFILE, EADDRNOTAVAIL failures", len(shown), len(failures)))
    table.add_column("PID", justify="right", width=7, no_wrap=True)
    table.add_column("COMM", width=15, no_wrap=True, overflow="ellipsis")
    table.add_column("ERROR", width=13, no_wrap=True)
    table.add_column("SYSCALL", width=12, no_wrap=True, overflow="ellipsis")
    table.add_column("NEW", justify="right", width=7, no_wrap=True)
    table.add_column("TOTAL", justify="right", width=9, no_wrap=True)
    for key in shown:
        fresh = new(key)
        table.add_row(key.pid or "-", key.comm, key.error, key.syscall,
                      Text(_count(fresh), style="bold red" if fresh else ""), _count(reading.failures[key]))
    return table


@dataclass
class Frame:
    """What one screen shows: the newest reading, the one before it (for
    what counters gained), the sort, and the last scrape error if any."""

    agent_url: str
    reading: Reading
    previous: Reading | None
    sort: Sort
    interactive: bool
    error: str = ""

    def render(self, height: int | None = None) -> Group:
        """All rows, or as many as fit `height` lines."""
        shown_at = time.strftime("%H:%M:%S", time.localtime(self.reading.taken_at))
        header = Text(f"connwatch top  {self.agent_url}  {shown_at}", no_wrap=True, overflow="ellipsis",
                      style="bold")
        if self.error:
            status = Text(f"scrape failed, showing {shown_at}: {self.error}", style="bold red")
        elif not self.reading.ready:
            status = Text("the agent is starting (connwatch_ready is 0): nothing counted yet", style="yellow")
        elif self.interactive:
            status = Text("sort: " + "  ".join(f"{s.key} {s.title}" for s in SORTS) + "  |  q quit")
        elif self.previous:
            status = Text(f"NEW: gained since the previous frame, {REFRESH_SECONDS:g} s before")
        else:
            status = Text("NEW: gained since the previous frame; this is the first")
        status.no_wrap, status.overflow = True, "ellipsis"
        process_rows = listener_rows = failure_rows = None
        if height is not None:
            process_rows, listener_rows, failure_rows = self._rows_that_fit(height)
        return Group(header, status, Text(),
                     process_table(self.reading, self.sort, process_rows), Text(),
                     listener_table(self.reading, self.previous, listener_rows), Text(),
                     failure_table(self.reading, self.previous, failure_rows))

    def _rows_that_fit(self, height: int) -> tuple[int, int, int]:
        """Processes get what the other two tables leave, those at most a
        fifth (failures) and a quarter (listeners) of the rows."""
        budget = max(3, height - HEADER_LINES - 3 * LINES_PER_TABLE)
        failures = min(sum(1 for v in self.reading.failures.values() if v > 0), max(1, budget // 5))
        listeners = min(len(self.reading.listeners), max(1, budget // 4))
        return max(1, budget - failures - listeners), listeners, failures


# ---- running ---------------------------------------------------------------------------


class _Keys:
    """Single key presses from a terminal on stdin (cbreak mode), or none."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def read(self, timeout: float) -> str | None:
        """The next key, or None once `timeout` seconds pass without one."""
        if timeout <= 0:
            return None
        if self.fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 1).decode("utf-8", "replace") if ready else None


@contextmanager
def _keys() -> Iterator[_Keys]:
    if not sys.stdin.isatty():
        yield _Keys(None)
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys one at a time, not echoed; Ctrl-C still interrupts
    try:
        yield _Keys(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read(agent: Agent) -> Reading:
    taken_at = time.time()
    return parse(agent.scrape(), taken_at)


def run(agent: Agent, once: bool = False) -> int:
    """Exit status 0; TopError (one line, for the CLI to print) if the first scrape fails."""
    sort = SORTS[0]
    console = Console(highlight=False)
    try:
        reading = _read(agent)  # an agent that cannot be read at all is an error, not an empty screen
        if once:
            console.print(Frame(agent.url, reading, None, sort, interactive=False).render())
        elif console.is_terminal:
            _live(agent, console, reading, sort)
        else:
            _batch(agent, console, reading, sort)
    except KeyboardInterrupt:
        pass  # Ctrl-C quits, like q
    return 0


def _batch(agent: Agent, console: Console, reading: Reading, sort: Sort) -> None:
    previous = None
    while True:
        console.print(Frame(agent.url, reading, previous, sort, interactive=False).render())
        console.print()
        console.file.flush()  # a pipe reader sees each frame as it is made
        time.sleep(REFRESH_SECONDS)
        previous, reading = reading, _read(agent)


def _live(agent: Agent, console: Console, reading: Reading, sort: Sort) -> None:
    previous, error = None, ""
    with _keys() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            frame = Frame(agent.url, reading, previous, sort, interactive=True, error=error)
            live.update(frame.render(console.height), refresh=True)
            next_frame = time.monotonic() + REFRESH_SECONDS
            while (key := keys.read(next_frame - time.monotonic())) is not None:
                if key in ("q", "Q"):
                    return
                if key in SORT_BY_KEY:
                    frame.sort = sort = SORT_BY_KEY[key]
                    live.update(frame.render(console.height), refresh=True)
            try:
                previous, reading, error = reading, _read(agent), ""
            except TopError as e:  # keep the last good frame on screen, and say why it is old
                error = str(e)
