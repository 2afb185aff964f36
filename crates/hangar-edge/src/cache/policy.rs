//! RFC 9111 (shared cache) and RFC 5861 decisions as pure functions of
//! headers and times: may a response be stored, how long it stays fresh,
//! how old it is, and what a lookup may do with a stored response. The
//! edge reads a response's directives from the targeted fields of RFC 9213
//! first (`Hangar-CDN-Cache-Control`, then `CDN-Cache-Control`), else from
//! `Cache-Control` with `Surrogate-Control`'s freshness over it
//! ([`Directives::for_edge`]). No I/O here; every clause is unit-tested
//! below.

use std::time::{Duration, SystemTime};

use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode};

/// The cache directives of one `Cache-Control` header set.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Directives {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    /// `no-cache` with no field names (a qualified `no-cache="f"` is
    /// treated the same: stricter is allowed).
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    // Request-only directives.
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
    /// The field these directives came from.
    pub source: Source,
}

/// Where the edge found a response's directives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    #[default]
    CacheControl,
    /// `Cache-Control`, with `Surrogate-Control`'s `max-age` or `no-store`.
    Surrogate,
    /// A targeted field (RFC 9213), by name: `Cache-Control` and `Expires`
    /// are ignored.
    Targeted(&'static str),
}

/// The targeted fields this edge obeys, most specific first (RFC 9213
/// section 2.1's target list).
pub const TARGETED: [&str; 2] = ["hangar-cdn-cache-control", "cdn-cache-control"];

/// Fields meant for this edge alone, removed before a response reaches a
/// client (kept between the cluster's tiers).
pub const EDGE_ONLY: [&str; 2] = ["hangar-cdn-cache-control", "surrogate-control"];

impl Directives {
    /// A request's directives, or a response's `Cache-Control` alone.
    pub fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for item in split_list(value) {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item.trim(), None),
                };
                d.set(name, arg);
            }
        }
        d
    }

    /// The directives this edge applies to a stored response: the first
    /// targeted field ([`TARGETED`]) that is a valid, non-empty structured
    /// dictionary (RFC 9213 section 2.1; an invalid one is ignored), else
    /// `Cache-Control` with `Surrogate-Control`'s `max-age` and `no-store`
    /// taking precedence where both speak of freshness (its items targeted
    /// at another device, `;name`, are ignored).
    pub fn for_edge(resp: &HeaderMap) -> Directives {
        for name in TARGETED {
            if let Some(d) = targeted(resp, name) {
                return d;
            }
        }
        let mut d = Directives::parse(resp);
        let mut surrogate = false;
        for value in resp.get_all("surrogate-control") {
            let Ok(value) = value.to_str() else { continue };
            for item in split_list(value) {
                let (item, target) = match item.split_once(';') {
                    Some((i, t)) => (i.trim(), Some(t.trim())),
                    None => (item, None),
                };
                if target.is_some_and(|t| !t.eq_ignore_ascii_case("hangar")) {
                    continue;
                }
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item.trim(), None),
                };
                match name.to_ascii_lowercase().as_str() {
                    "max-age" => {
                        // Edge Architecture's `max-age=N+M`: M is how long
                        // it may be served stale if the origin fails.
                        let (fresh, stale) = match arg.and_then(|a| a.split_once('+')) {
                            Some((f, s)) => (f, s.parse::<u64>().ok()),
                            None => (arg.unwrap_or(""), None),
                        };
                        d.max_age = Some(fresh.parse::<u64>().unwrap_or(0));
                        d.s_maxage = None;
                        if stale.is_some() {
                            d.stale_if_error = stale;
                        }
                        surrogate = true;
                    }
                    "no-store" => {
                        d.no_store = true;
                        surrogate = true;
                    }
                    _ => {}
                }
            }
        }
        if surrogate {
            d.source = Source::Surrogate;
        }
        d
    }

    /// Set one directive from its name and argument (either syntax).
    fn set(&mut self, name: &str, arg: Option<&str>) {
        let d = self;
        {
            {
                let secs = || arg.and_then(|a| a.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    // A duplicated or invalid max-age means the stricter reading.
                    "max-age" => {
                        d.max_age = Some(secs().unwrap_or(0).min(d.max_age.unwrap_or(u64::MAX)))
                    }
                    "s-maxage" => {
                        d.s_maxage = Some(secs().unwrap_or(0).min(d.s_maxage.unwrap_or(u64::MAX)))
                    }
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    "must-understand" => d.must_understand = true,
                    "stale-while-revalidate" => d.stale_while_revalidate = secs(),
                    "stale-if-error" => d.stale_if_error = secs(),
                    // `max-stale` with no value accepts any staleness.
                    "max-stale" => d.max_stale = Some(secs().unwrap_or(u64::MAX)),
                    "min-fresh" => d.min_fresh = secs(),
                    "only-if-cached" => d.only_if_cached = true,
                    _ => {}
                }
            }
        }
    }

    /// Stale responses may never be served without validation (section 4.2.4).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

