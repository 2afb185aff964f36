//! `hangar demo`: the tour in one command. Starts a node with the defaults
//! (unless one answers already), builds the bundled example app on a
//! busybox base from this host (no Docker), deploys it on two machines
//! behind the edge, prints the URL and what to try next, and serves until
//! Ctrl-C, which stops what it started.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::client::connect;

#[derive(Args)]
pub struct DemoArgs {
    /// How many machines run the example
    #[arg(long, default_value_t = 2)]
    count: u32,
    /// Deploy the game system (examples/games) on three machines instead
    /// of the web example (`scripts/demo --games` builds its server first)
    #[arg(long)]
    games: bool,
    /// The static game server to deploy with --games (default: the one
    /// scripts/games-server puts in examples/games/bin of this checkout)
    #[arg(long)]
    games_server: Option<std::path::PathBuf>,
}

/// The example app, bundled into the binary so the demo runs anywhere.
const EXAMPLE: [(&str, &str, u32); 5] = [
    (
        "hangar.toml",
        include_str!("../../../examples/hello/hangar.toml"),
        0o644,
    ),
    (
        "bin/hello",
        include_str!("../../../examples/hello/bin/hello"),
        0o755,
    ),
    (
        "www/index.html",
        include_str!("../../../examples/hello/www/index.html"),
        0o644,
    ),
    (
        "www/healthz",
        include_str!("../../../examples/hello/www/healthz"),
        0o644,
    ),
    (
        "www/cgi-bin/info",
        include_str!("../../../examples/hello/www/cgi-bin/info"),
        0o755,
    ),
];

fn write_example(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(dir);
    for (path, text, mode) in EXAMPLE {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap_or(dir))?;
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `localhost/busybox:demo`: this host's busybox with the applets the
/// example uses.
fn build_base(home: &Path) -> Result<()> {
    let busybox = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("busybox")).find(|p| p.is_file()))
        .context("busybox is not installed; install busybox-static (apt-get install busybox-static) or run scripts/demo")?;
    let dir = home.join("demo/busybox");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy(&busybox, dir.join("bin/busybox"))
        .with_context(|| format!("cannot copy {}", busybox.display()))?;
    for applet in [
        "sh", "cat", "ls", "httpd", "echo", "hostname", "date", "wget", "printf",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    let store = hangar_oci::Store::open(home)?;
    let opts = hangar_oci::build::BuildOptions {
        cmd: Some(vec!["/bin/sh".into()]),
        ..Default::default()
    };
    hangar_oci::build::build(&store, &dir, &"localhost/busybox:demo".parse()?, &opts)?;
    Ok(())
}

fn node_answers() -> bool {
    let Ok(client) = connect() else {
        return false;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), client.apps()).await })
        .is_ok_and(|r| r.is_ok())
}

/// `hangar up --stop-machines` in the background (its log in
/// `$HANGAR_HOME/demo/node.log`), once it answers.
fn start_node(home: &Path) -> Result<Child> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
        != 0
    {
        bail!("the demo runs machines, which needs root: run it with sudo (or as root)");
    }
    let exe = std::env::current_exe().context("cannot find the hangar binary")?;
    std::fs::create_dir_all(home.join("demo"))?;
    let log_path = home.join("demo/node.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .args(["up", "--stop-machines"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start `hangar up`")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shown = 0;
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        for line in text.lines().skip(shown) {
            println!("  {line}");
            shown += 1;
        }
        if text.contains("Machines API on") {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("`hangar up` stopped ({status}) before it was ready; its log is above");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "`hangar up` was not ready within a minute; its log is in {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    let home = crate::home()?;
    let tour_home = home.clone();
    std::fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
    println!("Hangar demo (data in {})", home.display());
    let mut node = None;
    if node_answers() {
        println!("\n1. A node is running already: using it");
    } else {
        println!("\n1. Starting a node: hangar up");
        node = Some(start_node(&home)?);
    }
    // Ctrl-C is heard from here on, during the tour too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let tour = tokio::task::spawn_blocking(move || {
            if args.games {
                games_tour(&tour_home, args.games_server)
            } else {
                tour(&tour_home, args.count)
            }
        });
        tokio::select! {
            r = tour => match r {
                Ok(Ok(())) => {
                    println!("\nServing until Ctrl-C.");
                    crate::shutdown_signal().await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("the tour failed: {e}")),
            },
            () = crate::shutdown_signal() => {
                println!("\nInterrupted");
                Ok(())
            }
        }
    });
    if let Some(mut child) = node {
        println!("\nStopping the node and its machines");
        // SIGTERM: `hangar up --stop-machines` stops its machines and exits.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let env = match std::env::var_os("HANGAR_HOME") {
            Some(h) => format!("HANGAR_HOME={} ", h.to_string_lossy()),
            None => String::new(),
        };
        println!(
            "Stopped: nothing of the demo runs or is mounted. Its data (images, the app) stays in {}; remove it with: {env}hangar node destroy --yes",
            home.display()
        );
    }
    // Leave now: an interrupted tour may still hold a blocking thread.
    rt.shutdown_background();
    result
}

