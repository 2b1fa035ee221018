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

/// Environment variables that MPI launchers (Open MPI, MPICH and Intel MPI's Hydra, PMIx, Slurm's
/// srun with PMI) set in every process they start.
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"];

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`).
pub fn mpi_launched() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// This process's rank on its host, from the launcher (0 when it does not say).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PMIX_LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The device of one of several ranks on a host: CUDA device (local rank mod device count), so
/// the ranks of a host spread over its GPUs; the CPU stays the CPU.
pub fn for_local_rank(device: tch::Device) -> tch::Device {
    match device {
        tch::Device::Cuda(_) => spread(device, local_rank(), tch::Cuda::device_count() as usize),
        other => other,
    }
}

/// `device` for the rank `local` of a host with `count` GPUs: CUDA device local mod count (0
/// when the count is unknown); any other device as it is.
pub fn spread(device: tch::Device, local: usize, count: usize) -> tch::Device {
    match device {
        tch::Device::Cuda(_) => tch::Device::Cuda(local % count.max(1)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_spread_over_a_hosts_gpus() {
        use tch::Device::{Cpu, Cuda};
        let on = |local, count| spread(Cuda(0), local, count);
        assert_eq!(
            (0..6).map(|r| on(r, 4)).collect::<Vec<_>>(),
            vec![Cuda(0), Cuda(1), Cuda(2), Cuda(3), Cuda(0), Cuda(1)]
        );
        assert_eq!(on(3, 0), Cuda(0));
        assert_eq!(spread(Cpu, 3, 4), Cpu);
    }

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
