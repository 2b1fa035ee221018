//! Analysis of per-sample metrics (`tailscope analyze`): correlations of data frequency with
//! alignment, self-kernel and loss, with bootstrap intervals ([`stats`]), and the ranked
//! under-memorised long-tail flags ([`flags`]), and expert isolation against a dense baseline
//! ([`isolation`]).

pub mod flags;
pub mod isolation;
pub mod pca;
pub mod stats;
