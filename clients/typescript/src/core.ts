// The version check without a framework: one `VersionChecker` per isolate (Worker) or
// process (Node) keeps the service's expected release in memory and decides, per request,
// whether this bundle may serve. Same rules as lockstep's Rust layer:
// - stale → 503, `Retry-After: 5`, body exactly {"error":"service_unavailable"};
// - `draining` (the expected release still accepts this one) serves; nothing registered serves;
// - the registry unreachable → fail open, bounded by `failOpenForMs` when set;
// - a kill switch (`enabled: false`) serves everything;
// - exempt paths match whole segments (`/health` exempts `/health/live`, not `/healthz`).
//
// Reads are coalesced: however many requests arrive at once, one registry read runs per
// `cacheTtlMs`, and every waiting request shares its answer. Only `fetch` is used, so the
// same code runs on Cloudflare Workers, Node >= 20, Deno and Bun.

/** What a request is told when the bundle is stale. Never names a version. */
export const STALE_BODY = '{"error":"service_unavailable"}';

/** Options of a version check. */
export interface VersionCheckOptions {
  /** Registry base URL, e.g. `https://registry.internal:7070`. */
  registry: string;
  /** A `worker` token (it may only read releases, watch and heartbeat). */
  token?: string;
  /** The service this bundle belongs to. */
  service: string;
  /** Environment (default `production`). */
  env?: string;
  /** This bundle's release id (`CODE_VERSION_UUID` from `lockstep deploy`). */
  versionId: string;
  /** How long an answer of the registry is used before it is read again (default 5000). */
  cacheTtlMs?: number;
  /**
   * After this long without any answer from the registry, fail closed (503) instead of open.
   * Unset: fail open for as long as the registry is away.
   */
  failOpenForMs?: number;
  /** Paths that are never refused, matched on whole segments (`/health`, `/api/internal`). */
  exempt?: string[];
  /** `false` switches the check off entirely: the kill switch. Default true. */
  enabled?: boolean;
  /**
   * Node (or any runtime with long-lived fetches): keep a `/v1/watch` stream open so a new
   * release is known within milliseconds instead of within `cacheTtlMs`. Off by default; not
   * for Workers, whose isolates should not hold streams.
   */
  push?: boolean;
  /** How long one registry read may take before it counts as a failure (default 2000). */
  timeoutMs?: number;
  /** Where log lines go (default `console`). Version ids appear only as their first 8 chars. */
  logger?: Logger;
  /** The fetch to use (default the global one). */
  fetch?: typeof fetch;
}

/** A place for log lines. */
export interface Logger {
  info(message: string): void;
  warn(message: string): void;
}

/** The registry's verdict on this bundle, as the check last saw it. */
export type VersionStatus = "current" | "draining" | "stale" | "unknown";

/** What the check knows: the last answer, and since when the registry has been away. */
export interface CheckState {
  /** The expected release id, `null` when nothing is registered, `undefined` before any answer. */
  expected: string | null | undefined;
  /** Release ids the expected release still accepts (draining). */
  accepts: string[];
  /** This bundle's status against `expected`. */
  status: VersionStatus;
  /** Revision of the expected release (0 when unknown). */
  revision: number;
  /** Milliseconds since the epoch of the last answer from the registry (0: never). */
  lastAnswerAt: number;
  /** Milliseconds since the epoch the registry has been away (0: it answers). */
  outageSince: number;
}

/** The first 8 characters of a version id: all a log line may show of it. */
export function shortId(id: string): string {
  return id.slice(0, 8);
}

/** Whether `path` is `prefix` or below it, on whole segments. */
export function pathIsExempt(path: string, exempt: readonly string[]): boolean {
  for (const raw of exempt) {
    const prefix = raw.length > 1 && raw.endsWith("/") ? raw.slice(0, -1) : raw;
    if (prefix === "/" || path === prefix || path.startsWith(`${prefix}/`)) {
      return true;
    }
  }
  return false;
}

/** The 503 a stale bundle answers. */
export function staleResponse(): Response {
  return new Response(STALE_BODY, {
    status: 503,
    headers: {
      "content-type": "application/json",
      "retry-after": "5",
      "cache-control": "no-store",
    },
  });
}

