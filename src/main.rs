use std::process::ExitCode;

fn main() -> ExitCode {
    match tailscope::cli::run(std::env::args_os()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tailscope: {err:#}");
            ExitCode::from(tailscope::cli::exit_code(&err))
        }
    }
}
