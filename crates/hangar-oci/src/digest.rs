//! Content digests (`sha256:<hex>`, `sha512:<hex>`: the algorithms the OCI
//! image spec registers) and the hashing readers and writers that compute
//! them while bytes stream past.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::Error;

/// A digest algorithm the OCI image spec registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Algorithm {
    /// What Hangar computes for content it makes, and what clients default to.
    #[default]
    Sha256,
    Sha512,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest: a registered algorithm and its lowercase hex encoding.
/// Anything else is refused at parse time, so a digest can always be used
/// as a file name (`<algorithm>/<hex>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    alg: Algorithm,
    hex: String,
}

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::of_with(Algorithm::Sha256, bytes)
    }

    /// The digest of `bytes` with `alg` (to check content against a digest
    /// of any algorithm: `Digest::of_with(want.algorithm(), bytes) == want`).
    pub fn of_with(alg: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::with(alg);
        h.update(bytes);
        h.finish().0
    }

    /// A digest from its hex alone, the algorithm told by the length (as
    /// the stores name files): `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let alg = Algorithm::ALL
            .into_iter()
            .find(|a| a.hex_len() == hex.len())?;
        hex.bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then(|| Digest {
                alg,
                hex: hex.to_string(),
            })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as Docker shows image ids.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidDigest {
            input: s.to_string(),
        };
        let (alg, hex) = s.split_once(':').ok_or_else(invalid)?;
        let alg = Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == alg)
            .ok_or_else(|| Error::UnsupportedDigest {
                input: s.to_string(),
            })?;
        match Digest::from_hex(hex) {
            Some(d) if d.alg == alg => Ok(d),
            _ => Err(invalid()),
        }
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone)]
enum State {
    Sha256(Sha256),
    Sha512(Sha512),
}

/// Counts and hashes the bytes written through it (sha256 unless made
/// `with` another algorithm).
#[derive(Clone)]
pub struct Hasher {
    state: State,
    len: u64,
}

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher::with(Algorithm::Sha256)
    }
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn with(alg: Algorithm) -> Hasher {
        let state = match alg {
            Algorithm::Sha256 => State::Sha256(Sha256::new()),
            Algorithm::Sha512 => State::Sha512(Sha512::new()),
        };
        Hasher { state, len: 0 }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.state {
            State::Sha256(_) => Algorithm::Sha256,
            State::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Sha256(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
        self.len += bytes.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (Digest, u64) {
        let (alg, hex) = match self.state {
            State::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            State::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        (Digest { alg, hex }, self.len)
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader::with(Algorithm::Sha256, inner)
    }

    pub fn with(alg: Algorithm, inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::with(alg),
        }
    }

    /// Reads the rest of the stream, then returns its digest and length.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.hasher.finish())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn sha512_too() {
        let d = Digest::of_with(Algorithm::Sha512, b"");
        assert_eq!(d.to_string(), "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::from_hex(d.hex()), Some(d.clone()));
        assert_ne!(d, Digest::of(b""));
        assert!(matches!(
            "blake3:00".parse::<Digest>(),
            Err(Error::UnsupportedDigest { .. })
        ));
    }

    #[test]
    fn refuses_other_forms() {
        for bad in [
            "",
            "sha256:",
            "sha512:e3b0",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
