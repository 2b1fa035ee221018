//! Transformer language models in tch: a GPT-style causal LM and a BERT-style masked LM
//! (pre-LayerNorm blocks, learned positions, optionally tied input/output embeddings), whose last
//! blocks can carry Switch-MoE FFNs ([`moe`]) or Cluster-guided Sparse Experts ([`cse`]).
//!
//! Tensor names (safetensors, `VarStore` paths, per-sample-gradient keys, error messages):
//! ```text
//! wte.weight (vocab, d)          wpe.weight (max_len, d)
//! h.{i}.ln_1.{weight,bias}       h.{i}.attn.c_attn.{weight (3d, d), bias}   h.{i}.attn.c_proj.*
//! h.{i}.ln_2.{weight,bias}       h.{i}.mlp.c_fc.{weight (ffn, d), bias}     h.{i}.mlp.c_proj.*
//! Switch block:  h.{i}.mlp.router.weight (E, d), h.{i}.mlp.experts.{e}.c_fc.*, ...c_proj.*
//! CSE block:     h.{i}.cse.proj (d, d′), h.{i}.cse.centroids (k, d′), h.{i}.cse.radii (k),
//!                h.{i}.mlp.experts.{e}.* (MoF), h.{i}.attn.experts.{e}.* (MoA)
//! ln_f.{weight,bias}             lm_head.weight (vocab, d) when untied
//! BERT head:     mlm.dense.{weight,bias}, mlm.ln.{weight,bias}, mlm.bias (vocab)
//! ```
//! Linear weights are (out, in), as `torch.nn.Linear` stores them, so a PyTorch user can load the
//! safetensors file into the same layout.

pub mod config;
pub mod cse;
pub mod layers;
pub mod llama;
pub mod moe;
pub mod script;
pub mod sublayers;
pub mod tape;
pub mod trunk;
pub mod upcycle;

use tch::{nn, Kind, Tensor};

pub use config::{
    Activation, Arch, CseConfig, CseVariant, EpsRule, ExpertConfig, ModelConfig, SpecialTokens,
    SwitchConfig,
};
use cse::{route_sequences, CseRouter};
use layers::{masked_mean, Lin, Norm};
use moe::SwitchMoe;
pub use script::Script;
use sublayers::{Attention, Mlp};

use crate::error::{Error, Result};
use crate::model::tape::Tape;

/// How a forward pass runs.
#[derive(Clone, Copy)]
pub struct Forward<'a> {
    /// Dropout on, CSE centroids move.
    pub train: bool,
    /// Return the sequence embeddings after every block.
    pub capture: bool,
    /// Enforce the Switch expert capacity (off during gradient capture, so that a sample's
    /// output does not depend on the other samples of its batch).
    pub capacity: bool,
    /// Record layer inputs and output perturbations for per-sample gradients.
    pub tape: Option<&'a Tape>,
    /// Compute the logits (off when only the sequence embeddings are wanted: the output layer
    /// of a large vocabulary costs as much as several blocks). Without them `Output::logits`
    /// is an empty tensor.
    pub head: bool,
}

/// Targets equal to this are ignored by the loss (padding, unmasked BERT positions).
pub const IGNORE: i64 = -100;

#[derive(Debug)]
enum AttnPart {
    Dense(Attention),
    Experts(Vec<Attention>),
}

#[derive(Debug)]
enum MlpPart {
    Dense(Mlp),
    Switch(SwitchMoe),
    Experts(Vec<Mlp>),
}

#[derive(Debug)]
struct Block {
    ln_1: Norm,
    attn: AttnPart,
    ln_2: Norm,
    mlp: MlpPart,
    router: Option<CseRouter>,
    /// Normalise after each residual add (original BERT) instead of before each sublayer.
    post_norm: bool,
}

struct BlockOut {
    x: Tensor,
    aux: Option<Tensor>,
    route: Option<Tensor>,
    load: Option<Tensor>,
}

