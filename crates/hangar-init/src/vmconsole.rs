//! The terminal of a micro-VM's console session: frames over the VM's
//! second serial port (`/dev/ttyS1` in the guest; a Unix socket of QEMU's
//! on the host). One session at a time: the host opens it with the
//! command, its environment and the terminal's size, then both sides send
//! data; the host also sends resizes and a hangup, the guest the exit
//! code. Each frame starts with [`MAGIC`], so a reader that lost its place
//! (a client gone mid-frame) finds the next one.

use serde::{Deserialize, Serialize};

/// Where each frame starts.
pub const MAGIC: [u8; 2] = [0xc7, 0x1e];
/// The most payload one frame carries.
pub const MAX_PAYLOAD: usize = 16 << 10;

/// The guest's device for console sessions.
pub const GUEST_DEVICE: &str = "/dev/ttyS1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host to guest: an [`Open`] (JSON); a session still running ends.
    Open = 1,
    /// Either way: bytes for the terminal, or from it.
    Data = 2,
    /// Host to guest: rows and columns, two big-endian u16.
    Resize = 3,
    /// Host to guest: the client went.
    HangUp = 4,
    /// Guest to host: the command's exit code, a big-endian i32.
    Exit = 5,
}

impl Kind {
    fn of(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Resize,
            4 => Kind::HangUp,
            5 => Kind::Exit,
            _ => return None,
        })
    }
}

/// What a session runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Open {
    pub argv: Vec<String>,
    /// `KEY=value`.
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub rows: u16,
    pub cols: u16,
}

/// One frame, ready to write.
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(MAX_PAYLOAD);
    let mut out = Vec::with_capacity(len + 5);
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
    out
}

/// Frames out of a byte stream, as its bytes come.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// Add bytes read; the whole frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(Kind, Vec<u8>)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            // Up to the next magic (anything before it is lost).
            match self.buf.windows(2).position(|w| w == MAGIC) {
                Some(0) => {}
                Some(at) => {
                    self.buf.drain(..at);
                }
                None => {
                    let keep = usize::from(self.buf.last() == Some(&MAGIC[0]));
                    let drop = self.buf.len() - keep;
                    self.buf.drain(..drop);
                    return out;
                }
            }
            if self.buf.len() < 5 {
                return out;
            }
            let len = usize::from(u16::from_be_bytes([self.buf[3], self.buf[4]]));
            let Some(kind) = Kind::of(self.buf[2]).filter(|_| len <= MAX_PAYLOAD) else {
                // Not a frame after all: past this magic.
                self.buf.drain(..2);
                continue;
            };
            if self.buf.len() < 5 + len {
                return out;
            }
            let payload = self.buf[5..5 + len].to_vec();
            self.buf.drain(..5 + len);
            out.push((kind, payload));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_whole_whatever_the_reads_and_after_noise() {
        let mut stream = b"noise\xc7".to_vec();
        stream.extend(frame(Kind::Data, b"hello \xc7\x1e world"));
        stream.extend(frame(Kind::Resize, &[0, 50, 0, 132]));
        stream.extend(frame(Kind::Exit, &7i32.to_be_bytes()));
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut r = Reader::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                got.extend(r.push(piece));
            }
            assert_eq!(
                got,
                vec![
                    (Kind::Data, b"hello \xc7\x1e world".to_vec()),
                    (Kind::Resize, vec![0, 50, 0, 132]),
                    (Kind::Exit, 7i32.to_be_bytes().to_vec()),
                ],
                "chunks of {chunk}"
            );
        }
        // A magic with a bad kind is skipped.
        let mut r = Reader::default();
        let mut bad = vec![0xc7, 0x1e, 99, 0, 1];
        bad.extend(frame(Kind::HangUp, b""));
        assert_eq!(r.push(&bad), vec![(Kind::HangUp, vec![])]);
    }
}
