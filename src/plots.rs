//! Figures as SVG and PNG (plotters' SVG and bitmap backends; the PNG text is drawn with the
//! bundled DejaVu Sans, `assets/fonts`, so no system font is needed): GC per frequency
//! bin over the bin sizes (paper Fig. 2a), frequency score against alignment coloured by domain,
//! and NTK heatmaps (cosine-normalised) ordered by expert and domain, sparse model beside the
//! baseline (paper Fig. 5b/c). Colours: the Okabe–Ito palette, safe for colour-blind readers.

use plotters::prelude::*;
use tch::Tensor;

use crate::error::{Error, Result};

/// One figure drawn twice: SVG text (for the HTML report) and PNG bytes (for slides and papers).
pub struct Rendered {
    /// The SVG document.
    pub svg: String,
    /// The PNG file.
    pub png: Vec<u8>,
}

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bundled font is valid; a failure here would only mean text-less PNGs.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// PNG encoding of an RGB buffer (plotters' bitmap backend draws into it).
fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(plot_err)?;
        wr.write_image_data(rgb).map_err(plot_err)?;
    }
    Ok(out)
}

/// Runs the drawing code `$body` (which uses `$root`, a drawing area) once on the SVG backend and
/// once on the bitmap backend: plotters' backends are distinct types, so the body is expanded twice.
macro_rules! render {
    ($size:expr, |$root:ident| $body:block) => {{
        let size: (u32, u32) = $size;
        register_font();
        let mut svg = String::new();
        {
            let $root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            $body
        }
        let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
        {
            let $root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
            $body
        }
        Ok(Rendered {
            svg,
            png: encode_png(&rgb, size)?,
        })
    }};
}

/// Okabe–Ito colours (black last), then grey for "other".
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];
const GREY: RGBColor = RGBColor(150, 150, 150);

fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::invalid("plot", format!("{e:?}"))
}

/// One frequency bin of the GC figure.
pub struct GcBin {
    /// The bin's label.
    pub label: String,
    /// Mean frequency score of its samples.
    pub mean_score: f64,
    /// Its GC.
    pub gc: Option<f64>,
    /// 95% interval (`ntk::gc::gc_intervals`), drawn as an error bar.
    pub interval: Option<(f64, f64)>,
    /// Its samples.
    pub n: u64,
}

/// GC per frequency bin with its interval (top) over the number of samples per bin (bottom).
pub fn gc_by_frequency(bins: &[GcBin], title: &str) -> Result<Rendered> {
    render!((720, 480), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(plot_err)?;
        let (top, bottom) = root.split_vertically(300);
        let n = bins.len().max(1) as f64;
        let (lo, hi) = bins
            .iter()
            .flat_map(|b| {
                b.gc.into_iter()
                    .chain(b.interval.into_iter().flat_map(|i| [i.0, i.1]))
            })
            .fold((0.0f64, 1.0f64), |(l, h), v| (l.min(v), h.max(v)));
        let mut c = ChartBuilder::on(&top)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5..n - 0.5, (lo - 0.05)..(hi + 0.05))
            .map_err(plot_err)?;
        c.configure_mesh()
            .y_desc("|GC| (gradient consistency, sign-free)")
            // Without this, the tick at 0 reads "-0.0" (a float just below zero).
            .y_label_formatter(&|y| format!("{:.1}", if y.abs() < 1e-9 { 0.0 } else { *y }))
            .x_labels(bins.len().max(2))
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                bins.get(i)
                    .map(|b| format!("bin {} ({:.3})", b.label, b.mean_score))
                    .unwrap_or_default()
            })
            .draw()
            .map_err(plot_err)?;
        let pts: Vec<(f64, f64)> = bins
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.gc.map(|g| (i as f64, g)))
            .collect();
        c.draw_series(bins.iter().enumerate().filter_map(|(i, b)| {
            let (lo, hi) = b.interval?;
            Some(ErrorBar::new_vertical(
                i as f64,
                lo,
                b.gc.unwrap_or((lo + hi) / 2.0),
                hi,
                BLACK.stroke_width(1),
                10,
            ))
        }))
        .map_err(plot_err)?
        .label("95% interval")
        .legend(|(x, y)| PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], BLACK));
        c.draw_series(LineSeries::new(pts.clone(), PALETTE[0].stroke_width(2)))
            .map_err(plot_err)?
            .label("|GC| of the bin vs all samples")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[0].stroke_width(2))
            });
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 5, PALETTE[0].filled())))
            .map_err(plot_err)?;
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        bin_counts(&bottom, bins)?;
        root.present().map_err(plot_err)?;
    })
}

