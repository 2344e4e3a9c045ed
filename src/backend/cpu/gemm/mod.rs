//! Matrix products for the CPU backend: our own packed SGEMM, BLIS's loop nest. B is packed once
//! into KC × NR panels (`PackedB`, reusable across calls: layer weights are kept packed between
//! calls by `weights.rs`, attention's K and V are packed once per head). A is a matrix in memory
//! or a convolution's patches (`RowRuns`). The AVX-512 kernel reads A's rows in place (a
//! row-major matrix's, or the patches' runs from the input) — gathering patches into panels had
//! cost a sixth of the VAE decoder's time, as much per value as the product when c_out is 128;
//! other kernels, and strided A, get MR × KC panels packed per row block. A register-tile
//! micro-kernel (`kernels.rs`) computes each MR × NR tile of C, picked at run time from the CPU's
//! instruction sets: AVX-512 (12 × 32: 24 accumulators of the 32 zmm registers), AVX2 + FMA
//! (6 × 16: 12 of the 16 ymm) or portable (4 × 16, plain arrays). The parallel entry points split
//! C's tiles across rayon's threads, so the CPU backend has one thread pool.
//!
//! Blocking: KC = 256 keeps a B panel (256 × 32 × 4 B = 32 KiB) in L1 and an A block
//! (MC = 144 rows × 256 × 4 B = 144 KiB) in L2; NC = 4096 columns bound a packed B block to 4 MiB
//! of L3. With A read in place the tile's 12 rows stay in L1 across the B panels instead.

mod kernels;

use super::scratch;
use kernels::{kernel_avx512_rows, kernel_portable};
use rayon::prelude::*;
use std::sync::OnceLock;

/// A read-only matrix in row-major memory with arbitrary element strides (a transposed view is
/// row_stride 1, col_stride = rows of the original).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Mat<'_> {
    /// Panics unless every element of a rows × cols view lies inside `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "sgemm operand {what} out of bounds");
        }
    }

    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

const KC: usize = 256;
const MC: usize = 144; // a multiple of every MR (12, 6, 4)
const NC: usize = 4096; // a multiple of every NR (32, 16)
const MAX_TILE: usize = 12 * 32;
/// The shortest run the AVX-512 kernel reads in place: shorter ones would pay a C tile's load and
/// store every few k, and are packed.
const IN_PLACE_RUN: usize = 16;
/// The widest edge panel the AVX-512 kernels compute at half width (one zmm per row, not two).
const HALF_PANEL: usize = 16;

/// The micro-kernel family, chosen once per process from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// C tile (MR × NR at `c`, row stride `rs_c`) = A panel · B panel + beta · C tile; beta 0 never
/// reads C (so it may hold NaN, as BLAS allows).
type Kernel = unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rs_c: usize, beta: f32);

impl Isa {
    /// The best kernel this CPU runs. `ROENTGEN_CPU_GEMM=avx2|portable` forces a lesser one (to
    /// compare them, or to rule one out when chasing a numeric difference).
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::available()[0];
            match std::env::var("ROENTGEN_CPU_GEMM").as_deref() {
                Ok("avx2") if Isa::available().contains(&Isa::Avx2) => Isa::Avx2,
                Ok("portable") => Isa::Portable,
                _ => best,
            }
        })
    }

    /// Every kernel this CPU can run, best first.
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Portable);
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2+fma",
            Isa::Portable => "portable",
        }
    }

    /// (MR, NR): the register tile.
    const fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (12, 32),
            Isa::Avx2 => (6, 16),
            Isa::Portable => (4, 16),
        }
    }

    /// The kernel for a tile of `cols` ≤ NR columns: AVX-512 computes a panel of at most
    /// `HALF_PANEL` at half width.
    fn kernel(self, cols: usize) -> Kernel {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if cols <= HALF_PANEL => kernels::x86::kernel_avx512::<1>,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::x86::kernel_avx512::<2>,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::x86::kernel_avx2,
            _ => kernel_portable,
        }
    }
}

