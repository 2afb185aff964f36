//! The arena's players: the built-in engines, Debian's `stockfish` over
//! UCI, and any OpenAI-compatible chat-completions endpoint.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hangar_games::ai::Message;
use hangar_games::engine::Engine;
use hangar_games::rules::Game;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;

use super::config::PlayerConfig;

/// A player as the arena holds it.
pub struct Seat {
    pub cfg: PlayerConfig,
    kind: SeatKind,
    /// Calls (or searches) at once.
    pub limit: Arc<Semaphore>,
}

enum SeatKind {
    Engine(Engine),
    Stockfish(String),
    Endpoint(Endpoint),
}

/// One answer to a turn.
pub struct Thought {
    /// The answer's text (an engine's: its move).
    pub raw: String,
    /// An engine's own reckoning of its chance to win.
    pub p_win: Option<f64>,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    /// Timeouts, 429s and 5xx retried before this answer.
    pub transport_retries: u32,
}

/// A seat's state for one game (stockfish's process).
pub enum Mind {
    Stateless,
    Stockfish(Box<Uci>),
}

impl Seat {
    pub fn new(cfg: &PlayerConfig, http: &reqwest::Client) -> Result<Seat> {
        let kind = match (cfg.engine.as_deref(), &cfg.base_url) {
            (Some("random"), _) => SeatKind::Engine(Engine::Random),
            (Some("first-legal"), _) => SeatKind::Engine(Engine::FirstLegal),
            (Some("minimax"), _) => SeatKind::Engine(Engine::Minimax {
                depth: cfg.depth.unwrap_or(4),
            }),
            // Deep enough to search tic-tac-toe whole; connect four at 8.
            (Some("perfect"), _) => SeatKind::Engine(Engine::Minimax {
                depth: cfg.depth.unwrap_or(9),
            }),
            (Some("stockfish"), _) => SeatKind::Stockfish(stockfish_path(cfg.path.as_deref())?),
            (None, Some(url)) => SeatKind::Endpoint(Endpoint {
                http: http.clone(),
                url: format!("{}/chat/completions", url.trim_end_matches('/')),
                model: cfg.model.clone().unwrap_or_default(),
                key: match &cfg.api_key_env {
                    None => None,
                    Some(var) => Some(std::env::var(var).with_context(|| {
                        format!(
                            "player {:?}: the API key variable {var} is not set (on Hangar: hangar secrets set {var}=...)",
                            cfg.name
                        )
                    })?),
                },
                temperature: cfg.temperature,
                max_tokens: cfg.max_tokens,
                timeout: Duration::from_millis(cfg.timeout_ms),
                retries: cfg.retries,
            }),
            _ => bail!("player {:?} has no engine or endpoint", cfg.name),
        };
        let permits = match kind {
            SeatKind::Endpoint(_) | SeatKind::Stockfish(_) => cfg.concurrency,
            SeatKind::Engine(_) => Semaphore::MAX_PERMITS,
        };
        Ok(Seat {
            cfg: cfg.clone(),
            kind,
            limit: Arc::new(Semaphore::new(permits)),
        })
    }

    pub fn is_endpoint(&self) -> bool {
        matches!(self.kind, SeatKind::Endpoint(_))
    }

    /// A fresh state for a game.
    pub async fn mind(&self) -> Result<Mind> {
        match &self.kind {
            SeatKind::Stockfish(path) => Ok(Mind::Stockfish(Box::new(
                Uci::start(path, self.cfg.skill).await?,
            ))),
            _ => Ok(Mind::Stateless),
        }
    }

    /// The answer to `messages` for the side to move in `game`.
    pub async fn think(
        &self,
        mind: &mut Mind,
        game: &dyn Game,
        moves: &[String],
        messages: &[Message],
        seed: u64,
    ) -> Result<Thought> {
        let _permit = self.limit.acquire().await?;
        match (&self.kind, mind) {
            (SeatKind::Engine(e), _) => {
                // Search is CPU work: off the async threads.
                let g = game.boxed();
                let e = e.clone();
                let c = tokio::task::spawn_blocking(move || e.choose(g.as_ref(), seed))
                    .await?
                    .context("the engine found no move")?;
                Ok(Thought {
                    raw: c.mv,
                    p_win: Some(c.win),
                    tokens_in: None,
                    tokens_out: None,
                    transport_retries: 0,
                })
            }
            (SeatKind::Stockfish(_), Mind::Stockfish(uci)) => {
                let (mv, p_win) = uci
                    .best(moves, self.cfg.depth, self.cfg.movetime_ms)
                    .await?;
                Ok(Thought {
                    raw: mv,
                    p_win,
                    tokens_in: None,
                    tokens_out: None,
                    transport_retries: 0,
                })
            }
            (SeatKind::Endpoint(ep), _) => ep.complete(messages).await,
            (SeatKind::Stockfish(_), Mind::Stateless) => bail!("stockfish has no process"),
        }
    }
}

