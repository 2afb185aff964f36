//! The games across the app's machines. Each game has an owner (first by
//! rendezvous hashing of its code over the live peers) that makes every
//! change, and a backup (the next peer) that holds a copy of each change
//! before the owner answers: a move acknowledged is on two machines.
//!
//! - A machine asked for a game it does not own forwards the change to
//!   the owner over the private network (`peer::` calls); an owner that
//!   disagrees answers "not mine" and the caller looks again.
//! - An owner checks, once per view of the peers, that it has the highest
//!   copy there is (asking every peer), so a backup that became the owner,
//!   or a machine that joined, starts from the last acknowledged change.
//! - After every change of view, each machine hands its copies to the
//!   games' owner and backup, so both hold every game again.
//! - Slots never go back (see `store`): two owners at once (views that
//!   differ while DNS catches up) meet at a machine that takes one change
//!   of a version and refuses the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hangar_games::owner;
use hangar_games::record::{Op, OpError, Record};
use tokio::sync::watch;

use crate::peer::{PeerClient, PeerError};
use crate::peers::View;
use crate::store::{Slot, SlotState, Store};

/// How long a change is retried (the owner moving, or not answering)
/// before the player hears it cannot be made now.
const OP_DEADLINE: Duration = Duration::from_secs(8);
/// How long a watch of another machine's game waits for a change.
pub const WATCH_WAIT: Duration = Duration::from_secs(15);

/// Why a change was not made.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The game said no (a 4xx for the player).
    Rejected { status: u16, message: String },
    /// No owner could make it in time (503: try again).
    Unavailable(String),
}

impl Failure {
    pub fn status(&self) -> u16 {
        match self {
            Failure::Rejected { status, .. } => *status,
            Failure::Unavailable(_) => 503,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Rejected { message, .. } => message.clone(),
            Failure::Unavailable(m) => format!("the game cannot be reached now ({m}); try again"),
        }
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Failure {
        let status = match e {
            OpError::NoGame(_) => 404,
            OpError::NotSeated(_) => 403,
            OpError::Move(_) => 422,
            _ => 409,
        };
        Failure::Rejected {
            status,
            message: e.to_string(),
        }
    }
}

/// What an owner's attempt came to.
pub enum Attempt {
    Done(Arc<Record>),
    Failed(Failure),
    /// Not the owner (any more), or the owner did not answer: look again.
    Again(String),
}

pub struct Settings {
    /// Acknowledge a change only once a backup holds it (off: the
    /// benchmark's measure of what that costs).
    pub replicate: bool,
    /// A game idle this long ends.
    pub idle: Duration,
}

pub struct Cluster {
    pub me: String,
    view: watch::Receiver<Arc<View>>,
    pub store: Store,
    client: PeerClient,
    settings: Settings,
    /// Games followed for this machine's players: fed from their owner.
    mirrors: Mutex<HashMap<String, watch::Sender<Option<Arc<Record>>>>>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    pub fn new(me: String, view: watch::Receiver<Arc<View>>, settings: Settings) -> Arc<Cluster> {
        Arc::new(Cluster {
            me,
            view,
            store: Store::default(),
            client: PeerClient::new(),
            settings,
            mirrors: Mutex::default(),
        })
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Start the background work: handing copies over after each change of
    /// view, and ending idle games.
    pub fn spawn_tasks(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut view = me.view.clone();
            while view.changed().await.is_ok() {
                let v = view.borrow_and_update().clone();
                me.hand_over(&v).await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                me.sweep().await;
            }
        });
    }

    /// Make a change, on whichever machine owns the game.
    pub async fn op(&self, code: &str, op: &Op) -> Result<Arc<Record>, Failure> {
        let deadline = Instant::now() + OP_DEADLINE;
        let mut view = self.view.clone();
        loop {
            let v = view.borrow_and_update().clone();
            let attempt = match owner::owner(code, &v.peers) {
                Some(o) if o == self.me => self.own_op(code, op, &v).await,
                Some(o) => match self.client.op(o, code, op).await {
                    Ok(r) => Attempt::Done(Arc::new(r)),
                    Err(PeerError::Rejected { status, message }) => {
                        Attempt::Failed(Failure::Rejected { status, message })
                    }
                    Err(e) => Attempt::Again(format!("{o}: {e}")),
                },
                None => Attempt::Again("no peers".into()),
            };
            match attempt {
                Attempt::Done(r) => {
                    self.mirror_take(code, r.clone());
                    return Ok(r);
                }
                Attempt::Failed(f) => return Err(f),
                Attempt::Again(why) => {
                    if Instant::now() > deadline {
                        return Err(Failure::Unavailable(why));
                    }
                    // A new view, or a moment for the owner to come back.
                    let _ = tokio::time::timeout(Duration::from_millis(150), view.changed()).await;
                }
            }
        }
    }

