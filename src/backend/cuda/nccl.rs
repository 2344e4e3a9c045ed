//! NCCL: the gradient sum between GPUs (issue 17), in place on our own device pointers and on the
//! backend's stream, the way llm.c does it (MPI starts the ranks and carries NCCL's unique id;
//! NCCL moves the data over NVLink, PCIe or InfiniBand).
//!
//! The types are cudarc's (`cudarc::nccl::sys`); the library is loaded here. cudarc's own loader
//! looks for `libnccl.so`, `libnccl.so.13`, `.so.12`, … but not `libnccl.so.2`, the one name that
//! NCCL's packages install (Debian's libnccl2, NVIDIA's repositories, the PyPI nvidia-nccl wheels
//! that PyTorch depends on); so [`find_library`] searches the usual places for that name and says
//! where it looked when nothing is there. Only the six entry points used are resolved.

use crate::dist::Dist;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};

type GetVersion = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> ncclResult_t;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> ncclResult_t;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> ncclResult_t;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> ncclResult_t;
type GetErrorString = unsafe extern "C" fn(ncclResult_t) -> *const c_char;

/// The file names NCCL is installed under, the versioned one first.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// An explicit path to the library, searched before anything else.
pub const ENV_PATH: &str = "ROENTGEN_NCCL";