/// A B operand to pack: a matrix, or a convolution's weight with its rows taken tap by tap.
#[derive(Clone, Copy)]
pub enum BSource<'a> {
    Mat(Mat<'a>),
    /// Wᵀ of a convolution weight `w` (c_out × c_in·taps, PyTorch's (c_out, c_in, kh, kw)) with
    /// its rows reordered tap-major: row tap·c_in + ci of this B is row ci·taps + tap of Wᵀ. An
    /// implicit GEMM's A then holds, for one tap, one contiguous run of an input pixel's channels,
    /// which the kernel reads in place (`RowRuns`).
    TapMajor {
        w: &'a [f32],
        taps: usize,
        c_in: usize,
    },
}

impl<'a> From<Mat<'a>> for BSource<'a> {
    fn from(m: Mat<'a>) -> BSource<'a> {
        BSource::Mat(m)
    }
}

impl BSource<'_> {
    /// Rows k0..k0 + kc, columns js of this B into a kernel panel `d` (see `pack_b_panel`).
    fn pack_panel(&self, d: &mut [f32], (k0, kc): (usize, usize), js: (usize, usize), nr: usize) {
        match *self {
            BSource::Mat(b) => pack_b_panel(d, b, (k0, kc), js, nr),
            BSource::TapMajor { w, taps, c_in } => {
                // The panel's rows come in runs of one tap each, a strided column of Wᵀ's rows.
                let mut r = k0;
                while r < k0 + kc {
                    let (tap, ci) = (r / c_in, r % c_in);
                    let len = (c_in - ci).min(k0 + kc - r);
                    let wt = Mat { data: &w[tap..], row_stride: taps, col_stride: c_in * taps };
                    pack_b_panel(&mut d[(r - k0) * nr..(r - k0 + len) * nr], wt, (ci, len), js, nr);
                    r += len;
                }
            }
        }
    }

    fn check(&self, k: usize, n: usize) {
        match *self {
            BSource::Mat(b) => b.check(k, n, "b"),
            BSource::TapMajor { w, taps, c_in } => {
                assert!(taps * c_in == k && w.len() >= n * k, "sgemm operand b (a convolution weight) out of bounds")
            }
        }
    }
}

/// B (k × n) packed for one kernel: for each block of NC columns, for each block of KC rows,
/// column panels of NR, each stored k-major (NR values per k, zero-padded past n).
pub struct PackedB {
    k: usize,
    n: usize,
    isa: Isa,
    data: Storage,
}

/// Where a `PackedB`'s values live: a heap buffer (scratch, small copies), or for a large copy an
/// anonymous mapping with transparent huge pages requested, as the CPU pools are: packing a kept
/// 3 GB copy then faults 1,600 times instead of 800,000, and the kernel's reads of B miss the TLB
/// less.
enum Storage {
    Heap(Vec<f32>),
    Mapped(memmap2::MmapMut),
}

impl Storage {
    /// Zeroed storage for `len` values.
    fn zeroed(len: usize) -> Storage {
        const MAPPED_FROM: usize = 4 << 20; // bytes: two huge pages
        if len * 4 >= MAPPED_FROM {
            if let Ok(map) = memmap2::MmapMut::map_anon(len * 4) {
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage); // a hint; without it the copy still works
                return Storage::Mapped(map);
            }
        }
        Storage::Heap(vec![0f32; len])
    }

    fn values(&self) -> &[f32] {
        match self {
            Storage::Heap(v) => v,
            Storage::Mapped(m) => bytemuck::cast_slice(m), // page-aligned, a whole number of f32
        }
    }

    fn values_mut(&mut self) -> &mut [f32] {
        match self {
            Storage::Heap(v) => v,
            Storage::Mapped(m) => bytemuck::cast_slice_mut(m),
        }
    }
}

