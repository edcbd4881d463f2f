//! The mirror against a real Redis (`LOCKSTEP_TEST_REDIS`, e.g. `redis://127.0.0.1:6379`):
//! the keys and fields the source system's tooling reads, expiry, removal, SCAN-based resync,
//! and behaviour while Redis is down. Every test works under its own random prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lockstep_core::Instance;
use lockstep_mirror::{
    MARKER_FIELD, MARKER_VALUE, Mirror, MirrorConfig, instance_key, version_key,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;

const TTL: Duration = Duration::from_secs(60);
/// Long enough for a loaded CI machine, short enough that a broken mirror fails quickly.
const DEADLINE: Duration = Duration::from_secs(10);

fn redis_url() -> Option<String> {
    match std::env::var("LOCKSTEP_TEST_REDIS") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipping: LOCKSTEP_TEST_REDIS is not set");
            None
        }
    }
}

fn unique_prefix(base: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{base}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn start(url: &str, prefix: &str) -> Mirror {
    Mirror::start(MirrorConfig {
        url: url.into(),
        prefix: prefix.into(),
        env: "production".into(),
    })
    .expect("mirror starts")
}

fn instance(service: &str, id: &str, secs_ago: i64) -> Instance {
    let now = OffsetDateTime::now_utc();
    Instance {
        git_sha: Some(format!("sha-{service}-{id}")),
        build_date: Some(datetime!(2025-06-01 10:00:00 UTC)),
        host: Some("host-1".into()),
        pid: Some(1000 + id.bytes().map(u32::from).sum::<u32>()),
        started_at: Some(datetime!(2025-06-01 11:00:00 UTC)),
        first_seen: now - time::Duration::minutes(10),
        health: Some("ok".into()),
        ..Instance::new(
            id,
            "production",
            service,
            "v-2025-06-01",
            now - time::Duration::seconds(secs_ago),
        )
    }
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("test connects to Redis")
}

async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(page);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

async fn worker_keys(conn: &mut MultiplexedConnection, prefix: &str) -> BTreeSet<String> {
    scan(conn, &format!("{prefix}:worker:*:version")).await
}

async fn hash(conn: &mut MultiplexedConnection, key: &str) -> BTreeMap<String, String> {
    conn.hgetall(key).await.expect("hgetall")
}

async fn cleanup(conn: &mut MultiplexedConnection, prefix: &str) {
    for key in scan(conn, &format!("{prefix}*")).await {
        let _: () = conn.del(&key).await.expect("del");
    }
}

/// Polls `probe` until `done` holds or the deadline passes; returns the last value so the
/// caller's assertion shows what was there instead of a bare timeout.
async fn eventually<T, Fut>(mut probe: impl FnMut() -> Fut, done: impl Fn(&T) -> bool) -> T
where
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = probe().await;
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn set(keys: &[String]) -> BTreeSet<String> {
    keys.iter().cloned().collect()
}

async fn wait_for_keys(
    conn: &MultiplexedConnection,
    prefix: &str,
    expected: &BTreeSet<String>,
) -> BTreeSet<String> {
    eventually(
        || {
            let mut c = conn.clone();
            async move { worker_keys(&mut c, prefix).await }
        },
        |keys| keys == expected,
    )
    .await
}

async fn holder(conn: &MultiplexedConnection, prefix: &str, service: &str) -> String {
    let mut c = conn.clone();
    hash(&mut c, &version_key(prefix, service))
        .await
        .get("instanceId")
        .cloned()
        .unwrap_or_default()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread")]
async fn single_instance_is_mirrored_to_the_service_hash_with_its_fields_and_ttl() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lstest");
    let mut conn = connect(&url).await;
    let mirror = start(&url, &prefix);

    let mut staging = instance("api", "s1", 0);
    staging.env = "staging".into();
    mirror.upsert(&staging, TTL);
    let api = instance("api", "i1", 5);
    mirror.upsert(&api, TTL);
    let mut bare = instance("bare", "b1", 0);
    bare.git_sha = None;
    bare.build_date = None;
    bare.pid = None;
    bare.started_at = None;
    mirror.upsert(&bare, TTL);

    let expected = set(&[version_key(&prefix, "api"), version_key(&prefix, "bare")]);
    assert_eq!(wait_for_keys(&conn, &prefix, &expected).await, expected);

    let fields = hash(&mut conn, &version_key(&prefix, "api")).await;
    let want: BTreeMap<String, String> = [
        ("gitSha", "sha-api-i1".to_owned()),
        ("buildDate", "2025-06-01T10:00:00Z".to_owned()),
        ("startedAt", "2025-06-01T11:00:00Z".to_owned()),
        ("pid", api.pid.expect("pid").to_string()),
        ("instanceId", "i1".to_owned()),
        (MARKER_FIELD, MARKER_VALUE.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(fields, want);

    let bare_fields = hash(&mut conn, &version_key(&prefix, "bare")).await;
    assert_eq!(bare_fields["gitSha"], "unknown");
    assert!(!bare_fields.contains_key("buildDate"), "{bare_fields:?}");
    assert!(!bare_fields.contains_key("pid"), "{bare_fields:?}");
    assert_eq!(
        bare_fields["startedAt"],
        bare.first_seen.format(&Rfc3339).expect("format")
    );

    // 60 s TTL, last seen 5 s ago: about 55 s left, never the full minute.
    let pttl: i64 = conn.pttl(version_key(&prefix, "api")).await.expect("pttl");
    assert!((45_000..=55_000).contains(&pttl), "pttl {pttl}");

    // A heartbeat refreshes the expiry.
    mirror.upsert(&instance("api", "i1", 0), TTL);
    let pttl = eventually(
        || {
            let mut c = conn.clone();
            let key = version_key(&prefix, "api");
            async move { c.pttl::<_, i64>(key).await.expect("pttl") }
        },
        |pttl| *pttl > 55_000,
    )
    .await;
    assert!(pttl > 55_000 && pttl <= 60_000, "refreshed pttl {pttl}");

    let stats = mirror.stats();
    assert!(
        stats.up && stats.writes > 0 && stats.errors == 0,
        "{stats:?}"
    );
    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_instances_get_per_instance_hashes_and_lose_them_when_one_remains() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lstest");
    let mut conn = connect(&url).await;
    let mirror = start(&url, &prefix);

    mirror.upsert(&instance("api", "a", 2), TTL);
    mirror.upsert(&instance("api", "b", 1), TTL);
    let both = set(&[
        version_key(&prefix, "api"),
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &both).await, both);
    assert_eq!(holder(&conn, &prefix, "api").await, "b");
    let a = hash(&mut conn, &instance_key(&prefix, "api", "a")).await;
    assert_eq!(a["gitSha"], "sha-api-a");
    assert_eq!(a["instanceId"], "a");
    for key in &both {
        let pttl: i64 = conn.pttl(key).await.expect("pttl");
        assert!(pttl > 0, "{key} has no expiry: {pttl}");
    }

    mirror.remove(&instance("api", "a", 0));
    let one = set(&[version_key(&prefix, "api")]);
    assert_eq!(wait_for_keys(&conn, &prefix, &one).await, one);
    assert_eq!(holder(&conn, &prefix, "api").await, "b");

    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_instance_disappears_and_service_hash_moves_to_a_remaining_one() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lstest");
    let mut conn = connect(&url).await;
    let mirror = start(&url, &prefix);

    mirror.upsert(&instance("api", "a", 3), TTL);
    mirror.upsert(&instance("api", "b", 2), TTL);
    mirror.upsert(&instance("api", "c", 1), TTL);
    let all = set(&[
        version_key(&prefix, "api"),
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
        instance_key(&prefix, "api", "c"),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &all).await, all);
    assert_eq!(holder(&conn, &prefix, "api").await, "c");

    mirror.remove(&instance("api", "c", 0));
    let two = set(&[
        version_key(&prefix, "api"),
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &two).await, two);
    assert_eq!(holder(&conn, &prefix, "api").await, "b");

    mirror.remove(&instance("api", "b", 0));
    let one = set(&[version_key(&prefix, "api")]);
    assert_eq!(wait_for_keys(&conn, &prefix, &one).await, one);
    assert_eq!(holder(&conn, &prefix, "api").await, "a");

    mirror.remove(&instance("api", "a", 0));
    assert_eq!(
        wait_for_keys(&conn, &prefix, &BTreeSet::new()).await,
        BTreeSet::new()
    );

    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}

/// Calls of SCAN and KEYS the server has served so far (`INFO commandstats`).
async fn command_calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("info");
    let needle = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_deletes_keys_of_instances_that_are_not_live() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lstest");
    let mut conn = connect(&url).await;

    // Leftovers of an earlier leader (so they carry the marker): more than one SCAN page.
    let mut stray = vec![
        version_key(&prefix, "ghost"),
        instance_key(&prefix, "api", "dead"),
    ];
    stray.extend((0..2500).map(|i| instance_key(&prefix, "old", &format!("i{i}"))));
    let mut pipe = redis::pipe();
    for key in &stray {
        pipe.hset_multiple(key, &[("gitSha", "stale"), (MARKER_FIELD, MARKER_VALUE)])
            .ignore();
    }
    pipe.set(format!("{prefix}:worker:queue"), "a fleet's own key")
        .ignore()
        .set(format!("{prefix}:other"), "not ours")
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.expect("seed");
    assert_eq!(worker_keys(&mut conn, &prefix).await.len(), stray.len());

    let scans_before = command_calls(&mut conn, "scan").await;
    let mirror = start(&url, &prefix);
    let mut staging = instance("api", "s1", 0);
    staging.env = "staging".into();
    mirror.resync(
        vec![
            instance("api", "a", 1),
            instance("api", "b", 2),
            instance("web", "w", 1),
            staging,
        ],
        TTL,
    );

    let live = set(&[
        version_key(&prefix, "api"),
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
        version_key(&prefix, "web"),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &live).await, live);
    assert_eq!(holder(&conn, &prefix, "api").await, "a");
    // Only keys shaped like the mirror's are touched.
    let other: Option<String> = conn.get(format!("{prefix}:other")).await.expect("get");
    assert_eq!(other.as_deref(), Some("not ours"));
    let queue: Option<String> = conn
        .get(format!("{prefix}:worker:queue"))
        .await
        .expect("get");
    assert_eq!(
        queue.as_deref(),
        Some("a fleet's own key"),
        "a key under <prefix>:worker: that is not a version hash is left alone"
    );
    // The leftovers were found by SCAN: 2,500+ keys need several pages of COUNT 1000.
    let scans = command_calls(&mut conn, "scan").await - scans_before;
    assert!(scans >= 3, "only {scans} SCAN calls");
    let stats = eventually(|| async { mirror.stats() }, |s| s.resyncs == 1).await;
    assert_eq!(stats.resyncs, 1, "{stats:?}");

    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verify_script_reading_prefix_worker_star_version_sees_exactly_the_live_instances() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("fiskai");
    let mut conn = connect(&url).await;
    let mirror = start(&url, &prefix);

    let mut live = [
        instance("api", "api-1", 3),
        instance("api", "api-2", 2),
        instance("api", "api-3", 1),
        instance("queue", "queue-1", 1),
        instance("web", "web-1", 2),
    ];
    let leaving = instance("web", "web-2", 1);
    for i in live.iter().chain([&leaving]) {
        mirror.upsert(i, TTL);
    }
    let mut staging = instance("api", "api-9", 0);
    staging.env = "staging".into();
    mirror.upsert(&staging, TTL);
    mirror.remove(&leaving);
    // A later heartbeat of a known instance changes what it reports.
    live[3].git_sha = Some("sha-queue-redeployed".into());
    live[3].pid = Some(777);
    mirror.upsert(&live[3], TTL);

    // What the verify script does: SCAN for the version hashes, HGETALL each.
    let verify = || {
        let mut c = conn.clone();
        let pattern = format!("{prefix}:worker:*:version");
        async move {
            let mut seen = BTreeMap::new();
            for key in scan(&mut c, &pattern).await {
                let h = hash(&mut c, &key).await;
                seen.insert(key, (h["gitSha"].clone(), h["pid"].clone()));
            }
            seen
        }
    };
    let want: BTreeSet<(String, String)> = live
        .iter()
        .map(|i| {
            (
                i.git_sha.clone().expect("sha"),
                i.pid.expect("pid").to_string(),
            )
        })
        .collect();
    let seen = eventually(verify, |seen| {
        seen.values().cloned().collect::<BTreeSet<_>>() == want
            && seen.contains_key(&version_key(&prefix, "web"))
            && !seen.contains_key(&instance_key(&prefix, "web", "web-1"))
    })
    .await;
    assert_eq!(seen.values().cloned().collect::<BTreeSet<_>>(), want);
    // One hash per service, plus one per instance of the service that has several.
    let keys: BTreeSet<String> = seen.keys().cloned().collect();
    let mut expected = set(&[
        version_key(&prefix, "api"),
        version_key(&prefix, "queue"),
        version_key(&prefix, "web"),
    ]);
    for id in ["api-1", "api-2", "api-3"] {
        expected.insert(instance_key(&prefix, "api", id));
    }
    assert_eq!(keys, expected);
    assert_eq!(seen[&version_key(&prefix, "api")].0, "sha-api-api-3");
    assert_eq!(seen[&version_key(&prefix, "web")].0, "sha-web-web-1");

    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}

/// A throwaway `redis-server`, killed when dropped (also when an assertion fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server_on_path() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_never_blocks_callers_and_the_mirror_catches_up_when_it_returns() {
    let Some(_) = redis_url() else { return };
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = unique_prefix("lstest");
    let mirror = start(&url, &prefix);

    let instances: Vec<Instance> = (0..100)
        .map(|i| instance(&format!("svc{}", i % 10), &format!("i{i}"), 1))
        .collect();
    let started = Instant::now();
    for n in 0..10_000 {
        mirror.upsert(&instances[n % instances.len()], TTL);
    }
    let upserts = started.elapsed();
    assert!(
        upserts < Duration::from_millis(50),
        "10,000 upserts took {upserts:?}"
    );

    let stats = eventually(|| async { mirror.stats() }, |s| s.errors >= 2).await;
    assert!(stats.errors >= 2 && !stats.up, "{stats:?}");
    // Coalesced per instance: the queue never holds more than one state per instance.
    assert_eq!(stats.pending, 100, "{stats:?}");

    // Still instant while the writer is failing and backing off.
    let started = Instant::now();
    mirror.remove(&instances[0]);
    mirror.resync(instances[1..].to_vec(), TTL);
    for i in &instances[1..] {
        mirror.upsert(i, TTL);
    }
    let calls = started.elapsed();
    assert!(calls < Duration::from_millis(50), "calls took {calls:?}");

    if !redis_server_on_path() {
        println!("skipping the catch-up half: redis-server is not on PATH");
        mirror.shutdown().await;
        return;
    }
    let _server = spawn_redis_server(port);
    let mut conn = connect_when_up(&url).await;

    let mut expected = BTreeSet::new();
    for i in &instances[1..] {
        expected.insert(version_key(&prefix, &i.service));
        expected.insert(instance_key(&prefix, &i.service, &i.instance_id));
    }
    // The writer may be at the end of its longest backoff (5 s) when the server comes up.
    let keys = eventually(
        || {
            let mut c = conn.clone();
            let prefix = prefix.clone();
            async move { worker_keys(&mut c, &prefix).await }
        },
        |keys| *keys == expected,
    )
    .await;
    assert_eq!(keys, expected);
    let fields = hash(&mut conn, &instance_key(&prefix, "svc5", "i15")).await;
    assert_eq!(fields["gitSha"], "sha-svc5-i15");
    let stats = eventually(|| async { mirror.stats() }, |s| s.up && s.pending == 0).await;
    assert!(
        stats.up && stats.pending == 0 && stats.resyncs == 1,
        "{stats:?}"
    );

    mirror.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_returns_promptly_while_redis_is_down() {
    let Some(_) = redis_url() else { return };
    let mirror = start(
        &format!("redis://127.0.0.1:{}", free_port()),
        &unique_prefix("lstest"),
    );
    mirror.upsert(&instance("api", "a", 0), TTL);
    eventually(|| async { mirror.stats() }, |s| s.errors >= 1).await;

    let started = Instant::now();
    mirror.shutdown().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    // A second call (from another clone) has nothing left to wait for.
    let started = Instant::now();
    mirror.clone().shutdown().await;
    assert!(started.elapsed() < Duration::from_millis(100));
}

fn spawn_redis_server(port: u16) -> Server {
    Server(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server"),
    )
}

async fn connect_when_up(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).expect("url");
    eventually(
        || async { client.get_multiplexed_async_connection().await.ok() },
        Option::is_some,
    )
    .await
    .expect("redis-server accepts connections")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_redis_is_reconnected_to_without_help() {
    let Some(_) = redis_url() else { return };
    if !redis_server_on_path() {
        println!("skipping: redis-server is not on PATH");
        return;
    }
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = unique_prefix("lstest");
    let server = spawn_redis_server(port);
    let conn = connect_when_up(&url).await;
    let mirror = start(&url, &prefix);

    mirror.upsert(&instance("api", "a", 0), TTL);
    let one = set(&[version_key(&prefix, "api")]);
    assert_eq!(wait_for_keys(&conn, &prefix, &one).await, one);

    // The established connection dies with the server; the next write fails.
    drop(server);
    let errors_before = mirror.stats().errors;
    mirror.upsert(&instance("api", "b", 0), TTL);
    let stats = eventually(|| async { mirror.stats() }, |s| s.errors > errors_before).await;
    assert!(stats.errors > errors_before && !stats.up, "{stats:?}");

    // A fresh, empty server on the same port: the queued write lands without anyone asking.
    let _server = spawn_redis_server(port);
    let conn = connect_when_up(&url).await;
    let both = set(&[
        version_key(&prefix, "api"),
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &both).await, both);
    assert_eq!(holder(&conn, &prefix, "api").await, "b");
    assert!(mirror.stats().up);

    mirror.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_the_prefix_that_another_writer_set_keep_their_value_and_ttl() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lstest");
    let mut conn = connect(&url).await;

    // A worker that still registers itself (no marker), on a service the mirror also writes,
    // on one it does not, and a per-instance key; plus a non-hash key shaped like the mirror's.
    let theirs_shared = version_key(&prefix, "api");
    let theirs_alone = version_key(&prefix, "legacy");
    let theirs_instance = instance_key(&prefix, "api", "self-registered");
    let theirs_string = version_key(&prefix, "strings");
    let mut pipe = redis::pipe();
    for key in [&theirs_shared, &theirs_alone, &theirs_instance] {
        pipe.hset_multiple(key, &[("gitSha", "their-sha"), ("pid", "7")])
            .ignore()
            .pexpire(key, 300_000)
            .ignore();
    }
    pipe.set(&theirs_string, "not a hash")
        .ignore()
        .pexpire(&theirs_string, 300_000)
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.expect("seed");

    let mirror = start(&url, &prefix);
    // Two instances of api: the mirror wants the service key and per-instance keys.
    mirror.upsert(&instance("api", "a", 1), TTL);
    mirror.upsert(&instance("api", "b", 2), TTL);
    mirror.upsert(&instance("web", "w", 1), TTL);
    let mine = [
        instance_key(&prefix, "api", "a"),
        instance_key(&prefix, "api", "b"),
        version_key(&prefix, "web"),
    ];
    let mut expected = set(&mine);
    expected.extend([
        theirs_shared.clone(),
        theirs_alone.clone(),
        theirs_instance.clone(),
        theirs_string.clone(),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &expected).await, expected);
    for key in &mine {
        assert_eq!(hash(&mut conn, key).await[MARKER_FIELD], MARKER_VALUE);
    }

    // Its own keys go with their instances; a resync that does not know the others' keys
    // leaves them too.
    mirror.remove(&instance("api", "a", 0));
    mirror.remove(&instance("api", "b", 0));
    mirror.remove(&instance("web", "w", 0));
    mirror.resync(Vec::new(), TTL);
    let theirs = set(&[
        theirs_shared.clone(),
        theirs_alone.clone(),
        theirs_instance.clone(),
        theirs_string.clone(),
    ]);
    assert_eq!(wait_for_keys(&conn, &prefix, &theirs).await, theirs);
    eventually(
        || async { mirror.stats() },
        |s| s.resyncs == 1 && s.pending == 0,
    )
    .await;

    for key in [&theirs_shared, &theirs_alone, &theirs_instance] {
        let fields = hash(&mut conn, key).await;
        let want: BTreeMap<String, String> = [("gitSha", "their-sha"), ("pid", "7")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(fields, want, "{key} was changed");
        let pttl: i64 = conn.pttl(key).await.expect("pttl");
        assert!(pttl > 290_000, "{key}: its TTL was touched ({pttl} ms)");
    }
    let value: String = conn.get(&theirs_string).await.expect("get");
    assert_eq!(value, "not a hash");
    let pttl: i64 = conn.pttl(&theirs_string).await.expect("pttl");
    assert!(pttl > 290_000, "string key TTL touched: {pttl}");

    mirror.shutdown().await;
    cleanup(&mut conn, &prefix).await;
}
