//! Seeded random projections of per-sample gradients, J (n × P) → J R (n × k) with E[R Rᵀ] = I:
//! dense Gaussian or Rademacher matrices, LoGra's Kronecker-factored per-layer projection, and a
//! sparse Johnson–Lindenstrauss one. Every matrix is a pure function of (seed, parameter name,
//! row block), drawn from counter-based SplitMix64 streams ([`crate::seed::draw`]), so processes,
//! shards and devices agree: on the CPU by a parallel Rust pass, on other devices by the same
//! integer hash in libtorch ops, in the working precision (no float64 matrix and no copy).
//! Blocks are drawn once per capture and kept while they fit an eighth of the memory budget.

use std::collections::BTreeMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Random projection of per-sample gradients.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ProjectionKind {
    /// Entries N(0, 1/k).
    Gaussian,
    /// Entries ±1/√k.
    Rademacher,
    /// Per Linear weight (out × in), LoGra's Kronecker-factored projection: each position's
    /// input x_t and output gradient g_t are projected separately, Σ_t (P_gᵀ g_t) ⊗ (P_xᵀ x_t),
    /// with Gaussian P_x (in × k₁) and P_g (out × k₂), k₁ = k₂ = ⌈√k⌉, so the per-sample gradient
    /// costs T·(in·k₁ + out·k₂) instead of in·out·k and is never formed. Other parameters
    /// (biases, norms, embeddings) take the Gaussian projection to k.
    Kronecker,
    /// Sparse Johnson–Lindenstrauss, Kane–Nelson's block construction: the k columns are cut
    /// into s = min(k, [`SPARSE_NONZEROS`]) blocks, and each parameter's row of R has one
    /// nonzero ±1/√s in each block, at a random column, so R Rᵀ is unbiased for the identity,
    /// drawing it costs s values per parameter instead of k, and projecting costs n·P·s instead
    /// of n·P·k. The default: as accurate as the Gaussian at equal k (README) at a fraction of
    /// its cost.
    #[default]
    Sparse,
}

/// The version of a capture's random draws (projection matrices, logit-trace probes), recorded
/// in the manifests of resumable kernels so that outputs drawn by another version are not mixed
/// with this one's. 2: sparse projections by the block construction from SplitMix64 draws, and
/// logit-trace probes from one stream per probe. 3: dense (Gaussian, Rademacher, Kronecker)
/// matrices from a counter-based SplitMix64 stream per block, by Box–Muller in the working
/// precision, on the capture's device.
pub const DRAWS: u32 = 3;

/// Nonzero entries per row of a sparse JL projection (the Kane–Nelson s; 8 keeps the
/// distortion of 1024-dimensional projections near the dense one's, see the README).
pub const SPARSE_NONZEROS: i64 = 8;

impl Projection {
    /// Nonzeros per row of a sparse projection, s = min(k, [`SPARSE_NONZEROS`]).
    pub fn nonzeros(&self) -> i64 {
        SPARSE_NONZEROS.min(self.dim).max(1)
    }

    /// The side k₁ = k₂ = ⌈√k⌉ of a Kronecker-factored projection.
    pub fn kronecker_side(&self) -> i64 {
        let mut side = (self.dim as f64).sqrt().floor() as i64;
        while side * side < self.dim {
            side += 1;
        }
        side.max(1)
    }

    /// The Kronecker factors (P_x: in × k₁, P_g: out × k₂) of the Linear weight `name` of shape
    /// (out, in), Gaussian of variance 1/k₁ and 1/k₂, drawn in `kind` on `device`; the same in
    /// every process for one seed.
    pub fn kronecker_factors(
        &self,
        name: &str,
        (out, inp): (i64, i64),
        kind: Kind,
        device: Device,
    ) -> (Tensor, Tensor) {
        let side = Projection {
            kind: ProjectionKind::Gaussian,
            dim: self.kronecker_side(),
            seed: self.seed,
        };
        (
            dense_block(&side, &format!("{name}#kron-in"), inp, kind, device),
            dense_block(&side, &format!("{name}#kron-out"), out, kind, device),
        )
    }
}

/// A seeded random projection of per-sample gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Projection {
    /// Which matrix: dense Gaussian or Rademacher, Kronecker-factored, or sparse.
    pub kind: ProjectionKind,
    /// Target dimension per parameter tensor.
    pub dim: i64,
    /// Seed of the matrices (the same in every process).
    pub seed: u64,
}

/// Rows of projection matrices are generated in blocks of this many parameters.
pub(crate) const PROJ_BLOCK: i64 = 1 << 16;

/// Bytes of one row of a block of `p` as it is kept between batches on `device` (what
/// [`ProjectionCache`] counts), in a precision of `value` bytes: a sparse row as s u32 columns
/// and s sign bytes on the CPU ([`SparseRows`]), as s int64 columns and s values elsewhere
/// ([`Block::SparseOnDevice`]); a dense row as k values.
pub(crate) fn kept_row_bytes(p: &Projection, value: u64, device: Device) -> u64 {
    let s = p.nonzeros() as u64;
    match (p.kind, device) {
        (ProjectionKind::Sparse, Device::Cpu) => 5 * s,
        (ProjectionKind::Sparse, _) => (8 + value) * s,
        _ => p.dim.max(0) as u64 * value,
    }
}

