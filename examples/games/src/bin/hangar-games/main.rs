//! `hangar-games`: the game server as a Hangar app (`hangar-games serve`,
//! the image's command); `hangar-games arena`, tournaments between AI
//! players and their reports; and, for tests and benchmarks,
//! `hangar-games load` (scripted players against a server) and
//! `hangar-games scripted-model` (a scripted OpenAI-compatible endpoint).
//!
//! The server listens on `PORT` (8080) for players, through the edge, and
//! on `GAMES_PEER_PORT` (8081) for its peers, over the org's private
//! network. It finds the peers as `<HANGAR_APP_NAME>.internal` and itself
//! as `HANGAR_PRIVATE_IP` (outside Hangar: `GAMES_PEERS` and `GAMES_SELF`).

#![forbid(unsafe_code)]

mod arena;
mod cluster;
mod load;
mod peer;
mod peers;
mod scripted;
mod store;
mod view;
mod web;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The turn-based game server Hangar runs as an example app")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve games (the app's command)
    Serve,
    /// Play scripted games against a server, as the benchmark does
    Load(load::LoadArgs),
    /// Tournaments between AI players: run one, or write its reports
    #[command(subcommand)]
    Arena(arena::ArenaCommand),
    /// An OpenAI-compatible endpoint with scripted players, for tests
    ScriptedModel(scripted::ScriptedArgs),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn port(name: &str, default: u16) -> Result<u16> {
    match env(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a port number")),
    }
}

/// `1800`, `90s`, `30m`, `2h`.
fn duration(name: &str, default: Duration) -> Result<Duration> {
    let Some(v) = env(name) else {
        return Ok(default);
    };
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v.as_str(), "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{name}={v:?} is not a duration such as 30m or 90s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("{name}={v:?}: the units are ms, s, m and h"),
    })
}

async fn serve() -> Result<()> {
    let public_port = port("PORT", 8080)?;
    let peer_port = port("GAMES_PEER_PORT", 8081)?;
    let (source, me) = match (env("GAMES_PEERS"), env("HANGAR_APP_NAME")) {
        (Some(list), _) => {
            let me = env("GAMES_SELF").context(
                "GAMES_PEERS needs GAMES_SELF: this server's own peer address (ip:port)",
            )?;
            let peers = list.split(',').map(|p| p.trim().to_string()).collect();
            (peers::Source::Fixed(peers), me)
        }
        (None, Some(app)) => {
            let ip: std::net::IpAddr = env("HANGAR_PRIVATE_IP")
                .context("HANGAR_PRIVATE_IP is not set: Hangar sets it in every machine")?
                .parse()
                .context("HANGAR_PRIVATE_IP is not an address")?;
            let name = env("GAMES_PEERS_DNS").unwrap_or_else(|| format!("{app}.internal"));
            (
                peers::Source::Dns {
                    name,
                    port: peer_port,
                },
                SocketAddr::new(ip, peer_port).to_string(),
            )
        }
        (None, None) => {
            let me = format!("127.0.0.1:{peer_port}");
            (peers::Source::Fixed(vec![me.clone()]), me)
        }
    };
    let replicate = match env("GAMES_REPLICATION").as_deref() {
        None | Some("on") => true,
        Some("off") => false,
        Some(v) => bail!("GAMES_REPLICATION={v:?}: it is on or off"),
    };
    let settings = cluster::Settings {
        replicate,
        idle: duration("GAMES_IDLE", Duration::from_secs(30 * 60))?,
    };
    let poll = duration("GAMES_POLL", Duration::from_millis(250))?;
    tracing::info!(
        me,
        replicate,
        idle = ?settings.idle,
        "game server on port {public_port}, peers on {peer_port}"
    );
    let view = peers::follow(source, me.clone(), poll);
    let cluster = cluster::Cluster::new(me, view, settings);
    cluster.spawn_tasks();
    let public = tokio::net::TcpListener::bind(("::", public_port))
        .await
        .with_context(|| format!("cannot listen on port {public_port}"))?;
    let private = tokio::net::TcpListener::bind(("::", peer_port))
        .await
        .with_context(|| format!("cannot listen on port {peer_port}"))?;
    // Small messages both ways: no Nagle delay on either listener.
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    };
    let peers = axum::serve(
        private.tap_io(nodelay),
        peer::routes(cluster.clone()).into_make_service(),
    );
    let players = axum::serve(
        public.tap_io(nodelay),
        web::routes(cluster).into_make_service(),
    );
    tokio::select! {
        r = peers => r.context("the peer server stopped")?,
        r = players => r.context("the game server stopped")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    Ok(())
}

async fn terminate() {
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GAMES_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve => rt.block_on(serve()),
        Command::Load(args) => rt.block_on(load::run(args)),
        Command::Arena(cmd) => rt.block_on(arena::main(cmd)),
        Command::ScriptedModel(args) => rt.block_on(scripted::main(args)),
    }
}