impl Block {
    fn new(p: nn::Path, cfg: &ModelConfig, layer: i64) -> Block {
        let ln = |name: &str| Norm::new(&p / name, cfg);
        let sparse = cfg.is_sparse_layer(layer);
        let (attn, mlp, router) = match (&cfg.experts, sparse) {
            (ExpertConfig::Switch(s), true) => (
                AttnPart::Dense(Attention::new(&p / "attn", cfg)),
                MlpPart::Switch(SwitchMoe::new(&p / "mlp", cfg, s)),
                None,
            ),
            (ExpertConfig::Cse(c), true) => {
                let slot = (layer - (cfg.n_layer - c.last_k)) as usize;
                let k = c.experts.get(slot).copied().unwrap_or(1);
                let moa = matches!(c.variant, CseVariant::Moa | CseVariant::Both);
                let mof = matches!(c.variant, CseVariant::Mof | CseVariant::Both);
                let attn = if moa {
                    AttnPart::Experts(
                        (0..k)
                            .map(|e| Attention::new(&p / "attn" / "experts" / e, cfg))
                            .collect(),
                    )
                } else {
                    AttnPart::Dense(Attention::new(&p / "attn", cfg))
                };
                let mlp = if mof {
                    MlpPart::Experts(
                        (0..k)
                            .map(|e| Mlp::new(&p / "mlp" / "experts" / e, cfg))
                            .collect(),
                    )
                } else {
                    MlpPart::Dense(Mlp::new(&p / "mlp", cfg))
                };
                (attn, mlp, Some(CseRouter::new(&p / "cse", cfg, c, k)))
            }
            _ => (
                AttnPart::Dense(Attention::new(&p / "attn", cfg)),
                MlpPart::Dense(Mlp::new(&p / "mlp", cfg)),
                None,
            ),
        };
        Block {
            ln_1: ln("ln_1"),
            attn,
            ln_2: ln("ln_2"),
            mlp,
            router,
            post_norm: cfg.post_norm,
        }
    }

    fn forward_t(&self, x: &Tensor, mask: &Tensor, f: &Forward) -> BlockOut {
        let (train, tape) = (f.train, f.tape);
        let route = self.router.as_ref().map(|r| r.route(x, mask, train));
        let h = if self.post_norm {
            x.shallow_clone()
        } else {
            self.ln_1.forward(x, tape)
        };
        let a = match (&self.attn, &route) {
            (AttnPart::Dense(m), _) => m.forward_t(&h, mask, train, tape),
            (AttnPart::Experts(ms), Some(r)) => {
                route_sequences(&h, mask, r, ms.len(), tape, |e, xe, me| {
                    ms[e].forward_t(xe, me, train, tape)
                })
            }
            (AttnPart::Experts(ms), None) => ms[0].forward_t(&h, mask, train, tape),
        };
        let x = if self.post_norm {
            self.ln_1.forward(&(x + a), tape)
        } else {
            x + a
        };
        let h = if self.post_norm {
            x.shallow_clone()
        } else {
            self.ln_2.forward(&x, tape)
        };
        let mut switch_route = None;
        let (m, aux, load) = match (&self.mlp, &route) {
            (MlpPart::Dense(m), _) => (m.forward_t(&h, train, tape), None, None),
            (MlpPart::Switch(s), _) => {
                let o = s.forward_t(&h, mask, train, f.capacity, tape);
                switch_route = Some(o.route);
                (o.y, Some(o.aux), Some(o.load))
            }
            (MlpPart::Experts(ms), Some(r)) => {
                let y = route_sequences(&h, mask, r, ms.len(), tape, |e, xe, _| {
                    ms[e].forward_t(xe, train, tape)
                });
                (y, None, None)
            }
            (MlpPart::Experts(ms), None) => (ms[0].forward_t(&h, train, tape), None, None),
        };
        let load = load.or_else(|| {
            route.as_ref().map(|r| {
                let k = self
                    .router
                    .as_ref()
                    .and_then(|c| c.radii.as_ref())
                    .map_or(1, |r| r.size()[0]);
                r.bincount::<Tensor>(None, k)
            })
        });
        BlockOut {
            x: if self.post_norm {
                self.ln_2.forward(&(x + m), tape)
            } else {
                x + m
            },
            aux,
            route: route.or(switch_route),
            load,
        }
    }
}

