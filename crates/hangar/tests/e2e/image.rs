//! `hangar image` end to end.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// A three-layer image (gzip and plain: umoci 0.4 reads no zstd), exercising whiteouts,
/// opaque directories, hardlinks, symlinks and modes.
fn tricky_image() -> BuiltImage {
    use Entry::*;
    let l1 = layer_tar(&[
        Dir("etc/", 0o755),
        File("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n".to_vec()),
        File("etc/motd", 0o644, b"old motd\n".to_vec()),
        Dir("opt/", 0o755),
        Dir("opt/app/", 0o750),
        File("opt/app/old.conf", 0o600, b"old".to_vec()),
        Dir("opt/app/sub/", 0o755),
        File("opt/app/sub/deep", 0o644, b"deep".to_vec()),
        Dir("bin/", 0o755),
        File("bin/tool", 0o4755, b"#!/bin/sh\necho tool\n".to_vec()),
        Hardlink("bin/tool-link", "bin/tool"),
        Symlink("bin/sh", "tool"),
        Owned("etc/shadow-ish", 1000, 1001),
        Dir("dev/", 0o755),
        CharDevice("dev/null", 1, 3),
        Fifo("dev/pipe"),
        Dir("var/", 0o755),
        Dir("var/tmp/", 0o1777),
        File("var/gone", 0o644, b"to be whited out".to_vec()),
        Dir("var/dir-gone/", 0o755),
        File("var/dir-gone/x", 0o644, b"x".to_vec()),
    ]);
    let l2 = layer_tar(&[
        Dir("etc/", 0o755),
        File("etc/motd", 0o644, b"new motd\n".to_vec()),
        Dir("opt/app/", 0o755),
        File("opt/app/new.conf", 0o640, b"new".to_vec()),
        Whiteout("opt/app/.wh..wh..opq"),
        Whiteout("var/.wh.gone"),
        Whiteout("var/.wh.dir-gone"),
        Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    ]);
    let l3 = layer_tar(&[
        Dir("bin/", 0o755),
        // Replace a hardlinked file: the other link must keep the old content.
        File("bin/tool-link", 0o755, b"replaced".to_vec()),
        Dir("data/", 0o700),
        File(
            "data/big",
            0o644,
            (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect(),
        ),
        Hardlink("data/big2", "data/big"),
    ]);
    BuiltImage::new(
        &[
            (l1, Compress::Gzip),
            (l2, Compress::Gzip),
            (l3, Compress::None),
        ],
        host_arch(),
        &["/bin/sh"],
    )
}

fn push_layout_with_skopeo(layout: &Path, tag: &str, dest: &str, creds: Option<&str>) {
    let src = format!("oci:{}:{tag}", layout.display());
    let dst = format!("docker://{dest}");
    let mut args = vec![
        "copy",
        "--dest-tls-verify=false",
        src.as_str(),
        dst.as_str(),
    ];
    if let Some(c) = creds {
        args.splice(1..1, ["--dest-creds", c]);
    }
    skopeo(&args);
}

#[test]
fn pull_what_skopeo_pushed_unpack_matches_umoci() {
    require("umoci");
    let registry = Registry::start(RegistryAuth::None);
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let image = tricky_image();
    image.write_layout(&layout, "v1");
    let reference = format!("{}/org/tricky:v1", registry.host());
    push_layout_with_skopeo(&layout, "v1", &reference, None);
    push_layout_with_skopeo(
        &layout,
        "v1",
        &format!("{}/org/tricky:again", registry.host()),
        None,
    );

    // skopeo gzips the uncompressed layer on the way, so ask the registry.
    let pushed: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]))
    .unwrap();
    let h = Hangar::new();
    let out = h.ok(&["image", "pull", &reference]);
    assert!(out.contains(pushed["Digest"].as_str().unwrap()), "{out}");
    let info = h.inspect(&reference);
    assert_eq!(info["digest"], pushed["Digest"]);
    assert_eq!(info["platform"], format!("linux/{}", host_arch()));
    assert_eq!(info["cmd"][0], "/bin/sh");
    assert_eq!(info["layers"].as_array().unwrap().len(), 3);

    let ours = work.path().join("ours");
    h.ok(&["image", "unpack", &reference, ours.to_str().unwrap()]);
    let bundle = work.path().join("bundle");
    let st = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:v1", layout.display())])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let theirs = tree(&bundle.join("rootfs"));
    let mine = tree(&ours);
    let only_theirs: Vec<_> = theirs.keys().filter(|k| !mine.contains_key(*k)).collect();
    let only_mine: Vec<_> = mine.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(
        only_theirs.is_empty() && only_mine.is_empty(),
        "paths differ: umoci only {only_theirs:?}, hangar only {only_mine:?}"
    );
    for (path, node) in &theirs {
        assert_eq!(Some(node), mine.get(path), "{path} differs from umoci's");
    }
    // Spot checks, so the comparison cannot pass on two equally wrong trees.
    assert!(
        mine["opt/app/new.conf"].kind == "file"
            && !mine.contains_key("opt/app/old.conf")
            && !mine.contains_key("opt/app/sub")
    );
    assert!(!mine.contains_key("var/gone") && !mine.contains_key("var/dir-gone"));
    assert_eq!(
        fs::read(ours.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    assert_eq!(fs::read(ours.join("bin/tool-link")).unwrap(), b"replaced");
    assert_eq!(mine["bin/tool"].mode, 0o4755);
    assert_eq!(mine["var/tmp"].mode, 0o1777);
    // CI runs as root, where device nodes are created; elsewhere skipped with a warning.
    if mine.contains_key("dev/null") {
        assert_eq!(
            (mine["dev/null"].kind, mine["dev/null"].content.as_str()),
            ("char", "1:3")
        );
    }
    assert_eq!(mine["dev/pipe"].kind, "fifo");
    assert_eq!(
        (mine["etc/shadow-ish"].uid, mine["etc/shadow-ish"].gid),
        (1000, 1001)
    );
    assert_eq!(mine["etc/motd"].mtime, 1_600_000_000);
    assert_eq!(mine["data/big"].link_group.as_deref(), Some("data/big"));
    assert_eq!(mine["data/big2"].link_group.as_deref(), Some("data/big"));
    assert_eq!(
        fs::read_link(ours.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );

    // Layers already in the store are not fetched again: remove their data
    // from the registry, then pull a second name of the same image.
    for layer in info["layers"].as_array().unwrap() {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        fs::remove_file(registry.blob_data(hex)).unwrap();
    }
    h.ok(&[
        "image",
        "pull",
        &format!("{}/org/tricky:again", registry.host()),
    ]);
    assert_eq!(
        h.inspect(&format!("{}/org/tricky:again", registry.host()))["digest"],
        info["digest"]
    );
}

#[test]
fn push_is_read_back_by_skopeo_with_chunks_and_mounts() {
    let registry = Registry::start(RegistryAuth::None);
    let work = tempfile::tempdir().unwrap();
    let h = Hangar::new();
    // A base image from the registry, and an app built on it.
    let layout = work.path().join("base");
    let base = tricky_image();
    base.write_layout(&layout, "1");
    let base_ref = format!("{}/org/base:1", registry.host());
    push_layout_with_skopeo(&layout, "1", &base_ref, None);
    let app = work.path().join("app");
    fs::create_dir_all(app.join("srv")).unwrap();
    fs::write(app.join("srv/index.html"), "hello").unwrap();
    let app_ref = format!("{}/org/app:1", registry.host());
    let built = h.ok(&[
        "image",
        "build",
        app.to_str().unwrap(),
        "-t",
        &app_ref,
        "--base",
        &base_ref,
        "--cmd",
        r#"["/bin/sh","-c","echo hi"]"#,
        "--expose",
        "8080",
        "-e",
        "MODE=prod",
    ]);
    let digest = built.split_whitespace().nth(1).unwrap().to_string();

    // Chunked upload (tiny chunks) of the new layer; base layers get mounted.
    h.ok(&["image", "push", &app_ref, "--chunk-size", "100"]);
    let log = registry.log_text();
    assert!(log.contains("PATCH"), "no chunked upload in registry log");
    assert!(
        log.contains("mount=sha256"),
        "no cross-repository mount attempted"
    );
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{app_ref}"),
    ]))
    .unwrap();
    assert_eq!(inspected["Digest"], digest);
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 4);
    let out = work.path().join("copied");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{app_ref}"),
        &format!("oci:{}:x", out.display()),
    ]);
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:x", out.display())]);
    assert_eq!(format!("sha256:{}", sha256_hex(raw.as_bytes())), digest);

    // A second push finds every blob there already.
    h.ok(&[
        "image",
        "push",
        &app_ref,
        &format!("{}/org/app:2", registry.host()),
    ]);
    let config: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{}/org/app:2", registry.host()),
    ]))
    .unwrap();
    assert_eq!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| *e == "MODE=prod")
            .count(),
        1
    );
    assert!(config["config"]["ExposedPorts"]["8080/tcp"].is_object());
}