impl PackedB {
    /// Packs b (k × n) for this CPU's kernel; `parallel` spreads the panels over rayon's threads.
    pub fn new<'a>(k: usize, n: usize, b: impl Into<BSource<'a>>, parallel: bool) -> PackedB {
        PackedB::with_isa(k, n, b.into(), parallel, Isa::detected())
    }

    /// As `new`, into a buffer from the calling thread's scratch; `recycle` gives it back (for
    /// packs that live through one operation, as attention's per-head K and V).
    pub fn in_scratch<'a>(k: usize, n: usize, b: impl Into<BSource<'a>>, parallel: bool) -> PackedB {
        PackedB::into_buffer(k, n, b.into(), parallel, Isa::detected(), scratch::take())
    }

    /// (k, n): the shape of the B it holds.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Gives a scratch-backed pack's buffer back to the calling thread (see `in_scratch`).
    pub fn recycle(self) {
        if let Storage::Heap(v) = self.data {
            scratch::give_back(v);
        }
    }

    fn with_isa(k: usize, n: usize, b: BSource, parallel: bool, isa: Isa) -> PackedB {
        // Zeroed by the allocator or the OS, untouched until the packing writes it, so the page
        // faults of a large copy are taken by the packing threads in parallel, not by one memset.
        let mut data = Storage::zeroed(packed_len(k, n, isa));
        pack_b(k, n, b, parallel, isa, data.values_mut());
        PackedB { k, n, isa, data }
    }

    /// Packs into `data`'s allocation (grown if short; see `with_packed_b`).
    fn into_buffer(k: usize, n: usize, b: BSource, parallel: bool, isa: Isa, mut data: Vec<f32>) -> PackedB {
        // Every value is written by pack_b (padding included), so stale contents are harmless.
        data.resize(packed_len(k, n, isa), 0.0);
        pack_b(k, n, b, parallel, isa, &mut data);
        PackedB { k, n, isa, data: Storage::Heap(data) }
    }

    /// Where block (column block jb, row block kb) starts: every earlier column block holds
    /// k × NC values, and every earlier row block of this one KC × (its padded width).
    fn block(&self, jb: usize, kb: usize) -> &[f32] {
        let nr = self.isa.tile().1;
        let width = NC.min(self.n - jb * NC).div_ceil(nr) * nr;
        &self.data.values()[jb * self.k * NC + kb * KC * width..]
    }
}

/// Values in B (k × n) packed for `isa`: n padded to whole panels.
fn packed_len(k: usize, n: usize, isa: Isa) -> usize {
    k * n.div_ceil(isa.tile().1) * isa.tile().1
}

/// B (k × n) into `data` (`packed_len` values) in `PackedB`'s layout, one task per (column block,
/// row block, panel), all in one parallel region when `parallel`.
fn pack_b(k: usize, n: usize, b: BSource, parallel: bool, isa: Isa, data: &mut [f32]) {
    b.check(k, n);
    let nr = isa.tile().1;
    let mut panels: Vec<(usize, usize, usize, &mut [f32])> = Vec::new();
    let mut rest = data;
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for p in 0..nc.div_ceil(nr) {
                let (panel, tail) = rest.split_at_mut(kc * nr);
                panels.push((k0, kc, j0 + p * nr, panel));
                rest = tail;
            }
        }
    }
    let pack = |(k0, kc, j0, d): (usize, usize, usize, &mut [f32])| b.pack_panel(d, (k0, kc), (j0, nr.min(n - j0)), nr);
    if parallel {
        panels.into_par_iter().for_each(pack);
    } else {
        panels.into_iter().for_each(pack);
    }
}

