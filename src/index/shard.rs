//! One shard of the index: a locked hash table of packed entries keyed by a
//! 64-bit digest, and a spill table for the rare keys whose digest collides
//! with another live key's.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use parking_lot::{Mutex, MutexGuard};

use super::KeyId;
use super::entry::{Entry, Packed};
use crate::clock::Now;

/// A 64-bit digest of `(user, key)`, stored as two `u32` so a table slot
/// needs only 4-byte alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Digest([u32; 2]);

impl Digest {
    fn new(d: u64) -> Digest {
        Digest([d as u32, (d >> 32) as u32])
    }
    fn get(self) -> u64 {
        u64::from(self.0[0]) | u64::from(self.0[1]) << 32
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// A hasher for keys that are already uniform digests: it passes them on.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Build = BuildHasherDefault<DigestHasher>;

/// Parts per shard's digest table: the sweeper holds a shard's lock for one
/// part at a time, so a pass over a shard of n entries holds it for at most
/// about n / 12 entries at once (the largest part's share, see
/// [`PART_BOUNDS`]).
pub(crate) const PARTS: usize = 16;

/// The digest bits that pick a part: bits 32 to 41, clear of the low bits
/// hashbrown takes for the bucket (tables under 2^32 buckets) and of the top
/// 7 it keeps as each slot's control tag, so that the keys of one part still
/// differ in their tags.
const PART_SHIFT: u32 = 32;
/// Values of the part-picking bits: 2^10.
const PART_RANGE: usize = 1 << 10;

/// Part `p` takes the values `PART_BOUNDS[p]..PART_BOUNDS[p + 1]` of the
/// part-picking bits: `round(1024 * (2^(p/16) - 1))`, so part `p`'s share of
/// the keys is proportional to 2^(p/16) and the 16 parts' sizes spread
/// evenly over one doubling (log scale).
///
/// Why: a hashbrown table doubles its buckets once it is 7/8 full, so it is
/// between 7/16 and 7/8 full, and equal parts all grow at the same moment:
/// at some sizes every part of every shard is just past doubling and under
/// half full (2 M records in 64 shards x 16 parts: 60.8 bytes of table per
/// record). Staggered parts grow one at a time, so the index's load stays
/// near its mean (about 0.63; 46 to 50 bytes of table per record at any
/// size) instead of swinging between 0.44 and 0.87.
const PART_BOUNDS: [u16; PARTS + 1] = [
    0, 45, 93, 142, 194, 248, 304, 363, 424, 488, 555, 625, 698, 774, 854, 937, 1024,
];

/// The part of each value of the part-picking bits.
static PART_OF: [u8; PART_RANGE] = part_table();

const fn part_table() -> [u8; PART_RANGE] {
    let mut table = [0u8; PART_RANGE];
    let mut part = 0;
    let mut v = 0;
    while v < PART_RANGE {
        // Compile time: an index out of bounds fails the build.
        #[allow(clippy::indexing_slicing)]
        while v >= PART_BOUNDS[part + 1] as usize {
            part += 1;
        }
        #[allow(clippy::indexing_slicing)]
        {
            table[v] = part as u8;
        }
        v += 1;
    }
    table
}

fn part_of(digest: u64) -> usize {
    let v = (digest >> PART_SHIFT) as usize % PART_RANGE;
    // In bounds: `v < PART_RANGE`.
    #[allow(clippy::indexing_slicing)]
    usize::from(PART_OF[v])
}

/// A key whose digest is shared with another live key, kept with its full
/// identity.
#[derive(Debug)]
struct Spilled {
    user: Box<[u8]>,
    key: Box<[u8]>,
    entry: Entry,
}

/// The tables inside a shard's lock.
///
/// A key's entry lives in `spill` if it is there, else in `map` under its
/// digest. The `map` entry for a digest may belong to another key with the
/// same digest (probability about n/2^64 per lookup); `begin` reads the
/// record's full key from the log and treats a foreign entry as absent.
/// `start` puts a new lease in `spill` when `map` holds a live entry for
/// its digest, which (since `begin` found the key absent) is another key's;
/// recovery makes the same choice with the record's time, so both agree.
///
/// # Invariants
/// - One live lease per key: an entry is replaced by a new `InProgress`
///   entry only when it is absent or expired (decided by `state.rs` under
///   this lock), so two live leases never coexist for one key.
/// - Fencing tokens strictly increase: every new lease takes the next token
///   of the log's counter while this lock is held.
/// - `removed_pos` is at least the log position of every release applied to
///   this shard, so an answer of "absent" can wait until that is durable.
#[derive(Debug, Default)]
pub(crate) struct ShardMap {
    /// The digest table, split by the digest's top bits into parts that
    /// the sweeper visits one lock hold at a time.
    map: [HashMap<Digest, Packed, Build>; PARTS],
    spill: HashMap<u64, Vec<Spilled>, Build>,
    removed_pos: u64,
}

impl ShardMap {
    fn spilled(&self, id: &KeyId, user: &[u8], key: &[u8]) -> Option<&Spilled> {
        if self.spill.is_empty() {
            return None;
        }
        self.spill
            .get(&id.digest)?
            .iter()
            .find(|s| &*s.user == user && &*s.key == key)
    }

    fn spilled_mut(&mut self, id: &KeyId, user: &[u8], key: &[u8]) -> Option<&mut Spilled> {
        if self.spill.is_empty() {
            return None;
        }
        self.spill
            .get_mut(&id.digest)?
            .iter_mut()
            .find(|s| &*s.user == user && &*s.key == key)
    }

    /// The entry for `(user, key)`, expired or not (possibly a colliding
    /// key's; see the type's docs).
    pub fn get(&self, id: &KeyId, user: &[u8], key: &[u8]) -> Option<Entry> {
        match self.spilled(id, user, key) {
            Some(s) => Some(s.entry),
            None => self
                .table(id.digest)
                .get(&Digest::new(id.digest))
                .map(|p| p.unpack()),
        }
    }

    /// Installs a new lease's entry for a key `begin` found absent at `now`.
    pub fn start(&mut self, id: &KeyId, user: &[u8], key: &[u8], entry: Entry, now: Now) {
        if let Some(s) = self.spilled_mut(id, user, key) {
            s.entry = entry;
            return;
        }
        let digest = Digest::new(id.digest);
        let foreign_live = self
            .table(id.digest)
            .get(&digest)
            .is_some_and(|p| p.unpack().is_live(now));
        if foreign_live {
            self.spill.entry(id.digest).or_default().push(Spilled {
                user: user.into(),
                key: key.into(),
                entry,
            });
        } else {
            self.table_mut(id.digest)
                .insert(digest, Packed::pack(&entry));
        }
    }

    /// Installs an entry for a key that `locate` just found in neither
    /// table (so no colliding key holds its digest either): one insert,
    /// without `start`'s second look. For recovery's hot path.
    pub fn insert_located_absent(&mut self, id: &KeyId, entry: Entry) {
        self.table_mut(id.digest)
            .insert(Digest::new(id.digest), Packed::pack(&entry));
    }

    /// Replaces the entry of a key that has one (where it lives).
    pub fn update(&mut self, id: &KeyId, user: &[u8], key: &[u8], entry: Entry) {
        match self.spilled_mut(id, user, key) {
            Some(s) => s.entry = entry,
            None => {
                self.table_mut(id.digest)
                    .insert(Digest::new(id.digest), Packed::pack(&entry));
            }
        }
    }

    /// Removes a key's entry because of the log record at `pos`.
    pub fn remove(&mut self, id: &KeyId, user: &[u8], key: &[u8], pos: u64) {
        self.removed_pos = self.removed_pos.max(pos);
        if self.spilled(id, user, key).is_some() {
            if let Some(list) = self.spill.get_mut(&id.digest) {
                list.retain(|s| !(&*s.user == user && &*s.key == key));
                if list.is_empty() {
                    self.spill.remove(&id.digest);
                }
            }
            return;
        }
        self.table_mut(id.digest).remove(&Digest::new(id.digest));
    }

    /// Where `(user, key)`'s entry is: the entry, and whether it is in the
    /// spill table (so certainly this key's) rather than the digest table
    /// (possibly a colliding key's).
    pub fn locate(&self, id: &KeyId, user: &[u8], key: &[u8]) -> Option<(Entry, bool)> {
        match self.spilled(id, user, key) {
            Some(s) => Some((s.entry, true)),
            None => self
                .table(id.digest)
                .get(&Digest::new(id.digest))
                .map(|p| (p.unpack(), false)),
        }
    }

    /// Moves `(user, key)`'s entry from log position `from` to `to` (its
    /// record was copied by compaction); does nothing if the entry changed
    /// since. Returns whether it moved.
    pub fn repoint(&mut self, id: &KeyId, user: &[u8], key: &[u8], from: u64, to: u64) -> bool {
        match self.get(id, user, key) {
            Some(e) if e.pos == from => {
                self.update(id, user, key, Entry { pos: to, ..e });
                true
            }
            _ => false,
        }
    }

    /// Calls `f` with every entry, expired or not.
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for part in 0..PARTS {
            self.for_each_in(part, &mut f);
        }
    }

    /// Calls `f` with every entry of one part (the spill table counts as
    /// part 0).
    pub fn for_each_in(&self, part: usize, mut f: impl FnMut(&Entry)) {
        for p in self.map.get(part).into_iter().flat_map(HashMap::values) {
            f(&p.unpack());
        }
        if part == 0 {
            for s in self.spill.values().flatten() {
                f(&s.entry);
            }
        }
    }

    fn table(&self, digest: u64) -> &HashMap<Digest, Packed, Build> {
        // In bounds: `part_of` is below PARTS.
        #[allow(clippy::indexing_slicing)]
        &self.map[part_of(digest)]
    }

    fn table_mut(&mut self, digest: u64) -> &mut HashMap<Digest, Packed, Build> {
        // In bounds: `part_of` is below PARTS.
        #[allow(clippy::indexing_slicing)]
        &mut self.map[part_of(digest)]
    }

    /// The position of the latest release in this shard.
    pub fn removed_pos(&self) -> u64 {
        self.removed_pos
    }

    /// Number of entries, expired ones included.
    pub fn len(&self) -> usize {
        self.map.iter().map(HashMap::len).sum::<usize>()
            + self.spill.values().map(Vec::len).sum::<usize>()
    }

    /// What the tables hold in memory.
    pub fn memory(&self) -> Memory {
        let mut m = Memory::default();
        for table in &self.map {
            let slots = buckets(table.capacity());
            m.slots += slots;
            if slots > 0 {
                // hashbrown: the slots, then a control byte per slot and a
                // group's worth more.
                m.bytes += slots * SLOT_BYTES + slots + 16;
            }
        }
        for list in self.spill.values() {
            m.bytes += std::mem::size_of::<(u64, Vec<Spilled>)>() + 1;
            for s in list {
                m.bytes += std::mem::size_of::<Spilled>() + s.user.len() + s.key.len();
            }
        }
        m
    }

    /// Drops every entry that is expired at `now`; returns how many.
    pub fn drop_expired(&mut self, now: Now) -> usize {
        (0..PARTS).map(|part| self.drop_expired_in(part, now)).sum()
    }

    /// Drops the expired entries of one part (the spill table counts as
    /// part 0); returns how many.
    pub fn drop_expired_in(&mut self, part: usize, now: Now) -> usize {
        let mut dropped = 0;
        if let Some(table) = self.map.get_mut(part) {
            let before = table.len();
            table.retain(|_, p| p.unpack().is_live(now));
            dropped += before - table.len();
        }
        if part == 0 {
            self.spill.retain(|_, list| {
                let before = list.len();
                list.retain(|s| s.entry.is_live(now));
                dropped += before - list.len();
                !list.is_empty()
            });
        }
        dropped
    }
}

/// Bytes of one slot of a digest table: a digest and a packed entry.
pub(crate) const SLOT_BYTES: usize = std::mem::size_of::<(Digest, Packed)>();

/// The buckets of a hashbrown table of `capacity` (what `HashMap::capacity`
/// reports: 7/8 of the buckets, or one less than the buckets under 8).
fn buckets(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        1..7 => capacity + 1,
        _ => (capacity / 7 * 8).next_power_of_two(),
    }
}

