//! LoRA in PEFT's layout (DESIGN.md §6): adapters on disk ([`adapter`]).

pub mod adapter;
