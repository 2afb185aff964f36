//! `hangar-games arena`: tournaments between players (engines, stockfish,
//! OpenAI-compatible endpoints), their results kept as they finish, and
//! the reports made from them.
//!
//! A results directory holds `config.toml` (the tournament's, copied),
//! `calls.jsonl` (every answer asked for: prompt, raw answer, move read,
//! latency, tokens) and `games.jsonl` (every finished game). A game's
//! calls are written, then its line in `games.jsonl`, each synced to
//! disk; a game without its line never happened, so `kill -9` loses only
//! the games in flight, and running again plays just those. Every random
//! choice is seeded from the game's id, so a resumed tournament ends with
//! the same games, and ratings, as one run straight through.

mod config;
mod players;
mod report;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hangar_games::ai::{self, Message};
use hangar_games::rules::{Game, Kind, Outcome, Side};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use config::{Config, Fixture};
use players::{Seat, Thought};

#[derive(Subcommand)]
pub enum ArenaCommand {
    /// Play a tournament (or what is left of it) and write its reports
    Run(RunArgs),
    /// Write the reports of a results directory again
    Report {
        /// The results directory
        dir: PathBuf,
    },
    /// For bench/arena.sh: time the rating fit on a synthetic tournament
    /// (decisive games between players of known strength), and write its
    /// games (winner, loser) as JSON for the peer to fit the same data
    #[command(hide = true)]
    FitBench {
        #[arg(long, default_value_t = 100)]
        players: usize,
        #[arg(long, default_value_t = 100_000)]
        games: usize,
        #[arg(long)]
        pairs: PathBuf,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// The tournament's config (TOML)
    config: PathBuf,
    /// Where results and reports go (default: arena-<name>)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many games (for trying a config out)
    #[arg(long)]
    limit: Option<usize>,
}

pub async fn main(cmd: ArenaCommand) -> Result<()> {
    match cmd {
        ArenaCommand::Run(a) => {
            let cfg = Config::load(&a.config)?;
            let out = a
                .out
                .unwrap_or_else(|| PathBuf::from(format!("arena-{}", cfg.name)));
            run(&cfg, &out, a.limit).await?;
            let files = report::write(&out)?;
            println!("reports: {}", files.join(", "));
            Ok(())
        }
        ArenaCommand::FitBench {
            players,
            games,
            pairs,
        } => fit_bench(players, games, &pairs),
        ArenaCommand::Report { dir } => {
            let files = report::write(&dir)?;
            println!("reports: {}", files.join(", "));
            Ok(())
        }
    }
}

fn fit_bench(players: usize, games: usize, pairs: &Path) -> Result<()> {
    use hangar_games::rating::{fit_log_strengths, Score, SplitMix};
    if players < 2 {
        bail!("--players must be at least 2");
    }
    let mut rng = SplitMix(1);
    // True strengths spread over about 800 Elo points.
    let truth: Vec<f64> = (0..players).map(|_| (rng.unit() - 0.5) * 4.6).collect();
    let mut scores = Vec::with_capacity(games);
    for _ in 0..games {
        let a = (rng.next_u64() % players as u64) as usize;
        let b = (a + 1 + (rng.next_u64() % (players as u64 - 1)) as usize) % players;
        let p = 1.0 / (1.0 + (truth[b] - truth[a]).exp());
        let score = if rng.unit() < p { 1.0 } else { 0.0 };
        scores.push(Score {
            first: a,
            second: b,
            score,
        });
    }
    let mut times = Vec::new();
    let mut fit = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        fit = fit_log_strengths(players, &scores, 0);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let wl: Vec<[usize; 2]> = scores
        .iter()
        .map(|s| {
            if s.score > 0.5 {
                [s.first, s.second]
            } else {
                [s.second, s.first]
            }
        })
        .collect();
    std::fs::write(
        pairs,
        serde_json::to_string(&json!({ "players": players, "pairs": wl }))?,
    )?;
    println!(
        "{}",
        json!({ "players": players, "games": games, "fit_ms": times[2], "strengths": fit, "truth": truth })
    );
    Ok(())
}

/// One finished game.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GameResult {
    pub run: String,
    pub id: String,
    pub kind: Kind,
    pub first: String,
    pub second: String,
    /// `first`, `second`, `draw`, or `abandoned` (an endpoint failed:
    /// left out of the ratings).
    pub result: String,
    pub reason: String,
    /// The side that forfeited, if one did.
    pub forfeit: Option<Side>,
    pub moves: Vec<String>,
    pub ms: u64,
    /// Where it can be watched, when played on a server.
    pub url: Option<String>,
}