/// One targeted field's directives, when it is present, non-empty and a
/// valid structured dictionary. Its members mean what the same
/// `Cache-Control` directives mean: integers for the seconds, `true` for
/// the flags; a member of another type counts as the stricter reading.
fn targeted(resp: &HeaderMap, name: &'static str) -> Option<Directives> {
    let mut lines = resp.get_all(name).iter().peekable();
    lines.peek()?;
    let mut text = Vec::new();
    for (i, v) in lines.enumerate() {
        if i > 0 {
            text.extend_from_slice(b", ");
        }
        text.extend_from_slice(v.as_bytes());
    }
    let dict = sfv::Parser::parse_dictionary(&text).ok()?;
    if dict.is_empty() {
        return None;
    }
    let mut d = Directives {
        source: Source::Targeted(name),
        ..Default::default()
    };
    for (key, entry) in &dict {
        let sfv::ListEntry::Item(item) = entry else {
            continue;
        };
        let arg = match &item.bare_item {
            sfv::BareItem::Integer(n) if *n >= 0 => Some(n.to_string()),
            sfv::BareItem::Boolean(true) => None,
            // `max-age="60"`, `max-age=-1`, `no-store=?0`: for a number,
            // a value that is none reads as 0; a false flag is not set.
            sfv::BareItem::Boolean(false) => continue,
            _ => Some(String::new()),
        };
        d.set(key, arg.as_deref());
    }
    Some(d)
}

/// Comma-separated list items, ignoring commas inside quotes.
pub fn split_list(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(value[start..].trim());
    items.retain(|s| !s.is_empty());
    items
}

fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
}

/// Status codes a cache may store with heuristic freshness (section 4.2.2,
/// RFC 9110 section 15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Section 3: may a shared cache store this response to this request?
/// `Ok(())` or the reason it may not, for `Cache-Status`'s `detail`.
pub fn storable(
    method: &Method,
    req: &HeaderMap,
    status: StatusCode,
    resp: &HeaderMap,
) -> Result<(), &'static str> {
    if method != Method::GET {
        return Err("method");
    }
    let rd = Directives::parse(req);
    let d = Directives::for_edge(resp);
    if rd.no_store || d.no_store {
        return Err("no-store");
    }
    if d.private {
        return Err("private");
    }
    // Partial content is not a whole object; 1xx and 304 are not final
    // responses to cache.
    if status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Err("status");
    }
    if req.contains_key(header::AUTHORIZATION)
        && !(d.public || d.must_revalidate || d.s_maxage.is_some())
    {
        return Err("authorization");
    }
    // A response that varies on everything cannot be matched again.
    if resp
        .get_all(header::VARY)
        .iter()
        .any(|v| v.to_str().map(|s| s.contains('*')).unwrap_or(true))
    {
        return Err("vary-star");
    }
    // Storing a Set-Cookie response would hand one user's cookie to all.
    if resp.contains_key(header::SET_COOKIE) && !d.public && d.s_maxage.is_none() {
        return Err("set-cookie");
    }
    let explicit = d.s_maxage.is_some()
        || d.max_age.is_some()
        || (d.source == Source::CacheControl && resp.contains_key(header::EXPIRES));
    if explicit || d.public || heuristically_cacheable(status) {
        Ok(())
    } else {
        Err("status")
    }
}

