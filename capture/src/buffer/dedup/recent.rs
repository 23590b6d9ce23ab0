//! The in-memory index of the remembered uuids: where in `recent_uuids` a
//! uuid may be, so the table needs no index of its own.
//!
//! An index keyed by uuid would put every remembered uuid at a random leaf:
//! once it is larger than a settlement, each uuid dirties a page of its own
//! (a 4 KiB WAL frame, and the checkpoint's write after it), which halved
//! the throughput of single events carrying random client uuids. The table
//! is now only appended to (rows in delivery order) and pruned from its
//! oldest end; this index says which few rows to look at.
//!
//! The rows' ids are cut into segments of [`SEGMENT_IDS`] consecutive ids,
//! each an open-addressing table of [`SLOTS`] 32-bit entries: 20 bits of the
//! uuid's hash and the 12-bit block of ~100 ids the row lies in. A lookup
//! probes each live segment (one or two cache lines each) and yields the
//! blocks whose entry matches, which the caller confirms on disk; a false
//! match (about one lookup in 10,000 per segment) costs one such read and
//! is never taken for a duplicate. The index holds exactly the committed
//! rows (changes are applied after the transaction commits), so a
//! remembered uuid always has its entry: a lookup never misses one.
//!
//! Memory: 2 MiB per live segment (5 bytes per remembered uuid, at most
//! [`MAX_SEGMENTS`] segments: 64 MiB, 13 million uuids); the writer forgets
//! the oldest uuids early rather than exceed it. A segment is freed once
//! none of its rows is left. Hashes are keyed per process (`RandomState`)
//! and the index is rebuilt from the table at start, so no client can aim
//! its uuids at one slot.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};

const SLOT_BITS: u32 = 19;
/// Entries per segment.
const SLOTS: usize = 1 << SLOT_BITS;
const MASK: usize = SLOTS - 1;
/// Ids one segment covers: 80 % of its slots, so probes stay short.
pub(super) const SEGMENT_IDS: i64 = (SLOTS as i64) * 4 / 5;
const BLOCK_BITS: u32 = 12;
const FINGERPRINT_BITS: u32 = 32 - BLOCK_BITS;
/// Ids one block covers (a confirming read looks at at most this many rows).
pub(super) const BLOCK_IDS: i64 = (SEGMENT_IDS + (1 << BLOCK_BITS) - 1) >> BLOCK_BITS;
/// Most segments kept: beyond, the oldest remembered uuids are forgotten.
pub(super) const MAX_SEGMENTS: usize = 32;

/// A uuid's hash under this process's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hash(u64);

impl Hash {
    fn home(self) -> usize {
        (self.0 >> (64 - SLOT_BITS)) as usize
    }

    /// Never 0: an entry of 0 marks a free slot.
    fn fingerprint(self) -> u32 {
        let bits =
            (self.0 >> (64 - SLOT_BITS - FINGERPRINT_BITS)) as u32 & ((1 << FINGERPRINT_BITS) - 1);
        bits.max(1)
    }
}

struct Segment {
    /// `first id / SEGMENT_IDS`.
    number: i64,
    slots: Box<[u32]>,
    /// Entries stored.
    entries: usize,
    /// Rows of this segment still in the table.
    live: usize,
}

impl Segment {
    fn new(number: i64) -> Self {
        Self {
            number,
            slots: vec![0; SLOTS].into_boxed_slice(),
            entries: 0,
            live: 0,
        }
    }

    fn first_id(&self) -> i64 {
        self.number * SEGMENT_IDS
    }

    /// Full: should never happen (each id is inserted once, and a segment
    /// has more slots than ids), but a full segment is then searched whole
    /// rather than ever missing a uuid.
    fn full(&self) -> bool {
        self.entries >= SLOTS - 1
    }
}

/// Where the remembered uuids may be.
#[derive(Default)]
pub(super) struct RecentIndex {
    hasher: RandomState,
    /// Ordered by segment number.
    segments: VecDeque<Segment>,
}

impl std::fmt::Debug for RecentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentIndex")
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

impl RecentIndex {
    pub fn hash(&self, uuid: &str) -> Hash {
        Hash(self.hasher.hash_one(uuid))
    }

    /// Adds the committed row `id` holding the uuid of `hash`.
    pub fn insert(&mut self, id: i64, hash: Hash) {
        let number = id.div_euclid(SEGMENT_IDS);
        let at = match self.segments.binary_search_by_key(&number, |s| s.number) {
            Ok(at) => at,
            Err(at) => {
                self.segments.insert(at, Segment::new(number));
                at
            }
        };
        let segment = &mut self.segments[at];
        segment.live += 1;
        if segment.full() {
            return;
        }
        let block = ((id - segment.first_id()) / BLOCK_IDS) as u32;
        let mut slot = hash.home();
        while segment.slots[slot] != 0 {
            slot = (slot + 1) & MASK;
        }
        segment.slots[slot] = hash.fingerprint() << BLOCK_BITS | block;
        segment.entries += 1;
    }

