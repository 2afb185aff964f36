//! This machine's copies of games: one slot per code, holding the highest
//! version it has accepted. A slot never goes back: a copy is taken only
//! when its version is above the slot's, so two different records of one
//! version never both pass one machine (what keeps a game from forking
//! when two machines believe they own it). Watchers of a slot hear every
//! record it takes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hangar_games::record::Record;
use tokio::sync::watch;

pub struct Slot {
    /// Held while a change is made (the owner's, through replication) or
    /// a copy taken.
    pub state: tokio::sync::Mutex<SlotState>,
    /// The slot's record as it changes (None: none yet).
    pub watch: watch::Sender<Option<Arc<Record>>>,
}

#[derive(Default)]
pub struct SlotState {
    pub record: Option<Arc<Record>>,
    /// The view epoch in which this machine, as the owner, last made sure
    /// it has the highest copy there is.
    pub checked: u64,
}

impl SlotState {
    pub fn version(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.version)
    }
}

impl Slot {
    /// Take `record` if it is newer; whether it was.
    pub fn take(&self, state: &mut SlotState, record: Arc<Record>) -> bool {
        if record.version <= state.version() {
            return false;
        }
        state.record = Some(record.clone());
        self.watch.send_replace(Some(record));
        true
    }
}

#[derive(Default)]
pub struct Store {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Store {
    /// The slot of `code`, made empty if there is none.
    pub fn slot(&self, code: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(SlotState::default()),
                    watch: watch::channel(None).0,
                })
            })
            .clone()
    }

    /// The slot of `code` if this machine has one.
    pub fn get(&self, code: &str) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(code)
            .cloned()
    }

    /// Every slot, with its code.
    pub fn all(&self) -> Vec<(String, Arc<Slot>)> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, s)| (c.clone(), s.clone()))
            .collect()
    }

    /// Forget `code`'s slot (once its game ended long enough ago), unless
    /// someone watches it.
    pub fn drop_slot(&self, code: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots
            .get(code)
            .is_some_and(|s| s.watch.receiver_count() == 0)
        {
            slots.remove(code);
        }
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