/// B's panel (kc × jn at (k0, j0)) packed k-major, NR values per k, zero-padded past jn.
fn pack_b_panel(d: &mut [f32], b: Mat, (k0, kc): (usize, usize), (j0, jn): (usize, usize), nr: usize) {
    if jn < nr {
        d.fill(0.0);
    }
    if b.col_stride == 1 {
        for kk in 0..kc {
            let src = &b.data[(k0 + kk) * b.row_stride + j0..][..jn];
            d[kk * nr..kk * nr + jn].copy_from_slice(src);
        }
    } else {
        // Columns contiguous (a transposed weight, as every Linear and Conv2d weight is read):
        // a transpose, by 16 × 16 squares through a tile in registers/L1 so that both the reads
        // (16 along a column) and the writes (16 along a packed row) are contiguous runs.
        b.check(k0 + kc, j0 + jn, "b");
        let mut tile = [[0f32; 16]; 16];
        for kb in (0..kc).step_by(16) {
            let kn = 16.min(kc - kb);
            for jb in (0..jn).step_by(16) {
                let jm = 16.min(jn - jb);
                for (j, row) in tile.iter_mut().enumerate().take(jm) {
                    let col = (k0 + kb) * b.row_stride + (j0 + jb + j) * b.col_stride;
                    if b.row_stride == 1 && kn == 16 {
                        // A fixed-length copy: a vector move, not a call to memmove.
                        *row = b.data[col..col + 16].try_into().unwrap();
                    } else if b.row_stride == 1 {
                        row[..kn].copy_from_slice(&b.data[col..col + kn]);
                    } else {
                        (0..kn).for_each(|t| row[t] = b.data[col + t * b.row_stride]);
                    }
                }
                for t in 0..kn {
                    let dst = &mut d[(kb + t) * nr + jb..][..jm];
                    dst.iter_mut().zip(&tile[..jm]).for_each(|(x, row)| *x = row[t]);
                }
            }
        }
    }
}

/// A GEMM's A read in place, row by row, as an implicit GEMM reads a convolution's patches: A's
/// columns come in runs of `run()` (a tap's c_in channels), and within a run each row's values
/// are contiguous in memory (one input pixel's channels, or a run of zeros in the padding). The
/// AVX-512 kernel reads them where they are (`kernel_avx512_rows`); other kernels, and runs too
/// short to amortise a kernel call, get them packed into panels from the same pointers.
pub trait RowRuns: Sync {
    /// Values per run; A has k / run runs.
    fn run(&self) -> usize;
    /// For rows i0..i0 + mr: `out[r · mr + i]` = where row i0 + i's values in run r start, for
    /// every run r; rows at or past i0 + `rows` get any readable run (zeros, or a real row's):
    /// they fill an edge tile's spare rows, whose products are discarded.
    fn starts(&self, out: &mut [*const f32], i0: usize, rows: usize, mr: usize);
}

/// A row-major matrix (column stride 1) as one run per row, so that the AVX-512 kernel reads it
/// in place too: packing it would be a scalar transpose of every value, as costly per value as
/// the product when n is small (attention's P·V with head dim 40 spent 9% of SD's 512² U-Net
/// step in it).
struct MatRows<'a> {
    a: Mat<'a>,
    k: usize,
}

impl RowRuns for MatRows<'_> {
    fn run(&self) -> usize {
        self.k
    }

    fn starts(&self, out: &mut [*const f32], i0: usize, rows: usize, mr: usize) {
        for (i, s) in out[..mr].iter_mut().enumerate() {
            // Spare rows read row i0 again (see `RowRuns::starts`).
            let r = if i < rows { i0 + i } else { i0 };
            *s = self.a.data[r * self.a.row_stride..].as_ptr();
        }
    }
}

/// Where a product's A comes from.
#[derive(Clone, Copy)]
enum ASource<'a> {
    Mat(Mat<'a>),
    Rows(&'a dyn RowRuns),
}

fn pack_a(dst: &mut [f32], a: Mat, (i0, rows): (usize, usize), (k0, kc): (usize, usize), mr: usize) {
    for p in 0..rows.div_ceil(mr) {
        let d = &mut dst[p * kc * mr..(p + 1) * kc * mr];
        let im = mr.min(rows - p * mr);
        if im < mr {
            d.fill(0.0);
        }
        let r0 = i0 + p * mr;
        if a.row_stride == 1 {
            // A transposed view (the backward's Pᵀ, dSᵀ, Xᵀ): a column's MR values are contiguous,
            // so each k's panel row is one copy, not MR strided reads.
            for kk in 0..kc {
                let src = &a.data[r0 + (k0 + kk) * a.col_stride..][..im];
                d[kk * mr..kk * mr + im].copy_from_slice(src);
            }
            continue;
        }
        for i in 0..im {
            let r = r0 + i;
            if a.col_stride == 1 {
                let src = &a.data[r * a.row_stride + k0..][..kc];
                src.iter().enumerate().for_each(|(kk, &x)| d[kk * mr + i] = x);
            } else {
                (0..kc).for_each(|kk| d[kk * mr + i] = a.at(r, k0 + kk));
            }
        }
    }
}

/// The pieces of columns k0..k0 + kc that lie in one run each: (run, offset in the run, length,
/// offset in the block).
fn run_pieces(run: usize, (k0, kc): (usize, usize)) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut k = k0;
    std::iter::from_fn(move || {
        (k < k0 + kc).then(|| {
            let (r, off) = (k / run, k % run);
            let len = (run - off).min(k0 + kc - k);
            let piece = (r, off, len, k - k0);
            k += len;
            piece
        })
    })
}

