//! The tournament's configuration file (TOML) and the schedule it makes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use hangar_games::ai::PromptOptions;
use hangar_games::record::display_name;
use hangar_games::rules::Kind;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The tournament's name (the leaderboard's title).
    #[serde(default = "default_name")]
    pub name: String,
    /// The games played, each a separate pool of the ratings.
    pub games: Vec<Kind>,
    /// Round robin: games per pair and game, colours alternated.
    #[serde(default = "default_per_pair")]
    pub per_pair: usize,
    /// A given schedule instead of the round robin.
    #[serde(default)]
    pub pairing: Vec<Pairing>,
    /// Games played at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The player pinned at `anchor_rating` (the first player if unset).
    #[serde(default)]
    pub anchor: Option<String>,
    #[serde(default = "default_anchor_rating")]
    pub anchor_rating: f64,
    /// Bootstrap resamplings for the intervals.
    #[serde(default = "default_rounds")]
    pub bootstrap: usize,
    /// Seeds every random choice, so a tournament replays the same.
    #[serde(default)]
    pub seed: u64,
    /// A game longer than this many plies is adjudicated a draw.
    #[serde(default = "default_max_plies")]
    pub max_plies: usize,
    /// A games server (`http://host:port`) to play on, so every game can
    /// be watched in a browser; games are played in-process without it.
    #[serde(default)]
    pub server: Option<String>,
    /// The Host header for `server` (for an edge: `games.localhost`).
    #[serde(default)]
    pub server_host: Option<String>,
    #[serde(rename = "player")]
    pub players: Vec<PlayerConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pairing {
    pub game: Kind,
    pub first: String,
    pub second: String,
    #[serde(default = "one")]
    pub games: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlayerConfig {
    pub name: String,
    /// A built-in engine: random, first-legal, minimax, perfect, stockfish.
    #[serde(default)]
    pub engine: Option<String>,
    /// minimax / stockfish search depth.
    #[serde(default)]
    pub depth: Option<u32>,
    /// stockfish: time per move instead of a depth.
    #[serde(default)]
    pub movetime_ms: Option<u64>,
    /// stockfish: Skill Level, 0 to 20.
    #[serde(default)]
    pub skill: Option<u32>,
    /// stockfish's path (found on PATH or in /usr/games by default).
    #[serde(default)]
    pub path: Option<String>,
    /// An OpenAI-compatible endpoint: `https://api.example.com/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// The environment variable holding the API key (a Hangar secret is
    /// one on the app's machines).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Calls to this endpoint at once.
    #[serde(default = "default_player_concurrency")]
    pub concurrency: usize,
    /// Retries of timeouts, 429s and 5xx (with backoff) per move.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// List the legal moves in the prompt.
    #[serde(default)]
    pub show_legal: bool,
    /// Ask for the two confidences with each move.
    #[serde(default)]
    pub confidence: bool,
    /// A name for the prompt variant, for the one-model report.
    #[serde(default)]
    pub variant: Option<String>,
    /// Dollars per million tokens, in and out, for the cost per move.
    #[serde(default)]
    pub price_in: Option<f64>,
    #[serde(default)]
    pub price_out: Option<f64>,
}

fn default_name() -> String {
    "arena".into()
}
fn default_per_pair() -> usize {
    10
}
fn default_concurrency() -> usize {
    8
}
fn default_anchor_rating() -> f64 {
    1000.0
}
fn default_rounds() -> usize {
    500
}
fn default_max_plies() -> usize {
    300
}
fn one() -> usize {
    1
}
fn default_timeout_ms() -> u64 {
    60_000
}
fn default_player_concurrency() -> usize {
    4
}
fn default_retries() -> u32 {
    4
}

/// One game to play.
#[derive(Clone, Debug, PartialEq)]
pub struct Fixture {
    /// Stable across runs: `kind:first:second:k`.
    pub id: String,
    pub kind: Kind,
    pub first: usize,
    pub second: usize,
    pub seed: u64,
}

impl PlayerConfig {
    pub fn prompt(&self) -> PromptOptions {
        PromptOptions {
            show_legal: self.show_legal,
            confidence: self.confidence,
        }
    }

    /// The prompt variant's name: given, or made from the options.
    pub fn variant(&self) -> String {
        self.variant.clone().unwrap_or_else(|| {
            match (self.show_legal, self.confidence) {
                (false, false) => "plain",
                (true, false) => "legal-moves",
                (false, true) => "confidence",
                (true, true) => "legal-moves+confidence",
            }
            .into()
        })
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tournament config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if self.players.len() < 2 {
            bail!("a tournament needs at least two [[player]] tables");
        }
        if self.games.is_empty() {
            bail!("games = [...] names no game: use tic-tac-toe, connect-four or chess");
        }
        let mut seen = BTreeMap::new();
        for p in &self.players {
            display_name(&p.name).map_err(|e| anyhow::anyhow!("player name {:?}: {e}", p.name))?;
            if seen.insert(p.name.clone(), ()).is_some() {
                bail!("two players are named {:?}: names must differ", p.name);
            }
            match (&p.engine, &p.base_url) {
                (Some(_), Some(_)) => {
                    bail!("player {:?} has both engine and base_url: give one", p.name)
                }
                (None, None) => bail!(
                    "player {:?} needs engine = \"...\" or base_url = \"...\"",
                    p.name
                ),
                (Some(e), None) => {
                    if !["random", "first-legal", "minimax", "perfect", "stockfish"]
                        .contains(&e.as_str())
                    {
                        bail!("player {:?}: engine {e:?} is not one of random, first-legal, minimax, perfect, stockfish", p.name);
                    }
                    if e == "stockfish" && self.games.iter().any(|k| *k != Kind::Chess) {
                        bail!("player {:?} is stockfish, which plays chess only: set games = [\"chess\"]", p.name);
                    }
                }
                (None, Some(url)) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        bail!(
                            "player {:?}: base_url {url:?} must start with http:// or https://",
                            p.name
                        );
                    }
                    if p.model.is_none() {
                        bail!("player {:?}: an endpoint needs model = \"...\"", p.name);
                    }
                }
            }
            if p.concurrency == 0 {
                bail!("player {:?}: concurrency must be at least 1", p.name);
            }
        }
        if let Some(a) = &self.anchor {
            if !seen.contains_key(a) {
                bail!("anchor {a:?} is not a player's name");
            }
        }
        for pr in &self.pairing {
            for n in [&pr.first, &pr.second] {
                if !seen.contains_key(n) {
                    bail!("pairing names {n:?}, which is not a player");
                }
            }
            if pr.first == pr.second {
                bail!("pairing {:?} plays itself", pr.first);
            }
        }
        if self.concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        Ok(())
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.players.iter().position(|p| p.name == name)
    }

    pub fn anchor_index(&self) -> usize {
        self.anchor
            .as_deref()
            .and_then(|a| self.index(a))
            .unwrap_or(0)
    }

    /// Every game of the tournament, in a fixed order.
    pub fn schedule(&self) -> Vec<Fixture> {
        let mut out = Vec::new();
        let mut push = |kind: Kind, a: usize, b: usize, k: usize| {
            let (first, second) = if k.is_multiple_of(2) { (a, b) } else { (b, a) };
            let id = format!(
                "{}:{}:{}:{k}",
                kind.slug(),
                self.players[a].name,
                self.players[b].name
            );
            let seed = fnv(&id) ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            out.push(Fixture {
                id,
                kind,
                first,
                second,
                seed,
            });
        };
        if self.pairing.is_empty() {
            for &kind in &self.games {
                for a in 0..self.players.len() {
                    for b in a + 1..self.players.len() {
                        if !plays(&self.players[a], kind) || !plays(&self.players[b], kind) {
                            continue;
                        }
                        for k in 0..self.per_pair {
                            push(kind, a, b, k);
                        }
                    }
                }
            }
        } else {
            for pr in &self.pairing {
                let (Some(a), Some(b)) = (self.index(&pr.first), self.index(&pr.second)) else {
                    continue;
                };
                for k in 0..pr.games {
                    push(pr.game, a, b, k);
                }
            }
        }
        out
    }
}

