//! Startup guards: checks a worker runs before it connects to anything, so that a wrong
//! binary crashes before it touches a queue.
//!
//! In production (`LOCKSTEP_ENV`, `APP_ENV` or `NODE_ENV` set to `production`; unset means
//! development) a guard refuses to run a debug build, a binary started by `cargo run`, a
//! binary whose SHA is `unknown`, and one whose SHA (or release id) differs from
//! `EXPECTED_GIT_SHA` (or `LOCKSTEP_EXPECTED_VERSION`). In development the same findings
//! only warn. A refusal prints `[version] FATAL: …` lines on stderr and exits 78.

use lockstep_core::short_id;

use crate::BuildInfo;

/// Exit code of a refusal (`EX_CONFIG`).
pub const EXIT_REFUSED: i32 = 78;

/// What the guards concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run.
    Pass,
    /// Run, but say this.
    Warn(Vec<String>),
    /// Do not run.
    Refuse(Vec<String>),
}

/// Everything the guards look at, so they can be evaluated without touching the process.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Whether the environment is production.
    pub production: bool,
    /// The binary was built with debug assertions.
    pub debug_build: bool,
    /// The process was started by `cargo run`.
    pub cargo_run: bool,
    /// The running binary's git SHA (`unknown` when not baked).
    pub git_sha: String,
    /// The release id the process claims (`LOCKSTEP_VERSION_ID`), if any.
    pub version_id: Option<String>,
    /// `EXPECTED_GIT_SHA`.
    pub expected_git_sha: Option<String>,
    /// `LOCKSTEP_EXPECTED_VERSION`.
    pub expected_version: Option<String>,
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the process environment says production.
pub fn is_production() -> bool {
    ["LOCKSTEP_ENV", "APP_ENV", "NODE_ENV"]
        .iter()
        .any(|k| env_nonempty(k).is_some_and(|v| v.eq_ignore_ascii_case("production")))
}

impl Facts {
    /// Facts from the process environment and `info`.
    pub fn from_env(info: &BuildInfo) -> Facts {
        Facts {
            production: is_production(),
            debug_build: info.debug_build,
            // cargo sets these for the processes it runs; a deployed binary never has them.
            cargo_run: std::env::var_os("CARGO").is_some()
                && std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            git_sha: env_nonempty("GIT_SHA").unwrap_or_else(|| info.git_sha.to_string()),
            version_id: env_nonempty("LOCKSTEP_VERSION_ID"),
            expected_git_sha: env_nonempty("EXPECTED_GIT_SHA"),
            expected_version: env_nonempty("LOCKSTEP_EXPECTED_VERSION"),
        }
    }
}

fn sha_matches(expected: &str, actual: &str) -> bool {
    // A short SHA (≥ 7) given by a deploy matches the full baked one.
    expected == actual || (expected.len() >= 7 && actual.starts_with(expected))
}

/// Evaluates the guards.
pub fn evaluate(f: &Facts) -> Verdict {
    let mut findings = Vec::new();
    if f.debug_build {
        findings.push("this is a debug build; deploy a release build".to_string());
    }
    if f.cargo_run {
        findings.push("started by `cargo run` (a development runner)".to_string());
    }
    if f.git_sha == lockstep_core::detect::UNKNOWN {
        findings.push(
            "the binary's git SHA is unknown; build it with lockstep_build::emit() or set GIT_SHA"
                .to_string(),
        );
    }
    if let Some(exp) = &f.expected_git_sha
        && !sha_matches(exp, &f.git_sha)
    {
        findings.push(format!(
            "git SHA {} differs from EXPECTED_GIT_SHA {}",
            short_id(&f.git_sha),
            short_id(exp)
        ));
    }
    if let Some(exp) = &f.expected_version {
        let running = f.version_id.as_deref().unwrap_or(&f.git_sha);
        if !sha_matches(exp, running) {
            findings.push(format!(
                "release {} differs from LOCKSTEP_EXPECTED_VERSION {}",
                short_id(running),
                short_id(exp)
            ));
        }
    }
    match (findings.is_empty(), f.production) {
        (true, _) => Verdict::Pass,
        (false, true) => Verdict::Refuse(findings),
        // Development builds are allowed to be what they are; only say so.
        (false, false) => Verdict::Warn(findings),
    }
}

