//! Fleet rollouts with real processes on loopback: a real `serve` drives real update agents
//! (each supervising a trivial Python worker) through `lockstep rollout start|watch`:
//! canary then batches, a failing canary stopping everything, the failure threshold
//! rolling every updated node back byte for byte, a release that is not rollback-safe
//! freezing with a critical alert, abort then retry, and `rollback --now`.

mod support;

use lockstep_package::SigningKey;
use lockstep_testkit::{ADMIN_TOKEN, ServeProcess, lockstep_bin};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::agents::*;

/// A registry, `n` agents heartbeating to it (service `api`), every node on `v1`.
struct Fleet {
    work: tempfile::TempDir,
    serve: ServeProcess,
    agents: Vec<AgentProc>,
    roots: Vec<PathBuf>,
    key: SigningKey,
    v1: Pkg,
}

impl Fleet {
    async fn start(n: usize) -> Fleet {
        let work = tempfile::tempdir().expect("tempdir");
        let serve = ServeProcess::spawn(
            &lockstep_bin(),
            &work.path().join("data"),
            &["--agent-token", TOKEN, "--instance-ttl", "30s"],
            &[],
        );
        Fleet::with_serve(work, serve, n).await
    }

    /// `n` agents on v1 around an already started `serve`.
    async fn with_serve(work: tempfile::TempDir, serve: ServeProcess, n: usize) -> Fleet {
        let (key, public) = keypair(work.path());
        let pubkey = public.display().to_string();
        let v1 = package(work.path(), &key, "v1", true);
        let client = serve.client(ADMIN_TOKEN);
        let mut rel = lockstep_core::Release::new("id-v1");
        rel.version = Some("v1".into());
        client
            .put_release(
                "production",
                "api",
                &lockstep_api::PutRelease {
                    release: rel,
                    force: false,
                },
            )
            .await
            .expect("register v1");
        let mut agents = Vec::new();
        let mut roots = Vec::new();
        for i in 0..n {
            let root = work.path().join(format!("node-{i}"));
            let port = free_port().to_string();
            let health = format!("http://127.0.0.1:{port}/health");
            let args = vec![
                "--trusted-key",
                &pubkey,
                "--token",
                TOKEN,
                "--health-url",
                &health,
                "--health-timeout",
                // Room for a Python worker to start on a loaded machine (the tests run
                // side by side, each with its own fleet); a sick node takes this long.
                "8s",
                "--grace",
                "1s",
                "--service",
                "api",
                "--registry",
                &serve.url,
                "--registry-token",
                ADMIN_TOKEN,
                "--run",
                "--",
                "python3",
                "worker.py",
                &port,
            ];
            agents.push(AgentProc::spawn(&root, &args, &[]));
            roots.push(root);
        }
        let applies = agents.iter().map(|a| {
            let c = a.client();
            let (file, sig) = (v1.file.clone(), v1.sig.clone());
            async move {
                c.upload("id-v1", &file, Some(&sig))
                    .await
                    .expect("upload v1");
                c.apply("id-v1").await.expect("apply v1");
            }
        });
        futures_util::future::join_all(applies).await;
        let fleet = Fleet {
            work,
            serve,
            agents,
            roots,
            key,
            v1,
        };
        // Every agent heartbeats with its endpoint.
        let want = n;
        let ok = lockstep_testkit::eventually(Duration::from_secs(20), || {
            let c = fleet.serve.client(ADMIN_TOKEN);
            async move {
                let st = c.status(Some("production"), Some("api")).await.ok()?;
                let n = st
                    .environments
                    .iter()
                    .flat_map(|e| &e.services)
                    .flat_map(|s| &s.instances)
                    .filter(|i| i.instance.endpoint.is_some())
                    .count();
                (n == want).then_some(())
            }
        })
        .await;
        assert!(ok.is_some(), "the agents did not all heartbeat");
        fleet
    }

