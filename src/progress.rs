//! Progress of long loops, reported to whoever runs them. Library functions take a
//! `&dyn Progress`; the CLI draws bars from it (`cli::progress`), a library user may pass
//! [`Silent`] or their own implementation.

/// Receives the progress of a long step.
pub trait Progress {
    /// A new phase begins: `total` items when known (a bar), `None` for a spinner.
    fn start(&self, _label: &str, _total: Option<u64>) {}
    /// `done` items of the current phase are finished.
    fn advance_to(&self, _done: u64) {}
    /// The current phase changes its total (streamed kernels learn it as they go).
    fn set_total(&self, _total: u64) {}
    /// The current phase is over.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
