//! The app workflow: `hangar launch`, `deploy`, `status`, `releases`,
//! `logs`, `scale`, `secrets`, `apps`, `open`. The app comes from `-a` or
//! the `hangar.toml` in the current directory. Builds happen here (the
//! build context is local); rollouts happen on the node.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use hangar_api::app_toml::AppToml;

use crate::client::{connect, Client};

#[derive(Args)]
pub struct AppFlag {
    /// The app (default: `app` in ./hangar.toml)
    #[arg(short = 'a', long = "app", global = true)]
    pub(crate) app: Option<String>,
    /// Print JSON for scripts
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct LaunchArgs {
    /// Run this image (default: build the current directory)
    #[arg(long)]
    image: Option<String>,
    /// The app's name (default: the directory's)
    #[arg(long)]
    name: Option<String>,
    /// The org that owns the app (its images go to the registry under it)
    #[arg(long, default_value = "personal")]
    org: String,
    /// The port the app listens on
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// For a directory build: the image it is layered on
    #[arg(long)]
    base: Option<String>,
    /// For a directory build: the command, as words
    #[arg(long)]
    cmd: Option<String>,
    /// Where hangar.toml goes (default: the current directory)
    #[arg(long, default_value = ".")]
    path: PathBuf,
}

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    app: AppFlag,
    /// The hangar.toml to deploy (default: ./hangar.toml)
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Deploy this image instead of [build]
    #[arg(long)]
    image: Option<String>,
    /// How many machines (default: as many as now, at least one)
    #[arg(long)]
    count: Option<u32>,
}

impl DeployArgs {
    /// Deploy `config` with `count` machines (what `hangar demo` does).
    pub fn for_file(config: PathBuf, count: u32) -> DeployArgs {
        DeployArgs {
            app: AppFlag {
                app: None,
                json: false,
            },
            config: Some(config),
            image: None,
            count: Some(count),
        }
    }
}

#[derive(Subcommand)]
pub enum ScaleCommand {
    /// Set the number of machines (in each region)
    Count {
        count: u32,
        /// The regions to scale in, comma separated (default: each region
        /// the app has machines in)
        #[arg(long, short = 'r', value_delimiter = ',')]
        region: Vec<String>,
    },
    /// Set each machine's memory (a new release)
    Memory { mb: u64 },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Remove (or with --soft, mark stale) cached responses at every edge;
    /// answers once every live node has applied it
    Purge {
        /// One URL (path and query, every variant of it)
        #[arg(long, conflicts_with_all = ["prefix", "tag"])]
        url: Option<String>,
        /// Every URL whose path starts with this
        #[arg(long, conflicts_with = "tag")]
        prefix: Option<String>,
        /// Every response with this surrogate key (Surrogate-Key or Cache-Tag)
        #[arg(long)]
        tag: Option<String>,
        /// Mark stale (revalidated next time) instead of removing
        #[arg(long)]
        soft: bool,
        /// Seconds to wait for every live node (default 10)
        #[arg(long)]
        wait: Option<f64>,
    },
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Set secrets (KEY=VALUE ...); redeploys unless --stage
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[arg(long)]
        stage: bool,
    },
    /// List secret names and digests (never values)
    List,
    /// Remove secrets; redeploys unless --stage
    Unset {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        stage: bool,
    },
}

#[derive(Subcommand)]
pub enum AppsCommand {
    /// List apps
    List,
    /// Destroy an app and all its machines
    Destroy {
        name: String,
        /// Do not ask (there is nothing to ask yet; kept for scripts)
        #[arg(long, short)]
        yes: bool,
    },
}

