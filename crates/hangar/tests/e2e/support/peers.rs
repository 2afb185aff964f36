//! Real peers and fake ones: docker-registry, skopeo, openssl certificates,
//! a token server for the bearer flow, and a server of faults no real
//! registry produces on demand.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;

use super::harness::{free_port, require, sha256_hex, wait_for_port};
use super::http::{percent_decode, read_request, respond};
use super::images::BuiltImage;

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