/// Bytes of the `len`-row block `key` of a sparse projection as another device keeps it (the
/// device path's tensors, drawn here on the CPU).
#[cfg(test)]
pub(crate) fn sparse_block_bytes_on_device(p: &Projection, key: &str, len: i64) -> u64 {
    let (c, v) = sparse_by_tensor_ops(p, key, len, Kind::Float, Device::Cpu);
    Block::SparseOnDevice(c, v).bytes()
}

/// Int64 (len × s) arrays [`sparse_by_tensor_ops`] holds at once at most (the counter, the
/// draws, and the columns' operands and partial results), beside the values it returns.
const SPARSE_DRAW_INT64: u64 = 6;

/// Peak bytes of drawing one block of `len` rows of `p` on `device` in a precision of `value`
/// bytes, the block included. On the CPU a block is written in place: sparse rows as kept, a
/// dense block in float32 (float64 for float64) and then converted to a half precision. On
/// other devices the libtorch ops hold a sparse block's int64 temporaries
/// ([`SPARSE_DRAW_INT64`]), or a dense block's chunks and their concatenation (the block twice)
/// with the int64 draws of one chunk ([`DEVICE_CHUNK`] entries; six arrays counted).
pub(crate) fn draw_bytes(p: &Projection, len: i64, value: u64, device: Device) -> u64 {
    let len = len.max(0) as u64;
    let s = p.nonzeros() as u64;
    let work = if value == 8 { 8 } else { 4 };
    let dense = len * p.dim.max(0) as u64;
    let converted = if value == work { 0 } else { dense * value };
    match (p.kind, device) {
        (ProjectionKind::Sparse, Device::Cpu) => len * kept_row_bytes(p, value, device),
        (ProjectionKind::Sparse, _) => len * s * (8 * SPARSE_DRAW_INT64 + value),
        (_, Device::Cpu) => dense * work + converted,
        _ => 2 * dense * work + converted + (DEVICE_CHUNK as u64).min(dense) * 8 * 6,
    }
}

/// Project per-sample gradients `j` (n, P) to (n, k): J R with R (P, k) of entries of variance 1/k,
/// drawn per (seed, name, block) so every process builds the same R. With several logit-trace
/// probes concatenated along P, each probe's slice J_p is projected on its own and the results
/// are concatenated, (n, probes · k): the kernel is then Σ_p J_p R Rᵀ J_pᵀ ≈ Σ_p J_p J_pᵀ, with
/// no cross-probe terms J_p R Rᵀ J_qᵀ (which a sum of the projections would keep).
pub fn project(j: &Tensor, name: &str, p: &Projection, probes: usize) -> Result<Tensor> {
    let mut out = project_cached(
        std::slice::from_ref(j),
        name,
        p,
        probes,
        &mut ProjectionCache::new(0),
    )?;
    Ok(out.remove(0))
}

/// One block of a projection matrix as it is applied.
enum Block {
    /// The nonzeros of a sparse block, for the CPU's pass.
    Sparse(Arc<SparseRows>),
    /// The nonzeros of a sparse block on another device: columns (len × s, int64) and values
    /// ±1/√s (len × s, in the working precision), for index_add.
    SparseOnDevice(Tensor, Tensor),
    /// A dense (len × k) block in the working precision on the working device.
    Dense(Tensor),
}

impl Block {
    fn bytes(&self) -> u64 {
        match self {
            Block::Sparse(rows) => rows.bytes(),
            Block::SparseOnDevice(c, v) => {
                (c.numel() * 8 + v.numel() * v.kind().elt_size_in_bytes()) as u64
            }
            Block::Dense(t) => (t.numel() * t.kind().elt_size_in_bytes()) as u64,
        }
    }

    fn shallow_clone(&self) -> Block {
        match self {
            Block::Sparse(rows) => Block::Sparse(rows.clone()),
            Block::SparseOnDevice(c, v) => {
                Block::SparseOnDevice(c.shallow_clone(), v.shallow_clone())
            }
            Block::Dense(t) => Block::Dense(t.shallow_clone()),
        }
    }
}

/// Projection blocks drawn once per capture and kept while they fit `room` bytes; blocks beyond
/// it are drawn again at each use.
pub(crate) struct ProjectionCache {
    blocks: BTreeMap<String, Block>,
    room: u64,
}

impl ProjectionCache {
    pub(crate) fn new(room: u64) -> ProjectionCache {
        ProjectionCache {
            blocks: BTreeMap::new(),
            room,
        }
    }

    /// The block `key` of `len` rows, for gradients in `kind` on `device`: drawn there.
    fn get(&mut self, p: &Projection, key: &str, len: i64, kind: Kind, device: Device) -> Block {
        if let Some(b) = self.blocks.get(key) {
            return b.shallow_clone();
        }
        let block = match p.kind {
            ProjectionKind::Sparse if device == Device::Cpu => {
                Block::Sparse(Arc::new(SparseRows::draw(p, key, len)))
            }
            ProjectionKind::Sparse => {
                let (cols, values) = sparse_by_tensor_ops(p, key, len, kind, device);
                Block::SparseOnDevice(cols, values)
            }
            _ => Block::Dense(dense_block(p, key, len, kind, device)),
        };
        if block.bytes() <= self.room {
            self.room -= block.bytes();
            self.blocks.insert(key.to_string(), block.shallow_clone());
        }
        block
    }
}

