//! Maglev consistent hashing: the lookup table that maps a flow hash to a backend.
//!
//! The algorithm is the one of the Maglev paper (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4). Each backend has a preference
//! list, a permutation of the `M` table entries given by
//! `permutation[i][j] = (offset_i + j * skip_i) % M` with `offset_i = h1(identity_i) % M` and
//! `skip_i = h2(identity_i) % (M - 1) + 1`; `M` is prime, so every `skip` is coprime with it
//! and the list visits every entry once. The table is filled round-robin over the backends,
//! each taking its next preferred entry that is still free, until all `M` entries are taken.
//!
//! Two properties follow, both checked by the tests below:
//!
//! - balance: every round gives each backend exactly one entry, so the entry counts of two
//!   backends differ by at most one: `max / min <= (floor(M / N) + 1) / floor(M / N)`;
//! - minimal disruption: when a backend leaves, its entries go to the others and only a few
//!   percent of the other entries change owner (measured figures are given on the tests).
//!
//! The table must be the same on every node, after every restart and with every compiler, so
//! that a flow that moves between nodes (ECMP) or outlives the agent keeps its backend. Hence:
//!
//! - the hashes ([`h1`], [`h2`]) are written out here and fixed (FNV-1a 64 with the murmur3
//!   64-bit finaliser), never `std`'s randomly keyed or unspecified hashers; a golden test
//!   catches any change;
//! - backends are ordered by their [`BackendIdentity`], never by the order they arrived in
//!   (watch events, EndpointSlice order), since the round-robin order decides ties.

use std::net::SocketAddr;

use thiserror::Error;

use crate::model::Protocol;

/// The largest table by default (`lb agent --maglev-table-size`): the prime 16381 (2^14 - 3).
/// Smaller Services get smaller tables ([`table_size_for`]).
///
/// Maglev balances within one entry per backend, so with `N` backends the worst imbalance is
/// `(floor(M / N) + 1) / floor(M / N)`. For the largest Service we support, 100 backends,
/// `M >= 100 * N` keeps it under 1%: with 16381 entries the counts are 163 and 164, a
/// max/min imbalance of 0.61% (measured in `balance_is_within_one_entry_per_backend`).
/// Removing one of 100 backends moves 2.3% to 2.5% of the entries where 1% (the removed
/// backend's own) is the minimum; one of 10 moves 10.5% to 10.8% against 10% (measured in
/// `removing_a_backend_moves_little_else`).
///
/// A bigger prime (65521) disrupts less (1.6% for one of 100, 10.2% for one of 10, measured
/// once) but costs four times the memory: one table is `M` `u32` backend ids, 64 KiB at 16381 and 256 KiB at 65521, per
/// service. 16381 is also Cilium's default Maglev table size.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The table sizes a Service's table is chosen from: primes, each about twice the one
/// before. See [`table_size_for`].
pub const SIZE_LADDER: [u32; 13] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287, 1_048_573,
];

/// Table entries per backend that keep the imbalance at or under 1% (see
/// [`DEFAULT_TABLE_SIZE`]).
pub const ENTRIES_PER_BACKEND: u64 = 100;

/// The size of a table for `backends` backends, at most `max` (the agent's
/// `--maglev-table-size`), given the size of the table the frontend has now (`current`).
///
/// Every table as big as the largest would cost 64 KiB of kernel memory per Service at the
/// default, most of it for Services of a few backends. Instead a table gets the smallest size
/// of [`SIZE_LADDER`] with at least [`ENTRIES_PER_BACKEND`] entries per backend (so the 1%
/// imbalance bound holds for every Service up to `max / 100` backends), and keeps its size
/// while that is big enough and at most 16 times the smallest fitting one: a table changes
/// size, and so remaps flows that have no conntrack entry, only when its Service grows past
/// a step or shrinks by a large factor, not on every scale. The choice depends only on the
/// backend count and the table's own size, so every node makes the same one.
pub fn table_size_for(backends: usize, current: Option<u32>, max: u32) -> u32 {
    let want = backends as u64 * ENTRIES_PER_BACKEND;
    let fitting = SIZE_LADDER
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= want && m <= max)
        .unwrap_or(max)
        .min(max);
    match current {
        Some(c) if c >= fitting && c <= max && u64::from(c) <= 16 * u64::from(fitting) => c,
        _ => fitting,
    }
}