#[derive(Debug)]
struct MlmHead {
    dense: Lin,
    ln: Norm,
    bias: Tensor,
    gelu: &'static str,
}

/// A transformer LM; see the module docs for its tensor names.
#[derive(Debug)]
pub struct Model {
    /// The model's config.
    pub cfg: ModelConfig,
    wte: nn::Embedding,
    /// Learned positions (none for Llama: rotary positions inside attention).
    wpe: Option<nn::Embedding>,
    /// LayerNorm of the embeddings (post-norm BERT only).
    ln_emb: Option<Norm>,
    blocks: Vec<Block>,
    /// Final norm (absent in post-norm BERT, whose blocks end normalised).
    ln_f: Option<Norm>,
    lm_head: Option<Lin>,
    mlm: Option<MlmHead>,
    /// A TorchScript module standing in for the layers above (loaded by `import::torchscript`).
    script: Option<Script>,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Output {
    /// (batch, seq, vocab)
    pub logits: Tensor,
    /// Sum of the Switch load-balancing losses (scalar; 0 without Switch layers).
    pub aux_loss: Tensor,
    /// Sequence embeddings (batch, d) after 0..=n_layer blocks (0: the embeddings), when asked.
    pub seq_emb: Vec<Tensor>,
    /// (layer, expert of each sequence (batch,)) for CSE blocks, and for Switch blocks the expert
    /// that got most of each sequence's tokens.
    pub routes: Vec<(i64, Tensor)>,
    /// (layer, tokens or sequences per expert) for Switch and CSE blocks.
    pub loads: Vec<(i64, Tensor)>,
}

impl Output {
    /// No logits, no auxiliary loss, nothing recorded, in the kind and on the device of `x`.
    fn empty(x: &Tensor) -> Output {
        Output {
            logits: Tensor::zeros([], (x.kind(), x.device())),
            aux_loss: Tensor::zeros([], (x.kind(), x.device())),
            seq_emb: Vec::new(),
            routes: Vec::new(),
            loads: Vec::new(),
        }
    }
}

impl Model {
    /// Build the model's variables under `p` (the root of a `VarStore`). Validates the config.
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Result<Model> {
        cfg.validate()?;
        let d = cfg.d_model;
        let emb_init = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        let wte = nn::embedding(p / "wte", cfg.vocab_size, d, emb_init);
        let wpe =
            (cfg.arch != Arch::Llama).then(|| nn::embedding(p / "wpe", cfg.max_len, d, emb_init));
        let ln_emb = cfg.post_norm.then(|| Norm::new(p / "ln_emb", cfg));
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(p / "h" / i, cfg, i))
            .collect();
        let ln_f = (!cfg.post_norm).then(|| Norm::new(p / "ln_f", cfg));
        let lm_head =
            (!cfg.tie_embeddings).then(|| Lin::new(p / "lm_head", d, cfg.vocab_size, false));
        let mlm = (cfg.arch == Arch::Bert).then(|| MlmHead {
            dense: Lin::new(p / "mlm" / "dense", d, d, true),
            ln: Norm::new(p / "mlm" / "ln", cfg),
            bias: (p / "mlm").zeros("bias", &[cfg.vocab_size]),
            gelu: layers::gelu_mode(cfg.activation),
        });
        Ok(Model {
            cfg: cfg.clone(),
            wte,
            wpe,
            ln_emb,
            blocks,
            ln_f,
            lm_head,
            mlm,
            script: None,
        })
    }

