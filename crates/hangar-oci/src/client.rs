//! The registry client: pull into the [`Store`], push out of it, speaking the
//! OCI distribution API with anonymous, basic and bearer-token auth.
//!
//! Pull fetches the manifest (selecting a platform from an index), the config,
//! then the missing layers concurrently. Each layer streams from the network
//! into a blocking worker that writes the temp file and checks size and
//! digest as it goes (DiffIDs: see [`crate::layer::ingest_layer`]). Nothing is
//! committed until every blob verified; the image name is written last.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use tokio::sync::mpsc;

use crate::auth::{Challenge, Credentials};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layer::{ingest_layer, ChannelReader, Expected};
use crate::manifest::{media, Document, ImageConfig, Platform};
use crate::reference::Reference;
use crate::store::{ImageRecord, StagedBlob, Store};

/// Largest manifest or config we accept, so a hostile registry cannot make us
/// buffer without bound.
const MAX_DOCUMENT: u64 = 16 << 20;
/// Layers downloaded or uploaded at once.
const PARALLEL: usize = 4;

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Allow plain HTTP to hosts other than localhost.
    pub insecure: bool,
    /// Explicit credentials; otherwise Docker's config.json is consulted.
    pub creds: Option<Credentials>,
    /// Never consult Docker's config.json (a pull on a tenant's behalf must
    /// not use the operator's credentials).
    pub no_docker_config: bool,
    /// Connect only to addresses this accepts: host names resolve through it
    /// (at connect time, so a name cannot rebind past it) and IP literals in
    /// every URL (registry, token realm, redirects) are checked against it.
    pub addresses: Option<AddressFilter>,
}

/// Which addresses a client may connect to: `Err(why)` refuses one.
#[derive(Clone)]
pub struct AddressFilter(pub Arc<dyn Fn(IpAddr) -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for AddressFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressFilter")
    }
}

