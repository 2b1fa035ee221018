//! `tailscope capture` and `tailscope ntk`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use polars::prelude::{Column, DataFrame};
use tch::Tensor;

use super::{progress, Global};
use crate::capture::{
    self, CaptureOptions, Method, OutputKind, Projection, ProjectionKind, Selection,
};
use crate::corpus::{tokenizer, Corpus, Split};
use crate::error::Error;
use crate::freq::{self, domain_shares, FreqOptions, ShareBy};
use crate::model::checkpoint::{self, write_tensors};
use crate::ntk::{self, gc, BlockBy};

/// Which samples and which gradients; shared by `capture` and `ntk`.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// A model folder (config.json + model.safetensors).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub model: PathBuf,
    /// The corpus table.
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// Split the samples come from.
    #[arg(long, default_value = "validation", value_name = "SPLIT", value_parser = ["train", "validation", "all"], help_heading = "Samples")]
    pub split: String,
    /// Number of samples (evenly spaced over the split).
    #[arg(
        long,
        default_value_t = 512,
        value_name = "N",
        help_heading = "Samples"
    )]
    pub samples: usize,
    /// The scalar output per sample.
    #[arg(
        long,
        value_enum,
        default_value_t = OutputKind::MeanLoss,
        value_name = "OUTPUT",
        help_heading = "Gradients",
        long_help = "The scalar f(x) whose per-sample gradient is taken: mean-loss (the sample's mean \
            token loss, default), sum-loglik (its summed log-likelihood), logit-trace (the trace over \
            output logits, a Hutchinson estimate with --probes random output directions)."
    )]
    pub output: OutputKind,
    /// Random output directions of the logit-trace estimate.
    #[arg(
        long,
        default_value_t = 8,
        value_name = "K",
        help_heading = "Gradients"
    )]
    pub probes: usize,
    /// How per-sample gradients are computed.
    #[arg(
        long,
        value_enum,
        default_value_t = Method::Batched,
        value_name = "METHOD",
        help_heading = "Gradients",
        long_help = "exact: one backward pass per sample (the oracle, slow); batched: per-layer \
            per-sample gradients from one batched backward (default); ghost: Linear weight kernels \
            from Gram matrices without per-sample gradients; auto: ghost where cheaper. All give \
            the same kernel (tested to 1e-6 in float64)."
    )]
    pub method: Method,
    /// Parameter name globs (repeatable; default: all trainable parameters).
    #[arg(
        long = "params",
        value_name = "GLOB",
        help_heading = "Gradients",
        long_help = "Parameter name globs (`*`, `?`), repeatable, combined with --layers and --expert by OR. Names are the safetensors names, e.g. 'h.3.mlp.*' or '*.c_fc.weight'."
    )]
    pub params: Vec<String>,
    /// Block range A..B (inclusive): every parameter of blocks A to B.
    #[arg(long, value_name = "A..B", help_heading = "Gradients")]
    pub layers: Option<String>,
    /// One expert's parameters: BLOCK:EXPERT.
    #[arg(long, value_name = "L:E", help_heading = "Gradients")]
    pub expert: Option<String>,
    /// Project per-sample gradients to K dimensions.
    #[arg(
        long,
        value_name = "K",
        help_heading = "Gradients",
        long_help = "Project every parameter's per-sample gradients to K dimensions with a seeded random matrix (entries of variance 1/K, identical across processes for one --seed), trading exactness for memory. Not with --method ghost."
    )]
    pub project: Option<i64>,
    /// Distribution of the projection.
    #[arg(long, value_enum, default_value_t = ProjectionKind::Gaussian, value_name = "KIND", help_heading = "Gradients")]
    pub projection: ProjectionKind,
    /// Samples per forward/backward pass.
    #[arg(
        long,
        default_value_t = 16,
        value_name = "N",
        help_heading = "Gradients"
    )]
    pub batch: usize,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", help_heading = "Output")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope ntk --model out/demo/train/cse/final --corpus out/demo/corpus.parquet --samples 512 -o out/demo/ntk/cse")]
