// @lockstep/client: lockstep's version check for edge workers (Cloudflare Workers, Node >= 20,
// any fetch runtime). No runtime dependencies, no Node built-ins.
export {
  VersionChecker,
  STALE_BODY,
  pathIsExempt,
  shortId,
  staleResponse,
  type CheckState,
  type Logger,
  type VersionCheckOptions,
  type VersionStatus,
} from "./core.js";
export {
  killSwitchOn,
  optionsFromBindings,
  versionCheck,
  versionCheckMiddleware,
  type HonoLikeContext,
  type VersionCheckBindings,
  type VersionCheckHandler,
} from "./hono.js";
export { heartbeat, startHeartbeats, type HeartbeatAnswer, type HeartbeatOptions, type Heartbeats } from "./heartbeat.js";

import { VersionChecker, type VersionCheckOptions } from "./core.js";

/** A checker to share: `const check = createVersionCheck({...}); await check.checkVersion(req)`. */
export function createVersionCheck(options: VersionCheckOptions): VersionChecker {
  return new VersionChecker(options);
}
