//! Kernel-against-reference checks, shared by the test suite and `fk check`: each check
//! draws fresh random inputs from a seed, runs the kernel on a device, runs the reference
//! on the host and returns a [`CheckRow`]. Tests assert `row.pass`; `fk check` prints rows.

pub mod lora;
pub mod nf4;
pub mod sparse;

use crate::bench::GpuTimer;
use crate::device::Device;
use crate::error::Result;

/// How a result is compared with the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// Bit-exact: `error` counts mismatching elements and must be 0.
    Exact,
    /// `‖out − ref‖₂ / ‖ref‖₂` must be at most the bound.
    RelL2(f64),
    /// Each element within a bound of its own: `error` is the largest ratio of an element's
    /// error to its bound, and must be at most 1.
    PerElement,
}

/// One kernel run checked against its reference.
#[derive(Debug, Clone)]
pub struct CheckRow {
    /// The kernel checked, by its kernel name (e.g. `scatter_add_bf16_f32`).
    pub kernel: String,
    /// The backend it ran on: `cuda` or `emu`.
    pub backend: &'static str,
    /// The device's description (for the emulator: its schedule and seed, to replay).
    pub device: String,
    /// The case's shape, as the check describes it.
    pub shape: String,
    /// The seed the inputs were drawn from: the same seed replays the check.
    pub seed: u64,
    /// How `error` is judged.
    pub measure: Measure,
    /// The measured error: mismatching elements for [`Measure::Exact`], the relative L2
    /// error for [`Measure::RelL2`], the worst element's share of its bound for
    /// [`Measure::PerElement`].
    pub error: f64,
    /// Median kernel time on a GPU, when timing was asked for.
    pub time_us: Option<f64>,
}

impl CheckRow {
    /// Whether `error` is within what `measure` allows (a NaN error fails).
    pub fn pass(&self) -> bool {
        match self.measure {
            Measure::Exact => self.error == 0.0,
            Measure::RelL2(bound) => self.error <= bound,
            Measure::PerElement => self.error <= 1.0,
        }
    }
}

impl std::fmt::Display for CheckRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.pass() { "pass" } else { "FAIL" };
        let err = match self.measure {
            Measure::Exact => format!("{} mismatches (exact)", self.error),
            Measure::PerElement => format!("worst element {:.2} of its bound", self.error),
            Measure::RelL2(b) => format!("rel {:.2e} (bound {b:.0e})", self.error),
        };
        write!(
            f,
            "{} [{}] {} seed {}: {err}: {verdict} (on {})",
            self.kernel, self.backend, self.shape, self.seed, self.device
        )
    }
}

/// What a family's check case tells its rows: the seed to replay it and its shape.
pub(crate) trait CheckCase {
    fn seed(&self) -> u64;
    fn shape(&self) -> String;
}

/// The row for `kernel` run on `dev` for case `c`.
pub(crate) fn row(
    kernel: String,
    dev: &Device,
    c: &impl CheckCase,
    measure: Measure,
    error: f64,
    time_us: Option<f64>,
) -> CheckRow {
    CheckRow {
        kernel,
        backend: dev.backend(),
        device: dev.describe(),
        shape: c.shape(),
        seed: c.seed(),
        measure,
        error,
        time_us,
    }
}

/// Whether checks time their kernels (GPU only) and the sizes they use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Small odd shapes: every kernel entry once (the emulator, compute-sanitizer).
    Small,
    /// The shapes of DESIGN.md §8, timed (a GPU).
    Realistic,
}

/// Times `f` on a GPU (median of 5 after one warm-up); `None` elsewhere or when not asked.
/// Outputs are not poisoned while timed (checks turn that on): production skips the fill.
pub(crate) fn time_if(
    dev: &Device,
    timed: bool,
    f: impl FnMut() -> Result<()>,
) -> Result<Option<f64>> {
    match dev {
        Device::Cuda(d) if timed => {
            let poisoning = d.poison_outputs();
            d.set_poison_outputs(false);
            let t = GpuTimer::new(dev).and_then(|mut timer| timer.time(1, 5, f));
            d.set_poison_outputs(poisoning);
            Ok(Some(t?.median_us))
        }
        _ => Ok(None),
    }
}

/// Rows as the checks produce them, each handed to `on_row` as it comes: `fk check` prints
/// it at once, so that a check cut short (a timeout, a GPU fault) still reports what ran.
pub struct Report<'a> {
    rows: Vec<CheckRow>,
    on_row: &'a mut dyn FnMut(&CheckRow),
}