/// The index's memory, as [`ShardMap::memory`] and `Index::memory` count it
/// (what the tables allocated, not what the allocator adds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Slots the digest tables allocated, empty ones included.
    pub slots: usize,
    /// Bytes allocated: slots, control bytes, spilled keys.
    pub bytes: usize,
}

impl std::ops::AddAssign for Memory {
    fn add_assign(&mut self, o: Memory) {
        self.slots += o.slots;
        self.bytes += o.bytes;
    }
}

/// A shard: its tables behind a parking_lot mutex.
#[derive(Debug, Default)]
pub(crate) struct Shard {
    map: Mutex<ShardMap>,
}

impl Shard {
    /// Locks the shard. Never hold the guard across an fsync.
    pub fn lock(&self) -> MutexGuard<'_, ShardMap> {
        self.map.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::RecordState;

    fn at(ms: u64) -> Now {
        Now::at(ms)
    }

    fn entry(token: u64, deadline_ms: u64) -> Entry {
        Entry {
            token,
            deadline_ms,
            pos: token,
            status: 0,
            state: RecordState::InProgress,
        }
    }

    /// Two keys forced onto one digest, as a 64-bit collision would.
    fn colliding() -> (KeyId, KeyId) {
        let a = KeyId {
            user_hash: 1,
            digest: 42,
        };
        (a, a)
    }

