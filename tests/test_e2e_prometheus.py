"""End to end: real agent -> real Prometheus -> every dashboard query and the key alerts.

One module-scoped stack, built once (~10 s once the agent is up):
  * the connwatch agent, attached to the real kernel;
  * Debian's /usr/bin/prometheus scraping it every second and evaluating the
    generated alert rules every second (rendered from dashboards/params.py with
    every `for:` set to 0s, into a temp file);
  * a WebSocket server child (Python `websockets`, per-IP cap answering 429)
    with a soft RLIMIT_NOFILE of 64 and a listen backlog of 1. The test opens
    real WebSocket connections from 127.0.0.2-4 (some refused with 429, two
    closed again), makes the child hold 58 fds (>80 % of its limit), drives it
    into EMFILE, then stops it accepting and overflows its accept queue (SYN
    drops, and handshake-ACK drops with the trick explained in `flood()`);
  * a child in its own network namespace that runs out of local ports
    (EADDRNOTAVAIL from connect()).
Then every panel query, template variable and annotation of every generated
dashboard JSON is evaluated through Prometheus's HTTP API, with the template
variables set to that server's real instance, comm, pid and port, and must
return data; the numbers the panels show are compared with the ground truth;
the EMFILE, listen-drop, fd-usage and accept-queue alerts must reach `firing`;
and every metric of the contract (dashboards/metrics.py) must be served.

CONNWATCH_E2E_BPF_OBJECT=path runs the agent with another BPF object (handy
while the shared tree's object is being rebuilt).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import free_port, stop_process
from dashboards import alerts, metrics
from dashboards.params import DEFAULT

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
PROMETHEUS = "/usr/bin/prometheus"
JSON_DIR = ROOT / "dashboards" / "json"
SERVER_COMM = "cw5-wsserver"
FD_LIMIT = 64
FD_HOLD = 58  # > 80 % (51.2) and < 95 % (60.8) of FD_LIMIT
# a process with no socket at all, holding 90 % of a small limit: a client
# leaking fds, which only the host-wide fd headroom sees
SOCKETLESS_COMM = "cw5-fdleak"
SOCKETLESS_HOG = f"""
import os, resource, sys
from ctypes import CDLL
CDLL(None).prctl(15, b"{SOCKETLESS_COMM}", 0, 0, 0)  # PR_SET_NAME
resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
while len(os.listdir("/proc/self/fd")) - 1 < {FD_HOLD}:
    held.append(os.open("/dev/null", os.O_RDONLY))
