//! Models and layers: float64 gradient checks of every model and layer type against central finite
//! differences, CSE expansion and routing, the Switch auxiliary loss against its formula, and
//! checkpoint round trips and mismatches.

use tch::{nn, Device, Kind, Tensor};

use tailscope::checkpoint;
use tailscope::model::cse::{expand_experts, CseInit};
use tailscope::model::moe::SwitchMoe;
use tailscope::model::{
    token_losses, Arch, CseConfig, CseVariant, ExpertConfig, Model, ModelConfig, SwitchConfig,
};

fn tiny(arch: Arch, experts: ExpertConfig) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 13,
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

fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::from_slice(&[
        0i64, 5, 6, 7, 8, 0, 9, 10, 11, 1, 0, 12, 3, 1, 1, 0, 4, 4, 4, 4,
    ])
    .view([4, 5]);
    let mask = Tensor::from_slice(&[1u8, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1])
        .view([4, 5])
        .to_kind(Kind::Bool);
    let targets = Tensor::from_slice(&[
        5i64, 6, 7, 8, 2, 9, 10, 11, 3, -100, 12, 3, 6, -100, -100, 4, 4, 4, 4, 7,
    ])
    .view([4, 5]);
    (ids, mask, targets)
}

/// Loss = mean token loss + aux loss, in float64.
fn loss(model: &Model, aux_weight: f64) -> Tensor {
    let (ids, mask, targets) = batch();
    let out = model.forward_t(&ids, &mask, false, false).unwrap();
    let (l, _, _) = token_losses(&out.logits, &targets);
    l + out.aux_loss * aux_weight
}

/// Compare autograd with central differences on up to `per_tensor` entries of every trainable
/// tensor; relative error below 1e-6 (absolute for tiny gradients).
fn grad_check(vs: &nn::VarStore, model: &Model, aux_weight: f64, per_tensor: i64) -> usize {
    let l = loss(model, aux_weight);
    for (_, mut v) in vs.variables() {
        v.zero_grad();
    }
    l.backward();
    // Central differences: truncation error O(h²·L‴) (≈1e-8 here: the loss is strongly curved in
    // the embeddings), rounding error O(ε·|L|/h) ≈ 3e-10 at h = 1e-6; hence the 1e-9 floor.
    let h = 1e-6;
    let mut checked = 0;
    for (name, var) in tailscope::model::named_variables(vs) {
        if !var.requires_grad() {
            continue;
        }
        let grad = var.grad();
        let n = var.numel() as i64;
        let flat = var.view([-1]);
        let fgrad = grad.view([-1]);
        for k in (0..n)
            .step_by(((n / per_tensor).max(1)) as usize)
            .take(per_tensor as usize)
        {
            let orig = flat.double_value(&[k]);
            tch::no_grad(|| {
                let _ = flat.get(k).fill_(orig + h);
            });
            let up = loss(model, aux_weight).double_value(&[]);
            tch::no_grad(|| {
                let _ = flat.get(k).fill_(orig - h);
            });
            let down = loss(model, aux_weight).double_value(&[]);
            tch::no_grad(|| {
                let _ = flat.get(k).fill_(orig);
            });
            let numeric = (up - down) / (2.0 * h);
            let analytic = fgrad.double_value(&[k]);
            let tol = 1e-6 * analytic.abs().max(numeric.abs()) + 1e-9;
            assert!(
                (numeric - analytic).abs() < tol,
                "{name}[{k}]: autograd {analytic:e}, finite difference {numeric:e}"
            );
            checked += 1;
        }
    }
    checked
}

fn double_model(cfg: &ModelConfig) -> (nn::VarStore, Model) {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), cfg).unwrap();
    vs.double();
    (vs, model)
}

