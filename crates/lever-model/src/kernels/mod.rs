//! lever's CPU kernels: the inference hot paths, one file per job.
//!
//! - [`quant_matmul`]: y = x·Wᵀ for GGUF Q4_1 and Q8_0 blocks, activations quantized to 8 bits
//!   first, each output in llama.cpp's lane order so that lever and llama.cpp round alike.
//! - [`packed`]: the same products on weights repacked 16 rows at a time for AVX-512 VNNI
//!   (`lever serve`: a batch of sequences costs little more than one; rounding differs).
//! - [`attention`]: causal attention over the host f16 KV cache with llama.cpp's arithmetic.
//! - [`swiglu`]: silu(g) ⊙ u in one parallel pass.
//! - [`bf16_gemm`]: the encoder's linear layers with bf16 inputs and f32 sums (AVX-512 BF16).
//! - [`pool`]: how work is split over the threads.
//!
//! The instruction set is chosen at run time ([`isa`]: AVX-512 VNNI, else AVX2, else portable
//! scalar code), so a build without `-C target-cpu=native` is as fast. Every kernel has a
//! portable version, and the tests hold each instruction set the CPU has to it.
//!
//! These files are where lever uses `unsafe`: SIMD intrinsics that load and store through raw
//! pointers, and output tiles written from several threads into one buffer (each element by
//! exactly one tile). Every `unsafe fn` states its contract under `# Safety`, and every
//! `unsafe` block says why that contract holds (`// SAFETY:`).

use std::sync::OnceLock;

pub(crate) mod attention;
pub mod bf16_gemm;
pub(crate) mod packed;
pub(crate) mod pool;
pub(crate) mod quant_matmul;
pub(crate) mod swiglu;

pub use attention::ATTN_TILE_Q;
pub(crate) use attention::{AttnDims, MAX_HEAD_DIM, attention, attention_rows};
pub(crate) use quant_matmul::{Q4_1_BYTES, Q8_0_BYTES, QK, matmul, supports};
pub(crate) use swiglu::silu_mul;

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// What this CPU supports.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Whether this CPU runs it (it is at most the best one detected): what the kernels assert
    /// before they call code compiled for an instruction set.
    pub(crate) fn runs_here(self) -> bool {
        static BEST: OnceLock<Isa> = OnceLock::new();
        self <= *BEST.get_or_init(Isa::detect)
    }

    /// Every instruction set this CPU can run, from the portable one up (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| *i <= best)
            .collect()
    }
}

/// The instruction set in use: the best one detected, or a lower one named by `LEVER_ISA`
/// (scalar, avx2) to measure the fallbacks.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::detect();
        match std::env::var("LEVER_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if best >= Isa::Avx2 => Isa::Avx2,
            _ => best,
        }
    })
}