print("ready", len(os.listdir("/proc/self/fd")) - 1, flush=True)
sys.stdin.read()
"""
PER_IP_CAP = 3
RATE_INTERVAL = "5s"

pytestmark = pytest.mark.timeout(240)

SERVER = r'''
import ctypes, errno, os, resource, select, socket, sys, threading
from http import HTTPStatus
from websockets.sync import server as wss

ctypes.CDLL(None).prctl(15, sys.argv[3].encode(), 0, 0, 0)  # PR_SET_NAME, inherited by threads
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
cap = int(sys.argv[2])
active, lock = {}, threading.Lock()

def process_request(conn, request):  # the reference article's per-IP cap
    ip = conn.remote_address[0]
    with lock:
        if active.get(ip, 0) >= cap:
            return conn.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from your address\n")
        active[ip] = active.get(ip, 0) + 1

def handler(ws):
    try:
        for msg in ws:
            ws.send(msg)
    finally:
        with lock:
            active[ws.remote_address[0]] -= 1

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(1)
server = wss.serve(handler, sock=sock, process_request=process_request)
accepting, stopped = threading.Event(), threading.Event()
accepting.set()
threads = []

def accept_loop():
    while accepting.is_set():
        if select.select([sock], [], [], 0.05)[0] and accepting.is_set():
            c, addr = sock.accept()
            threads.append(threading.Thread(target=server.handler, args=(c, addr), daemon=True))
            threads[-1].start()
    stopped.set()

threading.Thread(target=accept_loop, daemon=True).start()
held = []
nfds = lambda: len(os.listdir("/proc/self/fd")) - 1
print("port", sock.getsockname()[1], flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "settle":  # until N connection threads are left (a closed one frees ~4 fds)
        while sum(t.is_alive() for t in threads) != int(arg[0]):
            stopped.wait(0.02)
        print("settled", flush=True)
    elif cmd == "hold":  # hold fds until N are open
        while nfds() < int(arg[0]):
            held.append(os.open("/dev/null", os.O_RDONLY))
        print("fds", nfds(), flush=True)
    elif cmd == "emfile":  # open until the soft limit says no, then give the extra fds back
        extra = []
        try:
            while True:
                extra.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
        for fd in extra:
            os.close(fd)
        print("emfile", len(extra), flush=True)
    elif cmd == "stop":  # stop calling accept(); the listener stays open
        accepting.clear()
        stopped.wait()
        print("stopped", flush=True)
'''

PORT_EXHAUSTION = r'''
import ctypes, errno, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000):  # CLONE_NEWNET: our own loopback and port range
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 40001")
listener = socket.socket()
listener.bind(("127.0.0.1", 50000))  # outside the range: both its ports are the clients'
listener.listen(16)
held, failures = [], 0
for _ in range(8):
    c = socket.socket()
    try:
        c.connect(listener.getsockname())
        held.append(c)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        failures += 1
        c.close()
print("eaddrnotavail", failures, flush=True)
sys.stdin.read()
'''


# --- helpers ------------------------------------------------------------------------

def die_with_parent():
    import ctypes
    ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGTERM


def poll(condition, timeout: float = 60.0, what: str = ""):
    """Poll until condition() is truthy and return it (never sleep as synchronisation)."""
    start = time.monotonic()
    deadline = start + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            if os.environ.get("E2E_TRACE"):
                print(f"[{time.monotonic() - start:6.2f}s] {what}", file=sys.stderr)
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def http_json(url: str, params: dict | None = None, timeout: float = 10.0):
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Child:
    def __init__(self, args: list[str], log: Path):
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, preexec_fn=die_with_parent)
        self.pid = self.proc.pid

    def readline(self) -> str:
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"child {self.pid} exited: {self.proc.poll()}")
        return line

    def command(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            stop_process(self.proc, 10)
        self._log.close()


class Prometheus:
    def __init__(self, tmp: Path, agent_port: int, rules: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "connwatch",
                                "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}],
        }))
        self.log = tmp / "prometheus.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        poll(self._ready, 60, "prometheus ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params):
        body = http_json(f"{self.url}/api/v1/{path}", params, timeout=30)
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def range(self, expr: str, start: float, end: float, step: str = "1s") -> list:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def stop(self):
        stop_process(self.proc)
        self._log.close()


class Agent:
    def __init__(self, tmp: Path):
        self.port = free_port()
        cfg = tmp / "connwatch.yml"
        # the dashboards show EMFILE, port exhaustion and listen()'s backlog from
        # the start: where only the syscall hook sees them, it stays attached
        # and the socket table is recounted every second, not every 10 s: the
        # port panels and alerts see this test's connections, not the empty
        # host the agent first counted
        text = ("refresh_interval_seconds: 0.2\nsyscall_tracing: always\n"
                "socket_table_interval_seconds: 1\nsocket_table_idle_interval_seconds: 1\n")
        if os.environ.get("CONNWATCH_E2E_BPF_OBJECT"):  # e.g. an object built from another tree
            text += f"bpf_object: {os.environ['CONNWATCH_E2E_BPF_OBJECT']}\n"
        cfg.write_text(text)
        self.log = tmp / "agent.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [CONNWATCH, "run", f"--web.listen-address=127.0.0.1:{self.port}", f"--config.file={cfg}"],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        poll(self._ready, 180, "agent ready")  # BPF verification can be slow on a busy host

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"agent exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                return re.search(rb"^connwatch_ready 1(\.0)?$", r.read(), re.M) is not None
        except OSError:
            return False

    def stop(self):
        stop_process(self.proc)
        self._log.close()


def open_ws(port: int, source: str, exits: contextlib.ExitStack):
    """A real WebSocket client connection from a chosen loopback source address."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    ws = exits.enter_context(ws_connect(f"ws://127.0.0.1:{port}/", sock=s, open_timeout=10))
    ws.send("ping")
    assert ws.recv(timeout=10) == "ping"
    return ws


