//! What the facts study writes: the tables (Parquet), `facts-study.md`, `findings.json` (the
//! study in sentences, each with its interval; `tailscope report --study` reads them) and the
//! acquisition figure.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::{Column, DataFrame};
use serde::Serialize;

use super::foresight::Quality;
use super::summary::{self, CurveRow, HalfCount};
use super::FactsStudy;
use crate::error::{Error, Result};
use crate::eval::facts::rows_frame;
use crate::study::Interval;

/// Write every table, the Markdown summary, the findings and the figure into `out`.
pub fn write(s: &FactsStudy, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    #[derive(Serialize)]
    struct OutcomeRow<'a> {
        seed: u64,
        run: &'a str,
        #[serde(flatten)]
        fact: &'a crate::eval::facts::FactRow,
    }
    let outcomes: Vec<OutcomeRow> = s
        .outcomes
        .iter()
        .map(|o| OutcomeRow {
            seed: o.seed,
            run: &o.run,
            fact: &o.fact,
        })
        .collect();
    parquet(&outcomes, &out.join("outcomes.parquet"))?;
    parquet(&s.curves, &out.join("curves.parquet"))?;
    parquet(&s.vs_baseline, &out.join("vs_baseline.parquet"))?;
    parquet(&s.half, &out.join("half.parquet"))?;
    parquet(&s.forgetting, &out.join("forgetting.parquet"))?;
    parquet(&s.routes, &out.join("routing.parquet"))?;
    parquet(&s.development, &out.join("development.parquet"))?;
    write_foresight(s, out)?;
    crate::io::write_atomic(out.join("facts-study.md"), markdown(s).as_bytes())?;
    let json = serde_json::to_vec_pretty(&findings(s))
        .map_err(|e| Error::invalid("findings", e.to_string()))?;
    crate::io::write_atomic(out.join("findings.json"), &json)?;
    let fig = figure(s)?;
    let dir = out.join("figures");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    crate::io::write_atomic(dir.join("acquisition.svg"), fig.svg.as_bytes())?;
    crate::io::write_atomic(dir.join("acquisition.png"), &fig.png)
}