/// `stockfish` on PATH, or where Debian puts it.
fn stockfish_path(given: Option<&str>) -> Result<String> {
    if let Some(p) = given {
        return Ok(p.into());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("stockfish").is_file()))
        .unwrap_or(false);
    if on_path {
        return Ok("stockfish".into());
    }
    if std::path::Path::new("/usr/games/stockfish").is_file() {
        return Ok("/usr/games/stockfish".into());
    }
    bail!("stockfish is not installed: apt-get install stockfish (or set path = \"...\")")
}

/// A running UCI engine.
pub struct Uci {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Uci {
    async fn start(path: &str, skill: Option<u32>) -> Result<Uci> {
        let mut child = tokio::process::Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {path}"))?;
        let stdin = child.stdin.take().context("stockfish's stdin")?;
        let stdout = child.stdout.take().context("stockfish's stdout")?;
        let mut u = Uci {
            _child: child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        u.send("uci").await?;
        u.until("uciok").await?;
        u.send("setoption name UCI_ShowWDL value true").await?;
        u.send("setoption name Threads value 1").await?;
        if let Some(s) = skill {
            u.send(&format!("setoption name Skill Level value {}", s.min(20)))
                .await?;
        }
        u.send("ucinewgame").await?;
        u.send("isready").await?;
        u.until("readyok").await?;
        Ok(u)
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn until(&mut self, word: &str) -> Result<Vec<String>> {
        let mut seen = Vec::new();
        let read = async {
            while let Some(l) = self.lines.next_line().await? {
                let done = l.split_whitespace().next() == Some(word);
                seen.push(l);
                if done {
                    return Ok::<_, anyhow::Error>(seen);
                }
            }
            bail!("stockfish exited before {word}")
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .with_context(|| format!("stockfish did not answer {word} in 60 s"))?
    }

    /// The best move after `moves` from the start, and the engine's chance
    /// of winning (its WDL estimate).
    async fn best(
        &mut self,
        moves: &[String],
        depth: Option<u32>,
        movetime_ms: Option<u64>,
    ) -> Result<(String, Option<f64>)> {
        let position = if moves.is_empty() {
            "position startpos".to_string()
        } else {
            format!("position startpos moves {}", moves.join(" "))
        };
        self.send(&position).await?;
        match (movetime_ms, depth) {
            (Some(ms), _) => self.send(&format!("go movetime {ms}")).await?,
            (None, d) => self.send(&format!("go depth {}", d.unwrap_or(8))).await?,
        }
        let lines = self.until("bestmove").await?;
        let mv = lines
            .last()
            .and_then(|l| l.split_whitespace().nth(1))
            .context("stockfish's bestmove line has no move")?
            .to_string();
        let p_win = lines.iter().rev().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|t| *t == "wdl")?;
            let win: f64 = w.get(at + 1)?.parse().ok()?;
            Some((win / 1000.0).clamp(0.01, 0.99))
        });
        Ok((mv, p_win))
    }
}

/// An OpenAI-compatible chat-completions endpoint.
pub struct Endpoint {
    http: reqwest::Client,
    url: String,
    model: String,
    key: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    timeout: Duration,
    retries: u32,
}

impl Endpoint {
    async fn complete(&self, messages: &[Message]) -> Result<Thought> {
        let mut body = json!({ "model": self.model, "messages": messages });
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = self.max_tokens {
            body["max_tokens"] = json!(m);
        }
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                let wait = Duration::from_millis(200 << (attempt - 1).min(5));
                tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
            }
            let mut req = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(k) = &self.key {
                req = req.bearer_auth(k);
            }
            let started = Instant::now();
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = if e.is_timeout() {
                        format!("no answer in {:?}", self.timeout)
                    } else {
                        format!("{e}")
                    };
                    continue;
                }
            };
            let status = resp.status();
            let text = match resp.text().await {
                Ok(t) => t,
                Err(e) => {
                    last = format!("reading the answer: {e}");
                    continue;
                }
            };
            if status.as_u16() == 429 || status.is_server_error() {
                last = format!("{status} after {:?}", started.elapsed());
                continue;
            }
            if !status.is_success() {
                bail!(
                    "{} answered {status}: {} (not retried)",
                    self.url,
                    text.chars().take(200).collect::<String>()
                );
            }
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} answered with no JSON", self.url))?;
            let raw = v["choices"][0]["message"]["content"]
                .as_str()
                .with_context(|| {
                    format!("{}'s answer has no choices[0].message.content", self.url)
                })?
                .to_string();
            return Ok(Thought {
                raw,
                p_win: None,
                tokens_in: v["usage"]["prompt_tokens"].as_u64(),
                tokens_out: v["usage"]["completion_tokens"].as_u64(),
                transport_retries: attempt,
            });
        }
        bail!(
            "{} failed {} times, the last: {last}",
            self.url,
            self.retries + 1
        )
    }
}
