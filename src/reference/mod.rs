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
