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

/// A contiguous view: `shape.numel()` elements of type `dtype` from element `offset` of pool
/// `pool` on (byte `offset × dtype.size_bytes()`). Pools are allocated in 4-byte units; every
/// tensor the engine computes on is f32 except, on a backend that stores them so, activations in
/// bf16 (`Arena::with_activations`), whose sub-views (`Tensor { offset: t.offset + k, ..t }`)
/// count in bf16 elements like the tensor itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub pool: PoolId,
    pub offset: usize,
    pub shape: Shape,
    pub dtype: DType,
}

impl Tensor {
    /// An f32 view (parameters, gradients, statistics and, by default, activations).
    pub fn new(pool: PoolId, offset: usize, shape: Shape) -> Tensor {
        Tensor { pool, offset, shape, dtype: DType::F32 }
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// One past the last element, in elements of `dtype`.
    pub fn end(&self) -> usize {
        self.offset + self.numel()
    }

    /// The bytes the view covers in its pool: [start, end).
    pub fn byte_range(&self) -> std::ops::Range<usize> {
        let size = self.dtype.size_bytes();
        self.offset * size..self.end() * size
    }

    /// True when the two views share at least one byte.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        let (a, b) = (self.byte_range(), other.byte_range());
        self.pool == other.pool && a.start < b.end && b.start < a.end
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
        Tensor::new(self.pool, offset, shape)
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
    fn a_bf16_arena_packs_two_activations_a_slot_and_keeps_statistics_f32() {
        let mut a = Arena::new(PoolId(1), 1 << 20).with_activations(DType::BF16);
        let x = a.alloc([3, 11]).unwrap(); // 33 bf16 values: 17 slots, rounded up to 32
        let stats = a.alloc_f32([5]).unwrap();
        let y = a.alloc([2]).unwrap();
        assert_eq!((x.dtype, x.offset), (DType::BF16, 0));
        assert_eq!((stats.dtype, stats.offset), (DType::F32, 32));
        assert_eq!((y.dtype, y.offset), (DType::BF16, 2 * 48), "bf16 offsets count bf16 elements");
        assert_eq!(x.byte_range(), 0..66);
        assert_eq!(y.byte_range(), 192..196);
        assert_eq!(a.peak(), 64);
        assert!(!x.overlaps(&stats) && !stats.overlaps(&y));
        // The same bytes seen as f32 [0, 64) and as bf16 [62, 66) overlap.
        let f = Tensor::new(PoolId(1), 0, [16].into());
        assert!(f.overlaps(&Tensor { offset: 31, shape: [2].into(), ..x }));
        assert!(!f.overlaps(&Tensor { offset: 32, shape: [2].into(), ..x }));
        // An f32 arena is as before: activations f32, 16-element alignment.
        let mut a = Arena::new(PoolId(1), 1 << 20);
        let x = a.alloc([33]).unwrap();
        assert_eq!((x.dtype, a.alloc([1]).unwrap().offset), (DType::F32, 48));
    }

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
        let t = |o, n| Tensor::new(PoolId(0), o, Shape::new(&[n]));
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
    /// The element type of `alloc`'s tensors (activations): f32, or bf16 on a backend that
    /// computes on bf16 activations. `alloc_f32`'s (statistics) are f32 always.
    activations: DType,
}

impl Arena {
    /// An unbounded, unbound arena that only measures.
    pub fn planning() -> Arena {
        Arena { pool: PoolId::UNBOUND, top: 0, peak: 0, capacity: usize::MAX, keep: false, activations: DType::F32 }
    }

    pub fn new(pool: PoolId, capacity: usize) -> Arena {
        Arena { pool, top: 0, peak: 0, capacity, keep: false, activations: DType::F32 }
    }

    /// The same arena handing out activations of type `dtype` (F32 or BF16). The planning run and
    /// the real run must agree on it: bf16 activations take half the arena.
    pub fn with_activations(self, dtype: DType) -> Arena {
        assert!(matches!(dtype, DType::F32 | DType::BF16), "activations are stored in f32 or bf16, not {dtype}");
        Arena { activations: dtype, ..self }
    }

    /// The element type of `alloc`'s tensors.
    pub fn activations(&self) -> DType {
        self.activations
    }

    /// An activation: a tensor of the arena's activation type.
    pub fn alloc(&mut self, shape: impl Into<Shape>) -> anyhow::Result<Tensor> {
        self.alloc_as(shape.into(), self.activations)
    }

    /// An f32 tensor whatever the activations' type: statistics saved for a backward pass (norm
    /// means and reciprocal deviations, attention log-sum-exps), timesteps, losses.
    pub fn alloc_f32(&mut self, shape: impl Into<Shape>) -> anyhow::Result<Tensor> {
        self.alloc_as(shape.into(), DType::F32)
    }

    /// `top` and `capacity` count 4-byte slots, so a bf16 tensor of n elements takes n/2 of them
    /// and starts at bf16 element 2 × top.
    fn alloc_as(&mut self, shape: Shape, dtype: DType) -> anyhow::Result<Tensor> {
        let per_slot = 4 / dtype.size_bytes();
        let at = self.top;
        let end = (at + shape.numel().div_ceil(per_slot)).div_ceil(LAYOUT_ALIGN) * LAYOUT_ALIGN;
        if end > self.capacity {
            anyhow::bail!(
                "activation arena exhausted: {} elements needed, {} planned (the planning run and the real run differ)",
                end,
                self.capacity
            );
        }
        self.top = end;
        self.peak = self.peak.max(end);
        Ok(Tensor { dtype, ..Tensor::new(self.pool, at * per_slot, shape) })
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

    /// The most 4-byte slots (f32 elements) in use at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
