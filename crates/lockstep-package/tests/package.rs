//! Packages end to end on real files: reproducible creation, verification that catches
//! every kind of damage, and hostile archives (built with the `tar` crate's raw header
//! API) that never write outside the staging directory.

use flate2::Compression;
use flate2::write::GzEncoder;
use lockstep_package::{CreateOptions, Expect, Limits, PackageError, create, sign, unpack, verify};
use std::io::Write;
use std::path::Path;
use tar::{EntryType, Header};

fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join(".git")).expect("mkdir");
    std::fs::create_dir_all(dir.join("node_modules/x")).expect("mkdir");
    std::fs::write(dir.join("bin/worker"), "#!/bin/sh\necho hi\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("bin/worker"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("chmod");
    std::fs::write(dir.join("config.toml"), "a = 1\n").expect("write");
    std::fs::write(dir.join("debug.log"), "noise\n").expect("write");
    std::fs::write(dir.join(".git/HEAD"), "ref\n").expect("write");
    std::fs::write(dir.join("node_modules/x/i.js"), "1\n").expect("write");
    std::os::unix::fs::symlink("../config.toml", dir.join("bin/config")).expect("link");
}

fn opts() -> CreateOptions {
    CreateOptions {
        service: "api".into(),
        version: "v1.0.0".into(),
        version_id: Some("id-1".into()),
        excludes: vec!["*.log".into()],
        ..CreateOptions::default()
    }
}

#[test]
fn the_same_tree_packaged_twice_gives_identical_bytes_without_excluded_files() {
    let d = tempfile::tempdir().expect("tempdir");
    tree(&d.path().join("src"));
    let a = d.path().join("a.tar.gz");
    let b = d.path().join("b.tar.gz");
    let m = create(&d.path().join("src"), &opts(), &a).expect("create");
    // Touching atime and waiting changes nothing; only content and mtimes matter.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    create(&d.path().join("src"), &opts(), &b).expect("create");
    assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["bin/worker", "config.toml"],
        "defaults and --exclude applied"
    );
    assert_eq!(m.links.len(), 1);
    let checked = lockstep_package::check(&a, &Limits::default()).expect("check");
    assert_eq!(checked, m);
}

fn signed_package(d: &Path) -> (std::path::PathBuf, lockstep_package::SigningKey) {
    tree(&d.join("src"));
    let pkg = d.join("p.tar.gz");
    create(&d.join("src"), &opts(), &pkg).expect("create");
    let key = sign::generate().expect("key");
    let sig = sign::sign_file(&key, &pkg).expect("sign");
    std::fs::write(sign::sig_path(&pkg), sig.to_bytes()).expect("sig");
    (pkg, key)
}

fn gz(tar_bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(tar_bytes).expect("gz");
    e.finish().expect("gz")
}

