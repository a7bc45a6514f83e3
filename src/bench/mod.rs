//! GPU timing: CUDA events around each repetition, warm-up first, L2 flushed between
//! repetitions, median reported. And the rows the GPU check writes (DESIGN.md §8): time,
//! TB/s, TFLOP/s, the floor and the fraction of it, and the baseline from the same run.

pub mod families;
pub mod lora;
pub mod nf4;
pub mod profile;
pub mod sparse;

use crate::device::blas::{self, WeightOp};
use crate::device::{breakdown, CudaDevice, Device};
use crate::dtype::FloatElem;
use crate::error::{Error, Result};
use crate::files::write_whole;
use cudarc::driver::{result, sys, CudaSlice};
use half::bf16;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Repetition times of one measured region.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The median time of one repetition (of one launch, for rotated timings), in
    /// microseconds.
    pub median_us: f64,
    /// How many repetitions were timed (1 on the emulator's wall clock).
    pub reps: usize,
}

/// Timed repetitions per row: the median of 50 (the GPU check's contract).
pub const REPS: usize = 50;

/// Times regions on one CUDA device with events; flushes L2 between repetitions by writing
/// a buffer twice the L2's size. On the emulator (which runs the benchmarks only in tests, at
/// [`Scale::SMALL`], for their launches and rows) a region runs once, by the wall clock.
pub struct GpuTimer<'a> {
    /// The GPU and its L2 flush buffer; None on the emulator.
    gpu: Option<(&'a CudaDevice, CudaSlice<u8>)>,
    /// cuBLAS bf16 GEMM times by (m, n, k, transposed): rows of several paths share a
    /// baseline, timed once per run (GPU time is scarce).
    cublas: HashMap<(usize, usize, usize, bool), Stats>,
}

impl<'a> GpuTimer<'a> {
    /// A timer on `dev`: on a GPU it allocates the L2 flush buffer (twice the L2, at least
    /// 2 MiB); on the emulator nothing. Errors if the L2 size cannot be read or the buffer
    /// cannot be allocated.
    pub fn new(dev: &'a Device) -> Result<Self> {
        let gpu = match dev {
            Device::Cuda(d) => {
                let l2 = d
                    .context()
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                    .map_err(|e| Error::driver("cuDeviceGetAttribute", e))?;
                let flush = d.alloc_filled::<u8>(2 * l2.max(1 << 20) as usize, 0)?;
                Some((&**d, flush))
            }
            Device::Emu(_) => None,
        };
        Ok(GpuTimer {
            gpu,
            cublas: HashMap::new(),
        })
    }

    fn flush_l2(dev: &CudaDevice, flush: &CudaSlice<u8>) -> Result<()> {
        memset(dev, flush, 0x5A)
    }