impl AddressFilter {
    /// Whether `url` may be fetched: its host, when an IP literal, must pass
    /// (names are judged when they resolve).
    fn check_url(&self, url: &Url) -> std::result::Result<(), String> {
        match url.host() {
            Some(url::Host::Ipv4(a)) => (self.0)(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => (self.0)(IpAddr::V6(a)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(format!("{url} names no host")),
        }
    }
}

/// Resolves names with the system resolver and keeps only the addresses
/// the filter accepts.
struct FilteredResolver(AddressFilter);

impl reqwest::dns::Resolve for FilteredResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let filter = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let kept: Vec<std::net::SocketAddr> = found
                .into_iter()
                .filter(|a| match (filter.0)(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            if kept.is_empty() {
                let why = refused.unwrap_or_else(|| "no address".into());
                return Err(format!("{host}: not an allowed address ({why})").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Receives transfer progress; the CLI draws bars with it.
pub trait Progress: Send + Sync {
    fn start(&self, _digest: &Digest, _size: u64) {}
    fn advance(&self, _digest: &Digest, _bytes: u64) {}
    /// `how` is "done", "exists" or "mounted".
    fn finish(&self, _digest: &Digest, _how: &str) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {}

/// One repository on one registry, with the auth state for talking to it.
struct Session {
    http: reqwest::Client,
    base: Url,
    reference: Reference,
    creds: Option<Credentials>,
    addresses: Option<AddressFilter>,
    scopes: Vec<String>,
    auth: Mutex<Option<String>>,
}

fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn transport(url: &Url, e: reqwest::Error) -> Error {
    Error::Transport {
        url: url.to_string(),
        cause: cause_chain(&e),
    }
}

/// Turn a non-success answer into an error carrying the registry's own words.
async fn status_error(url: &Url, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    let detail = match serde_json::from_str::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => {
            let items: Vec<String> = e
                .errors
                .iter()
                .map(|i| {
                    format!(
                        "{} {}",
                        i.code.as_deref().unwrap_or(""),
                        i.message.as_deref().unwrap_or("")
                    )
                    .trim()
                    .to_string()
                })
                .collect();
            format!(": {}", items.join("; "))
        }
        _ => match status {
            404 => ": not found (check the repository name and tag)".into(),
            _ => String::new(),
        },
    };
    Error::Status {
        url: url.to_string(),
        status,
        detail,
    }
}

fn http_client(addresses: Option<&AddressFilter>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("hangar/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120));
    if let Some(filter) = addresses {
        let redirects = filter.clone();
        builder = builder
            .no_proxy()
            .dns_resolver(Arc::new(FilteredResolver(filter.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 10 {
                    return attempt.error("more than 10 redirects");
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(format!("redirect refused: {why}")),
                }
            }));
    }
    builder
        .build()
        .map_err(|e| Error::Invalid(format!("cannot build HTTP client: {}", cause_chain(&e))))
}

impl Session {
    fn new(reference: &Reference, opts: &ClientOptions, actions: &str) -> Result<Session> {
        let scheme = if opts.insecure || reference.is_loopback() {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{}/", reference.api_host())).map_err(|e| {
            Error::InvalidReference {
                input: reference.to_string(),
                reason: format!("registry host is not usable in a URL: {e}"),
            }
        })?;
        if let Some(filter) = &opts.addresses {
            filter.check_url(&base).map_err(|why| Error::Transport {
                url: base.to_string(),
                cause: format!("not an allowed address ({why})"),
            })?;
        }
        let creds = opts.creds.clone().or_else(|| {
            (!opts.no_docker_config)
                .then(|| Credentials::from_docker_config(&reference.registry))
                .flatten()
        });
        Ok(Session {
            http: http_client(opts.addresses.as_ref())?,
            addresses: opts.addresses.clone(),
            base,
            reference: reference.clone(),
            creds,
            scopes: vec![format!("repository:{}:{actions}", reference.repository)],
            auth: Mutex::new(None),
        })
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!("/v2/{}/{path}", self.reference.repository));
        url
    }

    fn current_auth(&self) -> Option<String> {
        self.auth.lock().ok().and_then(|a| a.clone())
    }

    /// Send a request built by `build`, answering one auth challenge if the
    /// registry poses it. `build` is called again for the retry, so bodies
    /// are rebuilt, not replayed.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        build: impl Fn(RequestBuilder) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(auth) = self.current_auth() {
                req = req.header(AUTHORIZATION, auth);
            }
            let resp = build(req)?.send().await.map_err(|e| transport(url, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if attempt == 1 {
                let reason = if self.creds.is_some() {
                    "the registry refused the credentials (401)"
                } else {
                    "the registry requires authentication (401)"
                };
                return Err(Error::Unauthorized {
                    url: url.to_string(),
                    reason: reason.into(),
                });
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse);
            let header = self.authenticate(url, challenge).await?;
            if let Ok(mut a) = self.auth.lock() {
                *a = Some(header);
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    async fn authenticate(&self, url: &Url, challenge: Option<Challenge>) -> Result<String> {
        let unauthorized = |reason: String| Error::Unauthorized {
            url: url.to_string(),
            reason,
        };
        match challenge {
            Some(c) if c.scheme == "bearer" => {
                let realm = c
                    .params
                    .get("realm")
                    .ok_or_else(|| unauthorized("bearer challenge without a realm".into()))?;
                let mut token_url = Url::parse(realm).map_err(|e| {
                    unauthorized(format!("bearer realm {realm:?} is not a URL: {e}"))
                })?;
                if let Some(filter) = &self.addresses {
                    filter.check_url(&token_url).map_err(|why| {
                        unauthorized(format!("bearer realm {realm:?} refused: {why}"))
                    })?;
                }
                {
                    let mut q = token_url.query_pairs_mut();
                    if let Some(service) = c.params.get("service") {
                        q.append_pair("service", service);
                    }
                    let mut scopes = self.scopes.clone();
                    if let Some(s) = c.params.get("scope") {
                        if !scopes.contains(s) {
                            scopes.push(s.clone());
                        }
                    }
                    for s in &scopes {
                        q.append_pair("scope", s);
                    }
                }
                let mut req = self.http.get(token_url.clone());
                if let Some(creds) = &self.creds {
                    req = req.header(AUTHORIZATION, creds.basic_header());
                }
                let resp = req.send().await.map_err(|e| transport(&token_url, e))?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    let why = if self.creds.is_some() {
                        format!("token endpoint {realm} refused the credentials ({status})")
                    } else {
                        format!("token endpoint {realm} answered {status}")
                    };
                    return Err(unauthorized(why));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let text = resp.bytes().await.map_err(|e| transport(&token_url, e))?;
                let body: Token = serde_json::from_slice(&text).map_err(|e| {
                    unauthorized(format!("token endpoint {realm} sent no usable token: {e}"))
                })?;
                let token = body
                    .token
                    .or(body.access_token)
                    .ok_or_else(|| unauthorized(format!("token endpoint {realm} sent no token")))?;
                Ok(format!("Bearer {token}"))
            }
            _ => match &self.creds {
                Some(creds) => Ok(creds.basic_header()),
                None => Err(unauthorized(
                    "the registry requires authentication (401)".into(),
                )),
            },
        }
    }

    /// GET a manifest or config-sized document, bounded in size.
    async fn get_document(&self, url: &Url, accept: Option<&str>) -> Result<(Vec<u8>, String)> {
        let resp = self
            .send(Method::GET, url, |r| {
                Ok(match accept {
                    Some(a) => r.header(ACCEPT, a),
                    None => r,
                })
            })
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(url, resp).await);
        }
        if resp.content_length().is_some_and(|l| l > MAX_DOCUMENT) {
            return Err(Error::Malformed {
                what: "document",
                name: url.to_string(),
                reason: format!("larger than {MAX_DOCUMENT} bytes"),
            });
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| transport(url, e))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_DOCUMENT {
                return Err(Error::Malformed {
                    what: "document",
                    name: url.to_string(),
                    reason: format!("larger than {MAX_DOCUMENT} bytes"),
                });
            }
        }
        Ok((body, content_type))
    }

    async fn manifest(&self, target: &str) -> Result<(Vec<u8>, Digest, Document, String)> {
        let url = self.url(&format!("manifests/{target}"));
        let (bytes, content_type) = self
            .get_document(&url, Some(media::MANIFEST_ACCEPT))
            .await?;
        let want = target.parse::<Digest>().ok();
        let alg = want.as_ref().map(Digest::algorithm).unwrap_or_default();
        let digest = Digest::of_with(alg, &bytes);
        if let Some(want) = want {
            if want != digest {
                return Err(Error::Verify {
                    digest: want.to_string(),
                    source_name: url.to_string(),
                    reason: format!("manifest hashes to {digest}"),
                });
            }
        }
        let (doc, media_type) = Document::parse(
            &bytes,
            &content_type,
            &format!("{} ({url})", self.reference),
        )?;
        Ok((bytes, digest, doc, media_type))
    }

    async fn small_blob(
        &self,
        digest: &Digest,
        size: u64,
        store: &Store,
    ) -> Result<(Vec<u8>, StagedBlob)> {
        let url = self.url(&format!("blobs/{digest}"));
        let (bytes, _) = self.get_document(&url, None).await?;
        let mut w = store.new_blob_for(digest.algorithm())?;
        std::io::Write::write_all(&mut w, &bytes).map_err(|e| Error::Io {
            path: store.root().join("tmp"),
            source: e,
        })?;
        let staged = w.finish(Some((digest, size)), url.as_str())?;
        Ok((bytes, staged))
    }

    /// Download one layer into `tmp/`, verified. `None` when the store has it.
    async fn layer(
        &self,
        store: &Store,
        want_digest: Digest,
        size: u64,
        diff_id: Digest,
        progress: Arc<dyn Progress>,
    ) -> Result<Option<StagedBlob>> {
        if store.has_blob(&want_digest) {
            progress.finish(&want_digest, "exists");
            return Ok(None);
        }
        progress.start(&want_digest, size);
        let url = self.url(&format!("blobs/{want_digest}"));
        let resp = self.send(Method::GET, &url, Ok).await?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp).await);
        }
        let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(64);
        let worker = {
            let store = store.clone();
            let name = url.to_string();
            let digest = want_digest.clone();
            tokio::task::spawn_blocking(move || {
                let want = Expected {
                    digest: &digest,
                    size,
                    diff_id: Some(&diff_id),
                };
                ingest_layer(&store, ChannelReader::new(rx), &want, &name)
            })
        };
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    progress.advance(&want_digest, bytes.len() as u64);
                    if tx.send(Ok(bytes)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let cause = format!("download failed: {}", cause_chain(&e));
                    let _ = tx.send(Err(std::io::Error::other(cause))).await;
                    break;
                }
            }
        }
        drop(tx);
        let staged = worker
            .await
            .map_err(|e| Error::Invalid(format!("layer {want_digest}: worker failed: {e}")))??;
        progress.finish(&want_digest, "done");
        Ok(Some(staged))
    }
}

