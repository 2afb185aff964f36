//! `hangar up`: run a node in the foreground: the state store, the Machines
//! and Apps API, the reconcile loop, health checks, the registry, the
//! egress proxy, and the edge (fed each app's healthy machines, live; see
//! `scale.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hangar_api::server::{Api, Puller};
use hangar_api::{EtcdStore, Node, SqliteStore, Store};
use hangar_machine::Runtime;

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
    /// Where the edge proxy listens: apps are served at http://<app>.localhost:<port>
    #[arg(long, default_value = "127.0.0.1:8080")]
    edge_listen: std::net::SocketAddr,
    /// Where the edge's admin endpoint (metrics, purge with the node token) listens
    #[arg(long, default_value = "127.0.0.1:4281")]
    edge_admin_listen: std::net::SocketAddr,
    /// Also serve apps over HTTPS here (HTTP/2 and HTTP/1.1), with
    /// --edge-tls-cert and --edge-tls-key; apps with force_https redirect to it
    #[arg(long, requires_all = ["edge_tls_cert", "edge_tls_key"])]
    edge_tls_listen: Option<std::net::SocketAddr>,
    /// The edge's certificate chain (PEM)
    #[arg(long, requires = "edge_tls_listen")]
    edge_tls_cert: Option<PathBuf>,
    /// The edge's private key (PEM)
    #[arg(long, requires = "edge_tls_listen")]
    edge_tls_key: Option<PathBuf>,
    /// Do not run the edge proxy
    #[arg(long)]
    no_edge: bool,
    /// Do not serve `.internal` DNS to machines (each org net's resolver on
    /// port 53 of its gateway); machines then have no resolver
    #[arg(long)]
    no_dns: bool,
    /// Apps are served at <app>.<domain>
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Let orgs pull from this registry (HOST:PORT as in image references)
    /// although it is at a private or loopback address, e.g. a local mirror;
    /// repeat for more. Orgs never reach the node's own services otherwise.
    #[arg(long = "allow-registry", value_name = "HOST:PORT")]
    allow_registry: Vec<String>,
    /// Keep the node's state in this etcd cluster (http://HOST:PORT, comma
    /// separated) instead of $HANGAR_HOME/state.db; remembered in config.toml
    #[arg(long, env = "HANGAR_ETCD", value_name = "URL[,URL...]")]
    etcd: Option<String>,
    /// The node's name in the etcd cluster (default: the host's name)
    #[arg(long, requires = "etcd")]
    node: Option<String>,
    /// The node's region (default: as before, else `local`); machines are
    /// placed by region (`primary_region`, `hangar scale count --region`)
    #[arg(long, env = "HANGAR_REGION")]
    region: Option<String>,
    /// The URL the other nodes of the cluster reach this node's API at
    /// (default: http://<the --listen address>)
    #[arg(long, requires = "etcd", value_name = "URL")]
    advertise: Option<String>,
    /// The address the other nodes send this node's share of the private
    /// network to (VXLAN; default: the host of --advertise when it is not a
    /// loopback address)
    #[arg(long, requires = "etcd", value_name = "IP")]
    underlay: Option<std::net::IpAddr>,
    /// The memory this node's machines may have in all, in MB (default:
    /// the host's)
    #[arg(long, value_name = "MB")]
    memory_mb: Option<u64>,
    /// The round trip between two regions, injected into this node's calls
    /// to nodes of the other (A:B=DURATION, e.g. ams:fra=30ms; repeat for
    /// more pairs): for a cluster tried on one host. `.internal`'s
    /// `top<N>.nearest` ranks regions by it too
    #[arg(long = "latency", value_name = "A:B=DURATION")]
    latency: Vec<String>,
    /// A super-region of the cluster's CDN (NAME=REGION,REGION; repeat for
    /// more): a miss in one of its regions goes through the group's owner
    /// of the key before the app's shield. Give every node the same
    #[arg(long = "region-group", value_name = "NAME=REGION,...")]
    region_groups: Vec<String>,
    /// Store and serve metrics with Debian's Prometheus: `auto` when it is
    /// installed, `on` (refuse to start without it) or `off`
    #[arg(long, value_enum, default_value_t)]
    metrics: MetricsMode,
    /// The loopback port the node's Prometheus listens on (default: a free one)
    #[arg(long, value_name = "PORT")]
    prometheus_port: Option<u16>,
    /// Let alert webhooks reach this range too (by default they reach public addresses only; repeatable)
    #[arg(long = "webhook-allow-range", value_name = "CIDR")]
    webhook_allow_ranges: Vec<String>,
    /// How the node logs (to stderr; the level from $HANGAR_LOG, default info)
    #[arg(long, value_enum, default_value_t)]
    pub log_format: crate::LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, clap::ValueEnum)]