    /// Runs `f` `warmup` times untimed, then `reps` times (at least one), each between two
    /// events, with L2 flushed before each. Returns the median in microseconds (of an even
    /// count, the upper of the middle two).
    pub fn time(
        &mut self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Stats> {
        check_reps(reps)?;
        let Some((dev, flush)) = &self.gpu else {
            return wall_clock(1, f);
        };
        for _ in 0..warmup {
            f()?;
        }
        let us = event_times(dev, reps, |timed| match timed {
            true => f(),
            false => Self::flush_l2(dev, flush),
        })?;
        Ok(median(us))
    }

    /// The other way DESIGN.md §8 allows, inputs rotated, as a model's decode runs a layer's
    /// kernels: `f(0)`, …, `f(launches - 1)`, each over inputs of its own (as many as
    /// [`GpuTimer::rotation`] says, so that each arrives from DRAM), queued back to back between
    /// two events; no flush (whose dirty lines the timed launches would write back). Each
    /// repetition runs the rotation once untimed first, which also puts the GPU behind the
    /// host: a launch then waits on the one before, not on its launch call (were the host the
    /// slower, the time would overstate the GPU's, never understate it). Returns the median
    /// time per launch.
    pub fn time_rotated(
        &mut self,
        reps: usize,
        launches: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<Stats> {
        check_reps(reps)?;
        if launches == 0 {
            return Err(Error::InvalidArgument {
                what: "rotated launches",
                why: "0: a rotation needs one".into(),
            });
        }
        let mut rotation = || (0..launches).try_for_each(&mut f);
        let Some((dev, _)) = &self.gpu else {
            return wall_clock(launches, rotation);
        };
        rotation()?;
        let us = event_times(dev, reps, |_| rotation())?;
        Ok(median(us.iter().map(|t| t / launches as f64).collect()))
    }

    /// How many copies of an input of `bytes` a rotation needs so that none is still in L2
    /// when its turn comes again: together past twice the L2 (two on the emulator).
    pub fn rotation(&self, bytes: usize) -> usize {
        let l2_twice = self.gpu.as_ref().map_or(0, |(_, flush)| flush.len());
        (l2_twice.div_ceil(bytes.max(1)) + 1).max(2)
    }

    /// Where `f`'s time goes: `f` run `warmup` times, then `reps` times (L2 flushed before
    /// each) with every launch and cuBLAS GEMM marked (`device::breakdown`); for each launch
    /// in order, its name and median time to the next. `f` must launch the same kernels in
    /// the same order every time.
    pub fn breakdown(
        &mut self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<(String, Stats)>> {
        check_reps(reps)?;
        let Some((dev, flush)) = &self.gpu else {
            breakdown::open_wall();
            let ran = f();
            let marks = breakdown::close_wall();
            ran?;
            let stats = |us| Stats {
                median_us: us,
                reps: 1,
            };
            return Ok(marks.into_iter().map(|(n, us)| (n, stats(us))).collect());
        };
        for _ in 0..warmup {
            f()?;
        }
        dev.context()
            .bind_to_thread()
            .map_err(|e| Error::driver("cuCtxSetCurrent", e))?;
        let mut runs: Vec<Vec<(String, f64)>> = Vec::new();
        for _ in 0..reps {
            Self::flush_l2(dev, flush)?;
            breakdown::open()?;
            let ran = f();
            // f's error first: the marks it left are what fails to close.
            let marks = breakdown::close(dev.raw_stream());
            ran?;
            runs.push(marks?);
        }
        let first = runs.first().cloned().unwrap_or_default();
        first
            .into_iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let us = runs
                    .iter()
                    .map(|r| match r.get(i) {
                        Some((n, t)) if *n == name => Ok(*t),
                        _ => Err(Error::InvalidArgument {
                            what: "breakdown",
                            why: "the runs launched different kernels".into(),
                        }),
                    })
                    .collect::<Result<Vec<f64>>>()?;
                Ok((name, median(us)))
            })
            .collect()
    }
}

/// The emulator's timing (which runs the benchmarks only in tests, at [`Scale::SMALL`], for
/// their launches and rows): `f` once, by the wall clock, over `launches` launches.
fn wall_clock(launches: usize, f: impl FnOnce() -> Result<()>) -> Result<Stats> {
    let start = std::time::Instant::now();
    f()?;
    Ok(Stats {
        median_us: start.elapsed().as_secs_f64() * 1e6 / launches.max(1) as f64,
        reps: 1,
    })
}

fn check_reps(reps: usize) -> Result<()> {
    if reps == 0 {
        return Err(Error::InvalidArgument {
            what: "timed repetitions",
            why: "0: a median needs one".into(),
        });
    }
    Ok(())
}

/// `reps` times: `run(false)` untimed, then `run(true)` between two events on `dev`'s
/// stream; the timed runs' times in microseconds.
fn event_times(
    dev: &CudaDevice,
    reps: usize,
    mut run: impl FnMut(bool) -> Result<()>,
) -> Result<Vec<f64>> {
    let ctx = dev.context().clone();
    let stream = dev.stream().clone();
    let ev = |_| {
        ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::driver("cuEventCreate", e))
    };
    let starts = (0..reps).map(ev).collect::<Result<Vec<_>>>()?;
    let ends = (0..reps).map(ev).collect::<Result<Vec<_>>>()?;
    for (s, e) in starts.iter().zip(&ends) {
        run(false)?;
        s.record(&stream)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
        run(true)?;
        e.record(&stream)
            .map_err(|e| Error::driver("cuEventRecord", e))?;
    }
    dev.synchronize()?;
    starts
        .iter()
        .zip(&ends)
        .map(|(s, e)| {
            s.elapsed_ms(e)
                .map(|ms| ms as f64 * 1e3)
                .map_err(|e| Error::driver("cuEventElapsedTime", e))
        })
        .collect()
}

/// The median of `us`, one time a repetition (of an even count, the upper of the middle two).
fn median(mut us: Vec<f64>) -> Stats {
    us.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median_us: us[us.len() / 2],
        reps: us.len(),
    }
}

