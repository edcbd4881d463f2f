// The middleware on Node, in a Hono app, against a real `lockstep serve`.
import { Hono } from "hono";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import {
  STALE_BODY,
  VersionChecker,
  pathIsExempt,
  startHeartbeats,
  versionCheck,
  versionCheckMiddleware,
  type Logger,
} from "../src/index.js";
import { ADMIN_TOKEN, countingProxy, startRegistry, within, type Registry } from "./registry.js";

const V1 = "11111111-aaaa-4bbb-8ccc-000000000001";
const V2 = "22222222-aaaa-4bbb-8ccc-000000000002";
const V3 = "33333333-aaaa-4bbb-8ccc-000000000003";

let reg: Registry;
let workerToken: string;
let n = 0;
/** A fresh service name per test, so tests share one registry without seeing each other. */
const svc = () => `edge-${process.pid}-${++n}`;

beforeAll(async () => {
  reg = await startRegistry();
  workerToken = await reg.token("edge", "worker");
});
afterAll(async () => {
  await reg?.kill();
});

function lines(): Logger & { all: string[] } {
  const all: string[] = [];
  return { all, info: (m) => void all.push(m), warn: (m) => void all.push(m) };
}

function app(options: Parameters<typeof versionCheck>[0]): Hono {
  const a = new Hono();
  a.use("*", versionCheck(options));
  a.get("/", (c) => c.text("ok"));
  a.get("/health", (c) => c.text("healthy"));
  a.get("/healthz", (c) => c.text("healthy"));
  return a;
}

describe("versionCheck on Node", () => {
  test("current serves; a new release answers 503 with the exact body and Retry-After within the TTL", async () => {
    const s = svc();
    await reg.register(s, V1);
    const log = lines();
    const a = app({ registry: reg.url, token: workerToken, service: s, versionId: V1, cacheTtlMs: 300, logger: log });
    expect((await a.request("/")).status).toBe(200);
    const registered = Date.now();
    await reg.register(s, V2);
    let res: Response | undefined;
    await within(2000, async () => {
      res = await a.request("/");
      return res.status === 503;
    });
    expect(Date.now() - registered).toBeLessThanOrEqual(300 + 250);
    expect(res?.headers.get("retry-after")).toBe("5");
    expect(res?.headers.get("content-type")).toBe("application/json");
    expect(await res?.text()).toBe(STALE_BODY);
    // Logs name versions by 8 characters only.
    expect(log.all.join("\n")).toContain("22222222");
    for (const id of [V1, V2]) expect(log.all.join("\n")).not.toContain(id);
  });

  test("draining serves, nothing registered serves, and exempt paths match whole segments", async () => {
    const s = svc();
    const a = app({ registry: reg.url, token: workerToken, service: s, versionId: V1, cacheTtlMs: 50, exempt: ["/health"] });
    expect((await a.request("/")).status).toBe(200); // nothing registered yet
    await reg.register(s, V2, { accepts: [V1] });
    await new Promise((r) => setTimeout(r, 80));
    expect((await a.request("/")).status).toBe(200); // draining
    await reg.register(s, V3);
    await within(2000, async () => (await a.request("/")).status === 503);
    expect((await a.request("/health")).status).toBe(200);
    expect((await a.request("/healthz")).status).toBe(503);
    expect(pathIsExempt("/health/live", ["/health"])).toBe(true);
    expect(pathIsExempt("/healthcheck", ["/health"])).toBe(false);
    expect(pathIsExempt("/api/internal/x", ["/api/internal/"])).toBe(true);
  });

  test("the kill switch serves a stale bundle, as an option and as an env binding", async () => {
    const s = svc();
    await reg.register(s, V2);
    const off = app({ registry: reg.url, token: workerToken, service: s, versionId: V1, enabled: false });
    expect((await off.request("/")).status).toBe(200);
    const bound = new Hono<{ Bindings: Record<string, string> }>();
    bound.use("*", versionCheckMiddleware(s));
    bound.get("/", (c) => c.text("ok"));
    const env = { LOCKSTEP_REGISTRY: reg.url, LOCKSTEP_TOKEN: workerToken, CODE_VERSION_UUID: V1 };
    expect((await bound.request("/", {}, env)).status).toBe(503);
    expect((await bound.request("/", {}, { ...env, LOCKSTEP_CHECK: "off" })).status).toBe(200);
  });

  test("1,000 concurrent requests on a cold cache cause one registry read", async () => {
    const s = svc();
    // A stale bundle: every answer is a 503 only if that one read succeeded and was shared.
    await reg.register(s, V2);
    const proxy = await countingProxy(reg.url);
    try {
      const a = app({ registry: proxy.url, token: workerToken, service: s, versionId: V1, logger: lines() });
      const answers = await Promise.all(Array.from({ length: 1000 }, () => a.request("/")));
      expect(answers.filter((r) => r.status !== 503).length).toBe(0);
      expect(proxy.count(`/services/${s}/release`)).toBe(1);
    } finally {
      await proxy.close();
    }
  });

  test("push mode over /v1/watch turns stale within 250 ms", async () => {
    const s = svc();
    await reg.register(s, V1);
    const checker = new VersionChecker({
      registry: reg.url,
      token: workerToken,
      service: s,
      versionId: V1,
      cacheTtlMs: 60_000,
      push: true,
      logger: lines(),
    });
    try {
      const a = app(checker);
      expect((await a.request("/")).status).toBe(200);
      // Let the stream connect, then deploy.
      await new Promise((r) => setTimeout(r, 300));
      await reg.register(s, V2);
      const took = await within(2000, async () => (await a.request("/")).status === 503);
      expect(took).toBeLessThanOrEqual(250);
    } finally {
      checker.stop();
    }
  });
});

