//! What a model is told and how its answer is read: the prompt for a
//! turn (the game, the position in its standard notation, the moves so
//! far and, when asked for, the legal moves and the confidences), the
//! reply after a bad answer, and the lenient reading of an answer into a
//! legal move.
//!
//! Reading tries, in order: a JSON object with a `move`; a `MOVE:` line;
//! the whole answer; each word of it. Each candidate is matched exactly,
//! then normalized (case, quotes and punctuation, `column 4`, chess SAN).
//! It never picks a move the answer does not name: an answer naming two
//! different legal moves in its words (and none in a `MOVE:` line) is
//! unparsable.

use serde::{Deserialize, Serialize};

use crate::rules::{Game, Kind, MoveError};

/// What the prompt includes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptOptions {
    /// List the legal moves.
    #[serde(default)]
    pub show_legal: bool,
    /// Ask for the two confidences.
    #[serde(default)]
    pub confidence: bool,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How moves are written in each game, for the prompt.
fn notation(kind: Kind) -> &'static str {
    match kind {
        Kind::TicTacToe => {
            "a cell, a1 (bottom left) to c3 (top right): letter for the column, digit for the row"
        }
        Kind::ConnectFour => {
            "a column number, 1 (left) to 7 (right); the disc falls to the lowest free cell"
        }
        Kind::Chess => {
            "UCI, from-square then to-square, such as e2e4, e1g1 to castle, e7e8q to promote"
        }
    }
}

/// The prompt for the side to move in `game`, after `moves`.
pub fn prompt(game: &dyn Game, moves: &[String], opts: &PromptOptions) -> Vec<Message> {
    let kind = game.kind();
    let side = kind.side_name(game.to_move());
    let mut answer = "Answer with one line: MOVE: <your move>".to_string();
    if opts.confidence {
        answer += " CONFIDENCE: <the probability, 0 to 1, that your move is legal> WIN: <the probability, 0 to 1, that you win this game>";
    }
    let system = format!(
        "You are playing {}. Moves are written in {}. {answer}",
        kind.name(),
        notation(kind)
    );
    let mut user = format!(
        "Game: {}\nYou play: {side}\nPosition: {}\nMoves so far: {}\n",
        kind.slug(),
        game.position(),
        if moves.is_empty() {
            "(none)".to_string()
        } else {
            moves.join(" ")
        }
    );
    if opts.show_legal {
        user += &format!("Legal moves: {}\n", game.legal_moves().join(" "));
    }
    user += "Your move?";
    vec![Message::new("system", system), Message::new("user", user)]
}

/// The message sent after an answer that was not a legal move.
pub fn retry_message(reason: &str) -> Message {
    Message::new(
        "user",
        format!(
            "That is not a legal move: {reason}. Answer again with one line: MOVE: <your move>"
        ),
    )
}

/// Why an answer is not a move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "reason", rename_all = "kebab-case")]
pub enum Refusal {
    /// No move could be found in it.
    Unparsable(String),
    /// It names something that is not a move in this game's notation.
    Unreadable(String),
    /// A move of the notation, not legal here.
    Illegal(String),
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Unparsable(r) | Refusal::Unreadable(r) | Refusal::Illegal(r) => r,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Unparsable(_) => "unparsable",
            Refusal::Unreadable(_) => "unreadable",
            Refusal::Illegal(_) => "illegal",
        }
    }
}

/// An answer read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The legal move it names, or why not.
    pub verdict: Result<String, Refusal>,
    /// The stated probability that the move is legal.
    pub p_legal: Option<f64>,
    /// The stated probability of winning.
    pub p_win: Option<f64>,
}

/// Strip what wraps a move: quotes, backticks, brackets, trailing dots.
fn bare(t: &str) -> &str {
    t.trim()
        .trim_matches(|c: char| "\"'`*()[]{}<>.,;:!?".contains(c))
        .trim()
}

