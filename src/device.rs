//! Where tensors live. `--device auto` picks CUDA when libtorch sees a GPU and the CPU otherwise;
//! asking for CUDA where there is none is an error rather than a silent fallback, because results
//! and speed would differ from what the user asked for. CPU runs are deterministic for a seed.

use crate::error::{Error, Result};

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA if available, else CPU.
    #[default]
    Auto,
    /// The CPU (deterministic; what CI and tests use).
    Cpu,
    /// The first CUDA device; fails when none is available.
    Cuda,
}

/// Resolve the choice into a libtorch device.
pub fn resolve(arg: DeviceArg) -> Result<tch::Device> {
    match arg {
        DeviceArg::Cpu => Ok(tch::Device::Cpu),
        DeviceArg::Auto => Ok(tch::Device::cuda_if_available()),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        DeviceArg::Cuda => Err(Error::invalid(
            "--device",
            "cuda requested but libtorch sees no CUDA device; use --device cpu or auto",
        )),
    }
}

/// Apply `--threads` to libtorch's intra-op pool and rayon's global pool, and seed libtorch.
pub fn configure(threads: Option<usize>, seed: u64) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            return Err(Error::invalid("--threads", "must be at least 1"));
        }
        tch::set_num_threads(n as i32);
        // Fails only if the pool was already built (a second call in one process, e.g. in tests).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    tch::manual_seed(seed as i64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_resolves_and_zero_threads_is_rejected() {
        assert_eq!(resolve(DeviceArg::Cpu).unwrap(), tch::Device::Cpu);
        if !tch::Cuda::is_available() {
            assert!(resolve(DeviceArg::Cuda).unwrap_err().is_bad_input());
            assert_eq!(resolve(DeviceArg::Auto).unwrap(), tch::Device::Cpu);
        }
        assert!(configure(Some(0), 0)
            .unwrap_err()
            .to_string()
            .starts_with("--threads"));
    }
}
