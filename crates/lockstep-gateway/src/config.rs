//! The gateway's configuration: the TOML file as written ([`FileConfig`], unknown keys
//! refused so a typo is an error, not a silently ignored setting) and the compiled tables
//! the proxy reads ([`Compiled`]). A file that does not compile is refused whole: on hot
//! reload the previous tables stay in force.

use crate::auth::{AuthTable, Identity, Level};
use crate::error::GatewayError;
use crate::limit::Rate;
use crate::route::{HostPattern, Namespaces, Route, RouteLimits};
use crate::upstream::Ejection;
use serde::Deserialize;
use std::time::Duration;

/// The file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on (`--listen` overrides).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin listener serving `/metrics` and `/healthz` (none when unset).
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Registry URLs, comma-separated.
    pub registry: String,
    /// Token that may read instances (viewer).
    #[serde(default)]
    pub token: Option<String>,
    /// Default environment.
    #[serde(default = "default_env")]
    pub env: String,
    /// Stop routing after this long without any answer from the registry (default: never).
    #[serde(default)]
    pub fail_open_for: Option<String>,
    /// Callers.
    #[serde(default)]
    pub auth: AuthFile,
    /// Rate limits.
    #[serde(default)]
    pub rate_limit: RateLimitFile,
    /// Namespace selection.
    #[serde(default)]
    pub namespaces: NamespacesFile,
    /// Upstream behaviour.
    #[serde(default)]
    pub upstream: UpstreamFile,
    /// RPC proxy.
    #[serde(default)]
    pub rpc: RpcFile,
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    /// What unmatched requests get.
    #[serde(default)]
    pub fallback: FallbackFile,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_env() -> String {
    lockstep_core::DEFAULT_ENV.into()
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// Bearer tokens (also accepted as session cookie values).
    #[serde(default)]
    pub tokens: Vec<TokenFile>,
    /// API keys (header `X-API-Key`).
    #[serde(default)]
    pub api_keys: Vec<KeyFile>,
    /// Name of the session cookie.
    #[serde(default)]
    pub session_cookie: Option<String>,
    /// Failed authentication attempts allowed per IP (default `10/60s`).
    #[serde(default)]
    pub failed_attempts: Option<String>,
}

/// One bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// The secret.
    pub token: String,
    /// User name passed upstream.
    pub user: String,
    /// Level.
    #[serde(default = "authenticated")]
    pub level: Level,
}

/// One API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// The secret.
    pub key: String,
    /// User name passed upstream.
    pub user: String,
    /// Level.
    #[serde(default = "authenticated")]
    pub level: Level,
}

fn authenticated() -> Level {
    Level::Authenticated
}

/// `[rate_limit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// Per authenticated user, e.g. `100/60s`.
    #[serde(default)]
    pub per_user: Option<String>,
    /// Per client IP.
    #[serde(default)]
    pub per_ip: Option<String>,
    /// `redis://…`: buckets shared by every gateway using it.
    #[serde(default)]
    pub redis: Option<String>,
    /// Key prefix in Redis (default `lockstep-gateway`).
    #[serde(default)]
    pub redis_prefix: Option<String>,
    /// Trust `X-Forwarded-For` from these peers (IP addresses) for the client IP.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `[namespaces]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespacesFile {
    /// Header naming the environment (e.g. `X-Lockstep-Env`).
    #[serde(default)]
    pub header: Option<String>,
    /// Environments the header may select (default production, staging, development).
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
    /// Host patterns selecting an environment: `[[namespaces.hosts]] host = "*.staging.example"`, `env = "staging"`.
    #[serde(default)]
    pub hosts: Vec<NamespaceHost>,
}

/// A host that selects an environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceHost {
    /// Exact or `*.` wildcard.
    pub host: String,
    /// Environment.
    pub env: String,
}

