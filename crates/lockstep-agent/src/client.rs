//! [`AgentClient`]: the calls a coordinator makes to an agent (version, health, upload with
//! signature, apply, rollback), presenting the agent token.

use reqwest::multipart::{Form, Part};
use std::path::Path;
use std::time::Duration;

use crate::{Outcome, VersionInfo};

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("agent {url}: {source}")]
    Transport {
        /// The agent.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The agent answered with an error.
    #[error("agent {url}: {status} {code}: {message}")]
    Api {
        /// The agent.
        url: String,
        /// HTTP status.
        status: u16,
        /// The `error` code of the body.
        code: String,
        /// Its `message`.
        message: String,
    },
    /// Reading a local file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A client for one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AgentClient {
    /// A client for the agent at `base` (`http://host:port`), presenting `token`.
    pub fn new(base: &str, token: Option<String>) -> AgentClient {
        AgentClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The agent's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let resp = r.send().await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(transport);
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        Err(ClientError::Api {
            url: self.base.clone(),
            status: status.as_u16(),
            code: body["error"].as_str().unwrap_or("").to_string(),
            message: body["message"].as_str().unwrap_or("").to_string(),
        })
    }

    /// `GET /api/v1/version`.
    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.send(
            self.req(reqwest::Method::GET, "/api/v1/version")
                .timeout(Duration::from_secs(10)),
        )
        .await
    }

    /// `GET /health`: whether it answered 200.
    pub async fn health(&self) -> Result<bool, ClientError> {
        let r = self
            .req(reqwest::Method::GET, "/health")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        Ok(r.status().is_success())
    }

    /// `POST /api/v1/update/upload` as multipart (`update_package`, and `signature` when
    /// given) with `X-Update-Version: version`. The package is streamed from disk.
    pub async fn upload(
        &self,
        version: &str,
        package: &Path,
        signature: Option<&Path>,
    ) -> Result<serde_json::Value, ClientError> {
        let file = tokio::fs::File::open(package).await?;
        let len = file.metadata().await?.len();
        let stream = tokio_util_stream(file);
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name("package.tar.gz")
            .mime_str("application/gzip")
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        let mut form = Form::new().part("update_package", part);
        if let Some(sig) = signature {
            let bytes = tokio::fs::read(sig).await?;
            form = form.part(
                "signature",
                Part::bytes(bytes).file_name("package.tar.gz.sig"),
            );
        }
        self.send(
            self.req(reqwest::Method::POST, "/api/v1/update/upload")
                .header("X-Update-Version", version)
                .multipart(form),
        )
        .await
    }

    /// [`AgentClient::upload`] from memory (the coordinator keeps packages in its store).
    pub async fn upload_bytes(
        &self,
        version: &str,
        package: bytes::Bytes,
        signature: Option<bytes::Bytes>,
    ) -> Result<serde_json::Value, ClientError> {
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let part = Part::stream_with_length(package.clone(), package.len() as u64)
            .file_name("package.tar.gz")
            .mime_str("application/gzip")
            .map_err(transport)?;
        let mut form = Form::new().part("update_package", part);
        if let Some(sig) = signature {
            form = form.part(
                "signature",
                Part::stream_with_length(sig.clone(), sig.len() as u64)
                    .file_name("package.tar.gz.sig"),
            );
        }
        self.send(
            self.req(reqwest::Method::POST, "/api/v1/update/upload")
                .header("X-Update-Version", version)
                .multipart(form),
        )
        .await
    }

    /// `POST /api/v1/update/apply` with `X-Update-Version`; waits for the apply (verify,
    /// unpack, switch, restart, health check) to finish.
    pub async fn apply(&self, version: &str) -> Result<Outcome, ClientError> {
        self.send(
            self.req(reqwest::Method::POST, "/api/v1/update/apply")
                .header("X-Update-Version", version),
        )
        .await
    }

    /// `POST /api/v1/update/rollback`.
    pub async fn rollback(&self) -> Result<Outcome, ClientError> {
        self.send(self.req(reqwest::Method::POST, "/api/v1/update/rollback"))
            .await
    }
}

/// A file as a stream of chunks, without pulling in tokio-util.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