/// `app` from the flag or ./hangar.toml, with what to do when neither.
pub(crate) fn app_name(flag: &AppFlag) -> Result<String> {
    if let Some(a) = &flag.app {
        return Ok(a.clone());
    }
    let path = Path::new(hangar_api::app_toml::FILE);
    if path.exists() {
        return Ok(AppToml::load(path)?.app);
    }
    bail!("which app? pass -a APP, or run this where a hangar.toml is (`hangar launch` writes one)")
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Prints a streamed operation's progress messages (unless `quiet`).
fn say(quiet: bool) -> impl FnMut(&str) {
    move |m| {
        if !quiet {
            println!("  {m}");
        }
    }
}

pub fn launch(args: LaunchArgs) -> Result<()> {
    let dir = args
        .path
        .canonicalize()
        .with_context(|| format!("{} is not a directory", args.path.display()))?;
    let toml_path = dir.join(hangar_api::app_toml::FILE);
    let client = connect()?;
    if toml_path.exists() {
        // An app that comes with its hangar.toml: create the app it names.
        let m = AppToml::load(&toml_path)?;
        runtime()?.block_on(client.create_app(&m.app, &args.org))?;
        println!(
            "Created app {} (org {}) from {}",
            m.app,
            args.org,
            toml_path.display()
        );
        println!("Next: hangar deploy");
        return Ok(());
    }
    let name = match args.name {
        Some(n) => n,
        None => dir
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.to_ascii_lowercase().replace(['_', '.', ' '], "-"))
            .ok_or_else(|| anyhow!("cannot name the app after {}; pass --name", dir.display()))?,
    };
    hangar_api::apps::valid_name(&name).map_err(|e| anyhow!("{e}; pass --name"))?;
    let mut m = AppToml {
        app: name.clone(),
        ..Default::default()
    };
    match args.image {
        Some(i) => m.build.image = Some(i),
        None => {
            m.build.dir = Some(".".into());
            m.build.base = args.base;
            m.build.cmd = args
                .cmd
                .map(|c| c.split_whitespace().map(str::to_string).collect());
        }
    }
    m.http_service = Some(hangar_api::app_toml::HttpService {
        internal_port: args.port,
        force_https: false,
        auto_stop_machines: hangar_api::app_toml::AutoStop::Off,
        auto_start_machines: true,
        min_machines_running: 0,
        idle_timeout: 300,
        concurrency: None,
        rate_limit: None,
        checks: vec![hangar_api::app_toml::HttpCheck {
            path: "/".into(),
            interval: 10.0,
            timeout: 2.0,
            grace_period: 1.0,
            method: "GET".into(),
        }],
    });
    m.validate().map_err(|e| anyhow!(e))?;
    runtime()?.block_on(client.create_app(&name, &args.org))?;
    std::fs::write(&toml_path, m.to_toml())
        .with_context(|| format!("cannot write {}", toml_path.display()))?;
    println!(
        "Created app {name} (org {}) and wrote {}",
        args.org,
        toml_path.display()
    );
    println!("Next: hangar deploy");
    Ok(())
}

/// Build `[build] dir` into the local store, tagged for the built-in
/// registry, and push it there under the app's org.
fn build_and_push(m: &AppToml, base_dir: &Path, org: &str, registry: &str) -> Result<String> {
    let home = crate::home()?;
    let store = hangar_oci::Store::open(&home)?;
    let dir = base_dir.join(m.build.dir.as_deref().unwrap_or("."));
    // A tag per deploy, never reused: a release keeps naming its own image.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let tag: hangar_oci::Reference = format!(
        "{registry}/{org}/{}:deployment-{}-{:06}",
        m.app,
        now.as_secs(),
        now.subsec_micros()
    )
    .parse()?;
    let base: Option<hangar_oci::Reference> =
        m.build.base.as_deref().map(str::parse).transpose()?;
    let rt = runtime()?;
    if let Some(b) = &base {
        if store.resolve(b).is_err() {
            rt.block_on(hangar_oci::client::pull(
                &store,
                b,
                &Default::default(),
                crate::progress::for_stdout(),
            ))
            .with_context(|| format!("pull base image {b}"))?;
        }
    }
    let opts = hangar_oci::build::BuildOptions {
        base,
        cmd: m.build.cmd.clone(),
        workdir: m.build.workdir.clone(),
        expose: m
            .http_service
            .iter()
            .map(|s| s.internal_port.to_string())
            .collect(),
        epoch: 0,
        ..Default::default()
    };
    let record = hangar_oci::build::build(&store, &dir, &tag, &opts)
        .with_context(|| format!("build {}", dir.display()))?;
    println!("  built {} ({})", tag, record.digest);
    // Push with a deploy token of the org (made once, kept in $HANGAR_HOME).
    let token = deploy_token(&home, org)?;
    let push = hangar_oci::client::PushOptions {
        client: hangar_oci::client::ClientOptions {
            // The node's own registry speaks plain HTTP, on loopback or
            // on the address a cluster's nodes reach it at.
            insecure: true,
            creds: Some(hangar_oci::auth::Credentials {
                username: "deploy".into(),
                password: token,
            }),
            ..Default::default()
        },
        chunk_size: 0,
    };
    rt.block_on(hangar_oci::client::push(
        &store,
        &tag,
        &tag,
        &push,
        Arc::new(hangar_oci::client::NoProgress),
    ))
    .with_context(|| format!("push {tag} to the node's registry"))?;
    println!("  pushed {tag}");
    Ok(tag.to_string())
}

