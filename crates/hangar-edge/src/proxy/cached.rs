//! GET and HEAD through the cache: fresh hits, stale-while-revalidate,
//! coalesced fills (one origin fetch per key, detached from its client),
//! passes for what cannot be stored, 304 refreshes, ranges.

use super::*;

impl Edge {
    /// GET and HEAD through the cache.
    pub(super) async fn cached(
        self: &Arc<Self>,
        parts: Parts,
        site: &Arc<Site>,
        host: &str,
        client: Client<'_>,
    ) -> Response<Body> {
        let m = &site.metrics;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let primary = cache::primary_key(host, path);
        let (key, mut stored) = self.cache.store.lookup(&primary, &parts.headers).await;
        // A request with credentials is answered from the cache only when
        // the stored response allows it (RFC 9111 section 3.5), and shares
        // a fill only with requests carrying the same credentials.
        let credentials = parts.headers.get(header::AUTHORIZATION);
        if credentials.is_some() {
            if let Some(obj) = &stored {
                let d = &obj.meta.directives;
                if !(d.public || d.must_revalidate || d.s_maxage.is_some()) {
                    stored = None;
                }
            }
        }
        let mut stale_if_error = false;
        if let Some(obj) = &stored {
            let meta = &obj.meta;
            let age = policy::age_at(meta.initial_age, meta.times, SystemTime::now());
            let lifetime = Duration::from_secs_f64(meta.lifetime);
            let decided = match policy::decide_parsed(
                &parts.headers,
                &meta.directives,
                lifetime,
                age,
                meta.invalidated,
            ) {
                // Past the horizon a purge may have been missed: nothing
                // is served unvalidated.
                Use::Fresh | Use::StaleWhileRevalidate if !self.within_horizon() => Use::Validate {
                    stale_if_error: false,
                },
                decided => decided,
            };
            match decided {
                Use::Fresh => {
                    m.hits.fetch_add(1, Ordering::Relaxed);
                    return serve_object(&parts, obj, age, "hit");
                }
                Use::StaleWhileRevalidate => {
                    m.stale.fetch_add(1, Ordering::Relaxed);
                    if let Join::Lead(fill, reg) = self.cache.fills.join(&key) {
                        let job = FillJob {
                            site: site.clone(),
                            parts: origin_parts(&parts, Some(obj), client),
                            key: key.clone(),
                            fill_key: key.clone(),
                            primary,
                            stored: stored.clone(),
                            host: host.into(),
                            path: path.to_string(),
                            role: client.role,
                        };
                        let edge = self.clone();
                        tokio::spawn(async move { edge.run_fill(job, fill, reg, None).await });
                    }
                    return serve_object(&parts, obj, age, "hit; detail=stale-while-revalidate");
                }
                Use::Validate {
                    stale_if_error: sie,
                } => stale_if_error = sie,
            }
        }
        if Directives::parse(&parts.headers).only_if_cached {
            let e = ProxyError::new(
                Kind::NotCached,
                "only-if-cached: the response is not in the cache",
            );
            return e.respond(host);
        }
        let fill_key = match credentials {
            Some(c) => {
                use std::hash::BuildHasher;
                let h = self.credential_hasher.hash_one(c.as_bytes());
                format!("{key}\ncredentials={h:x}")
            }
            None => key.clone(),
        };
        let fwd = if stored.is_some() {
            "fwd=stale"
        } else {
            "fwd=miss"
        };
        let (fill, waited, note) = match self.cache.fills.join(&fill_key) {
            Join::Bypass => {
                m.passes.fetch_add(1, Ordering::Relaxed);
                return self
                    .pass(&parts, site, client, "fwd=miss; detail=uncacheable")
                    .await;
            }
            Join::Wait(fill) => {
                m.coalesced.fetch_add(1, Ordering::Relaxed);
                let waited = fill.wait(Some(self.cache.config.lock_timeout)).await;
                (fill, waited, "fwd=miss; collapsed")
            }
            Join::Lead(fill, reg) => {
                m.misses.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = FillJob {
                    site: site.clone(),
                    parts: origin_parts(&parts, stored.as_ref(), client),
                    key: key.clone(),
                    fill_key: fill_key.clone(),
                    primary,
                    stored: stored.clone(),
                    host: host.into(),
                    path: path.to_string(),
                    role: client.role,
                };
                let edge = self.clone();
                let f = fill.clone();
                tokio::spawn(async move { edge.run_fill(job, f, reg, Some(tx)).await });
                match fill.wait(None).await {
                    // Not storable: the fill hands its response over.
                    Waited::Pass => {
                        return match rx.await {
                            Ok((resp, note)) => with_status(resp, &format!("{fwd}; detail={note}")),
                            Err(_) => ProxyError::new(Kind::FillEnded, "the origin request ended")
                                .respond(host),
                        }
                    }
                    waited => (fill, waited, fwd),
                }
            }
        };
        self.answer(
            waited,
            fill,
            &parts,
            (site, host, client),
            stored.as_ref(),
            stale_if_error,
            note,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        waited: Waited,
        fill: Arc<crate::cache::fill::Fill>,
        parts: &Parts,
        (site, host, client): (&Arc<Site>, &str, Client<'_>),
        stored: Option<&Object>,
        stale_if_error: bool,
        note: &str,
    ) -> Response<Body> {
        match waited {
            Waited::Shared(head) => {
                // Another request's variant (Vary): fetch our own.
                let vary = cache::vary_names(&head.headers);
                let primary = cache::primary_key(host, &path_of(parts));
                if cache::full_key(&primary, &vary, &parts.headers) != head.key {
                    return self
                        .pass(parts, site, client, "fwd=miss; detail=vary")
                        .await;
                }
                let body = if parts.method == Method::HEAD {
                    upstream::empty()
                } else {
                    match fill.body() {
                        Some(body) => StreamBody::new(body).map_err(BoxError::from).boxed_unsync(),
                        // Too big to share, and its start is gone already.
                        None => {
                            return self
                                .pass(parts, site, client, "fwd=miss; detail=too-big")
                                .await
                        }
                    }
                };
                let mut resp = Response::new(body);
                *resp.status_mut() = head.status;
                *resp.headers_mut() = head.headers.clone();
                let note = if head.status == StatusCode::NOT_MODIFIED {
                    note.to_string()
                } else {
                    format!("{note}; stored")
                };
                with_status(resp, &note)
            }
            Waited::Failed(e) => match stored {
                Some(obj) if stale_if_error => {
                    site.metrics.stale.fetch_add(1, Ordering::Relaxed);
                    let age =
                        policy::age_at(obj.meta.initial_age, obj.meta.times, SystemTime::now());
                    serve_object(parts, obj, age, "hit; fwd=stale; detail=stale-if-error")
                }
                _ => e.respond(host),
            },
            Waited::Pass => {
                self.pass(parts, site, client, "fwd=miss; detail=uncacheable")
                    .await
            }
            Waited::TimedOut => {
                self.pass(parts, site, client, "fwd=miss; detail=lock-timeout")
                    .await
            }
        }
    }

    /// Go to the origin for this request alone, storing nothing.
    async fn pass(
        &self,
        parts: &Parts,
        site: &Arc<Site>,
        client: Client<'_>,
        note: &str,
    ) -> Response<Body> {
        let mut parts = clone_parts(parts);
        forwarding_headers(&mut parts, client);
        let resp = self
            .forward(site, parts, upstream::empty(), client.role)
            .await
            .unwrap_or_else(|e| e.respond(&site.config.name));
        with_status(resp, note)
    }

    /// The leader's origin fetch, detached from the client so a client
    /// that leaves does not fail the waiters.
    async fn run_fill(
        self: Arc<Self>,
        job: FillJob,
        fill: Arc<crate::cache::fill::Fill>,
        reg: crate::cache::fill::Registration,
        pass_to: Option<tokio::sync::oneshot::Sender<(Response<Body>, String)>>,
    ) {
        let request_time = SystemTime::now();
        let req_headers = job.parts.headers.clone();
        let result = self
            .climb(&job.site, job.parts, job.role, &job.primary)
            .await;
        let (resp, guard) = match result {
            Ok(r) => r,
            Err(e) => return fill.fail(e),
        };
        let response_time = SystemTime::now();
        let times = Times {
            request: policy::unix(request_time),
            response: policy::unix(response_time),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let default_ttl = job.site.config.cache.default_ttl;

        // 304: refresh the stored object.
        if parts.status == StatusCode::NOT_MODIFIED {
            if let Some(obj) = &job.stored {
                let mut headers = obj.meta.headers().clone();
                policy::merge_304(&mut headers, &parts.headers);
                let lifetime = policy::freshness_lifetime(
                    StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK),
                    &headers,
                    default_ttl,
                );
                if let Some(meta) =
                    obj.meta
                        .refreshed(headers.clone(), times, lifetime.as_secs_f64())
                {
                    self.cache.store.put(meta, obj.body.clone());
                }
                let status = StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK);
                fill.share(Arc::new(Head {
                    status,
                    headers,
                    key: job.key.clone(),
                    len: Some(obj.body.len() as u64),
                }));
                fill.push(obj.body.clone());
                fill.finish();
                return;
            }
        }
        // An origin error with a stored response that may serve instead.
        if parts.status.is_server_error() && job.stored.is_some() {
            return fill.fail(ProxyError::new(
                Kind::Origin(parts.status),
                format!("the origin answered {}", parts.status),
            ));
        }
        let len = content_length(&parts.headers);
        let refused =
            match policy::storable(&Method::GET, &req_headers, parts.status, &parts.headers) {
                Err(why) => {
                    // Remembered for a while: the next requests go straight
                    // to the origin, uncoalesced.
                    self.cache
                        .fills
                        .mark_uncacheable(&job.fill_key, self.cache.config.uncacheable_ttl);
                    Some(why)
                }
                // Not remembered: the next response may be smaller.
                Ok(()) if len.is_some_and(|l| l > self.cache.config.max_object) => Some("too-big"),
                Ok(()) => None,
            };
        if let Some(why) = refused {
            fill.pass();
            if let Some(tx) = pass_to {
                let body = hold(body.map_err(BoxError::from).boxed_unsync(), guard);
                let _ = tx.send((Response::from_parts(parts, body), why.to_string()));
            }
            return;
        }
        let vary = cache::vary_names(&parts.headers);
        let primary = job.primary.clone();
        let key = cache::full_key(&primary, &vary, &req_headers);
        fill.share(Arc::new(Head {
            status: parts.status,
            headers: parts.headers.clone(),
            key: key.clone(),
            len,
        }));
        let mut body = body;
        let mut total = 0u64;
        let max = self.cache.config.max_object;
        let mut streaming = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        total += data.len() as u64;
                        fill.push(data);
                        // Past the largest object (its length was not
                        // said): a stream paced by its readers, no longer
                        // joined by new requests.
                        if total > max && !streaming {
                            streaming = true;
                            fill.stream();
                            reg.unlist();
                        }
                        if streaming && !fill.room().await {
                            return; // every reader left
                        }
                    }
                }
                Err(e) => {
                    return fill.fail(ProxyError::new(
                        Kind::BodyBroke,
                        format!("the origin's body broke off: {e}"),
                    ))
                }
            }
        }
        drop(guard);
        fill.finish();
        if total > self.cache.config.max_object || len.is_some_and(|l| l != total) {
            return;
        }
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, default_ttl);
        let tags = cache::tags(&parts.headers);
        if let Some(meta) = Meta::new(
            key,
            primary,
            job.host,
            job.path,
            vary,
            parts.status.as_u16(),
            parts.headers,
            times,
            lifetime.as_secs_f64(),
            tags,
            total,
        ) {
            self.cache.store.put(meta, fill.collected());
        }
    }
}