/// [`project`] of several sets of rows `js` (each n_i × P) at once, keeping blocks in `cache`
/// while they fit: each block is drawn once for all of them, and the rows are stacked a block
/// at a time, never whole (a copy as large as the rows waiting for a dense projection).
pub(crate) fn project_cached(
    js: &[Tensor],
    name: &str,
    p: &Projection,
    probes: usize,
    cache: &mut ProjectionCache,
) -> Result<Vec<Tensor>> {
    if p.dim < 1 {
        return Err(Error::invalid(
            "--project",
            "the projection dimension must be at least 1",
        ));
    }
    let Some(first) = js.first() else {
        return Ok(Vec::new());
    };
    let (_, total) = first.size2()?;
    let probes = probes.max(1) as i64;
    let per = total / probes;
    let sizes = js
        .iter()
        .map(|j| Ok(j.size2()?.0))
        .collect::<Result<Vec<i64>>>()?;
    let rows: i64 = sizes.iter().sum();
    let mut out = Tensor::zeros([probes * rows, p.dim], (first.kind(), first.device()));
    let mut start = 0;
    while start < per {
        let len = PROJ_BLOCK.min(per - start);
        let key = format!("{name}#{}", start / PROJ_BLOCK);
        // Every set's and probe's slice of this block, stacked (probe-major): one product
        // reads the block from memory once, not once per set.
        let slices: Vec<Tensor> = (0..probes)
            .flat_map(|probe| {
                js.iter()
                    .map(move |j| j.narrow(1, probe * per + start, len))
            })
            .collect();
        let x = match slices.len() {
            1 => slices[0].shallow_clone(),
            _ => Tensor::cat(&slices, 0),
        };
        drop(slices);
        out += match cache.get(p, &key, len, first.kind(), first.device()) {
            Block::Sparse(b) => b.project(&x, p.dim)?,
            Block::SparseOnDevice(cols, values) => sparse_by_index_add(&x, &cols, &values, p.dim),
            Block::Dense(r) => x.matmul(&r),
        };
        start += len;
    }
    // Rows probe-major: set i's probe q at q·rows + (rows of the sets before i).
    let by_probe = out.split(rows, 0);
    let mut outs = Vec::with_capacity(js.len());
    let mut at = 0;
    for &n in &sizes {
        let parts: Vec<Tensor> = by_probe.iter().map(|o| o.narrow(0, at, n)).collect();
        outs.push(Tensor::cat(&parts, 1));
        at += n;
    }
    Ok(outs)
}

/// The SplitMix64 stream of a dense block: its entry e (row-major) is, for a Gaussian, the
/// cosine (e even) or sine (e odd) half of the Box–Muller pair of draw e/2, whose high and low
/// 32 bits give u₁ ∈ (0, 1) and u₂ ∈ [0, 1); for a Rademacher, the sign of draw e.
fn dense_stream(p: &Projection, key: &str) -> u64 {
    let what = match p.kind {
        ProjectionKind::Rademacher => "rademacher",
        _ => "gaussian",
    };
    crate::seed::stable_hash(p.seed, format!("{key}/{what}").as_bytes())
}

/// The SplitMix64 stream of a sparse block: draw r·s + b gives row r's column in column block b
/// and its sign.
fn sparse_stream(p: &Projection, key: &str) -> u64 {
    crate::seed::stable_hash(p.seed, format!("{key}/sparse").as_bytes())
}

/// 2⁻³²: a 32-bit integer to [0, 1).
const TWO_POW_M32: f64 = 1.0 / 4_294_967_296.0;

/// One (len × dim) block of a dense projection matrix, entries of variance 1/dim (a Gaussian's
/// for every kind but Rademacher), drawn in `kind` on `device`: on the CPU by [`dense_cpu`], on
/// other devices by [`dense_by_tensor_ops`], which draw the same integers and agree to the
/// precision's rounding (tested).
pub(crate) fn dense_block(
    p: &Projection,
    key: &str,
    len: i64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let work = match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let t = match device {
        Device::Cpu => dense_cpu(p, key, len, work),
        _ => dense_by_tensor_ops(p, key, len, work, device, DEVICE_CHUNK),
    };
    t.to_kind(kind)
}

/// A value type the CPU draw writes: f32 or f64, the working precision.
trait Entry: Copy + Default + Send + Sync + std::ops::Mul<Output = Self> + tch::kind::Element {
    fn from_f64(x: f64) -> Self;
    /// (r cos θ, r sin θ) of Box–Muller for the draw `h`, in this precision.
    fn box_muller(h: u64) -> (Self, Self);
}

