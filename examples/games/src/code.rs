//! Game codes: four letters a player reads out to another, from an
//! alphabet without look-alikes (no I, L, O, 0 or 1). A new code is
//! retried until it is free where games are kept (the server's store says
//! which are taken, cluster-wide).

/// Letters of codes: 23, so 279,841 codes.
pub const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ";
pub const LEN: usize = 4;

/// A code from `random` (any source of numbers: the OS's in the server).
pub fn from_random(random: u32) -> String {
    let mut n = random as usize;
    let mut out = String::with_capacity(LEN);
    for _ in 0..LEN {
        out.push(ALPHABET[n % ALPHABET.len()] as char);
        n /= ALPHABET.len();
    }
    out
}

/// A code as a player typed it, canonical (upper case, trimmed), or
/// `None` when it cannot be one.
pub fn parse(text: &str) -> Option<String> {
    let code = text.trim().to_ascii_uppercase();
    (code.len() == LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// A free code: `random` is asked again while `taken` says a code is.
pub fn fresh(
    mut random: impl FnMut() -> u32,
    taken: impl Fn(&str) -> bool,
    tries: usize,
) -> Option<String> {
    (0..tries)
        .map(|_| from_random(random()))
        .find(|c| !taken(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_and_collisions_are_retried() {
        let c = from_random(123_456_789);
        assert_eq!(c.len(), 4);
        assert_eq!(parse(&format!(" {} ", c.to_lowercase())), Some(c.clone()));
        assert_eq!(parse("ABIO"), None, "look-alikes are no letters of codes");
        assert_eq!(parse("ABC"), None);
        let mut n = 0;
        let first = from_random(0);
        let got = fresh(
            || {
                n += 1;
                n / 3
            },
            |c| c == first,
            10,
        )
        .unwrap();
        assert_ne!(got, first);
        assert_eq!(fresh(|| 0, |_| true, 5), None);
    }
}
