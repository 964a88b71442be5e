//! lever's CPU kernels: the inference hot paths, one file per job.
//!
//! - [`quant_matmul`]: y = x·Wᵀ for GGUF Q4_1, Q5_0 and Q8_0 blocks, activations quantized to
//!   8 bits first, each output in llama.cpp's lane order so that lever and llama.cpp round alike.
//! - [`kquant`]: the same for the K-quant super-blocks (Q4_K, Q5_K, Q6_K) against Q8_K
//!   activations, exact integer sums per block.
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

use candle_core::quantized::GgmlDType;

pub(crate) mod attention;
pub mod bf16_gemm;
pub(crate) mod kquant;
pub(crate) mod packed;
pub(crate) mod pool;
pub(crate) mod quant_matmul;
pub(crate) mod swiglu;

pub use attention::ATTN_TILE_Q;
pub(crate) use attention::{AttnDims, MAX_HEAD_DIM, attention, attention_rows};
pub(crate) use quant_matmul::QK;
pub(crate) use swiglu::silu_mul;

/// Whether lever's kernels multiply an n × k weight of this block type (k whole blocks).
pub(crate) fn supports(dtype: GgmlDType, k: usize) -> bool {
    (quant_matmul::supports(dtype) && k.is_multiple_of(QK))
        || (kquant::supports(dtype) && k.is_multiple_of(kquant::QK_K))
}

/// y (m × n) = x (m × k) · Wᵀ for `w` the GGUF blocks of an n × k matrix of a type
/// [`supports`] takes, on the run-time instruction set and the shared thread pool.
pub(crate) fn matmul(
    dtype: GgmlDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    if kquant::supports(dtype) {
        kquant::matmul(dtype, w, n, k, x, m)
    } else {
        quant_matmul::matmul(dtype, w, n, k, x, m)
    }
}

/// Values per block and bytes per block of a type [`supports`] takes.
pub(crate) fn block_shape(dtype: GgmlDType) -> Option<(usize, usize)> {
    if kquant::supports(dtype) {
        Some((kquant::QK_K, kquant::block_bytes(dtype)))
    } else if quant_matmul::supports(dtype) {
        Some((QK, quant_matmul::block_bytes(dtype)))
    } else {
        None
    }
}

/// One block of a type [`supports`] takes as f32: the values candle's `to_float` gives.
pub(crate) fn dequantize_block(dtype: GgmlDType, blk: &[u8], out: &mut [f32]) {
    if kquant::supports(dtype) {
        return kquant::dequantize_block(dtype, blk, out);
    }
    let half = |i: usize| half::f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
    let d = half(0);
    match dtype {
        GgmlDType::Q4_1 => {
            let m = half(2);
            for (i, &q) in blk[4..20].iter().enumerate() {
                out[i] = (q & 0x0F) as f32 * d + m;
                out[i + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlDType::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for (j, &q) in blk[6..22].iter().enumerate() {
                let lo = (q & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                let hi = (q >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
                out[j] = (lo - 16) as f32 * d;
                out[j + 16] = (hi - 16) as f32 * d;
            }
        }
        _ => {
            for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

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
