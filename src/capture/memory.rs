//! A memory budget for capture: how much a capture holds (its result: per-sample gradients,
//! projected or not, ghost factors, the kernel) and how much one batch needs on top (recorded
//! activations, attention scores, logits and the batch's per-sample gradient pieces), estimated
//! from the model's shapes and each text's length; batches are then cut so that their estimate
//! fits, longer texts in smaller batches. The budget is for the whole process: what it already
//! holds (the model, the corpus) counts.
//!
//! The estimate is an upper-bound model in values × bytes, not a measurement (a hand-written
//! model: no crate knows libtorch's allocations); the README compares it with measured peaks.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::projection::{self, PROJ_BLOCK};
use super::{CaptureOptions, Method, OutputKind, ProjectionKind};
use crate::error::{Error, Result};
use crate::model::Model;

/// What a capture of some samples costs, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// Bytes per value of the working precision.
    pub value_bytes: u64,
    /// Held per sample for the whole capture (its gradients or factors; the stacking copy).
    pub held_per_sample: u64,
    /// Per sample of a batch, per token (recorded activations, logits, ghost factors).
    pub per_token: u64,
    /// Per sample of a batch, per squared token (attention scores and their gradients).
    pub per_token2: u64,
    /// Per sample of a batch, independent of length (its per-sample gradient pieces).
    pub per_sample: u64,
    /// Once, whatever the number of samples: logit-trace probes and, with a projection, a group
    /// of unprojected rows waiting to be projected, one block being drawn, the blocks kept
    /// between batches and the Kronecker factors (see [`projection_bytes`]).
    pub fixed: u64,
}

/// What the selected parameters cost, in values.
#[derive(Debug, Default)]
struct ParamValues {
    /// Held per sample and output direction: the gradient, its projection, or its norm.
    held: u64,
    /// One sample's per-sample gradient pieces in a batch (a Kronecker-projected layer's batched
    /// piece is its k₁ × k₂ projection; the exact path forms the whole gradient first).
    piece: u64,
    /// Ghost factors per position: in + out per Linear weight.
    factors: u64,
    /// The largest parameter projected block by block.
    widest: u64,
    /// Parameters projected block by block: the rows of the projection matrix.
    projected: u64,
    /// The Kronecker factors P_x (in × k₁) and P_g (out × k₂) of every Linear weight.
    kron: u64,
    /// Every selected parameter (what the capture sizes the blocks' room by).
    total: u64,
}

impl ParamValues {
    /// The values of capturing `params` with `opts`; `ghost[k]`: parameter k as ghost factors.
    fn of(params: &[(String, Tensor)], opts: &CaptureOptions, ghost: &[bool]) -> ParamValues {
        let side = opts
            .projection
            .filter(|p| p.kind == ProjectionKind::Kronecker)
            .map(|p| p.kronecker_side() as u64);
        let mut v = ParamValues::default();
        for ((name, t), &g) in params.iter().zip(ghost) {
            let numel = t.numel() as u64;
            v.total += numel;
            let size: Vec<u64> = t.size().iter().map(|&x| x.max(0) as u64).collect();
            if g {
                v.factors += if size.len() == 2 {
                    size[0] + size[1]
                } else {
                    numel
                };
                continue;
            }
            let kron = side.filter(|_| super::gradients::is_linear_weight(name, t));
            v.piece += match kron {
                Some(k) if opts.method != Method::Exact => k * k,
                _ => numel,
            };
            v.held += match (opts.norms_only, kron, opts.projection) {
                (true, _, _) => 1,
                (false, Some(k), _) => k * k,
                (false, None, None) => numel,
                (false, None, Some(p)) => p.dim.max(0) as u64,
            };
            if let Some(k) = kron {
                v.kron += (size[0] + size[1]) * k;
            } else if opts.projection.is_some() {
                v.widest = v.widest.max(numel);
                v.projected += numel;
            }
        }
        v
    }
}