#[test]
fn gradients_of_dense_gpt_bert_and_llama() {
    let mut post = tiny(Arch::Bert, ExpertConfig::Dense);
    post.post_norm = true;
    let mut llama = tiny(Arch::Llama, ExpertConfig::Dense);
    llama.n_kv_head = Some(1);
    for cfg in [
        tiny(Arch::Gpt, ExpertConfig::Dense),
        tiny(Arch::Bert, ExpertConfig::Dense),
        post,
        llama,
    ] {
        let (vs, model) = double_model(&cfg);
        let n = grad_check(&vs, &model, 0.0, 4);
        assert!(
            n > 40,
            "{:?} post-norm {}: {n} entries checked",
            cfg.arch,
            cfg.post_norm
        );
    }
}

#[test]
fn gradients_of_switch_moe() {
    let cfg = tiny(
        Arch::Gpt,
        ExpertConfig::Switch(SwitchConfig {
            n_experts: 3,
            capacity_factor: 2.0,
            aux_weight: 0.1,
            last_k: 1,
        }),
    );
    let (vs, model) = double_model(&cfg);
    assert!(vs.variables().contains_key("h.1.mlp.router.weight"));
    assert!(vs.variables().contains_key("h.1.mlp.experts.2.c_fc.weight"));
    grad_check(&vs, &model, 0.1, 4);
}

/// CSE models with two experts per block and the dispatcher set so that the batch splits.
#[test]
fn gradients_of_cse_mof_moa_and_both() {
    for variant in [CseVariant::Mof, CseVariant::Moa, CseVariant::Both] {
        let cse = CseConfig {
            variant,
            last_k: 2,
            proj_dim: 4,
            ..CseConfig::default()
        };
        let (vs, model) = double_model(&tiny(Arch::Gpt, ExpertConfig::Cse(cse)));
        // Centroids: the projected embeddings of sequences 0 and 2 of the batch, so both experts get work.
        let (ids, mask, _) = batch();
        let out = model.forward_t(&ids, &mask, false, true).unwrap();
        let inits: Vec<CseInit> = model
            .cse_routers()
            .iter()
            .map(|(layer, r)| {
                let v = r.project(
                    &out.seq_emb[*layer as usize]
                        .shallow_clone()
                        .view([4, 1, 8])
                        .expand([4, 1, 8], false),
                    &Tensor::ones([4, 1], (Kind::Bool, Device::Cpu)),
                );
                CseInit {
                    layer: *layer,
                    centroids: Tensor::stack(&[v.get(0), v.get(2)], 0),
                    radii: Tensor::from_slice(&[1.0f64, 1.0]),
                }
            })
            .collect();
        let (vs2, model2, cfg2) = expand_experts(&vs, &model.cfg, &inits).unwrap();
        let ExpertConfig::Cse(c2) = &cfg2.experts else {
            panic!()
        };
        assert_eq!(c2.experts, vec![2, 2]);
        let routes = model2.forward_t(&ids, &mask, false, false).unwrap().routes;
        for (layer, r) in &routes {
            let r: Vec<i64> = Vec::try_from(r).unwrap();
            assert!(
                r.contains(&0) && r.contains(&1),
                "{variant:?} block {layer}: routes {r:?}"
            );
        }
        // The expanded model computes what the warm model did until the experts diverge.
        let before = loss(&model, 0.0).double_value(&[]);
        let after = loss(&model2, 0.0).double_value(&[]);
        assert!(
            (before - after).abs() < 1e-12,
            "copied experts must give the same loss: {before} vs {after}"
        );
        grad_check(&vs2, &model2, 0.0, 3);
        // An expert's gradient is zero when no sequence was routed to it: route everything to
        // expert 0 (a huge radius makes its scaled distance tiny; expert 1's centroid moves away).
        let names = tailscope::model::named_variables(&vs2);
        tch::no_grad(|| {
            for (n, t) in &names {
                if n.ends_with("cse.radii") {
                    let _ = t.get(0).fill_(1e9);
                }
                if n.ends_with("cse.centroids") {
                    let _ = t.get(1).fill_(1e6);
                }
            }
        });
        for (_, v) in &names {
            v.shallow_clone().zero_grad();
        }
        loss(&model2, 0.0).backward();
        for (n, v) in &names {
            if n.contains(".experts.1.") && v.requires_grad() {
                assert!(
                    !v.grad().defined()
                        || v.grad().abs().sum(Kind::Double).double_value(&[]) == 0.0,
                    "{n} should get no gradient"
                );
            }
        }
    }
}

