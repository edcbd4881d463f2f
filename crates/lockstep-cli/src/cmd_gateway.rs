//! `lockstep gateway`: loads the configuration, prints the address, serves until SIGTERM
//! or Ctrl-C, reloads on SIGHUP (the gateway also reloads by itself when the file changes).

use crate::exit;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// `lockstep gateway`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  lockstep gateway --config gateway.toml
  lockstep gateway --config gateway.toml --listen 0.0.0.0:8080
  lockstep gateway --config gateway.toml --check-config    # exit 0 when valid, 2 otherwise
  kill -HUP $(pidof lockstep)                                # reload now (also automatic on change)

The first line on stdout is `listening on http://ADDR`; with `admin_listen` set, the second is
`admin on http://ADDR` (serving /metrics, /healthz, /readyz). See docs/gateway.md.")]
pub struct GatewayArgs {
    /// The gateway configuration file (TOML).
    #[arg(long, env = "LOCKSTEP_GATEWAY_CONFIG")]
    pub config: PathBuf,
    /// Address to listen on, overriding `listen` in the file (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Only check the configuration: print a summary and exit 0, or the error and exit 2.
    #[arg(long)]
    pub check_config: bool,
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<u8> {
    if a.check_config {
        return match lockstep_gateway::Compiled::load(&a.config) {
            Ok(c) => {
                println!(
                    "configuration ok: {} routes, environments {}, rate limits {}",
                    c.routes.len(),
                    c.environments().join(", "),
                    if c.file.rate_limit.redis.is_some() {
                        "in Redis"
                    } else {
                        "local"
                    }
                );
                Ok(exit::OK)
            }
            Err(e) => Err(exit::fail(exit::USAGE, e.to_string())),
        };
    }
    let gw = lockstep_gateway::Gateway::start(&a.config, a.listen.as_deref())
        .await
        .map_err(|e| exit::fail(exit::USAGE, e.to_string()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", gw.addr())?;
        if let Some(admin) = gw.admin_addr() {
            writeln!(out, "admin on http://{admin}")?;
        }
        out.flush()?;
    }
    let reloader = gw.reloader();
    let hup = tokio::spawn(async move {
        let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while s.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = reloader.reload();
        }
    });
    gw.run_until(async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
    })
    .await;
    hup.abort();
    Ok(exit::OK)
}
