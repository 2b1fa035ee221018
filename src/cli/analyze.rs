//! `tailscope analyze`: per-sample metrics joined into one table, frequency correlations with
//! bootstrap intervals, GC per frequency bin and domain, and the ranked under-memorised flags.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use polars::prelude::{Column, DataFrame};

use super::{progress, Global};
use crate::analysis::flags::{self, FlagOptions, SampleMetrics};
use crate::analysis::stats::{bootstrap, Corr, Estimate};
use crate::corpus::{tokenizer, Corpus};
use crate::error::Error;
use crate::io::{column_f64, column_str, read_parquet};
use crate::model::checkpoint;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope analyze --ntk out/demo/ntk/dense --model out/demo/train/dense/final --corpus out/demo/corpus.parquet -o out/demo/analysis/dense")]
pub struct AnalyzeArgs {
    /// An `ntk` output folder (samples.parquet, gc.parquet).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub ntk: PathBuf,
    /// The model the kernel was computed for (for per-sample losses).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub model: PathBuf,
    /// The corpus table (texts, and ground truth `long_tail` if synthetic).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// Bootstrap resamples of each correlation.
    #[arg(
        long,
        default_value_t = 1000,
        value_name = "N",
        help_heading = "Statistics"
    )]
    pub resamples: usize,
    /// 1 − confidence of the intervals.
    #[arg(
        long,
        default_value_t = 0.05,
        value_name = "ALPHA",
        help_heading = "Statistics"
    )]
    pub alpha: f64,
    /// Rare: frequency score below this quantile.
    #[arg(long, default_value_t = 0.2, value_name = "Q", help_heading = "Flags")]
    pub rare_quantile: f64,
    /// Do not count long-tail domains as rare.
    #[arg(long, help_heading = "Flags")]
    pub no_long_tail_domains: bool,
    /// Poorly aligned: alignment below this quantile.
    #[arg(long, default_value_t = 0.5, value_name = "Q", help_heading = "Flags")]
    pub align_quantile: f64,
    /// Poorly fitted: loss this many robust sd above its frequency bin's median.
    #[arg(long, default_value_t = 0.5, value_name = "Z", help_heading = "Flags")]
    pub loss_z: f64,
    /// An `ntk` folder of the dense baseline on the same samples: adds expert isolation.
    #[arg(
        long,
        value_name = "DIR",
        help_heading = "Input",
        long_help = "An `ntk` output folder of the dense baseline computed on the same samples (same \
            --split, --samples and seed). For every CSE block of --ntk's model, expert isolation is \
            reported: routing purity per domain, NMI(domain, expert), per-expert kernel consistency \
            and long-tail GC against the baseline's, and a verdict per expert."
    )]
    pub baseline: Option<PathBuf>,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", help_heading = "Output")]
    pub out: PathBuf,
}