fn deploy_token(home: &Path, org: &str) -> Result<String> {
    let path = home.join(format!("deploy-token-{org}"));
    let auth = crate::registry::auth()?;
    // Kept while it is good: a revoked or expired one is made again.
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if auth.verify_api_token(&t).is_some() {
            return Ok(t);
        }
    }
    let (_, token) = auth.create(org, false, None)?;
    std::fs::write(&path, &token).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

pub fn deploy(args: DeployArgs) -> Result<()> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(hangar_api::app_toml::FILE));
    let m = AppToml::load(&path).map_err(|e| match e {
        hangar_api::app_toml::Error::Read { .. } => {
            anyhow!("{e}; run `hangar launch` to write one")
        }
        _ => anyhow!("{e}; fix the file (the README lists every key of hangar.toml)"),
    })?;
    if let Some(a) = &args.app.app {
        if *a != m.app {
            bail!("{} is for app {}, not {a}", path.display(), m.app);
        }
    }
    let client = connect()?;
    let rt = runtime()?;
    let org = rt.block_on(client.app(&m.app))?.org;
    let image = match (&args.image, &m.build.image) {
        (Some(i), _) | (None, Some(i)) => i.clone(),
        (None, None) => {
            let registry = crate::node_config::load(&crate::home()?)?
                .registry
                .ok_or_else(|| anyhow!("the node runs no registry to push to; start `hangar up` without --no-registry, or set [build] image"))?;
            let base_dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            build_and_push(&m, base_dir, &org, &registry)?
        }
    };
    let mut req = m.deploy_request(&image, args.count, &format!("deploy of {image}"));
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    req.observe.dashboards = m.dashboard_files(dir).map_err(|e| anyhow!("{e}"))?;
    println!("Deploying {} ({})", m.app, req.strategy);
    let release = rt.block_on(client.deploy(&m.app, &req, say(args.app.json)))?;
    if args.app.json {
        println!("{}", serde_json::to_string(&release)?);
    } else {
        let url = crate::node_config::load(&crate::home()?)?.app_url(&m.app);
        println!("Release v{} of {} is live: {url}", release.version, m.app);
    }
    Ok(())
}

pub fn status(flag: AppFlag) -> Result<()> {
    let app = app_name(&flag)?;
    let v = runtime()?.block_on(connect()?.app(&app))?;
    if flag.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("App     {} (org {})", v.name, v.org);
    match &v.release {
        Some(r) => println!("Release v{} {} {}", r.version, r.status, r.image),
        None => println!("Release none yet: run `hangar deploy`"),
    }
    println!(
        "\n{:<16} {:<10} {:<8} {:<10} {:<14} IMAGE",
        "ID", "STATE", "RELEASE", "HEALTH", "ADDRESS"
    );
    for m in &v.machines {
        let checks = m.checks.as_deref().unwrap_or_default();
        let passing = checks
            .iter()
            .filter(|c| c.status == hangar_api::checks::CheckState::Passing)
            .count();
        let health = if checks.is_empty() {
            "-".to_string()
        } else {
            format!("{passing}/{} ok", checks.len())
        };
        println!(
            "{:<16} {:<10} {:<8} {:<10} {:<14} {}",
            m.id,
            m.state.to_string(),
            m.release.map(|r| format!("v{r}")).unwrap_or_default(),
            health,
            m.ipv4.as_deref().unwrap_or(""),
            m.config.image
        );
    }
    Ok(())
}

