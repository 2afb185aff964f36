//! `hangar-games scripted-model`: an OpenAI-compatible chat-completions
//! server with scripted players, for the arena's tests and benchmark
//! (the machines here reach no model service). The request's `model`
//! picks the strategy, which plays from the position in the prompt:
//!
//! - `first-legal`, `random`, `minimax` (`minimax-N` for depth N);
//! - `always-illegal` (a move that is not legal, every time), `garbage`
//!   (text with no move);
//! - `slow` (`slow-MS`, default 2000 ms, then first-legal);
//! - `429-then-ok` and `500-then-ok` (each distinct request fails once);
//! - `calibrated` and `overconfident`: each answer picks a confidence c,
//!   then gives a legal move with chance c; the first reports c, the
//!   second always 0.99. Both report their search's chance of winning.
//!
//! Random choices are seeded from the request, so a game replays the same.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Args;
use hangar_games::ai::read_prompt;
use hangar_games::engine::Engine;
use hangar_games::rating::{fnv1a, SplitMix};
use hangar_games::rules::{Game, Kind};
use serde_json::{json, Value};

#[derive(Args)]
pub struct ScriptedArgs {
    /// Where to listen (port 0: any free port; the address is printed)
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Require this bearer token
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(Default)]
struct Scripted {
    key: Option<String>,
    /// Requests already failed once (429-then-ok, 500-then-ok).
    failed: Mutex<HashSet<u64>>,
}

pub async fn main(a: ScriptedArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let state = Arc::new(Scripted {
        key: a.api_key,
        ..Scripted::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": { "message": message } }))).into_response()
}

async fn complete(State(s): State<Arc<Scripted>>, headers: HeaderMap, body: String) -> Response {
    if let Some(k) = &s.key {
        let sent = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(k.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "bad API key");
        }
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let first_user = messages
        .iter()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let Some((kind, moves)) = read_prompt(first_user) else {
        return error(
            StatusCode::BAD_REQUEST,
            "no Game: and Moves so far: lines in the prompt",
        );
    };
    let Ok(game) = kind.replay(&moves) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the moves in the prompt do not replay",
        );
    };
    let seed = fnv1a(body.as_bytes());
    let (name, arg) = match model.rsplit_once('-') {
        Some((n, a)) if a.chars().all(|c| c.is_ascii_digit()) => (n.to_string(), a.parse().ok()),
        _ => (model.clone(), None),
    };
    let mut rng = SplitMix(seed);
    let content = match name.as_str() {
        "first-legal" => format!("MOVE: {}", pick(&Engine::FirstLegal, game.as_ref(), seed).0),
        "random" => format!("MOVE: {}", pick(&Engine::Random, game.as_ref(), seed).0),
        "minimax" => {
            let depth = arg.unwrap_or(4) as u32;
            format!(
                "MOVE: {}",
                pick(&Engine::Minimax { depth }, game.as_ref(), seed).0
            )
        }
        "always-illegal" => format!("MOVE: {}", illegal(game.as_ref(), &mut rng)),
        "garbage" => "I would rather talk about the weather.".into(),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(arg.unwrap_or(2000))).await;
            format!("MOVE: {}", pick(&Engine::FirstLegal, game.as_ref(), seed).0)
        }
        "429-then-ok" | "500-then-ok" => {
            let first_time = s.failed.lock().map(|mut f| f.insert(seed)).unwrap_or(false);
            if first_time {
                let status = if name.starts_with("429") {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                return error(status, "try again");
            }
            format!("MOVE: {}", pick(&Engine::Random, game.as_ref(), seed).0)
        }
        "calibrated" | "overconfident" => {
            let c = 0.3 + 0.65 * rng.unit();
            let (mv, win) = if rng.unit() < c {
                pick(&Engine::Minimax { depth: 2 }, game.as_ref(), seed)
            } else {
                (illegal(game.as_ref(), &mut rng), 0.5)
            };
            let stated = if name == "calibrated" { c } else { 0.99 };
            format!("MOVE: {mv} CONFIDENCE: {stated:.3} WIN: {win:.3}")
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no scripted model {model:?}: see hangar-games scripted-model --help"),
            )
        }
    };
    let words = |t: &str| t.split_whitespace().count() as u64;
    let prompt_tokens: u64 = messages
        .iter()
        .map(|m| words(m["content"].as_str().unwrap_or_default()))
        .sum();
    Json(json!({
        "id": format!("chatcmpl-{seed:016x}"),
        "object": "chat.completion",
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": words(&content), "total_tokens": prompt_tokens + words(&content) },
    }))
    .into_response()
}

fn pick(e: &Engine, game: &dyn Game, seed: u64) -> (String, f64) {
    e.choose(game, seed)
        .map_or(("resign".into(), 0.0), |c| (c.mv, c.win))
}

/// A move that is not legal here: a taken cell, a full or missing
/// column, a chess move no piece can make.
fn illegal(game: &dyn Game, rng: &mut SplitMix) -> String {
    let legal = game.legal_moves();
    let candidates: Vec<String> = match game.kind() {
        Kind::TicTacToe => ["a", "b", "c"]
            .iter()
            .flat_map(|c| (1..=3).map(move |r| format!("{c}{r}")))
            .chain(["d4".to_string()])
            .collect(),
        Kind::ConnectFour => (1..=8).map(|c| c.to_string()).collect(),
        Kind::Chess => ["e2e5", "a1a8", "h1h8", "e1e3", "d1d8", "g8g1"]
            .map(String::from)
            .to_vec(),
    };
    let bad: Vec<&String> = candidates.iter().filter(|c| !legal.contains(c)).collect();
    bad[(rng.next_u64() % bad.len() as u64) as usize].clone()
}