struct FillJob {
    site: Arc<Site>,
    parts: Parts,
    /// The storage key (primary key and Vary values).
    key: String,
    /// The coalescing key (the storage key, plus credentials when sent).
    fill_key: String,
    primary: String,
    stored: Option<Object>,
    host: String,
    path: String,
    /// What this edge is for the request (the tiers above it are climbed).
    role: Role,
}

/// The request the cache sends to fill a key: always GET, never partial,
/// conditional on the stored response's validators (not the client's).
fn origin_parts(parts: &Parts, stored: Option<&Object>, client: Client<'_>) -> Parts {
    let mut p = clone_parts(parts);
    forwarding_headers(&mut p, client);
    p.method = Method::GET;
    for h in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        p.headers.remove(h);
    }
    if let Some(obj) = stored {
        if let Some(etag) = obj.meta.headers().get(header::ETAG) {
            p.headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = obj.meta.headers().get(header::LAST_MODIFIED) {
            p.headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }
    p
}

/// Answer from a stored object: 304 for a matching conditional request,
/// 206 for one byte range, else the whole object.
fn serve_object(parts: &Parts, obj: &Object, age: Duration, note: &str) -> Response<Body> {
    let stored = obj.meta.headers();
    let status = StatusCode::from_u16(obj.meta.status).unwrap_or(StatusCode::OK);
    let mut headers = stored.clone();
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    let full = |headers: HeaderMap, status: StatusCode, body: Bytes| {
        let mut r = Response::new(if parts.method == Method::HEAD {
            upstream::empty()
        } else {
            Full::new(body).map_err(|e| match e {}).boxed_unsync()
        });
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        with_status(r, note)
    };
    if status == StatusCode::OK && policy::not_modified(&parts.headers, stored) {
        headers.remove(header::CONTENT_LENGTH);
        return full(headers, StatusCode::NOT_MODIFIED, Bytes::new());
    }
    if status == StatusCode::OK {
        let len = obj.body.len() as u64;
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        match policy::byte_range(&parts.headers, len) {
            Ok(Some((a, b))) => {
                let range = format!("bytes {a}-{b}/{len}");
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&range).unwrap_or(HeaderValue::from_static("")),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
                return full(
                    headers,
                    StatusCode::PARTIAL_CONTENT,
                    obj.body.slice(a as usize..=b as usize),
                );
            }
            Err(()) => {
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}"))
                        .unwrap_or(HeaderValue::from_static("")),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                return full(headers, StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new());
            }
            Ok(None) => {}
        }
    }
    full(headers, status, obj.body.clone())
}
