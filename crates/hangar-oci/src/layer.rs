//! Layer blobs: compression detection, decompression, and ingest (store the
//! compressed bytes while checking both the blob digest and the DiffID, the
//! digest of the uncompressed tar, in one pass).

use std::io::{self, Cursor, Read, Write};
use tokio::sync::mpsc;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::store::{BlobWriter, StagedBlob, Store};

/// How a layer tar is compressed, told by its first bytes (media types lie:
/// Docker's "uncompressed" types are often gzip, and some registries mislabel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

fn read_head<R: Read>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    r.by_ref().take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Wrap `r` in the decompressor its first bytes call for.
pub fn decompress<'a, R: Read + Send + 'a>(mut r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
    let head = read_head(&mut r, 4)?;
    let kind = Compression::sniff(&head);
    let r = Cursor::new(head).chain(r);
    Ok(match kind {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(256 * 1024, r),
        )),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
    })
}

/// A reader that copies every byte it yields into a blob being written.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut BlobWriter,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// What a layer must turn out to be.
pub struct Expected<'a> {
    pub digest: &'a Digest,
    pub size: u64,
    /// The config's `rootfs.diff_ids` entry, when known.
    pub diff_id: Option<&'a Digest>,
}

/// Stream a layer blob into the store's `tmp/`, verifying its size, digest and
/// DiffID. Nothing becomes visible until the returned blob is committed.
pub fn ingest_layer<R: Read + Send>(
    store: &Store,
    reader: R,
    want: &Expected,
    source_name: &str,
) -> Result<StagedBlob> {
    let mut writer = store.new_blob()?;
    let verify = |reason: String| Error::Verify {
        digest: want.digest.to_string(),
        source_name: source_name.to_string(),
        reason,
    };
    let diff = {
        let mut tee = Tee {
            inner: reader.take(want.size + 1),
            out: &mut writer,
        };
        let mut diff = Hasher::new();
        let result = decompress(&mut tee).and_then(|mut d| io::copy(&mut d, &mut diff));
        // Read to the end either way: a bad digest or size explains a
        // decompression failure better than the decompressor does.
        let drained = io::copy(&mut tee, &mut io::sink());
        if let Err(e) = result.and(drained) {
            let cause = e.to_string();
            drop(tee);
            writer.finish(Some((want.digest, want.size)), source_name)?;
            return Err(verify(format!(
                "layer does not read or decompress: {cause}"
            )));
        }
        diff.finish().0
    };
    let staged = writer.finish(Some((want.digest, want.size)), source_name)?;
    if let Some(want_diff) = want.diff_id {
        if diff != *want_diff {
            return Err(verify(format!(
                "uncompressed content hashes to {diff}, but the image config lists DiffID {want_diff}"
            )));
        }
    }
    Ok(staged)
}

/// The blocking end of a bounded byte channel: lets sync code (decompressors,
/// tar) read what an async task or another thread produces, with
/// backpressure. An `Err` item ends the stream with that error. Must be read
/// from a thread that is not running async tasks.
pub struct ChannelReader<T> {
    rx: mpsc::Receiver<io::Result<T>>,
    buf: Option<T>,
    pos: usize,
}

impl<T: AsRef<[u8]>> ChannelReader<T> {
    pub fn new(rx: mpsc::Receiver<io::Result<T>>) -> Self {
        ChannelReader {
            rx,
            buf: None,
            pos: 0,
        }
    }
}

impl<T: AsRef<[u8]>> Read for ChannelReader<T> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(buf) = &self.buf {
                let buf = buf.as_ref();
                if self.pos < buf.len() {
                    let n = out.len().min(buf.len() - self.pos);
                    out[..n].copy_from_slice(&buf[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = Some(chunk);
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn ingests_gzip_zstd_and_plain() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let tar = b"pretend this is a tar".repeat(100);
        let diff = Digest::of(&tar);
        for blob in [
            gzip(&tar),
            zstd::encode_all(&tar[..], 3).unwrap(),
            tar.clone(),
        ] {
            let digest = Digest::of(&blob);
            let want = Expected {
                digest: &digest,
                size: blob.len() as u64,
                diff_id: Some(&diff),
            };
            let staged = ingest_layer(&store, &blob[..], &want, "t").unwrap();
            assert_eq!(staged.commit().unwrap(), digest);
        }
    }

    #[test]
    fn wrong_diff_id_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let blob = gzip(b"abc");
        let digest = Digest::of(&blob);
        let wrong = Digest::of(b"abd");
        let want = Expected {
            digest: &digest,
            size: blob.len() as u64,
            diff_id: Some(&wrong),
        };
        let err = ingest_layer(&store, &blob[..], &want, "t")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("DiffID"), "{err}");
        // too long a stream is refused by size, not read forever
        let want = Expected {
            digest: &digest,
            size: 3,
            diff_id: None,
        };
        assert!(ingest_layer(&store, &blob[..], &want, "t").is_err());
        assert_eq!(
            std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
            0
        );
    }
}
