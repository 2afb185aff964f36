//! Chess, its rules from `cozy-chess` (MIT): legal moves, check, mate,
//! stalemate, castling, en passant, promotion and the fifty-move rule;
//! threefold repetition is counted here from the positions' hashes.
//! Moves are UCI (`e2e4`, `e1g1` to castle, `e7e8q`); the position is FEN.

use cozy_chess::util::{display_uci_move, parse_uci_move};
use cozy_chess::{Board, Color, GameStatus};

use super::{Game, Kind, MoveError, Outcome, Side};

#[derive(Clone, Debug, Default)]
pub struct Chess {
    board: Board,
    /// The hash of every position so far, for repetitions.
    seen: Vec<u64>,
    repeated: bool,
}

fn side(c: Color) -> Side {
    match c {
        Color::White => Side::First,
        Color::Black => Side::Second,
    }
}

impl Game for Chess {
    fn kind(&self) -> Kind {
        Kind::Chess
    }

    fn to_move(&self) -> Side {
        side(self.board.side_to_move())
    }

    fn legal_moves(&self) -> Vec<String> {
        if self.outcome().is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.board.generate_moves(|moves| {
            for mv in moves {
                out.push(display_uci_move(&self.board, mv).to_string());
            }
            false
        });
        out.sort();
        out
    }

    fn play(&mut self, mv: &str) -> Result<(), MoveError> {
        if self.outcome().is_some() {
            return Err(MoveError::Over);
        }
        let text = mv.trim().to_ascii_lowercase();
        let parsed = parse_uci_move(&self.board, &text)
            .map_err(|_| MoveError::Unreadable(mv.into(), "a UCI move such as e2e4"))?;
        if self.seen.is_empty() {
            self.seen.push(self.board.hash());
        }
        self.board
            .try_play(parsed)
            .map_err(|_| MoveError::Illegal(text))?;
        let now = self.board.hash();
        self.seen.push(now);
        self.repeated |= self.seen.iter().filter(|h| **h == now).count() >= 3;
        Ok(())
    }

    fn outcome(&self) -> Option<Outcome> {
        match self.board.status() {
            // The side to move is mated.
            GameStatus::Won => Some(Outcome::Win(side(!self.board.side_to_move()))),
            GameStatus::Drawn => Some(Outcome::Draw),
            GameStatus::Ongoing if self.repeated => Some(Outcome::Draw),
            GameStatus::Ongoing => None,
        }
    }

    fn position(&self) -> String {
        self.board.to_string()
    }
}

#[cfg(test)]
mod tests {
    use crate::rules::{Kind, MoveError, Outcome, Side};

    #[test]
    fn mates_draws_and_the_special_moves_through_the_crate() {
        let g = Kind::Chess.start();
        assert_eq!(g.legal_moves().len(), 20);
        assert_eq!(
            g.position(),
            "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1"
        );
        // Fool's mate: black wins.
        let g = Kind::Chess
            .replay(&["f2f3", "e7e5", "g2g4", "d8h4"])
            .unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Win(Side::Second)));
        assert!(g.legal_moves().is_empty());
        // Castling in UCI's form, en passant, promotion.
        let castle = ["e2e4", "e7e5", "g1f3", "b8c6", "f1c4", "g8f6", "e1g1"];
        let g = Kind::Chess.replay(&castle).unwrap();
        assert!(g
            .position()
            .starts_with("r1bqkb1r/pppp1ppp/2n2n2/4p3/2B1P3/5N2/PPPP1PPP/RNBQ1RK1 b"));
        let ep = ["e2e4", "a7a6", "e4e5", "d7d5", "e5d6"];
        let g = Kind::Chess.replay(&ep).unwrap();
        assert!(
            g.position().starts_with("rnbqkbnr/1pp1pppp/p2P4/8/"),
            "{}",
            g.position()
        );
        let promote = [
            "h2h4", "g7g5", "h4g5", "h7h6", "g5h6", "f8g7", "h6g7", "g8f6", "g7h8q",
        ];
        let g = Kind::Chess.replay(&promote).unwrap();
        assert!(g.position().contains('Q'));
        assert!(g.position().starts_with("rnbqk2Q/"), "{}", g.position());
        // Threefold repetition is a draw.
        let shuffle = [
            "g1f3", "g8f6", "f3g1", "f6g8", "g1f3", "g8f6", "f3g1", "f6g8",
        ];
        let g = Kind::Chess.replay(&shuffle).unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Draw));
        // Stalemate is a draw.
        let mut g = Kind::Chess.start();
        for m in [
            "e2e3", "a7a5", "d1h5", "a8a6", "h5a5", "h7h5", "h2h4", "a6h6", "a5c7", "f7f6", "c7d7",
            "e8f7", "d7b7", "d8d3", "b7b8", "d3h7", "b8c8", "f7g6", "c8e6",
        ] {
            g.play(m).unwrap();
        }
        assert_eq!(g.outcome(), Some(Outcome::Draw));
        // Refusals.
        let mut g = Kind::Chess.start();
        assert_eq!(g.play("e2e5"), Err(MoveError::Illegal("e2e5".into())));
        assert!(matches!(g.play("castle"), Err(MoveError::Unreadable(..))));
        assert_eq!(g.to_move(), Side::First);
    }
}
