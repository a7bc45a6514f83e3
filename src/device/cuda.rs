//! The CUDA backend: a cudarc context and stream, lazily loaded PTX modules, launches.

use super::ptx::{self, Target};
use super::{byte_len, kernel_cname, Kernel, LaunchConfig};
use crate::dtype::Elem;
use crate::dtype::POISON_BYTE;
use crate::error::{Error, NoDevice, Result};
use cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

/// What the driver says about itself, probed without ever panicking.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub version: i32,
    /// CUDA devices the driver sees (`cuDeviceGetCount`).
    pub device_count: usize,
}

/// The CUDA version the committed PTX (ISA 9.0, nvcc 13.0) needs from the driver.
pub const PTX_DRIVER_VERSION: i32 = 13000;

/// Loads libcuda and asks it for its version and device count. cudarc panics on its first
/// driver call when libcuda is missing, so the library's presence is checked first.
pub fn probe_driver() -> Result<DriverInfo> {
    // SAFETY: only tries to dlopen libcuda by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err(NoDevice::NoDriver.into());
    }
    use sys::CUresult as R;
    match result::init() {
        Ok(()) => {}
        Err(e) if e.0 == R::CUDA_ERROR_NO_DEVICE => return Err(NoDevice::NoGpu.into()),
        // A driver that cannot run anything here: the emulator is the fallback, as without one.
        Err(e)
            if matches!(
                e.0,
                R::CUDA_ERROR_STUB_LIBRARY
                    | R::CUDA_ERROR_DEVICE_UNAVAILABLE
                    | R::CUDA_ERROR_DEVICE_NOT_LICENSED
                    | R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
                    | R::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
                    | R::CUDA_ERROR_OPERATING_SYSTEM
            ) =>
        {
            let name = crate::error::driver_error_name(e);
            return Err(NoDevice::DriverUnusable { name }.into());
        }
        Err(e) => return Err(Error::driver("cuInit", e)),
    }
    let mut version = 0;
    // SAFETY: cuInit succeeded; the out-pointer is a live local.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| Error::driver("cuDriverGetVersion", e))?;
    let count = result::device::get_count().map_err(|e| Error::driver("cuDeviceGetCount", e))?;
    Ok(DriverInfo {
        version,
        device_count: count.max(0) as usize,
    })
}

struct LoadedModule(sys::CUmodule);
// SAFETY: a CUmodule handle may be used from any thread once its context is current.
unsafe impl Send for LoadedModule {}
unsafe impl Sync for LoadedModule {}

#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: as for modules; the function lives as long as its module, which the device keeps.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A kernel as the driver compiled it (`CudaDevice::resources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelResources {
    /// Registers per thread.
    pub registers: u32,
    /// Local memory per thread: spills or a stack frame the build checks did not see.
    pub local_bytes: u32,
    /// Static shared memory per block, in bytes (dynamic shared memory not included).
    pub static_smem_bytes: u32,
    /// The most threads a block of it may have (launch bounds, registers).
    pub max_threads: u32,
    /// Resident blocks per multiprocessor at the block size asked for.
    pub blocks_per_sm: u32,
}

/// One GPU: its primary context (shared with other frameworks in the process), a stream,
/// and the modules loaded so far.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    target: Target,
    driver: DriverInfo,
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
    /// Loaded functions by module and name (two modules may share an entry's name).
    functions: Mutex<HashMap<Kernel, Function>>,
    /// The dynamic shared memory each function has been allowed (`allow_shared`).
    shared_allowed: Mutex<HashMap<Kernel, u32>>,
    pub(super) blas: std::sync::OnceLock<Result<Option<cudarc::cublas::CudaBlas>>>,
    /// Whether kernel outputs are poisoned ([`super::Device::set_poison_outputs`]).
    poison_outputs: std::sync::atomic::AtomicBool,
}

/// Buffers come from the device's default memory pool (`cuMemAllocAsync`), which by default
/// hands freed memory back to the driver at every synchronization, so the next training
/// step maps its activations afresh. Keeping it pooled is what PyTorch's caching allocator
/// does; `cuMemPoolTrimTo` on the pool gives it back.
fn keep_freed_memory(device: sys::CUdevice) -> Result<()> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; `device` came from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, device) }
        .result()
        .map_err(|e| Error::driver("cuDeviceGetDefaultMemPool", e))?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| Error::driver("cuMemPoolSetAttribute", e))
}