/// What to pull and how.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Platform to select from an index; the host's when `None`.
    pub platform: Option<Platform>,
    pub client: ClientOptions,
}

/// Pull `reference` into `store`, returning the stored record.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord> {
    let session = Session::new(reference, &opts.client, "pull")?;
    let _lock = store.lock_shared()?;
    let wanted = opts.platform.clone().unwrap_or_else(Platform::host);
    let (mut bytes, mut digest, mut doc, mut media_type) =
        session.manifest(&reference.target()).await?;
    let mut index = None;
    if let Document::Index(list) = &doc {
        let chosen = list.select(&wanted, &reference.to_string())?.digest.clone();
        index = Some((bytes, digest));
        (bytes, digest, doc, media_type) = session.manifest(&chosen.to_string()).await?;
        if let Document::Index(_) = doc {
            return Err(Error::Malformed {
                what: "manifest",
                name: format!("{reference}@{chosen}"),
                reason: "an index entry points at another index; nested indexes are not supported"
                    .into(),
            });
        }
    }
    let Document::Manifest(manifest) = doc else {
        unreachable!("indexes were resolved above")
    };
    let (config_bytes, config_blob) = session
        .small_blob(&manifest.config.digest, manifest.config.size, store)
        .await?;
    let config = ImageConfig::parse(&config_bytes, &manifest.config.digest)?;
    if let Some(asked) = &opts.platform {
        if !asked.matches(&config.platform()) {
            return Err(Error::NoPlatform {
                reference: reference.to_string(),
                wanted: asked.to_string(),
                available: config.platform().to_string(),
            });
        }
    }
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::Malformed {
            what: "image config",
            name: manifest.config.digest.to_string(),
            reason: format!(
                "lists {} DiffIDs for {} layers",
                config.rootfs.diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    // Owned values, so the stream's closure borrows nothing per item (that
    // keeps the future Send for any caller).
    let wanted: Vec<(Digest, u64, Digest)> = manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(l, diff)| (l.digest.clone(), l.size, diff.clone()))
        .collect();
    let session_ref = &session;
    let layers: Vec<Option<StagedBlob>> =
        futures_util::stream::iter(wanted.into_iter().map(|(digest, size, diff)| {
            session_ref.layer(store, digest, size, diff, progress.clone())
        }))
        .buffered(PARALLEL)
        .try_collect()
        .await?;

    // Everything verified: make it visible, name last.
    for staged in layers.into_iter().flatten() {
        staged.commit()?;
    }
    config_blob.commit()?;
    let index_digest = match index {
        Some((index_bytes, index_digest)) => {
            store.put_bytes(&index_bytes)?;
            Some(index_digest)
        }
        None => None,
    };
    store.put_bytes(&bytes)?;
    let record = ImageRecord {
        reference: reference.to_string(),
        digest,
        media_type,
        index: index_digest,
    };
    store.set_image(&record)?;
    for blob in manifest
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&manifest.config.digest])
    {
        store.add_source(blob, &reference.registry, &reference.repository)?;
    }
    Ok(record)
}

