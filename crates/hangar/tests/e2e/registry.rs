//! `hangar registry` end to end: skopeo and `hangar image` as clients, the
//! tenant-isolation rules route by route, the upload protocol, crashes, gc.

use std::fs;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::*;

fn token(h: &Hangar, org: &str, extra: &[&str]) -> String {
    let mut args = vec!["registry", "token", "create", "--org", org];
    args.extend_from_slice(extra);
    let out = h.ok(&args);
    assert_eq!(
        out.lines().count(),
        1,
        "token create prints the token alone: {out}"
    );
    out.trim().to_string()
}

fn basic(token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x:{token}"))
    )
}

fn small_image(text: &str) -> BuiltImage {
    let base = layer_tar(&[
        Entry::Dir("etc/", 0o755),
        Entry::File("etc/os", 0o644, b"hangar test os".to_vec()),
    ]);
    let app = layer_tar(&[Entry::File("app.txt", 0o644, text.as_bytes().to_vec())]);
    BuiltImage::new(
        &[(base, Compress::Gzip), (app, Compress::Gzip)],
        host_arch(),
        &["/app"],
    )
}

fn skopeo_push(image: &BuiltImage, work: &std::path::Path, dest: &str, token: &str) {
    let layout = work.join(format!("layout-{}", image.manifest_hex()));
    if !layout.exists() {
        image.write_layout(&layout, "t");
    }
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &format!("x:{token}"),
        &format!("oci:{}:t", layout.display()),
        &format!("docker://{dest}"),
    ]);
}

fn skopeo_fails(args: &[&str]) -> String {
    let out = std::process::Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo");
    assert!(!out.status.success(), "skopeo {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn real_clients_push_pull_copy_delete_and_list() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &[]);
    let acme = token(&h, "acme", &[]);
    let beta = token(&h, "beta", &[]);
    let acme_ro = token(&h, "acme", &["--read-only"]);
    let work = tempfile::tempdir().unwrap();
    let image = small_image("v1");
    let app = format!("{}/acme/app:1", reg.host);
    skopeo_push(&image, work.path(), &app, &acme);

    let creds = format!("x:{acme}");
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{app}"),
    ]))
    .unwrap();
    assert_eq!(
        inspected["Digest"],
        format!("sha256:{}", image.manifest_hex())
    );
    let tags: serde_json::Value = serde_json::from_str(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{}/acme/app", reg.host),
    ]))
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["1"]));

    // hangar image as a client: pull, and push under another tag (mounting).
    let client = Hangar::new();
    client.ok(&["image", "pull", &app, "--creds", &creds]);
    let root = work.path().join("root");
    client.ok(&["image", "unpack", &app, root.to_str().unwrap()]);
    assert_eq!(fs::read(root.join("app.txt")).unwrap(), b"v1");
    client.ok(&[
        "image",
        "push",
        &app,
        &format!("{}/acme/other:2", reg.host),
        "--creds",
        &creds,
    ]);

    // Copy between orgs: with rights on both sides it works; into an org the
    // token does not belong to it is denied.
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &creds,
        "--dest-creds",
        &format!("x:{beta}"),
        &format!("docker://{app}"),
        &format!("docker://{}/beta/app:1", reg.host),
    ]);
    let err = skopeo_fails(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &creds,
        "--dest-creds",
        &creds,
        &format!("docker://{app}"),
        &format!("docker://{}/beta/stolen:1", reg.host),
    ]);
    assert!(err.contains("denied"), "{err}");
    let err = skopeo_fails(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &format!("x:{beta}"),
        "--dest-creds",
        &format!("x:{beta}"),
        &format!("docker://{}/acme/other:2", reg.host),
        &format!("docker://{}/beta/x:1", reg.host),
    ]);
    assert!(err.contains("name unknown"), "{err}");
    // A read-only token pulls but cannot push.
    skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &format!("x:{acme_ro}"),
        &format!("docker://{app}"),
    ]);
    let err = skopeo_fails(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &creds,
        "--dest-creds",
        &format!("x:{acme_ro}"),
        &format!("docker://{app}"),
        &format!("docker://{}/acme/ro:1", reg.host),
    ]);
    assert!(err.contains("denied"), "{err}");

    // Delete, then the manifest is gone and its tag with it.
    skopeo(&[
        "delete",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{app}"),
    ]);
    let err = skopeo_fails(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{app}"),
    ]);
    assert!(err.contains("manifest unknown"), "{err}");

    // Public repositories: anonymous pulls work once enabled, not before.
    let beta_app = format!("docker://{}/beta/app:1", reg.host);
    let err = skopeo_fails(&["inspect", "--tls-verify=false", "--no-creds", &beta_app]);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    h.ok(&["registry", "public", "beta/app"]);
    skopeo(&["inspect", "--tls-verify=false", "--no-creds", &beta_app]);

    let metrics = http("GET", &reg.admin, "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(
            "hangar_registry_requests_total{route=\"manifest\",method=\"PUT\",status=\"201\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("hangar_registry_received_bytes_total"),
        "{text}"
    );
}

