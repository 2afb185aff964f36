//! The arena end to end: the real binary against its scripted
//! OpenAI-compatible server over HTTP on loopback, Debian's stockfish,
//! a games server for watching, and scikit-learn checking the
//! calibration metrics.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hangar-games");

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scripted model server, and its address.
fn scripted(extra: &[&str]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["scripted-model", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the scripted model server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("its address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc(child), addr)
}

fn endpoint(name: &str, addr: &str, model: &str, extra: &str) -> String {
    format!(
        "[[player]]\nname = \"{name}\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"{model}\"\n{extra}\n"
    )
}

fn engine(name: &str, engine: &str, extra: &str) -> String {
    format!("[[player]]\nname = \"{name}\"\nengine = \"{engine}\"\n{extra}\n")
}

fn write_config(dir: &Path, head: &str, players: &[String]) -> PathBuf {
    let path = dir.join("t.toml");
    std::fs::write(&path, format!("{head}\n{}", players.concat())).expect("write config");
    path
}

fn arena(config: &Path, out: &Path) -> std::process::Output {
    let o = Command::new(BIN)
        .args(["arena", "run"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run the arena");
    assert!(
        o.status.success(),
        "arena failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON")
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        // A line being written as this reads it is left for the next read.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn row<'a>(board: &'a Value, pool: &str, player: &str) -> &'a Value {
    board["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["game"] == pool)
        .and_then(|p| {
            p["players"]
                .as_array()
                .expect("players")
                .iter()
                .find(|r| r["name"] == player)
        })
        .unwrap_or_else(|| panic!("no row for {player} in {pool}: {board}"))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn minimax_beats_random_illegal_players_forfeit_and_transport_errors_are_apart() {
    let (_server, addr) = scripted(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "name = \"t\"\ngames = [\"tic-tac-toe\", \"connect-four\"]\nper_pair = 12\nanchor = \"first\"\nbootstrap = 300",
        &[
            endpoint("first", &addr, "first-legal", "show_legal = true"),
            endpoint("random", &addr, "random", ""),
            endpoint("minimax", &addr, "minimax-4", ""),
            endpoint("illegal", &addr, "always-illegal", ""),
            endpoint("garbage", &addr, "garbage", ""),
            endpoint("flaky", &addr, "429-then-ok", ""),
            endpoint("broken", &addr, "500-then-ok", ""),
        ],
    );
    let out = dir.path().join("res");
    arena(&cfg, &out);
    let board = json(&out.join("leaderboard.json"));
    // 7 players, 21 pairs, 12 games each, 2 games.
    assert_eq!(board["finished"], 21 * 12 * 2, "{board}");
    assert_eq!(board["abandoned"].as_array().map(Vec::len), Some(0));
    let (mm, rnd) = (row(&board, "all", "minimax"), row(&board, "all", "random"));
    assert!(
        num(&mm["low"]) > num(&rnd["high"]),
        "minimax's interval is above random's: {mm} {rnd}"
    );
    // The always-illegal and garbage players forfeit every game, and
    // every one of their answers is recorded with its reason.
    // (Against each other, the one to move first forfeits first.)
    let calls = lines(&out.join("calls.jsonl"));
    let games = lines(&out.join("games.jsonl"));
    for (name, other) in [("illegal", "garbage"), ("garbage", "illegal")] {
        let r = row(&board, "all", name);
        assert_eq!(r["games"], 6 * 12 * 2, "{r}");
        assert_eq!(
            num(&r["forfeits"]) + num(&r["wins"]),
            num(&r["games"]),
            "{r}"
        );
        assert_eq!(num(&r["illegal_rate"]), 1.0);
        let won_against_other = games
            .iter()
            .filter(|g| {
                (g["first"] == name && g["second"] == other && g["result"] == "first")
                    || (g["second"] == name && g["first"] == other && g["result"] == "second")
            })
            .count();
        assert_eq!(
            r["wins"], won_against_other,
            "{name} wins only when {other} forfeits first"
        );
    }
    let bad: Vec<&Value> = calls.iter().filter(|c| c["player"] == "illegal").collect();
    let forfeited = num(&row(&board, "all", "illegal")["forfeits"]) as usize;
    assert_eq!(bad.len(), forfeited * 3, "three answers per forfeited game");
    for c in &bad {
        assert!(
            ["illegal", "unreadable"].contains(&c["verdict"].as_str().unwrap_or("")),
            "{c}"
        );
        assert!(c["reason"].as_str().is_some_and(|r| !r.is_empty()), "{c}");
        assert!(
            c["prompt"].as_array().is_some_and(|p| p.len() >= 2),
            "the prompt is kept"
        );
        assert!(
            c["raw"].as_str().is_some_and(|r| r.starts_with("MOVE: ")),
            "{c}"
        );
    }
    // A retry carries the reason back to the model.
    let retry = bad
        .iter()
        .find(|c| c["attempt"] == 2)
        .expect("a third attempt");
    let last = retry["prompt"]
        .as_array()
        .and_then(|p| p.last())
        .expect("a message");
    assert!(
        last["content"]
            .as_str()
            .unwrap_or("")
            .contains("not a legal move"),
        "{last}"
    );
    assert!(calls
        .iter()
        .filter(|c| c["player"] == "garbage")
        .all(|c| c["verdict"] == "unparsable"));
    for g in games.iter().filter(|g| g["first"] == "illegal") {
        assert_eq!(g["result"], "second", "{g}");
        assert!(
            g["reason"].as_str().unwrap_or("").contains("forfeits"),
            "{g}"
        );
    }
    // 429s and 500s are retried and counted apart from illegal answers.
    for name in ["flaky", "broken"] {
        let r = row(&board, "all", name);
        // (Each distinct request fails once; games share openings.)
        assert!(num(&r["transport_retries"]) > 10.0, "{r}");
        assert_eq!(num(&r["illegal_rate"]), 0.0, "{r}");
        assert_eq!(r["forfeits"], 0, "{r}");
    }
    // Tokens are counted from the API's usage.
    assert!(num(&row(&board, "tic-tac-toe", "first")["tokens_per_move"]) > 10.0);
    // The one-model report names the failures by kind and phase.
    let m = json(&out.join("model-always-illegal.json"));
    let g = &m["variants"][0]["games"][0];
    let fails = g["failures"]["illegal"].as_u64().unwrap_or(0)
        + g["failures"]["unreadable"].as_u64().unwrap_or(0);
    assert_eq!(fails, g["answers"].as_u64().unwrap_or(u64::MAX), "{g}");
    assert!(
        g["failures_by_phase"]["opening"]["bad"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{g}"
    );
    assert!(std::fs::read_to_string(out.join("leaderboard.html"))
        .expect("page")
        .contains("<td>minimax<td>"));
}

#[test]
fn overconfidence_is_measured_and_the_metrics_agree_with_scikit_learn() {
    let (_server, addr) = scripted(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "name = \"c\"\ngames = [\"connect-four\"]\nper_pair = 30\nbootstrap = 100",
        &[
            engine("random", "random", ""),
            endpoint("calibrated", &addr, "calibrated", "confidence = true"),
            endpoint("overconfident", &addr, "overconfident", "confidence = true"),
            endpoint(
                "calibrated-listed",
                &addr,
                "calibrated",
                "confidence = true\nshow_legal = true",
            ),
        ],
    );
    let out = dir.path().join("res");
    arena(&cfg, &out);
    let cal = json(&out.join("calibration.json"));
    let entry = |player: &str, target: &str| {
        cal.as_array()
            .expect("entries")
            .iter()
            .find(|e| e["player"] == player && e["target"] == target && e["game"] == "connect-four")
            .unwrap_or_else(|| panic!("no {player} {target} entry"))
            .clone()
    };
    let good = entry("calibrated", "legal");
    let bad = entry("overconfident", "legal");
    let (ge, be) = (&good["report"]["ece"], &bad["report"]["ece"]);
    assert!(num(&be["value"]) > 3.0 * num(&ge["value"]), "{ge} vs {be}");
    assert!(
        num(&be["low"]) > num(&ge["high"]),
        "the intervals are apart: {ge} vs {be}"
    );
    assert!(out.join(good["svg"].as_str().expect("svg")).is_file());
    // The one-model report sets the model's prompt variants side by side.
    let m = json(&out.join("model-calibrated.json"));
    let variants: Vec<&str> = m["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .map(|v| v["variant"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(variants, ["confidence", "legal-moves+confidence"]);
    for v in m["variants"].as_array().into_iter().flatten() {
        let g = &v["games"][0];
        assert!(
            g["calibration"]["legal"]["ece"]["value"].as_f64().is_some(),
            "{g}"
        );
        assert!(num(&g["tokens_in_per_move"]) > 0.0, "{g}");
    }

    // The same forecasts, read back from the calls, through scikit-learn.
    let games: std::collections::HashSet<String> = lines(&out.join("games.jsonl"))
        .iter()
        .map(|g| format!("{}/{}", g["run"], g["id"]))
        .collect();
    let (mut p, mut y) = (Vec::new(), Vec::new());
    for c in lines(&out.join("calls.jsonl")) {
        if c["player"] == "calibrated" && games.contains(&format!("{}/{}", c["run"], c["game"])) {
            p.push(num(&c["p_legal"]));
            y.push(u8::from(c["verdict"] == "legal"));
        }
    }
    let data = dir.path().join("forecasts.json");
    std::fs::write(&data, serde_json::json!({ "p": p, "y": y }).to_string()).expect("write");
    let script = r#"
import json, sys
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
d = json.load(open(sys.argv[1]))
p, y = np.array(d["p"]), np.array(d["y"])
out = {"brier": brier_score_loss(y, p), "log_loss": log_loss(y, p), "auroc": roc_auc_score(y, p)}
for strategy in ["uniform", "quantile"]:
    true, pred = calibration_curve(y, p, n_bins=10, strategy=strategy)
    if strategy == "uniform":
        bins = np.linspace(0.0, 1.0, 11)
    else:
        bins = np.percentile(p, np.linspace(0, 1, 11) * 100)
    counts = np.bincount(np.searchsorted(bins[1:-1], p), minlength=10)
    counts = counts[counts > 0]
    out[strategy] = {"ece": float(np.sum(counts * np.abs(true - pred)) / counts.sum()),
                     "mce": float(np.max(np.abs(true - pred))), "bins": len(true)}
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(&data)
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sk: Value = serde_json::from_slice(&o.stdout).expect("scikit-learn's numbers");
    let r = &good["report"];
    assert_eq!(r["n"].as_u64(), Some(p.len() as u64));
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() < 1e-9, "{what}: ours {a}, scikit-learn {b}")
    };
    close(num(&r["brier"]["score"]), num(&sk["brier"]), "Brier");
    close(num(&r["log_loss"]), num(&sk["log_loss"]), "log loss");
    close(num(&r["auroc"]), num(&sk["auroc"]), "AUROC");
    close(num(&r["ece"]["value"]), num(&sk["uniform"]["ece"]), "ECE");
    close(num(&r["mce"]["value"]), num(&sk["uniform"]["mce"]), "MCE");
    close(
        num(&r["ece_equal_mass"]["value"]),
        num(&sk["quantile"]["ece"]),
        "ECE, equal mass",
    );
    assert_eq!(
        r["equal_width"].as_array().map(Vec::len),
        sk["uniform"]["bins"].as_u64().map(|b| b as usize)
    );
    assert_eq!(
        r["equal_mass"].as_array().map(Vec::len),
        sk["quantile"]["bins"].as_u64().map(|b| b as usize)
    );
}

#[test]
fn a_tournament_killed_and_resumed_rates_as_one_run_straight_through() {
    let (_server, addr) = scripted(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "name = \"k\"\ngames = [\"tic-tac-toe\"]\nper_pair = 8\nconcurrency = 3\nbootstrap = 200\nseed = 5",
        &[
            engine("random", "random", ""),
            engine("perfect", "perfect", ""),
            endpoint("slow", &addr, "slow-40", ""),
            endpoint("rnd", &addr, "random", "show_legal = true"),
        ],
    );
    let straight = dir.path().join("straight");
    arena(&cfg, &straight);

    let killed = dir.path().join("killed");
    let mut kills = 0;
    // Kill it twice mid-run, then let it finish.
    loop {
        let mut child = Proc(
            Command::new(BIN)
                .args(["arena", "run"])
                .arg(&cfg)
                .arg("--out")
                .arg(&killed)
                .stdout(Stdio::null())
                .spawn()
                .expect("run"),
        );
        if kills == 2 {
            assert!(child.0.wait().expect("wait").success());
            break;
        }
        let before = lines(&killed.join("games.jsonl")).len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while lines(&killed.join("games.jsonl")).len() < before + 5 {
            assert!(Instant::now() < deadline, "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.0.kill().expect("kill -9");
        child.0.wait().expect("reap");
        kills += 1;
        let done = lines(&killed.join("games.jsonl")).len();
        assert!(done < 6 * 8, "killed before the end ({done} games)");
    }
    let a = json(&straight.join("leaderboard.json"));
    let b = json(&killed.join("leaderboard.json"));
    assert_eq!(a["finished"], 48);
    // The same ratings, intervals and counts (latencies are measured
    // afresh, so they differ).
    let strip = |v: &Value| {
        let mut v = v["pools"].clone();
        for p in v.as_array_mut().into_iter().flatten() {
            for r in p["players"].as_array_mut().into_iter().flatten() {
                r.as_object_mut().map(|o| o.remove("mean_latency_ms"));
            }
        }
        v
    };
    assert_eq!(strip(&a), strip(&b), "the same ratings and counts");
    assert!(a["pools"][0]["players"][0]["low"].as_f64().is_some());
    // Every game was played once, with the same moves.
    let moves = |d: &Path| {
        let mut v: Vec<(String, String)> = lines(&d.join("games.jsonl"))
            .iter()
            .map(|g| (g["id"].to_string(), g["moves"].to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(moves(&straight), moves(&killed));
}

#[test]
fn timeouts_abandon_stockfish_plays_chess_and_games_can_be_watched() {
    let (_server, addr) = scripted(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    // A games server to play on.
    let port = free_port();
    let peer = free_port();
    let _games = Proc(
        Command::new(BIN)
            .arg("serve")
            .env("PORT", port.to_string())
            .env("GAMES_PEER_PORT", peer.to_string())
            .env_remove("HANGAR_APP_NAME")
            .env_remove("GAMES_PEERS")
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the games server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cfg = write_config(
        dir.path(),
        &format!("name = \"w\"\ngames = [\"chess\"]\nper_pair = 2\nserver = \"{base}\"\nanchor = \"random\""),
        &[
            engine("random", "random", ""),
            engine("stockfish", "stockfish", "depth = 6"),
            endpoint("sleepy", &addr, "slow-3000", "timeout_ms = 200\nretries = 1"),
        ],
    );
    let out = dir.path().join("res");
    arena(&cfg, &out);
    let games = lines(&out.join("games.jsonl"));
    assert_eq!(games.len(), 6);
    for g in &games {
        let sleepy = g["first"] == "sleepy" || g["second"] == "sleepy";
        if sleepy {
            assert_eq!(g["result"], "abandoned", "{g}");
            assert!(
                g["reason"].as_str().unwrap_or("").contains("no answer in"),
                "{g}"
            );
        } else {
            let winner = if g["result"] == "first" {
                &g["first"]
            } else {
                &g["second"]
            };
            assert_eq!(winner, "stockfish", "{g}");
        }
        // The server holds the same game, under the players' names.
        let url = g["url"].as_str().expect("a url");
        let code = url.rsplit('/').next().expect("code");
        let state = http_get(port, &format!("/api/games/{code}"));
        let v: Value = serde_json::from_str(&state).expect("state");
        assert_eq!(v["moves"], g["moves"], "{v}");
        assert_eq!(v["players"][0]["name"], g["first"]);
        if !sleepy {
            assert_eq!(v["status"], "over");
            let page = http_get(port, &format!("/g/{code}"));
            assert!(page.contains("stockfish"), "the page names the players");
        }
    }
    let board = json(&out.join("leaderboard.json"));
    assert_eq!(board["abandoned"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        row(&board, "chess", "stockfish")["games"],
        2,
        "abandoned games are not rated"
    );
    // Stockfish's own chances come from its WDL estimate.
    let sf: Vec<Value> = lines(&out.join("calls.jsonl"))
        .into_iter()
        .filter(|c| c["player"] == "stockfish")
        .collect();
    assert!(sf.iter().all(|c| c["p_win"]
        .as_f64()
        .is_some_and(|p| (0.0..=1.0).contains(&p))));
    assert!(
        sf.iter().any(|c| num(&c["p_win"]) > 0.9),
        "stockfish sees its wins coming"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn bad_configs_are_refused_with_the_way_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("games = [\"go\"]\n[[player]]\nname = \"a\"\nengine = \"random\"\n[[player]]\nname = \"b\"\nengine = \"random\"", "unknown variant"),
        ("games = [\"chess\"]\n[[player]]\nname = \"a\"\nengine = \"random\"", "at least two"),
        ("games = [\"chess\"]\n[[player]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\napi_key_env = \"NO_SUCH_KEY_HERE\"\n[[player]]\nname = \"b\"\nengine = \"random\"", "hangar secrets set NO_SUCH_KEY_HERE"),
        ("games = [\"tic-tac-toe\"]\n[[player]]\nname = \"a\"\nengine = \"stockfish\"\n[[player]]\nname = \"b\"\nengine = \"random\"", "chess only"),
    ];
    // A results directory of another tournament is not mixed into.
    let out = dir.path().join("taken");
    let one = dir.path().join("one.toml");
    std::fs::write(&one, "games = [\"tic-tac-toe\"]\nper_pair = 1\n[[player]]\nname = \"a\"\nengine = \"random\"\n[[player]]\nname = \"b\"\nengine = \"random\"").expect("write");
    arena(&one, &out);
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "games = [\"tic-tac-toe\"]\nper_pair = 1\n[[player]]\nname = \"a\"\nengine = \"random\"\n[[player]]\nname = \"c\"\nengine = \"perfect\"").expect("write");
    let o = Command::new(BIN)
        .args(["arena", "run"])
        .arg(&other)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("other players"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        lines(&out.join("games.jsonl")).len(),
        1,
        "nothing was added"
    );
    for (text, says) in cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, text).expect("write");
        let o = Command::new(BIN)
            .args(["arena", "run"])
            .arg(&cfg)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text}");
        assert!(err.contains(says), "{text}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
