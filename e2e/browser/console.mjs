// Drives Debian's Chromium (headless) through the Tether console for e2e/tests/console.rs.
//
//   node console.mjs <scenario>      with CONSOLE_TEST='{"base": ..., "link": ..., ...}'
//
// The Rust test owns every process (gateway, agents, this script). When the page needs the
// world to change (an agent to start or stop) this script prints "STEP <name>" and waits for
// a line on stdin ("OK" or "OK <value>"). Each check that passes prints "PASS <what>"; the
// first that fails throws: the exit code is 1 and stderr says what was expected.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { existsSync, mkdirSync } from "node:fs";

const cfg = JSON.parse(process.env.CONSOLE_TEST || "{}");
const scenario = process.argv[2];
const CHROMIUM = cfg.chromium || "/usr/bin/chromium";
const TIMEOUT = 30000;

const lines = createInterface({ input: process.stdin });
const waiting = [];
const queued = [];
lines.on("line", (l) => (waiting.length ? waiting.shift()(l) : queued.push(l)));
function step(name) {
  console.log(`STEP ${name}`);
  return new Promise((resolve) => {
    const got = (l) => resolve(l.replace(/^OK ?/, ""));
    queued.length ? got(queued.shift()) : waiting.push(got);
  });
}
function pass(what) {
  console.log(`PASS ${what}`);
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  pass(what);
}
async function shot(page, name) {
  if (!cfg.shots) return;
  mkdirSync(cfg.shots, { recursive: true });
  await page.screenshot({ path: `${cfg.shots}/${name}.png`, fullPage: true });
}