/// One MR-row panel (kc × MR, k-major) of row-run A from its tile's run starts (`RowRuns::starts`).
fn pack_a_rows(d: &mut [f32], starts: &[*const f32], run: usize, ks: (usize, usize), mr: usize) {
    for (r, off, len, q) in run_pieces(run, ks) {
        for (i, &src) in starts[r * mr..(r + 1) * mr].iter().enumerate() {
            // SAFETY: RowRuns promises `run` readable values from each start; off + len ≤ run.
            let src = unsafe { std::slice::from_raw_parts(src.add(off), len) };
            src.iter().enumerate().for_each(|(t, &x)| d[(q + t) * mr + i] = x);
        }
    }
}

/// A pointer shared by tasks that write disjoint elements (tiles of C here; (batch, head) columns
/// of a strided tensor in attention), which slices cannot express.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used where each task writes a disjoint set of elements (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the Send + Sync wrapper and not the bare pointer.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: offsets stay within the tensor (checked by the caller's length checks).
        unsafe { self.0.add(offset) }
    }
}

/// c (m × n, row-major, contiguous) = a (m × k) · b + beta · c, with b packed.
pub fn sgemm_packed(m: usize, a: Mat, b: &PackedB, c: &mut [f32], beta: f32, parallel: bool) {
    a.check(m, b.k, "a");
    if b.isa == Isa::Avx512 && a.col_stride == 1 && b.k >= IN_PLACE_RUN {
        return product(m, ASource::Rows(&MatRows { a, k: b.k }), b, c, beta, parallel);
    }
    product(m, ASource::Mat(a), b, c, beta, parallel)
}

/// As `sgemm_packed`, with A read in place by row runs (which must cover m × k).
pub fn sgemm_rows(m: usize, a: &dyn RowRuns, b: &PackedB, c: &mut [f32], beta: f32, parallel: bool) {
    assert!(a.run() > 0 && b.k.is_multiple_of(a.run()), "sgemm: A's runs do not tile its {} columns", b.k);
    product(m, ASource::Rows(a), b, c, beta, parallel)
}