pub struct NtkArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// How the kernel is split into blocks.
    #[arg(long, value_enum, default_value_t = BlockBy::Module, value_name = "BY", help_heading = "Kernel")]
    pub blocks: BlockBy,
    /// Only the diagonal Θ_ii (every output becomes (n,)).
    #[arg(long, help_heading = "Kernel")]
    pub diagonal: bool,
    /// Also compute the cross-kernel Θ(X, Y) against N samples of this split.
    #[arg(long, value_name = "SPLIT", value_parser = ["train", "validation", "all"], help_heading = "Kernel")]
    pub cross_split: Option<String>,
    /// Samples of the cross set.
    #[arg(long, default_value_t = 256, value_name = "N", help_heading = "Kernel")]
    pub cross_samples: usize,
    /// Frequency bins (quantiles of the 1-gram frequency score) for GC per bin.
    #[arg(long, default_value_t = 5, value_name = "N", help_heading = "Kernel")]
    pub bins: usize,
    /// Half-samples for the 95% intervals of every GC in gc.parquet (0: none). Each
    /// resample recomputes the principal direction of the resampled kernel.
    #[arg(long, default_value_t = 200, value_name = "N", help_heading = "Kernel")]
    pub gc_resamples: usize,
    /// Also write batch.safetensors (ids, mask, targets of the samples, padded) for peer tools.
    #[arg(long, help_heading = "Output")]
    pub export_batch: bool,
    /// Stream to disk in tiles of N samples (resumable); see the long help.
    #[arg(
        long,
        value_name = "N",
        help_heading = "Kernel",
        long_help = "Compute the kernel out of memory: per-sample gradients are written in shards of N \
            samples (shards/), the kernel in N × N tiles (tiles/, indexed by tiles.parquet). Files that \
            exist are complete, so rerunning the same command after an interruption resumes where it \
            stopped. The tiles are assembled into kernel.safetensors (and GC computed) when the whole \
            kernel has at most --assemble-max samples. Not with --diagonal, --cross-split or ghost."
    )]
    pub tile: Option<usize>,
    /// Largest streamed kernel assembled in memory.
    #[arg(
        long,
        default_value_t = 16384,
        value_name = "N",
        help_heading = "Kernel"
    )]
    pub assemble_max: usize,
}

struct Prepared {
    corpus: Corpus,
    model: crate::model::Model,
    vs: tch::nn::VarStore,
    idx: Vec<usize>,
    ids: Vec<Vec<u32>>,
    all_ids: Option<Vec<Vec<u32>>>,
    params: Vec<(String, Tensor)>,
    opts: CaptureOptions,
}

fn pick(corpus: &Corpus, split: &str, n: usize) -> Vec<usize> {
    let all: Vec<usize> = (0..corpus.len())
        .filter(|&i| match split {
            "train" => corpus.samples[i].split == Split::Train,
            "validation" => corpus.samples[i].split == Split::Validation,
            _ => true,
        })
        .collect();
    if all.len() <= n {
        return all;
    }
    (0..n).map(|k| all[k * all.len() / n]).collect()
}

