// Heartbeats for a process that lives long enough to have an instance (Node workers; on
// Workers, call `heartbeat` from a Cron Trigger or `ctx.waitUntil` if at all).

/** Options of a heartbeat. */
export interface HeartbeatOptions {
  registry: string;
  token?: string;
  service: string;
  env?: string;
  versionId: string;
  /** Stable per process (default: `<service>-<random>`). */
  instanceId?: string;
  gitSha?: string;
  /** RFC 3339. */
  buildDate?: string;
  /** RFC 3339 (default: when `startHeartbeats` was called). */
  startedAt?: string;
  host?: string;
  pid?: number;
  fetch?: typeof fetch;
}

/** The registry's answer to a heartbeat. */
export interface HeartbeatAnswer {
  status: "current" | "draining" | "stale" | "unknown";
  expected: { version_id: string; accepts?: string[]; revision?: number } | null;
  heartbeat_secs: number;
  ttl_secs: number;
}

function base(o: HeartbeatOptions): string {
  return o.registry.replace(/\/+$/, "");
}

function headers(o: HeartbeatOptions): Record<string, string> {
  const h: Record<string, string> = { "content-type": "application/json" };
  if (o.token) h.authorization = `Bearer ${o.token}`;
  return h;
}

/** One heartbeat (`POST /v1/instances`): registers the instance or refreshes it. */
export async function heartbeat(o: HeartbeatOptions & { instanceId: string }): Promise<HeartbeatAnswer> {
  const body: Record<string, unknown> = {
    instance_id: o.instanceId,
    env: o.env ?? "production",
    service: o.service,
    version_id: o.versionId,
  };
  if (o.gitSha) body.git_sha = o.gitSha;
  if (o.buildDate) body.build_date = o.buildDate;
  if (o.startedAt) body.started_at = o.startedAt;
  if (o.host) body.host = o.host;
  if (o.pid !== undefined) body.pid = o.pid;
  const f = o.fetch ?? ((i, init) => globalThis.fetch(i, init));
  const res = await f(`${base(o)}/v1/instances`, {
    method: "POST",
    headers: headers(o),
    body: JSON.stringify(body),
  });
  if (!res.ok) {
    await res.body?.cancel();
    throw new Error(`heartbeat answered ${res.status}`);
  }
  return (await res.json()) as HeartbeatAnswer;
}

/** A running heartbeat loop. */
export interface Heartbeats {
  readonly instanceId: string;
  /** The last answer, if any. */
  last(): HeartbeatAnswer | undefined;
  /** Stops the loop and deregisters the instance. */
  stop(): Promise<void>;
}

/**
 * Heartbeats every `heartbeat_secs` the registry asks for (10 s by default) until `stop()`,
 * which deregisters the instance. Failures are retried on the next tick; they never throw.
 */
export function startHeartbeats(o: HeartbeatOptions): Heartbeats {
  const instanceId = o.instanceId ?? `${o.service}-${crypto.randomUUID().slice(0, 8)}`;
  const opts = { ...o, instanceId, startedAt: o.startedAt ?? new Date().toISOString() };
  let last: HeartbeatAnswer | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopped = false;
  const tick = async (): Promise<void> => {
    let next = 10;
    try {
      last = await heartbeat(opts);
      next = last.heartbeat_secs > 0 ? last.heartbeat_secs : 10;
    } catch {
      // The registry is away: try again next time; the instance simply shows as missing.
    }
    if (!stopped) timer = setTimeout(() => void tick(), next * 1000);
  };
  void tick();
  return {
    instanceId,
    last: () => last,
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      const f = o.fetch ?? ((i, init) => globalThis.fetch(i, init));
      try {
        const res = await f(`${base(o)}/v1/instances/${encodeURIComponent(instanceId)}`, {
          method: "DELETE",
          headers: headers(o),
        });
        await res.body?.cancel();
      } catch {
        // Deregistering is a courtesy: the TTL removes the instance anyway.
      }
    },
  };
}