    /// Notes that the committed deletion removed row `id`; frees its
    /// segment once none of its rows is left.
    pub fn remove(&mut self, id: i64) {
        let number = id.div_euclid(SEGMENT_IDS);
        if let Ok(at) = self.segments.binary_search_by_key(&number, |s| s.number) {
            let segment = &mut self.segments[at];
            segment.live = segment.live.saturating_sub(1);
            if segment.live == 0 {
                self.segments.remove(at);
            }
        }
    }

    /// Id ranges (inclusive) that may hold the uuid of `hash`, oldest first.
    pub fn candidates(&self, hash: Hash) -> Vec<(i64, i64)> {
        let fingerprint = hash.fingerprint();
        let mut out = Vec::new();
        for segment in &self.segments {
            let first = segment.first_id();
            if segment.full() {
                out.push((first, first + SEGMENT_IDS - 1));
                continue;
            }
            let mut slot = hash.home();
            loop {
                let entry = segment.slots[slot];
                if entry == 0 {
                    break;
                }
                if entry >> BLOCK_BITS == fingerprint {
                    let lo = first + i64::from(entry & ((1 << BLOCK_BITS) - 1)) * BLOCK_IDS;
                    out.push((lo, lo + BLOCK_IDS - 1));
                }
                slot = (slot + 1) & MASK;
            }
        }
        out
    }

    /// Live segments.
    #[cfg(test)]
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The first id past the oldest segment, if more than `keep` segments
    /// are live: forgetting the rows below it brings them down to `keep`.
    pub fn overflow_below(&self, keep: usize) -> Option<i64> {
        (self.segments.len() > keep).then(|| {
            let oldest = &self.segments[self.segments.len() - keep - 1];
            oldest.first_id() + SEGMENT_IDS
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids(n: usize, tag: &str) -> Vec<String> {
        (0..n).map(|i| format!("{tag}-{i}")).collect()
    }

    /// Every inserted uuid is found in the block of its row; most others
    /// are not found at all.
    #[test]
    fn every_inserted_uuid_is_a_candidate_where_it_lies() {
        let mut index = RecentIndex::default();
        // Three segments' worth, starting mid-segment as a pruned table would.
        let start = SEGMENT_IDS / 2;
        let inserted = uuids(3 * SEGMENT_IDS as usize, "in");
        for (i, u) in inserted.iter().enumerate() {
            index.insert(start + i as i64, index.hash(u));
        }
        assert_eq!(index.segments(), 4);
        for (i, u) in inserted.iter().enumerate() {
            let id = start + i as i64;
            let found = index.candidates(index.hash(u));
            assert!(
                found.iter().any(|(lo, hi)| (*lo..=*hi).contains(&id)),
                "{u} at {id} not among {found:?}"
            );
            assert!(found.iter().all(|(lo, hi)| hi - lo < BLOCK_IDS));
        }
        let false_matches: usize = uuids(100_000, "out")
            .iter()
            .map(|u| index.candidates(index.hash(u)).len())
            .sum();
        // About 4 segments x 100,000 lookups x 2.5e-5 = 10 expected.
        assert!(false_matches < 100, "{false_matches} false matches");
    }

    #[test]
    fn a_segment_is_freed_only_once_all_its_rows_are_gone() {
        let mut index = RecentIndex::default();
        let all = uuids(SEGMENT_IDS as usize + 10, "x");
        for (i, u) in all.iter().enumerate() {
            index.insert(i as i64, index.hash(u));
        }
        assert_eq!(index.segments(), 2);
        // All of the first segment's rows but its last.
        for id in 0..SEGMENT_IDS - 1 {
            index.remove(id);
        }
        assert_eq!(index.segments(), 2);
        let last = &all[SEGMENT_IDS as usize - 1];
        assert!(
            !index.candidates(index.hash(last)).is_empty(),
            "a live row's uuid must stay findable"
        );
        index.remove(SEGMENT_IDS - 1);
        assert_eq!(index.segments(), 1);
        // The second segment still finds its own.
        let id = SEGMENT_IDS + 3;
        let found = index.candidates(index.hash(&all[id as usize]));
        assert!(found.iter().any(|(lo, hi)| (*lo..=*hi).contains(&id)));
    }

    #[test]
    fn overflow_names_the_ids_to_forget() {
        let mut index = RecentIndex::default();
        for n in 0..5 {
            index.insert(n * SEGMENT_IDS + 1, index.hash(&n.to_string()));
        }
        assert_eq!(index.overflow_below(5), None);
        assert_eq!(index.overflow_below(3), Some(2 * SEGMENT_IDS));
    }

    /// Two processes hash alike uuids differently (no uuid can be chosen to
    /// collide with another's slot everywhere).
    #[test]
    fn hashes_are_keyed_per_index() {
        let (a, b) = (RecentIndex::default(), RecentIndex::default());
        let differ = uuids(8, "k")
            .iter()
            .filter(|u| a.hash(u) != b.hash(u))
            .count();
        assert!(differ > 0);
    }
}
