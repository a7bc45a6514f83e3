//! Sparse deltas for sparse fine-tuning (SpIEL, S2FT, Sparse MeZO): scatter-add into a
//! dense weight, gather from a dense gradient, and a fused sparse AdamW step.
//!
//! Kernels: `cuda/sparse.cu`. Reference: [`crate::reference::sparse`]. Tests:
//! `tests/sparse.rs`. Benchmarks: `benches/sparse.rs` and `fk bench`.
//!
//! Indices are flattened row-major offsets into the dense tensor. They are validated once,
//! on the host, when a [`SparseIndex`] or [`ScatterPlan`] is built (the support of a sparse
//! fine-tune changes rarely), so every launch is checked before it runs and costs no
//! validation on the device.
//!
//! | path | indices | determinism |
//! |---|---|---|
//! | [`scatter_add`] | sorted, unique | deterministic, no atomics |
//! | [`scatter_add_planned`] | any (a [`ScatterPlan`] groups repeats) | deterministic |
//! | [`scatter_add_atomic`] | any | **nondeterministic** rounding order for repeats |

use std::marker::PhantomData;

use crate::device::{check_device, Buffer, Device, Kernel, LaunchConfig};
use crate::dtype::{DType, Elem, FloatElem};
use crate::error::{Error, Result};
use crate::params::{GatherParams, ScatterAddParams, SegmentedScatterAddParams, SparseAdamwParams};
pub use crate::reference::sparse::AdamwConfig;
use crate::reference::sparse::AdamwStepScalars;

const MODULE: &str = "sparse";
const THREADS: u32 = 256;
const MAX_BLOCKS: u32 = 1 << 16;

/// The (W or source, V or destination) dtype pairs the kernels are built for.
pub const DTYPE_PAIRS: [(DType, DType); 5] = [
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::F32, DType::F32),
];

/// Width of the index (and plan) arrays on the device: u32 unless the tensor or the number
/// of entries needs u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexWidth {
    /// u32 offsets: tensors of at most 2³² elements and fewer than 2³² entries.
    U32,
    /// u64 offsets (kernels with the `_idx64` suffix).
    U64,
}

impl IndexWidth {
    fn for_sizes(numel: u64, n: usize) -> Self {
        if numel <= 1 << 32 && (n as u64) < 1 << 32 {
            IndexWidth::U32
        } else {
            IndexWidth::U64
        }
    }

    fn check_fits(self, op: &'static str, numel: u64, n: usize) -> Result<()> {
        if self == IndexWidth::U32 && IndexWidth::for_sizes(numel, n) == IndexWidth::U64 {
            return Err(Error::Unsupported {
                op,
                why: format!("u32 offsets cannot address {numel} elements or {n} entries"),
            });
        }
        Ok(())
    }

    /// Bytes of one device index: the alignment the kernels' index loads need.
    fn bytes(self) -> usize {
        match self {
            IndexWidth::U32 => 4,
            IndexWidth::U64 => 8,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            IndexWidth::U32 => "",
            IndexWidth::U64 => "_idx64",
        }
    }
}

/// The kernel `<op>_<a>_<b>[_idx64]`, if built for that dtype pair.
pub fn kernel(op: &'static str, a: DType, b: DType, width: IndexWidth) -> Result<Kernel> {
    if !DTYPE_PAIRS.contains(&(a, b)) {
        return Err(Error::UnsupportedDtype {
            op,
            dtypes: format!("({a}, {b})"),
        });
    }
    Ok(Kernel {
        module: MODULE,
        name: format!("{op}_{a}_{b}{}", width.suffix()),
    })
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    let ops = [
        "scatter_add",
        "scatter_add_atomic",
        "segmented_scatter_add",
        "gather",
        "sparse_adamw",
    ];
    let mut all = Vec::new();
    for op in ops {
        for (a, b) in DTYPE_PAIRS {
            for width in [IndexWidth::U32, IndexWidth::U64] {
                all.push(kernel(op, a, b, width).expect("DTYPE_PAIRS are built"));
            }
        }
    }
    all
}