impl Report<'_> {
    /// Hands `row` to the callback, then keeps it.
    pub fn push(&mut self, row: CheckRow) {
        (self.on_row)(&row);
        self.rows.push(row);
    }

    /// [`Report::push`] for each row, in order.
    pub fn extend(&mut self, rows: impl IntoIterator<Item = CheckRow>) {
        for r in rows {
            self.push(r);
        }
    }
}

/// Every family's checks at `scale`, each row handed to `on_row` as it is checked: NF4 and
/// LoRA first (the GPU check gives `fk check` a time limit, and at realistic shapes the
/// sparse rows alone took a minute of host-side references on 45 M elements; in the runs of
/// 2026-11-27 the check reached no other family).
pub fn all(
    dev: &Device,
    scale: Scale,
    seed: u64,
    on_row: &mut dyn FnMut(&CheckRow),
) -> Result<Vec<CheckRow>> {
    let mut report = Report {
        rows: Vec::new(),
        on_row,
    };
    nf4::all(dev, scale, seed, &mut report)?;
    lora::all(dev, scale, seed, &mut report)?;
    nf4::wgmma(dev, scale, seed, &mut report)?;
    sparse::all(dev, scale, seed, &mut report)?;
    Ok(report.rows)
}

/// The width of `fk check`'s shape column: the longest shape a check prints.
const SHAPE_WIDTH: usize = 54;

/// `fk check`'s column headings.
pub fn header() -> String {
    format!(
        "{:<34} {:<5} {:<SHAPE_WIDTH$} {:>22} {:>10} {:>6}",
        "kernel", "on", "shape", "error", "time µs", "result"
    )
}

/// A row as `fk check` prints it, under [`header`].
pub fn line(r: &CheckRow) -> String {
    let err = match r.measure {
        Measure::Exact => format!("{} elements off", r.error),
        Measure::PerElement => format!("{:.2} of bound", r.error),
        Measure::RelL2(b) => format!("{:.1e} ≤ {b:.0e}", r.error),
    };
    let time = r.time_us.map_or("—".to_string(), |t| format!("{t:.2}"));
    let verdict = if r.pass() { "pass" } else { "FAIL" };
    format!(
        "{:<34} {:<5} {:<SHAPE_WIDTH$} {:>22} {:>10} {:>6}",
        r.kernel, r.backend, r.shape, err, time, verdict
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16;
    use crate::device::with_grid_cap;
    use crate::testing::backends;

    /// Every check at small shapes (sparse, NF4, LoRA: `fk check --small`) with each
    /// grid-stride launch capped at one block and at three, so that every thread of those
    /// loops takes several passes; and u and v split over K (the small checks' K takes one
    /// split), whose reduces are grid-stride too (131 tokens × rank 9: 1,179 elements, five
    /// passes of one block). Real launches take a second pass only past 2¹⁶ blocks, which no
    /// other test reaches. On the GPU and one emulator schedule: the other tests run every
    /// check under all three, and a block or three leave little for a schedule to reorder.
    #[test]
    fn every_check_passes_with_grid_stride_launches_capped() {
        let mut emulated = false;
        let devices = backends()
            .into_iter()
            .filter(|d| d.is_gpu() || !std::mem::replace(&mut emulated, true));
        for dev in devices {
            for cap in [1, 3] {
                let seed = rand::random();
                let rows = with_grid_cap(cap, || {
                    let mut rows = all(&dev, Scale::Small, seed, &mut |_| {})?;
                    for path in lora::paths(&dev) {
                        let c = lora::Case {
                            dropout: 0.1,
                            bias: true,
                            k_splits: Some(3),
                            path: Some(path),
                            ..lora::Case::new(seed, 131, 131, 45, 9)
                        };
                        rows.extend(lora::forward_and_backward::<bf16>(&dev, c)?);
                    }
                    Ok::<_, crate::Error>(rows)
                })
                .unwrap();
                let failed: Vec<String> = rows
                    .iter()
                    .filter(|r| !r.pass())
                    .map(|r| r.to_string())
                    .collect();
                assert!(
                    failed.is_empty(),
                    "with grids capped at {cap} blocks:\n{}",
                    failed.join("\n")
                );
            }
        }
    }
}
