//! Analysis of per-sample metrics (`tailscope analyze`): correlations of data frequency with
//! alignment, self-kernel and loss, with bootstrap intervals ([`crate::stats`]), and the ranked
//! under-memorised long-tail flags ([`flags`]), and expert isolation against a dense baseline
//! ([`isolation`]); [`analyze`] runs them all on an NTK run. [`select`] ranks the analysed
//! samples by a criterion to choose what to train on next.

pub mod analyze;
pub mod flags;
pub mod isolation;
pub mod select;
