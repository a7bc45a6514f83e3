//! Criterion benchmarks of the sparse-delta kernels on GPU 0: 1% of a 4096×11008 bf16
//! weight (DESIGN.md §8), through the public API.
//!
//!   cargo bench --bench sparse
//!
//! Each iteration launches the kernel and synchronizes the device, so the wall-clock times
//! include launch overhead and the synchronization (a few µs). For kernel-only times with
//! CUDA events, L2 flushed, floors and baselines, see `fk bench` (scripts/gpu-check.sh).
//! Without a GPU this prints why and exits successfully.

use criterion::{BenchmarkId, Criterion, Throughput};
use finetune_kernels::sparse::{self, AdamwConfig, ScatterPlan, SparseAdamw, SparseIndex};
use finetune_kernels::testing::{random_support, random_vec};
use finetune_kernels::{bf16, Device, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

const ROWS: u64 = 4096;
const COLS: u64 = 11008;

fn bench_sparse(c: &mut Criterion, dev: &Device) -> Result<()> {
    let numel = ROWS * COLS;
    let k = (numel / 100) as usize;
    let shape = format!("1% of {ROWS}x{COLS}");
    let mut rng = StdRng::seed_from_u64(0x5EED);

    let idx = random_support(&mut rng, numel, k);
    let mut w = dev.upload(&random_vec::<bf16>(&mut rng, numel as usize, 1.0))?;
    let values = dev.upload(&random_vec::<bf16>(&mut rng, k, 1e-3))?;
    let index = SparseIndex::sorted(dev, &idx, numel)?;
    // The planned path gets the same support in shuffled order.
    let mut shuffled = idx.clone();
    shuffled.shuffle(&mut rng);
    let plan = ScatterPlan::new(dev, &shuffled, numel)?;
    let mut gathered = dev.alloc_poisoned::<f32>(k)?;
    let grad = dev.upload(&random_vec::<bf16>(&mut rng, numel as usize, 1e-2))?;
    let mut adamw = SparseAdamw::new(
        &w,
        SparseIndex::sorted(dev, &idx, numel)?,
        AdamwConfig::default(),
    )?;
    dev.synchronize()?;

    let mut g = c.benchmark_group("sparse");
    g.throughput(Throughput::Elements(k as u64));
    // Each closure returns the launch's Result; `run` unwraps it and synchronizes.
    let run = |f: &mut dyn FnMut() -> Result<()>| {
        f().expect("launch");
        dev.synchronize().expect("synchronize");
    };
    g.bench_function(BenchmarkId::new("scatter_add_bf16_bf16", &shape), |b| {
        b.iter(|| run(&mut || sparse::scatter_add(&mut w, &index, &values, 0.5)))
    });
    g.bench_function(
        BenchmarkId::new("scatter_add_planned_bf16_bf16", &shape),
        |b| b.iter(|| run(&mut || sparse::scatter_add_planned(&mut w, &plan, &values, 0.5))),
    );
    g.bench_function(
        BenchmarkId::new("scatter_add_atomic_bf16_bf16", &shape),
        |b| b.iter(|| run(&mut || sparse::scatter_add_atomic(&mut w, &index, &values, 0.5))),
    );
    g.bench_function(BenchmarkId::new("gather_bf16_f32", &shape), |b| {
        b.iter(|| run(&mut || sparse::gather(&w, &index, &mut gathered)))
    });
    g.bench_function(BenchmarkId::new("sparse_adamw_step_bf16", &shape), |b| {
        b.iter(|| run(&mut || adamw.step(&mut w, &grad)))
    });
    g.finish();
    Ok(())
}

fn main() {
    let dev = match Device::cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("benches/sparse: skipped, no GPU: {e}");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = bench_sparse(&mut c, &dev) {
        eprintln!("benches/sparse: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}
