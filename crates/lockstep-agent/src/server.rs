//! The agent's HTTP API: the contract's endpoints, bearer-token auth (constant-time), and
//! uploads streamed to disk (multipart `update_package` + `signature`, or the raw
//! `application/octet-stream` body the source system's coordinator sends, chunked).

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

use crate::agent::{Agent, incoming_dir, upload_files};
use crate::{AgentError, VersionInfo};

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let mut resp = (
            status,
            axum::Json(serde_json::json!({"error": code, "message": self.to_string()})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The router: `/health` open, everything under `/api/v1` behind the token.
pub fn router(agent: Arc<Agent>) -> Router {
    let api = Router::new()
        .route("/api/v1/version", get(version))
        .route("/api/v1/update/upload", post(upload))
        .route("/api/v1/update/apply", post(apply))
        .route("/api/v1/update/rollback", post(rollback))
        // Auth runs before any body is read: an unauthenticated upload is refused
        // without receiving the package.
        .layer(middleware::from_fn_with_state(agent.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        // The upload handler enforces --max-package-size itself while streaming.
        .layer(DefaultBodyLimit::disable())
        .with_state(agent)
}

fn token_matches(expected: &str, presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Hash both so the comparison takes the same time whatever the lengths.
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.ct_eq(&b).into()
}

async fn auth(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let cfg = agent.config();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = match (presented, &cfg.token) {
        (Some(p), Some(t)) => token_matches(t, p),
        (None, _) => cfg.allow_unauthenticated,
        (Some(_), None) => cfg.allow_unauthenticated,
    };
    if !ok {
        tracing::warn!(path = %req.uri().path(), "refused: no or wrong bearer token");
        return AgentError::Unauthorized.into_response();
    }
    next.run(req).await
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn version(State(agent): State<Arc<Agent>>) -> axum::Json<VersionInfo> {
    axum::Json(VersionInfo::of(&agent))
}

fn update_version(headers: &HeaderMap) -> Result<String, AgentError> {
    let v = headers
        .get("x-update-version")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            AgentError::bad("missing_version", "the X-Update-Version header is required")
        })?;
    if !lockstep_package::valid_version_id(v) {
        return Err(AgentError::bad(
            "invalid_version",
            "X-Update-Version: letters, digits, '.', '_', '-', '+' only, at most 128",
        ));
    }
    Ok(v.to_string())
}

struct Sink {
    file: tokio::fs::File,
    hash: Sha256,
    size: u64,
    limit: u64,
}

impl Sink {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), AgentError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(AgentError::TooLarge { limit: self.limit });
        }
        self.hash.update(chunk);
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| AgentError::io("writing the upload", e))
    }
}

async fn upload(State(agent): State<Arc<Agent>>, req: Request) -> Result<Response, AgentError> {
    let key = update_version(req.headers())?;
    let dir = incoming_dir(&agent);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| AgentError::io("creating the upload directory", e))?;
    let result = receive(&agent, &key, &dir, req).await;
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    result
}

async fn receive(
    agent: &Arc<Agent>,
    key: &str,
    dir: &std::path::Path,
    req: Request,
) -> Result<Response, AgentError> {
    let (package, sig_path) = upload_files(dir);
    let file = tokio::fs::File::create(&package)
        .await
        .map_err(|e| AgentError::io("creating the upload", e))?;
    let mut sink = Sink {
        file,
        hash: Sha256::new(),
        size: 0,
        limit: agent.config().max_package_size,
    };
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let mut got_file = false;
    if multipart {
        let mut mp = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| AgentError::bad("bad_multipart", e.body_text()))?;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| AgentError::bad("bad_multipart", e.body_text()))?
        {
            match field.name() {
                Some("update_package") => {
                    got_file = true;
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| AgentError::bad("bad_multipart", e.body_text()))?
                    {
                        sink.write(&chunk).await?;
                    }
                }
                Some("signature") => {
                    let mut sig = Vec::new();
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| AgentError::bad("bad_multipart", e.body_text()))?
                    {
                        sig.extend_from_slice(&chunk);
                        if sig.len() > 4096 {
                            return Err(AgentError::bad(
                                "bad_signature",
                                "the signature field is too large",
                            ));
                        }
                    }
                    tokio::fs::write(&sig_path, &sig)
                        .await
                        .map_err(|e| AgentError::io("writing the signature", e))?;
                }
                _ => {}
            }
        }
    } else {
        let mut body = req.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| AgentError::bad("bad_body", e.to_string()))?;
            got_file |= !chunk.is_empty();
            sink.write(&chunk).await?;
        }
    }
    if !got_file || sink.size == 0 {
        return Err(AgentError::bad(
            "no_file",
            "no package: send it as multipart field `update_package` or as an application/octet-stream body",
        ));
    }
    sink.file
        .sync_all()
        .await
        .map_err(|e| AgentError::io("syncing the upload", e))?;
    let sha = hex::encode(sink.hash.finalize());
    let meta = agent.accept_upload(key, dir, sink.size, sha).await?;
    Ok(axum::Json(serde_json::json!({
        "status": "uploaded",
        "version_id": meta.version_id,
        "version": meta.version,
        "signed": meta.signed,
        "legacy": meta.manifest.is_none(),
        "size": meta.size,
        "sha256": meta.sha256,
    }))
    .into_response())
}

async fn apply(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
) -> Result<Response, AgentError> {
    let key = update_version(&headers)?;
    // Its own task: a caller that hangs up does not cancel an apply half-way.
    let outcome = tokio::spawn(agent.apply(key))
        .await
        .map_err(|e| AgentError::Config(format!("apply task: {e}")))??;
    Ok(axum::Json(outcome).into_response())
}

#[derive(Deserialize)]
struct RollbackQuery {
    worker_id: Option<String>,
}

async fn rollback(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<RollbackQuery>,
    headers: HeaderMap,
) -> Result<Response, AgentError> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(128).collect::<String>())
    };
    let backup = h("x-backup-id");
    let worker = h("x-worker-id").or(q.worker_id);
    let outcome = tokio::spawn(agent.rollback(backup, worker))
        .await
        .map_err(|e| AgentError::Config(format!("rollback task: {e}")))??;
    Ok(axum::Json(outcome).into_response())
}
