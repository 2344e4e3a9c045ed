//! DType, Shape and `Tensor`: a typed, contiguous view into a backend pool.
//!
//! There are no general strides: every tensor is a dense row-major block at `offset` elements into
//! pool `pool`. Layout decisions (NHWC, (B, T, C)) are made by the model code and written in the
//! shape, so a reader can see them.

use std::collections::HashMap;
use std::fmt;

/// Element types of checkpoint files and device storage. The CPU backend computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Up to `Shape::MAX_RANK` dimensions, stored inline so tensors are `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; Shape::MAX_RANK],
    rank: u8,
}

impl Shape {
    pub const MAX_RANK: usize = 6;

    pub fn new(dims: &[usize]) -> Shape {
        assert!(dims.len() <= Self::MAX_RANK, "rank {} exceeds {}", dims.len(), Self::MAX_RANK);
        let mut d = [0usize; Self::MAX_RANK];
        d[..dims.len()].copy_from_slice(dims);
        Shape { dims: d, rank: dims.len() as u8 }
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank as usize]
    }

    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape::new(d)
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape::new(&d)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

/// Identifies one allocation (a pool) of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolId(pub usize);

impl PoolId {
    /// The pool of tensors laid out by a measuring pass (see `Layout`); never allocated.
    pub const UNBOUND: PoolId = PoolId(usize::MAX);
}

/// A contiguous view: `shape.numel()` elements at `offset` in `pool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub pool: PoolId,
    pub offset: usize,
    pub shape: Shape,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn end(&self) -> usize {
        self.offset + self.numel()
    }

    /// True when the two views share at least one element.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.pool == other.pool && self.offset < other.end() && other.offset < self.end()
    }

    /// The same elements seen with another shape of equal size.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.numel(), self.numel(), "reshape {} -> {}", self.shape, shape);
        Tensor { shape, ..*self }
    }
}

/// (n, c, h, w) → (n, h, w, c): torch's layout (files, the generator, the schedulers) to the
/// engine's channels-last.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    channel_transpose(x, n, c, h * w, true)
}

/// (n, h, w, c) → (n, c, h, w).
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    channel_transpose(x, n, c, h * w, false)
}

/// Per batch item, swaps the channel axis (c) and the pixel axis (hw): channels-first to
/// channels-last when `to_last`, else back. Element (b, ch, p) of the channels-first form is element
/// (b, p, ch) of the channels-last one.
fn channel_transpose(x: &[f32], n: usize, c: usize, hw: usize, to_last: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                let (first, last) = ((b * c + ch) * hw + p, (b * hw + p) * c + ch);
                if to_last {
                    out[last] = x[first];
                } else {
                    out[first] = x[last];
                }
            }
        }
    }
    out
}

/// One named entry of a `Layout`.
#[derive(Clone, Debug)]
pub struct LayoutEntry {
    pub name: String,
    pub offset: usize,
    pub shape: Shape,
}

/// Lays tensors out one after another in a single pool. Used for both the parameter buffer (the
/// name → (offset, shape) table) and the activation arena.
///
/// A model describes its memory once, in a function that takes a `&mut Layout`; that function is
/// run first unbound to learn the total size (`Layout::measure`), the pool is allocated with exactly
/// that size, and it is run again bound to the pool to get the tensors. Nothing is allocated after.
#[derive(Clone, Debug)]
pub struct Layout {
    pool: PoolId,
    next: usize,
    entries: Vec<LayoutEntry>,
    index: HashMap<String, usize>,
    /// Fixed offsets by name (`Layout::placed`), instead of one tensor after another.
    placement: Option<std::sync::Arc<HashMap<String, usize>>>,
}

/// Offsets are rounded up to this many elements (64 bytes in f32) so each tensor starts aligned.
const LAYOUT_ALIGN: usize = 16;

impl Layout {
    pub fn new(pool: PoolId) -> Layout {
        Layout { pool, next: 0, entries: Vec::new(), index: HashMap::new(), placement: None }
    }

    /// A layout over a pool of `total` elements whose tensors already lie at known offsets (a
    /// weight file mapped as the pool: see `models::allocate_mapped`). Reserving a tensor the
    /// placement does not name is a bug in the caller, which checks the names first.
    pub fn placed(pool: PoolId, placement: HashMap<String, usize>, total: usize) -> Layout {
        Layout { next: total, placement: Some(placement.into()), ..Layout::new(pool) }
    }

    /// The same table placed in another pool of the same size (gradients, moments, EMA weights).
    pub fn rebind(&self, pool: PoolId) -> Layout {
        Layout { pool, ..self.clone() }
    }

    /// The pool this layout's tensors live in (`PoolId::UNBOUND` for a measuring pass).
    pub fn pool(&self) -> PoolId {
        self.pool
    }

