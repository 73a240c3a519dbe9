"""Make a listener drop handshake ACKs on a full accept queue, for real.

On loopback a handshake completes inside connect(), so a plain flood only
ever drops SYNs. To get ACKs dropped by the accept-queue check:
  1. listen(4): up to 5 request socks and 5 queued children;
  2. drop pure ACKs to the port (nftables) and start 5 connects: they
     sit in SYN-RECV as request socks;
  3. lift the filter and connect 5 more: the SYN queue is full, so these
     complete through SYN cookies and fill the accept queue;
  4. when the 5 request socks retransmit their SYN-ACKs (~1 s), the
     clients' ACKs meet a full accept queue: SKB_DROP_REASON_TCP_LISTEN_OVERFLOW.
Run inside a network namespace of the test's own (`ip netns exec`).
Prints "port <port>", then holds everything until stdin closes.
"""

import socket
import subprocess
import sys

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4)
port = listener.getsockname()[1]
table = f"connwatch_test_{port}"
subprocess.run(["nft", "-f", "-"], text=True, check=True, input=f"""
table inet {table} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport {port} tcp flags & (syn | ack) == ack drop
  }}
}}
""")
clients = []
for _ in range(5):
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", port))
    clients.append(c)
subprocess.run(["nft", "delete", "table", "inet", table], check=True)
for _ in range(5):
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(("127.0.0.1", port))
    clients.append(c)
print(f"port {port}", flush=True)
sys.stdin.read()
