//! Reports (`tailscope report`): one self-contained HTML file (inline SVG figures, no network) that
//! opens with what the model neglects — the flagged texts, each with its evidence in words and
//! its nearest training texts ([`neglected`]) — then the kernel's diagnostics, the findings, the
//! figures and a sortable table of every flag; and a Jupyter notebook (nbformat 4) with the same
//! figures as outputs and cells that reload the Parquet tables, so users can go on in Python.
//! Inputs are an `analyze` folder and the `ntk` folder(s) it was computed from.

mod findings;
pub mod neglected;
pub use crate::plots;
pub mod runs;
pub mod trajectory;

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::read_tensors;
use crate::io::{column_f64, column_str, read_parquet};

/// One figure: file stem, caption, the drawing as SVG and PNG.
pub struct Figure {
    /// File stem under figures/.
    pub name: String,
    /// Caption in the page and the notebook.
    pub caption: String,
    /// The drawing.
    pub plot: plots::Rendered,
}

/// Everything a report shows.
pub struct Report {
    /// Title of the page.
    pub title: String,
    /// What the model neglects: the flagged texts with their evidence, best first.
    pub neglected: neglected::Neglected,
    /// Whether the kernel is informative: its diagnostics and warnings, in words.
    pub kernel: Vec<String>,
    /// The findings, in words with their intervals.
    pub summary: Vec<String>,
    /// Correlation rows: x, y, method, value, low, high.
    pub correlations: Vec<[String; 6]>,
    /// Flag rows: rank, id, domain, score, reasons, text.
    pub flags: Vec<[String; 6]>,
    /// Expert isolation lines.
    pub isolation: Vec<String>,
    /// The training runs side by side ([`runs`]); empty without training logs.
    pub runs: Vec<String>,
    /// The figures.
    pub figures: Vec<Figure>,
    /// The Parquet tables the notebook reloads.
    pub tables: Vec<PathBuf>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "–".into()
    }
}