fn config(n: u64) -> LaunchConfig {
    LaunchConfig::grid_stride(n, THREADS, MAX_BLOCKS)
}

/// A device-resident array of u32 or u64 offsets.
enum Offsets {
    U32(Buffer<u32>),
    U64(Buffer<u64>),
}

impl Offsets {
    fn upload(dev: &Device, values: &[u64], width: IndexWidth) -> Result<Self> {
        Ok(match width {
            IndexWidth::U32 => {
                Offsets::U32(dev.upload(&values.iter().map(|&x| x as u32).collect::<Vec<_>>())?)
            }
            IndexWidth::U64 => Offsets::U64(dev.upload(values)?),
        })
    }

    fn ptr(&self) -> *const std::ffi::c_void {
        match self {
            Offsets::U32(b) => b.ptr(),
            Offsets::U64(b) => b.ptr(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Offsets::U32(b) => b.device(),
            Offsets::U64(b) => b.device(),
        }
    }
}

/// The indices as u64 on the host, after checking that `width` holds them and each is below
/// `numel` (`what` names the structure for the error).
fn checked_indices<I: Copy + Into<u64>>(
    what: &'static str,
    indices: &[I],
    numel: u64,
    width: IndexWidth,
) -> Result<Vec<u64>> {
    width.check_fits(what, numel, indices.len())?;
    let host: Vec<u64> = indices.iter().map(|&i| i.into()).collect();
    crate::reference::sparse::check_indices(&host, numel)?;
    Ok(host)
}

/// A validated support: flattened indices into a tensor of `numel` elements, on a device.
pub struct SparseIndex {
    offsets: Offsets,
    len: usize,
    numel: u64,
    /// The first position that breaks strict ascending order, if any.
    unsorted_at: Option<usize>,
    host: Vec<u64>,
}

impl SparseIndex {
    /// Checks every index against `numel` and uploads them. Unsorted or repeated indices
    /// are accepted here; the paths that need them sorted and unique say so.
    pub fn new<I: Copy + Into<u64>>(dev: &Device, indices: &[I], numel: u64) -> Result<Self> {
        let width = IndexWidth::for_sizes(numel, indices.len());
        SparseIndex::with_width(dev, indices, numel, width)
    }

    /// Like [`SparseIndex::new`] with the device index width chosen by the caller
    /// (u64 for small tensors is allowed; u32 for tensors past 2³² elements is an error).
    pub fn with_width<I: Copy + Into<u64>>(
        dev: &Device,
        indices: &[I],
        numel: u64,
        width: IndexWidth,
    ) -> Result<Self> {
        let host = checked_indices("SparseIndex", indices, numel, width)?;
        let unsorted_at = host.windows(2).position(|w| w[0] >= w[1]).map(|p| p + 1);
        Ok(SparseIndex {
            offsets: Offsets::upload(dev, &host, width)?,
            len: host.len(),
            numel,
            unsorted_at,
            host,
        })
    }

    /// Like [`SparseIndex::new`], but errors unless the indices are sorted and unique.
    pub fn sorted<I: Copy + Into<u64>>(dev: &Device, indices: &[I], numel: u64) -> Result<Self> {
        let index = SparseIndex::new(dev, indices, numel)?;
        index.require_sorted()?;
        Ok(index)
    }

    /// Number of indices, repeats included: the length of the values a scatter takes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no indices.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements of the dense tensor the indices point into.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Whether the indices are strictly ascending (sorted, no repeats), as [`scatter_add`]
    /// and [`SparseAdamw`] require.
    pub fn is_sorted_unique(&self) -> bool {
        self.unsorted_at.is_none()
    }

    /// The indices as given (kept on the host for plans and checkpoints).
    pub fn indices(&self) -> &[u64] {
        &self.host
    }