    /// A model whose forward pass is a TorchScript module (exact capture only).
    pub fn from_script(cfg: ModelConfig, script: Script) -> Model {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Model {
            cfg,
            wte: nn::embedding(vs.root() / "unused", 1, 1, Default::default()),
            wpe: None,
            ln_emb: None,
            blocks: Vec::new(),
            ln_f: None,
            lm_head: None,
            mlm: None,
            script: Some(script),
        }
    }

    /// The parameters gradients can be captured for: the store's variables, or a TorchScript
    /// module's parameters.
    pub fn capture_parameters(&self, vs: &nn::VarStore) -> Result<Vec<(String, Tensor)>> {
        match &self.script {
            Some(s) => s.parameters(),
            None => Ok(named_variables(vs)),
        }
    }

    /// `ids`: (batch, seq) i64 token ids; `mask`: (batch, seq) bool, true for real tokens.
    /// With `capture`, also returns the sequence embedding after every block.
    pub fn forward_t(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        train: bool,
        capture: bool,
    ) -> Result<Output> {
        self.forward_with(
            ids,
            mask,
            &Forward {
                train,
                capture,
                capacity: true,
                tape: None,
                head: true,
            },
        )
    }

    /// The forward pass with every option (see [`Forward`]).
    pub fn forward_with(&self, ids: &Tensor, mask: &Tensor, f: &Forward) -> Result<Output> {
        let t = self.check_input(ids, mask)?;
        if let Some(s) = &self.script {
            return script_forward(s, ids, mask, self.cfg.vocab_size, f);
        }
        let x = self.embed(ids, t, f);
        Ok(self.blocks_and_head(0, x, mask, f))
    }

    /// [`Model::final_hidden`] from token ids: the embeddings and every block, recording
    /// gradients as `f` asks (training computes the logits of the predicted positions only).
    pub fn final_hidden_of(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        f: &Forward,
    ) -> Result<(Tensor, Output)> {
        let t = self.check_input(ids, mask)?;
        self.check_split(0)?;
        let x = self.embed(ids, t, f);
        let mut out = Output::empty(&x);
        let x = self.run_blocks(0, x, mask, f, &mut out);
        Ok((x, out))
    }

    /// Ids (batch, seq) within `max_len` and a mask of the same shape: the sequence length.
    fn check_input(&self, ids: &Tensor, mask: &Tensor) -> Result<i64> {
        let (b, t) = ids.size2().map_err(|_| {
            Error::invalid(
                "input ids",
                format!("expected (batch, seq), got {:?}", ids.size()),
            )
        })?;
        if t > self.cfg.max_len {
            return Err(Error::invalid(
                "input ids",
                format!("sequence length {t} exceeds max_len {}", self.cfg.max_len),
            ));
        }
        if mask.size() != [b, t] {
            return Err(Error::invalid(
                "mask",
                format!("expected {:?}, got {:?}", [b, t], mask.size()),
            ));
        }
        Ok(t)
    }

    /// The lowest block the parameters `names` can change the output from: the smallest `i` of
    /// `h.{i}.…`, `n_layer` for the final norm and output layer (`ln_f`, `lm_head`), and 0 for
    /// anything else (embeddings, a TorchScript module's parameters). Nothing below it needs a
    /// gradient for them: [`Model::hidden_before`] computes it without recording.
    pub fn first_block_of<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> usize {
        if self.script.is_some() {
            return 0;
        }
        let n_layer = self.blocks.len();
        names
            .into_iter()
            .map(|n| {
                if let Some(rest) = n.strip_prefix("h.") {
                    rest.split('.')
                        .next()
                        .and_then(|i| i.parse::<usize>().ok())
                        .map_or(0, |i| i.min(n_layer))
                } else if n.starts_with("ln_f.") || n.starts_with("lm_head.") {
                    n_layer
                } else {
                    0
                }
            })
            .min()
            .unwrap_or(0)
    }

