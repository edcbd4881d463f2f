//! The registry HTTP client with ordered failover.

use lockstep_api::{
    CreateToken, CreatedToken, ErrorBody, EventPage, Heartbeat, HeartbeatAnswer, PutRelease,
    ReleaseHistory, RollbackRequest, ServiceIndex, StatusReport, TokenList,
};
use lockstep_core::{Role, StoredRelease};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Why a call failed, in the words an operator acts on: what is wrong and which setting
/// fixes it. The HTTP status stays available through [`ClientError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No registry URL answered (connection refused, timeout, DNS, TLS), or a proxy in
    /// front of it said the registry behind it is down (502, 503 or 504 without a
    /// lockstep answer).
    #[error(
        "could not reach the registry at {urls}: {message} (is `lockstep serve` running \
         there? the address comes from LOCKSTEP_REGISTRY or --registry)"
    )]
    Unreachable {
        /// The URLs tried.
        urls: String,
        /// What went wrong, e.g. `connection refused`.
        message: String,
    },
    /// 401: no token, or one the registry does not know.
    #[error("{}", unauthorized_text(*token_given))]
    Unauthorized {
        /// Whether a token was presented at all.
        token_given: bool,
    },
    /// 403: the token is valid but its role does not allow the call.
    #[error(
        "the token's role is too weak: {} (an admin creates a stronger one with \
         `lockstep token create --name NAME --role ROLE`)", body.message
    )]
    Forbidden {
        /// The registry's answer, naming the role needed.
        body: ErrorBody,
    },
    /// The registry answered and refused or failed: a lockstep error answer.
    #[error("{}", body.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// Something answered that is not a lockstep registry (an HTML page, another API, a
    /// body that does not parse as the answer expected).
    #[error(
        "{urls} does not answer like a lockstep registry ({detail}): point LOCKSTEP_REGISTRY \
         or --registry at `lockstep serve`"
    )]
    NotRegistry {
        /// The URLs asked.
        urls: String,
        /// HTTP status of the answer.
        status: u16,
        /// What was wrong with it.
        detail: String,
    },
    /// A registry URL that does not parse.
    #[error("invalid registry URL {0:?}: use http://host:port (LOCKSTEP_REGISTRY or --registry)")]
    BadUrl(String),
}

fn unauthorized_text(token_given: bool) -> &'static str {
    if token_given {
        "the registry does not accept this token (mistyped, revoked, or made for another \
         registry): check LOCKSTEP_TOKEN or --token"
    } else {
        "no token was given: set LOCKSTEP_TOKEN or pass --token (`lockstep serve` prints an \
         admin token on first start; `lockstep token create` makes narrower ones)"
    }
}

impl ClientError {
    /// The HTTP status of an answer, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::NotRegistry { status, .. } => {
                Some(*status)
            }
            ClientError::Unauthorized { .. } => Some(401),
            ClientError::Forbidden { .. } => Some(403),
            ClientError::Unreachable { .. } | ClientError::BadUrl(_) => None,
        }
    }

    /// The lockstep error code of an answer (`no_release`, `downgrade`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } | ClientError::Forbidden { body } => Some(&body.error),
            ClientError::Unauthorized { .. } => Some(lockstep_api::codes::UNAUTHORIZED),
            _ => None,
        }
    }

    /// Whether this is a setting to fix rather than an outage or a refusal: no or a wrong
    /// token, too weak a role, a URL that is not a registry or does not parse. Retrying
    /// does not help; the CLI exits 2 and the startup guards refuse in production.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ClientError::Unauthorized { .. }
                | ClientError::Forbidden { .. }
                | ClientError::NotRegistry { .. }
                | ClientError::BadUrl(_)
        )
    }
}