describe("the registry going away", () => {
  test("a killed registry fails open, then closed after failOpenForMs", async () => {
    const own = await startRegistry();
    try {
      const s = svc();
      await own.register(s, V1);
      const log = lines();
      const token = await own.token("edge", "worker");
      const b = app({ registry: own.url, token, service: s, versionId: V1, cacheTtlMs: 100, failOpenForMs: 1000, logger: log });
      // Taken before the request: the last registry answer is no earlier than this.
      const lastAnswer = Date.now();
      expect((await b.request("/")).status).toBe(200);
      await own.kill();
      await new Promise((r) => setTimeout(r, 200));
      expect((await b.request("/")).status).toBe(200); // fails open
      expect(log.all.join("\n")).toContain("unreachable");
      await within(3000, async () => (await b.request("/")).status === 503);
      expect(Date.now() - lastAnswer).toBeGreaterThanOrEqual(1000);
    } finally {
      await own.kill();
    }
  });

  test("without failOpenForMs a dead registry never refuses", async () => {
    const c = new VersionChecker({ registry: "http://127.0.0.1:9", service: "x", versionId: V1, cacheTtlMs: 10, logger: lines() });
    for (let i = 0; i < 3; i++) {
      expect(await c.checkVersion(new Request("http://w/"))).toBeNull();
      await new Promise((r) => setTimeout(r, 20));
    }
  });
});

describe("heartbeats", () => {
  async function instances(service: string): Promise<Array<{ instance_id: string; status: string }>> {
    const res = await fetch(`${reg.url}/v1/status?service=${service}`, {
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    const body = (await res.json()) as { environments: Array<{ services: Array<{ instances: Array<{ instance_id: string; status: string }> }> }> };
    return body.environments.flatMap((e) => e.services).flatMap((s) => s.instances);
  }

  test("startHeartbeats registers the instance with its status and stop() deregisters it", async () => {
    const s = svc();
    await reg.register(s, V1);
    const beats = startHeartbeats({ registry: reg.url, token: workerToken, service: s, versionId: V1, pid: 4242 });
    await within(5000, async () => beats.last()?.status === "current");
    // Heartbeats are batched into the store; the status shows it within about a second.
    await within(5000, async () => (await instances(s)).some((i) => i.instance_id === beats.instanceId));
    await beats.stop();
    await within(5000, async () => (await instances(s)).length === 0);
  });
});
