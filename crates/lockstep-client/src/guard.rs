//! Startup guards: checks a worker runs before it connects to anything, so that a wrong
//! binary crashes before it touches a queue.
//!
//! In production a guard refuses to run a debug build, a binary started by `cargo run`, a
//! process with no release identity at all (its git SHA is `unknown` and no release id was
//! given), and one whose SHA (or release id) differs from `EXPECTED_GIT_SHA` (or
//! `LOCKSTEP_EXPECTED_VERSION`). Outside production the same findings only warn. A refusal
//! prints `[version] FATAL: …` lines on stderr and exits 78.
//!
//! **Which environment is production** ([`production_reason`]): an environment named
//! explicitly as `production` — `lockstep guard --env production`, or `LOCKSTEP_ENV`,
//! `APP_ENV` or `NODE_ENV` set to `production`. Nothing set at all counts as development,
//! so a laptop run is warned, not refused; any one of them saying production is enough
//! (the safe side wins when they disagree).
//!
//! [`check_registry`] adds the registry's view: a release other than the expected one, a
//! token the registry refuses, a URL that is not a registry, and a service with no release
//! while others have one (a misspelled `--service`) refuse in production; an unreachable
//! registry only warns (the guards fail open like the watcher).

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
    /// The release id the process claims (`LOCKSTEP_VERSION_ID`, `--version-id`), if any.
    pub version_id: Option<String>,
    /// `EXPECTED_GIT_SHA`.
    pub expected_git_sha: Option<String>,
    /// `LOCKSTEP_EXPECTED_VERSION`.
    pub expected_version: Option<String>,
    /// The facts describe a program in any language run by `lockstep guard`, not a Rust
    /// binary that linked this library: advice names variables and flags, not build scripts.
    pub wrapped: bool,
    /// The development runner the wrapped command goes through (`npx tsx`, `nodemon`, …), as
    /// found by [`dev_runner`]; `None` when there is none or its use was explicitly allowed.
    pub dev_runner: Option<String>,
}

/// Runners that compile or reload source on the fly: fine on a laptop, never what a
/// production deploy should run (no build step, so no build identity and no reproducibility).
const DEV_RUNNERS: &[&str] = &[
    "tsx",
    "ts-node",
    "ts-node-esm",
    "ts-node-dev",
    "tsnd",
    "nodemon",
    "vite-node",
    "babel-node",
    "esno",
    "esrun",
];

/// Commands that run a package's binary, and how many of their words name the launcher.
fn launcher_len(words: &[&str]) -> usize {
    match words {
        ["npm" | "pnpm" | "yarn", "exec" | "dlx" | "x", ..] => 2,
        ["npx" | "bunx" | "pnpx", ..] => 1,
        _ => 0,
    }
}

