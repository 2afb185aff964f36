//! The built-in players: random, first-legal and depth-limited minimax
//! (negamax with alpha-beta pruning; perfect play for tic-tac-toe, whose
//! whole tree it searches). Chess's strong player is Debian's `stockfish`,
//! driven over UCI by the arena, not here.
//!
//! Every engine says how sure it is, as a player in the arena is asked
//! to: its move is legal (certain), and its chance of winning from here,
//! from its search (a proven win or loss near 1 or 0, a heuristic value
//! in between).

use crate::rating::SplitMix;
use crate::rules::{Game, Outcome};

/// An engine's move and its confidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub mv: String,
    /// The chance the mover wins the game from here, by its own reckoning.
    pub win: f64,
}

/// The engines there are.
#[derive(Clone, Debug, PartialEq)]
pub enum Engine {
    /// A legal move drawn uniformly (from `seed`, so a game replays the same).
    Random,
    /// The first legal move in the game's order.
    FirstLegal,
    /// Negamax to `depth` plies, the game's heuristic at the leaves.
    Minimax { depth: u32 },
}

/// The confidence an engine reports is kept off 0 and 1, so one wrong
/// certainty does not make a log loss infinite.
const SURE: f64 = 0.98;

impl Engine {
    /// The move for the side to move in `game` (None once it is over).
    /// `seed` makes random choices repeatable: the arena passes one per
    /// game and ply.
    pub fn choose(&self, game: &dyn Game, seed: u64) -> Option<Choice> {
        let legal = game.legal_moves();
        if legal.is_empty() {
            return None;
        }
        match self {
            Engine::Random => {
                let mut rng = SplitMix(seed);
                let mv = legal[(rng.next_u64() % legal.len() as u64) as usize].clone();
                Some(Choice { mv, win: 0.5 })
            }
            Engine::FirstLegal => Some(Choice {
                mv: legal[0].clone(),
                win: 0.5,
            }),
            Engine::Minimax { depth } => {
                let depth = (*depth).max(1);
                let mut best: Option<(f64, String)> = None;
                let mut alpha = -f64::INFINITY;
                // Ties go to a seeded pick among the best, so two minimax
                // players do not always play the same game.
                let mut rng = SplitMix(seed);
                let mut order = legal.clone();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                for mv in order {
                    let mut next = game.boxed();
                    if next.play(&mv).is_err() {
                        continue;
                    }
                    let v = -negamax(next.as_ref(), depth - 1, -f64::INFINITY, -alpha, 1);
                    if best.as_ref().is_none_or(|(b, _)| v > *b) {
                        best = Some((v, mv));
                        alpha = alpha.max(v);
                    }
                }
                let (v, mv) = best?;
                Some(Choice {
                    mv,
                    win: win_chance(v),
                })
            }
        }
    }
}

/// A search value (-1 lost .. 1 won, proven results beyond ±1 less the
/// plies to reach them) as a chance of winning.
fn win_chance(v: f64) -> f64 {
    if v >= 1.0 - 1e-9 {
        SURE
    } else if v <= -1.0 + 1e-9 {
        1.0 - SURE
    } else {
        (0.5 + v / 2.0).clamp(1.0 - SURE, SURE)
    }
}

/// The value of `game` for its side to move: a proven win is worth a bit
/// more the sooner it comes, a proven draw 0, otherwise the heuristic.
fn negamax(game: &dyn Game, depth: u32, mut alpha: f64, beta: f64, ply: u32) -> f64 {
    match game.outcome() {
        // The side that just moved won: bad for the side to move.
        Some(Outcome::Win(_)) => return -(2.0 - f64::from(ply) * 1e-3),
        Some(Outcome::Draw) => return 0.0,
        None => {}
    }
    if depth == 0 {
        return game.evaluate();
    }
    let mut best = -f64::INFINITY;
    for mv in game.legal_moves() {
        let mut next = game.boxed();
        if next.play(&mv).is_err() {
            continue;
        }
        let v = -negamax(next.as_ref(), depth - 1, -beta, -alpha, ply + 1);
        best = best.max(v);
        alpha = alpha.max(v);
        if alpha >= beta {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Kind, Side};

    fn play_out(kind: Kind, first: &Engine, second: &Engine, seed: u64) -> Option<Outcome> {
        let mut g = kind.start();
        let mut ply = 0u64;
        while g.outcome().is_none() {
            let e = if g.to_move() == Side::First {
                first
            } else {
                second
            };
            let c = e.choose(g.as_ref(), seed.wrapping_mul(1000) + ply).unwrap();
            g.play(&c.mv).unwrap();
            ply += 1;
        }
        g.outcome()
    }

    #[test]
    fn perfect_tic_tac_toe_never_loses_and_draws_itself() {
        let perfect = Engine::Minimax { depth: 9 };
        for seed in 0..30 {
            assert_eq!(
                play_out(Kind::TicTacToe, &perfect, &perfect, seed),
                Some(Outcome::Draw)
            );
            let r = play_out(Kind::TicTacToe, &perfect, &Engine::Random, seed);
            assert_ne!(r, Some(Outcome::Win(Side::Second)), "seed {seed}");
            let r = play_out(Kind::TicTacToe, &Engine::Random, &perfect, seed);
            assert_ne!(r, Some(Outcome::Win(Side::First)), "seed {seed}");
        }
        // A win in one is taken, and called.
        let g = Kind::TicTacToe.replay(&["a1", "a2", "b1", "b2"]).unwrap();
        let c = perfect.choose(g.as_ref(), 0).unwrap();
        assert_eq!(c.mv, "c1");
        assert_eq!(c.win, SURE);
    }

    #[test]
    fn connect_four_search_beats_random_and_blocks() {
        let mm = Engine::Minimax { depth: 4 };
        let mut wins = 0;
        for seed in 0..20 {
            if play_out(Kind::ConnectFour, &mm, &Engine::Random, seed)
                == Some(Outcome::Win(Side::First))
            {
                wins += 1;
            }
        }
        assert!(wins >= 19, "{wins} of 20");
        // Red threatens 1-2-3-4 on the bottom row: yellow must block at 4.
        let g = Kind::ConnectFour
            .replay(&["1", "1", "2", "2", "3"])
            .unwrap();
        assert_eq!(mm.choose(g.as_ref(), 7).unwrap().mv, "4");
    }

    #[test]
    fn random_is_repeatable_and_first_legal_is_first() {
        let g = Kind::Chess.start();
        let a = Engine::Random.choose(g.as_ref(), 42).unwrap();
        assert_eq!(a, Engine::Random.choose(g.as_ref(), 42).unwrap());
        assert!(g.legal_moves().contains(&a.mv));
        assert_eq!(
            Engine::FirstLegal.choose(g.as_ref(), 0).unwrap().mv,
            g.legal_moves()[0]
        );
        let over = Kind::TicTacToe
            .replay(&["a1", "a2", "b1", "b2", "c1"])
            .unwrap();
        assert_eq!(Engine::Random.choose(over.as_ref(), 1), None);
    }
}