    /// A change made here, as the owner in view `v` (asked by a player of
    /// this machine or forwarded by another).
    pub(crate) async fn own_op(&self, code: &str, op: &Op, v: &View) -> Attempt {
        let ranked: Vec<String> = owner::ranked(code, &v.peers)
            .into_iter()
            .map(String::from)
            .collect();
        if ranked.first() != Some(&self.me) {
            return Attempt::Again(format!("{} does not own {code}", self.me));
        }
        let slot = self.store.slot(code);
        let Ok(mut st) = tokio::time::timeout(Duration::from_secs(2), slot.state.lock()).await
        else {
            return Attempt::Again(format!("{code} is busy on {}", self.me));
        };
        if st.checked != v.epoch {
            self.reconcile(code, &slot, &mut st, v).await;
        }
        let next = match Record::apply(st.record.as_deref(), code, op, now_ms()) {
            Ok(next) => next,
            Err(e) => return Attempt::Failed(e.into()),
        };
        if let Some(current) = &st.record {
            if next.version == current.version {
                return Attempt::Done(current.clone());
            }
        }
        let next = Arc::new(next);
        if self.settings.replicate && ranked.len() > 1 {
            let mut held = false;
            let mut why = String::new();
            for backup in &ranked[1..] {
                match self.client.put_copy(backup, &next).await {
                    Ok(()) => {
                        held = true;
                        break;
                    }
                    Err(PeerError::Newer(v)) => {
                        // This machine's copy is behind: look again first.
                        st.checked = 0;
                        return Attempt::Again(format!("{backup} holds {code} at version {v}"));
                    }
                    Err(e) => why = format!("backup {backup}: {e}"),
                }
            }
            if !held {
                return Attempt::Again(why);
            }
        }
        slot.take(&mut st, next.clone());
        Attempt::Done(next)
    }

    /// Make sure this machine, the owner in `v`, has the highest copy of
    /// `code` any peer has.
    async fn reconcile(&self, code: &str, slot: &Slot, st: &mut SlotState, v: &View) {
        let others = v.peers.iter().filter(|p| **p != self.me);
        let copies =
            futures_util::future::join_all(others.map(|p| self.client.get_copy(p, code))).await;
        for r in copies.into_iter().flatten().flatten() {
            slot.take(st, Arc::new(r));
        }
        st.checked = v.epoch;
    }

    /// A copy sent by an owner (or handed over): taken if newer; otherwise
    /// the version this machine holds.
    pub async fn take_copy(&self, record: Record) -> Result<(), u64> {
        let slot = self.store.slot(&record.code);
        let Ok(mut st) = tokio::time::timeout(Duration::from_secs(1), slot.state.lock()).await
        else {
            // Busy with a change of its own: the sender looks again.
            return Err(u64::MAX);
        };
        let code = record.code.clone();
        if slot.take(&mut st, Arc::new(record)) {
            if let Some(r) = &st.record {
                self.mirror_take(&code, r.clone());
            }
            Ok(())
        } else {
            Err(st.version())
        }
    }

    /// This machine's copy of `code`.
    pub async fn copy(&self, code: &str) -> Option<Arc<Record>> {
        let slot = self.store.get(code)?;
        let st = slot.state.lock().await;
        st.record.clone()
    }

