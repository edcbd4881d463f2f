// Ordinary code against the client generated from a live registry's /openapi.json
// (openapi-typescript + openapi-fetch). It must compile under `tsc --strict` — which is what
// broke when free maps were typed as empty objects, or Heartbeat.env was required — and run.
//   LOCKSTEP_URL=http://127.0.0.1:7070 LOCKSTEP_TOKEN=… node dist/check.js
import createClient from "openapi-fetch";
import type { components, paths } from "./gen/schema.js";

type StoredRelease = components["schemas"]["StoredRelease"];

const baseUrl = process.env.LOCKSTEP_URL;
const token = process.env.LOCKSTEP_TOKEN;
if (!baseUrl || !token) {
  throw new Error("set LOCKSTEP_URL and LOCKSTEP_TOKEN");
}
const client = createClient<paths>({
  baseUrl,
  headers: { Authorization: `Bearer ${token}` },
});

function check(ok: boolean, what: string): void {
  if (!ok) {
    throw new Error(`check failed: ${what}`);
  }
  console.log(`ok: ${what}`);
}

const env = "ci";
const svc = `ts-${Date.now()}`;
const scope = { params: { path: { env, svc } } };

// register (twice: history and rollback need a previous release), with free-form metadata
async function register(version_id: string): Promise<StoredRelease> {
  const { data, error } = await client.PUT("/v1/envs/{env}/services/{svc}/release", {
    ...scope,
    body: { version_id, metadata: { team: "edge", attempt: 1, tags: ["a"] } },
  });
  if (!data) throw new Error(`register failed: ${JSON.stringify(error)}`);
  return data;
}
const first = await register("ts-v1");
const second = await register("ts-v2");
const team: unknown = second.metadata?.["team"];
check(team === "edge", "register; metadata is a free map");
const safe: boolean = second.rollback_safe ?? true;
check(safe && second.revision > first.revision, "rollback_safe reads as a boolean");

// heartbeat without env (optional, the registry defaults it)
{
  const { data, error } = await client.POST("/v1/instances", {
    body: { instance_id: `${svc}-1`, service: svc, version_id: "ts-v2" },
  });
  check(data?.status === "unknown" || data?.status === "stale" || data?.status === "current",
    `heartbeat without env (${data?.status ?? JSON.stringify(error)})`);
}

// status
{
  const { data } = await client.GET("/v1/status", { params: { query: { env, service: svc } } });
  const service = data?.environments.flatMap((e) => e.services).find((s) => s.name === svc);
  check(service?.expected?.version_id === "ts-v2", "status lists the service");
}

// history
{
  const { data } = await client.GET("/v1/envs/{env}/services/{svc}/releases", {
    ...scope,
    params: { ...scope.params, query: { limit: 10 } },
  });
  check(data?.releases.map((r) => r.version_id).join(",") === "ts-v2,ts-v1", "history");
}

// rollback without a body, then with one
{
  const { data, error } = await client.POST("/v1/envs/{env}/services/{svc}/rollback", scope);
  check(data?.version_id === "ts-v1", `rollback without a body (${JSON.stringify(error ?? "")})`);
  const again = await client.POST("/v1/envs/{env}/services/{svc}/rollback", {
    ...scope,
    body: { version_id: "ts-v2", reason: "from the generated client" },
  });
  check(again.data?.version_id === "ts-v2", "rollback with a body");
}

// events, whose data is a free map
{
  const { data } = await client.GET("/v1/events", { params: { query: { limit: 1000 } } });
  const mine = data?.events.filter((e) => e.service === svc) ?? [];
  const details: Record<string, unknown> = mine[0]?.data ?? {};
  check(mine.length >= 4 && typeof details === "object", `events (${mine.length} for ${svc})`);
}
console.log("typescript client: all calls ok");
