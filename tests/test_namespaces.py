"""Limits and usage per network namespace (issue 13): two "pods" with their
own ephemeral port range and tcp_max_tw_buckets, and TIME_WAIT sockets in
one of them; each namespace's connwatch_netns_* series equal that
namespace's own values, the host's namespace's equal the host's."""

from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

from conftest import network_namespace, wait_for
from test_listeners import SERVERS, in_netns

# namespace -> (ip_local_port_range, tcp_max_tw_buckets, TIME_WAIT sockets made in it)
PODS = {"pod-a": ((20000, 20999), 4096, 5), "pod-b": ((40000, 40499), 2048, 0)}


def sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True)


def host_sysctl(key: str) -> list[int]:
    return [int(v) for v in Path("/proc/sys", *key.split(".")).read_text().split()]


def command(server, cmd: str) -> str:
    server.stdin.write(cmd + "\n")
    server.stdin.flush()
    return server.stdout.readline().strip()


def track_connections(ns: str) -> bool:
    """Make conntrack track the namespace's new flows (an nftables rule that
    matches on ct state registers its hooks there); False where the kernel
    has no conntrack to load."""
    rules = ("add table ip cwtest\n"
             "add chain ip cwtest out { type filter hook output priority 0; }\n"
             "add rule ip cwtest out ct state new counter\n")
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                       capture_output=True)
    return r.returncode == 0


def test_each_namespace_reports_its_own_limits_and_counts(start_agent):
    # every refresh recounts the namespaces' ports, near their ranges or not
    agent = start_agent("socket_table_interval_seconds: 0.1\nsocket_table_idle_interval_seconds: 0.1\n")
    with ExitStack() as stack:
        servers, inode, names, ports = {}, {}, {}, {}
        # conntrack is global (built in, or a module loaded by the first
        # namespace that needs it): absent in one namespace, absent in all
        conntrack_loaded = Path("/proc/self/net/stat/nf_conntrack").exists()
        try:
            for pod, ((low, high), tw_limit, _) in PODS.items():
                ns = stack.enter_context(network_namespace())
                inode[pod] = os.stat(f"/run/netns/{ns}").st_ino
                sysctl(ns, "net.ipv4.ip_local_port_range", f"{low} {high}")
                sysctl(ns, "net.ipv4.tcp_max_tw_buckets", str(tw_limit))
                names[pod] = ns
                servers[pod] = srv = in_netns(ns, str(SERVERS / "hold_server.py"))
                ready = srv.stdout.readline().split()
                assert ready[0] == "ready", ready
                ports[pod] = int(ready[1])
            if not conntrack_loaded:
                # not loaded (the VMs' modular kernels, until the rule below): absent, not 0
                for pod in PODS:
                    m = agent.wait_for_value("connwatch_netns_tcp_time_wait", 0, netns=inode[pod])
                assert m.select("connwatch_netns_conntrack_entries") == []
            tracked = track_connections(names["pod-a"])
            if not tracked:
                assert not conntrack_loaded
            # TIME_WAIT lands on the side that closes first: here the client
            # half of each loopback connection, closed before the server's
            srv, n = servers["pod-a"], PODS["pod-a"][2]
            for _ in range(n):
                assert command(srv, "connect") == "connected"
            assert command(srv, f"accept {n}") == f"accepted {n}"
            assert command(srv, f"close {n}") == f"closed {n}"

            for pod, ((low, high), tw_limit, time_wait) in PODS.items():
                labels = {"netns": inode[pod]}
                m = agent.wait_for_value("connwatch_netns_tcp_time_wait", time_wait, **labels)
                assert m.value("connwatch_netns_ephemeral_port_range_size", **labels) == high - low + 1
                assert m.value("connwatch_netns_tcp_time_wait_limit", **labels) == tw_limit
                # one series per namespace, with the pod of its listener's owner
                series = m.select("connwatch_netns_tcp_time_wait", **labels)
                owner = m.select("connwatch_listen_backlog", pid=servers[pod].pid)
                assert len(series) == 1 and owner
                assert series[0].labels["pod_uid"] == owner[0].labels["pod_uid"]
                # the clients' closed halves hold their local ports in TIME_WAIT:
                # n ports of the namespace's own range, towards its listener
                use = agent.wait_for_value("connwatch_netns_ephemeral_ports_in_use", time_wait, timeout=40, **labels)
                assert use.value("connwatch_netns_ephemeral_ports_in_use_max_destination", **labels) == time_wait
                by_destination = {x.labels["destination"]: x.value for x in
                                  use.select("connwatch_netns_ephemeral_ports_in_use_by_destination", **labels)}
                assert by_destination == ({f"127.0.0.1:{ports[pod]}": time_wait} if time_wait else {})
                if tracked:
                    # every connection made after the rule: one entry each
                    assert m.value("connwatch_netns_conntrack_entries", **labels) == (n if pod == "pod-a" else 0)
                else:
                    assert m.select("connwatch_netns_conntrack_entries", **labels) == []
        finally:
            for srv in servers.values():
                srv.kill()
                srv.wait()


