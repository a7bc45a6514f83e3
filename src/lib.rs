//! # finetune-kernels
//!
//! Hand-written CUDA kernels for memory-efficient LLM fine-tuning. Every kernel ships three
//! ways: a CPU reference ([`mod@reference`]), the same CUDA source run on the host, and the GPU
//! run from committed PTX through the CUDA driver ([`device`]).
//!
//! Families: [`lora`] (LoRA layers in PEFT's layout over a dense or NF4 base, fused forward
//! and backward: [`lora::LoraLinear`], and [`lora::raw`] on a framework's own memory),
//! [`sparse`] (sparse deltas), [`nf4`] (QLoRA's 4-bit base weights), [`philox`]
//! (counter-based random numbers: dropout masks). The register-dump kernels ([`regdump`]) record
//! tensor-core fragment layouts on real hardware for the emulator's tests.
//!
//! Checkpoints: [`nf4::checkpoint`] (safetensors files, NF4 weights in bitsandbytes' layout,
//! `fk quantize`), [`lora::adapter`] (PEFT's adapter files, `fk merge`) and [`shards`]
//! (checkpoints split into shards, for both).

#![warn(missing_docs)]

pub mod bench;
pub mod check;
pub mod device;
pub mod dtype;
pub mod error;
pub mod files;
pub mod lora;
pub mod nf4;
pub mod params;
pub mod philox;
pub mod reference;
pub mod regdump;
pub mod shards;
pub mod sparse;
pub mod testing;

pub use device::{Buffer, Device};
pub use dtype::{DType, Elem, FloatElem};
pub use error::{Error, NoDevice, Result};
pub use half::{bf16, f16};