/// Section 4.2.1: how long the response is fresh. `default_ttl` is the
/// host's policy for responses with no explicit freshness (heuristic).
pub fn freshness_lifetime(status: StatusCode, resp: &HeaderMap, default_ttl: Duration) -> Duration {
    let d = Directives::for_edge(resp);
    if let Some(s) = d.s_maxage {
        return Duration::from_secs(s);
    }
    if let Some(s) = d.max_age {
        return Duration::from_secs(s);
    }
    if let (Source::CacheControl, Some(expires)) = (d.source, resp.get(header::EXPIRES)) {
        // An invalid Expires (e.g. "0") means already expired.
        let Some(expires) = expires
            .to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v).ok())
        else {
            return Duration::ZERO;
        };
        let base = date(resp, header::DATE).unwrap_or_else(SystemTime::now);
        return expires.duration_since(base).unwrap_or(Duration::ZERO);
    }
    if !heuristically_cacheable(status) && !d.public {
        return Duration::ZERO;
    }
    // Heuristic (section 4.2.2): 10% of the time since Last-Modified,
    // at most a day; otherwise the host's default.
    if let (Some(lm), Some(dt)) = (
        date(resp, header::LAST_MODIFIED),
        date(resp, header::DATE).or(Some(SystemTime::now())),
    ) {
        if let Ok(since) = dt.duration_since(lm) {
            return (since / 10).min(Duration::from_secs(86_400));
        }
    }
    default_ttl
}

/// The times a stored response's age is computed from (section 4.2.3).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Times {
    /// When the request that got this response was sent (Unix seconds, f64).
    pub request: f64,
    /// When the response arrived.
    pub response: f64,
}

pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Section 4.2.3: the current age of a stored response.
pub fn current_age(resp: &HeaderMap, times: Times, now: SystemTime) -> Duration {
    age_at(initial_age(resp, times), times, now)
}

/// The age a response had when it was received (`corrected_initial_age`),
/// in seconds: fixed once stored, so computed once.
pub fn initial_age(resp: &HeaderMap, times: Times) -> f64 {
    let age_value = resp
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0) as f64;
    let date_value = date(resp, header::DATE).map(unix).unwrap_or(times.response);
    let apparent_age = (times.response - date_value).max(0.0);
    let response_delay = (times.response - times.request).max(0.0);
    let corrected_age_value = age_value + response_delay;
    apparent_age.max(corrected_age_value)
}

/// The age at `now` of a response received with `initial` age.
pub fn age_at(initial: f64, times: Times, now: SystemTime) -> Duration {
    let resident_time = (unix(now) - times.response).max(0.0);
    Duration::try_from_secs_f64(initial + resident_time).unwrap_or(Duration::MAX)
}

/// What a lookup may do with a stored response (sections 4.2 and 4.3,
/// RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Serve it as it is.
    Fresh,
    /// Serve it, and revalidate in the background (stale-while-revalidate).
    StaleWhileRevalidate,
    /// Ask the origin first (a conditional request when there are
    /// validators); `stale_if_error` says whether the stored response may
    /// still be served if the origin fails.
    Validate { stale_if_error: bool },
}

/// Decide for a request (`req` headers) about a stored response.
/// `invalidated` is a soft purge: the entry counts as stale.
pub fn decide(
    req: &HeaderMap,
    resp: &HeaderMap,
    lifetime: Duration,
    age: Duration,
    invalidated: bool,
) -> Use {
    decide_parsed(req, &Directives::parse(resp), lifetime, age, invalidated)
}

