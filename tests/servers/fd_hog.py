"""A process near its fd limit: a listening socket, and /dev/null opened
until it holds PERCENT % of its soft RLIMIT_NOFILE (run it under
`prlimit --nofile=N:N`). The listener is how the agent knows the process.

    fd_hog.py PERCENT

Prints "ready <port> <open fds>", then holds everything until stdin closes.
"""

import os
import resource
import socket
import sys


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # not listdir's own


share = float(sys.argv[1]) / 100
soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
held = []
while open_fds() < round(soft * share):
    held.append(os.open("/dev/null", os.O_RDONLY))
print("ready", listener.getsockname()[1], open_fds(), flush=True)
sys.stdin.read()