    #[test]
    fn a_key_colliding_with_a_live_key_spills_and_both_stay_apart() {
        let (a, b) = colliding();
        let mut m = ShardMap::default();
        m.start(&a, b"u", b"a", entry(1, 100), at(0));
        m.start(&b, b"u", b"b", entry(2, 100), at(0));
        assert_eq!(m.get(&a, b"u", b"a"), Some(entry(1, 100)));
        assert_eq!(m.get(&b, b"u", b"b"), Some(entry(2, 100)));
        assert_eq!(m.len(), 2);
        m.update(&b, b"u", b"b", entry(2, 200));
        assert_eq!(m.get(&b, b"u", b"b"), Some(entry(2, 200)));
        assert_eq!(m.get(&a, b"u", b"a"), Some(entry(1, 100)));
        m.remove(&b, b"u", b"b", 9);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&a, b"u", b"a"), Some(entry(1, 100)));
        assert_eq!(m.removed_pos(), 9);
    }

    #[test]
    fn a_key_colliding_with_an_expired_key_takes_its_slot() {
        let (a, b) = colliding();
        let mut m = ShardMap::default();
        m.start(&a, b"u", b"a", entry(1, 10), at(0));
        m.start(&b, b"u", b"b", entry(2, 100), at(10));
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&b, b"u", b"b"), Some(entry(2, 100)));
    }

    /// SplitMix64: digests as uniform as xxh3's.
    fn digests() -> impl Iterator<Item = u64> {
        let mut x = 0x1234_5678_u64;
        std::iter::repeat_with(move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    #[test]
    fn part_shares_grow_by_one_sixteenth_of_a_doubling() {
        assert_eq!(PART_BOUNDS[0], 0);
        assert_eq!(usize::from(PART_BOUNDS[PARTS]), PART_RANGE);
        let shares: Vec<f64> = PART_BOUNDS
            .windows(2)
            .map(|w| f64::from(w[1] - w[0]))
            .collect();
        for w in shares.windows(2) {
            let ratio = w[1] / w[0];
            assert!((ratio - 2f64.powf(1.0 / 16.0)).abs() < 0.05, "{shares:?}");
        }
        let spread = shares[PARTS - 1] / shares[0];
        assert!((1.8..2.0).contains(&spread), "{shares:?}");
        for (v, &part) in PART_OF.iter().enumerate() {
            let p = usize::from(part);
            assert!(usize::from(PART_BOUNDS[p]) <= v && v < usize::from(PART_BOUNDS[p + 1]));
        }
    }

    #[test]
    fn the_part_leaves_the_bucket_bits_and_the_control_tag_free() {
        for d in digests().take(1000) {
            let p = part_of(d);
            assert_eq!(part_of(d ^ 0xffff_ffff), p);
            assert_eq!(part_of(d ^ 0x7f << 57), p);
        }
    }

    #[test]
    fn staggered_parts_keep_the_tables_over_half_full_at_every_size() {
        // Equal parts would all double together: just past 16 x 7/8 x 2^k
        // entries every part is 7/16 full (0.44). Staggered, the parts'
        // loads spread over 0.44..0.87, and their mean stays near 0.6.
        let mut m = ShardMap::default();
        let mut lowest = f64::MAX;
        for (n, d) in digests().take(100_000).enumerate() {
            let id = KeyId {
                user_hash: 0,
                digest: d,
            };
            m.insert_located_absent(&id, entry(1, 100));
            let n = n + 1;
            if n >= 2000 && n % 250 == 0 {
                let mem = m.memory();
                assert_eq!(m.len(), n);
                assert_eq!(mem.bytes, mem.slots * (SLOT_BYTES + 1) + PARTS * 16);
                lowest = lowest.min(n as f64 / mem.slots as f64);
            }
        }
        assert!(lowest > 0.55, "lowest load {lowest:.3}");
    }

    #[test]
    fn buckets_invert_hashbrown_capacity() {
        for n in [1usize, 3, 4, 7, 8, 14, 15, 100, 1000, 100_000] {
            let mut t: HashMap<Digest, Packed, Build> = HashMap::default();
            for d in digests().take(n) {
                t.insert(Digest::new(d), Packed::pack(&entry(1, 1)));
            }
            let b = buckets(t.capacity());
            assert!(b.is_power_of_two() && t.capacity() < b, "{n}: {b}");
            if n >= 8 {
                // Doubled once 7/8 full: between 7/16 and 7/8 full.
                assert_eq!(b, (n * 8).div_ceil(7).next_power_of_two(), "{n}");
            }
        }
    }

    #[test]
    fn dropping_expired_entries_cleans_both_tables() {
        let (a, b) = colliding();
        let mut m = ShardMap::default();
        m.start(&a, b"u", b"a", entry(1, 10), at(0));
        m.start(&b, b"u", b"b", entry(2, 20), at(0));
        assert_eq!(m.drop_expired(at(15)), 1);
        assert_eq!(m.drop_expired(at(25)), 1);
        assert_eq!(m.len(), 0);
    }
}
