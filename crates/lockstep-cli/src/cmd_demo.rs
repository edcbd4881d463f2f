//! `lockstep demo`: a self-contained walk-through in a few seconds — a registry on a
//! temporary SQLite store, three HTTP workers, a deploy that leaves one worker behind, that
//! worker refusing requests with 503 and showing as `[STALE]`, and its recovery.
//!
//! Everything runs inside this one process: the workers are the same stack a Rust worker
//! links (`Watcher`, `HeartbeatTask`, `VersionCheckLayer` on axum), each on its own
//! loopback port, so a `cargo install`ed `lockstep` needs nothing beside it. What the demo
//! needs (a temporary directory, a loopback port) is checked before the first step is
//! printed. Everything it starts, it stops; the temporary store is removed.

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use clap::Args;
use lockstep_api::PutRelease;
use lockstep_client::{HeartbeatTask, RegistryClient, VersionCheckLayer, Watcher, WatcherConfig};
use lockstep_core::{Release, Role, short_id};
use lockstep_server::{Config, Registry};
use lockstep_store::SqliteStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cmd_fleet::print_verdict_lines;
use crate::exit::{self, fail};

const SERVICE: &str = "demo-api";
const ENV: &str = "development";

/// `lockstep demo`.
#[derive(Args)]
#[command(after_help = "\
Needs nothing but this binary: the registry and the three workers run inside it, on loopback
ports, with a temporary store that is removed afterwards.

Example:
  lockstep demo")]
pub struct DemoArgs {}

