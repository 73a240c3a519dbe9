// The bench's Node WebSocket echo server: the `ws` package (tests/node's
// npm dependency; the harness sets NODE_PATH to tests/node/node_modules),
// one process, every message sent back as it came.
//   node ws_echo.js        prints "ready <port> <pid>", exits on stdin EOF
'use strict';
const http = require('http');
const WebSocket = require('ws');

const server = http.createServer((req, res) => { res.writeHead(426); res.end(); });
// permessage-deflate off (ws's default for servers, stated here because the
// benchmark measures framing and syscalls, not compression)
const wss = new WebSocket.Server({ server, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {}); // a client that resets is not the server's failure
});
server.listen(0, '127.0.0.1', () => {
  console.log(`ready ${server.address().port} ${process.pid}`);
});
process.stdin.on('data', () => {});
process.stdin.on('end', () => process.exit(0));
