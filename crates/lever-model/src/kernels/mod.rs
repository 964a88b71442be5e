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

/// Whether a linear layer should multiply by GGUF blocks of this type with lever's kernels
/// rather than candle's: every type [`supports`] takes but Q4_K, whose lane-order kernel is
/// correct (tests) but not yet faster than candle's (0.47–0.50× at 1 and 64 rows,
/// `timing_against_candle`). Q4_K runs on lever's packed kernel where the CPU has AVX-512
/// VNNI (a packed weight never asks this), on candle's elsewhere.
pub(crate) fn preferred(dtype: GgmlDType, k: usize) -> bool {
    supports(dtype, k) && dtype != GgmlDType::Q4K
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, random};
    use candle_core::quantized::{QMatMul, QTensor, gguf_file};
    use candle_core::{Device, Module, Tensor};
    use std::path::PathBuf;

    /// The Gemma 3 270M Q4_K_M file, when provisioned (a message otherwise).
    fn gemma_gguf() -> Option<PathBuf> {
        let home = crate::registry::lever_home();
        let entry = crate::registry::find(crate::registry::GEMMA3_270M)?;
        if !entry.is_provisioned(&home) {
            eprintln!("SKIPPED: {} is not provisioned", entry.name);
            return None;
        }
        let dir = entry.dir(&home);
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "gguf"))
    }

    fn read_tensors(path: &PathBuf, names: &[String]) -> Vec<(String, QTensor)> {
        let mut f = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        names
            .iter()
            .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
            .collect()
    }

    /// Which K-quant rows the kernels take: whole super-blocks only (Gemma's 640-wide inputs
    /// are not, which is why its Q4_K_M file holds Q5_0 there).
    #[test]
    fn supports_whole_blocks_only() {
        assert!(supports(GgmlDType::Q4K, 2048) && supports(GgmlDType::Q6K, 1024));
        assert!(!supports(GgmlDType::Q4K, 640) && !supports(GgmlDType::Q5K, 96));
        assert!(supports(GgmlDType::Q5_0, 640) && !supports(GgmlDType::Q5_0, 48));
        assert!(!supports(GgmlDType::Q4_0, 256) && !supports(GgmlDType::Q3K, 256));
    }

    /// Every matrix of two Gemma 3 270M layers (Q4_K, Q6_K, Q5_0, Q8_0 as the file holds them)
    /// through `matmul` equals the product with candle's dequantized weights within the 8-bit
    /// activations' error (2% of the largest output, as for Q4_1/Q8_0; measured up to 1.2%),
    /// and candle's own quantized matmul, which quantizes the activations alike, within 1e-5
    /// (measured below 4e-7).
    #[test]
    fn real_gemma_weights_match_the_dequantized_product() {
        let Some(path) = gemma_gguf() else { return };
        let names: Vec<String> = [0, 5]
            .iter()
            .flat_map(|l| {
                [
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ]
                .map(|t| format!("blk.{l}.{t}.weight"))
            })
            .collect();
        let mut seen = Vec::new();
        for (name, q) in read_tensors(&path, &names) {
            let (n, k) = q.shape().dims2().unwrap();
            let dtype = q.dtype();
            assert!(supports(dtype, k), "{name}: {dtype:?} with {k} columns");
            seen.push(dtype);
            let m = 3;
            let x = random(m * k, 17);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let exact = xt.matmul(&deq.t().unwrap()).unwrap();
            let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = matmul(dtype, &q.data().unwrap(), n, k, &x, m);
            let scale = exact.iter().fold(0f32, |a, e| a.max(e.abs()));
            let err = max_abs_diff(&y, &exact);
            assert!(err / scale < 0.02, "{name} {dtype:?}: {err} vs {scale}");
            let cand = QMatMul::from_qtensor(q).unwrap().forward(&xt).unwrap();
            let cand = cand.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err_c = max_abs_diff(&y, &cand);
            assert!(err_c / scale < 1e-5, "{name} vs candle: {err_c} vs {scale}");
            eprintln!(
                "{name} {dtype:?} {n}x{k}: rel err vs f32 {:.2e}, vs candle {:.2e}",
                err / scale,
                err_c / scale
            );
        }
        for t in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            assert!(seen.contains(&t), "no {t:?} matrix among {seen:?}");
        }
    }

    /// Timing, not a test of speed (`--ignored --nocapture`): lever's kernels against candle's
    /// QMatMul on the same weights, one token and 64 tokens, alternating, best of 5.
    #[test]
    #[ignore]
    fn timing_against_candle() {
        let mut cases: Vec<(String, QTensor)> = Vec::new();
        for (dtype, n, k) in [
            (GgmlDType::Q4K, 576, 1536),
            (GgmlDType::Q4K, 640, 2048),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q5K, 640, 2048),
        ] {
            let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            cases.push((format!("random {dtype:?} {n}x{k}"), q));
        }
        if let Some(path) = gemma_gguf() {
            let names = [
                "blk.0.ffn_up.weight",
                "blk.0.attn_output.weight",
                "blk.0.ffn_down.weight",
            ];
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            for (name, q) in read_tensors(&path, &names) {
                let (n, k) = q.shape().dims2().unwrap();
                cases.push((format!("gemma {name} {:?} {n}x{k}", q.dtype()), q));
            }
        }
        for (label, q) in cases {
            let (n, k) = q.shape().dims2().unwrap();
            let dtype = q.dtype();
            let data = q.data().unwrap().into_owned();
            let qm = QMatMul::from_qtensor(q).unwrap();
            for (m, iters) in [(1usize, 200u32), (64, 10)] {
                let x = random(m * k, 5);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let (mut best_l, mut best_c) = (f64::MAX, f64::MAX);
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(matmul(dtype, &data, n, k, &x, m));
                    }
                    best_l = best_l.min(t.elapsed().as_secs_f64() / iters as f64);
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(qm.forward(&xt).unwrap());
                    }
                    best_c = best_c.min(t.elapsed().as_secs_f64() / iters as f64);
                }
                eprintln!(
                    "{label} m={m}: lever {:.1} µs, candle {:.1} µs, candle/lever {:.2}",
                    best_l * 1e6,
                    best_c * 1e6,
                    best_c / best_l
                );
            }
        }
    }
}