/// [`decide`] with the stored response's directives already parsed.
pub fn decide_parsed(
    req: &HeaderMap,
    d: &Directives,
    lifetime: Duration,
    age: Duration,
    invalidated: bool,
) -> Use {
    let rd = Directives::parse(req);
    let lifetime = if invalidated {
        Duration::ZERO
    } else {
        lifetime
    };
    let stale_by = age.saturating_sub(lifetime);
    let stale = age >= lifetime;
    let sie = |extra: Option<u64>| {
        !d.forbids_stale() && extra.is_some_and(|s| stale_by <= Duration::from_secs(s))
    };
    let stale_if_error = sie(d.stale_if_error) || sie(rd.stale_if_error);

    // Response no-cache, request no-cache, and request max-age=0 all mean
    // "validate first".
    if d.no_cache || rd.no_cache || pragma_no_cache(req) {
        return Use::Validate { stale_if_error };
    }
    if let Some(max_age) = rd.max_age {
        if age > Duration::from_secs(max_age) {
            return Use::Validate { stale_if_error };
        }
    }
    if !stale {
        if let Some(min_fresh) = rd.min_fresh {
            if lifetime - age < Duration::from_secs(min_fresh) {
                return Use::Validate { stale_if_error };
            }
        }
        return Use::Fresh;
    }
    if d.forbids_stale() {
        return Use::Validate {
            stale_if_error: false,
        };
    }
    if let Some(max_stale) = rd.max_stale {
        if stale_by <= Duration::from_secs(max_stale) {
            return Use::Fresh;
        }
    }
    if let Some(swr) = d.stale_while_revalidate {
        if stale_by <= Duration::from_secs(swr) {
            return Use::StaleWhileRevalidate;
        }
    }
    Use::Validate { stale_if_error }
}

fn pragma_no_cache(req: &HeaderMap) -> bool {
    !req.contains_key(header::CACHE_CONTROL)
        && req
            .get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"))
}

/// Section 4.4: an unsafe method with a non-error response invalidates
/// the target URI.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) && (status.is_success() || status.is_redirection())
}

/// Section 4.3.4: merge a 304's headers into the stored ones. Content
/// framing stays the stored response's.
pub fn merge_304(stored: &mut HeaderMap, fresh: &HeaderMap) {
    for name in fresh.keys() {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONTENT_ENCODING
        ) {
            continue;
        }
        stored.remove(name);
        for v in fresh.get_all(name) {
            stored.append(name.clone(), v.clone());
        }
    }
}

/// Does a client's conditional request match the stored response, so a
/// 304 may answer it (RFC 9110 section 13.1)?
pub fn not_modified(req: &HeaderMap, resp: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = resp.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm.trim() == "*" || split_list(inm).iter().any(|t| weak(t) == weak(etag));
    }
    if let (Some(ims), Some(lm)) = (
        date(req, header::IF_MODIFIED_SINCE),
        date(resp, header::LAST_MODIFIED),
    ) {
        return lm <= ims;
    }
    false
}

