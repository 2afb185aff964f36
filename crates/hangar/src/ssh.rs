//! `hangar ssh console -a APP [--machine ID] [-C CMD] [-u USER]`: a
//! terminal in a running machine, through the node's API (a WebSocket;
//! `server::console` on the node's side). This terminal is raw while it
//! runs, its size follows this one's, and the exit code is the command's.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hangar_api::server::console::Control;
use tokio_tungstenite::tungstenite::Message;

use crate::apps::{app_name, AppFlag};
use crate::client::connect;

#[derive(Subcommand)]
pub enum SshCommand {
    /// A shell (or -C CMD) on a terminal in one of the app's machines
    Console(ConsoleArgs),
}

#[derive(Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    app: AppFlag,
    /// The machine (default: a started machine of the app)
    #[arg(long)]
    machine: Option<String>,
    /// Run this command (with /bin/sh -c) instead of a shell
    #[arg(short = 'C', long = "command")]
    command: Option<String>,
    /// As this user of the image (default: root)
    #[arg(short = 'u', long)]
    user: Option<String>,
}

/// This terminal, raw until dropped.
struct Raw(Option<rustix::termios::Termios>);

impl Raw {
    fn enter() -> Raw {
        let stdin = std::io::stdin();
        let Ok(before) = rustix::termios::tcgetattr(&stdin) else {
            return Raw(None);
        };
        let mut raw = before.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        Raw(Some(before))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                before,
            );
        }
    }
}

/// This terminal's size (24 x 80 when it is none).
fn size() -> (u16, u16) {
    rustix::termios::tcgetwinsize(std::io::stdin())
        .ok()
        .filter(|w| w.ws_row > 0 && w.ws_col > 0)
        .map_or((24, 80), |w| (w.ws_row, w.ws_col))
}

pub fn run(command: SshCommand) -> Result<()> {
    let SshCommand::Console(args) = command;
    // A machine named needs no app.
    let pick = match args.machine {
        Some(id) => Ok(id),
        None => Err(app_name(&args.app)?),
    };
    let client = connect()?;
    let rt = runtime()?;
    let code = rt.block_on(async move {
        let id = match pick {
            Ok(id) => id,
            Err(app) => started_machine(&client, &app).await?,
        };
        let argv: Vec<String> = match &args.command {
            Some(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
            None => Vec::new(),
        };
        session(&client, &id, &argv, args.user.as_deref()).await
    })?;
    std::process::exit(code)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A started machine of `app`.
pub(crate) async fn started_machine(
    client: &hangar_api::client::Client,
    app: &str,
) -> Result<String> {
    client
        .machines()
        .await?
        .into_iter()
        .find(|m| {
            m.app.as_deref() == Some(app) && m.state == hangar_api::store::MachineState::Started
        })
        .map(|m| m.id)
        .with_context(|| {
            format!("app {app} has no started machine: start one, or name one with --machine")
        })
}

/// `argv` (none: the shell) on a terminal in machine `id`, this terminal
/// raw meanwhile; the command's exit code.
pub(crate) async fn session(
    client: &hangar_api::client::Client,
    id: &str,
    argv: &[String],
    user: Option<&str>,
) -> Result<i32> {
    let (rows, cols) = size();
    let ws = client.console(id, argv, user, rows, cols).await?;
    let (mut tx, mut rx) = ws.split();
    let raw = Raw::enter();
    // Standard input, read on a thread of its own.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdout = std::io::stdout();
    let mut code = None;
    loop {
        tokio::select! {
            input = in_rx.recv() => match input {
                Some(bytes) => { tx.send(Message::Binary(bytes.into())).await?; }
                // No more input: the command runs on until it ends.
                None => in_rx = tokio::sync::mpsc::channel(1).1,
            },
            _ = winch.recv() => {
                let (rows, cols) = size();
                let text = serde_json::to_string(&Control::Resize { rows, cols })?;
                tx.send(Message::Text(text.into())).await?;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(Control::Exit(c)) = serde_json::from_str(t.as_str()) {
                        code = Some(c);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => { drop(raw); anyhow::bail!("the console broke off: {e}"); }
            },
        }
    }
    drop(raw);
    Ok(code.unwrap_or(255))
}

#[derive(Args)]
pub struct ConsoleMachineArgs {
    #[command(flatten)]
    app: AppFlag,
    /// Run this (with /bin/sh -c; default: `console_command` of
    /// ./hangar.toml, else the image's shell)
    #[arg(short = 'C', long = "command")]
    command: Option<String>,
}

/// `hangar console -a APP`: an ephemeral machine of the app's current
/// release (its image, environment and secrets; no services, so the edge
/// sends it nothing), a terminal in it running the console command, and
/// the machine destroyed when the command ends, however it ends.
pub fn console_machine(args: ConsoleMachineArgs) -> Result<()> {
    let app = app_name(&args.app)?;
    let local = std::path::Path::new(hangar_api::app_toml::FILE);
    let command = args.command.clone().or_else(|| {
        hangar_api::app_toml::AppToml::load(local)
            .ok()
            .filter(|t| t.app == app)
            .and_then(|t| t.console_command)
    });
    let client = connect()?;
    let rt = runtime()?;
    let code = rt.block_on(async move {
        let release = client
            .releases(&app)
            .await?
            .into_iter()
            .filter(|r| r.status == hangar_api::apps::ReleaseStatus::Complete)
            .max_by_key(|r| r.version)
            .with_context(|| format!("app {app} has no deployed release: `hangar deploy` first"))?;
        let mut config = release.config;
        config.services.clear();
        config.checks.clear();
        config.metrics.clear();
        config.init.exec = Some(vec!["sleep".into(), "86400".into()]);
        config.auto_destroy = true;
        config.restart.policy = hangar_api::config::RestartPolicy::No;
        // Deploys and scaling leave it be while the session lasts.
        config.role = hangar_api::config::MachineRole::Console;
        let m = client
            .create_machine(&hangar_api::wire::CreateMachine {
                name: None,
                app: Some(app.clone()),
                config,
                ..Default::default()
            })
            .await?;
        eprintln!("console machine {} of {app} (release v{}); it goes when this ends", m.id, release.version);
        let ran = async {
            client.wait(&m.id, "started", 120).await?;
            let argv: Vec<String> = match &command {
                Some(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
                None => Vec::new(),
            };
            session(&client, &m.id, &argv, None).await
        }
        .await;
        if let Err(e) = client.destroy_machine(&m.id, true).await {
            eprintln!("hangar: the console machine {} was not destroyed ({e}); destroy it: hangar machine destroy {} --force", m.id, m.id);
        }
        ran
    })?;
    std::process::exit(code)
}
