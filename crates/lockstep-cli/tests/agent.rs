//! The update agent as real processes on loopback: signed packages applied and bad ones
//! refused with the old release untouched, hostile archives refused, `kill -9` at every
//! named apply step, self-rollback on a failed health check, the source system's
//! coordinator protocol (opted in, and refused by default), retention, reproducible
//! packages. The worker is a few lines of Python shipped inside each release: it serves
//! `/health` (200 only when the release has a `healthy` file) and its `VERSION` on `/`.

mod support;

use lockstep_package::sign;
use lockstep_testkit::lockstep_bin;
use std::process::Command;
use std::time::Duration;
use support::agents::*;

async fn worker_says(port: u16) -> Option<String> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/"))
        .await
        .ok()?;
    r.text().await.ok()
}

fn api_status(e: &lockstep_agent::ClientError) -> u16 {
    match e {
        lockstep_agent::ClientError::Api { status, .. } => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

fn signed_agent_args<'a>(
    pubkey: &'a str,
    port: &'a str,
    health: &'a str,
    health_timeout: &'a str,
) -> Vec<&'a str> {
    vec![
        "--trusted-key",
        pubkey,
        "--token",
        TOKEN,
        "--health-url",
        health,
        "--health-timeout",
        health_timeout,
        "--grace",
        "2s",
        "--run",
        "--",
        "python3",
        "worker.py",
        port,
    ]
}

#[tokio::test]
async fn a_signed_package_applies_and_bad_ones_leave_the_old_release_byte_for_byte() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    let (key, public) = keypair(work.path());
    let port = free_port().to_string();
    let health = format!("http://127.0.0.1:{port}/health");
    let pubkey = public.display().to_string();
    let agent = AgentProc::spawn(
        &root,
        &signed_agent_args(&pubkey, &port, &health, "15s"),
        &[],
    );
    let c = agent.client();
    let v1 = package(work.path(), &key, "v1", true);
    c.upload("id-v1", &v1.file, Some(&v1.sig))
        .await
        .expect("upload");
    let out = c.apply("id-v1").await.expect("apply");
    assert_eq!(out.status, "applied");
    let v = c.version().await.expect("version");
    assert_eq!(v.version_id.as_deref(), Some("id-v1"));
    assert_eq!(v.codebase_version, "v1");
    assert_eq!(v.git_commit, "sha-v1");
    assert_eq!(
        v.components.get("translator").map(String::as_str),
        Some("v1")
    );
    assert_eq!(
        worker_says(port.parse().expect("port")).await.as_deref(),
        Some("v1")
    );
    let before = snapshot(&root.join("current"));
    assert_eq!(
        before,
        snapshot(&v1.src),
        "the release is the tree, exactly"
    );

    let v2 = package(work.path(), &key, "v2", true);
    // Unsigned.
    let e = c
        .upload("id-v2", &v2.file, None)
        .await
        .expect_err("unsigned");
    assert_eq!(api_status(&e), 400, "{e}");
    // Signed by a key the agent does not trust.
    let other = sign::generate().expect("key");
    let foreign = work.path().join("foreign.sig");
    std::fs::write(
        &foreign,
        sign::sign_file(&other, &v2.file).expect("sign").to_bytes(),
    )
    .expect("w");
    let e = c
        .upload("id-v2", &v2.file, Some(&foreign))
        .await
        .expect_err("foreign");
    assert!(e.to_string().contains("bad_signature"), "{e}");
    // Truncated in transit (the signature is of the whole file).
    let bytes = std::fs::read(&v2.file).expect("read");
    let cut = work.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let e = c
        .upload("id-v2", &cut, Some(&v2.sig))
        .await
        .expect_err("truncated");
    assert!(e.to_string().contains("bad_signature"), "{e}");
    // Truncated and signed as such by the trusted key: the archive itself is refused.
    let cut_sig = work.path().join("cut.sig");
    std::fs::write(
        &cut_sig,
        sign::sign_file(&key, &cut).expect("sign").to_bytes(),
    )
    .expect("w");
    let e = c
        .upload("id-v2", &cut, Some(&cut_sig))
        .await
        .expect_err("truncated, signed");
    assert_eq!(api_status(&e), 400, "{e}");
    // One byte flipped.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let tampered = work.path().join("tampered.tar.gz");
    std::fs::write(&tampered, &flipped).expect("write");
    let e = c
        .upload("id-v2", &tampered, Some(&v2.sig))
        .await
        .expect_err("tampered");
    assert!(e.to_string().contains("bad_signature"), "{e}");
    // Nothing of it can be applied, and the node still runs v1, byte for byte.
    let e = c.apply("id-v2").await.expect_err("never uploaded");
    assert_eq!(api_status(&e), 404, "{e}");
    assert_eq!(current_id(&root), "id-v1");
    assert_eq!(snapshot(&root.join("current")), before);
    assert_eq!(
        c.version().await.expect("version").version_id.as_deref(),
        Some("id-v1")
    );
    assert_eq!(
        worker_says(port.parse().expect("port")).await.as_deref(),
        Some("v1")
    );
    assert!(!root.join("releases/id-v2").exists());
    // The good one still goes through.
    c.upload("id-v2", &v2.file, Some(&v2.sig))
        .await
        .expect("upload");
    c.apply("id-v2").await.expect("apply");
    assert_eq!(snapshot(&root.join("current")), snapshot(&v2.src));
    assert_eq!(
        worker_says(port.parse().expect("port")).await.as_deref(),
        Some("v2")
    );
    agent.stop();
}

