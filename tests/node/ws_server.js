// A real Node WebSocket server (the `ws` package) with the reference
// article's per-IP cap: over the cap the upgrade is answered 429.
//   node ws_server.js <cap> [workers]
// With workers > 0 it runs Node's cluster module (round-robin: the primary
// accepts and hands each socket to a worker). Prints "ready <port> <pids...>"
// (the pids that serve connections). stdin: "stats" -> JSON {pid: {open,
// accepted, rejected}}.
'use strict';
const cluster = require('cluster');
const http = require('http');
const readline = require('readline');
const WebSocket = require('ws');

const cap = parseInt(process.argv[2], 10);
const workers = parseInt(process.argv[3] || '0', 10);

function serve(onListening) {
  const stats = { open: 0, accepted: 0, rejected: 0 };
  const perIp = new Map();
  const server = http.createServer((req, res) => { res.end('plain http\n'); });
  const wss = new WebSocket.Server({ noServer: true });
  server.on('upgrade', (request, socket, head) => {
    const ip = request.socket.remoteAddress;
    if ((perIp.get(ip) || 0) >= cap) {
      stats.rejected++;
      socket.write('HTTP/1.1 429 Too Many Requests\r\n\r\n');
      socket.destroy();
      return;
    }
    perIp.set(ip, (perIp.get(ip) || 0) + 1);
    wss.handleUpgrade(request, socket, head, (ws) => {
      stats.open++;
      stats.accepted++;
      ws.on('message', (m, isBinary) => ws.send(m, { binary: isBinary }));
      ws.on('close', () => { stats.open--; perIp.set(ip, perIp.get(ip) - 1); });
    });
  });
  // port 0 in cluster mode: the primary binds once and shares the port
  server.listen(process.env.PORT ? parseInt(process.env.PORT, 10) : 0, '127.0.0.1', () => onListening(server));
  return stats;
}

if (workers > 0 && cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_RR;
  let listening = 0;
  let port = 0;
  const pending = new Map();
  for (let i = 0; i < workers; i++) {
    const w = cluster.fork();
    w.on('message', (msg) => {
      if (msg.type === 'listening') {
        port = msg.port;
        if (++listening === workers) {
          const pids = Object.values(cluster.workers).map((x) => x.process.pid);
          console.log(`ready ${port} ${pids.join(' ')}`);
        }
      } else if (msg.type === 'stats') {
        pending.set(msg.pid, msg.stats);
        if (pending.size === workers) {
          console.log(JSON.stringify(Object.fromEntries(pending)));
          pending.clear();
        }
      }
    });
  }
  readline.createInterface({ input: process.stdin }).on('line', (line) => {
    if (line.trim() === 'stats') for (const w of Object.values(cluster.workers)) w.send('stats');
  }).on('close', () => process.exit(0));
} else if (workers > 0) {
  const stats = serve((server) => process.send({ type: 'listening', port: server.address().port }));
  process.on('message', (m) => { if (m === 'stats') process.send({ type: 'stats', pid: process.pid, stats }); });
} else {
  const stats = serve((server) => console.log(`ready ${server.address().port} ${process.pid}`));
  readline.createInterface({ input: process.stdin }).on('line', (line) => {
    if (line.trim() === 'stats') console.log(JSON.stringify({ [process.pid]: stats }));
  }).on('close', () => process.exit(0));
}