/// n_experts · Σ_e f_e P_e, recomputed by hand from the router's probabilities.
#[test]
fn switch_aux_loss_matches_its_formula() {
    tch::manual_seed(3);
    let cfg = tiny(Arch::Gpt, ExpertConfig::Dense);
    let s = SwitchConfig {
        n_experts: 4,
        capacity_factor: 1.0,
        aux_weight: 0.01,
        last_k: 1,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let moe = SwitchMoe::new(vs.root() / "mlp", &cfg, &s);
    let x = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
    let mask = Tensor::ones([3, 5], (Kind::Bool, Device::Cpu));
    let out = moe.forward_t(&x, &mask, false, true, None);
    let router = vs.variables()["mlp.router.weight"].shallow_clone();
    let probs = x
        .reshape([15, 8])
        .matmul(&router.tr())
        .softmax(-1, Kind::Float);
    let p: Vec<Vec<f32>> = (0..15)
        .map(|i| Vec::try_from(probs.get(i)).unwrap())
        .collect();
    let mut f = [0f64; 4];
    let mut pm = [0f64; 4];
    for row in &p {
        let arg = (0..4).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        f[arg] += 1.0 / 15.0;
        for e in 0..4 {
            pm[e] += f64::from(row[e]) / 15.0;
        }
    }
    let want = 4.0 * (0..4).map(|e| f[e] * pm[e]).sum::<f64>();
    assert!(
        (out.aux.double_value(&[]) - want).abs() < 1e-5,
        "{} vs {want}",
        out.aux.double_value(&[])
    );
    // capacity: ceil(1.0 · 15 / 4) = 4 tokens per expert at most
    let load: Vec<i64> = Vec::try_from(&out.load).unwrap();
    assert!(load.iter().all(|&l| l <= 4), "{load:?}");
    assert_eq!(
        load.iter().sum::<i64>(),
        f.iter()
            .map(|x| ((x * 15.0).round() as i64).min(4))
            .sum::<i64>()
    );
    // A sequence's expert is the one most of its unpadded tokens chose (ties: the lower index).
    let valid = [
        [true; 5],
        [true, true, true, false, false],
        [true, false, false, false, false],
    ];
    let mask = Tensor::from_slice(&valid.concat()).view([3, 5]);
    let route: Vec<i64> =
        Vec::try_from(&moe.forward_t(&x, &mask, false, false, None).route).unwrap();
    let want: Vec<i64> = (0..3)
        .map(|s| {
            let mut votes = [0usize; 4];
            for t in (0..5).filter(|&t| valid[s][t]) {
                let row = &p[s * 5 + t];
                votes[(0..4).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap()] += 1;
            }
            let top = *votes.iter().max().unwrap();
            votes.iter().position(|&v| v == top).unwrap() as i64
        })
        .collect();
    assert_eq!(route, want);
}

#[test]
fn checkpoint_round_trip_is_bit_exact_and_mismatches_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(
        Arch::Bert,
        ExpertConfig::Switch(SwitchConfig {
            n_experts: 2,
            capacity_factor: 1.25,
            aux_weight: 0.01,
            last_k: 1,
        }),
    );
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &cfg).unwrap();
    checkpoint::save_model(dir.path(), &cfg, &vs).unwrap();
    let (vs2, model2) = tailscope::source::load_model(dir.path(), Device::Cpu).unwrap();
    for (name, t) in tailscope::model::named_variables(&vs) {
        let u = &vs2.variables()[&name];
        assert!(t.equal(u), "{name} differs after the round trip");
    }
    let (ids, mask, _) = batch();
    let a = model.forward_t(&ids, &mask, false, false).unwrap().logits;
    let b = model2.forward_t(&ids, &mask, false, false).unwrap().logits;
    assert!(a.equal(&b));
    // A config that disagrees with the weights.
    let mut wrong = cfg.clone();
    wrong.d_ffn = 16;
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let err = tailscope::source::load_model(dir.path(), Device::Cpu).unwrap_err();
    assert!(err.is_bad_input());
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`h.0.mlp.c_fc.bias`")
            && msg.contains("[12]")
            && msg.contains("[16]"),
        "{msg}"
    );
    // An invalid config field.
    std::fs::write(dir.path().join("config.json"), r#"{"arch":"gpt","vocab_size":13,"max_len":8,"n_layer":2,"d_model":8,"n_head":3,"d_ffn":12}"#).unwrap();
    let msg = tailscope::source::load_model(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("model.n_head"),
        "{msg}"
    );
    // A truncated weights file.
    checkpoint::save_model(dir.path(), &cfg, &vs).unwrap();
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = tailscope::source::load_model(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("model.safetensors"),
        "{err}"
    );
}