#[test]
fn bearer_token_flow_and_docker_config_credentials() {
    let tokens = TokenServer::start("alice", "s3cret");
    let registry = Registry::start(RegistryAuth::Token(tokens.clone()));
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let image = BuiltImage::new(
        &[(
            layer_tar(&[Entry::File("hello", 0o644, b"hi".to_vec())]),
            Compress::Gzip,
        )],
        host_arch(),
        &["/hello"],
    );
    image.write_layout(&layout, "1");
    let reference = format!("{}/team/secret:1", registry.host());
    push_layout_with_skopeo(&layout, "1", &reference, Some("alice:s3cret"));

    let h = Hangar::new();
    let err = h.fails(&["image", "pull", &reference]);
    assert!(
        err.contains("401") && err.contains("--creds") && err.lines().count() == 1,
        "{err}"
    );
    let err = h.fails(&["image", "pull", &reference, "--creds", "alice:wrong"]);
    assert!(err.contains("refused the credentials"), "{err}");
    h.ok(&["image", "pull", &reference, "--creds", "alice:s3cret"]);
    assert!(tokens
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|q| q.contains("service=test-registry")
            && q.contains("scope=repository%3Ateam%2Fsecret%3Apull")));

    // The same through ~/.docker/config.json.
    let h2 = Hangar::new();
    let auth = base64_encode("alice:s3cret");
    fs::write(
        h2.docker_config.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    h2.ok(&["image", "pull", &reference]);
    // And push with a token carrying push scope.
    h2.ok(&[
        "image",
        "push",
        &reference,
        &format!("{}/team/copy:1", registry.host()),
    ]);
    skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        &format!("docker://{}/team/copy:1", registry.host()),
    ]);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn basic_auth_htpasswd_registry() {
    let registry = Registry::start(RegistryAuth::Basic("bob", "pw"));
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let layers = [
        (
            layer_tar(&[
                Entry::File("a", 0o644, b"a".to_vec()),
                Entry::File("b", 0o644, b"b".to_vec()),
            ]),
            Compress::Zstd,
        ),
        (
            layer_tar(&[
                Entry::Whiteout(".wh.b"),
                Entry::File("c", 0o644, b"c".to_vec()),
            ]),
            Compress::Gzip,
        ),
    ];
    let image = BuiltImage::new(&layers, host_arch(), &["/a"]);
    image.write_layout(&layout, "1");
    let reference = format!("{}/x/y:1", registry.host());
    push_layout_with_skopeo(&layout, "1", &reference, Some("bob:pw"));
    let h = Hangar::new();
    let before = h.store_snapshot();
    let err = h.fails(&["image", "pull", &reference]);
    assert!(
        err.contains(&format!("http://{}/v2/x/y/manifests/1", registry.host())),
        "{err}"
    );
    assert_eq!(h.store_snapshot(), before);
    h.ok(&["image", "pull", &reference, "--creds", "bob:pw"]);
    let info = h.inspect(&reference);
    assert_eq!(
        info["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let root = work.path().join("root");
    h.ok(&["image", "unpack", &reference, root.to_str().unwrap()]);
    assert_eq!(fs::read(root.join("a")).unwrap(), b"a");
    assert!(!root.join("b").exists());
    assert_eq!(fs::read(root.join("c")).unwrap(), b"c");
}

#[test]
fn platforms_are_selected_from_an_index() {
    let registry = Registry::start(RegistryAuth::None);
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let amd = BuiltImage::new(
        &[(
            layer_tar(&[Entry::File("arch", 0o644, b"amd64".to_vec())]),
            Compress::Gzip,
        )],
        "amd64",
        &["/x"],
    );
    let arm = BuiltImage::new(
        &[(
            layer_tar(&[Entry::File("arch", 0o644, b"arm64".to_vec())]),
            Compress::Gzip,
        )],
        "arm64",
        &["/x"],
    );
    write_layout(&layout, &[(&amd, "amd"), (&arm, "arm")], Some("multi"));
    let reference = format!("{}/org/multi:1", registry.host());
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{reference}"),
    ]);
    let h = Hangar::new();
    h.ok(&["image", "pull", &reference, "--platform", "linux/arm64"]);
    assert_eq!(
        h.inspect(&reference)["digest"],
        format!("sha256:{}", arm.manifest_hex())
    );
    h.ok(&["image", "pull", &reference, "--platform", "linux/amd64"]);
    assert_eq!(
        h.inspect(&reference)["digest"],
        format!("sha256:{}", amd.manifest_hex())
    );
    assert!(h.inspect(&reference)["index"].is_string());
    let before = h.store_snapshot();
    let err = h.fails(&["image", "pull", &reference, "--platform", "linux/s390x"]);
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64") && err.contains("--platform"),
        "{err}"
    );
    assert_eq!(h.store_snapshot(), before);
    // By digest, the image unpacks to the selected platform's files.
    let by_digest = format!(
        "{}/org/multi@sha256:{}",
        registry.host(),
        arm.manifest_hex()
    );
    h.ok(&["image", "pull", &by_digest]);
    let dir = work.path().join("arm");
    h.ok(&["image", "unpack", &by_digest, dir.to_str().unwrap()]);
    assert_eq!(fs::read(dir.join("arch")).unwrap(), b"arm64");
}