impl Footprint {
    /// The footprint of capturing with `opts` the selected `params` of `model` on `device` for
    /// texts of at most `longest` tokens; `ghost[k]` says whether parameter k is captured as
    /// ghost factors.
    pub fn of(
        model: &Model,
        params: &[(String, Tensor)],
        opts: &CaptureOptions,
        ghost: &[bool],
        longest: usize,
        device: Device,
    ) -> Footprint {
        let cfg = &model.cfg;
        let value_bytes = match params.first().map(|(_, t)| t.kind()) {
            Some(Kind::Double) => 8,
            Some(Kind::Half | Kind::BFloat16) => 2,
            _ => 4,
        };
        let probes = match opts.output {
            OutputKind::LogitTrace => opts.probes.max(1) as u64,
            _ => 1,
        };
        let first = model.first_block_of(params.iter().map(|(n, _)| n.as_str())) as i64;
        let recorded = (cfg.n_layer - first).max(0) as u64 + 1;
        let (d, ffn, heads, v) = (
            cfg.d_model as u64,
            cfg.d_ffn as u64,
            cfg.n_head as u64,
            cfg.vocab_size as u64,
        );
        let experts = match &cfg.experts {
            crate::model::ExpertConfig::Dense => 1,
            _ => 2,
        };
        let pv = ParamValues::of(params, opts, ghost);
        let longest = longest as u64;
        // Logit-trace probes: signs drawn as float32, then converted.
        let trace_probes = match opts.output {
            OutputKind::LogitTrace => probes * longest * v * (4 + value_bytes),
            _ => 0,
        };
        Footprint {
            value_bytes,
            // The pieces, then their stacking copy.
            held_per_sample: (2 * pv.held + pv.factors * longest) * probes * value_bytes,
            // Per recorded block: inputs and outputs of every Linear and norm (≈ 12 d), the FFN
            // (2 · ffn, per active expert path), their gradients; logits, log-probabilities and
            // their gradients (4 V); ghost factors of the batch.
            per_token: (2 * recorded * (12 * d + 2 * ffn * experts) + 4 * v + pv.factors)
                * value_bytes,
            per_token2: 3 * recorded * heads * value_bytes,
            // The batch's per-sample gradient pieces and the einsum's output.
            per_sample: 2 * pv.piece * value_bytes,
            fixed: trace_probes + projection_bytes(opts, &pv, value_bytes, device),
        }
    }

    /// Estimated bytes of one batch of `b` samples whose longest text has `t` tokens.
    pub fn batch(&self, b: usize, t: usize) -> u64 {
        let (b, t) = (b as u64, t as u64);
        margin(b * (self.per_sample + t * self.per_token + t * t * self.per_token2))
    }

    /// Estimated bytes held for `n` samples (their gradients or factors), plus the kernel
    /// (n² float64 per block and the total) when `blocks` is given.
    pub fn held(&self, n: usize, blocks: Option<usize>) -> u64 {
        let n = n as u64;
        margin(
            self.fixed
                + n * self.held_per_sample
                + blocks.map_or(0, |g| (g as u64 + 1) * n * n * 8),
        )
    }
}

/// Bytes a projection holds once (none without one): the unprojected rows waiting for it (a
/// group, [`CaptureOptions::project_group`] values, where blocks are not kept), one block being
/// drawn (its peak on `device`, [`projection::draw_bytes`]), the blocks kept between groups (as
/// kept on `device`, [`projection::kept_row_bytes`], up to their room, [`cache_room`]) and the
/// Kronecker factors.
fn projection_bytes(opts: &CaptureOptions, pv: &ParamValues, value: u64, device: Device) -> u64 {
    let Some(p) = opts.projection else {
        return 0;
    };
    let block = PROJ_BLOCK.min(pv.widest as i64).max(0);
    let matrix = pv.projected * projection::kept_row_bytes(&p, value, device);
    let room = cache_room(opts, pv.total, value, device);
    // Rows wait for blocks drawn again for each group; where blocks are drawn once, each batch
    // is projected as it comes ([`drawn_once`]), and Kronecker-projected layers arrive projected.
    let waiting = if pv.projected > 0 && room == 0 {
        opts.project_group.max(0) as u64 * value
    } else {
        0
    };
    waiting + projection::draw_bytes(&p, block, value, device) + room.min(matrix) + pv.kron * value
}

/// Bytes of projection blocks a capture keeps between batches: an eighth of the memory of the
/// device that holds them ([`blocks_budget`]; 1 GB where unknown), for sparse blocks and for a
/// dense matrix only when the whole of it fits (`numel`: the parameters projected; `value`:
/// bytes per value). Blocks kept are drawn once instead of once a group: on SmolLM2's last two
/// MLPs (5.3 M parameters, 340 MB of sparse blocks) drawing them for each of 8 batches cost a
/// quarter of the capture. Keeping part of a larger dense matrix saved a tenth of its draws
/// there for 2 GB, so none of it is kept. Kronecker factors are kept apart, whatever their size.
pub(crate) fn cache_room(opts: &CaptureOptions, numel: u64, value: u64, device: Device) -> u64 {
    let budget = blocks_budget(opts.memory, device, device_free);
    room_in(opts, numel, value, budget)
}