pub fn run(a: &AnalyzeArgs, g: &Global) -> anyhow::Result<()> {
    for (name, q) in [
        ("--rare-quantile", a.rare_quantile),
        ("--align-quantile", a.align_quantile),
        ("--alpha", a.alpha),
    ] {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::invalid(name, format!("must be in [0, 1], got {q}")).into());
        }
    }
    let device = crate::device::resolve(g.device)?;
    let sp = a.ntk.join("samples.parquet");
    let samples = read_parquet(&sp)?;
    let ids = column_str(&samples, "id", &sp)?;
    let domains = column_str(&samples, "domain", &sp)?;
    let freq = column_f64(&samples, "freq_score", &sp)?;
    let align = column_f64(&samples, "alignment", &sp)?;
    let selfk = column_f64(&samples, "self_kernel", &sp)?;
    let bins: Vec<usize> = column_f64(&samples, "freq_bin", &sp)?
        .iter()
        .map(|b| *b as usize)
        .collect();
    let corpus = Corpus::read(&a.corpus)?;
    let by_id: HashMap<&str, usize> = corpus
        .samples
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let rows: Vec<usize> = ids
        .iter()
        .map(|id| {
            by_id.get(id.as_str()).copied().ok_or_else(|| {
                Error::in_file(
                    &sp,
                    format!("sample id {id:?} is not in {}", a.corpus.display()),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let (_, model) = checkpoint::load_model(&a.model, device)?;
    let tok = super::tokenizer_for(a.tokenizer.as_deref(), &a.model, &model, &a.corpus)?;
    let texts: Vec<&str> = rows
        .iter()
        .map(|&i| corpus.samples[i].text.as_str())
        .collect();
    let enc = tokenizer::encode_all(&tok, &texts)?;
    let pb = progress::spinner("per-sample losses");
    let refs: Vec<&[u32]> = enc.iter().map(Vec::as_slice).collect();
    let losses: Vec<f64> = crate::eval::sample_losses(&model, &refs, 64, device, g.seed)?
        .into_iter()
        .map(|(l, c)| l / c.max(1) as f64)
        .collect();
    pb.set_message("bootstrap intervals");
    let (shares, _) = crate::freq::domain_shares(&corpus, crate::freq::ShareBy::Tokens);
    let lt: std::collections::HashSet<&str> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.as_str())
        .collect();
    let mut corr_rows: Vec<(String, String, Corr, Estimate)> = Vec::new();
    let pairs: [(&str, &[f64], &str, &[f64]); 4] = [
        ("freq_score", &freq, "alignment", &align),
        ("freq_score", &freq, "self_kernel", &selfk),
        ("freq_score", &freq, "loss", &losses),
        ("alignment", &align, "loss", &losses),
    ];
    for (xn, x, yn, y) in pairs {
        for kind in [Corr::Spearman, Corr::Pearson, Corr::Kendall] {
            if let Some(e) = bootstrap(kind, x, y, a.resamples, a.alpha, g.seed) {
                corr_rows.push((xn.to_string(), yn.to_string(), kind, e));
            }
        }
    }
    pb.finish_and_clear();
    let metrics: Vec<SampleMetrics> = (0..ids.len())
        .map(|i| SampleMetrics {
            freq_score: freq[i],
            long_tail_domain: lt.contains(domains[i].as_str()),
            alignment: align[i],
            loss: losses[i],
            bin: bins[i],
        })
        .collect();
    let opts = FlagOptions {
        rare_quantile: a.rare_quantile,
        long_tail_domains: !a.no_long_tail_domains,
        align_quantile: a.align_quantile,
        loss_z: a.loss_z,
    };
    let flagged = flags::flag(&metrics, &opts);
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    // analysis.parquet: the ntk sample table plus loss, long-tail flag and flag rank.
    let mut rank = vec![None; ids.len()];
    for (r, f) in flagged.iter().enumerate() {
        rank[f.index] = Some(r as u32 + 1);
    }
    let mut joined = samples.clone();
    for c in [
        Column::new("loss".into(), losses.clone()),
        Column::new(
            "long_tail_domain".into(),
            metrics
                .iter()
                .map(|m| m.long_tail_domain)
                .collect::<Vec<_>>(),
        ),
        Column::new("flag_rank".into(), rank.clone()),
        Column::new("text".into(), texts.clone()),
    ] {
        joined
            .with_column(c)
            .map_err(|e| Error::table("analysis", e))?;
    }
    crate::io::write_parquet(&mut joined, a.out.join("analysis.parquet"))?;
    let mut cdf = DataFrame::new(
        corr_rows.len(),
        vec![
            Column::new(
                "x".into(),
                corr_rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "y".into(),
                corr_rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "method".into(),
                corr_rows
                    .iter()
                    .map(|r| format!("{:?}", r.2).to_lowercase())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                corr_rows.iter().map(|r| r.3.value).collect::<Vec<_>>(),
            ),
            Column::new(
                "low".into(),
                corr_rows.iter().map(|r| r.3.low).collect::<Vec<_>>(),
            ),
            Column::new(
                "high".into(),
                corr_rows.iter().map(|r| r.3.high).collect::<Vec<_>>(),
            ),
            Column::new(
                "n".into(),
                corr_rows.iter().map(|r| r.3.n as u64).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("correlations", e))?;
    crate::io::write_parquet(&mut cdf, a.out.join("correlations.parquet"))?;
    let mut fdf = DataFrame::new(
        flagged.len(),
        vec![
            Column::new(
                "rank".into(),
                (1..=flagged.len() as u32).collect::<Vec<_>>(),
            ),
            Column::new(
                "id".into(),
                flagged
                    .iter()
                    .map(|f| ids[f.index].as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "domain".into(),
                flagged
                    .iter()
                    .map(|f| domains[f.index].as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "score".into(),
                flagged.iter().map(|f| f.rank_score).collect::<Vec<_>>(),
            ),
            Column::new(
                "freq_score".into(),
                flagged.iter().map(|f| freq[f.index]).collect::<Vec<_>>(),
            ),
            Column::new(
                "alignment".into(),
                flagged.iter().map(|f| align[f.index]).collect::<Vec<_>>(),
            ),
            Column::new(
                "loss".into(),
                flagged.iter().map(|f| losses[f.index]).collect::<Vec<_>>(),
            ),
            Column::new(
                "loss_z".into(),
                flagged.iter().map(|f| f.loss_z).collect::<Vec<_>>(),
            ),
            Column::new(
                "reasons".into(),
                flagged
                    .iter()
                    .map(|f| f.reasons.join("; "))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "text".into(),
                flagged.iter().map(|f| texts[f.index]).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("flags", e))?;
    crate::io::write_parquet(&mut fdf, a.out.join("flags.parquet"))?;
    // Ground truth, when the corpus carries it (synthetic corpora).
    let truth: Option<Vec<bool>> = rows.iter().map(|&i| corpus.samples[i].long_tail).collect();
    let pr = truth.as_ref().map(|t| flags::precision_recall(&flagged, t));
    let gp = a.ntk.join("gc.parquet");
    let gc = read_parquet(&gp)?;
    let (gcol, ggroup, gval) = (
        column_str(&gc, "column", &gp)?,
        column_str(&gc, "group", &gp)?,
        column_f64(&gc, "gc", &gp)?,
    );
    println!("{} samples analysed ({})", ids.len(), a.ntk.display());
    println!(
        "correlations ({}% bootstrap intervals, {} resamples):",
        (100.0 * (1.0 - a.alpha)).round(),
        a.resamples
    );
    for r in &corr_rows {
        println!(
            "  {:<10} {:<11} vs {:<11} {:>7.3}  [{:.3}, {:.3}]",
            format!("{:?}", r.2).to_lowercase(),
            r.0,
            r.1,
            r.3.value,
            r.3.low,
            r.3.high
        );
    }
    println!(
        "GC by frequency bin (0 = rarest): {}",
        (0..gcol.len())
            .filter(|&i| gcol[i] == "freq_bin")
            .map(|i| format!("{}: {:.3}", ggroup[i], gval[i]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "flagged as under-memorised: {} of {} (top: {})",
        flagged.len(),
        ids.len(),
        flagged
            .iter()
            .take(3)
            .map(|f| ids[f.index].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((p, r)) = pr {
        println!("against the corpus's ground truth (long_tail): precision {p:.3}, recall {r:.3}");
    }
    let isolation = match &a.baseline {
        Some(b) => isolation(a, b, &samples, &ids, &domains, &lt, (&model, &refs, device))?,
        None => Vec::new(),
    };
    let summary = serde_json::json!({
        "isolation": isolation,
        "samples": ids.len(), "flags": flagged.len(), "flag_options": opts,
        "precision": pr.map(|x| x.0), "recall": pr.map(|x| x.1),
        "correlations": corr_rows.iter().map(|r| serde_json::json!({"x": r.0, "y": r.1, "method": r.2, "estimate": r.3})).collect::<Vec<_>>(),
    });
    crate::io::write_atomic(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "wrote {}/{{analysis,correlations,flags}}.parquet and summary.json",
        a.out.display()
    );
    Ok(())
}

fn load_total(path: &std::path::Path) -> anyhow::Result<tch::Tensor> {
    let t = checkpoint::read_tensors(path)?;
    Ok(t.get("total")
        .ok_or_else(|| Error::in_file(path, "missing tensor `total`"))?
        .to_kind(tch::Kind::Double))
}

/// Expert isolation of every CSE block against the baseline kernel on the same samples.
fn isolation(
    a: &AnalyzeArgs,
    base: &std::path::Path,
    samples: &DataFrame,
    ids: &[String],
    domains: &[String],
    lt: &std::collections::HashSet<&str>,
    (model, seqs, device): (&crate::model::Model, &[&[u32]], tch::Device),
) -> anyhow::Result<Vec<crate::analysis::isolation::BlockReport>> {
    let model_cfg = &model.cfg;
    use crate::analysis::isolation::{block_report, Routing, VerdictRule};
    let bp = base.join("samples.parquet");
    let base_ids = column_str(&read_parquet(&bp)?, "id", &bp)?;
    if base_ids != ids {
        return Err(Error::in_file(&bp, format!("holds other samples than {}; compute both kernels with the same --split, --samples and --seed", a.ntk.join("samples.parquet").display())).into());
    }
    let k = load_total(&a.ntk.join("kernel.safetensors"))?;
    let kb = load_total(&base.join("kernel.safetensors"))?;
    let long_tail: Vec<String> = {
        let mut v: Vec<String> = domains
            .iter()
            .filter(|d| lt.contains(d.as_str()))
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let sp = a.ntk.join("samples.parquet");
    let mut reports = Vec::new();
    let cols: Vec<String> = samples
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| c.starts_with("expert_h"))
        .collect();
    if cols.is_empty() {
        println!(
            "expert isolation: the model of {} has no CSE or Switch block",
            a.ntk.display()
        );
    }
    let mut table: Vec<(String, crate::analysis::isolation::ExpertReport)> = Vec::new();
    let mut block_stats: Vec<(f64, Option<f64>)> = Vec::new();
    let mut enc: Option<crate::eval::Encoded> = None;
    for c in cols {
        let routes: Vec<i64> = column_f64(samples, &c, &sp)?
            .iter()
            .map(|x| *x as i64)
            .collect();
        let layer: i64 = c.trim_start_matches("expert_h").parse().unwrap_or(-1);
        let n_experts = match &model_cfg.experts {
            crate::model::ExpertConfig::Cse(cse) => cse
                .experts
                .get((layer - (model_cfg.n_layer - cse.last_k)).max(0) as usize)
                .copied()
                .unwrap_or(1) as usize,
            crate::model::ExpertConfig::Switch(sw) => sw.n_experts as usize,
            _ => 1,
        };
        let routing = Routing {
            block: &c,
            domains,
            routes: &routes,
            n_experts,
        };
        let mut r = block_report(&routing, &long_tail, &k, &kb, &VerdictRule::default())?;
        // The router sees the output of the previous block: encode's layer `layer`.
        let enc = match &enc {
            Some(e) => e,
            None => enc.insert(crate::eval::encode(model, seqs, 64, device)?),
        };
        if let Some(emb) = enc.layers.get(layer.max(0) as usize) {
            let d = emb.size()[1] as usize;
            let data: Vec<f32> = Vec::try_from(emb.reshape([-1]))?;
            r.separation = crate::analysis::isolation::separation(&data, d, &routes)?;
        }
        println!(
            "expert isolation at {} (NMI(domain, expert) {:.3}, expert distance/radius {}):",
            c.trim_start_matches("expert_"),
            r.nmi,
            r.separation.map_or("-".to_string(), |x| format!("{x:.2}"))
        );
        for e in &r.experts {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
            if e.load == 0 {
                println!("  expert {}: {} — no samples", e.expert, e.verdict);
            } else {
                println!(
                "  expert {}: {} — {} samples, {:.0}% {}, {:.0}% long-tail, kernel consistency {} (baseline {})",
                e.expert,
                e.verdict,
                e.load,
                100.0 * e.dominant_share,
                e.dominant_domain,
                100.0 * e.long_tail_share,
                f(e.consistency),
                f(e.baseline_consistency)
                );
            }
            table.push((c.clone(), e.clone()));
            block_stats.push((r.nmi, r.separation));
        }
        reports.push(r);
    }
    let col_f = |name: &str, f: fn(&crate::analysis::isolation::ExpertReport) -> f64| {
        Column::new(
            name.into(),
            table.iter().map(|(_, e)| f(e)).collect::<Vec<_>>(),
        )
    };
    let mut df = DataFrame::new(
        table.len(),
        vec![
            Column::new(
                "block".into(),
                table.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "expert".into(),
                table.iter().map(|(_, e)| e.expert).collect::<Vec<_>>(),
            ),
            Column::new(
                "load".into(),
                table.iter().map(|(_, e)| e.load as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "dominant_domain".into(),
                table
                    .iter()
                    .map(|(_, e)| e.dominant_domain.as_str())
                    .collect::<Vec<_>>(),
            ),
            col_f("dominant_share", |e| e.dominant_share),
            col_f("long_tail_share", |e| e.long_tail_share),
            Column::new(
                "consistency".into(),
                table.iter().map(|(_, e)| e.consistency).collect::<Vec<_>>(),
            ),
            Column::new(
                "baseline_consistency".into(),
                table
                    .iter()
                    .map(|(_, e)| e.baseline_consistency)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "block_nmi".into(),
                block_stats.iter().map(|b| b.0).collect::<Vec<_>>(),
            ),
            Column::new(
                "block_separation".into(),
                block_stats.iter().map(|b| b.1).collect::<Vec<_>>(),
            ),
            Column::new(
                "verdict".into(),
                table
                    .iter()
                    .map(|(_, e)| e.verdict.as_str())
                    .collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("isolation", e))?;
    crate::io::write_parquet(&mut df, a.out.join("isolation.parquet"))?;
    Ok(reports)
}
