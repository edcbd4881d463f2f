// Middleware overhead per request on a warm cache, Node, with and without it in the same run.
// Two apps that differ only by `app.use("*", versionCheck(...))`, measured in alternating
// rounds so machine drift hits both alike:
//   1. in process: `app.fetch(request)` in a loop (the middleware's whole cost, nothing else);
//   2. over HTTP: a node:http server per app, loaded by wrk (what a Node service would see).
// Needs a registry (LOCKSTEP_URL + LOCKSTEP_TOKEN; bench/edge_middleware.sh starts one), read
// once to warm the cache; the TTL is long enough that no round reads it again.
//   LOCKSTEP_URL=http://127.0.0.1:7070 LOCKSTEP_TOKEN=… node bench/overhead.mjs
import { execFile } from "node:child_process";
import { createServer } from "node:http";
import { Hono } from "hono";
import { versionCheck } from "../dist/index.js";

const url = process.env.LOCKSTEP_URL;
const token = process.env.LOCKSTEP_TOKEN;
if (!url || !token) throw new Error("set LOCKSTEP_URL and LOCKSTEP_TOKEN");
const rounds = Number(process.env.ROUNDS ?? 5);
const perRound = Number(process.env.REQUESTS ?? 200_000);
const wrkSecs = Number(process.env.WRK_SECS ?? 3);
const version = "11111111-aaaa-4bbb-8ccc-000000000001";

await fetch(`${url}/v1/envs/production/services/bench-edge/release`, {
  method: "PUT",
  headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
  body: JSON.stringify({ version_id: version }),
}).then((r) => r.text());

function makeApp(withCheck, noop = false) {
  const app = new Hono();
  if (noop) {
    // The cost of having any middleware at all in Hono (its compose path), for reference.
    app.use("*", async (_c, next) => next());
  }
  if (withCheck) {
    app.use("*", versionCheck({ registry: url, token, service: "bench-edge", versionId: version, cacheTtlMs: 3_600_000, logger: { info() {}, warn() {} } }));
  }
  app.get("/", (c) => c.json({ ok: true }));
  return app;
}
const plain = makeApp(false);
const checked = makeApp(true);
const noop = makeApp(false, true);
// Warm: the one registry read, and the JIT.
const warm = await checked.fetch(new Request("http://bench/"));
if (warm.status !== 200) throw new Error(`warm-up answered ${warm.status}`);

async function inProcess(app) {
  const req = new Request("http://bench/");
  // CPU time of this process, not wall time: on a shared machine other processes' load
  // stretches wall time for both apps alike but unevenly between rounds.
  const t0 = process.cpuUsage();
  for (let i = 0; i < perRound; i++) {
    const res = await app.fetch(req);
    if (res.status !== 200) throw new Error(`answered ${res.status}`);
  }
  const used = process.cpuUsage(t0);
  return ((used.user + used.system) * 1000) / perRound; // CPU ns per request
}

function serve(app) {
  const server = createServer(async (req, res) => {
    const response = await app.fetch(new Request(`http://bench${req.url}`, { method: req.method }));
    res.writeHead(response.status, Object.fromEntries(response.headers));
    res.end(Buffer.from(await response.arrayBuffer()));
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const ns = { plain: [], checked: [], noop: [] };
for (let r = 0; r < rounds; r++) {
  ns.plain.push(await inProcess(plain));
  ns.checked.push(await inProcess(checked));
  ns.noop.push(await inProcess(noop));
}
let rps = null;
if (process.env.NO_HTTP !== "1") {
  rps = { plain: [], checked: [] };
  const servers = { plain: await serve(plain), checked: await serve(checked) };
  // wrk runs in a child process while this one serves: spawn it asynchronously.
  const wrkAsync = (port) =>
    new Promise((ok, fail) =>
      execFile("wrk", ["-t1", "-c32", `-d${wrkSecs}s`, `http://127.0.0.1:${port}/`], (e, out) => {
        if (e) return fail(e);
        const m = /Requests\/sec:\s+([\d.]+)/.exec(out);
        return m ? ok(Number(m[1])) : fail(new Error(out));
      }),
    );
  for (let r = 0; r < rounds; r++) {
    rps.plain.push(await wrkAsync(servers.plain.address().port));
    rps.checked.push(await wrkAsync(servers.checked.address().port));
  }
  for (const s of Object.values(servers)) s.close();
}

const fmt = (n, d = 0) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });
console.log(`Node ${process.version}, Hono, warm cache, ${rounds} alternating rounds (median)`);
console.log("");
console.log("| measure | without | with versionCheck | with / without |");
console.log("| --- | ---: | ---: | ---: |");
const a = median(ns.plain);
const b = median(ns.checked);
console.log(`| in process, CPU ns per request (${fmt(perRound)} requests/round) | ${fmt(a)} | ${fmt(b)} | ${fmt(a / b, 3)}× throughput (+${fmt(b - a)} ns) |`);
const z = median(ns.noop);
console.log(`| in process, a no-op Hono middleware instead, CPU ns per request | ${fmt(a)} | ${fmt(z)} | ${fmt(a / z, 3)}× (Hono's own cost of one middleware) |`);
if (rps) {
  const x = median(rps.plain);
  const y = median(rps.checked);
  console.log(`| over HTTP (node:http, wrk -t1 -c32 -d${wrkSecs}s), req/s | ${fmt(x)} | ${fmt(y)} | ${fmt(y / x, 3)}× |`);
}