fn base(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// The development runner `command` goes through, e.g. `npx tsx` for
/// `npx --yes tsx worker.ts`; `None` for an ordinary program.
///
/// Recognised: [`DEV_RUNNERS`] (`tsx`, `ts-node`, `nodemon`, `vite-node`, …) run directly, by
/// path (`node_modules/.bin/tsx`) or through `npx`, `npm exec`, `pnpm dlx`/`exec`,
/// `yarn dlx`/`exec`, `bunx` (package versions like `tsx@4` included); `cargo run` and
/// `go run`; `node --import tsx` / `--loader ts-node/esm` / `-r ts-node/register`; and the
/// same inside `env VAR=… CMD` or `sh -c "…"`.
pub fn dev_runner(command: &[String]) -> Option<String> {
    let words: Vec<&str> = command.iter().map(String::as_str).collect();
    dev_runner_words(&words, 0)
}

fn dev_runner_words(words: &[&str], depth: u8) -> Option<String> {
    let (&first, rest) = words.split_first()?;
    let program = base(first);
    match program {
        // `env A=1 B=2 CMD…`: look at CMD.
        "env" => {
            let skip = rest
                .iter()
                .take_while(|w| w.contains('=') || w.starts_with('-'))
                .count();
            return dev_runner_words(&rest[skip..], depth);
        }
        // `sh -c "npx tsx worker.ts"`: look inside the script (words split on blanks, which is
        // enough to see a runner; a script that hides one better is not a mistake).
        "sh" | "bash" | "dash" | "zsh" if depth < 2 => {
            let script = rest
                .iter()
                .position(|w| *w == "-c")
                .and_then(|i| rest.get(i + 1))?;
            for part in script.split(['&', ';', '|', '\n']) {
                let inner: Vec<&str> = part.split_whitespace().collect();
                let inner = match inner.first() {
                    Some(&"exec") => &inner[1..],
                    _ => &inner[..],
                };
                if let Some(found) = dev_runner_words(inner, depth + 1) {
                    return Some(found);
                }
            }
            return None;
        }
        "cargo" | "go" if rest.iter().find(|w| !w.starts_with(['-', '+'])) == Some(&"run") => {
            return Some(format!("{program} run"));
        }
        "node" | "nodejs" | "bun" | "deno" => {
            // Loaders that compile TypeScript on the fly: `node --import tsx worker.ts`.
            for pair in rest.windows(2) {
                if matches!(pair[0], "--import" | "--loader" | "--require" | "-r")
                    && is_runner_package(pair[1])
                {
                    return Some(format!("{program} {} {}", pair[0], pair[1]));
                }
            }
            for w in rest {
                if let Some((flag, value)) = w.split_once('=')
                    && matches!(flag, "--import" | "--loader" | "--require")
                    && is_runner_package(value)
                {
                    return Some(format!("{program} {w}"));
                }
            }
            return None;
        }
        _ => {}
    }
    let mut named = words.to_vec();
    named[0] = program;
    let n = launcher_len(&named);
    if n > 0 {
        // Skip the launcher's own options (`npx --yes`, `npm exec --package=x --`).
        let target = words[n..].iter().find(|w| !w.starts_with('-')).copied()?;
        let name = package_name(target);
        return DEV_RUNNERS
            .contains(&name)
            .then(|| format!("{} {name}", named[..n].join(" ")));
    }
    DEV_RUNNERS.contains(&program).then(|| program.to_owned())
}

/// `tsx@4.19` → `tsx`; `ts-node/register` → `ts-node`; `@scope/x` is left whole.
fn package_name(word: &str) -> &str {
    let word = base_package(word);
    match word.rfind('@') {
        Some(i) if i > 0 => &word[..i],
        _ => word,
    }
}

fn base_package(word: &str) -> &str {
    if word.starts_with('@') {
        return word;
    }
    word.split('/').next().unwrap_or(word)
}

fn is_runner_package(word: &str) -> bool {
    DEV_RUNNERS.contains(&package_name(word))
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Why this process counts as production, e.g. `--env production` or `NODE_ENV=production`;
/// `None` when it does not. `explicit_env` is an environment named on the command line (or
/// by `LOCKSTEP_ENV` through it); the variables `LOCKSTEP_ENV`, `APP_ENV` and `NODE_ENV`
/// are read as well. Unset everywhere counts as development.
pub fn production_reason(explicit_env: Option<&str>) -> Option<String> {
    let production = |v: &str| v.trim().eq_ignore_ascii_case("production");
    if let Some(e) = explicit_env
        && production(e)
    {
        // A command line's --env may have been filled from LOCKSTEP_ENV: name the source.
        let from_var = env_nonempty("LOCKSTEP_ENV").is_some_and(|v| production(&v));
        return Some(
            if from_var {
                "LOCKSTEP_ENV=production"
            } else {
                "--env production"
            }
            .into(),
        );
    }
    ["LOCKSTEP_ENV", "APP_ENV", "NODE_ENV"]
        .iter()
        .find(|k| env_nonempty(k).is_some_and(|v| v.eq_ignore_ascii_case("production")))
        .map(|k| format!("{k}=production"))
}

/// Whether the process environment says production ([`production_reason`] without a
/// command line).
pub fn is_production() -> bool {
    production_reason(None).is_some()
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
            wrapped: false,
            dev_runner: None,
        }
    }
}

