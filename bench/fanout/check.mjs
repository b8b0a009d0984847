// Self-check for the Socket.IO side of the fan-out benchmark.
//
// usage: node check.mjs [REDIS_PORT]   (default 6390; never 6379)
//
// Starts a private redis-server, 3 socketio-server.mjs nodes, one raw
// Engine.IO v4 / Socket.IO v5 websocket client per node, then runs the publisher
// (RATE 100, DURATION 2, SIZE 100, FIRST_SEQ 1) and checks that every client got
// all 200 messages in order. Prints the frames it observed. Loopback only.
import { spawn, execFileSync } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import WebSocket from "ws"; // transitive dependency of socket.io (engine.io)

const here = dirname(fileURLToPath(import.meta.url));
const redisPort = Number(process.argv[2] ?? 6390);
if (redisPort === 6379) throw new Error("refusing to use port 6379");
const redisUrl = `redis://127.0.0.1:${redisPort}`;
const RATE = 100, DURATION = 2, SIZE = 100, FIRST_SEQ = 1;
const EXPECTED = RATE * DURATION;

const children = [];
let redisStarted = false;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function withTimeout(p, ms, what) {
  return Promise.race([
    p,
    new Promise((_, rej) => setTimeout(() => rej(new Error(`timeout: ${what}`)), ms).unref()),
  ]);
}

function startServer(port, name) {
  const child = spawn(process.execPath, [join(here, "socketio-server.mjs"), String(port), redisUrl, name], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(child);
  let out = "";
  return withTimeout(
    new Promise((resolve, reject) => {
      child.stdout.on("data", (d) => {
        out += d;
        if (out.includes("\n")) {
          const line = out.split("\n")[0];
          if (line === `listening ${port}`) resolve(child);
          else reject(new Error(`${name}: unexpected first line ${JSON.stringify(line)}`));
        }
      });
      child.once("exit", (code) => reject(new Error(`${name} exited early (${code})`)));
    }),
    10_000,
    `${name} listening`,
  );
}

// Raw Engine.IO v4 / Socket.IO v5 client.
function rawClient(port, label, seen) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/socket.io/?EIO=4&transport=websocket`);
  const state = { label, ws, received: [], frames: [], pings: 0 };
  const ready = new Promise((resolve, reject) => {
    ws.on("error", reject);
    ws.on("message", (data, isBinary) => {
      const text = isBinary ? `<binary ${data.length}>` : data.toString();
      if (state.frames.length < 6) state.frames.push(text);
      if (text.startsWith("0{")) {
        seen.open ??= text;
        ws.send("40"); // CONNECT to namespace "/"
      } else if (text.startsWith("40")) {
        seen.connectAck ??= text;
        resolve(state);
      } else if (text === "2") {
        state.pings++;
        ws.send("3");
      } else if (text.startsWith("42")) {
        seen.event ??= text;
        const [ev, payload] = JSON.parse(text.slice(2));
        if (ev !== "m" || typeof payload !== "string") throw new Error(`${label}: odd event ${text}`);
        state.received.push(payload);
      } else {
        state.other = (state.other ?? []).concat(text);
      }
    });
  });
  return withTimeout(ready, 10_000, `${label} connect`);
}

function runPublisher() {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [join(here, "socketio-publisher.mjs"), redisUrl, String(RATE), String(DURATION), String(SIZE), String(FIRST_SEQ)],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    child.once("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`publisher exit ${code}: ${out}`))));
  });
}

async function cleanup() {
  for (const c of children) {
    if (c.exitCode === null) c.kill("SIGTERM");
  }
  await Promise.all(
    children.map((c) =>
      c.exitCode !== null ? c.exitCode : withTimeout(new Promise((r) => c.once("exit", r)), 5000, "server exit").catch(() => "timeout"),
    ),
  ).then((codes) => console.log(`server exit codes: ${codes.join(", ")}`));
  if (redisStarted) {
    try {
      execFileSync("redis-cli", ["-p", String(redisPort), "shutdown", "nosave"], { stdio: "ignore" });
    } catch {
      // redis-cli returns non-zero when the connection drops on shutdown
    }
  }
}

let ok = false;
try {
  execFileSync("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes"]);
  redisStarted = true;
  for (let i = 0; ; i++) {
    try {
      if (execFileSync("redis-cli", ["-p", String(redisPort), "ping"]).toString().trim() === "PONG") break;
    } catch {
      // not up yet
    }
    if (i > 100) throw new Error("redis did not come up");
    await new Promise((r) => setTimeout(r, 50));
  }

  const ports = [await freePort(), await freePort(), await freePort()];
  await Promise.all(ports.map((p, i) => startServer(p, `sio${i}`)));
  console.log(`servers listening on ${ports.join(", ")}`);

  const seen = {};
  const clients = await Promise.all(ports.map((p, i) => rawClient(p, `client${i}`, seen)));

  const pubOut = await runPublisher();
  console.log(`publisher: ${pubOut.trim()}`);
  if (pubOut !== `published ${EXPECTED} last_seq ${FIRST_SEQ + EXPECTED - 1}\n`) throw new Error("unexpected publisher output");

  // Allow the last messages to arrive.
  const deadline = Date.now() + 5000;
  while (clients.some((c) => c.received.length < EXPECTED) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, 200)); // catch any extras

  ok = true;
  for (const c of clients) {
    const seqs = c.received.map((p) => Number(p.split(" ")[0]));
    const inOrder = seqs.every((s, i) => s === FIRST_SEQ + i);
    const sizesOk = c.received.every((p) => p.length === SIZE && /^\d+ \d{16} x+$/.test(p));
    const good = c.received.length === EXPECTED && inOrder && sizesOk;
    ok &&= good;
    console.log(
      `${c.label}: received ${c.received.length}/${EXPECTED}, in order ${inOrder}, sizes ok ${sizesOk}, pings ${c.pings}` +
        (c.other ? `, other frames ${JSON.stringify(c.other)}` : "") +
        (good ? "" : "  <-- FAIL"),
    );
  }
  console.log(`open packet:  ${seen.open}`);
  console.log(`connect ack:  ${seen.connectAck}`);
  console.log(`event frame:  ${seen.event}`);
  for (const c of clients) c.ws.close();
} catch (err) {
  console.error(err.stack ?? err);
  ok = false;
} finally {
  await cleanup();
}
console.log(ok ? "check: 1 passed, 0 failed" : "check: 0 passed, 1 failed");
process.exit(ok ? 0 : 1);
