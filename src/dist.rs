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

use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Elements per host-staged reduction (16 MiB of f32): the scratch bound of [`Dist::sum_tensor`].
pub const REDUCE_CHUNK: usize = 1 << 22;

/// This process's index among the ranks on its node, as the launcher announced it (Open MPI,
/// MPICH/Hydra, PMIx, Slurm), if any: the GPU a rank uses.
pub fn launcher_local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "PMI_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

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

    /// The sum over ranks of `x` (the same value on every rank).
    pub fn sum_f64(&self, x: f64) -> f64 {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::CommunicatorCollectives;
            let mut out = 0f64;
            u.world().all_reduce_into(&x, &mut out, mpi::collective::SystemOperation::sum());
            return out;
        }
        x
    }

    /// Sums `t` over ranks, in place: with the backend's own collective where it has one (NCCL
    /// between GPUs), else through the host ([`Dist::sum_tensor_through_host`]). Every rank ends
    /// with the same values.
    pub fn sum_tensor(&self, b: &dyn Backend, t: &Tensor) -> Result<()> {
        if self.size == 1 || b.sum_over_ranks(t, self)? {
            return Ok(());
        }
        self.sum_tensor_through_host(b, t)
    }

    /// Sums `t` over ranks, in place, through the host: chunks of at most [`REDUCE_CHUNK`] elements
    /// are downloaded, reduced by MPI (Allreduce) and uploaded back, so the scratch memory stays
    /// bounded whatever the model's size.
    pub fn sum_tensor_through_host(&self, b: &dyn Backend, t: &Tensor) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::CommunicatorCollectives;
            let world = u.world();
            let n = t.numel();
            let mut sum = vec![0f32; REDUCE_CHUNK.min(n)];
            let mut at = 0;
            while at < n {
                let len = REDUCE_CHUNK.min(n - at);
                let chunk = Tensor::new(t.pool, t.offset + at, [len].into());
                let mine = b.download(&chunk)?;
                world.all_reduce_into(&mine[..], &mut sum[..len], mpi::collective::SystemOperation::sum());
                b.upload(&chunk, &sum[..len])?;
                at += len;
            }
            return Ok(());
        }
        let _ = (b, t);
        Ok(())
    }

    /// Every rank's `mine`, in rank order (all ranks pass slices of one length).
    pub fn gather_u64s(&self, mine: &[u64]) -> Vec<Vec<u64>> {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::CommunicatorCollectives;
            let mut all = vec![0u64; mine.len() * self.size];
            u.world().all_gather_into(mine, &mut all[..]);
            return all.chunks(mine.len().max(1)).map(|c| c.to_vec()).collect();
        }
        vec![mine.to_vec()]
    }

    /// Rank 0's `text`, on every rank.
    pub fn broadcast_string(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.broadcast_bytes(text.as_bytes())).into_owned()
    }

    /// Rank 0's `bytes`, on every rank (the others' are ignored).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::{Communicator, Root};
            let world = u.world();
            let root = world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            let mut out = if self.is_root() { bytes.to_vec() } else { vec![0u8; len as usize] };
            root.broadcast_into(&mut out[..]);
            return out;
        }
        bytes.to_vec()
    }

    /// Checks that every rank holds the same `items` (name, fingerprint; the same names on every
    /// rank), and says which differ between which ranks otherwise. Every rank sees the same
    /// answer, so all stop together.
    pub fn agree(&self, items: &[(String, u64)]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let mine: Vec<u64> = items.iter().map(|(_, h)| *h).collect();
        let all = self.gather_u64s(&mine);
        let mut diffs = Vec::new();
        for (k, (name, _)) in items.iter().enumerate() {
            let others: Vec<String> =
                (1..self.size).filter(|&r| all[r][k] != all[0][k]).map(|r| r.to_string()).collect();
            if !others.is_empty() {
                diffs.push(format!("{name} (rank 0 and rank {})", others.join(", ")));
            }
        }
        if !diffs.is_empty() {
            bail!("the ranks disagree on {}", diffs.join("; "));
        }
        Ok(())
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
            let (rank, size) = (self.rank, self.size);
            std::panic::set_hook(Box::new(move |info| {
                // One write of the whole line (the launcher forwards output in pieces and its
                // abort report must not land inside it).
                let p = info.payload();
                let what =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let line = format!("error (rank {rank} of {size}): panicked{at}: {}\n", what.unwrap_or_default());
                let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
                // SAFETY: MPI is initialised (size > 1 came from it); MPI_Abort does not return.
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
                }
            }));
        }
    }
}

/// A 64-bit fingerprint of `bytes` (FNV-1a over 8-byte words): equal inputs give equal values on
/// every rank; not a cryptographic hash (it guards against mistakes, not adversaries).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &x in words.remainder() {
        h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The fingerprint of a tensor's values (their bits), read in chunks of [`REDUCE_CHUNK`].
pub fn fingerprint_tensor(b: &dyn Backend, t: &Tensor) -> Result<u64> {
    let n = t.numel();
    let mut h = 0u64;
    let mut at = 0;
    while at < n {
        let len = REDUCE_CHUNK.min(n - at);
        let v = b.download(&Tensor::new(t.pool, t.offset + at, [len].into()))?;
        h = h.rotate_left(5) ^ fingerprint(bytemuck::cast_slice(&v));
        at += len;
    }
    Ok(h)
}
