//! CPU reference implementations: plain Rust, readable top to bottom. They are the oracle
//! every kernel is tested against, and the CPU backend of the training graph.
//!
//! Where a kernel promises bit-exact results, its reference performs the same f32
//! operations in the same order (kernels are built with `-fmad=false`, so neither side
//! fuses a multiply and an add unless it says so).

pub mod linear;
pub mod lora;
pub mod mufu;
pub mod nf4;
pub mod philox;
pub mod sparse;

/// A `[rows, cols]` matrix whose row `i` is `fill(i, row)`, on every core when the work
/// (`rows · cols · inner` multiply-adds) is large enough to pay for threads: each row is
/// computed as one thread would, so the result does not depend on the split. (At the GPU
/// check's realistic shapes a reference matmul takes seconds on one core.)
pub(crate) fn by_rows<T: Copy + Send>(
    rows: usize,
    cols: usize,
    inner: usize,
    zero: T,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![zero; rows * cols];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (rows.saturating_mul(cols).saturating_mul(inner) >> 24)
        .clamp(1, cores)
        .min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut((per * cols).max(1)).enumerate() {
            let fill = &fill;
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(cols.max(1)).enumerate() {
                    fill(c * per + i, row);
                }
            });
        }
    });
    out
}