    /// The width of the index array on the device.
    pub fn width(&self) -> IndexWidth {
        match self.offsets {
            Offsets::U32(_) => IndexWidth::U32,
            Offsets::U64(_) => IndexWidth::U64,
        }
    }

    fn require_sorted(&self) -> Result<()> {
        match self.unsorted_at {
            Some(position) => Err(Error::UnsortedIndices {
                position,
                previous: self.host[position - 1],
                index: self.host[position],
            }),
            None => Ok(()),
        }
    }

    fn check<T: Elem>(&self, dense: &Buffer<T>, what: &str) -> Result<()> {
        Error::check_len(what, self.numel as usize, dense.len())?;
        if !self.offsets.device().same(dense.device()) {
            return Err(Error::DeviceMismatch);
        }
        Ok(())
    }
}

/// The deterministic path for unsorted or repeated indices: positions grouped by target
/// (a stable sort, done once on the host), so one thread sums each target's values in a
/// fixed order.
pub struct ScatterPlan {
    targets: Offsets,
    starts: Offsets,
    order: Offsets,
    segments: usize,
    len: usize,
    numel: u64,
    width: IndexWidth,
}

impl ScatterPlan {
    /// Groups `indices` (any order, repeats allowed) by target and uploads the plan, with
    /// the narrowest index width that fits. Errors with [`Error::IndexOutOfRange`] on an
    /// index `>= numel`.
    pub fn new<I: Copy + Into<u64>>(dev: &Device, indices: &[I], numel: u64) -> Result<Self> {
        let width = IndexWidth::for_sizes(numel, indices.len());
        ScatterPlan::with_width(dev, indices, numel, width)
    }

    /// Like [`ScatterPlan::new`] with the device index width chosen by the caller.
    pub fn with_width<I: Copy + Into<u64>>(
        dev: &Device,
        indices: &[I],
        numel: u64,
        width: IndexWidth,
    ) -> Result<Self> {
        let host = checked_indices("ScatterPlan", indices, numel, width)?;
        let mut order: Vec<u64> = (0..host.len() as u64).collect();
        order.sort_by_key(|&i| host[i as usize]);
        let mut targets = Vec::new();
        let mut starts = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let t = host[i as usize];
            if targets.last() != Some(&t) {
                targets.push(t);
                starts.push(k as u64);
            }
        }
        starts.push(order.len() as u64);
        Ok(ScatterPlan {
            targets: Offsets::upload(dev, &targets, width)?,
            starts: Offsets::upload(dev, &starts, width)?,
            order: Offsets::upload(dev, &order, width)?,
            segments: targets.len(),
            len: host.len(),
            numel,
            width,
        })
    }

    /// Number of values the plan consumes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the plan consumes no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of distinct targets.
    pub fn segments(&self) -> usize {
        self.segments
    }
}

fn check_alpha(alpha: f32) -> Result<()> {
    if alpha.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what: "alpha",
            why: format!("{alpha} is not finite"),
        })
    }
}

/// `w[idx[i]] += alpha * values[i]` for sorted unique indices: deterministic, no atomics,
/// one rounding per element. `w` has `index.numel()` elements, `values` `index.len()`.
pub fn scatter_add<W: FloatElem, V: FloatElem>(
    w: &mut Buffer<W>,
    index: &SparseIndex,
    values: &Buffer<V>,
    alpha: f32,
) -> Result<()> {
    index.require_sorted()?;
    launch_scatter_add(false, w, index, values, alpha)
}

/// `w[idx[i]] += alpha * values[i]` for any indices, with atomics. Repeated indices add in
/// an order that depends on timing, so results can differ in the last bit between runs.
/// For f32 weights the GPU's float atomic add flushes subnormal results to zero (SASS
/// `RED.ADD.F32.FTZ`), unlike the reference and the deterministic paths. Prefer
/// [`scatter_add_planned`] unless the indices change every step.
pub fn scatter_add_atomic<W: FloatElem, V: FloatElem>(
    w: &mut Buffer<W>,
    index: &SparseIndex,
    values: &Buffer<V>,
    alpha: f32,
) -> Result<()> {
    launch_scatter_add(true, w, index, values, alpha)
}

