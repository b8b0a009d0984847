// Socket.IO fan-out node for the statehouse fan-out benchmark.
//
// usage: node socketio-server.mjs PORT REDIS_URL NAME
//
// A plain http server + socket.io Server on 127.0.0.1:PORT, websocket transport
// only, with the Redis adapter (@socket.io/redis-adapter, node-redis v4
// clients). Every connecting socket joins room "bench"; messages published by
// @socket.io/redis-emitter to that room are fanned out to the local sockets.
// Prints exactly one line `listening PORT` once the http server is listening and
// the adapter's redis subscriptions are active. No per-message output.
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const [portArg, redisUrl, name] = process.argv.slice(2);
const port = Number(portArg);
if (!Number.isInteger(port) || port <= 0 || port > 65535 || !redisUrl || !name) {
  console.error("usage: node socketio-server.mjs PORT REDIS_URL NAME");
  process.exit(2);
}

const fail = (what, err) => {
  console.error(`[${name}] ${what}: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
};

const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
pubClient.on("error", (err) => console.error(`[${name}] redis pub error: ${err}`));
subClient.on("error", (err) => console.error(`[${name}] redis sub error: ${err}`));

try {
  await Promise.all([pubClient.connect(), subClient.connect()]);
} catch (err) {
  fail("redis connect", err);
}

const httpServer = createServer((req, res) => {
  res.writeHead(404).end();
});

const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  adapter: createAdapter(pubClient, subClient),
});

io.on("connection", (socket) => {
  socket.join("bench");
});

// The adapter issues its PSUBSCRIBE (broadcast channel) and then its SUBSCRIBE
// (request/response channels) on subClient without exposing the promises.
// Commands on one connection are processed in order, so once the adapter's
// node-specific response channel has a subscriber, the pattern subscription
// that carries emitter broadcasts is active too.
async function waitForSubscriptions() {
  const adapter = io.of("/").adapter;
  const channel = adapter.specificResponseChannel;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const counts = await pubClient.pubSubNumSub(channel);
    if (Number(counts[channel] ?? 0) >= 1) return;
    if (Date.now() > deadline) throw new Error(`no subscription on ${channel} after 10s`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

try {
  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(port, "127.0.0.1", () => {
      httpServer.off("error", reject);
      resolve();
    });
  });
  await waitForSubscriptions();
} catch (err) {
  fail("startup", err);
}

process.stdout.write(`listening ${port}\n`);

let stopping = false;
async function shutdown() {
  if (stopping) return;
  stopping = true;
  const force = setTimeout(() => process.exit(0), 3000);
  force.unref();
  try {
    // Closes all sockets, the adapters (unsubscribes) and the http server.
    await new Promise((resolve) => io.close(() => resolve()));
  } catch {
    // already closed
  }
  await Promise.allSettled([pubClient.quit(), subClient.quit()]);
  clearTimeout(force);
  process.exit(0);
}

process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
