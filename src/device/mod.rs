//! Devices, typed buffers and kernel launches.
//!
//! [`Device::Cuda`] runs the committed PTX through the CUDA driver (cudarc, loaded at run
//! time); [`Device::Emu`] runs the same CUDA source on the host. Buffers are typed and
//! owned by the device that made them. Every kernel wrapper goes through
//! [`Device::launch`], which takes the kernel's one params struct by value.

pub mod blas;
pub(crate) mod breakdown;
mod cuda;
pub mod emu;
pub mod ptx;
mod tma;

pub use cuda::{probe_driver, CudaDevice, DriverInfo, KernelResources};
pub use emu::{EmuDevice, EmuOptions, Schedule, MIN_STACK_BYTES};
pub use ptx::Target;
pub use tma::TileMap;

use crate::dtype::{Elem, POISON_BYTE};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUstream;
use std::sync::Arc;

/// Where kernels run.
#[derive(Clone)]
#[non_exhaustive]
pub enum Device {
    /// An NVIDIA GPU through the CUDA driver.
    Cuda(Arc<CudaDevice>),
    /// The host emulator (feature `emu`): host memory, every launch checked.
    Emu(Arc<EmuDevice>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Grid, block, dynamic shared memory and clusters of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks along x, y and z (`gridDim`).
    pub grid: (u32, u32, u32),
    /// Threads per block along x, y and z (`blockDim`).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes (on top of the kernel's static shared
    /// memory).
    pub shared_bytes: u32,
    /// Blocks per cluster along each grid dimension (sm_90; `(1, 1, 1)`: no clusters). The
    /// grid must be a whole number of clusters, of at most 8 blocks.
    pub cluster: (u32, u32, u32),
}

impl LaunchConfig {
    /// A 1-D grid of `threads`-wide blocks covering `n` items, one per thread, capped at
    /// `max_blocks` (kernels loop grid-stride past the cap; a cap of 0 is taken as 1).
    /// `n == 0` gives zero blocks.
    pub fn grid_stride(n: u64, threads: u32, max_blocks: u32) -> Self {
        #[cfg(test)]
        let max_blocks = max_blocks.min(GRID_CAP.get());
        // A block of 0 threads covers nothing: no division by it; check() refuses the block.
        // A cap of 0 blocks would make a grid that launches nothing, and reports success.
        let blocks = n
            .div_ceil(threads.max(1) as u64)
            .min(max_blocks.max(1) as u64) as u32;
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
            cluster: (1, 1, 1),
        }
    }

    /// A grid with no blocks: launches skip it (the driver would refuse it).
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    /// What [`Device::launch`] checks before it launches `kernel` with this config, on
    /// every backend: the grid and the block within CUDA's limits (every GPU since compute
    /// capability 3.0; a driver would refuse them with a bare "invalid argument"): 2³¹ - 1
    /// blocks along x, 65,535 along y and z; blocks of 1 to 1,024 threads, 1,024 along x
    /// and y and 64 along z; and the clusters 1 to 8 blocks, the grid a whole number of them.
    pub fn check(&self, kernel: &str) -> Result<()> {
        self.check_limits(kernel)?;
        self.check_cluster()
    }

    fn check_limits(&self, kernel: &str) -> Result<()> {
        let (g, b) = (self.grid, self.block);
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        let (what, why) = if g.0 > i32::MAX as u32 || g.1 > 65_535 || g.2 > 65_535 {
            let why = format!(
                "{kernel}: grid {g:?} passes CUDA's limit of 2^31 - 1 blocks along x and \
                 65,535 along y and z (a shape too large for this kernel's grid)"
            );
            ("LaunchConfig::grid", why)
        } else if threads == 0 || threads > 1024 || b.0 > 1024 || b.1 > 1024 || b.2 > 64 {
            let why = format!(
                "{kernel}: block {b:?} is outside CUDA's limits: 1 to 1,024 threads \
                 (1,024 along x and y, 64 along z)"
            );
            ("LaunchConfig::block", why)
        } else {
            return Ok(());
        };
        Err(crate::Error::InvalidArgument { what, why })
    }