fn launch_scatter_add<W: FloatElem, V: FloatElem>(
    atomic: bool,
    w: &mut Buffer<W>,
    index: &SparseIndex,
    values: &Buffer<V>,
    alpha: f32,
) -> Result<()> {
    index.check(w, "w")?;
    Error::check_len("values", index.len(), values.len())?;
    check_device(w.device(), values)?;
    check_alpha(alpha)?;
    let p = ScatterAddParams {
        w: w.ptr_mut(),
        values: values.ptr(),
        indices: index.offsets.ptr(),
        n: index.len() as u64,
        numel: index.numel,
        alpha,
    };
    let dev = w.device().clone();
    // SAFETY: lengths and devices were checked above; every index is < numel == w.len(),
    // and strictly ascending where not atomic (scatter_add's require_sorted).
    unsafe { raw::scatter_add(&dev, None, W::DTYPE, V::DTYPE, index.width(), atomic, &p) }
}

/// `w[t] += alpha * Σ values[i]` over the positions `i` the plan groups under each target
/// `t`, summed in f32 in position order: deterministic for any indices.
pub fn scatter_add_planned<W: FloatElem, V: FloatElem>(
    w: &mut Buffer<W>,
    plan: &ScatterPlan,
    values: &Buffer<V>,
    alpha: f32,
) -> Result<()> {
    Error::check_len("w", plan.numel as usize, w.len())?;
    Error::check_len("values", plan.len, values.len())?;
    check_device(w.device(), values)?;
    if !plan.targets.device().same(w.device()) {
        return Err(Error::DeviceMismatch);
    }
    check_alpha(alpha)?;
    let p = SegmentedScatterAddParams {
        w: w.ptr_mut(),
        values: values.ptr(),
        targets: plan.targets.ptr(),
        starts: plan.starts.ptr(),
        order: plan.order.ptr(),
        segments: plan.segments as u64,
        numel: plan.numel,
        alpha,
    };
    let dev = w.device().clone();
    // SAFETY: the plan's arrays were built together and validated against numel == w.len().
    unsafe { raw::segmented_scatter_add(&dev, None, W::DTYPE, V::DTYPE, plan.width, &p) }
}

/// `out[i] = src[idx[i]]`, converted to O (bf16 or f16 to f32, or the same dtype).
pub fn gather<S: FloatElem, O: FloatElem>(
    src: &Buffer<S>,
    index: &SparseIndex,
    out: &mut Buffer<O>,
) -> Result<()> {
    index.check(src, "src")?;
    Error::check_len("out", index.len(), out.len())?;
    check_device(src.device(), out)?;
    let p = GatherParams {
        out: out.ptr_mut(),
        src: src.ptr(),
        indices: index.offsets.ptr(),
        n: index.len() as u64,
        numel: index.numel,
    };
    let dev = src.device().clone();
    // SAFETY: checked above: out holds n elements, every index is < numel == src.len().
    unsafe { raw::gather(&dev, None, S::DTYPE, O::DTYPE, index.width(), &p) }
}

fn check_config(c: &AdamwConfig) -> Result<()> {
    let bad = |what, why: String| Err(Error::InvalidArgument { what, why });
    if !(c.lr.is_finite() && c.lr >= 0.0) {
        return bad("lr", format!("{} must be finite and >= 0", c.lr));
    }
    for (what, b) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return bad(what, format!("{b} must be in [0, 1)"));
        }
    }
    if !(c.eps.is_finite() && c.eps > 0.0) {
        return bad("eps", format!("{} must be finite and > 0", c.eps));
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return bad(
            "weight_decay",
            format!("{} must be finite and >= 0", c.weight_decay),
        );
    }
    Ok(())
}