interface ReleaseBody {
  version_id: string;
  accepts?: string[];
  revision?: number;
}

function validateOptions(o: VersionCheckOptions): void {
  if (!o.registry) throw new Error("lockstep version check: `registry` is required");
  if (!o.service) throw new Error("lockstep version check: `service` is required");
  if (!o.versionId) throw new Error("lockstep version check: `versionId` is required");
}

/**
 * The check for one service and release. Create it once per isolate or process (module
 * scope), not per request: the cache and the coalescing live in it.
 */
export class VersionChecker {
  readonly options: Readonly<VersionCheckOptions>;
  private readonly env: string;
  private readonly ttl: number;
  private readonly timeout: number;
  private readonly log: Logger;
  private readonly doFetch: typeof fetch;
  private state: CheckState = {
    expected: undefined,
    accepts: [],
    status: "unknown",
    revision: 0,
    lastAnswerAt: 0,
    outageSince: 0,
  };
  /** When the last read was started: the TTL counts from it, failed reads included. */
  private readAt = 0;
  private inflight: Promise<void> | null = null;
  private firstAttemptAt = 0;
  private pushing = false;
  private pushConnected = false;
  private stopped = false;
  private abortPush: AbortController | null = null;

  constructor(options: VersionCheckOptions) {
    validateOptions(options);
    this.options = { ...options, registry: options.registry.replace(/\/+$/, "") };
    this.env = options.env ?? "production";
    this.ttl = options.cacheTtlMs ?? 5000;
    this.timeout = options.timeoutMs ?? 2000;
    this.log = options.logger ?? console;
    // Bound to globalThis: a detached `fetch` throws "Illegal invocation" on Workers.
    this.doFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    if (options.push && options.enabled !== false) {
      this.startPush();
    }
  }

  /** What the check knows now (no I/O). */
  snapshot(): Readonly<CheckState> {
    return { ...this.state, accepts: [...this.state.accepts] };
  }

  /** Whether the check is switched off. */
  get enabled(): boolean {
    return this.options.enabled !== false;
  }

  /**
   * Whether this bundle may serve now, from what is known (no I/O): current, draining,
   * nothing registered, not known yet, or the registry away within `failOpenForMs`.
   */
  isCurrent(now: number = Date.now()): boolean {
    if (!this.enabled) return true;
    if (this.failedClosed(now)) return false;
    return this.state.status !== "stale";
  }

  private failedClosed(now: number): boolean {
    const bound = this.options.failOpenForMs;
    if (bound === undefined || this.state.outageSince === 0) return false;
    // Without any answer for `bound`: measured from the last answer, or from the first
    // attempt when there never was one.
    const since = this.state.lastAnswerAt || this.firstAttemptAt || this.state.outageSince;
    return now - since >= bound;
  }

  /**
   * The answer for one request: `null` to serve it, or the 503 to send. Reads the registry
   * at most once per `cacheTtlMs`, shared by every request waiting meanwhile.
   */
  async checkVersion(request: Request): Promise<Response | null> {
    return this.decide(request);
  }

  /**
   * [`checkVersion`] without a promise when the cached answer is fresh (the common case), so
   * a warm check costs a few comparisons and no extra microtask; a promise only when a
   * registry read is due or running.
   */
  decide(request: Request): Response | null | Promise<Response | null> {
    if (!this.enabled) return null;
    if (this.options.exempt?.length) {
      const path = new URL(request.url).pathname;
      if (pathIsExempt(path, this.options.exempt)) return null;
    }
    const now = Date.now();
    if (this.pushConnected || (this.readAt !== 0 && now - this.readAt < this.ttl && !this.inflight)) {
      return this.isCurrent(now) ? null : staleResponse();
    }
    return this.fresh(now).then(() => (this.isCurrent() ? null : staleResponse()));
  }

  /** Makes sure the cached answer is at most `cacheTtlMs` old (one shared read if not). */
  async fresh(now: number = Date.now()): Promise<void> {
    if (this.pushConnected) return;
    if (this.readAt === 0 || now - this.readAt >= this.ttl) return this.refresh();
    // A read started within the TTL is still running (a cold cache, or the refresh after
    // the TTL): wait for its answer rather than decide on the older one.
    if (this.inflight) return this.inflight;
  }