def flood(port: int) -> list[socket.socket]:
    """Overflow the accept queue of a listener with backlog 1 that no longer accepts.

    On loopback a handshake completes inside connect(), so a plain flood only
    drops SYNs (counted in sk_drops / ListenOverflows). To also get handshake
    ACKs dropped by the accept-queue check (SKB_DROP_REASON_TCP_LISTEN_OVERFLOW,
    what connwatch_listen_overflow_drops_total counts): hold one connection in
    SYN-RECV by dropping its ACK with a temporary nftables rule, fill the accept
    queue through SYN cookies, and let the request sock's SYN-ACK retransmit
    (~1 s later) bring an ACK that meets the full queue.
    """
    cookies = Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip()
    assert cookies in ("1", "2"), f"the flood needs SYN cookies (net.ipv4.tcp_syncookies=1, is {cookies})"
    table = f"connwatch_e2e_{port}"
    clients = []

    def start_connect():
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        clients.append(c)

    subprocess.run(["nft", "-f", "-"], text=True, check=True, input=(
        f"table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {port} tcp flags & (syn | ack) == ack drop\n  }}\n}}\n"))
    try:
        start_connect()
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
    for _ in range(12):  # 2 fill the queue (cookies), the rest are dropped SYNs
        start_connect()
    return clients


def series_values(prom: Prometheus, selector: str, label: str) -> set[str]:
    return {s["metric"].get(label, "") for s in prom.instant(selector)}


# --- the stack ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_prometheus")
    rules = tmp / "connwatch.rules.yml"
    rules.write_text(alerts.render(DEFAULT.with_all_for("0s")))
    stack = {"tmp": tmp}
    started = []
    exits = contextlib.ExitStack()
    try:
        agent = Agent(tmp)
        started.append(agent)
        prom = Prometheus(tmp, agent.port, rules)
        started.append(prom)
        poll(lambda: prom.instant('up{job="connwatch"} == 1'), 60, "first scrape of the agent")
        t0 = time.time()

        server = Child([sys.executable, "-c", SERVER, str(FD_LIMIT), str(PER_IP_CAP), SERVER_COMM],
                       tmp / "server.log")
        started.append(server)
        port = int(server.readline().split()[1])

        # WebSocket load: 3 + 3 + 2 accepted, 2 refused with 429 (per-IP cap), 2 closed again
        clients, refused = [], 0
        for source, n in (("127.0.0.2", PER_IP_CAP + 2), ("127.0.0.3", PER_IP_CAP), ("127.0.0.4", 2)):
            for _ in range(n):
                try:
                    clients.append(open_ws(port, source, exits))
                except InvalidStatus as e:
                    assert e.response.status_code == 429
                    refused += 1
        assert (len(clients), refused) == (8, 2)
        for ws in clients[-2:]:
            ws.close()
        clients = clients[:-2]
        assert server.command(f"settle {len(clients)}") == "settled"

        # fd headroom: hold > 80 % of the soft limit, then one EMFILE burst
        assert server.command(f"hold {FD_HOLD}") == f"fds {FD_HOLD}"
        assert server.command("emfile").startswith("emfile ")

        # accept-queue overflow
        assert server.command("stop") == "stopped"
        flooders = flood(port)

        socketless = Child([sys.executable, "-c", SOCKETLESS_HOG], tmp / "socketless.log")
        started.append(socketless)
        assert socketless.readline() == f"ready {FD_HOLD}"

        # local port exhaustion in a namespace of its own
        exhauster = Child([sys.executable, "-c", PORT_EXHAUSTION], tmp / "exhaust.log")
        started.append(exhauster)
        assert int(exhauster.readline().split()[1]) > 0

        instance = f"127.0.0.1:{agent.port}"
        stack.update(agent=agent, prom=prom, server=server, port=port, instance=instance, t0=t0,
                     clients=clients, flooders=flooders, exhauster=exhauster, socketless=socketless,
                     vars={"instance": instance, "comm": SERVER_COMM, "pid": str(server.pid),
                           "port": str(port), "datasource": "prometheus"})
        # Prometheus has the load once it scraped the EMFILE and an ACK drop for our port
        poll(lambda: prom.instant(f'connwatch_fd_alloc_failures_total{{pid="{server.pid}",errno="EMFILE"}}'),
             60, "EMFILE scraped")
        poll(lambda: prom.instant(f'connwatch_listen_overflow_drops_total{{port="{port}"}} > 0'),
             60, "handshake-ACK drops scraped")
        poll(lambda: prom.instant(f'connwatch_port_exhaustion_failures_total{{pid="{exhauster.pid}"}}'),
             60, "EADDRNOTAVAIL scraped")
        yield stack
    finally:
        exits.close()
        for s in stack.get("flooders", []):
            s.close()
        for proc in reversed(started):
            proc.stop()