def test_the_host_namespace_reports_the_host_values(agent):
    """The agent's own listener puts the host's namespace in the list."""
    host = os.stat("/proc/self/ns/net").st_ino
    low, high = host_sysctl("net.ipv4.ip_local_port_range")
    m = agent.wait_for_value("connwatch_netns_ephemeral_port_range_size", high - low + 1, netns=host)
    assert m.value("connwatch_netns_tcp_time_wait_limit", netns=host) == host_sysctl("net.ipv4.tcp_max_tw_buckets")[0]
    # other tests churn connections: poll for a snapshot whose two reads agree
    wait_for(lambda: (s := agent.scrape()).value("connwatch_netns_tcp_time_wait", netns=host)
             == s.value("connwatch_system_tcp_time_wait"), what="the host's TIME_WAIT count in both series")
    # its port use is connwatch_system_ephemeral_*, counted in the kernel, only
    assert m.value("connwatch_system_ephemeral_ports_in_use") is not None
    for name in ("connwatch_netns_ephemeral_ports_in_use", "connwatch_netns_ephemeral_ports_in_use_max_destination",
                 "connwatch_netns_ephemeral_ports_in_use_by_destination"):
        assert m.select(name, netns=host) == [], name
    conntrack = m.value("connwatch_system_conntrack_entries")
    if conntrack is None:
        assert m.select("connwatch_netns_conntrack_entries", netns=host) == []
    else:
        wait_for(lambda: (s := agent.scrape()).value("connwatch_netns_conntrack_entries", netns=host)
                 == s.value("connwatch_system_conntrack_entries"), what="the host's conntrack count in both series")


def hold_clients(ns: str, port: int, n: int):
    cli = in_netns(ns, str(SERVERS / "hold_clients.py"), "127.0.0.1", str(port), str(n))
    assert cli.stdout.readline().strip() == f"connected {n}"
    return cli


def test_a_namespace_near_its_port_range_is_recounted_often_one_far_from_it_rarely(start_agent):
    """Two namespaces with 4 ephemeral ports each: one holding 1 (25 %, below
    arm_ratio), one holding 2 (50 %). After the agent's first count, both
    take 2 and 1 more connections: the one near its range is recounted
    within socket_table_interval_seconds, the one far from it not before
    socket_table_idle_interval_seconds (an hour here)."""
    with ExitStack() as stack:
        procs, inode = [], {}
        try:
            for pod, held in (("far", 1), ("near", 2)):
                ns = stack.enter_context(network_namespace())
                inode[pod] = os.stat(f"/run/netns/{ns}").st_ino
                sysctl(ns, "net.ipv4.ip_local_port_range", "40000 40003")
                # the listener outside the range: every port of it is a client's
                srv = in_netns(ns, str(SERVERS / "hold_server.py"), "--port", "50000")
                procs.append(srv)
                assert srv.stdout.readline().split()[:2] == ["ready", "50000"]
                procs.append(hold_clients(ns, 50000, held))
                inode[pod] = (ns, inode[pod])
            agent = start_agent("socket_table_interval_seconds: 0.1\nsocket_table_idle_interval_seconds: 3600\n")
            for pod, held in (("far", 1), ("near", 2)):
                agent.wait_for_value("connwatch_netns_ephemeral_ports_in_use", held, netns=inode[pod][1])
            for pod, more in (("far", 2), ("near", 1)):
                procs.append(hold_clients(inode[pod][0], 50000, more))
            m = agent.wait_for_value("connwatch_netns_ephemeral_ports_in_use", 3, netns=inode["near"][1])
            # ten recounts of the near one later, the far one still shows its first count
            m = agent.scrape_after(m.value("connwatch_snapshot_timestamp_seconds") + 1.0)
            assert m.value("connwatch_netns_ephemeral_ports_in_use", netns=inode["far"][1]) == 1
            assert m.value("connwatch_netns_ephemeral_ports_in_use", netns=inode["near"][1]) == 3
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
