//! lever's CPU kernels (being split by what they do).

mod quant_matmul;
pub use quant_matmul::*;

pub mod bf16_gemm;
pub mod packed;
