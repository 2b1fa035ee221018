//! `tailscope study`: the counterfactual selection study ([`crate::study`]), flag ranking,
//! CSE against dense and Switch, and the facts study ([`crate::study::facts`]).

use std::path::PathBuf;

use clap::Args;

use super::progress::Bars;
use super::train::{ctrl_c_flag, RunBars};
use super::Global;
use crate::study::{self, StudySpec};

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope study analyses/selection-study.toml   (writes out/selection-study)\n  \
    tailscope study analyses/ranking-study.toml     (flag ranking quality; out/ranking-study)\n  \
    tailscope study analyses/cse-study.toml         (CSE vs dense vs Switch; out/cse-study)\n  \
    tailscope study analyses/facts-study.toml       (facts at controlled counts; out/facts-study)")]
pub struct StudyArgs {
    /// The study spec (TOML).
    #[arg(
        value_name = "SPEC",
        long_help = "The study spec: [data] (corpus, or [data.synth] to generate it), [model] and \
            [train] (the base model), [select] (pool, top, criteria), [continue] (steps, lr, \
            share: the expected share of selected samples per batch), seeds and out (the selection \
            study); or [ranking] (seeds, fit_seeds, rare_shares or corpus and base_model, pool, \
            train_samples, reference, checkpoints, counterfactual, fit_truth, frozen_model, \
            criteria, out), [model], [train] and [counterfactual] (the neglect ranking study: \
            fits and scores the neglect score against synthetic and counterfactual truths); or [experts] (seeds, \
            corpus, ingest, eval_samples, probe_samples, ntk_samples, baseline, out), [model], \
            [train] and [[run]]s (CSE against dense and Switch-MoE); or [facts] (seeds, \
            dev_seed, host, corpus, counts, facts_per_count, controls, host_samples, foresight, \
            out), [base], [train], [[run]]s and [[choice]]s (the knowledge-acquisition benchmark: \
            fictional facts at controlled counts, one epoch of continued training). See \
            analyses/selection-study.toml, analyses/ranking-study.toml, analyses/cse-study.toml, \
            analyses/facts-study.toml and the README. Finished \
            training runs are reused on a rerun."
    )]
    pub spec: PathBuf,
}

/// A study function run with the CLI's device, Ctrl-C flag (training stops with a checkpoint)
/// and progress bars.
fn with_study<T>(
    g: &Global,
    f: impl FnOnce(
        tch::Device,
        &std::sync::atomic::AtomicBool,
        &Bars,
        &RunBars,
    ) -> crate::error::Result<T>,
) -> anyhow::Result<T> {
    let device = crate::device::resolve(g.device)?;
    let stop = ctrl_c_flag();
    Ok(f(device, &stop, &Bars::default(), &RunBars::default())?)
}

/// `tailscope study`: a `[ranking]` spec runs the flag ranking study, any other the selection
/// study.
pub fn run(a: &StudyArgs, g: &Global) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.spec).map_err(|e| crate::error::Error::io(&a.spec, e))?;
    if text.lines().any(|l| l.trim() == "[ranking]") {
        return run_ranking(a, g);
    }
    if text.lines().any(|l| l.trim() == "[experts]") {
        return run_experts(a, g);
    }
    if text.lines().any(|l| l.trim() == "[facts]") {
        return run_facts(a, g);
    }
    let spec = StudySpec::read(&a.spec)?;
    let s = with_study(g, |d, stop, bars, runs| {
        study::run(&spec, d, stop, bars, runs, |m| tracing::info!("{m}"))
    })?;
    println!(
        "held-out mean token loss change against continuing without a selection ({} seeds; \
         negative: the selection helped; 95% t intervals):",
        spec.seeds.len()
    );
    print!("{}", s.markdown());
    println!("NTK-based flag score against the other criteria (loss(flag) − loss(other)):");
    for c in s
        .comparisons
        .iter()
        .filter(|c| c.a == "flag" && c.b != "base" && c.b != study::CONTROL)
    {
        println!(
            "  vs {:<12} {:<9} {:+.4} [{:+.4}, {:+.4}]{}",
            c.b,
            c.group,
            c.diff.mean,
            c.diff.low,
            c.diff.high,
            match c.diff.sign() {
                -1 => "  flag better",
                1 => "  flag worse",
                _ => "",
            }
        );
    }
    println!(
        "wrote {}/results.parquet, summary.parquet, comparisons.parquet, study.md, \
         figures/selection_study.{{svg,png}}",
        spec.out.display()
    );
    Ok(())
}

/// `tailscope study` of a `[ranking]` spec.
fn run_ranking(a: &StudyArgs, g: &Global) -> anyhow::Result<()> {
    use crate::study::ranking::{self, RankingSpec};
    let spec = RankingSpec::read(&a.spec)?;
    let s = with_study(g, |d, stop, bars, runs| {
        ranking::run(&spec, d, stop, bars, runs, |m| tracing::info!("{m}"))
    })?;
    let r = &spec.ranking;
    let held: Vec<String> = r
        .seeds
        .iter()
        .filter(|x| !r.fit_seeds.contains(x))
        .map(|x| x.to_string())
        .collect();
    println!(
        "ranking quality of the neglect score and every criterion (held-out seeds {}; models \
         fitted on seeds {:?}):",
        held.join(", "),
        r.fit_seeds
    );
    print!("{}", s.markdown());
    println!(
        "wrote {}/ranking.parquet, summary.parquet, comparisons.parquet, models.toml, \
         fitted-model.toml, ranking.md",
        r.out.display()
    );
    Ok(())
}

/// `tailscope study` of an `[experts]` spec.
fn run_experts(a: &StudyArgs, g: &Global) -> anyhow::Result<()> {
    use crate::study::experts::{self, ExpertsSpec};
    let spec = ExpertsSpec::read(&a.spec)?;
    let s = with_study(g, |d, stop, bars, runs| {
        experts::run(&spec, d, stop, bars, runs, |m| tracing::info!("{m}"))
    })?;
    println!(
        "{} seeds; means with 95% t intervals; against {} paired by seed:",
        spec.experts.seeds.len(),
        s.baseline
    );
    print!("{}", s.markdown());
    println!(
        "wrote {}/results.parquet, summary.parquet, comparisons.parquet, experts.md, \
         figures/cse_study.{{svg,png}}",
        spec.experts.out.display()
    );
    Ok(())
}

/// `tailscope study` of a `[facts]` spec.
fn run_facts(a: &StudyArgs, g: &Global) -> anyhow::Result<()> {
    use crate::study::facts::{self, tables, FactsStudySpec};
    let spec = FactsStudySpec::read(&a.spec)?;
    let s = with_study(g, |d, stop, bars, runs| {
        facts::run(&spec, d, stop, bars, runs, |m| tracing::info!("{m}"))
    })?;
    print!("{}", tables::markdown(&s));
    println!(
        "wrote {}/outcomes.parquet, curves.parquet, vs_baseline.parquet, half.parquet, \
         forgetting.parquet, routing.parquet, foresight.parquet, truth.parquet, facts-study.md, \
         findings.json, figures/acquisition.{{svg,png}}",
        spec.facts.out.display()
    );
    Ok(())
}
