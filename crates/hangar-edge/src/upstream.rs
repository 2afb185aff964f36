//! Connections to backends: HTTP/1.1 with a pool of idle keep-alive
//! connections per backend, a connect timeout, and errors that say whether
//! anything reached the backend (so a retry elsewhere is safe).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request bodies sent upstream: a client's body, or none.
pub type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle connections kept per backend.
const IDLE_PER_BACKEND: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: another backend may be tried.
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// The request failed on its way; the source says why (a client's
    /// body that tripped a limit among them).
    #[error("{0}: {1}")]
    Request(SocketAddr, #[source] BoxError),
}

impl UpstreamError {
    /// Whether nothing reached the backend.
    pub fn before_send(&self) -> bool {
        matches!(self, UpstreamError::Connect(..))
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<SendRequest<UpBody>>>,
}

impl Pool {
    fn take(&self) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, s: SendRequest<UpBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PER_BACKEND {
            idle.push(s);
        }
    }

    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Open a fresh HTTP/1.1 connection (used for upgrades, which take the
/// connection over, and by the pool) to the first of `addrs` (a backend's
/// addresses) that does not refuse it: an app that listens on only one of
/// a machine's IPv4 and IPv6 addresses is still reached.
pub async fn connect(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<SendRequest<UpBody>, UpstreamError> {
    let Some(&addr) = addrs.first() else {
        return Err(UpstreamError::Connect(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            "the backend has no address".into(),
        ));
    };
    let mut refused = Vec::new();
    let mut stream = None;
    for &a in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused.push(format!("{a}: {e}"));
            }
            Ok(Err(e)) => return Err(UpstreamError::Connect(a, e.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(
                    a,
                    format!("timed out after {timeout:?}"),
                ))
            }
        }
    }
    let Some(stream) = stream else {
        return Err(UpstreamError::Connect(addr, refused.join("; ")));
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Connect(addr, e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// A connection ready to take one request: pooled or fresh.
pub struct Conn {
    sender: SendRequest<UpBody>,
    pooled: bool,
    pool: Arc<Pool>,
    addrs: Arc<[SocketAddr]>,
}

/// A connection to a backend at `addrs` (see [`connect`]): an idle pooled
/// one, else a new one. Failing here sends nothing, so the caller may try
/// another backend.
pub async fn checkout(
    pool: &Arc<Pool>,
    addrs: &Arc<[SocketAddr]>,
    connect_timeout: Duration,
) -> Result<Conn, UpstreamError> {
    let (sender, pooled) = match pool.take() {
        Some(s) => (s, true),
        None => (connect(addrs, connect_timeout).await?, false),
    };
    Ok(Conn {
        sender,
        pooled,
        pool: pool.clone(),
        addrs: addrs.clone(),
    })
}

impl Conn {
    /// Send `req`; the connection returns to the pool when the response is
    /// done. A pooled connection the backend had closed meanwhile is
    /// retried once on a fresh one when the request has no body.
    pub async fn send(
        mut self,
        req: Request<UpBody>,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        use hyper::body::Body as _;
        let addr = self.addrs[0];
        let retry = req.body().is_end_stream().then(|| head_of(&req));
        let mut req = req;
        loop {
            let result =
                tokio::time::timeout(response_timeout, self.sender.send_request(req)).await;
            match result {
                Err(_) => return Err(UpstreamError::Timeout(addr, response_timeout)),
                Ok(Ok(resp)) => {
                    let (mut sender, pool) = (self.sender, self.pool);
                    tokio::spawn(async move {
                        if sender.ready().await.is_ok() {
                            pool.put(sender);
                        }
                    });
                    return Ok(resp);
                }
                Ok(Err(e)) => {
                    if self.pooled
                        && (e.is_canceled() || e.is_closed() || e.is_incomplete_message())
                    {
                        if let Some(head) = &retry {
                            req = head_of(head).map(|()| empty());
                            self.sender = connect(&self.addrs, connect_timeout).await?;
                            self.pooled = false;
                            continue;
                        }
                    }
                    return Err(UpstreamError::Request(addr, Box::new(e)));
                }
            }
        }
    }
}

/// The method, URI, version and headers of a request, without its body.
fn head_of<B>(req: &Request<B>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

pub fn empty() -> UpBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}
