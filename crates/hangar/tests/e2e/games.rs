//! The example game system (`examples/games`) deployed with `hangar
//! deploy` on three machines of one node, which find each other as
//! `games.internal`: played in Chromium by two players and a spectator
//! through the edge, with the owner machine killed (`kill -9`) mid-game;
//! and over the API: concurrent moves while the owner dies (one wins, once),
//! ownership moving as a machine joins and leaves (no game lost or
//! doubled), a hostile org kept out, the pages' forms without a script,
//! an idle game ending and freeing its code, and two models of the arena
//! playing on the app while a spectator watches in Chromium.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::machine::Node;
use crate::support::browser::Browser;
use crate::support::*;

const HOST: &str = "games.localhost";

/// The static game server, built once per test run (scripts/games-server).
fn server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(root.join("scripts/games-server"))
            .output()
            .expect("run scripts/games-server");
        assert!(
            out.status.success(),
            "scripts/games-server failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The example app in the test's directory, with `env` added to [env].
fn games_app(node: &Node, env: &[(&str, &str)]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/games");
    let dir = node.h.dir.path().join("games");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy(server_binary(), dir.join("bin/hangar-games")).unwrap();
    fs::copy(src.join(".hangarignore"), dir.join(".hangarignore")).unwrap();
    let mut toml = fs::read_to_string(src.join("hangar.toml")).unwrap();
    toml = toml.replace("interval = \"2s\"", "interval = \"300ms\"");
    for (k, v) in env {
        let kept: Vec<&str> = toml
            .lines()
            .filter(|l| !l.starts_with(&format!("{k} = ")))
            .collect();
        toml = kept
            .join("\n")
            .replace("[env]", &format!("[env]\n{k} = \"{v}\""));
    }
    fs::write(dir.join("hangar.toml"), toml).unwrap();
    dir
}

fn hangar_in(node: &Node, dir: &Path, args: &[&str]) -> String {
    let out = node.h.command(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "hangar {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Launch and deploy the games on `count` machines; wait until each sees
/// all of them as peers. The machines' ids.
fn deploy(node: &Node, dir: &Path, count: usize) -> Vec<String> {
    hangar_in(node, dir, &["launch"]);
    let out = hangar_in(node, dir, &["deploy", "--count", &count.to_string()]);
    assert!(out.contains("is complete"), "{out}");
    let ids = started_machines(node, dir);
    assert_eq!(ids.len(), count, "{ids:?}");
    wait_for_peers(node, &ids);
    ids
}

fn started_machines(node: &Node, dir: &Path) -> Vec<String> {
    let v: Value = serde_json::from_str(&hangar_in(node, dir, &["status", "--json"])).unwrap();
    v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "started")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every machine of `ids` sees exactly `ids.len()` peers.
fn wait_for_peers(node: &Node, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in ids {
        loop {
            let r = api(node, "GET", "/api/status", None, None, Some(id));
            let n = r.json()["peers"].as_array().map_or(0, Vec::len);
            if r.status == 200 && n == ids.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "machine {id} sees {n} peers of {}: {}",
                ids.len(),
                String::from_utf8_lossy(&r.body)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A request through the edge (to machine `on`, when given).
fn api(
    node: &Node,
    method: &str,
    path: &str,
    player: Option<&str>,
    body: Option<Value>,
    on: Option<&str>,
) -> HttpResponse {
    let auth = player.map(|p| format!("Bearer {p}"));
    let mut headers = vec![("Host", HOST), ("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    if let Some(id) = on {
        headers.push(("hangar-force-instance-id", id));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http(method, &node.edge, path, &headers, body.as_bytes())
}

/// `player`'s move `mv` as the `n`th of `code`, through the edge.
fn post_move(node: &Node, code: &str, player: &str, mv: &str, n: usize) -> HttpResponse {
    api(
        node,
        "POST",
        &format!("/api/games/{code}/moves"),
        Some(player),
        Some(json!({"move": mv, "n": n})),
        None,
    )
}

/// A new game and its two players' identities.
fn new_game(node: &Node, kind: &str) -> (String, String, String) {
    let r = api(
        node,
        "POST",
        "/api/games",
        None,
        Some(json!({"kind": kind, "name": "Ada"})),
        None,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let code = r.json()["code"].as_str().unwrap().to_string();
    let a = r.json()["player"].as_str().unwrap().to_string();
    let r = api(
        node,
        "POST",
        &format!("/api/games/{code}/join"),
        None,
        Some(json!({"name": "Bob"})),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let b = r.json()["player"].as_str().unwrap().to_string();
    (code, a, b)
}

fn state(node: &Node, code: &str) -> Value {
    let r = api(node, "GET", &format!("/api/games/{code}"), None, None, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// The pids of the game server serving as `private_ip` (its peer
/// address's host) and of its machine's init: found by the environment
/// Hangar gave the server.
fn server_of(owner: &str) -> (i32, i32, String) {
    let ip = owner
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or(owner);
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains("hangar-games") {
            continue;
        }
        let env = fs::read(entry.path().join("environ")).unwrap_or_default();
        let vars: Vec<String> = env
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if !vars.iter().any(|v| *v == format!("HANGAR_PRIVATE_IP={ip}")) {
            continue;
        }
        let id = vars
            .iter()
            .find_map(|v| v.strip_prefix("HANGAR_MACHINE_ID="))
            .unwrap()
            .to_string();
        let status = fs::read_to_string(entry.path().join("status")).unwrap();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        return (pid, ppid, id);
    }
    panic!("no game server process serves as {owner}");
}

/// The output of shell `script` (which ends with `echo end`) in a machine
/// of a new app `app` of `org` (busybox), destroyed after.
fn probe_from(node: &Node, org: &str, app: &str, script: &str) -> String {
    let path = node.h.dir.path().join(app);
    fs::create_dir_all(&path).unwrap();
    node.h.ok(&[
        "launch",
        "--image",
        "localhost/busybox:test",
        "--name",
        app,
        "--org",
        org,
        "--path",
        path.to_str().unwrap(),
    ]);
    let id = node
        .h
        .ok(&[
            "machine",
            "run",
            "localhost/busybox:test",
            "--app",
            app,
            "--",
            "sleep",
            "600",
        ])
        .trim()
        .to_string();
    // An exec that fails as a whole, or whose output lacks the script's
    // last line, is tried again, then reported with its stderr: CI once
    // saw one come back empty with no word why.
    let mut errors = Vec::new();
    let mut text = None;
    for _ in 0..4 {
        let out = node
            .h
            .run(&["machine", "exec", &id, "--", "/bin/sh", "-c", script]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && stdout.contains("end") {
            text = Some(stdout);
            break;
        }
        errors.push(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    node.h.ok(&["machine", "destroy", &id, "--force"]);
    text.unwrap_or_else(|| panic!("machine exec in {org}/{app} failed every time: {errors:#?}"))
}

/// `kill -9` of the machine that owns `code`, its server and its init:
/// the machine's id and the server's pid.
fn kill_owner(node: &Node, code: &str) -> (String, i32) {
    let owner = state(node, code)["owner"].as_str().unwrap().to_string();
    let (pid, init, id) = server_of(&owner);
    // One signal each; the second may find its process gone already (the
    // init ends with its server).
    let _ = std::process::Command::new("kill")
        .args(["-9", &init.to_string(), &pid.to_string()])
        .output();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(
            Instant::now() < deadline,
            "the server {pid} outlived kill -9"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("killed machine {id} (owner {owner} of {code}): pids {pid} and {init}");
    (id, pid)
}

fn page_text(b: &Browser) -> String {
    b.eval("return document.getElementById('game') ? document.getElementById('game').innerText : document.body.innerText")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Wait until the page's board has `moves` (in the page's moves line).
fn wait_moves(b: &Browser, who: &str, moves: &[&str]) {
    let want = format!("Moves: {}", moves.join(" "));
    let script = format!(
        "const m = document.querySelector('#game .moves'); return !!m && m.innerText.trim() === {};",
        json!(want)
    );
    b.wait_for(
        &script,
        Duration::from_secs(20),
        &format!(
            "{who}'s page never showed {want:?}; it shows: {}",
            page_text(b)
        ),
    );
}

/// Click the page's button for `cell` once it is there (the player's turn).
fn play(b: &Browser, who: &str, cell: &str) {
    let sel = format!("button[data-cell={cell}]");
    b.wait_for(
        &format!(
            "return !!document.querySelector('{sel}') && document.body.dataset.live === 'yes';"
        ),
        Duration::from_secs(20),
        &format!("{who} never got to play {cell}: {}", page_text(b)),
    );
    b.eval(&format!(
        "document.querySelector('{sel}').click(); return true;"
    ));
}

#[test]
fn two_players_and_a_spectator_play_live_in_chromium_while_the_owner_machine_is_killed() {
    let node = Node::start();
    let dir = games_app(&node, &[]);
    let ids = deploy(&node, &dir, 3);
    let port = node.edge.rsplit(':').next().unwrap().to_string();
    let base = format!("http://{HOST}:{port}");

    // Ada creates a game from the lobby: plain forms.
    let ada = Browser::start();
    ada.goto(&format!("{base}/"));
    ada.eval(
        "document.querySelector('form.create [name=name]').value = 'Ada';\
         document.querySelector('form.create [name=kind]').value = 'tic-tac-toe';\
         document.querySelector('form.create').submit(); return true;",
    );
    ada.wait_for(
        "return location.pathname.startsWith('/g/') && !!document.getElementById('game');",
        Duration::from_secs(20),
        "the create form did not lead to the game page",
    );
    let code = ada
        .eval("return document.getElementById('game').dataset.code;")
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        page_text(&ada).contains("Waiting for a second player"),
        "{}",
        page_text(&ada)
    );

    // Bob joins by the code, in a browser of his own.
    let bob = Browser::start();
    bob.goto(&format!("{base}/"));
    bob.eval(&format!(
        "document.querySelector('form.join [name=name]').value = 'Bob';\
         document.querySelector('form.join [name=code]').value = '{}';\
         document.querySelector('form.join').submit(); return true;",
        code.to_lowercase()
    ));
    bob.wait_for(
        &format!(
            "return location.pathname === '/g/{code}' && document.body.dataset.live === 'yes';"
        ),
        Duration::from_secs(20),
        "Bob's join did not lead to the live game page",
    );
    assert!(
        page_text(&bob).contains("O: Bob (you)"),
        "{}",
        page_text(&bob)
    );
    // Ada's page heard Bob join, without a reload.
    ada.wait_for(
        "return document.querySelector('#game .status').innerText.includes('Your move');",
        Duration::from_secs(20),
        "Ada's page never saw Bob join",
    );

    // A spectator: the seats are taken, so the link shows the game.
    let eve = Browser::start();
    eve.goto(&format!("{base}/g/{code}"));
    eve.wait_for(
        "return document.body.dataset.live === 'yes';",
        Duration::from_secs(20),
        "the spectator's page never went live",
    );
    assert!(
        page_text(&eve).contains("You are watching"),
        "{}",
        page_text(&eve)
    );
    assert_eq!(
        eve.eval("return document.querySelectorAll('button.cell').length;"),
        json!(0),
        "a spectator has no moves"
    );

    play(&ada, "Ada", "a1");
    for (b, who) in [(&ada, "Ada"), (&bob, "Bob"), (&eve, "the spectator")] {
        wait_moves(b, who, &["a1"]);
    }
    // Out of turn: Ada has no buttons now; the API refuses her too.
    assert_eq!(
        ada.eval("return document.querySelectorAll('button.cell').length;"),
        json!(0)
    );
    play(&bob, "Bob", "b1");
    wait_moves(&eve, "the spectator", &["a1", "b1"]);

    // A reload keeps Bob's seat (his cookie, not the URL).
    bob.goto(&format!("{base}/g/{code}"));
    assert!(
        page_text(&bob).contains("O: Bob (you)"),
        "{}",
        page_text(&bob)
    );
    play(&ada, "Ada", "a2");
    for (b, who) in [(&ada, "Ada"), (&bob, "Bob"), (&eve, "the spectator")] {
        wait_moves(b, who, &["a1", "b1", "a2"]);
    }
    let errors = [
        ada.console_errors(),
        bob.console_errors(),
        eve.console_errors(),
    ];
    assert!(
        errors.iter().all(Vec::is_empty),
        "console errors before the kill: {errors:?}"
    );
    ada.screenshot("games-before-kill-ada");

    // The owner machine dies mid-game.
    let (killed, killed_pid) = kill_owner(&node, &code);
    assert!(ids.contains(&killed));
    let t0 = Instant::now();
    play(&bob, "Bob", "b2");
    for (b, who) in [(&ada, "Ada"), (&bob, "Bob"), (&eve, "the spectator")] {
        wait_moves(b, who, &["a1", "b1", "a2", "b2"]);
    }
    eprintln!("the game went on {:?} after the kill", t0.elapsed());
    play(&ada, "Ada", "a3");
    for (b, who) in [(&ada, "Ada"), (&bob, "Bob"), (&eve, "the spectator")] {
        wait_moves(b, who, &["a1", "b1", "a2", "b2", "a3"]);
        b.wait_for(
            "return document.querySelector('#game .status').dataset.status === 'over';",
            Duration::from_secs(10),
            &format!("{who}'s page does not show the end"),
        );
    }
    assert!(
        page_text(&ada).contains("Ada wins: you"),
        "{}",
        page_text(&ada)
    );
    assert!(page_text(&eve).contains("Ada wins"), "{}", page_text(&eve));
    ada.screenshot("games-win-ada");
    bob.screenshot("games-win-bob");
    eve.screenshot("games-win-spectator");
    let s = state(&node, &code);
    assert_eq!(s["moves"], json!(["a1", "b1", "a2", "b2", "a3"]), "{s}");
    assert_eq!(s["outcome"], json!({"win": "first"}), "{s}");
    // Owned by a live server: another machine, or the killed one restarted
    // by its node (then a new process, which took the game back from its
    // peers).
    let (pid, _, owner) = server_of(s["owner"].as_str().unwrap());
    assert_ne!(pid, killed_pid, "the game is owned by a live server");
    eprintln!("the game is owned by {owner} now (the killed machine was {killed})");

    // A rematch: Bob opens this time.
    bob.eval("document.querySelector('button.rematch').click(); return true;");
    for (b, who) in [(&ada, "Ada"), (&bob, "Bob")] {
        b.wait_for(
            "return document.querySelector('#game .status').dataset.status === 'playing' && !document.querySelector('#game .moves');",
            Duration::from_secs(20),
            &format!("{who}'s page never showed the rematch"),
        );
    }
    assert!(page_text(&bob).contains("Your move"), "{}", page_text(&bob));
    play(&bob, "Bob", "b2");
    wait_moves(&eve, "the spectator", &["b2"]);
    eve.screenshot("games-rematch-spectator");
}

#[test]
fn moves_race_through_every_machine_while_the_owner_dies_and_games_move_with_machines() {
    let node = Node::start();
    let dir = games_app(&node, &[]);
    let ids = deploy(&node, &dir, 3);

    // A hostile org: its machine neither finds the games' machines nor
    // reaches their peer port, and the edge never routes to that port.
    let me = api(&node, "GET", "/api/status", None, None, Some(&ids[0])).json()["me"]
        .as_str()
        .unwrap()
        .to_string();
    let (ip, port) = me.rsplit_once(':').unwrap();
    let ip = ip.trim_matches(['[', ']']);
    // busybox's nc dials IPv4 only; the server listens on both.
    let status: Value =
        serde_json::from_str(&node.h.ok(&["machine", "status", &ids[0], "--json"])).unwrap();
    let ipv4 = status["ipv4"].as_str().unwrap().to_string();
    crate::machine::busybox_image(&node.h);
    let probe = format!(
        "nslookup games.internal 2>&1; for i in 1 2 3 4 5 6; do (printf 'GET /peer/copy/AAAA HTTP/1.0\\r\\n\\r\\n'; sleep 2) | nc -w 3 {ipv4} {port} && break; done; echo end"
    );
    // nc's input stays open until the answer is in (at its end, busybox's
    // nc may close before reading it). The probe (six tries) from another
    // app of the games' own org does reach them, so evil's below can fail.
    let text = probe_from(&node, "personal", "friend", &probe);
    assert!(
        text.contains(ip) && text.contains("404 Not Found"),
        "a machine of the games' own org does not reach them: {text}"
    );
    let text = probe_from(&node, "evil", "loot", &probe);
    assert!(text.contains("end"), "the probe did not run: {text}");
    assert!(
        !text.contains(ip) && !text.contains(&format!("{ipv4}\n")),
        "evil's machine resolved the games' machines: {text}"
    );
    assert!(
        !text.contains("HTTP/1."),
        "evil's machine reached the peer port: {text}"
    );
    let r = api(&node, "GET", "/peer/copy/AAAA", None, None, None);
    assert_eq!(r.status, 404, "the edge routes to the peer port");

    // Bad input is refused with the reason.
    let r = api(
        &node,
        "POST",
        "/api/games",
        None,
        Some(json!({"kind": "go", "name": "x"})),
        None,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("tic-tac-toe"),
        "{:?}",
        r.json()
    );
    let r = api(
        &node,
        "POST",
        "/api/games",
        None,
        Some(json!({"kind": "chess", "name": "<b>"})),
        None,
    );
    assert_eq!(r.status, 400, "{:?}", r.json());
    let r = api(&node, "GET", "/api/games/ZZZZ", None, None, None);
    assert_eq!(r.status, 404);

    // Games on every owner, with moves, kept alive by play.
    let games: Vec<(String, String, String)> =
        (0..12).map(|_| new_game(&node, "connect-four")).collect();
    for (code, a, b) in &games {
        for (i, (p, m)) in [(a, "4"), (b, "4"), (a, "3")].into_iter().enumerate() {
            let r = post_move(&node, code, p, m, i);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    }

    // Concurrent moves for one seat, each through another machine, while
    // the game's owner is killed: one is played, once.
    let (code, _, b) = games[0].clone();
    let killed = {
        let node_edge = node.edge.clone();
        let racers: Vec<_> = ["1", "2", "5", "6", "7", "1"]
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let (edge, code, b, on) = (
                    node_edge.clone(),
                    code.clone(),
                    b.clone(),
                    ids[i % 3].clone(),
                );
                std::thread::spawn(move || {
                    // Staggered: some before the kill, some during, some after.
                    std::thread::sleep(Duration::from_millis(8 * i as u64));
                    let auth = format!("Bearer {b}");
                    let body = json!({"move": m, "n": 3}).to_string();
                    // A connection cut by the kill is an answer too: none.
                    let r = std::panic::catch_unwind(|| {
                        http(
                            "POST",
                            &edge,
                            &format!("/api/games/{code}/moves"),
                            &[
                                ("Host", HOST),
                                ("Authorization", &auth),
                                ("Content-Type", "application/json"),
                                ("hangar-force-instance-id", &on),
                            ],
                            body.as_bytes(),
                        )
                    });
                    match r {
                        Ok(r) => (m, r.status, r.json()),
                        Err(_) => (m, 0, Value::Null),
                    }
                })
            })
            .collect();
        let (killed, _) = kill_owner(&node, &code);
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        eprintln!("racing moves: {results:?}");
        let s = state(&node, &code);
        let moves = s["moves"].as_array().unwrap().clone();
        assert_eq!(moves.len(), 4, "one racing move is played: {s}");
        let played = moves[3].as_str().unwrap();
        for (m, status, body) in &results {
            if *status == 200 {
                assert_eq!(*m, played, "a move was acknowledged but not played: {body}");
            }
        }
        assert!(
            results
                .iter()
                .any(|(m, status, _)| *status == 200 && *m == played),
            "the played move was acknowledged to someone: {results:?}"
        );
        killed
    };

    // The killed machine comes back or is replaced; meanwhile every game
    // is whole. Then a fourth machine joins and leaves: no game lost or
    // doubled, each still on one owner.
    let check = |games: &[(String, String, String)]| {
        for (code, _, _) in games {
            let s = state(&node, code);
            assert!(
                s["moves"].as_array().unwrap().len() >= 3,
                "{code} lost moves: {s}"
            );
            assert_eq!(
                s["moves"].as_array().unwrap()[..3],
                [json!("4"), json!("4"), json!("3")],
                "{s}"
            );
        }
    };
    check(&games);
    hangar_in(&node, &dir, &["scale", "count", "4"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let four = loop {
        let up = started_machines(&node, &dir);
        if up.len() == 4 {
            break up;
        }
        assert!(Instant::now() < deadline, "no fourth machine: {up:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    wait_for_peers(&node, &four);
    check(&games);
    // A move on each game after the join: made by its (maybe new) owner.
    for (code, _, b) in &games[1..] {
        let r = post_move(&node, code, b, "1", 3);
        assert_eq!(
            r.status,
            200,
            "{code}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    hangar_in(&node, &dir, &["scale", "count", "3"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let three = loop {
        let up = started_machines(&node, &dir);
        if up.len() == 3 {
            break up;
        }
        assert!(
            Instant::now() < deadline,
            "scale down did not happen: {up:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    wait_for_peers(&node, &three);
    for (code, _, _) in &games[1..] {
        let s = state(&node, code);
        assert_eq!(s["moves"], json!(["4", "4", "3", "1"]), "{code}: {s}");
    }
    eprintln!("killed {killed}; machines now {three:?}");
}

#[test]
fn the_forms_work_without_a_script_and_an_idle_game_ends_and_frees_its_code() {
    let node = Node::start();
    let dir = games_app(&node, &[("GAMES_IDLE", "3s")]);
    deploy(&node, &dir, 2);

    // The pages without a script: plain form posts and redirects.
    let form = |path: &str, cookie: Option<&str>, body: &str| {
        let mut headers = vec![
            ("Host", HOST),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        if let Some(c) = cookie {
            headers.push(("Cookie", c));
        }
        http("POST", &node.edge, path, &headers, body.as_bytes())
    };
    let gid = |r: &HttpResponse| {
        r.header("set-cookie")
            .and_then(|c| c.split([';', ',']).find(|p| p.trim().starts_with("gid=")))
            .map(|p| p.trim().to_string())
            .unwrap_or_else(|| panic!("no identity cookie: {:?}", r.headers))
    };
    let r = form("/games", None, "name=Ada&kind=tic-tac-toe");
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let page = r.header("location").unwrap().to_string();
    let code = page.trim_start_matches("/g/").to_string();
    let ada = gid(&r);
    let r = form(
        "/join",
        None,
        &format!("name=Bob&code={}", code.to_lowercase()),
    );
    assert_eq!((r.status, r.header("location")), (303, Some(page.as_str())));
    let bob = gid(&r);
    let r = form(&format!("{page}/move"), Some(&ada), "move=b2&n=0");
    assert_eq!((r.status, r.header("location")), (303, Some(page.as_str())));
    let r = form(&format!("{page}/move"), Some(&ada), "move=a1&n=1");
    assert!(
        r.header("location")
            .unwrap()
            .contains("error=it+is+not+your+turn"),
        "{:?}",
        r.headers
    );
    let r = http(
        "GET",
        &node.edge,
        &page,
        &[("Host", HOST), ("Cookie", &bob)],
        b"",
    );
    let html = String::from_utf8_lossy(&r.body);
    assert!(
        html.contains("O: Bob (you)") && html.contains("Your move"),
        "{html}"
    );
    assert!(
        html.contains("<button class=cell name=move value=a1"),
        "{html}"
    );
    let r = form("/games", None, "name=%3Cx%3E&kind=chess");
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("a display name has letters"));

    let (code, a, _) = new_game(&node, "chess");
    let r = post_move(&node, &code, &a, "e2e4", 0);
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = post_move(&node, &code, &a, "e7e5", 1);
    assert_eq!(r.status, 409, "not Ada's turn: {:?}", r.json());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api(
            &node,
            "GET",
            &format!("/api/games/{code}"),
            None,
            None,
            None,
        );
        if r.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle game {code} never ended: {:?}",
            r.json()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = post_move(&node, &code, &a, "e7e5", 1);
    assert_eq!(r.status, 404, "{:?}", r.json());
}

/// A call to the games at node `i`'s edge from the wire's client host:
/// status and JSON body.
fn edge_call(
    wire: &crate::cluster::Wire,
    i: usize,
    method: &str,
    path: &str,
    player: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", wire.stranger))
        .args([
            "curl",
            "-s",
            "-m",
            "15",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .args([
            "-H",
            &format!("Host: {HOST}"),
            "-H",
            "Content-Type: application/json",
        ]);
    if let Some(p) = player {
        cmd.args(["-H", &format!("Authorization: Bearer {p}")]);
    }
    if let Some(b) = body {
        cmd.args(["--data", &b.to_string()]);
    }
    let out = cmd
        .arg(format!("http://10.77.0.{i}:8080{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[test]
fn a_game_across_two_regions_goes_on_when_its_owner_dies() {
    crate::machine::require_root();
    require("etcd");
    require("curl");
    let _lock = crate::machine::host_lock();
    let (wire, _dir, _etcd, nodes) = crate::cluster::three_nodes();
    let n1 = &nodes[0];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/games");
    let dir = n1.h.dir.path().join("games");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy(server_binary(), dir.join("bin/hangar-games")).unwrap();
    fs::copy(src.join(".hangarignore"), dir.join(".hangarignore")).unwrap();
    let toml = fs::read_to_string(src.join("hangar.toml"))
        .unwrap()
        .replace("interval = \"2s\"", "interval = \"300ms\"")
        .replace(
            "app = \"games\"",
            "app = \"games\"\nprimary_region = \"ams\"",
        );
    fs::write(dir.join("hangar.toml"), toml).unwrap();
    let in_games = |args: &[&str]| {
        let out = n1.h.command(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "hangar {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    in_games(&["launch", "--org", "acme"]);
    in_games(&["deploy", "--count", "1"]);
    in_games(&["scale", "count", "2", "--region", "ams,fra"]);

    // Every machine, in either region, sees the four as its peers, asked
    // through each node's edge.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=3 {
        loop {
            let (status, v) = edge_call(&wire, i, "GET", "/api/status", None, None);
            if status == 200 && v["peers"].as_array().map_or(0, Vec::len) == 4 {
                break;
            }
            assert!(Instant::now() < deadline, "n{i}'s edge: {status} {v}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // Ada plays at n1 (ams), Bob at n3 (fra).
    let (s, created) = edge_call(
        &wire,
        1,
        "POST",
        "/api/games",
        None,
        Some(json!({"kind": "tic-tac-toe", "name": "Ada"})),
    );
    assert_eq!(s, 201, "{created}");
    let code = created["code"].as_str().unwrap().to_string();
    let ada = created["player"].as_str().unwrap().to_string();
    let (s, joined) = edge_call(
        &wire,
        3,
        "POST",
        &format!("/api/games/{code}/join"),
        None,
        Some(json!({"name": "Bob"})),
    );
    assert_eq!(s, 200, "{joined}");
    let bob = joined["player"].as_str().unwrap().to_string();
    let mv = |i: usize, who: &str, m: &str, n: usize| {
        let (s, v) = edge_call(
            &wire,
            i,
            "POST",
            &format!("/api/games/{code}/moves"),
            Some(who),
            Some(json!({"move": m, "n": n})),
        );
        assert_eq!(s, 200, "{m} at n{i}: {v}");
        v
    };
    mv(1, &ada, "b2", 0);
    mv(3, &bob, "a1", 1);
    let v = mv(2, &ada, "c1", 2);

    // Its owner dies; the game goes on from the other region's edge.
    let owner = v["owner"].as_str().unwrap().to_string();
    let (pid, init, id) = server_of(&owner);
    let _ = std::process::Command::new("kill")
        .args(["-9", &init.to_string(), &pid.to_string()])
        .output();
    eprintln!("killed machine {id}, owner {owner} of {code}");
    mv(3, &bob, "a3", 3);
    mv(1, &ada, "a2", 4);
    mv(3, &bob, "c3", 5);
    let v = mv(2, &ada, "c2", 6);
    assert_eq!(
        v["moves"],
        json!(["b2", "a1", "c1", "a3", "a2", "c3", "c2"]),
        "{v}"
    );
    assert_eq!(v["status"], "over", "{v}");
    assert_eq!(v["outcome"], json!({"win": "first"}), "{v}");
    for i in 1..=3 {
        let (_, v) = edge_call(&wire, i, "GET", &format!("/api/games/{code}"), None, None);
        assert_eq!(v["moves"].as_array().map_or(0, Vec::len), 7, "n{i}: {v}");
    }
}

/// Two models (the scripted OpenAI-compatible server, slowed so people
/// can follow) play a tournament game on the deployed app through the
/// edge, and a spectator watches it live in Chromium: the moves arrive
/// without a reload, under the models' names, to the end.
#[test]
fn two_models_play_on_the_deployed_app_and_a_spectator_watches_in_chromium() {
    let node = Node::start();
    let dir = games_app(&node, &[]);
    deploy(&node, &dir, 2);
    let bin = server_binary();
    let mut model = std::process::Command::new(&bin)
        .args(["scripted-model", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(model.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    let config = dir.join("arena.toml");
    fs::write(
        &config,
        format!(
            "name = \"watch\"\ngames = [\"tic-tac-toe\"]\nper_pair = 1\n\
             server = \"http://{}\"\nserver_host = \"{HOST}\"\n\
             [[player]]\nname = \"model-a\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"slow-700\"\n\
             [[player]]\nname = \"model-b\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"slow-700\"\n",
            node.edge
        ),
    )
    .unwrap();
    let mut arena = std::process::Command::new(&bin)
        .args(["arena", "run"])
        .arg(&config)
        .arg("--out")
        .arg(dir.join("results"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(arena.stdout.take().unwrap());
    let url = loop {
        let mut l = String::new();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut l).unwrap() > 0,
            "the arena ended without opening a game"
        );
        if let Some((_, url)) = l.trim().split_once(": http://") {
            break format!("http://{url}");
        }
    };
    let port = node.edge.rsplit(':').next().unwrap();
    assert!(
        url.starts_with(&format!("http://{HOST}:{port}/g/")),
        "{url}"
    );

    let eve = Browser::start();
    eve.goto(&url);
    eve.wait_for(
        "return document.body.dataset.live === 'yes';",
        Duration::from_secs(20),
        "the spectator's page never went live",
    );
    let text = page_text(&eve);
    assert!(
        text.contains("model-a") && text.contains("model-b"),
        "{text}"
    );
    assert!(text.contains("You are watching"), "{text}");
    let count = "const m = document.querySelector('#game .moves'); \
                 return m ? m.innerText.replace('Moves:', '').trim().split(/\\s+/).filter(x => x).length : 0;";
    let seen = eve.eval(count).as_u64().unwrap_or(0);
    // Moves arrive live, one after another, with no reload.
    eve.wait_for(
        &format!("return (function() {{ {count} }})() > {seen};"),
        Duration::from_secs(20),
        &format!("no move arrived after {seen}: {}", page_text(&eve)),
    );
    // The first-legal players' game: X takes a1, c1, b2, then a3.
    eve.wait_for(
        "return document.querySelector('#game .moves').innerText.trim() === 'Moves: a1 b1 c1 a2 b2 c2 a3';",
        Duration::from_secs(30),
        &format!("the game never finished live: {}", page_text(&eve)),
    );
    eve.screenshot("games-arena-spectator");
    assert!(arena.wait().unwrap().success());
    let _ = model.kill();
    let _ = model.wait();
    let board: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("results/leaderboard.json")).unwrap())
            .unwrap();
    assert_eq!(board["finished"], 1, "{board}");
    let games = fs::read_to_string(dir.join("results/games.jsonl")).unwrap();
    assert!(games.contains(&url), "{games}");
}