fn product(m: usize, a: ASource, b: &PackedB, c: &mut [f32], beta: f32, parallel: bool) {
    let (k, n) = (b.k, b.n);
    assert!(c.len() >= m * n, "sgemm output too short");
    if k == 0 {
        let c = &mut c[..m * n];
        if beta == 0.0 {
            c.fill(0.0)
        } else {
            c.iter_mut().for_each(|x| *x *= beta)
        }
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let (mr, nr) = b.isa.tile();
    // Long enough runs are read in place by the AVX-512 kernel; everything else is packed.
    let in_place = match a {
        ASource::Rows(ra) if b.isa == Isa::Avx512 && ra.run() >= IN_PLACE_RUN => Some(ra),
        _ => None,
    };
    let cp = SharedMut(c.as_mut_ptr());
    for (jb, j0) in (0..n).step_by(NC).enumerate() {
        let nc = NC.min(n - j0);
        let panels = nc.div_ceil(nr);
        let (row_blocks, mc, groups) = split(m, mr, panels, parallel);
        // A task owns a block of rows and a group of column panels of C, and runs the whole
        // depth (every KC block) itself: one parallel region per call, not one per KC block.
        let task = |apack: &mut [f32], t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let (i0, rows) = (rb * mc, mc.min(m - rb * mc));
            let tiles = rows.div_ceil(mr);
            // Row-run A: every tile's run starts, found once for the whole depth.
            let per_tile = match a {
                ASource::Rows(ra) => k / ra.run() * mr,
                ASource::Mat(_) => 0,
            };
            let mut starts: Vec<*const f32> = vec![std::ptr::null(); tiles * per_tile];
            if let ASource::Rows(ra) = a {
                for (ip, s) in starts.chunks_mut(per_tile).enumerate() {
                    ra.starts(s, i0 + ip * mr, mr.min(rows - ip * mr), mr);
                }
            }
            let tile_starts = |ip: usize| &starts[ip * per_tile..(ip + 1) * per_tile];
            let mut pieces: Vec<Vec<([*const f32; 12], usize)>> = vec![Vec::new(); tiles * in_place.is_some() as usize];
            for (kb, k0) in (0..k).step_by(KC).enumerate() {
                let kc = KC.min(k - k0);
                let bblk = b.block(jb, kb);
                let beta = if kb == 0 { beta } else { 1.0 }; // the earlier blocks' sums are in c
                match (a, in_place) {
                    (_, Some(ra)) => {
                        // Each tile's pieces of this block: its rows' pointers into the runs.
                        pieces.iter_mut().enumerate().for_each(|(ip, tp)| {
                            let st = tile_starts(ip);
                            tp.clear();
                            tp.extend(run_pieces(ra.run(), (k0, kc)).map(|(r, off, len, _)| {
                                // SAFETY: off < run: inside each start's run.
                                (std::array::from_fn(|i| unsafe { st[r * mr + i].add(off) }), len)
                            }));
                        })
                    }
                    (ASource::Mat(am), None) => pack_a(apack, am, (i0, rows), (k0, kc), mr),
                    (ASource::Rows(ra), None) => (0..tiles).for_each(|ip| {
                        pack_a_rows(&mut apack[ip * kc * mr..], tile_starts(ip), ra.run(), (k0, kc), mr)
                    }),
                }
                // Packed A: a B panel stays in L1 across the tiles (BLIS's order). A read in place:
                // a tile's rows stay in L1 across the B panels, which stream from L2 (one stream,
                // not MR).
                let (jp0, nj) = (g * panels / groups, (g + 1) * panels / groups - g * panels / groups);
                for t in 0..nj * tiles {
                    let (jp, ip) = match in_place {
                        None => (jp0 + t / tiles, t % tiles),
                        Some(_) => (jp0 + t % nj, t / nj),
                    };
                    let bp = &bblk[jp * kc * nr..(jp + 1) * kc * nr];
                    let (tile_rows, cols) = (mr.min(rows - ip * mr), nr.min(nc - jp * nr));
                    let c0 = (i0 + ip * mr) * n + j0 + jp * nr;
                    // SAFETY: the tile (tile_rows × cols at c0, row stride n) lies inside c (m × n)
                    // and belongs to this task alone; the panels hold kc × MR and kc × NR values,
                    // and the run starts `run` values each, as the kernels read.
                    let tile = |c: *mut f32, rs_c: usize| unsafe {
                        match in_place {
                            Some(_) if cols <= HALF_PANEL => {
                                kernel_avx512_rows::<1>(&pieces[ip], bp.as_ptr(), c, rs_c, beta)
                            }
                            Some(_) => kernel_avx512_rows::<2>(&pieces[ip], bp.as_ptr(), c, rs_c, beta),
                            None => b.isa.kernel(cols)(kc, apack[ip * kc * mr..].as_ptr(), bp.as_ptr(), c, rs_c, beta),
                        }
                    };
                    // SAFETY: as above.
                    unsafe {
                        if tile_rows == mr && cols == nr {
                            tile(cp.at(c0), n);
                        } else {
                            edge_tile(tile, (cp.at(c0), n), (tile_rows, cols, nr));
                        }
                    }
                }
            }
        };
        let tasks = row_blocks * groups;
        // Each task packs its A block into its thread's scratch (MC × KC values).
        if parallel && tasks > 1 {
            (0..tasks).into_par_iter().for_each(|t| scratch::with_buffer(MC * KC, |apack| task(apack, t)));
        } else {
            scratch::with_buffer(MC * KC, |apack| (0..tasks).for_each(|t| task(apack, t)));
        }
    }
}