/// `./bin/x`-style manifest-less tar.gz, as the source system's coordinator sends.
fn legacy_archive(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for (path, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        t.append(&h, *data).expect("append");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &t.into_inner().expect("tar")).expect("gz");
    gz.finish().expect("gz")
}

/// A raw, chunked `application/octet-stream` upload (no Content-Length) — the source
/// coordinator's form.
async fn raw_upload(
    url: &str,
    version: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> reqwest::Response {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let mut r = reqwest::Client::new()
        .post(format!("{url}/api/v1/update/upload"))
        .header("Content-Type", "application/octet-stream")
        .header("X-Update-Version", version)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.expect("upload request")
}

#[tokio::test]
async fn hostile_archives_are_refused_and_nothing_is_written_outside_the_agent() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    let agent = AgentProc::spawn(&root, &["--allow-unsigned", "--allow-unauthenticated"], &[]);
    let outside = tempfile::tempdir().expect("tempdir");
    let target = outside.path().display().to_string();
    let victim = outside.path().join("absolute-victim");
    let victim_s = victim.display().to_string();
    let zeros = vec![0u8; 16 << 20];
    use tar::EntryType::*;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            legacy_archive(&[("./bin/../../../escaped", Regular, "", b"x")]),
        ),
        (
            "absolute",
            legacy_archive(&[(&victim_s, Regular, "", b"x")]),
        ),
        (
            "symlink out, then a file through it",
            legacy_archive(&[
                ("./out", Symlink, &target, b""),
                ("./out/pwned", Regular, "", b"x"),
            ]),
        ),
        (
            "hard link out",
            legacy_archive(&[("./h", Link, "../../../../etc/passwd", b"")]),
        ),
        (
            "device node",
            legacy_archive(&[("./dev/null", Char, "", b"")]),
        ),
        ("fifo", legacy_archive(&[("./pipe", Fifo, "", b"")])),
        (
            "decompression bomb",
            legacy_archive(&[("./bomb", Regular, "", &zeros)]),
        ),
    ];
    let before: Vec<_> = std::fs::read_dir(work.path())
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    for (name, bytes) in cases {
        let r = raw_upload(&agent.url, "1.0.0", bytes, None).await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert!(status == 400 || status == 413, "{name}: {status} {body}");
        let apply = reqwest::Client::new()
            .post(format!("{}/api/v1/update/apply", agent.url))
            .header("X-Update-Version", "1.0.0")
            .send()
            .await
            .expect("apply");
        assert_eq!(apply.status().as_u16(), 404, "{name}: nothing to apply");
        assert!(!outside.path().join("pwned").exists(), "{name}");
        assert!(!victim.exists(), "{name}");
        assert!(
            !work.path().join("escaped").exists() && !root.join("escaped").exists(),
            "{name}"
        );
        let now: Vec<_> = std::fs::read_dir(work.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(
            now, before,
            "{name}: something appeared next to the agent's root"
        );
        assert_eq!(
            std::fs::read_dir(root.join("staging")).expect("ls").count(),
            0,
            "{name}"
        );
        assert!(!root.join("current").exists(), "{name}");
    }
    assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0);
    agent.stop();
}

