//! The edge's one error: what went wrong ([`Kind`]), whose fault it is
//! ([`Side`]), whether another backend may take the request (`retry`), and
//! the cause in words. [`ProxyError::respond`] is the one place an error
//! becomes a status and an error page; the page carries its side as a
//! response extension, which [`crate::Edge::handle`] counts.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::upstream::{UpBody, UpstreamError};

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request (no host, a body too large or too slow): counted
    /// nowhere as the app's or the edge's error.
    Client,
    /// The app's backends: none started, unreachable, slow, at their
    /// limit.
    Upstream,
    /// The edge itself.
    Internal,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The request names no host.
    NoHost,
    /// No app is served at the host.
    UnknownHost,
    /// The request body is over the edge's limit.
    BodyTooLarge,
    /// The request body stalled past the client timeout.
    BodyStalled,
    /// `only-if-cached`, and it is not.
    NotCached,
    /// No backend to send to: none started, or none healthy.
    NoBackend,
    /// Every backend is at its hard limit, and the queue wait ran out.
    AtLimit,
    /// The app was asked to start a machine, and could not.
    WakeFailed,
    /// No connection to the backend: nothing was sent.
    Connect,
    /// The request failed on its way (sent, or partly).
    Request,
    /// The backend did not answer in time.
    Timeout,
    /// The origin answered with this server error (while a stored
    /// response may serve instead).
    Origin(StatusCode),
    /// The origin's body broke off mid-way.
    BodyBroke,
    /// The request the cache waited on ended without an answer.
    FillEnded,
    /// The app asked to replay a request that was replayed already.
    ReplayLoop,
    /// Past the app's rate limit (its own, or the client's).
    RateLimited,
}

/// The header an error page names its [`Kind`] in.
pub const ERROR_HEADER: &str = "hangar-error";

impl Kind {
    /// Its name in the [`ERROR_HEADER`].
    pub fn code(self) -> &'static str {
        match self {
            Kind::NoHost => "no-host",
            Kind::UnknownHost => "unknown-host",
            Kind::BodyTooLarge => "body-too-large",
            Kind::BodyStalled => "body-stalled",
            Kind::NotCached => "not-cached",
            Kind::NoBackend => "no-backend",
            Kind::AtLimit => "at-limit",
            Kind::WakeFailed => "wake-failed",
            Kind::Connect => "connect",
            Kind::Request => "request",
            Kind::Timeout => "timeout",
            Kind::Origin(_) => "origin",
            Kind::BodyBroke => "body-broke",
            Kind::FillEnded => "fill-ended",
            Kind::ReplayLoop => "replay-loop",
            Kind::RateLimited => "rate-limited",
        }
    }

    /// Whether an edge answering so to another had nothing to serve with
    /// (the other may try elsewhere: nothing reached an app).
    pub fn nothing_here(code: &[u8]) -> bool {
        [
            &b"no-backend"[..],
            b"connect",
            b"wake-failed",
            b"unknown-host",
        ]
        .contains(&code)
    }

    pub fn side(self) -> Side {
        match self {
            Kind::NoHost
            | Kind::UnknownHost
            | Kind::BodyTooLarge
            | Kind::BodyStalled
            | Kind::NotCached
            | Kind::RateLimited => Side::Client,
            Kind::FillEnded => Side::Internal,
            _ => Side::Upstream,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::NoHost => StatusCode::BAD_REQUEST,
            Kind::UnknownHost => StatusCode::NOT_FOUND,
            Kind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::BodyStalled => StatusCode::REQUEST_TIMEOUT,
            Kind::NotCached | Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::NoBackend | Kind::AtLimit | Kind::WakeFailed => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Connect | Kind::Request | Kind::BodyBroke | Kind::FillEnded => {
                StatusCode::BAD_GATEWAY
            }
            Kind::Origin(status) => status,
            Kind::ReplayLoop => StatusCode::LOOP_DETECTED,
            Kind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{cause}")]
pub struct ProxyError {
    pub kind: Kind,
    pub side: Side,
    /// Another backend may take the request.
    pub retry: bool,
    pub cause: Arc<str>,
}

/// A client's request body that tripped a limit (the error its stream
/// ends with, found again in the upstream error's sources).
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the request body is above the limit of {0} bytes")]
    TooLarge(u64),
    #[error("the request body stalled for {0:?}")]
    Stalled(std::time::Duration),
}

/// The client body limit an error comes from, among its sources.
fn tripped_limit(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(body) = s.downcast_ref::<ClientBodyError>() {
            let kind = match body {
                ClientBodyError::TooLarge(_) => Kind::BodyTooLarge,
                ClientBodyError::Stalled(_) => Kind::BodyStalled,
            };
            return Some(ProxyError::new(kind, body.to_string()));
        }
        source = s.source();
    }
    None
}