if (!existsSync(CHROMIUM)) {
  console.error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; scripts/test does)`);
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
// The gateway's certificate is signed by the test's own CA, which Chromium does not know.
const context = await browser.newContext({
  ignoreHTTPSErrors: true,
  viewport: { width: 1360, height: 820 },
});
context.setDefaultTimeout(TIMEOUT);

async function login(link) {
  const page = await context.newPage();
  const resp = await page.goto(link);
  check(resp.status() === 200, `the login link leads to a page (got ${resp.status()})`);
  const url = new URL(page.url());
  check(url.pathname === "/ui/" && !url.search.includes("code"), `redirected to /ui/ without the code (at ${page.url()})`);
  const cookie = (await context.cookies()).find((c) => c.name === "tether_console");
  check(cookie && cookie.httpOnly && cookie.secure && cookie.sameSite === "Strict" && cookie.expires > Date.now() / 1000,
    "the session cookie is HttpOnly, Secure, SameSite=Strict and expiring");
  return { page, cookie };
}

async function live(page) {
  await page.waitForSelector('body[data-live="open"]');
}

const row = (id) => `tr[data-agent="${id}"]`;
const count = async (page, what) => parseInt(await page.textContent(`[data-count="${what}"]`), 10);

async function ops() {
  const { page } = await login(cfg.link);
  await live(page);
  check(await page.isVisible(row("acme/eu-1")), "the fleet shows acme/eu-1");
  check(await page.isVisible(`${row("acme/eu-1")} .session[data-transport="quic"]`), "the fleet shows its session's transport (quic)");
  const two = await page.getAttribute(`${row("acme/two-ways")} [data-status]`, "title");
  check(await page.getAttribute(`${row("acme/two-ways")} [data-status]`, "data-status") === "degraded" && two.includes("1 of the 2 sessions"),
    `an agent holding 1 of the 2 sessions it wants is degraded (${two})`);
  const before = await count(page, "online");
  await page.evaluate(() => (window.__notReloaded = true));

  await step("start acme/new-1");
  await page.waitForSelector(`${row("acme/new-1")} [data-status="online"]`);
  check(await count(page, "online") === before + 1, "a started agent appears online live, and the online count grows");
  await shot(page, "fleet");
  await step("stop acme/new-1");
  await page.waitForSelector(`${row("acme/new-1")} [data-status="offline"]`);
  check(await count(page, "online") === before, "a stopped agent goes offline live, and the online count shrinks");
  check(await page.evaluate(() => window.__notReloaded === true), "the fleet page was never reloaded");

  // Filters: status=offline shows the stopped agent only among offline ones.
  await page.goto(`${cfg.base}/ui/?status=offline`);
  check(await page.isVisible(row("acme/new-1")) && !(await page.isVisible(row("acme/eu-1"))), "the status filter keeps offline agents only");

  // A command, followed live.
  await page.goto(`${cfg.base}/ui/agents/acme/eu-1`);
  await live(page);
  const calls = await page.textContent("#calls");
  check(calls.startsWith("2 since") && calls.includes("Ok × 1") && calls.includes("PermissionDenied × 1"),
    `the agent page shows its relayed calls by code (${calls})`);
  const services = await page.$$eval("#services [data-service]", (l) => l.map((x) => x.textContent.trim()));
  check(services.join(",") === "billing (grpc),db (tcp)", `the agent page lists its allow-listed services (${services})`);
  check(await page.textContent("#agent-detail td.transport") === "quic" && await page.textContent("#agent-detail td.proxy") === "direct",
    "the agent page shows its session's transport and that it dials without a proxy");
  const bytesFrom = () => page.getAttribute("#bytes", "data-bytes-from").then((b) => parseInt(b, 10));
  const from = await bytesFrom();
  check(from > 0 && parseInt(await page.getAttribute("#bytes", "data-bytes-to"), 10) > 0, `the agent page shows relayed bytes each way (${from} from it)`);
  await page.evaluate(() => (window.__notReloaded = true));
  await step("call acme/eu-1");
  await page.waitForFunction((before) => parseInt(document.querySelector("#bytes").dataset.bytesFrom, 10) > before, from);
  check((await page.textContent("#calls")).startsWith("3 since") && await page.evaluate(() => window.__notReloaded === true),
    "another relayed call moves the calls and bytes live");
  await shot(page, "agent");
  await step("reload acme/eu-1");
  await page.reload();
  await live(page);
  const reloaded = await page.$$eval("#services [data-service]", (l) => l.map((x) => x.getAttribute("data-service")));
  check(reloaded.join(",") === "billing,db,ledger", `a service the agent's reload added is listed (${reloaded})`);
  await page.fill('#submit-form input[name="kind"]', "sleep");
  await page.fill('#submit-form textarea[name="payload"]', '{"ms": 10000}');
  await Promise.all([page.waitForURL(/\/ui\/commands\/t[0-9a-f]+$/), page.click("#submit-form button")]);
  await live(page);
  await page.evaluate(() => (window.__notReloaded = true));
  await page.waitForSelector('#command-detail[data-state="running"] #progress li:not(.none)');
  pass("the command's progress shows while it runs");
  await shot(page, "command");
  await page.waitForSelector('#command-detail[data-state="succeeded"]');
  const progress = await page.$$eval("#progress li", (l) => l.map((x) => x.textContent));
  check(progress.length >= 5 && progress[progress.length - 1].includes("slept 10000 of 10000 ms"), `every progress line arrived (${progress.length})`);
  check(await page.evaluate(() => window.__notReloaded === true), "the command page was never reloaded");
  const id = page.url().split("/").pop();
  await step(`command ${id}`);

  await page.goto(`${cfg.base}/ui/commands?agent=acme/eu-1`);
  check(await page.isVisible(`tr[data-command="${id}"]`), "the commands view lists it");
  // The commands list, unfiltered, gains a command submitted elsewhere, live.
  await page.goto(`${cfg.base}/ui/commands`);
  await live(page);
  await page.evaluate(() => (window.__notReloaded = true));
  const submitted = await step("submit acme/eu-1");
  await page.waitForSelector(`tr[data-command="${submitted}"]`);
  check(await page.evaluate(() => window.__notReloaded === true), "the commands list gains a command submitted through the API, live");
  await page.waitForSelector(`tr[data-command="${submitted}"] .state.succeeded`);
  pass("and its row follows it to succeeded");
  await shot(page, "commands");
  await page.goto(`${cfg.base}/ui/tenants`);
  check(await page.isVisible('tr[data-tenant="acme"]') && await page.isVisible('tr[data-tenant="beta"]'), "the tenants view lists both tenants");
  await shot(page, "tenants");

  // Revoke from the page: confirmation dialog, reason, then offline live.
  await page.goto(`${cfg.base}/ui/agents/acme/eu-2`);
  await live(page);
  check(await page.getAttribute("#agent-detail", "data-status") === "online", "acme/eu-2 is online before");
  await page.fill('#revoke-form input[name="reason"]', "key leaked (console test)");
  await page.fill('#revoke-form input[name="confirm"]', "acme/eu-2");
  let dialog = "";
  page.once("dialog", (d) => { dialog = d.message(); d.accept(); });
  await Promise.all([page.waitForURL(/notice=/), page.click("#revoke-form button")]);
  check(dialog.includes("Revoke acme/eu-2"), "revoking asks for confirmation");
  check((await page.textContent("#notice")).includes("1 session(s) closed"), "the page says its session was closed");
  await live(page);
  await page.waitForSelector('#agent-detail[data-status="offline"]');
  pass("the revoked agent shows offline");
  await step("revoked acme/eu-2");
}

