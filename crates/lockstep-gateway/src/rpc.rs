//! The RPC proxy: `POST /rpc` with one `{"service", "method", "args"}` call or an array of
//! them, each forwarded to `POST {endpoint}/rpc/{method}` of an instance that may serve;
//! `GET /rpc/services` (discovery) and `GET /rpc/services/{service}/health`.
//!
//! A batch runs concurrently and is answered in order; a failing member yields an `error`
//! entry and does not fail the others. Each answer is `{"result": …}` or
//! `{"error": {"code", "message", "status"}}`; a single call gets the status of its
//! outcome, a batch 200. A connect failure is retried on another instance (nothing was
//! sent, so it is safe even for a method that is not idempotent).

use crate::auth::{self, Decision};
use crate::proxy::{Body, Log, error_response, forward, full, read_body};
use crate::upstream::{Member, ReleaseChoice, seed};
use crate::{Live, Shared};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::Arc;

/// One call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// Service.
    pub service: String,
    /// Method (`^[A-Za-z0-9_.-]{1,64}$`).
    pub method: String,
    /// Arguments, sent as the JSON body.
    #[serde(default)]
    pub args: Value,
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn rpc_error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Value) {
    (
        status,
        json!({ "error": { "code": code, "message": message, "status": status.as_u16() } }),
    )
}

/// Whether a method name is safe to put in a path.
pub fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && m != "."
        && m != ".."
}

pub(crate) async fn handle<'a>(
    sh: &Arc<Shared>,
    live: &'a Arc<Live>,
    req: Request<Incoming>,
    ip: IpAddr,
    host: &str,
    rid: &str,
    log: &mut Log<'a>,
) -> Response<Body> {
    let cfg = &live.cfg;
    let identity = match auth::decide(cfg.rpc_auth, cfg.auth.identify(req.headers())) {
        Decision::Allow(id) => id,
        Decision::Unauthorized { .. } => {
            let mut r = error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token, API key or session is needed",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"lockstep-gateway\""),
            );
            return r;
        }
        Decision::Forbidden => {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                "RPC needs a stronger level",
            );
        }
    };
    log.user = identity.as_ref().map(|i| i.user.clone());
    if let Err(r) = crate::proxy::check_limits(sh, live, None, identity.as_ref(), ip).await {
        return r;
    }
    let ns_header = cfg
        .namespaces
        .header
        .as_ref()
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok());
    let env = cfg.namespaces.select(None, ns_header, host);
    log.env = env;
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/rpc/services") => discovery(sh, env),
        (Method::GET, p) if p.starts_with("/rpc/services/") && p.ends_with("/health") => {
            let svc = &p["/rpc/services/".len()..p.len() - "/health".len()];
            health(sh, env, svc)
        }
        (Method::POST, "/rpc") => {
            let (parts, body) = req.into_parts();
            let body = match read_body(body, cfg, &parts.headers).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let value: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("the body is not JSON: {e}"),
                    );
                }
            };
            let calls: Vec<Value> = match value {
                Value::Array(v) => {
                    if v.is_empty() {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "an empty batch",
                        );
                    }
                    if v.len() > cfg.rpc_max_batch {
                        return error_response(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "batch_too_large",
                            &format!("a batch holds at most {} calls", cfg.rpc_max_batch),
                        );
                    }
                    let futs = v
                        .into_iter()
                        .map(|c| call(sh, live, env, &parts, c, rid, identity.as_ref(), ip));
                    let out: Vec<Value> = futures_util::future::join_all(futs)
                        .await
                        .into_iter()
                        .map(|(_, v)| v)
                        .collect();
                    return json_response(StatusCode::OK, &Value::Array(out));
                }
                single => vec![single],
            };
            let mut calls = calls.into_iter();
            let Some(c) = calls.next() else {
                return error_response(StatusCode::BAD_REQUEST, "bad_request", "no call");
            };
            let (status, v) = call(sh, live, env, &parts, c, rid, identity.as_ref(), ip).await;
            json_response(status, &v)
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "RPC offers POST /rpc, GET /rpc/services and GET /rpc/services/{service}/health",
        ),
    }
}

