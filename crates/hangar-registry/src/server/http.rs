//! HTTP plumbing of the registry: bodies, responses, errors as responses,
//! query parameters, ranges and pagination links.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hangar_oci::Digest;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::error::ApiError;
use crate::metrics::Metrics;

use super::routes::percent_decode;
use super::{Body, CHUNK};

pub(super) fn query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(super) fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub(super) fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(super) fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn response(status: StatusCode) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", "registry/2.0")
}

pub(super) type Http<T = Response<Body>> = Result<T, ApiError>;

pub(super) fn build(b: hyper::http::response::Builder, body: Body) -> Http {
    b.body(body).map_err(ApiError::internal)
}

pub(super) fn json(status: StatusCode, value: &serde_json::Value, content_type: &str) -> Http {
    let bytes = serde_json::to_vec(value).map_err(ApiError::internal)?;
    build(
        response(status)
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, bytes.len()),
        full_body(bytes),
    )
}

pub(super) fn error_response(e: &ApiError, challenge: Option<String>) -> Response<Body> {
    let body = e.body();
    let mut b = response(e.status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len());
    if let Some(c) = challenge {
        b = b.header("WWW-Authenticate", c);
    }
    b.body(full_body(body))
        .unwrap_or_else(|_| Response::new(empty_body()))
}

/// Why a request was refused, before it becomes an answer.
pub(super) enum Refusal {
    Api(ApiError),
    /// 401 with a bearer challenge for this scope (None: no scope).
    Challenge(Option<String>),
    /// 403 DENIED for a write, with the challenge for its scope marked
    /// `insufficient_scope`: clients that renew their token on a 403
    /// (oras) do so once, are refused again, and stop, instead of
    /// retrying with backoff for minutes.
    Denied(ApiError, String),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Api(e)
    }
}

pub(super) type Handled = Result<Response<Body>, Refusal>;

pub(super) fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| match e {
        hangar_oci::Error::UnsupportedDigest { .. } => ApiError::digest_invalid(format!(
            "{s:?} uses a digest algorithm this registry does not support; use sha256 or sha512"
        )),
        _ => ApiError::digest_invalid(format!(
            "{s:?} is not a digest: sha256:<64 hex> or sha512:<128 hex>"
        )),
    })
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`: inclusive (start, end).
pub(super) fn parse_range(r: &str, size: u64) -> Option<(u64, u64)> {
    let spec = r.strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

/// `Content-Range: a-b` (the registry form) or `bytes a-b/*`.
pub(super) fn parse_content_range(r: &str) -> Option<(u64, u64)> {
    let r = r
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches('=')
        .trim();
    let r = r.split('/').next()?;
    let (a, b) = r.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

pub(super) fn paginate(
    items: Vec<String>,
    q: &[(String, String)],
    path: &str,
) -> Result<(Vec<String>, Option<String>), ApiError> {
    let last = param(q, "last");
    let mut items: Vec<String> = match last {
        Some(l) => items.into_iter().filter(|i| i.as_str() > l).collect(),
        None => items,
    };
    let n = match param(q, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                "n must be a number",
            )
        })?),
        None => None,
    };
    match n {
        Some(n) if items.len() > n => {
            items.truncate(n);
            let link = items
                .last()
                .map(|l| format!("<{path}?n={n}&last={l}>; rel=\"next\""));
            Ok((items, link))
        }
        _ => Ok((items, None)),
    }
}

pub(super) async fn read_capped(
    mut body: Incoming,
    cap: usize,
    metrics: &Metrics,
) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                format!("reading the body failed: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            metrics
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            out.extend_from_slice(&data);
            if out.len() > cap {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "MANIFEST_INVALID",
                    format!("manifest larger than {cap} bytes"),
                ));
            }
        }
    }
    Ok(out)
}

/// Stream `len` bytes of `file` from its current position.
pub(super) fn file_body(file: File, len: u64) -> Body {
    let stream = futures_util::stream::unfold((file, len), |(mut file, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        let n = remaining.min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        match tokio::task::block_in_place(|| file.read_exact(&mut buf)) {
            Ok(()) => Some((
                Ok(Frame::data(Bytes::from(buf))),
                (file, remaining - n as u64),
            )),
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    StreamBody::new(stream).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(percent_decode("org%2Fapp%3Ax"), "org/app:x");
    }

    #[test]
    fn pagination_links() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let q = vec![("n".to_string(), "2".to_string())];
        let (page, link) = paginate(items.clone(), &q, "/v2/x/tags/list").unwrap();
        assert_eq!(page, ["a", "b"]);
        assert_eq!(link.unwrap(), "</v2/x/tags/list?n=2&last=b>; rel=\"next\"");
        let q = vec![
            ("n".to_string(), "2".to_string()),
            ("last".to_string(), "b".to_string()),
        ];
        let (page, link) = paginate(items, &q, "/p").unwrap();
        assert_eq!((page, link), (vec!["c".to_string()], None));
    }
}