pub fn releases(flag: AppFlag) -> Result<()> {
    let app = app_name(&flag)?;
    let v = runtime()?.block_on(connect()?.releases(&app))?;
    if flag.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<12} {:<44} DESCRIPTION",
        "VERSION", "STATUS", "IMAGE"
    );
    for r in &v {
        let description = r.description.lines().next().unwrap_or("");
        println!(
            "v{:<7} {:<12} {:<44} {description}",
            r.version,
            r.status.to_string(),
            r.image
        );
    }
    Ok(())
}

pub fn logs(flag: AppFlag, follow_logs: bool) -> Result<()> {
    let app = app_name(&flag)?;
    let client = connect()?;
    let rt = runtime()?;
    let ids: Vec<String> = rt
        .block_on(client.app(&app))?
        .machines
        .into_iter()
        .map(|m| m.id)
        .collect();
    if ids.is_empty() {
        bail!("app {app} has no machines; deploy it with `hangar deploy`");
    }
    rt.block_on(async {
        let streams = ids.iter().map(|id| {
            let client = &client;
            async move {
                let mut stream = std::pin::pin!(client.logs(id, follow_logs).await?);
                let mut buf = Vec::new();
                while let Some(chunk) = stream.next().await {
                    buf.extend_from_slice(&chunk?);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        print!("{id} | {}", String::from_utf8_lossy(&line));
                    }
                }
                if !buf.is_empty() {
                    println!("{id} | {}", String::from_utf8_lossy(&buf));
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        for r in futures_util::future::join_all(streams).await {
            r?;
        }
        Ok(())
    })
}

/// Redeploy the current release with `change` applied (scale memory,
/// secrets): a new release, rolled out like any deploy.
fn redeploy(
    client: &Client,
    app: &str,
    why: &str,
    change: impl FnOnce(&mut hangar_api::MachineConfig),
) -> Result<()> {
    let rt = runtime()?;
    let Some(current) = rt.block_on(client.current_release(app))? else {
        bail!("app {app} has no complete release to redeploy; run `hangar deploy`");
    };
    let mut req = hangar_api::client::changed(&current, change);
    req.description = why.to_string();
    let release = rt.block_on(client.deploy(app, &req, say(false)))?;
    println!("Release v{} of {app} is live", release.version);
    Ok(())
}

pub fn scale(flag: AppFlag, command: ScaleCommand) -> Result<()> {
    let app = app_name(&flag)?;
    let client = connect()?;
    match command {
        ScaleCommand::Count { count, region } => {
            runtime()?.block_on(client.scale(&app, count, &region, say(flag.json)))?;
            if region.is_empty() {
                println!("{app} runs {count} machine(s)");
            } else {
                println!(
                    "{app} runs {count} machine(s) in each of {}",
                    region.join(", ")
                );
            }
            Ok(())
        }
        ScaleCommand::Memory { mb } => {
            redeploy(&client, &app, &format!("scale memory {mb} MB"), |c| {
                c.guest.memory_mb = mb
            })
        }
    }
}

pub fn secrets(flag: AppFlag, command: SecretsCommand) -> Result<()> {
    let app = app_name(&flag)?;
    let client = connect()?;
    let rt = runtime()?;
    match command {
        SecretsCommand::List => {
            let v = rt.block_on(client.secrets(&app))?;
            if flag.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<24} DIGEST", "NAME");
            for s in &v {
                println!("{:<24} {}", s.name, s.digest);
            }
            Ok(())
        }
        SecretsCommand::Set { pairs, stage } => {
            let mut values = std::collections::BTreeMap::new();
            for p in &pairs {
                let Some((k, v)) = p.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    bail!("{:?} is not KEY=VALUE", p.split('=').next().unwrap_or(""));
                };
                values.insert(k.to_string(), v.to_string());
            }
            let names: Vec<String> = values.keys().cloned().collect();
            rt.block_on(client.set_secrets(&app, values))?;
            println!("Set {} on {app}", names.join(", "));
            if stage {
                println!("Staged: machines get them at the next deploy");
                return Ok(());
            }
            drop(rt);
            redeploy(
                &client,
                &app,
                &format!("secrets set: {}", names.join(", ")),
                |_| {},
            )
        }
        SecretsCommand::Unset { names, stage } => {
            let unset = rt.block_on(client.unset_secrets(&app, &names))?;
            println!("Unset {}", serde_json::to_string(&unset)?);
            if stage {
                return Ok(());
            }
            drop(rt);
            redeploy(
                &client,
                &app,
                &format!("secrets unset: {}", names.join(", ")),
                |_| {},
            )
        }
    }
}

pub fn apps(json_out: bool, command: AppsCommand) -> Result<()> {
    let client = connect()?;
    let rt = runtime()?;
    match command {
        AppsCommand::List => {
            let v = rt.block_on(client.apps())?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<24} {:<16} {:<9} RELEASE", "NAME", "ORG", "MACHINES");
            for a in &v {
                let release = a
                    .release
                    .map(|r| format!("v{r}"))
                    .unwrap_or_else(|| "-".into());
                println!("{:<24} {:<16} {:<9} {release}", a.name, a.org, a.machines);
            }
            Ok(())
        }
        AppsCommand::Destroy { name, .. } => {
            rt.block_on(client.destroy_app(&name))?;
            println!("Destroyed app {name} and its machines");
            Ok(())
        }
    }
}

