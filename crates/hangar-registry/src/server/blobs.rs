//! Blobs (ranges, mounts) and uploads (monolithic, chunked, resumable).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hangar_oci::digest::{Hasher, HashingReader};
use hangar_oci::reference::valid_repository;
use hangar_oci::Digest;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use hyper::{HeaderMap, Request, StatusCode};
use tokio::sync::Mutex as AsyncMutex;

use crate::auth::{org_of, Action, Caller};
use crate::error::ApiError;

use super::http::*;
use super::{Registry, Upload, CHUNK};

impl Registry {
    pub(super) fn get_blob(
        &self,
        name: &str,
        digest: &str,
        head: bool,
        headers: &HeaderMap,
    ) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let d = parse_digest(digest)?;
        if !self.store.has_blob(name, &d) {
            return Err(ApiError::blob_unknown().into());
        }
        let mut file = self.store.blobs.open_blob(&d).map_err(ApiError::from)?;
        let size = file.metadata().map_err(ApiError::internal)?.len();
        let mut b = response(StatusCode::OK)
            .header("Docker-Content-Digest", d.to_string())
            .header("Accept-Ranges", "bytes")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("ETag", format!("\"{d}\""));
        let (start, len) = match headers.get(RANGE).and_then(|r| r.to_str().ok()) {
            None => (0, size),
            Some(r) => match parse_range(r, size) {
                Some((s, e)) => {
                    b = b
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header("Content-Range", format!("bytes {s}-{e}/{size}"));
                    (s, e - s + 1)
                }
                None => {
                    let e = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "BLOB_UNKNOWN",
                        "range not satisfiable",
                    );
                    return Ok(build(
                        response(e.status)
                            .header("Content-Range", format!("bytes */{size}"))
                            .header(CONTENT_LENGTH, 0),
                        empty_body(),
                    )?);
                }
            },
        };
        b = b.header(CONTENT_LENGTH, len);
        if head {
            return Ok(build(b, empty_body())?);
        }
        file.seek(SeekFrom::Start(start))
            .map_err(ApiError::internal)?;
        Ok(build(b, file_body(file, len))?)
    }

    pub(super) fn uploads_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AsyncMutex<Upload>>>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn upload_state(&self, id: &str) -> Result<Arc<AsyncMutex<Upload>>, ApiError> {
        let mut map = self.uploads_map();
        if let Some(u) = map.get(id) {
            return Ok(u.clone());
        }
        // Not seen since a restart: what is on disk is what we have.
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let len = std::fs::metadata(&path).map_err(ApiError::internal)?.len();
        let u = Arc::new(AsyncMutex::new(Upload { len, hasher: None }));
        map.insert(id.to_string(), u.clone());
        Ok(u)
    }

    pub(super) fn upload_location(&self, name: &str, id: &str) -> String {
        format!(
            "/v2/{name}/blobs/uploads/{id}?_state={}",
            self.auth.upload_state(name, id)
        )
    }

    pub(super) fn upload_accepted(
        &self,
        name: &str,
        id: &str,
        len: u64,
        status: StatusCode,
    ) -> Http {
        let range = if len == 0 {
            "0-0".to_string()
        } else {
            format!("0-{}", len - 1)
        };
        build(
            response(status)
                .header(LOCATION, self.upload_location(name, id))
                .header(RANGE, range)
                .header("Docker-Upload-UUID", id)
                .header(CONTENT_LENGTH, 0),
            empty_body(),
        )
    }

    pub(super) fn blob_created(&self, name: &str, digest: &Digest) -> Http {
        build(
            response(StatusCode::CREATED)
                .header(LOCATION, format!("/v2/{name}/blobs/{digest}"))
                .header("Docker-Content-Digest", digest.to_string())
                .header(CONTENT_LENGTH, 0),
            empty_body(),
        )
    }

    pub(super) async fn start_upload(
        &self,
        caller: &Caller,
        name: &str,
        q: &[(String, String)],
        req: Request<Incoming>,
    ) -> Handled {
        if let Some(Ok(d)) = param(q, "mount").map(str::parse::<Digest>) {
            // Mount only what the caller could read anyway; otherwise fall
            // through to a normal upload and reveal nothing. A repository
            // of the caller's own org is readable whatever the bearer
            // token's scope names (clients rarely ask for `from`'s scope);
            // without `from`, any repository of the org that has the blob.
            let own_org = caller.org.as_deref();
            let readable = |from: &str| {
                valid_repository(from)
                    && caller.rights(from, self.store.is_public(from), Action::Pull)
                    && (caller.scope_covers(from, Action::Pull) || own_org == Some(org_of(from)))
                    && self.store.has_blob(from, &d)
            };
            let source = match param(q, "from") {
                Some(from) => readable(from).then(|| from.to_string()),
                None => self
                    .store
                    .repos()
                    .map_err(ApiError::from)?
                    .into_iter()
                    .filter(|r| own_org == Some(org_of(r)))
                    .find(|r| readable(r)),
            };
            if source.is_some() {
                self.store.link_blob(name, &d).map_err(ApiError::from)?;
                return Ok(self.blob_created(name, &d)?);
            }
        }
        // A bad digest is refused before anything is written.
        let monolithic = param(q, "digest").map(parse_digest).transpose()?;
        let id = crate::auth::random_hex(16).map_err(ApiError::from)?;
        let path = self.store.start_upload(&id).map_err(ApiError::from)?;
        let upload = Arc::new(AsyncMutex::new(Upload {
            len: 0,
            hasher: Some(Hasher::new()),
        }));
        self.uploads_map().insert(id.clone(), upload.clone());
        if let Some(digest) = monolithic {
            // Monolithic: the blob is this request's body. Refused (too
            // big, cut short, wrong digest), it leaves nothing behind: no
            // client can resume an upload it never got the location of.
            let mut u = upload.lock().await;
            let result = match self.append(&path, &mut u, req.into_body(), None).await {
                Ok(_) => self.finish_upload(name, &id, &path, &mut u, &digest).await,
                Err(e) => Err(e.into()),
            };
            if result.is_err() {
                drop(u);
                self.uploads_map().remove(&id);
                let _ = self.store.cancel_upload(&id);
            }
            return result;
        }
        Ok(self.upload_accepted(name, &id, 0, StatusCode::ACCEPTED)?)
    }

    pub(super) async fn patch_upload(
        &self,
        name: &str,
        id: &str,
        req: Request<Incoming>,
    ) -> Handled {
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let upload = self.upload_state(id)?;
        let mut u = upload.lock().await;
        let range = req
            .headers()
            .get("Content-Range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let expected = match range {
            Some(r) => {
                let (start, end) = parse_content_range(&r).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BLOB_UPLOAD_INVALID",
                        format!("bad Content-Range {r:?}"),
                    )
                })?;
                if start != u.len || end < start {
                    // Out of order: say where the upload stands.
                    let e = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "BLOB_UPLOAD_INVALID",
                        format!("chunk starts at {start}, upload is at {}", u.len),
                    );
                    let mut resp = error_response(&e, None);
                    if let Ok(v) = HeaderValue::from_str(&self.upload_location(name, id)) {
                        resp.headers_mut().insert(LOCATION, v);
                    }
                    let range = if u.len == 0 {
                        "0-0".into()
                    } else {
                        format!("0-{}", u.len - 1)
                    };
                    if let Ok(v) = HeaderValue::from_str(&range) {
                        resp.headers_mut().insert(RANGE, v);
                    }
                    return Ok(resp);
                }
                Some(end - start + 1)
            }
            None => None,
        };
        self.append(&path, &mut u, req.into_body(), expected)
            .await?;
        Ok(self.upload_accepted(name, id, u.len, StatusCode::ACCEPTED)?)
    }

    pub(super) async fn put_upload(
        &self,
        name: &str,
        id: &str,
        q: &[(String, String)],
        req: Request<Incoming>,
    ) -> Handled {
        let digest = parse_digest(param(q, "digest").unwrap_or(""))?;
        let path = self.store.upload(id).ok_or_else(ApiError::upload_unknown)?;
        let upload = self.upload_state(id)?;
        let mut u = upload.lock().await;
        self.append(&path, &mut u, req.into_body(), None).await?;
        self.finish_upload(name, id, &path, &mut u, &digest).await
    }

    pub(super) async fn upload_status(&self, name: &str, id: &str) -> Handled {
        let upload = self.upload_state(id)?;
        let u = upload.lock().await;
        Ok(self.upload_accepted(name, id, u.len, StatusCode::NO_CONTENT)?)
    }

    /// Stream `body` onto the end of the upload file. With `expected`, the
    /// body must be exactly that long; on any failure the file is cut back.
    pub(super) async fn append(
        &self,
        path: &Path,
        u: &mut Upload,
        mut body: Incoming,
        expected: Option<u64>,
    ) -> Result<(), ApiError> {
        let start = u.len;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(ApiError::internal)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = u.hasher.take();
        let mut written = 0u64;
        let result: Result<(), ApiError> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BLOB_UPLOAD_INVALID",
                        format!("reading the body failed: {e}"),
                    )
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                written += data.len() as u64;
                self.metrics
                    .bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if start + written > self.config.max_blob_size {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "SIZE_INVALID",
                        format!(
                            "blob larger than this registry's limit of {} bytes",
                            self.config.max_blob_size
                        ),
                    ));
                }
                if expected.is_some_and(|e| written > e) {
                    break;
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&data);
                }
                tokio::task::block_in_place(|| out.write_all(&data)).map_err(ApiError::internal)?;
            }
            if expected.is_some_and(|e| written != e) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    "body length does not match Content-Range",
                ));
            }
            tokio::task::block_in_place(|| out.flush()).map_err(ApiError::internal)
        }
        .await;
        match result {
            Ok(()) => {
                u.len = start + written;
                u.hasher = hasher;
                Ok(())
            }
            Err(e) => {
                drop(out);
                let _ = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(start));
                u.len = start;
                u.hasher = None;
                Err(e)
            }
        }
    }

    pub(super) async fn finish_upload(
        &self,
        name: &str,
        id: &str,
        path: &Path,
        u: &mut Upload,
        want: &Digest,
    ) -> Handled {
        // The running hash is sha256; a blob named by another algorithm
        // (sha512) is hashed again from the file, as after a restart.
        let got = match u.hasher.take() {
            Some(h) if h.len() == u.len && h.algorithm() == want.algorithm() => h.finish().0,
            _ => {
                let file = File::open(path).map_err(ApiError::internal)?;
                tokio::task::block_in_place(|| {
                    HashingReader::with(want.algorithm(), io::BufReader::with_capacity(CHUNK, file))
                        .finish()
                })
                .map_err(ApiError::internal)?
                .0
            }
        };
        self.uploads_map().remove(id);
        if got != *want {
            let _ = self.store.cancel_upload(id);
            return Err(
                ApiError::digest_invalid(format!("upload hashes to {got}, not {want}")).into(),
            );
        }
        if self.store.blobs.has_blob(want) {
            let _ = self.store.cancel_upload(id);
        } else {
            tokio::task::block_in_place(|| self.store.blobs.adopt_file(path, want))
                .map_err(ApiError::from)?;
        }
        self.store.link_blob(name, want).map_err(ApiError::from)?;
        Ok(self.blob_created(name, want)?)
    }
}
