//! GC over training (`tailscope ntk --trajectory`): the NTK of the same samples at every kept
//! checkpoint of a training run, as the paper tracks kernels during training.
//!
//! Each checkpoint gets its own NTK folder (`step-NNNNNN/`, what `tailscope ntk` writes), then
//! - `trajectory.parquet`: step, column, group, n, gc, gc_low, gc_high, mean_freq_score — every
//!   row of every checkpoint's `gc.parquet` (frequency bins, domains, long-tail flag, experts,
//!   clusters);
//! - `drift.parquet`: step, drift = ‖Θ_t − Θ_T‖_F / ‖Θ_T‖_F of the (unnormalised) total kernel
//!   against the last checkpoint T, drift_cosine (the same of the cosine-normalised kernels, which
//!   ignores gradient norms), and the principal direction's participation ratio, top share and
//!   sign margin Σu / Σ|u| (near 0: the signs of that checkpoint's GCs are a near-tie).
//!
//! The parameter selection is resolved at each checkpoint, so a CSE run's kernel after its
//! initialisation covers its experts' parameters; Θ stays n × n, and the drift compares kernels
//! of the same samples. A checkpoint folder whose `manifest.json` matches (the checkpoint's
//! weights, the samples and every capture and kernel setting) is reused, so an interrupted
//! trajectory resumes; one written under other settings is refused unless `fresh`.

use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use tch::{Device, Kind, Tensor};

use super::pipeline::{self, NtkOptions};
use crate::capture::job::{Job, JobSpec};
use crate::error::{Error, Result};
use crate::io::{column_f64, column_str, read_parquet};
use crate::manifest::Manifest;
use crate::progress::Progress;

/// One checkpoint of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Its training step.
    pub step: u64,
    /// Its folder (a model folder `tailscope ntk --model` reads).
    pub path: PathBuf,
}

/// The checkpoints kept under `run_dir/checkpoints/step-*`, by step. (`final/` holds the same
/// weights as the checkpoint at the last step, so it is not listed.)
pub fn checkpoints_of(run_dir: &Path) -> Result<Vec<Checkpoint>> {
    let dir = run_dir.join("checkpoints");
    let entries = std::fs::read_dir(&dir).map_err(|_| {
        Error::in_file(
            run_dir,
            "is not a training run folder (no checkpoints/ in it); --trajectory reads the \
             checkpoints of a `tailscope train` run, e.g. out/demo/train/cse",
        )
    })?;
    let mut found: Vec<Checkpoint> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("model.safetensors")
                .exists()
                .then(|| Checkpoint {
                    step,
                    path: e.path(),
                })
        })
        .collect();
    found.sort_by_key(|c| c.step);
    if found.len() < 2 {
        return Err(Error::in_file(
            &dir,
            format!(
                "holds {} checkpoint(s); a trajectory needs at least 2 (keep more with \
                 train.keep_last or train.keep_steps)",
                found.len()
            ),
        ));
    }
    Ok(found)
}

/// One checkpoint's kernel summary.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftRow {
    /// Training step.
    pub step: u64,
    /// ‖Θ_t − Θ_T‖_F / ‖Θ_T‖_F of the total kernel.
    pub drift: f64,
    /// The same for the cosine-normalised kernels.
    pub drift_cosine: f64,
    /// Participation ratio of the principal direction (from the checkpoint's `ntk.json`).
    pub participation: Option<f64>,
    /// Top eigenvalue share (from `ntk.json`).
    pub top_share: Option<f64>,
    /// Σ u / Σ |u| of the principal direction (from `ntk.json`): near 0, the sign of every GC
    /// at this checkpoint is a near-tie.
    pub sign_margin: Option<f64>,
}

/// One GC row of one checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TrajectoryRow {
    /// Training step.
    pub step: u64,
    /// The grouping column of `gc.parquet`.
    pub column: String,
    /// The group.
    pub group: String,
    /// Members.
    pub n: u64,
    /// GC (NaN when undefined).
    pub gc: f64,
    /// The interval (NaN when none).
    pub gc_low: f64,
    /// The interval (NaN when none).
    pub gc_high: f64,
    /// Mean frequency score of the members.
    pub mean_freq_score: f64,
}

/// A computed trajectory.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// GC per group and checkpoint.
    pub rows: Vec<TrajectoryRow>,
    /// Kernel drift per checkpoint.
    pub drift: Vec<DriftRow>,
    /// Checkpoints whose NTK folder was reused.
    pub reused: usize,
}

/// The folder of checkpoint `c` under `dir`.
pub fn step_dir(dir: &Path, c: &Checkpoint) -> PathBuf {
    dir.join(format!("step-{:06}", c.step))
}