    /// The hidden states entering block `layer` (0: the embeddings), (batch, seq, d_model),
    /// computed in inference mode without recording gradients: the frozen part of the network
    /// below the blocks a run trains, or below the parameters a capture selects. `capacity`:
    /// enforce the Switch expert capacity (training does; capture does not). [`Model::forward_from`]
    /// continues from them.
    pub fn hidden_before(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        layer: usize,
        capacity: bool,
    ) -> Result<Tensor> {
        self.check_split(layer)?;
        let f = Forward {
            train: false,
            capture: false,
            capacity,
            tape: None,
            head: false,
        };
        let t = ids.size().last().copied().unwrap_or(0);
        tch::no_grad(|| {
            let mut x = self.embed(ids, t, &f);
            for block in &self.blocks[..layer] {
                x = block.forward_t(&x, mask, &f).x;
            }
            Ok(x)
        })
    }

    /// The forward pass from `x`, the hidden states entering block `layer` (from
    /// [`Model::hidden_before`]): blocks `layer..` and the head. Sequence embeddings, routes and
    /// loads cover those blocks only (`seq_emb[0]` is the input of block `layer`).
    pub fn forward_from(
        &self,
        layer: usize,
        x: Tensor,
        mask: &Tensor,
        f: &Forward,
    ) -> Result<Output> {
        self.check_split(layer)?;
        Ok(self.blocks_and_head(layer, x, mask, f))
    }

    /// The network can be split before block `layer` (0..=n_layer; not a TorchScript module).
    fn check_split(&self, layer: usize) -> Result<()> {
        if self.script.is_some() || layer > self.blocks.len() {
            return Err(Error::invalid(
                "layer",
                format!(
                    "cannot split before block {layer} (the model has {} blocks)",
                    self.blocks.len()
                ),
            ));
        }
        Ok(())
    }

    /// The forward pass from `x`, the hidden states entering block `layer`, to the hidden
    /// states leaving the last block (b, t, d), before the final norm and the output layer:
    /// what [`Model::logits`] turns into logits at the positions a caller needs (the output layer
    /// of a large vocabulary costs more than several blocks). The rest of the returned
    /// [`Output`] is as [`Model::forward_from`]'s, without logits.
    pub fn final_hidden(
        &self,
        layer: usize,
        x: Tensor,
        mask: &Tensor,
        f: &Forward,
    ) -> Result<(Tensor, Output)> {
        self.check_split(layer)?;
        let mut out = Output::empty(&x);
        let x = self.run_blocks(layer, x, mask, f, &mut out);
        Ok((x, out))
    }

    /// Logits of hidden states leaving the last block, (…, d) → (…, vocab): the final norm,
    /// BERT's masked-LM transform and the output layer, without a tape.
    pub fn logits(&self, h: &Tensor) -> Tensor {
        let f = Forward {
            train: false,
            capture: false,
            capacity: true,
            tape: None,
            head: true,
        };
        self.head(h.shallow_clone(), &f)
    }

    /// Blocks `start..` and the head, from the hidden states entering block `start`.
    fn blocks_and_head(&self, start: usize, x: Tensor, mask: &Tensor, f: &Forward) -> Output {
        let mut out = Output::empty(&x);
        let x = self.run_blocks(start, x, mask, f, &mut out);
        if f.head {
            out.logits = self.head(x, f);
        }
        out
    }

    /// Blocks `start..` from the hidden states entering block `start`, recording sequence
    /// embeddings, routes, loads and the auxiliary loss into `out`; the last block's output.
    fn run_blocks(
        &self,
        start: usize,
        x: Tensor,
        mask: &Tensor,
        f: &Forward,
        out: &mut Output,
    ) -> Tensor {
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate().skip(start) {
            if f.capture {
                out.seq_emb.push(masked_mean(&x, mask));
            }
            let o = block.forward_t(&x, mask, f);
            x = o.x;
            if let Some(a) = o.aux {
                out.aux_loss += a;
            }
            if let Some(r) = o.route {
                out.routes.push((i as i64, r));
            }
            if let Some(l) = o.load {
                out.loads.push((i as i64, l));
            }
        }
        if f.capture {
            out.seq_emb.push(masked_mean(&x, mask));
        }
        x
    }

