//! `hangar egress serve`: the egress proxy, with Smokescreen's flag names.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hangar_egress::ip::{AddressRule, Cidr};
use hangar_egress::{Acl, IpPolicy, Proxy};

#[derive(Args)]
pub struct EgressArgs {
    #[command(subcommand)]
    command: EgressCommand,
}

#[derive(Subcommand)]
enum EgressCommand {
    /// Run the SSRF-safe egress proxy
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    listen_ip: String,
    #[arg(long, default_value_t = 4750)]
    listen_port: u16,
    /// Smokescreen v1 ACL (YAML); without one, every host is allowed (the IP policy still applies)
    #[arg(long)]
    egress_acl_file: Option<PathBuf>,
    #[arg(long = "deny-range", value_name = "CIDR")]
    deny_ranges: Vec<String>,
    #[arg(long = "allow-range", value_name = "CIDR")]
    allow_ranges: Vec<String>,
    #[arg(long = "deny-address", value_name = "IP[:PORT]")]
    deny_addresses: Vec<String>,
    #[arg(long = "allow-address", value_name = "IP[:PORT]")]
    allow_addresses: Vec<String>,
    /// Connect timeout, e.g. 10s
    #[arg(long, default_value = "10s")]
    timeout: String,
    #[arg(long, default_value = "5s")]
    dns_timeout: String,
    /// A DNS server (IP:PORT) to resolve with, instead of the system resolver
    #[arg(long)]
    resolver_address: Option<String>,
    #[arg(long)]
    max_concurrent_requests: Option<usize>,
    #[arg(long)]
    max_concurrent_connect_tunnels: Option<usize>,
    /// Allow the private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7); never loopback or link-local
    #[arg(long)]
    unsafe_allow_private_ranges: bool,
    /// Listen with TLS: a PEM file with the certificate chain and its key
    #[arg(long)]
    tls_server_bundle_file: Option<PathBuf>,
    /// Ask TLS clients for certificates signed by these CAs; the certificate's common name is the role
    #[arg(long, requires = "tls_server_bundle_file")]
    tls_client_ca_file: Option<PathBuf>,
    /// Serve Prometheus metrics
    #[arg(long)]
    expose_prometheus_metrics: bool,
    #[arg(long, default_value = "/metrics")]
    prometheus_endpoint: String,
    #[arg(long, default_value = "127.0.0.1")]
    prometheus_listen_ip: String,
    #[arg(long, default_value_t = 9810)]
    prometheus_port: u16,
    /// A Proxy-Authorization secret and the role it gives, SECRET=ROLE (SECRET is a password or user:password; repeatable).
    /// PROXY_PASSWORD in the environment gives the role "authed", as Fly's Smokescreen does.
    #[arg(long = "role", value_name = "SECRET=ROLE")]
    roles: Vec<String>,
}

/// A duration flag: `10s`, `500ms`, `1m`, or seconds (the grammar of every
/// duration in Hangar, the `fundu` crate's).
fn seconds(flag: &str, s: &str) -> Result<Duration> {
    fundu::DurationParser::new()
        .parse(s.trim())
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .with_context(|| format!("--{flag} {s:?}: expected a duration like 10s or 500ms"))
}

fn parse_all<T: std::str::FromStr<Err = String>>(flag: &str, values: &[String]) -> Result<Vec<T>> {
    values
        .iter()
        .map(|v| v.parse::<T>().map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
        .collect()
}

pub fn run(args: EgressArgs) -> Result<()> {
    let EgressCommand::Serve(a) = args.command;
    let load = |path: &Option<PathBuf>| -> Result<Acl> {
        match path {
            Some(p) => Acl::load(p).map_err(|e| anyhow::anyhow!("invalid ACL: {e}")),
            None => Ok(Acl::open()),
        }
    };
    let acl = load(&a.egress_acl_file)?;
    let listen: std::net::SocketAddr = format!("{}:{}", a.listen_ip, a.listen_port)
        .parse()
        .or_else(|_| format!("[{}]:{}", a.listen_ip, a.listen_port).parse())
        .with_context(|| format!("--listen-ip {:?} is not an IP address", a.listen_ip))?;
    let ip = IpPolicy {
        deny_ranges: parse_all::<Cidr>("deny-range", &a.deny_ranges)?,
        allow_ranges: parse_all::<Cidr>("allow-range", &a.allow_ranges)?,
        deny_addresses: parse_all::<AddressRule>("deny-address", &a.deny_addresses)?,
        allow_addresses: parse_all::<AddressRule>("allow-address", &a.allow_addresses)?,
        unsafe_allow_private_ranges: a.unsafe_allow_private_ranges,
        own_addresses: vec![listen],
    };
    let mut proxy = Proxy::new(acl, ip);
    proxy.connect_timeout = seconds("timeout", &a.timeout)?;
    proxy.dns_timeout = seconds("dns-timeout", &a.dns_timeout)?;
    proxy.resolver = match &a.resolver_address {
        Some(r) => Some(
            r.parse()
                .or_else(|_| format!("{r}:53").parse())
                .with_context(|| format!("--resolver-address {r:?} is not IP:PORT"))?,
        ),
        None => None,
    };
    proxy.requests = a
        .max_concurrent_requests
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    proxy.tunnels = a
        .max_concurrent_connect_tunnels
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    for r in &a.roles {
        let (secret, role) = r
            .rsplit_once('=')
            .with_context(|| format!("--role {r:?} must be SECRET=ROLE"))?;
        proxy.roles.push((secret.to_string(), role.to_string()));
    }
    if let Ok(pw) = std::env::var("PROXY_PASSWORD") {
        proxy.roles.push((pw, "authed".to_string()));
    }
    let tls = match &a.tls_server_bundle_file {
        Some(bundle) => Some(
            hangar_egress::tls::server_config(bundle, a.tls_client_ca_file.as_deref())
                .map_err(|e| anyhow::anyhow!("TLS setup: {e}"))?,
        ),
        None => None,
    };
    let proxy = Arc::new(proxy);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| {
                format!("cannot listen on {listen}; pick another with --listen-ip/--listen-port")
            })?;
        tracing::info!("listening on {}", listener.local_addr()?);
        if a.expose_prometheus_metrics {
            let addr = format!("{}:{}", a.prometheus_listen_ip, a.prometheus_port);
            let metrics = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics; see --prometheus-listen-ip/--prometheus-port"))?;
            tracing::info!("metrics on http://{}{}", metrics.local_addr()?, a.prometheus_endpoint);
            tokio::spawn(hangar_egress::proxy::serve_metrics(proxy.clone(), metrics, a.prometheus_endpoint.clone()));
        }
        // SIGHUP reloads the ACL; a bad file keeps the old one.
        {
            let (proxy, path) = (proxy.clone(), a.egress_acl_file.clone());
            tokio::spawn(async move {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match load(&path) {
                        Ok(acl) => {
                            proxy.reload(acl);
                            tracing::info!("ACL reloaded");
                        }
                        Err(e) => tracing::warn!("keeping the old ACL: {e:#}"),
                    }
                }
            });
        }
        hangar_egress::proxy::serve(proxy, listener, tls, crate::shutdown_signal()).await;
        Ok::<_, anyhow::Error>(())
    })
}