/// `[upstream]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Time an upstream has for its response head and first body frame (default `30s`;
    /// 504 after).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Largest request body (default `1MiB`, as bytes or with KiB/MiB; 413 beyond).
    #[serde(default)]
    pub max_body: Option<String>,
    /// Longest pause between two body frames once an answer streams (default: `timeout`);
    /// a longer stall aborts the connection.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Idle pooled connections kept per upstream instance (default 64).
    #[serde(default)]
    pub pool_per_host: Option<usize>,
    /// Consecutive failures that eject an instance (default 3).
    #[serde(default)]
    pub eject_after: Option<u32>,
    /// How long an ejection lasts (default `10s`).
    #[serde(default)]
    pub eject_for: Option<String>,
    /// Active health check path (default `/healthz`); empty string disables.
    #[serde(default)]
    pub health_path: Option<String>,
    /// Active health check interval (default `5s`).
    #[serde(default)]
    pub health_interval: Option<String>,
    /// Attempts for an idempotent request whose connection failed (default 3).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Set the `lockstep-version` cookie so a session stays on its release (default false).
    #[serde(default)]
    pub pin_sessions: bool,
}

/// `[rpc]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcFile {
    /// Whether `/rpc` is served (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Level the caller needs (default `authenticated`).
    #[serde(default)]
    pub auth: Option<Level>,
    /// Largest batch (default 32).
    #[serde(default)]
    pub max_batch: Option<usize>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Name in logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// Path prefix.
    #[serde(default)]
    pub path: Option<String>,
    /// Host, exact or `*.` wildcard.
    #[serde(default)]
    pub host: Option<String>,
    /// Service.
    pub service: String,
    /// Fixed environment.
    #[serde(default)]
    pub env: Option<String>,
    /// Strip the path prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Level needed.
    #[serde(default)]
    pub auth: Level,
    /// Per-route limits replacing the global ones.
    #[serde(default)]
    pub rate_limit: Option<RouteRateFile>,
}

/// Per-route limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateFile {
    /// Per user.
    #[serde(default)]
    pub per_user: Option<String>,
    /// Per IP.
    #[serde(default)]
    pub per_ip: Option<String>,
}

/// `[fallback]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackFile {
    /// Status for unmatched requests (default 404).
    #[serde(default)]
    pub status: Option<u16>,
    /// Or a fixed upstream URL for them.
    #[serde(default)]
    pub upstream: Option<String>,
}

/// What unmatched requests get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// A status page.
    Status(http::StatusCode),
    /// A fixed upstream (base URL without trailing slash).
    Upstream(String),
}

/// The tables the proxy reads; swapped whole on reload.
#[derive(Debug)]
pub struct Compiled {
    /// The file it came from.
    pub file: FileConfig,
    /// Routes in order.
    pub routes: Vec<Route>,
    /// Namespace rules.
    pub namespaces: Namespaces,
    /// Secrets.
    pub auth: AuthTable,
    /// Failed attempts per IP.
    pub failed_attempts: Rate,
    /// Global per-user limit.
    pub per_user: Option<Rate>,
    /// Global per-IP limit.
    pub per_ip: Option<Rate>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Upstream deadline.
    pub timeout: Duration,
    /// Request body cap.
    pub max_body: usize,
    /// Longest pause between body frames of a streaming answer.
    pub idle_timeout: Duration,
    /// Passive health.
    pub ejection: Ejection,
    /// Active health check path.
    pub health_path: Option<String>,
    /// Active health interval.
    pub health_interval: Duration,
    /// Connect attempts for idempotent requests.
    pub attempts: u32,
    /// RPC served.
    pub rpc_enabled: bool,
    /// RPC level.
    pub rpc_auth: Level,
    /// RPC batch bound.
    pub rpc_max_batch: usize,
    /// Unmatched requests.
    pub fallback: Fallback,
    /// Registry fail-open bound.
    pub fail_open_for: Option<Duration>,
}

