//! How the samples of a capture are batched: sorted by encoded length, so that a batch pads to
//! texts of about its own length, and each sample's BERT mask keyed by its own tokens.

use tch::Device;

use crate::batch::{make_batch_keyed, Batch};
use crate::model::Model;

/// A batch of samples for capture. A BERT sample's mask is seeded by (`seed`, its tokens), so a
/// sample is masked the same way in every set, shard, batch or cross set it appears in (keys by
/// position in a list would mask one sample differently in X and in Y of a cross-kernel).
pub fn capture_batch(model: &Model, seqs: &[&[u32]], seed: u64, device: Device) -> Batch {
    let keys: Vec<u64> = seqs.iter().map(|s| sample_key(s)).collect();
    make_batch_keyed(&model.cfg, seqs, &keys, seed, device)
}

/// The mask key of a sample: a stable hash of its token ids.
fn sample_key(s: &[u32]) -> u64 {
    let bytes: Vec<u8> = s.iter().flat_map(|t| t.to_le_bytes()).collect();
    crate::seed::stable_hash(0, &bytes)
}

/// The order of `seqs` by encoded length (stable) and the lengths in that order. Samples are
/// batched in this order, so a batch pads to texts of about its own length: on Brown + fortunes
/// with SmolLM2 the padded tokens were half of every batch. What a sample contributes does not
/// depend on its batch; rows go back to the caller's order.
pub(super) fn by_length(model: &Model, seqs: &[&[u32]]) -> (Vec<usize>, Vec<usize>) {
    let encoded: Vec<usize> = seqs
        .iter()
        .map(|s| crate::batch::encoded_len(&model.cfg, s.len()))
        .collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| encoded[i]);
    let lengths = order.iter().map(|&i| encoded[i]).collect();
    (order, lengths)
}