/// Runs `f` with b (k × n) packed into the calling thread's scratch: products that pack their B
/// per call (`sgemm`, `sgemm_par`, a weight not kept packed) do not allocate.
pub fn with_packed_b<'a, R>(
    k: usize,
    n: usize,
    b: impl Into<BSource<'a>>,
    parallel: bool,
    f: impl FnOnce(&PackedB) -> R,
) -> R {
    let packed = PackedB::in_scratch(k, n, b, parallel);
    let r = f(&packed);
    packed.recycle();
    r
}

/// How the tiles of C become tasks: (row blocks, rows per block (a multiple of MR, at most MC),
/// column groups). In parallel the row blocks come in a multiple of the thread count, of equal
/// height, so no thread waits on a last short block; when there are fewer MR-row panels than
/// threads the columns are split too (each group packs its own copy of the A block, so only then).
fn split(m: usize, mr: usize, panels: usize, parallel: bool) -> (usize, usize, usize) {
    if !parallel {
        return (m.div_ceil(MC), MC, 1);
    }
    let threads = rayon::current_num_threads().max(1);
    let blocks = m.div_ceil(MC).next_multiple_of(threads).min(m.div_ceil(mr));
    let mc = m.div_ceil(blocks).next_multiple_of(mr);
    let row_blocks = m.div_ceil(mc);
    (row_blocks, mc, threads.div_ceil(row_blocks).clamp(1, panels))
}

/// A tile cut by the edge of C: `tile` (which computes a full MR × NR tile at a C pointer and row
/// stride) through a scratch tile holding C's values (for beta).
///
/// # Safety
/// `c` is valid for `rows` rows of `cols` values at row stride `rs_c`.
unsafe fn edge_tile(
    tile: impl FnOnce(*mut f32, usize),
    (c, rs_c): (*mut f32, usize),
    (rows, cols, nr): (usize, usize, usize),
) {
    let mut tmp = [0f32; MAX_TILE];
    for i in 0..rows {
        for j in 0..cols {
            tmp[i * nr + j] = *c.add(i * rs_c + j);
        }
    }
    tile(tmp.as_mut_ptr(), nr);
    for i in 0..rows {
        for j in 0..cols {
            *c.add(i * rs_c + j) = tmp[i * nr + j];
        }
    }
}

/// c (m × n, row-major, contiguous) = a (m × k) · b (k × n) + beta · c, on the calling thread
/// (for callers that are already one task of many).
pub fn sgemm(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    with_packed_b(k, n, b, false, |b| sgemm_packed(m, a, b, c, beta, false));
}

/// As `sgemm`, with the packing and the tiles of c split across rayon's threads.
pub fn sgemm_par(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    with_packed_b(k, n, b, true, |b| sgemm_packed(m, a, b, c, beta, true));
}