#[test]
fn verify_rejects_a_foreign_key_a_flipped_byte_a_truncation_and_resigned_tampering() {
    let d = tempfile::tempdir().expect("tempdir");
    let (pkg, key) = signed_package(d.path());
    let trusted = [key.verifying_key()];
    let sig = sign::sig_path(&pkg);
    verify(&pkg, &sig, &trusted, &Limits::default()).expect("the good package verifies");
    let other = [sign::generate().expect("key").verifying_key()];
    assert!(matches!(
        verify(&pkg, &sig, &other, &Limits::default()),
        Err(PackageError::Signature(_))
    ));
    let bytes = std::fs::read(&pkg).expect("read");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let bad = d.path().join("flipped.tar.gz");
    std::fs::write(&bad, &flipped).expect("write");
    std::fs::copy(&sig, sign::sig_path(&bad)).expect("copy");
    assert!(matches!(
        verify(&bad, &sign::sig_path(&bad), &trusted, &Limits::default()),
        Err(PackageError::Signature(_))
    ));
    // Truncated, and signed as truncated by the trusted key: the archive check fails.
    let cut = d.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() - 40]).expect("write");
    let s = sign::sign_file(&key, &cut).expect("sign");
    std::fs::write(sign::sig_path(&cut), s.to_bytes()).expect("sig");
    let err = verify(&cut, &sign::sig_path(&cut), &trusted, &Limits::default()).expect_err("cut");
    assert!(matches!(err, PackageError::Archive(_)), "{err}");
    // A file changed after the manifest was written, re-signed: the checksum catches it.
    let m = lockstep_package::check(&pkg, &Limits::default()).expect("manifest");
    let mut t = tar::Builder::new(Vec::new());
    let text = serde_json::to_vec(&m).expect("json");
    let mut h = Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, "lockstep-manifest.json", text.as_slice())
        .expect("append");
    for (path, body) in [
        ("bin/worker", "#!/bin/sh\necho HI\n"),
        ("config.toml", "a = 1\n"),
    ] {
        let mut h = Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, path, body.as_bytes())
            .expect("append");
    }
    let tampered = d.path().join("tampered.tar.gz");
    std::fs::write(&tampered, gz(&t.into_inner().expect("tar"))).expect("write");
    let s = sign::sign_file(&key, &tampered).expect("sign");
    std::fs::write(sign::sig_path(&tampered), s.to_bytes()).expect("sig");
    let err = verify(
        &tampered,
        &sign::sig_path(&tampered),
        &trusted,
        &Limits::default(),
    )
    .expect_err("tampered");
    assert!(matches!(err, PackageError::Checksum(_)), "{err}");
}

/// One raw entry: the path and link name are written into the header bytes as given, so
/// `..`, absolute paths and the like reach the unpacker unfiltered.
fn raw(t: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &str, link: &str, data: &[u8]) {
    let mut h = Header::new_old();
    let old = h.as_old_mut();
    old.name[..path.len()].copy_from_slice(path.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    t.append(&h, data).expect("append");
}

fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    build(&mut t);
    gz(&t.into_inner().expect("tar"))
}

/// Unpacks `bytes` (legacy mode) into `<outer>/staging` and returns the error; asserts
/// that nothing but `staging` appeared in `outer` and that `outside` (a path the archive
/// aims at) was not created.
fn refused(name: &str, bytes: &[u8], limits: &Limits, outside: Option<&Path>) -> PackageError {
    let outer = tempfile::tempdir().expect("tempdir");
    let staging = outer.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let err = unpack(bytes, Some(&staging), limits, Expect::Legacy, &mut |_| {}).expect_err(name);
    let listing: Vec<String> = std::fs::read_dir(outer.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listing,
        ["staging"],
        "{name}: something was written next to staging"
    );
    if let Some(p) = outside {
        assert!(!p.exists(), "{name}: {} was created", p.display());
    }
    err
}

