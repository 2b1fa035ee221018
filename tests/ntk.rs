//! Gradient capture and NTK correctness: every method (batched, ghost, auto) equals the exact
//! one-backward-per-sample oracle to 1e-6 relative in float64, for every output kind, on tiny
//! dense GPT and BERT, Switch-MoE and CSE (MoF, MoA, both) models, per parameter block; expert
//! blocks vanish for pairs routed elsewhere; projections converge to the exact kernel.

use tch::{nn, Device, Tensor};

use tailscope::capture::{
    capture, CaptureOptions, Method, OutputKind, Projection, ProjectionKind, Selection,
};
use tailscope::model::cse::{expand_experts, CseInit};
use tailscope::model::{
    Arch, CseConfig, CseVariant, ExpertConfig, Model, ModelConfig, SwitchConfig,
};
use tailscope::ntk::{kernel, BlockBy, Kernel};

fn tiny(arch: Arch, experts: ExpertConfig) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 17,
        max_len: 8,
        n_layer: 2,
        d_model: 8,
        n_head: 2,
        d_ffn: 12,
        dropout: 0.0,
        tie_embeddings: arch == Arch::Gpt,
        experts,
        ..ModelConfig::default()
    }
}

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![5, 6, 7, 8, 9],
        vec![10, 11],
        vec![12, 5, 5, 6, 13, 14, 15],
        vec![16, 7, 8],
        vec![9, 9, 9, 10, 11, 12],
        vec![6],
    ]
}

fn build(cfg: &ModelConfig) -> (nn::VarStore, Model) {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), cfg).unwrap();
    vs.double();
    (vs, model)
}

fn ntk(
    vs: &nn::VarStore,
    model: &Model,
    method: Method,
    output: OutputKind,
    batch: usize,
) -> Kernel {
    let params = Selection::default().select(vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let opts = CaptureOptions {
        output,
        method,
        batch,
        probes: 3,
        seed: 4,
        ..Default::default()
    };
    let c = capture(model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
    kernel(&c, None, BlockBy::Param, false).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a.abs().max().double_value(&[]).max(1e-300);
    (a - b).abs().max().double_value(&[]) / scale
}

fn assert_same(exact: &Kernel, other: &Kernel, what: &str) {
    let e = rel_err(&exact.total, &other.total);
    assert!(e < 1e-6, "{what}: total kernel differs by {e:e} relative");
    assert_eq!(exact.blocks.len(), other.blocks.len());
    let scale = exact.total.abs().max().double_value(&[]);
    for ((n1, a), (n2, b)) in exact.blocks.iter().zip(&other.blocks) {
        assert_eq!(n1, n2);
        let d = (a - b).abs().max().double_value(&[]);
        assert!(
            d < 1e-6 * scale,
            "{what}: block {n1} differs by {d:e} (kernel scale {scale:e})"
        );
    }
    let sum = other
        .blocks
        .iter()
        .fold(Tensor::zeros_like(&other.total), |acc, (_, b)| acc + b);
    assert!(
        rel_err(&other.total, &sum) < 1e-12,
        "{what}: blocks must sum to the total"
    );
}

fn check_all_methods(vs: &nn::VarStore, model: &Model, what: &str) {
    for output in [
        OutputKind::MeanLoss,
        OutputKind::SumLoglik,
        OutputKind::LogitTrace,
    ] {
        let exact = ntk(vs, model, Method::Exact, output, 1);
        assert!(exact.total.abs().max().double_value(&[]) > 0.0);
        for (method, batch) in [
            (Method::Batched, 4),
            (Method::Batched, 6),
            (Method::Ghost, 4),
            (Method::Auto, 3),
        ] {
            let k = ntk(vs, model, method, output, batch);
            assert_same(
                &exact,
                &k,
                &format!("{what} {output:?} {method:?} batch {batch}"),
            );
        }
    }
}

#[test]
fn dense_gpt_bert_and_llama_kernels_match_the_oracle() {
    for cfg in dense_variants() {
        let (vs, model) = build(&cfg);
        check_all_methods(
            &vs,
            &model,
            &format!("{:?} post-norm {}", cfg.arch, cfg.post_norm),
        );
    }
}

/// GPT, pre- and post-norm BERT (the imported layout), and Llama with grouped-query attention.
fn dense_variants() -> Vec<ModelConfig> {
    let mut post = tiny(Arch::Bert, ExpertConfig::Dense);
    post.post_norm = true;
    let mut llama = tiny(Arch::Llama, ExpertConfig::Dense);
    llama.n_kv_head = Some(1);
    llama.tie_embeddings = false;
    vec![
        tiny(Arch::Gpt, ExpertConfig::Dense),
        tiny(Arch::Bert, ExpertConfig::Dense),
        post,
        llama,
    ]
}

#[test]
fn switch_kernels_match_the_oracle() {
    let cfg = tiny(
        Arch::Gpt,
        ExpertConfig::Switch(SwitchConfig {
            n_experts: 3,
            capacity_factor: 1.0,
            aux_weight: 0.0,
            last_k: 2,
        }),
    );
    let (vs, model) = build(&cfg);
    check_all_methods(&vs, &model, "switch");
}

/// Selective backward: with only upper parameters selected, the forward below them records
/// nothing and the backward stops there; each selected parameter's kernel is still the one a
/// capture of every parameter (a full backward) gives, for every architecture, a Switch model
/// (capacity lifted below the split too) and a CSE model, by every method.
#[test]
fn selecting_upper_parameters_gives_the_kernels_of_a_full_backward() {
    let switch = tiny(
        Arch::Gpt,
        ExpertConfig::Switch(SwitchConfig {
            n_experts: 3,
            capacity_factor: 1.0,
            aux_weight: 0.0,
            last_k: 2,
        }),
    );
    let mut models: Vec<(String, nn::VarStore, Model)> = dense_variants()
        .into_iter()
        .chain([switch])
        .map(|cfg| {
            let (vs, m) = build(&cfg);
            let experts = if matches!(cfg.experts, ExpertConfig::Switch(_)) {
                " switch"
            } else {
                ""
            };
            let what = format!("{:?} post_norm={}{experts}", cfg.arch, cfg.post_norm);
            (what, vs, m)
        })
        .collect();
    let (vs, m) = cse_model(CseVariant::Both);
    models.push(("cse".into(), vs, m));
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    for (what, vs, model) in &models {
        let all = Selection::default().select(vs).unwrap();
        let opts = CaptureOptions {
            output: OutputKind::SumLoglik,
            batch: 4,
            ..Default::default()
        };
        let full = kernel(
            &capture(model, &all, &refs, &opts, Device::Cpu, &|_| {}).unwrap(),
            None,
            BlockBy::Param,
            false,
        )
        .unwrap();
        for globs in [vec!["h.1.*"], vec!["ln_f.*", "lm_head.*"]] {
            let sel = Selection {
                globs: globs.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            };
            let Ok(params) = sel.select(vs) else {
                continue; // post-norm BERT has no ln_f, tied models no lm_head
            };
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            assert!(
                model.first_block_of(names.iter().copied()) >= 1,
                "{what} {globs:?}"
            );
            for method in [Method::Exact, Method::Batched, Method::Auto] {
                let part = kernel(
                    &capture(
                        model,
                        &params,
                        &refs,
                        &CaptureOptions {
                            method,
                            ..opts.clone()
                        },
                        Device::Cpu,
                        &|_| {},
                    )
                    .unwrap(),
                    None,
                    BlockBy::Param,
                    false,
                )
                .unwrap();
                assert_eq!(part.blocks.len(), params.len(), "{what} {globs:?}");
                for (name, blk) in &part.blocks {
                    let (_, want) = full.blocks.iter().find(|(n, _)| n == name).unwrap();
                    let e = rel_err(want, blk);
                    assert!(e < 1e-10, "{what} {globs:?} {method:?} {name}: {e}");
                }
            }
        }
    }
}

fn cse_model(variant: CseVariant) -> (nn::VarStore, Model) {
    let cse = CseConfig {
        variant,
        last_k: 2,
        proj_dim: 4,
        ..CseConfig::default()
    };
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Cse(cse)));
    // Two experts per block, centroids at the projections of samples 0 and 2.
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let b = tailscope::capture::capture_batch(&model, &refs, 0, Device::Cpu);
    let out = model.forward_t(&b.ids, &b.mask, false, true).unwrap();
    let inits: Vec<CseInit> = model
        .cse_routers()
        .iter()
        .map(|(layer, r)| {
            let v = tch::no_grad(|| out.seq_emb[*layer as usize].matmul(&r.proj));
            CseInit {
                layer: *layer,
                centroids: Tensor::stack(&[v.get(0), v.get(2)], 0),
                radii: Tensor::from_slice(&[1.0f64, 1.0]),
            }
        })
        .collect();
    let (vs2, model2, _) = expand_experts(&vs, &model.cfg, &inits).unwrap();
    (vs2, model2)
}