    /// Token (and position) embeddings, their LayerNorm (BERT) and dropout.
    fn embed(&self, ids: &Tensor, t: i64, f: &Forward) -> Tensor {
        let mut x = ids.apply(&self.wte);
        if let Some(wpe) = &self.wpe {
            let pos = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
            x += pos.apply(wpe);
        }
        if let Some(tape) = f.tape {
            let positions = self.wpe.as_ref().map(|_| "wpe.weight");
            x = tape.embedding("wte.weight", positions, ids, x);
        }
        if let Some(ln) = &self.ln_emb {
            x = ln.forward(&x, f.tape);
        }
        x.dropout(self.cfg.dropout, f.train)
    }

    /// Final norm, BERT's masked-LM transform, and the output layer (tied or not): logits.
    fn head(&self, x: Tensor, f: &Forward) -> Tensor {
        let h = match &self.ln_f {
            Some(ln) => ln.forward(&x, f.tape),
            None => x,
        };
        let (z, bias) = match &self.mlm {
            Some(head) => {
                let z = head.dense.forward(&h, f.tape).gelu(head.gelu);
                (head.ln.forward(&z, f.tape), Some(&head.bias))
            }
            None => (h, None),
        };
        let (mut logits, weight) = match &self.lm_head {
            Some(l) => (z.apply(&l.l), format!("{}.weight", l.name)),
            None => (z.matmul(&self.wte.ws.tr()), "wte.weight".to_string()),
        };
        if let Some(b) = bias {
            logits += b;
        }
        if let Some(tape) = f.tape {
            logits = tape.linear(&weight, bias.map(|_| "mlm.bias"), &z, logits);
        }
        logits
    }

    /// The CSE routers of the model: (layer, router).
    pub fn cse_routers(&self) -> Vec<(i64, &CseRouter)> {
        self.blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.router.as_ref().map(|r| (i as i64, r)))
            .collect()
    }
}

/// Token losses: `logits` (b, t, V), `targets` (b, t) with [`IGNORE`] for skipped positions.
/// Returns (mean over all counted tokens (scalar), per-sequence summed loss (b,), tokens (b,)).
pub fn token_losses(logits: &Tensor, targets: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (b, t, v) = logits.size3().expect("logits are (batch, seq, vocab)");
    let ce = logits
        .reshape([b * t, v])
        .cross_entropy_loss::<Tensor>(
            &targets.reshape([b * t]),
            None,
            tch::Reduction::None,
            IGNORE,
            0.0,
        )
        .view([b, t]);
    let valid = targets.ne(IGNORE).to_kind(ce.kind());
    let per_seq = (&ce * &valid).sum_dim_intlist(1, false, ce.kind());
    let counts = valid.sum_dim_intlist(1, false, ce.kind());
    let mean = per_seq.sum(ce.kind()) / counts.sum(ce.kind()).clamp_min(1.0);
    (mean, per_seq, counts)
}

/// The forward pass of a TorchScript model: logits only (no experts, no tape).
fn script_forward(
    s: &Script,
    ids: &Tensor,
    mask: &Tensor,
    vocab: i64,
    f: &Forward,
) -> Result<Output> {
    if f.tape.is_some() {
        return Err(Error::invalid(
            "--method",
            "a TorchScript model is captured with --method exact only (the batched tape needs tailscope's own layers)",
        ));
    }
    Ok(Output {
        logits: s.logits(ids, mask, vocab)?,
        aux_loss: Tensor::zeros([], (Kind::Float, ids.device())),
        seq_emb: Vec::new(),
        routes: Vec::new(),
        loads: Vec::new(),
    })
}

/// The variables of a store, sorted by name (the order of files and of gradient keys).
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