/// What a checkpoint's NTK depends on (its folder's `manifest.json`).
fn manifest(job: &Job, spec: &JobSpec, opts: &NtkOptions) -> Result<Manifest> {
    let mut m = Manifest::new("ntk --trajectory");
    let weights = job.model.capture_parameters(&job.vs)?;
    let mut rest = spec.clone();
    rest.model = PathBuf::new();
    // The memory budget decides batches, not results (and follows the free memory).
    rest.options.memory = None;
    let mut kernel = opts.clone();
    kernel.fresh = false;
    let idx: Vec<u32> = job.idx.iter().map(|&i| i as u32).collect();
    m.set(
        "model.weights",
        crate::manifest::fingerprint_tensors(&weights),
    )
    .set("samples", crate::manifest::fingerprint_ids(&[&idx]))
    .set("job", format!("{rest:?}"))
    .set("kernel", format!("{kernel:?}"))
    .set("capture.draws", crate::capture::DRAWS);
    Ok(m)
}

/// The NTK of `spec`'s samples at each of `checkpoints` (in step order; the last is T) into
/// `dir/step-NNNNNN/`, then the trajectory and drift tables into `dir`.
pub fn compute_into(
    spec: &JobSpec,
    checkpoints: &[Checkpoint],
    opts: &NtkOptions,
    device: Device,
    dir: &Path,
    progress: &dyn Progress,
    mut each: impl FnMut(&Checkpoint, bool),
) -> Result<Trajectory> {
    if opts.diagonal || opts.tile.is_some() {
        return Err(Error::invalid(
            "--trajectory",
            "needs whole kernels in memory: drop --diagonal and --tile",
        ));
    }
    let _lock = crate::lock::OutputLock::acquire(dir, "tailscope ntk --trajectory")?;
    let mut reused = 0;
    let mut samples: Option<Vec<usize>> = None;
    for c in checkpoints {
        let mut s = spec.clone();
        s.model = c.path.clone();
        let job = Job::prepare(&s, device)?;
        match &samples {
            Some(idx) if *idx != job.idx => {
                return Err(Error::in_file(
                    &c.path,
                    "draws other samples than the first checkpoint (another tokenizer?); a \
                     trajectory compares kernels of the same samples",
                ))
            }
            None => samples = Some(job.idx.clone()),
            _ => {}
        }
        let out = step_dir(dir, c);
        let m = manifest(&job, &s, opts)?;
        if opts.fresh {
            crate::manifest::clear(&out, &["kernel.safetensors", "gc.parquet"])?;
        }
        let done = out.join("gc.parquet").exists() && out.join("kernel.safetensors").exists();
        m.check_resume(
            &out,
            done,
            "to recompute it, pass --fresh (or remove the folder)",
        )?;
        if !done {
            let mut o = pipeline::compute(&job, opts, device, Some(&out), progress)?;
            o.write(&out)?;
        } else {
            reused += 1;
        }
        each(c, done);
    }
    let t = collect(dir, checkpoints, reused)?;
    write(&t, dir)?;
    Ok(t)
}

/// The trajectory of NTK folders already computed under `dir` (one per checkpoint).
pub fn collect(dir: &Path, checkpoints: &[Checkpoint], reused: usize) -> Result<Trajectory> {
    let last = checkpoints
        .last()
        .ok_or_else(|| Error::invalid("--trajectory", "no checkpoints"))?;
    let total = |c: &Checkpoint| -> Result<Tensor> {
        let path = step_dir(dir, c).join("kernel.safetensors");
        let mut k = crate::io::read_tensors(&path)?;
        k.remove("total")
            .map(|t| t.to_kind(Kind::Double))
            .ok_or_else(|| Error::in_file(&path, "has no `total` kernel"))
    };
    let cosine = |k: &Tensor| -> Tensor {
        let d = k.diagonal(0, 0, 1).clamp_min(1e-300).sqrt();
        k / d.outer(&d)
    };
    let k_t = total(last)?;
    let c_t = cosine(&k_t);
    let (n_t, nc_t) = (k_t.norm().double_value(&[]), c_t.norm().double_value(&[]));
    let mut rows = Vec::new();
    let mut drift = Vec::new();
    for c in checkpoints {
        let sd = step_dir(dir, c);
        let k = total(c)?;
        if k.size() != k_t.size() {
            return Err(Error::in_file(
                sd.join("kernel.safetensors"),
                format!(
                    "is {:?}, the last checkpoint's is {:?}",
                    k.size(),
                    k_t.size()
                ),
            ));
        }
        let (participation, top_share, sign_margin) = principal_stats(&sd.join("ntk.json"))?;
        drift.push(DriftRow {
            step: c.step,
            drift: (&k - &k_t).norm().double_value(&[]) / n_t.max(1e-300),
            drift_cosine: (cosine(&k) - &c_t).norm().double_value(&[]) / nc_t.max(1e-300),
            participation,
            top_share,
            sign_margin,
        });
        let path = sd.join("gc.parquet");
        let df = read_parquet(&path)?;
        let columns = column_str(&df, "column", &path)?;
        let groups = column_str(&df, "group", &path)?;
        let n = column_f64(&df, "n", &path)?;
        let gc = column_f64(&df, "gc", &path)?;
        let lo = column_f64(&df, "gc_low", &path)?;
        let hi = column_f64(&df, "gc_high", &path)?;
        let f = column_f64(&df, "mean_freq_score", &path)?;
        for i in 0..df.height() {
            rows.push(TrajectoryRow {
                step: c.step,
                column: columns[i].clone(),
                group: groups[i].clone(),
                n: n[i] as u64,
                gc: gc[i],
                gc_low: lo[i],
                gc_high: hi[i],
                mean_freq_score: f[i],
            });
        }
    }
    Ok(Trajectory {
        rows,
        drift,
        reused,
    })
}