/// The textbook triple loop, for tests and for the benchmark's baseline.
pub fn sgemm_naive(m: usize, k: usize, n: usize, a: Mat, b: Mat, c: &mut [f32], beta: f32) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += a.at(i, p) * b.at(p, j);
            }
            c[i * n + j] = acc + beta * c[i * n + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::splitmix::SplitMix64;

    fn normals(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.next_normal()).collect()
    }

    /// Every kernel this CPU has, serial and parallel, against the triple loop: shapes that cut
    /// tiles, KC and NC blocks at their edges, both operand layouts, beta 0 over NaN and beta 0.5.
    #[test]
    fn every_kernel_matches_triple_loop() {
        let mut rng = SplitMix64::new(7);
        let shapes = [(157, 63, 45), (13, 600, 4200), (1, 7, 1), (150, 257, 33), (25, 40, 58), (5, 0, 9)];
        for isa in Isa::available() {
            for &(m, k, n) in &shapes {
                for a_transposed in [false, true] {
                    let a = normals(&mut rng, m * k);
                    let w = normals(&mut rng, n * k); // (n, k), used transposed as B
                    let am = match a_transposed {
                        false => Mat { data: &a, row_stride: k, col_stride: 1 },
                        true => Mat { data: &a, row_stride: 1, col_stride: m },
                    };
                    let bm = Mat { data: &w, row_stride: 1, col_stride: k };
                    let bt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // (k, n)
                    let bm_rows = Mat { data: &bt, row_stride: n, col_stride: 1 };
                    for (beta, parallel) in [(0.0, false), (0.5, true), (0.5, false), (0.0, true)] {
                        let c0 = normals(&mut rng, m * n);
                        let mut want = c0.clone();
                        sgemm_naive(m, k, n, am, bm, &mut want, beta);
                        for b in [bm, bm_rows] {
                            let mut got = c0.clone();
                            if beta == 0.0 {
                                got.fill(f32::NAN); // beta 0 must not read c
                            }
                            sgemm_packed(
                                m,
                                am,
                                &PackedB::with_isa(k, n, b.into(), parallel, isa),
                                &mut got,
                                beta,
                                parallel,
                            );
                            let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                            let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
                            assert!(err < tol, "{isa:?} {m}x{k}x{n} beta {beta} parallel {parallel}: max err {err:e}");
                        }
                    }
                }
            }
        }
    }

    /// A matrix in memory seen as row runs (what `Patches` is for a convolution), zeros past m.
    struct RunsOf<'a> {
        a: &'a [f32],
        k: usize,
        run: usize,
        m: usize,
        zeros: Vec<f32>,
    }

    impl RowRuns for RunsOf<'_> {
        fn run(&self) -> usize {
            self.run
        }
        fn starts(&self, out: &mut [*const f32], i0: usize, rows: usize, mr: usize) {
            assert!(i0 + rows <= self.m);
            for r in 0..self.k / self.run {
                for i in 0..mr {
                    out[r * mr + i] = if i < rows {
                        self.a[(i0 + i) * self.k + r * self.run..].as_ptr()
                    } else {
                        self.zeros.as_ptr()
                    };
                }
            }
        }
    }

    /// A read in place by row runs (the AVX-512 kernel for runs of 16 and more, panels packed
    /// from the runs' pointers otherwise), on every kernel, against the triple loop: runs shorter
    /// and longer than a KC block, runs that cut KC blocks, tiles cut by the edges of C.
    #[test]
    fn row_runs_match_triple_loop() {
        let mut rng = SplitMix64::new(11);
        for isa in Isa::available() {
            for &(m, run, runs, n) in &[(157, 3, 9, 45), (150, 40, 9, 70), (29, 300, 2, 33), (300, 16, 3, 128)] {
                let k = run * runs;
                let a = normals(&mut rng, m * k);
                let w = normals(&mut rng, n * k);
                let am = Mat { data: &a, row_stride: k, col_stride: 1 };
                let bm = Mat { data: &w, row_stride: 1, col_stride: k };
                for (beta, parallel) in [(0.0, true), (0.5, false)] {
                    let c0 = normals(&mut rng, m * n);
                    let mut want = c0.clone();
                    sgemm_naive(m, k, n, am, bm, &mut want, beta);
                    let mut got = c0.clone();
                    if beta == 0.0 {
                        got.fill(f32::NAN);
                    }
                    let ra = RunsOf { a: &a, k, run, m, zeros: vec![0.0; run] };
                    sgemm_rows(m, &ra, &PackedB::with_isa(k, n, bm.into(), parallel, isa), &mut got, beta, parallel);
                    let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                    assert!(
                        err < 1e-4 * (k as f32).sqrt(),
                        "{isa:?} {m}x{k}x{n} run {run} beta {beta}: max err {err:e}"
                    );
                }
            }
        }
    }
}
