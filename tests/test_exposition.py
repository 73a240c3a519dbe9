"""The root-free unit tier: a synthetic snapshot -> the exact /metrics text.

Label formatting, the `other` fold past max_process_series, top-K peers and
destinations, summing of shared series and what is left out (owners that are
gone, values that could not be read) are pinned in tests/fixtures/metrics.txt
(node_exporter's e2e-output.txt pattern). No root, no kernel, no /proc.

A change that means to alter the output regenerates the fixture, and the
diff is reviewed with the change:

    .venv/bin/python tests/test_exposition.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from connwatch import metrics
from connwatch.collector import ConnwatchCollector
from connwatch.config import Config, PeerConfig
from connwatch.snapshot import Snapshot, SourceRead
from connwatch.sources import default_sources
from connwatch.sources.base import Owner, Process
from connwatch.sources.bpf import BpfHealth, MapStats, ProbeState, ProgramStats
from connwatch.sources.connections import (Bucket, ConnCounts, ConnKey, Connections, Histogram, PeerCount,
                                           PeerStats, PortKey, UpgradeKey)
from connwatch.sources.failures import FdFailureKey, Failures, PortExhaustionKey
from connwatch.sources.headroom import Headroom, ProcessFds
from connwatch.fds import FdUse
from connwatch.sources.listeners import Listeners, ListenerState
from connwatch.sources.namespaces import Namespaces, NetnsState
from connwatch.sources.system import System
from connwatch.system import DestinationUse, PortUse, SystemLimits, TcpMem

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "metrics.txt"

# two processes keep their own series, the third is folded into "other"
CONFIG = Config(max_process_series=2, port_destinations_top_k=2, peers=PeerConfig(top_k=2))

NGINX = Owner(100, 1_000)
JAVA = Owner(200, 2_000)
NODE = Owner(300, 3_000)
GONE = Owner(400, 4_000)  # exited: its rows must not be reported
PROCESSES = {
    NGINX: Process(100, "nginx", "c0ffee" * 10 + "abcd", "3f1e2a4b-0000-4000-8000-000000000001"),
    JAVA: Process(200, "java"),
    NODE: Process(300, "node", "", "8daa50c3a64c9ff60bb9eab7b44b56fd"),
}
LEAKY = Process(500, "leaky-client", "", "")  # no socket: known from the fd headroom only


def histogram(per_bucket: dict[int, int], total_seconds: float) -> Histogram:
    running, buckets = 0, []
    for i in range(4):
        running += per_bucket.get(i, 0)
        buckets.append(Bucket((2 ** i) / 1000.0, running))
    return Histogram(tuple(buckets), total_seconds, running + per_bucket.get(99, 0))


def snapshot() -> Snapshot:
    connections = Connections(
        counts={
            ConnKey(NGINX, 443, "tls"): ConnCounts(120, 3, 500, 380),
            ConnKey(NGINX, 80, "websocket"): ConnCounts(40, 0, 41, 1),
            ConnKey(JAVA, 8080, "tcp"): ConnCounts(60, 12, 60, 0),
            ConnKey(NODE, 8080, "tcp"): ConnCounts(2, 0, 9, 7),
            ConnKey(GONE, 8080, "tcp"): ConnCounts(1000, 0, 1000, 0),
        },
        upgrades={UpgradeKey(NGINX, 80, 101): 41, UpgradeKey(NGINX, 80, 429): 5, UpgradeKey(NODE, 8080, 101): 1},
        durations={ConnKey(NGINX, 443, "tls"): histogram({0: 100, 2: 200, 3: 70, 99: 10}, 912.5),
                   ConnKey(NODE, 8080, "tcp"): histogram({1: 7}, 0.011)},
        peers={
            PortKey(NGINX, 443): PeerStats(3, 70, (PeerCount("10.0.0.7", 70), PeerCount("10.0.0.8", 40))),
            PortKey(JAVA, 8080): PeerStats(1, 60, (PeerCount("192.168.1.20", 60),)),
            PortKey(NODE, 8080): PeerStats(2, 1, (PeerCount("10.0.0.7", 1), PeerCount("10.0.0.9", 1))),
        })
    failures = Failures(
        fd_alloc={FdFailureKey(JAVA, "accept4", "EMFILE"): 17, FdFailureKey(NODE, "openat", "ENFILE"): 2,
                  FdFailureKey(GONE, "socket", "EMFILE"): 9},
        port_exhaustion={PortExhaustionKey(NODE, "connect"): 4})
    listeners = Listeners({
        PortKey(NGINX, 443): ListenerState(3, 511, 12, 10, 4096, 511),
        PortKey(NGINX, 80): ListenerState(0, 511, 0, 0, 4096, None),
        PortKey(JAVA, 8080): ListenerState(50, 50, 0, 0, 4096, 1024),
        PortKey(NODE, 8080): ListenerState(1, 128, 0, 0, 1024, 128),
    }, overflow_drops_counted=True)
    headroom = Headroom(
        (ProcessFds(LEAKY, 900, 1000), ProcessFds(PROCESSES[JAVA], 700, 1024),
         ProcessFds(PROCESSES[NGINX], 180, 65536), ProcessFds(PROCESSES[NODE], 20, 1024)),
        busiest=FdUse(500, 900, 1000))
    system = System(SystemLimits(
        open_files=5120, open_files_limit=9223372036854775807, nr_open=1048576,
        conntrack_entries=None, conntrack_entries_limit=None,  # nf_conntrack not loaded: absent
        ephemeral_port_range=(32768, 60999), ephemeral_ports=28232, ephemeral_ports_in_use=1210,
        port_destinations=(DestinationUse("10.1.0.5:5432", 1000), DestinationUse("[2001:db8::1]:443", 200),
                           DestinationUse("10.1.0.6:6379", 10)),
        socket_table_source="bpf_iterator", socket_table_cpu_seconds=0.0042, tcp_time_wait=800, tcp_time_wait_limit=262144,
        tcp_orphans=3, tcp_orphans_limit=65536, tcp_memory_pages=410,
        tcp_memory_pages_limit=TcpMem(93000, 124000, 186000), somaxconn=4096, tcp_max_syn_backlog=1024,
        listen_overflows=12, listen_drops=14), page_size=4096)
    namespaces = Namespaces((
        # the host's namespace, without conntrack: that series is absent
        NetnsState(4026531840, "", (32768, 60999), 262144, 800, None),
        # a pod's own, with a narrower range, a lower TIME_WAIT limit and conntrack
        NetnsState(4026532301, "3f1e2a4b-0000-4000-8000-000000000001", (20000, 20999), 4096, 7, 12,
                   PortUse(640, (DestinationUse("10.96.0.10:53", 600), DestinationUse("10.1.0.5:5432", 40)))),
    ))
    bpf = BpfHealth(
        probes={"accept": ProbeState(True, "tracepoint", "tp_btf/inet_sock_set_state (handshake)"),
                "fd_failures": ProbeState(True, "syscall_hook", "tp_btf/sys_exit"),
                "overflow_drops": ProbeState(False)},
        syscall_hook_armed=False,
        maps={"socks": MapStats(222, 262144, 0, 20_000_000), "peers": MapStats(65536, 65536, 31, 9_000_000)},
        programs={"sock_state": ProgramStats(1_500_000_000, 3_000_000, 2)})
    pieces = {"agent": None, "connections": connections, "failures": failures, "listeners": listeners,
              "headroom": headroom, "system": system, "namespaces": namespaces, "bpf": bpf}
    reads = {name: SourceRead(0.001 * (i + 1), True) for i, name in enumerate(pieces)}
    reads["failures"] = SourceRead(0.0005, True)
    return Snapshot(ready=True, taken_at=1_767_225_600.0, build_seconds=0.0125, processes=PROCESSES,
                    pieces=pieces, reads=reads)


def exposition(s: Snapshot) -> str:
    sources = default_sources(CONFIG, version="1.2.3", kernel="6.1.0-28-amd64")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConnwatchCollector(lambda: s, CONFIG, sources))
    return generate_latest(registry).decode()


def test_exposition_matches_the_fixture():
    assert exposition(snapshot()) == FIXTURE.read_text(), \
        "the /metrics text changed: if meant, run `.venv/bin/python tests/test_exposition.py` and review the diff"


def test_every_declared_metric_of_the_sources_is_in_the_fixture():
    """The fixture covers every family the sources emit: all but the HTTP
    endpoint's own counter (web.py) and what the synthetic host lacks."""
    text = FIXTURE.read_text()
    absent = {metrics.HTTP_CONNECTIONS, metrics.SYSTEM_CONNTRACK_ENTRIES, metrics.SYSTEM_CONNTRACK_LIMIT}
    assert [m.name for m in metrics.ALL if f"# TYPE {m.name} " not in text] == [m.name for m in metrics.ALL
                                                                              if m in absent]


def test_before_the_first_snapshot_only_the_agent_reports():
    text = exposition(Snapshot())
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names == {"connwatch_build_info", "connwatch_ready"}
    assert "connwatch_ready 0.0" in text


def test_a_failed_source_is_absent_and_says_so():
    s = snapshot()
    pieces = {k: v for k, v in s.pieces.items() if k != "listeners"}
    reads = {**s.reads, "listeners": SourceRead(0.002, False)}
    text = exposition(Snapshot(True, s.taken_at, s.build_seconds, s.processes, pieces, reads))
    assert "connwatch_listen_backlog{" not in text
    assert 'connwatch_snapshot_source_success{source="listeners"} 0.0' in text
    assert 'connwatch_snapshot_source_success{source="connections"} 1.0' in text


if __name__ == "__main__":
    FIXTURE.write_text(exposition(snapshot()))
    print(FIXTURE, file=sys.stderr)