/// AdamW over a fixed sparse support of a dense weight: f32 moments and an f32 delta per
/// support element; each [`SparseAdamw::step`] is one fused pass that reads the dense
/// gradient at the support and writes `base + delta` into the weight (no drift from
/// repeated rounding in bf16). Weight decay pulls the delta toward zero, i.e. the weight
/// toward its pretrained value.
///
/// `W` is the weight's dtype: the run writes the weight it started from, so a step on a
/// weight of another dtype does not compile:
///
/// ```compile_fail
/// # use finetune_kernels::{device::Device, sparse::{AdamwConfig, SparseAdamw, SparseIndex}};
/// # fn run(dev: &Device, index: SparseIndex) -> finetune_kernels::Result<()> {
/// let w16 = dev.upload(&[half::bf16::ONE; 8])?;
/// let mut w32 = dev.upload(&[1.0f32; 8])?;
/// let grad = dev.upload(&[0.5f32; 8])?;
/// let mut opt = SparseAdamw::new(&w16, index, AdamwConfig::default())?;
/// opt.step(&mut w32, &grad)?; // started on bf16: an f32 weight is refused here
/// # Ok(())
/// # }
/// ```
pub struct SparseAdamw<W: FloatElem> {
    index: SparseIndex,
    base: Buffer<f32>,
    delta: Buffer<f32>,
    exp_avg: Buffer<f32>,
    exp_avg_sq: Buffer<f32>,
    step: u64,
    config: AdamwConfig,
    weight: PhantomData<W>,
}

impl<W: FloatElem> SparseAdamw<W> {
    /// Starts a run on `w` over `index` (sorted, unique), remembering W's current values
    /// at the support as the base.
    pub fn new(w: &Buffer<W>, index: SparseIndex, config: AdamwConfig) -> Result<Self> {
        index.require_sorted()?;
        index.check(w, "w")?;
        check_config(&config)?;
        let dev = w.device();
        let mut base = dev.alloc_output::<f32>(index.len())?;
        // Gathering W into f32 needs the (W, f32) kernel, which every float W has.
        gather(w, &index, &mut base)?;
        Ok(SparseAdamw {
            delta: dev.zeros(index.len())?,
            exp_avg: dev.zeros(index.len())?,
            exp_avg_sq: dev.zeros(index.len())?,
            index,
            base,
            step: 0,
            config,
            weight: PhantomData,
        })
    }

    /// One AdamW step with the dense gradient `grad` (same shape as W).
    pub fn step<G: FloatElem>(&mut self, w: &mut Buffer<W>, grad: &Buffer<G>) -> Result<()> {
        self.index.check(w, "w")?;
        self.index.check(grad, "grad")?;
        let s = AdamwStepScalars::new(&self.config, self.step + 1);
        let p = SparseAdamwParams {
            w: w.ptr_mut(),
            grad: grad.ptr(),
            indices: self.index.offsets.ptr(),
            base: self.base.ptr() as *const f32,
            delta: self.delta.ptr_mut() as *mut f32,
            exp_avg: self.exp_avg.ptr_mut() as *mut f32,
            exp_avg_sq: self.exp_avg_sq.ptr_mut() as *mut f32,
            n: self.index.len() as u64,
            numel: self.index.numel,
            beta1: s.beta1,
            beta2: s.beta2,
            one_minus_beta1: s.one_minus_beta1,
            one_minus_beta2: s.one_minus_beta2,
            eps: s.eps,
            decay: s.decay,
            step_size: s.step_size,
            sqrt_bc2: s.sqrt_bc2,
        };
        let dev = w.device().clone();
        // SAFETY: W and grad hold numel elements (checked), the state buffers n, every
        // index is < numel and unique, so no two threads touch one element.
        unsafe {
            raw::sparse_adamw(&dev, None, W::DTYPE, G::DTYPE, self.index.width(), &p)?;
        }
        self.step += 1;
        Ok(())
    }

