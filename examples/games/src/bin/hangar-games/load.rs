//! `hangar-games load`: scripted players for the benchmark. Each of
//! `--games` pairs creates a game through the API (through the edge),
//! both players follow it over the WebSocket API and play random legal
//! moves; a finished game is followed by a new one until `--seconds`.
//! A move's round trip is from sending it to its acknowledgement. A
//! dropped connection is made again and the move in flight sent again
//! (the same move at the same place, played once).
//!
//! At the end every game is read back: an acknowledged move missing from
//! it is a lost move, one more than acknowledged is a duplicate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Args, Clone)]
pub struct LoadArgs {
    /// The edge (host:port)
    #[arg(long)]
    edge: String,
    /// The app's host name at the edge
    #[arg(long, default_value = "games.localhost")]
    host: String,
    /// Games played at once
    #[arg(long, default_value_t = 100)]
    games: usize,
    /// How long to play
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The game
    #[arg(long, default_value = "connect-four")]
    kind: String,
    /// A player's time to think before each move (ms, varied by ±50%);
    /// 0 plays as fast as the answers come
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
}

#[derive(Default)]
struct Tally {
    rtts_us: Vec<u64>,
    longest_wait_ms: u64,
    reconnects: u64,
    retries: u64,
    /// Per game: its code and the moves acknowledged (index, move).
    games: Vec<(String, Vec<(usize, String)>)>,
    setup_errors: u64,
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn call(
    http: &Http,
    a: &LoadArgs,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Result<Value> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", a.edge))
        .header("host", &a.host)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = http
        .request(req.body(Full::new(Bytes::from(body.to_string())))?)
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

async fn read_game(http: &Http, a: &LoadArgs, code: &str) -> Result<Value> {
    let req = http::Request::builder()
        .uri(format!("http://{}/api/games/{code}", a.edge))
        .header("host", &a.host)
        .body(Full::new(Bytes::new()))?;
    let resp = http.request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(a: &LoadArgs, code: &str, token: &str) -> Result<Ws> {
    let stream = tokio::net::TcpStream::connect(&a.edge).await?;
    stream.set_nodelay(true)?;
    let req = http::Request::builder()
        .uri(format!("ws://{}/api/games/{code}/ws", a.host))
        .header("host", &a.host)
        .header("authorization", format!("Bearer {token}"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())?;
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(ws)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One player of `code` until the game is over or `until`: the moves it
/// had acknowledged.
async fn play(
    a: &LoadArgs,
    code: &str,
    token: &str,
    seed: u64,
    until: Instant,
    tally: &Mutex<Tally>,
) -> Vec<(usize, String)> {
    let mut rng = Rng(seed | 1);
    let mut acked = Vec::new();
    let mut rtts = Vec::new();
    let mut longest = Duration::ZERO;
    let (mut reconnects, mut retries) = (0, 0);
    // The move in flight: its ask, when it was first sent, when last.
    let mut pending: Option<(String, Instant, Instant)> = None;
    let mut ask_id = 0u64;
    let mut over = false;
    'outer: while Instant::now() < until {
        let mut ws = match connect(a, code, token).await {
            Ok(ws) => ws,
            Err(_) => {
                reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some((ask, _, sent)) = &mut pending {
            if ws.send(Message::Text(ask.clone().into())).await.is_err() {
                continue;
            }
            *sent = Instant::now();
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, ws.next()).await {
                Err(_) => break 'outer,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => {
                    reconnects += 1;
                    continue 'outer;
                }
            };
            let Ok(m) = serde_json::from_str::<Value>(&msg) else {
                continue;
            };
            match m["type"].as_str() {
                Some("state") => {
                    let g = &m["game"];
                    if g["status"] == "over" || g["status"] == "ended" {
                        // The end may come before the last move's answer.
                        over = true;
                        if pending.is_none() {
                            break 'outer;
                        }
                        continue;
                    }
                    if pending.is_none() && g["status"] == "playing" && g["to_move"] == g["you"] {
                        let legal: Vec<&str> = g["legal"]
                            .as_array()
                            .map(|l| l.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        if legal.is_empty() {
                            continue;
                        }
                        let mv = legal[(rng.next() % legal.len() as u64) as usize].to_string();
                        if a.think_ms > 0 {
                            let ms = a.think_ms / 2 + rng.next() % (a.think_ms + 1);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if Instant::now() >= until {
                            break 'outer;
                        }
                        let n = g["moves"].as_array().map_or(0, Vec::len);
                        ask_id += 1;
                        let ask = json!({ "move": mv, "n": n, "id": ask_id }).to_string();
                        let now = Instant::now();
                        pending = Some((ask.clone(), now, now));
                        if ws.send(Message::Text(ask.into())).await.is_err() {
                            reconnects += 1;
                            continue 'outer;
                        }
                    }
                }
                Some("ok") => {
                    if let Some((ask, first, sent)) = pending.take() {
                        let ask: Value = serde_json::from_str(&ask).unwrap_or_default();
                        rtts.push(sent.elapsed().as_micros() as u64);
                        longest = longest.max(first.elapsed());
                        acked.push((
                            ask["n"].as_u64().unwrap_or(0) as usize,
                            ask["move"].as_str().unwrap_or("").to_string(),
                        ));
                    }
                    if over {
                        break 'outer;
                    }
                }
                Some("error") => {
                    if let Some((ask, _, sent)) = &mut pending {
                        if m["status"] == 503 {
                            // Not reachable now: again in a moment.
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if ws.send(Message::Text(ask.clone().into())).await.is_err() {
                                continue 'outer;
                            }
                            *sent = Instant::now();
                        } else {
                            // Refused (the game moved on): the next state says.
                            pending = None;
                            if over {
                                break 'outer;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
    t.rtts_us.extend(rtts);
    t.longest_wait_ms = t.longest_wait_ms.max(longest.as_millis() as u64);
    t.reconnects += reconnects;
    t.retries += retries;
    acked
}

async fn pair(a: Arc<LoadArgs>, i: usize, until: Instant, http: Http, tally: Arc<Mutex<Tally>>) {
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let made = async {
            let created = call(
                &http,
                &a,
                "/api/games",
                None,
                json!({"kind": a.kind, "name": "first"}),
            )
            .await?;
            let code = created["code"].as_str().context("no code")?.to_string();
            let first = created["player"].as_str().context("no player")?.to_string();
            let joined = call(
                &http,
                &a,
                &format!("/api/games/{code}/join"),
                None,
                json!({"name": "second"}),
            )
            .await?;
            let second = joined["player"].as_str().context("no player")?.to_string();
            Ok::<_, anyhow::Error>((code, first, second))
        };
        let (code, first, second) = match made.await {
            Ok(x) => x,
            Err(_) => {
                tally.lock().unwrap_or_else(|e| e.into_inner()).setup_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let seed = (i as u64) << 20 | round;
        let (x, y) = tokio::join!(
            play(&a, &code, &first, seed, until, &tally),
            play(&a, &code, &second, seed.wrapping_mul(31), until, &tally),
        );
        let mut acked = x;
        acked.extend(y);
        acked.sort();
        tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .games
            .push((code, acked));
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub async fn run(args: LoadArgs) -> Result<()> {
    let args = Arc::new(args);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Http = Client::builder(TokioExecutor::new()).build(connector);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let until = start + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.games)
        .map(|i| tokio::spawn(pair(args.clone(), i, until, http.clone(), tally.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    // Read every game back (a little later: the last answers settle).
    let (mut lost, mut unacked) = (0u64, 0u64);
    let checks = futures_util::stream::iter(t.games.iter().cloned())
        .map(|(code, acked)| {
            let http = http.clone();
            let args = args.clone();
            async move { (read_game(&http, &args, &code).await, acked) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut unreadable = 0u64;
    for (game, acked) in checks {
        let Ok(game) = game else {
            unreadable += 1;
            continue;
        };
        let moves: Vec<&str> = game["moves"]
            .as_array()
            .map(|m| m.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (n, mv) in &acked {
            if moves.get(*n) != Some(&mv.as_str()) {
                lost += 1;
            }
        }
        unacked += (moves.len() as u64).saturating_sub(acked.len() as u64);
    }
    t.rtts_us.sort_unstable();
    let moves = t.rtts_us.len();
    println!(
        "{}",
        json!({
            "games": t.games.len(),
            "moves": moves,
            "seconds": (elapsed * 100.0).round() / 100.0,
            "moves_per_s": (moves as f64 / elapsed).round(),
            "p50_ms": percentile(&t.rtts_us, 0.50),
            "p99_ms": percentile(&t.rtts_us, 0.99),
            "max_ms": percentile(&t.rtts_us, 1.0),
            "longest_wait_ms": t.longest_wait_ms,
            "lost": lost,
            "played_unacknowledged": unacked,
            "unreadable_games": unreadable,
            "reconnects": t.reconnects,
            "retries": t.retries,
            "setup_errors": t.setup_errors,
        })
    );
    Ok(())
}
