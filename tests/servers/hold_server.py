"""A TCP server for the tests, driven line by line over stdin.

    hold_server.py [--v4 ADDR] [--v6 ADDR] [--backlog N] [--no-accept]

Prints "ready <port> [<port6>]". Commands (one reply line each):
    accept N      accept N connections (blocking), reply "accepted N"
    count         reply "held N"
    close N       close N held connections, reply "closed N"
    emfile        exhaust the fd table: openat until EMFILE, then socket()
                  and accept4() fail too; reply "emfile <openat> <socket> <accept4>"
    churn N       accept and close N connections, reply "churned N"
    fds N         open /dev/null until N fds are open (or close down to N),
                  reply "fds N"
    connect       open and close a loopback connection to our own listener
                  (socket activity in this process), reply "connected"
    exit          exit with the held connections still open
"""

import argparse
import resource
import socket
import sys

p = argparse.ArgumentParser()
p.add_argument("--v4", default="127.0.0.1")
p.add_argument("--v6", default=None)
p.add_argument("--backlog", type=int, default=4096)
p.add_argument("--port", type=int, default=0)  # 0: any free port
args = p.parse_args()

listeners = []
for family, addr in ((socket.AF_INET, args.v4), (socket.AF_INET6, args.v6)):
    if addr:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, args.port))
        s.listen(args.backlog)
        listeners.append(s)
held = []
files = []  # the fds command's /dev/null handles


def reply(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def accept_any(n):
    import selectors
    sel = selectors.DefaultSelector()
    for s in listeners:
        sel.register(s, selectors.EVENT_READ)
    got = 0
    while got < n:
        for key, _ in sel.select():
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            held.append(conn)
            got += 1
            if got == n:
                break
    sel.close()


def emfile():
    """Fill the fd table, then count failures of three fd-allocating syscalls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = []
    fails = {"openat": 0, "socket": 0, "accept4": 0}
    try:
        while True:
            opened.append(open("/dev/null", "rb"))
    except OSError:
        fails["openat"] += 1
    for _ in range(2):
        try:
            socket.socket()
        except OSError:
            fails["socket"] += 1
    # a connection waits in the queue; accept4 cannot get an fd for it
    opened.pop().close()
    c = socket.create_connection(listeners[0].getsockname()[:2])
    try:
        opened.append(open("/dev/null", "rb"))
    except OSError:
        fails["openat"] += 1
    for _ in range(3):
        try:
            listeners[0].accept()
        except OSError:
            fails["accept4"] += 1
    for f in opened:
        f.close()
    c.close()
    return fails


port_line = " ".join(str(s.getsockname()[1]) for s in listeners)
reply(f"ready {port_line}")
for line in sys.stdin:
    cmd, *rest = line.split()
    n = int(rest[0]) if rest else 0
    if cmd == "accept":
        accept_any(n)
        reply(f"accepted {n}")
    elif cmd == "count":
        reply(f"held {len(held)}")
    elif cmd == "close":
        for _ in range(n):
            held.pop().close()
        reply(f"closed {n}")
    elif cmd == "emfile":
        f = emfile()
        reply(f"emfile {f['openat']} {f['socket']} {f['accept4']}")
    elif cmd == "churn":
        for _ in range(n):
            conn, _ = listeners[0].accept()
            conn.close()
        reply(f"churned {n}")
    elif cmd == "fds":
        import os
        while len(os.listdir("/proc/self/fd")) - 1 < n:  # listdir's own fd
            files.append(open("/dev/null", "rb"))
        while files and len(os.listdir("/proc/self/fd")) - 1 > n:
            files.pop().close()
        reply(f"fds {len(os.listdir('/proc/self/fd')) - 1}")
    elif cmd == "connect":
        socket.create_connection(listeners[0].getsockname()[:2]).close()
        reply("connected")
    elif cmd == "exit":
        reply("bye")
        sys.stdout.flush()
        import os
        os._exit(0)
