//! The capture tape: during a forward pass, every Linear, Embedding and LayerNorm layer adds a
//! zero tensor `z` (requiring gradients) to its output and records its input. After one backward
//! pass of Σ_i f(x_i), `∂/∂z` is each token's output gradient; because samples do not interact in
//! the forward pass (no batch statistics, and Switch capacity is lifted during capture), the rows of
//! sample i hold exactly ∂f(x_i)/∂(output of x_i), from which per-sample parameter gradients and
//! kernels follow (Opacus/BackPACK style), layer by layer.
//!
//! Rows: a record's `x` and `z` are (rows, features). Most layers see the whole batch, so row r is
//! flat position r of the (batch × seq) grid; expert layers see a subset, given by the current row
//! map (positions into that grid) pushed by the router around the expert call.

use std::cell::RefCell;

use tch::{Kind, Tensor};

/// What a record's parameters are.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordKind {
    /// y = x Wᵀ (+ b): `weight` (out, in), optional `bias` (out).
    Linear {
        /// The weight's name.
        weight: String,
        /// The bias's name, if any.
        bias: Option<String>,
    },
    /// `y = E[ids] + P[positions]`: token embedding `weight` (vocab, d), position table
    /// `positions` (none with rotary positions).
    Embedding {
        /// The token embedding's name.
        weight: String,
        /// The position table's name, if any.
        positions: Option<String>,
    },
    /// y = x̂ ⊙ w + b with x̂ the normalised input (no bias: RMSNorm).
    LayerNorm {
        /// The scale's name.
        weight: String,
        /// The shift's name, if any.
        bias: Option<String>,
    },
}

/// One layer call.
#[derive(Debug)]
pub struct Record {
    /// What the layer is and which parameters it has.
    pub kind: RecordKind,
    /// Linear: the input (rows, in); LayerNorm: x̂ (rows, d); Embedding: token ids (rows,) i64.
    pub x: Tensor,
    /// The zero tensor added to the output (rows, out); its gradient is the output gradient.
    pub z: Tensor,
    /// Flat (batch × seq) positions of the rows; `None`: all positions in order.
    pub rows: Option<Tensor>,
}

/// Records of one forward pass.
#[derive(Debug, Default)]
pub struct Tape {
    records: RefCell<Vec<Record>>,
    row_maps: RefCell<Vec<Tensor>>,
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Tape {
        Tape::default()
    }

    fn add(&self, kind: RecordKind, x: Tensor, y: Tensor) -> Tensor {
        let feat = *y.size().last().expect("a layer output has a feature axis");
        let z = Tensor::zeros([y.numel() as i64 / feat, feat], (y.kind(), y.device()))
            .set_requires_grad(true);
        let out = &y + z.view(y.size().as_slice());
        let rows = self.row_maps.borrow().last().map(Tensor::shallow_clone);
        let in_feat = if x.kind() == Kind::Int64 {
            1
        } else {
            *x.size().last().unwrap_or(&1)
        };
        let x = if x.kind() == Kind::Int64 {
            x.reshape([-1])
        } else {
            x.reshape([-1, in_feat])
        };
        self.records.borrow_mut().push(Record {
            kind,
            x: x.detach(),
            z,
            rows,
        });
        out
    }

    /// Record a Linear call `y = layer(x)`.
    pub fn linear(&self, weight: &str, bias: Option<&str>, x: &Tensor, y: Tensor) -> Tensor {
        self.add(
            RecordKind::Linear {
                weight: weight.to_string(),
                bias: bias.map(str::to_string),
            },
            x.shallow_clone(),
            y,
        )
    }

    /// Record the embedding sum `y = E[ids] + P[pos]` (ids (b, t)).
    pub fn embedding(
        &self,
        weight: &str,
        positions: Option<&str>,
        ids: &Tensor,
        y: Tensor,
    ) -> Tensor {
        self.add(
            RecordKind::Embedding {
                weight: weight.to_string(),
                positions: positions.map(str::to_string),
            },
            ids.shallow_clone(),
            y,
        )
    }

    /// Record a LayerNorm whose normalised input is `xhat` and output `y`.
    pub fn layer_norm(&self, weight: &str, bias: Option<&str>, xhat: &Tensor, y: Tensor) -> Tensor {
        self.add(
            RecordKind::LayerNorm {
                weight: weight.to_string(),
                bias: bias.map(str::to_string),
            },
            xhat.shallow_clone(),
            y,
        )
    }

    /// Run `f` with `rows` (flat positions) as the current row map.
    pub fn with_rows<T>(&self, rows: &Tensor, f: impl FnOnce() -> T) -> T {
        self.row_maps.borrow_mut().push(rows.shallow_clone());
        let out = f();
        self.row_maps.borrow_mut().pop();
        out
    }

    /// The current row map composed with `local` (indices into the current rows).
    pub fn compose(&self, local: &Tensor) -> Tensor {
        match self.row_maps.borrow().last() {
            Some(outer) => outer.index_select(0, local),
            None => local.shallow_clone(),
        }
    }

    /// The records of the pass, in call order.
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.borrow_mut())
    }
}