#[tokio::test]
async fn kill_9_at_every_apply_step_leaves_a_complete_release_and_the_agent_recovers() {
    let work = tempfile::tempdir().expect("tempdir");
    let (key, public) = keypair(work.path());
    let pubkey = public.display().to_string();
    let v1 = package(work.path(), &key, "v1", true);
    let v2 = package(work.path(), &key, "v2", true);
    // (point, the release `current` must name after the kill)
    let points = [
        ("started", "id-v1"),
        ("verified", "id-v1"),
        ("unpacking", "id-v1"),
        ("unpacked", "id-v1"),
        ("installed", "id-v1"),
        ("switching", "id-v1"),
        ("switched", "id-v2"),
        ("restarted", "id-v2"),
        ("healthy", "id-v2"),
    ];
    for (point, expect) in points {
        let root = work.path().join(format!("root-{point}"));
        let port = free_port().to_string();
        let health = format!("http://127.0.0.1:{port}/health");
        let args = signed_agent_args(&pubkey, &port, &health, "15s");
        let a = AgentProc::spawn(&root, &args, &[]);
        a.client()
            .upload("id-v1", &v1.file, Some(&v1.sig))
            .await
            .expect("upload v1");
        a.client().apply("id-v1").await.expect("apply v1");
        a.stop();

        let mut b = AgentProc::spawn(&root, &args, &[(lockstep_agent::CRASH_ENV, point)]);
        b.client()
            .upload("id-v2", &v2.file, Some(&v2.sig))
            .await
            .expect("upload v2");
        let r = b.client().apply("id-v2").await;
        assert!(
            r.is_err(),
            "{point}: the agent should have died mid-apply: {r:?}"
        );
        assert_eq!(b.wait_dead(), Some(9), "{point}: killed with SIGKILL");
        assert!(b.logs().contains(point), "{point}");

        // On disk, right after the kill: `current` names one complete release.
        let id = current_id(&root);
        assert_eq!(id, expect, "{point}");
        let src = if id == "id-v1" { &v1.src } else { &v2.src };
        assert_eq!(
            snapshot(&root.join("current")),
            snapshot(src),
            "{point}: complete"
        );

        // Restarted, it knows where it is and finishes or undoes the apply.
        let c = AgentProc::spawn(&root, &args, &[]);
        let v = c.client().version().await.expect("version");
        assert_eq!(v.version_id.as_deref(), Some(expect), "{point}");
        assert_eq!(v.status, "idle", "{point}");
        assert_eq!(current_id(&root), expect, "{point}");
        assert_eq!(
            std::fs::read_dir(root.join("staging")).expect("ls").count(),
            0,
            "{point}"
        );
        let label = expect.trim_start_matches("id-");
        let p: u16 = port.parse().expect("port");
        let said = lockstep_testkit::eventually(Duration::from_secs(10), || async {
            worker_says(p).await.filter(|s| s == label)
        })
        .await;
        assert!(
            said.is_some(),
            "{point}: the worker runs {label} again; logs:\n{}",
            c.logs()
        );
        // And the update can be completed.
        c.client()
            .apply("id-v2")
            .await
            .expect("apply after recovery");
        assert_eq!(current_id(&root), "id-v2", "{point}");
        assert_eq!(
            snapshot(&root.join("current")),
            snapshot(&v2.src),
            "{point}"
        );
        c.stop();
    }
}

#[tokio::test]
async fn a_release_failing_its_health_check_rolls_back_by_itself_and_reports_it() {
    let reg = lockstep_testkit::InProcessRegistry::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    let (key, public) = keypair(work.path());
    let pubkey = public.display().to_string();
    let port = free_port().to_string();
    let health = format!("http://127.0.0.1:{port}/health");
    let mut args = signed_agent_args(&pubkey, &port, &health, "3s");
    let head = [
        "--service",
        "api",
        "--registry",
        &reg.url,
        "--registry-token",
        lockstep_testkit::ADMIN_TOKEN,
    ];
    args.splice(0..0, head);
    let agent = AgentProc::spawn(&root, &args, &[]);
    let c = agent.client();
    let v1 = package(work.path(), &key, "v1", true);
    let bad = package(work.path(), &key, "v2", false);
    c.upload("id-v1", &v1.file, Some(&v1.sig))
        .await
        .expect("upload");
    c.apply("id-v1").await.expect("apply");
    c.upload("id-v2", &bad.file, Some(&bad.sig))
        .await
        .expect("upload");
    let e = c.apply("id-v2").await.expect_err("unhealthy");
    assert!(e.to_string().contains("health_check_failed"), "{e}");
    let v = c.version().await.expect("version");
    assert_eq!(v.version_id.as_deref(), Some("id-v1"));
    let ev = v.last_event.expect("an event");
    assert_eq!(ev.kind, "self_rollback");
    assert!(
        ev.message.contains("failed its health check"),
        "{}",
        ev.message
    );
    assert_eq!(current_id(&root), "id-v1");
    assert_eq!(snapshot(&root.join("current")), snapshot(&v1.src));
    assert!(
        !root.join("releases/id-v2").exists(),
        "the failed release is not kept"
    );
    assert_eq!(
        worker_says(port.parse().expect("port")).await.as_deref(),
        Some("v1")
    );
    assert!(agent.logs().contains("self_rollback"), "{}", agent.logs());
    // The registry sees the agent as an instance, on v1, with its endpoint.
    let admin = reg.admin();
    let seen = lockstep_testkit::eventually(Duration::from_secs(10), || async {
        let report = admin.status(Some("production"), Some("api")).await.ok()?;
        report
            .environments
            .into_iter()
            .flat_map(|e| e.services)
            .flat_map(|s| s.instances)
            .map(|i| i.instance)
            .find(|i| i.version_id == "id-v1" && i.endpoint.as_deref() == Some(agent.url.as_str()))
    })
    .await;
    assert!(
        seen.is_some(),
        "the registry sees the rolled-back version and the endpoint"
    );
    agent.stop();
}