/// A tick label for counts and steps: integers only (a tick between two integers gets none).
fn integer_label(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// The samples per frequency bin, as bars under the GC panel.
fn bin_counts<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    bins: &[GcBin],
) -> Result<()> {
    let n = bins.len().max(1) as f64;
    let maxn = bins.iter().map(|b| b.n).max().unwrap_or(1) as f64;
    let mut h = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..maxn * 1.1)
        .map_err(plot_err)?;
    h.configure_mesh()
        .y_desc("samples")
        .x_desc("1-gram frequency bin (mean score), rarest first")
        .x_labels(bins.len().max(2))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_label_formatter(&integer_label)
        .draw()
        .map_err(plot_err)?;
    h.draw_series(bins.iter().enumerate().map(|(i, b)| {
        Rectangle::new(
            [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, b.n as f64)],
            PALETTE[1].mix(0.8).filled(),
        )
    }))
    .map_err(plot_err)?;
    Ok(())
}

/// A scatter plot with one colour per group (the 7 largest groups; the rest grey, as "other").
pub fn scatter_by_group(
    x: &[f64],
    y: &[f64],
    groups: &[String],
    title: &str,
    xdesc: &str,
    ydesc: &str,
) -> Result<Rendered> {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for d in groups {
        *counts.entry(d.as_str()).or_default() += 1;
    }
    let mut order: Vec<(&str, usize)> = counts.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let named: Vec<&str> = order.iter().take(7).map(|x| x.0).collect();
    let fin = |v: &[f64]| {
        v.iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)))
    };
    let ((x0, x1), (y0, y1)) = (fin(x), fin(y));
    let pad = |a: f64, b: f64| if b > a { (b - a) * 0.05 } else { 0.5 };
    render!((720, 480), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (x0 - pad(x0, x1))..(x1 + pad(x0, x1)),
                (y0 - pad(y0, y1))..(y1 + pad(y0, y1)),
            )
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc(xdesc)
            .y_desc(ydesc)
            .draw()
            .map_err(plot_err)?;
        let mut shown: Vec<&str> = named.clone();
        if order.len() > 7 {
            shown.push("other");
        }
        for (k, g) in shown.into_iter().enumerate() {
            let pts: Vec<(f64, f64)> = (0..x.len())
                .filter(|&i| {
                    if g == "other" {
                        !named.contains(&groups[i].as_str())
                    } else {
                        groups[i] == g
                    }
                })
                .filter(|&i| x[i].is_finite() && y[i].is_finite())
                .map(|i| (x[i], y[i]))
                .collect();
            let col = if g == "other" { GREY } else { PALETTE[k] };
            c.draw_series(
                pts.into_iter()
                    .map(|p| Circle::new(p, 3, col.mix(0.7).filled())),
            )
            .map_err(plot_err)?
            .label(g)
            .legend(move |(x, y)| Circle::new((x + 6, y), 4, col.filled()));
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    })
}

/// Frequency score (x) against alignment (y), one colour per domain.
pub fn frequency_vs_alignment(
    freq: &[f64],
    align: &[f64],
    domains: &[String],
    title: &str,
) -> Result<Rendered> {
    scatter_by_group(
        freq,
        align,
        domains,
        title,
        "sentence frequency score (1-gram)",
        "alignment cos(g(X), J_i)",
    )
}

/// Lines (one per named series of (x, y) points) over training steps (integer x ticks), e.g.
/// losses; `counts`: the y values are counts too (integer y ticks).
pub fn line_series(
    series: &[(String, Vec<(f64, f64)>)],
    title: &str,
    xdesc: &str,
    ydesc: &str,
    counts: bool,
) -> Result<Rendered> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.0), h.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.1), h.max(p.1)));
    let (x0, x1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x0, x1.max(x0 + 1e-9))
    };
    let (y0, y1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (y0, y1.max(y0 + 1e-9))
    };
    let pad = (y1 - y0) * 0.05;
    render!((720, 420), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(plot_err)?;
        let mut mesh = c.configure_mesh();
        mesh.x_desc(xdesc)
            .y_desc(ydesc)
            .x_label_formatter(&integer_label);
        if counts {
            mesh.y_label_formatter(&integer_label);
        }
        mesh.draw().map_err(plot_err)?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let col = PALETTE[k % PALETTE.len()];
            c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
            // Markers too, so that a series with a single point still shows (long series get none).
            if pts.len() <= 50 {
                c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))
                    .map_err(plot_err)?;
            }
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    })
}