    /// As the owner: `code`'s record once its version is above `after`,
    /// waiting at most `wait` (None: not yet; Err: not the owner).
    pub async fn owned_after(
        &self,
        code: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Option<Arc<Record>>, String> {
        let v = self.view();
        if owner::owner(code, &v.peers) != Some(self.me.as_str()) {
            return Err(format!("{} does not own {code}", self.me));
        }
        let slot = self.store.slot(code);
        {
            let Ok(mut st) = tokio::time::timeout(Duration::from_secs(2), slot.state.lock()).await
            else {
                return Err(format!("{code} is busy on {}", self.me));
            };
            if st.checked != v.epoch {
                self.reconcile(code, &slot, &mut st, &v).await;
            }
        }
        let mut rx = slot.watch.subscribe();
        let newer = |r: &Option<Arc<Record>>| r.as_ref().is_some_and(|r| r.version > after);
        let got = match tokio::time::timeout(wait, rx.wait_for(newer)).await {
            Ok(Ok(r)) => r.clone(),
            _ => None,
        };
        Ok(got)
    }

    /// `code`'s record now, from its owner (None: no such game).
    pub async fn read(&self, code: &str) -> Result<Option<Arc<Record>>, Failure> {
        let deadline = Instant::now() + OP_DEADLINE;
        loop {
            let v = self.view();
            let got = match owner::owner(code, &v.peers) {
                Some(o) if o == self.me => self.owned_after(code, 0, Duration::ZERO).await,
                Some(o) => self
                    .client
                    .state(o, code, 0, Duration::ZERO)
                    .await
                    .map(|r| r.map(Arc::new))
                    .map_err(|e| format!("{o}: {e}")),
                None => Err("no peers".into()),
            };
            match got {
                Ok(r) => return Ok(r.filter(|r| !r.closed)),
                Err(why) if Instant::now() > deadline => return Err(Failure::Unavailable(why)),
                Err(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            }
        }
    }

    /// Follow `code` for this machine's players: the receiver sees each
    /// new record from whichever machine owns it, across changes of owner.
    pub fn follow(self: &Arc<Self>, code: &str) -> watch::Receiver<Option<Arc<Record>>> {
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = mirrors.get(code) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        mirrors.insert(code.to_string(), tx.clone());
        let me = self.clone();
        let code = code.to_string();
        tokio::spawn(async move { me.relay(code, tx).await });
        rx
    }

    fn mirror_take(&self, code: &str, r: Arc<Record>) {
        let mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = mirrors.get(code) {
            tx.send_if_modified(|cur| {
                if cur.as_ref().is_some_and(|c| c.version >= r.version) {
                    return false;
                }
                *cur = Some(r.clone());
                true
            });
        }
    }

    /// Feed a mirror from the game's owner while anyone here follows it.
    async fn relay(&self, code: String, tx: watch::Sender<Option<Arc<Record>>>) {
        let mut view = self.view.clone();
        loop {
            {
                // Everyone here left: the next follower starts a new relay.
                let mut mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
                if tx.receiver_count() == 0 {
                    mirrors.remove(&code);
                    return;
                }
            }
            let after = tx.borrow().as_ref().map_or(0, |r| r.version);
            let v = view.borrow_and_update().clone();
            let wait = if after == 0 {
                Duration::ZERO
            } else {
                WATCH_WAIT
            };
            let ask = async {
                match owner::owner(&code, &v.peers) {
                    Some(o) if o == self.me => self.owned_after(&code, after, wait).await,
                    Some(o) => self
                        .client
                        .state(o, &code, after, wait)
                        .await
                        .map(|r| r.map(Arc::new))
                        .map_err(|e| e.to_string()),
                    None => Err("no peers".into()),
                }
            };
            tokio::select! {
                got = ask => match got {
                    Ok(Some(r)) => self.mirror_take(&code, r),
                    Ok(None) if after == 0 => {
                        // No such game (yet): look again in a while.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Ok(None) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                // The owner may have changed: ask the new one.
                _ = view.changed() => {}
                // Everyone here left: stop waiting.
                () = tx.closed() => {}
            }
        }
    }

    /// After a change of view: each game this machine holds goes to its
    /// owner and backup (each takes it if newer), so both have it.
    async fn hand_over(&self, v: &View) {
        let mut sends = Vec::new();
        for (code, slot) in self.store.all() {
            let Some(record) = slot.state.lock().await.record.clone() else {
                continue;
            };
            if record.closed {
                continue;
            }
            for to in owner::ranked(&code, &v.peers).into_iter().take(2) {
                if to != self.me {
                    sends.push((to.to_string(), record.clone()));
                }
            }
        }
        futures_util::stream::iter(sends)
            .for_each_concurrent(32, |(to, r)| async move {
                let _ = self.client.put_copy(&to, &r).await;
            })
            .await;
    }

    /// End the games this machine owns that were idle too long, and forget
    /// copies whose game ended (or went idle) a while ago.
    async fn sweep(&self) {
        let idle_ms = self.settings.idle.as_millis() as u64;
        let grace_ms = idle_ms.min(60_000);
        let now = now_ms();
        for (code, slot) in self.store.all() {
            let Some(r) = slot.state.lock().await.record.clone() else {
                continue;
            };
            let age = now.saturating_sub(r.touched_ms);
            if !r.closed && age > idle_ms {
                let v = self.view();
                if owner::owner(&code, &v.peers) == Some(self.me.as_str()) {
                    if let Attempt::Done(r) = self.own_op(&code, &Op::Close, &v).await {
                        self.mirror_take(&code, r);
                        tracing::info!(code, "game ended: idle");
                    }
                }
            } else if age > idle_ms + grace_ms {
                self.store.drop_slot(&code);
            }
        }
    }
}