/// The largest table size the agent accepts: the largest prime below 2^20 (a table of it
/// takes 4 MiB of kernel memory per service).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Checks a table size given by the user: a prime, at most [`MAX_TABLE_SIZE`].
pub fn check_table_size(size: u32) -> Result<u32, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::SizeTooLarge {
            size,
            max: MAX_TABLE_SIZE,
        });
    }
    Ok(size)
}

/// The stable name of a backend that its place in a Maglev table derives from.
///
/// Two nodes (or one agent before and after a restart) that see the same backends must give
/// them the same identities, so the identity holds only what the backend is
/// (`address:port/PROTOCOL`, e.g. `10.0.0.1:8080/TCP`), never an id allocated at run time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendIdentity(Box<[u8]>);

impl BackendIdentity {
    /// The identity of the backend at `addr` (pod IP and target port) speaking `proto`:
    /// `10.0.0.1:8080/TCP`, `[fd00::1]:53/UDP` (IPv6 in its RFC 5952 form, as `std` prints it).
    pub fn new(addr: SocketAddr, proto: Protocol) -> Self {
        Self::from_bytes(format!("{addr}/{proto}").into_bytes())
    }

    /// An identity made of any byte string (for callers with their own stable naming).
    pub fn from_bytes(bytes: impl Into<Box<[u8]>>) -> Self {
        Self(bytes.into())
    }

    /// The bytes that are hashed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Why a Maglev table cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is not prime, so some preference lists would not visit every entry.
    #[error("Maglev table size {size} is not prime")]
    SizeNotPrime {
        /// The size asked for.
        size: u32,
    },
    /// The table size is beyond [`MAX_TABLE_SIZE`].
    #[error("Maglev table size {size} is larger than {max}")]
    SizeTooLarge {
        /// The size asked for.
        size: u32,
        /// The largest size accepted.
        max: u32,
    },
    /// The table is smaller than the number of backends, so some would get no entry.
    #[error("Maglev table size {size} is smaller than the {backends} backends")]
    SizeTooSmall {
        /// The size asked for.
        size: u32,
        /// The number of backends.
        backends: usize,
    },
    /// Two backends have the same identity, so their order (and the table) is not defined.
    #[error("backend {identity:?} is listed twice")]
    DuplicateBackend {
        /// The repeated identity, lossily as text.
        identity: String,
    },
}

/// A Maglev lookup table: entry `hash % len` is the backend a flow with that hash goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// Indexes into the backend slice given to [`build`].
    entries: Vec<u32>,
}

impl MaglevTable {
    /// The entries, each an index into the backend slice given to [`build`]. Empty when
    /// there were no backends.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// The number of entries: the table size, or 0 when there were no backends.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The table has no entries (there were no backends).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The backend (an index into the slice given to [`build`]) for a flow hash, as the
    /// datapath will choose it: entry `hash % len`. `None` when there are no backends.
    pub fn lookup(&self, hash: u32) -> Option<u32> {
        let len = u32::try_from(self.entries.len()).ok()?;
        self.entries.get(hash.checked_rem(len)? as usize).copied()
    }
}

/// Builds the Maglev table of `size` entries for `backends`.
///
/// The result depends only on the *set* of backends: they are ordered by identity before the
/// fill, so any order of the slice gives the same backend in every entry (the entries hold
/// indexes into the slice as given). No backends give an empty table (a service without
/// backends has nothing to select), though `size` is still checked.
///
/// Errors: `size` not prime, smaller than the number of backends, or a repeated identity.
pub fn build(backends: &[BackendIdentity], size: u32) -> Result<MaglevTable, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    if (size as usize) < backends.len() {
        return Err(MaglevError::SizeTooSmall {
            size,
            backends: backends.len(),
        });
    }
    if backends.is_empty() {
        return Ok(MaglevTable {
            entries: Vec::new(),
        });
    }
    // Fill order: by identity. `order[k]` is the caller's index of the k-th backend.
    let mut order: Vec<u32> = (0..backends.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| backends[a as usize].cmp(&backends[b as usize]));
    if let Some(pair) = order
        .windows(2)
        .find(|w| backends[w[0] as usize] == backends[w[1] as usize])
    {
        return Err(MaglevError::DuplicateBackend {
            identity: String::from_utf8_lossy(backends[pair[0] as usize].as_bytes()).into_owned(),
        });
    }

    let m = u64::from(size);
    // Per backend: the entry its preference list points at now, and its step. Walking
    // `next = (next + skip) % M` is `permutation[i][j]` for j = 0, 1, 2, ... without
    // materialising the N x M permutation matrix.
    let mut cursors: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let id = backends[i as usize].as_bytes();
            let offset = h1(id) % m;
            // M >= 2 (prime), so M - 1 >= 1 and skip is in 1..M.
            let skip = h2(id) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();

    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size as usize];
    let mut filled = 0u64;
    // `(next + skip) % m` with next, skip < m: one subtraction instead of a division (the
    // walk probes about m·ln(m) entries per table, most of them near the end of the fill).
    let step = |next: u64, skip: u64| {
        let n = next + skip;
        if n >= m { n - m } else { n }
    };
    'fill: loop {
        for (&owner, (next, skip)) in order.iter().zip(cursors.iter_mut()) {
            // Terminates: the preference list is a permutation and the table is not full.
            while entries[*next as usize] != FREE {
                *next = step(*next, *skip);
            }
            entries[*next as usize] = owner;
            *next = step(*next, *skip);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(MaglevTable { entries })
}

