//! Which parameters a capture takes ([`Selection`]): name globs, block ranges, experts and the
//! last k blocks, narrowed to MLPs; the recommended selection.

use tch::{nn, Tensor};

use crate::error::{Error, Result};

/// Which parameters: name globs (`*` any run of characters, `?` one), block ranges, experts and
/// the last k blocks, combined with OR, then narrowed to MLPs by `mlp_only`; empty means every
/// trainable parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Parameter name globs.
    pub globs: Vec<String>,
    /// Inclusive block range: every parameter under `h.{i}.` for i in the range.
    pub layers: Option<(i64, i64)>,
    /// (block, expert): the parameters of one CSE or Switch expert.
    pub expert: Option<(i64, i64)>,
    /// The last k transformer blocks (resolved to a block range by [`Selection::resolve`]).
    pub last_blocks: Option<i64>,
    /// Only MLP (FFN and expert) parameters, `*.mlp.*`, of whatever the rest selects.
    pub mlp_only: bool,
}

/// Transformer blocks of [`Selection::recommended`] (their MLPs): the kernel-options study in the
/// README found the MLPs of the last two blocks, with cosine normalisation, the choice whose kernel
/// was not degenerate on the demo models and SmolLM2-135M (with all parameters the embeddings'
/// nearly orthogonal gradients dominate).
pub const RECOMMENDED_LAST_BLOCKS: i64 = 2;

