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
    mix(h)
}

/// The SplitMix64 finaliser: a bijection of u64 that spreads every input bit over the output.
/// `mix(key + i · 0x9e3779b97f4a7c15)` is SplitMix64's i-th draw of the stream `key`: a
/// counter-based generator, any draw computed on its own.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Draw `i` of the counter-based stream `key` (see [`mix`]).
pub fn draw(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}