    /// Errors unless the clusters are 1 to 8 blocks and the grid a whole number of them.
    fn check_cluster(&self) -> Result<()> {
        let (c, g) = (self.cluster, self.grid);
        let blocks = c.0 as u64 * c.1 as u64 * c.2 as u64;
        let why = if !(1..=8).contains(&blocks) {
            format!("{c:?} is {blocks} blocks; a cluster is 1 to 8")
        } else if g.0 % c.0 != 0 || g.1 % c.1 != 0 || g.2 % c.2 != 0 {
            format!("grid {g:?} is not a whole number of clusters {c:?}")
        } else {
            return Ok(());
        };
        Err(crate::Error::InvalidArgument {
            what: "LaunchConfig::cluster",
            why,
        })
    }

    /// The grid of the tile GEMM (`cuda/include/gemm.cuh`): a block per
    /// `FK_GEMM_TILE`-square tile of a `rows × cols` output, `z` deep (splits).
    pub fn tiles(rows: usize, cols: usize, z: u32) -> Self {
        let tile = crate::params::FK_GEMM_TILE as usize;
        LaunchConfig {
            grid: (
                grid_dim(cols.div_ceil(tile)),
                grid_dim(rows.div_ceil(tile)),
                z,
            ),
            block: (crate::params::FK_GEMM_THREADS, 1, 1),
            shared_bytes: 0,
            cluster: (1, 1, 1),
        }
    }

    /// The grid of the rank-wide GEMMs (`cuda/include/narrow.cuh`) for a `rows × cols`
    /// output split `z` ways over K, with their dynamic shared memory.
    pub fn narrow(rows: usize, cols: usize, z: u32) -> Self {
        LaunchConfig {
            grid: (
                grid_dim(cols.div_ceil(crate::params::FK_NARROW_COLS as usize)),
                grid_dim(rows.div_ceil(crate::params::FK_NARROW_ROWS as usize)),
                z,
            ),
            block: (crate::params::FK_GEMM_THREADS, 1, 1),
            shared_bytes: crate::params::FK_NARROW_SMEM_BYTES,
            cluster: (1, 1, 1),
        }
    }

    /// The same launch for the variant in steps of 64 along K (`lora_down_k64`): its larger
    /// stages' dynamic shared memory.
    pub fn with_wide_steps(self) -> Self {
        LaunchConfig {
            shared_bytes: crate::params::FK_NARROW_WIDE_SMEM_BYTES,
            ..self
        }
    }

    /// The persistent launch of the Hopper GEMM (`cuda/include/wgmma.cuh`) for an `m × n`
    /// output, with its dynamic shared memory: tiles of `FK_WGMMA_TILE_M` rows by
    /// `FK_WGMMA_TILE_N` columns (or, `transposed`, a dX computed as dXᵀ `[n, m]`: tiles of
    /// `TILE_M` of dX's columns by `TILE_N` of its rows), dealt out by the kernel
    /// (`wgmma::Schedule`) to a 1-D grid of at most `max_blocks` blocks (rounded down to whole
    /// clusters, and at least one cluster), in clusters of `cluster` blocks that take
    /// neighbouring tiles sharing B. Fewer blocks than tiles: each
    /// block walks several, its next tile's loads in flight while it stores the last. With
    /// `max_blocks` at least the tiles, a block per tile (a cluster of blocks must fit the GPU
    /// at once, which the driver alone knows: the clustered launches take this form).
    pub fn wgmma(m: usize, n: usize, transposed: bool, cluster: u32, max_blocks: usize) -> Self {
        let (tm, tn) = (
            crate::params::FK_WGMMA_TILE_M as usize,
            crate::params::FK_WGMMA_TILE_N as usize,
        );
        // A's tiles (the output tile's rows) and B's.
        let (a_tiles, b_tiles) = if transposed {
            (n.div_ceil(tm), m.div_ceil(tn))
        } else {
            (m.div_ceil(tm), n.div_ceil(tn))
        };
        let c = cluster.max(1) as usize;
        let units = a_tiles.div_ceil(c) * b_tiles;
        let blocks = units.min((max_blocks / c).max(1)) * c;
        LaunchConfig {
            grid: (grid_dim(blocks), 1, 1),
            block: (crate::params::FK_WGMMA_THREADS, 1, 1),
            shared_bytes: crate::params::FK_WGMMA_SMEM_BYTES,
            cluster: (c as u32, 1, 1),
        }
    }

