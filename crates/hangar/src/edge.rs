//! `hangar edge serve`: the edge proxy on its own, from an `edge.toml`.
//! SIGHUP re-reads the file's hosts (backends change without a restart).

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use hangar_edge::Config;

#[derive(Args)]
pub struct EdgeArgs {
    #[command(subcommand)]
    command: EdgeCommand,
}

#[derive(Subcommand)]
enum EdgeCommand {
    /// Run the edge proxy and cache in the foreground
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The edge configuration (TOML): listen, hosts and their backends, cache, tls, admin
    #[arg(long, short)]
    config: PathBuf,
    /// Override `listen` from the file
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

pub fn run(args: EdgeArgs) -> Result<()> {
    let EdgeCommand::Serve(args) = args.command;
    let mut config = Config::load(&args.config)?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = hangar_edge::start(&config, None, async move {
            let _ = stop_rx.await;
        })
        .await
        .map_err(|e| anyhow!(e))?;
        let edge = running.edge;
        tracing::info!("serving on http://{}", running.http);
        for h in &config.hosts {
            tracing::info!("  {} -> {} backend(s)", h.name, h.backends.len());
        }
        if let Some(t) = running.tls {
            tracing::info!("TLS on https://{t}");
        }
        if let Some(a) = running.admin {
            tracing::info!("admin (metrics, purge) on http://{a}");
        }
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch SIGHUP")?;
        let shutdown = crate::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = hup.recv() => match Config::load(&args.config) {
                    Ok(new) => {
                        edge.set_hosts(&new.hosts);
                        edge.set_mesh(new.mesh.clone().unwrap_or_default());
                        tracing::info!("reloaded {} host(s) from {}", new.hosts.len(), args.config.display());
                    }
                    Err(e) => tracing::warn!("not reloaded, the old hosts stay: {e}"),
                },
            }
        }
        let _ = stop_tx.send(());
        tracing::info!("stopped");
        Ok(())
    })
}
