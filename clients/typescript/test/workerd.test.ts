// The same middleware inside Cloudflare's runtime (workerd, through miniflare), in a Hono
// app bundled like a Worker, talking to a real `lockstep serve` on loopback.
import { build } from "esbuild";
import { Miniflare } from "miniflare";
import { mkdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { STALE_BODY } from "../src/index.js";
import { countingProxy, startRegistry, within, type CountingProxy, type Registry } from "./registry.js";

const V1 = "11111111-aaaa-4bbb-8ccc-000000000001";
const V2 = "22222222-aaaa-4bbb-8ccc-000000000002";
const V3 = "33333333-aaaa-4bbb-8ccc-000000000003";
const script = new URL("../.build/worker.js", import.meta.url).pathname;

let reg: Registry;
let proxy: CountingProxy;
let token: string;
const open: Miniflare[] = [];

beforeAll(async () => {
  mkdirSync(new URL("../.build", import.meta.url).pathname, { recursive: true });
  // platform "browser": an import of a Node built-in fails the bundle.
  await build({
    entryPoints: [new URL("./worker/app.ts", import.meta.url).pathname],
    bundle: true,
    format: "esm",
    platform: "browser",
    conditions: ["workerd", "worker", "browser"],
    outfile: script,
    logLevel: "error",
  });
  reg = await startRegistry();
  proxy = await countingProxy(reg.url);
  token = await reg.token("edge", "worker");
});

afterAll(async () => {
  await Promise.all(open.map((m) => m.dispose()));
  await proxy?.close();
  await reg?.kill();
});

function worker(bindings: Record<string, string>): Miniflare {
  const mf = new Miniflare({
    modules: true,
    scriptPath: script,
    compatibilityDate: "2025-01-01",
    bindings: { LOCKSTEP_TOKEN: token, CODE_VERSION_UUID: V1, ...bindings },
  });
  open.push(mf);
  return mf;
}

async function get(mf: Miniflare, path = "/"): Promise<{ status: number; body: string; retryAfter: string | null }> {
  const res = await mf.dispatchFetch(`http://worker${path}`);
  return { status: res.status, body: await res.text(), retryAfter: res.headers.get("retry-after") };
}

describe("versionCheckMiddleware inside workerd", () => {
  test("current serves; a new release answers the exact 503 within the TTL; draining serves", async () => {
    await reg.register("op-auth", V1);
    const mf = worker({ LOCKSTEP_REGISTRY: reg.url, LOCKSTEP_CACHE_TTL_MS: "300" });
    expect((await get(mf)).status).toBe(200);
    const registered = Date.now();
    await reg.register("op-auth", V2);
    let last = await get(mf);
    await within(3000, async () => {
      last = await get(mf);
      return last.status === 503;
    });
    expect(Date.now() - registered).toBeLessThanOrEqual(300 + 400);
    expect(last.body).toBe(STALE_BODY);
    expect(last.retryAfter).toBe("5");
    await reg.register("op-auth", V3, { accepts: [V2] });
    const draining = worker({ LOCKSTEP_REGISTRY: reg.url, CODE_VERSION_UUID: V2 });
    expect((await get(draining)).status).toBe(200);
  });

  test("the kill switch binding serves a stale bundle", async () => {
    await reg.register("op-auth", V3);
    expect((await get(worker({ LOCKSTEP_REGISTRY: reg.url }))).status).toBe(503);
    expect((await get(worker({ LOCKSTEP_REGISTRY: reg.url, LOCKSTEP_CHECK: "off" }))).status).toBe(200);
  });

  test("1,000 concurrent requests on a cold cache cause one registry read", async () => {
    // A stale bundle: every answer is a 503 only if that one read succeeded and was shared.
    await reg.register("op-auth", V2, { force: true });
    const mf = worker({ LOCKSTEP_REGISTRY: proxy.url });
    proxy.reset();
    const answers = await Promise.all(Array.from({ length: 1000 }, () => get(mf)));
    expect(answers.filter((a) => a.status !== 503)).toEqual([]);
    expect(proxy.count("/services/op-auth/release")).toBe(1);
  });

  test("a killed registry fails open, then closed after failOpenForMs", async () => {
    const own = await startRegistry();
    try {
      await own.register("op-auth", V1);
      const t = await own.token("edge", "worker");
      const mf = worker({
        LOCKSTEP_REGISTRY: own.url,
        LOCKSTEP_TOKEN: t,
        LOCKSTEP_CACHE_TTL_MS: "100",
        LOCKSTEP_FAIL_OPEN_MS: "1000",
      });
      // Taken before the request: the worker's last registry answer is no earlier than this
      // (workerd's clock stands still between I/O, so its own reading can lag the answer by
      // the length of the request, and a reading taken after it would over-state the wait).
      const lastAnswer = Date.now();
      expect((await get(mf)).status).toBe(200);
      await own.kill();
      await new Promise((r) => setTimeout(r, 200));
      expect((await get(mf)).status).toBe(200);
      await within(4000, async () => (await get(mf)).status === 503);
      expect(Date.now() - lastAnswer).toBeGreaterThanOrEqual(1000);
    } finally {
      await own.kill();
    }
  });
});