fn sha_matches(expected: &str, actual: &str) -> bool {
    // A short SHA (≥ 7) given by a deploy matches the full baked one.
    expected == actual || (expected.len() >= 7 && actual.starts_with(expected))
}

const UNKNOWN: &str = lockstep_core::detect::UNKNOWN;

/// Evaluates the guards.
pub fn evaluate(f: &Facts) -> Verdict {
    let mut findings = Vec::new();
    if f.debug_build {
        findings.push("this is a debug build; deploy a release build".to_string());
    }
    if f.cargo_run {
        findings.push("started by `cargo run` (a development runner)".to_string());
    }
    if let Some(runner) = &f.dev_runner {
        findings.push(format!(
            "the command runs through a development runner (`{runner}`); deploy a build \
             (e.g. `node dist/worker.js`), or pass --allow-dev-runner if you really mean it"
        ));
    }
    let claimed = f.version_id.as_deref().filter(|v| *v != UNKNOWN);
    if f.git_sha == UNKNOWN && claimed.is_none() {
        findings.push(if f.wrapped {
            "the release is unknown: GIT_SHA is not set and no --version-id (or \
             LOCKSTEP_VERSION_ID) was given; set GIT_SHA=$(git rev-parse HEAD) where the \
             worker is built, or pass --version-id"
                .to_string()
        } else {
            "the release is unknown: the binary's git SHA is unknown and LOCKSTEP_VERSION_ID \
             is not set; bake it with lockstep_build::emit() in build.rs, or set GIT_SHA"
                .to_string()
        });
    }
    if let Some(exp) = &f.expected_git_sha
        && !sha_matches(exp, &f.git_sha)
    {
        findings.push(if f.git_sha == UNKNOWN {
            format!(
                "EXPECTED_GIT_SHA is {} but the worker's git SHA is unknown (set GIT_SHA)",
                short_id(exp)
            )
        } else {
            format!(
                "git SHA {} differs from EXPECTED_GIT_SHA {}",
                short_id(&f.git_sha),
                short_id(exp)
            )
        });
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
        (false, false) => Verdict::Warn(
            findings
                .into_iter()
                .map(|l| format!("{l} (allowed outside production)"))
                .collect(),
        ),
    }
}

/// Prints a verdict the way operators grep for it; returns whether to run.
pub fn report(v: &Verdict) -> bool {
    report_with(v, None)
}

/// [`report`], naming what made the environment production in the refusal line (see
/// [`production_reason`]).
pub fn report_with(v: &Verdict, production_reason: Option<&str>) -> bool {
    match v {
        Verdict::Pass => true,
        Verdict::Warn(lines) => {
            for l in lines {
                eprintln!("[version] WARNING: {l}");
            }
            true
        }
        Verdict::Refuse(lines) => {
            for l in lines {
                eprintln!("[version] FATAL: {l}");
            }
            match production_reason {
                Some(why) => eprintln!(
                    "[version] FATAL: refusing to start in production ({why}) (exit {EXIT_REFUSED})"
                ),
                None => eprintln!(
                    "[version] FATAL: refusing to start in production (exit {EXIT_REFUSED})"
                ),
            }
            false
        }
    }
}

/// Runs the guards for this process and exits 78 on refusal. Call first thing in `main`.
pub fn enforce(info: &BuildInfo) {
    if !report_with(
        &evaluate(&Facts::from_env(info)),
        production_reason(None).as_deref(),
    ) {
        std::process::exit(EXIT_REFUSED);
    }
}

/// A refusal in production, a warning elsewhere.
fn severe(production: bool, line: String) -> Verdict {
    if production {
        Verdict::Refuse(vec![line])
    } else {
        Verdict::Warn(vec![format!("{line} (allowed outside production)")])
    }
}