fn dur(key: &str, v: &Option<String>, default: Duration) -> Result<Duration, GatewayError> {
    match v {
        None => Ok(default),
        Some(s) => lockstep_core::parse_duration(s)
            .map_err(|e| GatewayError::config(format!("{key} = {s:?}: {e}"))),
    }
}

fn rate(key: &str, v: &Option<String>) -> Result<Option<Rate>, GatewayError> {
    v.as_deref()
        .map(|s| Rate::parse(s).map_err(|e| GatewayError::config(format!("{key}: {e}"))))
        .transpose()
}

/// Parses `1048576`, `64KiB`, `1MiB`, `10MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: usize = n.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        u => return Err(format!("{s:?}: unknown unit {u:?}")),
    };
    Ok(n.saturating_mul(mult))
}

fn env_name(key: &str, e: &str) -> Result<(), GatewayError> {
    lockstep_core::validate_name("environment", e)
        .map_err(|err| GatewayError::config(format!("{key}: {err}")))
}

impl Compiled {
    /// Reads and compiles a file.
    pub fn load(path: &std::path::Path) -> Result<Compiled, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|source| GatewayError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and compiles TOML text.
    pub fn parse(text: &str) -> Result<Compiled, GatewayError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| GatewayError::config(e.to_string()))?;
        Self::compile(file)
    }

    /// Compiles a parsed file, checking everything that can be checked without a network.
    pub fn compile(file: FileConfig) -> Result<Compiled, GatewayError> {
        lockstep_client::RegistryClient::new(&file.registry, None)
            .map_err(|e| GatewayError::config(format!("registry: {e}")))?;
        env_name("env", &file.env)?;
        let mut auth = AuthTable::new(file.auth.session_cookie.clone());
        for (i, t) in file.auth.tokens.iter().enumerate() {
            if t.token.len() < 8 {
                return Err(GatewayError::config(format!(
                    "auth.tokens[{i}] (user {}): a token needs at least 8 characters",
                    t.user
                )));
            }
            auth.add_token(
                &t.token,
                Identity {
                    user: t.user.clone(),
                    level: t.level,
                },
            );
        }
        for (i, k) in file.auth.api_keys.iter().enumerate() {
            if k.key.len() < 8 {
                return Err(GatewayError::config(format!(
                    "auth.api_keys[{i}] (user {}): a key needs at least 8 characters",
                    k.user
                )));
            }
            auth.add_key(
                &k.key,
                Identity {
                    user: k.user.clone(),
                    level: k.level,
                },
            );
        }
        let mut routes = Vec::new();
        for (i, r) in file.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            lockstep_core::validate_name("service", &r.service)
                .map_err(|e| GatewayError::config(format!("{key}.service: {e}")))?;
            if let Some(e) = &r.env {
                env_name(&format!("{key}.env"), e)?;
            }
            let host = r
                .host
                .as_deref()
                .map(|h| {
                    HostPattern::parse(h).ok_or_else(|| {
                        GatewayError::config(format!(
                            "{key}.host = {h:?}: a host name, or `*.` followed by one"
                        ))
                    })
                })
                .transpose()?;
            let path = r
                .path
                .as_deref()
                .map(|p| {
                    if !p.starts_with('/') {
                        return Err(GatewayError::config(format!(
                            "{key}.path = {p:?}: must start with /"
                        )));
                    }
                    let t = p.trim_end_matches('/');
                    Ok(if t.is_empty() {
                        "/".to_string()
                    } else {
                        t.to_string()
                    })
                })
                .transpose()?;
            if host.is_none() && path.is_none() {
                return Err(GatewayError::config(format!(
                    "{key}: give a path, a host, or both"
                )));
            }
            let limits = match &r.rate_limit {
                Some(l) => RouteLimits {
                    per_user: rate(&format!("{key}.rate_limit.per_user"), &l.per_user)?,
                    per_ip: rate(&format!("{key}.rate_limit.per_ip"), &l.per_ip)?,
                },
                None => RouteLimits::default(),
            };
            let name = r.name.clone().unwrap_or_else(|| {
                let mut n = r.host.clone().unwrap_or_default();
                n.push_str(r.path.as_deref().unwrap_or(""));
                n
            });
            routes.push(Route {
                name,
                host,
                path,
                service: r.service.clone(),
                env: r.env.clone(),
                strip_prefix: r.strip_prefix,
                auth: r.auth,
                limits,
            });
        }
        let allowed =
            file.namespaces.allowed.clone().unwrap_or_else(|| {
                vec!["production".into(), "staging".into(), "development".into()]
            });
        for e in &allowed {
            env_name("namespaces.allowed", e)?;
        }
        let mut ns_hosts = Vec::new();
        for (i, h) in file.namespaces.hosts.iter().enumerate() {
            env_name(&format!("namespaces.hosts[{i}].env"), &h.env)?;
            let p = HostPattern::parse(&h.host).ok_or_else(|| {
                GatewayError::config(format!("namespaces.hosts[{i}].host = {:?}", h.host))
            })?;
            ns_hosts.push((p, h.env.clone()));
        }
        let header = file
            .namespaces
            .header
            .as_deref()
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| GatewayError::config(format!("namespaces.header = {h:?}")))
            })
            .transpose()?;
        let trusted_proxies = file
            .rate_limit
            .trusted_proxies
            .iter()
            .map(|p| {
                p.parse().map_err(|_| {
                    GatewayError::config(format!("rate_limit.trusted_proxies: {p:?} is not an IP"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(u) = &file.rate_limit.redis
            && !(u.starts_with("redis://") || u.starts_with("rediss://"))
        {
            return Err(GatewayError::config(format!(
                "rate_limit.redis = {u:?}: expected redis://HOST:PORT"
            )));
        }
        let fallback = match (&file.fallback.status, &file.fallback.upstream) {
            (Some(_), Some(_)) => {
                return Err(GatewayError::config(
                    "fallback: give either status or upstream, not both",
                ));
            }
            (_, Some(u)) => {
                let uri: http::Uri = u
                    .parse()
                    .map_err(|_| GatewayError::config(format!("fallback.upstream = {u:?}")))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(GatewayError::config(format!(
                        "fallback.upstream = {u:?}: an http:// URL"
                    )));
                }
                Fallback::Upstream(u.trim_end_matches('/').to_string())
            }
            (Some(s), None) => Fallback::Status(
                http::StatusCode::from_u16(*s)
                    .ok()
                    .filter(|s| s.as_u16() >= 200)
                    .ok_or_else(|| GatewayError::config(format!("fallback.status = {s}")))?,
            ),
            (None, None) => Fallback::Status(http::StatusCode::NOT_FOUND),
        };
        let up = &file.upstream;
        let timeout = dur("upstream.timeout", &up.timeout, Duration::from_secs(30))?;
        let max_body = match &up.max_body {
            Some(s) => parse_size(s)
                .map_err(|e| GatewayError::config(format!("upstream.max_body: {e}")))?,
            None => 1024 * 1024,
        };
        let health_path = match up.health_path.as_deref() {
            None => Some("/healthz".to_string()),
            Some("") => None,
            Some(p) if p.starts_with('/') => Some(p.to_string()),
            Some(p) => {
                return Err(GatewayError::config(format!(
                    "upstream.health_path = {p:?}: must start with /"
                )));
            }
        };
        let compiled = Compiled {
            routes,
            namespaces: Namespaces {
                header,
                hosts: ns_hosts,
                allowed,
                default: file.env.clone(),
            },
            auth,
            failed_attempts: rate("auth.failed_attempts", &file.auth.failed_attempts)?.unwrap_or(
                Rate {
                    capacity: 10,
                    period: Duration::from_secs(60),
                },
            ),
            per_user: rate("rate_limit.per_user", &file.rate_limit.per_user)?,
            per_ip: rate("rate_limit.per_ip", &file.rate_limit.per_ip)?,
            trusted_proxies,
            timeout,
            idle_timeout: dur("upstream.idle_timeout", &up.idle_timeout, timeout)?,
            max_body,
            ejection: Ejection {
                after_failures: up.eject_after.unwrap_or(3).max(1),
                for_ms: dur("upstream.eject_for", &up.eject_for, Duration::from_secs(10))?
                    .as_millis() as u64,
            },
            health_path,
            health_interval: dur(
                "upstream.health_interval",
                &up.health_interval,
                Duration::from_secs(5),
            )?
            .max(Duration::from_millis(50)),
            attempts: up.attempts.unwrap_or(3).clamp(1, 10),
            rpc_enabled: file.rpc.enabled.unwrap_or(true),
            rpc_auth: file.rpc.auth.unwrap_or(Level::Authenticated),
            rpc_max_batch: file.rpc.max_batch.unwrap_or(32).clamp(1, 1000),
            fallback,
            fail_open_for: file
                .fail_open_for
                .as_ref()
                .map(|s| dur("fail_open_for", &Some(s.clone()), Duration::ZERO))
                .transpose()?,
            file,
        };
        Ok(compiled)
    }

    /// Every environment a request may be routed to (what the registry sources follow).
    pub fn environments(&self) -> Vec<String> {
        let mut v = vec![self.namespaces.default.clone()];
        v.extend(self.routes.iter().filter_map(|r| r.env.clone()));
        v.extend(self.namespaces.hosts.iter().map(|(_, e)| e.clone()));
        if self.namespaces.header.is_some() {
            v.extend(self.namespaces.allowed.iter().cloned());
        }
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
registry = "http://127.0.0.1:7070"
[auth]
tokens = [{ token = "tok-admin-123", user = "alice", level = "admin" }]
[[routes]]
path = "/api/db/"
service = "db"
strip_prefix = true
auth = "authenticated"
[[routes]]
host = "*.myapp.example"
service = "myapp"
env = "staging"
"#;

    #[test]
    fn a_good_file_compiles_with_defaults() {
        let c = Compiled::parse(GOOD).expect("compiles");
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].path.as_deref(), Some("/api/db"));
        assert_eq!(c.routes[0].name, "/api/db/");
        assert_eq!(c.fallback, Fallback::Status(http::StatusCode::NOT_FOUND));
        assert_eq!(c.max_body, 1024 * 1024);
        assert_eq!(c.environments(), ["production", "staging"]);
    }

    #[test]
    fn bad_files_are_refused_with_the_key_at_fault() {
        for (extra, needle) in [
            ("[[routes]]\nservice = \"x\"\n", "routes[2]: give a path"),
            (
                "[[routes]]\npath = \"x\"\nservice = \"x\"\n",
                "must start with /",
            ),
            (
                "[[routes]]\nhost = \"a.*.b\"\nservice = \"x\"\n",
                "routes[2].host",
            ),
            (
                "[[routes]]\npath = \"/x\"\nservice = \"Bad Name\"\n",
                "routes[2].service",
            ),
            ("[rate_limit]\nper_ip = \"lots\"\n", "rate_limit.per_ip"),
            (
                "[fallback]\nstatus = 404\nupstream = \"http://x\"\n",
                "either status or upstream",
            ),
            ("typo_key = 1\n", "unknown field"),
            ("[upstream]\nmax_body = \"1 parsec\"\n", "upstream.max_body"),
        ] {
            let text = if extra.starts_with('[') {
                format!("{GOOD}{extra}")
            } else {
                format!("{extra}{GOOD}")
            };
            let err = Compiled::parse(&text).expect_err(extra).to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        for (s, n) in [
            ("1024", 1024),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("2mb", 2 << 20),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        assert!(parse_size("lots").is_err());
    }
}
