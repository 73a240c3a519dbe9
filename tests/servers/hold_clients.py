"""Open N TCP connections to host:port and hold them until stdin closes.

    hold_clients.py HOST PORT N [--nonblocking]

Prints "connected N" once all connects were issued (and, blocking, completed).
"""

import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nonblocking = "--nonblocking" in sys.argv
held = []
for _ in range(n):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if nonblocking:
        s.setblocking(False)
        s.connect_ex((host, port))
    else:
        s.connect((host, port))
    held.append(s)
print(f"connected {n}", flush=True)
sys.stdin.read()