    fn urls(&self) -> String {
        self.agents
            .iter()
            .map(|a| a.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `lockstep ARGS…` against the registry: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(lockstep_bin())
            .args(args)
            .env("LOCKSTEP_REGISTRY", &self.serve.url)
            .env("LOCKSTEP_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .output()
            .expect("run lockstep");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `rollout start` with `extra` flags; answers the rollout id (its last line).
    fn start_rollout(&self, pkg: &Pkg, extra: &[&str]) -> String {
        let file = pkg.file.display().to_string();
        let sig = pkg.sig.display().to_string();
        let mut args = vec![
            "rollout",
            "start",
            "--service",
            "api",
            "--package",
            &file,
            "--signature",
            &sig,
            "--poll",
            "200ms",
            "--timeout",
            "30s",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = self.cli(&args);
        let agents: Vec<String> = self.agents.iter().map(AgentProc::logs).collect();
        assert_eq!(
            code,
            0,
            "rollout start failed: {out}\n{err}\n{}\n{agents:?}",
            self.serve.logs()
        );
        out.lines().last().expect("an id").trim().to_string()
    }

    fn watch(&self, id: &str) -> (i32, serde_json::Value) {
        let (code, out, err) = self.cli(&["rollout", "watch", id, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("watch -o json: {e}: {out}\n{err}"));
        (code, v)
    }

    async fn versions(&self) -> Vec<Option<String>> {
        let mut out = Vec::new();
        for a in &self.agents {
            out.push(a.client().version().await.expect("version").version_id);
        }
        out
    }

    async fn events(&self) -> Vec<lockstep_api::Event> {
        self.serve
            .client(ADMIN_TOKEN)
            .events(0, 1000)
            .await
            .expect("events")
            .events
    }

    async fn expected(&self) -> lockstep_core::StoredRelease {
        self.serve
            .client(ADMIN_TOKEN)
            .release("production", "api")
            .await
            .expect("release")
            .expect("some")
    }
}

fn node_events<'a>(evs: &'a [lockstep_api::Event], node: &str) -> Vec<&'a str> {
    evs.iter()
        .filter(|e| e.kind.starts_with("worker_") && e.data["node"] == node)
        .map(|e| e.kind.as_str())
        .collect()
}

fn node_ids(v: &serde_json::Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["instance_id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_agents_canary_first_then_batches_of_two_all_updated_verify_ok_and_the_summary_line() {
    let fleet = Fleet::start(6).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    // No --agents: every live instance of the service with an endpoint.
    let id = fleet.start_rollout(&v2, &["--canary", "1", "--concurrency", "2"]);
    let (code, out, err) = fleet.cli(&["rollout", "watch", &id]);
    assert_eq!(code, 0, "watch: {out}\n{err}\n{}", fleet.serve.logs());
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Rollout completed: 6/6 successful (100.0%), 0 failed, 0 skipped in "),
        "summary line: {last:?}"
    );
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 6]);
    let expected = fleet.expected().await;
    assert_eq!(expected.release.version_id, "id-v2");
    assert!(
        expected.release.accepts.is_empty(),
        "the previous release is no longer accepted once the rollout completed"
    );
    // verify: every instance reports the expected release.
    let mut verified = false;
    for _ in 0..50 {
        let (code, _, _) = fleet.cli(&["verify", "--service", "api"]);
        if code == 0 {
            verified = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        verified,
        "verify never passed: {:?}",
        fleet.cli(&["verify", "--service", "api"])
    );

    let (_, v) = fleet.watch(&id);
    let nodes = node_ids(&v);
    let evs = fleet.events().await;
    for n in &nodes {
        assert_eq!(
            node_events(&evs, n),
            vec![
                "worker_update_started",
                "worker_version_checked",
                "worker_backup_created",
                "worker_update_completed"
            ],
            "events of {n} in order"
        );
    }
    // The canary finished before any other node started; never more than 2 at once.
    let canary_done = evs
        .iter()
        .find(|e| e.kind == "worker_update_completed" && e.data["node"] == nodes[0].as_str())
        .expect("canary completed")
        .id;
    let mut busy = 0i32;
    for e in &evs {
        match e.kind.as_str() {
            "worker_update_started" => {
                if e.data["node"] != nodes[0].as_str() {
                    assert!(
                        e.id > canary_done,
                        "a batch node started before the canary finished"
                    );
                }
                busy += 1;
                assert!(busy <= 2, "more than 2 nodes updating at once");
            }
            "worker_update_completed" => busy -= 1,
            _ => {}
        }
    }
    for e in evs.iter().filter(|e| e.kind.starts_with("worker_")) {
        assert_eq!(
            e.data["rollout_id"].to_string(),
            id,
            "every event names the rollout"
        );
    }
    let metrics = reqwest::get(format!("{}/metrics", fleet.serve.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("lockstep_rollouts_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lockstep_rollout_node_update_seconds_count 6"),
        "{metrics}"
    );
    // A second rollout of the service while none runs is fine; two at once are refused.
    let v3 = package(fleet.work.path(), &fleet.key, "v3", true);
    let first = fleet.start_rollout(&v3, &["--canary", "1"]);
    let file = v3.file.display().to_string();
    let (code, _, err) = fleet.cli(&["rollout", "start", "--service", "api", "--package", &file]);
    assert_ne!(code, 0);
    assert!(
        err.contains("409"),
        "a second running rollout is refused with 409: {err}"
    );
    let (code, _, _) = fleet.cli(&["rollout", "watch", &first]);
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_touches_no_other_node_and_the_previous_release_is_expected_again() {
    let fleet = Fleet::start(6).await;
    let sick = package(fleet.work.path(), &fleet.key, "v2", false);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &sick,
        &["--agents", &urls, "--canary", "1", "--concurrency", "2"],
    );
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "a rolled-back rollout exits 1: {v}");
    assert_eq!(v["phase"], "rolled_back");
    let summary = v["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with(
            "Rollout rolled back: 0/6 successful (0.0%), 0 failed, 5 skipped, 1 rolled back in "
        ),
        "{summary}"
    );
    assert_eq!(fleet.versions().await, vec![Some("id-v1".to_string()); 6]);
    for a in &fleet.agents[1..] {
        let info = a.client().version().await.expect("version");
        assert!(
            !info.releases.contains(&"id-v2".to_string()),
            "node {} was touched",
            a.url
        );
    }
    let evs = fleet.events().await;
    for n in &node_ids(&v)[1..] {
        assert!(node_events(&evs, n).is_empty(), "{n} has events");
    }
    assert_eq!(
        node_events(&evs, &node_ids(&v)[0]),
        vec![
            "worker_update_started",
            "worker_version_checked",
            "worker_backup_created",
            "worker_rollback_started",
            "worker_rollback_completed"
        ]
    );
    assert_eq!(fleet.expected().await.release.version_id, "id-v1");
    for root in &fleet.roots {
        assert_eq!(snapshot(&root.join("current")), snapshot(&fleet.v1.src));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_failures_every_updated_node_is_rolled_back_byte_for_byte() {
    let fleet = Fleet::start(6).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    // Nodes 3 and 4 fail their health check on v2.
    for i in [3, 4] {
        std::fs::write(fleet.roots[i].join("sick-v2"), "x").expect("write");
    }
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &[
            "--agents",
            &urls,
            "--canary",
            "1",
            "--concurrency",
            "2",
            "--max-failures",
            "1",
        ],
    );
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["phase"], "rolled_back", "{v}");
    for (i, root) in fleet.roots.iter().enumerate() {
        assert_eq!(current_id(root), "id-v1", "node {i}");
        assert_eq!(
            snapshot(&root.join("current")),
            snapshot(&fleet.v1.src),
            "node {i} is back on v1 byte for byte"
        );
    }
    assert_eq!(fleet.versions().await, vec![Some("id-v1".to_string()); 6]);
    let nodes = v["nodes"].as_array().expect("nodes");
    for i in [0, 1, 2] {
        assert_eq!(
            nodes[i]["step"], "rolled_back",
            "updated node {i} rolled back: {v}"
        );
    }
    assert_eq!(fleet.expected().await.release.version_id, "id-v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_not_rollback_safe_freezes_with_a_critical_alert_and_a_retry_updates_only_the_rest()
 {
    let fleet = Fleet::start(4).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    std::fs::write(fleet.roots[2].join("sick-v2"), "x").expect("write");
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &[
            "--agents",
            &urls,
            "--canary",
            "1",
            "--concurrency",
            "1",
            "--rollback-safe",
            "false",
        ],
    );
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["phase"], "frozen", "{v}");
    let steps: Vec<&str> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["step"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(steps, vec!["updated", "updated", "failed", "pending"]);
    let evs = fleet.events().await;
    assert!(
        !evs.iter().any(|e| e.kind == "worker_rollback_started"),
        "nothing is rolled back"
    );
    assert_eq!(current_id(&fleet.roots[0]), "id-v2", "what runs is kept");
    assert_eq!(current_id(&fleet.roots[1]), "id-v2");
    let alerts = fleet
        .serve
        .client(ADMIN_TOKEN)
        .alerts("open", None, Some("api"), 100)
        .await
        .expect("alerts");
    let a = alerts
        .alerts
        .iter()
        .find(|a| a.message.contains(&format!("rollout {id}")))
        .unwrap_or_else(|| panic!("a freeze alert: {:?}", alerts.alerts));
    assert_eq!(a.severity, lockstep_core::Severity::Critical);
    assert!(a.message.contains("id-v2"), "{}", a.message);
    let failed_node = v["nodes"][2]["instance_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(a.message.contains(&failed_node), "{}", a.message);

    // A person fixes the node and retries: only the nodes not on v2 are updated.
    std::fs::remove_file(fleet.roots[2].join("sick-v2")).expect("rm");
    let (code, out, err) = fleet.cli(&["rollout", "retry", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "{v}");
    let attempts: Vec<i64> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["attempts"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        attempts,
        vec![1, 1, 2, 1],
        "updated nodes are not updated again"
    );
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 4]);
    let evs = fleet.events().await;
    for n in &node_ids(&v)[..2] {
        assert_eq!(
            node_events(&evs, n)
                .iter()
                .filter(|k| **k == "worker_update_started")
                .count(),
            1,
            "{n} updated once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_now_during_a_rollout_of_ten_agents_rolls_every_node_back_at_once() {
    let fleet = Fleet::start(10).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &["--agents", &urls, "--canary", "1", "--concurrency", "1"],
    );
    // Wait until a few nodes run v2.
    let mut updated = 0;
    for _ in 0..300 {
        updated = fleet
            .versions()
            .await
            .iter()
            .filter(|v| v.as_deref() == Some("id-v2"))
            .count();
        if updated >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(updated >= 3, "the rollout did not progress");
    let (code, out, err) = fleet.cli(&["rollback", "--now", "--service", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["phase"], "aborted", "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v1".to_string()); 10]);
    assert_eq!(fleet.expected().await.release.version_id, "id-v1");
    let evs = fleet.events().await;
    let rb: Vec<_> = evs
        .iter()
        .filter(|e| e.kind == "worker_rollback_started")
        .collect();
    assert!(rb.len() >= 3, "{rb:?}");
    assert!(rb.iter().all(|e| e.data["emergency"] == true));
    // No canary phase after the emergency: no update starts once rolling back began.
    let first_rb = rb[0].id;
    assert!(
        !evs.iter()
            .any(|e| e.kind == "worker_update_started" && e.id > first_rb),
        "an update started after the emergency rollback"
    );
}

/// Lines of an agent's log saying an apply of `version` really started (an apply of the
/// release already running answers `unchanged` without one).
fn applies_of(agent: &AgentProc, version: &str) -> usize {
    agent
        .logs()
        .lines()
        .filter(|l| l.contains("apply started") && l.contains(version))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_mid_batch_hands_the_rollout_over_without_applying_any_node_twice() {
    let Some(url) = lockstep_testkit::fresh_pg_url().await else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let replica = |name: &str| {
        ServeProcess::spawn(
            &lockstep_bin(),
            &work.path().join(format!("data-{name}")),
            &[
                "--store",
                &url,
                "--replica-id",
                name,
                "--leader-lease",
                "2s",
                "--agent-token",
                TOKEN,
                "--instance-ttl",
                "30s",
            ],
            &[],
        )
    };
    let mut a = replica("ro-a");
    let leader_is = |url: String, want: &'static str| async move {
        let h: serde_json::Value = reqwest::get(format!("{url}/healthz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (h["registry"]["leader"] == want).then_some(())
    };
    lockstep_testkit::eventually(Duration::from_secs(10), || leader_is(a.url.clone(), "ro-a"))
        .await
        .expect("A leads");
    let b = replica("ro-b");
    let b_url = b.url.clone();
    // The fleet talks to B; A (the leader) drives the rollout.
    let fleet = Fleet::with_serve(tempfile::tempdir().expect("tempdir"), b, 6).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &["--agents", &urls, "--canary", "1", "--concurrency", "2"],
    );
    // Kill A once a batch node is updating.
    let api = reqwest::Client::new();
    let mut seen = false;
    for _ in 0..600 {
        let v: serde_json::Value = api
            .get(format!("{b_url}/v1/rollouts/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes[1..].iter().any(|n| n["step"] == "updating") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "no batch node was ever updating");
    a.kill9();
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "B finishes the rollout: {v}");
    assert_eq!(v["phase"], "completed");
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 6]);
    for (i, agent) in fleet.agents.iter().enumerate() {
        assert_eq!(
            applies_of(agent, "id-v2"),
            1,
            "node {i} received the apply of v2 exactly once:\n{}",
            agent.logs()
        );
    }
    let evs = fleet.events().await;
    assert!(
        evs.iter()
            .any(|e| e.kind == "worker_version_checked" && e.data["resumed"] == true),
        "B resumed a node recorded as updating by checking its version first"
    );
}

/// `(instance endpoint, rollout step, reason)` of every instance of `api` that `status -o
/// json` shows with a rollout mark of rollout `id`.
fn marks(status: &serde_json::Value, id: &str) -> Vec<(String, String, Option<String>)> {
    status["environments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["services"].as_array().into_iter().flatten())
        .flat_map(|s| s["instances"].as_array().into_iter().flatten())
        .filter(|i| {
            i["rollout"]["id"]
                .as_i64()
                .is_some_and(|n| n.to_string() == id)
        })
        .map(|i| {
            (
                i["endpoint"].as_str().unwrap_or_default().to_string(),
                i["rollout"]["step"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i["rollout"]["reason"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_verify_tell_a_node_waiting_for_its_batch_from_one_that_failed() {
    let fleet = Fleet::start(5).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    std::fs::write(fleet.roots[1].join("sick-v2"), "x").expect("write");
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &[
            "--agents",
            &urls,
            "--canary",
            "1",
            "--concurrency",
            "1",
            "--max-failures",
            "1",
        ],
    );
    let sick = fleet.agents[1].url.clone();
    let status_json = || async {
        let out = reqwest::Client::new()
            .get(format!("{}/v1/status?service=api", fleet.serve.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("status")
            .text()
            .await
            .expect("body");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_default()
    };
    // While node 1 updates (its health check fails only after --health-timeout), nodes 2
    // to 4 wait for their batch: the table and verify say so.
    let mut waiting = false;
    for _ in 0..1500 {
        let m = marks(&status_json().await, &id);
        if m.iter().any(|(e, s, _)| *e == sick && s == "updating")
            && m.iter().filter(|(_, s, _)| s == "pending").count() == 3
        {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(waiting, "never saw node 1 updating and three nodes waiting");
    let (_, table, _) = fleet.cli(&["status", "--service", "api"]);
    assert!(table.contains("ROLLOUT"), "{table}");
    assert_eq!(
        table
            .matches(&format!("rollout {id}: waiting for its batch"))
            .count(),
        3,
        "{table}"
    );
    let (code, out, _) = fleet.cli(&["verify", "--service", "api", "-o", "json"]);
    assert_eq!(code, 1, "a rollout in progress does not verify: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("verify json");
    let steps = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {v}"))
            .iter()
            .map(|n| n["step"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        steps("rollout_waiting")
            .iter()
            .filter(|s| *s == "pending")
            .count(),
        3,
        "{v}"
    );
    assert!(steps("rollout_failed").is_empty(), "{v}");
    let (_, text, _) = fleet.cli(&["verify", "--service", "api"]);
    assert!(text.contains("waiting for a running rollout ("), "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap_or_default()
            .starts_with("[FAIL]"),
        "the last line stays the verdict: {text}"
    );

    // Once the rollout ended (one failure is within --max-failures 1), only the failed
    // node keeps its mark: it explains why it is not on the release. (Polled: an agent
    // re-registers after its self-rollback, so it may be absent from the registry a while.)
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "{v}");
    let mut m = Vec::new();
    for _ in 0..300 {
        m = marks(&status_json().await, &id);
        if !m.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (m[0].0.as_str(), m[0].1.as_str()),
        (sick.as_str(), "failed")
    );
    assert!(
        m[0].2
            .as_deref()
            .unwrap_or_default()
            .contains("health check failed"),
        "{m:?}"
    );
    let (_, table, _) = fleet.cli(&["status", "--service", "api"]);
    assert!(
        table.contains(&format!(
            "rollout {id}: failed \u{2014} health check failed"
        )),
        "{table}"
    );
    let (code, out, _) = fleet.cli(&["verify", "--service", "api", "-o", "json"]);
    assert_eq!(code, 1, "the failed node is stale: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("verify json");
    assert_eq!(v["rollout_failed"][0]["step"], "failed", "{v}");
    assert_eq!(v["rollout_failed"][0]["rollout"].to_string(), id);
    assert!(v["rollout_waiting"].as_array().expect("waiting").is_empty());
    let (_, text, _) = fleet.cli(&["verify", "--service", "api"]);
    assert!(text.contains("failed in a rollout (1):"), "{text}");
}

/// Waits until at least `n` agents run `version`; answers how many do.
async fn wait_until_on(fleet: &Fleet, version: &str, n: usize) -> usize {
    let mut on = 0;
    for _ in 0..600 {
        on = fleet
            .versions()
            .await
            .iter()
            .filter(|v| v.as_deref() == Some(version))
            .count();
        if on >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    on
}

/// Runs `verify --service api` until it passes (heartbeats report a new release within a
/// beat); answers whether it did.
async fn verified(fleet: &Fleet) -> bool {
    for _ in 0..50 {
        if fleet.cli(&["verify", "--service", "api"]).0 == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_keep_then_retry_updates_only_the_remaining_nodes_each_agent_applying_once() {
    let fleet = Fleet::start(6).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &["--agents", &urls, "--canary", "1", "--concurrency", "1"],
    );
    assert!(
        wait_until_on(&fleet, "id-v2", 2).await >= 2,
        "the rollout did not progress"
    );
    let (code, out, err) = fleet.cli(&["rollout", "abort", &id, "--keep"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "an aborted rollout exits 1: {v}");
    assert_eq!(v["phase"], "aborted", "{v}");
    assert_eq!(v["outcome"], "aborted", "{v}");
    let steps: Vec<String> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["step"].as_str().unwrap_or_default().to_string())
        .collect();
    let kept = steps.iter().filter(|s| *s == "updated").count();
    assert!(kept >= 2, "{steps:?}");
    assert!(
        steps.iter().all(|s| s == "updated" || s == "pending"),
        "nothing rolled back, nothing failed: {steps:?}"
    );
    // What runs is kept; the new release stays expected with the previous one accepted.
    let versions = fleet.versions().await;
    assert_eq!(
        versions
            .iter()
            .filter(|v| v.as_deref() == Some("id-v2"))
            .count(),
        kept,
        "{versions:?}"
    );
    let expected = fleet.expected().await;
    assert_eq!(expected.release.version_id, "id-v2");
    assert_eq!(expected.release.accepts, vec!["id-v1".to_string()]);
    let evs = fleet.events().await;
    assert!(
        !evs.iter().any(|e| e.kind == "worker_rollback_started"),
        "abort --keep rolls nothing back"
    );
    let alerts = fleet
        .serve
        .client(ADMIN_TOKEN)
        .alerts("open", None, Some("api"), 100)
        .await
        .expect("alerts");
    assert!(alerts.alerts.is_empty(), "no alert: {:?}", alerts.alerts);

    let (code, out, err) = fleet.cli(&["rollout", "retry", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 6]);
    for (i, agent) in fleet.agents.iter().enumerate() {
        assert_eq!(
            applies_of(agent, "id-v2"),
            1,
            "node {i} received the apply of v2 exactly once:\n{}",
            agent.logs()
        );
    }
    for (n, step) in v["nodes"].as_array().expect("nodes").iter().zip(&steps) {
        if step == "updated" {
            assert_eq!(n["attempts"], 1, "a kept node is not updated again: {n}");
        }
    }
    assert!(verified(&fleet).await, "verify never passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_abort_rolls_back_and_a_retry_then_puts_every_node_on_the_new_release() {
    let fleet = Fleet::start(4).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &["--agents", &urls, "--canary", "1", "--concurrency", "1"],
    );
    assert!(
        wait_until_on(&fleet, "id-v2", 2).await >= 2,
        "the rollout did not progress"
    );
    let (code, out, err) = fleet.cli(&["rollout", "abort", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["phase"], "aborted", "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v1".to_string()); 4]);
    assert_eq!(fleet.expected().await.release.version_id, "id-v1");

    let (code, out, err) = fleet.cli(&["rollout", "retry", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["phase"], "completed", "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 4]);
    let expected = fleet.expected().await;
    assert_eq!(expected.release.version_id, "id-v2");
    assert!(expected.release.accepts.is_empty());
    assert!(verified(&fleet).await, "verify never passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_now_after_a_completed_rollout_rolls_every_agent_back_at_most_two_at_once() {
    let fleet = Fleet::start(6).await;
    let v2 = package(fleet.work.path(), &fleet.key, "v2", true);
    let urls = fleet.urls();
    let id = fleet.start_rollout(
        &v2,
        &["--agents", &urls, "--canary", "1", "--concurrency", "3"],
    );
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 0, "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v2".to_string()); 6]);
    let before = fleet.events().await.last().map_or(0, |e| e.id);

    let (code, out, err) = fleet.cli(&[
        "rollback",
        "--now",
        "--service",
        "api",
        "--concurrency",
        "2",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        fleet.expected().await.release.version_id,
        "id-v1",
        "the previous release is expected at once"
    );
    let (code, v) = fleet.watch(&id);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["phase"], "aborted", "{v}");
    assert_eq!(fleet.versions().await, vec![Some("id-v1".to_string()); 6]);
    for (i, root) in fleet.roots.iter().enumerate() {
        assert_eq!(current_id(root), "id-v1", "node {i}");
        assert_eq!(
            snapshot(&root.join("current")),
            snapshot(&fleet.v1.src),
            "node {i} is back on v1 byte for byte"
        );
    }
    let evs: Vec<_> = fleet
        .events()
        .await
        .into_iter()
        .filter(|e| e.id > before)
        .collect();
    let started = evs
        .iter()
        .filter(|e| e.kind == "worker_rollback_started")
        .count();
    assert_eq!(started, 6, "every updated node rolled back");
    let mut busy = 0;
    let mut most = 0;
    for e in &evs {
        match e.kind.as_str() {
            "worker_rollback_started" => {
                assert_eq!(e.data["emergency"], true, "{e:?}");
                busy += 1;
                most = most.max(busy);
            }
            "worker_rollback_completed" | "rollout_node_failed" => busy -= 1,
            "worker_update_started" => panic!("an update after the emergency rollback: {e:?}"),
            "rollout_phase" => assert_ne!(e.data["phase"], "canary", "no canary phase: {e:?}"),
            _ => {}
        }
    }
    assert!(most <= 2, "{most} rollbacks in flight with --concurrency 2");
    assert!(verified(&fleet).await, "verify never passed");
}
