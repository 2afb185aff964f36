//! S3-FIFO eviction by bytes: a small probationary FIFO (10% of the
//! capacity), a main FIFO, and a ghost list of recently evicted keys.
//! New keys enter the small queue; only keys hit again while there move to
//! main, so a scan of one-hit objects cannot flush the working set.
//! Keys evicted from small are remembered in the ghost list; one inserted
//! again while remembered goes straight to main.
//!
//! Removal is lazy: queues hold (key, generation) and stale pairs are
//! skipped when they reach the head.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

struct Slot {
    size: u64,
    freq: u8,
    main: bool,
    gen: u64,
}

pub struct S3Fifo<K> {
    capacity: u64,
    small: VecDeque<(K, u64)>,
    main: VecDeque<(K, u64)>,
    ghost: VecDeque<K>,
    ghost_set: HashSet<K>,
    slots: HashMap<K, Slot>,
    small_bytes: u64,
    main_bytes: u64,
    gen: u64,
}

impl<K: Hash + Eq + Clone> S3Fifo<K> {
    pub fn new(capacity: u64) -> Self {
        S3Fifo {
            capacity,
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            ghost_set: HashSet::new(),
            slots: HashMap::new(),
            small_bytes: 0,
            main_bytes: 0,
            gen: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.slots.contains_key(key)
    }

    /// Record a hit.
    pub fn touch<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(s) = self.slots.get_mut(key) {
            s.freq = (s.freq + 1).min(3);
        }
    }

    /// Add (or replace) `key`; returns the keys evicted to make room.
    /// An object larger than the whole capacity is refused and returned
    /// as evicted at once.
    pub fn insert(&mut self, key: K, size: u64) -> Vec<K> {
        self.remove(&key);
        if size > self.capacity {
            return vec![key];
        }
        self.gen += 1;
        let to_main = self.ghost_set.remove(&key);
        let slot = Slot {
            size,
            freq: 0,
            main: to_main,
            gen: self.gen,
        };
        if to_main {
            self.main.push_back((key.clone(), self.gen));
            self.main_bytes += size;
        } else {
            self.small.push_back((key.clone(), self.gen));
            self.small_bytes += size;
        }
        self.slots.insert(key, slot);
        let mut evicted = Vec::new();
        while self.bytes() > self.capacity {
            match self.evict_one() {
                Some(k) => evicted.push(k),
                None => break,
            }
        }
        evicted
    }

    pub fn remove(&mut self, key: &K) -> bool {
        match self.slots.remove(key) {
            Some(s) => {
                if s.main {
                    self.main_bytes -= s.size;
                } else {
                    self.small_bytes -= s.size;
                }
                true
            }
            None => false,
        }
    }

    fn live(&self, key: &K, gen: u64) -> bool {
        self.slots.get(key).is_some_and(|s| s.gen == gen)
    }

    fn evict_one(&mut self) -> Option<K> {
        loop {
            let from_small = self.small_bytes > self.capacity / 10 || self.main_bytes == 0;
            if from_small {
                let (key, gen) = self.small.pop_front()?;
                if !self.live(&key, gen) {
                    continue;
                }
                let slot = self.slots.get_mut(&key)?;
                if slot.freq > 0 {
                    // Hit while on probation: promote.
                    slot.freq = 0;
                    slot.main = true;
                    self.small_bytes -= slot.size;
                    self.main_bytes += slot.size;
                    self.main.push_back((key, gen));
                    continue;
                }
                self.remove(&key);
                self.remember(key.clone());
                return Some(key);
            } else {
                let (key, gen) = self.main.pop_front()?;
                if !self.live(&key, gen) {
                    continue;
                }
                let slot = self.slots.get_mut(&key)?;
                if slot.freq > 0 {
                    slot.freq -= 1;
                    self.main.push_back((key, gen));
                    continue;
                }
                self.remove(&key);
                return Some(key);
            }
        }
    }

    fn remember(&mut self, key: K) {
        if self.ghost_set.insert(key.clone()) {
            self.ghost.push_back(key);
        }
        // The ghost list remembers about as many keys as the cache holds.
        while self.ghost.len() > self.slots.len().max(16) {
            if let Some(old) = self.ghost.pop_front() {
                self.ghost_set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_bytes_fifo_when_nothing_is_hit() {
        let mut c = S3Fifo::new(100);
        for i in 0..10 {
            assert!(c.insert(i, 10).is_empty());
        }
        assert_eq!(c.insert(10, 10), vec![0]);
        assert_eq!(c.bytes(), 100);
        assert_eq!(c.insert(99, 101), vec![99], "larger than the capacity");
    }

    #[test]
    fn a_scan_does_not_flush_the_hot_set() {
        let mut c = S3Fifo::new(1000);
        for i in 0..50 {
            c.insert(i, 10);
        }
        // The first 50 objects are hot.
        for _ in 0..3 {
            for i in 0..50 {
                c.touch(&i);
            }
        }
        // A scan of 1,000 one-hit objects.
        for i in 1000..2000 {
            c.insert(i, 10);
        }
        let kept = (0..50).filter(|i| c.contains(i)).count();
        assert_eq!(kept, 50, "hot objects survive the scan");
        assert!(c.bytes() <= 1000);
    }

    #[test]
    fn ghosts_go_to_main_and_removal_is_exact() {
        let mut c = S3Fifo::new(100);
        for i in 0..11 {
            c.insert(i, 10);
        }
        assert!(!c.contains(&0));
        c.insert(0, 10); // remembered: straight to main
        assert!(c.contains(&0));
        assert!(c.remove(&5));
        assert!(!c.remove(&5));
        assert_eq!(c.len(), 9);
        assert_eq!(c.bytes(), 90);
        c.insert(3, 20); // replace keeps accounting right
        assert!(c.bytes() <= 100);
    }
}
