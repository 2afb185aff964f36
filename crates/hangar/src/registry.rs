//! `hangar registry`: serve the multi-tenant registry, manage its tokens and
//! public repositories, and collect its garbage.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hangar_registry::auth::Auth;
use hangar_registry::storage::RegistryStore;
use hangar_registry::{Config, Registry};

#[derive(Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    command: RegistryCommand,
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Serve the OCI distribution API (data under $HANGAR_HOME/registry)
    Serve {
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: String,
        /// Serve Prometheus metrics at http://ADDR/metrics
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<String>,
        /// Largest blob accepted, in bytes
        #[arg(long, default_value_t = 10 << 30)]
        max_blob_size: u64,
        /// Remove uploads untouched this long (e.g. 30m, 1h)
        #[arg(long, default_value = "1h")]
        upload_timeout: String,
        /// Serve HTTPS with this certificate chain (PEM), with --tls-key
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The certificate's private key (PEM)
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// A proxy in front of the registry whose X-Forwarded-Proto/-Host name the token realm (repeatable)
        #[arg(long, value_name = "IP")]
        trusted_proxy: Vec<std::net::IpAddr>,
        /// No access log line per request on stderr
        #[arg(long)]
        no_access_log: bool,
    },
    /// Create, list and revoke API tokens
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Allow (or with --off, stop) anonymous pulls of a repository
    Public {
        /// Repository, <org>/<repo>
        name: String,
        #[arg(long)]
        off: bool,
    },
    /// Delete blobs no repository's manifests use, abandoned uploads and empty repositories (stop the registry first)
    Gc {
        /// Say what would be removed, and remove nothing
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for an org; prints the token alone on stdout
    Create {
        #[arg(long)]
        org: String,
        /// The token may pull but not push or delete
        #[arg(long)]
        read_only: bool,
        /// Lifetime, e.g. 30d, 12h, 45m (default: no expiry)
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (never their secrets)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id
    Revoke { id: String },
}

/// `30d`, `12h`, `45m`, `90s`, `1.5h`: the grammar of every duration in
/// Hangar (the `fundu` crate's).
fn parse_duration(s: &str) -> Result<Duration> {
    fundu::DurationParser::new()
        .parse(s.trim())
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .with_context(|| {
            format!("duration {s:?}: expected a number and a unit, like 30d, 12h, 45m or 90s")
        })
}

/// `hangar registry token ...` and `hangar auth token ...`: one set of
/// org tokens for the registry and the node's API.
pub fn token(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            org,
            read_only,
            expires,
        } => {
            let ttl = expires
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .map(|d| d.as_secs());
            let (_, token) = auth()?.create(&org, read_only, ttl)?;
            println!("{token}");
        }
        TokenCommand::List { json } => {
            let tokens = auth()?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!(
                    "{:<14} {:<20} {:<10} {:<22} EXPIRES",
                    "ID", "ORG", "ACCESS", "CREATED"
                );
                for t in tokens {
                    let expires = t
                        .expires
                        .map_or("never".to_string(), hangar_oci::build::rfc3339);
                    let access = if t.read_only { "read" } else { "read-write" };
                    println!(
                        "{:<14} {:<20} {:<10} {:<22} {expires}",
                        t.id,
                        t.org,
                        access,
                        hangar_oci::build::rfc3339(t.created)
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let t = auth()?.revoke(&id)?;
            println!("revoked token {} of org {}", t.id, t.org);
        }
    }
    Ok(())
}

/// The registry's token store under `$HANGAR_HOME`.
/// In a cluster (the node's config names etcd) the tokens are the
/// cluster's, in etcd.
pub fn auth() -> Result<Auth> {
    let home = crate::home()?;
    let etcd = match crate::node_config::StateAt::of_home(&home).etcd {
        Some(endpoints) => Some(std::sync::Arc::new(
            hangar_api::store::EtcdStore::open(&endpoints).with_context(|| {
                format!("the node's tokens are in etcd at {endpoints}, which does not answer")
            })?,
        )),
        None => None,
    };
    auth_in(&home, etcd)
}

/// The registry's token store under `home`, or the cluster's in `etcd`.
pub fn auth_in(
    home: &std::path::Path,
    etcd: Option<std::sync::Arc<hangar_api::store::EtcdStore>>,
) -> Result<Auth> {
    let store = RegistryStore::open(home)?;
    let auth = Auth::open(store.root())?;
    Ok(match etcd {
        Some(etcd) => auth.with_tokens(std::sync::Arc::new(crate::bridges::ClusterTokens(etcd))),
        None => auth,
    })
}

pub fn run(args: RegistryArgs) -> Result<()> {
    match args.command {
        RegistryCommand::Serve {
            listen,
            admin_listen,
            max_blob_size,
            upload_timeout,
            tls_cert,
            tls_key,
            trusted_proxy,
            no_access_log,
        } => {
            let config = Config {
                max_blob_size,
                upload_timeout: parse_duration(&upload_timeout)?,
                access_log: !no_access_log,
                trusted_proxies: trusted_proxy,
            };
            // The edge's loader; the registry speaks HTTP/1.1 only.
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => {
                    let loaded = hangar_edge::server::tls_config(&cert, &key)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let mut config = (*loaded).clone();
                    config.alpn_protocols = vec![b"http/1.1".to_vec()];
                    Some(Arc::new(config))
                }
                _ => None,
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let home = crate::home()?;
            let registry = Arc::new(Registry::open(&home, config)?);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}; is another registry running there? pick another with --listen"))?;
                tracing::info!(
                    "registry serving {scheme}://{} (data in {})",
                    listener.local_addr()?,
                    registry.store.root().display()
                );
                if let Some(admin) = admin_listen {
                    let admin_listener = tokio::net::TcpListener::bind(&admin)
                        .await
                        .with_context(|| format!("cannot listen on {admin} for metrics"))?;
                    tracing::info!("registry metrics on http://{}/metrics", admin_listener.local_addr()?);
                    tokio::spawn(hangar_registry::serve_admin(registry.clone(), admin_listener));
                }
                hangar_registry::serve(registry, listener, tls, crate::shutdown_signal()).await;
                tracing::info!("stopped");
                Ok::<_, anyhow::Error>(())
            })?;
        }
        RegistryCommand::Token { command } => token(command)?,
        RegistryCommand::Public { name, off } => {
            if !hangar_oci::reference::valid_repository(&name) || !name.contains('/') {
                bail!("{name:?} is not a repository name; use <org>/<repo>, lowercase");
            }
            let store = RegistryStore::open(&crate::home()?)?;
            store.set_public(&name, !off)?;
            println!("{name}: anonymous pull {}", if off { "off" } else { "on" });
        }
        RegistryCommand::Gc { dry_run } => {
            let store = RegistryStore::open(&crate::home()?)?;
            let r = store.gc(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} blobs ({} bytes), {} abandoned uploads ({} bytes), {} empty repositories{}{}",
                r.blobs.blobs,
                r.blobs.bytes,
                r.uploads,
                r.upload_bytes,
                r.empty_repos.len(),
                if r.empty_repos.is_empty() { "" } else { ": " },
                r.empty_repos.join(", ")
            );
            println!(
                "{} {} bytes in all",
                if dry_run { "would free" } else { "freed" },
                r.blobs.bytes + r.upload_bytes
            );
        }
    }
    Ok(())
}
