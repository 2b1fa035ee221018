use std::process::ExitCode;

fn main() -> ExitCode {
    // A write past a file-size limit (ulimit -f) then fails with EFBIG, which names the file,
    // instead of killing the process with SIGXFSZ and leaving a temporary file behind.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to ignore, before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match tailscope::cli::run(std::env::args_os()) {
        Ok(code) => code,
        Err(err) => {
            // One write: processes failing together (MPI ranks) do not interleave lines.
            let line = format!("tailscope: {}\n", tailscope::cli::message(&err));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::from(tailscope::cli::exit_code(&err))
        }
    }
}
