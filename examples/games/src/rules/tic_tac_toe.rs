//! Tic-tac-toe: cells `a1` (bottom left) to `c3`, X first.

use super::{Game, Kind, MoveError, Outcome, Side};

#[derive(Clone, Debug, Default)]
pub struct TicTacToe {
    cells: [Option<Side>; 9],
    moves: usize,
}

const LINES: [[usize; 3]; 8] = [
    [0, 1, 2],
    [3, 4, 5],
    [6, 7, 8],
    [0, 3, 6],
    [1, 4, 7],
    [2, 5, 8],
    [0, 4, 8],
    [2, 4, 6],
];

fn name(i: usize) -> String {
    format!("{}{}", (b'a' + (i % 3) as u8) as char, i / 3 + 1)
}

impl Game for TicTacToe {
    fn kind(&self) -> Kind {
        Kind::TicTacToe
    }

    fn to_move(&self) -> Side {
        Side::after(self.moves)
    }

    fn legal_moves(&self) -> Vec<String> {
        if self.outcome().is_some() {
            return Vec::new();
        }
        (0..9)
            .filter(|i| self.cells[*i].is_none())
            .map(name)
            .collect()
    }

    fn play(&mut self, mv: &str) -> Result<(), MoveError> {
        if self.outcome().is_some() {
            return Err(MoveError::Over);
        }
        let b = mv.trim().to_ascii_lowercase().into_bytes();
        let (col, row) = match b[..] {
            [c @ b'a'..=b'c', r @ b'1'..=b'3'] => (usize::from(c - b'a'), usize::from(r - b'1')),
            _ => return Err(MoveError::Unreadable(mv.into(), "a cell from a1 to c3")),
        };
        let i = row * 3 + col;
        if self.cells[i].is_some() {
            return Err(MoveError::Illegal(name(i)));
        }
        self.cells[i] = Some(self.to_move());
        self.moves += 1;
        Ok(())
    }

    fn outcome(&self) -> Option<Outcome> {
        for l in LINES {
            if let Some(s) = self.cells[l[0]] {
                if self.cells[l[1]] == Some(s) && self.cells[l[2]] == Some(s) {
                    return Some(Outcome::Win(s));
                }
            }
        }
        (self.moves == 9).then_some(Outcome::Draw)
    }

    fn boxed(&self) -> Box<dyn Game> {
        Box::new(self.clone())
    }

    fn position(&self) -> String {
        (0..3)
            .rev()
            .map(|r| {
                (0..3)
                    .map(|c| match self.cells[r * 3 + c] {
                        Some(Side::First) => 'X',
                        Some(Side::Second) => 'O',
                        None => '.',
                    })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use crate::rules::{Kind, MoveError, Outcome, Side};

    #[test]
    fn rows_diagonals_draws_and_refusals() {
        let g = Kind::TicTacToe
            .replay(&["a1", "a2", "b1", "b2", "c1"])
            .unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Win(Side::First)));
        assert!(g.legal_moves().is_empty());
        let g = Kind::TicTacToe
            .replay(&["a1", "b1", "c3", "b2", "a3", "b3"])
            .unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Win(Side::Second)));
        let draw = ["b2", "a1", "c1", "a3", "a2", "c2", "b1", "b3", "c3"];
        let g = Kind::TicTacToe.replay(&draw).unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Draw));
        assert_eq!(g.position(), "OOX/XXO/OXX");
        let mut g = Kind::TicTacToe.replay(&["b2"]).unwrap();
        assert_eq!(g.to_move(), Side::Second);
        assert_eq!(g.play("B2"), Err(MoveError::Illegal("b2".into())));
        assert!(matches!(g.play("d4"), Err(MoveError::Unreadable(..))));
        assert_eq!(g.legal_moves().len(), 8);
        let mut over = Kind::TicTacToe
            .replay(&["a1", "a2", "b1", "b2", "c1"])
            .unwrap();
        assert_eq!(over.play("c3"), Err(MoveError::Over));
    }
}
