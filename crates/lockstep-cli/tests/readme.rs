//! The README and the operator docs cannot rot: the README's walk-through runs as written
//! against the real `lockstep` binary, and every relative link in the documentation resolves
//! inside the repository (and none leads out of it).
//!
//! The walk-through is every ```sh block between `<!-- walkthrough …-->` and
//! `<!-- /walkthrough -->` in README.md, in order, except a block right after a
//! `<!-- walkthrough-skip … -->` comment (building the binary: the test brings its own). The
//! blocks run in one `bash`, in a temporary directory holding a link to `examples/`, with
//! the binary's directory first on `PATH` and `LOCKSTEP_LISTEN` set to a free port, which
//! the README's own lines pick up (`${LOCKSTEP_LISTEN:-127.0.0.1:7070}`). A top-level
//! command that fails ends the run; so does an unset variable.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const START: &str = "<!-- walkthrough";
const SKIP: &str = "<!-- walkthrough-skip";
const END: &str = "<!-- /walkthrough -->";

/// How long the whole walk-through may take (it takes a few seconds).
const BUDGET: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The walk-through's shell blocks, in order; and how many were skipped.
fn walkthrough_blocks(readme: &str) -> (Vec<String>, usize) {
    let mut lines = readme.lines();
    assert!(
        lines
            .by_ref()
            .any(|l| l.starts_with(START) && !l.starts_with(SKIP)),
        "README.md has no `{START} …-->` marker"
    );
    let (mut blocks, mut skipped) = (Vec::new(), 0);
    let mut previous = "";
    let mut ended = false;
    while let Some(line) = lines.next() {
        if line.trim() == END {
            ended = true;
            break;
        }
        if line.trim() == "```sh" {
            let mut block = String::new();
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                block.push_str(l);
                block.push('\n');
            }
            if previous.starts_with(SKIP) {
                skipped += 1;
            } else {
                blocks.push(block);
            }
        }
        if !line.trim().is_empty() {
            previous = line.trim();
        }
    }
    assert!(ended, "README.md: the walk-through has no closing `{END}`");
    (blocks, skipped)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The processes of process group `pgid` that are still running (zombies aside).
fn still_running(pgid: u32) -> Vec<String> {
    let out = Command::new("ps")
        .args(["-e", "-o", "pgid=,stat=,args="])
        .output()
        .expect("ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(pgid.to_string().as_str())
                && !f.next().is_some_and(|stat| stat.starts_with('Z'))
        })
        .map(|l| l.trim().to_string())
        .collect()
}

/// Files called `name` anywhere under `dir`.
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_named(&path, name));
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(path);
        }
    }
    out
}

fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let root = repo();
    let (blocks, skipped) = walkthrough_blocks(&read(&root.join("README.md")));
    assert_eq!(skipped, 1, "only the build step is skipped");
    let body = blocks.join("\n");
    for needed in [
        "lockstep serve",
        "lockstep deploy",
        "--wait",
        "lockstep guard",
        "lockstep verify",
        "lockstep rollback",
    ] {
        assert!(
            body.contains(needed),
            "the walk-through no longer runs `{needed}`"
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let tmp = dir.path().join("tmp");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&tmp).expect("tmp");
    std::fs::create_dir_all(&home).expect("home");
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples"))
        .expect("link examples/");
    let script = format!(
        "set -uo pipefail\n\
         trap 'echo \"README walk-through: exit $? at line $LINENO of walkthrough.sh: $BASH_COMMAND\" >&2; exit 1' ERR\n\
         {body}"
    );
    let script_path = dir.path().join("walkthrough.sh");
    std::fs::write(&script_path, &script).expect("write the script");

    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lockstep"));
    let bin_dir = bin.parent().expect("the binary's directory");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let out_path = dir.path().join("output.txt");
    let out = std::fs::File::create(&out_path).expect("output file");
    // A fresh shell as a newcomer has it: nothing of ours, no LOCKSTEP_* from this process.
    let mut child = Command::new("bash")
        .arg(&script_path)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .env("LANG", "C.UTF-8")
        .env("LOCKSTEP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("bash");
    let pgid = child.id();

    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > BUDGET {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // What the walk-through started it must stop; give stragglers a moment, then clean up
    // whatever is left either way.
    let mut left = still_running(pgid);
    let grace = Instant::now();
    while !left.is_empty() && grace.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        left = still_running(pgid);
    }
    kill_group(pgid, "-TERM");
    std::thread::sleep(Duration::from_millis(300));
    kill_group(pgid, "-KILL");
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    let output = read(&out_path);
    let numbered: String = script
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{:>3} {l}\n", i + 1))
        .collect();
    let mut report = format!("--- walkthrough.sh\n{numbered}--- output\n{output}");
    for log in files_named(&tmp, "serve.log") {
        report.push_str(&format!("--- {}\n{}", log.display(), read(&log)));
    }
    match status {
        None => panic!("the walk-through did not finish within {BUDGET:?}\n{report}"),
        Some(s) => assert!(s.success(), "the walk-through failed ({s})\n{report}"),
    }
    assert!(
        left.is_empty(),
        "the walk-through left processes running: {left:?}\n{report}"
    );
    for expected in [
        "every live instance runs",
        "[OK] all",
        "refused: exit 78",
        "rolled back to production/api",
    ] {
        assert!(
            output.contains(expected),
            "the walk-through's output lacks {expected:?}\n{report}"
        );
    }
    assert!(
        !output.contains("this never runs"),
        "the guard started a stale release\n{report}"
    );
}

/// Markdown files an operator reads.
fn documentation(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Markdown outside fenced code blocks and inline code spans.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans: the odd-numbered pieces between backticks.
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 0 {
                out.push_str(piece);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of `[text](target)` links.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// GitHub's anchors for the headings of a markdown file.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim().to_lowercase();
        let slug: String = title
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        out.insert(slug);
    }
    out
}

/// `path` with `.` and `..` resolved lexically; `None` when it climbs above the start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

#[test]
fn docs_links_resolve_inside_the_repository() {
    let root = repo();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in documentation(&root) {
        let text = read(&file);
        let rel_file = file.strip_prefix(&root).expect("inside").to_path_buf();
        let base = rel_file.parent().unwrap_or(Path::new("")).to_path_buf();
        let name = rel_file.display().to_string();
        if text.contains("shared/design.md") || text.contains("../shared") {
            problems.push(format!(
                "{name}: refers to a contract outside the repository"
            ));
        }
        for link in links(&prose(&text)) {
            checked += 1;
            if link.contains("://") || link.starts_with("//") || link.starts_with("mailto:") {
                problems.push(format!("{name}: {link} points outside the repository"));
                continue;
            }
            let (target, anchor) = match link.split_once('#') {
                Some((t, a)) => (t, Some(a)),
                None => (link.as_str(), None),
            };
            let target_file = if target.is_empty() {
                Some(rel_file.clone())
            } else if target.starts_with('/') {
                None
            } else {
                normalize(&base.join(target))
            };
            let Some(target_file) = target_file else {
                problems.push(format!("{name}: {link} leaves the repository"));
                continue;
            };
            let full = root.join(&target_file);
            if !full.exists() {
                problems.push(format!("{name}: {link} does not exist"));
                continue;
            }
            if let Some(anchor) = anchor
                && full.extension().is_some_and(|x| x == "md")
                && !anchors(&read(&full)).contains(anchor)
            {
                problems.push(format!("{name}: {link}: no heading with that anchor"));
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

fn lockstep_help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .arg("--help")
        .output()
        .expect("lockstep --help");
    assert!(out.status.success(), "lockstep {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommand names listed under `Commands:` in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags of a help text's `Options:` (without `--help` and `--version`).
fn long_flags(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Options:")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']).filter(|w| w.starts_with("--")))
        .map(str::to_string)
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn cli_reference_covers_every_subcommand_and_flag() {
    let doc = read(&repo().join("docs/cli.md"));
    let top = lockstep_help(&[]);
    // Global flags appear in every subcommand's help; the reference describes them once,
    // before the first command's section.
    let global = long_flags(&top);
    let conventions = &doc[..doc.find("\n## `lockstep ").unwrap_or(doc.len())];
    let mut problems: Vec<String> = global
        .iter()
        .filter(|f| !conventions.contains(&format!("`{f}")))
        .map(|f| format!("the global flag {f} is not described before the commands"))
        .collect();
    let mut commands = Vec::new();
    for c in subcommands(&top) {
        let nested = subcommands(&lockstep_help(&[&c]));
        if nested.is_empty() {
            commands.push(vec![c]);
        } else {
            commands.extend(nested.into_iter().map(|n| vec![c.clone(), n]));
        }
    }
    assert!(commands.len() > 5, "found only {commands:?}");
    for cmd in &commands {
        let name = cmd.join(" ");
        let heading = format!("## `lockstep {name}`");
        let Some(start) = doc.find(&heading) else {
            problems.push(format!("no section {heading}"));
            continue;
        };
        let body = &doc[start + heading.len()..];
        let section = &body[..body.find("\n## ").unwrap_or(body.len())];
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        for flag in long_flags(&lockstep_help(&args)) {
            if !global.contains(&flag) && !section.contains(&format!("`{flag}")) {
                problems.push(format!("{heading}: {flag} is not described"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/cli.md is behind `lockstep --help` (regenerate its flag tables):\n{}",
        problems.join("\n")
    );
}

/// `GET path` over a plain socket; the body of the answer.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to serve");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_string()
}

#[test]
fn api_guide_covers_every_endpoint() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("LOCKSTEP_ADMIN_TOKEN", "lst_api_guide_test")
        .env_remove("LOCKSTEP_STORE")
        .env_remove("LOCKSTEP_REDIS_MIRROR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("lockstep serve");
    let mut stdout = std::io::BufReader::new(serve.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("first line");
    // Keep reading: serve stops when it cannot write the rest of its banner.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = first
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_string();
    let spec = http_get(&addr, "/openapi.json");
    let _ = serve.kill();
    let _ = serve.wait();
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("openapi.json is JSON");
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.len() > 5, "only {} paths", paths.len());
    let guide = read(&repo().join("docs/api.md"));
    let missing: Vec<String> = paths
        .iter()
        .flat_map(|(path, item)| {
            let methods: Vec<String> = item
                .as_object()
                .map(|o| o.keys().map(|m| m.to_uppercase()).collect())
                .unwrap_or_default();
            methods.into_iter().map(move |m| format!("{m} {path}"))
        })
        .filter(|endpoint| !guide.contains(&format!("`{endpoint}")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/api.md does not describe: {missing:?}"
    );
}