    /// Steps taken so far: the bias corrections of the next [`SparseAdamw::step`] use
    /// `steps_taken() + 1`.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters the run was started with.
    pub fn config(&self) -> &AdamwConfig {
        &self.config
    }

    /// The support the optimizer updates.
    pub fn index(&self) -> &SparseIndex {
        &self.index
    }

    /// The trained change at the support (`[n]`, f32): the sparse delta to save.
    pub fn delta(&self) -> &Buffer<f32> {
        &self.delta
    }

    /// Copies the optimizer state back to the host, in the reference's form.
    pub fn state_to_host(&self) -> Result<crate::reference::sparse::SparseAdamwState> {
        Ok(crate::reference::sparse::SparseAdamwState {
            base: self.base.to_host()?,
            delta: self.delta.to_host()?,
            exp_avg: self.exp_avg.to_host()?,
            exp_avg_sq: self.exp_avg_sq.to_host()?,
        })
    }
}

/// Raw entry points for framework authors: launch on memory and a stream your framework
/// owns (`Some(stream)`; `None` is the device's own, and all the emulator takes). You fill
/// the params struct with device pointers. The safe functions above are these after their
/// checks.
/// Kernels skip indices (the segmented kernel: targets) `>= numel` (gather writes NaN
/// there) rather than touch memory out of bounds.
///
/// Every function's contract starts with the same three rules: every pointer in `p` is
/// valid memory of `dev` (device addresses on a GPU, host addresses under the emulator) for
/// the lengths in `p`, in the dtypes named, with indices of `width`; `stream` belongs to
/// `dev`'s context; and no array a kernel writes overlaps another array of `p`.
///
/// Checked: the dtype pair, and, before any launch (an empty range included), every pointer
/// in `p` aligned to the element the kernels access through it, else [`Error::Misaligned`]:
/// the dense arrays and values to their dtype's size (2 bytes for bf16 and f16, 4 for f32;
/// the atomic path's bf16/f16 add is a 16-bit CAS on the element itself, its f32 add a
/// 32-bit atomic), the index arrays (`indices`, `targets`, `starts`, `order`) to `width`
/// (4 bytes for u32, 8 for u64), and the AdamW state (`base`, `delta`, `exp_avg`,
/// `exp_avg_sq`, f32) to 4. The kernels make no wider (vector) access. A misaligned access
/// faults on a GPU and leaves its context unusable.
pub mod raw {
    use super::*;
    use cudarc::driver::sys::CUstream;
    use std::ffi::c_void;

    /// What every raw launch checks first: the kernel of `op` is built for the dtype pair
    /// `(a, b)` at `width`, and each `(what, pointer, alignment)` is aligned
    /// ([`Error::Misaligned`]). Returns the kernel.
    fn checked(
        op: &'static str,
        a: DType,
        b: DType,
        width: IndexWidth,
        pointers: &[(&'static str, *const c_void, usize)],
    ) -> Result<Kernel> {
        let k = kernel(op, a, b, width)?;
        Error::check_all_aligned(pointers)?;
        Ok(k)
    }

    /// Sorted-unique (`atomic == false`) or atomic scatter-add.
    ///
    /// Checked: `p.w` aligned to `w`'s size (its plain or atomic read-modify-write of one
    /// element: a 16-bit CAS for bf16/f16, a 32-bit float atomic add for f32), `p.values`
    /// to `values`' size, `p.indices` to `width`'s ([`Error::Misaligned`]).
    ///
    /// # Safety
    /// The module's three rules; for `atomic == false` the indices must be unique.
    pub unsafe fn scatter_add(
        dev: &Device,
        stream: Option<CUstream>,
        w: DType,
        values: DType,
        width: IndexWidth,
        atomic: bool,
        p: &ScatterAddParams,
    ) -> Result<()> {
        let op = if atomic {
            "scatter_add_atomic"
        } else {
            "scatter_add"
        };
        let k = checked(
            op,
            w,
            values,
            width,
            &[
                ("sparse raw w", p.w, w.size()),
                ("sparse raw values", p.values, values.size()),
                ("sparse raw indices", p.indices, width.bytes()),
            ],
        )?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, config(p.n), stream, p) }
    }

