//! Real update agents on loopback for the dashboard's rollout tests: each node is a
//! `lockstep_agent` (the library `lockstep agent` runs) served in this process on
//! 127.0.0.1:0, heartbeating to the registry under test with its endpoint, and health-checked
//! through a small HTTP server here whose answer per node and release the test chooses:
//! healthy, sick (the agent rolls itself back and the rollout records the failure), or held
//! (the node stays `updating` until the test lets it go). The agents restart no worker:
//! the health check stands in for one.

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use lockstep_agent::{Agent, AgentClient, AgentConfig, RegistrySettings};
use lockstep_package::{CreateOptions, SigningKey, sign};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The token agents require and the registry presents (`serve --agent-token`).
pub const AGENT_TOKEN: &str = "dashboard-agent-token-0123456789";

/// The release every node runs first.
pub const V1: &str = "7f3a9c1e2b4d";
/// The release the rollouts bring.
pub const V2: &str = "c41d07e98a22";

/// Which (node, release) pairs answer the health check with 503.
#[derive(Default)]
struct Gate {
    roots: HashMap<String, PathBuf>,
    sick: HashSet<(String, String)>,
    held: HashSet<(String, String)>,
}

type Shared = Arc<Mutex<Gate>>;

/// The release a node's `current` link names.
fn current_of(root: &Path) -> Option<String> {
    std::fs::read_link(root.join("current"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

async fn health(State(gate): State<Shared>, UrlPath(node): UrlPath<String>) -> StatusCode {
    let Ok(g) = gate.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let Some(release) = g.roots.get(&node).and_then(|r| current_of(r)) else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    let key = (node, release);
    if g.sick.contains(&key) || g.held.contains(&key) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// One agent.
pub struct Node {
    /// Its instance id (`api-1`, …).
    pub id: String,
    /// Its base URL.
    pub url: String,
    _agent: Arc<Agent>,
    server: tokio::task::JoinHandle<()>,
}

/// A package and its signature.
pub struct Pkg {
    /// The `.tar.gz`.
    pub file: PathBuf,
    /// Its detached signature.
    pub sig: PathBuf,
}

/// Agents for service `api` in `production`, all on [`V1`].
pub struct Fleet {
    /// Work directory: agent roots, packages.
    pub work: tempfile::TempDir,
    /// The agents, in the order given.
    pub nodes: Vec<Node>,
    key: SigningKey,
    gate: Shared,
    health_server: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Starts one agent per id, heartbeating to `registry` with `token`, and puts every
    /// one on [`V1`] (which the caller has made the expected release). Nodes in `patient`
    /// wait up to two minutes for their health check (so a held node stays `updating`);
    /// the others give up after a second.
    pub async fn start(registry: &str, token: &str, ids: &[&str], patient: &[&str]) -> Fleet {
        let work = tempfile::tempdir().expect("tempdir");
        let key = sign::generate().expect("key");
        let gate: Shared = Arc::new(Mutex::new(Gate::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind health");
        let health_url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route("/health/{node}", axum::routing::get(health))
            .with_state(gate.clone());
        let health_server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let mut fleet = Fleet {
            work,
            nodes: Vec::new(),
            key,
            gate,
            health_server,
        };
        let v1 = fleet.package(V1, "1.0.0");
        for id in ids {
            let root = fleet.work.path().join(id);
            std::fs::create_dir_all(&root).expect("mkdir");
            // A readable instance id instead of the generated host-pid-random one.
            let state = lockstep_agent::State {
                instance_id: (*id).to_string(),
                ..Default::default()
            };
            std::fs::write(
                root.join("state.json"),
                serde_json::to_vec(&state).expect("state"),
            )
            .expect("write state");
            fleet
                .gate
                .lock()
                .expect("gate")
                .roots
                .insert((*id).to_string(), root.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind agent");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let mut cfg = AgentConfig::new(&root);
            cfg.trusted_keys = vec![fleet.key.verifying_key()];
            cfg.token = Some(AGENT_TOKEN.into());
            cfg.health_url = Some(format!("{health_url}/health/{id}"));
            cfg.health_timeout = if patient.contains(id) {
                Duration::from_secs(120)
            } else {
                Duration::from_secs(1)
            };
            cfg.registry = Some(RegistrySettings {
                urls: registry.to_string(),
                token: Some(token.to_string()),
                env: "production".into(),
                service: "api".into(),
            });
            cfg.endpoint = Some(url.clone());
            let agent = Agent::open(cfg).await.expect("open agent");
            agent.start_background().await;
            let app = lockstep_agent::router(agent.clone());
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            let client = AgentClient::new(&url, Some(AGENT_TOKEN.into()));
            client
                .upload(V1, &v1.file, Some(&v1.sig))
                .await
                .expect("upload v1");
            client.apply(V1).await.expect("apply v1");
            fleet.nodes.push(Node {
                id: (*id).to_string(),
                url,
                _agent: agent,
                server,
            });
        }
        fleet
    }

    /// A signed package of release `version_id` for service `api`.
    pub fn package(&self, version_id: &str, version: &str) -> Pkg {
        let src = self.work.path().join(format!("src-{version_id}"));
        std::fs::create_dir_all(src.join("data")).expect("mkdir");
        std::fs::write(src.join("VERSION"), version).expect("write");
        std::fs::write(src.join("data/config"), format!("release {version}\n")).expect("write");
        let file = self.work.path().join(format!("api-{version}.tar.gz"));
        let opts = CreateOptions {
            service: "api".into(),
            version: version.into(),
            version_id: Some(version_id.into()),
            git_sha: Some(format!("sha-{version}")),
            ..CreateOptions::default()
        };
        lockstep_package::create(&src, &opts, &file).expect("create package");
        let sig = sign::sign_file(&self.key, &file).expect("sign");
        let sig_path = sign::sig_path(&file);
        std::fs::write(&sig_path, sig.to_bytes()).expect("write signature");
        Pkg {
            file,
            sig: sig_path,
        }
    }

    /// `node` fails its health check on `release` (it rolls itself back).
    pub fn sicken(&self, node: &str, release: &str) {
        self.gate
            .lock()
            .expect("gate")
            .sick
            .insert((node.into(), release.into()));
    }

    /// `node`'s health check on `release` answers 503 until [`Fleet::let_go`].
    pub fn hold(&self, node: &str, release: &str) {
        self.gate
            .lock()
            .expect("gate")
            .held
            .insert((node.into(), release.into()));
    }

    /// Ends a [`Fleet::hold`].
    pub fn let_go(&self, node: &str, release: &str) {
        self.gate
            .lock()
            .expect("gate")
            .held
            .remove(&(node.to_string(), release.to_string()));
    }

    /// Starts a rollout of `pkg` (release `version_id`) over the service's live agents
    /// with `settings` (canary, concurrency, …); answers the rollout's JSON.
    pub async fn start_rollout(
        &self,
        registry: &str,
        token: &str,
        version_id: &str,
        pkg: &Pkg,
        settings: serde_json::Value,
    ) -> serde_json::Value {
        let mut request = serde_json::json!({
            "env": "production", "service": "api", "version_id": version_id,
            "poll_secs": 0.1, "timeout_secs": 120,
        });
        if let (Some(r), serde_json::Value::Object(s)) = (request.as_object_mut(), settings) {
            r.extend(s);
        }
        let form = reqwest::multipart::Form::new()
            .text("request", request.to_string())
            .part(
                "package",
                reqwest::multipart::Part::bytes(std::fs::read(&pkg.file).expect("package"))
                    .file_name("package.tar.gz"),
            )
            .part(
                "signature",
                reqwest::multipart::Part::bytes(std::fs::read(&pkg.sig).expect("signature"))
                    .file_name("package.tar.gz.sig"),
            );
        let resp = reqwest::Client::new()
            .post(format!("{registry}/v1/rollouts"))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("send");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 201, "start rollout: {body}");
        body
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.server.abort();
        }
        self.health_server.abort();
    }
}

/// The registry's configuration for these tests: heartbeats every second. An agent
/// re-registers its instance after every apply and rollback (deregistration, then a new
/// heartbeat), and now and then the registry loses that registration until the next
/// heartbeat (seen with the default 10 s: the instance vanished from `/v1/status` that
/// long); at 1 s the tests do not wait on it.
pub fn registry_config() -> lockstep_server::Config {
    lockstep_server::Config {
        heartbeat_interval: Duration::from_secs(1),
        ..lockstep_server::Config::default()
    }
}

/// Waits until every id in `ids` is a live instance of `production/api` with an endpoint
/// in `GET /v1/status`.
pub async fn wait_for_endpoints(registry: &str, token: &str, ids: &[&str]) {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st: serde_json::Value = client
            .get(format!("{registry}/v1/status"))
            .bearer_auth(token)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let with_endpoint: HashSet<String> = st["environments"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|e| e["services"].as_array().into_iter().flatten())
            .flat_map(|s| s["instances"].as_array().into_iter().flatten())
            .filter(|i| i["endpoint"].is_string())
            .filter_map(|i| i["instance_id"].as_str().map(str::to_string))
            .collect();
        if ids.iter().all(|id| with_endpoint.contains(*id)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agents never heartbeated with their endpoints: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /v1/dashboard` until `pred` holds for the rollout `id`'s card; answers it.
pub async fn wait_for_card(
    registry: &str,
    token: &str,
    id: i64,
    within: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + within;
    loop {
        let doc: serde_json::Value = client
            .get(format!("{registry}/v1/dashboard"))
            .bearer_auth(token)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let card = doc["rollouts"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .cloned()
            .unwrap_or_default();
        if pred(&card) {
            return card;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout {id}: {what} did not happen within {within:?}; last card: {card}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
