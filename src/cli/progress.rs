//! Progress bars on stderr (hidden with `-q` or when stderr is not a terminal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Hide every bar and spinner from now on (`-q`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar over `len` items.
pub fn bar(len: u64, msg: &str) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_owned());
    pb
}

/// A spinner for work of unknown length.
pub fn spinner(msg: &str) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// The library's [`crate::progress::Progress`] drawn as indicatif bars (a bar when the total is
/// known, a spinner otherwise), one per phase.
#[derive(Default)]
pub struct Bars {
    current: std::sync::Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(guard) = self.current.lock() {
            if let Some(pb) = guard.as_ref() {
                f(pb);
            }
        }
    }
}

impl crate::progress::Progress for Bars {
    fn start(&self, label: &str, total: Option<u64>) {
        let pb = match total {
            Some(n) => bar(n, label),
            None => spinner(label),
        };
        if let Ok(mut guard) = self.current.lock() {
            if let Some(old) = guard.replace(pb) {
                old.finish_and_clear();
            }
        }
    }
    fn advance_to(&self, done: u64) {
        self.with(|pb| pb.set_position(done));
    }
    fn set_total(&self, total: u64) {
        self.with(|pb| pb.set_length(total));
    }
    fn finish(&self) {
        if let Ok(mut guard) = self.current.lock() {
            if let Some(pb) = guard.take() {
                pb.finish_and_clear();
            }
        }
    }
}
