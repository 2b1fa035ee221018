//! The report's lead, "What this model neglects": the flagged texts, best first, each with its
//! evidence in words — the neglect score, its loss against tokens at the same positions, the
//! reducible loss, how fast the training data lowers it and how much of its gradient the training
//! texts share, each against the analysed set's median, and its domain's |GC| — and its nearest
//! training texts by gradient cosine, from the analysis's `flags.parquet`, `analysis.parquet` and
//! `neighbours.parquet`. Statistics an analysis did not compute are left out of the words.

use std::collections::HashMap;
use std::path::Path;

use crate::error::Result;
use crate::io::{column_f64, column_str, read_parquet};

/// Texts shown in the lead (the table at the end of the page has every flag).
pub const SHOWN: usize = 10;

/// One flagged text with its evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Sample id.
    pub id: String,
    /// Domain.
    pub domain: String,
    /// The text.
    pub text: String,
    /// The neglect score.
    pub score: f64,
    /// The evidence, one sentence.
    pub evidence: String,
    /// Nearest training texts: (text, cosine), best first.
    pub near: Vec<(String, f64)>,
}

/// The lead: how many were flagged of how many, and the first [`SHOWN`] with their evidence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Neglected {
    /// Samples analysed.
    pub analysed: usize,
    /// Samples flagged.
    pub flagged: usize,
    /// The first flagged texts.
    pub items: Vec<Item>,
}

/// The median of the finite values (NaN when none).
fn median(v: &[f64]) -> f64 {
    let mut x: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    let m = x.len() / 2;
    if x.len() % 2 == 0 {
        (x[m - 1] + x[m]) / 2.0
    } else {
        x[m]
    }
}

/// A column of a table, or NaNs when the analysis did not compute it.
fn optional(df: &polars::prelude::DataFrame, name: &str, path: &Path, n: usize) -> Vec<f64> {
    column_f64(df, name, path).unwrap_or_else(|_| vec![f64::NAN; n])
}

/// The evidence sentence of one flag, from its statistics and the analysed set's medians.
pub fn evidence(v: &HashMap<&str, f64>, med: &HashMap<&str, f64>, domain: &str) -> String {
    let get = |k: &str| v.get(k).copied().filter(|x| x.is_finite());
    let mut parts = Vec::new();
    if let Some(l) = get("loss") {
        let mut p = format!("loss {l:.2} nats a token");
        if let Some(e) = get("excess_loss") {
            p.push_str(&format!(
                ", {} than other texts' tokens at the same positions by {:.2}",
                if e >= 0.0 { "higher" } else { "lower" },
                e.abs()
            ));
        }
        parts.push(p);
    }
    if let Some(r) = get("reducible_loss") {
        parts.push(format!(
            "the reference model's loss is {:.2} {} (reducible loss {r:+.2})",
            r.abs(),
            if r >= 0.0 { "lower" } else { "higher" }
        ));
    }
    if let (Some(d), Some(&m)) = (get("predicted_decrease"), med.get("predicted_decrease")) {
        let pace = if d <= 0.0 {
            "raises its loss or leaves it".to_string()
        } else if m > 0.0 {
            format!("lowers its loss {:.2}× as fast as the median text's", d / m)
        } else {
            "lowers its loss".to_string()
        };
        parts.push(format!(
            "training on the data {pace} (predicted decrease {d:.2e} per unit step)"
        ));
    }
    if let (Some(s), Some(m)) = (get("support"), med.get("support")) {
        parts.push(format!(
            "the training texts' gradients explain {:.0}% of its gradient (median {:.0}%)",
            100.0 * s,
            100.0 * m
        ));
    }
    if let Some(g) = get("domain_gc") {
        parts.push(format!("its domain ({domain}) has |GC| {g:.2}"));
    }
    let mut s = parts.join("; ");
    if let Some(first) = s.get(0..1) {
        s = first.to_uppercase() + &s[1..];
    }
    if !s.is_empty() {
        s.push('.');
    }
    s
}

impl Neglected {
    /// Read an analysis folder.
    pub fn read(analysis: &Path) -> Result<Neglected> {
        let ap = analysis.join("analysis.parquet");
        let a = read_parquet(&ap)?;
        let n = a.height();
        let keys = [
            "loss",
            "excess_loss",
            "reducible_loss",
            "predicted_decrease",
            "support",
            "domain_gc",
        ];
        let med: HashMap<&str, f64> = keys
            .iter()
            .map(|k| (*k, median(&optional(&a, k, &ap, n))))
            .filter(|(_, m)| m.is_finite())
            .collect();
        let fp = analysis.join("flags.parquet");
        let f = read_parquet(&fp)?;
        let m = f.height();
        let (ids, domains, texts) = (
            column_str(&f, "id", &fp)?,
            column_str(&f, "domain", &fp)?,
            column_str(&f, "text", &fp)?,
        );
        let score = column_f64(&f, "score", &fp)?;
        let cols: Vec<(&str, Vec<f64>)> =
            keys.iter().map(|k| (*k, optional(&f, k, &fp, m))).collect();
        let near = neighbours(analysis)?;
        let items = (0..m.min(SHOWN))
            .map(|i| {
                let v: HashMap<&str, f64> = cols.iter().map(|(k, c)| (*k, c[i])).collect();
                Item {
                    id: ids[i].clone(),
                    domain: domains[i].clone(),
                    text: texts[i].clone(),
                    score: score[i],
                    evidence: evidence(&v, &med, &domains[i]),
                    near: near.get(&ids[i]).cloned().unwrap_or_default(),
                }
            })
            .collect();
        Ok(Neglected {
            analysed: n,
            flagged: m,
            items,
        })
    }