/// The cause of a transport error in a few words (`connection refused`, `timed out`,
/// `cannot resolve the host name`), instead of reqwest's "error sending request for url".
fn transport_cause(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut innermost = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused => return "connection refused".into(),
                K::ConnectionReset => return "the connection was reset".into(),
                K::TimedOut => return "timed out".into(),
                K::ConnectionAborted => return "the connection was aborted".into(),
                _ => {}
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    let lower = innermost.to_ascii_lowercase();
    if lower.contains("dns")
        || lower.contains("failed to lookup")
        || lower.contains("name or service")
    {
        return format!("cannot resolve the host name ({innermost})");
    }
    if e.is_connect() {
        return format!("cannot connect ({innermost})");
    }
    innermost
}

/// A client for one registry or an ordered list of replicas.
pub struct RegistryClient {
    bases: Vec<reqwest::Url>,
    token: Option<String>,
    http: reqwest::Client,
    stream_http: reqwest::Client,
    /// Index of the URL that answered last; tried first next time.
    preferred: AtomicUsize,
}

impl RegistryClient {
    /// A client for `urls` (comma-separated in order of preference) presenting `token`.
    pub fn new(urls: &str, token: Option<String>) -> Result<Self, ClientError> {
        let bases = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                let with_slash = if u.ends_with('/') {
                    u.to_string()
                } else {
                    format!("{u}/")
                };
                reqwest::Url::parse(&with_slash)
                    .ok()
                    .filter(|p| matches!(p.scheme(), "http" | "https"))
                    .ok_or_else(|| ClientError::BadUrl(u.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if bases.is_empty() {
            return Err(ClientError::BadUrl(urls.to_string()));
        }
        let build = |b: reqwest::ClientBuilder| {
            b.connect_timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| ClientError::Unreachable {
                    urls: urls.to_string(),
                    message: e.to_string(),
                })
        };
        let http = build(reqwest::Client::builder().timeout(Duration::from_secs(30)))?;
        // No overall timeout: a watch stays open as long as the registry allows.
        let stream_http = build(reqwest::Client::builder())?;
        Ok(RegistryClient {
            bases,
            token: token.filter(|t| !t.is_empty()),
            http,
            stream_http,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The error for a non-2xx answer: said in an operator's words when it is lockstep's
    /// own, "not a registry" when it is not, "unreachable" when a proxy says so.
    fn api_error(&self, status: StatusCode, bytes: &[u8]) -> ClientError {
        match (status.as_u16(), lockstep_error(bytes)) {
            (401, Some(_)) => ClientError::Unauthorized {
                token_given: self.token.is_some(),
            },
            (403, Some(body)) => ClientError::Forbidden { body },
            (s, Some(body)) => ClientError::Api { status: s, body },
            (502..=504, None) => ClientError::Unreachable {
                urls: self.urls(),
                message: format!(
                    "a proxy in front of it answered {} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
            },
            (s, None) => ClientError::NotRegistry {
                urls: self.urls(),
                status: s,
                detail: format!(
                    "it answered {s} {} without a lockstep error body",
                    status.canonical_reason().unwrap_or("")
                ),
            },
        }
    }

    /// The registry URLs, in order.
    pub fn urls(&self) -> String {
        self.bases
            .iter()
            .map(|u| u.as_str().trim_end_matches('/'))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sends one request, failing over on transport errors only: an answer, even an error
    /// status, comes from a registry that is up and is returned as is.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let n = self.bases.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = self.bases[i]
                .join(path.trim_start_matches('/'))
                .map_err(|_| ClientError::BadUrl(path.into()))?;
            let mut req = self.http.request(method.clone(), url);
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) => {
                    tracing::debug!(url = %self.bases[i], error = %e, "registry unreachable, trying the next");
                    last_err = transport_cause(&e);
                }
            }
        }
        Err(ClientError::Unreachable {
            urls: self.urls(),
            message: last_err,
        })
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, query, body).await?;
        let status = resp.status();
        // A registry that vanishes mid-answer is unreachable, not a bad answer.
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            urls: self.urls(),
            message: format!("the connection broke while reading the answer: {e}"),
        })?;
        if !status.is_success() {
            return Err(self.api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::NotRegistry {
            urls: self.urls(),
            status: status.as_u16(),
            detail: format!("its answer does not parse: {e}"),
        })
    }

