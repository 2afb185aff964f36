//! Tenant isolation on one node, tried as a hostile second org would (as
//! root, on a real node): org `evil` holds its own token and its own app and
//! goes after org `acme`'s images, machines and network.

use std::fs;

use serde_json::{json, Value};

use crate::machine::{busybox_image, Node};
use crate::support::*;

/// The node's API and registry addresses, from its config.toml.
fn node_addresses(node: &Node) -> (String, String) {
    let text = fs::read_to_string(node.h.home().join("config.toml")).unwrap();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap()
    };
    (
        get("api").trim_start_matches("http://").to_string(),
        get("registry"),
    )
}

/// An org's view of the node: its token and the API's address.
struct Org {
    name: &'static str,
    token: String,
    api: String,
}

impl Org {
    fn new(node: &Node, name: &'static str) -> Org {
        let token = node
            .h
            .ok(&["auth", "token", "create", "--org", name])
            .trim()
            .to_string();
        Org {
            name,
            token,
            api: node_addresses(node).0,
        }
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> HttpResponse {
        let auth = format!("Bearer {}", self.token);
        http(
            method,
            &self.api,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// Create a machine of `app` running `image` (a long sleep).
    fn create(&self, app: &str, image: &str) -> HttpResponse {
        self.call(
            "POST",
            "/v1/machines",
            &json!({"config": {"image": image, "metadata": {"app": app},
                    "init": {"cmd": ["sleep", "3600"]}}}),
        )
    }
}

/// An error body with the image reference taken out, to compare refusals.
fn refusal(r: &HttpResponse, image: &str) -> (u16, String) {
    let text = r.json()["error"]
        .as_str()
        .unwrap_or("")
        .replace(image, "<image>");
    (r.status, text)
}

#[test]
fn an_org_runs_only_images_it_may_pull_and_learns_nothing_of_others() {
    let node = Node::start();
    let (api, registry) = node_addresses(&node);
    let acme = Org::new(&node, "acme");
    let evil = Org::new(&node, "evil");
    for (org, app) in [(&acme, "acme-app"), (&evil, "evil-app")] {
        let r = org.call("POST", "/v1/apps", &json!({"name": app}));
        assert_eq!(
            r.status,
            200,
            "{}: {}",
            org.name,
            String::from_utf8_lossy(&r.body)
        );
    }

    // acme's private image carries a secret; acme pushes it, and a second
    // image it makes public; evil pushes its own.
    let base = busybox_image(&node.h);
    let dir = node.h.dir.path().join("secret-image");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("secret.txt"), "acme's secret\n").unwrap();
    node.h.ok(&[
        "image",
        "build",
        dir.to_str().unwrap(),
        "-t",
        "localhost/secret:test",
        "--base",
        &base,
    ]);
    let push = |src: &str, dest: &str, org: &Org| {
        node.h.ok(&[
            "image",
            "push",
            src,
            dest,
            "--creds",
            &format!("{}:{}", org.name, org.token),
        ]);
    };
    let private = format!("{registry}/acme/private:v1");
    let shared = format!("{registry}/acme/shared:v1");
    let own = format!("{registry}/evil/mine:v1");
    push("localhost/secret:test", &private, &acme);
    push(&base, &shared, &acme);
    push(&base, &own, &evil);
    node.h.ok(&["registry", "public", "acme/shared"]);
    let secret_digest = node.h.inspect("localhost/secret:test")["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // acme runs its private image: the node now holds it in its store.
    let r = acme.create("acme-app", &private);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let acme_machine = r.json()["id"].as_str().unwrap().to_string();

    // evil's attempts at acme's image, by every name for it, and at things
    // that are not images at all: each is the same refusal as an image that
    // does not exist.
    let port = registry.rsplit_once(':').unwrap().1;
    let closed = free_port();
    let attempts = [
        private.clone(),
        format!("localhost:{port}/acme/private:v1"),
        format!("[::1]:{port}/acme/private:v1"),
        format!("{registry}/acme/private@{secret_digest}"),
        // The digest under evil's own name: the store holds it, under acme's.
        format!("{registry}/evil/mine@{secret_digest}"),
        // Images the node built or pulled for the operator.
        "localhost/secret:test".to_string(),
        base.clone(),
        // The node's own services and a closed port, as registries.
        format!("{api}/acme/private:v1"),
        format!("{}/x/y:1", node.edge),
        format!("127.0.0.1:{closed}/x/y:1"),
        format!("localhost:{closed}/x/y:1"),
        format!("0x7f000001:{closed}/x/y:1"),
    ];
    let missing = format!("{registry}/acme/nothing:v1");
    let expected = refusal(&evil.create("evil-app", &missing), &missing);
    assert_eq!(expected.0, 400, "{expected:?}");
    assert!(expected.1.contains("not found"), "{expected:?}");
    for image in &attempts {
        let r = evil.create("evil-app", image);
        assert_eq!(refusal(&r, image), expected, "create with {image}");
    }

    // evil's own image and acme's public one run.
    let r = evil.create("evil-app", &own);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let evil_machine = r.json()["id"].as_str().unwrap().to_string();
    let r = evil.create("evil-app", &shared);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Update and deploy refuse alike.
    for image in [
        &private,
        &format!("{registry}/acme/private@{secret_digest}"),
    ] {
        let r = evil.call(
            "POST",
            &format!("/v1/machines/{evil_machine}"),
            &json!({"config": {"image": image, "metadata": {"app": "evil-app"}}}),
        );
        assert_eq!(refusal(&r, image), expected, "update to {image}");
        let r = evil.call(
            "POST",
            "/v1/apps/evil-app/deploy",
            &json!({"image": image, "config": {"image": image}}),
        );
        assert_eq!(refusal(&r, image), expected, "deploy of {image}");
    }
    // Nor does evil reach acme's machine to exec in it.
    let r = evil.call(
        "POST",
        &format!("/v1/machines/{acme_machine}/exec"),
        &json!({"cmd": ["cat", "/secret.txt"]}),
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert!(!String::from_utf8_lossy(&r.body).contains("secret"));
    // And no machine of evil's runs acme's private image.
    let list = evil.call("GET", "/v1/machines", &json!({})).json();
    for m in list.as_array().unwrap() {
        let image = m["config"]["image"].as_str().unwrap_or("");
        assert!(!image.contains("acme/private"), "{m}");
        let (code, out) = node.exec(m["id"].as_str().unwrap(), &["cat", "/secret.txt"]);
        assert_ne!(code, 0, "{out}");
    }
    // acme still runs its own, and reads its secret.
    let (code, out) = node.exec(&acme_machine, &["cat", "/secret.txt"]);
    assert_eq!((code, out.as_str()), (0, "acme's secret\n"));
}
