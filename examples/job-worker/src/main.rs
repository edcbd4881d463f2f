//! `job-worker`: a queue consumer that never processes a job with outdated logic.
//!
//! Before each job it asks `watcher.is_current()` (one atomic load); when the expected
//! release moves away from what it runs, `watcher.changed()` fires, it finishes the job in
//! hand, takes no more, deregisters and exits 0 so its supervisor starts the new release.
//!
//! Jobs come one per line on stdin, or `--jobs N` synthetic ones every `--interval`.
//!
//! ```sh
//! seq 1 100 | LOCKSTEP_SERVICE=extractor LOCKSTEP_VERSION_ID=$ID job-worker
//! ```

use anyhow::Context;
use clap::Parser;
use lockstep_client::{HeartbeatTask, RegistryClient, Watcher, WatcherConfig};
use lockstep_core::{parse_duration, short_id};
use std::io::Write;
use std::time::Duration;

/// An example job worker that drains when its release is no longer expected.
#[derive(Parser)]
#[command(
    version,
    after_help = "Example:\n  seq 1 100 | LOCKSTEP_SERVICE=extractor LOCKSTEP_VERSION_ID=v1 job-worker"
)]
struct Args {
    /// Process this many synthetic jobs instead of reading stdin.
    #[arg(long)]
    jobs: Option<u64>,
    /// Time each synthetic job takes.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    interval: Duration,
}

enum Queue {
    Synthetic {
        next: u64,
        last: u64,
    },
    /// Lines read by a thread (blocking stdin stays off the runtime).
    Stdin(tokio::sync::mpsc::Receiver<String>),
}

impl Queue {
    async fn next(&mut self) -> Option<String> {
        match self {
            Queue::Synthetic { next, last } => {
                if *next > *last {
                    return None;
                }
                *next += 1;
                Some(format!("job-{}", *next - 1))
            }
            Queue::Stdin(lines) => lines.recv().await,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let info = lockstep_client::build_info!();
    lockstep_client::guard::enforce(&info);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colour codes only on a terminal: redirected logs stay plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = WatcherConfig::from_env(info.git_sha).context("configuration")?;
    let watcher = Watcher::start(cfg.clone())?;
    let beats = HeartbeatTask::spawn(
        RegistryClient::new(&cfg.registry, cfg.token.clone())?,
        lockstep_client::heartbeat_for(&cfg, Some(info.git_sha), std::process::id(), None),
        Some(watcher.clone()),
    );
    let mut queue = match args.jobs {
        Some(n) => Queue::Synthetic { next: 1, last: n },
        None => {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            std::thread::spawn(move || {
                for line in std::io::stdin().lines().map_while(Result::ok) {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
            Queue::Stdin(rx)
        }
    };
    let version = short_id(&cfg.version_id).to_string();
    let mut out = std::io::stdout();
    let mut drained = false;
    loop {
        let job = tokio::select! {
            // Checked first: a change that arrives while waiting for work wins.
            biased;
            _ = watcher.changed() => { drained = true; break; }
            job = queue.next() => job,
        };
        let Some(job) = job else { break };
        // The last line of defence: never start a job on a release that is not expected.
        if !watcher.is_current() {
            drained = true;
            break;
        }
        if let Queue::Synthetic { .. } = queue {
            tokio::time::sleep(args.interval).await;
        }
        writeln!(out, "processed {job} on {version}")?;
        out.flush()?;
    }
    if drained {
        writeln!(out, "draining: the expected release changed")?;
        out.flush()?;
        tracing::warn!(running = %version, "stopping: this release is no longer expected");
    }
    beats.shutdown().await;
    Ok(())
}