/// A single satisfiable byte range of a `len`-byte object, or `None` to
/// serve the whole object (no Range, several ranges, or one we ignore).
/// `Err(())` when the range cannot be satisfied (416).
#[allow(clippy::result_unit_err)]
pub fn byte_range(req: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(e) => e.min(len.saturating_sub(1)),
                Err(_) => return Ok(None),
            }
        };
        if start >= len || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }
    const OK: StatusCode = StatusCode::OK;
    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn directives_parse_values_quotes_and_duplicates() {
        let d = Directives::parse(&h(&[
            ("cache-control", "public, max-age=60, s-maxage=\"30\""),
            (
                "cache-control",
                "max-age=10, no-cache=\"set-cookie, x\", stale-while-revalidate=5",
            ),
        ]));
        assert_eq!(d.max_age, Some(10), "the smaller of duplicates wins");
        assert_eq!(d.s_maxage, Some(30));
        assert!(d.public && d.no_cache);
        assert_eq!(d.stale_while_revalidate, Some(5));
        assert_eq!(
            Directives::parse(&h(&[("cache-control", "max-age=abc")])).max_age,
            Some(0)
        );
        assert_eq!(
            Directives::parse(&h(&[("cache-control", "max-stale")])).max_stale,
            Some(u64::MAX)
        );
    }

    #[test]
    fn storable_clauses() {
        let (get, post) = (Method::GET, Method::POST);
        let auth = [("authorization", "Bearer x")];
        let ise = StatusCode::INTERNAL_SERVER_ERROR;
        let pc = StatusCode::PARTIAL_CONTENT;
        type Headers<'a> = &'a [(&'a str, &'a str)];
        /// (method, request headers, status, response headers, verdict)
        type Case<'a> = (
            &'a Method,
            Headers<'a>,
            StatusCode,
            Headers<'a>,
            Result<(), &'a str>,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (&get, &[], OK, &[("cache-control", "max-age=60")], Ok(())),
            (&post, &[], OK, &[("cache-control", "max-age=60")], Err("method")),
            (&get, &[], OK, &[("cache-control", "no-store, max-age=60")], Err("no-store")),
            (&get, &[("cache-control", "no-store")], OK, &[("cache-control", "max-age=60")], Err("no-store")),
            (&get, &[], OK, &[("cache-control", "private, max-age=60")], Err("private")),
            (&get, &[], pc, &[("cache-control", "max-age=60")], Err("status")),
            // Authorization: only with public, must-revalidate or s-maxage.
            (&get, &auth, OK, &[("cache-control", "max-age=60")], Err("authorization")),
            (&get, &auth, OK, &[("cache-control", "public, max-age=60")], Ok(())),
            (&get, &auth, OK, &[("cache-control", "s-maxage=60")], Ok(())),
            (&get, &auth, OK, &[("cache-control", "must-revalidate, max-age=60")], Ok(())),
            (&get, &[], OK, &[("vary", "*"), ("cache-control", "max-age=60")], Err("vary-star")),
            (&get, &[], OK, &[("set-cookie", "a=b"), ("cache-control", "max-age=60")], Err("set-cookie")),
            // No explicit freshness: heuristically cacheable statuses only.
            (&get, &[], OK, &[], Ok(())),
            (&get, &[], ise, &[], Err("status")),
            (&get, &[], ise, &[("cache-control", "max-age=5")], Ok(())),
        ];
        for (i, (method, req, status, resp, want)) in cases.iter().enumerate() {
            assert_eq!(
                storable(method, &h(req), *status, &h(resp)),
                *want,
                "case {i}"
            );
        }
    }

    #[test]
    fn lifetime_precedence() {
        let dflt = S(7);
        assert_eq!(
            freshness_lifetime(
                OK,
                &h(&[("cache-control", "max-age=60, s-maxage=30")]),
                dflt
            ),
            S(30)
        );
        assert_eq!(
            freshness_lifetime(
                OK,
                &h(&[
                    ("cache-control", "max-age=60"),
                    ("expires", "Thu, 01 Jan 2099 00:00:00 GMT")
                ]),
                dflt
            ),
            S(60)
        );
        let expires = h(&[
            ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
            ("expires", "Thu, 26 Nov 2026 10:02:00 GMT"),
        ]);
        assert_eq!(freshness_lifetime(OK, &expires, dflt), S(120));
        assert_eq!(
            freshness_lifetime(OK, &h(&[("expires", "0")]), dflt),
            S(0),
            "invalid Expires is expired"
        );
        let lm = h(&[
            ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
            ("last-modified", "Thu, 26 Nov 2026 09:00:00 GMT"),
        ]);
        assert_eq!(freshness_lifetime(OK, &lm, dflt), S(360), "10% of an hour");
        assert_eq!(freshness_lifetime(OK, &h(&[]), dflt), dflt);
        assert_eq!(
            freshness_lifetime(StatusCode::INTERNAL_SERVER_ERROR, &h(&[]), dflt),
            S(0)
        );
    }

    #[test]
    fn targeted_fields_take_precedence_clause_by_clause() {
        let dflt = S(0);
        let life = |pairs: &[(&str, &str)]| freshness_lifetime(OK, &h(pairs), dflt);
        // 2.1: a valid targeted field decides; Cache-Control is ignored.
        assert_eq!(
            life(&[
                ("cache-control", "max-age=10"),
                ("cdn-cache-control", "max-age=600")
            ]),
            S(600)
        );
        // ...and so is Expires.
        assert_eq!(
            life(&[
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
                ("date", "Thu, 26 Nov 2026 10:00:00 GMT"),
                ("cdn-cache-control", "max-age=5")
            ]),
            S(5)
        );
        // The most specific target first: ours over everyone's.
        assert_eq!(
            life(&[
                ("cdn-cache-control", "max-age=600"),
                ("hangar-cdn-cache-control", "max-age=60")
            ]),
            S(60)
        );
        // Another CDN's targeted field is not ours.
        assert_eq!(
            life(&[
                ("cache-control", "max-age=10"),
                ("fastly-cdn-cache-control", "max-age=600")
            ]),
            S(10)
        );
        // An invalid (not a structured dictionary) or empty targeted field
        // is ignored: the next one, then Cache-Control, decides.
        assert_eq!(
            life(&[
                ("hangar-cdn-cache-control", "max-age=60,,"),
                ("cdn-cache-control", "max-age=30"),
                ("cache-control", "max-age=10")
            ]),
            S(30)
        );
        assert_eq!(
            life(&[("cdn-cache-control", ""), ("cache-control", "max-age=10")]),
            S(10)
        );
        assert_eq!(
            life(&[
                ("cdn-cache-control", "max-age=\"60\""),
                ("cache-control", "max-age=10")
            ]),
            S(0),
            "a max-age that is a string reads as 0, not as Cache-Control's"
        );
        // Several lines of one field are one dictionary.
        let d = Directives::for_edge(&h(&[
            ("cdn-cache-control", "max-age=60"),
            (
                "cdn-cache-control",
                "stale-while-revalidate=30, must-revalidate",
            ),
        ]));
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert!(d.must_revalidate);
        assert_eq!(d.source, Source::Targeted("cdn-cache-control"));
        // Storing: the targeted field's no-store and private win over a
        // public Cache-Control, and a targeted max-age makes a 500 storable
        // even when Cache-Control says no-store.
        let get = Method::GET;
        let ise = StatusCode::INTERNAL_SERVER_ERROR;
        let st = |status, pairs: &[(&str, &str)]| storable(&get, &h(&[]), status, &h(pairs));
        assert_eq!(
            st(
                OK,
                &[
                    ("cache-control", "public, max-age=60"),
                    ("cdn-cache-control", "no-store")
                ]
            ),
            Err("no-store")
        );
        assert_eq!(
            st(
                OK,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "private")
                ]
            ),
            Err("private")
        );
        assert_eq!(
            st(
                ise,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=5")
                ]
            ),
            Ok(())
        );
        assert_eq!(
            st(
                OK,
                &[
                    ("cache-control", "private"),
                    ("cdn-cache-control", "no-store=?0, max-age=5")
                ]
            ),
            Ok(()),
            "a false flag is not set, and private in Cache-Control is ignored"
        );
        // Decisions: the targeted no-cache makes the edge validate, though
        // Cache-Control says the response is fresh.
        let d = Directives::for_edge(&h(&[
            ("cache-control", "max-age=600"),
            ("cdn-cache-control", "max-age=600, no-cache"),
        ]));
        assert_eq!(
            decide_parsed(&h(&[]), &d, S(600), S(1), false),
            Use::Validate {
                stale_if_error: false
            }
        );
    }

    #[test]
    fn surrogate_control_where_it_does_not_conflict() {
        let dflt = S(0);
        let life = |pairs: &[(&str, &str)]| freshness_lifetime(OK, &h(pairs), dflt);
        // Its max-age beats Cache-Control's for the edge...
        assert_eq!(
            life(&[
                ("cache-control", "max-age=10, s-maxage=20"),
                ("surrogate-control", "max-age=300")
            ]),
            S(300)
        );
        // ...and loses to a targeted field.
        assert_eq!(
            life(&[
                ("surrogate-control", "max-age=300"),
                ("cdn-cache-control", "max-age=30")
            ]),
            S(30)
        );
        // `max-age=N+M`: M seconds of stale-if-error.
        let d = Directives::for_edge(&h(&[("surrogate-control", "max-age=60+600")]));
        assert_eq!((d.max_age, d.stale_if_error), (Some(60), Some(600)));
        assert_eq!(d.source, Source::Surrogate);
        // Items targeted at another device are not ours.
        assert_eq!(
            life(&[
                ("cache-control", "max-age=10"),
                ("surrogate-control", "max-age=300;esi-box")
            ]),
            S(10)
        );
        assert_eq!(life(&[("surrogate-control", "max-age=300;hangar")]), S(300));
        // Directives it does not speak of stay Cache-Control's: private
        // still keeps the response out.
        let get = Method::GET;
        assert_eq!(
            storable(
                &get,
                &h(&[]),
                OK,
                &h(&[
                    ("cache-control", "private"),
                    ("surrogate-control", "max-age=60")
                ])
            ),
            Err("private")
        );
        assert_eq!(
            storable(
                &get,
                &h(&[]),
                OK,
                &h(&[
                    ("cache-control", "max-age=60"),
                    ("surrogate-control", "no-store")
                ])
            ),
            Err("no-store")
        );
    }

    #[test]
    fn age_calculation() {
        let t0 = SystemTime::UNIX_EPOCH + S(1_000_000);
        let times = Times {
            request: unix(t0),
            response: unix(t0 + S(2)),
        };
        // Age header 10 + 2 s response delay, then 5 s resident.
        let resp = h(&[("age", "10")]);
        assert_eq!(current_age(&resp, times, t0 + S(7)).as_secs(), 17);
        // A Date far in the past makes the apparent age win.
        let old = httpdate::fmt_http_date(t0 - S(100));
        let resp = h(&[("date", &old)]);
        assert_eq!(current_age(&resp, times, t0 + S(2)).as_secs(), 102);
    }

    #[test]
    fn decide_fresh_stale_and_request_directives() {
        let none = h(&[]);
        let resp = h(&[("cache-control", "max-age=60")]);
        assert_eq!(decide(&none, &resp, S(60), S(10), false), Use::Fresh);
        assert_eq!(
            decide(&none, &resp, S(60), S(61), false),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(&none, &resp, S(60), S(10), true),
            Use::Validate {
                stale_if_error: false
            },
            "soft purge = stale"
        );
        assert_eq!(
            decide(
                &h(&[("cache-control", "no-cache")]),
                &resp,
                S(60),
                S(1),
                false
            ),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(&h(&[("pragma", "no-cache")]), &resp, S(60), S(1), false),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(
                &h(&[("cache-control", "max-age=5")]),
                &resp,
                S(60),
                S(10),
                false
            ),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(
                &h(&[("cache-control", "min-fresh=55")]),
                &resp,
                S(60),
                S(10),
                false
            ),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(
                &h(&[("cache-control", "max-stale=10")]),
                &resp,
                S(60),
                S(65),
                false
            ),
            Use::Fresh
        );
        assert_eq!(
            decide(
                &h(&[("cache-control", "max-stale=1")]),
                &resp,
                S(60),
                S(65),
                false
            ),
            Use::Validate {
                stale_if_error: false
            }
        );
    }

    #[test]
    fn decide_response_directives_and_rfc5861() {
        let none = h(&[]);
        let nc = h(&[("cache-control", "no-cache, max-age=60")]);
        assert_eq!(
            decide(&none, &nc, S(60), S(1), false),
            Use::Validate {
                stale_if_error: false
            }
        );
        let swr = h(&[(
            "cache-control",
            "max-age=60, stale-while-revalidate=30, stale-if-error=100",
        )]);
        assert_eq!(
            decide(&none, &swr, S(60), S(80), false),
            Use::StaleWhileRevalidate
        );
        assert_eq!(
            decide(&none, &swr, S(60), S(95), false),
            Use::Validate {
                stale_if_error: true
            }
        );
        assert_eq!(
            decide(&none, &swr, S(60), S(200), false),
            Use::Validate {
                stale_if_error: false
            }
        );
        assert_eq!(
            decide(&none, &swr, S(60), S(10), true),
            Use::StaleWhileRevalidate,
            "soft purge keeps swr"
        );
        // must-revalidate, proxy-revalidate and s-maxage forbid any stale use.
        for cc in ["must-revalidate", "proxy-revalidate", "s-maxage=60"] {
            let r = h(&[(
                "cache-control",
                &format!("max-age=60, {cc}, stale-while-revalidate=30, stale-if-error=100") as &str,
            )]);
            assert_eq!(
                decide(&none, &r, S(60), S(70), false),
                Use::Validate {
                    stale_if_error: false
                },
                "{cc}"
            );
        }
        // stale-if-error from the request.
        let r = h(&[("cache-control", "max-age=60")]);
        assert_eq!(
            decide(
                &h(&[("cache-control", "stale-if-error=20")]),
                &r,
                S(60),
                S(70),
                false
            ),
            Use::Validate {
                stale_if_error: true
            }
        );
    }

    #[test]
    fn invalidation_merge_conditional_and_ranges() {
        assert!(invalidates(&Method::POST, OK));
        assert!(invalidates(&Method::DELETE, StatusCode::NO_CONTENT));
        assert!(!invalidates(
            &Method::POST,
            StatusCode::INTERNAL_SERVER_ERROR
        ));
        assert!(!invalidates(&Method::GET, OK));

        let mut stored = h(&[
            ("etag", "\"a\""),
            ("content-length", "5"),
            ("cache-control", "max-age=1"),
        ]);
        merge_304(
            &mut stored,
            &h(&[("cache-control", "max-age=99"), ("content-length", "0")]),
        );
        assert_eq!(stored["cache-control"], "max-age=99");
        assert_eq!(stored["content-length"], "5");

        let resp = h(&[
            ("etag", "\"a\""),
            ("last-modified", "Thu, 26 Nov 2026 09:00:00 GMT"),
        ]);
        assert!(not_modified(
            &h(&[("if-none-match", "\"x\", W/\"a\"")]),
            &resp
        ));
        assert!(!not_modified(&h(&[("if-none-match", "\"b\"")]), &resp));
        assert!(not_modified(
            &h(&[("if-modified-since", "Thu, 26 Nov 2026 09:00:00 GMT")]),
            &resp
        ));
        assert!(!not_modified(
            &h(&[("if-modified-since", "Thu, 26 Nov 2026 08:00:00 GMT")]),
            &resp
        ));

        assert_eq!(byte_range(&h(&[]), 100), Ok(None));
        assert_eq!(
            byte_range(&h(&[("range", "bytes=0-9")]), 100),
            Ok(Some((0, 9)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=90-")]), 100),
            Ok(Some((90, 99)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=-10")]), 100),
            Ok(Some((90, 99)))
        );
        assert_eq!(
            byte_range(&h(&[("range", "bytes=50-500")]), 100),
            Ok(Some((50, 99)))
        );
        assert_eq!(byte_range(&h(&[("range", "bytes=100-")]), 100), Err(()));
        assert_eq!(byte_range(&h(&[("range", "bytes=0-1,5-6")]), 100), Ok(None));
    }
}
