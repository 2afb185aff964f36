//! Chess, its rules from `cozy-chess` (MIT): legal moves, check, mate,
//! stalemate, castling, en passant, promotion and the fifty-move rule;
//! threefold repetition is counted here from the positions' hashes.
//! Moves are UCI (`e2e4`, `e1g1` to castle, `e7e8q`); the position is FEN.

use cozy_chess::util::{display_uci_move, parse_uci_move};
use cozy_chess::{Board, Color, GameStatus, Move, Piece};

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

    /// Material, counted the usual way (1, 3, 3, 5, 9).
    fn evaluate(&self) -> f64 {
        let me = self.board.side_to_move();
        let mut score = 0.0;
        for (piece, worth) in [
            (Piece::Pawn, 1.0),
            (Piece::Knight, 3.0),
            (Piece::Bishop, 3.0),
            (Piece::Rook, 5.0),
            (Piece::Queen, 9.0),
        ] {
            let ours = (self.board.pieces(piece) & self.board.colors(me)).len();
            let theirs = (self.board.pieces(piece) & self.board.colors(!me)).len();
            score += worth * (f64::from(ours) - f64::from(theirs));
        }
        (score / 10.0).tanh() * 0.9
    }

    /// SAN: `e4`, `exd5`, `Nbd7`, `R1e2`, `e8=Q`, `O-O` (and `0-0`), with
    /// and without the capture, check and promotion marks.
    fn spellings(&self, mv: &str) -> Vec<String> {
        let Ok(m) = parse_uci_move(&self.board, mv) else {
            return Vec::new();
        };
        let Some(piece) = self.board.piece_on(m.from) else {
            return Vec::new();
        };
        let capture = self.board.color_on(m.to) == Some(!self.board.side_to_move());
        let castle =
            piece == Piece::King && self.board.color_on(m.to) == self.board.color_on(m.from);
        if castle {
            let long = m.to.file() < m.from.file();
            return if long {
                vec!["O-O-O".into(), "0-0-0".into()]
            } else {
                vec!["O-O".into(), "0-0".into()]
            };
        }
        let to = m.to.to_string();
        let promo = m
            .promotion
            .map(|p| format!("={}", char::from(p).to_ascii_uppercase()))
            .unwrap_or_default();
        let mut out = Vec::new();
        if piece == Piece::Pawn {
            if m.from.file() != m.to.file() {
                let file = m.from.file().to_string();
                out.push(format!("{file}x{to}{promo}"));
                out.push(format!("{file}{to}{promo}"));
            } else {
                out.push(format!("{to}{promo}"));
            }
            return out;
        }
        let letter = char::from(piece).to_ascii_uppercase();
        // Other pieces of this kind that reach the same square.
        let mut rivals: Vec<Move> = Vec::new();
        self.board.generate_moves(|moves| {
            for other in moves {
                if other.to == m.to && other.from != m.from && moves.piece == piece {
                    rivals.push(other);
                }
            }
            false
        });
        let x = if capture { "x" } else { "" };
        let from = m.from.to_string();
        let (file, rank) = (&from[..1], &from[1..]);
        if rivals.is_empty() {
            out.push(format!("{letter}{x}{to}"));
        }
        if rivals.iter().all(|r| r.from.file() != m.from.file()) {
            out.push(format!("{letter}{file}{x}{to}"));
        }
        if rivals.iter().all(|r| r.from.rank() != m.from.rank()) {
            out.push(format!("{letter}{rank}{x}{to}"));
        }
        out.push(format!("{letter}{from}{x}{to}"));
        out
    }

    fn boxed(&self) -> Box<dyn Game> {
        Box::new(self.clone())
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

    #[test]
    fn san_spellings_name_the_uci_moves() {
        let g = Kind::Chess.start();
        assert!(g.spellings("g1f3").contains(&"Nf3".to_string()));
        assert_eq!(g.spellings("e2e4"), ["e4"]);
        let g = Kind::Chess
            .replay(&["e2e4", "e7e5", "g1f3", "b8c6", "f1c4", "g8f6"])
            .unwrap();
        assert!(g.spellings("e1g1").contains(&"O-O".to_string()));
        // Two knights can reach d2 after b1c3 and... only one here: plain.
        assert!(g.spellings("b1c3").contains(&"Nc3".to_string()));
        // Both rooks reach d1 once the way is clear: the file tells them apart.
        let g = Kind::Chess
            .replay(&[
                "d2d4", "d7d5", "b1c3", "b8c6", "c1f4", "c8f5", "d1d2", "d8d7", "e1c1", "e8c8",
                "g1f3", "g8f6", "e2e3", "e7e6", "f1e2", "f8e7", "h1f1", "h8f8",
            ])
            .unwrap();
        let s = g.spellings("f1e1");
        assert!(s.contains(&"Rfe1".to_string()), "{s:?}");
        assert!(!s.contains(&"Re1".to_string()), "{s:?}");
        let g = Kind::Chess.replay(&["e2e4", "d7d5"]).unwrap();
        assert!(g.spellings("e4d5").contains(&"exd5".to_string()));
    }
}