/// Participation ratio, top share and sign margin of the principal direction, from `ntk.json`.
fn principal_stats(path: &Path) -> Result<(Option<f64>, Option<f64>, Option<f64>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::at_line(path, e.line(), e.to_string()))?;
    let d = &v["diagnostics"];
    Ok((
        d["participation"].as_f64(),
        d["top_share"].as_f64(),
        d["sign_margin"].as_f64(),
    ))
}

impl Trajectory {
    /// `trajectory.parquet`'s frame.
    pub fn frame(&self) -> Result<DataFrame> {
        let r = &self.rows;
        DataFrame::new(
            r.len(),
            vec![
                Column::new("step".into(), r.iter().map(|x| x.step).collect::<Vec<_>>()),
                Column::new(
                    "column".into(),
                    r.iter().map(|x| x.column.as_str()).collect::<Vec<_>>(),
                ),
                Column::new(
                    "group".into(),
                    r.iter().map(|x| x.group.as_str()).collect::<Vec<_>>(),
                ),
                Column::new("n".into(), r.iter().map(|x| x.n).collect::<Vec<_>>()),
                Column::new("gc".into(), r.iter().map(|x| x.gc).collect::<Vec<_>>()),
                Column::new(
                    "gc_low".into(),
                    r.iter().map(|x| x.gc_low).collect::<Vec<_>>(),
                ),
                Column::new(
                    "gc_high".into(),
                    r.iter().map(|x| x.gc_high).collect::<Vec<_>>(),
                ),
                Column::new(
                    "mean_freq_score".into(),
                    r.iter().map(|x| x.mean_freq_score).collect::<Vec<_>>(),
                ),
            ],
        )
        .map_err(|e| Error::table("trajectory", e))
    }

    /// `drift.parquet`'s frame.
    pub fn drift_frame(&self) -> Result<DataFrame> {
        let d = &self.drift;
        DataFrame::new(
            d.len(),
            vec![
                Column::new("step".into(), d.iter().map(|x| x.step).collect::<Vec<_>>()),
                Column::new(
                    "drift".into(),
                    d.iter().map(|x| x.drift).collect::<Vec<_>>(),
                ),
                Column::new(
                    "drift_cosine".into(),
                    d.iter().map(|x| x.drift_cosine).collect::<Vec<_>>(),
                ),
                Column::new(
                    "participation".into(),
                    d.iter().map(|x| x.participation).collect::<Vec<_>>(),
                ),
                Column::new(
                    "top_share".into(),
                    d.iter().map(|x| x.top_share).collect::<Vec<_>>(),
                ),
                Column::new(
                    "sign_margin".into(),
                    d.iter().map(|x| x.sign_margin).collect::<Vec<_>>(),
                ),
            ],
        )
        .map_err(|e| Error::table("drift", e))
    }

    /// GC of each group of `column` over the steps: (group, [(step, gc)]), groups in first-seen
    /// order, undefined GCs left out.
    pub fn series(&self, column: &str) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in self.rows.iter().filter(|r| r.column == column) {
            if !r.gc.is_finite() {
                continue;
            }
            let p = (r.step as f64, r.gc);
            match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, pts)) => pts.push(p),
                None => out.push((r.group.clone(), vec![p])),
            }
        }
        out
    }
}

/// Write `trajectory.parquet` and `drift.parquet` into `dir`.
pub fn write(t: &Trajectory, dir: &Path) -> Result<()> {
    crate::io::write_parquet(&mut t.frame()?, dir.join("trajectory.parquet"))?;
    crate::io::write_parquet(&mut t.drift_frame()?, dir.join("drift.parquet"))
}