  /** Reads the expected release now, or joins the read already running. */
  refresh(): Promise<void> {
    if (!this.inflight) {
      this.readAt = Date.now();
      if (this.firstAttemptAt === 0) this.firstAttemptAt = this.readAt;
      this.inflight = this.read().finally(() => {
        this.inflight = null;
      });
    }
    return this.inflight;
  }

  private releaseUrl(): string {
    const { registry, service } = this.options;
    return `${registry}/v1/envs/${encodeURIComponent(this.env)}/services/${encodeURIComponent(service)}/release`;
  }

  private headers(): Record<string, string> {
    const h: Record<string, string> = { accept: "application/json" };
    if (this.options.token) h.authorization = `Bearer ${this.options.token}`;
    return h;
  }

  private async read(): Promise<void> {
    try {
      const res = await this.doFetch(this.releaseUrl(), {
        headers: this.headers(),
        signal: AbortSignal.timeout(this.timeout),
      });
      if (res.status === 404) {
        await res.body?.cancel();
        this.observe(null);
      } else if (res.ok) {
        this.observe((await res.json()) as ReleaseBody);
      } else {
        await res.body?.cancel();
        this.unreachable(`the registry answered ${res.status}`);
      }
    } catch (e) {
      this.unreachable(e instanceof Error ? e.message : String(e));
    }
  }

  /** Applies an answer: `null` when nothing is registered. */
  observe(release: ReleaseBody | null, now: number = Date.now()): void {
    const before = this.state;
    const expected = release ? release.version_id : null;
    const accepts = release?.accepts ?? [];
    const mine = this.options.versionId;
    let status: VersionStatus;
    if (expected === null || expected === mine) status = "current";
    else if (accepts.includes(mine)) status = "draining";
    else status = "stale";
    if (before.outageSince !== 0) {
      this.log.info(`[version] registry reachable again (${this.options.service})`);
    }
    this.state = {
      expected,
      accepts,
      status,
      revision: release?.revision ?? before.revision,
      lastAnswerAt: now,
      outageSince: 0,
    };
    if (status !== before.status || expected !== before.expected) {
      const exp = expected === null ? "nothing registered" : `expected ${shortId(expected)}`;
      const line = `[version] ${this.options.service} runs ${shortId(mine)}: ${status} (${exp})`;
      if (status === "stale") this.log.warn(line);
      else this.log.info(line);
    }
  }

  private unreachable(why: string, now: number = Date.now()): void {
    if (this.state.outageSince === 0) {
      this.state = { ...this.state, outageSince: now };
      const bound = this.options.failOpenForMs;
      this.log.warn(
        `[version] registry unreachable (${why}); failing open${bound === undefined ? "" : ` for at most ${bound} ms`}`,
      );
    }
  }

  // Push mode: an initial read, then `/v1/watch?since=<revision>` so no change is missed
  // between the two; on any break, polling takes over until the stream is back.
  private startPush(): void {
    if (this.pushing) return;
    this.pushing = true;
    void this.pushLoop();
  }

  private async pushLoop(): Promise<void> {
    let backoff = 250;
    while (!this.stopped) {
      try {
        await this.refresh();
        await this.watchOnce();
        backoff = 250;
      } catch {
        // Reported through `unreachable` when reads fail; the stream itself just retries.
      }
      this.pushConnected = false;
      if (this.stopped) break;
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  private async watchOnce(): Promise<void> {
    const { registry, service } = this.options;
    const q = new URLSearchParams({ env: this.env, service, since: String(this.state.revision) });
    this.abortPush = new AbortController();
    const res = await this.doFetch(`${registry}/v1/watch?${q}`, {
      headers: { ...this.headers(), accept: "text/event-stream" },
      signal: this.abortPush.signal,
    });
    if (!res.ok || !res.body) {
      await res.body?.cancel();
      throw new Error(`watch answered ${res.status}`);
    }
    this.pushConnected = true;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trimStart();
        }
        if (event === "release" && data) {
          this.observe(JSON.parse(data) as ReleaseBody);
          this.readAt = Date.now();
        }
      }
    }
  }

  /** Stops push mode (closing its stream). The check keeps working by polling. */
  stop(): void {
    this.stopped = true;
    this.pushConnected = false;
    this.abortPush?.abort();
  }
}