/// Whether `n` is prime (trial division; at most 2^16 / 2 steps for any `u32`).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3), started from
/// `basis` so that the two hashes below differ from the first byte on.
const fn fnv1a64(basis: u64, bytes: &[u8]) -> u64 {
    let mut h = basis;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// murmur3's 64-bit finaliser (`fmix64`): spreads FNV's weak high-to-low mixing over all
/// bits, which the modulo by `M` needs.
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The offset hash: `fmix64(FNV-1a-64(identity))` with FNV's standard offset basis.
pub const fn h1(identity: &[u8]) -> u64 {
    fmix64(fnv1a64(0xcbf2_9ce4_8422_2325, identity))
}

/// The skip hash: `fmix64(FNV-1a-64(identity))` started from FNV's basis run over the bytes
/// `maglev-skip` first, so it is unrelated to [`h1`] for the same identity.
pub const fn h2(identity: &[u8]) -> u64 {
    const BASIS: u64 = fnv1a64(0xcbf2_9ce4_8422_2325, b"maglev-skip");
    fmix64(fnv1a64(BASIS, identity))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    /// `n` backends 10.0.x.y:8080/TCP.
    fn backends(n: usize) -> Vec<BackendIdentity> {
        (0..n)
            .map(|i| {
                let addr = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8);
                BackendIdentity::new(SocketAddrV4::new(addr, 8080).into(), Protocol::Tcp)
            })
            .collect()
    }

    /// Entries per backend index.
    fn counts(table: &MaglevTable, n: usize) -> Vec<u32> {
        let mut counts = vec![0u32; n];
        for &e in table.entries() {
            counts[e as usize] += 1;
        }
        counts
    }

    /// The smallest prime >= n.
    fn prime_at_least(mut n: u32) -> u32 {
        while !is_prime(n) {
            n += 1;
        }
        n
    }

    #[test]
    fn identity_is_address_port_protocol() {
        let v4 = BackendIdentity::new("10.0.0.1:8080".parse().unwrap(), Protocol::Tcp);
        assert_eq!(v4.as_bytes(), b"10.0.0.1:8080/TCP");
        let v6 = BackendIdentity::new("[fd00:0::1]:53".parse().unwrap(), Protocol::Udp);
        assert_eq!(v6.as_bytes(), b"[fd00::1]:53/UDP");
    }

    #[test]
    fn hashes_are_fixed() {
        // FNV-1a 64 reference values (from the FNV specification's test suite).
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fnv1a64(0xcbf2_9ce4_8422_2325, b"foobar"),
            0x8594_4171_f739_67e8
        );
        // Ours, pinned: a change here reshuffles every table in a running cluster.
        assert_eq!(h1(b"10.0.0.1:8080/TCP"), H1_GOLDEN);
        assert_eq!(h2(b"10.0.0.1:8080/TCP"), H2_GOLDEN);
        assert_ne!(h1(b"10.0.0.1:8080/TCP"), h2(b"10.0.0.1:8080/TCP"));
    }
    const H1_GOLDEN: u64 = 0x5484_0c89_5aef_7a5d;
    const H2_GOLDEN: u64 = 0xa406_0608_7feb_1473;

    #[test]
    fn same_backends_in_any_order_give_the_same_table() {
        let forward = backends(7);
        let mut reversed = forward.clone();
        reversed.reverse();
        let mut rotated = forward.clone();
        rotated.rotate_left(3);
        let base = build(&forward, 1021).unwrap();
        for other in [&reversed, &rotated] {
            let table = build(other, 1021).unwrap();
            // Same backend (by identity) in every entry, though the indexes differ.
            for (a, b) in base.entries().iter().zip(table.entries()) {
                assert_eq!(forward[*a as usize], other[*b as usize]);
            }
        }
        assert_eq!(base, build(&forward, 1021).unwrap());
    }

    #[test]
    fn golden_table() {
        // A fixed small input: any change of hash, identity format or fill order shows here.
        let table = build(&backends(3), 13).unwrap();
        assert_eq!(table.entries(), GOLDEN_13);
        let table = build(&backends(5), DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(&table.entries()[..16], GOLDEN_DEFAULT_16);
    }
    const GOLDEN_13: &[u32] = &[1, 0, 0, 1, 2, 2, 1, 2, 0, 1, 2, 0, 0];
    const GOLDEN_DEFAULT_16: &[u32] = &[1, 2, 0, 0, 0, 0, 3, 4, 0, 3, 2, 4, 3, 0, 0, 4];

    #[test]
    fn lookup_is_hash_modulo_len() {
        let table = build(&backends(3), 13).unwrap();
        for h in [0u32, 5, 12, 13, 27, u32::MAX] {
            assert_eq!(table.lookup(h), Some(table.entries()[(h % 13) as usize]));
        }
        let empty = build(&[], 13).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.lookup(7), None);
    }

    #[test]
    fn balance_is_within_one_entry_per_backend() {
        // Measured with M = 16381: N = 2: 8190/8191, N = 3: 5460/5461, N = 10: 1638/1639,
        // N = 100: 163/164 (0.61%). With the smallest prime M >= 100 N, every N: <= 1%.
        for n in [1usize, 2, 3, 10, 100] {
            for m in [DEFAULT_TABLE_SIZE, prime_at_least(100 * n as u32)] {
                let table = build(&backends(n), m).unwrap();
                assert_eq!(table.len(), m as usize);
                let counts = counts(&table, n);
                let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
                assert!(max - min <= 1, "N={n} M={m}: {min}..{max}");
                // max / min <= 1.01, in integers (101 / 100 is exactly the bound).
                assert!(100 * (max - min) <= min, "N={n} M={m}: {min}..{max}");
                let imbalance = f64::from(max) / f64::from(min) - 1.0;
                println!("N={n} M={m}: min {min} max {max} imbalance {imbalance:.4}");
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        // Measured with M = 16381 (fraction of all entries that change owner; the minimum is
        // 1/N, the removed backend's own): N = 10: 0.1049 to 0.1077; N = 100: 0.0231 to 0.0245.
        for n in [10usize, 100] {
            let all = backends(n);
            let before = build(&all, DEFAULT_TABLE_SIZE).unwrap();
            for removed in [0, n / 2, n - 1] {
                let mut rest = all.clone();
                rest.remove(removed);
                let after = build(&rest, DEFAULT_TABLE_SIZE).unwrap();
                let mut changed = 0usize;
                for (&a, &b) in before.entries().iter().zip(after.entries()) {
                    let (a, b) = (&all[a as usize], &rest[b as usize]);
                    assert_ne!(b, &all[removed]);
                    if a != b {
                        changed += 1;
                    }
                }
                // Every entry of the removed backend moved (checked above: none points to
                // it), plus a few others.
                let fraction = changed as f64 / before.len() as f64;
                println!("N={n} removed {removed}: {fraction:.4} changed");
                assert!(
                    fraction <= 1.0 / n as f64 + 0.02,
                    "N={n} removed {removed}: {fraction}"
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_little_else() {
        let all = backends(11);
        let before = build(&all[..10], DEFAULT_TABLE_SIZE).unwrap();
        let after = build(&all, DEFAULT_TABLE_SIZE).unwrap();
        let changed = before
            .entries()
            .iter()
            .zip(after.entries())
            .filter(|(a, b)| all[**a as usize] != all[**b as usize])
            .count();
        let fraction = changed as f64 / before.len() as f64;
        assert!(fraction <= 1.0 / 11.0 + 0.02, "{fraction}");
    }

    #[test]
    fn builds_large_tables_fast() {
        let all = backends(100);
        let start = std::time::Instant::now();
        let table = build(&all, 65521).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(table.len(), 65521);
        println!("100 backends x 65521 entries: {elapsed:?}");
        // Measured: 6 ms in a debug build. Generous limits so a loaded machine does not fail it.
        let limit = if cfg!(debug_assertions) { 2000 } else { 100 };
        assert!(elapsed.as_millis() < limit, "{elapsed:?}");
    }

    #[test]
    fn errors() {
        assert_eq!(
            build(&backends(3), 16384),
            Err(MaglevError::SizeNotPrime { size: 16384 })
        );
        assert_eq!(
            build(&backends(3), 1),
            Err(MaglevError::SizeNotPrime { size: 1 })
        );
        assert_eq!(
            build(&backends(12), 11),
            Err(MaglevError::SizeTooSmall {
                size: 11,
                backends: 12
            })
        );
        let mut twice = backends(3);
        twice.push(twice[1].clone());
        assert_eq!(
            build(&twice, 13),
            Err(MaglevError::DuplicateBackend {
                identity: "10.0.0.2:8080/TCP".into()
            })
        );
        // As many backends as entries is allowed: one entry each.
        let table = build(&backends(11), 11).unwrap();
        assert_eq!(counts(&table, 11), vec![1; 11]);
    }

    #[test]
    fn table_sizes_given_by_users_are_checked() {
        assert_eq!(check_table_size(DEFAULT_TABLE_SIZE), Ok(DEFAULT_TABLE_SIZE));
        assert_eq!(check_table_size(MAX_TABLE_SIZE), Ok(MAX_TABLE_SIZE));
        assert_eq!(
            check_table_size(16384),
            Err(MaglevError::SizeNotPrime { size: 16384 })
        );
        // The next prime after the largest accepted.
        assert_eq!(
            check_table_size(1_048_583),
            Err(MaglevError::SizeTooLarge {
                size: 1_048_583,
                max: MAX_TABLE_SIZE
            })
        );
        assert!((MAX_TABLE_SIZE + 1..1 << 20).all(|n| !is_prime(n)));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        for p in [DEFAULT_TABLE_SIZE, 65521, 65537, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        // The last: 65519 * 65521, two primes, so trial division runs to the end.
        for c in [16383, 65535, u32::MAX, 25, 49, 4_292_870_399] {
            assert!(!is_prime(c), "{c}");
        }
    }

    #[test]
    fn the_ladder_is_primes_and_sizes_keep_a_hundred_entries_per_backend() {
        assert!(SIZE_LADDER.iter().all(|&m| is_prime(m)));
        assert!(SIZE_LADDER.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(SIZE_LADDER.last(), Some(&MAX_TABLE_SIZE));
        let max = DEFAULT_TABLE_SIZE;
        assert_eq!(table_size_for(1, None, max), 251);
        assert_eq!(table_size_for(2, None, max), 251);
        assert_eq!(table_size_for(3, None, max), 509);
        assert_eq!(table_size_for(10, None, max), 1021);
        assert_eq!(table_size_for(100, None, max), 16381);
        // Beyond max / 100 backends the table stays at max.
        assert_eq!(table_size_for(500, None, max), max);
        // A smaller max given by the user (any prime) caps every table.
        assert_eq!(table_size_for(10, None, 251), 251);
        assert_eq!(table_size_for(1, None, 3), 3);
        for n in 1..400 {
            let m = table_size_for(n, None, max);
            assert!(u64::from(m) >= (n as u64 * ENTRIES_PER_BACKEND).min(u64::from(max)));
        }
    }

    #[test]
    fn a_table_keeps_its_size_until_it_is_too_small_or_far_too_big() {
        let max = DEFAULT_TABLE_SIZE;
        // Scaling 10 -> 9 -> 3 keeps 1021; 10 -> 11 grows to 2039.
        assert_eq!(table_size_for(9, Some(1021), max), 1021);
        assert_eq!(table_size_for(3, Some(1021), max), 1021);
        assert_eq!(table_size_for(11, Some(1021), max), 2039);
        // 100 -> 1 backends: 16381 is more than 16 times 251, so it shrinks.
        assert_eq!(table_size_for(1, Some(16381), max), 251);
        // 100 -> 20: 16381 is within 16 times 2039, so it stays; 100 -> 10 is not (1021).
        assert_eq!(table_size_for(20, Some(16381), max), 16381);
        assert_eq!(table_size_for(10, Some(16381), max), 1021);
        // A size above a lowered max is replaced.
        assert_eq!(table_size_for(2, Some(16381), 509), 251);
    }
}
