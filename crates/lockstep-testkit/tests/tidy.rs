//! House rules checked on every test run, so nobody has to remember them: every Rust file
//! opens with a `//!` line saying what it is for, `anyhow` stays in the binary, and no test
//! is ignored without a reason.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target" || n == ".git") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_files() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("crates"), &mut files);
    rust_files(&workspace_root().join("examples"), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        })
        .collect()
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let missing: Vec<_> = all_files()
        .into_iter()
        .filter(|(p, t)| {
            let is_build = p.file_name().is_some_and(|n| n == "build.rs");
            !is_build && !t.trim_start().starts_with("//!")
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! line: {missing:#?}");
}

#[test]
fn anyhow_is_used_only_in_binaries() {
    let offenders: Vec<_> = all_files()
        .into_iter()
        .filter(|(p, t)| {
            let s = p.to_string_lossy();
            let is_binary = s.contains("lockstep-cli") || s.contains("/examples/");
            let is_test = s.contains("/tests/");
            !is_binary && !is_test && t.contains("anyhow::")
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "anyhow in a library: {offenders:#?}");
}

#[test]
fn no_test_is_ignored_without_a_reason() {
    let offenders: Vec<_> = all_files()
        .into_iter()
        .filter(|(_, t)| t.lines().any(|l| l.trim() == "#[ignore]"))
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "#[ignore] without = \"reason\": {offenders:#?}"
    );
}

#[test]
fn the_registry_service_has_no_http_in_it() {
    let offenders: Vec<_> = all_files()
        .into_iter()
        .filter(|(p, t)| {
            p.to_string_lossy().contains("lockstep-server/src/service/")
                && ["axum::", "hyper::", "http::"]
                    .iter()
                    .any(|needle| t.contains(needle))
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "HTTP types in the registry service (map errors at the edge instead): {offenders:#?}"
    );
}

/// The paths a file under `service/` names outside itself: `crate::x` with `x` other than
/// `service`, and in `service/mod.rs` any `super::` (its parent is the crate root).
fn outside_service_paths(path: &Path, text: &str) -> Vec<String> {
    let is_mod = path.file_name().is_some_and(|n| n == "mod.rs")
        && path.parent().is_some_and(|d| d.ends_with("service"));
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let seg: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            if seg != "service" {
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
            rest = after;
        }
        if is_mod && code.contains("super::") {
            found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
        }
    }
    found
}

#[test]
fn the_registry_service_depends_on_nothing_of_the_server_outside_it() {
    let offenders: Vec<_> = all_files()
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains("lockstep-server/src/service/"))
        .flat_map(|(p, t)| outside_service_paths(&p, &t))
        .collect();
    assert!(
        offenders.is_empty(),
        "service/ must not import the HTTP side of the server (move what it needs into \
         service/ instead): {offenders:#?}"
    );
}

#[test]
fn the_one_way_rule_catches_an_import_of_the_http_side() {
    let p = Path::new("crates/lockstep-server/src/service/drift.rs");
    assert_eq!(
        outside_service_paths(
            p,
            "use crate::auth::Principal;\nuse crate::service::tokens;"
        )
        .len(),
        1
    );
    let m = Path::new("crates/lockstep-server/src/service/mod.rs");
    assert_eq!(
        outside_service_paths(m, "use super::state::Config;").len(),
        1
    );
    assert!(outside_service_paths(p, "use super::projection::Change; // crate::auth").is_empty());
}