/// Cosine-normalised kernels K_ij / √(K_ii K_jj) of the samples `order` (already ordered), one
/// panel per (title, kernel), with a shared blue (−1) – white (0) – orange (+1) scale; black
/// lines mark the positions in `boundaries` (where the expert or domain changes).
pub fn ntk_heatmaps(
    panels: &[(&str, &Tensor)],
    order: &[usize],
    boundaries: &[usize],
    caption: &str,
) -> Result<Rendered> {
    let n = order.len();
    // Colours of every cell, computed once for both backends.
    let colours: Vec<Vec<RGBColor>> = panels
        .iter()
        .map(|(_, k)| {
            let diag: Vec<f64> = order
                .iter()
                .map(|&i| k.double_value(&[i as i64, i as i64]).max(1e-300))
                .collect();
            let mut cells = Vec::with_capacity(n * n);
            for (a, &i) in order.iter().enumerate() {
                for (b, &j) in order.iter().enumerate() {
                    let v = (k.double_value(&[i as i64, j as i64]) / (diag[a] * diag[b]).sqrt())
                        .clamp(-1.0, 1.0);
                    let (r, g, bl) = if v >= 0.0 {
                        (
                            255.0 - (255.0 - 213.0) * v,
                            255.0 - (255.0 - 94.0) * v,
                            255.0 * (1.0 - v),
                        )
                    } else {
                        let u = -v;
                        (
                            255.0 * (1.0 - u),
                            255.0 - (255.0 - 114.0) * u,
                            255.0 - (255.0 - 178.0) * u,
                        )
                    };
                    cells.push(RGBColor(r as u8, g as u8, bl as u8));
                }
            }
            cells
        })
        .collect();
    let w = 360 * panels.len().max(1) as u32;
    render!((w, 400), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(caption, ("sans-serif", 18)).map_err(plot_err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (((title, _), area), cols) in panels.iter().zip(areas).zip(&colours) {
            let mut c = ChartBuilder::on(&area)
                .caption(*title, ("sans-serif", 16))
                .margin(8)
                .build_cartesian_2d(0..n as i32, 0..n as i32)
                .map_err(plot_err)?;
            let cells = (0..n).flat_map(|a| {
                (0..n).map(move |b| {
                    Rectangle::new(
                        [
                            (b as i32, (n - 1 - a) as i32),
                            (b as i32 + 1, (n - a) as i32),
                        ],
                        cols[a * n + b].filled(),
                    )
                })
            });
            c.draw_series(cells).map_err(plot_err)?;
            for &b in boundaries {
                let (b, m) = (b as i32, n as i32);
                c.draw_series([
                    PathElement::new(vec![(b, 0), (b, m)], BLACK.stroke_width(1)),
                    PathElement::new(vec![(0, m - b), (m, m - b)], BLACK.stroke_width(1)),
                ])
                .map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    })
}

/// A named series of (mean, low, high) per category, `None` where it has no value.
pub type IntervalSeries = (String, Vec<Option<(f64, f64, f64)>>);

/// Means with intervals per category (x) and series (dots side by side within a category, with
/// error bars), and a dashed zero line: e.g. loss changes per selection criterion and group.
/// `series[k].1[j]`: (mean, low, high) of series k in category j, or `None`.
pub fn interval_dots(
    categories: &[String],
    series: &[IntervalSeries],
    title: &str,
    ydesc: &str,
) -> Result<Rendered> {
    let vals: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .flat_map(|&(m, l, h)| [m, l, h])
        .filter(|v| v.is_finite())
        .chain([0.0])
        .collect();
    let (y0, y1) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let k = series.len().max(1) as f64;
    let labels: Vec<String> = categories.to_vec();
    render!((820, 460), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                -0.5f64..(categories.len() as f64 - 0.5),
                (y0 - pad)..(y1 + pad),
            )
            .map_err(plot_err)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(categories.len().max(1))
            .x_label_formatter(&|x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                    labels[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(ydesc)
            .draw()
            .map_err(plot_err)?;
        c.draw_series(DashedLineSeries::new(
            vec![(-0.5, 0.0), (categories.len() as f64 - 0.5, 0.0)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(plot_err)?;
        for (s, (name, pts)) in series.iter().enumerate() {
            let col = PALETTE[s % PALETTE.len()];
            let off = (s as f64 - (k - 1.0) / 2.0) * 0.6 / k;
            let present: Vec<(f64, (f64, f64, f64))> = pts
                .iter()
                .enumerate()
                .filter_map(|(j, p)| p.filter(|q| q.0.is_finite()).map(|q| (j as f64 + off, q)))
                .collect();
            c.draw_series(
                present
                    .iter()
                    .filter(|p| p.1 .1.is_finite())
                    .map(|&(x, (m, l, h))| {
                        ErrorBar::new_vertical(x, l, m, h, col.stroke_width(2), 8)
                    }),
            )
            .map_err(plot_err)?;
            c.draw_series(
                present
                    .iter()
                    .map(|&(x, (m, _, _))| Circle::new((x, m), 5, col.filled())),
            )
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, col.filled()));
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    })
}

/// Lines with error bars, one per series, over shared x positions `xs` labelled `xlabels` (e.g.
/// counts at log₂ positions), and a dashed horizontal reference line at `reference` (e.g. one
/// half): e.g. the share of facts acquired against how often they were read, one line per run.
/// `series[k].1[j]`: (mean, low, high) of series k at `xs[j]`, or `None`.
pub fn interval_lines(
    xs: &[f64],
    xlabels: &[String],
    series: &[IntervalSeries],
    reference: Option<f64>,
    title: &str,
    (xdesc, ydesc): (&str, &str),
) -> Result<Rendered> {
    let vals: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .flat_map(|&(m, l, h)| [m, l, h])
        .chain(reference)
        .filter(|v| v.is_finite())
        .collect();
    let (y0, y1) = vals
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let (y0, y1) = if vals.is_empty() {
        (0.0, 1.0)
    } else {
        (y0, y1)
    };
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (x0, x1) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let (x0, x1) = if xs.is_empty() {
        (0.0, 1.0)
    } else {
        (x0 - 0.3, x1 + 0.3)
    };
    let k = series.len().max(1) as f64;
    render!((820, 460), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(plot_err)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(xs.len().max(2) * 4)
            .x_label_formatter(&|x: &f64| {
                xs.iter()
                    .position(|v| (v - x).abs() < 1e-6)
                    .and_then(|j| xlabels.get(j).cloned())
                    .unwrap_or_default()
            })
            .x_desc(xdesc)
            .y_desc(ydesc)
            .draw()
            .map_err(plot_err)?;
        if let Some(r) = reference {
            c.draw_series(DashedLineSeries::new(
                vec![(x0, r), (x1, r)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(plot_err)?;
        }
        for (s, (name, pts)) in series.iter().enumerate() {
            let col = PALETTE[s % PALETTE.len()];
            let off = (s as f64 - (k - 1.0) / 2.0) * 0.12 / k;
            let present: Vec<(f64, (f64, f64, f64))> = pts
                .iter()
                .zip(xs)
                .filter_map(|(p, &x)| p.filter(|q| q.0.is_finite()).map(|q| (x + off, q)))
                .collect();
            c.draw_series(
                present
                    .iter()
                    .filter(|p| p.1 .1.is_finite() && p.1 .2.is_finite())
                    .map(|&(x, (m, l, h))| {
                        ErrorBar::new_vertical(x, l, m, h, col.stroke_width(1), 6)
                    }),
            )
            .map_err(plot_err)?;
            c.draw_series(LineSeries::new(
                present.iter().map(|&(x, (m, _, _))| (x, m)),
                col.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            c.draw_series(
                present
                    .iter()
                    .map(|&(x, (m, _, _))| Circle::new((x, m), 4, col.filled())),
            )
            .map_err(plot_err)?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    })
}