    /// The same launch with `shared_bytes` of dynamic shared memory: a wgmma GEMM with a side
    /// product (`wgmma::Side`) has its side tiles after the stages (`FK_WGMMA_SIDE_SMEM_BYTES`,
    /// `FK_WGMMA_SIDE_ACROSS_SMEM_BYTES` for the LoRA dX GEMM that makes dB's partials too).
    pub fn with_shared_bytes(self, shared_bytes: u32) -> Self {
        LaunchConfig {
            shared_bytes,
            ..self
        }
    }

    /// [`Self::grid_stride`] with a warp, not a thread, per item (kernels that loop with
    /// `warp_start`/`warp_stride`).
    pub fn warp_stride(n: u64, threads: u32, max_blocks: u32) -> Self {
        Self::grid_stride(n.saturating_mul(32), threads, max_blocks)
    }
}

#[cfg(test)]
thread_local! {
    /// The cap [`with_grid_cap`] puts on grid-stride grids built on this thread.
    static GRID_CAP: std::cell::Cell<u32> = const { std::cell::Cell::new(u32::MAX) };
}

/// Runs `f` with every [`LaunchConfig::grid_stride`] (and `warp_stride`) grid built on this
/// thread capped at `blocks` blocks. A real launch takes a second pass of its grid-stride
/// loop only past 2¹⁶ blocks (tens to hundreds of millions of elements); under a cap of a
/// block or three, unit tests reach the later passes at small shapes.
#[cfg(test)]
pub(crate) fn with_grid_cap<R>(blocks: u32, f: impl FnOnce() -> R) -> R {
    let before = GRID_CAP.replace(blocks);
    let result = f();
    GRID_CAP.set(before);
    result
}

/// A kernel entry point: the PTX module (one per `cuda/<module>.cu`) and the entry name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Kernel {
    /// The module: the stem of its `cuda/<module>.cu` and of its committed PTX, e.g. `lora`.
    pub module: &'static str,
    /// The entry point's name in the module (an `extern "C"` symbol, unmangled), e.g.
    /// `lora_transpose_b_bf16`.
    pub name: String,
}

