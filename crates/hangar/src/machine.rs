//! `hangar machine`: run and manage machines through the node's Machines API
//! (found in `$HANGAR_HOME/config.toml`), and the hidden `machine-shim`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use hangar_api::config::{DriverKind, RestartPolicy};
use hangar_api::wire::{CreateMachine, ExecRequest, MachineView, StopMachine};

use crate::client::connect;

#[derive(Args)]
pub struct MachineArgs {
    #[command(subcommand)]
    command: MachineCommand,
}

impl MachineArgs {
    /// The hidden shim, which outlives the command that started it.
    pub fn is_shim(&self) -> bool {
        matches!(
            self.command,
            MachineCommand::Shim { .. } | MachineCommand::VmConsole { .. }
        )
    }
}

#[derive(Subcommand)]
enum MachineCommand {
    /// Create and start a machine from an image; prints its id
    Run {
        image: String,
        #[arg(long)]
        name: Option<String>,
        /// Environment variable KEY=VALUE (repeatable)
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// container, or vm (a micro-VM: QEMU microvm with hangar-init as PID 1)
        #[arg(long, default_value = "container", value_parser = closed::<DriverKind>)]
        driver: DriverKind,
        /// Memory limit in MB
        #[arg(long, default_value_t = 256)]
        memory: u64,
        /// Root filesystem size in GB (what the app may write)
        #[arg(long = "rootfs-size", value_name = "GB", default_value_t = hangar_api::config::DEFAULT_ROOTFS_GB)]
        rootfs_size: u64,
        /// no, on-failure or always
        #[arg(long, default_value = "on-failure", value_parser = closed::<RestartPolicy>)]
        restart: RestartPolicy,
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
        /// Internal port the app listens on (repeatable)
        #[arg(long = "port", value_name = "PORT")]
        ports: Vec<u16>,
        /// Run as this user (name, uid, user:group)
        #[arg(long)]
        user: Option<String>,
        /// Override the image's entrypoint (a JSON array or words)
        #[arg(long)]
        entrypoint: Option<String>,
        /// Destroy the machine when it exits for good
        #[arg(long)]
        rm: bool,
        /// The region to run it in (a cluster's; default: the node's)
        #[arg(long)]
        region: Option<String>,
        /// The app it belongs to (its org's network, secrets and host)
        #[arg(long, short = 'a')]
        app: Option<String>,
        /// The command (replaces the image's Cmd)
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List machines
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a machine's state, exit code and config
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped machine
    Start { id: String },
    /// Stop a machine: a signal, then SIGKILL after the timeout
    Stop {
        id: String,
        #[arg(long, default_value = "SIGTERM")]
        signal: String,
        /// Seconds to wait before SIGKILL
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Stop and start a machine
    Restart {
        id: String,
        #[arg(long, default_value = "SIGTERM")]
        signal: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Send a signal to a machine's app
    Signal { id: String, signal: String },
    /// Destroy a machine (--force if it runs)
    Destroy {
        id: String,
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Print a machine's logs (-f to follow)
    Logs {
        id: String,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command inside a running machine; exits with its exit code
    Exec {
        id: String,
        /// Run as this user of the image (name, uid, name:group or uid:gid); default root
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Give the command this command's standard input (read to its end
        /// first; text, at most 512 KiB), as `docker exec -i` does
        #[arg(long, short = 'i')]
        interactive: bool,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Wait until a machine reaches a state (started, stopped, destroyed)
    Wait {
        id: String,
        #[arg(long, default_value = "started")]
        state: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// (internal) supervise one machine's runtime; started by `hangar up`
    #[command(name = "shim", hide = true)]
    Shim {
        dir: PathBuf,
        id: String,
        runc_root: PathBuf,
    },
    /// (internal) relay a console session of a micro-VM; started by `hangar up`
    #[command(name = "vm-console", hide = true)]
    VmConsole { socket: PathBuf, open: String },
}

/// The most `exec -i` sends: it goes in the request's JSON, which the API
/// caps at 1 MiB (escaping may double it).
const STDIN_CAP: u64 = 512 << 10;

/// A small client of the node's Machines API.
fn parse_words(flag: &str, s: &str) -> Result<Vec<String>> {
    if s.trim_start().starts_with('[') {
        return serde_json::from_str(s)
            .with_context(|| format!("--{flag} {s:?} is not a JSON array of strings"));
    }
    Ok(s.split_whitespace().map(str::to_string).collect())
}

/// A value of a closed set (`--driver`, `--restart`), refused naming the
/// choices.
fn closed<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

/// `<id> <state>`, the answer of lifecycle commands.
fn print_state(m: &MachineView) {
    println!("{} {}", m.id, m.state);
}

fn print_machine(m: &MachineView) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("ID:        {}", m.id);
    println!("Name:      {}", m.name);
    println!("State:     {}", m.state);
    println!("Image:     {}", m.config.image);
    if let Some(r) = &m.image_ref {
        println!("Digest:    {}", r.digest);
    }
    println!("Addresses: {} {}", or_dash(&m.private_ip), or_dash(&m.ipv4));
    if let Some(vmm) = &m.vmm {
        let overhead = vmm
            .overhead_kib
            .map(|k| format!(", VMM overhead {:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default();
        println!("Driver:    micro-VM under {}{overhead}", vmm.accel);
    }
    if let Some(code) = m.exit_code {
        println!(
            "Exit code: {code}{}",
            if m.oom_killed == Some(true) {
                " (OOM killed)"
            } else {
                ""
            }
        );
    }
    println!("Restarts:  {}", m.restarts);
}

pub fn run(args: MachineArgs) -> Result<()> {
    if let MachineCommand::Shim { dir, id, runc_root } = &args.command {
        let dir = hangar_machine::dir::MachineDir::new(dir);
        let code = hangar_machine::shim::run_shim(&dir, id, runc_root);
        std::process::exit(code.clamp(0, 255));
    }
    if let MachineCommand::VmConsole { socket, open } = &args.command {
        let code = hangar_machine::console::relay_vm(socket, open);
        std::process::exit(code.clamp(0, 255));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: MachineArgs) -> Result<()> {
    let client = connect()?;
    match args.command {
        MachineCommand::Run {
            image,
            name,
            env,
            cpus,
            driver,
            memory,
            rootfs_size,
            restart,
            max_retries,
            ports,
            user,
            entrypoint,
            rm,
            region,
            app,
            cmd,
        } => {
            let mut envs = BTreeMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("-e {kv:?} must be KEY=VALUE"))?;
                envs.insert(k.to_string(), v.to_string());
            }
            let mut config = hangar_api::MachineConfig {
                image,
                env: envs,
                auto_destroy: rm,
                ..Default::default()
            };
            if !cmd.is_empty() {
                config.init.cmd = Some(cmd);
            }
            if let Some(ep) = entrypoint {
                config.init.entrypoint = Some(parse_words("entrypoint", &ep)?);
            }
            config.init.user = user;
            config.guest.cpus = cpus;
            config.guest.memory_mb = memory;
            config.guest.driver = driver;
            config.rootfs.size_gb = rootfs_size;
            config.restart.policy = restart;
            config.restart.max_retries = max_retries;
            config.services = ports
                .iter()
                .map(|p| hangar_api::config::Service {
                    internal_port: *p,
                    protocol: "tcp".into(),
                    ..Default::default()
                })
                .collect();
            let m = client
                .create_machine(&CreateMachine {
                    name,
                    app,
                    config,
                    region,
                    release: None,
                })
                .await?;
            println!("{}", m.id);
        }
        MachineCommand::List { json } => {
            let list = client.machines().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<16} {:<20} {:<10} {:<24} IMAGE",
                    "ID", "NAME", "STATE", "ADDRESS"
                );
                for m in &list {
                    println!(
                        "{:<16} {:<20} {:<10} {:<24} {}",
                        m.id,
                        m.name,
                        m.state.to_string(),
                        m.private_ip.as_deref().unwrap_or(""),
                        m.config.image
                    );
                }
            }
        }
        MachineCommand::Status { id, json } => {
            let m = client.machine(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print_machine(&m);
            }
        }
        MachineCommand::Start { id } => {
            let m = client.start_machine(&id).await?;
            print_state(&m);
        }
        MachineCommand::Stop {
            id,
            signal,
            timeout,
        } => {
            let m = client
                .stop_machine(&id, &StopMachine { signal, timeout })
                .await?;
            print_state(&m);
        }
        MachineCommand::Restart {
            id,
            signal,
            timeout,
        } => {
            let m = client
                .restart_machine(&id, &StopMachine { signal, timeout })
                .await?;
            print_state(&m);
        }
        MachineCommand::Signal { id, signal } => {
            client.signal_machine(&id, &signal).await?;
        }
        MachineCommand::Destroy { id, force } => {
            let m = client.destroy_machine(&id, force).await?;
            println!("{} destroyed", m.id);
        }
        MachineCommand::Logs { id, follow } => {
            let mut stream = std::pin::pin!(client.logs(&id, follow).await?);
            let mut out = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.context("log stream broke")?)?;
                out.flush()?;
            }
        }
        MachineCommand::Exec {
            id,
            user,
            interactive,
            cmd,
        } => {
            let mut stdin = String::new();
            if interactive {
                use std::io::Read;
                std::io::stdin()
                    .take(STDIN_CAP + 1)
                    .read_to_string(&mut stdin)
                    .context("exec -i: standard input must be text (UTF-8)")?;
                if stdin.len() as u64 > STDIN_CAP {
                    bail!("exec -i: standard input is over {} KiB; copy big files into the machine another way (e.g. from an image layer)", STDIN_CAP >> 10);
                }
            }
            let r = client.exec(&id, &ExecRequest { cmd, user, stdin }).await?;
            print!("{}", r.stdout);
            eprint!("{}", r.stderr);
            std::process::exit(r.exit_code.clamp(0, 255));
        }
        MachineCommand::Wait { id, state, timeout } => {
            let m = client.wait(&id, &state, timeout).await?;
            print_state(&m);
        }
        MachineCommand::Shim { .. } | MachineCommand::VmConsole { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
    Ok(())
}