/// How to push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    pub client: ClientOptions,
    /// Blobs larger than this go up in PATCH chunks of this size; 0 means
    /// always monolithic.
    pub chunk_size: u64,
}

/// Push the stored image `source` to `dest` (which may name another
/// registry or repository). Returns the manifest digest.
pub async fn push(
    store: &Store,
    source: &Reference,
    dest: &Reference,
    opts: &PushOptions,
    progress: Arc<dyn Progress>,
) -> Result<Digest> {
    let _lock = store.lock_shared()?;
    let image = store.image(source)?;
    let mut session = Session::new(dest, &opts.client, "pull,push")?;
    let blobs: Vec<(Digest, u64)> = image
        .manifest
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .chain([(
            image.manifest.config.digest.clone(),
            image.manifest.config.size,
        )])
        .collect();
    let mount_from = |d: &Digest| -> Option<String> {
        let prefix = format!("{}/", dest.registry);
        store
            .sources(d)
            .into_iter()
            .filter_map(|s| s.strip_prefix(&prefix).map(str::to_string))
            .find(|repo| *repo != dest.repository)
    };
    for (d, _) in &blobs {
        if let Some(repo) = mount_from(d) {
            let scope = format!("repository:{repo}:pull");
            if !session.scopes.contains(&scope) {
                session.scopes.push(scope);
            }
        }
    }
    let session = &session;
    let uploads: Vec<(Digest, u64, Option<String>)> = blobs
        .iter()
        .map(|(digest, size)| (digest.clone(), *size, mount_from(digest)))
        .collect();
    futures_util::stream::iter(uploads.into_iter().map(|(digest, size, from)| {
        let progress = progress.clone();
        async move {
            push_blob(
                session,
                store,
                &digest,
                size,
                from,
                opts.chunk_size,
                progress,
            )
            .await
        }
    }))
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<()>>()
    .await?;

    let target = dest
        .tag
        .clone()
        .unwrap_or_else(|| image.record.digest.to_string());
    let url = session.url(&format!("manifests/{target}"));
    let resp = session
        .send(Method::PUT, &url, |r| {
            Ok(r.header(CONTENT_TYPE, image.record.media_type.as_str())
                .body(image.manifest_bytes.clone()))
        })
        .await?;
    if !resp.status().is_success() {
        return Err(status_error(&url, resp).await);
    }
    if let Some(got) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        if got != image.record.digest.to_string() {
            return Err(Error::Verify {
                digest: image.record.digest.to_string(),
                source_name: url.to_string(),
                reason: format!("registry stored the manifest as {got}"),
            });
        }
    }
    for (d, _) in &blobs {
        store.add_source(d, &dest.registry, &dest.repository)?;
    }
    Ok(image.record.digest)
}