impl Device {
    /// The CUDA device `ordinal`, or a [`NoDevice`](crate::NoDevice) error saying why there is none
    /// (an [`Error::Driver`] where a driver that works fails a call on a device it has).
    ///
    /// It uses the device's primary context (shared with other frameworks in the process) and
    /// its default memory pool, whose release threshold it sets to keep freed memory pooled
    /// (as PyTorch's caching allocator does): that setting is the process's, and
    /// `cuMemPoolTrimTo` on the pool hands the memory back.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(Arc::new(CudaDevice::new(ordinal)?)))
    }

    /// The host emulator, or [`crate::NoDevice::EmulatorNotBuilt`] without feature `emu`.
    pub fn emu(options: EmuOptions) -> Result<Device> {
        Ok(Device::Emu(Arc::new(EmuDevice::new(options)?)))
    }

    /// The best backend available here: GPU 0 if there is one, else the emulator (with
    /// default options) if it is built in, else the reason there is no GPU. A GPU that is
    /// there but fails a driver call ([`Error::Driver`]) is that error, not the emulator.
    pub fn best() -> Result<Device> {
        match Device::cuda(0) {
            Ok(d) => Ok(d),
            Err(Error::NoDevice(why)) => {
                Device::emu(EmuOptions::default()).map_err(|_| Error::NoDevice(why))
            }
            Err(e) => Err(e),
        }
    }

    /// One line naming the device, e.g. `cuda:0 NVIDIA H100 80GB HBM3 (sm_90, PTX sm_90a)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cuda(d) => d.describe(),
            Device::Emu(e) => e.describe(),
        }
    }

    /// Streaming multiprocessors: the GPU's, or for the emulator an H100's 132, so launch
    /// heuristics choose there what they would on the GPU the kernels are written for.
    pub fn sm_count(&self) -> usize {
        match self {
            Device::Cuda(d) => d.sm_count(),
            Device::Emu(_) => 132,
        }
    }

    /// `"cuda"` or `"emu"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Device::Cuda(_) => "cuda",
            Device::Emu(_) => "emu",
        }
    }

    /// Whether this is a GPU ([`Device::Cuda`]) rather than the emulator.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Whether the device runs `wgmma` kernels (`cuda/include/wgmma.cuh`): a GPU that loads the
    /// sm_90a PTX (Hopper), or the emulator, which models the instruction.
    pub fn has_wgmma(&self) -> bool {
        match self {
            Device::Cuda(d) => d.target() == crate::device::ptx::Target::Sm90a,
            Device::Emu(_) => true,
        }
    }

    /// Whether the device launches blocks in clusters ([`LaunchConfig::cluster`]): a GPU of
    /// compute capability 9.0 or later, or the emulator.
    pub fn has_clusters(&self) -> bool {
        match self {
            Device::Cuda(d) => d.compute_capability().0 >= 9,
            Device::Emu(_) => true,
        }
    }

    /// Whether cuBLAS serves this device: a GPU whose libcublas loads. The paths that hand
    /// GEMMs to cuBLAS (NF4 dequantize + cuBLAS, LoRA's extended layer) need it.
    pub fn has_cublas(&self) -> bool {
        matches!(self, Device::Cuda(d) if matches!(blas::handle(d), Ok(Some(_))))
    }

    /// Copies host data into a new buffer.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<Buffer<T>> {
        let storage = match self {
            Device::Cuda(d) if host.is_empty() => Storage::Cuda(d.alloc_filled(0, 0)?),
            Device::Cuda(d) => Storage::Cuda(d.upload(host)?),
            Device::Emu(_) => Storage::Host(HostBuffer::from_slice(host)?),
        };
        Ok(Buffer {
            storage,
            len: host.len(),
            device: self.clone(),
        })
    }

    /// A new buffer of `len` elements, every byte set to 0xFF (NaN in float dtypes), so a
    /// kernel that leaves an element unwritten is caught.
    pub fn alloc_poisoned<T: Elem>(&self, len: usize) -> Result<Buffer<T>> {
        let storage = match self {
            Device::Cuda(d) => Storage::Cuda(d.alloc_filled(len, POISON_BYTE)?),
            Device::Emu(_) => Storage::Host(HostBuffer::filled::<T>(len, POISON_BYTE)?),
        };
        Ok(Buffer {
            storage,
            len,
            device: self.clone(),
        })
    }

    /// A buffer that the kernels about to run overwrite whole (an output). The emulator
    /// poisons it as [`Device::alloc_poisoned`] does, so an element left unwritten shows as
    /// NaN; a GPU does so only after [`Device::set_poison_outputs`] (the tests and `fk check`
    /// ask for it), and otherwise skips the fill, a pass over the buffer's bytes.
    pub fn alloc_output<T: Elem>(&self, len: usize) -> Result<Buffer<T>> {
        let storage = match self {
            Device::Cuda(d) => Storage::Cuda(d.alloc_output(len)?),
            Device::Emu(_) => Storage::Host(HostBuffer::filled::<T>(len, POISON_BYTE)?),
        };
        Ok(Buffer {
            storage,
            len,
            device: self.clone(),
        })
    }

    /// Whether [`Device::alloc_output`] poisons on a GPU (the emulator always does).
    pub fn set_poison_outputs(&self, on: bool) {
        if let Device::Cuda(d) = self {
            d.set_poison_outputs(on);
        }
    }

    /// A new buffer of `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>> {
        let storage = match self {
            Device::Cuda(d) => Storage::Cuda(d.alloc_filled(len, 0)?),
            Device::Emu(_) => Storage::Host(HostBuffer::filled::<T>(len, 0)?),
        };
        Ok(Buffer {
            storage,
            len,
            device: self.clone(),
        })
    }

    /// Waits for all launched work to finish.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cuda(d) => d.synchronize(),
            Device::Emu(_) => Ok(()),
        }
    }

    /// Launches `kernel` with `params` (its one params struct, passed by value) on the
    /// device's own stream. A grid with no blocks launches nothing. Public for callers of the
    /// crate's kernels by name (`fk kernels` lists them): a kernel is one of this crate's, from
    /// its embedded PTX (or `$FK_PTX_DIR`) on a GPU and compiled into the crate on the emulator.
    ///
    /// # Safety
    /// `params` must be the struct `kernel` is declared with, and every pointer in it must
    /// be valid on this device (device addresses on a GPU, host addresses under the
    /// emulator) for what the kernel reads and writes.
    pub unsafe fn launch<P: Copy>(
        &self,
        kernel: &Kernel,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.launch_on(kernel, cfg, None, params) }
    }

    /// [`Device::launch`] on `stream`: with `Some`, a stream of this device's context that
    /// your framework owns (the raw entry points take one); with `None`, the device's own.
    /// The emulator has no streams (a launch is done when it returns): it takes `None` only.
    ///
    /// # Safety
    /// As [`Device::launch`]; a given stream must belong to this device's context, the
    /// memory in `params` must be ready on it, and every buffer in `params` must outlive the
    /// work on it: buffers are freed on the device's own stream (the legacy default stream),
    /// which a non-blocking stream (cudarc's `new_stream`, PyTorch's) does not wait for
    /// ([`CudaDevice::stream`]).
    pub unsafe fn launch_on<P: Copy>(
        &self,
        kernel: &Kernel,
        cfg: LaunchConfig,
        stream: Option<CUstream>,
        params: &P,
    ) -> Result<()> {
        if cfg.is_empty() {
            return Ok(());
        }
        cfg.check(&kernel.name)?;
        if cfg.cluster != (1, 1, 1) && !self.has_clusters() {
            return Err(Error::Unsupported {
                op: "LaunchConfig::cluster",
                why: format!("clusters need compute capability 9.0; {}", self.describe()),
            });
        }
        match self {
            Device::Cuda(d) => {
                let stream = stream.unwrap_or_else(|| d.raw_stream());
                // SAFETY: forwarded from this function's contract.
                unsafe { d.launch(kernel, cfg, stream, params) }
            }
            Device::Emu(_) if stream.is_some() => Err(Error::InvalidArgument {
                what: "stream",
                why: "the emulator has no streams: pass None".into(),
            }),
            Device::Emu(e) => {
                breakdown::mark_wall(&kernel.name);
                // SAFETY: forwarded from this function's contract.
                unsafe { e.launch(kernel, cfg, params) }
            }
        }
    }

    pub(crate) fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            (Device::Emu(a), Device::Emu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// `kernel`'s name for the driver (or the emulator's kernel table): a name with a NUL in it
/// is a typed error, as any other name no module holds would be.
pub(crate) fn kernel_cname(kernel: &Kernel) -> Result<std::ffi::CString> {
    std::ffi::CString::new(kernel.name.as_str()).map_err(|_| Error::InvalidArgument {
        what: "kernel name",
        why: format!("{:?} holds a NUL byte", kernel.name),
    })
}

/// A grid dimension of `blocks`, saturated: a count past u32 must fail
/// [`LaunchConfig::check`], not wrap to a grid that leaves outputs unwritten.
fn grid_dim(blocks: usize) -> u32 {
    u32::try_from(blocks).unwrap_or(u32::MAX)
}

/// The bytes of `len` elements of T, or an error if that overflows.
pub(crate) fn byte_len<T>(len: usize) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| Error::InvalidArgument {
            what: "buffer length",
            why: format!("{len} elements overflow usize bytes"),
        })
}