/// The legal move `candidate` names in `game`, if any.
fn match_legal(game: &dyn Game, legal: &[String], candidate: &str) -> Option<String> {
    let c = bare(candidate);
    if c.is_empty() {
        return None;
    }
    if let Some(m) = legal.iter().find(|m| m.as_str() == c) {
        return Some(m.clone());
    }
    let lower = c.to_ascii_lowercase();
    if let Some(m) = legal.iter().find(|m| m.to_ascii_lowercase() == lower) {
        return Some(m.clone());
    }
    match game.kind() {
        Kind::ConnectFour => {
            // "column 4", "col4", "4th column".
            let digits: String = lower.chars().filter(char::is_ascii_digit).collect();
            let words_ok = lower
                .trim_start_matches("column")
                .trim_start_matches("col")
                .trim()
                .chars()
                .all(|ch| ch.is_ascii_digit() || "thndrs column".contains(ch));
            if words_ok && !digits.is_empty() {
                return legal.iter().find(|m| **m == digits).cloned();
            }
            None
        }
        Kind::TicTacToe => {
            // "A-1", "1a", "a 1".
            let squeezed: String = lower.chars().filter(char::is_ascii_alphanumeric).collect();
            let swapped: String = squeezed.chars().rev().collect();
            legal
                .iter()
                .find(|m| **m == squeezed || (squeezed.len() == 2 && **m == swapped))
                .cloned()
        }
        Kind::Chess => {
            let strip = |t: &str| -> String {
                t.chars()
                    .filter(|ch| !"+#!?x=:- ".contains(*ch))
                    .collect::<String>()
                    .replace('0', "O")
            };
            let want = strip(c);
            let squeezed: String = lower.chars().filter(|ch| !"-x ".contains(*ch)).collect();
            legal
                .iter()
                .find(|m| **m == squeezed || game.spellings(m).iter().any(|s| strip(s) == want))
                .cloned()
        }
    }
}

/// A probability after `label` (case-insensitive) in `text`: `0.8`,
/// `80%`.
fn probability_after(text: &str, label: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find(label)? + label.len();
    let rest = lower[at..]
        .trim_start_matches(|c: char| c == ':' || c == '=' || c == '"' || c.is_whitespace());
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v: f64 = num.parse().ok()?;
    let v = if rest[num.len()..].starts_with('%') || v > 1.0 {
        v / 100.0
    } else {
        v
    };
    (0.0..=1.0).contains(&v).then_some(v)
}

