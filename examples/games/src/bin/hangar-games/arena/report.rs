//! The reports of a results directory, all made from its files alone:
//! the leaderboard (`leaderboard.json`, `leaderboard.html`), the
//! calibration report (`calibration.json`, `calibration.html`, an SVG
//! reliability diagram per player, game and question) and, for every
//! model behind an endpoint, the one-model report (`model-<name>.json`,
//! `.html`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use hangar_games::calibration::{self, escape};
use hangar_games::rating::{bradley_terry, online_elo, quantile, Score};
use hangar_games::rules::{Kind, Side};
use serde::Serialize;
use serde_json::{json, Value};

use super::{finished, kept_calls, Call, Config, GameResult};

/// Calibration is reported from this many forecasts up.
const MIN_FORECASTS: usize = 10;

#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub name: String,
    pub rating: f64,
    pub low: f64,
    pub high: f64,
    pub elo: f64,
    pub games: usize,
    pub wins: usize,
    pub draws: usize,
    pub losses: usize,
    pub forfeits: usize,
    pub forfeit_rate: f64,
    pub answers: usize,
    pub bad_answers: usize,
    pub illegal_rate: f64,
    pub moves: usize,
    pub mean_latency_ms: f64,
    pub tokens_per_move: Option<f64>,
    pub transport_retries: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Pool {
    /// A game's slug, or `all` for every game pooled.
    pub game: String,
    pub games: usize,
    pub players: Vec<Row>,
}

/// Whether game `g` is in pool `pool`.
fn in_pool(g: &GameResult, pool: Option<Kind>) -> bool {
    pool.is_none_or(|k| g.kind == k)
}

/// The score of the first player, for a game that counts.
fn score(g: &GameResult) -> Option<f64> {
    match g.result.as_str() {
        "first" => Some(1.0),
        "second" => Some(0.0),
        "draw" => Some(0.5),
        _ => None,
    }
}

/// The leaderboard of one pool.
pub fn pool(cfg: &Config, games: &[GameResult], calls: &[Call], kind: Option<Kind>) -> Pool {
    let n = cfg.players.len();
    let idx = |name: &str| cfg.index(name);
    let counted: Vec<&GameResult> = games
        .iter()
        .filter(|g| in_pool(g, kind) && score(g).is_some())
        .collect();
    let scores: Vec<Score> = counted
        .iter()
        .filter_map(|g| {
            Some(Score {
                first: idx(&g.first)?,
                second: idx(&g.second)?,
                score: score(g)?,
            })
        })
        .collect();
    let seed = super::config::fnv(&format!("{}:{kind:?}", cfg.name)) ^ cfg.seed;
    let rated = bradley_terry(
        n,
        &scores,
        cfg.anchor_index(),
        cfg.anchor_rating,
        cfg.bootstrap,
        0.95,
        seed,
    );
    let elo = online_elo(n, &scores, 16.0, cfg.anchor_rating);
    let kinds: BTreeMap<&str, Kind> = games.iter().map(|g| (g.id.as_str(), g.kind)).collect();
    let mut rows = Vec::new();
    for (i, p) in cfg.players.iter().enumerate() {
        let mine: Vec<&&GameResult> = counted
            .iter()
            .filter(|g| g.first == p.name || g.second == p.name)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let side_of = |g: &GameResult| {
            if g.first == p.name {
                Side::First
            } else {
                Side::Second
            }
        };
        let won = |g: &GameResult, s: Side| {
            matches!(
                (g.result.as_str(), s),
                ("first", Side::First) | ("second", Side::Second)
            )
        };
        let wins = mine.iter().filter(|g| won(g, side_of(g))).count();
        let draws = mine.iter().filter(|g| g.result == "draw").count();
        let forfeits = mine
            .iter()
            .filter(|g| g.forfeit == Some(side_of(g)))
            .count();
        let my_calls: Vec<&Call> = calls
            .iter()
            .filter(|c| {
                c.player == p.name
                    && c.verdict != "transport"
                    && kinds
                        .get(c.game.as_str())
                        .is_some_and(|k| kind.is_none_or(|want| want == *k))
            })
            .collect();
        let answers = my_calls.len();
        let bad = my_calls.iter().filter(|c| c.verdict != "legal").count();
        let moves = answers - bad;
        let latency: f64 = my_calls.iter().map(|c| c.latency_ms).sum();
        let tokens: Vec<u64> = my_calls
            .iter()
            .filter_map(|c| Some(c.tokens_in? + c.tokens_out?))
            .collect();
        rows.push(Row {
            name: p.name.clone(),
            rating: rated[i].rating,
            low: rated[i].low,
            high: rated[i].high,
            elo: elo[i],
            games: mine.len(),
            wins,
            draws,
            losses: mine.len() - wins - draws,
            forfeits,
            forfeit_rate: forfeits as f64 / mine.len() as f64,
            answers,
            bad_answers: bad,
            illegal_rate: if answers == 0 {
                0.0
            } else {
                bad as f64 / answers as f64
            },
            moves,
            mean_latency_ms: if moves == 0 {
                0.0
            } else {
                latency / moves as f64
            },
            tokens_per_move: (!tokens.is_empty() && moves > 0)
                .then(|| tokens.iter().sum::<u64>() as f64 / moves as f64),
            transport_retries: my_calls
                .iter()
                .map(|c| u64::from(c.transport_retries))
                .sum(),
        });
    }
    rows.sort_by(|a, b| b.rating.total_cmp(&a.rating));
    Pool {
        game: kind.map_or("all".into(), |k| k.slug().into()),
        games: counted.len(),
        players: rows,
    }
}