    /// The deterministic scatter-add of a plan ([`ScatterPlan`]).
    ///
    /// Checked: `p.w` aligned to `w`'s size, `p.values` to `values`', and `p.targets`,
    /// `p.starts` and `p.order` to `width`'s ([`Error::Misaligned`]).
    ///
    /// # Safety
    /// The module's three rules; `targets` unique; `starts` (`segments + 1` of them)
    /// non-decreasing, its last at most the length of `order`; every `order[k]` below the
    /// length of `values` (the kernel checks only the targets).
    pub unsafe fn segmented_scatter_add(
        dev: &Device,
        stream: Option<CUstream>,
        w: DType,
        values: DType,
        width: IndexWidth,
        p: &SegmentedScatterAddParams,
    ) -> Result<()> {
        let k = checked(
            "segmented_scatter_add",
            w,
            values,
            width,
            &[
                ("sparse raw w", p.w, w.size()),
                ("sparse raw values", p.values, values.size()),
                ("sparse raw targets", p.targets, width.bytes()),
                ("sparse raw starts", p.starts, width.bytes()),
                ("sparse raw order", p.order, width.bytes()),
            ],
        )?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, config(p.segments), stream, p) }
    }

    /// `out[i] = src[indices[i]]`; indices may repeat.
    ///
    /// Checked: `p.src` aligned to `src`'s size, `p.out` to `out`'s, `p.indices` to
    /// `width`'s ([`Error::Misaligned`]).
    ///
    /// # Safety
    /// The module's three rules.
    pub unsafe fn gather(
        dev: &Device,
        stream: Option<CUstream>,
        src: DType,
        out: DType,
        width: IndexWidth,
        p: &GatherParams,
    ) -> Result<()> {
        let k = checked(
            "gather",
            src,
            out,
            width,
            &[
                ("sparse raw out", p.out, out.size()),
                ("sparse raw src", p.src, src.size()),
                ("sparse raw indices", p.indices, width.bytes()),
            ],
        )?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, config(p.n), stream, p) }
    }

    /// One AdamW step over the support ([`SparseAdamw::step`]).
    ///
    /// Checked: `p.w` aligned to `w`'s size, `p.grad` to `grad`'s, `p.indices` to
    /// `width`'s, and the f32 state `p.base`, `p.delta`, `p.exp_avg`, `p.exp_avg_sq` to 4
    /// bytes ([`Error::Misaligned`]).
    ///
    /// # Safety
    /// The module's three rules; indices unique. The scalars should be as
    /// [`AdamwStepScalars`] computes them (others give another update, not UB).
    pub unsafe fn sparse_adamw(
        dev: &Device,
        stream: Option<CUstream>,
        w: DType,
        grad: DType,
        width: IndexWidth,
        p: &SparseAdamwParams,
    ) -> Result<()> {
        let f32_size = DType::F32.size();
        let k = checked(
            "sparse_adamw",
            w,
            grad,
            width,
            &[
                ("sparse raw w", p.w, w.size()),
                ("sparse raw grad", p.grad, grad.size()),
                ("sparse raw indices", p.indices, width.bytes()),
                ("sparse raw base", p.base.cast(), f32_size),
                ("sparse raw delta", p.delta.cast(), f32_size),
                ("sparse raw exp_avg", p.exp_avg.cast(), f32_size),
                ("sparse raw exp_avg_sq", p.exp_avg_sq.cast(), f32_size),
            ],
        )?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, config(p.n), stream, p) }
    }
}
