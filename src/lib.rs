//! tailscope: find the long-tail training data a language model fails to learn, and why.
//!
//! Modules follow the data flow: [`corpus`] (ingest, synthesise, tokenize) → [`freq`] (n-gram
//! frequency scores, long-tail domains) → model → train → capture → ntk → analysis → report,
//! with [`cli`] at the edge. The method is described in `shared/paper-notes.md` and the README.

pub mod analysis;
pub mod capture;
pub mod cli;
pub mod cluster;
pub mod corpus;
pub mod device;
pub mod error;
pub mod eval;
pub mod freq;
pub mod import;
pub mod io;
pub mod model;
pub mod ntk;
pub mod report;
pub mod train;

pub use error::{Error, Result};
