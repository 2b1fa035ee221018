//! One writer per output folder: a lock file (`.tailscope.lock`) holding the writer's process id
//! and command, created with `create_new` (atomic on every local filesystem) and removed when
//! the writer ends. A second run into a folder in use is refused, naming the other process; a
//! lock left by a process that no longer exists (killed) is stale and taken over.
//!
//! Liveness is `kill(pid, 0)` on Unix; elsewhere every lock counts as live. A process id reused
//! by an unrelated process after a crash keeps the lock until that process ends (rare; the
//! message names the process so a user can remove the file).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside an output folder.
pub const FILE: &str = ".tailscope.lock";

/// A held lock; dropping it removes the file.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// Is process `pid` running?
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

impl OutputLock {
    /// Take the lock of `dir` (created if missing) for this process, doing `what`.
    pub fn acquire(dir: &Path, what: &str) -> Result<OutputLock> {
        Self::acquire_as(dir, FILE, what)
    }

    /// Take the lock file `name` of `dir`: for writers that share a folder, each with its own
    /// part of it (the shares of a streamed kernel), so that one part has one writer.
    pub fn acquire_as(dir: &Path, name: &str, what: &str) -> Result<OutputLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(name);
        let me = std::process::id();
        // Two tries: the second after removing a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let started = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    writeln!(f, "{me}\n{what}\n{started}").map_err(|e| Error::io(&path, e))?;
                    return Ok(OutputLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut lines = text.lines();
                    let pid = lines.next().and_then(|l| l.trim().parse::<u32>().ok());
                    let holder = lines.next().unwrap_or("?").to_string();
                    match pid {
                        Some(pid) if pid != me && alive(pid) => {
                            return Err(Error::in_file(
                                &path,
                                format!(
                                    "this folder is in use by process {pid} ({holder}); wait \
                                     for it to end or write elsewhere"
                                ),
                            ));
                        }
                        Some(pid) if pid == me => {
                            return Err(Error::in_file(
                                &path,
                                format!("this process already writes here ({holder})"),
                            ));
                        }
                        _ => {
                            // Stale (its process is gone) or unreadable (killed while writing
                            // it): take it over, and remove the temporary files the dead
                            // process left (never read; named with its pid).
                            tracing::warn!(
                                "{}: taking over a stale lock ({})",
                                path.display(),
                                text.replace('\n', " ").trim()
                            );
                            if let Some(dead) = pid {
                                remove_temp_files_of(dir, dead);
                            }
                            match std::fs::remove_file(&path) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                                Err(e) => return Err(Error::io(&path, e)),
                            }
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::in_file(
            &path,
            "another process took this folder's lock at the same moment; try again",
        ))
    }
}

/// Remove the lock files of `dir` whose names start with `prefix` and whose processes are gone
/// (writers of a shared folder that were killed), with the temporary files those processes
/// left; locks of live processes stay. How many were removed.
pub fn clear_stale(dir: &Path, prefix: &str) -> usize {
    let mut removed = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || !name.ends_with(".lock") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        // A lock without a process id yet is being written by a process starting now.
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        tracing::info!(
            "removing {}, left by a process that ended",
            e.path().display()
        );
        remove_temp_files_of(dir, pid);
        if std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Remove, under `dir`, the temporary files a dead process `pid` left. Best effort: a file that
/// cannot be removed stays (it is never read).
fn remove_temp_files_of(dir: &Path, pid: u32) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if crate::io::is_temp_of(&e.file_name().to_string_lossy(), pid) {
                tracing::debug!("removing {}, left by process {pid}", p.display());
                let _ = if is_dir {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            } else if is_dir {
                stack.push(p);
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_is_named_and_a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        // A live process other than this one: a child that waits.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&path, format!("{}\ntailscope ntk\n0\n", child.id())).unwrap();
        let err = OutputLock::acquire(dir.path(), "test").unwrap_err();
        let msg = err.to_string();
        assert!(err.is_bad_input());
        assert!(
            msg.contains(&format!("process {}", child.id())) && msg.contains("tailscope ntk"),
            "{msg}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // Its process is gone: the lock is stale and taken over, then released on drop.
        let lock = OutputLock::acquire(dir.path(), "test").unwrap();
        let held = std::fs::read_to_string(&path).unwrap();
        assert!(held.starts_with(&format!("{}\ntest\n", std::process::id())));
        drop(lock);
        assert!(!path.exists());
    }

    #[test]
    fn one_process_cannot_hold_a_folder_twice() {
        let dir = tempfile::tempdir().unwrap();
        let _a = OutputLock::acquire(dir.path(), "first").unwrap();
        let err = OutputLock::acquire(dir.path(), "second").unwrap_err();
        assert!(err.to_string().contains("first"), "{err}");
    }
}