impl ProxyError {
    /// A client's body that could not be read whole: its limit's error
    /// (413, 408) when it tripped one, else a broken request.
    pub fn client_body(e: &(dyn std::error::Error + 'static)) -> ProxyError {
        tripped_limit(e).unwrap_or_else(|| {
            ProxyError::new(
                Kind::BodyStalled,
                format!("the request body broke off: {e}"),
            )
        })
    }

    pub fn new(kind: Kind, cause: impl Into<Arc<str>>) -> ProxyError {
        ProxyError {
            kind,
            side: kind.side(),
            retry: false,
            cause: cause.into(),
        }
    }

    /// A failed attempt at a backend. It may go to another backend when
    /// nothing was sent, or when it can be sent again (`replayable`:
    /// idempotent, no body; as nginx's proxy_next_upstream) and the
    /// backend did not merely take too long. A client's body that tripped
    /// a limit is the client's error, whatever the connection made of it.
    pub fn upstream(e: &UpstreamError, replayable: bool) -> ProxyError {
        if let Some(limit) = tripped_limit(e) {
            return limit;
        }
        let (kind, retry) = match e {
            UpstreamError::Connect(..) => (Kind::Connect, true),
            UpstreamError::Timeout(..) => (Kind::Timeout, false),
            UpstreamError::Request(..) => (Kind::Request, replayable),
        };
        debug_assert_eq!(kind == Kind::Connect, e.before_send());
        ProxyError {
            retry,
            ..ProxyError::new(kind, e.to_string())
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The answer: the status and an error page that says what happened
    /// and where, marked with its [`Side`].
    pub fn respond(&self, host: &str) -> Response<UpBody> {
        let mut r = page(self.status(), host, &self.cause);
        r.extensions_mut().insert(self.side);
        // Another edge that sent the request here reads it (to try
        // another node when this one has nothing to serve it with).
        r.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(self.kind.code()));
        r
    }
}

/// An error page that says what happened and where.
pub fn page(status: StatusCode, host: &str, why: &str) -> Response<UpBody> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let escaped = why
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let host_line = if host.is_empty() {
        String::new()
    } else {
        format!("<p>Host: <code>{}</code></p>", host.replace('<', "&lt;"))
    };
    let html = format!(
        "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>{host_line}<p>{escaped}</p><hr><p>hangar edge</p></body></html>\n"
    );
    let mut r = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // For people reading responses (curl -i); nothing in the edge reads it.
    if let Ok(v) = HeaderValue::from_str(&why.replace(['\r', '\n'], " ")) {
        h.insert("x-hangar-error", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_status_side_and_retry() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let connect = UpstreamError::Connect(addr, "refused".into());
        let timeout = UpstreamError::Timeout(addr, std::time::Duration::from_secs(1));
        let e = ProxyError::upstream(&connect, false);
        assert_eq!(
            (e.kind, e.retry, e.status().as_u16()),
            (Kind::Connect, true, 502)
        );
        let e = ProxyError::upstream(&timeout, true);
        assert_eq!(
            (e.kind, e.retry, e.status().as_u16()),
            (Kind::Timeout, false, 504)
        );
        assert_eq!(e.side, Side::Upstream);
        // A client's body that tripped a limit is the client's error.
        let body = UpstreamError::Request(addr, Box::new(ClientBodyError::TooLarge(5)));
        let e = ProxyError::upstream(&body, true);
        assert_eq!(
            (e.kind, e.side, e.retry),
            (Kind::BodyTooLarge, Side::Client, false)
        );
        assert_eq!(e.status().as_u16(), 413);
        assert_eq!(Kind::BodyTooLarge.side(), Side::Client);
        assert_eq!(
            Kind::Origin(StatusCode::from_u16(500).unwrap())
                .status()
                .as_u16(),
            500
        );
        let r = ProxyError::new(Kind::NoBackend, "none <started>").respond("a.test");
        assert_eq!(r.status().as_u16(), 503);
        assert_eq!(r.extensions().get::<Side>(), Some(&Side::Upstream));
    }
}
