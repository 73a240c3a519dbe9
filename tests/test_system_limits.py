"""system.py against the real kernel: every value equals what /proc says, and
values follow reality when the test changes it.

Whatever the test changes happens in a network namespace of its own
(`ip netns add`), so its TIME_WAIT sockets and connections neither disturb
nor are disturbed by other tests running on the host at the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import deadline, network_namespace as netns

from connwatch import system
from connwatch.system import TCP_LISTEN, read_system

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
AGENT_SRC = str(ROOT / "agent")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ip netns needs root")




def run_in(ns: str, code: str, timeout: float = 60) -> dict:
    """Run `code` with python inside `ns`; it prints one JSON object."""
    out = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=deadline(timeout),
                         env={**os.environ, "PYTHONPATH": AGENT_SRC})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sysctl_in(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True)


def proc_ints(path: str) -> list[int]:
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def settled(read_proc, read_ours, attempts: int = 50):
    """(proc value, our value) from a moment when /proc did not change around
    our read: other tests on the host move global counters all the time."""
    for _ in range(attempts):
        before = read_proc()
        ours = read_ours()
        if read_proc() == before:
            return before, ours
    pytest.skip("the value kept changing under concurrent load")


# ---- limits: equal to /proc/sys -------------------------------------------------

SYSCTL_FIELDS = {
    "open_files_limit": "fs/file-max",
    "nr_open": "fs/nr_open",
    "tcp_time_wait_limit": "net/ipv4/tcp_max_tw_buckets",
    "tcp_orphans_limit": "net/ipv4/tcp_max_orphans",
    "somaxconn": "net/core/somaxconn",
    "tcp_max_syn_backlog": "net/ipv4/tcp_max_syn_backlog",
}


def test_limits_equal_proc_sys():
    for field, path in SYSCTL_FIELDS.items():
        proc, ours = settled(lambda: proc_ints(f"/proc/sys/{path}")[0],
                             lambda: getattr(read_system(with_socket_table=False), field))
        assert ours == proc, field
    proc, ours = settled(lambda: tuple(proc_ints("/proc/sys/net/ipv4/ip_local_port_range")),
                         lambda: read_system(with_socket_table=False).ephemeral_port_range)
    assert ours == proc
    proc, ours = settled(lambda: proc_ints("/proc/sys/net/ipv4/tcp_mem"),
                         lambda: read_system(with_socket_table=False).tcp_memory_pages_limit)
    assert ours is not None and [ours.min, ours.pressure, ours.max] == proc
    if os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        proc, ours = settled(lambda: proc_ints("/proc/sys/net/netfilter/nf_conntrack_max")[0],
                             lambda: read_system(with_socket_table=False).conntrack_entries_limit)
        assert ours == proc
    else:
        s = read_system(with_socket_table=False)
        assert s.conntrack_entries_limit is None and s.conntrack_entries is None


def test_usage_equals_proc_when_settled():
    def file_nr():
        allocated, free, _ = proc_ints("/proc/sys/fs/file-nr")
        return allocated - free
    proc, ours = settled(file_nr, lambda: read_system(with_socket_table=False).open_files)
    assert ours == proc

    def sockstat_tcp():
        return system.parse_sockstat(Path("/proc/net/sockstat").read_text())["TCP"]
    proc, ours = settled(sockstat_tcp, lambda: read_system(with_socket_table=False))
    assert (ours.tcp_time_wait, ours.tcp_orphans, ours.tcp_memory_pages) == (proc["tw"], proc["orphan"], proc["mem"])

    def listen_counters():
        text = Path("/proc/net/netstat").read_text().splitlines()
        header = next(line for line in text if line.startswith("TcpExt:")).split()
        values = [line for line in text if line.startswith("TcpExt:")][1].split()
        row = dict(zip(header, values))
        return int(row["ListenOverflows"]), int(row["ListenDrops"])
    proc, ours = settled(listen_counters, lambda: read_system(with_socket_table=False))
    assert (ours.listen_overflows, ours.listen_drops) == proc


# ---- TIME_WAIT, ports, listeners: changed by the test, in its own netns ----------

@needs_root
def test_time_wait_rises_by_the_connections_closed_first_here():
    with netns() as ns:
        result = run_in(ns, """
            import json, socket, time
            from connwatch.system import read_system
            before = read_system()
            listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(512)
            clients, servers = [], []
            for _ in range(300):
                c = socket.create_connection(listener.getsockname())
                clients.append(c); servers.append(listener.accept()[0])
            for c in clients:
                c.close()          # the side that closes first gets TIME_WAIT
            for s in servers:
                s.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                after = read_system()
                if after.tcp_time_wait >= before.tcp_time_wait + 300:
                    break
                time.sleep(0.05)
            proc_tw = int(open("/proc/net/sockstat").read().split(" tw ")[1].split()[0])
            print(json.dumps({"before": before.tcp_time_wait, "after": after.tcp_time_wait, "proc": proc_tw,
                              "limit": after.tcp_time_wait_limit,
                              "proc_limit": int(open("/proc/sys/net/ipv4/tcp_max_tw_buckets").read()),
                              "ports_in_use": after.ephemeral_ports_in_use}))
        """)
    assert result["before"] == 0
    assert result["after"] == 300 == result["proc"]
    assert result["limit"] == result["proc_limit"]
    # TIME_WAIT sockets still hold their local ports against that destination
    assert result["ports_in_use"] == 300


@needs_root
@pytest.mark.parametrize("source", ["sock_diag", "proc"])
def test_busiest_destination_counts_outbound_connections_to_one_listener(source):
    with netns() as ns:
        result = run_in(ns, f"""
            import json, socket
            from connwatch import system
            busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen(512)
            quiet = socket.socket(); quiet.bind(("127.0.0.2", 0)); quiet.listen(512)
            held = [socket.create_connection(busy.getsockname()) for _ in range(120)]
            held += [socket.create_connection(quiet.getsockname()) for _ in range(30)]
            # connect() may give two destinations the same local port
            distinct = len({{c.getsockname()[1] for c in held}})
            # accepted sockets sit on the listener's own (ephemeral) port:
            # they must not count as outbound
            held += [busy.accept()[0] for _ in range(120)]
            rng = system.read_port_range()
            use, used_source = system.ephemeral_port_use(rng, prefer="{source}")
            print(json.dumps({{"in_use": use.in_use, "busiest": use.busiest[0],
                              "busiest_count": use.busiest[1], "source": used_source,
                              "busy": "127.0.0.1:%d" % busy.getsockname()[1], "distinct": distinct}}))
        """)
    assert result["source"] == source
    assert result["busiest"] == result["busy"]
    assert result["busiest_count"] == 120
    assert result["in_use"] == result["distinct"] > 120


@needs_root
def test_ipv6_and_v4_mapped_destinations():
    with netns() as ns:
        result = run_in(ns, """
            import json, socket
            from connwatch import system
            v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 0)); v6.listen(64)
            v4 = socket.socket(); v4.bind(("127.0.0.1", 0)); v4.listen(64)
            held = [socket.create_connection(("::1", v6.getsockname()[1])) for _ in range(7)]
            # dual-stack sockets reaching the IPv4 listener: the same destination
            for _ in range(3):
                s = socket.socket(socket.AF_INET6)
                s.connect(("::ffff:127.0.0.1", v4.getsockname()[1])); held.append(s)
            held += [socket.create_connection(v4.getsockname()) for _ in range(2)]
            out = {}
            for source in ("sock_diag", "proc"):
                use, _ = system.ephemeral_port_use(system.read_port_range(), prefer=source)
                out[source] = [use.in_use, *use.busiest]
            out["v6"] = v6.getsockname()[1]
            print(json.dumps(out))
        """)
    expected = [12, f"[::1]:{result['v6']}", 7]
    assert result["sock_diag"] == expected == result["proc"]


@needs_root
def test_port_range_size_excludes_reserved_ports():
    with netns() as ns:
        sysctl_in(ns, "net.ipv4.ip_local_port_range", "40000 40999")
        sysctl_in(ns, "net.ipv4.ip_local_reserved_ports", "40100-40199,50000")
        result = run_in(ns, """
            import json
            from connwatch.system import read_system
            s = read_system()
            print(json.dumps([s.ephemeral_port_range, s.ephemeral_ports, s.ephemeral_ports_in_use,
                              s.port_destinations]))
        """)
    assert result == [[40000, 40999], 900, 0, []]


@needs_root
def test_listener_queue_and_effective_backlog_match_ss():
    with netns() as ns:
        sysctl_in(ns, "net.core.somaxconn", "4096")
        result = run_in(ns, """
            import json, socket, subprocess
            from connwatch.system import TCP_LISTEN, tcp_sockets
            small = socket.socket(); small.bind(("127.0.0.1", 0)); small.listen(37)
            capped = socket.socket(); capped.bind(("127.0.0.1", 0)); capped.listen(65535)
            queued = [socket.create_connection(small.getsockname()) for _ in range(5)]
            sockets, source = tcp_sockets({TCP_LISTEN})
            ours = {s.local_port: [s.recv_queue, s.send_queue] for s in sockets}
            ss = {}
            for line in subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.splitlines():
                state, recvq, sendq, local, _ = line.split(None, 4)
                ss[int(local.rsplit(":", 1)[1])] = [int(recvq), int(sendq)]
            print(json.dumps({"source": source, "ours": ours, "ss": ss,
                              "small": small.getsockname()[1], "capped": capped.getsockname()[1]}))
        """)
    ours = {int(k): v for k, v in result["ours"].items()}
    ss = {int(k): v for k, v in result["ss"].items()}
    assert result["source"] == "sock_diag"
    assert ours == ss
    assert ours[result["small"]] == [5, 37]
    assert ours[result["capped"]] == [0, 4096]


def test_sock_diag_and_proc_see_the_same_listeners():
    via_diag, _ = system.tcp_sockets({TCP_LISTEN})
    via_proc, source = system.tcp_sockets({TCP_LISTEN}, prefer="proc")
    assert source == "proc"
    # listeners come and go with other tests: compare the stable ones
    common = {s.inode for s in via_diag} & {s.inode for s in via_proc}
    for a in via_diag:
        if a.inode in common:
            b = next(x for x in via_proc if x.inode == a.inode)
            assert (a.family, a.local_address, a.local_port) == (b.family, b.local_address, b.local_port)


# ---- a missing file is None, never an exception --------------------------------

@needs_root
def test_missing_conntrack_and_tcp_mem_give_none_and_no_metric():
    """Hide /proc/sys/net/netfilter and tcp_mem in a private mount namespace:
    the files are really absent for the reader, as without nf_conntrack."""
    code = textwrap.dedent("""
        import json
        import os
        from connwatch.config import Config
        from connwatch.snapshot import Snapshot
        from connwatch.sources.base import ProcessSeries, Scrape
        from connwatch.sources.system import System, SystemSource
        from connwatch.system import read_system
        s = read_system()
        piece = System(s, os.sysconf("SC_PAGE_SIZE"))
        scrape = Scrape(Snapshot(ready=True), ProcessSeries({}))
        names = [m.name for m in SystemSource(Config()).families(piece, scrape)]
        print(json.dumps({"conntrack": [s.conntrack_entries, s.conntrack_entries_limit],
                          "tcp_mem": s.tcp_memory_pages_limit, "somaxconn": s.somaxconn, "names": names}))
    """)
    script = ("mount -t tmpfs none /proc/sys/net/netfilter && "
              "mount --bind /dev/null /proc/sys/net/ipv4/tcp_mem && "
              f"exec {PYTHON} -c '{code}'")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=deadline(60), env={**os.environ, "PYTHONPATH": AGENT_SRC})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["conntrack"] == [None, None]
    assert result["tcp_mem"] is None  # /dev/null: present but empty, i.e. unparsable
    assert result["somaxconn"] == proc_ints("/proc/sys/net/core/somaxconn")[0]
    assert "connwatch_system_conntrack_entries" not in result["names"]
    assert "connwatch_system_conntrack_entries_limit" not in result["names"]
    assert "connwatch_system_tcp_memory_pages_limit" not in result["names"]
    assert "connwatch_system_somaxconn" in result["names"]


def test_parsers_on_real_files():
    sockstat = system.parse_sockstat(Path("/proc/net/sockstat").read_text())
    assert {"inuse", "orphan", "tw", "alloc", "mem"} <= set(sockstat["TCP"])
    netstat = system.parse_netstat(Path("/proc/net/netstat").read_text())
    assert "ListenOverflows" in netstat["TcpExt"] and "ListenDrops" in netstat["TcpExt"]
    assert system.parse_port_ranges("8000-8002,9000,") == {8000, 8001, 8002, 9000}
    assert system.parse_port_ranges("\n") == set()


def test_socket_table_numbers_are_carried_between_recounts():
    first = read_system()
    later = read_system(with_socket_table=False, previous=first)
    for name in system.SOCKET_TABLE_FIELDS:
        assert getattr(later, name) == getattr(first, name), name
    assert read_system(with_socket_table=False).ephemeral_ports_in_use is None


@pytest.mark.parametrize("interval, recounted", [(0.1, True), (3600, False)])
def test_agent_recounts_the_socket_table_at_its_own_interval(start_agent, interval, recounted):
    """2,000 new outbound connections show in the ephemeral-port count at the
    next recount, and not before. (The host's other sockets come and go —
    other tests' TIME_WAIT expiring — hence a margin on the way up, and an
    exact comparison only where no recount may happen.)"""
    import socket

    from conftest import wait_for

    name = "connwatch_system_ephemeral_ports_in_use"
    agent = start_agent(f"socket_table_interval_seconds: {interval}\nsocket_table_idle_interval_seconds: {interval}\n")
    before = agent.scrape()
    in_use = before.value(name)
    assert in_use is not None, agent.log_path.read_text()[-4000:]
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(2000)]
    try:
        if recounted:
            m = wait_for(lambda: (m := agent.scrape()).value(name) >= in_use + 1000 and m,
                         what="the new connections in the next socket-table count")
            # what the count cost, counted in the kernel
            (cost,) = m.select("connwatch_socket_table_count_cpu_seconds")
            assert cost.labels == {"method": "bpf_iterator"}
            assert 0 < cost.value < 1
        else:
            # several refreshes later the snapshot is newer, the socket-table count is not
            m = agent.scrape_after(before.value("connwatch_snapshot_timestamp_seconds") + 0.3)
            assert m.value(name) == in_use
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_ephemeral_ports_in_use_per_destination_are_exact(start_agent):
    """Outbound connections from the agent's namespace to two listeners at
    different loopback addresses, 7 to one and 4 to the other: each
    destination's series counts exactly its own."""
    import socket

    from conftest import wait_for

    agent = start_agent("socket_table_interval_seconds: 0.1\nsocket_table_idle_interval_seconds: 0.1\n"
                        "port_destinations_top_k: 1000\n")
    listeners = [socket.create_server((addr, 0), backlog=64) for addr in ("127.0.0.5", "127.0.0.6")]
    want = {}
    clients = []
    try:
        for listener, n in zip(listeners, (7, 4)):
            addr, port = listener.getsockname()
            clients += [socket.create_connection((addr, port)) for _ in range(n)]
            want[f"{addr}:{port}"] = n

        def counted():
            m = agent.scrape()
            return {d: m.value("connwatch_ephemeral_ports_in_use", destination=d) for d in want}

        wait_for(lambda: counted() == want, what=f"per-destination counts {want}")
        m = agent.scrape()
        busiest = m.value("connwatch_system_ephemeral_ports_in_use_max_destination")
        assert busiest >= 7
        assert max(s.value for s in m.select("connwatch_ephemeral_ports_in_use")) == busiest
    finally:
        for c in clients:
            c.close()
        for listener in listeners:
            listener.close()