/// The shapes the benchmarks run at: the GPU check's ([`Scale::BENCH`], DESIGN.md §8), or
/// small ones ([`Scale::SMALL`]) at which the emulator runs every family in a test, so that
/// each family's launches, errors and row names are known before a GPU run times them.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// The LoRA layer: tokens, `in` = `out`, rank.
    pub lora: (usize, usize, usize),
    /// The NF4 weight `[rows, cols]` (the GEMVs also take it transposed), and the most rows
    /// its GEMMs run at.
    pub nf4: (usize, usize),
    /// The most activation rows (tokens) the NF4 GEMMs run at.
    pub nf4_tokens: usize,
    /// The SMs a ladder's wave fills.
    pub sms: usize,
    /// The wgmma ladder's rungs (steps of 64 along K; the last two fit the step time) and
    /// the GEMV ladder's K.
    pub ladder_steps: [usize; 3],
    /// The K of the GEMV ladder's three one-wave rungs (the middle one is run at two waves
    /// too).
    pub gemv_ladder_k: [usize; 3],
    /// The sparse rows' weight `[rows, cols]` (1% of it touched).
    pub sparse: (usize, usize),
}

impl Scale {
    /// LLaMA-7B's MLP weight for NF4 and sparse deltas, DESIGN.md §8's layer for LoRA.
    pub const BENCH: Scale = Scale {
        lora: (8192, 4096, 16),
        nf4: (11008, 4096),
        nf4_tokens: 8192,
        sms: 132,
        ladder_steps: [1, 16, 64],
        gemv_ladder_k: [1024, 4096, 16384],
        sparse: (4096, 11008),
    };

    /// A partial tile or two of every kernel, and ladders of two SMs.
    pub const SMALL: Scale = Scale {
        lora: (40, 72, 16),
        nf4: (48, 96),
        nf4_tokens: 40,
        sms: 2,
        ladder_steps: [1, 2, 3],
        gemv_ladder_k: [64, 128, 256],
        sparse: (64, 96),
    };

    /// The shapes for `dev`: the GPU check's with its SM count, or (the emulator) small.
    pub fn of(dev: &Device) -> Scale {
        match dev {
            Device::Cuda(_) => Scale {
                sms: dev.sm_count(),
                ..Scale::BENCH
            },
            Device::Emu(_) => Scale::SMALL,
        }
    }
}

/// The two ceilings every floor is computed from, measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read plus written per second.
    pub copy_bytes_per_s: f64,
    /// cuBLAS bf16 GEMM at 8192³, FLOP/s (None when cuBLAS is not loadable).
    pub bf16_flops_per_s: Option<f64>,
}

impl Ceilings {
    /// As JSON, for the families `fk bench` runs after the first (one set of floors a run).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "copy_bytes_per_s": self.copy_bytes_per_s,
            "bf16_flops_per_s": self.bf16_flops_per_s,
        })
        .to_string()
    }

    /// Reads [`Ceilings::to_json`]'s output; None if it is not that.
    pub fn from_json(text: &str) -> Option<Ceilings> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Ceilings {
            copy_bytes_per_s: v["copy_bytes_per_s"].as_f64()?,
            bf16_flops_per_s: v["bf16_flops_per_s"].as_f64(),
        })
    }
}

/// One benchmark result.
#[derive(Debug, Clone)]
pub struct Row {
    /// The family the row belongs to (`baseline` for the reference measurements).
    pub family: String,
    /// What was timed: a kernel or a path, with any qualifier the family adds.
    pub kernel: String,
    /// The problem's shape, as the family writes it (e.g. `8192x4096→11008`).
    pub shape: String,
    /// The median of `reps` timed repetitions.
    pub time_us: f64,
    /// Timed repetitions behind `time_us`.
    pub reps: usize,
    /// Fewest bytes the work must move through device memory.
    pub bytes: f64,
    /// Floating-point operations the work does (0 for pure data movement).
    pub flops: f64,
    /// The least time the work can take at the run's [`Ceilings`], in microseconds: `bytes`
    /// at the copy rate or `flops` at cuBLAS's bf16 rate, whichever is longer.
    pub floor_us: f64,
    /// Name and median time of the baseline measured in the same run.
    pub baseline: Option<(String, f64)>,
    /// Device memory a layer's forward leaves for its backward (a LoRA forward's row).
    pub saved_bytes: Option<usize>,
}