#[test]
fn hostile_archives_are_refused_and_nothing_lands_outside_staging() {
    let limits = Limits::default();
    let victim = std::env::temp_dir().join(format!("lockstep-victim-{}", uuid::Uuid::new_v4()));
    let victim_str = victim.display().to_string();

    let dotdot = archive(|t| raw(t, EntryType::Regular, "../escaped", "", b"x"));
    let e = refused("dot-dot", &dotdot, &limits, None);
    assert!(matches!(e, PackageError::Unsafe { .. }), "{e}");

    let nested = archive(|t| {
        raw(t, EntryType::Regular, "./bin/ok", "", b"fine");
        raw(t, EntryType::Regular, "bin/../../escaped", "", b"x");
    });
    assert!(matches!(
        refused("nested dot-dot", &nested, &limits, None),
        PackageError::Unsafe { .. }
    ));

    let absolute = archive(|t| raw(t, EntryType::Regular, &victim_str, "", b"x"));
    let e = refused("absolute", &absolute, &limits, Some(&victim));
    assert!(matches!(e, PackageError::Unsafe { .. }), "{e}");

    let outside_dir = tempfile::tempdir().expect("tempdir");
    let target = outside_dir.path().display().to_string();
    let through = archive(|t| {
        raw(t, EntryType::Symlink, "link", &target, b"");
        raw(t, EntryType::Regular, "link/pwned", "", b"x");
    });
    let e = refused(
        "symlink then write through it",
        &through,
        &limits,
        Some(&outside_dir.path().join("pwned")),
    );
    assert!(matches!(e, PackageError::Unsafe { .. }), "{e}");
    let relative_escape = archive(|t| {
        raw(t, EntryType::Symlink, "up", "../../../../../../tmp", b"");
        raw(t, EntryType::Regular, "up/pwned", "", b"x");
    });
    assert!(matches!(
        refused("relative escaping link", &relative_escape, &limits, None),
        PackageError::Unsafe { .. }
    ));
    // Each link looks inside on its own; chained they leave the root.
    let chained = archive(|t| {
        raw(t, EntryType::Symlink, "here", ".", b"");
        raw(t, EntryType::Symlink, "esc", "here/..", b"");
    });
    let e = refused("chained links", &chained, &limits, None);
    assert!(e.to_string().contains("outside"), "{e}");

    let hard = archive(|t| raw(t, EntryType::Link, "h", "../../../etc/passwd", b""));
    assert!(matches!(
        refused("hard link up", &hard, &limits, None),
        PackageError::Unsafe { .. }
    ));
    let hard_abs = archive(|t| raw(t, EntryType::Link, "h", "/etc/passwd", b""));
    assert!(matches!(
        refused("hard link absolute", &hard_abs, &limits, None),
        PackageError::Unsafe { .. }
    ));

    let dev = archive(|t| raw(t, EntryType::Char, "null", "", b""));
    let e = refused("device", &dev, &limits, None);
    assert!(e.to_string().contains("device"), "{e}");
    let blk = archive(|t| raw(t, EntryType::Block, "sda", "", b""));
    assert!(matches!(
        refused("block device", &blk, &limits, None),
        PackageError::Unsafe { .. }
    ));
    let fifo = archive(|t| raw(t, EntryType::Fifo, "pipe", "", b""));
    assert!(matches!(
        refused("fifo", &fifo, &limits, None),
        PackageError::Unsafe { .. }
    ));

    // 16 MiB of zeros compresses about a thousandfold: the ratio limit stops it early.
    let zeros = vec![0u8; 16 << 20];
    let bomb = archive(|t| raw(t, EntryType::Regular, "bomb", "", &zeros));
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    let e = refused("bomb", &bomb, &limits, None);
    assert!(matches!(e, PackageError::Limit(_)), "{e}");
    let small = Limits {
        max_unpacked: 1 << 20,
        max_ratio: 1_000_000,
        ..limits
    };
    assert!(matches!(
        refused("over the size limit", &bomb, &small, None),
        PackageError::Limit(_)
    ));
}

#[test]
fn a_legacy_archive_with_dot_slash_entries_unpacks_with_inside_links_kept() {
    let d = tempfile::tempdir().expect("tempdir");
    let bytes = archive(|t| {
        raw(t, EntryType::Directory, "./", "", b"");
        raw(t, EntryType::Directory, "./bin/", "", b"");
        raw(t, EntryType::Regular, "./bin/x", "", b"payload");
        raw(t, EntryType::Symlink, "./bin/y", "x", b"");
        raw(t, EntryType::Link, "./bin/z", "./bin/x", b"");
    });
    let out = unpack(
        bytes.as_slice(),
        Some(d.path()),
        &Limits::default(),
        Expect::Legacy,
        &mut |_| {},
    )
    .expect("unpacks");
    assert_eq!(out.files, 1);
    assert_eq!(
        std::fs::read(d.path().join("bin/y")).expect("via link"),
        b"payload"
    );
    assert_eq!(
        std::fs::read(d.path().join("bin/z")).expect("hard link"),
        b"payload"
    );
    // The same archive is not a lockstep package.
    let err = unpack(
        bytes.as_slice(),
        None,
        &Limits::default(),
        Expect::Manifest(None),
        &mut |_| {},
    )
    .expect_err("no manifest");
    assert!(matches!(err, PackageError::Manifest(_)), "{err}");
}
