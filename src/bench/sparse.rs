//! Sparse-delta benchmarks for the GPU check: 1% of a 4096×11008 weight (DESIGN.md §8).
//! Bytes count 32-byte sectors for the scattered accesses.

use super::{Ceilings, GpuTimer, Row, Rows, REPS};
use crate::device::Device;
use crate::dtype::FloatElem;
use crate::error::Result;
use crate::sparse::{self, AdamwConfig, ScatterPlan, SparseAdamw, SparseIndex};
use crate::testing::{random_support, random_vec};
use crate::{bf16, Buffer};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

/// Distinct 32-byte sectors that elements `idx` of a `elem`-byte array touch.
fn sectors(idx: &[u64], elem: u64) -> f64 {
    let mut s: Vec<u64> = idx.iter().map(|&i| i * elem / 32).collect();
    s.sort_unstable();
    s.dedup();
    s.len() as f64
}

struct Setup<W: FloatElem> {
    w: Buffer<W>,
    idx: Vec<u64>,
    index: SparseIndex,
}

fn setup<W: FloatElem>(dev: &Device, rng: &mut StdRng, numel: u64, k: usize) -> Result<Setup<W>> {
    let idx = random_support(rng, numel, k);
    Ok(Setup {
        w: dev.upload(&random_vec::<W>(rng, numel as usize, 1.0))?,
        index: SparseIndex::sorted(dev, &idx, numel)?,
        idx,
    })
}

fn scatter_rows<W: FloatElem, V: FloatElem>(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    numel: u64,
    k: usize,
    shape: &str,
) -> Result<Vec<Row>> {
    let mut rng = StdRng::seed_from_u64(numel ^ k as u64);
    let mut s = setup::<W>(dev, &mut rng, numel, k)?;
    let v = dev.upload(&random_vec::<V>(&mut rng, k, 1.0))?;
    let (we, ve) = (
        std::mem::size_of::<W>() as u64,
        std::mem::size_of::<V>() as f64,
    );
    let bytes = k as f64 * (4.0 + ve) + 64.0 * sectors(&s.idx, we);
    let name = |op: &str| format!("{op}_{}_{}", W::DTYPE, V::DTYPE);
    let mut rows = Vec::new();

    let t = timer.time(3, REPS, || sparse::scatter_add(&mut s.w, &s.index, &v, 0.5))?;
    rows.push(
        Row::new("sparse", &name("scatter_add"), shape, &t, bytes, 0.0, c)
            .with_copy_baseline(dev, timer)?,
    );

    let t = timer.time(3, REPS, || {
        sparse::scatter_add_atomic(&mut s.w, &s.index, &v, 0.5)
    })?;
    rows.push(
        Row::new(
            "sparse",
            &name("scatter_add_atomic"),
            shape,
            &t,
            bytes,
            0.0,
            c,
        )
        .with_copy_baseline(dev, timer)?,
    );

    // The plan path on the same support given in shuffled order: it reads targets, starts
    // and order (12 bytes an element) in place of the indices (4).
    let mut shuffled = s.idx.clone();
    shuffled.shuffle(&mut rng);
    let plan = ScatterPlan::new(dev, &shuffled, numel)?;
    let plan_bytes = bytes + 8.0 * k as f64;
    let t = timer.time(3, REPS, || {
        sparse::scatter_add_planned(&mut s.w, &plan, &v, 0.5)
    })?;
    rows.push(
        Row::new(
            "sparse",
            &name("segmented_scatter_add"),
            shape,
            &t,
            plan_bytes,
            0.0,
            c,
        )
        .with_copy_baseline(dev, timer)?,
    );
    Ok(rows)
}

fn gather_row(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    numel: u64,
    k: usize,
    shape: &str,
) -> Result<Row> {
    let mut rng = StdRng::seed_from_u64(numel + 1);
    let s = setup::<bf16>(dev, &mut rng, numel, k)?;
    let mut out = dev.alloc_poisoned::<f32>(k)?;
    let bytes = k as f64 * (4.0 + 4.0) + 32.0 * sectors(&s.idx, 2);
    let t = timer.time(3, REPS, || sparse::gather(&s.w, &s.index, &mut out))?;
    Row::new("sparse", "gather_bf16_f32", shape, &t, bytes, 0.0, c).with_copy_baseline(dev, timer)
}

fn adamw_row<W: FloatElem>(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    numel: u64,
    k: usize,
    shape: &str,
) -> Result<Row> {
    let mut rng = StdRng::seed_from_u64(numel + 2);
    let Setup { mut w, idx, index } = setup::<W>(dev, &mut rng, numel, k)?;
    let grad = dev.upload(&random_vec::<W>(&mut rng, numel as usize, 0.1))?;
    let mut opt = SparseAdamw::new(&w, index, AdamwConfig::default())?;
    let we = std::mem::size_of::<W>() as u64;
    // idx + base read; delta, m, v read and written; grad sectors read; W sectors read+written.
    let bytes = k as f64 * (4.0 + 4.0 + 3.0 * 8.0) + 32.0 * sectors(&idx, we) * 3.0;
    let t = timer.time(3, REPS, || opt.step(&mut w, &grad))?;
    let name = format!("sparse_adamw_{}_{}", W::DTYPE, W::DTYPE);
    Row::new("sparse", &name, shape, &t, bytes, 0.0, c).with_copy_baseline(dev, timer)
}

/// All sparse rows at the DESIGN.md shape (1% of 4096×11008).
pub fn rows(dev: &Device, timer: &mut GpuTimer, c: &Ceilings, out: &mut Rows) -> Result<()> {
    let (rows, cols) = super::Scale::of(dev).sparse;
    let (numel, shape) = ((rows * cols) as u64, &format!("1% of {rows}x{cols}"));
    let k = (numel / 100) as usize;
    out.extend(scatter_rows::<bf16, bf16>(dev, timer, c, numel, k, shape)?)?;
    out.extend(scatter_rows::<bf16, f32>(dev, timer, c, numel, k, shape)?)?;
    out.extend(scatter_rows::<f32, f32>(dev, timer, c, numel, k, shape)?)?;
    out.push(gather_row(dev, timer, c, numel, k, shape)?)?;
    out.push(adamw_row::<bf16>(dev, timer, c, numel, k, shape)?)?;
    out.push(adamw_row::<f32>(dev, timer, c, numel, k, shape)?)
}
