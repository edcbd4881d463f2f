//! Load tool for the benchmark scripts under `bench/`.
//!
//! - `lockstep-load fanout URL TOKEN WATCHERS DEPLOYS`: opens N Server-Sent-Event watchers
//!   on raw sockets (lighter than an HTTP client per connection, so 10,000 fit in one
//!   process) and measures how long each deploy takes to reach the last one; prints
//!   p50/p99/max in milliseconds from the PUT's answer, then the same from the moment the
//!   PUT was sent.
//! - `lockstep-load fanout2 PUT_URL WATCH_URL TOKEN WATCHERS DEPLOYS`: the same, with the
//!   watchers on one registry (e.g. replica B) and the deploys PUT through another (replica
//!   A on the same store), so the figure includes the cross-replica path. Uses a service of
//!   its own per run (`fan2-<pid>`), so runs on one store do not see each other's deploys.
//! - `lockstep-load idle URL TOKEN WATCHERS HOLD_SECS`: opens them and holds them idle so
//!   the registry's memory can be read; prints `connected N`.
//! - `lockstep-load first503 URL TOKEN WORKER_URL SERVICE VERSION_ID DEPLOYS`: against a
//!   running worker on VERSION_ID, alternately registers its release and another one, and
//!   measures the time from the PUT's answer to the worker's first 503.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SERVICE: &str = "fan";

struct Shared {
    connected: AtomicUsize,
    /// Per deploy: how many watchers have it, and the latest arrival.
    arrivals: Vec<Mutex<(usize, Option<Instant>)>>,
}

fn usage() -> ! {
    eprintln!(
        "usage: lockstep-load fanout URL TOKEN WATCHERS DEPLOYS | idle URL TOKEN WATCHERS HOLD_SECS\n\
         \x20      | fanout2 PUT_URL WATCH_URL TOKEN WATCHERS DEPLOYS\n\
         \x20      | first503 URL TOKEN WORKER_URL SERVICE VERSION_ID DEPLOYS"
    );
    std::process::exit(2)
}

async fn watcher(
    addr: String,
    token: String,
    service: String,
    shared: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
) -> std::io::Result<()> {
    // At most a few hundred connects in flight: a burst of 10,000 SYNs overflows the
    // listen backlog and measures the kernel, not the registry.
    let mut permit = Some(gate.acquire_owned().await.map_err(std::io::Error::other)?);
    let mut sock = None;
    for attempt in 0..20u64 {
        match TcpStream::connect(&addr).await {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await,
        }
    }
    let mut sock = sock.ok_or_else(|| std::io::Error::other("could not connect"))?;
    let req = format!(
        "GET /v1/watch?env=production&service={service} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await?;
    let mut lines = BufReader::with_capacity(1024, sock).lines();
    let mut seen_first = false;
    while let Some(line) = lines.next_line().await? {
        let Some(pos) = line.find("\"version_id\":\"fan-") else {
            continue;
        };
        let now = Instant::now();
        if !seen_first {
            seen_first = true;
            shared.connected.fetch_add(1, Ordering::Relaxed);
            permit.take();
        }
        let rest = &line[pos + "\"version_id\":\"fan-".len()..];
        let n: usize = rest
            .split('"')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        if let Some(slot) = shared.arrivals.get(n)
            && let Ok(mut g) = slot.lock()
        {
            g.0 += 1;
            g.1 = Some(g.1.map_or(now, |t: Instant| t.max(now)));
        }
    }
    Ok(())
}

async fn put(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    service: &str,
    n: usize,
) -> reqwest::Result<()> {
    http.put(format!(
        "{url}/v1/envs/production/services/{service}/release"
    ))
    .bearer_auth(token)
    .json(&serde_json::json!({ "version_id": format!("fan-{n}") }))
    .send()
    .await?
    .error_for_status()?;
    Ok(())
}

async fn register(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    service: &str,
    id: &str,
) -> reqwest::Result<()> {
    http.put(format!(
        "{url}/v1/envs/production/services/{service}/release"
    ))
    .bearer_auth(token)
    .json(&serde_json::json!({ "version_id": id }))
    .send()
    .await?
    .error_for_status()?;
    Ok(())
}

/// Polls `worker` until it answers `want`; returns how long after `since` it did.
async fn until_status(
    http: &reqwest::Client,
    worker: &str,
    want: u16,
    since: Instant,
) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = http.get(worker).send().await
            && r.status().as_u16() == want
        {
            return Some(since.elapsed());
        }
    }
    None
}

