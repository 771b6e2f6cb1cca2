//! The watchdog's run table: entries keyed by run id, each in one of two recency lists (lanes),
//! so that making room takes a least recently touched entry of the lane evicted first in
//! amortised O(1), however many entries there are. A slab of nodes linked by index (no `unsafe`,
//! no per-touch allocation) holds the lists; a table finds a node by the key's hash, computed once
//! by the caller, who chose the shard with it (`crate::hashed`).
//!
//! Recency is kept as a second-chance list (CLOCK): touching an entry in its own lane only marks
//! it, and eviction moves a marked entry to the newest end (unmarked) instead of taking it. Every
//! event touches its run, and moving a node to the front at each touch rewrote its two
//! neighbours' links, cache lines the event had no other reason to read (1.9% of the server's CPU
//! with one viewer per thread); a mark is a write to the node the lookup just read. An entry that
//! changes lanes is still moved at once.

use std::sync::Arc;

use hashbrown::HashTable;

use crate::hashed::Hashed;

/// Which list an entry is in. Eviction empties [`Lane::EvictFirst`] before it touches
/// [`Lane::EvictLast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    EvictFirst,
    EvictLast,
}

impl Lane {
    fn index(self) -> usize {
        match self {
            Self::EvictFirst => 0,
            Self::EvictLast => 1,
        }
    }
}

#[derive(Debug)]
struct Node<V> {
    key: Arc<str>,
    hash: u64,
    value: V,
    lane: Lane,
    /// Touched since it was last put at the newest end: eviction passes it over once.
    touched: bool,
    /// Toward the least recently touched end of its lane.
    older: Option<usize>,
    /// Toward the most recently touched end of its lane.
    newer: Option<usize>,
}

/// The two ends of one lane.
#[derive(Debug, Default, Clone, Copy)]
struct Ends {
    oldest: Option<usize>,
    newest: Option<usize>,
}

#[derive(Debug)]
pub struct Lru<V> {
    /// Each node's slot, with its key's hash.
    index: HashTable<(u64, usize)>,
    slots: Vec<Option<Node<V>>>,
    /// Slots freed by a removal, reused before the slab grows.
    free: Vec<usize>,
    lanes: [Ends; 2],
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Self {
            index: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            lanes: [Ends::default(); 2],
        }
    }
}

