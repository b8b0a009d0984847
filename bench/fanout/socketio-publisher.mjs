// Paced publisher for the Socket.IO side of the statehouse fan-out benchmark.
//
// usage: node socketio-publisher.mjs REDIS_URL RATE DURATION_SECONDS SIZE FIRST_SEQ
//
// Emits event "m" to room "bench" through @socket.io/redis-emitter (one redis
// PUBLISH per message) with ONE string argument:
//   `${seq} ${t_us} ` padded with 'x' to exactly SIZE characters,
// seq counting up from FIRST_SEQ, t_us = send time in integer microseconds since
// the Unix epoch. Every 5 ms tick it emits all messages due so far, so the total
// is exactly round(RATE * DURATION_SECONDS). At the end it waits for the redis
// client to flush (QUIT), prints `published N last_seq L` and exits 0.
import { Emitter } from "@socket.io/redis-emitter";
import { createClient } from "redis";

const args = process.argv.slice(2);
if (args.length !== 5) {
  console.error("usage: node socketio-publisher.mjs REDIS_URL RATE DURATION_SECONDS SIZE FIRST_SEQ");
  process.exit(2);
}
const [redisUrl, rateArg, durationArg, sizeArg, firstSeqArg] = args;
const rate = Number(rateArg);
const duration = Number(durationArg);
const size = Number(sizeArg);
const firstSeq = Number(firstSeqArg);
if (!(rate > 0) || !(duration > 0) || !Number.isInteger(size) || size <= 0 || !Number.isSafeInteger(firstSeq)) {
  console.error("bad arguments: RATE and DURATION_SECONDS must be > 0, SIZE a positive integer, FIRST_SEQ an integer");
  process.exit(2);
}
const total = Math.round(rate * duration);
const lastSeqPlanned = firstSeq + total - 1;

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

// Longest header this run can produce (t_us has 16 digits until 2286).
const maxHeader = `${lastSeqPlanned} ${nowUs()} `.length;
if (size < maxHeader) {
  console.error(`SIZE ${size} is smaller than the "seq t_us " header (${maxHeader} chars)`);
  process.exit(2);
}

const client = createClient({ url: redisUrl });
client.on("error", (err) => console.error(`redis error: ${err}`));
await client.connect();

const room = new Emitter(client).to("bench");

let sent = 0;
function emitDue(start) {
  const elapsedS = (performance.now() - start) / 1000;
  const due = Math.min(total, Math.floor(elapsedS * rate));
  while (sent < due) {
    const seq = firstSeq + sent;
    const payload = `${seq} ${nowUs()} `.padEnd(size, "x");
    room.emit("m", payload);
    sent++;
  }
}

const start = performance.now();
await new Promise((resolve) => {
  const timer = setInterval(() => {
    emitDue(start);
    if (sent >= total) {
      clearInterval(timer);
      resolve();
    }
  }, 5);
});

// QUIT is queued behind every PUBLISH on the same connection; its reply
// arrives only after redis has processed them all.
await client.quit();

process.stdout.write(`published ${sent} last_seq ${firstSeq + sent - 1}\n`);
process.exit(0);