async fn first503(args: &[String]) {
    let [url, token, worker, service, version, deploys] = args else {
        usage()
    };
    let deploys: usize = deploys.parse().unwrap_or_else(|_| usage());
    let http = reqwest::Client::new();
    let mut lat_ms = Vec::with_capacity(deploys);
    for n in 0..deploys {
        let back = Instant::now();
        if register(&http, url, token, service, version).await.is_err()
            || until_status(&http, worker, 200, back).await.is_none()
        {
            eprintln!("deploy {n}: the worker did not become current again");
            std::process::exit(1);
        }
        if let Err(e) = register(&http, url, token, service, &format!("other-{n}")).await {
            eprintln!("deploy {n} failed: {e}");
            std::process::exit(1);
        }
        let answered = Instant::now();
        match until_status(&http, worker, 503, answered).await {
            Some(d) => lat_ms.push(d.as_secs_f64() * 1000.0),
            None => {
                eprintln!("deploy {n}: no 503 within 10 s");
                std::process::exit(1);
            }
        }
    }
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "deploys {deploys} p50_ms {:.2} p99_ms {:.2} max_ms {:.2}",
        pct(&lat_ms, 0.5),
        pct(&lat_ms, 0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN)
    );
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("first503") => first503(&args[2..]).await,
        Some(mode @ ("fanout" | "idle")) => {
            let [url, token, watchers, last] = &args[2..] else {
                usage()
            };
            let url = url.trim_end_matches('/');
            let kind = if mode == "fanout" {
                Mode::Fanout
            } else {
                Mode::Idle
            };
            fanout(kind, url, url, token, SERVICE, watchers, last).await
        }
        Some("fanout2") => {
            let [put_url, watch_url, token, watchers, deploys] = &args[2..] else {
                usage()
            };
            let service = format!("fan2-{}", std::process::id());
            fanout(
                Mode::Fanout,
                put_url.trim_end_matches('/'),
                watch_url.trim_end_matches('/'),
                token,
                &service,
                watchers,
                deploys,
            )
            .await
        }
        _ => usage(),
    }
}

#[derive(PartialEq, Eq)]
enum Mode {
    Fanout,
    Idle,
}

/// Waits until `url` serves deploy 0 of `service` (another replica may learn it later).
async fn until_served(http: &reqwest::Client, url: &str, token: &str, service: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(r) = http
            .get(format!(
                "{url}/v1/envs/production/services/{service}/release"
            ))
            .bearer_auth(token)
            .send()
            .await
            && let Ok(body) = r.text().await
            && body.contains("\"fan-0\"")
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Opens `watchers` SSE watchers on `watch_url`; for `Mode::Fanout`, PUTs `last` deploys
/// through `put_url` and measures each one's arrival at the last watcher; for `Mode::Idle`
/// holds them `last` seconds.
async fn fanout(
    mode: Mode,
    put_url: &str,
    watch_url: &str,
    token: &str,
    service: &str,
    watchers: &str,
    last: &str,
) {
    let watchers: usize = watchers.parse().unwrap_or_else(|_| usage());
    let last: usize = last.parse().unwrap_or_else(|_| usage());
    let deploys = if mode == Mode::Fanout { last } else { 0 };
    let addr = watch_url.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let shared = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        arrivals: (0..=deploys).map(|_| Mutex::new((0, None))).collect(),
    });
    // Deploy 0 exists before anyone connects: every watcher gets it as its first event.
    if let Err(e) = put(&http, put_url, token, service, 0).await {
        eprintln!("initial registration failed: {e}");
        std::process::exit(1);
    }
    if watch_url != put_url && !until_served(&http, watch_url, token, service).await {
        eprintln!("{watch_url} did not serve the initial registration within 10 s");
        std::process::exit(1);
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let failed = Arc::new(AtomicUsize::new(0));
    for _ in 0..watchers {
        let (addr, token, service, shared, gate, failed) = (
            addr.clone(),
            token.to_string(),
            service.to_string(),
            shared.clone(),
            gate.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            if watcher(addr, token, service, shared, gate).await.is_err()
                && failed.fetch_add(1, Ordering::Relaxed) == 0
            {
                eprintln!(
                    "a watcher connection failed (further failures are counted, not printed)"
                );
            }
        });
    }
    let start = Instant::now();
    while shared.connected.load(Ordering::Relaxed) < watchers {
        if start.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "only {} of {watchers} watchers connected ({} failed)",
                shared.connected.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "connected {watchers} in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    if mode == Mode::Idle {
        tokio::time::sleep(Duration::from_secs(last as u64)).await;
        return;
    }
    let mut lat_ms = Vec::with_capacity(deploys);
    let mut sent_ms = Vec::with_capacity(deploys);
    for n in 1..=deploys {
        let sent = Instant::now();
        if let Err(e) = put(&http, put_url, token, service, n).await {
            eprintln!("deploy {n} failed: {e}");
            std::process::exit(1);
        }
        let answered = Instant::now();
        let deadline = answered + Duration::from_secs(10);
        loop {
            let (count, latest) = shared.arrivals[n].lock().map(|g| *g).unwrap_or((0, None));
            if count >= watchers {
                let latest = latest.unwrap_or(answered);
                let l = latest.saturating_duration_since(answered);
                lat_ms.push(l.as_secs_f64() * 1000.0);
                sent_ms.push(latest.duration_since(sent).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                eprintln!("deploy {n}: only {count} of {watchers} watchers got it within 10 s");
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    sent_ms.sort_by(|a, b| a.total_cmp(b));
    // Fields 6/8/10: from the PUT's answer (what the scripts report); 12/14/16: from the
    // moment the PUT was sent, so including the PUT's own round-trip and commit (an event
    // that reaches every watcher before the answer reaches us counts 0 in the first set).
    println!(
        "deploys {deploys} watchers {watchers} p50_ms {:.2} p99_ms {:.2} max_ms {:.2} \
         sent_p50_ms {:.2} sent_p99_ms {:.2} sent_max_ms {:.2}",
        pct(&lat_ms, 0.5),
        pct(&lat_ms, 0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN),
        pct(&sent_ms, 0.5),
        pct(&sent_ms, 0.99),
        sent_ms.last().copied().unwrap_or(f64::NAN)
    );
}