impl<V> Lru<V> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    #[cfg(test)]
    pub fn contains(&self, key: Hashed<'_>) -> bool {
        self.find(key).is_some()
    }

    pub fn get(&self, key: Hashed<'_>) -> Option<&V> {
        let slot = self.find(key)?;
        self.node(slot).map(|node| &node.value)
    }

    /// The value, without changing its place (see [`Self::touch`]).
    pub fn get_mut(&mut self, key: Hashed<'_>) -> Option<&mut V> {
        let slot = self.find(key)?;
        self.node_mut(slot).map(|node| &mut node.value)
    }

    /// Changes the entry under `key` with `change`, which says the lane it belongs in now, and
    /// touches it there: [`Self::get_mut`] and [`Self::touch`] with one lookup. `None` when there
    /// is no such entry.
    pub fn update<R>(
        &mut self,
        key: Hashed<'_>,
        change: impl FnOnce(&mut V) -> (R, Lane),
    ) -> Option<R> {
        let slot = self.find(key)?;
        let node = self.node_mut(slot)?;
        let (result, lane) = change(&mut node.value);
        self.touch_slot(slot, lane);
        Some(result)
    }

    /// Inserts a new entry as the most recently touched of `lane`; an entry already under `key`
    /// is replaced (and returned).
    pub fn insert(&mut self, key: Hashed<'_>, value: V, lane: Lane) -> Option<V> {
        let old = self.remove(key);
        let node = Node {
            key: key.key.into(),
            hash: key.hash,
            value,
            lane,
            touched: false,
            older: None,
            newer: None,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(node);
                slot
            }
            None => {
                self.slots.push(Some(node));
                self.slots.len() - 1
            }
        };
        self.index
            .insert_unique(key.hash, (key.hash, slot), |&(hash, _)| hash);
        self.link_newest(slot, lane);
        old
    }

    /// Touches an entry in `lane`: moved there as its newest from the other lane, marked in its
    /// own.
    pub fn touch(&mut self, key: Hashed<'_>, lane: Lane) {
        if let Some(slot) = self.find(key) {
            self.touch_slot(slot, lane);
        }
    }

    fn touch_slot(&mut self, slot: usize, lane: Lane) {
        let Some(node) = self.node_mut(slot) else {
            return;
        };
        if node.lane == lane {
            node.touched = true;
        } else {
            self.unlink(slot);
            self.link_newest(slot, lane);
        }
    }

    pub fn remove(&mut self, key: Hashed<'_>) -> Option<V> {
        let slot = self.find(key)?;
        self.remove_slot(slot).map(|node| node.value)
    }

    /// Takes out the oldest entry of [`Lane::EvictFirst`] not touched since it was put at the
    /// newest end, or if that lane is empty of [`Lane::EvictLast`]. Each touched entry passed over
    /// goes to the newest end unmarked, so this ends within one pass of the lane.
    pub fn pop_oldest(&mut self) -> Option<(Arc<str>, V)> {
        loop {
            let lane = match self.lanes[Lane::EvictFirst.index()].oldest {
                Some(_) => Lane::EvictFirst,
                None => Lane::EvictLast,
            };
            let slot = self.lanes[lane.index()].oldest?;
            let node = self.node_mut(slot)?;
            if !std::mem::take(&mut node.touched) {
                let node = self.remove_slot(slot)?;
                return Some((node.key, node.value));
            }
            self.unlink(slot);
            self.link_newest(slot, lane);
        }
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.slots
            .iter()
            .flatten()
            .map(|node| (&*node.key, &node.value))
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &V) -> bool) {
        let gone: Vec<usize> = (self.slots.iter().enumerate())
            .filter_map(|(slot, node)| Some((slot, node.as_ref()?)))
            .filter(|(_, node)| !keep(&node.key, &node.value))
            .map(|(slot, _)| slot)
            .collect();
        for slot in gone {
            self.remove_slot(slot);
        }
    }

    /// The slot of the entry under `key`.
    fn find(&self, key: Hashed<'_>) -> Option<usize> {
        let slots = &self.slots;
        let same = |&(hash, slot): &(u64, usize)| {
            hash == key.hash
                && (slots.get(slot))
                    .and_then(Option::as_ref)
                    .is_some_and(|node| &*node.key == key.key)
        };
        self.index.find(key.hash, same).map(|&(_, slot)| slot)
    }

    /// Takes a node out of its lane, the index and the slab.
    fn remove_slot(&mut self, slot: usize) -> Option<Node<V>> {
        self.unlink(slot);
        let node = self.slots.get_mut(slot)?.take()?;
        if let Ok(entry) = (self.index).find_entry(node.hash, |&(_, at)| at == slot) {
            entry.remove();
        }
        self.free.push(slot);
        Some(node)
    }

    fn node(&self, slot: usize) -> Option<&Node<V>> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    fn node_mut(&mut self, slot: usize) -> Option<&mut Node<V>> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// Takes a node out of its lane's list (it stays in the slab and the index).
    fn unlink(&mut self, slot: usize) {
        let Some(node) = self.node_mut(slot) else {
            return;
        };
        let (older, newer, lane) = (node.older.take(), node.newer.take(), node.lane);
        match older.and_then(|older| self.node_mut(older)) {
            Some(node) => node.newer = newer,
            None => self.lanes[lane.index()].oldest = newer,
        }
        match newer.and_then(|newer| self.node_mut(newer)) {
            Some(node) => node.older = older,
            None => self.lanes[lane.index()].newest = older,
        }
    }

    /// Puts an unlinked node at the most recently touched end of `lane`.
    fn link_newest(&mut self, slot: usize, lane: Lane) {
        let previous = self.lanes[lane.index()].newest;
        if let Some(node) = self.node_mut(slot) {
            node.lane = lane;
            node.touched = false;
            node.older = previous;
            node.newer = None;
        }
        match previous.and_then(|previous| self.node_mut(previous)) {
            Some(node) => node.newer = Some(slot),
            None => self.lanes[lane.index()].oldest = Some(slot),
        }
        self.lanes[lane.index()].newest = Some(slot);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;
    use crate::hashed::KeyHasher;

    fn key(text: &str) -> Hashed<'_> {
        static KEYS: LazyLock<KeyHasher> = LazyLock::new(KeyHasher::default);
        KEYS.hash(text)
    }

    fn keys(lru: &mut Lru<u32>) -> Vec<String> {
        std::iter::from_fn(|| lru.pop_oldest().map(|(key, _)| key.to_string())).collect()
    }

    #[test]
    fn evicts_the_least_recently_touched_first() {
        let mut lru = Lru::default();
        for (n, name) in ["a", "b", "c", "d"].iter().enumerate() {
            lru.insert(key(name), n as u32, Lane::EvictLast);
        }
        lru.touch(key("a"), Lane::EvictLast);
        lru.touch(key("c"), Lane::EvictLast);
        assert_eq!(lru.remove(key("d")), Some(3));
        assert_eq!(lru.len(), 3);
        assert_eq!(keys(&mut lru), ["b", "a", "c"]);
        assert_eq!(lru.len(), 0);
    }

    #[test]
    fn a_touched_entry_is_passed_over_once() {
        let mut lru = Lru::default();
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            lru.insert(key(name), n as u32, Lane::EvictLast);
        }
        // b then a touched: with exact recency the order would be c, b, a; a second-chance list
        // spares both once and takes c, then the two in the order it passed them over.
        lru.touch(key("b"), Lane::EvictLast);
        lru.update(key("a"), |_| ((), Lane::EvictLast));
        assert_eq!(keys(&mut lru), ["c", "a", "b"]);
        // Every entry touched: one pass clears the marks and the oldest goes.
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            lru.insert(key(name), n as u32, Lane::EvictLast);
            lru.touch(key(name), Lane::EvictLast);
        }
        assert_eq!(
            lru.pop_oldest().map(|(key, _)| key.to_string()),
            Some("a".into())
        );
    }

    #[test]
    fn the_first_lane_is_emptied_before_the_last() {
        let mut lru = Lru::default();
        lru.insert(key("open_1"), 1, Lane::EvictLast);
        lru.insert(key("ended_1"), 2, Lane::EvictFirst);
        lru.insert(key("open_2"), 3, Lane::EvictLast);
        // open_1 ends: it moves to the lane evicted first, as its most recent entry.
        lru.touch(key("open_1"), Lane::EvictFirst);
        assert_eq!(keys(&mut lru), ["ended_1", "open_1", "open_2"]);
    }

    #[test]
    fn slots_are_reused_and_lists_stay_consistent() {
        let mut lru = Lru::default();
        for round in 0..3u32 {
            for n in 0..100u32 {
                let lane = if n % 3 == 0 {
                    Lane::EvictFirst
                } else {
                    Lane::EvictLast
                };
                lru.insert(key(&format!("k{n}")), round * 1000 + n, lane);
            }
            for n in (0..100u32).step_by(7) {
                lru.remove(key(&format!("k{n}")));
            }
            lru.retain(|_, value| value % 5 != 0);
            for n in (0..100u32).step_by(2) {
                lru.touch(key(&format!("k{n}")), Lane::EvictLast);
            }
            let len = lru.len();
            let popped = keys(&mut lru);
            assert_eq!(popped.len(), len, "every entry is in exactly one lane");
        }
        assert!(lru.slots.len() <= 100, "freed slots are reused");
        assert_eq!(lru.get(key("k1")), None);
    }

    #[test]
    fn insert_replaces_and_get_finds() {
        let mut lru = Lru::default();
        assert_eq!(lru.insert(key("a"), 1, Lane::EvictLast), None);
        assert_eq!(lru.insert(key("a"), 2, Lane::EvictFirst), Some(1));
        assert_eq!(lru.get(key("a")), Some(&2));
        if let Some(value) = lru.get_mut(key("a")) {
            *value = 3;
        }
        assert!(lru.contains(key("a")));
        assert_eq!(lru.iter().collect::<Vec<_>>(), [("a", &3)]);
        assert_eq!(lru.len(), 1);
    }
}