/// One answer asked of a player.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Call {
    pub run: String,
    pub game: String,
    pub player: String,
    pub side: Side,
    pub ply: usize,
    /// 0 for the first answer, 1 and 2 for the retries after bad ones.
    pub attempt: u32,
    /// The messages sent (endpoints only).
    pub prompt: Vec<Message>,
    pub raw: String,
    /// The legal move read from the answer.
    pub parsed: Option<String>,
    /// `legal`, `illegal`, `unreadable`, `unparsable` or `transport`.
    pub verdict: String,
    pub reason: Option<String>,
    pub latency_ms: f64,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    pub transport_retries: u32,
    pub p_legal: Option<f64>,
    pub p_win: Option<f64>,
}

/// The results directory's files.
pub struct Results {
    dir: PathBuf,
    games: Mutex<std::fs::File>,
    calls: Mutex<std::fs::File>,
}

/// Opens `path` for appending, first cutting a torn last line (a crash
/// mid-write) so the next line starts clean.
fn open_log(path: &Path) -> Result<std::fs::File> {
    if let Ok(bytes) = std::fs::read(path) {
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.set_len(keep as u64)?;
            f.sync_all()?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The lines of a JSONL file that parse (a torn last line does not).
pub fn read_log<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

impl Results {
    pub fn open(dir: &Path) -> Result<Results> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Results {
            dir: dir.into(),
            games: Mutex::new(open_log(&dir.join("games.jsonl"))?),
            calls: Mutex::new(open_log(&dir.join("calls.jsonl"))?),
        })
    }

    /// The finished games, each id once (the first).
    pub fn finished(&self) -> Result<Vec<GameResult>> {
        finished(&self.dir)
    }

    fn append(file: &Mutex<std::fs::File>, lines: &[String]) -> Result<()> {
        let mut f = file
            .lock()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))?;
        let mut buf = String::new();
        for l in lines {
            buf += l;
            buf.push('\n');
        }
        f.write_all(buf.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }

    /// A game's calls, then the game: once this returns it is kept.
    fn keep(&self, calls: &[Call], game: &GameResult) -> Result<()> {
        let lines: Vec<String> = calls
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        Results::append(&self.calls, &lines)?;
        Results::append(&self.games, &[serde_json::to_string(game)?])
    }
}

/// The finished games in `dir`, each id once (the first).
pub fn finished(dir: &Path) -> Result<Vec<GameResult>> {
    let mut seen = BTreeSet::new();
    Ok(read_log::<GameResult>(&dir.join("games.jsonl"))?
        .into_iter()
        .filter(|g| seen.insert(g.id.clone()))
        .collect())
}

/// The calls of the finished games in `dir` (not those of games cut
/// short by a crash).
pub fn kept_calls(dir: &Path, games: &[GameResult]) -> Result<Vec<Call>> {
    let kept: BTreeSet<(&str, &str)> = games
        .iter()
        .map(|g| (g.run.as_str(), g.id.as_str()))
        .collect();
    Ok(read_log::<Call>(&dir.join("calls.jsonl"))?
        .into_iter()
        .filter(|c| kept.contains(&(c.run.as_str(), c.game.as_str())))
        .collect())
}