#[test]
fn cse_kernels_match_the_oracle_and_expert_blocks_are_isolated() {
    for variant in [CseVariant::Mof, CseVariant::Moa, CseVariant::Both] {
        let (vs, model) = cse_model(variant);
        check_all_methods(&vs, &model, &format!("cse {variant:?}"));
        // Expert blocks: zero wherever either sample was routed to another expert.
        let s = seqs();
        let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
        let b = tailscope::capture::capture_batch(&model, &refs, 0, Device::Cpu);
        let routes = model
            .forward_t(&b.ids, &b.mask, false, false)
            .unwrap()
            .routes;
        let params = Selection::default().select(&vs).unwrap();
        let c = capture(
            &model,
            &params,
            &refs,
            &CaptureOptions::default(),
            Device::Cpu,
            &|_| {},
        )
        .unwrap();
        let k = kernel(&c, None, BlockBy::Module, false).unwrap();
        let mut seen = 0;
        for (layer, r) in &routes {
            let r: Vec<i64> = Vec::try_from(r).unwrap();
            assert!(r.contains(&0) && r.contains(&1), "both experts used: {r:?}");
            for e in 0..2i64 {
                for part in ["mlp", "attn"] {
                    let name = format!("h.{layer}.{part}.experts.{e}");
                    let Some((_, blk)) = k.blocks.iter().find(|(n, _)| *n == name) else {
                        continue;
                    };
                    seen += 1;
                    for i in 0..r.len() {
                        for j in 0..r.len() {
                            let v = blk.double_value(&[i as i64, j as i64]);
                            if r[i] != e || r[j] != e {
                                assert_eq!(v, 0.0, "{name}[{i},{j}] with routes {r:?}");
                            }
                        }
                    }
                    let own: Vec<usize> = (0..r.len()).filter(|&i| r[i] == e).collect();
                    assert!(
                        own.iter()
                            .any(|&i| blk.double_value(&[i as i64, i as i64]) > 0.0),
                        "{name} has no own entries"
                    );
                }
            }
        }
        assert!(seen >= 4, "{variant:?}: {seen} expert blocks checked");
    }
}