/// [`cache_room`] under a given budget (`None`: unknown).
fn room_in(opts: &CaptureOptions, numel: u64, value: u64, budget: Option<u64>) -> u64 {
    let Some(p) = opts.projection else {
        return 0;
    };
    let room = budget.map_or(1 << 30, |m| m / 8);
    match p.kind {
        ProjectionKind::Sparse => room,
        _ if numel.saturating_mul(p.dim.max(0) as u64 * value) <= room => room,
        _ => 0,
    }
}

/// `opts` with the group its unprojected rows wait in ([`CaptureOptions::project_group`]) for
/// capturing `params` on `device`. Under a memory budget, rows wait for their projection in
/// groups of at most an eighth of it (results do not depend on the group). Groups spread the
/// drawing of a dense matrix over many rows; a sparse one costs s values per parameter to draw,
/// and a dense one that fits the blocks' room is drawn once ([`drawn_once`]), so then each batch
/// is projected as it comes and no unprojected row waits (on SmolLM2's last two MLPs, 128
/// samples waited as 2.7 GB).
pub(crate) fn with_groups(
    opts: &CaptureOptions,
    params: &[(String, Tensor)],
    device: Device,
) -> CaptureOptions {
    let value = params
        .first()
        .map_or(4, |(_, t)| t.kind().elt_size_in_bytes().max(1) as u64);
    let numel = params.iter().map(|(_, t)| t.numel() as u64).sum::<u64>();
    let group = match opts.memory {
        _ if drawn_once(opts, numel, value, device) => 1,
        Some(m) if opts.projection.is_some() => {
            opts.project_group.min((m / 8 / value) as i64).max(1)
        }
        _ => opts.project_group,
    };
    CaptureOptions {
        project_group: group,
        ..opts.clone()
    }
}

/// Whether a capture draws each block of its projection once (a sparse one, or a dense one that
/// fits the blocks' room), so batches are projected as they come with no rows waiting.
pub(crate) fn drawn_once(opts: &CaptureOptions, numel: u64, value: u64, device: Device) -> bool {
    cache_room(opts, numel, value, device) > 0
}

/// The memory budget of what lives on `device`: the process's (`memory`, `--memory`) on the
/// CPU; on a CUDA device 80% of its free memory (`free`: [`device_free`]), as
/// [`default_budget`] takes of the host's, since blocks drawn there use none of the host's.
fn blocks_budget(
    memory: Option<u64>,
    device: Device,
    free: impl Fn(Device) -> Option<u64>,
) -> Option<u64> {
    match device {
        Device::Cpu => memory,
        other => free(other).map(|f| f / 10 * 8),
    }
}

/// Free memory of a CUDA device in bytes, `cudaMemGetInfo` of the CUDA runtime libtorch has
/// loaded (tch exposes no memory query; this is the runtime's documented one, with no
/// nvidia-smi); `None` for another device, or where no runtime is loaded or the call fails.
pub fn device_free(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(index) => cuda_free(index),
        _ => None,
    }
}

/// The loaded libraries whose file name contains `libcudart.so` (the CUDA runtime).
fn loaded_cudart() -> Vec<std::ffi::CString> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the Vec passed below; `info` and its name are valid for this call.
        let (names, name) = unsafe {
            (
                &mut *(data as *mut Vec<std::ffi::CString>),
                (*info).dlpi_name,
            )
        };
        if !name.is_null() {
            // SAFETY: a loaded object's name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(name) };
            if name.to_bytes().windows(12).any(|w| w == b"libcudart.so") {
                names.push(name.to_owned());
            }
        }
        0
    }
    let mut names: Vec<std::ffi::CString> = Vec::new();
    // SAFETY: the callback only reads each entry and pushes onto `names`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut names as *mut _ as *mut libc::c_void) };
    names
}