/// Play what is left of the tournament `cfg` into `out`.
pub async fn run(cfg: &Config, out: &Path, limit: Option<usize>) -> Result<()> {
    let results = Arc::new(Results::open(out)?);
    let copy = out.join("config.toml");
    let text = toml::to_string(cfg)?;
    match std::fs::read_to_string(&copy) {
        Ok(old) if old != text => {
            let old_cfg: Config = toml::from_str(&old).context("the results' config.toml")?;
            if old_cfg.players != cfg.players {
                bail!(
                    "{} holds a tournament with other players: use another --out, or remove it",
                    out.display()
                );
            }
            std::fs::write(&copy, &text)?;
        }
        Ok(_) => {}
        Err(_) => std::fs::write(&copy, &text)?,
    }
    let done: BTreeSet<String> = results.finished()?.into_iter().map(|g| g.id).collect();
    let todo: Vec<Fixture> = cfg
        .schedule()
        .into_iter()
        .filter(|f| !done.contains(&f.id))
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let total = cfg.schedule().len();
    println!(
        "arena {}: {} games, {} done, {} to play",
        cfg.name,
        total,
        done.len(),
        todo.len()
    );
    let http = reqwest::Client::builder()
        .build()
        .context("building the HTTP client")?;
    let seats: Arc<Vec<Seat>> = Arc::new(
        cfg.players
            .iter()
            .map(|p| Seat::new(p, &http))
            .collect::<Result<_>>()?,
    );
    let run_id = format!("{:016x}", rand_u64());
    let games_at_once = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(done.len()));
    let server = cfg.server.clone().map(|base| Server {
        http: http.clone(),
        base: base.trim_end_matches('/').to_string(),
        host: cfg.server_host.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let began = Instant::now();
    for f in todo {
        let permit = games_at_once.clone().acquire_owned().await?;
        let (seats, results, run_id, counter) = (
            seats.clone(),
            results.clone(),
            run_id.clone(),
            counter.clone(),
        );
        let server = server.clone();
        let max_plies = cfg.max_plies;
        tasks.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let (game, calls) = play(&seats, &f, &run_id, max_plies, server.as_ref()).await;
            let game = GameResult {
                ms: started.elapsed().as_millis() as u64,
                ..game
            };
            results.keep(&calls, &game)?;
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            println!(
                "  {n}/{total} {} {} vs {}: {} ({}){}",
                game.kind.slug(),
                game.first,
                game.second,
                game.result,
                game.reason,
                game.url
                    .as_deref()
                    .map(|u| format!(" {u}"))
                    .unwrap_or_default()
            );
            Ok::<_, anyhow::Error>(())
        });
        // Collect what has finished, so errors surface early.
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let played = counter.load(std::sync::atomic::Ordering::SeqCst) - done.len();
    let secs = began.elapsed().as_secs_f64();
    println!(
        "played {played} games in {secs:.2} s ({:.1} games/s)",
        played as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

/// A games server the arena plays on, so people can watch.
#[derive(Clone)]
struct Server {
    http: reqwest::Client,
    base: String,
    host: Option<String>,
}

/// A game on the server: its code and the two players' identities.
struct Table {
    code: String,
    tokens: HashMap<Side, String>,
    url: String,
}

impl Server {
    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Result<Value> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(h) = &self.host {
            req = req.header("host", h);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value =
            serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "the games server answered {status} to {path}: {}",
                v["error"]
            );
        }
        Ok(v)
    }

    async fn open(&self, kind: Kind, first: &str, second: &str) -> Result<Table> {
        let made = self
            .post(
                "/api/games",
                None,
                json!({ "kind": kind.slug(), "name": first }),
            )
            .await?;
        let code = made["code"]
            .as_str()
            .context("no code from the server")?
            .to_string();
        let first_id = made["player"].as_str().context("no player id")?.to_string();
        let joined = self
            .post(
                &format!("/api/games/{code}/join"),
                None,
                json!({ "name": second }),
            )
            .await?;
        let second_id = joined["player"]
            .as_str()
            .context("no player id")?
            .to_string();
        let shown = self.host.as_ref().map_or(self.base.clone(), |h| {
            let port = self.base.rsplit(':').next().unwrap_or("80");
            format!("http://{h}:{port}")
        });
        Ok(Table {
            url: format!("{shown}/g/{code}"),
            code,
            tokens: HashMap::from([(Side::First, first_id), (Side::Second, second_id)]),
        })
    }

    async fn play(&self, t: &Table, side: Side, mv: &str, n: usize) -> Result<()> {
        self.post(
            &format!("/api/games/{}/moves", t.code),
            t.tokens.get(&side).map(String::as_str),
            json!({ "move": mv, "n": n }),
        )
        .await
        .map(|_| ())
    }
}

/// Answers per move: the first and at most two retries.
const ATTEMPTS: u32 = 3;