    pub fn unbound() -> Layout {
        Layout::new(PoolId::UNBOUND)
    }

    /// Reserves a tensor named `name`.
    pub fn tensor(&mut self, name: impl Into<String>, shape: impl Into<Shape>) -> Tensor {
        let (name, shape) = (name.into(), shape.into());
        let offset = match &self.placement {
            Some(p) => *p.get(&name).unwrap_or_else(|| panic!("layout: tensor '{name}' has no place in the placement")),
            None => {
                let offset = self.next;
                self.next = (offset + shape.numel()).div_ceil(LAYOUT_ALIGN) * LAYOUT_ALIGN;
                offset
            }
        };
        let previous = self.index.insert(name.clone(), self.entries.len());
        assert!(previous.is_none(), "layout: tensor name '{name}' used twice");
        self.entries.push(LayoutEntry { name, offset, shape });
        Tensor { pool: self.pool, offset, shape }
    }

    /// Elements needed for everything reserved so far.
    pub fn total(&self) -> usize {
        self.next
    }

    pub fn entries(&self) -> &[LayoutEntry] {
        &self.entries
    }

    pub fn find(&self, name: &str) -> Option<&LayoutEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// Sum of the element counts of all entries (excludes alignment padding).
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|e| e.shape.numel()).sum()
    }

    /// Runs a layout function unbound and returns the layout it produced (sizes, names).
    pub fn measure<T>(build: impl FnOnce(&mut Layout) -> T) -> Layout {
        let mut l = Layout::unbound();
        build(&mut l);
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_tensors_aligned_and_disjoint() {
        let mut l = Layout::new(PoolId(3));
        let a = l.tensor("a", [3, 5]);
        let b = l.tensor("b", [7]);
        assert_eq!(a.offset, 0);
        assert_eq!(b.offset, 16);
        assert!(!a.overlaps(&b));
        assert_eq!(l.total(), 32);
        assert_eq!(l.numel(), 22);
        assert_eq!(l.find("b").unwrap().shape.dims(), &[7]);
    }

    #[test]
    fn overlap_detects_shared_elements() {
        let t = |o, n| Tensor { pool: PoolId(0), offset: o, shape: Shape::new(&[n]) };
        assert!(t(0, 10).overlaps(&t(9, 2)));
        assert!(!t(0, 10).overlaps(&t(10, 2)));
        let other_pool = Tensor { pool: PoolId(1), ..t(0, 10) };
        assert!(!t(0, 10).overlaps(&other_pool));
    }
}

/// A stack allocator over one pool, for activations whose lifetimes nest (a block's temporaries
/// die when the block returns). Forward passes take tensors from it with `alloc` and give back
/// everything above a `mark` with `release`. Its size comes from a planning run of the same
/// forward on `backend::plan::PlanBackend` (which computes nothing), so the real run never
/// allocates and never runs out.
#[derive(Clone, Debug)]
pub struct Arena {
    pool: PoolId,
    top: usize,
    peak: usize,
    capacity: usize,
    /// While set, `release` keeps everything: a training forward saves every activation for the
    /// backward pass.
    keep: bool,
}

impl Arena {
    /// An unbounded, unbound arena that only measures.
    pub fn planning() -> Arena {
        Arena { pool: PoolId::UNBOUND, top: 0, peak: 0, capacity: usize::MAX, keep: false }
    }

    pub fn new(pool: PoolId, capacity: usize) -> Arena {
        Arena { pool, top: 0, peak: 0, capacity, keep: false }
    }

    pub fn alloc(&mut self, shape: impl Into<Shape>) -> anyhow::Result<Tensor> {
        let shape = shape.into();
        let offset = self.top;
        let end = (offset + shape.numel()).div_ceil(LAYOUT_ALIGN) * LAYOUT_ALIGN;
        if end > self.capacity {
            anyhow::bail!(
                "activation arena exhausted: {} elements needed, {} planned (the planning run and the real run differ)",
                end,
                self.capacity
            );
        }
        self.top = end;
        self.peak = self.peak.max(end);
        Ok(Tensor { pool: self.pool, offset, shape })
    }

    pub fn mark(&self) -> usize {
        self.top
    }

    /// Frees every tensor allocated after `mark` (unless `keep` is set).
    pub fn release(&mut self, mark: usize) {
        debug_assert!(mark <= self.top);
        if !self.keep {
            self.top = mark;
        }
    }

    /// Frees everything after `mark`, even while keeping (the end of a training step).
    pub fn release_all_to(&mut self, mark: usize) {
        self.top = mark;
    }

    pub fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// Whether `release` keeps everything (see `set_keep`).
    pub fn keeps(&self) -> bool {
        self.keep
    }

    pub fn pool(&self) -> PoolId {
        self.pool
    }

    pub fn reset(&mut self) {
        self.top = 0;
    }

    /// The most elements in use at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
