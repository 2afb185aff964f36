//! Ratings from finished games (issue #19's first step): Bradley–Terry by
//! maximum likelihood on all games, a draw counting half a win, on an
//! Elo-like scale pinned to an anchor player, with bootstrap confidence
//! intervals (games resampled); and online Elo as a second view.
//!
//! The fit is Hunter's MM iteration for Bradley–Terry. So that a player
//! who won (or lost) every game still has a finite rating, every player
//! also gets one virtual draw against a virtual player of the pool's
//! average strength: a weak prior that keeps the ratings of players with
//! few games near the middle and vanishes as games accumulate.

use std::collections::BTreeMap;

/// One finished game: who played, and the first player's score (1 a win,
/// 0.5 a draw, 0 a loss).
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub first: usize,
    pub second: usize,
    pub score: f64,
}

/// Points per factor of 10 in strength (Elo's).
pub const SCALE: f64 = 400.0;

/// A player's rating and its interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Rated {
    pub rating: f64,
    pub low: f64,
    pub high: f64,
}

/// Bradley–Terry strengths (log scale, natural) of `players` from
/// `games`, the anchor at 0.
pub fn fit_log_strengths(players: usize, games: &[Score], anchor: usize) -> Vec<f64> {
    // wins[i]: score of i; pairs[(i, j)]: games between i < j.
    let mut wins = vec![0.5; players];
    let mut pairs: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for g in games {
        if g.first == g.second || g.first >= players || g.second >= players {
            continue;
        }
        wins[g.first] += g.score;
        wins[g.second] += 1.0 - g.score;
        *pairs
            .entry((g.first.min(g.second), g.first.max(g.second)))
            .or_default() += 1.0;
    }
    let mut p = vec![1.0f64; players];
    for _ in 0..10_000 {
        // The virtual opponent: the geometric mean strength.
        let mean = (p.iter().map(|x| x.ln()).sum::<f64>() / players.max(1) as f64).exp();
        let mut denom: Vec<f64> = p.iter().map(|pi| 1.0 / (pi + mean)).collect();
        for (&(i, j), &n) in &pairs {
            let d = n / (p[i] + p[j]);
            denom[i] += d;
            denom[j] += d;
        }
        let mut next: Vec<f64> = (0..players).map(|i| wins[i] / denom[i]).collect();
        // Only ratios count: keep the geometric mean at 1.
        let g = (next.iter().map(|x| x.ln()).sum::<f64>() / players.max(1) as f64).exp();
        next.iter_mut().for_each(|x| *x /= g);
        let change = next
            .iter()
            .zip(&p)
            .map(|(a, b)| (a.ln() - b.ln()).abs())
            .fold(0.0, f64::max);
        p = next;
        if change < 1e-7 {
            break;
        }
    }
    let base = p.get(anchor).copied().unwrap_or(1.0).ln();
    p.iter().map(|x| x.ln() - base).collect()
}

/// Ratings on the Elo scale, `anchor` at `anchor_rating`, with bootstrap
/// intervals at `level` (0.95) from `rounds` resamplings of the games.
pub fn bradley_terry(
    players: usize,
    games: &[Score],
    anchor: usize,
    anchor_rating: f64,
    rounds: usize,
    level: f64,
    seed: u64,
) -> Vec<Rated> {
    let to_elo = |s: f64| anchor_rating + s * SCALE / std::f64::consts::LN_10;
    let point = fit_log_strengths(players, games, anchor);
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); players];
    let mut rng = SplitMix(seed);
    let mut resampled = Vec::with_capacity(games.len());
    for _ in 0..rounds {
        resampled.clear();
        for _ in 0..games.len() {
            resampled.push(games[(rng.next_u64() % games.len() as u64) as usize].clone());
        }
        for (i, s) in fit_log_strengths(players, &resampled, anchor)
            .into_iter()
            .enumerate()
        {
            samples[i].push(to_elo(s));
        }
    }
    let tail = (1.0 - level) / 2.0;
    point
        .into_iter()
        .zip(samples)
        .map(|(s, mut xs)| {
            xs.sort_by(f64::total_cmp);
            Rated {
                rating: to_elo(s),
                low: quantile(&xs, tail),
                high: quantile(&xs, 1.0 - tail),
            }
        })
        .collect()
}