/// Prints a verdict the way operators grep for it; returns whether to run.
pub fn report(v: &Verdict) -> bool {
    match v {
        Verdict::Pass => true,
        Verdict::Warn(lines) => {
            for l in lines {
                eprintln!("[version] WARNING: {l} (allowed outside production)");
            }
            true
        }
        Verdict::Refuse(lines) => {
            for l in lines {
                eprintln!("[version] FATAL: {l}");
            }
            eprintln!("[version] FATAL: refusing to start in production (exit {EXIT_REFUSED})");
            false
        }
    }
}

/// Runs the guards for this process and exits 78 on refusal. Call first thing in `main`.
pub fn enforce(info: &BuildInfo) {
    if !report(&evaluate(&Facts::from_env(info))) {
        std::process::exit(EXIT_REFUSED);
    }
}

/// Checks the release `version_id` against the registry's expected release of `service`:
/// stale refuses in production and warns elsewhere; nothing registered passes; a registry
/// that cannot be asked warns and passes (the guards fail open like the watcher).
pub async fn check_registry(
    client: &crate::RegistryClient,
    env: &str,
    service: &str,
    version_id: &str,
    production: bool,
) -> Verdict {
    match client.release(env, service).await {
        Ok(Some(r)) => {
            let st = lockstep_core::instance_status(
                Some(&r.release),
                version_id,
                &Default::default(),
                false,
            );
            if st != lockstep_core::Status::Stale {
                return Verdict::Pass;
            }
            let line = format!(
                "release {} is not the expected {} of {service}",
                short_id(version_id),
                short_id(&r.release.version_id)
            );
            if production {
                Verdict::Refuse(vec![line])
            } else {
                Verdict::Warn(vec![line])
            }
        }
        Ok(None) => Verdict::Pass,
        Err(e) => Verdict::Warn(vec![format!(
            "cannot check the registry ({e}); starting anyway"
        )]),
    }
}

/// The guards from the environment, then against the registry named by `cfg`; exits 78 on
/// refusal. For workers that want "the registry agrees" before they touch a queue.
pub async fn enforce_with_registry(info: &BuildInfo, cfg: &crate::WatcherConfig) {
    enforce(info);
    let Ok(client) = crate::RegistryClient::new(&cfg.registry, cfg.token.clone()) else {
        return;
    };
    let v = check_registry(
        &client,
        &cfg.env,
        &cfg.service,
        &cfg.version_id,
        is_production(),
    )
    .await;
    if !report(&v) {
        std::process::exit(EXIT_REFUSED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod(sha: &str) -> Facts {
        Facts {
            production: true,
            git_sha: sha.into(),
            ..Facts::default()
        }
    }

    #[test]
    fn guard_table() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let cases: Vec<(Facts, &str)> = vec![
            (prod(sha), "pass"),
            (
                Facts {
                    expected_git_sha: Some(sha.into()),
                    ..prod(sha)
                },
                "pass",
            ),
            (
                Facts {
                    expected_git_sha: Some(sha[..7].into()),
                    ..prod(sha)
                },
                "pass",
            ),
            (
                Facts {
                    expected_git_sha: Some("ffffffff".into()),
                    ..prod(sha)
                },
                "refuse",
            ),
            (prod("unknown"), "refuse"),
            (
                Facts {
                    debug_build: true,
                    ..prod(sha)
                },
                "refuse",
            ),
            (
                Facts {
                    cargo_run: true,
                    ..prod(sha)
                },
                "refuse",
            ),
            (
                Facts {
                    expected_version: Some("v2".into()),
                    version_id: Some("v1".into()),
                    ..prod(sha)
                },
                "refuse",
            ),
            (
                Facts {
                    expected_version: Some("v2".into()),
                    version_id: Some("v2".into()),
                    ..prod(sha)
                },
                "pass",
            ),
            (
                Facts {
                    production: false,
                    expected_git_sha: Some("ffffffff".into()),
                    ..prod(sha)
                },
                "warn",
            ),
            (
                Facts {
                    production: false,
                    debug_build: true,
                    ..prod("unknown")
                },
                "warn",
            ),
        ];
        for (f, want) in cases {
            let got = match evaluate(&f) {
                Verdict::Pass => "pass",
                Verdict::Warn(_) => "warn",
                Verdict::Refuse(_) => "refuse",
            };
            assert_eq!(got, want, "{f:?}");
        }
    }
}