/// Play one game: its result and every call made.
async fn play(
    seats: &[Seat],
    f: &Fixture,
    run: &str,
    max_plies: usize,
    server: Option<&Server>,
) -> (GameResult, Vec<Call>) {
    let (a, b) = (&seats[f.first], &seats[f.second]);
    let mut result = GameResult {
        run: run.into(),
        id: f.id.clone(),
        kind: f.kind,
        first: a.cfg.name.clone(),
        second: b.cfg.name.clone(),
        result: "abandoned".into(),
        reason: String::new(),
        forfeit: None,
        moves: Vec::new(),
        ms: 0,
        url: None,
    };
    let mut calls = Vec::new();
    let table = match server {
        Some(s) => match s.open(f.kind, &a.cfg.name, &b.cfg.name).await {
            Ok(t) => {
                println!(
                    "  watch {} {} vs {}: {}",
                    f.kind.slug(),
                    a.cfg.name,
                    b.cfg.name,
                    t.url
                );
                result.url = Some(t.url.clone());
                Some(t)
            }
            Err(e) => {
                result.reason = format!("{e:#}");
                return (result, calls);
            }
        },
        None => None,
    };
    let minds = async { Ok::<_, anyhow::Error>((a.mind().await?, b.mind().await?)) };
    let (mut mind_a, mut mind_b) = match minds.await {
        Ok(m) => m,
        Err(e) => {
            result.reason = format!("{e:#}");
            return (result, calls);
        }
    };
    let mut game = f.kind.start();
    let mut moves: Vec<String> = Vec::new();
    let outcome = loop {
        if let Some(o) = game.outcome() {
            break Ok(o);
        }
        if moves.len() >= max_plies {
            result.reason = format!("adjudicated a draw after {max_plies} plies");
            break Ok(Outcome::Draw);
        }
        let side = game.to_move();
        let (seat, mind) = match side {
            Side::First => (a, &mut mind_a),
            Side::Second => (b, &mut mind_b),
        };
        match turn(seat, mind, game.as_ref(), &moves, f, run, &mut calls).await {
            Ok(Some(mv)) => {
                if let Err(e) = game.play(&mv) {
                    break Err(format!("the move read, {mv}, did not play: {e}"));
                }
                if let (Some(s), Some(t)) = (server, &table) {
                    if let Err(e) = s.play(t, side, &mv, moves.len()).await {
                        break Err(format!("{e:#}"));
                    }
                }
                moves.push(mv);
            }
            Ok(None) => {
                result.forfeit = Some(side);
                result.reason = format!("{} forfeits after {ATTEMPTS} bad answers", seat.cfg.name);
                break Ok(Outcome::Win(side.other()));
            }
            Err(e) => break Err(format!("{e:#}")),
        }
    };
    result.moves = moves;
    match outcome {
        Ok(o) => {
            if result.reason.is_empty() {
                result.reason = match o {
                    Outcome::Win(_) => "won on the board".into(),
                    Outcome::Draw => "drawn on the board".into(),
                };
            }
            result.result = match o {
                Outcome::Win(Side::First) => "first",
                Outcome::Win(Side::Second) => "second",
                Outcome::Draw => "draw",
            }
            .into();
        }
        Err(e) => result.reason = e,
    }
    (result, calls)
}

/// One move: ask, read, retry with the reason after a bad answer. None
/// when every answer was bad (a forfeit); an error when the player could
/// not be reached at all.
async fn turn(
    seat: &Seat,
    mind: &mut players::Mind,
    game: &dyn Game,
    moves: &[String],
    f: &Fixture,
    run: &str,
    calls: &mut Vec<Call>,
) -> Result<Option<String>> {
    let opts = seat.cfg.prompt();
    let mut messages = ai::prompt(game, moves, &opts);
    let seed = f.seed ^ (moves.len() as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    for attempt in 0..ATTEMPTS {
        let started = Instant::now();
        let thought = seat.think(mind, game, moves, &messages, seed).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut call = Call {
            run: run.into(),
            game: f.id.clone(),
            player: seat.cfg.name.clone(),
            side: game.to_move(),
            ply: moves.len(),
            attempt,
            prompt: if seat.is_endpoint() {
                messages.clone()
            } else {
                Vec::new()
            },
            raw: String::new(),
            parsed: None,
            verdict: "transport".into(),
            reason: None,
            latency_ms,
            tokens_in: None,
            tokens_out: None,
            transport_retries: 0,
            p_legal: None,
            p_win: None,
        };
        let Thought {
            raw,
            p_win,
            tokens_in,
            tokens_out,
            transport_retries,
        } = match thought {
            Ok(t) => t,
            Err(e) => {
                call.reason = Some(format!("{e:#}"));
                calls.push(call);
                return Err(e);
            }
        };
        let reading = ai::read(game, &raw);
        call.raw = raw.clone();
        call.tokens_in = tokens_in;
        call.tokens_out = tokens_out;
        call.transport_retries = transport_retries;
        call.p_legal = if seat.is_endpoint() {
            reading.p_legal
        } else {
            Some(1.0)
        };
        call.p_win = reading.p_win.or(p_win);
        match reading.verdict {
            Ok(mv) => {
                call.parsed = Some(mv.clone());
                call.verdict = "legal".into();
                calls.push(call);
                return Ok(Some(mv));
            }
            Err(refusal) => {
                call.verdict = refusal.kind().into();
                call.reason = Some(refusal.reason().into());
                calls.push(call);
                messages.push(Message::new("assistant", raw));
                messages.push(ai::retry_message(refusal.reason()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("games.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let read: Vec<Value> = read_log(&path).unwrap();
        assert_eq!(read.len(), 2, "the torn line is not read");
        let file = Mutex::new(open_log(&path).unwrap());
        Results::append(&file, &["{\"a\":3}".to_string()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
        assert!(read_log::<Value>(&dir.path().join("none.jsonl"))
            .unwrap()
            .is_empty());
    }
}