/// The GC table of an NTK run (`gc.parquet`), intervals NaN where absent.
struct GcTable {
    column: Vec<String>,
    group: Vec<String>,
    gc: Vec<f64>,
    n: Vec<f64>,
    score: Vec<f64>,
    low: Vec<f64>,
    high: Vec<f64>,
    /// Σu′ / Σ|u′| of each group's own direction (NaN where not recorded).
    sign_margin: Vec<f64>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl GcTable {
    fn read(ntk: &Path) -> Result<GcTable> {
        let gp = ntk.join("gc.parquet");
        let g = read_parquet(&gp)?;
        let column = column_str(&g, "column", &gp)?;
        // Intervals (gc_low, gc_high) are absent from kernels computed with --gc-resamples 0.
        let optional = |name: &str| -> Result<Vec<f64>> {
            if g.column(name).is_ok() {
                column_f64(&g, name, &gp)
            } else {
                Ok(vec![f64::NAN; column.len()])
            }
        };
        Ok(GcTable {
            group: column_str(&g, "group", &gp)?,
            gc: column_f64(&g, "gc", &gp)?,
            n: column_f64(&g, "n", &gp)?,
            score: column_f64(&g, "mean_freq_score", &gp)?,
            low: optional("gc_low")?,
            high: optional("gc_high")?,
            sign_margin: optional("sign_margin")?,
            column,
        })
    }

    fn interval(&self, i: usize) -> Option<(f64, f64)> {
        finite(self.low[i]).zip(finite(self.high[i]))
    }

    /// Whether the group's own direction has an ill-determined sign
    /// ([`crate::ntk::diagnostics::sign_near_tie`] of its Σu′ / Σ|u′|).
    fn ill_signed(&self, column: &str, group: &str) -> bool {
        (0..self.column.len()).any(|i| {
            self.column[i] == column
                && self.group[i] == group
                && crate::ntk::diagnostics::sign_near_tie(self.sign_margin[i])
        })
    }

    /// The frequency bins, rarest first.
    fn bins(&self) -> Vec<plots::GcBin> {
        let mut bins: Vec<plots::GcBin> = (0..self.column.len())
            .filter(|&i| self.column[i] == "freq_bin")
            .map(|i| plots::GcBin {
                label: self.group[i].clone(),
                mean_score: self.score[i],
                gc: finite(self.gc[i]),
                interval: self.interval(i),
                n: self.n[i] as u64,
            })
            .collect();
        bins.sort_by_key(|b| b.label.parse::<usize>().unwrap_or(0));
        bins
    }
}

/// The bins with |GC| and folded intervals ([`findings::fold`]), as the figure shows them.
fn folded(bins: &[plots::GcBin]) -> Vec<plots::GcBin> {
    bins.iter()
        .map(|b| {
            let (gc, interval) = match b.gc {
                Some(v) => {
                    let (v, iv) = findings::fold(v, b.interval);
                    (Some(v), iv)
                }
                None => (None, b.interval),
            };
            plots::GcBin {
                gc,
                interval,
                label: b.label.clone(),
                ..*b
            }
        })
        .collect()
}

/// Whether `dir` is the output folder of a selection study (false) or a CSE study (true), by
/// the file `tailscope study` writes last there: `study.md` or `experts.md`. A ranking study
/// (`ranking.md`) has no report section, and any other folder is not a study's.
fn study_kind(dir: &Path) -> Result<bool> {
    let not = |what: &str| {
        Err(Error::invalid(
            "--study",
            format!(
                "{} {what}; give the output folder of a selection, CSE or facts study (`tailscope study`, which writes study.md, experts.md or facts-study.md there)",
                dir.display()
            ),
        ))
    };
    if !dir.is_dir() {
        return not(if dir.exists() {
            "is a file, not a study's output folder"
        } else {
            "does not exist"
        });
    }
    if dir.join("experts.md").is_file() {
        return Ok(true);
    }
    if dir.join("study.md").is_file() {
        return Ok(false);
    }
    if dir.join("ranking.md").is_file() {
        return not(
            "is a ranking study's folder, which the report does not show (read its ranking.md)",
        );
    }
    not("is not a study's output folder: it has neither study.md (a selection study) nor experts.md (a CSE study)")
}

/// The per-sample columns of `analysis.parquet` the figures use.
struct Samples {
    path: PathBuf,
    frame: polars::prelude::DataFrame,
    freq: Vec<f64>,
    align: Vec<f64>,
    domains: Vec<String>,
    /// The route column of the last CSE/Switch block, if any, and its values (0 without).
    expert_col: Option<String>,
    experts: Vec<f64>,
}

impl Samples {
    fn read(analysis: &Path) -> Result<Samples> {
        let path = analysis.join("analysis.parquet");
        let frame = read_parquet(&path)?;
        let domains = column_str(&frame, "domain", &path)?;
        let expert_col = frame
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .filter(|c| c.starts_with("expert_h"))
            .max();
        let experts: Vec<f64> = match &expert_col {
            Some(c) => column_f64(&frame, c, &path)?,
            None => vec![0.0; domains.len()],
        };
        Ok(Samples {
            freq: column_f64(&frame, "freq_score", &path)?,
            align: column_f64(&frame, "alignment", &path)?,
            domains,
            expert_col,
            experts,
            frame,
            path,
        })
    }
}

/// What a report shows and where it goes.
#[derive(Debug, Clone)]
pub struct ReportSpec {
    /// An `analyze` output folder.
    pub analysis: PathBuf,
    /// The `ntk` folder the analysis was computed from.
    pub ntk: PathBuf,
    /// The dense baseline's `ntk` folder (heatmap beside this model's).
    pub baseline: Option<PathBuf>,
    /// A training run folder: adds training curves and cluster dynamics.
    pub train_run: Option<PathBuf>,
    /// A `tailscope study` output folder: adds its findings and figure.
    pub study: Option<PathBuf>,
    /// The page's title.
    pub title: String,
    /// Output folder (report.html, figures/).
    pub out: PathBuf,
    /// Where the notebook goes (default: report.ipynb in `out`).
    pub notebook: Option<PathBuf>,
}

impl ReportSpec {
    /// Where the notebook goes.
    pub fn notebook_path(&self) -> PathBuf {
        self.notebook
            .clone()
            .unwrap_or_else(|| self.out.join("report.ipynb"))
    }
}

/// Build the report of `spec` and write the page, figures and notebook.
pub fn render(spec: &ReportSpec) -> Result<Report> {
    // A folder that is not a study's is refused before any work.
    if let Some(dir) = &spec.study {
        if !dir.join("facts-study.md").is_file() {
            study_kind(dir)?;
        }
    }
    let r = build(
        &spec.analysis,
        &spec.ntk,
        spec.baseline.as_deref(),
        spec.train_run.as_deref(),
        &spec.title,
    )?;
    let r = match &spec.study {
        Some(dir) => with_study(r, dir)?,
        None => r,
    };
    write(&r, &spec.out, &spec.notebook_path())?;
    Ok(r)
}

/// Gather tables and draw the figures.
pub fn build(
    analysis: &Path,
    ntk: &Path,
    baseline: Option<&Path>,
    train_run: Option<&Path>,
    title: &str,
) -> Result<Report> {
    let a = Samples::read(analysis)?;
    let g = GcTable::read(ntk)?;
    let bins = g.bins();
    let mut figures = vec![
        Figure {
            name: "gc_by_frequency".into(),
            caption: "Gradient consistency of each 1-gram frequency bin with the whole sample set as |GC|, with 95% intervals folded the same way (the sign of a GC follows the Σu ≥ 0 convention, which is arbitrary; |GC| does not depend on it) (top), and the samples per bin (bottom); paper Fig. 2a.".into(),
            plot: plots::gc_by_frequency(&folded(&bins), "|GC| by data frequency")?,
        },
        Figure {
            name: "frequency_vs_alignment".into(),
            caption: "Each sample's frequency score against the alignment of its gradient with the primary gradient direction, coloured by domain.".into(),
            plot: plots::frequency_vs_alignment(&a.freq, &a.align, &a.domains, "Frequency against alignment")?,
        },
        heatmap_figure(&a, ntk, baseline)?,
    ];
    figures.extend(pca_figure(&a)?);
    let mut run_lines = Vec::new();
    if let Some(run) = train_run {
        figures.extend(training_figures(run)?);
        let lt = column_str(&a.frame, "long_tail_domain", &a.path)?;
        let long_tail: std::collections::BTreeSet<String> = a
            .domains
            .iter()
            .zip(&lt)
            .filter(|(_, l)| *l == "true")
            .map(|(d, _)| d.clone())
            .collect();
        // The reference of the paired comparison: the dense baseline's run.
        let reference = baseline
            .and_then(|b| b.file_name())
            .map(|f| f.to_string_lossy().into_owned());
        if let Some(parent) = run.parent() {
            run_lines = runs::run_lines(parent, &long_tail, reference.as_deref(), 0)?;
        }
    }
    let corr = Correlations::read(analysis)?;
    let flags = flag_rows(analysis)?;
    let neglected = neglected::Neglected::read(analysis)?;
    let isolation = isolation_lines(analysis)?;
    let ntk_json = findings::NtkJson::read(ntk)?;
    let summary = findings::findings(&a, &g, &bins, &corr, analysis, ntk_json.as_ref())?;
    let kernel = findings::kernel_lines(ntk_json.as_ref(), &g);
    let tables = [
        "analysis.parquet",
        "correlations.parquet",
        "flags.parquet",
        "isolation.parquet",
    ]
    .iter()
    .map(|t| analysis.join(t))
    .filter(|p| p.exists())
    .chain([ntk.join("gc.parquet")])
    .collect();
    Ok(Report {
        title: title.to_string(),
        neglected,
        kernel,
        summary,
        correlations: corr.rows(),
        flags,
        isolation,
        runs: run_lines,
        figures,
        tables,
    })
}

/// `r` with a study's findings and figure (`tailscope study`'s output folder): a selection study,
/// a CSE (`[experts]`) study, told apart by its `experts.md` (a selection study writes
/// `study.md`), or a facts study, by its `facts-study.md` (whose sentences come from its
/// `findings.json`). Any other folder is refused, saying what it is not.
pub fn with_study(mut r: Report, dir: &Path) -> Result<Report> {
    if dir.join("facts-study.md").is_file() {
        return with_facts_study(r, dir);
    }
    let (name, caption) = if study_kind(dir)? {
        let s = crate::study::experts::ExpertsStudy::read(dir)?;
        r.summary.extend(s.findings());
        (
            "cse_study",
            format!(
                "CSE study: held-out perplexity of each run against {} (mean over seeds of the \
                 seed-paired relative change, 95% t interval).",
                s.baseline
            ),
        )
    } else {
        let s = crate::study::Study::read(dir)?;
        r.summary.extend(s.findings());
        (
            "selection_study",
            "Selection study: held-out loss change of each criterion's continued run against \
             continuing without a selection (mean over seeds, 95% t interval)."
                .to_string(),
        )
    };
    let fig = dir.join("figures").join(name);
    let svg_path = fig.with_extension("svg");
    let png_path = fig.with_extension("png");
    let svg = std::fs::read_to_string(&svg_path).map_err(|e| Error::io(&svg_path, e))?;
    let png = std::fs::read(&png_path).map_err(|e| Error::io(&png_path, e))?;
    r.figures.push(Figure {
        name: name.into(),
        caption,
        plot: plots::Rendered { svg, png },
    });
    r.tables.extend(
        ["summary.parquet", "comparisons.parquet", "results.parquet"]
            .iter()
            .map(|t| dir.join(t)),
    );
    Ok(r)
}

/// `r` with a facts study's findings (`findings.json`) and acquisition figure.
fn with_facts_study(mut r: Report, dir: &Path) -> Result<Report> {
    let p = dir.join("findings.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let lines: Vec<String> =
        serde_json::from_str(&text).map_err(|e| Error::in_file(&p, e.to_string()))?;
    r.summary.extend(lines);
    let fig = dir.join("figures").join("acquisition");
    let (svg_path, png_path) = (fig.with_extension("svg"), fig.with_extension("png"));
    r.figures.push(Figure {
        name: "facts_acquisition".into(),
        caption: "Facts study: share of the inserted facts each run acquired against how often \
                  it read them, with 95% intervals over seeds and facts; the dashed line is one half."
            .into(),
        plot: plots::Rendered {
            svg: std::fs::read_to_string(&svg_path).map_err(|e| Error::io(&svg_path, e))?,
            png: std::fs::read(&png_path).map_err(|e| Error::io(&png_path, e))?,
        },
    });
    r.tables.extend(
        ["curves.parquet", "vs_baseline.parquet", "outcomes.parquet"]
            .iter()
            .map(|t| dir.join(t)),
    );
    Ok(r)
}

/// The `total` kernel of an NTK folder, float64.
fn total_kernel(dir: &Path) -> Result<tch::Tensor> {
    let p = dir.join("kernel.safetensors");
    Ok(read_tensors(&p)?
        .remove("total")
        .ok_or_else(|| Error::in_file(&p, "missing tensor `total`"))?
        .to_kind(tch::Kind::Double))
}

/// Heatmaps of the kernel (and the baseline's): at most 96 samples, ordered by expert of the
/// last CSE block (if any), then domain.
fn heatmap_figure(a: &Samples, ntk: &Path, baseline: Option<&Path>) -> Result<Figure> {
    let k = total_kernel(ntk)?;
    let (experts, domains) = (&a.experts, &a.domains);
    let mut order: Vec<usize> = (0..domains.len()).collect();
    order.sort_by(|&i, &j| {
        experts[i]
            .total_cmp(&experts[j])
            .then(domains[i].cmp(&domains[j]))
            .then(i.cmp(&j))
    });
    let step = order.len().div_ceil(96).max(1);
    let order: Vec<usize> = order.into_iter().step_by(step).collect();
    let boundaries: Vec<usize> = (1..order.len())
        .filter(|&p| {
            let (i, j) = (order[p - 1], order[p]);
            experts[i] != experts[j] || (a.expert_col.is_none() && domains[i] != domains[j])
        })
        .collect();
    let kb = baseline.map(total_kernel).transpose()?;
    let mut panels: Vec<(&str, &tch::Tensor)> = vec![("this model", &k)];
    if let Some(kb) = &kb {
        panels.push(("dense baseline", kb));
    }
    Ok(Figure {
        name: "ntk_heatmap".into(),
        caption: format!(
            "Cosine-normalised NTK of {} samples ordered by {}domain (orange +1, white 0, blue −1; lines separate experts, or domains for a model without experts){}; paper Fig. 5b/c.",
            order.len(),
            if a.expert_col.is_some() { "expert, then " } else { "" },
            if kb.is_some() { ", beside the dense baseline on the same samples" } else { "" }
        ),
        plot: plots::ntk_heatmaps(&panels, &order, &boundaries, "Empirical NTK")?,
    })
}

/// Two principal components of the sequence embeddings, by expert or DBSCAN cluster; none when
/// the NTK run wrote no components.
fn pca_figure(a: &Samples) -> Result<Option<Figure>> {
    let (f, ap) = (&a.frame, &a.path);
    if f.column("pc1").is_err() || f.column("pc2").is_err() {
        return Ok(None);
    }
    let (pc1, pc2) = (column_f64(f, "pc1", ap)?, column_f64(f, "pc2", ap)?);
    let (labels, by): (Vec<String>, &str) = match &a.expert_col {
        Some(_) => (
            a.experts.iter().map(|e| format!("expert {e}")).collect(),
            "expert",
        ),
        None => (
            column_f64(f, "cluster", ap)?
                .iter()
                .map(|c| match *c < 0.0 {
                    true => "noise".into(),
                    false => format!("cluster {c}"),
                })
                .collect(),
            "DBSCAN cluster",
        ),
    };
    Ok(Some(Figure {
        name: "embeddings_pca".into(),
        caption: format!("Sequence embeddings after the last block, first two principal components, coloured by {by}; paper Fig. 2b/5a."),
        plot: plots::scatter_by_group(&pc1, &pc2, &labels, "Sequence embeddings (PCA)", "PC 1", "PC 2")?,
    }))
}

/// `correlations.parquet`.
struct Correlations {
    x: Vec<String>,
    y: Vec<String>,
    method: Vec<String>,
    value: Vec<f64>,
    low: Vec<f64>,
    high: Vec<f64>,
}

impl Correlations {
    fn read(analysis: &Path) -> Result<Correlations> {
        let cp = analysis.join("correlations.parquet");
        let c = read_parquet(&cp)?;
        Ok(Correlations {
            x: column_str(&c, "x", &cp)?,
            y: column_str(&c, "y", &cp)?,
            method: column_str(&c, "method", &cp)?,
            value: column_f64(&c, "value", &cp)?,
            low: column_f64(&c, "low", &cp)?,
            high: column_f64(&c, "high", &cp)?,
        })
    }

    fn rows(&self) -> Vec<[String; 6]> {
        (0..self.x.len())
            .map(|i| {
                [
                    self.x[i].clone(),
                    self.y[i].clone(),
                    self.method[i].clone(),
                    fmt(self.value[i]),
                    fmt(self.low[i]),
                    fmt(self.high[i]),
                ]
            })
            .collect()
    }
}

/// The flagged samples: rank, id, domain, score, reasons, text.
fn flag_rows(analysis: &Path) -> Result<Vec<[String; 6]>> {
    let fp = analysis.join("flags.parquet");
    let f = read_parquet(&fp)?;
    let (fid, fdom, ftext, freason) = (
        column_str(&f, "id", &fp)?,
        column_str(&f, "domain", &fp)?,
        column_str(&f, "text", &fp)?,
        column_str(&f, "reasons", &fp)?,
    );
    let fscore = column_f64(&f, "score", &fp)?;
    Ok((0..fid.len())
        .map(|i| {
            [
                (i + 1).to_string(),
                fid[i].clone(),
                fdom[i].clone(),
                fmt(fscore[i]),
                freason[i].clone(),
                ftext[i].clone(),
            ]
        })
        .collect())
}

/// One line per block and per expert of `isolation.parquet` (none when it does not exist).
fn isolation_lines(analysis: &Path) -> Result<Vec<String>> {
    let ip = analysis.join("isolation.parquet");
    if !ip.exists() {
        return Ok(Vec::new());
    }
    let t = read_parquet(&ip)?;
    let (b, d, v) = (
        column_str(&t, "block", &ip)?,
        column_str(&t, "dominant_domain", &ip)?,
        column_str(&t, "verdict", &ip)?,
    );
    let (e, l, s, lt) = (
        column_f64(&t, "expert", &ip)?,
        column_f64(&t, "load", &ip)?,
        column_f64(&t, "dominant_share", &ip)?,
        column_f64(&t, "long_tail_share", &ip)?,
    );
    let (co, bc) = (
        column_f64(&t, "consistency", &ip)?,
        column_f64(&t, "baseline_consistency", &ip)?,
    );
    let (nm, sep) = (
        column_f64(&t, "block_nmi", &ip)?,
        column_f64(&t, "block_separation", &ip)?,
    );
    let mut lines = Vec::new();
    for i in 0..b.len() {
        let block = b[i].trim_start_matches("expert_");
        if i == 0 || b[i] != b[i - 1] {
            lines.push(format!(
                "{block}: NMI(domain, expert) {:.3}, expert distance/radius ratio {}",
                nm[i],
                fmt(sep[i])
            ));
        }
        lines.push(if l[i] == 0.0 {
            format!("{block} expert {}: {} — no samples", e[i], v[i])
        } else {
            format!(
                "{block} expert {}: {} — {} samples, {:.0}% {}, {:.0}% long-tail, kernel consistency {} (baseline {})",
                e[i], v[i], l[i], 100.0 * s[i], d[i], 100.0 * lt[i], fmt(co[i]), fmt(bc[i])
            )
        });
    }
    Ok(lines)
}

/// Training curves of the runs beside `run` (loss, smoothed over 10 steps) and the cluster
/// dynamics of `run` (clusters and distance/radius ratio per block over steps; paper Fig. 3).
fn training_figures(run: &Path) -> Result<Vec<Figure>> {
    let mut curves = Vec::new();
    let parent = run.parent().unwrap_or(Path::new("."));
    let mut runs: Vec<PathBuf> = std::fs::read_dir(parent)
        .map_err(|e| Error::io(parent, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("log.parquet").exists())
        .collect();
    runs.sort();
    for r in &runs {
        let lp = r.join("log.parquet");
        let t = read_parquet(&lp)?;
        let (step, loss) = (column_f64(&t, "step", &lp)?, column_f64(&t, "loss", &lp)?);
        let pts: Vec<(f64, f64)> = (0..step.len())
            .map(|i| {
                let lo = i.saturating_sub(9);
                (
                    step[i],
                    loss[lo..=i].iter().sum::<f64>() / (i - lo + 1) as f64,
                )
            })
            .collect();
        curves.push((
            r.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pts,
        ));
    }
    // No training logs (e.g. a pretrained model's folder): no training figures.
    let mut out = Vec::new();
    if !curves.is_empty() {
        out.push(Figure {
            name: "training_curves".into(),
            caption: "Training loss per step (mean of the last 10 steps) of every run beside the analysed one.".into(),
            plot: plots::line_series(&curves, "Training curves", "step", "training loss", false)?,
        });
    }
    let cp = run.join("clusters.parquet");
    if cp.exists() {
        let t = read_parquet(&cp)?;
        let (step, layer, n, ratio) = (
            column_f64(&t, "step", &cp)?,
            column_f64(&t, "layer", &cp)?,
            column_f64(&t, "n_clusters", &cp)?,
            column_f64(&t, "ratio", &cp)?,
        );
        let mut layers: Vec<i64> = layer.iter().map(|l| *l as i64).collect();
        layers.sort();
        layers.dedup();
        let series = |v: &[f64]| -> Vec<(String, Vec<(f64, f64)>)> {
            layers
                .iter()
                .map(|&l| {
                    (
                        format!("block {}", l - 1),
                        (0..step.len())
                            .filter(|&i| layer[i] as i64 == l && v[i].is_finite())
                            .map(|i| (step[i], v[i]))
                            .collect(),
                    )
                })
                .collect()
        };
        // Only what was recorded: a run with `dynamics_every = 0` (or never two clusters) gets
        // no empty axes.
        let recorded = |s: &[(String, Vec<(f64, f64)>)]| s.iter().any(|(_, p)| !p.is_empty());
        let (counts, ratios) = (series(&n), series(&ratio));
        if recorded(&counts) {
            out.push(Figure {
                name: "cluster_count".into(),
                caption: "Number of DBSCAN clusters of a fixed validation probe set at each block's output over training (paper Fig. 3).".into(),
                plot: plots::line_series(&counts, "Clusters over training", "step", "clusters", true)?,
            });
        }
        if recorded(&ratios) {
            out.push(Figure {
                name: "cluster_ratio".into(),
                caption: "Mean inter-centroid distance over mean cluster radius per block over training (paper Fig. 3); gaps where fewer than two clusters were found.".into(),
                plot: plots::line_series(&ratios, "Cluster separation over training", "step", "distance / radius", false)?,
            });
        }
    }
    Ok(out)
}

const SORT_JS: &str = "function sortTable(t,c){const b=t.tBodies[0];const r=[...b.rows];const asc=t.dataset.col==c&&t.dataset.dir!='asc';r.sort((x,y)=>{const a=x.cells[c].innerText,d=y.cells[c].innerText;const n=parseFloat(a)-parseFloat(d);const v=isNaN(n)?a.localeCompare(d):n;return asc?v:-v});t.dataset.col=c;t.dataset.dir=asc?'asc':'desc';r.forEach(e=>b.appendChild(e));}";

fn table(id: &str, head: &[&str], rows: &[[String; 6]]) -> String {
    let th: String = head
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                "<th onclick=\"sortTable(document.getElementById('{id}'),{i})\">{}</th>",
                esc(h)
            )
        })
        .collect();
    let body: String = rows
        .iter()
        .map(|r| {
            format!(
                "<tr>{}</tr>",
                r.iter()
                    .map(|c| format!("<td>{}</td>", esc(c)))
                    .collect::<String>()
            )
        })
        .collect();
    format!("<table id=\"{id}\"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
}

/// The self-contained HTML page.
pub fn html(r: &Report) -> String {
    let figs: String = r
        .figures
        .iter()
        .map(|f| {
            format!(
                "<figure id=\"{}\">{}<figcaption>{}</figcaption></figure>",
                f.name,
                f.plot.svg,
                esc(&f.caption)
            )
        })
        .collect();
    let summary: String = r
        .summary
        .iter()
        .map(|s| format!("<li>{}</li>", esc(s)))
        .collect();
    let kernel: String = r
        .kernel
        .iter()
        .map(|s| match s.strip_prefix("Warning: ") {
            Some(w) => format!("<li class=\"warn\"><b>Warning:</b> {}</li>", esc(w)),
            None => format!("<li>{}</li>", esc(s)),
        })
        .collect();
    let kernel = if kernel.is_empty() {
        String::new()
    } else {
        format!("<h2>Is the kernel informative?</h2><ul id=\"kernel\">{kernel}</ul>")
    };
    let iso = if r.isolation.is_empty() {
        String::new()
    } else {
        format!("<h2>Expert isolation</h2><ul>{}</ul><p class=\"note\">Verdicts: idle under 1% of the samples; isolated when one domain or the long-tail domains make up ≥ 70% of an expert's samples and its kernel consistency exceeds the dense baseline's; mixed otherwise.</p>", r.isolation.iter().map(|s| format!("<li>{}</li>", esc(s))).collect::<String>())
    };
    let runs = if r.runs.is_empty() {
        String::new()
    } else {
        format!("<h2>Training runs</h2><ul id=\"runs\">{}</ul><p class=\"note\">Validation perplexity exp(Σ loss / Σ tokens) over the same sentences for every run; 95% bootstrap intervals over sentences ({} resamples, paired against the baseline run); long-tail domains as the frequency analysis names them.</p>", r.runs.iter().map(|s| format!("<li>{}</li>", esc(s))).collect::<String>(), runs::RESAMPLES)
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse;font-size:13px;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}th{{background:#eee;cursor:pointer}}figure{{margin:1.5em 0}}\
figcaption{{font-size:13px;color:#444}}svg{{max-width:100%;height:auto}}.note{{font-size:13px;color:#555}}.warn{{color:#a00}}\
#neglected li{{margin:0.8em 0}}.text{{font-style:italic}}.evidence{{font-size:14px}}.near{{font-size:13px;color:#444}}</style>\
<script>{js}</script></head><body><h1>{t}</h1>{lead}{kernel}<h2>Findings</h2><ul id=\"findings\">{summary}</ul>{runs}<h2>Figures</h2>{figs}\
<h2>Correlations</h2>{corr}{iso}<h2>Flagged examples</h2><p class=\"note\">Click a column to sort.</p>{flags}</body></html>",
        t = esc(&r.title),
        lead = r.neglected.html(),
        js = SORT_JS,
        corr = table("corr", &["x", "y", "method", "value", "95% low", "95% high"], &r.correlations),
        flags = table("flags", &["rank", "id", "domain", "score", "reasons", "text"], &r.flags),
    )
}

fn lines(s: &str) -> Vec<String> {
    let v: Vec<&str> = s.split_inclusive('\n').collect();
    v.iter().map(|l| l.to_string()).collect()
}

/// `path` as seen from folder `from` (Jupyter runs a notebook with its own folder as the working
/// directory, so the notebook's paths are relative to it); absolute when no relative path exists.
fn relative_to(path: &Path, from: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (path, from) = (abs(path), abs(from));
    pathdiff::diff_paths(&path, &from)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The notebook (nbformat 4.5): summary, figures as SVG outputs, and cells that reload the tables.
/// Paths are relative to `notebook_dir`, the folder the notebook is written to.
pub fn notebook(r: &Report, figure_dir: &Path, notebook_dir: &Path) -> serde_json::Value {
    let mut cells = vec![json!({
        "cell_type": "markdown", "id": "title", "metadata": {},
        "source": lines(&format!("# {}\n\n{}{}\n", r.title, r.neglected.markdown(), r.kernel.iter().chain(&r.summary).chain(&r.runs).map(|s| format!("- {s}")).collect::<Vec<_>>().join("\n")))
    })];
    let paths: Vec<String> = r
        .tables
        .iter()
        .map(|p| relative_to(p, notebook_dir))
        .collect();
    let load = format!(
        "import pandas as pd  # or: import polars as pl; pl.read_parquet(...)\ntables = {{}}\nfor path in {paths:?}:\n    tables[path.rsplit('/', 1)[-1].removesuffix('.parquet')] = pd.read_parquet(path)\ntables['analysis'].head()\n"
    );
    cells.push(json!({"cell_type": "code", "id": "load", "execution_count": null, "metadata": {}, "outputs": [], "source": lines(&load)}));
    for (i, f) in r.figures.iter().enumerate() {
        cells.push(json!({"cell_type": "markdown", "id": format!("cap{i}"), "metadata": {}, "source": lines(&format!("### {}\n\n{}\n", f.name, f.caption))}));
        cells.push(json!({
            "cell_type": "code", "id": format!("fig{i}"), "execution_count": null, "metadata": {},
            "source": lines(&format!("from IPython.display import SVG\nSVG(filename={:?})\n", relative_to(&figure_dir.join(format!("{}.svg", f.name)), notebook_dir))),
            "outputs": [{"output_type": "display_data", "metadata": {}, "data": {"image/svg+xml": lines(&f.plot.svg), "text/plain": [format!("<{} figure>", f.name)]}}]
        }));
    }
    json!({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}, "language_info": {"name": "python"}},
        "cells": cells
    })
}

/// Write report.html, figures/*.svg and *.png, and the notebook, atomically each, as the
/// folder's only writer.
pub fn write(r: &Report, out: &Path, notebook_path: &Path) -> Result<()> {
    let _lock = crate::lock::OutputLock::acquire(out, "tailscope report")?;
    for f in &r.figures {
        crate::io::write_atomic(
            out.join("figures").join(format!("{}.svg", f.name)),
            f.plot.svg.as_bytes(),
        )?;
        crate::io::write_atomic(
            out.join("figures").join(format!("{}.png", f.name)),
            &f.plot.png,
        )?;
    }
    crate::io::write_atomic(out.join("report.html"), html(r).as_bytes())?;
    let notebook_dir = notebook_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let nb = serde_json::to_string_pretty(&notebook(r, &out.join("figures"), notebook_dir))
        .map_err(|e| Error::invalid("notebook", e.to_string()))?;
    crate::io::write_atomic(notebook_path, nb.as_bytes())
}
