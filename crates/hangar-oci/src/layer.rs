//! Layer blobs: compression detection, decompression, and verified ingest
//! into the store.

use std::io::{self, Cursor, Read, Write};
use tokio::sync::mpsc;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::{StagedBlob, Store};

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

/// What a layer must turn out to be.
pub struct Expected<'a> {
    pub digest: &'a Digest,
    pub size: u64,
    /// The config's `rootfs.diff_ids` entry, when known.
    pub diff_id: Option<&'a Digest>,
}

/// Stream a layer blob into the store's `tmp/`, verifying its size and
/// digest. Nothing becomes visible until the returned blob is committed.
///
/// The DiffID of a compressed layer is checked where the layer is
/// decompressed anyway, when it is applied (see `unpack`): decompressing
/// here too would make a pull several times slower for no added safety,
/// since no layer content is ever used unapplied. An uncompressed layer's
/// DiffID is its digest, so that one is checked here, for free.
pub fn ingest_layer<R: Read>(
    store: &Store,
    reader: R,
    want: &Expected,
    source_name: &str,
) -> Result<StagedBlob> {
    let mut writer = store.new_blob_for(want.digest.algorithm())?;
    let mut head = Vec::with_capacity(4);
    let mut reader = reader.take(want.size + 1);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Verify {
                    digest: want.digest.to_string(),
                    source_name: source_name.to_string(),
                    reason: format!("reading the layer failed after {} bytes: {e}", writer.len()),
                })
            }
        };
        if head.len() < 4 {
            head.extend(buf[..n].iter().take(4 - head.len()));
        }
        writer.write_all(&buf[..n]).map_err(|e| Error::Io {
            path: store.root().join("tmp"),
            source: e,
        })?;
    }
    let staged = writer.finish(Some((want.digest, want.size)), source_name)?;
    if let Some(diff_id) = want.diff_id {
        if Compression::sniff(&head) == Compression::None && diff_id != want.digest {
            return Err(Error::Verify {
                digest: want.digest.to_string(),
                source_name: source_name.to_string(),
                reason: format!("the layer is uncompressed, so its DiffID must be its digest, but the image config lists {diff_id}"),
            });
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
    /// Where finished chunks go back to the producer for reuse.
    recycle: Option<std::sync::mpsc::Sender<T>>,
}

impl<T: AsRef<[u8]>> ChannelReader<T> {
    pub fn new(rx: mpsc::Receiver<io::Result<T>>) -> Self {
        ChannelReader {
            rx,
            buf: None,
            pos: 0,
            recycle: None,
        }
    }

    /// Like `new`, and hand each chunk back through `recycle` once read, so
    /// the producer reuses buffers instead of faulting in fresh pages.
    pub fn recycling(
        rx: mpsc::Receiver<io::Result<T>>,
        recycle: std::sync::mpsc::Sender<T>,
    ) -> Self {
        ChannelReader {
            recycle: Some(recycle),
            ..Self::new(rx)
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
                    if let (Some(old), Some(recycle)) = (self.buf.replace(chunk), &self.recycle) {
                        let _ = recycle.send(old);
                    }
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
    fn wrong_diff_id_of_a_plain_layer_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let blob = b"plain tar bytes".to_vec();
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