/// `cudaMemGetInfo` of device `index` through the loaded CUDA runtime, the current device set
/// to it for the call and restored after.
fn cuda_free(index: usize) -> Option<u64> {
    type GetInfo = unsafe extern "C" fn(*mut libc::size_t, *mut libc::size_t) -> libc::c_int;
    type GetDevice = unsafe extern "C" fn(*mut libc::c_int) -> libc::c_int;
    type SetDevice = unsafe extern "C" fn(libc::c_int) -> libc::c_int;
    for name in loaded_cudart() {
        // SAFETY: RTLD_NOLOAD only takes a library already loaded, and the symbols are the CUDA
        // runtime's, called with their documented signatures; the handle is closed after.
        unsafe {
            let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if lib.is_null() {
                continue;
            }
            let sym = |s: &[u8]| libc::dlsym(lib, s.as_ptr() as *const libc::c_char);
            let (info, get, set) = (
                sym(b"cudaMemGetInfo\0"),
                sym(b"cudaGetDevice\0"),
                sym(b"cudaSetDevice\0"),
            );
            let mut out = None;
            if !info.is_null() && !get.is_null() && !set.is_null() {
                let (info, get, set): (GetInfo, GetDevice, SetDevice) = (
                    std::mem::transmute::<*mut libc::c_void, GetInfo>(info),
                    std::mem::transmute::<*mut libc::c_void, GetDevice>(get),
                    std::mem::transmute::<*mut libc::c_void, SetDevice>(set),
                );
                let mut was: libc::c_int = 0;
                if get(&mut was) == 0 && set(index as libc::c_int) == 0 {
                    let (mut free, mut total): (libc::size_t, libc::size_t) = (0, 0);
                    if info(&mut free, &mut total) == 0 {
                        out = Some(free as u64);
                    }
                    set(was);
                }
            }
            libc::dlclose(lib);
            if out.is_some() {
                return out;
            }
        }
    }
    None
}

/// The model's estimates times 1.25: on four captures (README) the unscaled estimate of the
/// peak was 19% under to 7% over the measured one; the allocator's cached blocks and copies
/// the model leaves out take the rest.
fn margin(bytes: u64) -> u64 {
    bytes + bytes / 4
}

/// The batches of a capture of samples of `lengths` tokens (in capture order) under `budget`,
/// the process's: what it holds now ([`resident`]: the model, the corpus) and what the capture
/// will hold ([`Footprint::held`]) leave the room each batch is cut to ([`plan_batches`]).
/// Logs the plan under a budget, and the estimate in bytes at debug level (`-v`), beside the
/// resident size it adds to: what the tests compare with measured peaks.
pub fn plan(
    fp: &Footprint,
    lengths: &[usize],
    budget: Option<u64>,
    max_batch: usize,
) -> Result<Vec<Range<usize>>> {
    let resident = resident();
    let holds = fp.held(lengths.len(), None);
    let plan = plan_batches(lengths, fp, budget, resident + holds, max_batch)?;
    let longest = |r: &Range<usize>| lengths[r.clone()].iter().copied().max().unwrap_or(1);
    let largest = plan
        .iter()
        .map(|r| fp.batch(r.len(), longest(r)))
        .max()
        .unwrap_or(0);
    tracing::debug!(
        resident,
        held = holds,
        largest_batch = largest,
        "capture memory estimate in bytes"
    );
    if let Some(budget) = budget {
        let sizes = plan.iter().map(|r| r.len());
        tracing::info!(
            "memory budget {:.1} GB: held {:.1} GB (this process and the capture's results); {} samples in {} batches of {} to {} (longest text {} tokens), largest batch estimated {:.1} GB",
            budget as f64 / 1e9,
            (resident + holds) as f64 / 1e9,
            lengths.len(),
            plan.len(),
            sizes.clone().min().unwrap_or(0),
            sizes.max().unwrap_or(0),
            lengths.iter().max().copied().unwrap_or(0),
            largest as f64 / 1e9
        );
    }
    Ok(plan)
}