/// Host memory for the emulator, 64-byte aligned as device allocations are (at least) 256:
/// kernels make vector loads that assume it.
struct HostBuffer {
    chunks: Vec<Align64>,
    bytes: usize,
}

#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl HostBuffer {
    /// `len` elements of T, every byte `byte`; a length whose bytes overflow, or memory the
    /// host will not give, is a typed error (as `cuMemAlloc`'s would be on a GPU).
    fn filled<T: Elem>(len: usize, byte: u8) -> Result<Self> {
        let bytes = byte_len::<T>(len)?;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(bytes.div_ceil(64))
            .map_err(|_| Error::OutOfMemory { bytes })?;
        chunks.resize(bytes.div_ceil(64), Align64([byte; 64]));
        Ok(HostBuffer { chunks, bytes })
    }

    fn from_slice<T: Elem>(host: &[T]) -> Result<Self> {
        let mut b = HostBuffer::filled::<T>(host.len(), 0)?;
        b.bytes_mut().copy_from_slice(bytemuck::cast_slice(host));
        Ok(b)
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.chunks)[..self.bytes]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.chunks)[..self.bytes]
    }

    fn to_vec<T: Elem>(&self) -> Vec<T> {
        let mut v = vec![T::zeroed(); self.bytes / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(self.bytes());
        v
    }
}