/// Whether a player can play `kind` (stockfish plays chess only).
fn plays(p: &PlayerConfig, kind: Kind) -> bool {
    p.engine.as_deref() != Some("stockfish") || kind == Kind::Chess
}

/// A stable hash of `s`, for seeds.
pub fn fnv(s: &str) -> u64 {
    hangar_games::rating::fnv1a(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_reads() {
        let c = Config::parse(include_str!("../../../../arena/example.toml")).unwrap();
        assert_eq!(c.schedule().len(), 10 * 10 * 2);
        assert_eq!(c.players[c.anchor_index()].name, "random");
    }

    #[test]
    fn configs_are_checked_and_schedules_alternate_colours() {
        let c = Config::parse(
            r#"
games = ["tic-tac-toe"]
per_pair = 4
[[player]]
name = "a"
engine = "random"
[[player]]
name = "b"
engine = "perfect"
[[player]]
name = "m"
base_url = "http://127.0.0.1:1/v1"
model = "x"
show_legal = true
"#,
        )
        .unwrap();
        let s = c.schedule();
        assert_eq!(s.len(), 3 * 4);
        assert_eq!(s.iter().filter(|f| f.first == 0).count(), 4);
        assert!(c.players[2].prompt().show_legal);
        assert_eq!(c.players[2].variant(), "legal-moves");
        assert_eq!(s, c.schedule(), "the same every time");
        for bad in [
            "games = [\"go\"]\n[[player]]\nname=\"a\"\nengine=\"random\"",
            "games = [\"chess\"]\n[[player]]\nname=\"a\"\nengine=\"random\"",
            "games = [\"chess\"]\n[[player]]\nname=\"a\"\nengine=\"random\"\n[[player]]\nname=\"a\"\nengine=\"random\"",
            "games = [\"chess\"]\n[[player]]\nname=\"a\"\nengine=\"dice\"\n[[player]]\nname=\"b\"\nengine=\"random\"",
            "games = [\"chess\"]\n[[player]]\nname=\"a\"\nbase_url=\"ftp://x\"\nmodel=\"m\"\n[[player]]\nname=\"b\"\nengine=\"random\"",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }
}
