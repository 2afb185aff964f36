//! `hangar up`: run a node in the foreground: the state store, the Machines
//! API, the reconcile loop, and the services that have landed (the registry).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hangar_api::server::{Api, Puller};
use hangar_api::{Node, State};
use hangar_machine::Runtime;
use hangar_oci::client::{NoProgress, PullOptions};

use crate::node_config::{self, NodeConfig};

#[derive(Args)]
pub struct UpArgs {
    /// Where the Machines API listens
    #[arg(long, default_value = "127.0.0.1:4280")]
    listen: String,
    /// Where the registry listens
    #[arg(long, default_value = "127.0.0.1:5000")]
    registry_listen: String,
    /// Do not run the registry
    #[arg(long)]
    no_registry: bool,
    /// Stop all machines when the node shuts down (default: they keep running)
    #[arg(long)]
    stop_machines: bool,
}

/// The static hangar-init to put in machines: `$HANGAR_INIT`, else
/// `target/init/hangar-init` beside this build (scripts/build-init makes it).
pub fn init_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("HANGAR_INIT") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().context("cannot find the hangar binary")?;
            exe.parent()
                .and_then(|d| d.parent())
                .map(|t| t.join("init/hangar-init"))
                .unwrap_or_default()
        }
    };
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "hangar-init not found at {}; build it with scripts/build-init or set HANGAR_INIT",
            path.display()
        )
    })?;
    if bytes.windows(12).any(|w| w == b"/lib64/ld-li") {
        bail!(
            "{} is dynamically linked; machines need the static build from scripts/build-init",
            path.display()
        );
    }
    Ok(path)
}

fn random_token() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(format!(
        "hgn_{}",
        buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

async fn pull_image(
    store: hangar_oci::Store,
    reference: hangar_oci::Reference,
) -> Result<(), String> {
    let progress: Arc<dyn hangar_oci::client::Progress> = Arc::new(NoProgress);
    let opts = PullOptions::default();
    let result = hangar_oci::client::pull(&store, &reference, &opts, progress).await;
    result.map(|_| ()).map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub fn run(args: UpArgs) -> Result<()> {
    let home = crate::home()?;
    let init = init_binary()?;
    let runtime = Runtime::open(&home, init)?;
    let state = State::open(&home)?;
    let exe = std::env::current_exe().context("cannot find the hangar binary")?;
    let node = Arc::new(Node::new(state, runtime, exe));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}; is another node running? pick another with --listen", args.listen))?;
        let addr = listener.local_addr()?;
        let token = match node_config::load(&home) {
            Ok(c) => c.token,
            Err(_) => random_token()?,
        };
        node_config::save(&home, &NodeConfig { api: format!("http://{addr}"), token: token.clone() })?;
        eprintln!("hangar up: Machines API on http://{addr} (token in {})", node_config::path(&home).display());

        if !args.no_registry {
            let registry = Arc::new(hangar_registry::Registry::open(&home, hangar_registry::Config::default())?);
            let reg_listener = tokio::net::TcpListener::bind(&args.registry_listen)
                .await
                .with_context(|| format!("cannot listen on {} for the registry; use --registry-listen or --no-registry", args.registry_listen))?;
            eprintln!("hangar up: registry on http://{}", reg_listener.local_addr()?);
            tokio::spawn(hangar_registry::serve(registry, reg_listener, std::future::pending()));
        }

        let store = node.runtime.store().clone();
        let pull: Puller = Arc::new(move |reference| Box::pin(pull_image(store.clone(), reference)));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (node, stopping) = (node.clone(), stopping.clone());
            std::thread::spawn(move || {
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    node.reconcile();
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let api = Arc::new(Api { node: node.clone(), token, pull });
        hangar_api::server::serve(api, listener, shutdown_signal()).await;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if args.stop_machines {
            eprintln!("hangar up: stopping machines");
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.stop_all()).await?;
        }
        eprintln!("hangar up: stopped");
        Ok::<_, anyhow::Error>(())
    })
}