/// Every route, with another org's token, answers for an existing repository
/// exactly as for a missing one.
#[test]
fn tenant_isolation_route_by_route() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &[]);
    let acme = token(&h, "acme", &[]);
    let evil = token(&h, "evil", &[]);
    let work = tempfile::tempdir().unwrap();
    let image = small_image("secret");
    skopeo_push(
        &image,
        work.path(),
        &format!("{}/acme/app:1", reg.host),
        &acme,
    );
    let manifest = format!("sha256:{}", image.manifest_hex());
    let layer = format!("sha256:{}", sha256_hex(&image.layers[1].0));
    let a = basic(&acme);
    let e = basic(&evil);

    // An upload session acme opened, to try from evil's side.
    let started = http(
        "POST",
        &reg.host,
        "/v2/acme/app/blobs/uploads/",
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(started.status, 202);
    let acme_upload = started.header("location").unwrap().to_string();
    let ghost_upload = acme_upload.replace("/acme/app/", "/acme/ghost/");

    let routes: Vec<(&str, String, String, Vec<u8>)> = vec![
        (
            "GET",
            "/v2/acme/app/manifests/1".into(),
            "/v2/acme/ghost/manifests/1".into(),
            vec![],
        ),
        (
            "HEAD",
            "/v2/acme/app/manifests/1".into(),
            "/v2/acme/ghost/manifests/1".into(),
            vec![],
        ),
        (
            "GET",
            format!("/v2/acme/app/manifests/{manifest}"),
            format!("/v2/acme/ghost/manifests/{manifest}"),
            vec![],
        ),
        (
            "GET",
            format!("/v2/acme/app/blobs/{layer}"),
            format!("/v2/acme/ghost/blobs/{layer}"),
            vec![],
        ),
        (
            "HEAD",
            format!("/v2/acme/app/blobs/{layer}"),
            format!("/v2/acme/ghost/blobs/{layer}"),
            vec![],
        ),
        (
            "GET",
            "/v2/acme/app/tags/list".into(),
            "/v2/acme/ghost/tags/list".into(),
            vec![],
        ),
        (
            "GET",
            format!("/v2/acme/app/referrers/{manifest}"),
            format!("/v2/acme/ghost/referrers/{manifest}"),
            vec![],
        ),
        (
            "DELETE",
            format!("/v2/acme/app/manifests/{manifest}"),
            format!("/v2/acme/ghost/manifests/{manifest}"),
            vec![],
        ),
        (
            "DELETE",
            "/v2/acme/app/manifests/1".into(),
            "/v2/acme/ghost/manifests/1".into(),
            vec![],
        ),
        (
            "DELETE",
            format!("/v2/acme/app/blobs/{layer}"),
            format!("/v2/acme/ghost/blobs/{layer}"),
            vec![],
        ),
        (
            "PUT",
            "/v2/acme/app/manifests/2".into(),
            "/v2/acme/ghost/manifests/2".into(),
            image.manifest.clone(),
        ),
        (
            "POST",
            "/v2/acme/app/blobs/uploads/".into(),
            "/v2/acme/ghost/blobs/uploads/".into(),
            vec![],
        ),
        (
            "PATCH",
            acme_upload.clone(),
            ghost_upload.clone(),
            b"x".to_vec(),
        ),
        ("GET", acme_upload.clone(), ghost_upload.clone(), vec![]),
        (
            "PUT",
            format!("{acme_upload}&digest={layer}"),
            format!("{ghost_upload}&digest={layer}"),
            vec![],
        ),
        ("DELETE", acme_upload.clone(), ghost_upload.clone(), vec![]),
    ];
    for (method, existing, missing, body) in &routes {
        let ct = [
            ("Authorization", e.as_str()),
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        ];
        let got = http(method, &reg.host, existing, &ct, body);
        let want = http(method, &reg.host, missing, &ct, body);
        assert!(
            got.status >= 400,
            "{method} {existing} let evil in: {}",
            got.status
        );
        assert_eq!(
            (got.status, &got.body),
            (want.status, &want.body),
            "{method} {existing} differs from a missing repository"
        );
        for header in ["www-authenticate", "content-type", "content-length"] {
            // A challenge names the scope of the request's own repository.
            let same_name = |v: Option<&str>| v.map(|v| v.replace("acme/ghost", "acme/app"));
            assert_eq!(
                same_name(got.header(header)),
                same_name(want.header(header)),
                "{method} {existing}: {header}"
            );
        }
    }
    // Nothing changed for acme.
    let still = http(
        "GET",
        &reg.host,
        "/v2/acme/app/manifests/1",
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(still.status, 200);

    // A mount from a repository evil cannot read opens a plain upload.
    let mount = http(
        "POST",
        &reg.host,
        &format!("/v2/evil/app/blobs/uploads/?mount={layer}&from=acme/app"),
        &[("Authorization", &e)],
        b"",
    );
    assert_eq!(mount.status, 202, "mount must not be performed");
    let ghost_mount = http(
        "POST",
        &reg.host,
        &format!("/v2/evil/app/blobs/uploads/?mount={layer}&from=acme/ghost"),
        &[("Authorization", &e)],
        b"",
    );
    assert_eq!(ghost_mount.status, 202);
    assert_eq!(
        http(
            "HEAD",
            &reg.host,
            &format!("/v2/evil/app/blobs/{layer}"),
            &[("Authorization", &e)],
            b""
        )
        .status,
        404
    );
    // The same mount by acme itself is performed.
    let own = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/copy/blobs/uploads/?mount={layer}&from=acme/app"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(own.status, 201);

    // An upload cannot be moved into another repository: its state is HMAC'd.
    let moved = acme_upload.replace("/acme/app/", "/acme/copy/");
    let r = http(
        "PATCH",
        &reg.host,
        &moved,
        &[("Authorization", &a)],
        b"data",
    );
    assert_eq!((r.status, r.code().as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));

    // The catalog shows each caller its own.
    let cat = http(
        "GET",
        &reg.host,
        "/v2/_catalog",
        &[("Authorization", &e)],
        b"",
    )
    .json();
    assert_eq!(cat["repositories"], serde_json::json!([]));
    let cat = http(
        "GET",
        &reg.host,
        "/v2/_catalog",
        &[("Authorization", &a)],
        b"",
    )
    .json();
    assert_eq!(
        cat["repositories"],
        serde_json::json!(["acme/app", "acme/copy"])
    );

    // Anonymous callers get the same challenge for existing and missing.
    let got = http("GET", &reg.host, "/v2/acme/app/manifests/1", &[], b"");
    let want = http("GET", &reg.host, "/v2/acme/ghost/manifests/1", &[], b"");
    assert_eq!(got.status, 401);
    assert_eq!(
        got.header("www-authenticate")
            .map(|c| c.replace("acme/app", "X")),
        want.header("www-authenticate")
            .map(|c| c.replace("acme/ghost", "X"))
    );
    // Bearer tokens from /v2/token carry only what the caller may have.
    let t = http(
        "GET",
        &reg.host,
        "/v2/token?service=hangar-registry&scope=repository:acme/app:pull,push",
        &[("Authorization", &e)],
        b"",
    )
    .json();
    let bearer = format!("Bearer {}", t["token"].as_str().unwrap());
    assert_eq!(
        http(
            "GET",
            &reg.host,
            "/v2/acme/app/manifests/1",
            &[("Authorization", &bearer)],
            b""
        )
        .code(),
        "NAME_UNKNOWN"
    );
    let t = http(
        "GET",
        &reg.host,
        "/v2/token?service=hangar-registry&scope=repository:acme/app:pull",
        &[("Authorization", &a)],
        b"",
    )
    .json();
    let bearer = format!("Bearer {}", t["token"].as_str().unwrap());
    assert_eq!(
        http(
            "GET",
            &reg.host,
            "/v2/acme/app/manifests/1",
            &[("Authorization", &bearer)],
            b""
        )
        .status,
        200
    );
    assert_eq!(
        http(
            "GET",
            &reg.host,
            "/v2/acme/copy/tags/list",
            &[("Authorization", &bearer)],
            b""
        )
        .status,
        401,
        "scope limits the bearer token"
    );
    assert_eq!(
        http(
            "GET",
            &reg.host,
            "/v2/token?scope=repository:acme/app:pull",
            &[("Authorization", &basic("hgr_bad_token"))],
            b""
        )
        .status,
        401
    );
}

#[test]
fn upload_protocol_ranges_referrers_and_bad_input() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &["--max-blob-size", "1000000"]);
    let a = basic(&token(&h, "acme", &[]));
    let auth = [("Authorization", a.as_str())];
    let data: Vec<u8> = (0..30u8).collect();
    let digest = format!("sha256:{}", sha256_hex(&data));

    // Chunked upload with an out-of-order chunk, a status check and resume.
    let start = http(
        "POST",
        &reg.host,
        "/v2/acme/blobs/blobs/uploads/",
        &auth,
        b"",
    );
    assert_eq!(start.status, 202);
    let loc = start.header("location").unwrap().to_string();
    let r = http(
        "PATCH",
        &reg.host,
        &loc,
        &[auth[0], ("Content-Range", "0-9")],
        &data[..10],
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-9")));
    let loc = r.header("location").unwrap().to_string();
    let r = http(
        "PATCH",
        &reg.host,
        &loc,
        &[auth[0], ("Content-Range", "20-29")],
        &data[20..],
    );
    assert_eq!((r.status, r.header("range")), (416, Some("0-9")));
    let r = http("GET", &reg.host, &loc, &auth, b"");
    assert_eq!((r.status, r.header("range")), (204, Some("0-9")));
    let r = http(
        "PATCH",
        &reg.host,
        &loc,
        &[auth[0], ("Content-Range", "10-19")],
        &data[10..20],
    );
    assert_eq!(r.status, 202);
    let wrong = format!("sha256:{}", sha256_hex(b"nope"));
    let r = http(
        "PUT",
        &reg.host,
        &format!("{loc}&digest={wrong}"),
        &auth,
        &data[20..],
    );
    assert_eq!((r.status, r.code().as_str()), (400, "DIGEST_INVALID"));
    // That upload is gone; a monolithic POST does it in one go.
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/blobs/blobs/uploads/?digest={digest}"),
        &auth,
        &data,
    );
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (201, Some(digest.as_str()))
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/blobs/blobs/{digest}"),
        &[auth[0], ("Range", "bytes=5-14")],
        b"",
    );
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("content-range")),
        (206, &data[5..15], Some("bytes 5-14/30"))
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/blobs/blobs/{digest}"),
        &[auth[0], ("Range", "bytes=40-")],
        b"",
    );
    assert_eq!(r.status, 416);
    // Cancel.
    let loc = http(
        "POST",
        &reg.host,
        "/v2/acme/blobs/blobs/uploads/",
        &auth,
        b"",
    )
    .header("location")
    .unwrap()
    .to_string();
    assert_eq!(http("DELETE", &reg.host, &loc, &auth, b"").status, 204);
    assert_eq!(
        http("GET", &reg.host, &loc, &auth, b"").code(),
        "BLOB_UPLOAD_UNKNOWN"
    );
    // Over the size limit.
    let big = vec![0u8; 1_000_001];
    let r = http(
        "POST",
        &reg.host,
        &format!(
            "/v2/acme/blobs/blobs/uploads/?digest=sha256:{}",
            sha256_hex(&big)
        ),
        &auth,
        &big,
    );
    assert_eq!((r.status, r.code().as_str()), (413, "SIZE_INVALID"));

    // Manifests: an image, an artifact pointing at it, referrers, tags pages.
    let empty_config = b"{}".to_vec();
    let cfg = format!("sha256:{}", sha256_hex(&empty_config));
    http(
        "POST",
        &reg.host,
        &format!("/v2/acme/blobs/blobs/uploads/?digest={cfg}"),
        &auth,
        &empty_config,
    );
    let image = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": 30}],
    }).to_string();
    let ct = ("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    for tag in ["a", "b", "c"] {
        assert_eq!(
            http(
                "PUT",
                &reg.host,
                &format!("/v2/acme/blobs/manifests/{tag}"),
                &[auth[0], ct],
                image.as_bytes()
            )
            .status,
            201
        );
    }
    let image_digest = format!("sha256:{}", sha256_hex(image.as_bytes()));
    let r = http("GET", &reg.host, "/v2/acme/blobs/tags/list?n=2", &auth, b"");
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/acme/blobs/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let sig = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg, "size": 2}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image_digest, "size": image.len()},
        "annotations": {"signed-by": "test"},
    }).to_string();
    let sig_digest = format!("sha256:{}", sha256_hex(sig.as_bytes()));
    let r = http(
        "PUT",
        &reg.host,
        &format!("/v2/acme/blobs/manifests/{sig_digest}"),
        &[auth[0], ct],
        sig.as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("oci-subject")),
        (201, Some(image_digest.as_str()))
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/blobs/referrers/{image_digest}"),
        &auth,
        b"",
    );
    assert_eq!(r.json()["manifests"][0]["digest"], sig_digest);
    assert_eq!(
        r.json()["manifests"][0]["artifactType"],
        "application/vnd.example.signature"
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/blobs/referrers/{image_digest}?artifactType=application/other"),
        &auth,
        b"",
    );
    assert_eq!(
        (
            r.json()["manifests"].as_array().unwrap().len(),
            r.header("oci-filters-applied")
        ),
        (0, Some("artifactType"))
    );

    // Bad input: spec error codes, never a 5xx.
    let unknown = format!("sha256:{}", sha256_hex(b"never uploaded"));
    let missing_blob = image.replace(&digest, &unknown);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "PUT",
            "/v2/acme/blobs/manifests/x".into(),
            b"{not json".to_vec(),
            400,
            "MANIFEST_INVALID",
        ),
        (
            "PUT",
            "/v2/acme/blobs/manifests/x".into(),
            missing_blob.into_bytes(),
            400,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "PUT",
            format!("/v2/acme/blobs/manifests/{unknown}"),
            image.clone().into_bytes(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "PUT",
            "/v2/acme/blobs/manifests/x".into(),
            vec![b' '; 4 * 1024 * 1024 + 1],
            413,
            "MANIFEST_INVALID",
        ),
        (
            "GET",
            "/v2/acme/blobs/manifests/nope".into(),
            vec![],
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/acme/blobs/blobs/sha256:zz".into(),
            vec![],
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/acme/blobs/blobs/{unknown}"),
            vec![],
            404,
            "BLOB_UNKNOWN",
        ),
        (
            "GET",
            "/v2/ACME/x/manifests/1".into(),
            vec![],
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/acme/manifests/1".into(),
            vec![],
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/acme/blobs/tags/list?n=x".into(),
            vec![],
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        (
            "PUT",
            "/v2/acme/blobs/blobs/uploads/nosuch?_state=00".into(),
            vec![],
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        (
            "POST",
            "/v2/acme/blobs/blobs/uploads/?digest=sha256:00".into(),
            vec![],
            400,
            "DIGEST_INVALID",
        ),
        (
            "PATCH",
            "/v2/acme/blobs/manifests/a".into(),
            vec![],
            405,
            "UNSUPPORTED",
        ),
    ];
    for (method, target, body, status, code) in cases {
        let r = http(method, &reg.host, &target, &[auth[0], ct], &body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{method} {target}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // Deleting a tag leaves the manifest; deleting the manifest drops its tags.
    assert_eq!(
        http(
            "DELETE",
            &reg.host,
            "/v2/acme/blobs/manifests/a",
            &auth,
            b""
        )
        .status,
        202
    );
    assert_eq!(
        http(
            "GET",
            &reg.host,
            &format!("/v2/acme/blobs/manifests/{image_digest}"),
            &auth,
            b""
        )
        .status,
        200
    );
    assert_eq!(
        http(
            "DELETE",
            &reg.host,
            &format!("/v2/acme/blobs/manifests/{image_digest}"),
            &auth,
            b""
        )
        .status,
        202
    );
    assert_eq!(
        http("GET", &reg.host, "/v2/acme/blobs/manifests/b", &auth, b"").code(),
        "MANIFEST_UNKNOWN"
    );
}

#[test]
fn a_killed_registry_serves_only_whole_content_and_gc_reclaims() {
    let h = Hangar::new();
    let mut reg = HangarRegistry::start(&h, &["--upload-timeout", "2s"]);
    let acme = token(&h, "acme", &[]);
    let work = tempfile::tempdir().unwrap();
    // Big enough that the push is still running when the registry dies.
    let big: Vec<u8> = (0..12_000_000u32)
        .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
        .collect();
    let image = BuiltImage::new(
        &[(layer_tar(&[Entry::File("big", 0o644, big)]), Compress::None)],
        host_arch(),
        &["/big"],
    );
    let layout = work.path().join("layout");
    image.write_layout(&layout, "t");
    let dest = format!("docker://{}/acme/big:1", reg.host);
    let mut push = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("x:{acme}"),
            &format!("oci:{}:t", layout.display()),
            &dest,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let uploads = h.home().join("registry/uploads");
    wait_for_partial_file(
        &uploads,
        1_000_000,
        Duration::from_secs(60),
        "the push to get going",
    );
    kill_9(reg.pid());
    reg.kill();
    let _ = push.wait();
    // gc --dry-run says what the crash left (the abandoned upload, the
    // repository with no manifest) and removes nothing.
    let left = fs::read_dir(&uploads).unwrap().count();
    assert!(left > 0);
    let dry = h.ok(&["registry", "gc", "--dry-run"]);
    assert!(dry.starts_with("would remove"), "{dry}");
    let abandoned: u64 = dry
        .split(", ")
        .find(|p| p.ends_with("bytes)") && p.contains("abandoned uploads"))
        .and_then(|p| p.split('(').nth(1))
        .and_then(|b| b.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(abandoned >= 1_000_000, "{dry}");
    assert_eq!(
        fs::read_dir(&uploads).unwrap().count(),
        left,
        "a dry run removed uploads"
    );

    let reg = HangarRegistry::start(&h, &["--upload-timeout", "2s"]);
    let creds = format!("x:{acme}");
    let err = skopeo_fails(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{}/acme/big:1", reg.host),
    ]);
    assert!(err.contains("unknown"), "{err}");
    // Every blob that is visible is whole.
    for e in fs::read_dir(h.home().join("registry/oci/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        assert_eq!(
            sha256_hex(&fs::read(e.path()).unwrap()),
            e.file_name().to_string_lossy(),
            "corrupt visible blob"
        );
    }
    // Abandoned uploads are cleaned after the timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_dir(&uploads).unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "abandoned uploads were not cleaned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The push can be done again, and then pulled whole.
    let dest = format!("docker://{}/acme/big:1", reg.host);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &format!("oci:{}:t", layout.display()),
        &dest,
    ]);
    let small = small_image("gc me");
    skopeo_push(
        &small,
        work.path(),
        &format!("{}/acme/small:1", reg.host),
        &acme,
    );
    let client = Hangar::new();
    client.ok(&[
        "image",
        "pull",
        &format!("{}/acme/big:1", reg.host),
        "--creds",
        &creds,
    ]);

    // gc refuses while the registry runs; after a delete and a stop it frees space.
    let err = h.fails(&["registry", "gc"]);
    assert!(err.contains("stop"), "{err}");
    skopeo(&["delete", "--tls-verify=false", "--creds", &creds, &dest]);
    drop(reg);
    let dry = h.ok(&["registry", "gc", "--dry-run"]);
    let out = h.ok(&["registry", "gc"]);
    let freed = |out: &str| -> u64 {
        out.lines()
            .find_map(|l| {
                l.strip_prefix("freed ")
                    .or_else(|| l.strip_prefix("would free "))
            })
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(freed(&out) >= 48_000_000, "{out}");
    assert_eq!(
        freed(&dry),
        freed(&out),
        "the dry run said what gc freed: {dry} / {out}"
    );
    // The deleted image's repository had nothing left: it leaves the catalog.
    assert!(out.contains("1 empty repositories: acme/big"), "{out}");
    let again = h.ok(&["registry", "gc"]);
    assert!(
        again.starts_with("removed 0 blobs (0 bytes), 0 abandoned uploads (0 bytes), 0 empty"),
        "{again}"
    );
    let reg = HangarRegistry::start(&h, &[]);
    let fresh = Hangar::new();
    fresh.ok(&[
        "image",
        "pull",
        &format!("{}/acme/small:1", reg.host),
        "--creds",
        &creds,
    ]);
}

fn kill_9(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

/// A bearer token from `/v2/token` for `scopes`, as `caller` (Basic auth).
fn bearer(reg: &HangarRegistry, caller: &str, scopes: &[&str]) -> String {
    let q: Vec<String> = scopes.iter().map(|s| format!("scope={s}")).collect();
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/token?service=hangar-registry&{}", q.join("&")),
        &[("Authorization", caller)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    format!("Bearer {}", r.json()["token"].as_str().unwrap())
}

fn detail(r: &HttpResponse) -> String {
    r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// What real clients ran into: bearer tokens that outlived their API token,
/// pull-only tokens that could not push (oras), mounts between an org's own
/// repositories that fell back to uploads, foreign layers, bare errors.
#[test]
fn bearer_tokens_mounts_foreign_layers_and_error_details() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &[]);
    let acme = token(&h, "acme", &[]);
    let evil = token(&h, "evil", &[]);
    let reader = token(&h, "acme", &["--read-only"]);
    let image = small_image("mounts");
    skopeo_push(
        &image,
        h.dir.path(),
        &format!("{}/acme/app:1", reg.host),
        &acme,
    );
    let manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let config = manifest["config"].clone();

    // A token asked for pull only carries the caller's push right too.
    let pull_only = bearer(&reg, &basic(&acme), &["repository:acme/app:pull"]);
    let r = http(
        "POST",
        &reg.host,
        "/v2/acme/app/blobs/uploads/",
        &[("Authorization", &pull_only)],
        b"",
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        "POST",
        &reg.host,
        "/v2/acme/app/blobs/uploads/",
        &[(
            "Authorization",
            &bearer(&reg, &basic(&reader), &["repository:acme/app:pull,push"]),
        )],
        b"",
    );
    assert_eq!(r.status, 403, "a read-only token gets no push");
    assert!(detail(&r).contains("read-only"), "{}", detail(&r));

    // Mounts between repositories of one org: with a token scoped to the
    // target only (as clients ask), and with no `from` at all.
    let target_only = bearer(&reg, &basic(&acme), &["repository:acme/copy:pull,push"]);
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/copy/blobs/uploads/?mount={layer}&from=acme/app"),
        &[("Authorization", &target_only)],
        b"",
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/third/blobs/uploads/?mount={layer}"),
        &[("Authorization", &basic(&acme))],
        b"",
    );
    assert_eq!(r.status, 201, "a mount without from finds the org's blob");
    // Another org: a plain upload, whether or not the blob exists anywhere.
    for digest in [layer.clone(), format!("sha256:{}", "0".repeat(64))] {
        let r = http(
            "POST",
            &reg.host,
            &format!("/v2/evil/x/blobs/uploads/?mount={digest}"),
            &[("Authorization", &basic(&evil))],
            b"",
        );
        assert_eq!(r.status, 202, "{digest}");
    }

    // A manifest naming a foreign (non-distributable) layer it never pushed.
    let foreign = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [
            manifest["layers"][0],
            {"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
             "digest": format!("sha256:{}", "ab".repeat(32)), "size": 1234,
             "urls": ["https://example.invalid/layer.tar.gz"]},
        ],
    });
    let r = http(
        "PUT",
        &reg.host,
        "/v2/acme/app/manifests/foreign",
        &[
            ("Authorization", &basic(&acme)),
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        ],
        foreign.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // Refusals say what was refused and why, and nothing about existence.
    let r = http(
        "POST",
        &reg.host,
        "/v2/acme/app/blobs/uploads/",
        &[("Authorization", &basic(&evil))],
        b"",
    );
    assert_eq!(r.status, 403);
    assert!(
        detail(&r).contains("pushes only to evil/"),
        "{}",
        detail(&r)
    );
    let there = http(
        "GET",
        &reg.host,
        "/v2/acme/app/tags/list",
        &[("Authorization", &basic(&evil))],
        b"",
    );
    let ghost = http(
        "GET",
        &reg.host,
        "/v2/acme/ghost/tags/list",
        &[("Authorization", &basic(&evil))],
        b"",
    );
    assert_eq!((there.status, &there.body), (ghost.status, &ghost.body));
    assert!(!detail(&there).is_empty());
    let anon = http("GET", &reg.host, "/v2/acme/app/tags/list", &[], b"");
    assert_eq!(anon.status, 401);
    assert!(
        detail(&anon).contains("repository:acme/app:pull"),
        "{}",
        detail(&anon)
    );
    // The realm is http here, and a forwarded scheme from an untrusted
    // peer does not change it.
    let forwarded = http(
        "GET",
        &reg.host,
        "/v2/",
        &[("X-Forwarded-Proto", "https")],
        b"",
    );
    assert_eq!(
        forwarded.header("www-authenticate").unwrap(),
        format!(
            "Bearer realm=\"http://{}/v2/token\",service=\"hangar-registry\"",
            reg.host
        )
    );

    // One access-log line per request: mounts told from uploads.
    let log = reg.log.lock().unwrap().clone();
    let entries: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mounts: Vec<&serde_json::Value> = entries.iter().filter(|e| e["kind"] == "mount").collect();
    assert_eq!(mounts.len(), 2, "{log:#?}");
    assert!(mounts.iter().any(|m| m["repository"] == "acme/copy"
        && m["status"] == 201
        && m["digest"] == layer.as_str()));
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "upload" && e["repository"] == "evil/x" && e["status"] == 202));
    assert!(entries.iter().any(|e| e["kind"] == "manifest"
        && e["method"] == "PUT"
        && e["status"] == 201
        && e["bytes"].as_u64() > Some(100)));

    // Revoking an API token ends its bearer tokens within a second.
    let b = bearer(&reg, &basic(&acme), &["repository:acme/app:pull"]);
    let tags = |auth: &str| {
        http(
            "GET",
            &reg.host,
            "/v2/acme/app/tags/list",
            &[("Authorization", auth)],
            b"",
        )
        .status
    };
    assert_eq!(tags(&b), 200);
    let id = acme
        .strip_prefix("hgr_")
        .unwrap()
        .split('_')
        .next()
        .unwrap();
    h.ok(&["registry", "token", "revoke", id]);
    let revoked = Instant::now();
    while tags(&b) != 401 {
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "a revoked token's bearer token still works"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And an API token's expiry ends them too.
    let short = token(&h, "acme", &["--expires", "2s"]);
    let b = bearer(&reg, &basic(&short), &["repository:acme/app:pull"]);
    assert_eq!(tags(&b), 200);
    std::thread::sleep(Duration::from_millis(2000));
    let expired = Instant::now();
    while tags(&b) != 401 {
        assert!(
            expired.elapsed() < Duration::from_millis(1100),
            "an expired token's bearer token still works"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The registry over TLS: the token realm names https (so clients send
/// their credentials encrypted), and behind a trusted proxy, its scheme.
#[test]
fn tls_and_the_realm_clients_are_sent_to() {
    let h = Hangar::new();
    let (cert, key) = self_signed(h.dir.path(), "localhost");
    let reg = HangarRegistry::start(
        &h,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(reg.scheme, "https");
    let acme = token(&h, "acme", &[]);
    let out = std::process::Command::new("curl")
        .args([
            "-sk",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("https://{}/v2/", reg.host),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(
        head.contains(&format!("realm=\"https://{}/v2/token\"", reg.host)),
        "{head}"
    );
    // A real client pushes and reads back over TLS, through the bearer flow.
    let image = small_image("over tls");
    skopeo_push(
        &image,
        h.dir.path(),
        &format!("{}/acme/tls:1", reg.host),
        &acme,
    );
    let inspect = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &format!("x:{acme}"),
        &format!("docker://{}/acme/tls:1", reg.host),
    ]);
    assert_eq!(sha256_hex(inspect.as_bytes()), image.manifest_hex());
    // Plain HTTP behind a trusted proxy: the proxy's scheme and host.
    let behind = HangarRegistry::start(&h, &["--trusted-proxy", "127.0.0.1"]);
    let r = http(
        "GET",
        &behind.host,
        "/v2/",
        &[
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "registry.example"),
        ],
        b"",
    );
    assert_eq!(
        r.header("www-authenticate").unwrap(),
        "Bearer realm=\"https://registry.example/v2/token\",service=\"hangar-registry\""
    );
}

fn sha512_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha512::digest(bytes))
}

/// sha512 digests (registered in the OCI image spec) wherever a digest
/// appears: monolithic and chunked uploads, HEAD/GET/Range/DELETE, mounts,
/// manifests by digest, and `hangar image pull/push`; an unknown algorithm
/// is the spec's DIGEST_INVALID, never a 5xx.
#[test]
fn sha512_digests_everywhere() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &[]);
    let acme = token(&h, "acme", &[]);
    let a = basic(&acme);
    let tar = layer_tar(&[Entry::File("app.txt", 0o644, b"sha512 layer".to_vec())]);
    let layer = compress(&tar, Compress::Gzip);
    let layer_digest = format!("sha512:{}", sha512_hex(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(), "os": "linux",
        "config": {"Cmd": ["/app"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]},
    }))
    .unwrap();
    let config_digest = format!("sha512:{}", sha512_hex(&config));

    // The config monolithically, the layer in two chunks.
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/s512/blobs/uploads/?digest={config_digest}"),
        &[
            ("Authorization", &a),
            ("Content-Type", "application/octet-stream"),
        ],
        &config,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(config_digest.as_str())
    );
    let r = http(
        "POST",
        &reg.host,
        "/v2/acme/s512/blobs/uploads/",
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 202);
    let mut location = r.header("location").unwrap().to_string();
    let half = layer.len() / 2;
    for (from, part) in [(0, &layer[..half]), (half, &layer[half..])] {
        let range = format!("{from}-{}", from + part.len() - 1);
        let r = http(
            "PATCH",
            &reg.host,
            &location,
            &[
                ("Authorization", &a),
                ("Content-Range", &range),
                ("Content-Type", "application/octet-stream"),
            ],
            part,
        );
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        location = r.header("location").unwrap().to_string();
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = http(
        "PUT",
        &reg.host,
        &format!("{location}{sep}digest={layer_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // A wrong sha512 is refused as any wrong digest.
    let wrong = format!("sha512:{}", "0".repeat(128));
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/s512/blobs/uploads/?digest={wrong}"),
        &[("Authorization", &a)],
        b"not this",
    );
    assert_eq!((r.status, r.code().as_str()), (400, "DIGEST_INVALID"));

    // HEAD, GET, Range.
    let r = http(
        "HEAD",
        &reg.host,
        &format!("/v2/acme/s512/blobs/{layer_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(layer.len().to_string().as_str())
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/s512/blobs/{layer_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!((r.status, &r.body), (200, &layer));
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/s512/blobs/{layer_digest}"),
        &[("Authorization", &a), ("Range", "bytes=0-9")],
        b"",
    );
    assert_eq!((r.status, &r.body[..]), (206, &layer[..10]));

    // A manifest naming sha512 blobs, by tag and by its own sha512.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = format!("sha512:{}", sha512_hex(&manifest));
    let ct = ("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    let r = http(
        "PUT",
        &reg.host,
        "/v2/acme/s512/manifests/1",
        &[("Authorization", &a), ct],
        &manifest,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        "PUT",
        &reg.host,
        &format!("/v2/acme/s512/manifests/{manifest_digest}"),
        &[("Authorization", &a), ct],
        &manifest,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );
    let r = http(
        "GET",
        &reg.host,
        &format!("/v2/acme/s512/manifests/{manifest_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!((r.status, &r.body), (200, &manifest));

    // A mount of a sha512 blob into another repository of the org.
    let r = http(
        "POST",
        &reg.host,
        &format!("/v2/acme/copy/blobs/uploads/?mount={layer_digest}&from=acme/s512"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 201);

    // hangar image: pull (by tag and by sha512), unpack, push elsewhere.
    let creds = format!("x:{acme}");
    let client = Hangar::new();
    let by_tag = format!("{}/acme/s512:1", reg.host);
    client.ok(&["image", "pull", &by_tag, "--creds", &creds]);
    client.ok(&[
        "image",
        "pull",
        &format!("{}/acme/s512@{manifest_digest}", reg.host),
        "--creds",
        &creds,
    ]);
    let root = client.dir.path().join("root");
    client.ok(&["image", "unpack", &by_tag, root.to_str().unwrap()]);
    assert_eq!(fs::read(root.join("app.txt")).unwrap(), b"sha512 layer");
    client.ok(&[
        "image",
        "push",
        &by_tag,
        &format!("{}/acme/pushed:1", reg.host),
        "--creds",
        &creds,
    ]);
    let r = http(
        "HEAD",
        &reg.host,
        &format!("/v2/acme/pushed/blobs/{layer_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 200, "the pushed image keeps its sha512 layer");

    // DELETE, and unknown algorithms: 4xx with the spec's code, never 5xx.
    let r = http(
        "DELETE",
        &reg.host,
        &format!("/v2/acme/copy/blobs/{layer_digest}"),
        &[("Authorization", &a)],
        b"",
    );
    assert_eq!(r.status, 202);
    for bad in [
        "blake3:abcd",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha512:short",
    ] {
        for (method, path) in [
            ("GET", format!("/v2/acme/s512/blobs/{bad}")),
            ("HEAD", format!("/v2/acme/s512/blobs/{bad}")),
            ("GET", format!("/v2/acme/s512/manifests/{bad}")),
            ("POST", format!("/v2/acme/s512/blobs/uploads/?digest={bad}")),
            (
                "POST",
                format!("/v2/acme/s512/blobs/uploads/?mount={bad}&from=acme/copy"),
            ),
        ] {
            let r = http(method, &reg.host, &path, &[("Authorization", &a)], b"x");
            if path.contains("mount=") {
                // A mount that cannot be done is a plain upload (the spec's fallback).
                assert_eq!(r.status, 202, "{method} {path}");
                continue;
            }
            assert!(
                (400..500).contains(&r.status),
                "{method} {path}: {}",
                r.status
            );
            if method == "GET" && path.contains("/blobs/") {
                assert_eq!(r.code(), "DIGEST_INVALID", "{method} {path}");
            }
        }
    }
}

/// The PyPI `oras` library, a real client, with its default auth flow: it
/// keeps the token it got first and refreshes only on a 403, so a token
/// granted only what was asked (pull) could never push. It pushes and pulls
/// an artifact; another org's token cannot push there.
#[test]
fn the_oras_library_pushes_and_pulls_with_its_default_auth() {
    let h = Hangar::new();
    let reg = HangarRegistry::start(&h, &[]);
    let acme = token(&h, "acme", &[]);
    let evil = token(&h, "evil", &[]);
    let work = h.dir.path().join("oras");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("hi.txt"), "an artifact\n").unwrap();
    let script = r#"
import sys, oras.client
host, token, target = sys.argv[1:4]
c = oras.client.OrasClient(hostname=host, insecure=True)
c.login(username="x", password=token, hostname=host, tls_verify=False)
try:
    r = c.push(files=["hi.txt"], target=target)
    print("push", r.status_code)
except Exception as e:
    print("push failed:", e)
    sys.exit(3)
print("pulled", c.pull(target=target, outdir="out"))
"#;
    let run = |token: &str, target: &str| {
        std::process::Command::new("python3")
            .args(["-c", script, &reg.host, token, target])
            .current_dir(&work)
            .env("HOME", &work)
            .output()
            .unwrap()
    };
    let target = format!("{}/acme/artifact:1", reg.host);
    let out = run(&acme, &target);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("push 201"), "{said}");
    assert_eq!(
        fs::read_to_string(work.join("out/hi.txt")).unwrap(),
        "an artifact\n"
    );
    // Refused at once, saying why (it used to retry with backoff for two
    // minutes on a 403 it could not answer).
    let started = Instant::now();
    let out = run(&evil, &format!("{}/acme/artifact:2", reg.host));
    assert!(!out.status.success(), "evil pushed into acme");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the refusal took {:?}",
        started.elapsed()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("pushes only to evil/"), "{said}");
    let tags = http(
        "GET",
        &reg.host,
        "/v2/acme/artifact/tags/list",
        &[("Authorization", &basic(&acme))],
        b"",
    );
    assert_eq!(tags.json()["tags"], serde_json::json!(["1"]));
}