/// Checks the release `version_id` against the registry's expected release of `service`.
///
/// | the registry says | production | elsewhere |
/// |---|---|---|
/// | the expected release is another one | refuse | warn |
/// | no release for `service`, while `env` has others (a misspelled `--service`?) | refuse, naming them | warn, naming them |
/// | nothing registered in `env` at all (a first deploy) | warn | warn |
/// | 401, 403, not a lockstep registry, a malformed request: a setting to fix | refuse | warn |
/// | cannot be reached, or fails (5xx) | warn and start: the guards fail open like the watcher | warn |
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
            severe(
                production,
                format!(
                    "release {} is not the expected {} of {service} in {env}",
                    short_id(version_id),
                    lockstep_core::describe(&r.release)
                ),
            )
        }
        Ok(None) => unregistered_service(client, env, service, production).await,
        Err(e) if e.is_configuration() || e.status() == Some(400) => {
            severe(production, format!("the registry check failed: {e}"))
        }
        Err(e) => Verdict::Warn(vec![format!(
            "cannot check the registry ({e}); starting anyway (the guards fail open, like the watcher)"
        )]),
    }
}

/// No release is registered for `service` in `env`: a new service, or a misspelled name
/// that would never be told it is stale. The registry's list of services decides.
async fn unregistered_service(
    client: &crate::RegistryClient,
    env: &str,
    service: &str,
    production: bool,
) -> Verdict {
    match client.services().await {
        Ok(index) => {
            let known = index.services_in(env);
            if known.is_empty() {
                let elsewhere: Vec<&str> = index
                    .environments
                    .iter()
                    .filter(|e| e.services.iter().any(|s| s == service))
                    .map(|e| e.name.as_str())
                    .collect();
                let hint = if elsewhere.is_empty() {
                    String::new()
                } else {
                    format!(" ({service} is registered in: {})", elsewhere.join(", "))
                };
                return Verdict::Warn(vec![format!(
                    "nothing is registered in environment {env} yet{hint}; {service} runs \
                     unchecked until a release is registered there"
                )]);
            }
            severe(
                production,
                format!(
                    "no release is registered for service {service} in {env}; known services \
                     there: {}. A misspelled --service would never be told it is stale: fix \
                     the name, or register {service} first (lockstep register --service \
                     {service} --version-id …)",
                    known.join(", ")
                ),
            )
        }
        Err(e) if e.is_configuration() => {
            severe(production, format!("the registry check failed: {e}"))
        }
        Err(e) => Verdict::Warn(vec![format!(
            "no release is registered for {service} in {env}, and the registry cannot list \
             its services ({e}); starting anyway"
        )]),
    }
}

