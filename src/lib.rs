//! tailscope: find the long-tail training data a language model fails to learn, and why.
//!
//! Modules follow the data flow: [`corpus`] (ingest, synthesise, tokenize) → [`freq`] (n-gram
//! frequency scores, long-tail domains) → model → train → capture → ntk → analysis → report,
//! with [`cli`] at the edge. The method is described in `shared/paper-notes.md` and the README;
//! `ARCHITECTURE.md` maps the modules, what each owns and what it may use.
//!
//! Every command of the binary is a library function: [`source::load_model`] (a model from any
//! source), [`capture::job::Job::prepare`] (model, samples and parameters),
//! [`ntk::pipeline::compute`] (kernel, GC, sample tables), [`analysis::analyze::analyze`],
//! [`eval::evaluate::evaluate`], [`train::runs::train_runs`], [`report::build`] and
//! [`pipeline::run`] (a declarative spec).

#![warn(missing_docs)]

pub mod analysis;
pub mod array;
pub mod batch;
pub mod capture;
pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod corpus;
pub mod device;
pub mod error;
pub mod eval;
pub mod freq;
pub mod import;
pub mod io;
pub mod lock;
pub mod manifest;
pub mod model;
pub mod ntk;
pub mod pipeline;
pub mod plots;
pub mod progress;
pub mod report;
pub mod seed;
pub mod source;
pub mod stats;
pub mod study;
pub mod train;

pub use error::{Error, Result};
