//! Analysis of per-sample statistics (`tailscope analyze`): what each sample's fit, uncertainty
//! and length-matched loss are ([`features`]), how the training data's gradients move it
//! ([`learnability`]), how likely it is to be neglected — learnable and not yet learned — and
//! why ([`neglect`]), frequency correlations with bootstrap intervals ([`crate::stats`]), and
//! expert isolation against a dense baseline ([`isolation`]); [`analyze`] runs them all on an
//! NTK run. [`select`] ranks the analysed samples by a criterion to choose what to train on
//! next; [`flags`] keeps the earlier rarity rule, ranked by `select --criterion rarity-rule` for
//! comparison.

pub mod analyze;
pub mod features;
pub mod flags;
pub mod isolation;
pub mod learnability;
pub mod neglect;
pub mod select;