/// Read `answer` as a move in `game`.
pub fn read(game: &dyn Game, answer: &str) -> Reading {
    let legal = game.legal_moves();
    let mut p_legal = probability_after(answer, "confidence");
    let mut p_win = probability_after(answer, "win");
    // A JSON object anywhere in the answer.
    let mut named: Option<String> = None;
    if let (Some(a), Some(b)) = (answer.find('{'), answer.rfind('}')) {
        if a < b {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&answer[a..=b]) {
                named = v.get("move").and_then(|m| match m {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
                p_legal = num("confidence").or(num("legal")).or(p_legal);
                p_win = num("win").or(p_win);
            }
        }
    }
    // A MOVE: line.
    if named.is_none() {
        let lower = answer.to_ascii_lowercase();
        if let Some(at) = lower.find("move:").or_else(|| lower.find("move =")) {
            let rest = answer[at + 5..].trim_start_matches([' ', '=', ':']);
            let word = rest.split_whitespace().next().unwrap_or("");
            // "column 4" keeps its number.
            let word = if word.eq_ignore_ascii_case("column") {
                rest.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                word.to_string()
            };
            named = Some(word);
        }
    }
    let p_legal = p_legal.filter(|p| (0.0..=1.0).contains(p));
    let p_win = p_win.filter(|p| (0.0..=1.0).contains(p));
    let verdict = match named {
        Some(n) => match match_legal(game, &legal, &n) {
            Some(m) => Ok(m),
            None => Err(why_not(game, &n)),
        },
        None => {
            if let Some(m) = match_legal(game, &legal, answer) {
                Ok(m)
            } else {
                let mut found: Vec<String> = answer
                    .split_whitespace()
                    .filter_map(|w| match_legal(game, &legal, w))
                    .collect();
                found.dedup();
                match found.as_slice() {
                    [one] => Ok(one.clone()),
                    [] => Err(Refusal::Unparsable(format!(
                        "no move found in the answer {:?}",
                        clip(answer)
                    ))),
                    many => Err(Refusal::Unparsable(format!(
                        "the answer names {} different moves ({})",
                        many.len(),
                        many.join(", ")
                    ))),
                }
            }
        }
    };
    Reading {
        verdict,
        p_legal,
        p_win,
    }
}

/// Why `named` is not a legal move here, in the game's own words.
fn why_not(game: &dyn Game, named: &str) -> Refusal {
    let mut g = game.boxed();
    match g.play(bare(named)) {
        Err(MoveError::Illegal(m)) => Refusal::Illegal(format!("{m} is not legal here")),
        Err(e @ MoveError::Unreadable(..)) => Refusal::Unreadable(e.to_string()),
        Err(MoveError::Over) => Refusal::Illegal("the game is over".into()),
        // Playable as written but not matched above cannot happen; say so plainly.
        Ok(()) => Refusal::Unreadable(format!(
            "{:?} could not be matched to a legal move",
            clip(named)
        )),
    }
}

fn clip(t: &str) -> String {
    let t = t.trim();
    if t.chars().count() > 80 {
        format!("{}…", t.chars().take(80).collect::<String>())
    } else {
        t.to_string()
    }
}

/// The moves and legal moves written in a prompt, as [`prompt`] writes
/// them (for scripted test models that play from the prompt alone).
pub fn read_prompt(text: &str) -> Option<(Kind, Vec<String>)> {
    let mut kind = None;
    let mut moves = None;
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("Game: ") {
            kind = serde_json::from_value(serde_json::json!(k.trim())).ok();
        }
        if let Some(m) = line.strip_prefix("Moves so far: ") {
            moves = Some(if m.trim() == "(none)" {
                Vec::new()
            } else {
                m.split_whitespace().map(String::from).collect()
            });
        }
    }
    Some((kind?, moves?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(kind: Kind, moves: &[&str], answer: &str) -> Result<String, Refusal> {
        read(kind.replay(moves).unwrap().as_ref(), answer).verdict
    }

    #[test]
    fn answers_are_read_leniently_but_never_guessed() {
        use Kind::*;
        assert_eq!(verdict(TicTacToe, &[], "MOVE: b2"), Ok("b2".into()));
        assert_eq!(
            verdict(TicTacToe, &[], "I'll take the centre: **B2**."),
            Ok("b2".into())
        );
        assert_eq!(verdict(TicTacToe, &[], "2b"), Ok("b2".into()));
        assert_eq!(verdict(ConnectFour, &[], "MOVE: column 4"), Ok("4".into()));
        assert_eq!(
            verdict(ConnectFour, &[], "{\"move\": 3, \"win\": 0.4}"),
            Ok("3".into())
        );
        assert_eq!(verdict(Chess, &[], "MOVE: Nf3"), Ok("g1f3".into()));
        assert_eq!(verdict(Chess, &[], "e4!"), Ok("e2e4".into()));
        assert_eq!(verdict(Chess, &[], "move: E2-E4"), Ok("e2e4".into()));
        let castle = ["e2e4", "e7e5", "g1f3", "b8c6", "f1c4", "g8f6"];
        assert_eq!(verdict(Chess, &castle, "MOVE: 0-0"), Ok("e1g1".into()));
        // Two moves named and no MOVE line: not guessed.
        assert!(matches!(
            verdict(TicTacToe, &[], "a1 or c3, hard to say"),
            Err(Refusal::Unparsable(_))
        ));
        assert!(matches!(
            verdict(TicTacToe, &[], "I like turtles"),
            Err(Refusal::Unparsable(_))
        ));
        assert!(matches!(
            verdict(TicTacToe, &["b2"], "MOVE: b2"),
            Err(Refusal::Illegal(r)) if r.contains("b2")
        ));
        assert!(matches!(
            verdict(ConnectFour, &[], "MOVE: 9"),
            Err(Refusal::Unreadable(_))
        ));
        assert!(matches!(
            verdict(Chess, &[], "MOVE: e2e5"),
            Err(Refusal::Illegal(_))
        ));
    }

    #[test]
    fn confidences_and_the_prompt_round_trip() {
        let g = Kind::ConnectFour.replay(&["4", "4"]).unwrap();
        let r = read(g.as_ref(), "MOVE: 3 CONFIDENCE: 0.9 WIN: 55%");
        assert_eq!(r.verdict, Ok("3".into()));
        assert_eq!(r.p_legal, Some(0.9));
        assert_eq!(r.p_win, Some(0.55));
        let opts = PromptOptions {
            show_legal: true,
            confidence: true,
        };
        let p = prompt(g.as_ref(), &["4".into(), "4".into()], &opts);
        assert!(p[0].content.contains("CONFIDENCE"));
        assert!(p[1].content.contains("Legal moves: 1 2 3 4 5 6 7"));
        assert_eq!(
            read_prompt(&p[1].content),
            Some((Kind::ConnectFour, vec!["4".to_string(), "4".to_string()]))
        );
        let chess = prompt(Kind::Chess.start().as_ref(), &[], &PromptOptions::default());
        assert!(chess[1]
            .content
            .contains("rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1"));
        assert!(!chess[1].content.contains("Legal moves"));
        assert_eq!(read_prompt(&chess[1].content), Some((Kind::Chess, vec![])));
    }
}
