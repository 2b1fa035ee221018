//! What a capture differentiates: the scalar output of every sample (mean token loss, summed
//! log-likelihood, or a logit-trace probe) and the Rademacher probe directions of the logit trace.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::OutputKind;
use crate::batch::Batch;
use crate::error::Result;
use crate::model::tape::Tape;
use crate::model::{token_losses, Forward, Model};

/// Rademacher output directions of the logit-trace estimate, (probes, len, vocab) for the first
/// `len` positions. Drawn with our own seeded generator, not libtorch's process-wide one, so that
/// concurrent work cannot change them and every process draws the same; one stream per probe,
/// position-major, so a position's direction does not depend on `len` (sets of different
/// longest texts share theirs) and only the positions used are drawn, not max_len of them
/// (SmolLM2: 8,192 × 49,152 signs per probe).
pub(super) fn trace_probes(
    model: &Model,
    (probes, len): (usize, i64),
    seed: u64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let v = model.cfg.vocab_size;
    let per_probe = (len * v) as usize;
    let mut signs: Vec<f32> = Vec::with_capacity(probes * per_probe);
    for p in 0..probes {
        let key = [b"logit-trace".as_slice(), &(p as u64).to_le_bytes()].concat();
        let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, &key));
        signs.extend((0..per_probe).map(|_| if rng.random::<bool>() { 1.0f32 } else { -1.0 }));
    }
    Tensor::from_slice(&signs)
        .view([probes as i64, len, v])
        .to_kind(kind)
        .to_device(device)
}

/// The scalar output of every sample of a batch, (b,); `probe` is one logit-trace direction
/// (max_len, vocab) and its scale.
fn outputs(
    kind: OutputKind,
    logits: &Tensor,
    batch: &Batch,
    probe: Option<(&Tensor, f64)>,
) -> Tensor {
    match kind {
        OutputKind::MeanLoss => {
            let (_, per_seq, counts) = token_losses(logits, &batch.targets);
            per_seq / counts.clamp_min(1.0)
        }
        OutputKind::SumLoglik => {
            let (_, per_seq, _) = token_losses(logits, &batch.targets);
            -per_seq
        }
        OutputKind::LogitTrace => {
            // f_p(x_i) = Σ_{t,o} v_p[t,o] logits_i[t,o] over real positions, scaled by 1/√k so that
            // summing the k probes' kernels gives their mean.
            let (v, scale) = probe.expect("a probe for the logit trace");
            let t = logits.size()[1];
            let m = batch.mask.to_kind(logits.kind()).unsqueeze(-1); // (b, t, 1)
            let vt = v.narrow(0, 0, t).unsqueeze(0); // (1, t, V)
            (logits * m * vt).sum_dim_intlist([1i64, 2].as_slice(), false, logits.kind()) * scale
        }
    }
}

/// Σ_i f(x_i) over a batch, from an evaluation-mode forward pass without the Switch capacity
/// limit (so samples do not interact), recorded on `tape` when given. Below block `first` (the
/// lowest the selected parameters sit in) the forward runs without recording gradients, so the
/// backward stops there.
pub(super) fn scalar_output(
    model: &Model,
    b: &Batch,
    output: OutputKind,
    probe: Option<(&Tensor, f64)>,
    tape: Option<&Tape>,
    first: usize,
    kind: Kind,
) -> Result<Tensor> {
    let fwd = Forward {
        train: false,
        capture: false,
        capacity: false,
        tape,
        head: true,
    };
    let out = if first > 0 {
        let x = model.hidden_before(&b.ids, &b.mask, first, false)?;
        model.forward_from(first, x, &b.mask, &fwd)?
    } else {
        model.forward_with(&b.ids, &b.mask, &fwd)?
    };
    Ok(outputs(output, &out.logits, b, probe).sum(kind))
}