#[test]
fn projected_kernels_converge_within_the_jl_bound() {
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let exact = kernel(
        &capture(
            &model,
            &params,
            &refs,
            &CaptureOptions::default(),
            Device::Cpu,
            &|_| {},
        )
        .unwrap(),
        None,
        BlockBy::None,
        false,
    )
    .unwrap();
    let diag: Vec<f64> = Vec::try_from(exact.total.diagonal(0, 0, 1)).unwrap();
    for kind in [ProjectionKind::Gaussian, ProjectionKind::Rademacher] {
        let mut errs = Vec::new();
        for dim in [64i64, 1024, 16384] {
            let opts = CaptureOptions {
                projection: Some(Projection {
                    kind,
                    dim,
                    seed: 11,
                }),
                ..Default::default()
            };
            let c = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
            let k = kernel(&c, None, BlockBy::None, false).unwrap();
            // Normalised error max_ij |K̂_ij − K_ij| / (‖J_i‖ ‖J_j‖); JL: ≤ ε w.h.p. with
            // ε = sqrt(8 ln(n²) / k) (n = 6 samples, union bound over all pairs).
            let mut worst: f64 = 0.0;
            for i in 0..6 {
                for j in 0..6 {
                    let e = (k.total.double_value(&[i, j]) - exact.total.double_value(&[i, j]))
                        .abs()
                        / (diag[i as usize] * diag[j as usize]).sqrt();
                    worst = worst.max(e);
                }
            }
            let eps = (8.0 * (36f64).ln() / dim as f64).sqrt();
            assert!(
                worst <= eps,
                "{kind:?} k={dim}: error {worst} above the JL bound {eps}"
            );
            errs.push(worst);
            // Same seed, same projection: identical across calls (and processes).
            let again = kernel(
                &capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap(),
                None,
                BlockBy::None,
                false,
            )
            .unwrap();
            assert!(k.total.equal(&again.total));
            // Projected in groups of one chunk of 2 samples: the same kernel (row-wise).
            let chunked = CaptureOptions {
                batch: 2,
                project_group: 1,
                ..opts.clone()
            };
            let kc = kernel(
                &capture(&model, &params, &refs, &chunked, Device::Cpu, &|_| {}).unwrap(),
                None,
                BlockBy::None,
                false,
            )
            .unwrap();
            let rel = ((&kc.total - &k.total).abs().max() / k.total.abs().max()).double_value(&[]);
            assert!(
                rel < 1e-10,
                "{kind:?} k={dim}: chunked projection differs by {rel}"
            );
        }
        assert!(
            errs[2] < errs[0],
            "{kind:?}: error must shrink as k grows: {errs:?}"
        );
    }
}

