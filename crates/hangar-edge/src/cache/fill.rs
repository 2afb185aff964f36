//! Request coalescing: concurrent misses on one key share one origin
//! request (a *fill*). The first request leads; later ones wait for the
//! response head, woken the moment it arrives (a watch channel, no
//! polling), then stream the body from the fill's buffer as it grows.
//! When the response cannot be shared the waiters are told to go to the
//! origin themselves, and the key is remembered as uncacheable for a while
//! so later requests do not queue behind it. A waiter never waits for the
//! head longer than the lock timeout.
//!
//! A body of unknown length that grows past the largest storable object
//! turns the fill into a plain stream: it leaves the table (later requests
//! make their own), drops what every reader has seen, and reads from the
//! origin only as fast as its slowest reader (at most [`STREAM_WINDOW`]
//! ahead), stopping when no reader is left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Kind, ProxyError};
use bytes::Bytes;
use hyper::body::Frame;
use hyper::header::HeaderMap;
use hyper::StatusCode;
use tokio::sync::watch;

/// The shared part of a response: what every waiter answers with.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The full cache key (with Vary values) this response is for.
    pub key: String,
    /// The body length, when the origin said.
    pub len: Option<u64>,
}

#[derive(Clone)]
enum Outcome {
    Pending,
    Shared(Arc<Head>),
    Pass,
    Failed(ProxyError),
}

/// How far a streaming fill may read ahead of its slowest reader.
pub const STREAM_WINDOW: u64 = 4 << 20;

struct State {
    outcome: Outcome,
    /// The body from chunk number `base` on.
    chunks: std::collections::VecDeque<Bytes>,
    base: usize,
    /// Bytes in `chunks`.
    buffered: u64,
    done: bool,
    error: Option<Arc<str>>,
    /// Too big to keep: chunks every reader has seen are dropped.
    streaming: bool,
    /// Each reader's next chunk number.
    readers: HashMap<u64, usize>,
    next_reader: u64,
}

impl State {
    /// Drop the chunks every reader has seen (streaming only).
    fn trim(&mut self) {
        if !self.streaming {
            return;
        }
        let seen = self
            .readers
            .values()
            .copied()
            .min()
            .unwrap_or(self.base + self.chunks.len());
        while self.base < seen {
            match self.chunks.pop_front() {
                Some(c) => self.buffered -= c.len() as u64,
                None => break,
            }
            self.base += 1;
        }
    }
}

pub struct Fill {
    state: Mutex<State>,
    progress: watch::Sender<u64>,
}

/// What a waiter learns.
pub enum Waited {
    Shared(Arc<Head>),
    /// Not shareable: go to the origin yourself.
    Pass,
    /// The fill failed before a head arrived: the status an error page
    /// should have, and why.
    Failed(ProxyError),
    /// The lock timeout passed.
    TimedOut,
}