enum Storage<T: Elem> {
    Cuda(cudarc::driver::CudaSlice<T>),
    Host(HostBuffer),
}

/// A typed buffer owned by one device.
pub struct Buffer<T: Elem> {
    storage: Storage<T>,
    len: usize,
    device: Device,
}

impl<T: Elem> Buffer<T> {
    /// The number of elements of `T` (not bytes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device that made the buffer and owns its memory.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies the buffer back to the host (waits for pending work).
    pub fn to_host(&self) -> Result<Vec<T>> {
        if self.len == 0 {
            // A CUDA allocation is never empty (it holds one element); the buffer is.
            return Ok(Vec::new());
        }
        match (&self.storage, &self.device) {
            (Storage::Cuda(s), Device::Cuda(d)) => d.download(s),
            (Storage::Host(v), _) => Ok(v.to_vec()),
            (Storage::Cuda(_), _) => unreachable!("CUDA storage belongs to a CUDA device"),
        }
    }

    /// Overwrites the buffer with host data of the same length.
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        Error::check_len("copy_from_host", self.len, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        match (&mut self.storage, &self.device) {
            (Storage::Cuda(s), Device::Cuda(d)) => d.copy_in(host, s),
            (Storage::Host(v), _) => {
                v.bytes_mut().copy_from_slice(bytemuck::cast_slice(host));
                Ok(())
            }
            (Storage::Cuda(_), _) => unreachable!("CUDA storage belongs to a CUDA device"),
        }
    }