/// Consecutive batches of at most `max_batch` samples, each cut so that its estimate stays
/// within `budget` bytes less what is held (`held`); without a budget, batches of `max_batch`.
/// A sample whose batch of one does not fit is refused, naming it and the figures.
pub fn plan_batches(
    lengths: &[usize],
    fp: &Footprint,
    budget: Option<u64>,
    held: u64,
    max_batch: usize,
) -> Result<Vec<Range<usize>>> {
    let max_batch = max_batch.max(1);
    let Some(budget) = budget else {
        return Ok((0..lengths.len())
            .step_by(max_batch)
            .map(|s| s..(s + max_batch).min(lengths.len()))
            .collect());
    };
    let gb = |x: u64| x as f64 / 1e9;
    if held >= budget {
        return Err(Error::invalid(
            "--memory",
            format!(
                "this process and the capture's results need {:.1} GB before any batch (the \
                 per-sample gradients or their projections for {} samples, projection buffers, \
                 the model) within a budget of {:.1} GB; use --project K (or --projection \
                 kronecker), --diagonal, --tile N, fewer --samples or a larger --memory",
                gb(held),
                lengths.len(),
                gb(budget)
            ),
        ));
    }
    let room = budget - held;
    let mut out = Vec::new();
    let mut start = 0;
    while start < lengths.len() {
        let mut end = start;
        let mut longest = 0;
        while end < lengths.len() && end - start < max_batch {
            let t = longest.max(lengths[end]);
            if fp.batch(end - start + 1, t) > room {
                break;
            }
            longest = t;
            end += 1;
        }
        if end == start {
            return Err(Error::invalid(
                "--memory",
                format!(
                    "sample {start} ({} tokens) needs about {:.1} GB on its own, more than the \
                     {:.1} GB left of the budget; select fewer parameters (--params, \
                     --last-blocks), project (--project), or give a larger --memory",
                    lengths[start],
                    gb(fp.batch(1, lengths[start])),
                    gb(room)
                ),
            ));
        }
        out.push(start..end);
        start = end;
    }
    Ok(out)
}