pub fn open(flag: AppFlag) -> Result<()> {
    let app = app_name(&flag)?;
    let url = crate::node_config::load(&crate::home()?)?.app_url(&app);
    println!("{url}");
    // A browser if there is one; the URL above either way.
    open_in_browser(&url);
    Ok(())
}

/// Start a browser on `url` when the machine has one (`xdg-open`).
pub(crate) fn open_in_browser(url: &str) {
    let _ = std::process::Command::new("xdg-open")
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// `hangar auth registry-login`: the org's login to another registry.
pub fn registry_login(registry: &str, username: &str, password_stdin: bool) -> Result<()> {
    let password = if password_stdin {
        let mut p = String::new();
        std::io::stdin()
            .read_line(&mut p)
            .context("reading the password from standard input")?;
        p.trim_end_matches(['\r', '\n']).to_string()
    } else {
        std::env::var("HANGAR_REGISTRY_PASSWORD").map_err(|_| {
            anyhow::anyhow!("give the password on standard input with --password-stdin, or in $HANGAR_REGISTRY_PASSWORD")
        })?
    };
    runtime()?.block_on(connect()?.set_registry_login(registry, username, &password))?;
    println!("the org's images from {registry} are pulled as {username}");
    Ok(())
}

pub fn registry_logins() -> Result<()> {
    let v = runtime()?.block_on(connect()?.registry_logins())?;
    println!("{:<32} USERNAME", "REGISTRY");
    for l in &v {
        println!("{:<32} {}", l.registry, l.username);
    }
    Ok(())
}

pub fn registry_logout(registry: &str) -> Result<()> {
    runtime()?.block_on(connect()?.remove_registry_login(registry))?;
    println!("logged out of {registry}");
    Ok(())
}

pub fn cache(flag: AppFlag, command: CacheCommand) -> Result<()> {
    let app = app_name(&flag)?;
    let client = connect()?;
    let CacheCommand::Purge {
        url,
        prefix,
        tag,
        soft,
        wait,
    } = command;
    let req = hangar_api::wire::PurgeRequest {
        url,
        prefix,
        tag,
        soft,
        wait,
    };
    let outcome = runtime()?.block_on(client.purge(&app, &req))?;
    if flag.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if outcome.complete {
        println!(
            "purged at every edge (applied in {}; purge #{})",
            outcome.applied.join(", "),
            outcome.revision
        );
    } else {
        println!(
            "purge #{} applied in {}; not yet in {} (those nodes apply it when they can reach the cluster, before serving from their cache as fresh)",
            outcome.revision,
            if outcome.applied.is_empty() { "no region".to_string() } else { outcome.applied.join(", ") },
            outcome.pending.join("; ")
        );
    }
    if !outcome.complete {
        std::process::exit(3);
    }
    Ok(())
}
