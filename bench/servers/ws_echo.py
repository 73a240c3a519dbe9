"""The bench's Python WebSocket echo server: the `websockets` package's
asyncio server, one process, every message sent back as it came.

    python ws_echo.py       prints "ready <port> <pid>", exits on stdin EOF
"""

import asyncio
import logging
import os
import sys

from websockets.asyncio.server import serve

# clients that go away mid-message are part of the load, not news
logging.getLogger("websockets").setLevel(logging.CRITICAL)


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main():
    # no keepalive pings (the bench measures echoes, and its client would
    # have to answer them) and no permessage-deflate (not offered by the
    # bench's client anyway: stated so the setting does not depend on it)
    async with serve(echo, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port} {os.getpid()}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(4096):
            pass


asyncio.run(main())
