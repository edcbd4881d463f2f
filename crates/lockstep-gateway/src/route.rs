//! Routing, pure: which route a request takes (first match in file order), what path the
//! upstream sees, and which namespace (environment) it is served from.
//!
//! Paths match on whole segments (`/api/db` matches `/api/db` and `/api/db/x`, never
//! `/api/dbx`); hosts match exactly or with one leading wildcard label (`*.app.example`
//! matches `a.app.example`, not `app.example` nor `a.b.app.example`); both are
//! case-insensitive for the host and ignore its port.

use crate::auth::Level;
use crate::limit::Rate;

/// A host pattern from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Parses `host` or `*.suffix`; `None` when it has a wildcard anywhere else.
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return None;
            }
            return Some(HostPattern::Wildcard(format!(".{rest}")));
        }
        if s.is_empty() || s.contains('*') {
            return None;
        }
        Some(HostPattern::Exact(s))
    }

    /// Whether `host` (already lowercased, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

/// Lowercases a `Host` header value and drops its port (and IPv6 brackets stay).
pub fn normalize_host(raw: &str) -> String {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        raw.split_once(']')
            .map(|(h, _)| &raw[..=h.len()])
            .unwrap_or(raw)
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(raw)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `path` is under `prefix` on a segment boundary. `prefix` has no trailing slash
/// (`/` itself excepted, which matches everything).
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path the upstream sees once `prefix` is stripped (always starting with `/`).
pub fn strip_path(prefix: &str, path: &str) -> String {
    if prefix == "/" {
        return path.to_string();
    }
    match path.strip_prefix(prefix) {
        Some("") => "/".to_string(),
        Some(rest) => rest.to_string(),
        None => path.to_string(),
    }
}

/// Per-route rate limits that replace the global ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteLimits {
    /// Per authenticated user.
    pub per_user: Option<Rate>,
    /// Per client IP.
    pub per_ip: Option<Rate>,
}

/// One compiled route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Name in logs and metrics (the configured `name`, else the path or host).
    pub name: String,
    /// Host pattern, if any.
    pub host: Option<HostPattern>,
    /// Path prefix, if any (normalised: no trailing slash).
    pub path: Option<String>,
    /// Routed service.
    pub service: String,
    /// Fixed environment; `None` lets the namespace rules choose.
    pub env: Option<String>,
    /// Whether the upstream sees the path without the prefix.
    pub strip_prefix: bool,
    /// Level the caller needs.
    pub auth: Level,
    /// Rate limits replacing the global ones.
    pub limits: RouteLimits,
}

impl Route {
    /// Whether the request matches this route.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        self.host.as_ref().is_none_or(|h| h.matches(host))
            && self.path.as_deref().is_none_or(|p| path_matches(p, path))
    }

    /// The upstream path (and query) for `path` and `query`.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let p = match (&self.path, self.strip_prefix) {
            (Some(prefix), true) => strip_path(prefix, path),
            _ => path.to_string(),
        };
        match query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        }
    }
}

/// The first route matching, in order.
pub fn select<'a>(routes: &'a [Route], host: &str, path: &str) -> Option<&'a Route> {
    routes.iter().find(|r| r.matches(host, path))
}

/// How a request's namespace is chosen when its route does not fix one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Namespaces {
    /// Header naming the environment (e.g. `X-Lockstep-Env`), if enabled.
    pub header: Option<http::HeaderName>,
    /// Hosts that select an environment, first match wins.
    pub hosts: Vec<(HostPattern, String)>,
    /// Environments a header may select.
    pub allowed: Vec<String>,
    /// The default environment.
    pub default: String,
}

