"""A real WebSocket server (the `websockets` package) that caps connections per
client IP the way the reference article's servers do: over the cap, the
upgrade is answered 429 Too Many Requests.

    ws_server.py --cap N [--port P] [--cert FILE --key FILE]

With --cert/--key it serves wss: TLS terminated in the application.

Prints "ready <port>". stdin commands: "stats" -> JSON {"open", "accepted",
"rejected"}; "close" -> closes every WebSocket, replies "closed".
"""

import argparse
import asyncio
import collections
import json
import logging
import sys
from http import HTTPStatus

from websockets.asyncio.server import serve

p = argparse.ArgumentParser()
p.add_argument("--cap", type=int, required=True)
p.add_argument("--port", type=int, default=0)
p.add_argument("--cert")
p.add_argument("--key")
args = p.parse_args()

# clients that reset mid-handshake are part of the tests' load, not news
logging.getLogger("websockets").setLevel(logging.CRITICAL)
per_ip = collections.Counter()
stats = {"open": 0, "accepted": 0, "rejected": 0}
connections = set()


def process_request(connection, request):
    ip = connection.remote_address[0]
    if per_ip[ip] >= args.cap:
        stats["rejected"] += 1
        return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from your address\n")
    per_ip[ip] += 1
    return None


async def handler(ws):
    ip = ws.remote_address[0]
    stats["open"] += 1
    stats["accepted"] += 1
    connections.add(ws)
    try:
        async for message in ws:
            await ws.send(message)
    finally:
        connections.discard(ws)
        stats["open"] -= 1
        per_ip[ip] -= 1


async def main():
    tls = None
    if args.cert:
        import ssl
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    async with serve(handler, "127.0.0.1", args.port, process_request=process_request, ssl=tls) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "stats":
                print(json.dumps(stats), flush=True)
            elif line == "close":
                await asyncio.gather(*(ws.close() for ws in list(connections)))
                print("closed", flush=True)


asyncio.run(main())
