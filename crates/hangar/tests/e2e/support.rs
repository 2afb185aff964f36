//! Shared helpers of the end-to-end tests: the real `hangar` binary (in a
//! network namespace when asked), real peers (docker-registry, skopeo, umoci,
//! openssl) on 127.0.0.1, `hangar registry serve`, a tiny HTTP client, test
//! images written as OCI layouts, and a small HTTP server for faults no real
//! registry produces on demand.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::Digest as _;

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Fail loudly when a peer the tests need is missing: a skipped peer would
/// make a test that cannot fail.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run scripts/test, which installs the test peers"
    );
}

/// A temporary `$HANGAR_HOME` and the means to run `hangar` against it.
pub struct Hangar {
    pub dir: tempfile::TempDir,
    pub docker_config: PathBuf,
    /// Run every command inside this network namespace.
    pub netns: Option<String>,
}

impl Hangar {
    pub fn new() -> Hangar {
        let dir = tempfile::tempdir().expect("tempdir");
        let docker_config = dir.path().join("docker-config");
        fs::create_dir(&docker_config).expect("docker config dir");
        Hangar {
            dir,
            docker_config,
            netns: None,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            // nsenter, not `ip netns exec`: that remounts /sys, which hides
            // the cgroup mounts runc needs.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_hangar"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hangar")),
        };
        c.args(args)
            .env("HANGAR_HOME", self.home())
            .env("DOCKER_CONFIG", &self.docker_config)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run hangar")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hangar {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "hangar {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn inspect(&self, reference: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["image", "inspect", reference, "--json"]))
            .expect("inspect json")
    }

    /// Every file under the store with its size: to show a failure changed nothing.
    pub fn store_snapshot(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let root = self.home();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let m = fs::symlink_metadata(&p).expect("metadata");
                let rel = p
                    .strip_prefix(&root)
                    .expect("under root")
                    .display()
                    .to_string();
                if m.is_dir() {
                    stack.push(p);
                } else if rel != "oci/lock" {
                    out.insert(rel, m.len());
                }
            }
        }
        out
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "peer exited with {status}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "peer did not listen on {port}: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// How a test registry authenticates.
pub enum RegistryAuth {
    None,
    /// htpasswd basic auth for this user and password.
    Basic(&'static str, &'static str),
    /// The bearer token flow, served by a [`TokenServer`].
    Token(Arc<TokenServer>),
}

/// Debian's `docker-registry` (distribution 2.8) on a free loopback port.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Registry {
    pub fn start(auth: RegistryAuth) -> Registry {
        require("docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic(user, pass) => {
                let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output().expect("htpasswd (apache2-utils)");
                assert!(out.status.success());
                let file = dir.path().join("htpasswd");
                fs::write(&file, &out.stdout).expect("write htpasswd");
                format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", file.display())
            }
            RegistryAuth::Token(t) => format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                t.port,
                t.cert.display()
            ),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write config");
        let log = dir.path().join("registry.log");
        let log_file = fs::File::create(&log).expect("log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry");
        wait_for_port(port, &mut child, &log);
        Registry {
            child,
            port,
            dir,
            log,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of a blob's data in the registry's storage.
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run skopeo against a loopback registry without TLS.
pub fn skopeo(args: &[&str]) -> String {
    require("skopeo");
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed certificate for `name` (CN and DNS name) and its key,
/// written by openssl into `dir`: (cert.pem, key.pem).
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    require("openssl");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A token endpoint for the registry's bearer flow: checks basic auth for
/// one user, then signs an RS256 JWT (with openssl) granting what was asked.
pub struct TokenServer {
    pub port: u16,
    pub cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
    /// Every query string the endpoint was asked.
    pub requests: Mutex<Vec<String>>,
    user: String,
    password: String,
}

impl TokenServer {
    pub fn start(user: &str, password: &str) -> Arc<TokenServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path(), "hangar-test-token");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = Arc::new(TokenServer {
            port,
            cert,
            key,
            dir,
            requests: Mutex::new(Vec::new()),
            user: user.into(),
            password: password.into(),
        });
        let s = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || s.serve(stream));
            }
        });
        server
    }

    fn serve(&self, mut stream: TcpStream) {
        let Some(req) = read_request(&mut stream) else {
            return;
        };
        let query = req
            .target
            .split_once('?')
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
        self.requests.lock().expect("lock").push(query.clone());
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.user, self.password))
        );
        if req.headers.get("authorization") != Some(&expected) {
            respond(&mut stream, 401, &[], b"{\"details\":\"bad credentials\"}");
            return;
        }
        let mut access = Vec::new();
        for pair in query.split('&') {
            if let Some(scope) = pair.strip_prefix("scope=") {
                let scope = percent_decode(scope);
                let parts: Vec<&str> = scope.splitn(3, ':').collect();
                if parts.len() == 3 {
                    let actions: Vec<&str> = parts[2].split(',').collect();
                    access.push(
                        serde_json::json!({"type": parts[0], "name": parts[1], "actions": actions}),
                    );
                }
            }
        }
        let token = self.sign(&access);
        respond(
            &mut stream,
            200,
            &[("Content-Type", "application/json")],
            serde_json::json!({"token": token}).to_string().as_bytes(),
        );
    }

    fn sign(&self, access: &[serde_json::Value]) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let pem = fs::read_to_string(&self.cert).expect("cert");
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der]});
        let claims = serde_json::json!({
            "iss": "test-issuer", "sub": self.user, "aud": "test-registry",
            "exp": now + 600, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-binary", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl dgst");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("sign");
        format!("{input}.{}", b64(&out.stdout))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: BTreeMap<String, String>,
}