impl Namespaces {
    /// The environment for a request: the route's own, else an allowed header value, else
    /// the first host rule that matches, else the default.
    pub fn select<'a>(
        &'a self,
        route_env: Option<&'a str>,
        header: Option<&str>,
        host: &str,
    ) -> &'a str {
        if let Some(e) = route_env {
            return e;
        }
        if let Some(v) = header.map(str::trim)
            && let Some(a) = self.allowed.iter().find(|a| *a == v)
        {
            return a;
        }
        for (p, env) in &self.hosts {
            if p.matches(host) {
                return env;
            }
        }
        &self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, path: Option<&str>) -> Route {
        Route {
            name: name.into(),
            host: host.and_then(HostPattern::parse),
            path: path.map(str::to_string),
            service: name.into(),
            env: None,
            strip_prefix: false,
            auth: Level::Anonymous,
            limits: RouteLimits::default(),
        }
    }

    #[test]
    fn paths_match_on_whole_segments_only() {
        for (prefix, path, want) in [
            ("/api/db", "/api/db", true),
            ("/api/db", "/api/db/", true),
            ("/api/db", "/api/db/x/y", true),
            ("/api/db", "/api/dbx", false),
            ("/api/db", "/api", false),
            ("/api/db", "/API/db", false),
            ("/", "/anything", true),
            ("/", "/", true),
        ] {
            assert_eq!(path_matches(prefix, path), want, "{prefix} vs {path}");
        }
    }

    #[test]
    fn stripping_keeps_a_leading_slash_and_the_query() {
        let mut r = route("db", None, Some("/api/db"));
        r.strip_prefix = true;
        for (path, q, want) in [
            ("/api/db", None, "/"),
            ("/api/db/", None, "/"),
            ("/api/db/x", Some("a=1"), "/x?a=1"),
        ] {
            assert_eq!(r.upstream_path(path, q), want);
        }
        r.strip_prefix = false;
        assert_eq!(r.upstream_path("/api/db/x", Some("a=1")), "/api/db/x?a=1");
    }

    #[test]
    fn hosts_match_exactly_or_by_one_wildcard_label() {
        for (pattern, host, want) in [
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "x.api.example.com", false),
            ("*.myapp.example", "a.myapp.example", true),
            ("*.myapp.example", "myapp.example", false),
            ("*.myapp.example", "a.b.myapp.example", false),
            ("*.myapp.example", "evilmyapp.example", false),
            ("*.MyApp.example", "a.myapp.example", true),
        ] {
            let p = HostPattern::parse(pattern).expect("pattern");
            assert_eq!(p.matches(host), want, "{pattern} vs {host}");
        }
        assert_eq!(HostPattern::parse("a.*.example"), None);
        assert_eq!(HostPattern::parse("*."), None);
    }

    #[test]
    fn host_headers_lose_their_port_and_case() {
        for (raw, want) in [
            ("API.Example.com:8080", "api.example.com"),
            ("example.com", "example.com"),
            ("example.com.", "example.com"),
            ("[::1]:8080", "[::1]"),
            ("127.0.0.1:80", "127.0.0.1"),
        ] {
            assert_eq!(normalize_host(raw), want, "{raw}");
        }
    }

    #[test]
    fn first_matching_route_wins_in_file_order() {
        let routes = vec![
            route("db", None, Some("/api/db")),
            route("wild", Some("*.myapp.example"), None),
            route("api-on-host", Some("api.example.com"), Some("/v1")),
            route("catch", None, Some("/")),
        ];
        for (host, path, want) in [
            ("x.myapp.example", "/api/db/q", Some("db")),
            ("x.myapp.example", "/other", Some("wild")),
            ("api.example.com", "/v1/x", Some("api-on-host")),
            ("api.example.com", "/v2", Some("catch")),
            ("other", "/api/dbx", Some("catch")),
        ] {
            assert_eq!(
                select(&routes, host, path).map(|r| r.name.as_str()),
                want,
                "{host}{path}"
            );
        }
        assert!(select(&routes[..3], "other", "/nothing").is_none());
    }

    #[test]
    fn namespaces_come_from_route_then_header_then_host_then_default() {
        let ns = Namespaces {
            header: Some(http::HeaderName::from_static("x-lockstep-env")),
            hosts: vec![(
                HostPattern::parse("*.staging.example").expect("p"),
                "staging".into(),
            )],
            allowed: vec!["production".into(), "staging".into(), "development".into()],
            default: "production".into(),
        };
        for (route_env, header, host, want) in [
            (
                Some("development"),
                Some("staging"),
                "a.staging.example",
                "development",
            ),
            (None, Some("staging"), "x", "staging"),
            (None, Some("not-allowed"), "x", "production"),
            (None, None, "a.staging.example", "staging"),
            (
                None,
                Some("development"),
                "a.staging.example",
                "development",
            ),
            (None, None, "x", "production"),
        ] {
            assert_eq!(ns.select(route_env, header, host), want);
        }
    }
}