# --- dashboard queries ------------------------------------------------------------------

def substitute(expr: str, variables: dict) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "1s")
    return re.sub(r"\$\{?(\w+)\}?", lambda mm: variables.get(mm.group(1), mm.group(0)), expr)


def panel_targets():
    out = []
    for path in sorted(JSON_DIR.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append(pytest.param(t, id=f"{path.stem}:{panel['id']}:{panel['title']}:{t['refId']}"))
    return out


def evaluate(prom: Prometheus, target: dict, variables: dict, t0: float) -> list:
    expr = substitute(target["expr"], variables)
    assert "$" not in expr, expr
    return prom.instant(expr) if target.get("instant") else prom.range(expr, t0, time.time())


@pytest.fixture(scope="module")
def panel_results(e2e):
    """Every panel query, evaluated once; the empty ones get a few more seconds together
    (rates need two scrapes after the load), so a missing metric costs no per-panel timeout."""
    targets = {p.id: p.values[0] for p in panel_targets()}
    results = {}
    deadline = time.monotonic() + 10
    while True:
        for key, t in targets.items():
            if not results.get(key):
                results[key] = evaluate(e2e["prom"], t, e2e["vars"], e2e["t0"])
        if all(results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(0.5)


@pytest.mark.parametrize("target", panel_targets())
def test_panel_query_returns_data(panel_results, request, target):
    key = request.node.callspec.id
    assert panel_results[key], f"no data for {target['expr']}"


def template_queries():
    out = []
    for path in sorted(JSON_DIR.glob("*.json")):
        for v in json.loads(path.read_text())["templating"]["list"]:
            if v["type"] == "query":
                out.append(pytest.param(v["name"], v["query"], id=f"{path.stem}:{v['name']}"))
    return out


@pytest.mark.parametrize("name,query", template_queries())
def test_template_variable_offers_the_real_value(e2e, name, query):
    """label_values(selector, label) as Grafana runs it: the series API, values of that label."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query, re.S)
    assert m, query
    selector = substitute(m.group(1), e2e["vars"])
    want = e2e["vars"][m.group(2)]

    def values():
        data = e2e["prom"].api("series", **{"match[]": selector, "start": f"{e2e['t0'] - 60:.0f}"})
        return {s.get(m.group(2)) for s in data}

    poll(lambda: want in values(), 30, f"{want!r} among the values of {query}")


def annotation_queries():
    out = []
    for path in sorted(JSON_DIR.glob("*.json")):
        for a in json.loads(path.read_text())["annotations"]["list"]:
            if "expr" in a:
                out.append(pytest.param(a["expr"], id=f"{path.stem}:{a['name']}"))
    return out


@pytest.mark.parametrize("expr", annotation_queries())
def test_annotation_marks_the_failures(e2e, expr):
    expr = substitute(expr, e2e["vars"])
    prom = e2e["prom"]
    poll(lambda: prom.range(expr, e2e["t0"], time.time()), 30, f"annotation events from {expr}")


# --- alerts --------------------------------------------------------------------------------

def firing(prom: Prometheus, name: str, **labels) -> list[dict]:
    return [a for a in prom.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_emfile_alert_fires(e2e):
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchFdAllocationFailures", pid=str(e2e["server"].pid),
                                errno="EMFILE"), 60, "ConnwatchFdAllocationFailures firing")[0]
    assert alert["labels"]["comm"] == SERVER_COMM and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"].endswith("/fd-allocation-failures.md")
    assert f"{SERVER_COMM} (pid {e2e['server'].pid})" in alert["annotations"]["description"]


def test_emfile_alert_names_the_limit(e2e):
    """The description carries the process's soft limit (needs connwatch_process_max_fds)."""
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchFdAllocationFailures", pid=str(e2e["server"].pid)),
                 60, "ConnwatchFdAllocationFailures firing")[0]
    assert f"soft RLIMIT_NOFILE ({FD_LIMIT})" in alert["annotations"]["description"]


def test_listen_drop_alert_fires(e2e):
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchListenQueueOverflow", port=str(e2e["port"])),
                 60, "ConnwatchListenQueueOverflow firing")[0]
    assert alert["labels"]["instance"] == e2e["instance"]
    assert alert["annotations"]["runbook_url"].endswith("/listen-queue-overflow.md")
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    assert f"(effective backlog 1, net.core.somaxconn {somaxconn})" in alert["annotations"]["description"]