    /// Copies `rows` rows of `cols` elements from `src` (rows `src_ld` apart) into this
    /// buffer (rows `dst_ld` apart), on the device. Both must belong to the same device, and
    /// each stride be at least `cols` ([`Error::InvalidArgument`] otherwise).
    pub fn copy_rows_from(
        &mut self,
        src: &Buffer<T>,
        rows: usize,
        cols: usize,
        src_ld: usize,
        dst_ld: usize,
    ) -> Result<()> {
        let size = std::mem::size_of::<T>();
        if rows > 0 {
            check_row_stride("copy_rows_from src_ld", src_ld, cols)?;
            check_row_stride("copy_rows_from dst_ld", dst_ld, cols)?;
        }
        // Rows that fit the buffer, and a pitch in bytes that does not overflow (one row
        // fits whatever its ld, which the copy still takes as its pitch).
        let fits = |len: usize, ld: usize| {
            rows == 0
                || ld.checked_mul(size).is_some()
                    && (rows - 1)
                        .checked_mul(ld)
                        .and_then(|n| n.checked_add(cols))
                        .is_some_and(|n| n <= len)
        };
        if !fits(src.len, src_ld) || !fits(self.len, dst_ld) {
            return Err(Error::ShapeMismatch {
                what: "copy_rows_from".into(),
                expected: vec![rows, cols],
                got: vec![src.len, self.len],
            });
        }
        check_device(&self.device, src)?;
        // No elements to copy, whatever the rows (a host loop over 2^64 empty rows would
        // never end).
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        match (&mut self.storage, &src.storage, &self.device) {
            (Storage::Cuda(d), Storage::Cuda(s), Device::Cuda(dev)) => {
                dev.copy_rows(s, d, rows, cols * size, src_ld * size, dst_ld * size)
            }
            (Storage::Host(d), Storage::Host(s), _) => {
                let (sb, db) = (s.bytes(), d.bytes_mut());
                for r in 0..rows {
                    db[r * dst_ld * size..(r * dst_ld + cols) * size]
                        .copy_from_slice(&sb[r * src_ld * size..(r * src_ld + cols) * size]);
                }
                Ok(())
            }
            _ => Err(Error::DeviceMismatch),
        }
    }

    /// The address a kernel reads through (a device address, or a host address under the
    /// emulator), for filling params structs.
    pub fn ptr(&self) -> *const std::ffi::c_void {
        match (&self.storage, &self.device) {
            (Storage::Cuda(s), Device::Cuda(d)) => d.addr(s) as *const std::ffi::c_void,
            (Storage::Host(v), _) => v.chunks.as_ptr() as *const std::ffi::c_void,
            (Storage::Cuda(_), _) => unreachable!("CUDA storage belongs to a CUDA device"),
        }
    }

    /// The address a kernel writes through. Taking `&mut self` keeps Rust's aliasing rules
    /// on the host side of every launch.
    pub fn ptr_mut(&mut self) -> *mut std::ffi::c_void {
        match (&mut self.storage, &self.device) {
            (Storage::Cuda(s), Device::Cuda(d)) => d.addr(s) as *mut std::ffi::c_void,
            (Storage::Host(v), _) => v.chunks.as_mut_ptr() as *mut std::ffi::c_void,
            (Storage::Cuda(_), _) => unreachable!("CUDA storage belongs to a CUDA device"),
        }
    }

    /// The CUDA slice, for users mixing this crate with cudarc. The slice's work is ordered
    /// only on the device's stream ([`CudaDevice::stream`]): cudarc's per-buffer event
    /// tracking is off, so a use on another stream must be synchronized with it by hand, and
    /// must finish before the buffer is dropped.
    pub fn as_cuda_slice(&self) -> Option<&cudarc::driver::CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Host(_) => None,
        }
    }

    /// As [`Buffer::as_cuda_slice`], mutable.
    pub fn as_cuda_slice_mut(&mut self) -> Option<&mut cudarc::driver::CudaSlice<T>> {
        match &mut self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Host(_) => None,
        }
    }
}

/// Errors unless rows `ld` elements apart have room for `cols` elements each: a stride below
/// the row's length would lay each row over the next. `what` names the stride.
pub(crate) fn check_row_stride(what: &'static str, ld: usize, cols: usize) -> Result<()> {
    if ld >= cols {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what,
            why: format!("{ld} elements is less than a row of {cols}"),
        })
    }
}

/// Errors if `b` lives on another device than `dev`.
pub(crate) fn check_device<T: Elem>(dev: &Device, b: &Buffer<T>) -> Result<()> {
    if dev.same(b.device()) {
        Ok(())
    } else {
        Err(Error::DeviceMismatch)
    }
}