async function refusals() {
  const { page } = await login(cfg.link);
  // The link again: spent.
  const again = await context.newPage();
  let resp = await again.goto(cfg.link);
  check(resp.status() === 401, `a replayed login link is refused (got ${resp.status()})`);
  await shot(again, "login-refused");
  resp = await again.goto(`${cfg.base}/ui/login?code=${"A".repeat(43)}`);
  check(resp.status() === 401, `a forged login link is refused (got ${resp.status()})`);
  resp = await again.goto(`${cfg.base}/ui/login?code=`);
  check(resp.status() === 401, `an empty code is refused (got ${resp.status()})`);

  // Cross-origin and origin-less POSTs, with the session cookie.
  const target = `${cfg.base}/ui/agents/acme/eu-1/commands`;
  let r = await context.request.post(target, { form: { kind: "echo", payload: "x" }, headers: { Origin: "https://evil.example" }, maxRedirects: 0 });
  check(r.status() === 403, `a cross-origin POST is refused (got ${r.status()})`);
  r = await context.request.post(`${cfg.base}/ui/agents/acme/eu-1/revoke`, { form: { reason: "x", confirm: "acme/eu-1" }, headers: { Origin: "https://evil.example" }, maxRedirects: 0 });
  check(r.status() === 403, `a cross-origin revoke is refused (got ${r.status()})`);
  r = await context.request.post(target, { form: { kind: "echo", payload: "x" }, maxRedirects: 0 });
  check(r.status() === 403, `a POST without Origin is refused (got ${r.status()})`);
  r = await context.request.post(target, { form: { kind: "echo", payload: "x" }, headers: { Origin: cfg.base }, maxRedirects: 0 });
  check(r.status() === 303, `the same POST from the console's origin is accepted (got ${r.status()})`);

  // No cookie at all.
  const anon = await browser.newContext({ ignoreHTTPSErrors: true });
  const p = await anon.newPage();
  resp = await p.goto(`${cfg.base}/ui/`);
  check(resp.status() === 401, `without a session the console answers 401 (got ${resp.status()})`);
  await anon.close();

  // A session of a caller whose certificate is then revoked.
  const other = await browser.newContext({ ignoreHTTPSErrors: true });
  const q = await other.newPage();
  resp = await q.goto(cfg.link2);
  check(resp.status() === 200 && new URL(q.url()).pathname === "/ui/", "acme-ops logs in");
  await step("revoke acme-ops");
  resp = await q.goto(`${cfg.base}/ui/`);
  check(resp.status() === 401, `a session of a revoked caller certificate is refused (got ${resp.status()})`);
  await other.close();
  await page.close();
}

