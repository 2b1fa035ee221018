//! Figures of a GC trajectory ([`crate::ntk::trajectory`]): GC per frequency bin and per
//! long-tail flag over training steps, and the kernel drift against the last checkpoint.

use std::path::Path;

use super::plots::line_series;
use super::Figure;
use crate::error::{Error, Result};
use crate::ntk::trajectory::Trajectory;

/// The trajectory's figures: `gc_trajectory` (GC per frequency bin), `gc_trajectory_long_tail`
/// (when the samples have a long-tail flag) and `kernel_drift`.
pub fn figures(t: &Trajectory) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let bins: Vec<(String, Vec<(f64, f64)>)> = t
        .series("freq_bin")
        .into_iter()
        .map(|(g, pts)| {
            let label = match g.as_str() {
                "0" => "bin 0 (rarest)".to_string(),
                _ => format!("bin {g}"),
            };
            (label, pts)
        })
        .collect();
    out.push(Figure {
        name: "gc_trajectory".into(),
        caption: "GC per 1-gram frequency bin at each checkpoint (intervals in \
                  trajectory.parquet)"
            .into(),
        plot: line_series(
            &bins,
            "GC over training by frequency bin",
            "training step",
            "GC",
            false,
        )?,
    });
    let tail = t.series("long_tail");
    if !tail.is_empty() {
        let named: Vec<(String, Vec<(f64, f64)>)> = tail
            .into_iter()
            .map(|(g, p)| {
                let label = if g == "true" { "long-tail" } else { "common" };
                (label.to_string(), p)
            })
            .collect();
        out.push(Figure {
            name: "gc_trajectory_long_tail".into(),
            caption: "GC of long-tail and common domains at each checkpoint".into(),
            plot: line_series(
                &named,
                "GC over training: long-tail vs common",
                "training step",
                "GC",
                false,
            )?,
        });
    }
    let pts = |f: &dyn Fn(&crate::ntk::trajectory::DriftRow) -> f64| {
        t.drift
            .iter()
            .map(|d| (d.step as f64, f(d)))
            .collect::<Vec<_>>()
    };
    out.push(Figure {
        name: "kernel_drift".into(),
        caption: "Kernel drift ‖Θ_t − Θ_T‖ / ‖Θ_T‖ against the last checkpoint T".into(),
        plot: line_series(
            &[
                ("raw kernel".to_string(), pts(&|d| d.drift)),
                ("cosine-normalised".to_string(), pts(&|d| d.drift_cosine)),
            ],
            "Kernel drift against the last checkpoint",
            "training step",
            "relative Frobenius distance",
            false,
        )?,
    });
    Ok(out)
}

/// Write the figures as `dir/figures/NAME.svg` and `.png`.
pub fn write_figures(t: &Trajectory, dir: &Path) -> Result<Vec<Figure>> {
    let figs = figures(t)?;
    let fdir = dir.join("figures");
    std::fs::create_dir_all(&fdir).map_err(|e| Error::io(&fdir, e))?;
    for f in &figs {
        crate::io::write_atomic(fdir.join(format!("{}.svg", f.name)), f.plot.svg.as_bytes())?;
        crate::io::write_atomic(fdir.join(format!("{}.png", f.name)), &f.plot.png)?;
    }
    Ok(figs)
}
