//! The catalog, tags, manifests (get, put with its checks, delete) and
//! referrers.

use hangar_oci::manifest::media;
use hangar_oci::reference::valid_tag;
use hangar_oci::Digest;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use hyper::{Request, StatusCode};

use crate::auth::{org_of, Caller};
use crate::error::ApiError;

use super::http::*;
use super::{Registry, MAX_MANIFEST};

impl Registry {
    pub(super) fn catalog(&self, caller: &Caller, q: &[(String, String)]) -> Handled {
        let visible: Vec<String> = self
            .store
            .repos()
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|r| caller.org.as_deref() == Some(org_of(r)) || self.store.is_public(r))
            .collect();
        let (page, link) = paginate(visible, q, "/v2/_catalog")?;
        let mut b = response(StatusCode::OK).header(CONTENT_TYPE, "application/json");
        if let Some(l) = link {
            b = b.header("Link", l);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "repositories": page }))
            .map_err(ApiError::internal)?;
        Ok(build(
            b.header(CONTENT_LENGTH, body.len()),
            full_body(body),
        )?)
    }

    pub(super) fn tags(&self, name: &str, q: &[(String, String)]) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let tags = self.store.tags(name).map_err(ApiError::from)?;
        let (page, link) = paginate(tags, q, &format!("/v2/{name}/tags/list"))?;
        let mut b = response(StatusCode::OK).header(CONTENT_TYPE, "application/json");
        if let Some(l) = link {
            b = b.header("Link", l);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": page }))
            .map_err(ApiError::internal)?;
        Ok(build(
            b.header(CONTENT_LENGTH, body.len()),
            full_body(body),
        )?)
    }

    pub(super) fn resolve(&self, name: &str, reference: &str) -> Result<(Digest, String), Refusal> {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let digest = if reference.starts_with("sha256:") || reference.contains(':') {
            parse_digest(reference)?
        } else if valid_tag(reference) {
            self.store
                .tag(name, reference)
                .ok_or_else(ApiError::manifest_unknown)?
        } else {
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag").into(),
            );
        };
        let media_type = self
            .store
            .manifest_media_type(name, &digest)
            .ok_or_else(ApiError::manifest_unknown)?;
        Ok((digest, media_type))
    }

    pub(super) fn get_manifest(&self, name: &str, reference: &str, head: bool) -> Handled {
        let (digest, media_type) = self.resolve(name, reference)?;
        let bytes = self
            .store
            .blobs
            .read_blob(&digest)
            .map_err(ApiError::from)?;
        let b = response(StatusCode::OK)
            .header(CONTENT_TYPE, media_type)
            .header(CONTENT_LENGTH, bytes.len())
            .header("Docker-Content-Digest", digest.to_string())
            .header("ETag", format!("\"{digest}\""));
        Ok(build(
            b,
            if head { empty_body() } else { full_body(bytes) },
        )?)
    }

    pub(super) async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        req: Request<Incoming>,
    ) -> Handled {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = read_capped(req.into_body(), MAX_MANIFEST, &self.metrics).await?;
        let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", m);
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("manifest is not JSON: {e}")))?;
        let media_type = doc
            .get("mediaType")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                content_type
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            });
        if !media::is_manifest(&media_type) && !media::is_index(&media_type) {
            return Err(invalid(format!("unsupported manifest media type {media_type:?}")).into());
        }
        if doc.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
            return Err(invalid("schemaVersion must be 2".into()).into());
        }
        // Pushed by digest: hashed with that digest's algorithm (sha512
        // too); by tag: sha256, as clients expect.
        let by_digest = if reference.contains(':') {
            Some(parse_digest(reference)?)
        } else {
            None
        };
        let digest = Digest::of_with(
            by_digest
                .as_ref()
                .map(Digest::algorithm)
                .unwrap_or_default(),
            &bytes,
        );
        let tag = if let Some(want) = &by_digest {
            if *want != digest {
                return Err(ApiError::digest_invalid(format!(
                    "manifest hashes to {digest}, not {reference}"
                ))
                .into());
            }
            None
        } else if valid_tag(reference) {
            Some(reference)
        } else {
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag").into(),
            );
        };
        // Everything it points at must already be in this repository
        // (children of an index are manifests; the rest are blobs).
        let is_index = media::is_index(&media_type);
        let check = |d: &Digest| {
            if is_index {
                self.store.manifest_media_type(name, d).is_some()
            } else {
                self.store.has_blob(name, d)
            }
        };
        for key in ["config", "layers", "manifests"] {
            let items: Vec<&serde_json::Value> = match doc.get(key) {
                Some(serde_json::Value::Array(a)) => a.iter().collect(),
                Some(v @ serde_json::Value::Object(_)) => vec![v],
                _ => continue,
            };
            for item in items {
                let d = item
                    .get("digest")
                    .and_then(|d| d.as_str())
                    .ok_or_else(|| invalid(format!("a {key} entry has no digest")))?;
                let d = parse_digest(d)?;
                // Non-distributable (foreign) layers live elsewhere (their
                // `urls`): a manifest may name them without pushing them.
                let foreign = key == "layers"
                    && item
                        .get("mediaType")
                        .and_then(|m| m.as_str())
                        .is_some_and(media::is_foreign_layer);
                if !foreign && !check(&d) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_BLOB_UNKNOWN",
                        format!("{d} is not in {name}; push it first"),
                    )
                    .into());
                }
            }
        }
        let subject = match doc
            .get("subject")
            .and_then(|s| s.get("digest"))
            .and_then(|d| d.as_str())
        {
            Some(s) => Some(parse_digest(s)?),
            None => None,
        };
        self.store
            .blobs
            .put_bytes_with(digest.algorithm(), &bytes)
            .map_err(ApiError::from)?;
        self.store
            .link_manifest(name, &digest, &media_type)
            .map_err(ApiError::from)?;
        if let Some(s) = &subject {
            self.store
                .add_referrer(name, s, &digest)
                .map_err(ApiError::from)?;
        }
        if let Some(t) = tag {
            self.store
                .set_tag(name, t, &digest)
                .map_err(ApiError::from)?;
        }
        let mut b = response(StatusCode::CREATED)
            .header(LOCATION, format!("/v2/{name}/manifests/{digest}"))
            .header("Docker-Content-Digest", digest.to_string())
            .header(CONTENT_LENGTH, 0);
        if let Some(s) = subject {
            b = b.header("OCI-Subject", s.to_string());
        }
        Ok(build(b, empty_body())?)
    }

    pub(super) fn delete_manifest(&self, name: &str, reference: &str) -> Handled {
        if !self.store.repo_exists(name) {
            return Err(ApiError::name_unknown().into());
        }
        let found = if reference.contains(':') {
            let d = parse_digest(reference)?;
            self.store
                .unlink_manifest(name, &d)
                .map_err(ApiError::from)?
        } else {
            self.store
                .delete_tag(name, reference)
                .map_err(ApiError::from)?
        };
        if !found {
            return Err(ApiError::manifest_unknown().into());
        }
        Ok(build(
            response(StatusCode::ACCEPTED).header(CONTENT_LENGTH, 0),
            empty_body(),
        )?)
    }

    pub(super) fn referrers(&self, name: &str, digest: &str, q: &[(String, String)]) -> Handled {
        let subject = parse_digest(digest)?;
        let filter = param(q, "artifactType");
        let mut manifests = Vec::new();
        for d in self
            .store
            .referrers(name, &subject)
            .map_err(ApiError::from)?
        {
            let Some(media_type) = self.store.manifest_media_type(name, &d) else {
                continue;
            };
            let Ok(bytes) = self.store.blobs.read_blob(&d) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let artifact_type = doc
                .get("artifactType")
                .or_else(|| doc.get("config").and_then(|c| c.get("mediaType")))
                .and_then(|a| a.as_str())
                .unwrap_or("")
                .to_string();
            if filter.is_some_and(|f| f != artifact_type) {
                continue;
            }
            let mut desc = serde_json::json!({
                "mediaType": media_type, "digest": d.to_string(), "size": bytes.len(), "artifactType": artifact_type,
            });
            if let Some(a) = doc.get("annotations") {
                desc["annotations"] = a.clone();
            }
            manifests.push(desc);
        }
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests});
        let mut resp = json(StatusCode::OK, &index, media::OCI_INDEX)?;
        if filter.is_some() {
            resp.headers_mut().insert(
                "OCI-Filters-Applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        Ok(resp)
    }
}