/// The forecasts of one player's answers: `legal` (that the move is
/// legal, endpoints only) or `win` (that the mover wins).
fn forecasts(
    calls: &[Call],
    games: &BTreeMap<&str, &GameResult>,
    player: &str,
    kind: Option<Kind>,
    target: &str,
    keep: impl Fn(&Call) -> bool,
) -> (Vec<f64>, Vec<bool>) {
    let mut p = Vec::new();
    let mut y = Vec::new();
    for c in calls.iter().filter(|c| c.player == player && keep(c)) {
        let Some(g) = games.get(c.game.as_str()) else {
            continue;
        };
        if !in_pool(g, kind) || c.verdict == "transport" {
            continue;
        }
        match target {
            "legal" => {
                if let (Some(pl), false) = (c.p_legal, c.prompt.is_empty()) {
                    p.push(pl);
                    y.push(c.verdict == "legal");
                }
            }
            _ => {
                if let (Some(pw), "legal") = (c.p_win, c.verdict.as_str()) {
                    if score(g).is_none() {
                        continue;
                    }
                    p.push(pw);
                    y.push(matches!(
                        (g.result.as_str(), c.side),
                        ("first", Side::First) | ("second", Side::Second)
                    ));
                }
            }
        }
    }
    (p, y)
}

#[derive(Serialize)]
struct CalibrationEntry {
    player: String,
    game: String,
    target: String,
    svg: String,
    report: calibration::Report,
}

