// A real `lockstep serve` for the tests (the binary cargo built: $LOCKSTEP_BIN, else
// target/debug/lockstep of this repository), on 127.0.0.1 port 0 with a temporary data
// directory, and a counting loopback proxy in front of it so tests can see how many
// registry reads a burst of requests caused.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, request as httpRequest, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { AddressInfo } from "node:net";

export const ADMIN_TOKEN = "lst_tstestadmin0000000000000000000000000000000000000000000000000000";

export function lockstepBin(): string {
  return process.env.LOCKSTEP_BIN ?? resolve(new URL("../../../target/debug/lockstep", import.meta.url).pathname);
}

export interface Registry {
  url: string;
  child: ChildProcess;
  kill(): Promise<void>;
  register(service: string, versionId: string, extra?: Record<string, unknown>): Promise<void>;
  token(name: string, role: string): Promise<string>;
}

export async function startRegistry(): Promise<Registry> {
  const dir = mkdtempSync(join(tmpdir(), "lockstep-ts-"));
  const child = spawn(lockstepBin(), ["serve", "--listen", "127.0.0.1:0", "--data-dir", join(dir, "data")], {
    env: { ...process.env, LOCKSTEP_ADMIN_TOKEN: ADMIN_TOKEN, RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
  const url = await new Promise<string>((ok, fail) => {
    let out = "";
    const timer = setTimeout(() => fail(new Error(`lockstep serve did not start: ${stderr}`)), 15000);
    child.stdout?.on("data", (d: Buffer) => {
      out += d.toString();
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
      if (m?.[1]) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
    child.on("exit", (code) => fail(new Error(`lockstep serve exited ${code}: ${stderr}`)));
  });
  const reg: Registry = {
    url,
    child,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once("exit", r));
        child.kill("SIGKILL");
        await gone;
      }
      rmSync(dir, { recursive: true, force: true });
    },
    async register(service, versionId, extra = {}) {
      const res = await fetch(`${url}/v1/envs/production/services/${service}/release`, {
        method: "PUT",
        headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
        body: JSON.stringify({ version_id: versionId, ...extra }),
      });
      if (!res.ok) throw new Error(`register ${versionId}: ${res.status} ${await res.text()}`);
      await res.body?.cancel();
    },
    async token(name, role) {
      const res = await fetch(`${url}/v1/tokens`, {
        method: "POST",
        headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
        body: JSON.stringify({ name, role }),
      });
      const body = (await res.json()) as { token: string };
      return body.token;
    },
  };
  return reg;
}

/** A loopback proxy to `target` that counts the requests for each path. */
export interface CountingProxy {
  url: string;
  count(pathPart: string): number;
  reset(): void;
  close(): Promise<void>;
}

export async function countingProxy(target: string): Promise<CountingProxy> {
  const seen: string[] = [];
  const to = new URL(target);
  const server: Server = createServer((req, res) => {
    seen.push(req.url ?? "");
    const up = httpRequest(
      { host: to.hostname, port: to.port, method: req.method, path: req.url, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
      },
    );
    up.on("error", () => {
      res.writeHead(502);
      res.end();
    });
    req.pipe(up);
  });
  server.keepAliveTimeout = 1000;
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    count: (part) => seen.filter((p) => p.includes(part)).length,
    reset: () => void seen.splice(0),
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

/** Polls `probe` every 10 ms until it returns true or `ms` passes; returns the time it took. */
export async function within(ms: number, probe: () => Promise<boolean>): Promise<number> {
  const start = Date.now();
  for (;;) {
    if (await probe()) return Date.now() - start;
    if (Date.now() - start > ms) throw new Error(`not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