/// Logit-trace with a projection: each probe's gradients are projected on their own, so the
/// projected kernel is Σ_p (J_p R)(J_p R)ᵀ, with no cross-probe terms (J_p R)(J_q R)ᵀ; and
/// `--method auto` with a projection projects every layer (none is left to an unprojected
/// ghost kernel).
#[test]
fn projections_of_logit_trace_probes_and_of_auto_captures() {
    use tailscope::capture::project;
    // Short sequences and wide layers, so that `auto` would pick ghost kernels for the MLP
    // weights (T² (in + out) < in · out).
    let (vs, model) = build(&ModelConfig {
        max_len: 4,
        d_model: 32,
        d_ffn: 64,
        ..tiny(Arch::Gpt, ExpertConfig::Dense)
    });
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let pr = Projection {
        kind: ProjectionKind::Gaussian,
        dim: 32,
        seed: 5,
    };
    let probes = 3;
    let trace = CaptureOptions {
        output: OutputKind::LogitTrace,
        probes,
        ..Default::default()
    };
    let full = capture(&model, &params, &refs, &trace, Device::Cpu, &|_| {}).unwrap();
    let projected = capture(
        &model,
        &params,
        &refs,
        &CaptureOptions {
            projection: Some(pr),
            ..trace.clone()
        },
        Device::Cpu,
        &|_| {},
    )
    .unwrap();
    let got = kernel(&projected, None, BlockBy::None, false).unwrap();
    let mut want = Tensor::zeros([6, 6], (tch::Kind::Double, Device::Cpu));
    for (name, j) in full.names.iter().zip(&full.jac) {
        let j = j.as_ref().unwrap();
        let per = j.size()[1] / probes as i64;
        for p in 0..probes as i64 {
            let jp = project(&j.narrow(1, p * per, per), name, &pr, 1).unwrap();
            want += jp.matmul(&jp.tr());
        }
    }
    assert!(
        rel_err(&want, &got.total) < 1e-10,
        "projected logit-trace kernel: {}",
        rel_err(&want, &got.total)
    );
    // Auto with a projection: the batched projected kernel, every layer projected.
    let with = |method| CaptureOptions {
        method,
        projection: Some(pr),
        ..Default::default()
    };
    let batched = capture(
        &model,
        &params,
        &refs,
        &with(Method::Batched),
        Device::Cpu,
        &|_| {},
    )
    .unwrap();
    let auto = capture(
        &model,
        &params,
        &refs,
        &with(Method::Auto),
        Device::Cpu,
        &|_| {},
    )
    .unwrap();
    assert!(auto.ghost.iter().all(Option::is_none));
    let unprojected = capture(
        &model,
        &params,
        &refs,
        &CaptureOptions {
            method: Method::Auto,
            ..Default::default()
        },
        Device::Cpu,
        &|_| {},
    )
    .unwrap();
    assert!(
        unprojected.ghost.iter().any(Option::is_some),
        "without a projection, auto uses ghost kernels here"
    );
    let (kb, ka) = (
        kernel(&batched, None, BlockBy::None, false).unwrap(),
        kernel(&auto, None, BlockBy::None, false).unwrap(),
    );
    assert!(rel_err(&kb.total, &ka.total) < 1e-10);
    let e = match capture(
        &model,
        &params,
        &refs,
        &with(Method::Ghost),
        Device::Cpu,
        &|_| {},
    ) {
        Ok(_) => panic!("ghost kernels were projected"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("--project"), "{e}");
}

#[test]
fn diagonal_and_cross_kernels_agree_with_the_full_kernel() {
    let (vs, model) = build(&tiny(Arch::Bert, ExpertConfig::Dense));
    let params = Selection {
        globs: vec!["h.1.*".into()],
        ..Default::default()
    }
    .select(&vs)
    .unwrap();
    assert!(params.iter().all(|(n, _)| n.starts_with("h.1.")));
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let opts = CaptureOptions::default();
    let all = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
    let full = kernel(&all, None, BlockBy::Module, false).unwrap();
    let diag = kernel(&all, None, BlockBy::Module, true).unwrap();
    assert!(rel_err(&full.total.diagonal(0, 0, 1), &diag.total) < 1e-12);
    // Θ(X, Y) of two overlapping sets captured on their own (X = samples 0..4, Y = 2..6) is the
    // matching block of the kernel of all six: a BERT sample is masked the same way in X, in Y
    // and in the whole set.
    let x = capture(&model, &params, &refs[..4], &opts, Device::Cpu, &|_| {}).unwrap();
    let y = capture(&model, &params, &refs[2..], &opts, Device::Cpu, &|_| {}).unwrap();
    let cross = kernel(&x, Some(&y), BlockBy::None, false).unwrap();
    assert_eq!(cross.total.size(), vec![4, 4]);
    let block = full.total.narrow(0, 0, 4).narrow(1, 2, 4);
    assert!(rel_err(&block, &cross.total) < 1e-12);
}

/// The capture options of the streaming tests (batches of 2) and the in-memory kernel by module
/// they must reproduce.
fn in_memory(
    model: &Model,
    params: &[(String, Tensor)],
    refs: &[&[u32]],
) -> (CaptureOptions, Kernel) {
    let opts = CaptureOptions {
        batch: 2,
        ..Default::default()
    };
    let c = capture(model, params, refs, &opts, Device::Cpu, &|_| {}).unwrap();
    let whole = kernel(&c, None, BlockBy::Module, false).unwrap();
    (opts, whole)
}

/// Streaming in tiles gives the in-memory kernel, and a rerun after losing files (an interrupted
/// run) recomputes only what is missing.
#[test]
fn streamed_kernels_match_and_resume() {
    use tailscope::ntk::stream::{assemble, stream_kernel, StreamPlan, Work};
    let (vs, model) = build(&tiny(Arch::Bert, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let (opts, whole) = in_memory(&model, &params, &refs);
    let dir = tempfile::tempdir().unwrap();
    let plan = StreamPlan {
        dir: dir.path(),
        tile: 4,
        blocks: BlockBy::Module,
        work: Work::All,
    };
    let r = stream_kernel(
        &model,
        &params,
        &refs,
        &opts,
        &plan,
        Device::Cpu,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(
        (r.shards, r.tiles, r.shards_reused, r.tiles_reused),
        (2, 3, 0, 0)
    );
    let parts = assemble(dir.path(), 6, 4).unwrap();
    assert_eq!(parts[0].0, "total");
    assert!(
        rel_err(&whole.total, &parts[0].1) < 1e-12,
        "streamed total differs"
    );
    for (name, blk) in &whole.blocks {
        let got = &parts
            .iter()
            .find(|(n, _)| *n == format!("block.{name}"))
            .unwrap()
            .1;
        assert!(
            (got - blk).abs().max().double_value(&[])
                <= 1e-12 * whole.total.abs().max().double_value(&[]),
            "{name}"
        );
    }
    std::fs::remove_file(dir.path().join("tiles/tile-00000-00001.safetensors")).unwrap();
    std::fs::remove_file(dir.path().join("shards/grads-00001.safetensors")).unwrap();
    let r = stream_kernel(
        &model,
        &params,
        &refs,
        &opts,
        &plan,
        Device::Cpu,
        &|_, _| {},
    )
    .unwrap();
    // Shard 0 and tiles 0-0 and 1-1 are reused; shard 1 and tile 0-1 are recomputed.
    assert_eq!((r.shards_reused, r.tiles_reused), (1, 2), "{r:?}");
    let again = assemble(dir.path(), 6, 4).unwrap();
    assert!(rel_err(&parts[0].1, &again[0].1) < 1e-12);
    assert!(dir.path().join("tiles.parquet").exists());
}

/// Shares of a streamed kernel (`--shard I/N`), run one after another into one folder, under two
/// share counts with uneven shares, give the one-process kernel; assembling refuses while tiles
/// are missing, naming the first.
#[test]
fn shares_of_a_streamed_kernel_give_the_whole_kernel() {
    use std::time::Duration;
    use tailscope::ntk::stream::{assemble, stream_kernel, Share, StreamPlan, Work};
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let (opts, whole) = in_memory(&model, &params, &refs);
    let run = |dir: &std::path::Path, work: Work| {
        let plan = StreamPlan {
            dir,
            tile: 2,
            blocks: BlockBy::Module,
            work,
        };
        stream_kernel(
            &model,
            &params,
            &refs,
            &opts,
            &plan,
            Device::Cpu,
            &|_, _| {},
        )
    };
    let share = |i, n| Work::Share {
        share: Share::new(i, n).unwrap(),
        wait: Duration::ZERO,
    };
    // 6 samples in tiles of 2: 3 shards, 6 tiles. Shares 1/2 then 0/2: share 1 owns shard 1 and
    // tiles 1, 3, 5 = (0,1), (1,1), (2,2); it takes over shards 0 and 2 (no other share ran).
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path(), share(1, 2)).unwrap();
    assert_eq!((r.shards, r.tiles, r.shards_taken_over), (1, 3, 2), "{r:?}");
    let msg = run(dir.path(), Work::AssembleOnly).unwrap_err().to_string();
    assert!(
        msg.contains("3 of 6 tiles are missing") && msg.contains("tile-00000-00000"),
        "{msg}"
    );
    assert!(!dir.path().join("tiles.parquet").exists());
    let r = run(dir.path(), share(0, 2)).unwrap();
    assert_eq!(
        (
            r.shards,
            r.shards_reused,
            r.tiles,
            r.tiles_reused,
            r.shards_taken_over
        ),
        (2, 2, 3, 0, 0),
        "{r:?}"
    );
    run(dir.path(), Work::AssembleOnly).unwrap();
    assert!(dir.path().join("tiles.parquet").exists());
    let parts = assemble(dir.path(), 6, 2).unwrap();
    assert!(rel_err(&whole.total, &parts[0].1) < 1e-12);
    for (name, blk) in &whole.blocks {
        let got = &parts
            .iter()
            .find(|(n, _)| *n == format!("block.{name}"))
            .unwrap()
            .1;
        assert!(rel_err(blk, got) < 1e-12, "{name}");
    }
    // Three shares, each on its own first: shard s and tile t of share t mod 3; the tiles of a
    // share are its own, never another's.
    let dir3 = tempfile::tempdir().unwrap();
    for i in [2, 0, 1] {
        let r = run(dir3.path(), share(i, 3)).unwrap();
        assert_eq!((r.shards, r.tiles, r.tiles_reused), (1, 2, 0), "share {i}");
    }
    run(dir3.path(), Work::AssembleOnly).unwrap();
    let parts3 = assemble(dir3.path(), 6, 2).unwrap();
    assert!(rel_err(&whole.total, &parts3[0].1) < 1e-12);
    // I/N is parsed and checked.
    assert_eq!("1/3".parse::<Share>().unwrap(), Share::new(1, 3).unwrap());
    for bad in ["3/3", "1", "a/2", "0/0"] {
        let e = bad.parse::<Share>().unwrap_err().to_string();
        assert!(e.contains("--shard"), "{bad}: {e}");
    }
}

/// The Kronecker-factored projection (LoGra's per-layer projection): the batched path, which
/// projects inputs and output gradients and never forms a weight gradient, equals projecting
/// the oracle's per-sample gradients, P_gᵀ G P_x, to 1e-10 in float64 (dense GPT, Switch-MoE);
/// the projected kernel is unbiased (its mean over seeds approaches the exact kernel) and its
/// error shrinks as k grows.
#[test]
fn kronecker_projection_matches_its_oracle_and_is_unbiased() {
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let switch = ExpertConfig::Switch(SwitchConfig {
        n_experts: 3,
        capacity_factor: 1.0,
        aux_weight: 0.0,
        last_k: 1,
    });
    let kron = |dim, seed| CaptureOptions {
        projection: Some(Projection {
            kind: ProjectionKind::Kronecker,
            dim,
            seed,
        }),
        ..Default::default()
    };
    for cfg in [
        tiny(Arch::Gpt, ExpertConfig::Dense),
        tiny(Arch::Gpt, switch),
    ] {
        let (vs, model) = build(&cfg);
        let params = Selection::default().select(&vs).unwrap();
        let k_of = |opts: &CaptureOptions| {
            kernel(
                &capture(&model, &params, &refs, opts, Device::Cpu, &|_| {}).unwrap(),
                None,
                BlockBy::Param,
                false,
            )
            .unwrap()
        };
        let fast = k_of(&CaptureOptions {
            batch: 4,
            ..kron(100, 7)
        });
        let oracle = k_of(&CaptureOptions {
            method: Method::Exact,
            ..kron(100, 7)
        });
        assert!(rel_err(&oracle.total, &fast.total) < 1e-10);
        for ((n, a), (_, b)) in oracle.blocks.iter().zip(&fast.blocks) {
            assert!(rel_err(a, b) < 1e-10, "{n}");
        }
    }
    unbiased_and_shrinking(ProjectionKind::Kronecker);
}

/// A projection of `kind` gives an unbiased kernel (the mean over 48 seeds at k = 16 is at
/// least 3× closer to the exact kernel than one seed) whose error shrinks as k grows (4096
/// against 16: at least 4× smaller), on the dense GPT with every parameter.
fn unbiased_and_shrinking(kind: ProjectionKind) {
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let proj = |dim, seed| CaptureOptions {
        projection: Some(Projection { kind, dim, seed }),
        ..Default::default()
    };
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let total = |opts: &CaptureOptions| {
        kernel(
            &capture(&model, &params, &refs, opts, Device::Cpu, &|_| {}).unwrap(),
            None,
            BlockBy::None,
            false,
        )
        .unwrap()
        .total
    };
    let exact = total(&CaptureOptions::default());
    // Normalised error max_ij |K̂_ij − K_ij| / √(K_ii K_jj).
    let d = exact.diagonal(0, 0, 1).sqrt();
    let err = |k: &Tensor| ((k - &exact).abs() / d.outer(&d)).max().double_value(&[]);
    let single: Vec<f64> = [16i64, 256, 4096]
        .iter()
        .map(|&dim| err(&total(&proj(dim, 3))))
        .collect();
    assert!(
        single[2] < single[0] / 4.0,
        "{kind:?}: error must shrink as k grows: {single:?}"
    );
    let seeds = 48;
    let mean = (0..seeds)
        .map(|s| total(&proj(16, 100 + s)))
        .fold(exact.zeros_like(), |a, k| a + k)
        / seeds as f64;
    let e_mean = err(&mean);
    eprintln!(
        "{kind:?} k=16: single-seed error {:.3}, mean of {seeds} seeds {e_mean:.3}",
        single[0]
    );
    assert!(
        e_mean < single[0] / 3.0,
        "{kind:?} unbiased: {e_mean} against {}",
        single[0]
    );
}

/// SplitMix64's draw `i` of the stream `stream`, mix(stream + i·γ), written out here.
fn splitmix(stream: u64, i: u64) -> u64 {
    let mut z = stream.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The sparse JL matrix (rows × k, float64) of the parameter `name`, built here from its
/// definition (README, `ProjectionKind::Sparse`): rows in blocks of 65,536, block q's stream
/// hashed from "{name}#{q}/sparse"; row r's nonzero in column block b (columns
/// [b·k/s, (b+1)·k/s), s = min(k, 8)) from draw r·s + b: the column offset is the draw's high
/// 32 bits times the block's width over 2³², the value +1/√s where the draw is odd, else −1/√s.
fn sparse_matrix(name: &str, rows: i64, k: i64, seed: u64) -> Tensor {
    let s = k.min(tailscope::capture::SPARSE_NONZEROS);
    let mut r = vec![0.0f64; (rows * k) as usize];
    for row in 0..rows {
        let (q, local) = (row / 65536, row % 65536);
        let key = format!("{name}#{q}/sparse");
        let stream = tailscope::seed::stable_hash(seed, key.as_bytes());
        for b in 0..s {
            let h = splitmix(stream, (local * s + b) as u64);
            let (lo, hi) = (b * k / s, (b + 1) * k / s);
            let col = lo + (((h >> 32) * (hi - lo) as u64) >> 32) as i64;
            let sign = if h & 1 == 1 { 1.0 } else { -1.0 };
            r[(row * k + col) as usize] = sign / (s as f64).sqrt();
        }
    }
    Tensor::from_slice(&r).view([rows, k])
}

/// The sparse JL projection (s nonzeros ±1/√s per row): each parameter's projected gradients,
/// by the exact and by the batched path, equal the unprojected exact gradients times the sparse
/// matrix built in this test (an explicit product) to 1e-10 in float64, for k above s and
/// below it; the kernel is unbiased and its error shrinks as k grows.
#[test]
fn sparse_projection_matches_its_oracle_and_is_unbiased() {
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let cap =
        |o: &CaptureOptions| capture(&model, &params, &refs, o, Device::Cpu, &|_| {}).unwrap();
    let plain = cap(&CaptureOptions {
        method: Method::Exact,
        ..Default::default()
    });
    for dim in [100, 5] {
        let opts = |method| CaptureOptions {
            method,
            batch: 4,
            projection: Some(Projection {
                kind: ProjectionKind::Sparse,
                dim,
                seed: 7,
            }),
            ..Default::default()
        };
        for method in [Method::Batched, Method::Exact] {
            let projected = cap(&opts(method));
            for (k, name) in plain.names.iter().enumerate() {
                let j = plain.jac[k].as_ref().unwrap();
                let want = j.mm(&sparse_matrix(name, j.size()[1], dim, 7));
                let got = projected.jac[k].as_ref().unwrap();
                assert_eq!(got.size(), want.size(), "{name}");
                let e = rel_err(&want, got);
                assert!(e < 1e-10, "{method:?} k = {dim} {name}: {e:e}");
            }
        }
    }
    unbiased_and_shrinking(ProjectionKind::Sparse);
}

/// Token-embedding kernels from token matches, Σ_{t,s} [id_it = id_js] (g_it·g_js), with no
/// (V·d)-wide per-sample scatter: equal to the float64 oracle for untied embeddings (BERT,
/// Llama) and tied ones (GPT, Llama: the match term, the output layer's ghost term and their
/// cross terms), full and diagonal, over batches of 4.
#[test]
fn embedding_kernels_from_token_matches_equal_the_oracle() {
    let mut llama = tiny(Arch::Llama, ExpertConfig::Dense);
    llama.tie_embeddings = false;
    // A tied embedding takes token matches only where T²(V + d) < V·d: a wide model with a
    // larger vocabulary.
    let mut tied = tiny(Arch::Gpt, ExpertConfig::Dense);
    (tied.d_model, tied.vocab_size, tied.d_ffn) = (128, 1000, 16);
    let mut tied_llama = llama.clone();
    (
        tied_llama.tie_embeddings,
        tied_llama.d_model,
        tied_llama.vocab_size,
    ) = (true, 128, 1000);
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    for cfg in [
        tied,
        tiny(Arch::Bert, ExpertConfig::Dense),
        llama,
        tied_llama,
    ] {
        let (vs, model) = build(&cfg);
        let params = Selection {
            globs: vec!["wte.weight".into()],
            ..Selection::default()
        }
        .select(&vs)
        .unwrap();
        assert_eq!(params.len(), 1);
        let with = |method| CaptureOptions {
            method,
            batch: 4,
            ..Default::default()
        };
        let [exact, ghost] = [Method::Exact, Method::Ghost]
            .map(|m| capture(&model, &params, &refs, &with(m), Device::Cpu, &|_| {}).unwrap());
        assert!(
            ghost.jac[0].is_none() && ghost.ghost[0].is_some(),
            "{:?}: the embedding is not captured by token matches",
            cfg.arch
        );
        for diagonal in [false, true] {
            let a = kernel(&exact, None, BlockBy::None, diagonal).unwrap();
            let b = kernel(&ghost, None, BlockBy::None, diagonal).unwrap();
            let e = rel_err(&a.total, &b.total);
            assert!(
                e < 1e-10,
                "{:?} tied {} diagonal {diagonal}: {e:e}",
                cfg.arch,
                cfg.tie_embeddings
            );
        }
    }
}

/// `norms_only` (what `ntk --diagonal` captures): each sample's gradient norms, reduced batch by
/// batch, give the diagonal of the full kernel per block, for mean-loss and logit-trace
/// outputs, projected or not, with ghost layers beside; a full kernel from them is refused.
#[test]
fn diagonals_from_gradient_norms_equal_the_full_kernel() {
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let projection = Projection {
        kind: ProjectionKind::Gaussian,
        dim: 64,
        seed: 2,
    };
    for output in [OutputKind::MeanLoss, OutputKind::LogitTrace] {
        for (method, projection) in [
            (Method::Batched, None),
            (Method::Batched, Some(projection)),
            (Method::Ghost, None),
        ] {
            let opts = CaptureOptions {
                output,
                method,
                projection,
                batch: 4,
                probes: 3,
                project_group: 40,
                ..Default::default()
            };
            let full = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
            let want = kernel(&full, None, BlockBy::Param, false).unwrap();
            let norms = CaptureOptions {
                norms_only: true,
                ..opts.clone()
            };
            let c = capture(&model, &params, &refs, &norms, Device::Cpu, &|_| {}).unwrap();
            let widest = c.jac.iter().flatten().map(|j| j.size()[1]).max().unwrap();
            assert!(
                widest <= 3,
                "norms only: at most one column per probe, got {widest}"
            );
            let got = kernel(&c, None, BlockBy::Param, true).unwrap();
            let what = format!("{output:?} {method:?} projected {}", projection.is_some());
            assert!(
                rel_err(&want.total.diagonal(0, 0, 1), &got.total) < 1e-12,
                "{what}"
            );
            for ((n, a), (_, b)) in want.blocks.iter().zip(&got.blocks) {
                let scale = want.total.diagonal(0, 0, 1).abs().max().double_value(&[]);
                let e = (a.diagonal(0, 0, 1) - b).abs().max().double_value(&[]) / scale;
                assert!(e < 1e-12, "{what} {n}: {e:e}");
            }
            assert!(kernel(&c, None, BlockBy::None, false).is_err());
        }
    }
}

/// Samples are batched in order of length, then put back: every method's kernel of texts of
/// mixed lengths (5, 2, 7, 3, 6, 1 tokens) equals the one stacked from captures of each text on
/// its own, in the caller's order (a permuted kernel fails; shuffled rows would too).
#[test]
fn rows_keep_the_callers_order_whatever_the_lengths() {
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let alone: Vec<Tensor> = s
        .iter()
        .map(|q| {
            let c = capture(
                &model,
                &params,
                &[q.as_slice()],
                &CaptureOptions::default(),
                Device::Cpu,
                &|_| {},
            )
            .unwrap();
            Tensor::cat(&c.jac.iter().flatten().collect::<Vec<_>>(), 1)
        })
        .collect();
    let j = Tensor::cat(&alone, 0);
    let want = j.mm(&j.tr());
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    for (method, batch) in [
        (Method::Exact, 1),
        (Method::Batched, 6),
        (Method::Batched, 4),
        (Method::Ghost, 6),
    ] {
        let opts = CaptureOptions {
            method,
            batch,
            ..Default::default()
        };
        let c = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
        let k = kernel(&c, None, BlockBy::Param, false).unwrap();
        let err = rel_err(&want, &k.total);
        assert!(err < 1e-9, "{method:?} batch {batch}: {err:.2e}");
        if let Some(jac) = c.jac.iter().flatten().next() {
            // the first parameter's rows, one by one
            let first = alone[2].narrow(1, 0, jac.size()[1]);
            assert!(
                rel_err(&first, &jac.get(2).unsqueeze(0)) < 1e-9,
                "{method:?} row 2"
            );
        }
    }
}

/// Ghost factors and logit-trace probes cover the longest text captured, not the model's
/// max_len (SmolLM2's 8,192 positions made 8 samples' factors of every Linear layer 100 GB);
/// sets of different longest texts (7 and 6 tokens here, max_len 64) still give the cross
/// kernel of the whole set, so probes drawn for either agree on the positions they share.
#[test]
fn ghost_factors_and_probes_cover_the_longest_text_not_max_len() {
    let cfg = ModelConfig {
        max_len: 64,
        ..tiny(Arch::Gpt, ExpertConfig::Dense)
    };
    let (vs, model) = build(&cfg);
    let params = Selection::default().select(&vs).unwrap();
    let s = seqs();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    for output in [OutputKind::MeanLoss, OutputKind::LogitTrace] {
        let opts = |method| CaptureOptions {
            output,
            method,
            batch: 2,
            probes: 2,
            seed: 4,
            ..Default::default()
        };
        let run = |method, set: &[&[u32]]| {
            capture(&model, &params, set, &opts(method), Device::Cpu, &|_| {}).unwrap()
        };
        let whole = run(Method::Exact, &refs);
        let want = kernel(&whole, None, BlockBy::None, false).unwrap().total;
        let (a, b) = (
            run(Method::Ghost, &refs[..3]),
            run(Method::Ghost, &refs[3..]),
        );
        for (c, longest) in [(&a, 7), (&b, 6)] {
            let widths: Vec<i64> = c
                .ghost
                .iter()
                .flatten()
                .flatten()
                .map(|(x, _)| x.size()[1])
                .collect();
            assert!(!widths.is_empty(), "{output:?}: no ghost factors");
            // A weight called twice (a tied embedding) holds both calls' positions.
            assert!(
                widths.iter().all(|&w| w == longest || w == 2 * longest),
                "{output:?}: factor widths {widths:?} for a longest text of {longest}"
            );
        }
        let cross = kernel(&a, Some(&b), BlockBy::None, false).unwrap().total;
        let err = rel_err(&want.narrow(0, 0, 3).narrow(1, 3, 3), &cross);
        assert!(err < 1e-9, "{output:?} cross kernel: {err:.2e}");
        let own = kernel(&b, None, BlockBy::None, false).unwrap().total;
        let err = rel_err(&want.narrow(0, 3, 3).narrow(1, 3, 3), &own);
        assert!(err < 1e-9, "{output:?} kernel of the second set: {err:.2e}");
    }
}

/// A float32 model: ghost kernels (dot products in float32 on the factors' device, T² products
/// summed in float64) and batched ones (float32 GEMMs summed in float64) agree with the float32
/// one-backward-per-sample kernel, and all three with the float64 oracle, to float32 precision.
#[test]
fn float32_kernels_of_every_method_agree_to_float32_precision() {
    for arch in [Arch::Gpt, Arch::Llama] {
        let cfg = tiny(arch, ExpertConfig::Dense);
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let exact = ntk(&vs, &model, Method::Exact, OutputKind::MeanLoss, 1);
        let (vs64, model64) = build(&cfg);
        let oracle = ntk(&vs64, &model64, Method::Exact, OutputKind::MeanLoss, 1);
        let err = rel_err(&oracle.total, &exact.total);
        assert!(err < 1e-5, "{arch:?} float32 exact: {err:.2e}");
        for (method, batch) in [(Method::Batched, 4), (Method::Ghost, 4)] {
            let k = ntk(&vs, &model, method, OutputKind::MeanLoss, batch);
            let err = rel_err(&oracle.total, &k.total);
            assert!(err < 1e-5, "{arch:?} float32 {method:?}: {err:.2e}");
        }
    }
}

/// Above `--assemble-max` a kernel stays in its tiles (30 samples in tiles of 7: 5 shards, 15
/// tiles, read from disk at every pass): GC, the groups' shapes, jackknife and half-sample
/// intervals and the alignment equal those of the assembled kernel in memory to 1e-8. The
/// tiles give out no sub-kernel; each product pass reads every tile once and multiplies several
/// vectors, so the jackknife's 41 Lanczos solves (6 leave-out sets, then 5 groups in each of
/// them and in the whole set) take fewer passes than there are solves.
#[test]
fn tiles_above_assemble_max_give_the_in_memory_gc_reading_each_tile_once_per_pass() {
    use tailscope::ntk::gc::{self, LOCKSTEP};
    use tailscope::ntk::op::{Dense, KernelOp};
    use tailscope::ntk::stream::{assemble, stream_kernel, StreamPlan, Work};
    use tailscope::ntk::tiles::Tiles;
    let (vs, model) = build(&tiny(Arch::Gpt, ExpertConfig::Dense));
    let params = Selection::default().select(&vs).unwrap();
    let s: Vec<Vec<u32>> = (0..30u32)
        .map(|i| (0..3 + i % 5).map(|t| 1 + (i * 7 + t * 3) % 16).collect())
        .collect();
    let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
    let (opts, _) = in_memory(&model, &params, &refs);
    let dir = tempfile::tempdir().unwrap();
    let plan = StreamPlan {
        dir: dir.path(),
        tile: 7,
        blocks: BlockBy::Module,
        work: Work::All,
    };
    stream_kernel(
        &model,
        &params,
        &refs,
        &opts,
        &plan,
        Device::Cpu,
        &|_, _| {},
    )
    .unwrap();
    let dense = Dense::new(&assemble(dir.path(), 30, 7).unwrap()[0].1);
    let names: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    let tiles = Tiles::open(dir.path(), &ids, 7, 0).unwrap();
    assert!(tiles.sub(&[0, 1]).unwrap().is_none());
    let groups: Vec<Vec<usize>> = (0..3)
        .map(|b| (0..30).filter(|i| i % 3 == b).collect())
        .chain([(0..8).collect(), (25..30).collect()])
        .collect();
    let refs: Vec<&[usize]> = groups.iter().map(Vec::as_slice).collect();
    let (wd, wt) = (
        gc::principal_op(&dense, None).unwrap(),
        gc::principal_op(&tiles, None).unwrap(),
    );
    assert!((wd.lambda - wt.lambda).abs() < 1e-10 * wd.lambda);
    assert!((&wd.u - &wt.u).abs().max().double_value(&[]) < 1e-8);
    let near = |a: f64, b: f64| (a - b).abs() < 1e-8 * a.abs().max(1.0);
    let (sd, st) = (
        gc::subsets(&dense, &wd, &refs).unwrap(),
        gc::subsets(&tiles, &wt, &refs).unwrap(),
    );
    for (a, b) in sd.iter().zip(&st) {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            near(a.gc, b.gc) && near(a.participation, b.participation),
            "{a:?} {b:?}"
        );
        assert!(near(a.top_share, b.top_share) && near(a.sign_margin, b.sign_margin));
    }
    let same = |p: Vec<Option<(f64, f64)>>, q: Vec<Option<(f64, f64)>>| {
        for (a, b) in p.iter().zip(&q) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!(near(a.0, b.0) && near(a.1, b.1), "{a:?} against {b:?}");
        }
    };
    let before = tiles.counts();
    let jt = gc::gc_jackknife(&tiles, &wt, &refs, 6, 0.05, 1).unwrap();
    let after = tiles.counts();
    same(
        gc::gc_jackknife(&dense, &wd, &refs, 6, 0.05, 1).unwrap(),
        jt,
    );
    let passes = after.passes - before.passes;
    assert_eq!(after.reads - before.reads, 15 * passes, "{after:?}");
    assert!(passes < 6 + 7 * groups.len(), "{passes} passes");
    assert!(after.widest > 1 && after.widest <= LOCKSTEP, "{after:?}");
    same(
        gc::gc_bootstrap(&dense, &wd, &refs, 5, 0.05, 1).unwrap(),
        gc::gc_bootstrap(&tiles, &wt, &refs, 5, 0.05, 1).unwrap(),
    );
    let (ad, at) = (
        gc::alignment(&dense, &wd).unwrap(),
        gc::alignment(&tiles, &wt).unwrap(),
    );
    assert!(ad.iter().zip(&at).all(|(a, b)| near(*a, *b)));
}