    /// The opening sentence.
    fn intro(&self) -> String {
        if self.flagged == 0 {
            return format!(
                "No text of the {} analysed reaches the neglect score's threshold.",
                self.analysed
            );
        }
        format!(
            "{} of {} analysed texts are flagged as neglected: learnable, and not yet learned, by \
             the neglect score (a logistic model fitted on data; analyses/neglect-weights.toml \
             says on which). {}",
            self.flagged,
            self.analysed,
            if self.flagged > self.items.len() {
                format!(
                    "The first {} follow; the table at the end has all.",
                    self.items.len()
                )
            } else {
                String::new()
            }
        )
    }

    /// The lead as HTML.
    pub fn html(&self) -> String {
        let esc = super::esc;
        let items: String = self
            .items
            .iter()
            .map(|it| {
                let near = if it.near.is_empty() {
                    String::new()
                } else {
                    format!(
                        "<div class=\"near\">Nearest training texts: {}</div>",
                        it.near
                            .iter()
                            .map(|(t, c)| format!("“{}” (cos {c:.2})", esc(t)))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                };
                format!(
                    "<li><span class=\"text\">“{}”</span> — {}, score {:.2}<div class=\"evidence\">{}</div>{near}</li>",
                    esc(&it.text),
                    esc(&it.domain),
                    it.score,
                    esc(&it.evidence)
                )
            })
            .collect();
        format!(
            "<h2>What this model neglects</h2><p id=\"neglect-intro\">{}</p><ol id=\"neglected\">{items}</ol>",
            esc(&self.intro())
        )
    }

    /// The lead as Markdown (the notebook's first cell).
    pub fn markdown(&self) -> String {
        let mut s = format!("## What this model neglects\n\n{}\n\n", self.intro());
        for (k, it) in self.items.iter().enumerate() {
            s.push_str(&format!(
                "{}. *“{}”* — {}, score {:.2}. {}\n",
                k + 1,
                it.text,
                it.domain,
                it.score,
                it.evidence
            ));
        }
        s.push('\n');
        s
    }
}

/// Each sample's nearest training texts (`neighbours.parquet`; none when absent).
fn neighbours(analysis: &Path) -> Result<HashMap<String, Vec<(String, f64)>>> {
    let p = analysis.join("neighbours.parquet");
    if !p.exists() {
        return Ok(HashMap::new());
    }
    let df = read_parquet(&p)?;
    let (id, text, cos) = (
        column_str(&df, "id", &p)?,
        column_str(&df, "neighbour_text", &p)?,
        column_f64(&df, "cosine", &p)?,
    );
    let mut out: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for i in 0..id.len() {
        out.entry(id[i].clone())
            .or_default()
            .push((text[i].clone(), cos[i]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_states_each_number_it_has_and_nothing_else() {
        let v: HashMap<&str, f64> = [
            ("loss", 4.2),
            ("excess_loss", 0.8),
            ("reducible_loss", f64::NAN),
            ("predicted_decrease", 0.002),
            ("support", 0.12),
            ("domain_gc", 0.31),
        ]
        .into_iter()
        .collect();
        let med: HashMap<&str, f64> = [("predicted_decrease", 0.01), ("support", 0.45)]
            .into_iter()
            .collect();
        let e = evidence(&v, &med, "legal");
        assert_eq!(
            e,
            "Loss 4.20 nats a token, higher than other texts' tokens at the same positions by \
             0.80; training on the data lowers its loss 0.20× as fast as the median text's \
             (predicted decrease 2.00e-3 per unit step); the training texts' gradients explain \
             12% of its gradient (median 45%); its domain (legal) has |GC| 0.31."
        );
        assert!(
            !e.contains("reference"),
            "a statistic not computed is not mentioned"
        );
        let none: HashMap<&str, f64> = HashMap::new();
        assert_eq!(evidence(&none, &med, "x"), "");
        let up: HashMap<&str, f64> = [("predicted_decrease", -0.5)].into_iter().collect();
        assert!(evidence(&up, &med, "x").contains("raises its loss or leaves it"));
        assert_eq!(median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