#[allow(clippy::too_many_arguments)]
async fn call(
    sh: &Arc<Shared>,
    live: &Arc<Live>,
    env: &str,
    parts: &http::request::Parts,
    raw: Value,
    rid: &str,
    identity: Option<&auth::Identity>,
    ip: IpAddr,
) -> (StatusCode, Value) {
    let cfg = &live.cfg;
    let c: Call = match serde_json::from_value(raw) {
        Ok(c) => c,
        Err(e) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("not a call: {e}"),
            );
        }
    };
    if lockstep_core::validate_name("service", &c.service).is_err() || !valid_method(&c.method) {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid service or method name",
        );
    }
    let pool = match sh.upstreams.pool(env, &c.service) {
        Ok(Some(p)) if p.servable() > 0 => p,
        Ok(_) => {
            return rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                &format!("no instance of {} may serve right now", c.service),
            );
        }
        Err(_) => {
            return rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the registry has been unreachable for too long",
            );
        }
    };
    let body = Bytes::from(c.args.to_string());
    let mut p = http::Request::builder()
        .method(Method::POST)
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| parts.clone());
    p.headers = parts.headers.clone();
    p.headers.remove(http::header::CONTENT_LENGTH);
    p.headers.remove(http::header::AUTHORIZATION);
    p.headers.remove(auth::API_KEY_HEADER);
    p.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let path = format!("/rpc/{}", c.method);
    let mut tried: Vec<Arc<Member>> = Vec::new();
    let mut last = None;
    for _ in 0..cfg.attempts {
        let Some(member) = pool.select(
            ReleaseChoice::Expected,
            &tried,
            sh.upstreams_now_ms(),
            seed(),
        ) else {
            break;
        };
        let lease = member.lease();
        let res = forward(sh, cfg, &member, &p, &path, body.clone(), rid, identity, ip).await;
        drop(lease);
        match res {
            Ok(resp) => {
                let status = resp.status();
                member.record(
                    status.as_u16() >= 502 && status.as_u16() <= 504,
                    sh.upstreams_now_ms(),
                    &cfg.ejection,
                );
                let bytes = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                });
                if status.is_success() {
                    return (status, json!({ "result": v }));
                }
                let message = v
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("the method answered {}", status.as_u16()));
                let code = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("method_failed")
                    .to_string();
                return rpc_error(status, &code, &message);
            }
            Err(e) => {
                member.record(true, sh.upstreams_now_ms(), &cfg.ejection);
                let retry = matches!(e, crate::proxy::ForwardError::Connect(_));
                tried.push(member);
                let r = e.response();
                last = Some(r.status());
                if !retry {
                    break;
                }
            }
        }
    }
    match last {
        Some(StatusCode::GATEWAY_TIMEOUT) => rpc_error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the method did not answer in time",
        ),
        Some(s) => rpc_error(s, "upstream_unreachable", "no instance could be reached"),
        None => rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            &format!("no instance of {} may serve right now", c.service),
        ),
    }
}

fn discovery(sh: &Arc<Shared>, env: &str) -> Response<Body> {
    let Ok(services) = sh.upstreams.services(env) else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the registry has been unreachable for too long",
        );
    };
    let list: Vec<Value> = services
        .iter()
        .filter(|(_, p)| p.expected.is_some() || !p.members.is_empty())
        .map(|(name, p)| {
            json!({
                "name": name,
                "release": p.expected.as_ref().map(|r| json!({
                    "version_id": r.release.version_id,
                    "version": r.release.version,
                    "revision": r.revision,
                })),
                "healthy_instances": p.servable(),
                "instances": p.members.len(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "env": env, "services": list }))
}

fn health(sh: &Arc<Shared>, env: &str, service: &str) -> Response<Body> {
    if lockstep_core::validate_name("service", service).is_err() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid service name",
        );
    }
    let pool = match sh.upstreams.pool(env, service) {
        Ok(p) => p,
        Err(_) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the registry has been unreachable for too long",
            );
        }
    };
    let healthy = pool.as_ref().map(|p| p.servable()).unwrap_or(0);
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({
            "service": service,
            "env": env,
            "status": if healthy > 0 { "ok" } else { "unavailable" },
            "healthy_instances": healthy,
            "instances": pool.map(|p| p.members.len()).unwrap_or(0),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_stay_inside_one_path_segment() {
        for (m, ok) in [
            ("echo", true),
            ("user.get", true),
            ("a-b_c", true),
            ("", false),
            ("..", false),
            ("a/b", false),
            ("a?b", false),
        ] {
            assert_eq!(valid_method(m), ok, "{m:?}");
        }
    }
}
