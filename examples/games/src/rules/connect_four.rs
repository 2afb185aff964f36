//! Connect four: seven columns (`1` to `7`) of six, red first; a disc
//! falls to the lowest free cell.

use super::{Game, Kind, MoveError, Outcome, Side};

const COLS: usize = 7;
const ROWS: usize = 6;

#[derive(Clone, Debug, Default)]
pub struct ConnectFour {
    /// Column by column, bottom first.
    cols: [Vec<Side>; COLS],
    moves: usize,
}

impl ConnectFour {
    fn at(&self, col: i32, row: i32) -> Option<Side> {
        if !(0..COLS as i32).contains(&col) || !(0..ROWS as i32).contains(&row) {
            return None;
        }
        self.cols[col as usize].get(row as usize).copied()
    }
}

impl Game for ConnectFour {
    fn kind(&self) -> Kind {
        Kind::ConnectFour
    }

    fn to_move(&self) -> Side {
        Side::after(self.moves)
    }

    fn legal_moves(&self) -> Vec<String> {
        if self.outcome().is_some() {
            return Vec::new();
        }
        (0..COLS)
            .filter(|c| self.cols[*c].len() < ROWS)
            .map(|c| (c + 1).to_string())
            .collect()
    }

    fn play(&mut self, mv: &str) -> Result<(), MoveError> {
        if self.outcome().is_some() {
            return Err(MoveError::Over);
        }
        let col = match mv.trim().parse::<usize>() {
            Ok(c @ 1..=COLS) => c - 1,
            _ => return Err(MoveError::Unreadable(mv.into(), "a column from 1 to 7")),
        };
        if self.cols[col].len() == ROWS {
            return Err(MoveError::Illegal(format!(
                "column {} (it is full)",
                col + 1
            )));
        }
        let side = self.to_move();
        self.cols[col].push(side);
        self.moves += 1;
        Ok(())
    }

    fn outcome(&self) -> Option<Outcome> {
        for col in 0..COLS as i32 {
            for row in 0..ROWS as i32 {
                let Some(s) = self.at(col, row) else { continue };
                for (dc, dr) in [(1, 0), (0, 1), (1, 1), (1, -1)] {
                    if (1..4).all(|k| self.at(col + dc * k, row + dr * k) == Some(s)) {
                        return Some(Outcome::Win(s));
                    }
                }
            }
        }
        (self.moves == COLS * ROWS).then_some(Outcome::Draw)
    }

    /// Every line of four still open to one side only, weighted by how
    /// full it is: the usual connect-four heuristic.
    fn evaluate(&self) -> f64 {
        let me = self.to_move();
        let mut score = 0.0;
        for col in 0..COLS as i32 {
            for row in 0..ROWS as i32 {
                for (dc, dr) in [(1, 0), (0, 1), (1, 1), (1, -1)] {
                    let end = (col + dc * 3, row + dr * 3);
                    if !(0..COLS as i32).contains(&end.0) || !(0..ROWS as i32).contains(&end.1) {
                        continue;
                    }
                    let (mut mine, mut theirs) = (0, 0);
                    for k in 0..4 {
                        match self.at(col + dc * k, row + dr * k) {
                            Some(s) if s == me => mine += 1,
                            Some(_) => theirs += 1,
                            None => {}
                        }
                    }
                    let weight = |n: i32| f64::from(n * n);
                    if theirs == 0 {
                        score += weight(mine);
                    } else if mine == 0 {
                        score -= weight(theirs);
                    }
                }
            }
        }
        (score / 60.0).tanh() * 0.9
    }

    fn boxed(&self) -> Box<dyn Game> {
        Box::new(self.clone())
    }

    fn position(&self) -> String {
        (0..ROWS)
            .rev()
            .map(|r| {
                (0..COLS)
                    .map(|c| match self.cols[c].get(r) {
                        Some(Side::First) => 'R',
                        Some(Side::Second) => 'Y',
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
    fn four_in_a_row_every_way_full_columns_and_a_draw() {
        let across = Kind::ConnectFour
            .replay(&["1", "1", "2", "2", "3", "3", "4"])
            .unwrap();
        assert_eq!(across.outcome(), Some(Outcome::Win(Side::First)));
        let up = Kind::ConnectFour
            .replay(&["1", "2", "1", "2", "1", "2", "7", "2"])
            .unwrap();
        assert_eq!(up.outcome(), Some(Outcome::Win(Side::Second)));
        let rising = ["1", "2", "2", "3", "3", "4", "3", "4", "4", "7", "4"];
        let g = Kind::ConnectFour.replay(&rising).unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Win(Side::First)));
        let falling = ["7", "6", "6", "5", "5", "4", "5", "4", "4", "1", "4"];
        assert_eq!(
            Kind::ConnectFour.replay(&falling).unwrap().outcome(),
            Some(Outcome::Win(Side::First))
        );
        let mut g = Kind::ConnectFour
            .replay(&["4", "4", "4", "4", "4", "4"])
            .unwrap();
        assert!(matches!(g.play("4"), Err(MoveError::Illegal(_))));
        assert!(matches!(g.play("8"), Err(MoveError::Unreadable(..))));
        assert_eq!(g.legal_moves(), ["1", "2", "3", "5", "6", "7"]);
        assert_eq!(g.position().lines().next().unwrap().len(), 7 * 6 + 5);
        // A full board with no four anywhere (found by random play): a draw.
        let full: Vec<String> = "455714637617614767242476316455122212535333"
            .chars()
            .map(String::from)
            .collect();
        let g = Kind::ConnectFour.replay(&full).unwrap();
        assert_eq!(g.outcome(), Some(Outcome::Draw));
        assert!(g.legal_moves().is_empty());
        assert!(!g.position().contains('.'));
    }
}