impl Entry for f64 {
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn box_muller(h: u64) -> (f64, f64) {
        let u1 = ((h >> 32) as f64 + 0.5) * TWO_POW_M32;
        let u2 = (h & 0xffff_ffff) as f64 * TWO_POW_M32;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

impl Entry for f32 {
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn box_muller(h: u64) -> (f32, f32) {
        let u1 = ((h >> 32) as f32 + 0.5) * TWO_POW_M32 as f32;
        let u2 = (h & 0xffff_ffff) as f32 * TWO_POW_M32 as f32;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

/// [`dense_block`] on the CPU (`work`: Float or Double): chunks of entries drawn in parallel
/// straight into the tensor's buffer, each entry from its own counter, so the threads do not
/// change the matrix. Box–Muller in float32 draws 65,536 × 1,024 entries in 0.35 s on 2 cores,
/// against 0.55 s for the ChaCha/ziggurat float64 draw it replaced (before its three copies).
fn dense_cpu(p: &Projection, key: &str, len: i64, work: Kind) -> Tensor {
    fn fill<T: Entry>(p: &Projection, stream: u64, len: i64, work: Kind) -> Tensor {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16; // entries; even, so pairs never straddle chunks
        let scale = T::from_f64(1.0 / (p.dim as f64).sqrt());
        let (minus, plus) = (T::from_f64(-1.0 / (p.dim as f64).sqrt()), scale);
        let n = (len.max(0) * p.dim) as usize;
        let out = Tensor::empty([len.max(0), p.dim], (work, Device::Cpu));
        if n == 0 {
            return out;
        }
        // SAFETY: `out` is a fresh contiguous CPU tensor of n values of T (`work` is T's kind),
        // owned here and not yet shared; writing it in place saves a buffer and its copy.
        let v = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut T, n) };
        let gaussian = p.kind != ProjectionKind::Rademacher;
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xs)| {
            let first = (c * CHUNK) as u64;
            if gaussian {
                for (q, pair) in xs.chunks_mut(2).enumerate() {
                    let (a, b) = T::box_muller(crate::seed::draw(stream, first / 2 + q as u64));
                    pair[0] = a * scale;
                    if let Some(x) = pair.get_mut(1) {
                        *x = b * scale;
                    }
                }
            } else {
                for (e, x) in xs.iter_mut().enumerate() {
                    let h = crate::seed::draw(stream, first + e as u64);
                    *x = if h >> 63 == 1 { minus } else { plus };
                }
            }
        });
        out
    }
    let stream = dense_stream(p, key);
    match work {
        Kind::Double => fill::<f64>(p, stream, len, Kind::Double),
        _ => fill::<f32>(p, stream, len, Kind::Float),
    }
}