impl Row {
    /// The row of `kernel` in `family` at `shape`, timed `t`, moving `bytes` and doing
    /// `flops`, its floor computed from `c` (the FLOP term counts only where `c` has a
    /// cuBLAS rate); no baseline and no saved bytes yet.
    pub fn new(
        family: &str,
        kernel: &str,
        shape: &str,
        t: &Stats,
        bytes: f64,
        flops: f64,
        c: &Ceilings,
    ) -> Row {
        let mem_us = bytes / c.copy_bytes_per_s * 1e6;
        let math_us = c.bf16_flops_per_s.map_or(0.0, |r| flops / r * 1e6);
        Row {
            family: family.into(),
            kernel: kernel.into(),
            shape: shape.into(),
            time_us: t.median_us,
            reps: t.reps,
            bytes,
            flops,
            floor_us: mem_us.max(math_us),
            baseline: None,
            saved_bytes: None,
        }
    }

    /// The row with `bytes` as the device memory the forward leaves for the backward.
    pub fn with_saved_bytes(mut self, bytes: usize) -> Row {
        self.saved_bytes = Some(bytes);
        self
    }

    /// The row against the baseline `name`, whose median time was `time_us` microseconds.
    pub fn with_baseline(mut self, name: &str, time_us: f64) -> Row {
        self.baseline = Some((name.into(), time_us));
        self
    }

    /// This row against a device-to-device copy moving the same bytes (half read, half
    /// written), timed now: the baseline of memory-bound kernels.
    pub fn with_copy_baseline(self, dev: &Device, timer: &mut GpuTimer) -> Result<Row> {
        let copy = time_copy(dev, timer, (self.bytes / 2.0).max(32.0) as usize)?;
        Ok(self.with_baseline("d2d copy, same bytes", copy.median_us))
    }

    /// `bytes` over the median time, in TB/s (10¹² bytes a second).
    pub fn tb_per_s(&self) -> f64 {
        self.bytes / self.time_us * 1e-6
    }

    /// `flops` over the median time, in TFLOP/s (10¹² a second).
    pub fn tflop_per_s(&self) -> f64 {
        self.flops / self.time_us * 1e-6
    }

    /// `floor_us / time_us`: 1 at the floor, less the slower the row.
    pub fn fraction_of_floor(&self) -> f64 {
        self.floor_us / self.time_us
    }

    /// The row [`to_json`] wrote as `v`; None if `v` is not such a row.
    pub fn from_json(v: &serde_json::Value) -> Option<Row> {
        let text = |key: &str| v[key].as_str().map(String::from);
        let baseline = match (text("baseline"), v["baseline_us"].as_f64()) {
            (Some(name), Some(us)) => Some((name, us)),
            _ => None,
        };
        Some(Row {
            family: text("family")?,
            kernel: text("kernel")?,
            shape: text("shape")?,
            time_us: v["time_us"].as_f64()?,
            reps: v["reps"].as_u64()? as usize,
            bytes: v["bytes"].as_f64()?,
            flops: v["flops"].as_f64()?,
            floor_us: v["floor_us"].as_f64()?,
            baseline,
            saved_bytes: v["saved_bytes"].as_u64().map(|b| b as usize),
        })
    }
}

/// A family's rows, kept as they are measured and (`writing_to`) written out after each as
/// [`to_json`], so that a family cut short by a GPU fault or its time limit keeps what it
/// had measured (`fk bench` runs each family in a process of its own: [`families`]).
#[derive(Debug, Default)]
pub struct Rows {
    rows: Vec<Row>,
    json: Option<PathBuf>,
    /// Why each extra that failed has no rows ([`Rows::extend_extra`]).
    failed_extras: Vec<String>,
}

impl Rows {
    /// Rows kept in memory only.
    pub fn new() -> Rows {
        Rows::default()
    }

    /// Rows rewritten to `json` (whole, by a rename: never half written) after each row.
    pub fn writing_to(json: &Path) -> Rows {
        Rows {
            json: Some(json.to_path_buf()),
            ..Rows::default()
        }
    }

    /// Keeps `row`, as [`Rows::extend`] does.
    pub fn push(&mut self, row: Row) -> Result<()> {
        self.extend([row])
    }