/// The guards from the environment, then against the registry named by `cfg`; exits 78 on
/// refusal. For workers that want "the registry agrees" before they touch a queue.
pub async fn enforce_with_registry(info: &BuildInfo, cfg: &crate::WatcherConfig) {
    enforce(info);
    let client = match crate::RegistryClient::new(&cfg.registry, cfg.token.clone()) {
        Ok(c) => c,
        Err(e) => {
            let v = severe(is_production(), e.to_string());
            if !report_with(&v, production_reason(None).as_deref()) {
                std::process::exit(EXIT_REFUSED);
            }
            return;
        }
    };
    let v = check_registry(
        &client,
        &cfg.env,
        &cfg.service,
        &cfg.version_id,
        is_production(),
    )
    .await;
    if !report_with(&v, production_reason(None).as_deref()) {
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
            // "unknown" means no identity at all: a release id is one.
            (
                Facts {
                    version_id: Some("3f2a9c1e".into()),
                    ..prod("unknown")
                },
                "pass",
            ),
            (
                Facts {
                    version_id: Some("unknown".into()),
                    ..prod("unknown")
                },
                "refuse",
            ),
            // An expected SHA cannot be checked without one.
            (
                Facts {
                    version_id: Some("3f2a9c1e".into()),
                    expected_git_sha: Some(sha.into()),
                    ..prod("unknown")
                },
                "refuse",
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

#[cfg(test)]
mod wording {
    use super::*;

    #[test]
    fn a_wrapped_worker_is_told_about_variables_and_flags_not_build_scripts() {
        let f = Facts {
            production: true,
            git_sha: UNKNOWN.into(),
            wrapped: true,
            ..Facts::default()
        };
        let Verdict::Refuse(lines) = evaluate(&f) else {
            panic!("refuses");
        };
        let text = lines.join("\n");
        assert!(
            text.contains("GIT_SHA") && text.contains("--version-id"),
            "{text}"
        );
        assert!(!text.contains("lockstep_build"), "{text}");
    }

    #[test]
    fn an_explicit_production_environment_counts() {
        assert!(production_reason(Some("production")).is_some());
        assert!(production_reason(Some(" Production ")).is_some());
    }

    #[test]
    fn warnings_outside_production_say_so_and_refusals_do_not() {
        let f = Facts {
            git_sha: UNKNOWN.into(),
            ..Facts::default()
        };
        let Verdict::Warn(lines) = evaluate(&f) else {
            panic!("warns");
        };
        assert!(lines[0].ends_with("(allowed outside production)"));
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn development_runners_are_found_directly_and_through_launchers() {
        let cases: &[(&str, Option<&str>)] = &[
            ("tsx worker.ts", Some("tsx")),
            ("npx tsx worker.ts", Some("npx tsx")),
            ("npx --yes tsx@4.19 worker.ts", Some("npx tsx")),
            ("/usr/local/bin/npx ts-node src/w.ts", Some("npx ts-node")),
            ("npm exec -- nodemon worker.js", Some("npm exec nodemon")),
            ("pnpm dlx vite-node w.ts", Some("pnpm dlx vite-node")),
            ("pnpm exec tsx w.ts", Some("pnpm exec tsx")),
            ("yarn dlx ts-node w.ts", Some("yarn dlx ts-node")),
            ("bunx tsx w.ts", Some("bunx tsx")),
            ("./node_modules/.bin/tsx w.ts", Some("tsx")),
            ("nodemon worker.js", Some("nodemon")),
            ("cargo run --release --bin worker", Some("cargo run")),
            ("cargo +nightly run", Some("cargo run")),
            ("go run ./cmd/worker", Some("go run")),
            ("node --import tsx worker.ts", Some("node --import tsx")),
            (
                "node --loader=ts-node/esm w.ts",
                Some("node --loader=ts-node/esm"),
            ),
            (
                "node -r ts-node/register w.ts",
                Some("node -r ts-node/register"),
            ),
            ("env NODE_OPTIONS=x FOO=1 npx tsx w.ts", Some("npx tsx")),
            ("node dist/worker.js", None),
            ("npx prisma migrate deploy", None),
            ("python3 worker.py", None),
            ("cargo build", None),
            ("go test ./...", None),
            ("./worker --mode run", None),
        ];
        for (cmd, want) in cases {
            assert_eq!(dev_runner(&words(cmd)).as_deref(), *want, "{cmd}");
        }
        let sh = vec![
            "sh".into(),
            "-c".into(),
            "cd /app && exec npx tsx w.ts".into(),
        ];
        assert_eq!(dev_runner(&sh).as_deref(), Some("npx tsx"));
        let sh = vec!["sh".into(), "-c".into(), "exec node dist/w.js".into()];
        assert_eq!(dev_runner(&sh), None);
    }

    #[test]
    fn a_development_runner_is_refused_in_production_and_only_warned_about_elsewhere() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let facts = Facts {
            dev_runner: Some("npx tsx".into()),
            wrapped: true,
            production: true,
            git_sha: sha.into(),
            ..Facts::default()
        };
        let Verdict::Refuse(lines) = evaluate(&facts) else {
            panic!("refuses");
        };
        assert!(lines[0].contains("`npx tsx`") && lines[0].contains("--allow-dev-runner"));
        let dev = Facts {
            production: false,
            ..facts
        };
        assert!(matches!(evaluate(&dev), Verdict::Warn(_)));
    }
}
