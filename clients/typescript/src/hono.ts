// Hono middleware over the framework-free core. Typed structurally (a context with
// `req.raw` and `env`), so the package needs no dependency on Hono: `app.use(versionCheck(…))`
// type-checks against Hono's own `MiddlewareHandler`.
import { VersionChecker, type VersionCheckOptions } from "./core.js";

/** The part of a Hono context the middleware uses. */
export interface HonoLikeContext {
  req: { raw: Request };
  env?: unknown;
}

/** A Hono middleware: serve (`await next()`) or answer the 503. */
export type VersionCheckHandler = (c: HonoLikeContext, next: () => Promise<void>) => Promise<Response | void>;

/**
 * `app.use(versionCheck({ registry, token, service, versionId }))`: answers 503 (with
 * `Retry-After: 5`) while this bundle is stale, serves otherwise. The checker is created
 * once, here, and shared by every request of the isolate.
 */
export function versionCheck(options: VersionCheckOptions | VersionChecker): VersionCheckHandler {
  const checker = options instanceof VersionChecker ? options : new VersionChecker(options);
  return async (c, next) => {
    const decided = checker.decide(c.req.raw);
    const refused = decided instanceof Promise ? await decided : decided;
    if (refused) return refused;
    return next();
  };
}

/** The env bindings `versionCheckMiddleware` reads (`wrangler.toml` `[vars]`, secrets, `--var`). */
export interface VersionCheckBindings {
  /** This bundle's release id, set by the deploy: `wrangler deploy --var CODE_VERSION_UUID:…`. */
  CODE_VERSION_UUID?: string;
  /** Registry URL (also read as `VERSION_REGISTRY_URL`). */
  LOCKSTEP_REGISTRY?: string;
  /** A worker token (a secret: `wrangler secret put LOCKSTEP_TOKEN`). */
  LOCKSTEP_TOKEN?: string;
  /** Environment (default `production`). */
  LOCKSTEP_ENV?: string;
  /** `off` (or `false`, `0`) switches the check off: the kill switch. */
  LOCKSTEP_CHECK?: string;
  /** Cache TTL in milliseconds (default 5000). */
  LOCKSTEP_CACHE_TTL_MS?: string;
  /** Fail closed after this many milliseconds without an answer (default: fail open). */
  LOCKSTEP_FAIL_OPEN_MS?: string;
  /** Comma-separated exempt paths, matched on whole segments. */
  LOCKSTEP_EXEMPT?: string;
  /** When the bundle was deployed (`DEPLOY_TIME_UTC`); logged only. */
  DEPLOY_TIME_UTC?: string;
}

function bindingsOf(env: unknown): Record<string, unknown> {
  return env && typeof env === "object" ? (env as Record<string, unknown>) : {};
}

function str(v: unknown): string | undefined {
  return typeof v === "string" && v.trim() !== "" ? v.trim() : undefined;
}

function num(v: unknown): number | undefined {
  const s = str(v);
  if (s === undefined) return undefined;
  const n = Number(s);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

/** Whether a binding switches the check off. */
export function killSwitchOn(v: unknown): boolean {
  const s = str(v)?.toLowerCase();
  return s === "off" || s === "false" || s === "0" || s === "disabled";
}

const checkers = new Map<string, VersionChecker>();

/** The options `versionCheckMiddleware` derives from a Worker's bindings (for tests and logs). */
export function optionsFromBindings(workerName: string, env: unknown): VersionCheckOptions | null {
  const b = bindingsOf(env);
  const registry = str(b.LOCKSTEP_REGISTRY) ?? str(b.VERSION_REGISTRY_URL);
  const versionId = str(b.CODE_VERSION_UUID);
  if (!registry || !versionId) return null;
  const options: VersionCheckOptions = {
    registry,
    service: workerName,
    versionId,
    enabled: !killSwitchOn(b.LOCKSTEP_CHECK),
  };
  const token = str(b.LOCKSTEP_TOKEN);
  if (token) options.token = token;
  const envName = str(b.LOCKSTEP_ENV);
  if (envName) options.env = envName;
  const ttl = num(b.LOCKSTEP_CACHE_TTL_MS);
  if (ttl !== undefined) options.cacheTtlMs = ttl;
  const failOpen = num(b.LOCKSTEP_FAIL_OPEN_MS);
  if (failOpen !== undefined) options.failOpenForMs = failOpen;
  const exempt = str(b.LOCKSTEP_EXEMPT);
  if (exempt) options.exempt = exempt.split(",").map((p) => p.trim()).filter(Boolean);
  return options;
}

/**
 * The source system's signature: `app.use("*", versionCheckMiddleware("op-auth"))`. Reads
 * `CODE_VERSION_UUID` and the registry settings from the Worker's env bindings on the first
 * request (bindings are per request on Workers), and keeps one checker per isolate. Without
 * `CODE_VERSION_UUID` or a registry it serves and says so once: a bundle deployed without
 * lockstep must not go dark.
 */
export function versionCheckMiddleware(workerName: string): VersionCheckHandler {
  let warned = false;
  return async (c, next) => {
    const options = optionsFromBindings(workerName, c.env);
    if (!options) {
      if (!warned) {
        warned = true;
        console.warn(
          `[version] ${workerName}: CODE_VERSION_UUID or LOCKSTEP_REGISTRY is not bound; version check off`,
        );
      }
      await next();
      return;
    }
    const key = JSON.stringify(options);
    let checker = checkers.get(key);
    if (!checker) {
      checker = new VersionChecker(options);
      checkers.set(key, checker);
    }
    const decided = checker.decide(c.req.raw);
    const refused = decided instanceof Promise ? await decided : decided;
    if (refused) return refused;
    return next();
  };
}