fn parquet<T: Serialize>(rows: &[T], path: &Path) -> Result<()> {
    if rows.is_empty() {
        if path.exists() {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        return Ok(());
    }
    crate::io::write_parquet(&mut rows_frame(rows)?, path)
}

/// `foresight.parquet` (seed, run, criterion, ap, auroc, positives, n) and `truth.parquet`
/// (seed, run, the fact's outcome, and a `score_<criterion>` column per criterion).
fn write_foresight(s: &FactsStudy, out: &Path) -> Result<()> {
    #[derive(Serialize)]
    struct Q<'a> {
        seed: u64,
        run: &'a str,
        #[serde(flatten)]
        q: &'a super::foresight::Quality,
    }
    let q: Vec<Q> = s
        .quality
        .iter()
        .map(|(seed, run, q)| Q {
            seed: *seed,
            run,
            q,
        })
        .collect();
    parquet(&q, &out.join("foresight.parquet"))?;
    let t = &s.truth;
    if t.is_empty() {
        return Ok(());
    }
    let mut cols = vec![
        Column::new("seed".into(), t.iter().map(|x| x.0).collect::<Vec<_>>()),
        Column::new(
            "run".into(),
            t.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "fact_id".into(),
            t.iter().map(|x| x.2.fact_id.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "relation".into(),
            t.iter().map(|x| x.2.relation.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "count".into(),
            t.iter().map(|x| x.2.count).collect::<Vec<_>>(),
        ),
        Column::new(
            "acquired_end".into(),
            t.iter().map(|x| x.2.acquired_end).collect::<Vec<_>>(),
        ),
        Column::new(
            "first_rate_end".into(),
            t.iter().map(|x| x.2.first_rate_end).collect::<Vec<_>>(),
        ),
        Column::new(
            "gain".into(),
            t.iter().map(|x| x.2.gain).collect::<Vec<_>>(),
        ),
        Column::new(
            "specific_gain".into(),
            t.iter().map(|x| x.2.specific_gain).collect::<Vec<_>>(),
        ),
        Column::new(
            "flagged".into(),
            t.iter().map(|x| x.2.flagged).collect::<Vec<_>>(),
        ),
    ];
    for (k, (name, _)) in t[0].2.scores.iter().enumerate() {
        cols.push(Column::new(
            format!("score_{name}").into(),
            t.iter().map(|x| x.2.scores[k].1).collect::<Vec<_>>(),
        ));
    }
    let mut df = DataFrame::new(t.len(), cols).map_err(|e| Error::table("truth table", e))?;
    crate::io::write_parquet(&mut df, out.join("truth.parquet"))
}

fn cell(i: Option<(f64, f64, f64)>, digits: usize) -> String {
    match i {
        Some((m, l, h)) if l.is_finite() => format!("{m:.digits$} [{l:.digits$}, {h:.digits$}]"),
        Some((m, _, _)) => format!("{m:.digits$}"),
        None => "–".into(),
    }
}

fn signed(i: Option<(f64, f64, f64)>, digits: usize) -> String {
    match i {
        Some((m, l, h)) => format!("{m:+.digits$} [{l:+.digits$}, {h:+.digits$}]"),
        None => "–".into(),
    }
}

fn find(rows: &[CurveRow], run: &str, count: u32, m: &str) -> Option<(f64, f64, f64)> {
    rows.iter()
        .find(|r| r.run == run && r.count == count && r.metric == m)
        .map(|r| (r.mean, r.low, r.high))
}

fn iv(i: &Interval) -> Option<(f64, f64, f64)> {
    Some((i.mean, i.low, i.high))
}

/// The half-acquisition count in words: "k ≈ 3.2 [1.8, 7.1]", "not reached by k = 16".
pub fn half_words(h: &HalfCount, largest: u32) -> String {
    let bound = |x: Option<f64>| x.map_or(format!("> {largest}"), |v| format!("{v:.1}"));
    match h.count {
        Some(k) => format!("k ≈ {k:.1} [{}, {}]", bound(h.low), bound(h.high)),
        None => format!(
            "not reached by k = {largest} (95%: [{}, {}])",
            bound(h.low),
            bound(h.high)
        ),
    }
}

fn counts(s: &FactsStudy) -> Vec<u32> {
    let mut c: Vec<u32> = s.curves.iter().map(|r| r.count).collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// "one epoch", or "E epochs (a fact of count k read E·k times)".
fn epochs_text(e: u64) -> String {
    match e {
        1 => "one epoch".into(),
        _ => format!("{e} epochs, a fact of count k read {e}·k times, over"),
    }
}

/// `facts-study.md`.
pub fn markdown(s: &FactsStudy) -> String {
    let ks = counts(s);
    let largest = ks.last().copied().unwrap_or(0);
    let z = &s.sizes;
    let mut md = format!(
        "# Once read is enough? Facts study\n\nBlocks trained: {} (`{}`, last {}). Per run: {} \
         steps of {} texts, {} ({} host sentences + {} fact sentences, {} tokens); {} \
         facts + {} never-inserted controls. Wall time of this invocation: {:.1} min.\n\n",
        s.choice.name,
        super::scope_name(s.choice.train),
        s.choice.last_k,
        z.steps,
        z.batch,
        epochs_text(z.epochs),
        z.host_train,
        z.fact_rows,
        z.tokens,
        z.facts,
        z.controls,
        z.seconds / 60.0
    );
    md.push_str(
        "## Acquired share by count (mean over seeds and facts, 95% crossed-bootstrap interval; \
         the controls: mean over seeds, 95% t interval on the logit scale)\n\n| run |",
    );
    for k in &ks {
        md.push_str(&format!(" k = {k} |"));
    }
    md.push_str(" never read (controls) | half acquisition |\n|---|");
    md.push_str(&"---|".repeat(ks.len() + 2));
    md.push('\n');
    for run in &s.runs {
        md.push_str(&format!("| {run} |"));
        for &k in &ks {
            md.push_str(&format!(
                " {} |",
                cell(find(&s.curves, run, k, "acquired"), 2)
            ));
        }
        let h = s.half.iter().find(|h| &h.run == run);
        md.push_str(&format!(
            " {} | {} |\n",
            cell(controls_acquired(s, run), 2),
            h.map_or("–".into(), |h| half_words(h, largest))
        ));
    }
    md.push_str(&table_by_count(
        s,
        &ks,
        &s.curves,
        "gain",
        "Mean log-probability gain of the answer over the base model (nats)",
        false,
    ));
    md.push_str(&table_by_count(
        s,
        &ks,
        &s.curves,
        "specific_gain",
        "Specific gain: the answer's gain less its distractors' mean gain (nats; the part of the \
         gain that is about this fact rather than the relation's answers in general)",
        false,
    ));
    md.push_str(&table_by_count(
        s,
        &ks,
        &s.vs_baseline,
        "acquired",
        &format!(
            "Acquired share against {}, paired by seed and fact",
            s.baseline
        ),
        true,
    ));
    md.push_str(&table_by_count(
        s,
        &ks,
        &s.vs_baseline,
        "gain",
        &format!(
            "Gain against {}, paired by seed and fact (nats)",
            s.baseline
        ),
        true,
    ));
    md.push_str(&rest(s));
    md
}

fn table_by_count(
    s: &FactsStudy,
    ks: &[u32],
    rows: &[CurveRow],
    m: &str,
    title: &str,
    paired: bool,
) -> String {
    let mut md = format!("\n## {title}\n\n| run |");
    for k in ks {
        md.push_str(&format!(" k = {k} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(ks.len()));
    md.push('\n');
    for run in s.runs.iter().filter(|r| !paired || **r != s.baseline) {
        md.push_str(&format!("| {run} |"));
        for &k in ks {
            let c = find(rows, run, k, m);
            md.push_str(&format!(
                " {} |",
                if paired { signed(c, 2) } else { cell(c, 2) }
            ));
        }
        md.push('\n');
    }
    md
}

/// Forgetting, routing, foresight, development and the chance check.
fn rest(s: &FactsStudy) -> String {
    let mut md = String::from(
        "\n## Forgetting: held-out host perplexity (mean over seeds, 95% t interval)\n\n| run | \
         before (base) | after | change vs base | vs baseline (paired by seed) |\n|---|---|---|---|---|\n",
    );
    for r in summary::forgetting(&s.forgetting, &s.runs, &s.baseline) {
        md.push_str(&format!(
            "| {} | {:.2} | {} | {}% | {} |\n",
            r.run,
            r.before,
            cell(iv(&r.after), 2),
            signed(iv(&r.change), 1),
            r.vs_baseline
                .as_ref()
                .map_or("–".into(), |v| format!("{}%", signed(iv(v), 1)))
        ));
    }
    let routing = summary::routing(&s.routes);
    if !routing.is_empty() {
        md.push_str(
            "\n## Routing of fact texts (one per inserted fact) and held-out host texts\n\n| run | \
             block | experts | experts reached by facts | facts' top expert: share of facts | its \
             share of host texts |\n|---|---|---|---|---|---|\n",
        );
        for r in routing {
            md.push_str(&format!(
                "| {} | h{} | {:.2} | {:.2} | {} | {} |\n",
                r.run,
                r.block,
                r.experts,
                r.fact_experts,
                cell(iv(&r.top_fact_share), 2),
                cell(iv(&r.top_host_share), 2)
            ));
        }
    }
    md.push_str(&foresight_md(s));
    md.push_str(&development_md(s));
    if let Some(c) = &s.chance {
        md.push_str(&format!(
            "\nBase model on the invented facts (all {} facts, held-out probes): first-rank rate \
             {:.3} [{:.3}, {:.3}] against chance {:.3} ({}).\n",
            c.facts,
            c.rate,
            c.low,
            c.high,
            c.chance,
            if c.at_chance {
                "at chance"
            } else {
                "not at chance"
            }
        ));
    }
    if let Some(t) = &s.sizes.trunk {
        md.push_str(&format!(
            "\nTrunk cache: {} texts computed in {:.1} s ({:.1} ms each), {} served from the cache \
             (≈ {:.1} s of trunk passes not recomputed), {:.0} MB held.\n",
            t.computed,
            t.seconds,
            1000.0 * t.seconds_per_row(),
            t.hits,
            t.hits as f64 * t.seconds_per_row(),
            t.bytes as f64 / 1e6
        ));
    }
    md
}

/// The development seed's block choices (empty without `[[choice]]`s).
fn development_md(s: &FactsStudy) -> String {
    let mut md = String::new();
    if s.development.is_empty() {
        return md;
    }
    md.push_str("\n## Development seed: which blocks train\n\n| choice | trains | last blocks | parameters | acquired share | mean gain | chosen |\n|---|---|---|---|---|---|---|\n");
    for d in &s.development {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:+.3} | {} |\n",
            d.choice,
            d.train,
            d.last_k,
            d.params,
            d.acquired,
            d.gain,
            if d.chosen { "yes" } else { "" }
        ));
    }
    md
}

/// Per (run, criterion): each seed's AP, AUROC and share of facts not acquired.
type ApAuroc = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Per criterion: AP and AUROC for "not acquired at the end", mean over seeds per run.
fn foresight_md(s: &FactsStudy) -> String {
    if s.quality.is_empty() {
        return String::new();
    }
    let mut by: BTreeMap<(String, String), ApAuroc> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (_, run, q) in &s.quality {
        if !order.contains(&q.criterion) {
            order.push(q.criterion.clone());
        }
        let e = by.entry((run.clone(), q.criterion.clone())).or_default();
        e.0.extend(q.ap);
        e.1.extend(q.auroc);
        e.2.push(q.positives as f64 / q.n.max(1) as f64);
    }
    let mut md = String::from(
        "\n## Foresight: ranking at a quarter of the steps the facts not acquired at the end \
         (AP / AUROC, mean over seeds with 95% t interval; random AP ≈ the share not acquired)\n\n| criterion |",
    );
    for r in &s.runs {
        md.push_str(&format!(" {r}: AP | {r}: AUROC |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|---|".repeat(s.runs.len()));
    md.push('\n');
    for c in &order {
        md.push_str(&format!("| {c} |"));
        for r in &s.runs {
            let e = by.get(&(r.clone(), c.clone()));
            let t = |v: &Vec<f64>| {
                (!v.is_empty())
                    .then(|| crate::study::t_interval(v))
                    .and_then(|i| iv(&i))
            };
            md.push_str(&format!(
                " {} | {} |",
                cell(e.and_then(|e| t(&e.0)), 3),
                cell(e.and_then(|e| t(&e.1)), 3)
            ));
        }
        md.push('\n');
    }
    md.push_str("| (share not acquired) |");
    for r in &s.runs {
        let share = by
            .iter()
            .find(|((run, _), _)| run == r)
            .map(|(_, e)| e.2.iter().sum::<f64>() / e.2.len().max(1) as f64);
        md.push_str(&format!(
            " {} | |",
            share.map_or("–".into(), |v| format!("{v:.3}"))
        ));
    }
    md.push('\n');
    let vs = flag_against(&s.quality);
    if !vs.is_empty() {
        md.push_str(
            "\nThe flag score against each criterion: AP(flag) − AP, paired by run and seed, the runs \
             of a seed averaged (95% t interval over seeds):\n\n| criterion | AP(flag) − AP | seeds |\n|---|---|---|\n",
        );
        for (c, d, n) in &vs {
            md.push_str(&format!(
                "| {c} | {:+.3} [{:+.3}, {:+.3}] | {n} |\n",
                d.mean, d.low, d.high
            ));
        }
    }
    md
}

/// The acquired share of the never-inserted controls after training: per seed the share over
/// controls, then the mean over seeds with a 95% t interval on the logit scale (inside [0, 1]).
fn controls_acquired(s: &FactsStudy, run: &str) -> Option<(f64, f64, f64)> {
    let mut by: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for o in s
        .outcomes
        .iter()
        .filter(|o| o.run == run && o.fact.count == 0)
    {
        let e = by.entry(o.seed).or_default();
        e.0 += f64::from(u8::from(o.fact.acquired));
        e.1 += 1.0;
    }
    let v: Vec<f64> = by.values().map(|(a, n)| a / n).collect();
    (!v.is_empty())
        .then(|| crate::study::bounded_interval(&v, 0.0, 1.0))
        .and_then(|i| iv(&i))
}

/// AP(flag) − AP(criterion) at foresight for every other criterion of `quality` (seed, run,
/// quality): differences paired by run and seed, averaged over the runs of a seed (they share
/// its facts, corpus and data order, so a seed is the independent unit), then a t interval over
/// seeds. Pairs where either AP is undefined are left out; the count is of seeds.
pub fn flag_against(quality: &[(u64, String, Quality)]) -> Vec<(String, Interval, usize)> {
    let flag = crate::analysis::select::Criterion::Flag.name();
    let ap = |seed: u64, run: &str, c: &str| {
        quality
            .iter()
            .find(|(sd, r, q)| *sd == seed && r == run && q.criterion == c)
            .and_then(|(_, _, q)| q.ap)
    };
    let mut out = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (_, _, q) in quality {
        if q.criterion != flag && !names.contains(&q.criterion.as_str()) {
            names.push(&q.criterion);
        }
    }
    for c in names {
        let mut by_seed: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for (seed, run, q) in quality.iter().filter(|(_, _, q)| q.criterion == flag) {
            if let Some(d) = q.ap.zip(ap(*seed, run, c)).map(|(a, b)| a - b) {
                by_seed.entry(*seed).or_default().push(d);
            }
        }
        let d: Vec<f64> = by_seed
            .values()
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
            .collect();
        if !d.is_empty() {
            out.push((c.to_string(), crate::study::t_interval(&d), d.len()));
        }
    }
    out
}

/// The study in sentences, each with its interval (a direction only when it excludes 0).
pub fn findings(s: &FactsStudy) -> Vec<String> {
    let ks = counts(s);
    let largest = ks.last().copied().unwrap_or(0);
    let mut out = Vec::new();
    for run in &s.runs {
        let k1 = find(&s.curves, run, ks.first().copied().unwrap_or(1), "acquired");
        let h = s.half.iter().find(|h| &h.run == run);
        out.push(format!(
            "Facts study: {run} acquired {} of the facts read k = {} time(s); half acquisition at {}.",
            cell(k1, 2),
            ks.first().copied().unwrap_or(1),
            h.map_or("–".into(), |h| half_words(h, largest))
        ));
    }
    for r in s.runs.iter().filter(|r| **r != s.baseline) {
        for &k in &ks {
            if let Some((m, l, h)) = find(&s.vs_baseline, r, k, "acquired") {
                let word = if l > 0.0 {
                    "more"
                } else if h < 0.0 {
                    "fewer"
                } else {
                    "no difference detectable"
                };
                out.push(format!(
                    "Facts study: {r} against {} at k = {k}: acquired share {m:+.2} [{l:+.2}, {h:+.2}] ({word}; paired by seed and fact).",
                    s.baseline
                ));
            }
        }
    }
    for (c, d, n) in flag_against(&s.quality)
        .into_iter()
        .filter(|x| matches!(x.0.as_str(), "loss" | "uncertainty"))
    {
        let word = if d.low > 0.0 {
            "the flags foresee the facts not acquired better"
        } else if d.high < 0.0 {
            "the flags foresee them worse"
        } else {
            "no difference detectable"
        };
        out.push(format!(
            "Facts study: foresight AP of the flag score minus {c}'s {:+.3} [{:+.3}, {:+.3}] ({word}; paired by run and seed, over {n} seeds).",
            d.mean, d.low, d.high
        ));
    }
    if let Some(c) = &s.chance {
        out.push(format!(
            "Facts study: before training the invented facts rank first at rate {:.3} [{:.3}, {:.3}] against chance {:.3} ({}).",
            c.rate, c.low, c.high, c.chance, if c.at_chance { "at chance" } else { "not at chance" }
        ));
    }
    out
}

/// Acquired share against the count, one line per run, with a dashed line at one half.
pub fn figure(s: &FactsStudy) -> Result<crate::plots::Rendered> {
    let ks = counts(s);
    let xs: Vec<f64> = ks.iter().map(|&k| f64::from(k).log2()).collect();
    let labels: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
    let series: Vec<crate::plots::IntervalSeries> = s
        .runs
        .iter()
        .map(|r| {
            (
                r.clone(),
                ks.iter()
                    .map(|&k| find(&s.curves, r, k, "acquired"))
                    .collect(),
            )
        })
        .collect();
    crate::plots::interval_lines(
        &xs,
        &labels,
        &series,
        Some(0.5),
        "Facts acquired against how often they were read (95% intervals over seeds and facts)",
        (
            "times the fact was read (k, log scale)",
            "share of facts acquired",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(seed: u64, run: &str, c: &str, ap: Option<f64>) -> (u64, String, Quality) {
        let quality = Quality {
            criterion: c.into(),
            ap,
            auroc: ap,
            positives: 2,
            n: 4,
        };
        (seed, run.into(), quality)
    }

    /// Differences are paired by run and seed and averaged over a seed's runs; a pair with an
    /// undefined AP is left out.
    #[test]
    fn flag_against_pairs_by_run_and_seed() {
        let rows = vec![
            q(1, "dense", "flag", Some(0.9)),
            q(1, "dense", "loss", Some(0.5)),
            q(2, "dense", "flag", Some(0.6)),
            q(2, "dense", "loss", Some(0.6)),
            q(1, "cse", "flag", Some(0.7)),
            q(1, "cse", "loss", Some(0.9)),
            q(2, "cse", "flag", None),
            q(2, "cse", "loss", Some(0.1)),
        ];
        let v = flag_against(&rows);
        assert_eq!(v.len(), 1);
        let (c, d, n) = &v[0];
        assert_eq!((c.as_str(), *n), ("loss", 2));
        // Seed 1: (0.4 − 0.2)/2 = 0.1; seed 2: 0.0 (cse's pair undefined) → mean 0.05.
        assert!((d.mean - 0.05).abs() < 1e-12, "{d:?}");
    }
}