def test_accept_queue_alert_fires(e2e):
    """The flooded listener's queue holds 2 with a backlog of 1: 200 % > 80 %."""
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchAcceptQueueFilling", pid=str(e2e["server"].pid),
                                port=str(e2e["port"])), 15, "ConnwatchAcceptQueueFilling firing")[0]
    assert float(alert["value"]) == 2
    assert "holds 2 connections, 200% of its effective backlog of 1" in alert["annotations"]["description"]


def test_fd_usage_alert_fires(e2e):
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchProcessFdUsageHigh", pid=str(e2e["server"].pid),
                                severity="warning"), 15, "ConnwatchProcessFdUsageHigh firing")[0]
    assert float(alert["value"]) == pytest.approx(FD_HOLD / FD_LIMIT, abs=0.02)
    assert f"of {FD_LIMIT} (alert above 80%)" in alert["annotations"]["description"]
    assert not firing(e2e["prom"], "ConnwatchProcessFdUsageHigh", pid=str(e2e["server"].pid), severity="critical")


def test_fd_usage_alert_fires_for_a_process_without_sockets(e2e):
    """The host-wide fd headroom: a process the BPF side never sees (no
    socket) is reported, and the fd alert covers it."""
    pid = str(e2e["socketless"].pid)
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchProcessFdUsageHigh", pid=pid, severity="warning"),
                 30, "ConnwatchProcessFdUsageHigh firing for the socket-less process")[0]
    assert alert["labels"]["comm"] == SOCKETLESS_COMM
    assert float(alert["value"]) == pytest.approx(FD_HOLD / FD_LIMIT, abs=0.001)
    assert f"of {FD_LIMIT} (alert above 80%)" in alert["annotations"]["description"]


def test_namespace_ephemeral_ports_alert_names_the_namespace(e2e):
    """The exhauster's own namespace: a range of 2 ports, both held towards
    its listener (100 %); the host's namespace is not in this alert."""
    netns = str(os.stat(f"/proc/{e2e['exhauster'].pid}/ns/net").st_ino)
    alert = poll(lambda: firing(e2e["prom"], "ConnwatchNamespaceEphemeralPortsFilling", netns=netns),
                 60, "ConnwatchNamespaceEphemeralPortsFilling firing")[0]
    assert float(alert["value"]) == 1
    assert ("holds 2 local ports, 100% of that namespace's ip_local_port_range (2 ports; alert above 80%)"
            in alert["annotations"]["description"])
    host = str(os.stat("/proc/self/ns/net").st_ino)
    assert not firing(e2e["prom"], "ConnwatchNamespaceEphemeralPortsFilling", netns=host)


def test_agent_is_up_and_not_alerting_about_itself(e2e):
    prom = e2e["prom"]
    assert prom.instant(f'up{{job="connwatch",instance="{e2e["instance"]}"}} == 1')
    assert not firing(prom, "ConnwatchAgentDown")


# --- ground truth through Prometheus (what the panels above will show) ----------------------

def value_of(prom: Prometheus, expr: str) -> float | None:
    result = prom.instant(expr)
    return float(result[0]["value"][1]) if result else None


def wait_value(e2e, expr: str, want: float, what: str):
    prom = e2e["prom"]
    expr = substitute(expr, e2e["vars"])
    deadline = time.monotonic() + 10
    while value_of(prom, expr) != want:
        if time.monotonic() > deadline:
            inner = re.findall(r"connwatch_\w+\{[^}]*\}", expr)
            series = [(r["metric"], r["value"][1]) for sel in inner for r in prom.instant(sel)]
            pytest.fail(f"{what}: {expr} is {value_of(prom, expr)}, want {want}; series: {series}")
        time.sleep(0.2)


PROC = 'instance="$instance",pid="$pid"'