#[tokio::test]
async fn the_source_coordinators_protocol_works_against_an_opted_in_agent_and_a_default_agent_refuses_it()
 {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    let agent = AgentProc::spawn(
        &root,
        &[
            "--allow-unsigned",
            "--allow-unauthenticated",
            "--component",
            "translator=1.2.0",
            "--component",
            "api=1.2.0",
            "--component",
            "distributed=1.2.0",
        ],
        &[],
    );
    assert!(
        agent.logs().contains("allow-unauthenticated"),
        "loudly logged"
    );
    let http = reqwest::Client::new();
    let url = agent.url.clone();
    assert_eq!(
        http.get(format!("{url}/health"))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );
    let pkg = |v: &str| {
        legacy_archive(&[
            ("./bin/", tar::EntryType::Directory, "", b""),
            (
                "./bin/translator",
                tar::EntryType::Regular,
                "",
                v.as_bytes(),
            ),
            ("./VERSION", tar::EntryType::Regular, "", v.as_bytes()),
        ])
    };
    for v in ["1.1.0", "1.2.0"] {
        let r = raw_upload(&url, v, pkg(v), None).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        let r = http
            .post(format!("{url}/api/v1/update/apply"))
            .header("X-Update-Version", v)
            .send()
            .await
            .expect("apply");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    // The coordinator polls the version.
    let v: serde_json::Value = http
        .get(format!("{url}/api/v1/version"))
        .send()
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    assert_eq!(v["codebase_version"], "1.2.0");
    for c in ["translator", "api", "distributed"] {
        assert_eq!(v["components"][c], "1.2.0", "{v}");
    }
    assert!(
        v["git_commit"].is_string() && v["build_time"].is_string(),
        "{v}"
    );
    let updated = v["last_updated"].as_str().expect("last_updated");
    time::OffsetDateTime::parse(updated, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    assert_eq!(
        std::fs::read(root.join("current/bin/translator")).expect("read"),
        b"1.2.0"
    );
    // Rollback with a backup id the agent never issued (and the worker id forms).
    let r = http
        .post(format!("{url}/api/v1/update/rollback?worker_id=w-1"))
        .header("X-Backup-ID", "backup-never-seen-1234")
        .header("X-Worker-ID", "w-1")
        .send()
        .await
        .expect("rollback");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = http
        .get(format!("{url}/api/v1/version"))
        .send()
        .await
        .expect("v")
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["codebase_version"], "1.1.0",
        "back on the previous release"
    );
    // A failed upload, then the coordinator's reflex rollback: no downgrade.
    let r = raw_upload(&url, "1.3.0", b"not a tar.gz".to_vec(), None).await;
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{url}/api/v1/update/rollback"))
        .header("X-Backup-ID", "another-unknown")
        .send()
        .await
        .expect("rollback");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = http
        .get(format!("{url}/api/v1/version"))
        .send()
        .await
        .expect("v")
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["codebase_version"], "1.1.0",
        "the node stays on its last good release"
    );
    // The source worker's status codes.
    let r = http
        .post(format!("{url}/api/v1/update/upload"))
        .header("X-Update-Version", "1.4.0")
        .send()
        .await
        .expect("empty");
    assert_eq!(r.status(), 400, "no file");
    let r = raw_upload(&url, "", pkg("x"), None).await;
    assert_eq!(r.status(), 400, "no X-Update-Version");
    let r = http
        .post(format!("{url}/api/v1/update/apply"))
        .header("X-Update-Version", "9.9.9")
        .send()
        .await
        .expect("apply");
    assert_eq!(r.status(), 404, "unknown version");
    agent.stop();

    // A default agent refuses every one of those calls.
    let (_, public) = keypair(work.path());
    let pubkey = public.display().to_string();
    let strict = AgentProc::spawn(
        &work.path().join("strict"),
        &["--trusted-key", &pubkey, "--token", TOKEN],
        &[],
    );
    let url = strict.url.clone();
    assert_eq!(
        raw_upload(&url, "1.2.0", pkg("1.2.0"), None).await.status(),
        401
    );
    for path in ["update/apply", "update/rollback"] {
        let r = http
            .post(format!("{url}/api/v1/{path}"))
            .header("X-Update-Version", "1.2.0")
            .send()
            .await
            .expect("call");
        assert_eq!(r.status(), 401, "{path}");
    }
    assert_eq!(
        http.get(format!("{url}/api/v1/version"))
            .send()
            .await
            .expect("v")
            .status(),
        401
    );
    let r = http
        .get(format!("{url}/api/v1/version"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .expect("v");
    assert_eq!(r.status(), 401);
    // With the token but no signature: a clear refusal.
    let r = raw_upload(&url, "1.2.0", pkg("1.2.0"), Some(TOKEN)).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"], "unsigned", "{body}");
    strict.stop();
}

#[tokio::test]
async fn backups_older_than_the_retention_are_removed_but_never_the_last_good_one() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    let (key, public) = keypair(work.path());
    let pubkey = public.display().to_string();
    let agent = AgentProc::spawn(
        &root,
        &[
            "--trusted-key",
            &pubkey,
            "--token",
            TOKEN,
            "--retention",
            "1s",
        ],
        &[],
    );
    let c = agent.client();
    for v in ["v1", "v2", "v3"] {
        let p = package(work.path(), &key, v, true);
        c.upload(&format!("id-{v}"), &p.file, Some(&p.sig))
            .await
            .expect("upload");
        c.apply(&format!("id-{v}")).await.expect("apply");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let releases = || {
        let mut r: Vec<String> = std::fs::read_dir(root.join("releases"))
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        r.sort();
        r
    };
    // v1 expired; v2 (the last good release before v3) is kept however old.
    let gone = lockstep_testkit::eventually(Duration::from_secs(10), || async {
        (releases() == ["id-v2", "id-v3"]).then_some(())
    })
    .await;
    assert!(gone.is_some(), "{:?}", releases());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(releases(), ["id-v2", "id-v3"]);
    let v = c.version().await.expect("version");
    assert_eq!(v.last_good.as_deref(), Some("id-v2"));
    let out = c.rollback().await.expect("rollback");
    assert_eq!(out.version_id.as_deref(), Some("id-v2"));
    assert_eq!(current_id(&root), "id-v2");
    agent.stop();
}

#[test]
fn package_create_twice_gives_identical_archives_and_verify_exits_0_or_1() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    release_tree(&src, "v1", true);
    std::fs::create_dir_all(src.join(".git")).expect("mkdir");
    std::fs::write(src.join(".git/HEAD"), "x").expect("write");
    let bin = lockstep_bin();
    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(args)
            .current_dir(work.path())
            .output()
            .expect("run")
    };
    let out = run(&["package", "keygen", "--out", "key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["a.tar.gz", "b.tar.gz"] {
        let out = run(&[
            "package",
            "create",
            "--service",
            "api",
            "--version",
            "v1",
            "--out",
            name,
            "src",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
    let a = std::fs::read(work.path().join("a.tar.gz")).expect("a");
    assert_eq!(
        a,
        std::fs::read(work.path().join("b.tar.gz")).expect("b"),
        "byte-identical"
    );
    let out = run(&["package", "sign", "--key", "key", "a.tar.gz"]);
    assert!(out.status.success());
    assert!(work.path().join("a.tar.gz.sig").exists());
    let out = run(&["package", "verify", "--pubkey", "key.pub", "a.tar.gz"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::copy(
        work.path().join("a.tar.gz.sig"),
        work.path().join("b.tar.gz.sig"),
    )
    .expect("cp");
    let mut b = a.clone();
    let n = b.len();
    b[n - 10] ^= 1;
    std::fs::write(work.path().join("b.tar.gz"), b).expect("write");
    let out = run(&["package", "verify", "--pubkey", "key.pub", "b.tar.gz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("[FAIL]"));
}