impl Fill {
    fn new() -> Fill {
        Fill {
            state: Mutex::new(State {
                outcome: Outcome::Pending,
                chunks: Default::default(),
                base: 0,
                buffered: 0,
                done: false,
                error: None,
                streaming: false,
                readers: HashMap::new(),
                next_reader: 0,
            }),
            progress: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.progress.send_modify(|v| *v += 1);
    }

    pub fn share(&self, head: Arc<Head>) {
        self.update(|s| s.outcome = Outcome::Shared(head));
    }

    pub fn pass(&self) {
        self.update(|s| s.outcome = Outcome::Pass);
    }

    pub fn fail(&self, e: ProxyError) {
        let why = e.cause.clone();
        self.update(|s| {
            if matches!(s.outcome, Outcome::Pending) {
                s.outcome = Outcome::Failed(e.clone());
            }
            if !s.done {
                s.error = Some(why);
                s.done = true;
            }
        });
    }

    pub fn push(&self, chunk: Bytes) {
        self.update(|s| {
            s.buffered += chunk.len() as u64;
            s.chunks.push_back(chunk);
            s.trim();
        });
    }

    /// Stop keeping the whole body (it will not be stored): from now on
    /// only what some reader has not seen yet is held.
    pub fn stream(&self) {
        self.update(|s| {
            s.streaming = true;
            s.trim();
        });
    }

    /// For a streaming fill: wait until the readers are within
    /// [`STREAM_WINDOW`] of the end. `false`: no reader is left, stop.
    pub async fn room(&self) -> bool {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let s = self.lock();
                if s.readers.is_empty() {
                    return false;
                }
                if s.buffered <= STREAM_WINDOW {
                    return true;
                }
                rx.borrow_and_update();
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    pub fn finish(&self) {
        self.update(|s| s.done = true);
    }

    /// Wait for the head, at most `timeout` (`None`: as long as it takes).
    pub async fn wait(&self, timeout: Option<Duration>) -> Waited {
        let mut rx = self.progress.subscribe();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            match self.lock().outcome.clone() {
                Outcome::Pending => {}
                Outcome::Shared(h) => return Waited::Shared(h),
                Outcome::Pass => return Waited::Pass,
                Outcome::Failed(e) => return Waited::Failed(e),
            }
            let changed = rx.changed();
            let result = match deadline {
                Some(d) => match tokio::time::timeout_at(d, changed).await {
                    Ok(r) => r,
                    Err(_) => return Waited::TimedOut,
                },
                None => changed.await,
            };
            if result.is_err() {
                return Waited::Failed(ProxyError::new(
                    Kind::FillEnded,
                    "the origin request ended",
                ));
            }
        }
    }

    /// The whole body so far, in one piece (before any [`Fill::stream`]).
    pub fn collected(&self) -> Bytes {
        let s = self.lock();
        let mut all = bytes::BytesMut::with_capacity(s.chunks.iter().map(|c| c.len()).sum());
        for c in &s.chunks {
            all.extend_from_slice(c);
        }
        all.freeze()
    }

    /// The body as it arrives, from the start, for one reader. `None`
    /// when its start is already gone (a streaming fill): go to the origin.
    pub fn body(
        self: Arc<Self>,
    ) -> Option<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send> {
        let reader = {
            let mut s = self.lock();
            if s.base > 0 {
                return None;
            }
            let id = s.next_reader;
            s.next_reader += 1;
            s.readers.insert(id, 0);
            Reader {
                fill: self.clone(),
                id,
            }
        };
        let rx = self.progress.subscribe();
        enum Step {
            Chunk(Bytes),
            Error(std::io::Error),
            End,
            Wait,
        }
        Some(futures_util::stream::unfold(
            (reader, rx, 0usize),
            |(reader, mut rx, next)| async move {
                if next == usize::MAX {
                    return None; // after an error
                }
                let fill = reader.fill.clone();
                loop {
                    let step = {
                        let mut s = fill.lock();
                        let at = next.checked_sub(s.base);
                        if let Some(c) = at.and_then(|i| s.chunks.get(i)).cloned() {
                            s.readers.insert(reader.id, next + 1);
                            if s.streaming {
                                s.trim();
                                drop(s);
                                // The fill may be waiting for room.
                                fill.progress.send_modify(|v| *v += 1);
                            }
                            Step::Chunk(c)
                        } else if let Some(e) = &s.error {
                            Step::Error(std::io::Error::other(e.to_string()))
                        } else if s.done {
                            Step::End
                        } else {
                            // Everything so far is seen; wait for the next change.
                            rx.borrow_and_update();
                            Step::Wait
                        }
                    };
                    match step {
                        Step::Chunk(c) => {
                            return Some((Ok(Frame::data(c)), (reader, rx, next + 1)))
                        }
                        Step::Error(e) => return Some((Err(e), (reader, rx, usize::MAX))),
                        Step::End => return None,
                        Step::Wait => {
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        ))
    }
}

/// A registered reader of a fill; leaving lets the fill drop what only it
/// still needed, or stop.
struct Reader {
    fill: Arc<Fill>,
    id: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.fill.update(|s| {
            s.readers.remove(&self.id);
            s.trim();
        });
    }
}

/// How a request takes part in a key's fill.
pub enum Join {
    /// Make the origin request; the guard ends the fill's registration.
    Lead(Arc<Fill>, Registration),
    /// Another request is filling this key.
    Wait(Arc<Fill>),
    /// The key was recently found uncacheable: go straight to the origin.
    Bypass,
}

/// The fills in progress and the keys recently found uncacheable.
#[derive(Default)]
pub struct Fills {
    active: Mutex<HashMap<String, Arc<Fill>>>,
    uncacheable: Mutex<HashMap<String, Instant>>,
}

/// Removes a fill from the table when dropped (done, failed or cancelled),
/// failing its waiters if it never produced a head.
pub struct Registration {
    fills: Arc<Fills>,
    key: String,
    fill: Arc<Fill>,
}

impl Registration {
    /// Take the fill out of the table now: later requests for the key
    /// start their own.
    pub fn unlist(&self) {
        let mut active = self.fills.active.lock().unwrap_or_else(|e| e.into_inner());
        if active
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            active.remove(&self.key);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unlist();
        self.fill.fail(ProxyError::new(
            Kind::FillEnded,
            "the origin request was cancelled",
        ));
    }
}

impl Fills {
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        {
            let mut unc = self.uncacheable.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(until) = unc.get(key) {
                if *until > Instant::now() {
                    return Join::Bypass;
                }
                unc.remove(key);
            }
        }
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = active.get(key) {
            return Join::Wait(f.clone());
        }
        let fill = Arc::new(Fill::new());
        active.insert(key.to_string(), fill.clone());
        Join::Lead(
            fill.clone(),
            Registration {
                fills: self.clone(),
                key: key.to_string(),
                fill,
            },
        )
    }

    /// Remember `key` as uncacheable for `ttl`.
    pub fn mark_uncacheable(&self, key: &str, ttl: Duration) {
        let mut unc = self.uncacheable.lock().unwrap_or_else(|e| e.into_inner());
        if unc.len() > 100_000 {
            let now = Instant::now();
            unc.retain(|_, t| *t > now);
        }
        unc.insert(key.to_string(), Instant::now() + ttl);
    }

    /// Forget that `key` was uncacheable (a purge, or a cacheable answer).
    pub fn forget(&self, key: &str) {
        self.uncacheable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn waiters_wake_on_head_and_stream_the_body() {
        let fills = Arc::new(Fills::default());
        let Join::Lead(fill, reg) = fills.join("k") else {
            panic!("first joins lead")
        };
        let Join::Wait(w) = fills.join("k") else {
            panic!("second waits")
        };
        let waiter = tokio::spawn(async move {
            let Waited::Shared(h) = w.wait(Some(Duration::from_secs(5))).await else {
                panic!()
            };
            let body: Vec<_> = w.body().unwrap().collect().await;
            (
                h.status,
                body.into_iter()
                    .map(|f| f.unwrap().into_data().unwrap())
                    .collect::<Vec<_>>(),
            )
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        fill.share(Arc::new(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            key: "k".into(),
            len: None,
        }));
        fill.push(Bytes::from_static(b"ab"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        fill.push(Bytes::from_static(b"cd"));
        fill.finish();
        drop(reg);
        let (status, chunks) = waiter.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            chunks,
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]
        );
        assert!(
            matches!(fills.join("k"), Join::Lead(..)),
            "a finished fill is gone"
        );
    }

    #[tokio::test]
    async fn a_streaming_fill_holds_only_what_a_reader_has_not_seen() {
        let fills = Arc::new(Fills::default());
        let Join::Lead(fill, reg) = fills.join("k") else {
            panic!()
        };
        fill.share(Arc::new(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            key: "k".into(),
            len: None,
        }));
        let mut a = Box::pin(fill.clone().body().unwrap());
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..3 {
            fill.push(chunk.clone());
        }
        fill.stream();
        reg.unlist();
        assert!(
            matches!(fills.join("k"), Join::Lead(..)),
            "new requests fill anew"
        );
        assert_eq!(fill.lock().buffered, 3 << 20, "nothing read yet");
        // A second reader, still at the start, pins what it has not read.
        let b = fill.clone().body().unwrap();
        a.next().await.unwrap().unwrap();
        a.next().await.unwrap().unwrap();
        assert_eq!(fill.lock().buffered, 3 << 20);
        drop(b);
        assert_eq!(fill.lock().buffered, 1 << 20, "only the unread chunk");
        assert!(fill.clone().body().is_none(), "too late to start");
        // Ahead by more than the window: the fill waits for the reader.
        for _ in 0..5 {
            fill.push(chunk.clone());
        }
        let room = tokio::spawn({
            let fill = fill.clone();
            async move { fill.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!room.is_finished(), "6 MiB ahead of the reader");
        for _ in 0..3 {
            a.next().await.unwrap().unwrap();
        }
        assert!(room.await.unwrap(), "within the window again");
        // The last reader leaves: the fill is told to stop.
        drop(a);
        assert!(!fill.room().await);
        assert_eq!(fill.lock().buffered, 0);
    }

    #[tokio::test]
    async fn timeout_pass_cancel_and_uncacheable() {
        let fills = Arc::new(Fills::default());
        let Join::Lead(fill, reg) = fills.join("k") else {
            panic!()
        };
        let Join::Wait(w) = fills.join("k") else {
            panic!()
        };
        assert!(matches!(
            w.wait(Some(Duration::from_millis(10))).await,
            Waited::TimedOut
        ));
        fill.pass();
        assert!(matches!(w.wait(None).await, Waited::Pass));
        fills.mark_uncacheable("k", Duration::from_secs(60));
        drop(reg);
        assert!(matches!(fills.join("k"), Join::Bypass));
        fills.forget("k");
        let Join::Lead(_, reg) = fills.join("k") else {
            panic!()
        };
        let Join::Wait(w) = fills.join("k") else {
            panic!()
        };
        drop(reg);
        assert!(
            matches!(w.wait(None).await, Waited::Failed(..)),
            "a cancelled leader fails its waiters"
        );
    }
}