pub enum MetricsMode {
    #[default]
    Auto,
    On,
    Off,
}

/// Start the node's Prometheus, scraping the targets the API at `api`
/// lists, when `mode` and the host allow; says why not otherwise.
fn start_prometheus(
    mode: MetricsMode,
    port: Option<u16>,
    home: &std::path::Path,
    api: std::net::SocketAddr,
    token: &str,
) -> Result<Option<hangar_metrics::prometheus::Prometheus>> {
    use hangar_metrics::prometheus::{self, Prometheus, Settings};
    let binary = match (mode, prometheus::find()) {
        (MetricsMode::Off, _) => return Ok(None),
        (_, Some(binary)) => binary,
        (MetricsMode::On, None) => bail!("--metrics on needs Debian's prometheus: apt-get install prometheus (or run with --metrics off)"),
        (MetricsMode::Auto, None) => {
            tracing::info!("metrics are off: Debian's prometheus is not installed (apt-get install prometheus, then restart `hangar up` to store and query apps' metrics)");
            return Ok(None);
        }
    };
    let port = match port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
    };
    let host = if api.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        api.ip()
    };
    let settings = Settings {
        binary,
        dir: home.join("prometheus"),
        targets_url: format!(
            "http://{}/v1/internal/metrics/targets",
            std::net::SocketAddr::new(host, api.port())
        ),
        token: token.to_string(),
        port,
        scrape_interval: prometheus::SCRAPE_INTERVAL,
        retention: Duration::from_secs(15 * 86400),
        alertmanager: Some(format!(
            "http://{}/v1/internal/alertmanager",
            std::net::SocketAddr::new(host, api.port())
        )),
    };
    let running = Prometheus::start(settings)
        .map_err(|e| anyhow::anyhow!("{e}; or run with --metrics off"))?;
    tracing::info!(
        "metrics in Prometheus at {} (data in {}); orgs query them at /v1/metrics",
        running.url(),
        home.join("prometheus").display()
    );
    Ok(Some(running))
}

/// The static hangar-init this binary carries (built by `build.rs`).
static INIT: &[u8] = include_bytes!(env!("HANGAR_INIT_BIN"));

/// The static hangar-init to put in machines: `$HANGAR_INIT` when set (a
/// build of one's own), else the one this binary carries, written to
/// `$HANGAR_HOME/init/hangar-init` when that file is not already it (by a
/// rename, so running machines keep the file they have).
pub fn init_binary(home: &std::path::Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HANGAR_INIT").map(PathBuf::from) {
        let bytes = std::fs::read(&path)
            .with_context(|| format!("HANGAR_INIT names {}, which cannot be read; unset it to use the hangar-init this binary carries", path.display()))?;
        if bytes.windows(12).any(|w| w == b"/lib64/ld-li") {
            bail!(
                "{} (HANGAR_INIT) is dynamically linked; machines need a static build (unset HANGAR_INIT to use the one this binary carries)",
                path.display()
            );
        }
        return Ok(path);
    }
    let dir = home.join("init");
    let path = dir.join("hangar-init");
    if std::fs::read(&path).is_ok_and(|b| b == INIT) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".hangar-init.tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, INIT)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The guest kernel for micro-VMs: `$HANGAR_VM_KERNEL`, else