/// `*` and `?` glob match.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl Selection {
    /// The default of `ntk`, `capture` and the specs: the MLPs of the last
    /// [`RECOMMENDED_LAST_BLOCKS`] transformer blocks. (`Selection::default()` is every parameter.)
    pub fn recommended() -> Selection {
        Selection {
            last_blocks: Some(RECOMMENDED_LAST_BLOCKS),
            mlp_only: true,
            ..Selection::default()
        }
    }

    /// This selection, or [`Selection::recommended`] when it names nothing and `all` is false.
    pub fn or_recommended(self, all: bool) -> Selection {
        if self.is_all() && !all {
            Selection::recommended()
        } else {
            self
        }
    }

    /// `last_blocks` turned into a block range for a model of `n_layer` blocks.
    pub fn resolve(&self, n_layer: i64) -> Result<Selection> {
        let Some(k) = self.last_blocks else {
            return Ok(self.clone());
        };
        if self.layers.is_some() {
            return Err(Error::invalid(
                "--last-blocks",
                "give --layers or --last-blocks, not both",
            ));
        }
        if k < 1 || k > n_layer {
            return Err(Error::invalid(
                "--last-blocks",
                format!("{k} is not between 1 and the model's {n_layer} blocks"),
            ));
        }
        Ok(Selection {
            layers: Some((n_layer - k, n_layer - 1)),
            last_blocks: None,
            ..self.clone()
        })
    }

    /// Whether nothing narrows the selection.
    pub fn is_all(&self) -> bool {
        self.names_all() && !self.mlp_only
    }

    /// Whether no glob, range, expert or last blocks are named.
    fn names_all(&self) -> bool {
        self.globs.is_empty()
            && self.layers.is_none()
            && self.expert.is_none()
            && self.last_blocks.is_none()
    }

    /// Whether the parameter `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        if self.mlp_only && !name.contains(".mlp.") {
            return false;
        }
        if self.names_all() {
            return true;
        }
        let block: Option<i64> = name
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|s| s.parse().ok());
        self.globs.iter().any(|g| glob_match(g, name))
            || self
                .layers
                .is_some_and(|(a, b)| block.is_some_and(|i| i >= a && i <= b))
            || self
                .expert
                .is_some_and(|(l, e)| block == Some(l) && name.contains(&format!(".experts.{e}.")))
    }

    /// The selected trainable parameters of `vs`, sorted by name.
    pub fn select(&self, vs: &nn::VarStore) -> Result<Vec<(String, Tensor)>> {
        self.select_from(crate::model::named_variables(vs))
    }

    /// [`Selection::select`] over a list of named parameters (e.g. a TorchScript module's).
    pub fn select_from(&self, named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        if let Some((l, e)) = self.expert {
            check_expert(&named, l, e)?;
        }
        let params: Vec<(String, Tensor)> = named
            .into_iter()
            .filter(|(n, t)| t.requires_grad() && self.matches(n))
            .collect();
        if params.is_empty() {
            return Err(Error::invalid(
                self.options_given(),
                "the selection matches no trainable parameter",
            ));
        }
        Ok(params)
    }

    /// The options that made this selection, as the command line spells them (`--params`
    /// where none narrows it).
    fn options_given(&self) -> String {
        let given: Vec<&str> = [
            (!self.globs.is_empty(), "--params"),
            (self.layers.is_some(), "--layers"),
            (self.expert.is_some(), "--expert"),
            (self.last_blocks.is_some(), "--last-blocks"),
            (self.mlp_only, "--mlp-only"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
        if given.is_empty() {
            "--params".into()
        } else {
            given.join(", ")
        }
    }
}

/// `--expert L:E` must name an expert of the model: refused, naming the option and the experts
/// block L has (none in a dense block), when no parameter `h.L.mlp.experts.E.*` exists.
fn check_expert(named: &[(String, Tensor)], l: i64, e: i64) -> Result<()> {
    let prefix = format!("h.{l}.mlp.experts.");
    let experts: std::collections::BTreeSet<i64> = named
        .iter()
        .filter_map(|(n, _)| n.strip_prefix(&prefix)?.split('.').next()?.parse().ok())
        .collect();
    if experts.contains(&e) {
        return Ok(());
    }
    let has = if experts.is_empty() {
        format!("block {l} of this model has no experts (a dense FFN, or no block {l}); select its parameters with --layers {l}..{l} or --params")
    } else {
        let list: Vec<String> = experts.iter().map(|x| x.to_string()).collect();
        format!("block {l} has experts {}", list.join(", "))
    };
    Err(Error::invalid(
        "--expert",
        format!("{l}:{e} names no expert of this model: {has}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_selections() {
        assert!(glob_match("h.*.mlp.*", "h.3.mlp.c_fc.weight"));
        assert!(!glob_match("h.*.mlp.*", "h.3.attn.c_attn.weight"));
        assert!(glob_match("wte.weigh?", "wte.weight"));
        assert!(glob_match("*", "anything"));
        let s = Selection {
            layers: Some((2, 3)),
            ..Default::default()
        };
        assert!(
            s.matches("h.2.ln_1.weight")
                && s.matches("h.3.mlp.c_fc.bias")
                && !s.matches("h.1.mlp.c_fc.bias")
                && !s.matches("wte.weight")
        );
        // The recommended selection is the last 2 blocks of whatever model it meets.
        let r = Selection::recommended().resolve(12).unwrap();
        assert_eq!(r.layers, Some((10, 11)));
        assert!(r.matches("h.11.mlp.c_fc.weight") && r.matches("h.10.mlp.experts.1.c_proj.bias"));
        assert!(!r.matches("h.11.attn.c_proj.weight") && !r.matches("h.9.mlp.c_fc.weight"));
        let mlps = Selection {
            mlp_only: true,
            ..Default::default()
        };
        assert!(
            !mlps.is_all() && mlps.matches("h.0.mlp.c_fc.weight") && !mlps.matches("wte.weight")
        );
        assert!(Selection::recommended().resolve(1).is_err());
        assert!(Selection::default().or_recommended(true).is_all());
        assert_eq!(
            Selection::default().or_recommended(false),
            Selection::recommended()
        );
        let both = Selection {
            layers: Some((0, 1)),
            last_blocks: Some(1),
            ..Default::default()
        };
        assert!(both.resolve(4).is_err());
        let s = Selection {
            expert: Some((3, 1)),
            ..Default::default()
        };
        assert!(
            s.matches("h.3.mlp.experts.1.c_fc.weight")
                && !s.matches("h.3.mlp.experts.0.c_fc.weight")
                && !s.matches("h.2.mlp.experts.1.c_fc.weight")
        );
    }
}