    /// Keeps `rows` and, when writing to a file, rewrites it with every row so far. Errors
    /// if the file cannot be written (the rows are kept all the same).
    pub fn extend(&mut self, rows: impl IntoIterator<Item = Row>) -> Result<()> {
        self.rows.extend(rows);
        match &self.json {
            Some(path) => write_whole(path, to_json(&self.rows)),
            None => Ok(()),
        }
    }

    /// [`Rows::extend`] by rows that are an extra, whose failure costs only them: on an
    /// error, says on stderr that there are no `what` rows, and why.
    pub fn extend_extra(&mut self, rows: Result<Vec<Row>>, what: &str) -> Result<()> {
        match rows {
            Ok(rows) => self.extend(rows),
            Err(e) => {
                let why = format!("no {what} rows: {e}");
                eprintln!("bench: {why}");
                self.failed_extras.push(why);
                Ok(())
            }
        }
    }

    /// Every row kept so far, in the order they came.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Why each extra that failed has no rows.
    pub fn failed_extras(&self) -> &[String] {
        &self.failed_extras
    }
}

/// The rows as a JSON array (one object per row, every figure included; a figure that is
/// not finite, e.g. a rate over a zero time, is null).
pub fn to_json(rows: &[Row]) -> String {
    let objs: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "family": r.family,
                "kernel": r.kernel,
                "shape": r.shape,
                "time_us": r.time_us,
                "reps": r.reps,
                "bytes": r.bytes,
                "flops": r.flops,
                "tb_per_s": r.tb_per_s(),
                "tflop_per_s": r.tflop_per_s(),
                "floor_us": r.floor_us,
                "fraction_of_floor": r.fraction_of_floor(),
                "baseline": r.baseline.as_ref().map(|b| &b.0),
                "baseline_us": r.baseline.as_ref().map(|b| b.1),
                "saved_bytes": r.saved_bytes,
            })
        })
        .collect();
    serde_json::to_string_pretty(&objs).expect("JSON values serialize") + "\n"
}