/// Upcycling a dense model: a CSE model (one expert per block) computes the base model's loss
/// exactly, for GPT and Llama; every Switch expert starts as a copy of the dense FFN; a model
/// with experts cannot be a base.
#[test]
fn upcycled_models_start_from_the_dense_weights() {
    use tailscope::model::upcycle::upcycle;
    for arch in [Arch::Gpt, Arch::Llama] {
        let (vs, model) = double_model(&tiny(arch, ExpertConfig::Dense));
        let cse = ExpertConfig::Cse(CseConfig {
            last_k: 1,
            proj_dim: 4,
            ..CseConfig::default()
        });
        tch::manual_seed(1);
        let (_vs_c, model_c, cfg_c) = upcycle(&vs, &model.cfg, &cse).unwrap();
        assert!(cfg_c.is_sparse_layer(1) && !cfg_c.is_sparse_layer(0));
        let (a, b) = (
            loss(&model, 0.0).double_value(&[]),
            loss(&model_c, 0.0).double_value(&[]),
        );
        assert!((a - b).abs() < 1e-12, "{arch:?}: {a} vs {b}");
        let switch = ExpertConfig::Switch(SwitchConfig {
            n_experts: 3,
            capacity_factor: 1.0,
            aux_weight: 0.0,
            last_k: 1,
        });
        let (vs_s, _, _) = upcycle(&vs, &model.cfg, &switch).unwrap();
        let base = vs.variables();
        let mut copied = 0;
        for (name, t) in vs_s.variables() {
            if let Some(rest) = name.strip_prefix("h.1.mlp.experts.") {
                let (_, tail) = rest.split_once('.').unwrap();
                assert!(t.equal(&base[&format!("h.1.mlp.{tail}")]), "{name}");
                copied += 1;
            }
        }
        assert!(copied >= 6, "{arch:?}: {copied} expert tensors");
        // The frozen trunk and the rest of the network make up the whole forward pass.
        let (ids, mask, _) = batch();
        let full = model.forward_t(&ids, &mask, false, false).unwrap().logits;
        let x = model.hidden_before(&ids, &mask, 1, true).unwrap();
        assert!(!x.requires_grad(), "the trunk is not recorded");
        let f = tailscope::model::Forward {
            train: false,
            capture: false,
            capacity: true,
            tape: None,
            head: true,
        };
        let split = model.forward_from(1, x, &mask, &f).unwrap().logits;
        let gap = (full - split).abs().max().double_value(&[]);
        assert!(gap < 1e-12, "{arch:?}: split forward differs by {gap}");
        assert!(model.hidden_before(&ids, &mask, 3, true).is_err());
        let (vs_c, model_c, _) = upcycle(&vs, &model.cfg, &cse).unwrap();
        let err = upcycle(&vs_c, &model_c.cfg, &cse).unwrap_err().to_string();
        assert!(err.contains("already has experts"), "{err}");
    }
}