fn parse_range(s: &str) -> Result<(i64, i64), Error> {
    let bad = || Error::invalid("--layers", format!("expected A..B, got {s:?}"));
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

fn parse_expert(s: &str) -> Result<(i64, i64), Error> {
    let bad = || Error::invalid("--expert", format!("expected BLOCK:EXPERT, got {s:?}"));
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

fn prepare(a: &CaptureArgs, g: &Global) -> anyhow::Result<Prepared> {
    let device = crate::device::resolve(g.device)?;
    let (vs, model) = checkpoint::load_model(&a.model, device)?;
    let corpus = Corpus::read(&a.corpus)?;
    let tok = super::tokenizer_for(a.tokenizer.as_deref(), &a.model, &model, &a.corpus)?;
    let sel = Selection {
        globs: a.params.clone(),
        layers: a.layers.as_deref().map(parse_range).transpose()?,
        expert: a.expert.as_deref().map(parse_expert).transpose()?,
    };
    let params = sel.select_from(model.capture_parameters(&vs)?)?;
    if a.project.is_some() && a.method == Method::Ghost {
        return Err(Error::invalid(
            "--project",
            "ghost kernels form no per-sample gradients to project; use --method batched",
        )
        .into());
    }
    let idx = pick(&corpus, &a.split, a.samples);
    if idx.is_empty() {
        return Err(Error::in_file(&a.corpus, format!("no samples in split {:?}", a.split)).into());
    }
    let texts: Vec<&str> = corpus.samples.iter().map(|s| s.text.as_str()).collect();
    let all_ids = tokenizer::encode_all(&tok, &texts)?;
    let ids = idx.iter().map(|&i| all_ids[i].clone()).collect();
    let opts = CaptureOptions {
        output: a.output,
        method: a.method,
        projection: a.project.map(|dim| Projection {
            kind: a.projection,
            dim,
            seed: g.seed,
        }),
        batch: a.batch,
        probes: a.probes,
        seed: g.seed,
        ..CaptureOptions::default()
    };
    Ok(Prepared {
        corpus,
        model,
        vs,
        idx,
        ids,
        all_ids: Some(all_ids),
        params,
        opts,
    })
}

fn run_capture(
    p: &Prepared,
    seqs: &[Vec<u32>],
    msg: &str,
    device: tch::Device,
) -> anyhow::Result<capture::Captured> {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let pb = progress::bar(refs.len() as u64, msg);
    let c = capture::capture(&p.model, &p.params, &refs, &p.opts, device, &|d| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    Ok(c)
}

/// `tailscope capture`: per-sample gradients to `grads.safetensors` (one (n, P) tensor per
/// parameter, or (n, k) projected) and `samples.parquet`.
pub fn run_capture_cmd(a: &CaptureArgs, g: &Global) -> anyhow::Result<()> {
    if a.method == Method::Ghost || a.method == Method::Auto {
        return Err(Error::invalid(
            "--method",
            "capture writes per-sample gradients; use exact or batched",
        )
        .into());
    }
    let device = crate::device::resolve(g.device)?;
    let p = prepare(a, g)?;
    let t0 = Instant::now();
    let c = run_capture(&p, &p.ids, "capturing", device)?;
    let named: Vec<(String, Tensor)> = c
        .names
        .iter()
        .zip(&c.jac)
        .filter_map(|(n, j)| {
            j.as_ref()
                .map(|j| (n.clone(), j.to_device(tch::Device::Cpu)))
        })
        .collect();
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    write_tensors(&named, &a.out.join("grads.safetensors"))?;
    let mut df = samples_frame(&p, None, None, &[])?;
    crate::io::write_parquet(&mut df, a.out.join("samples.parquet"))?;
    let width: i64 = named.iter().map(|(_, t)| t.size()[1]).sum();
    println!(
        "captured {} samples × {} values ({} parameter tensors, output {:?}, method {:?}) in {:.1} s",
        c.n,
        width,
        named.len(),
        a.output,
        a.method,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "wrote {}/grads.safetensors and samples.parquet",
        a.out.display()
    );
    Ok(())
}

/// The per-sample table: index, id, domain, split, frequency score, and optional kernel columns.
fn samples_frame(
    p: &Prepared,
    self_k: Option<&[f64]>,
    align: Option<&[f64]>,
    extra: &[(String, Vec<i64>)],
) -> anyhow::Result<DataFrame> {
    let s: Vec<&crate::corpus::Sample> = p.idx.iter().map(|&i| &p.corpus.samples[i]).collect();
    let mut cols = vec![Column::new(
        "index".into(),
        (0..s.len() as u64).collect::<Vec<_>>(),
    )];
    cols.extend(crate::corpus::sample_columns(&s));
    if let Some(v) = self_k {
        cols.push(Column::new("self_kernel".into(), v.to_vec()));
    }
    if let Some(v) = align {
        cols.push(Column::new("alignment".into(), v.to_vec()));
    }
    for (name, v) in extra {
        cols.push(Column::new(name.as_str().into(), v.clone()));
    }
    Ok(DataFrame::new(s.len(), cols).map_err(|e| Error::table("samples", e))?)
}

/// `tailscope ntk`.
pub fn run_ntk(a: &NtkArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    let p = prepare(&a.capture, g)?;
    let out = &a.capture.out;
    let t0 = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (k, cx) = match a.tile {
        Some(tile) => {
            if a.diagonal || a.cross_split.is_some() {
                return Err(Error::invalid(
                    "--tile",
                    "streamed kernels are full square kernels; drop --diagonal and --cross-split",
                )
                .into());
            }
            let refs: Vec<&[u32]> = p.ids.iter().map(Vec::as_slice).collect();
            let pb = progress::bar(1, "streaming");
            let plan = ntk::stream::StreamPlan {
                dir: out,
                tile,
                blocks: a.blocks,
            };
            let rep = ntk::stream::stream_kernel(
                &p.model,
                &p.params,
                &refs,
                &p.opts,
                &plan,
                device,
                &|d, t| {
                    pb.set_length(t as u64);
                    pb.set_position(d as u64);
                },
            )?;
            pb.finish_and_clear();
            println!(
                "streamed: {} shards ({} reused), {} tiles ({} reused) under {}",
                rep.shards,
                rep.shards_reused,
                rep.tiles,
                rep.tiles_reused,
                out.display()
            );
            if refs.len() > a.assemble_max {
                let mut df = samples_frame(&p, None, None, &[])?;
                crate::io::write_parquet(&mut df, out.join("samples.parquet"))?;
                println!(
                    "{} samples exceed --assemble-max {}: the kernel stays in tiles/ (rows and columns as in tiles.parquet, samples in samples.parquet)",
                    refs.len(),
                    a.assemble_max
                );
                return Ok(());
            }
            let mut parts = ntk::stream::assemble(out, refs.len(), tile)?;
            let total = parts.remove(0).1;
            let blocks = parts
                .into_iter()
                .map(|(n, t)| (n.trim_start_matches("block.").to_string(), t))
                .collect();
            (
                ntk::Kernel {
                    total,
                    blocks,
                    diagonal: false,
                },
                None,
            )
        }
        None => {
            let cx = run_capture(&p, &p.ids, "capturing", device)?;
            (ntk::kernel(&cx, None, a.blocks, a.diagonal)?, Some(cx))
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let mut named = vec![("total".to_string(), k.total.shallow_clone())];
    named.extend(
        k.blocks
            .iter()
            .map(|(n, t)| (format!("block.{n}"), t.shallow_clone())),
    );
    write_tensors(&named, &out.join("kernel.safetensors"))?;
    let n = p.ids.len();
    let p_total: i64 = p.params.iter().map(|(_, t)| t.numel() as i64).sum();
    let summary = serde_json::json!({
        "samples": n, "parameters": p_total, "tensors": p.params.len(), "method": a.capture.method,
        "output": a.capture.output, "projection": p.opts.projection.map(|pr| pr.dim), "seconds": secs,
        "blocks": k.blocks.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>(),
    });
    crate::io::write_atomic(
        out.join("ntk.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    if a.export_batch {
        let refs: Vec<&[u32]> = p.ids.iter().map(Vec::as_slice).collect();
        let b = capture::capture_batch(&p.model, &refs, 0, g.seed, tch::Device::Cpu);
        let named = vec![
            ("ids".to_string(), b.ids),
            ("mask".to_string(), b.mask.to_kind(tch::Kind::Int64)),
            ("targets".to_string(), b.targets),
        ];
        write_tensors(&named, &out.join("batch.safetensors"))?;
    }
    println!(
        "NTK of {n} samples over {p_total} parameters ({} tensors), output {:?}, method {:?}{}: {:.1} s",
        p.params.len(),
        a.capture.output,
        a.capture.method,
        p.opts.projection.map(|pr| format!(", projected to {}", pr.dim)).unwrap_or_default(),
        secs
    );
    // Routes of CSE blocks, for per-expert GC.
    let enc = crate::eval::encode(
        &p.model,
        &p.ids.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        64,
        device,
    )?;
    let mut extra: Vec<(String, Vec<i64>)> = enc
        .routes
        .iter()
        .map(|(l, r)| (format!("expert_h{l}"), r.clone()))
        .collect();
    // DBSCAN clusters of the last block's sequence embeddings (knee eps, minPts 5; -1 = noise).
    if let Some(last) = enc.layers.last() {
        let d = last.size()[1] as usize;
        let data: Vec<f32> = Vec::try_from(last.reshape([-1]))?;
        let min_pts = crate::train::dynamics::MIN_PTS;
        if p.ids.len() > min_pts {
            let eps = crate::cluster::eps_from_knee(&data, d, min_pts)?;
            let c =
                crate::cluster::dbscan(&data, d, crate::cluster::DbscanParams::new(eps, min_pts)?)?;
            extra.push((
                "cluster".into(),
                c.labels
                    .iter()
                    .map(|l| l.map_or(-1, |x| x as i64))
                    .collect(),
            ));
        }
    }
    if a.diagonal {
        let d: Vec<f64> = Vec::try_from(&k.total)?;
        let mut df = samples_frame(&p, Some(&d), None, &extra)?;
        crate::io::write_parquet(&mut df, out.join("samples.parquet"))?;
        println!(
            "wrote {}/kernel.safetensors (diagonal) and samples.parquet",
            out.display()
        );
        return Ok(());
    }
    let whole = gc::principal(&k.total)?;
    let align = gc::alignment(&k.total, &whole);
    let diag: Vec<f64> = Vec::try_from(k.total.diagonal(0, 0, 1))?;
    // Frequency bins of the 1-gram score (counts over the training split of the whole corpus).
    let all_ids = p.all_ids.as_ref().expect("encoded corpus");
    let report = freq::compute(
        &p.corpus,
        all_ids,
        FreqOptions {
            orders: vec![1],
            ..FreqOptions::default()
        },
    )?;
    let scores: Vec<f64> = p
        .idx
        .iter()
        .map(|&i| report.scores[0][i].unwrap_or(0.0))
        .collect();
    let bins = quantile_bins(&scores, a.bins.max(1));
    let (shares, _) = domain_shares(&p.corpus, ShareBy::Tokens);
    let lt: std::collections::HashSet<&str> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.as_str())
        .collect();
    let mut groups: Vec<(String, String, Vec<usize>)> = Vec::new();
    let mut by = |column: &str, labels: Vec<String>| {
        let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, l) in labels.into_iter().enumerate() {
            m.entry(l).or_default().push(i);
        }
        for (l, v) in m {
            groups.push((column.to_string(), l, v));
        }
    };
    by("freq_bin", bins.iter().map(|b| format!("{b}")).collect());
    by(
        "domain",
        p.idx
            .iter()
            .map(|&i| p.corpus.samples[i].domain.clone())
            .collect(),
    );
    by(
        "long_tail",
        p.idx
            .iter()
            .map(|&i| lt.contains(p.corpus.samples[i].domain.as_str()).to_string())
            .collect(),
    );
    for (name, r) in &extra {
        by(name, r.iter().map(|e| e.to_string()).collect());
    }
    let intervals = {
        let pb = progress::spinner(&format!("GC intervals ({} resamples)", a.gc_resamples));
        let refs: Vec<&[usize]> = groups.iter().map(|g| g.2.as_slice()).collect();
        let iv = gc::gc_bootstrap(&k.total, &refs, a.gc_resamples, 0.05, g.seed)?;
        pb.finish_and_clear();
        iv
    };
    let mut rows: Vec<(String, String, u64, Option<f64>, f64)> = Vec::new();
    for (col, label, members) in &groups {
        let v = gc::gc(&k.total, &whole, members)?;
        let mean_score = members.iter().map(|&i| scores[i]).sum::<f64>() / members.len() as f64;
        rows.push((
            col.clone(),
            label.clone(),
            members.len() as u64,
            v,
            mean_score,
        ));
    }
    let mut gc_df = DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "column".into(),
                rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "group".into(),
                rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            ),
            Column::new("n".into(), rows.iter().map(|r| r.2).collect::<Vec<_>>()),
            Column::new("gc".into(), rows.iter().map(|r| r.3).collect::<Vec<_>>()),
            Column::new(
                "gc_low".into(),
                intervals.iter().map(|v| v.map(|x| x.0)).collect::<Vec<_>>(),
            ),
            Column::new(
                "gc_high".into(),
                intervals.iter().map(|v| v.map(|x| x.1)).collect::<Vec<_>>(),
            ),
            Column::new(
                "mean_freq_score".into(),
                rows.iter().map(|r| r.4).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("gc", e))?;
    crate::io::write_parquet(&mut gc_df, out.join("gc.parquet"))?;
    let mut extra2 = extra.clone();
    extra2.push(("freq_bin".into(), bins.iter().map(|&b| b as i64).collect()));
    let mut df = samples_frame(&p, Some(&diag), Some(&align), &extra2)?;
    let sc = Column::new("freq_score".into(), scores.clone());
    if let Some(last) = enc.layers.last() {
        // Two principal components of the last block's sequence embeddings, for plotting.
        let (pc1, pc2) = crate::analysis::pca::pca2(last)?;
        df.with_column(Column::new("pc1".into(), pc1))
            .map_err(|e| Error::table("samples", e))?;
        df.with_column(Column::new("pc2".into(), pc2))
            .map_err(|e| Error::table("samples", e))?;
    }
    df.with_column(sc).map_err(|e| Error::table("samples", e))?;
    crate::io::write_parquet(&mut df, out.join("samples.parquet"))?;
    println!("principal eigenvalue {:.4e}; GC (cos of the primary gradient directions) [95% half-sampling interval] by 1-gram frequency bin (0 = rarest):", whole.lambda);
    let show = |v: Option<f64>, iv: &Option<(f64, f64)>| match (v, iv) {
        (Some(v), Some((lo, hi))) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
        (Some(v), None) => format!("{v:.3}"),
        _ => "-".into(),
    };
    for (r, iv) in rows
        .iter()
        .zip(&intervals)
        .filter(|(r, _)| r.0 == "freq_bin")
    {
        println!(
            "  bin {:<3} n {:>4}  mean score {:.4}  GC {}",
            r.1,
            r.2,
            r.4,
            show(r.3, iv)
        );
    }
    for (r, iv) in rows
        .iter()
        .zip(&intervals)
        .filter(|(r, _)| r.0 == "long_tail" || r.0.starts_with("expert_"))
    {
        println!("  {} {:<8} n {:>4}  GC {}", r.0, r.1, r.2, show(r.3, iv));
    }
    if let Some(split) = &a.cross_split {
        let yidx = pick(&p.corpus, split, a.cross_samples);
        let yids: Vec<Vec<u32>> = yidx.iter().map(|&i| all_ids[i].clone()).collect();
        let cy = run_capture(&p, &yids, "cross set", device)?;
        let cx = cx
            .as_ref()
            .expect("an in-memory capture when --cross-split is given");
        let kc = ntk::kernel(cx, Some(&cy), a.blocks, false)?;
        let mut named = vec![("total".to_string(), kc.total.shallow_clone())];
        named.extend(
            kc.blocks
                .iter()
                .map(|(n, t)| (format!("block.{n}"), t.shallow_clone())),
        );
        write_tensors(&named, &out.join("cross_kernel.safetensors"))?;
        println!(
            "cross-kernel {} × {} against the {split} split: cross_kernel.safetensors",
            n,
            yidx.len()
        );
    }
    let _ = &p.vs;
    println!(
        "wrote {}/kernel.safetensors ({} blocks), samples.parquet, gc.parquet",
        out.display(),
        k.blocks.len()
    );
    Ok(())
}

/// Quantile bin (0 = lowest) of each value, `bins` bins of near-equal size.
pub fn quantile_bins(values: &[f64], bins: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let mut out = vec![0; values.len()];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = rank * bins / values.len().max(1);
    }
    out
}