/// An HTTP worker running inside the demo: served by axum behind `VersionCheckLayer`,
/// heartbeating and watching like any linked worker.
struct Worker {
    name: &'static str,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    beats: Option<HeartbeatTask>,
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

async fn start_worker(
    name: &'static str,
    registry: &str,
    token: &str,
    version_id: &str,
) -> anyhow::Result<Worker> {
    let mut cfg = WatcherConfig::new(registry, SERVICE, version_id);
    cfg.token = Some(token.to_string());
    cfg.env = ENV.to_string();
    let watcher = Watcher::start(cfg.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port for a worker")?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut hb = lockstep_client::heartbeat_for(&cfg, None, std::process::id(), Some(url.clone()));
    // Unique per start, named for the worker: a restarted worker is a new instance.
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    hb.instance_id = format!("{name}-{}", &suffix[..4]);
    hb.health = Some("ok".into());
    let beats = HeartbeatTask::spawn(
        RegistryClient::new(registry, Some(token.to_string()))?,
        hb,
        Some(watcher.clone()),
    );
    let app = Router::new()
        .route("/", get(|| async { "hello from a lockstep worker\n" }))
        .layer(VersionCheckLayer::new(watcher));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    println!("   {name} on {url} runs {}", short_id(version_id));
    Ok(Worker {
        name,
        url,
        stop: Some(tx),
        server,
        beats: Some(beats),
    })
}

/// Stops serving and deregisters, as a worker does on SIGTERM.
async fn stop(w: &mut Worker) {
    if let Some(tx) = w.stop.take() {
        let _ = tx.send(());
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut w.server).await;
    if let Some(b) = w.beats.take() {
        b.shutdown().await;
    }
}

async fn hit(http: &reqwest::Client, w: &Worker) -> anyhow::Result<()> {
    let resp = http.get(&w.url).send().await?;
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await?;
    match retry {
        Some(r) => println!(
            "   GET {} → {} (Retry-After: {r}) {}",
            w.name,
            status,
            body.trim()
        ),
        None => println!("   GET {} → {} {}", w.name, status, body.trim()),
    }
    Ok(())
}

async fn verify(client: &RegistryClient) -> anyhow::Result<()> {
    let report = client.status(None, Some(SERVICE)).await?;
    let rules = lockstep_client::verify::Rules::default();
    print_verdict_lines(&lockstep_client::verify::verify(&report, &rules).lines);
    Ok(())
}

/// Waits until the registry shows `n` live instances of the demo service on `version_id`.
async fn until_fleet(
    client: &RegistryClient,
    n: usize,
    version_id: &str,
    on: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = client.status(None, Some(SERVICE)).await?;
        let count = report
            .environments
            .iter()
            .flat_map(|e| &e.services)
            .flat_map(|s| &s.instances)
            .filter(|i| (i.instance.version_id == version_id) == on)
            .count();
        if count == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(exit::FAILED, "the fleet did not settle within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(client: &RegistryClient, id: &str, version: &str) -> anyhow::Result<()> {
    let mut release = Release::new(id);
    release.version = Some(version.to_string());
    let r = client
        .put_release(
            ENV,
            SERVICE,
            &PutRelease {
                release,
                force: false,
            },
        )
        .await?;
    println!(
        "   registered {version} ({}) as revision {}",
        short_id(id),
        r.revision
    );
    Ok(())
}

async fn walkthrough(registry_url: &str, admin: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = RegistryClient::new(registry_url, Some(admin.to_string()))?;
    let worker_token = client
        .create_token("demo-workers", Role::Worker)
        .await?
        .token;
    let http = reqwest::Client::new();
    let v1 = uuid::Uuid::new_v4().to_string();
    let v2 = uuid::Uuid::new_v4().to_string();

    step(2, "Deploy v1: register it, start three workers running it");
    register(&client, &v1, "v1").await?;
    let mut workers = Vec::new();
    for name in ["worker-a", "worker-b", "worker-c"] {
        workers.push(start_worker(name, registry_url, &worker_token, &v1).await?);
    }
    until_fleet(&client, 3, &v1, true).await?;
    for w in &workers {
        hit(&http, w).await?;
    }

    step(
        3,
        "Deploy v2: worker-a and worker-b restart on v2; worker-c misses the update",
    );
    for w in workers.iter_mut().take(2) {
        stop(w).await;
    }
    let c = workers.pop().context("three workers")?;
    let mut fresh = Vec::new();
    for name in ["worker-a", "worker-b"] {
        fresh.push(start_worker(name, registry_url, &worker_token, &v2).await?);
    }
    let t = Instant::now();
    register(&client, &v2, "v2").await?;
    fresh.push(c);
    let mut workers = fresh;

    step(
        4,
        "worker-c still runs v1: it refuses requests instead of serving old logic",
    );
    let stale = &workers[2];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = http.get(&stale.url).send().await?;
        if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            println!(
                "   worker-c learned it is stale {} ms after the registration",
                t.elapsed().as_millis()
            );
            break;
        }
        if Instant::now() > deadline {
            return Err(fail(
                exit::FAILED,
                "worker-c did not notice the deploy within 5 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in &workers {
        hit(&http, w).await?;
    }
    until_fleet(&client, 2, &v2, true).await?;
    println!("   lockstep verify says:");
    verify(&client).await?;

    step(5, "Recover: worker-c restarts on v2");
    let mut c = workers.pop().context("worker-c")?;
    stop(&mut c).await;
    workers.push(start_worker("worker-c", registry_url, &worker_token, &v2).await?);
    until_fleet(&client, 0, &v2, false).await?;
    until_fleet(&client, 3, &v2, true).await?;
    for w in &workers {
        hit(&http, w).await?;
    }
    println!("   lockstep verify says:");
    verify(&client).await?;

    step(6, "Clean up");
    for w in workers.iter_mut() {
        stop(w).await;
    }
    println!("   done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the demo. What it needs is acquired before the first step is printed, so a
/// machine that cannot run it says why up front.
pub async fn run(_a: DemoArgs) -> anyhow::Result<u8> {
    let dir = tempfile::tempdir().map_err(|e| {
        fail(
            exit::USAGE,
            format!("the demo needs a temporary directory (set TMPDIR to a writable one): {e}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(exit::USAGE, format!("the demo needs a loopback port: {e}")))?;
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(exit::USAGE, format!("the demo needs loopback ports: {e}")))?;
    let store = SqliteStore::open(dir.path())
        .await
        .context("opening the demo's temporary store")?;
    let registry = Registry::open(Arc::new(store), Config::default(), None).await?;
    let admin = registry
        .generated_admin_token
        .clone()
        .context("a fresh store gets a token")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(registry.serve(listener, async {
        let _ = stop_rx.await;
    }));
    step(
        1,
        &format!(
            "A registry on {url} with a temporary SQLite store in {}",
            dir.path().display()
        ),
    );
    let result = tokio::select! {
        r = walkthrough(&url, &admin) => r,
        _ = tokio::signal::ctrl_c() => Err(fail(exit::FAILED, "interrupted; cleaned up")),
    };
    let _ = stop_tx.send(());
    let _ = server.await;
    drop(dir);
    result.map(|()| exit::OK)
}