    async fn call_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        let resp = self.send::<()>(method, path, &[], None).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        Err(self.api_error(status, &bytes))
    }

    /// The expected release, or `None` when nothing is registered (404 `no_release`).
    pub async fn release(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<StoredRelease>, ClientError> {
        match self
            .call::<(), _>(Method::GET, &release_path(env, service), &[], None)
            .await
        {
            Err(ClientError::Api { status: 404, body })
                if body.error == lockstep_api::codes::NO_RELEASE =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Registers a release.
    pub async fn put_release(
        &self,
        env: &str,
        service: &str,
        body: &PutRelease,
    ) -> Result<StoredRelease, ClientError> {
        self.call(Method::PUT, &release_path(env, service), &[], Some(body))
            .await
    }

    /// Release history, newest first.
    pub async fn history(
        &self,
        env: &str,
        service: &str,
        limit: u32,
    ) -> Result<ReleaseHistory, ClientError> {
        let path = format!("v1/envs/{env}/services/{service}/releases");
        self.call::<(), _>(Method::GET, &path, &[("limit", limit.to_string())], None)
            .await
    }

    /// Rolls back.
    pub async fn rollback(
        &self,
        env: &str,
        service: &str,
        body: &RollbackRequest,
    ) -> Result<StoredRelease, ClientError> {
        let path = format!("v1/envs/{env}/services/{service}/rollback");
        self.call(Method::POST, &path, &[], Some(body)).await
    }

    /// The fleet status, optionally filtered.
    pub async fn status(
        &self,
        env: Option<&str>,
        service: Option<&str>,
    ) -> Result<StatusReport, ClientError> {
        let mut q = Vec::new();
        if let Some(e) = env {
            q.push(("env", e.to_string()));
        }
        if let Some(s) = service {
            q.push(("service", s.to_string()));
        }
        self.call::<(), _>(Method::GET, "v1/status", &q, None).await
    }

    /// The services with an expected release, per environment (any token may ask).
    pub async fn services(&self) -> Result<ServiceIndex, ClientError> {
        self.call::<(), _>(Method::GET, "v1/services", &[], None)
            .await
    }

    /// Opens the watch stream (`GET /v1/watch`): release changes as SSE events, resuming
    /// after `since` when given. The stream ends when the connection does.
    pub async fn watch(
        &self,
        env: Option<&str>,
        service: Option<&str>,
        since: Option<i64>,
    ) -> Result<impl futures_util::Stream<Item = crate::sse::SseEvent> + Send + use<>, ClientError>
    {
        let mut q = Vec::new();
        if let Some(e) = env {
            q.push(("env", e.to_string()));
        }
        if let Some(s) = service {
            q.push(("service", s.to_string()));
        }
        if let Some(n) = since {
            q.push(("since", n.to_string()));
        }
        self.stream("v1/watch", &q).await
    }

    /// Opens the instance stream (`GET /v1/instances/watch`) of an environment (and one
    /// service): a `snapshot` event, then `instance` and `removed` events as instances
    /// change. The stream ends when the connection does; reconnecting gives a new snapshot.
    pub async fn watch_instances(
        &self,
        env: &str,
        service: Option<&str>,
    ) -> Result<impl futures_util::Stream<Item = crate::sse::SseEvent> + Send + use<>, ClientError>
    {
        let mut q = vec![("env", env.to_string())];
        if let Some(s) = service {
            q.push(("service", s.to_string()));
        }
        self.stream("v1/instances/watch", &q).await
    }

    /// Opens the live event stream (`GET /v1/events/stream`), resuming after `since`.
    pub async fn event_stream(
        &self,
        since: Option<i64>,
    ) -> Result<impl futures_util::Stream<Item = crate::sse::SseEvent> + Send + use<>, ClientError>
    {
        let q: Vec<(&str, String)> = since
            .map(|n| ("since", n.to_string()))
            .into_iter()
            .collect();
        self.stream("v1/events/stream", &q).await
    }

    async fn stream(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<impl futures_util::Stream<Item = crate::sse::SseEvent> + Send + use<>, ClientError>
    {
        let n = self.bases.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = self.bases[i]
                .join(path)
                .map_err(|_| ClientError::BadUrl(path.into()))?;
            // No overall timeout: a watch stays open for as long as the registry allows.
            let mut req = self.stream_http.get(url).query(query);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(crate::sse::events(resp.bytes_stream()));
                }
                Ok(resp) => {
                    let status = resp.status();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    return Err(self.api_error(status, &bytes));
                }
                Err(e) => last_err = transport_cause(&e),
            }
        }
        Err(ClientError::Unreachable {
            urls: self.urls(),
            message: last_err,
        })
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatAnswer, ClientError> {
        self.call(Method::POST, "v1/instances", &[], Some(hb)).await
    }

    /// Deregisters an instance.
    pub async fn deregister(&self, instance_id: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("v1/instances/{instance_id}"))
            .await
    }

    /// The event log after `since`.
    pub async fn events(&self, since: i64, limit: u32) -> Result<EventPage, ClientError> {
        let q = [("since", since.to_string()), ("limit", limit.to_string())];
        self.call::<(), _>(Method::GET, "v1/events", &q, None).await
    }

    /// Creates a token.
    pub async fn create_token(&self, name: &str, role: Role) -> Result<CreatedToken, ClientError> {
        let body = CreateToken {
            name: name.to_string(),
            role,
        };
        self.call(Method::POST, "v1/tokens", &[], Some(&body)).await
    }

    /// Lists tokens.
    pub async fn list_tokens(&self) -> Result<TokenList, ClientError> {
        self.call::<(), _>(Method::GET, "v1/tokens", &[], None)
            .await
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("v1/tokens/{name}"))
            .await
    }

    /// Drift alerts, newest first: `state` is `open`, `resolved` or `all`.
    pub async fn alerts(
        &self,
        state: &str,
        env: Option<&str>,
        service: Option<&str>,
        limit: u32,
    ) -> Result<lockstep_api::AlertList, ClientError> {
        let mut q = vec![("state", state.to_string()), ("limit", limit.to_string())];
        if let Some(e) = env {
            q.push(("env", e.to_string()));
        }
        if let Some(s) = service {
            q.push(("service", s.to_string()));
        }
        self.call::<(), _>(Method::GET, "v1/alerts", &q, None).await
    }

    /// Acknowledges an alert.
    pub async fn ack_alert(
        &self,
        id: &str,
        reason: Option<&str>,
    ) -> Result<lockstep_api::Alert, ClientError> {
        let body = lockstep_api::AckRequest {
            reason: reason.map(str::to_string),
        };
        let id: String = id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        self.call(
            Method::POST,
            &format!("v1/alerts/{id}/ack"),
            &[],
            Some(&body),
        )
        .await
    }

    /// The alert channels (secrets masked).
    pub async fn alert_channels(&self) -> Result<lockstep_api::AlertChannels, ClientError> {
        self.call::<(), _>(Method::GET, "v1/alert-channels", &[], None)
            .await
    }

    /// Replaces the alert channels.
    pub async fn put_alert_channels(
        &self,
        channels: &lockstep_api::AlertChannels,
    ) -> Result<lockstep_api::AlertChannels, ClientError> {
        self.call(Method::PUT, "v1/alert-channels", &[], Some(channels))
            .await
    }
}

fn release_path(env: &str, service: &str) -> String {
    format!("v1/envs/{env}/services/{service}/release")
}

/// An error body is lockstep's when it is `{"error", "message"}` JSON.
fn lockstep_error(bytes: &[u8]) -> Option<ErrorBody> {
    serde_json::from_slice::<ErrorBody>(bytes).ok()
}