def test_connection_counts_match_ground_truth(e2e):
    # 10 TCP connections accepted: 8 upgraded, 2 answered 429 and closed; 2 upgraded ones closed
    # again; the flood's connections wait in the accept queue and are never accepted
    wait_value(e2e, f"sum(connwatch_connections{{{PROC}}})", 6, "open connections")
    wait_value(e2e, f"sum(connwatch_connections_accepted_total{{{PROC}}})", 10, "accepted")
    wait_value(e2e, f"sum(connwatch_connections_closed_total{{{PROC}}})", 4, "closed")
    wait_value(e2e, f'connwatch_listen_backlog_requested{{{PROC},port="$port"}}', 1, "requested backlog")
    emfile = substitute(f'sum(connwatch_fd_alloc_failures_total{{{PROC},syscall="openat",errno="EMFILE"}})',
                        e2e["vars"])
    poll(lambda: (value_of(e2e["prom"], emfile) or 0) >= 1, 20, "EMFILE counted on openat")


def test_websocket_counts_match_ground_truth(e2e):
    wait_value(e2e, f'sum(connwatch_connections{{{PROC},kind="websocket"}})', 6, "open WebSocket connections")
    wait_value(e2e, f'sum(connwatch_websocket_upgrades_total{{{PROC},status="101"}})', 8, "101 upgrades")
    wait_value(e2e, f'sum(connwatch_websocket_upgrades_total{{{PROC},status="429"}})', 2, "429 refusals")
    wait_value(e2e, 'max(connwatch_peer_connections_max{instance="$instance",port="$port"})', PER_IP_CAP,
               "busiest peer")
    # open now: 3 from 127.0.0.2, 3 from 127.0.0.3 (127.0.0.4's two were closed)
    wait_value(e2e, 'max(connwatch_peers{instance="$instance",port="$port"})', 2, "distinct peers")
    for peer in ("127.0.0.2", "127.0.0.3"):
        wait_value(e2e, f'connwatch_peer_connections{{instance="$instance",port="$port",peer="{peer}"}}',
                   PER_IP_CAP, f"connections of {peer}")
    wait_value(e2e, 'sum(connwatch_connection_duration_seconds_count{instance="$instance",port="$port"})', 4,
               "closed connections in the duration histogram")


def test_fd_headroom_matches_ground_truth(e2e):
    wait_value(e2e, f"connwatch_process_max_fds{{{PROC}}}", FD_LIMIT, "soft RLIMIT_NOFILE")
    wait_value(e2e, f"connwatch_process_open_fds{{{PROC}}}", FD_HOLD, "open fds")


def test_accept_queue_matches_ground_truth(e2e):
    # backlog 1 queues 2 connections (the kernel's "full" is queue > backlog)
    wait_value(e2e, f'connwatch_listen_backlog{{{PROC},port="$port"}}', 1, "effective backlog")
    wait_value(e2e, f'connwatch_listen_queue_length{{{PROC},port="$port"}}', 2, "accept queue length")


# --- the contract ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(e2e) -> set[str]:
    """Names of every connwatch metric (and `up`) Prometheus has from the agent under load."""
    result = e2e["prom"].instant(f'count by (__name__) ({{__name__=~"connwatch_.+|up",instance="{e2e["instance"]}"}})')
    return {r["metric"]["__name__"] for r in result}


@pytest.mark.parametrize("name", sorted(metrics.CONTRACT - {metrics.CONNECTION_DURATION}))
def test_contract_metric_is_served_under_load(served, name):
    """Every metric the dashboards and alerts are written against exists in Prometheus
    once the agent has seen this test's load (a missing one means empty panels)."""
    assert name in served, f"the agent serves no {name} series"


PANEL_TRUTH = [  # (dashboard, panel title, value the panel must show now)
    ("capacity_overview", "WebSocket connections", 6),
    ("capacity_overview", "Upgrades refused (1h)", 2),
    ("process_detail", "Connections", 6),
    ("process_detail", "WebSocket connections", 6),
    ("process_detail", "Open fds", FD_HOLD),
    ("process_detail", "Fd soft limit", FD_LIMIT),
]


@pytest.mark.parametrize("dash,title,want", PANEL_TRUTH, ids=[f"{d}:{t}" for d, t, _ in PANEL_TRUTH])
def test_stat_panel_shows_ground_truth(e2e, dash, title, want):
    panel = next(p for p in json.loads((JSON_DIR / f"{dash}.json").read_text())["panels"] if p["title"] == title)
    (t,) = panel["targets"]
    expr = substitute(t["expr"], e2e["vars"])
    # the 1h window reaches back before the agent started: the first events count via the birth term
    poll(lambda: value_of(e2e["prom"], expr) is not None
         and round(value_of(e2e["prom"], expr), 6) == want, 10, f"{title} == {want} ({expr})")