pub fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<u64>().ok())
    {
        let mut body = Vec::new();
        reader.take(len).read_to_end(&mut body).ok()?;
    }
    Some(Request {
        method,
        target,
        headers,
    })
}

pub fn respond(stream: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

/// What the fault server answers for one path.
#[derive(Clone)]
pub enum Fault {
    /// A whole answer.
    Answer(u16, Vec<(String, String)>, Vec<u8>),
    /// Promise `len` bytes, send `body`, then close the connection.
    Cut(u64, Vec<u8>),
    /// Send `body` slowly, `chunk` bytes every 50 ms.
    Slow(Vec<u8>, usize),
}

/// A registry imitation that serves fixed answers by path, for faults.
pub struct FaultServer {
    pub port: u16,
    routes: Arc<Mutex<BTreeMap<String, Fault>>>,
}

impl FaultServer {
    pub fn start() -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let routes: Arc<Mutex<BTreeMap<String, Fault>>> = Arc::new(Mutex::new(BTreeMap::new()));
        let r = routes.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let Some(req) = read_request(&mut stream) else {
                        return;
                    };
                    let path = req.target.split('?').next().unwrap_or("").to_string();
                    let fault = r.lock().expect("lock").get(&path).cloned();
                    match fault {
                        Some(Fault::Answer(status, headers, body)) => {
                            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                            let body = if req.method == "HEAD" { Vec::new() } else { body };
                            respond(&mut stream, status, &h, &body);
                        }
                        Some(Fault::Cut(len, body)) => {
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                            let _ = stream.write_all(head.as_bytes());
                            let _ = stream.write_all(&body);
                            let _ = stream.flush();
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                        }
                        Some(Fault::Slow(body, chunk)) => {
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                            let _ = stream.write_all(head.as_bytes());
                            for c in body.chunks(chunk) {
                                if stream.write_all(c).is_err() {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                        None => respond(&mut stream, 404, &[("Content-Type", "application/json")], br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#),
                    }
                });
            }
        });
        FaultServer { port, routes }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set(&self, path: &str, fault: Fault) {
        self.routes
            .lock()
            .expect("lock")
            .insert(path.to_string(), fault);
    }

    /// Serve a whole test image under `repo`: manifest by tag and digest, and blobs.
    pub fn serve_image(&self, repo: &str, tag: &str, image: &BuiltImage) {
        let ct = vec![(
            "Content-Type".to_string(),
            "application/vnd.oci.image.manifest.v1+json".to_string(),
        )];
        self.set(
            &format!("/v2/{repo}/manifests/{tag}"),
            Fault::Answer(200, ct.clone(), image.manifest.clone()),
        );
        self.set(
            &format!("/v2/{repo}/manifests/sha256:{}", image.manifest_hex()),
            Fault::Answer(200, ct, image.manifest.clone()),
        );
        for blob in image.blobs() {
            self.set(
                &format!("/v2/{repo}/blobs/sha256:{}", sha256_hex(&blob)),
                Fault::Answer(200, vec![], blob),
            );
        }
    }
}

