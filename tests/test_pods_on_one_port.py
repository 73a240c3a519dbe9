"""Two "pods" (network namespaces) serving on the same port, each reached by
clients from its own 127.0.0.1: every listener-, connection- and
peer-level series stays apart, each equal to its own pod's ground truth
(issue 13: they used to merge by port)."""

from __future__ import annotations

from contextlib import ExitStack

from conftest import network_namespace
from test_listeners import SERVERS, in_netns

PORT = 18080
TRAFFIC = {"pod-a": 5, "pod-b": 3}
BACKLOG = {"pod-a": 33, "pod-b": 44}


def test_two_pods_on_one_port_never_share_a_series(agent):
    with ExitStack() as stack:
        servers, clients = {}, []
        try:
            for pod, n in TRAFFIC.items():
                ns = stack.enter_context(network_namespace())
                srv = in_netns(ns, str(SERVERS / "hold_server.py"), "--port", str(PORT),
                               "--backlog", str(BACKLOG[pod]))
                servers[pod] = srv
                assert int(srv.stdout.readline().split()[1]) == PORT
                cli = in_netns(ns, str(SERVERS / "hold_clients.py"), "127.0.0.1", str(PORT), str(n))
                clients.append(cli)
                assert cli.stdout.readline().strip() == f"connected {n}"
                srv.stdin.write(f"accept {n}\n")
                srv.stdin.flush()
                assert srv.stdout.readline().strip() == f"accepted {n}"
            for pod, n in TRAFFIC.items():
                pid = servers[pod].pid
                m = agent.wait_for_value("connwatch_connections", n, pid=pid, port=PORT)
                assert m.value("connwatch_connections_accepted_total", pid=pid, port=PORT) == n
                assert m.value("connwatch_peer_connections", pid=pid, port=PORT, peer="127.0.0.1") == n
                assert m.value("connwatch_listen_backlog", pid=pid, port=PORT) == BACKLOG[pod]
                assert m.value("connwatch_listen_queue_length", pid=pid, port=PORT) == 0
            # and no series of that port sums both pods
            m = agent.scrape()
            for name in ("connwatch_connections", "connwatch_peer_connections"):
                values = sorted(s.value for s in m.select(name, port=PORT) if s.value)
                assert values == sorted(TRAFFIC.values()), (name, m.select(name, port=PORT))
        finally:
            for p in [*clients, *servers.values()]:
                p.kill()
                p.wait()
