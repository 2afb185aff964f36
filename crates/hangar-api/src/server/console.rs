//! `GET /v1/machines/{id}/console` as a WebSocket: a command on a terminal
//! in a running machine, for `hangar ssh console`. Binary messages carry
//! the terminal's bytes both ways; text messages are JSON: the client's
//! `{"resize": {"rows": R, "cols": C}}`, and the node's last one,
//! `{"exit": CODE}`. Query: `arg` (repeated; default: the image's bash or
//! sh), `user`, `rows`, `cols`. What cannot start (a stopped machine, a
//! bad user) is refused before the upgrade, with the reason.

use std::io::{Read, Write};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{blocking, ApiState, OwnMachine};
use crate::error::Error;
use crate::store::MachineState;

/// The shell when no command is given: bash where the image has it.
const SHELL: [&str; 3] = [
    "/bin/sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi",
];

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    Resize { rows: u16, cols: u16 },
    Exit(i32),
}

pub(super) async fn console(
    State(api): ApiState,
    caller: super::Caller,
    OwnMachine(m): OwnMachine,
    RawQuery(raw): RawQuery,
    ws: WebSocketUpgrade,
) -> Result<Response, Error> {
    if m.state != MachineState::Started {
        return Err(Error::Conflict(format!(
            "machine {} is {}: start it first (hangar machine start {})",
            m.id, m.state, m.id
        )));
    }
    let (mut argv, mut user, mut rows, mut cols) = (Vec::new(), None, 24u16, 80u16);
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned() {
        let number = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| Error::Invalid(format!("console {k}={v}: give 1 to 1000")))
        };
        match k.as_str() {
            "arg" => argv.push(v),
            "user" => user = Some(v),
            "rows" => rows = number(&v)?,
            "cols" => cols = number(&v)?,
            other => {
                return Err(Error::Invalid(format!(
                    "console has no parameter {other:?}: arg, user, rows, cols"
                )))
            }
        }
    }
    if argv.is_empty() {
        argv = SHELL.iter().map(|s| s.to_string()).collect();
    }
    let permit = api.streams.take(&caller, "tunnels and consoles")?;
    let node = api.node.clone();
    let console = blocking(move || node.console(&m, &argv, user.as_deref(), rows, cols)).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        // Held while the console is open.
        let _permit = permit;
        bridge(socket, console).await
    }))
}

/// Terminal bytes between the socket and the console until the command
/// exits (its code is the last message) or the client goes (the command
/// gets SIGHUP).
async fn bridge(mut socket: WebSocket, console: hangar_machine::console::Console) {
    let (Ok(mut reader), Ok(mut writer)) = (console.master.try_clone(), console.master.try_clone())
    else {
        console.hang_up();
        return;
    };
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        // EIO once the command and runc have closed the terminal.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || out_tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let (in_tx, in_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        while let Ok(bytes) = in_rx.recv() {
            if writer.write_all(&bytes).is_err() {
                break;
            }
        }
    });
    let mut client_gone = false;
    loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).await.is_err() {
                        client_gone = true;
                        break;
                    }
                }
                None => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => { let _ = in_tx.send(b.to_vec()); }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(Control::Resize { rows, cols }) = serde_json::from_str(t.as_str()) {
                        let _ = console.resize(rows, cols);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => { client_gone = true; break; }
            },
        }
    }
    if client_gone {
        console.hang_up();
    }
    drop(in_tx);
    let code = tokio::task::spawn_blocking(move || console.wait())
        .await
        .unwrap_or(-1);
    if !client_gone {
        if let Ok(text) = serde_json::to_string(&Control::Exit(code)) {
            let _ = socket.send(Message::Text(text.into())).await;
        }
        let _ = socket.send(Message::Close(None)).await;
    }
}