/// One entry of a test layer.
#[derive(Clone)]
pub enum Entry {
    Dir(&'static str, u32),
    File(&'static str, u32, Vec<u8>),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    /// A whiteout or opaque marker is just an empty file with a special name.
    Whiteout(&'static str),
    /// A file with an owner other than root.
    Owned(&'static str, u64, u64),
    /// A character device (major, minor).
    CharDevice(&'static str, u32, u32),
    Fifo(&'static str),
}

#[derive(Clone, Copy, PartialEq)]
pub enum Compress {
    Gzip,
    Zstd,
    None,
}

/// Tar bytes for a layer.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        match e {
            Entry::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("dir");
            }
            Entry::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).expect("file");
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("symlink");
            }
            Entry::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("hardlink");
            }
            Entry::Owned(p, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o640);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(5);
                b.append_data(&mut h, p, &b"owned"[..]).expect("owned");
            }
            Entry::CharDevice(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*major).expect("major");
                h.set_device_minor(*minor).expect("minor");
                b.append_data(&mut h, p, std::io::empty()).expect("device");
            }
            Entry::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o640);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("fifo");
            }
            Entry::Whiteout(p) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty())
                    .expect("whiteout");
            }
        }
    }
    b.into_inner().expect("tar")
}

pub fn compress(tar: &[u8], how: Compress) -> Vec<u8> {
    match how {
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            e.finish().expect("gzip")
        }
        Compress::Zstd => zstd::encode_all(tar, 3).expect("zstd"),
        Compress::None => tar.to_vec(),
    }
}

/// A test image: its blobs and manifest, ready to serve or write as a layout.
pub struct BuiltImage {
    pub layers: Vec<(Vec<u8>, Compress)>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl BuiltImage {
    pub fn new(layers: &[(Vec<u8>, Compress)], arch: &str, cmd: &[&str]) -> BuiltImage {
        Self::with_diff_ids(layers, arch, cmd, None)
    }

    /// `diff_ids` overrides the real DiffIDs (to make a lying image).
    pub fn with_diff_ids(
        layers: &[(Vec<u8>, Compress)],
        arch: &str,
        cmd: &[&str],
        diff_ids: Option<Vec<String>>,
    ) -> BuiltImage {
        let blobs: Vec<(Vec<u8>, Compress)> = layers
            .iter()
            .map(|(tar, c)| (compress(tar, *c), *c))
            .collect();
        let diff_ids = diff_ids.unwrap_or_else(|| {
            layers
                .iter()
                .map(|(tar, _)| format!("sha256:{}", sha256_hex(tar)))
                .collect()
        });
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string()
        .into_bytes();
        let media = |c: Compress| match c {
            Compress::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compress::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compress::None => "application/vnd.oci.image.layer.v1.tar",
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
            "layers": blobs.iter().map(|(b, c)| serde_json::json!({"mediaType": media(*c), "digest": format!("sha256:{}", sha256_hex(b)), "size": b.len()})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        BuiltImage {
            layers: blobs,
            config,
            manifest,
        }
    }

    pub fn manifest_hex(&self) -> String {
        sha256_hex(&self.manifest)
    }

    pub fn blobs(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.layers.iter().map(|(b, _)| b.clone()).collect();
        v.push(self.config.clone());
        v
    }

    /// Write as an OCI layout holding this image under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        write_layout(dir, &[(self, tag)], None);
    }
}

/// Write an OCI layout with several images; with `index_tag`, they are
/// wrapped in one multi-platform index under that tag instead.
pub fn write_layout(dir: &Path, images: &[(&BuiltImage, &str)], index_tag: Option<&str>) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("layout dir");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let mut descs = Vec::new();
    for (image, tag) in images {
        for b in image.blobs().into_iter().chain([image.manifest.clone()]) {
            fs::write(blobs.join(sha256_hex(&b)), &b).expect("blob");
        }
        let config: serde_json::Value = serde_json::from_slice(&image.config).expect("config");
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", image.manifest_hex()),
            "size": image.manifest.len(),
            "platform": {"os": "linux", "architecture": config["architecture"]},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }
    let manifests = match index_tag {
        None => descs,
        Some(tag) => {
            let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs}).to_string().into_bytes();
            fs::write(blobs.join(sha256_hex(&nested)), &nested).expect("index blob");
            vec![serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{}", sha256_hex(&nested)),
                "size": nested.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })]
        }
    };
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
}