/// The folders searched for NCCL, in order: `LD_LIBRARY_PATH`, `$NCCL_HOME/lib`,
/// `$CUDA_HOME/lib64`, `$CONDA_PREFIX/lib`, the nvidia/nccl/lib folder of the Python
/// environments' site-packages (a virtualenv, the user's, the system's), then the system's
/// library folders.
pub fn search_folders() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    dirs.extend(env("NCCL_HOME").map(|h| h.join("lib")));
    dirs.extend(env("CUDA_HOME").map(|h| h.join("lib64")));
    dirs.extend(env("CONDA_PREFIX").map(|h| h.join("lib")));
    // site-packages/nvidia/nccl/lib of every python3.X under these prefixes.
    let mut prefixes: Vec<PathBuf> = Vec::new();
    prefixes.extend(env("VIRTUAL_ENV").map(|v| v.join("lib")));
    prefixes.extend(env("CONDA_PREFIX").map(|v| v.join("lib")));
    prefixes.extend(env("HOME").map(|h| h.join(".local/lib")));
    prefixes.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons {
            for packages in ["site-packages", "dist-packages"] {
                dirs.push(py.join(packages).join("nvidia/nccl/lib"));
            }
        }
    }
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/local/cuda/lib64",
            "/usr/local/lib",
        ]
        .map(PathBuf::from),
    );
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The NCCL library to load: `$ROENTGEN_NCCL` if set, else the first of [`NAMES`] in
/// [`search_folders`]; an error naming every folder searched otherwise.
pub fn find_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_PATH).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "{ENV_PATH}={}: no such file", p.display());
        return Ok(p);
    }
    let dirs = search_folders();
    for d in &dirs {
        for name in NAMES {
            let f = d.join(name);
            if f.is_file() {
                return Ok(f);
            }
        }
    }
    bail!(
        "NCCL not found: looked for {} in {}. Install it (Debian/Ubuntu: libnccl2 from NVIDIA's repository; \
         pip: nvidia-nccl-cu13, which PyTorch installs) or name the file with {ENV_PATH}=/path/to/libnccl.so.2",
        NAMES.join(" and "),
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The loaded library's entry points.
pub struct NcclLib {
    path: PathBuf,
    version: i32,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    // Last: the entry points above point into it.
    _lib: libloading::Library,
}

impl NcclLib {
    /// Finds and loads NCCL and resolves its entry points (no GPU needed).
    pub fn load() -> Result<NcclLib> {
        let path = find_library()?;
        Self::load_from(&path)
    }

    pub fn load_from(path: &Path) -> Result<NcclLib> {
        // SAFETY: loading NCCL runs its initialisers only (no CUDA work happens before a call).
        let lib = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("NCCL: cannot load {}", path.display()))?;
        fn sym<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T> {
            // SAFETY: the symbol's type is NCCL's C signature (nccl.h, as cudarc declares it).
            unsafe { lib.get::<T>(name.as_bytes()).map(|s| *s) }
                .map_err(|e| anyhow!("NCCL: {} has no {name}: {e}", path.display()))
        }
        let get_version: GetVersion = sym(&lib, path, "ncclGetVersion")?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { get_version(&mut version) };
        ensure!(version >= 21800, "NCCL: {} is version {version}; roentgen needs 2.18 or newer", path.display());
        Ok(NcclLib {
            path: path.to_path_buf(),
            version,
            get_unique_id: sym(&lib, path, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, path, "ncclCommInitRank")?,
            all_reduce: sym(&lib, path, "ncclAllReduce")?,
            comm_destroy: sym(&lib, path, "ncclCommDestroy")?,
            get_error_string: sym(&lib, path, "ncclGetErrorString")?,
            _lib: lib,
        })
    }

    /// NCCL's version code (e.g. 22703 for 2.27.3).
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, r: ncclResult_t, what: &str) -> Result<()> {
        if r == ncclResult_t::ncclSuccess {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any result code.
        let msg = unsafe { std::ffi::CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy().into_owned();
        bail!("NCCL: {what}: {msg} ({r:?})")
    }
}

/// One communicator over the job's ranks, each on its own GPU.
pub struct NcclComm {
    lib: NcclLib,
    comm: ncclComm_t,
    ranks: usize,
}

impl NcclComm {
    /// Joins the ranks of `dist` (collective: every rank calls it): rank 0 makes NCCL's unique
    /// id, MPI carries it to the others. The current CUDA context's device is this rank's GPU.
    pub fn new(dist: &Dist) -> Result<NcclComm> {
        let lib = NcclLib::load()?;
        // SAFETY: ncclUniqueId is 128 plain bytes.
        let mut id: ncclUniqueId = unsafe { std::mem::zeroed() };
        if dist.is_root() {
            // SAFETY: writes the id.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        }
        let bytes: [u8; std::mem::size_of::<ncclUniqueId>()] =
            // SAFETY: plain bytes of the same size.
            unsafe { std::mem::transmute_copy(&id) };
        let shared = dist.broadcast_bytes(&bytes);
        ensure!(shared.len() == bytes.len(), "NCCL: the unique id arrived with {} bytes", shared.len());
        // SAFETY: the same size; any bytes are a valid id value.
        id = unsafe { std::ptr::read_unaligned(shared.as_ptr() as *const ncclUniqueId) };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (n, r) = (dist.size() as c_int, dist.rank() as c_int);
        // SAFETY: blocks until every rank has joined; writes comm.
        lib.check(unsafe { (lib.comm_init_rank)(&mut comm, n, id, r) }, "ncclCommInitRank")?;
        Ok(NcclComm { lib, comm, ranks: dist.size() })
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn lib(&self) -> &NcclLib {
        &self.lib
    }

    /// Queues the in-place sum of `count` f32 at device address `ptr` over the ranks on `stream`
    /// (ordered after the work already queued there, and before what follows).
    pub fn sum_f32_in_place(&self, ptr: u64, count: usize, stream: u64) -> Result<()> {
        let p = ptr as *mut c_void;
        // SAFETY: ptr holds count f32 of this rank's device memory; stream is this backend's.
        let r = unsafe {
            (self.lib.all_reduce)(
                p,
                p,
                count,
                ncclDataType_t::ncclFloat32,
                ncclRedOp_t::ncclSum,
                self.comm,
                stream as cudaStream_t,
            )
        };
        self.lib.check(r, "ncclAllReduce")
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: comm came from ncclCommInitRank and is destroyed once.
        unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}