/// The failure of `call`, which allocates `bytes`: [`Error::OutOfMemory`] when the device
/// has no room.
fn alloc_error(call: &'static str, e: cudarc::driver::DriverError, bytes: usize) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { bytes }
    } else {
        Error::driver(call, e)
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal` on its primary context and that context's default stream, and
    /// keeps freed memory in the device's default pool. Errors with [`NoDevice`] when no
    /// driver or GPU is usable, `ordinal` is past the device count, the driver is older than
    /// CUDA 13.0 (`PTX_DRIVER_VERSION`; unless the PTX was built from source) or the compute
    /// capability is below 8.0, and with a driver error when a driver call fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        let driver = probe_driver()?;
        if driver.device_count == 0 {
            return Err(NoDevice::NoGpu.into());
        }
        if ordinal >= driver.device_count {
            return Err(NoDevice::Ordinal {
                ordinal,
                count: driver.device_count,
            }
            .into());
        }
        if driver.version < PTX_DRIVER_VERSION && !ptx::built_from_source() {
            return Err(NoDevice::DriverTooOld {
                driver: driver.version,
                needed: PTX_DRIVER_VERSION,
            }
            .into());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::driver(
                "CudaContext::new (cuDeviceGet, cuDevicePrimaryCtxRetain)",
                e,
            )
        })?;
        // Every buffer is used on one stream, the device's, where its free (cuMemFreeAsync on
        // that stream) follows every launch that read it: cudarc's per-buffer events would
        // only add work. A use on another stream is the caller's to order (launch_on's
        // contract, the docs of stream() and Buffer::as_cuda_slice).
        // SAFETY: called before any buffer or stream of this context exists; cudarc's
        // condition, that no buffer is freed before another stream's use of it finishes, is
        // met on the device's stream and passed on to callers that use others.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::driver("cuDeviceGetAttribute", e))?;
        let target = Target::for_compute_capability(major, minor)
            .ok_or(NoDevice::ComputeCapability { major, minor })?;
        let name = ctx
            .name()
            .map_err(|e| Error::driver("cuDeviceGetName", e))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::driver("cuDeviceGetAttribute", e))? as usize;
        let stream = ctx.default_stream();
        if ctx.has_async_alloc() {
            keep_freed_memory(ctx.cu_device())?;
        }
        Ok(CudaDevice {
            ctx,
            stream,
            ordinal,
            name,
            compute_capability: (major, minor),
            sm_count,
            target,
            driver,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            shared_allowed: Mutex::new(HashMap::new()),
            blas: std::sync::OnceLock::new(),
            poison_outputs: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// One line naming the device: ordinal, name, compute capability and the PTX target it
    /// loads, e.g. `cuda:0 NVIDIA H100 (sm_90, PTX sm_90a)`.
    pub fn describe(&self) -> String {
        let (ma, mi) = self.compute_capability;
        format!(
            "cuda:{} {} (sm_{ma}{mi}, PTX {})",
            self.ordinal,
            self.name,
            self.target.name()
        )
    }

    /// The device's name as the driver reports it (`cuDeviceGetName`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compute capability as (major, minor), e.g. (9, 0).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The PTX target this device loads.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The driver's version and device count, as probed when the device was opened.
    pub fn driver(&self) -> &DriverInfo {
        &self.driver
    }

    /// The cudarc context, for users who mix this crate with their own cudarc code. Its
    /// event tracking is off ([`Self::stream`]).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch and copy of this device goes to: the context's legacy default
    /// stream. cudarc's per-buffer event tracking is off, so buffers are ordered only on it:
    /// work on another stream (cudarc's `new_stream`, PyTorch's, both non-blocking) that
    /// reads a buffer must be synchronized with this stream by hand, and must finish before
    /// the buffer is dropped (its free goes to this stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn raw_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub(crate) fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| alloc_error("cuMemcpyHtoDAsync", e, std::mem::size_of_val(host)))
    }

    pub(crate) fn download<T: Elem>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(s)
            .map_err(|e| Error::driver("cuMemcpyDtoHAsync", e))
    }

    pub(crate) fn copy_in<T: Elem>(&self, host: &[T], s: &mut CudaSlice<T>) -> Result<()> {
        self.stream
            .memcpy_htod(host, s)
            .map_err(|e| Error::driver("cuMemcpyHtoDAsync", e))
    }

    pub(crate) fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn poison_outputs(&self) -> bool {
        self.poison_outputs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A buffer for a kernel to overwrite whole: poisoned when asked, otherwise left as the
    /// pool hands it out (no fill pass over outputs on the hot path).
    pub(crate) fn alloc_output<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        if self
            .poison_outputs
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.alloc_filled(len, POISON_BYTE);
        }
        let bytes = byte_len::<T>(len)?;
        // SAFETY: T is plain old data, so whatever bytes the memory holds are valid values;
        // the kernels the caller launches write every element before it is read back.
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| alloc_error("cuMemAllocAsync", e, bytes))
    }

    pub(crate) fn alloc_filled<T: Elem>(&self, len: usize, byte: u8) -> Result<CudaSlice<T>> {
        let bytes = byte_len::<T>(len)?;
        // SAFETY: every byte is written by the memset below before anyone can read it.
        let s = unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| alloc_error("cuMemAllocAsync", e, bytes))?;
        if bytes > 0 {
            // SAFETY: the allocation holds at least `bytes` bytes.
            unsafe { result::memset_d8_async(self.addr(&s), byte, bytes, self.raw_stream()) }
                .map_err(|e| Error::driver("cuMemsetD8Async", e))?;
        }
        Ok(s)
    }

    /// `rows` rows of `width` bytes from `src` (rows `src_pitch` bytes apart) to `dst`; its
    /// caller ([`super::Buffer::copy_rows_from`]) makes no empty copy.
    pub(crate) fn copy_rows<T>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        rows: usize,
        width: usize,
        src_pitch: usize,
        dst_pitch: usize,
    ) -> Result<()> {
        self.bind()?;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: self.addr(src),
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: self.addr(dst),
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: rows,
        };
        // SAFETY: the caller checked that both allocations hold the rows at their pitches.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.raw_stream()) }
            .result()
            .map_err(|e| Error::driver("cuMemcpy2DAsync", e))
    }

    pub(crate) fn addr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = s.device_ptr(&self.stream);
        ptr
    }

    /// Waits for all work queued on [`Self::stream`] to finish. Errors with the driver's error
    /// when the stream reports one (such as a fault left by an earlier launch).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::driver("cuStreamSynchronize", e))
    }

    /// Makes this device's context current on the calling thread: a `Device` may be used
    /// from any thread, and a driver call with no current context (or another device's)
    /// fails or goes to the wrong device.
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::driver("cuCtxSetCurrent", e))
    }

    /// `kernel`'s function, its module loaded on first use; the context made current, for
    /// the calls on the function that follow.
    fn function(&self, kernel: &Kernel) -> Result<Function> {
        self.bind()?;
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = functions.get(kernel) {
            return Ok(*f);
        }
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if !modules.contains_key(kernel.module) {
            let source =
                ptx::source(kernel.module, self.target).ok_or_else(|| Error::Unsupported {
                    op: "module load",
                    why: format!(
                        "no PTX for module {} at {}{}",
                        kernel.module,
                        self.target.name(),
                        std::env::var("FK_PTX_DIR").map_or(String::new(), |dir| format!(
                            " (FK_PTX_DIR is set: {dir}/{}/{}.ptx is missing or unreadable)",
                            self.target.name(),
                            kernel.module
                        ))
                    ),
                })?;
            let image = CString::new(source).map_err(|_| Error::Unsupported {
                op: "module load",
                why: format!("PTX for {} holds a NUL byte", kernel.module),
            })?;
            // SAFETY: `image` is NUL-terminated PTX text; the driver copies it.
            let m = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| Error::driver("cuModuleLoadData", e))?;
            modules.insert(kernel.module, LoadedModule(m));
        }
        let module = modules[kernel.module].0;
        let cname = kernel_cname(kernel)?;
        // SAFETY: `module` is loaded in this context and stays loaded while `self` lives.
        let f = unsafe { result::module::get_function(module, cname) }
            .map_err(|e| Error::driver("cuModuleGetFunction", e))?;
        functions.insert(kernel.clone(), Function(f));
        Ok(Function(f))
    }

    /// What the driver's JIT made of `kernel` (its own compile of the PTX, which the build
    /// checks' pinned ptxas only predicts), and how many blocks of `block_threads` fit on a
    /// multiprocessor (fewer threads if the kernel allows fewer) with `dynamic_smem` bytes of
    /// dynamic shared memory each, the function set up as a launch of that size sets it.
    pub fn resources(
        &self,
        kernel: &Kernel,
        block_threads: u32,
        dynamic_smem: u32,
    ) -> Result<KernelResources> {
        use sys::CUfunction_attribute as A;
        let f = self.function(kernel)?;
        self.allow_shared(kernel, f, dynamic_smem)?;
        // SAFETY: `f` is a live function handle of this context.
        let get = |attr| unsafe { result::function::get_function_attribute(f.0, attr) };
        let attr = |attr, name| get(attr).map_err(|e| Error::driver(name, e));
        let max_threads = attr(
            A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            "cuFuncGetAttribute",
        )?;
        Ok(KernelResources {
            registers: attr(A::CU_FUNC_ATTRIBUTE_NUM_REGS, "cuFuncGetAttribute")? as u32,
            local_bytes: attr(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, "cuFuncGetAttribute")? as u32,
            static_smem_bytes: attr(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, "cuFuncGetAttribute")?
                as u32,
            max_threads: max_threads as u32,
            // SAFETY: as above.
            blocks_per_sm: unsafe {
                result::occupancy::max_active_block_per_multiprocessor(
                    f.0,
                    (block_threads as i32).min(max_threads),
                    dynamic_smem as usize,
                )
            }
            .map_err(|e| Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?
                as u32,
        })
    }

    /// Lets `f` (`kernel`'s function) take `bytes` of dynamic shared memory, once per function
    /// and size (the attributes persist; setting them every launch cost two driver calls per
    /// launch of the large-tile kernels). Over 48 KB the driver needs the size, and the
    /// carveout goes to all of L1 as shared memory (100%): the kernels that ask for this much
    /// (the wgmma GEMMs, narrow.cuh's two blocks per SM) stream through shared memory and
    /// read global memory past L1; left unset, the carveout is the driver's choice, which need
    /// not leave room for narrow.cuh's second block.
    fn allow_shared(&self, kernel: &Kernel, f: Function, bytes: u32) -> Result<()> {
        if bytes <= 48 * 1024 {
            return Ok(());
        }
        let mut allowed = self
            .shared_allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if allowed.get(kernel).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        for (attribute, value) in [
            (
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            ),
            (
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            ),
        ] {
            // SAFETY: `f` is a live function handle of this context.
            unsafe { result::function::set_function_attribute(f.0, attribute, value) }
                .map_err(|e| Error::driver("cuFuncSetAttribute", e))?;
        }
        allowed.insert(kernel.clone(), bytes);
        Ok(())
    }

    /// Launches `kernel` on `stream` with its params struct.
    ///
    /// # Safety
    /// `params` must be the struct the kernel is declared with, its pointers valid on this
    /// device for the kernel's accesses, and `stream` a live stream of this context.
    pub(crate) unsafe fn launch<P: Copy>(
        &self,
        kernel: &Kernel,
        cfg: LaunchConfig,
        stream: sys::CUstream,
        params: &P,
    ) -> Result<()> {
        if cfg.is_empty() {
            return Ok(());
        }
        let f = self.function(kernel)?;
        self.allow_shared(kernel, f, cfg.shared_bytes)?;
        super::breakdown::mark(stream, &kernel.name)?;
        let mut args = [params as *const P as *mut c_void];
        if cfg.cluster != (1, 1, 1) {
            return Self::launch_in_clusters(f.0, cfg, stream, &mut args);
        }
        // SAFETY: one argument, the params struct, as every kernel here is declared;
        // the caller guarantees the pointers inside it.
        unsafe {
            result::launch_kernel(
                f.0,
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                stream,
                &mut args,
            )
        }
        .map_err(|e| Error::driver("cuLaunchKernel", e))
    }

    /// cuLaunchKernelEx with the cluster dimension attribute (cudarc wraps only
    /// cuLaunchKernel).
    ///
    /// # Safety
    /// As [`Self::launch`]: `args` holds the kernel's params struct, `f` and `stream` live.
    unsafe fn launch_in_clusters(
        f: sys::CUfunction,
        cfg: LaunchConfig,
        stream: sys::CUstream,
        args: &mut [*mut c_void; 1],
    ) -> Result<()> {
        // SAFETY: an all-zero attribute is a valid value of this plain C union.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.clusterDim.x = cfg.cluster.0;
        value.clusterDim.y = cfg.cluster.1;
        value.clusterDim.z = cfg.cluster.2;
        // SAFETY: as above, for the attribute struct (its padding included).
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attr.value = value;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid.0,
            gridDimY: cfg.grid.1,
            gridDimZ: cfg.grid.2,
            blockDimX: cfg.block.0,
            blockDimY: cfg.block.1,
            blockDimZ: cfg.block.2,
            sharedMemBytes: cfg.shared_bytes,
            hStream: stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `config` and `attr` outlive the call; the args are as for cuLaunchKernel.
        unsafe { sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| Error::driver("cuLaunchKernelEx", e))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Work still queued may run kernels of these modules: it finishes first. An error
        // here (a fault a last launch left) has no caller left to report to.
        if self.bind().is_err() || self.synchronize().is_err() {
            return;
        }
        let modules = self.modules.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, m) in modules.drain() {
            // SAFETY: the module was loaded in this context and no function of it is used
            // after the device is dropped.
            let _ = unsafe { result::module::unload(m.0) };
        }
    }
}