/// The rows as a Markdown table.
pub fn to_markdown(rows: &[Row]) -> String {
    let mut t = String::from(
        "| family | kernel | shape | time µs | TB/s | TFLOP/s | floor µs | of floor | baseline | baseline µs | ×baseline |\n\
         |---|---|---|---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for r in rows {
        let (bn, bt, ratio) = match &r.baseline {
            Some((n, b)) => (
                n.clone(),
                format!("{b:.2}"),
                format!("{:.2}", r.time_us / b),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        // A part of a call (GpuTimer::breakdown) has no floor of its own.
        let (floor, of_floor) = if r.floor_us > 0.0 {
            (
                format!("{:.2}", r.floor_us),
                format!("{:.0}%", 100.0 * r.fraction_of_floor()),
            )
        } else {
            ("—".into(), "—".into())
        };
        t += &format!(
            "| {} | {} | {} | {:.2} | {:.3} | {:.1} | {} | {} | {} | {} | {} |\n",
            r.family,
            r.kernel,
            r.shape,
            r.time_us,
            r.tb_per_s(),
            r.tflop_per_s(),
            floor,
            of_floor,
            bn,
            bt,
            ratio
        );
    }
    t
}

/// Times a device-to-device copy of `bytes` bytes (the baseline for memory-bound work);
/// the copy moves twice that (read plus write).
pub fn time_copy(dev: &Device, timer: &mut GpuTimer, bytes: usize) -> Result<Stats> {
    time_copies(dev, timer, bytes, 1)
}

/// Times a device memset of `bytes` bytes: what writing alone reaches, the bound of kernels
/// that write far more than they read (dequantization: 4 bytes out a byte in).
pub fn time_memset(dev: &Device, timer: &mut GpuTimer, bytes: usize) -> Result<Stats> {
    let Device::Cuda(d) = dev else {
        return timer.time(0, 1, || Ok(())); // the emulator's tests: no memset to time
    };
    let dst = d.alloc_filled::<u8>(bytes, 0)?;
    timer.time(2, REPS, || memset(d, &dst, 0x3C))
}

/// Sets every byte of `buf` to `byte`, on `dev`'s stream.
fn memset(dev: &CudaDevice, buf: &CudaSlice<u8>, byte: u8) -> Result<()> {
    // SAFETY: writes exactly the buffer's bytes.
    unsafe { result::memset_d8_async(dev.addr(buf), byte, buf.len(), dev.raw_stream()) }
        .map_err(|e| Error::driver("cuMemsetD8Async", e))
}

/// [`time_copy`] done `times` times back to back in each timed run.
fn time_copies(dev: &Device, timer: &mut GpuTimer, bytes: usize, times: usize) -> Result<Stats> {
    let Device::Cuda(d) = dev else {
        return timer.time(0, 1, || Ok(())); // the emulator's tests: no copy to time
    };
    let (src, dst) = copy_pair(d, bytes)?;
    timer.time(2, REPS, || (0..times).try_for_each(|_| copy(d, &src, &dst)))
}

/// [`time_copy`] with inputs rotated ([`GpuTimer::time_rotated`]): each copy between buffers
/// of its own; the time per copy.
fn time_copy_rotated(dev: &Device, timer: &mut GpuTimer, bytes: usize) -> Result<Stats> {
    let Device::Cuda(d) = dev else {
        return timer.time(0, 1, || Ok(())); // the emulator's tests: no copy to time
    };
    let pairs = (0..timer.rotation(2 * bytes))
        .map(|_| copy_pair(d, bytes))
        .collect::<Result<Vec<_>>>()?;
    timer.time_rotated(REPS, pairs.len(), |i| copy(d, &pairs[i].0, &pairs[i].1))
}

/// A source and a destination of `bytes` bytes each.
fn copy_pair(d: &CudaDevice, bytes: usize) -> Result<(CudaSlice<u8>, CudaSlice<u8>)> {
    Ok((
        d.alloc_filled::<u8>(bytes, 0x3C)?,
        d.alloc_filled::<u8>(bytes, 0)?,
    ))
}

/// Copies `src` into `dst` (as long as it), on `d`'s stream.
fn copy(d: &CudaDevice, src: &CudaSlice<u8>, dst: &CudaSlice<u8>) -> Result<()> {
    let bytes = src.len().min(dst.len());
    // SAFETY: both allocations hold at least `bytes` bytes.
    unsafe { result::memcpy_dtod_async(d.addr(dst), d.addr(src), bytes, d.raw_stream()) }
        .map_err(|e| Error::driver("cuMemcpyDtoDAsync", e))
}

fn random_device<T: FloatElem>(dev: &Device, n: usize, seed: u64) -> Result<crate::Buffer<T>> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    dev.upload(&crate::testing::random_vec::<T>(&mut rng, n, 1.0))
}

/// Times cuBLAS bf16 `out[m, n] = a[m, k] · op(W)` (f32 accumulate) on random data: a
/// linear layer's forward (`WeightOp::Transposed`, W `[n, k]`) or its dX (`Plain`, W `[k, n]`).
/// Once per shape and timer: later calls return the first timing.
pub fn time_cublas(
    dev: &Device,
    timer: &mut GpuTimer,
    m: usize,
    n: usize,
    k: usize,
    op: WeightOp,
) -> Result<Option<Stats>> {
    let key = (m, n, k, op == WeightOp::Transposed);
    if let Some(t) = timer.cublas.get(&key) {
        return Ok(Some(t.clone()));
    }
    if !cublas_present(dev)? {
        return Ok(None);
    }
    let w = [random_device::<bf16>(dev, n * k, 2)?];
    let t = cublas_over(dev, timer, (m, n, k), op, &w, false)?;
    if let Some(t) = &t {
        timer.cublas.insert(key, t.clone());
    }
    Ok(t)
}

/// Whether cuBLAS serves `dev` (the benchmarks' baselines need it): a GPU whose libcublas
/// loads; cublasCreate's failure is an error, not an absence.
fn cublas_present(dev: &Device) -> Result<bool> {
    match dev {
        Device::Cuda(d) => Ok(blas::handle(d)?.is_some()),
        Device::Emu(_) => Ok(false),
    }
}

/// [`time_cublas`] with inputs rotated ([`GpuTimer::time_rotated`]): the GEMM over each of
/// `weights` (`n * k` elements each) in turn; the time per GEMM. None where [`time_cublas`]
/// has none.
fn time_cublas_rotated(
    dev: &Device,
    timer: &mut GpuTimer,
    (m, n, k): (usize, usize, usize),
    op: WeightOp,
    weights: &[crate::Buffer<bf16>],
) -> Result<Option<Stats>> {
    cublas_over(dev, timer, (m, n, k), op, weights, true)
}

/// cuBLAS's GEMM on random activations over `weights`: each timed alone (the first), or
/// rotated through.
fn cublas_over(
    dev: &Device,
    timer: &mut GpuTimer,
    (m, n, k): (usize, usize, usize),
    op: WeightOp,
    weights: &[crate::Buffer<bf16>],
    rotated: bool,
) -> Result<Option<Stats>> {
    let Device::Cuda(d) = dev else {
        return Ok(None); // no cuBLAS on the emulator
    };
    let Some(blas) = blas::handle(d)? else {
        return Ok(None);
    };
    let ws = weights
        .iter()
        .map(|w| match w.as_cuda_slice() {
            Some(w) if w.len() == n * k => Ok(w),
            _ => Err(Error::InvalidArgument {
                what: "cuBLAS benchmark weights",
                why: format!("each must be a CUDA buffer of {n} x {k} elements"),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    let a = random_device::<bf16>(dev, m * k, 1)?;
    let mut out = dev.alloc_poisoned::<bf16>(m * n)?;
    let a = a.as_cuda_slice().expect("a CUDA buffer");
    let o = out.as_cuda_slice_mut().expect("a CUDA buffer");
    let ldw = if op == WeightOp::Transposed { k } else { n };
    let mut gemm = |i: usize| blas::matmul(blas, a, k, ws[i], ldw, o, n, (m, n, k), op);
    Ok(Some(if rotated {
        timer.time_rotated(REPS, ws.len(), gemm)?
    } else {
        timer.time(3, REPS, || gemm(0))?
    }))
}

/// Measures the copy bandwidth (1 GiB moved) and the cuBLAS bf16 rate at 8192³.
pub fn measure_ceilings(dev: &Device, timer: &mut GpuTimer) -> Result<Ceilings> {
    if !matches!(dev, Device::Cuda(_)) {
        // The emulator runs the benchmarks only in tests, for their rows: nominal ceilings.
        return Ok(Ceilings {
            copy_bytes_per_s: 1e12,
            bf16_flops_per_s: None,
        });
    }
    let half_gib = 1 << 29;
    let copy = time_copy(dev, timer, half_gib)?;
    let copy_bytes_per_s = 2.0 * half_gib as f64 / (copy.median_us * 1e-6);
    let s = 8192;
    let bf16_flops_per_s = time_cublas(dev, timer, s, s, s, WeightOp::Transposed)?
        .map(|t| 2.0 * (s as f64).powi(3) / (t.median_us * 1e-6));
    Ok(Ceilings {
        copy_bytes_per_s,
        bf16_flops_per_s,
    })
}

/// cuBLAS bf16 at the linear-layer shapes later families compare against (DESIGN.md §8):
/// recorded now so every kernel's baseline has a history.
pub fn cublas_rows(dev: &Device, timer: &mut GpuTimer, c: &Ceilings, out: &mut Rows) -> Result<()> {
    for (m, n, k, what) in [
        (8192, 8192, 8192, "square"),
        (8192, 4096, 4096, "LoRA base fwd"),
        (8192, 11008, 4096, "NF4 GEMM shape"),
        (8192, 4096, 11008, "NF4 dX shape"),
        (1, 11008, 4096, "GEMV"),
        (1, 4096, 11008, "GEMV"),
    ] {
        let Some(t) = time_cublas(dev, timer, m, n, k, WeightOp::Transposed)? else {
            break;
        };
        let bytes = 2.0 * (m * k + n * k + m * n) as f64;
        let flops = 2.0 * (m * n * k) as f64;
        out.push(Row::new(
            "baseline",
            "cublas_gemm_bf16",
            &format!("{m}x{k}→{n} ({what})"),
            &t,
            bytes,
            flops,
            c,
        ))?;
    }
    // What the timer reports for next to no work: the floor under every short row.
    let t = time_copy(dev, timer, 4096)?;
    out.push(Row::new(
        "baseline",
        "d2d copy (timer floor)",
        "4 KiB",
        &t,
        8192.0,
        0.0,
        c,
    ))?;
    // What L2 moves: a copy small enough to stay in L2 (8 MiB each way), 16 times back to
    // back, so all but the first read hit L2 (the wgmma GEMMs' likely limit, bench/NOTES.md).
    let (bytes, times) = (8 << 20, 16);
    let l2 = time_copies(dev, timer, bytes, times)?;
    out.push(Row::new(
        "baseline",
        "d2d copy, L2-resident (16 back to back)",
        "8 MiB",
        &l2,
        (2 * bytes * times) as f64,
        0.0,
        c,
    ))?;
    Ok(())
}