/// `$HANGAR_HOME/vm`, else `target/vm` beside this build (where
/// `scripts/fetch-kernel [DIR]` puts it); none: VMs are off.
fn vm_kernel_dir(home: &std::path::Path) -> Option<PathBuf> {
    let beside_build = || {
        std::env::current_exe()
            .ok()?
            .parent()?
            .parent()
            .map(|t| t.join("vm"))
    };
    std::env::var_os("HANGAR_VM_KERNEL")
        .map(PathBuf::from)
        .into_iter()
        .chain([home.join("vm")])
        .chain(beside_build())
        .find(|d| d.join("vmlinuz").is_file())
}

fn random_token() -> Result<String> {
    let mut buf = [0u8; 24];
    getrandom::getrandom(&mut buf)
        .map_err(|e| anyhow::anyhow!("no random bytes from the kernel: {e}"))?;
    Ok(format!(
        "hgn_{}",
        buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// A node as `hangar up`, `hangar node stop` and `destroy` open it: its
/// state store and machines on this host, and the driver (for what only
/// the real one has, the VMM), and the cluster's store when it is in one.
pub struct Opened {
    pub node: Node,
    pub runtime: Arc<Runtime>,
    pub etcd: Option<Arc<EtcdStore>>,
    /// The cluster's secret (its secrets key), in a cluster: what its
    /// nodes' registries trust each other's pulls by.
    pub cluster_secret: Option<Vec<u8>>,
}

pub fn open_node(home: &std::path::Path, at: &node_config::StateAt) -> Result<Opened> {
    hangar_machine::check_host()?;
    let init = init_binary(home)?;
    let exe = std::env::current_exe().context("cannot find the hangar binary")?;
    let mut runtime = Runtime::open(home, init, exe)?;
    if let Some(kernel) = vm_kernel_dir(home) {
        runtime = runtime.with_vms(kernel);
    }
    let runtime = Arc::new(runtime);
    let (state, etcd, sealer, cluster_secret): (Arc<dyn Store>, _, _, _) = match &at.etcd {
        None => (
            Arc::new(SqliteStore::open(home)?),
            None,
            hangar_api::apps::Sealer::open_or_create(home)?,
            None,
        ),
        Some(endpoints) => {
            let store = Arc::new(EtcdStore::open(endpoints)?);
            // Every node opens every app's secrets: the key is the
            // cluster's (the first node's).
            let local = hangar_api::apps::Sealer::key_of(home)?;
            let key = store.cluster_value("secrets-key", &local)?;
            (
                store.clone(),
                Some(store),
                hangar_api::apps::Sealer::from_key(&key)?,
                Some(key),
            )
        }
    };
    let images = runtime.store().clone();
    let node = Node::new(state, runtime.clone(), images, sealer).with_site(at.site());
    Ok(Opened {
        node,
        runtime,
        etcd,
        cluster_secret,
    })
}

/// The host's memory in MB (from /proc/meminfo).
fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

/// Join the cluster of `etcd` as this node, announcing its API at `api`;
/// the lease is kept in `home` so that a restart takes over its own
/// membership at once.
fn join_cluster(
    home: &std::path::Path,
    etcd: Arc<EtcdStore>,
    me: hangar_api::store::Member,
    token: String,
    latency: hangar_api::cluster::Latency,
) -> Result<Arc<hangar_api::cluster::Cluster>> {
    let lease_file = home.join("cluster.lease");
    let earlier = std::fs::read_to_string(&lease_file)
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok());
    let lease = etcd.join(&me, hangar_api::store::LEASE_TTL, earlier)?;
    std::fs::write(&lease_file, lease.to_string())
        .with_context(|| format!("cannot write {}", lease_file.display()))?;
    Ok(Arc::new(hangar_api::cluster::Cluster {
        me,
        store: etcd,
        token,
        http: reqwest::Client::new(),
        latency,
    }))
}

pub fn run(args: UpArgs) -> Result<()> {
    let home = crate::home()?;
    let earlier = node_config::StateAt::of_home(&home);
    let at = node_config::StateAt {
        etcd: args.etcd.clone().or(earlier.etcd),
        node: args.node.clone().or(earlier.node),
        region: args.region.clone().or(earlier.region),
    };
    let Opened {
        mut node,
        runtime,
        etcd,
        cluster_secret,
    } = open_node(&home, &at)?;
    let latency = hangar_api::cluster::Latency::parse(&args.latency)?;
    if let Some(etcd) = &at.etcd {
        tracing::info!("state in etcd at {etcd}, as node {}", at.node_name());
    }
    let _pid_file = crate::node::PidFile::create(&home)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}; is another node running? pick another with --listen", args.listen))?;
        let addr = listener.local_addr()?;
        let mut token = match node_config::load(&home) {
            Ok(c) => c.token,
            Err(_) => random_token()?,
        };
        // The nodes of a cluster share one admin token (the first node's):
        // the CLI works against any of them, and they call each other with it.
        if let Some(etcd) = &etcd {
            let shared = etcd.cluster_value("admin-token", token.as_bytes())?;
            token = String::from_utf8(shared).context("the cluster's admin token in etcd is not text")?;
        }
        let mut registry_addr = None;
        let mut own_registry = None;
        if !args.no_registry {
            let mut registry = hangar_registry::Registry::open(&home, hangar_registry::Config::default())?;
            if let Some(etcd) = &etcd {
                registry.auth.share_tokens(Arc::new(crate::bridges::ClusterTokens(etcd.clone())));
            }
            if let Some(secret) = &cluster_secret {
                registry.auth.trust_cluster(secret);
            }
            let registry = Arc::new(registry);
            let reg_listener = tokio::net::TcpListener::bind(&args.registry_listen)
                .await
                .with_context(|| format!("cannot listen on {} for the registry; use --registry-listen or --no-registry", args.registry_listen))?;
            registry_addr = Some(reg_listener.local_addr()?.to_string());
            own_registry = Some((registry.clone(), reg_listener.local_addr()?));
            tracing::info!("registry on http://{}", reg_listener.local_addr()?);
            tokio::spawn(hangar_registry::serve(registry, reg_listener, None, std::future::pending()));
        }


        // A member of the cluster before anything is done to the host.
        if let Some(etcd) = etcd.clone() {
            let api = args.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
            let underlay = args.underlay.or_else(|| {
                let host = reqwest::Url::parse(&api).ok()?.host_str()?.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok()?;
                (!host.is_loopback() && !host.is_unspecified()).then_some(host)
            });
            let name = at.node_name();
            let index = etcd.node_index(&name)?;
            // Before any bridge is made: the node's gateways carry its number.
            hangar_machine::network::set_local_node(index);
            let me = hangar_api::store::Member {
                name,
                region: node.site.region.clone(),
                api,
                registry: registry_addr.clone(),
                memory_mb: args.memory_mb.unwrap_or_else(host_memory_mb),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                index,
                underlay,
                edge: edge_advertised(&args),
                since: hangar_api::store::now(),
            };
            match underlay {
                Some(ip) => node = node.with_mesh(Arc::new(crate::bridges::Overlay(hangar_machine::overlay::Overlay::new(ip)))),
                None => tracing::warn!("no --underlay address: this node's machines reach the machines of other nodes not at all; give --underlay IP (or --advertise with a routable address)"),
            }
            let cluster = join_cluster(&home, etcd, me, token.clone(), latency.clone())?;
            tracing::info!("a member of the cluster as node {} in region {}", cluster.me.name, cluster.me.region);
            node = node.with_cluster(cluster);
        }

        // The egress proxy, on the bridge gateway, where machines find it.
        hangar_machine::network::ensure_bridge(0)?;
        let mine: Vec<String> = node.own_machines()?.into_iter().map(|m| m.id).collect();
        let strangers = hangar_machine::network::strangers(&mine);
        if !strangers.is_empty() {
            tracing::warn!("machines this node does not know are running on the bridge ({}), left by a node with another HANGAR_HOME; their addresses may collide with this node's machines: stop them with that HANGAR_HOME (`hangar machine destroy --force`) or with `ip netns del hangar-<id>`",
                strangers.join(", ")
            );
        }
        let egress_addr = std::net::SocketAddr::new(hangar_machine::network::gateway().v4.into(), hangar_api::node::EGRESS_PORT);
        let egress_policy = hangar_egress::IpPolicy { own_addresses: vec![egress_addr, addr], ..Default::default() };
        let egress = Arc::new(hangar_egress::Proxy::new(hangar_egress::Acl::from_rules(Vec::new(), None).unwrap_or_else(|_| hangar_egress::Acl::open()), egress_policy));
        let egress_listener = tokio::net::TcpListener::bind(egress_addr)
            .await
            .with_context(|| format!("cannot listen on {egress_addr} for the egress proxy; is another node running?"))?;
        tracing::info!("egress proxy on http://{egress_addr}");
        tokio::spawn(hangar_egress::proxy::serve(egress.clone(), egress_listener, None, std::future::pending()));
        node = node.with_egress(Arc::new(crate::bridges::EgressProxy(egress.clone())));

        if !args.no_dns {
            let dns = Arc::new(hangar_api::dns::Dns::new(hangar_api::dns::PORT).with_latency(latency.clone()));
            dns.follow(node.state.clone(), node.site.clone());
            tracing::info!(".internal DNS for machines on port {} of each org network's gateway", hangar_api::dns::PORT);
            node = node.with_dns(dns);
        }

        let mut edge_url = None;
        let mut edge_admin = None;
        // The edge asks the node for a started machine through this channel.
        let (wakes, mut wake_requests) = tokio::sync::mpsc::channel::<hangar_edge::proxy::Wake>(64);
        if !args.no_edge {
            let config = hangar_edge::Config {
                listen: args.edge_listen,
                admin: Some(hangar_edge::config::Admin { listen: args.edge_admin_listen, token: token.clone() }),
                cache: hangar_edge::config::CacheConfig { dir: Some(home.join("edge/cache")), ..Default::default() },
                tls: match (args.edge_tls_listen, &args.edge_tls_cert, &args.edge_tls_key) {
                    (Some(listen), Some(cert), Some(key)) => Some(hangar_edge::config::Tls { listen, cert: cert.clone(), key: key.clone() }),
                    _ => None,
                },
                // In a cluster: this node's place in the edges' mesh (the
                // others come with the first tick), and nothing served from
                // the cache as fresh until the purges are caught up.
                mesh: node.cluster.as_ref().map(|c| {
                    let m = hangar_api::routing::mesh_spec(&c.me, &[], &c.token, |_| Duration::ZERO, hangar_api::store::now());
                    hangar_edge::mesh::MeshConfig { node: m.node, region: m.region, token: m.token, weight: m.weight, ..Default::default() }
                }),
                await_purges: node.cluster.is_some(),
                ..Default::default()
            };
            let running = hangar_edge::start(&config, Some(wakes), std::future::pending()).await.map_err(|e| anyhow::anyhow!("{e}; use --edge-listen or --no-edge"))?;
            edge_admin = running.admin;
            let admin = running.admin.map(|a| a.to_string()).unwrap_or_default();
            tracing::info!("edge on http://{} (apps at http://<app>.{}:{}), admin on http://{admin}", running.http, args.domain, running.http.port());
            if let Some(tls) = running.tls {
                tracing::info!("edge TLS on https://{tls} (apps at https://<app>.{}:{})", args.domain, tls.port());
            }
            edge_url = Some(format!("http://<app>.{}:{}", args.domain, running.http.port()));
            let ingress = crate::bridges::EdgeIngress { edge: running.edge.clone(), runtime: tokio::runtime::Handle::current() };
            let groups = hangar_api::routing::parse_groups(&args.region_groups)?;
            node = node.with_routing(hangar_api::routing::Routing::new(Arc::new(ingress), &args.domain).with_groups(groups));
        }
        let local_api = if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
        let prometheus = start_prometheus(args.metrics, args.prometheus_port, &home, local_api, &token)?;
        if let Some(p) = &prometheus {
            // Labelled with the node and its region, so the cluster's other
            // nodes can federate this node's own series by `node`.
            let (node_label, region_label) = (if node.site.node.is_empty() { "local".to_string() } else { node.site.node.clone() }, node.site.region.clone());
            let target = |addr: std::net::SocketAddr, component: &str| hangar_metrics::TargetGroup { targets: vec![addr.to_string()], labels: [("component".to_string(), component.to_string()), ("node".to_string(), node_label.clone()), ("region".to_string(), region_label.clone())].into() };
            let own = [Some((local_api, "api")), edge_admin.map(|a| (a, "edge"))].into_iter().flatten().map(|(a, c)| target(a, c)).collect();
            // The registry and the egress proxy run in this process: their
            // series come with the node's own.
            let mut also: Vec<hangar_api::metrics::Gather> = vec![{
                let egress = egress.clone();
                Arc::new(move || egress.metrics.families())
            }];
            if let Some((registry, _)) = &own_registry {
                let registry = registry.clone();
                also.push(Arc::new(move || registry.metrics.families()));
            }
            // Alert webhooks are dialed under the egress proxy's rules
            // for addresses (never the node's own services, private
            // ranges or metadata services), plus --webhook-allow-range.
            let webhook_policy = hangar_egress::IpPolicy {
                allow_ranges: args.webhook_allow_ranges.iter().map(|r| r.parse().map_err(|e| anyhow::anyhow!("--webhook-allow-range {r}: {e}"))).collect::<Result<_>>()?,
                own_addresses: [Some(local_api), Some(addr), edge_admin, Some(std::net::SocketAddr::from(([127, 0, 0, 1], p.port())))].into_iter().flatten().collect(),
                ..Default::default()
            };
            let webhook_check: hangar_api::alerts::DialCheck = Arc::new(move |a| webhook_policy.check(a));
            node = node.with_metrics(hangar_api::metrics::Metrics { prometheus: p.url().to_string(), own, also, dir: home.join("prometheus"), webhook_check: Some(webhook_check) });
        }
        let node = Arc::new(node);
        tokio::spawn(hangar_api::cluster::lead(node.clone()));
        if node.cluster.is_some() {
            let (node, file) = (node.clone(), home.join("edge/purged"));
            std::thread::Builder::new().name("hangar-purges".into()).spawn(move || hangar_api::purge::follow(node, file))?;
        }
        if node.metrics.is_some() {
            // Alert rules follow the apps' releases (deploys on any node).
            let node = node.clone();
            tokio::spawn(async move {
                // Prometheus takes a moment to listen: said once it keeps failing.
                let mut failures = 0;
                loop {
                    match node.sync_alert_rules().await {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            if failures == 3 {
                                tracing::warn!("alert rules: {e}");
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            });
        }
        {
            let node = node.clone();
            tokio::spawn(async move {
                while let Some(wake) = wake_requests.recv().await {
                    let node = node.clone();
                    tokio::spawn(async move {
                        let _ = wake.done.send(node.wake(&wake.host).await);
                    });
                }
            });
        }
        node_config::save(&home, &NodeConfig { api: format!("http://{addr}"), token: token.clone(), registry: registry_addr, edge: edge_url, etcd: at.etcd.clone(), node: at.etcd.as_ref().map(|_| at.node_name()), region: at.region.clone() })?;
        tracing::info!("Machines API on http://{addr} (token in {})", node_config::path(&home).display());
        // Which accelerator micro-VMs get, probed in the background.
        match runtime.vmm() {
            Ok(_) => {
                let runtime = runtime.clone();
                std::thread::spawn(move || {
                    if let Ok(vmm) = runtime.vmm() {
                        let (accel, why) = vmm.accel();
                        tracing::info!("micro-VMs run under {} ({why})", accel.describe());
                    }
                });
            }
            Err(e) => tracing::warn!("{e}"),
        }
        // Deploys a stop of the node cut short are rolled back.
        for cut in node.state.interrupt_releases()? {
            let node = node.clone();
            tokio::spawn(async move {
                let (app, version) = (cut.app.clone(), cut.version);
                tracing::info!("release v{version} of {app} was cut short by the node's stop; rolling it back");
                match hangar_api::deploy::recover(node, cut).await {
                    Ok(()) => tracing::info!("release v{version} of {app} rolled back"),
                    Err(e) => tracing::error!("could not roll back release v{version} of {app}: {e}; check `hangar status -a {app}` and deploy again"),
                }
            });
        }
        tokio::spawn(hangar_api::checks::run(node.clone()));

        let mut images = crate::images::Images::new(node.images.clone(), home.clone(), own_registry, args.allow_registry.clone());
        if let Some(secret) = cluster_secret {
            let state = node.state.clone();
            let peers: crate::images::Peers = Arc::new(move || state.members().unwrap_or_default().into_iter().filter_map(|m| m.registry).collect());
            images = images.with_cluster(secret, peers);
        }
        let images = Arc::new(images);
        let pull: Puller = Arc::new(move |org, reference, login| {
            let images = images.clone();
            Box::pin(async move { images.fetch(org, reference, login).await })
        });
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (node, stopping) = (node.clone(), stopping.clone());
            std::thread::spawn(move || {
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    node.tick();
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        // Org tokens (the registry's) reach their org's apps and machines.
        let orgs: Option<hangar_api::server::OrgTokens> = match crate::registry::auth_in(&home, etcd.clone()) {
            Ok(auth) => Some(Arc::new(move |t: &str| auth.verify_api_token(t).filter(|r| !r.read_only).map(|r| r.org))),
            Err(e) => {
                tracing::warn!("org tokens are off: {e:#}");
                None
            }
        };
        let api = Arc::new(Api { node: node.clone(), token, pull, orgs, in_flight: Default::default(), streams: Default::default(), dashboards: Default::default() });
        hangar_api::server::serve(api, listener, crate::shutdown_signal()).await;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(prometheus);
        if args.stop_machines {
            tracing::info!("stopping machines");
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.stop_all()).await?;
        }
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    })
}

/// Where the other nodes' edges reach this one's: `--edge-listen` when it
/// is an address they can reach (not loopback, a fixed port), with the
/// host of `--advertise` for an unspecified one; else none, said once.
fn edge_advertised(args: &UpArgs) -> Option<String> {
    let listen = args.edge_listen;
    if args.no_edge {
        return None;
    }
    if listen.ip().is_loopback() || listen.port() == 0 {
        tracing::warn!("the edge listens on {listen}, which the other nodes cannot reach: it serves this node's clients, but the cluster's CDN leaves it out (give --edge-listen a routable address and a fixed port)");
        return None;
    }
    if !listen.ip().is_unspecified() {
        return Some(listen.to_string());
    }
    let advertised = args.advertise.as_deref()?;
    let rest = advertised.split_once("://").map_or(advertised, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    Some(format!("{host}:{}", listen.port()))
}