/// SplitMix64's draws `i` (int64, on their device) of `stream`, in libtorch's wrapping int64
/// arithmetic; logical shifts are arithmetic shifts masked to the bits they keep.
fn draws_by_tensor_ops(stream: u64, i: &Tensor) -> Tensor {
    let shr = |z: &Tensor, k: i64| {
        z.bitwise_right_shift_tensor_scalar(k)
            .bitwise_and((1i64 << (64 - k)) - 1)
    };
    let mut z = i * (0x9e37_79b9_7f4a_7c15u64 as i64) + stream as i64;
    z = z.bitwise_xor_tensor(&shr(&z, 30)) * (0xbf58_476d_1ce4_e5b9u64 as i64);
    z = z.bitwise_xor_tensor(&shr(&z, 27)) * (0x94d0_49bb_1331_11ebu64 as i64);
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// Entries per chunk of a dense block drawn by libtorch ops: int64 temporaries of 32 MB.
const DEVICE_CHUNK: i64 = 1 << 22;

/// [`dense_block`] in libtorch ops on `device` (`work`: Float or Double), in chunks of rows of
/// about `chunk` entries.
fn dense_by_tensor_ops(
    p: &Projection,
    key: &str,
    len: i64,
    work: Kind,
    device: Device,
    chunk: i64,
) -> Tensor {
    let stream = dense_stream(p, key);
    let scale = 1.0 / (p.dim as f64).sqrt();
    let rows = (chunk / p.dim.max(1)).max(2) & !1; // even: whole pairs per chunk
    let mut parts = Vec::new();
    let mut r0 = 0;
    while r0 < len {
        let r1 = (r0 + rows).min(len);
        let (e0, e1) = (r0 * p.dim, r1 * p.dim);
        let t = if p.kind == ProjectionKind::Rademacher {
            let h =
                draws_by_tensor_ops(stream, &Tensor::arange_start(e0, e1, (Kind::Int64, device)));
            // Negative as int64: the top bit set.
            (h.lt(0).to_kind(work) * (-2.0 * scale)) + scale
        } else {
            let q0 = e0 / 2;
            let h = draws_by_tensor_ops(
                stream,
                &Tensor::arange_start(q0, (e1 + 1) / 2, (Kind::Int64, device)),
            );
            let hi = h
                .bitwise_right_shift_tensor_scalar(32)
                .bitwise_and(0xffff_ffffi64);
            let lo = h.bitwise_and(0xffff_ffffi64);
            let u1 = (hi.to_kind(work) + 0.5) * TWO_POW_M32;
            let u2 = lo.to_kind(work) * TWO_POW_M32;
            let r = (u1.log() * -2.0).sqrt();
            let theta = u2 * std::f64::consts::TAU;
            let pairs = Tensor::stack(&[&r * theta.cos(), r * theta.sin()], 1).view([-1]);
            pairs.narrow(0, e0 - 2 * q0, e1 - e0) * scale
        };
        parts.push(t.view([r1 - r0, p.dim]));
        r0 = r1;
    }
    if parts.is_empty() {
        return Tensor::zeros([0, p.dim], (work, device));
    }
    Tensor::cat(&parts, 0)
}

/// The nonzeros of one (len × dim) block of a sparse JL projection: row r's column in column
/// block b at `cols[r·s + b]` and whether its value is +1/√s (else −1/√s), s = min(dim,
/// [`SPARSE_NONZEROS`]).
pub(crate) struct SparseRows {
    cols: Vec<u32>,
    positive: Vec<bool>,
    s: usize,
}

impl SparseRows {
    /// Draw (row, b) of a counter-based SplitMix64 stream keyed by (seed, key) gives the row's
    /// column in block b (columns [b·k/s, (b+1)·k/s)) and its sign: the same in every process,
    /// drawn in parallel without rejection: 0.06 s per 2.1 M rows on 2 cores, against 0.35 s for
    /// ChaCha with rejection of repeated columns (which the block construction makes needless).
    pub(crate) fn draw(p: &Projection, key: &str, len: i64) -> SparseRows {
        use rayon::prelude::*;
        let s = p.nonzeros() as usize;
        let stream = sparse_stream(p, key);
        let edge = |b: usize| (b as u64 * p.dim as u64 / s as u64) as u32;
        let total = len.max(0) as usize * s;
        let mut cols = vec![0u32; total];
        let mut positive = vec![false; total];
        cols.par_chunks_mut(s)
            .zip(positive.par_chunks_mut(s))
            .enumerate()
            .for_each(|(r, (cs, ps))| {
                for b in 0..s {
                    let h = crate::seed::draw(stream, (r * s + b) as u64);
                    let width = u64::from(edge(b + 1) - edge(b));
                    // The high 32 bits times the width: bias below 2⁻³²·width.
                    cs[b] = edge(b) + (((h >> 32) * width) >> 32) as u32;
                    ps[b] = h & 1 == 1;
                }
            });
        SparseRows { cols, positive, s }
    }

    /// The magnitude 1/√s of every nonzero.
    fn value(&self) -> f64 {
        1.0 / (self.s as f64).sqrt()
    }

    /// Bytes held.
    fn bytes(&self) -> u64 {
        (self.cols.len() * 5) as u64
    }

    /// The columns (len × s, int64) and values ±1/√s (len × s, in `kind`), on `device`: the
    /// tests' view of a block as index_add takes it.
    #[cfg(test)]
    pub(crate) fn tensors(&self, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let (s, value) = (self.s as i64, self.value());
        let cols: Vec<i64> = self.cols.iter().map(|&c| i64::from(c)).collect();
        let signs = Tensor::from_slice(&self.positive)
            .to_device(device)
            .to_kind(kind)
            * (2.0 * value)
            - value;
        (
            Tensor::from_slice(&cols).view([-1, s]).to_device(device),
            signs.view([-1, s]),
        )
    }

    /// `j` (n × len, on the CPU) times this block's matrix (len × dim): (n × dim) in `j`'s
    /// precision, by hand, each sample's row in one pass summed in float64 (libtorch's index_add
    /// runs the scatters serially: on SmolLM2's every Linear layer it took half the capture).
    /// Other devices keep their blocks as [`Block::SparseOnDevice`] and use index_add.
    fn project(&self, j: &Tensor, dim: i64) -> Result<Tensor> {
        let (n, _) = j.size2()?;
        // Jᵀ (len × n): a row's n values side by side, in the gradients' precision (a float64
        // copy of the transpose took two thirds of the time).
        let jt = j.tr().contiguous();
        let out = match j.kind() {
            Kind::Double => self.project_rows(&Vec::<f64>::try_from(&jt.view([-1]))?, n, dim),
            _ => {
                let jt = jt.to_kind(Kind::Float).view([-1]);
                self.project_rows(&Vec::<f32>::try_from(&jt)?, n, dim)
            }
        };
        Ok(Tensor::from_slice(&out)
            .view([dim, n])
            .tr()
            .to_kind(j.kind())
            .contiguous())
    }

    /// The kernel of [`SparseRows::project`]: `jt` (len × n, row-major) to (dim × n), summed in
    /// float64. Tasks of ROWS rows sum into their own (dim × n), added up in order after, so the
    /// result does not depend on the threads.
    fn project_rows<T: Copy + Into<f64> + Send + Sync>(
        &self,
        jt: &[T],
        n: i64,
        dim: i64,
    ) -> Vec<f64> {
        use rayon::prelude::*;
        const ROWS: usize = 8192;
        let (s, n, dim) = (self.s, (n as usize).max(1), dim as usize);
        let value = self.value();
        let partials: Vec<Vec<f64>> = jt
            .par_chunks(ROWS * n)
            .enumerate()
            .map(|(task, xs)| {
                let mut acc = vec![0.0f64; n * dim];
                for (k, x) in xs.chunks(n).enumerate() {
                    let at = (task * ROWS + k) * s;
                    let nonzeros = self.cols[at..at + s].iter().zip(&self.positive[at..at + s]);
                    for (&c, &plus) in nonzeros {
                        // Branch-free: the signs are coin flips.
                        let sign = f64::from(u8::from(plus)) * (2.0 * value) - value;
                        // (dim × n): the n sums of a column share a cache line.
                        let to = &mut acc[c as usize * n..(c as usize + 1) * n];
                        to.iter_mut()
                            .zip(x)
                            .for_each(|(a, &xi)| *a += xi.into() * sign);
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0.0f64; n * dim];
        for part in &partials {
            out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
        }
        out
    }
}

/// The product of `j` (n × len) with a sparse block in libtorch ops, on `j`'s device: out[:,
/// c_rb] += σ_rb · J[:, r] for each of the s nonzeros of row r (`cols`, `values`: len × s).
fn sparse_by_index_add(j: &Tensor, cols: &Tensor, values: &Tensor, dim: i64) -> Tensor {
    let mut out = Tensor::zeros([j.size()[0], dim], (j.kind(), j.device()));
    for b in 0..cols.size()[1] {
        let _ = out.index_add_(1, &cols.select(1, b), &(j * values.select(1, b)));
    }
    out
}

/// [`SparseRows::draw`] in libtorch ops on `device`: the same columns (int64) and values ±1/√s
/// (in `kind`) from the same draws, as (len × s) tensors.
fn sparse_by_tensor_ops(
    p: &Projection,
    key: &str,
    len: i64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let s = p.nonzeros();
    let stream = sparse_stream(p, key);
    let i = Tensor::arange(len.max(0) * s, (Kind::Int64, device));
    let h = draws_by_tensor_ops(stream, &i);
    let b = i.remainder(s);
    let lo = (&b * p.dim).floor_divide_scalar(s);
    let width = ((b + 1) * p.dim).floor_divide_scalar(s) - &lo;
    // The high 32 bits times the width, shifted down: below 2⁶³ while the width is below 2³¹.
    let hi = h
        .bitwise_right_shift_tensor_scalar(32)
        .bitwise_and(0xffff_ffffi64);
    let cols = lo + (hi * width).bitwise_right_shift_tensor_scalar(32);
    let value = 1.0 / (s as f64).sqrt();
    let values = h.bitwise_and(1).to_kind(kind) * (2.0 * value) - value;
    (cols.view([-1, s]), values.view([-1, s]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sparse projection is the product with its matrix: s distinct nonzeros ±1/√s per row,
    /// blocks of rows drawn apart, every probe projected on its own.
    #[test]
    fn sparse_projection_is_the_product_with_its_matrix() {
        let p = Projection {
            kind: ProjectionKind::Sparse,
            dim: 40,
            seed: 5,
        };
        let len = PROJ_BLOCK + 300;
        let (first, second) = (
            SparseRows::draw(&p, "w#0", PROJ_BLOCK).tensors(Device::Cpu, Kind::Double),
            SparseRows::draw(&p, "w#1", 300).tensors(Device::Cpu, Kind::Double),
        );
        let dense = |(c, v): &(Tensor, Tensor), rows: i64| {
            Tensor::zeros([rows, p.dim], (Kind::Double, Device::Cpu)).scatter(1, c, v)
        };
        let r = Tensor::cat(&[dense(&first, PROJ_BLOCK), dense(&second, 300)], 0);
        assert_eq!(r.size(), [len, p.dim]);
        let nonzero = r.ne(0.0).sum_dim_intlist(1, false, Kind::Int64);
        assert_eq!(nonzero.min().int64_value(&[]), SPARSE_NONZEROS);
        assert_eq!(nonzero.max().int64_value(&[]), SPARSE_NONZEROS);
        // One nonzero in each block of 5 columns, every column of a block taken by some row.
        let w = p.dim / SPARSE_NONZEROS;
        for b in 0..SPARSE_NONZEROS {
            let block = r.narrow(1, b * w, w).ne(0.0);
            let per_row = block.sum_dim_intlist(1, false, Kind::Int64);
            assert_eq!(per_row.min().int64_value(&[]), 1, "block {b}");
            assert_eq!(per_row.max().int64_value(&[]), 1, "block {b}");
            let per_col = block.sum_dim_intlist(0, false, Kind::Int64);
            assert!(
                per_col.min().int64_value(&[]) > 0,
                "block {b}: an unused column"
            );
        }
        // Signs are balanced: about half of the 8·65,836 nonzeros are positive.
        let positive = r.gt(0.0).sum(Kind::Int64).int64_value(&[]) as f64;
        let share = positive / (SPARSE_NONZEROS * len) as f64;
        assert!((share - 0.5).abs() < 0.005, "share of + signs {share}");
        let row_norms = r.square().sum_dim_intlist(1, false, Kind::Double);
        assert!((row_norms - 1.0).abs().max().double_value(&[]) < 1e-12);
        tch::manual_seed(3);
        let j = Tensor::randn([3, 2 * len], (Kind::Double, Device::Cpu));
        let got = project(&j, "w", &p, 2).unwrap();
        let want = Tensor::cat(
            &[j.narrow(1, 0, len).mm(&r), j.narrow(1, len, len).mm(&r)],
            1,
        );
        assert!((got - &want).abs().max().double_value(&[]) < 1e-12);
        // The other devices' path, run here on the CPU.
        let rows = SparseRows::draw(&p, "w#1", 300);
        let jb = j.narrow(1, PROJ_BLOCK, 300);
        let by_hand = rows.project(&jb, p.dim).unwrap();
        let (cols, values) = rows.tensors(Device::Cpu, Kind::Double);
        let by_torch = sparse_by_index_add(&jb, &cols, &values, p.dim);
        let want = jb.mm(&dense(&second, 300));
        assert!((by_hand - &want).abs().max().double_value(&[]) < 1e-12);
        assert!((by_torch - &want).abs().max().double_value(&[]) < 1e-12);
    }

    /// The CPU draw and the libtorch-ops draw (the other devices' path, run here on the CPU)
    /// give the same dense blocks: odd widths whose Box–Muller pairs straddle rows, chunks of
    /// either path, both precisions.
    #[test]
    fn dense_draws_agree_between_the_cpu_and_the_device_paths() {
        for kind in [ProjectionKind::Gaussian, ProjectionKind::Rademacher] {
            let p = Projection {
                kind,
                dim: 37,
                seed: 11,
            };
            // 4,001 × 37 entries: three chunks of the CPU path, 2,001 of the libtorch one.
            let len = 4001;
            for (work, tol) in [(Kind::Double, 1e-12), (Kind::Float, 2e-6)] {
                let cpu = dense_cpu(&p, "w#0", len, work);
                let ops = dense_by_tensor_ops(&p, "w#0", len, work, Device::Cpu, 80);
                assert_eq!(cpu.size(), [len, 37]);
                assert_eq!(cpu.kind(), work);
                assert_eq!(ops.kind(), work);
                let diff = (&cpu - &ops).abs().max().double_value(&[]);
                assert!(diff < tol, "{kind:?} {work:?}: paths differ by {diff}");
            }
        }
    }

    /// SplitMix64 written out here from its definition: output n of the generator seeded with
    /// `seed` is mix(seed + n·γ); draw i of a stream σ is mix(σ + i·γ).
    fn splitmix(stream: u64, i: u64) -> u64 {
        let mut z = stream.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Entry (r, c) of a dense block of width k from the formula, in float64: entry e = r·k + c
    /// is the cosine (e even) or sine (e odd) of the Box–Muller pair of draw ⌊e/2⌋ of the stream
    /// hashed from "{key}/gaussian", u₁ = (high 32 bits + ½)/2³², u₂ = low 32 bits/2³², over √k;
    /// for a Rademacher block, −1/√k where draw e of "{key}/rademacher" has its top bit set.
    fn entry_by_formula(p: &Projection, key: &str, r: i64, c: i64) -> f64 {
        let e = (r * p.dim + c) as u64;
        let scale = 1.0 / (p.dim as f64).sqrt();
        if p.kind == ProjectionKind::Rademacher {
            let stream = crate::seed::stable_hash(p.seed, format!("{key}/rademacher").as_bytes());
            return if splitmix(stream, e) >> 63 == 1 {
                -scale
            } else {
                scale
            };
        }
        let stream = crate::seed::stable_hash(p.seed, format!("{key}/gaussian").as_bytes());
        let h = splitmix(stream, e / 2);
        let u1 = ((h >> 32) as f64 + 0.5) / 4_294_967_296.0;
        let u2 = (h & 0xffff_ffff) as f64 / 4_294_967_296.0;
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        scale * radius * if e % 2 == 0 { angle.cos() } else { angle.sin() }
    }

    /// Dense blocks, drawn on the CPU and by the other devices' libtorch ops (run here on the
    /// CPU), in both precisions, hold the entries the formula gives, computed here on its own:
    /// the first pair, a pair straddling two rows of an odd width, and the last entry.
    #[test]
    fn dense_entries_are_the_splitmix_box_muller_formula() {
        // SplitMix64 seeded with 0: its published first output.
        assert_eq!(splitmix(0, 1), 0xe220_a839_7b1d_cdaf);
        let len = 301;
        for kind in [ProjectionKind::Gaussian, ProjectionKind::Rademacher] {
            let p = Projection {
                kind,
                dim: 37,
                seed: 11,
            };
            for (work, tol) in [(Kind::Double, 1e-13), (Kind::Float, 1e-6)] {
                let cpu = dense_block(&p, "w#3", len, work, Device::Cpu);
                let ops = dense_by_tensor_ops(&p, "w#3", len, work, Device::Cpu, 80);
                for (r, c) in [(0, 0), (0, 1), (0, 36), (1, 0), (150, 17), (len - 1, 36)] {
                    let want = entry_by_formula(&p, "w#3", r, c);
                    for (path, t) in [("cpu", &cpu), ("ops", &ops)] {
                        let got = t.double_value(&[r, c]);
                        assert!(
                            (got - want).abs() < tol,
                            "{kind:?} {work:?} {path} ({r}, {c}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    /// Dense entries have the law they should: Gaussian N(0, 1/k) (mean, variance, kurtosis 3,
    /// the two halves of a Box–Muller pair uncorrelated) and Rademacher ±1/√k with even signs;
    /// one key gives one block, another key another.
    #[test]
    fn dense_entries_are_gaussian_or_rademacher_of_variance_one_over_k() {
        let p = Projection {
            kind: ProjectionKind::Gaussian,
            dim: 64,
            seed: 2,
        };
        let r = dense_block(&p, "w#0", 8192, Kind::Double, Device::Cpu) * 8.0;
        let n = r.numel() as f64;
        let mean = r.mean(Kind::Double).double_value(&[]);
        let var = r.square().mean(Kind::Double).double_value(&[]);
        let kurt = r.pow_tensor_scalar(4).mean(Kind::Double).double_value(&[]) / (var * var);
        assert!(mean.abs() < 4.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
        let pairs = r.view([-1, 2]);
        let corr = (pairs.select(1, 0) * pairs.select(1, 1))
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(corr.abs() < 0.01, "pair correlation {corr}");
        let again = dense_block(&p, "w#0", 8192, Kind::Double, Device::Cpu) * 8.0;
        assert!(r.equal(&again));
        let other = dense_block(&p, "w#1", 8192, Kind::Double, Device::Cpu) * 8.0;
        let same = (&r - &other)
            .abs()
            .lt(1e-12)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(same < 1e-3, "two keys share {same} of their entries");
        let rad = Projection {
            kind: ProjectionKind::Rademacher,
            ..p
        };
        let s = dense_block(&rad, "w#0", 8192, Kind::Float, Device::Cpu) * 8.0;
        assert!((s.abs() - 1.0).abs().max().double_value(&[]) < 1e-6);
        let plus = s
            .gt(0.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!((plus - 0.5).abs() < 0.005, "share of + signs {plus}");
    }

    /// Blocks that fit the room are drawn once and kept; the rest are drawn at each use.
    #[test]
    fn projection_blocks_are_kept_while_they_fit() {
        let p = Projection {
            kind: ProjectionKind::Gaussian,
            dim: 8,
            seed: 4,
        };
        // Room for one block of 100 rows in float32 (3,200 bytes), not two.
        let mut cache = ProjectionCache::new(5000);
        let a = cache.get(&p, "a#0", 100, Kind::Float, Device::Cpu);
        let b = cache.get(&p, "b#0", 100, Kind::Float, Device::Cpu);
        assert_eq!(cache.room, 1800);
        assert_eq!(cache.blocks.keys().collect::<Vec<_>>(), ["a#0"]);
        let (Block::Dense(a), Block::Dense(b)) = (a, b) else {
            panic!("a Gaussian block is dense")
        };
        let Block::Dense(kept) = cache.get(&p, "a#0", 100, Kind::Float, Device::Cpu) else {
            panic!("a Gaussian block is dense")
        };
        // The kept block is the same storage, not a new draw.
        assert_eq!(kept.data_ptr(), a.data_ptr());
        let Block::Dense(b2) = cache.get(&p, "b#0", 100, Kind::Float, Device::Cpu) else {
            panic!("a Gaussian block is dense")
        };
        assert_ne!(b2.data_ptr(), b.data_ptr());
        assert!(b2.equal(&b));
    }

    /// The bytes of a kept row that the memory estimate counts are those the cache holds: a
    /// sparse block on the CPU, a sparse block as other devices draw it (run here on the CPU)
    /// and dense blocks in both precisions.
    #[test]
    fn kept_rows_are_counted_as_the_cache_holds_them() {
        let sparse = Projection {
            kind: ProjectionKind::Sparse,
            dim: 40,
            seed: 1,
        };
        let rows = SparseRows::draw(&sparse, "w#0", 777);
        assert_eq!(
            Block::Sparse(Arc::new(rows)).bytes(),
            777 * kept_row_bytes(&sparse, 4, Device::Cpu)
        );
        assert_eq!(kept_row_bytes(&sparse, 4, Device::Cpu), 5 * 8);
        let cuda = Device::Cuda(0);
        assert_eq!(
            sparse_block_bytes_on_device(&sparse, "w#0", 777),
            777 * kept_row_bytes(&sparse, 4, cuda)
        );
        assert_eq!(kept_row_bytes(&sparse, 4, cuda), 12 * 8);
        for (kind, value) in [(Kind::Float, 4), (Kind::Double, 8)] {
            let p = Projection {
                kind: ProjectionKind::Gaussian,
                ..sparse
            };
            let mut cache = ProjectionCache::new(1 << 30);
            let block = cache.get(&p, "w#0", 777, kind, Device::Cpu);
            assert_eq!(block.bytes(), 777 * kept_row_bytes(&p, value, Device::Cpu));
            assert_eq!(cache.room, (1 << 30) - block.bytes());
        }
    }

    /// Several sets of rows projected together (each block drawn once for all) give what each
    /// set gives alone, for every kind and with several probes.
    #[test]
    fn row_sets_projected_together_equal_each_projected_alone() {
        tch::manual_seed(9);
        let js = [
            Tensor::randn([2, 2 * (PROJ_BLOCK + 7)], (Kind::Double, Device::Cpu)),
            Tensor::randn([3, 2 * (PROJ_BLOCK + 7)], (Kind::Double, Device::Cpu)),
        ];
        for kind in [ProjectionKind::Sparse, ProjectionKind::Gaussian] {
            let p = Projection {
                kind,
                dim: 16,
                seed: 3,
            };
            let mut cache = ProjectionCache::new(1 << 30);
            let together = project_cached(&js, "w", &p, 2, &mut cache).unwrap();
            for (j, t) in js.iter().zip(&together) {
                let alone = project(j, "w", &p, 2).unwrap();
                assert_eq!(t.size(), [j.size()[0], 32]);
                assert!(
                    (t - alone).abs().max().double_value(&[]) < 1e-12,
                    "{kind:?}"
                );
            }
        }
    }

    /// The sparse draw in libtorch ops (the other devices' path, run here on the CPU) gives the
    /// CPU draw's columns and signs exactly, for uneven column blocks and for k below s.
    #[test]
    fn sparse_draws_agree_between_the_cpu_and_the_device_paths() {
        for dim in [40, 37, 1000, 5] {
            let p = Projection {
                kind: ProjectionKind::Sparse,
                dim,
                seed: 7,
            };
            let (cols, values) =
                SparseRows::draw(&p, "w#2", 3001).tensors(Device::Cpu, Kind::Float);
            let (c, v) = sparse_by_tensor_ops(&p, "w#2", 3001, Kind::Float, Device::Cpu);
            assert_eq!(c.size(), [3001, SPARSE_NONZEROS.min(dim)]);
            assert!(c.equal(&cols), "k = {dim}: columns differ");
            assert!(v.equal(&values), "k = {dim}: signs differ");
        }
    }
}
