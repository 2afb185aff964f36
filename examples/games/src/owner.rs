//! Which machine owns a game: rendezvous hashing of the game's code over
//! the live peers (from `<app>.internal`), so every machine computes the
//! same owner, and a machine joining or leaving moves only the games it
//! gains or held. The next peer in the same order is the game's backup.

use rendezvous_hash::{DefaultNodeHasher, RendezvousNodes};

/// The peers of `code` in order: its owner first, then its backup.
pub fn ranked<'a>(code: &str, peers: &'a [String]) -> Vec<&'a str> {
    let mut nodes: RendezvousNodes<&str, DefaultNodeHasher> = RendezvousNodes::default();
    for p in peers {
        nodes.insert(p.as_str());
    }
    nodes.calc_candidates(&code).copied().collect()
}

/// The owner of `code` among `peers`.
pub fn owner<'a>(code: &str, peers: &'a [String]) -> Option<&'a str> {
    ranked(code, peers).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("fdaa::{i}")).collect()
    }

    #[test]
    fn owners_agree_spread_and_move_only_when_they_must() {
        let three = peers(3);
        let codes: Vec<String> = (0..600)
            .map(|i| crate::code::from_random(i * 7919))
            .collect();
        // The order of the peers does not matter.
        let mut shuffled = three.clone();
        shuffled.reverse();
        for c in &codes {
            assert_eq!(owner(c, &three), owner(c, &shuffled));
            let r = ranked(c, &three);
            assert_eq!(r.len(), 3);
            assert_ne!(r[0], r[1], "the backup is another peer");
        }
        // Spread over the peers.
        for p in &three {
            let mine = codes.iter().filter(|c| owner(c, &three) == Some(p)).count();
            assert!(mine > 120, "{p} owns {mine} of 600");
        }
        // A peer leaves: only its games move, each to its backup.
        let two: Vec<String> = three[..2].to_vec();
        for c in &codes {
            let before = ranked(c, &three);
            let after = owner(c, &two).unwrap();
            if before[0] == three[2] {
                assert_eq!(after, before[1]);
            } else {
                assert_eq!(after, before[0]);
            }
        }
        assert_eq!(owner("ABCD", &[]), None);
    }
}