/// What this process holds in memory now (resident set, Linux `/proc/self/statm`); 0 where
/// unknown.
pub fn resident() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// The default budget: 80% of the memory the system reports available now (Linux
/// `/proc/meminfo`), for the whole process; `None` where unknown.
pub fn default_budget() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024 / 10 * 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Projection, Selection};
    use crate::model::ModelConfig;

    /// A two-block GPT (d = 16, FFN 32, 64 tokens of vocabulary, float32) and its parameters,
    /// all of them or the named ones.
    fn tiny(globs: &[&str]) -> (tch::nn::VarStore, Model, Vec<(String, Tensor)>) {
        let cfg = ModelConfig {
            vocab_size: 64,
            max_len: 32,
            d_model: 16,
            n_head: 2,
            d_ffn: 32,
            ..ModelConfig::default()
        };
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let selection = Selection {
            globs: globs.iter().map(|g| g.to_string()).collect(),
            ..Selection::default()
        };
        let params = selection.select(&vs).unwrap();
        (vs, model, params)
    }

    fn projected(kind: ProjectionKind, dim: i64) -> CaptureOptions {
        CaptureOptions {
            projection: Some(Projection { kind, dim, seed: 3 }),
            ..CaptureOptions::default()
        }
    }

    /// Batches are planned from [`Footprint::of`]: short texts go in batches of `max_batch`, a
    /// long text takes a smaller batch, and what cannot fit is refused naming the sample or the
    /// remedies.
    #[test]
    fn batches_shrink_for_long_texts_and_refuse_what_cannot_fit() {
        let (_vs, model, params) = tiny(&[]);
        let ghost = vec![false; params.len()];
        let f = Footprint::of(
            &model,
            &params,
            &CaptureOptions::default(),
            &ghost,
            40,
            Device::Cpu,
        );
        let lengths = [5, 5, 5, 5, 40, 5, 5];
        let plan = plan_batches(&lengths, &f, None, 0, 3).unwrap();
        assert_eq!(plan, vec![0..3, 3..6, 6..7]);
        // Room for four short texts, not five, and for two with the long one but not three.
        let (short, long) = (f.batch(4, 5), f.batch(2, 40));
        assert!(f.batch(5, 5) > short && f.batch(3, 40) > long);
        let room = short.max(long);
        let plan = plan_batches(&lengths, &f, Some(room + 100), 100, 8).unwrap();
        let fits = |r: &Range<usize>| {
            let t = lengths[r.clone()].iter().max().copied().unwrap();
            f.batch(r.len(), t) <= room
        };
        assert!(plan.iter().all(fits), "{plan:?}");
        assert_eq!(plan[0], 0..4, "{plan:?}");
        assert!(
            plan.iter().any(|r| r.contains(&4) && r.len() <= 2),
            "{plan:?}"
        );
        // The long text alone does not fit: refused, naming it.
        let err = plan_batches(&lengths, &f, Some(f.batch(1, 40) + 99), 100, 8).unwrap_err();
        assert!(err.to_string().contains("sample 4 (40 tokens)"), "{err}");
        // What is held alone exceeds the budget: refused, naming the remedies.
        let err = plan_batches(&lengths, &f, Some(100), 100, 8).unwrap_err();
        assert!(err.to_string().contains("--project"), "{err}");
    }

    /// Kronecker factors are held for the whole capture: with only Linear weights projected that
    /// way, the fixed bytes are exactly those of the factors the capture draws.
    #[test]
    fn kronecker_factors_are_counted() {
        let (_vs, model, params) = tiny(&["h.*.weight"]);
        let linear: Vec<(String, Tensor)> = params
            .into_iter()
            .filter(|(n, t)| crate::capture::gradients::is_linear_weight(n, t))
            .collect();
        assert_eq!(linear.len(), 8);
        let opts = projected(ProjectionKind::Kronecker, 30);
        let ghost = vec![false; linear.len()];
        let f = Footprint::of(&model, &linear, &opts, &ghost, 16, Device::Cpu);
        let pr = opts.projection.unwrap();
        let drawn: u64 = linear
            .iter()
            .map(|(n, t)| {
                let s = t.size();
                let (px, pg) = pr.kronecker_factors(n, (s[0], s[1]), t.kind(), Device::Cpu);
                ((px.numel() + pg.numel()) * px.kind().elt_size_in_bytes()) as u64
            })
            .sum();
        assert!(drawn > 0);
        assert_eq!(f.fixed, drawn);
        // Each sample holds its k₁ × k₂ = 6 × 6 projection per layer, twice (the stacking copy).
        assert_eq!(f.held_per_sample, 2 * 8 * 36 * 4);
    }

    /// Sparse blocks on another device are int64 columns and values in the working precision,
    /// 12·s bytes a row in float32 (on the CPU u32 columns and sign bytes, 5·s): the fixed bytes
    /// cover every block kept as the device path draws it (run here on the CPU).
    #[test]
    fn sparse_blocks_on_a_device_are_counted_as_drawn_there() {
        let (_vs, model, params) = tiny(&[]);
        let opts = projected(ProjectionKind::Sparse, 64);
        let ghost = vec![false; params.len()];
        let pr = opts.projection.unwrap();
        let (s, rows) = (
            pr.nonzeros() as u64,
            params.iter().map(|(_, t)| t.numel() as u64).sum::<u64>(),
        );
        let on_device: u64 = params
            .iter()
            .map(|(n, t)| projection::sparse_block_bytes_on_device(&pr, n, t.numel() as i64))
            .sum();
        assert_eq!(on_device, rows * 12 * s);
        // The device's free memory is unknown here (no GPU): its blocks' room falls back to 1 GB,
        // which they fit.
        let cuda = Footprint::of(&model, &params, &opts, &ghost, 16, Device::Cuda(0));
        let cpu = Footprint::of(&model, &params, &opts, &ghost, 16, Device::Cpu);
        assert!(cuda.fixed >= on_device, "{} < {on_device}", cuda.fixed);
        assert!(
            cpu.fixed >= rows * 5 * s && cpu.fixed < on_device,
            "{}",
            cpu.fixed
        );
    }

    /// The blocks' room on a CUDA device is an eighth of 80% of its free memory, whatever the
    /// host's budget; on the CPU an eighth of the process's budget.
    #[test]
    fn the_blocks_room_follows_the_memory_of_their_device() {
        let gb = 1_000_000_000u64;
        let free = |d: Device| (d == Device::Cuda(1)).then_some(100 * gb);
        assert_eq!(
            blocks_budget(Some(8 * gb), Device::Cuda(1), free),
            Some(80 * gb)
        );
        assert_eq!(blocks_budget(Some(8 * gb), Device::Cpu, free), Some(8 * gb));
        assert_eq!(blocks_budget(Some(8 * gb), Device::Cuda(0), free), None);
        // A Gaussian matrix of 3.2 GB (10 M parameters × 80 × 4 bytes) is kept on that device
        // (room 10 GB), not under the host's 8 GB budget (room 1 GB).
        let opts = projected(ProjectionKind::Gaussian, 80);
        let numel = 10_000_000;
        assert_eq!(room_in(&opts, numel, 4, Some(80 * gb)), 10 * gb);
        assert_eq!(room_in(&opts, numel, 4, Some(8 * gb)), 0);
        assert_eq!(
            room_in(&projected(ProjectionKind::Sparse, 80), numel, 4, None),
            1 << 30
        );
        // The query itself answers only where libtorch sees a GPU.
        assert_eq!(
            device_free(Device::Cuda(0)).is_some(),
            tch::Cuda::is_available()
        );
        assert_eq!(device_free(Device::Cpu), None);
    }
}
