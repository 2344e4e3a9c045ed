//! Ranks: one process per rank, started and coordinated by MPI (`mpirun -np N`, `srun --mpi=pmix`),
//! never by a protocol of our own (issue 17). A command joins MPI only when the launcher's
//! environment says it was started as one of several ranks (Open MPI's `OMPI_COMM_WORLD_SIZE`,
//! PMI's `PMI_SIZE`, PMIx's `PMIX_RANK`) or when asked (`--distributed`); otherwise it is the one
//! and only rank, and nothing changes.
//!
//! A rank that fails must not leave the others waiting in a collective forever: [`Dist::abort`]
//! ends the whole job (MPI_Abort), and [`Dist::install_abort_hook`] makes a panic do the same.
//!
//! Built without the `mpi` feature, a process started as one of several ranks refuses to run
//! (each would otherwise do the whole job and race the others for the same files).

use anyhow::{bail, Result};

/// The ranks of this job.
pub struct Dist {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
}

/// The world size an MPI launcher announced in the environment, if any.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"]
        .iter()
        .filter(|v| {
            **v != "SLURM_NTASKS" || std::env::var_os("PMIX_RANK").is_some() || std::env::var_os("PMI_RANK").is_some()
        })
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .or_else(|| std::env::var_os("PMIX_RANK").map(|_| 0))
}

impl Dist {
    /// This process alone.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            universe: None,
        }
    }

    /// The job's ranks: MPI when a launcher started this process (or `force`), else [`Dist::single`].
    pub fn from_env(force: bool) -> Result<Dist> {
        let launched = launcher_world_size();
        if !force && launched.is_none() {
            return Ok(Dist::single());
        }
        Self::init(launched, force)
    }

    #[cfg(feature = "mpi")]
    fn init(_launched: Option<usize>, _force: bool) -> Result<Dist> {
        use mpi::traits::Communicator;
        let Some(universe) = mpi::initialize() else { bail!("MPI was already initialised in this process") };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Dist { rank, size, universe: Some(universe) })
    }

    #[cfg(not(feature = "mpi"))]
    fn init(launched: Option<usize>, force: bool) -> Result<Dist> {
        match launched {
            Some(n) if n > 1 => bail!(
                "started as one of {n} MPI ranks, but this roentgen was built without MPI: rebuild it with \
                 `cargo build --release --features mpi` (needs Open MPI's headers and libclang)"
            ),
            _ if force => {
                bail!("--distributed: this roentgen was built without MPI (cargo build --release --features mpi)")
            }
            _ => Ok(Dist::single()),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Waits until every rank has reached it.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::CommunicatorCollectives;
            u.world().barrier();
        }
    }

    /// The sum over ranks of `x`.
    pub fn sum_u64(&self, x: u64) -> u64 {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::CommunicatorCollectives;
            let mut out = 0u64;
            u.world().all_reduce_into(&x, &mut out, mpi::collective::SystemOperation::sum());
            return out;
        }
        x
    }

    /// Ends the whole job (every rank) with `code`, after this rank's message is out.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::Communicator;
            u.world().abort(code);
        }
        std::process::exit(code)
    }

    /// With several ranks, a panic in any of them aborts the job (after the usual message) instead
    /// of leaving the others blocked in a collective.
    pub fn install_abort_hook(&self) {
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                // SAFETY: MPI is initialised (size > 1 came from it); MPI_Abort does not return.
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
                }
            }));
        }
    }
}
