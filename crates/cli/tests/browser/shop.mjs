// The shop in a real browser: log in, fill the cart, kill -9 the instance
// that served us from the dashboard, reload, and find the cart intact; then
// kill the instance relaying the page's live WebSocket, check out, and see
// the order's status arrive live through another instance.
// Usage: node shop.mjs SHOP_URL DASHBOARD_URL SCREENSHOT_DIR
// Exit 0 on success; on failure, print why, take a screenshot, exit 1.
import { chromium } from "playwright-core";

const [shopUrl, dashboardUrl, outDir] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const context = await browser.newContext();
const shop = await context.newPage();
let step = "start";
const say = (msg) => console.log(`browser: ${msg}`);

async function cartRows() {
  return (await shop.locator("#cart tr").allInnerTexts()).map((t) => t.replace(/\s+/g, " ").trim());
}

try {
  step = "open the shop";
  await shop.goto(shopUrl);
  await shop.waitForSelector("#catalog tr");

  step = "sign up";
  await shop.fill("#email", `browser-${Date.now()}@shop.example`);
  await shop.fill("#password", "correct horse battery");
  await shop.click("button[data-action=signup]");
  await shop.waitForFunction(() => document.querySelector("#who").textContent.startsWith("logged in as"));

  step = "fill the cart";
  for (const item of ["tea", "tea", "mug"]) {
    const before = await shop.locator("#log div").count();
    await shop.click(`#catalog button[onclick="add('${item}')"]`);
    // add = GET /api/me, PUT the line, GET /api/me (refresh): wait for all three.
    await shop.waitForFunction((n) => document.querySelectorAll("#log div").length >= n + 3, before);
  }
  // The log also gets the live socket's lines, so counting lines is not
  // enough: wait for the cart itself to show every add.
  await shop.waitForFunction(() => {
    const cart = document.querySelector("#cart").textContent;
    return cart.includes("Green tea") && cart.includes("× 2") && cart.includes("Stoneware mug");
  });
  const before = await cartRows();
  const servedBy = (await shop.textContent("#served")).trim();
  say(`cart ${JSON.stringify(before)}, last served by ${servedBy}`);
  await shop.screenshot({ path: `${outDir}/1-cart-before.png`, fullPage: true });

  step = `kill ${servedBy} from the dashboard`;
  const dash = await context.newPage();
  await dash.goto(dashboardUrl);
  const row = dash.locator("#rows tr", { hasText: servedBy }).first();
  await row.waitFor();
  // The dashboard lists the requests we just made, with who served them.
  await dash.waitForFunction(() => document.querySelectorAll("#recent tr").length > 0);
  await row.locator("button.kill").click();
  await dash.waitForFunction(
    (name) => [...document.querySelectorAll("#rows tr")].some((tr) => tr.cells[0].textContent === name && tr.textContent.includes("exited")),
    servedBy,
  );
  await dash.screenshot({ path: `${outDir}/2-dashboard-after-kill.png`, fullPage: true });
  say(`${servedBy} killed`);

  step = "reload the shop";
  await shop.bringToFront();
  await shop.reload();
  await shop.waitForFunction(() => document.querySelector("#who").textContent.startsWith("logged in as"), null, { timeout: 15000 });
  await shop.waitForFunction(() => document.querySelector("#cart").textContent.includes("× 2"), null, { timeout: 15000 });
  const after = await cartRows();
  const servedAfter = (await shop.textContent("#served")).trim();
  await shop.screenshot({ path: `${outDir}/3-cart-after-kill.png`, fullPage: true });
  say(`after the kill: cart ${JSON.stringify(after)}, served by ${servedAfter}`);
  if (JSON.stringify(after) !== JSON.stringify(before)) throw new Error(`cart changed: ${JSON.stringify(after)}`);
  if (servedAfter === servedBy) throw new Error(`still served by the killed ${servedBy}`);

  step = "live connection";
  await shop.waitForFunction(() => document.querySelector("#live").textContent.startsWith("live via "), null, { timeout: 15000 });
  const liveVia = (await shop.textContent("#live")).replace("live via ", "").trim();
  say(`live updates relayed by ${liveVia}`);

  step = `kill ${liveVia}, the instance relaying the live socket`;
  await dash.bringToFront();
  await dash.locator("#rows tr", { hasText: liveVia }).first().locator("button.kill").click();
  await dash.waitForFunction(
    (name) => [...document.querySelectorAll("#rows tr")].some((tr) => tr.cells[0].textContent === name && tr.textContent.includes("exited")),
    liveVia,
  );
  await shop.bringToFront();
  await shop.waitForFunction(
    (dead) => { const t = document.querySelector("#live").textContent; return t.startsWith("live via ") && !t.endsWith(dead); },
    liveVia,
    { timeout: 15000 },
  );
  const liveAfter = (await shop.textContent("#live")).replace("live via ", "").trim();
  say(`live socket back through ${liveAfter}`);

  step = "check out and watch the status arrive live";
  await shop.click("#checkout");
  await shop.waitForSelector("#orders tr[id^=order-]");
  const orderId = await shop.getAttribute("#orders tr[id^=order-]", "id");
  await shop.waitForFunction(
    (id) => document.querySelector(`#${id} .status`)?.textContent === "fulfilled",
    orderId,
    { timeout: 20000 },
  );
  const liveLines = (await shop.locator("#log div").allInnerTexts()).filter((t) => t.includes(`live: order #${orderId.replace("order-", "")}`));
  await shop.screenshot({ path: `${outDir}/4-order-status-live.png`, fullPage: true });
  say(`order ${orderId} fulfilled, pushed live: ${JSON.stringify(liveLines)}`);
  if (!liveLines.some((l) => l.includes("fulfilled"))) throw new Error("the fulfilled status did not come over the live socket");
  say("ok");
  await browser.close();
} catch (e) {
  console.error(`browser: failed at "${step}": ${e.message}`);
  try { await shop.screenshot({ path: `${outDir}/failure.png`, fullPage: true }); } catch {}
  await browser.close();
  process.exit(1);
}
