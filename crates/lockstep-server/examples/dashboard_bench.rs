//! Figures of the dashboard (docs/benchmarks.md, "Dashboard"): with 1,000 and 300,000
//! instances, the cost of `GET /v1/dashboard`'s first page, and the time from navigation
//! start to the first full render of the page in headless Chromium.
//!
//! Run through `bench/dashboard.sh` (release build). Instances are fed in-process through
//! the registry service (the same call a heartbeat makes) so that seeding 300,000 takes
//! seconds; everything measured goes over loopback HTTP like a real browser's requests.

#[path = "../tests/support/mod.rs"]
mod support;

use lockstep_server::{Config, Registry};
use lockstep_store::SqliteStore;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::browser::Browser;

const ADMIN: &str = "lst_bench_admin_token_0123456789abcdef0123456789abcdef012345678";
const ENVS: [&str; 2] = ["production", "staging"];
const SERVICES: usize = 10;

struct Row {
    instances: usize,
    api_median: Duration,
    api_p95: Duration,
    bytes: usize,
    render_median: Duration,
    render_max: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn measure(n: usize, browser: &Browser) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).await.expect("store");
    let config = Config {
        // Nothing goes missing while the figures are taken.
        instance_ttl: Duration::from_secs(3600),
        ..Config::default()
    };
    let registry = Registry::open(Arc::new(store), config, Some(ADMIN))
        .await
        .expect("registry");
    let svc = registry.service().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(registry.serve(listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    for env in ENVS {
        for s in 0..SERVICES {
            let resp = http
                .put(format!("{url}/v1/envs/{env}/services/svc-{s}/release"))
                .bearer_auth(ADMIN)
                .json(&json!({"version_id": format!("{s:02}aa0000-new")}))
                .send()
                .await
                .expect("register");
            assert!(resp.status().is_success());
        }
    }
    for i in 0..n {
        let env = ENVS[i % ENVS.len()];
        let s = (i / ENVS.len()) % SERVICES;
        // One in twenty still runs the previous release: stale.
        let version = if i % 20 == 0 {
            format!("{s:02}bb0000-old")
        } else {
            format!("{s:02}aa0000-new")
        };
        let hb = serde_json::from_value(json!({
            "instance_id": format!("{env}-svc-{s}-{i:06}"), "env": env,
            "service": format!("svc-{s}"), "version_id": version, "host": format!("node-{}", i % 500),
        }))
        .expect("heartbeat");
        svc.heartbeat(hb).expect("heartbeat");
    }
    svc.flush().await;

    // The data endpoint, as the page asks for it (first page of 60).
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..21 {
        let t = Instant::now();
        let body = http
            .get(format!("{url}/v1/dashboard?page=1&per_page=60"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("dashboard")
            .bytes()
            .await
            .expect("body");
        times.push(t.elapsed());
        bytes = body.len();
    }
    times.sort();

    // First full render: sign in once, then open the page fresh five times.
    let b = &browser.client;
    b.goto(&format!("{url}/")).await.expect("open");
    // Cookies ignore ports: the previous size's session would still be there.
    b.delete_all_cookies().await.expect("clear cookies");
    b.goto(&format!("{url}/")).await.expect("open");
    b.wait()
        .for_element(fantoccini::Locator::Css("#token"))
        .await
        .expect("form")
        .send_keys(ADMIN)
        .await
        .expect("type");
    b.find(fantoccini::Locator::Css("#sign-in"))
        .await
        .expect("button")
        .click()
        .await
        .expect("sign in");
    let mut renders = Vec::new();
    for _ in 0..5 {
        b.goto(&format!("{url}/")).await.expect("open");
        browser
            .until(
                "Boolean(document.body.dataset.firstRenderMs)",
                Duration::from_secs(30),
            )
            .await
            .expect("rendered");
        let cells = browser
            .eval("document.querySelectorAll('#grid .cell').length")
            .await;
        assert_eq!(cells, json!(60.min(n)), "a full first page");
        let v = browser
            .eval("Number(document.body.dataset.firstRenderMs)")
            .await;
        renders.push(Duration::from_millis(v.as_u64().unwrap_or(0)));
    }
    renders.sort();
    let _ = stop.send(());
    let _ = server.await;
    Row {
        instances: n,
        api_median: times[times.len() / 2],
        api_p95: times[times.len() * 95 / 100],
        bytes,
        render_median: renders[renders.len() / 2],
        render_max: renders[renders.len() - 1],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Some(why) = support::browser::missing() {
        eprintln!("dashboard bench {why}");
        std::process::exit(2);
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 300_000]
    } else {
        sizes
    };
    let browser = Browser::start(1280, 1000).await;
    let mut rows = Vec::new();
    for n in sizes {
        eprintln!("measuring with {n} instances…");
        rows.push(measure(n, &browser).await);
    }
    browser.close().await;
    println!(
        "| instances | GET /v1/dashboard first page, median | p95 | bytes | first full render in headless Chromium, median of 5 | max |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.instances,
            ms(r.api_median),
            ms(r.api_p95),
            r.bytes,
            ms(r.render_median),
            ms(r.render_max)
        );
    }
}