/// Create app `name` in the personal org, or say it exists.
fn ensure_app(name: &str) -> Result<()> {
    let client = connect()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(client.create_app(name, "personal")) {
        Ok(_) => println!("   created app {name}"),
        Err(e) if e.to_string().contains("exists already") => {
            println!("   app {name} exists: deploying a new release")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// The game system: its hangar.toml and the static server, deployed on
/// three machines that find each other as `games.internal`.
fn games_tour(home: &Path, server: Option<std::path::PathBuf>) -> Result<()> {
    let server = match server {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find the hangar binary")?
            .ancestors()
            .nth(3)
            .context("hangar is not in a checkout's target/ directory: pass --games-server")?
            .join("examples/games/bin/hangar-games"),
    };
    if !server.is_file() {
        bail!(
            "no game server at {}: build it with scripts/games-server --release (scripts/demo --games does), or pass --games-server",
            server.display()
        );
    }
    let dir = home.join("demo/games");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin"))?;
    for (name, text) in [
        (
            "hangar.toml",
            include_str!("../../../examples/games/hangar.toml"),
        ),
        (
            ".hangarignore",
            include_str!("../../../examples/games/.hangarignore"),
        ),
    ] {
        std::fs::write(dir.join(name), text)?;
    }
    std::fs::copy(&server, dir.join("bin/hangar-games"))
        .with_context(|| format!("cannot copy {}", server.display()))?;
    println!(
        "\n2. The game system: {} (hangar.toml, bin/hangar-games)",
        dir.display()
    );
    ensure_app("games")?;
    println!("\n3. hangar deploy (an image of the static server, 3 machines on games.internal)");
    crate::apps::deploy(crate::apps::DeployArgs::for_file(
        dir.join(hangar_api::app_toml::FILE),
        3,
    ))?;
    let url = crate::node_config::load(home)?.app_url("games");
    println!("\nThe games are live at {url}");
    println!("\nTry:");
    println!(
        "  open {url} in two browsers: create a game in one, join it by its code in the other"
    );
    println!("  open {url}/g/CODE in a third to watch");
    println!(
        "  hangar status -a games        # kill -9 a machine's process mid-game: the game goes on"
    );
    println!("  curl -s {url}/api/status      # the peers a machine sees");
    Ok(())
}

fn tour(home: &Path, count: u32) -> Result<()> {
    println!("\n2. Building a busybox base image from this host's busybox (no Docker)");
    build_base(home)?;
    let dir = home.join("demo/hello");
    write_example(&dir)?;
    println!(
        "\n3. The example app: {} (hangar.toml, bin/hello, www/)",
        dir.display()
    );
    ensure_app("hello")?;
    println!("\n4. hangar deploy (build, push to the node's registry, roll out {count} machines)");
    crate::apps::deploy(crate::apps::DeployArgs::for_file(
        dir.join(hangar_api::app_toml::FILE),
        count,
    ))?;
    let url = crate::node_config::load(home)?.app_url("hello");
    println!("\nThe app is live at {url}");
    println!("\nTry:");
    println!("  curl -i {url}/cgi-bin/info     # JSON; Cache-Status shows the edge cache");
    println!("  hangar status -a hello");
    println!("  hangar logs -a hello -f");
    println!("  hangar scale count 3 -a hello");
    println!("  hangar secrets set -a hello GREETING=hi   # redeploys");
    println!("  hangar releases -a hello");
    Ok(())
}