fn location(session: &Session, url: &Url, headers: &HeaderMap) -> Result<Url> {
    let loc = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Status {
            url: url.to_string(),
            status: 202,
            detail: ": upload started without a Location header".into(),
        })?;
    session.base.join(loc).map_err(|e| Error::Status {
        url: url.to_string(),
        status: 202,
        detail: format!(": unusable upload Location {loc:?}: {e}"),
    })
}

async fn push_blob(
    session: &Session,
    store: &Store,
    digest: &Digest,
    size: u64,
    mount_from: Option<String>,
    chunk_size: u64,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let blob_url = session.url(&format!("blobs/{digest}"));
    let head = session.send(Method::HEAD, &blob_url, Ok).await?;
    if head.status().is_success() {
        progress.finish(digest, "exists");
        return Ok(());
    }
    let mut start = session.url("blobs/uploads/");
    if let Some(from) = &mount_from {
        start
            .query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from);
    }
    let resp = session
        .send(Method::POST, &start, |r| Ok(r.header(CONTENT_LENGTH, 0)))
        .await?;
    if resp.status() == StatusCode::CREATED && mount_from.is_some() {
        progress.finish(digest, "mounted");
        return Ok(());
    }
    if resp.status() != StatusCode::ACCEPTED {
        return Err(status_error(&start, resp).await);
    }
    let mut upload = location(session, &start, resp.headers())?;
    progress.start(digest, size);
    let path = store.blob_path(digest);
    if chunk_size > 0 && size > chunk_size {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = store.open_blob(digest)?;
        let mut offset = 0u64;
        while offset < size {
            let len = chunk_size.min(size - offset);
            let mut chunk = vec![0; len as usize];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut chunk))
                .map_err(|e| Error::Io {
                    path: path.clone(),
                    source: e,
                })?;
            let range = format!("{}-{}", offset, offset + len - 1);
            let resp = session
                .send(Method::PATCH, &upload, |r| {
                    Ok(r.header(CONTENT_TYPE, "application/octet-stream")
                        .header("Content-Range", range.as_str())
                        .header(CONTENT_LENGTH, len)
                        .body(chunk.clone()))
                })
                .await?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(status_error(&upload, resp).await);
            }
            upload = location(session, &upload, resp.headers())?;
            offset += len;
            progress.advance(digest, len);
        }
        upload
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let resp = session
            .send(Method::PUT, &upload, |r| Ok(r.header(CONTENT_LENGTH, 0)))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(&upload, resp).await);
        }
    } else {
        upload
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let resp = session
            .send(Method::PUT, &upload, |r| {
                let file = store.open_blob(digest)?;
                Ok(r.header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .body(reqwest::Body::from(tokio::fs::File::from_std(file))))
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(&upload, resp).await);
        }
        progress.advance(digest, size);
    }
    progress.finish(digest, "done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(reference: &str, insecure: bool) -> String {
        let opts = ClientOptions {
            insecure,
            creds: Some(Credentials::parse("u:p").unwrap()),
            ..Default::default()
        };
        Session::new(&reference.parse().unwrap(), &opts, "pull")
            .unwrap()
            .base
            .to_string()
    }

    #[test]
    fn an_address_filter_refuses_registry_literals_before_any_connection() {
        let opts = ClientOptions {
            addresses: Some(AddressFilter(Arc::new(|ip: IpAddr| {
                if ip.is_loopback() {
                    Err("loopback".into())
                } else {
                    Ok(())
                }
            }))),
            ..Default::default()
        };
        for r in ["127.0.0.1:5000/a/b:1", "[::1]:5000/a/b:1"] {
            let e = Session::new(&r.parse().unwrap(), &opts, "pull")
                .err()
                .unwrap();
            assert!(e.to_string().contains("not an allowed address"), "{e}");
        }
        // Names are judged when they resolve, so they pass here.
        assert!(Session::new(&"localhost:5000/a/b:1".parse().unwrap(), &opts, "pull").is_ok());
        let url = Url::parse("http://2130706433/").unwrap();
        assert!(opts.addresses.as_ref().unwrap().check_url(&url).is_err());
    }

    #[test]
    fn plain_http_only_for_loopback_or_insecure() {
        assert_eq!(
            base("registry.example.com/a/b", false),
            "https://registry.example.com/"
        );
        assert_eq!(base("alpine", false), "https://registry-1.docker.io/");
        assert_eq!(base("localhost:5000/a", false), "http://localhost:5000/");
        assert_eq!(base("127.0.0.1:5000/a", false), "http://127.0.0.1:5000/");
        assert_eq!(
            base("registry.example.com/a/b", true),
            "http://registry.example.com/"
        );
    }
}