/// One node of a directory tree, as the comparison with umoci sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: String,
    pub mtime: i64,
    /// For files with several links: the first path (sorted) of the inode.
    pub link_group: Option<String>,
}

/// Walk `root` into path -> node, excluding the root itself.
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let m = fs::symlink_metadata(&p).expect("metadata");
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    fs::read_link(&p).expect("readlink").display().to_string(),
                )
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
                ("file", sha256_hex(&fs::read(&p).expect("read")))
            } else if ft.is_char_device() {
                (
                    "char",
                    format!("{}:{}", rdev_major(m.rdev()), rdev_minor(m.rdev())),
                )
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else {
                ("other", String::new())
            };
            out.insert(
                rel,
                Node {
                    kind,
                    mode: m.permissions().mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    content,
                    mtime: m.mtime(),
                    link_group: None,
                },
            );
        }
    }
    for paths in inodes.values() {
        let mut sorted = paths.clone();
        sorted.sort();
        for p in paths {
            if let Some(n) = out.get_mut(p) {
                n.link_group = Some(sorted[0].clone());
            }
        }
    }
    out
}

fn rdev_major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

fn rdev_minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// A parsed HTTP response from [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The first spec error code in the body, or "".
    pub fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// One HTTP/1.1 request to `host` (host:port on loopback), connection closed after.
pub fn http(
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(host).expect("connect");
    // A Host among `headers` replaces the address.
    let host_line = if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        String::new()
    } else {
        format!("Host: {host}\r\n")
    };
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\n{host_line}Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    // One write: a server that answers before reading the body (a refusal)
    // then finds nothing unread, and the answer is not reset away.
    let mut all = req.into_bytes();
    all.extend_from_slice(body);
    stream.write_all(&all).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// `hangar registry serve` on a free port, killed on drop.
pub struct HangarRegistry {
    child: Child,
    pub host: String,
    pub admin: String,
    /// Its scheme: http, or https with --tls-cert.
    pub scheme: String,
    /// What it printed on stderr after starting (the access log).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl HangarRegistry {
    pub fn start(h: &Hangar, extra: &[&str]) -> HangarRegistry {
        let mut args = vec![
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = h
            .command(&args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hangar registry");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut host = String::new();
        let mut admin = String::new();
        let mut scheme = String::new();
        while host.is_empty() || admin.is_empty() {
            let line = lines
                .next()
                .expect("registry exited early")
                .expect("read stderr");
            if let Some((_, rest)) = line.split_once("registry serving ") {
                let (s, rest) = rest.split_once("://").unwrap_or(("http", rest));
                scheme = s.to_string();
                host = rest.split_whitespace().next().unwrap_or("").to_string();
            } else if let Some((_, rest)) = line.split_once("registry metrics on http://") {
                admin = rest.trim_end_matches("/metrics").to_string();
            }
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        HangarRegistry {
            child,
            host,
            admin,
            scheme,
            log,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HangarRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The host's architecture in Go's naming, as image configs use.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// Wait until some file directly in `dir` is larger than `min_bytes`: a
/// transfer is under way, so a kill now lands in the middle of it.
pub fn wait_for_partial_file(dir: &Path, min_bytes: u64, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let partial = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > min_bytes).unwrap_or(false))
            })
            .unwrap_or(false);
        if partial {
            return;
        }
        assert!(Instant::now() < deadline, "waited in vain for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
