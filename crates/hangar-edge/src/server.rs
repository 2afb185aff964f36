//! Listeners: plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) and
//! TLS with ALPN `h2` and `http/1.1`; keep-alive, upgrades, header size and
//! header time limits; and the admin endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::proxy::Edge;

/// A TLS server config from PEM files, offering HTTP/2 and HTTP/1.1.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let at = |p: &Path| {
        let p = p.display().to_string();
        move |e: rustls_pki_types::pem::Error| format!("{p}: {e}")
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(at(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(at(cert))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(at(key))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn builder(edge: &Edge) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let header_bytes = edge.limits.max_header_bytes.max(8192) as usize;
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(edge.limits.client_timeout)
        .max_buf_size(header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(header_bytes as u32);
    b
}

/// Serve clients on `listener` until `shutdown` resolves; connections
/// already open finish on their own.
pub async fn serve(
    edge: Arc<Edge>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let builder = Arc::new(builder(&edge));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (edge, builder, acceptor) = (edge.clone(), builder.clone(), acceptor.clone());
        tokio::spawn(async move {
            match acceptor {
                None => connection(edge, &builder, stream, peer, false).await,
                Some(acceptor) => {
                    let timeout = edge.limits.client_timeout;
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    {
                        connection(edge, &builder, stream, peer, true).await;
                    }
                }
            }
        });
    }
}

async fn connection<S>(
    edge: Arc<Edge>,
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    peer: SocketAddr,
    tls: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| edge.clone().handle(req, peer, tls));
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

/// Serve `addr` with `workers` threads, each with its own single-threaded
/// runtime watching the one listening socket (a duplicate descriptor per
/// worker): whichever worker is free accepts the next connection, and a
/// request never wakes another thread, as in nginx's worker processes.
/// Returns the bound address (the port when `addr` asked for port 0).
pub async fn spawn_workers(
    edge: Arc<Edge>,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    workers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> Result<SocketAddr, String> {
    let failed = |e: std::io::Error| {
        format!("cannot listen on {addr} for the {what}: {e}; pick another address")
    };
    let listener = bind(addr, what).await?.into_std().map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 1..workers.max(1) {
        sockets.push(listener.try_clone().map_err(failed)?);
    }
    sockets.push(listener);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (edge, tls, mut stop) = (edge.clone(), tls.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("edge-{i}"))
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(socket) else {
                        return;
                    };
                    serve(edge, listener, tls, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                });
            })
            .map_err(|e| format!("cannot start an edge worker thread: {e}"))?;
    }
    Ok(bound)
}

/// Bind `addr` with a message that says what to do when it is taken.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen on {addr} for the {what}: {e}; pick another address in the edge config"
        )
    })
}