fn file_name(t: &str) -> String {
    t.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Write every report for `dir`; the names of the files written.
pub fn write(dir: &Path) -> Result<Vec<String>> {
    let cfg: Config = toml::from_str(
        &std::fs::read_to_string(dir.join("config.toml"))
            .with_context(|| format!("{} holds no tournament (no config.toml)", dir.display()))?,
    )?;
    let mut games = finished(dir)?;
    // In the schedule's order, not the order they finished in, so online
    // Elo and the bootstrap see the same sequence however the games ran.
    let order: BTreeMap<String, usize> = cfg
        .schedule()
        .into_iter()
        .enumerate()
        .map(|(i, f)| (f.id, i))
        .collect();
    games.sort_by_key(|g| order.get(&g.id).copied().unwrap_or(usize::MAX));
    let calls = kept_calls(dir, &games)?;
    let mut written = Vec::new();

    // The leaderboard.
    let mut pools = Vec::new();
    for k in &cfg.games {
        pools.push(pool(&cfg, &games, &calls, Some(*k)));
    }
    if cfg.games.len() > 1 {
        pools.push(pool(&cfg, &games, &calls, None));
    }
    let abandoned: Vec<Value> = games
        .iter()
        .filter(|g| g.result == "abandoned")
        .map(|g| json!({ "id": g.id, "reason": g.reason }))
        .collect();
    let board = json!({
        "name": cfg.name,
        "anchor": cfg.players[cfg.anchor_index()].name,
        "anchor_rating": cfg.anchor_rating,
        "scheduled": cfg.schedule().len(),
        "finished": games.len(),
        "abandoned": abandoned,
        "pools": pools,
    });
    std::fs::write(
        dir.join("leaderboard.json"),
        serde_json::to_string_pretty(&board)?,
    )?;
    std::fs::write(
        dir.join("leaderboard.html"),
        leaderboard_html(&cfg, &pools, &games),
    )?;
    written.extend([
        "leaderboard.json".to_string(),
        "leaderboard.html".to_string(),
    ]);

    // Calibration.
    let by_id: BTreeMap<&str, &GameResult> = games.iter().map(|g| (g.id.as_str(), g)).collect();
    let svg_dir = dir.join("calibration");
    std::fs::create_dir_all(&svg_dir)?;
    let mut entries = Vec::new();
    let mut pools_k: Vec<Option<Kind>> = cfg.games.iter().copied().map(Some).collect();
    if cfg.games.len() > 1 {
        pools_k.push(None);
    }
    for p in &cfg.players {
        for kind in &pools_k {
            for target in ["legal", "win"] {
                let (pr, y) = forecasts(&calls, &by_id, &p.name, *kind, target, |_| true);
                if pr.len() < MIN_FORECASTS {
                    continue;
                }
                let game = kind.map_or("all".to_string(), |k| k.slug().into());
                let r = calibration::report(&pr, &y, 10, 500, 0.95, super::config::fnv(&p.name));
                let svg = format!("{}-{game}-{target}.svg", file_name(&p.name));
                let title = format!(
                    "{}, {game}: P({})",
                    p.name,
                    if target == "legal" {
                        "legal move"
                    } else {
                        "win"
                    }
                );
                std::fs::write(svg_dir.join(&svg), calibration::svg(&r, &title))?;
                entries.push(CalibrationEntry {
                    player: p.name.clone(),
                    game,
                    target: target.into(),
                    svg: format!("calibration/{svg}"),
                    report: r,
                });
            }
        }
    }
    std::fs::write(
        dir.join("calibration.json"),
        serde_json::to_string_pretty(&entries)?,
    )?;
    std::fs::write(
        dir.join("calibration.html"),
        calibration_html(&cfg, &entries),
    )?;
    written.extend([
        "calibration.json".to_string(),
        "calibration.html".to_string(),
    ]);

    // One report per model behind an endpoint.
    let mut models: BTreeMap<String, Vec<&super::config::PlayerConfig>> = BTreeMap::new();
    for p in cfg.players.iter().filter(|p| p.base_url.is_some()) {
        models
            .entry(p.model.clone().unwrap_or_default())
            .or_default()
            .push(p);
    }
    for (model, players) in models {
        let r = model_report(&model, &players, &games, &calls, &by_id);
        let name = format!("model-{}", file_name(&model));
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(&r)?,
        )?;
        std::fs::write(dir.join(format!("{name}.html")), model_html(&r))?;
        written.extend([format!("{name}.json"), format!("{name}.html")]);
    }
    Ok(written)
}

/// Where in a game a ply is.
fn phase(kind: Kind, ply: usize) -> &'static str {
    let (open, mid) = match kind {
        Kind::TicTacToe => (3, 6),
        Kind::ConnectFour => (10, 25),
        Kind::Chess => (20, 60),
    };
    if ply < open {
        "opening"
    } else if ply < mid {
        "middle"
    } else {
        "end"
    }
}

