//! The games' rules. Every game speaks moves as text in its usual
//! notation (tic-tac-toe and connect four: the cell or column; chess: UCI,
//! `e2e4`, `e7e8q`), so players, programs and the replication between
//! machines share one form. Adding a game is one module and one
//! [`Kind`].

mod chess;
mod connect_four;
mod tic_tac_toe;

use serde::{Deserialize, Serialize};

/// The games there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    TicTacToe,
    ConnectFour,
    Chess,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::TicTacToe, Kind::ConnectFour, Kind::Chess];

    /// A game of this kind at its start.
    pub fn start(self) -> Box<dyn Game> {
        match self {
            Kind::TicTacToe => Box::new(tic_tac_toe::TicTacToe::default()),
            Kind::ConnectFour => Box::new(connect_four::ConnectFour::default()),
            Kind::Chess => Box::new(chess::Chess::default()),
        }
    }

    /// Its name in URLs and the API (as serde writes it).
    pub fn slug(self) -> &'static str {
        match self {
            Kind::TicTacToe => "tic-tac-toe",
            Kind::ConnectFour => "connect-four",
            Kind::Chess => "chess",
        }
    }

    /// Its name for people.
    pub fn name(self) -> &'static str {
        match self {
            Kind::TicTacToe => "Tic-tac-toe",
            Kind::ConnectFour => "Connect four",
            Kind::Chess => "Chess",
        }
    }

    /// What players call `side` in this game.
    pub fn side_name(self, side: Side) -> &'static str {
        match (self, side) {
            (Kind::TicTacToe, Side::First) => "X",
            (Kind::TicTacToe, Side::Second) => "O",
            (Kind::ConnectFour, Side::First) => "Red",
            (Kind::ConnectFour, Side::Second) => "Yellow",
            (Kind::Chess, Side::First) => "White",
            (Kind::Chess, Side::Second) => "Black",
        }
    }

    /// A game of this kind after `moves`, each checked as it is played.
    pub fn replay<S: AsRef<str>>(self, moves: &[S]) -> Result<Box<dyn Game>, MoveError> {
        let mut g = self.start();
        for m in moves {
            g.play(m.as_ref())?;
        }
        Ok(g)
    }
}

/// Who moves: the first player (X, red, white) or the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    First,
    Second,
}

impl Side {
    /// Who moves after `moves` moves, when the sides alternate.
    pub fn after(moves: usize) -> Side {
        if moves.is_multiple_of(2) {
            Side::First
        } else {
            Side::Second
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::First => Side::Second,
            Side::Second => Side::First,
        }
    }
}

/// How a game ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Win(Side),
    Draw,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    #[error("the game is over")]
    Over,
    #[error("{0:?} is not a move of this game ({1})")]
    Unreadable(String, &'static str),
    #[error("{0} is not legal here")]
    Illegal(String),
}

/// A game in progress: a pure state machine.
pub trait Game: Send + Sync {
    fn kind(&self) -> Kind;
    /// Whose turn it is (the last mover's, once the game is over).
    fn to_move(&self) -> Side;
    /// The legal moves now, in the game's notation (none once over).
    fn legal_moves(&self) -> Vec<String>;
    /// Play `mv` for the side to move.
    fn play(&mut self, mv: &str) -> Result<(), MoveError>;
    fn outcome(&self) -> Option<Outcome>;
    /// The position in the game's standard notation (FEN for chess; the
    /// rows, top first, for the others).
    fn position(&self) -> String;
    /// A copy, for searching ahead.
    fn boxed(&self) -> Box<dyn Game>;
    /// A guess at the position's value for the side to move, from -1 (lost)
    /// to 1 (won), for depth-limited search; 0 when the game has none.
    fn evaluate(&self) -> f64 {
        0.0
    }
    /// Other ways people write the legal move `mv` (chess: SAN, `Nf3`,
    /// `O-O`), so loosely written answers still name it.
    fn spellings(&self, _mv: &str) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_the_names_serde_reads() {
        for k in Kind::ALL {
            let read: Kind = serde_json::from_value(serde_json::json!(k.slug())).unwrap();
            assert_eq!(read, k);
            assert_ne!(k.side_name(Side::First), k.side_name(Side::Second));
        }
    }
}