async function expiry() {
  // login() landed on /ui/ with 200 through the new cookie: the session worked at first.
  const { page, cookie } = await login(cfg.link);
  // The browser drops the cookie at its Max-Age; put it back with a far expiry, as a stolen
  // or kept copy would be: the gateway must refuse it by itself.
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    await context.addCookies([{ ...cookie, expires: Date.now() / 1000 + 86400 }]);
    const status = (await page.goto(`${cfg.base}/ui/`)).status();
    if (status === 401) break;
    if (Date.now() > deadline) throw new Error(`an expired cookie was still accepted (${status})`);
    await page.waitForTimeout(250);
  }
  pass("an expired cookie is refused");
}

async function scoped() {
  const { page } = await login(cfg.link);
  await live(page);
  const ids = await page.$$eval("tr[data-agent]", (r) => r.map((x) => x.getAttribute("data-agent")));
  check(ids.length > 0 && ids.every((i) => i.startsWith("acme/")), `only acme's agents are listed (${ids.join(" ")})`);
  check(await count(page, "total") === ids.length, "the counts are of acme's agents only");
  const before = await count(page, "total");
  await step("start beta/late then acme/late");
  await page.waitForSelector(row("acme/late"));
  check(!(await page.isVisible(row("beta/late"))), "another tenant's agent starting never shows");
  check(await count(page, "total") === before + 1, "and is not counted");
  await shot(page, "fleet-scoped");
  let resp = await page.goto(`${cfg.base}/ui/agents/beta/us-1`);
  check(resp.status() === 403, `another tenant's agent page is forbidden (got ${resp.status()})`);
  resp = await page.goto(`${cfg.base}/ui/commands/${cfg.other_command}`);
  check(resp.status() === 404, `another tenant's command is not found, like an unused id (got ${resp.status()})`);
  resp = await page.goto(`${cfg.base}/ui/commands`);
  const body = await page.content();
  check(resp.status() === 200 && body.includes(cfg.own_command) && !body.includes(cfg.other_command), "the commands view lists acme's command and not beta's");
  resp = await page.goto(`${cfg.base}/ui/?tenant=beta`);
  check(resp.status() === 403, `filtering the fleet by another tenant is forbidden (got ${resp.status()})`);
  resp = await page.goto(`${cfg.base}/ui/commands?tenant=beta`);
  check(resp.status() === 403, `filtering commands by another tenant is forbidden (got ${resp.status()})`);
  await page.goto(`${cfg.base}/ui/tenants`);
  check(!(await page.isVisible('tr[data-tenant="beta"]')) && await page.isVisible('tr[data-tenant="acme"]'), "the tenants view shows acme only");
  resp = await page.goto(`${cfg.base}/ui/events/agents/beta/us-1`);
  check(resp.status() === 403, `another tenant's live stream is forbidden (got ${resp.status()})`);
  const r = await context.request.post(`${cfg.base}/ui/agents/beta/us-1/revoke`, { form: { reason: "x", confirm: "beta/us-1" }, headers: { Origin: cfg.base }, maxRedirects: 0 });
  check(r.status() === 403, `revoking another tenant's agent is forbidden (got ${r.status()})`);
}

const scenarios = { ops, refusals, expiry, scoped };
try {
  if (!scenarios[scenario]) throw new Error(`unknown scenario ${scenario}`);
  await scenarios[scenario]();
  console.log("DONE");
} catch (e) {
  console.error(e && e.stack ? e.stack : String(e));
  for (const p of context.pages()) {
    const text = await p.innerText("body").catch(() => "");
    console.error(`--- page ${p.url()}:\n${text.slice(0, 2000)}`);
  }
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
