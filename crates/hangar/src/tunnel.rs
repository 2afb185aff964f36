//! `hangar proxy LOCAL[:REMOTE] -a APP [--machine ID]`: a TCP port on this
//! host whose every connection is a stream to a port of one of the app's
//! machines, through the node's API (one upgraded HTTP connection each,
//! with the caller's token; `server::tunnel` on the node's side).

use anyhow::{Context, Result};
use clap::Args;

use crate::apps::{app_name, AppFlag};
use crate::client::connect;

#[derive(Args)]
pub struct ProxyArgs {
    /// LOCAL[:REMOTE]: listen on LOCAL, reach REMOTE of the machine (default: the same port)
    ports: String,
    #[command(flatten)]
    app: AppFlag,
    /// The machine (default: a started machine of the app)
    #[arg(long)]
    machine: Option<String>,
    /// The local address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
}

fn ports(spec: &str) -> Result<(u16, u16)> {
    let parse = |p: &str| {
        p.parse::<u16>().ok().filter(|p| *p > 0).with_context(|| {
            format!(
                "{p:?} is not a port (1 to 65535); write LOCAL[:REMOTE], e.g. 5432 or 15432:5432"
            )
        })
    };
    match spec.split_once(':') {
        Some((local, remote)) => Ok((parse(local)?, parse(remote)?)),
        None => {
            let p = parse(spec)?;
            Ok((p, p))
        }
    }
}

pub fn run(args: ProxyArgs) -> Result<()> {
    let (local, remote) = ports(&args.ports)?;
    let app = app_name(&args.app)?;
    let client = connect()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let id = match args.machine {
            Some(id) => id,
            None => client
                .machines()
                .await?
                .into_iter()
                .find(|m| {
                    m.app.as_deref() == Some(app.as_str())
                        && m.state == hangar_api::store::MachineState::Started
                })
                .map(|m| m.id)
                .with_context(|| {
                    format!(
                        "app {app} has no started machine: start one, or name one with --machine"
                    )
                })?,
        };
        // Refused here, before listening, when it cannot work at all.
        drop(client.tunnel(&id, remote).await?);
        let listener = tokio::net::TcpListener::bind((args.bind, local))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{local}; pick another local port",
                    args.bind
                )
            })?;
        eprintln!(
            "proxying {}:{local} to port {remote} of machine {id} (Ctrl-C to stop)",
            args.bind
        );
        let client = std::sync::Arc::new(client);
        loop {
            let (mut conn, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                _ = tokio::signal::ctrl_c() => break,
            };
            let _ = conn.set_nodelay(true);
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                match client.tunnel(&id, remote).await {
                    Ok(up) => {
                        let mut up = hyper_util::rt::TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                    Err(e) => eprintln!("hangar: a connection was refused: {e}"),
                }
            });
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_specs() {
        assert_eq!(super::ports("5432").unwrap(), (5432, 5432));
        assert_eq!(super::ports("15432:5432").unwrap(), (15432, 5432));
        for bad in ["0", "x", "1:", "70000", ":80"] {
            assert!(super::ports(bad).is_err(), "{bad}");
        }
    }
}