/// Online Elo over `games` in order, every player starting at `start`.
pub fn online_elo(players: usize, games: &[Score], k: f64, start: f64) -> Vec<f64> {
    let mut r = vec![start; players];
    for g in games {
        let expected = 1.0 / (1.0 + 10f64.powf((r[g.second] - r[g.first]) / SCALE));
        let delta = k * (g.score - expected);
        r[g.first] += delta;
        r[g.second] -= delta;
    }
    r
}

/// The `q` quantile of sorted `xs` (linear between neighbours).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

/// FNV-1a: a hash that is the same in every run and build (std's is
/// not), for seeds made from names and requests.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small seeded generator (SplitMix64), so fits and tests repeat.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round robin of players with true ratings `truth`, `per_pair`
    /// games each way, `draws` setting how often games are drawn.
    fn tournament(truth: &[f64], per_pair: usize, draws: f64, rng: &mut SplitMix) -> Vec<Score> {
        let mut games = Vec::new();
        for i in 0..truth.len() {
            for j in 0..truth.len() {
                if i == j {
                    continue;
                }
                let p = 1.0 / (1.0 + 10f64.powf((truth[j] - truth[i]) / SCALE));
                // Draws take half of their chance from each side's, so the
                // expected score stays the model's `p`.
                let q = draws * 2.0 * p.min(1.0 - p);
                for _ in 0..per_pair {
                    let u = rng.unit();
                    let score = if u < p - q / 2.0 {
                        1.0
                    } else if u < p + q / 2.0 {
                        0.5
                    } else {
                        0.0
                    };
                    games.push(Score {
                        first: i,
                        second: j,
                        score,
                    });
                }
            }
        }
        games
    }

    #[test]
    fn known_strengths_are_recovered_in_order_with_intervals_that_cover() {
        let truth = [0.0, 100.0, 200.0, 400.0];
        let mut rng = SplitMix(7);
        let games = tournament(&truth, 60, 0.2, &mut rng);
        let rated = bradley_terry(truth.len(), &games, 0, 0.0, 200, 0.95, 1);
        for w in rated.windows(2) {
            assert!(w[0].rating < w[1].rating, "{rated:?}");
        }
        assert_eq!(rated[0].rating, 0.0, "the anchor is pinned");
        for (r, t) in rated.iter().zip(truth) {
            assert!(r.low <= r.rating && r.rating <= r.high, "{r:?}");
            assert!((r.rating - t).abs() < 80.0, "{r:?} for {t}");
        }
    }

    #[test]
    fn the_intervals_cover_the_truth_about_95_percent_of_the_time() {
        let truth = [0.0, 50.0, 150.0];
        let mut rng = SplitMix(11);
        let (mut covered, mut total) = (0, 0);
        for t in 0..400 {
            let games = tournament(&truth, 100, 0.1, &mut rng);
            let rated = bradley_terry(truth.len(), &games, 0, 0.0, 150, 0.95, t);
            for (r, t) in rated.iter().zip(truth).skip(1) {
                total += 1;
                covered += usize::from(r.low <= t && t <= r.high);
            }
        }
        let share = covered as f64 / total as f64;
        eprintln!("coverage {share} over {total} intervals");
        // Measured: 0.941 here; with 25 games each way it is 0.925 (the
        // percentile bootstrap is a little narrow on small samples).
        assert!((0.92..=0.975).contains(&share), "coverage {share}");
    }

    #[test]
    fn a_player_who_won_everything_is_finite_and_elo_agrees_in_order() {
        let games: Vec<Score> = (0..20)
            .map(|i| Score {
                first: i % 2,
                second: 1 - i % 2,
                score: if i % 2 == 0 { 1.0 } else { 0.0 },
            })
            .collect();
        let s = fit_log_strengths(2, &games, 1);
        assert!(s[0].is_finite() && s[0] > 0.0, "{s:?}");
        let elo = online_elo(2, &games, 16.0, 1000.0);
        assert!(elo[0] > elo[1]);
        assert!((elo[0] + elo[1] - 2000.0).abs() < 1e-9, "Elo is zero-sum");
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