/// The one-model report: where the model fails, how its calibration
/// changes with the game and the prompt, and what a move costs.
fn model_report(
    model: &str,
    players: &[&super::config::PlayerConfig],
    games: &[GameResult],
    calls: &[Call],
    by_id: &BTreeMap<&str, &GameResult>,
) -> Value {
    let mut variants = Vec::new();
    for p in players {
        let mut per_game = Vec::new();
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| {
                games
                    .iter()
                    .any(|g| g.kind == *k && (g.first == p.name || g.second == p.name))
            })
            .collect();
        for kind in kinds {
            let mine: Vec<&Call> = calls
                .iter()
                .filter(|c| {
                    c.player == p.name && by_id.get(c.game.as_str()).is_some_and(|g| g.kind == kind)
                })
                .collect();
            let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
            let mut by_phase: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            let mut examples = Vec::new();
            for c in &mine {
                let e = by_phase.entry(phase(kind, c.ply)).or_default();
                e.0 += 1;
                if c.verdict != "legal" {
                    *failures.entry(c.verdict.as_str()).or_default() += 1;
                    e.1 += 1;
                    if examples.len() < 5 {
                        examples.push(json!({
                            "game": c.game, "ply": c.ply, "attempt": c.attempt,
                            "verdict": c.verdict, "answer": c.raw, "reason": c.reason,
                        }));
                    }
                }
            }
            let played: Vec<&GameResult> = games
                .iter()
                .filter(|g| g.kind == kind && (g.first == p.name || g.second == p.name))
                .collect();
            let forfeits = played
                .iter()
                .filter(|g| {
                    let side = if g.first == p.name {
                        Side::First
                    } else {
                        Side::Second
                    };
                    g.forfeit == Some(side)
                })
                .count();
            let moves: Vec<&&Call> = mine.iter().filter(|c| c.verdict == "legal").collect();
            let mut lat: Vec<f64> = mine.iter().map(|c| c.latency_ms).collect();
            lat.sort_by(f64::total_cmp);
            let tin: u64 = mine.iter().filter_map(|c| c.tokens_in).sum();
            let tout: u64 = mine.iter().filter_map(|c| c.tokens_out).sum();
            let per_move = |x: f64| {
                if moves.is_empty() {
                    0.0
                } else {
                    x / moves.len() as f64
                }
            };
            let cost = match (p.price_in, p.price_out) {
                (Some(a), Some(b)) => Some(per_move((tin as f64 * a + tout as f64 * b) / 1e6)),
                _ => None,
            };
            let mut calib = serde_json::Map::new();
            for target in ["legal", "win"] {
                let (pr, y) = forecasts(calls, by_id, &p.name, Some(kind), target, |_| true);
                if pr.len() >= MIN_FORECASTS {
                    let r = calibration::report(&pr, &y, 10, 200, 0.95, 1);
                    calib.insert(
                        target.into(),
                        json!({ "n": r.n, "ece": r.ece, "brier": r.brier.score, "auroc": r.auroc }),
                    );
                }
            }
            per_game.push(json!({
                "game": kind.slug(),
                "games": played.len(),
                "forfeits": forfeits,
                "answers": mine.len(),
                "moves": moves.len(),
                "failures": failures,
                "failures_by_phase": by_phase.iter().map(|(k, (n, bad))| (k.to_string(), json!({"answers": n, "bad": bad}))).collect::<serde_json::Map<_, _>>(),
                "examples": examples,
                "calibration": calib,
                "latency_ms": { "mean": per_move(lat.iter().sum()), "p50": quantile(&lat, 0.5), "p99": quantile(&lat, 0.99) },
                "tokens_in_per_move": per_move(tin as f64),
                "tokens_out_per_move": per_move(tout as f64),
                "cost_per_move": cost,
            }));
        }
        variants.push(json!({ "player": p.name, "variant": p.variant(), "games": per_game }));
    }
    json!({ "model": model, "variants": variants })
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}td,th{padding:.3em .7em;white-space:nowrap;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}.ci{display:inline-block;height:.6em;background:#9bd;vertical-align:middle}";

fn leaderboard_html(cfg: &Config, pools: &[Pool], games: &[GameResult]) -> String {
    let mut h = format!(
        "<!doctype html><meta charset=utf-8><title>{0} leaderboard</title><style>{STYLE}</style><h1>{0}</h1><p>{1} games finished of {2}; ratings are Bradley–Terry on an Elo scale, {3} pinned at {4}, with bootstrap 95% intervals. <a href=calibration.html>Calibration</a></p>",
        escape(&cfg.name),
        games.len(),
        cfg.schedule().len(),
        escape(&cfg.players[cfg.anchor_index()].name),
        cfg.anchor_rating
    );
    for p in pools {
        h += &format!(
            "<h2>{}</h2><table><tr><th>player<th>rating<th>95% interval<th>online Elo<th>games<th>W-D-L<th>forfeits<th>illegal answers<th>ms per move<th>tokens per move</tr>",
            escape(&p.game)
        );
        for r in &p.players {
            h += &format!(
                "<tr><td>{}<td>{:.0}<td>{:.0} to {:.0}<td>{:.0}<td>{}<td>{}-{}-{}<td>{:.1}%<td>{:.1}%<td>{:.1}<td>{}</tr>",
                escape(&r.name),
                r.rating,
                r.low,
                r.high,
                r.elo,
                r.games,
                r.wins,
                r.draws,
                r.losses,
                100.0 * r.forfeit_rate,
                100.0 * r.illegal_rate,
                r.mean_latency_ms,
                r.tokens_per_move.map_or("–".into(), |t| format!("{t:.0}"))
            );
        }
        h += "</table>";
    }
    let watch: Vec<&GameResult> = games
        .iter()
        .filter(|g| g.url.is_some())
        .rev()
        .take(10)
        .collect();
    if !watch.is_empty() {
        h += "<h2>Recent games</h2><ul>";
        for g in watch {
            let url = g.url.as_deref().unwrap_or_default();
            h += &format!(
                "<li><a href=\"{}\">{} vs {}</a>: {}</li>",
                escape(url),
                escape(&g.first),
                escape(&g.second),
                escape(&g.reason)
            );
        }
        h += "</ul>";
    }
    h
}

fn calibration_html(cfg: &Config, entries: &[CalibrationEntry]) -> String {
    let mut h = format!(
        "<!doctype html><meta charset=utf-8><title>{0} calibration</title><style>{STYLE}</style><h1>{0}: calibration</h1><p>How well each player's stated probabilities match what happened: that its move is legal (endpoints asked for a confidence), and that it wins. Intervals are bootstrap 95%. <a href=leaderboard.html>Leaderboard</a></p><table><tr><th>player<th>game<th>question<th>n<th>ECE<th>MCE<th>ECE (equal mass)<th>Brier<th>reliability<th>resolution<th>uncertainty<th>log loss<th>AUROC</tr>",
        escape(&cfg.name)
    );
    let ci = |e: &calibration::Estimate| format!("{:.3} ({:.3}–{:.3})", e.value, e.low, e.high);
    for e in entries {
        let r = &e.report;
        h += &format!(
            "<tr><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{:.4}<td>{:.4}<td>{:.4}<td>{:.4}<td>{:.4}<td>{}</tr>",
            escape(&e.player),
            escape(&e.game),
            e.target,
            r.n,
            ci(&r.ece),
            ci(&r.mce),
            ci(&r.ece_equal_mass),
            r.brier.score,
            r.brier.reliability,
            r.brier.resolution,
            r.brier.uncertainty,
            r.log_loss,
            r.auroc.map_or("–".into(), |a| format!("{a:.3}"))
        );
    }
    h += "</table>";
    for e in entries {
        h += &format!(
            "<img src=\"{}\" alt=\"reliability diagram\">",
            escape(&e.svg)
        );
    }
    h
}

fn model_html(r: &Value) -> String {
    let model = r["model"].as_str().unwrap_or_default();
    let mut h = format!(
        "<!doctype html><meta charset=utf-8><title>{0}</title><style>{STYLE}</style><h1>Model {0}</h1><table><tr><th>variant<th>game<th>games<th>forfeits<th>answers<th>illegal<th>unreadable<th>unparsable<th>bad: opening / middle / end<th>ECE legal<th>ECE win<th>ms per move (p50, p99)<th>tokens per move<th>cost per move</tr>",
        escape(model)
    );
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    for v in r["variants"].as_array().into_iter().flatten() {
        for g in v["games"].as_array().into_iter().flatten() {
            let f = &g["failures"];
            let ph = |p: &str| {
                let x = &g["failures_by_phase"][p];
                format!(
                    "{}/{}",
                    x["bad"].as_u64().unwrap_or(0),
                    x["answers"].as_u64().unwrap_or(0)
                )
            };
            let ece = |t: &str| {
                g["calibration"][t]["ece"]["value"]
                    .as_f64()
                    .map_or("–".into(), |e| format!("{e:.3}"))
            };
            h += &format!(
                "<tr><td>{} ({})<td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td>{} · {} · {}<td>{}<td>{}<td>{:.1} ({:.1}, {:.1})<td>{:.0}<td>{}</tr>",
                escape(v["variant"].as_str().unwrap_or_default()),
                escape(v["player"].as_str().unwrap_or_default()),
                escape(g["game"].as_str().unwrap_or_default()),
                g["games"],
                g["forfeits"],
                g["answers"],
                f["illegal"].as_u64().unwrap_or(0),
                f["unreadable"].as_u64().unwrap_or(0),
                f["unparsable"].as_u64().unwrap_or(0),
                ph("opening"),
                ph("middle"),
                ph("end"),
                ece("legal"),
                ece("win"),
                num(&g["latency_ms"]["mean"]),
                num(&g["latency_ms"]["p50"]),
                num(&g["latency_ms"]["p99"]),
                num(&g["tokens_in_per_move"]) + num(&g["tokens_out_per_move"]),
                g["cost_per_move"].as_f64().map_or("–".into(), |c| format!("${c:.5}"))
            );
        }
    }
    h += "</table><h2>Examples of bad answers</h2><ul>";
    for v in r["variants"].as_array().into_iter().flatten() {
        for g in v["games"].as_array().into_iter().flatten() {
            for e in g["examples"].as_array().into_iter().flatten() {
                h += &format!(
                    "<li>{} {} ply {}: <code>{}</code>: {}</li>",
                    escape(v["variant"].as_str().unwrap_or_default()),
                    escape(g["game"].as_str().unwrap_or_default()),
                    e["ply"],
                    escape(e["answer"].as_str().unwrap_or_default()),
                    escape(e["reason"].as_str().unwrap_or_default())
                );
            }
        }
    }
    h + "</ul>"
}
