//! A game as the machines keep and replicate it: its kind, its players,
//! its moves, and a version that every change raises by one. Changes are
//! [`Op`]s applied by [`Record::apply`], a pure function, so the owner
//! checks them the same way on every machine, and a copy with a higher
//! version is always the later one.

use serde::{Deserialize, Serialize};

use crate::rules::{Kind, MoveError, Outcome, Side};

/// The longest display name, in characters.
pub const NAME_MAX: usize = 24;
/// The longest move text any game reads (UCI's is 5).
pub const MOVE_MAX: usize = 16;

/// A seated player: the identity of their browser or program (never shown
/// to others) and their display name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Player {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub code: String,
    pub kind: Kind,
    /// Raised by a rematch; sides swap each round.
    pub round: u32,
    /// The first seat moves first in odd rounds.
    pub seats: Vec<Player>,
    pub moves: Vec<String>,
    pub version: u64,
    /// Milliseconds since the epoch of the last change.
    pub touched_ms: u64,
    /// Ended by idleness: its code is free again.
    pub closed: bool,
}

/// A change to a game, as a player (or the owner's sweeper) asks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    Create {
        kind: Kind,
        player: Player,
    },
    Join {
        player: Player,
    },
    /// `n`: the number of moves the mover saw, so a move sent twice (a
    /// retry after a lost answer) is played once.
    Move {
        player: String,
        mv: String,
        n: Option<usize>,
    },
    /// `round`: the round the player saw end, so a rematch asked twice
    /// starts one round.
    Rematch {
        player: String,
        round: Option<u32>,
    },
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("game {0} exists already")]
    Taken(String),
    #[error("no game {0}")]
    NoGame(String),
    #[error("game {0} has its two players; watch it instead")]
    Full(String),
    #[error("you are not a player of game {0}")]
    NotSeated(String),
    #[error("it is not your turn")]
    NotYourTurn,
    #[error("the game has moved on ({0} moves, you saw {1}); here is where it is now")]
    Stale(usize, usize),
    #[error("the game is not over yet: a rematch comes after its end")]
    NotOver,
    #[error("waiting for a second player to join")]
    Waiting,
    #[error("{0}")]
    Move(#[from] MoveError),
}

