//! The server's error type and its single mapping to HTTP: status, `{"error","message"}`
//! body, and `WWW-Authenticate` on 401. Store failures are logged here and answered with a
//! message that reveals nothing.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lockstep_api::{ErrorBody, codes};
use lockstep_core::CoreError;
use lockstep_store::StoreError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 with a message the caller can act on.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token or an unknown one.
    #[error("a valid bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// 403: the token's role does not allow the call.
    #[error("this call needs the {0} role")]
    Forbidden(&'static str),
    /// 403: a state-changing request authenticated by the session cookie lacks the
    /// matching CSRF header.
    #[error("this request needs the X-CSRF-Token header of the dashboard session")]
    Csrf,
    /// 404 with a code.
    #[error("{1}")]
    NotFound(&'static str, String),
    /// 409 with a code.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 413.
    #[error("request body is larger than {} bytes", lockstep_api::MAX_BODY_BYTES)]
    PayloadTooLarge,
    /// 415.
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    /// 503 that reveals nothing.
    #[error("the registry cannot serve this request now")]
    Unavailable,
    /// 500; details only in the log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, codes::FORBIDDEN),
            ApiError::Csrf => (StatusCode::FORBIDDEN, codes::CSRF),
            ApiError::NotFound(c, _) => (StatusCode::NOT_FOUND, c),
            ApiError::Conflict(c, _) => (StatusCode::CONFLICT, c),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, codes::PAYLOAD_TOO_LARGE),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                codes::UNSUPPORTED_MEDIA_TYPE,
            ),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, codes::SERVICE_UNAVAILABLE),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let body = ErrorBody {
            error: code.to_string(),
            message: self.to_string(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"lockstep\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Downgrade { .. } => ApiError::Conflict(codes::DOWNGRADE, e.to_string()),
            CoreError::NotRollbackSafe => {
                ApiError::Conflict(codes::NOT_ROLLBACK_SAFE, e.to_string())
            }
            CoreError::NoPreviousRelease => {
                ApiError::Conflict(codes::NO_PREVIOUS_RELEASE, e.to_string())
            }
            CoreError::UnknownRollbackTarget => ApiError::NotFound(codes::NOT_FOUND, e.to_string()),
            CoreError::InvalidName { .. }
            | CoreError::InvalidVersionId(_)
            | CoreError::UnknownRole(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rule(r) => r.into(),
            StoreError::Conflict(what) => {
                ApiError::Conflict(codes::CONFLICT, format!("{what} already exists"))
            }
            StoreError::LastAdmin => {
                ApiError::Conflict(codes::LAST_ADMIN, StoreError::LastAdmin.to_string())
            }
            StoreError::NoRelease { env, service } => ApiError::NotFound(
                codes::NO_RELEASE,
                format!("no release registered for {service} in {env}"),
            ),
            // The database is away (or refusing): retryable, and said without detail.
            StoreError::Database(e) => {
                crate::service::metrics::store_error();
                tracing::error!(error = %e, "store failure");
                ApiError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::Internal
            }
        }
    }
}

/// Rewrites a non-JSON error answer (axum's own rejections) as a lockstep error body,
/// keeping its status and using its text as the message.
impl From<crate::service::Poisoned> for ApiError {
    fn from(e: crate::service::Poisoned) -> Self {
        tracing::error!(error = %e, "answering 503");
        ApiError::Unavailable
    }
}

impl From<crate::service::RegistryError> for ApiError {
    fn from(e: crate::service::RegistryError) -> Self {
        use crate::service::RegistryError as R;
        match e {
            R::Rule(r) => r.into(),
            R::BadRequest(m) => ApiError::BadRequest(m),
            R::NotFound(m) => ApiError::NotFound(codes::NOT_FOUND, m),
            R::Conflict(m) => ApiError::Conflict(codes::CONFLICT, m),
            R::Store(s) => s.into(),
            R::Unavailable(p) => p.into(),
        }
    }
}

pub(crate) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => codes::PAYLOAD_TOO_LARGE,
        s if s.is_server_error() => codes::INTERNAL,
        _ => codes::BAD_REQUEST,
    };
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    let mut out = (
        status,
        axum::Json(ErrorBody {
            error: code.to_string(),
            message,
        }),
    )
        .into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Refuses an HTTP/1.1 request without a `Host` header (400).
pub(crate) async fn require_host(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.version() == axum::http::Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        return ApiError::BadRequest("an HTTP/1.1 request must carry a Host header".into())
            .into_response();
    }
    next.run(req).await
}
