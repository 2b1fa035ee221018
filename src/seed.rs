//! Seeds of every random stream: a stable hash of (seed, key), so that each stream (a step's
//! batch, a sample's split, a resample, a projection block) is a pure function of the run's
//! `--seed` and its own key, the same in every process and whatever else runs.

/// A 64-bit hash that is stable across platforms, Rust versions and runs (std's `DefaultHasher`
/// promises none of that): FNV-1a over the bytes, then the SplitMix64 finaliser to spread bits.
pub fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