/// A display name checked and trimmed: 1 to 24 letters, digits, spaces or
/// `- _ . '`.
pub fn display_name(text: &str) -> Result<String, String> {
    let name = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let count = name.chars().count();
    if count == 0 || count > NAME_MAX {
        return Err(format!(
            "a display name is 1 to {NAME_MAX} characters (got {count})"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || " -_.'".contains(*c)))
    {
        return Err(format!(
            "a display name has letters, digits, spaces and - _ . ' only, not {c:?}"
        ));
    }
    Ok(name)
}

impl Record {
    /// The seat that plays `side` this round.
    pub fn seat_of(&self, side: Side) -> Option<&Player> {
        let first = if self.round % 2 == 1 { 0 } else { 1 };
        let i = match side {
            Side::First => first,
            Side::Second => 1 - first,
        };
        self.seats.get(i)
    }

    /// The side `player` plays this round, if seated.
    pub fn side_of(&self, player: &str) -> Option<Side> {
        [Side::First, Side::Second]
            .into_iter()
            .find(|s| self.seat_of(*s).is_some_and(|p| p.id == player))
    }

    /// The game's rules state after its moves (every stored move was legal
    /// when played, so this cannot fail for a record the owner made).
    pub fn game(&self) -> Result<Box<dyn crate::rules::Game>, MoveError> {
        self.kind.replay(&self.moves)
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.game().ok().and_then(|g| g.outcome())
    }

    /// `op` applied to `current` (None: no game under `code`), at time
    /// `now_ms`: the next record, one version up.
    pub fn apply(
        current: Option<&Record>,
        code: &str,
        op: &Op,
        now_ms: u64,
    ) -> Result<Record, OpError> {
        let live = current.filter(|r| !r.closed);
        let mut next = match (op, live) {
            (Op::Create { kind, player }, None) => Record {
                code: code.to_string(),
                kind: *kind,
                round: 1,
                seats: vec![player.clone()],
                moves: Vec::new(),
                version: current.map_or(0, |r| r.version),
                touched_ms: now_ms,
                closed: false,
            },
            // The creator asking again (its answer was lost): the same game.
            (Op::Create { kind, player }, Some(r))
                if r.kind == *kind
                    && r.round == 1
                    && r.moves.is_empty()
                    && r.seats.first().is_some_and(|p| p.id == player.id) =>
            {
                return Ok(r.clone())
            }
            (Op::Create { .. }, Some(_)) => return Err(OpError::Taken(code.into())),
            (_, None) => return Err(OpError::NoGame(code.into())),
            (op, Some(r)) => {
                let mut r = r.clone();
                match op {
                    Op::Create { .. } => unreachable!("matched above"),
                    Op::Join { player } => {
                        if r.seats.iter().any(|p| p.id == player.id) {
                            return Ok(r);
                        }
                        if r.seats.len() >= 2 {
                            return Err(OpError::Full(code.into()));
                        }
                        r.seats.push(player.clone());
                    }
                    Op::Move { player, mv, n } => {
                        if let Some(n) = *n {
                            // Played already (a retry): the same move at the
                            // same place is the same move.
                            if n < r.moves.len() {
                                if r.moves[n] == *mv && r.side_of(player) == Some(Side::after(n)) {
                                    return Ok(r);
                                }
                                return Err(OpError::Stale(r.moves.len(), n));
                            }
                            if n > r.moves.len() {
                                return Err(OpError::Stale(r.moves.len(), n));
                            }
                        }
                        let side = r
                            .side_of(player)
                            .ok_or_else(|| OpError::NotSeated(code.into()))?;
                        if r.seats.len() < 2 {
                            return Err(OpError::Waiting);
                        }
                        let mut game = r.game()?;
                        if game.outcome().is_some() {
                            return Err(MoveError::Over.into());
                        }
                        if game.to_move() != side {
                            return Err(OpError::NotYourTurn);
                        }
                        if mv.len() > MOVE_MAX {
                            let head: String = mv.chars().take(MOVE_MAX).collect();
                            return Err(MoveError::Unreadable(
                                head + "…",
                                "a move is a few characters",
                            )
                            .into());
                        }
                        game.play(mv)?;
                        r.moves.push(mv.trim().to_string());
                    }
                    Op::Rematch { player, round } => {
                        r.side_of(player)
                            .ok_or_else(|| OpError::NotSeated(code.into()))?;
                        if round.is_some_and(|n| n < r.round) {
                            return Ok(r);
                        }
                        if r.outcome().is_none() {
                            return Err(OpError::NotOver);
                        }
                        r.round += 1;
                        r.moves.clear();
                    }
                    Op::Close => r.closed = true,
                }
                r
            }
        };
        next.version += 1;
        next.touched_ms = now_ms;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn player(id: &str) -> Player {
        Player {
            id: id.into(),
            name: id.to_uppercase(),
        }
    }

    fn mv(p: &str, m: &str, n: usize) -> Op {
        Op::Move {
            player: p.into(),
            mv: m.into(),
            n: Some(n),
        }
    }

    #[test]
    fn a_game_from_create_to_rematch_with_turns_retries_and_seats() {
        let create = Op::Create {
            kind: Kind::TicTacToe,
            player: player("a"),
        };
        let r = Record::apply(None, "ABCD", &create, 1).unwrap();
        assert_eq!((r.version, r.round, r.seats.len()), (1, 1, 1));
        // The creator's retry is the same game; anyone else's is refused.
        assert_eq!(Record::apply(Some(&r), "ABCD", &create, 2).unwrap(), r);
        let other = Op::Create {
            kind: Kind::TicTacToe,
            player: player("z"),
        };
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &other, 2),
            Err(OpError::Taken("ABCD".into()))
        );
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("a", "a1", 0), 2),
            Err(OpError::Waiting)
        );
        let join = Op::Join {
            player: player("b"),
        };
        let r = Record::apply(Some(&r), "ABCD", &join, 2).unwrap();
        // Joining again is a no-op; a third player is refused.
        assert_eq!(Record::apply(Some(&r), "ABCD", &join, 3).unwrap(), r);
        assert_eq!(
            Record::apply(
                Some(&r),
                "ABCD",
                &Op::Join {
                    player: player("c")
                },
                3
            ),
            Err(OpError::Full("ABCD".into()))
        );
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("b", "a1", 0), 3),
            Err(OpError::NotYourTurn)
        );
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("c", "a1", 0), 3),
            Err(OpError::NotSeated("ABCD".into()))
        );
        assert!(matches!(
            Record::apply(Some(&r), "ABCD", &mv("a", &"x".repeat(5000), 0), 3),
            Err(OpError::Move(MoveError::Unreadable(m, _))) if m.len() < 40
        ));
        let mut r = r;
        for (i, (p, m)) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")]
            .into_iter()
            .enumerate()
        {
            r = Record::apply(Some(&r), "ABCD", &mv(p, m, i), 4).unwrap();
        }
        // A retry of the last move is the same move, once.
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("b", "b2", 3), 5).unwrap(),
            r
        );
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("b", "c2", 3), 5),
            Err(OpError::Stale(4, 3))
        );
        assert_eq!(
            Record::apply(
                Some(&r),
                "ABCD",
                &Op::Rematch {
                    player: "a".into(),
                    round: Some(1)
                },
                5
            ),
            Err(OpError::NotOver)
        );
        let r = Record::apply(Some(&r), "ABCD", &mv("a", "a3", 4), 5).unwrap();
        assert_eq!(r.outcome(), Some(Outcome::Win(Side::First)));
        assert_eq!(r.version, 7);
        assert!(matches!(
            Record::apply(Some(&r), "ABCD", &mv("b", "c3", 5), 6),
            Err(OpError::Move(MoveError::Over))
        ));
        // A rematch swaps the sides: b moves first now.
        let rematch = Op::Rematch {
            player: "b".into(),
            round: Some(1),
        };
        let r = Record::apply(Some(&r), "ABCD", &rematch, 6).unwrap();
        assert_eq!((r.round, r.moves.len()), (2, 0));
        assert_eq!(Record::apply(Some(&r), "ABCD", &rematch, 6).unwrap(), r);
        assert_eq!(r.side_of("b"), Some(Side::First));
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &mv("a", "a1", 0), 7),
            Err(OpError::NotYourTurn)
        );
        // Closed, its code is free for a new game, whose version goes on.
        let closed = Record::apply(Some(&r), "ABCD", &Op::Close, 8).unwrap();
        assert!(closed.closed);
        assert!(matches!(
            Record::apply(Some(&closed), "ABCD", &mv("b", "a1", 0), 9),
            Err(OpError::NoGame(_))
        ));
        assert_eq!(
            Record::apply(Some(&r), "ABCD", &create, 9),
            Err(OpError::Taken("ABCD".into()))
        );
        let again = Record::apply(Some(&closed), "ABCD", &create, 9).unwrap();
        assert!(again.version > closed.version && again.moves.is_empty());
    }

    #[test]
    fn display_names_are_checked() {
        assert_eq!(display_name("  Ada   Lovelace ").unwrap(), "Ada Lovelace");
        assert_eq!(display_name("Zoë-2").unwrap(), "Zoë-2");
        assert!(display_name("").is_err());
        assert!(display_name(&"x".repeat(25)).is_err());
        assert!(display_name("<script>").unwrap_err().contains("'<'"));
    }
}