#[test]
fn save_load_roundtrip_through_skopeo() {
    let h = Hangar::new();
    let work = tempfile::tempdir().unwrap();
    let app = work.path().join("app");
    fs::create_dir_all(&app).unwrap();
    fs::write(app.join("f"), "x").unwrap();
    let built = h.ok(&[
        "image",
        "build",
        app.to_str().unwrap(),
        "-t",
        "example.com/me/app:7",
        "--entrypoint",
        "/f",
    ]);
    let digest = built.split_whitespace().nth(1).unwrap().to_string();
    let dir = work.path().join("saved");
    let tar = work.path().join("saved.tar");
    h.ok(&[
        "image",
        "save",
        "example.com/me/app:7",
        "-o",
        dir.to_str().unwrap(),
    ]);
    h.ok(&[
        "image",
        "save",
        "example.com/me/app:7",
        "-o",
        tar.to_str().unwrap(),
    ]);
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:7", dir.display())]);
    assert_eq!(format!("sha256:{}", sha256_hex(raw.as_bytes())), digest);
    let fresh = Hangar::new();
    let out = fresh.ok(&["image", "load", tar.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("example.com/me/app:7 {digest}"));
    fresh.ok(&[
        "image",
        "load",
        dir.to_str().unwrap(),
        "--tag",
        "other/name:1",
    ]);
    assert_eq!(fresh.inspect("other/name:1")["digest"], digest);
    // A layout skopeo wrote (tag only, no full name) needs --tag.
    let sk = work.path().join("sk");
    skopeo(&[
        "copy",
        &format!("oci:{}:7", dir.display()),
        &format!("oci:{}:latest", sk.display()),
    ]);
    let err = fresh.fails(&["image", "load", sk.to_str().unwrap()]);
    assert!(err.contains("--tag"), "{err}");
    fresh.ok(&["image", "load", sk.to_str().unwrap(), "-t", "sk/img"]);
    assert_eq!(fresh.inspect("sk/img")["digest"], digest);
    // rm then gc frees the blobs.
    fresh.ok(&["image", "rm", "example.com/me/app:7", "other/name:1"]);
    let gc = fresh.ok(&["image", "gc"]);
    assert!(gc.starts_with("removed 0 blobs"), "{gc}");
    fresh.ok(&["image", "rm", "sk/img"]);
    let gc = fresh.ok(&["image", "gc"]);
    assert!(gc.starts_with("removed 3 blobs"), "{gc}");
}

#[test]
fn bad_input_names_the_cause_and_leaves_the_store_unchanged() {
    let server = FaultServer::start();
    let good = BuiltImage::new(
        &[(
            layer_tar(&[Entry::File("f", 0o644, vec![7; 300_000])]),
            Compress::Gzip,
        )],
        host_arch(),
        &["/f"],
    );
    let h = Hangar::new();
    // Something in the store first, so "unchanged" means more than "empty".
    server.serve_image("ok/img", "1", &good);
    h.ok(&["image", "pull", &format!("{}/ok/img:1", server.host())]);
    let before = h.store_snapshot();

    let err = h.fails(&["image", "pull", "Not/A:ref:at:all"]);
    assert!(
        err.starts_with("hangar: invalid image reference \"Not/A:ref:at:all\""),
        "{err}"
    );

    let json_ct = vec![(
        "Content-Type".to_string(),
        "application/vnd.oci.image.manifest.v1+json".to_string(),
    )];
    server.set(
        "/v2/bad/json/manifests/1",
        Fault::Answer(200, json_ct.clone(), b"{not json".to_vec()),
    );
    let err = h.fails(&["image", "pull", &format!("{}/bad/json:1", server.host())]);
    assert!(
        err.contains("manifest") && err.contains("not JSON"),
        "{err}"
    );

    // A blob whose bytes are not what its digest says (an image the store
    // does not have yet, so the layer is really fetched).
    let other = BuiltImage::new(
        &[(
            layer_tar(&[Entry::File("o", 0o644, vec![9; 300_000])]),
            Compress::Gzip,
        )],
        host_arch(),
        &["/o"],
    );
    let other_hex = sha256_hex(&other.layers[0].0);
    let mut lying = other.layers[0].0.clone();
    let last = lying.len() - 10;
    lying[last] ^= 0xff;
    server.serve_image("bad/digest", "1", &other);
    server.set(
        &format!("/v2/bad/digest/blobs/sha256:{other_hex}"),
        Fault::Answer(200, vec![], lying),
    );
    let err = h.fails(&["image", "pull", &format!("{}/bad/digest:1", server.host())]);
    assert!(
        err.contains(&format!("sha256:{other_hex}")) && err.contains("hashes to"),
        "{err}"
    );

    // An uncompressed layer whose digest is not the config's DiffID is
    // refused at pull; a compressed one when it is unpacked (where it is
    // decompressed anyway), and the target directory is not created.
    let tar = layer_tar(&[Entry::File("g", 0o644, b"g".to_vec())]);
    let not_it = Some(vec![format!("sha256:{}", sha256_hex(b"other"))]);
    let plain = BuiltImage::with_diff_ids(
        &[(tar.clone(), Compress::None)],
        host_arch(),
        &["/g"],
        not_it.clone(),
    );
    server.serve_image("bad/plaindiff", "1", &plain);
    let err = h.fails(&[
        "image",
        "pull",
        &format!("{}/bad/plaindiff:1", server.host()),
    ]);
    assert!(err.contains("DiffID"), "{err}");
    assert_eq!(h.store_snapshot(), before);
    let gz = BuiltImage::with_diff_ids(&[(tar, Compress::Gzip)], host_arch(), &["/g"], not_it);
    server.serve_image("bad/diff", "1", &gz);
    let lying = format!("{}/bad/diff:1", server.host());
    h.ok(&["image", "pull", &lying]);
    let target = h.dir.path().join("never");
    let err = h.fails(&["image", "unpack", &lying, target.to_str().unwrap()]);
    assert!(
        err.contains("DiffID") || err.contains("config says"),
        "{err}"
    );
    assert!(!target.exists());
    assert_eq!(
        fs::read_dir(h.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("never"))
            .count(),
        0
    );
    h.ok(&["image", "rm", &lying]);
    h.ok(&["image", "gc"]);
    assert_eq!(h.store_snapshot(), before);

    for (status, word) in [(404u16, "404"), (500, "500")] {
        let repo = format!("status/s{status}");
        server.set(
            &format!("/v2/{repo}/manifests/1"),
            Fault::Answer(
                status,
                vec![],
                b"{\"errors\":[{\"code\":\"X\",\"message\":\"boom\"}]}".to_vec(),
            ),
        );
        let err = h.fails(&["image", "pull", &format!("{}/{repo}:1", server.host())]);
        assert!(
            err.contains(word)
                && err.contains(&format!("/v2/{repo}/manifests/1"))
                && err.contains("boom"),
            "{err}"
        );
    }
    // 500 on a blob, after the manifest and config were fine.
    server.serve_image("status/blob", "1", &other);
    server.set(
        &format!("/v2/status/blob/blobs/sha256:{other_hex}"),
        Fault::Answer(500, vec![], vec![]),
    );
    let err = h.fails(&["image", "pull", &format!("{}/status/blob:1", server.host())]);
    assert!(err.contains("500") && err.contains(&other_hex), "{err}");

    // The connection is cut halfway through a layer.
    server.serve_image("cut/img", "1", &other);
    let blob = &other.layers[0].0;
    server.set(
        &format!("/v2/cut/img/blobs/sha256:{other_hex}"),
        Fault::Cut(blob.len() as u64, blob[..blob.len() / 2].to_vec()),
    );
    let err = h.fails(&["image", "pull", &format!("{}/cut/img:1", server.host())]);
    assert!(err.contains(&other_hex), "{err}");

    // Nothing listens.
    let dead = free_port();
    let err = h.fails(&["image", "pull", &format!("127.0.0.1:{dead}/x/y:1")]);
    assert!(
        err.contains(&format!("http://127.0.0.1:{dead}/v2/x/y/manifests/1")),
        "{err}"
    );

    for err in [
        h.fails(&["image", "inspect", "nothing/here"]),
        h.fails(&["image", "unpack", "nothing/here", "/tmp/never"]),
        h.fails(&["image", "rm", "nothing/here"]),
    ] {
        assert!(
            err.contains("is not in the local store") && err.contains("hangar image pull"),
            "{err}"
        );
    }
    assert_eq!(h.store_snapshot(), before);
    assert_eq!(err.lines().count(), 1, "errors are one line: {err}");

    // A stored layer damaged on disk is caught when it is unpacked.
    let ok_ref = format!("{}/ok/img:1", server.host());
    let layer = h.inspect(&ok_ref)["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob_path = h.home().join("oci/blobs/sha256").join(&layer);
    let mut bytes = fs::read(&blob_path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob_path, bytes).unwrap();
    let target = h.dir.path().join("damaged");
    let err = h.fails(&["image", "unpack", &ok_ref, target.to_str().unwrap()]);
    assert!(
        err.contains(&layer) && (err.contains("decompress") || err.contains("DiffID")),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn kill_during_pull_leaves_nothing_visible_and_concurrent_pulls_are_safe() {
    let server = FaultServer::start();
    let big: Vec<u8> = (0..2_000_000u32)
        .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
        .collect();
    let image = BuiltImage::new(
        &[(layer_tar(&[Entry::File("big", 0o644, big)]), Compress::None)],
        host_arch(),
        &["/big"],
    );
    let layer = image.layers[0].0.clone();
    let layer_hex = sha256_hex(&layer);
    server.serve_image("slow/img", "1", &image);
    server.set(
        &format!("/v2/slow/img/blobs/sha256:{layer_hex}"),
        Fault::Slow(layer.clone(), 64 * 1024),
    );
    let h = Hangar::new();
    let reference = format!("{}/slow/img:1", server.host());
    let mut child = h.command(&["image", "pull", &reference]).spawn().unwrap();
    // Wait until the layer is partly written, then kill -9.
    let tmp = h.home().join("oci/tmp");
    wait_for_partial_file(
        &tmp,
        100_000,
        Duration::from_secs(30),
        "the pull to start writing",
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !h.home()
            .join(format!("oci/blobs/sha256/{layer_hex}"))
            .exists(),
        "a partial blob became visible"
    );
    assert!(
        fs::read_dir(h.home().join("oci/images"))
            .unwrap()
            .next()
            .is_none(),
        "an image record appeared"
    );
    assert!(h
        .fails(&["image", "inspect", &reference])
        .contains("not in the local store"));
    let gc = h.ok(&["image", "gc"]);
    assert!(
        !gc.contains("freed 0 B"),
        "gc should clear the partial temp file: {gc}"
    );
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);

    // Two pulls of the same image at once both succeed and agree.
    server.set(
        &format!("/v2/slow/img/blobs/sha256:{layer_hex}"),
        Fault::Slow(layer, 512 * 1024),
    );
    let a = h.command(&["image", "pull", &reference]).output().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| h.command(&["image", "pull", &reference]).spawn().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert!(a.status.success());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("root");
    h.ok(&["image", "unpack", &reference, out.to_str().unwrap()]);
    assert_eq!(fs::metadata(out.join("big")).unwrap().len(), 8_000_000);
}
