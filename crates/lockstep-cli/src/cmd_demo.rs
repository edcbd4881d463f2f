//! `lockstep demo`: a self-contained walk-through in under 30 seconds — a registry on a
//! temporary SQLite store, three `axum-worker`s, a deploy that leaves one worker behind,
//! that worker refusing requests with 503 and showing as `[STALE]`, and its recovery.
//! Everything it starts, it stops; the temporary store is removed.

use anyhow::Context;
use clap::Args;
use lockstep_api::PutRelease;
use lockstep_client::RegistryClient;
use lockstep_core::{Release, Role, short_id};
use lockstep_server::{Config, Registry};
use lockstep_store::SqliteStore;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cmd_fleet::print_verdict_lines;
use crate::exit::{self, fail};

const SERVICE: &str = "demo-api";

/// `lockstep demo`.
#[derive(Args)]
#[command(after_help = "\
Needs the example workers built next to lockstep (cargo build --workspace).

Example:
  cargo build --workspace && target/debug/lockstep demo")]
pub struct DemoArgs {}

struct Worker {
    name: &'static str,
    url: String,
    child: Child,
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(format!("axum-worker{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        Err(fail(
            exit::USAGE,
            format!(
                "{} not found: build the examples first (cargo build --workspace)",
                path.display()
            ),
        ))
    }
}

async fn start_worker(
    bin: &PathBuf,
    name: &'static str,
    registry: &str,
    token: &str,
    version_id: &str,
) -> anyhow::Result<Worker> {
    let mut child = Command::new(bin)
        .env("LOCKSTEP_REGISTRY", registry)
        .env("LOCKSTEP_TOKEN", token)
        .env("LOCKSTEP_SERVICE", SERVICE)
        .env("LOCKSTEP_ENV", "development")
        .env("LOCKSTEP_VERSION_ID", version_id)
        .env("HOSTNAME", name)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = child.stdout.take().context("worker stdout")?;
    let mut first = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(out).read_line(&mut first),
    )
    .await
    .context("the worker did not start within 10 s")??;
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .context("unexpected worker output")?
        .to_string();
    println!("   {name} on {url} runs {}", short_id(version_id));
    Ok(Worker { name, url, child })
}

async fn stop(w: &mut Worker) {
    // SIGTERM lets it deregister; kill_on_drop is the backstop.
    if let Some(pid) = w.child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
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
            "development",
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
    let bin = worker_binary()?;
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
        workers.push(start_worker(&bin, name, registry_url, &worker_token, &v1).await?);
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
        fresh.push(start_worker(&bin, name, registry_url, &worker_token, &v2).await?);
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
    workers.push(start_worker(&bin, "worker-c", registry_url, &worker_token, &v2).await?);
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

/// Runs the demo.
pub async fn run(_a: DemoArgs) -> anyhow::Result<u8> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path()).await?;
    let registry = Registry::open(Arc::new(store), Config::default(), None).await?;
    let admin = registry
        .generated_admin_token
        .clone()
        .context("a fresh store gets a token")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
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
