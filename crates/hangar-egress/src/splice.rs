//! Zero-copy relaying between two TCP sockets: splice(2) moves the bytes
//! from one socket into a pipe and from the pipe into the other, so they
//! never cross into user space (on loopback the kernel passes the pages
//! along). Used for CONNECT tunnels and for bodies passed through as they
//! are. One pipe per direction, sized 1 MiB where the system allows it, so a
//! large transfer takes few system calls.

use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

const PIPE_BYTES: usize = 1 << 20;

/// A pipe for one direction of a relay.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    /// Bytes in the pipe, not yet written out.
    held: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let size = rustix::pipe::fcntl_setpipe_size(&write, PIPE_BYTES).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            size,
            held: 0,
        })
    }

    /// Move up to `limit` bytes from `src` to `dst`, waiting as needed;
    /// returns how many moved (0: `src` reached its end).
    pub async fn transfer(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        limit: u64,
    ) -> io::Result<usize> {
        let want = (limit.min(self.size as u64)) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                rustix::pipe::splice(
                    src,
                    None,
                    &self.write,
                    None,
                    want,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        self.held = n;
        self.drain(dst).await?;
        Ok(n)
    }

    /// Write out what the pipe holds.
    async fn drain(&mut self, dst: &TcpStream) -> io::Result<()> {
        while self.held > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                rustix::pipe::splice(
                    &self.read,
                    None,
                    dst,
                    None,
                    self.held,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )
                .map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.held -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Relay `src` to `dst` until `src` ends, then end `dst`'s writing half.
async fn one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let n = pipe.transfer(src, dst, u64::MAX).await?;
        if n == 0 {
            let _ = rustix::net::shutdown(dst, rustix::net::Shutdown::Write);
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Relay both ways until both sides have ended (or one fails); returns the
/// bytes moved each way (a to b, b to a).
pub async fn relay(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    let (ab, ba) = tokio::join!(one_way(a, b), one_way(b, a));
    Ok((ab?, ba?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_and_passes_on_the_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // client <-> (a, b) relay <-> server
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (a, _) = listener.accept().await.unwrap();
        let mut server_side = TcpStream::connect(addr).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        let relay = tokio::spawn(async move { relay(&a, &b).await });
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server_side.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big, "the bytes changed on the way");
        server_side.write_all(b"answer").await.unwrap();
        server_side.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer");
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (big.len() as u64, 6));
    }
}
