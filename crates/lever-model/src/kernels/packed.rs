//! Block-quantized weights repacked for AVX-512 VNNI: 16 rows interleaved, so that one 512-bit
//! `vpdpbusd` multiplies 4 values of each of 16 rows by the same 4 activations, and 8 of them
//! give 16 whole block dot products in the 16 lanes of one register — no horizontal sums.
//!
//! `quant_matmul.rs` computes one (row, token) pair per 256-bit register and follows llama.cpp's
//! lane arithmetic; it spends about five instructions per 32 multiply-adds and is compute-bound as
//! soon as several tokens share a pass over the weights (continuous batching: 8 sequences cost
//! almost 8 single steps). Here a 16-row × T-token tile costs 8 `vpdpbusd` + 4 float
//! instructions per block and token (64 multiply-adds per instruction), so extra tokens are
//! nearly free and a step reads the weights once. The same idea as llama.cpp's repacked
//! `block_q4_0x8` GEMV/GEMM kernels (`ggml-cpu/repack.cpp`), written here for Q4_1 and Q8_0.
//!
//! Arithmetic, per output (row r, token t), in block order b:
//!   acc = fma(d_w[r,b]·d_x[t,b], Σ q_w·q_x, acc);  Q4_1 also: mins = fma(m_w[r,b], s_x[t,b], mins)
//!   y = acc + mins
//! Every token count uses exactly this formula (a batched decoding step gives each sequence the
//! bits it gets alone), and `reference` computes it in scalar code for the tests. It differs from
//! llama.cpp's lane order only in float rounding.
//!
//! Layout, 16-row group g, block b (groups row-major, blocks contiguous inside a group):
//!   Q4_1 (320 bytes = 16 × 20): 4 × 64 bytes of nibbles — register p, lane j, byte i holds row
//!        j's value 8p+i in its low nibble and 8p+4+i in its high one — then d (16 × f16) and
//!        m (16 × f16).
//!   Q8_0 (608 bytes = 16 × 38): 8 × 64 bytes — register c, lane j holds row j's values 4c..4c+3
//!        (i8) — then d (16 × f16) and −128·Σq per row (16 × i32): the activations enter
//!        `vpdpbusd` as unsigned q+128, and the sum is corrected back.
//! Rows past n (the last group of a matrix whose rows are not a multiple of 16) are zero and
//! never stored.
#![allow(unsafe_code)]

use std::cell::RefCell;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::pool::{LARGE_M, SyncPtr, parallel};
use super::quant_matmul::{Q4_1_BYTES, Q8_0_BYTES, QK, QuantActs};
use super::{Isa, isa};

/// Rows per group: the 16 f32 lanes of a 512-bit register.
pub(crate) const GROUP: usize = 16;
const Q4_1_GROUP_BLOCK: usize = GROUP * 20;
const Q8_0_GROUP_BLOCK: usize = GROUP * 38;

/// A quantized n × k matrix in the interleaved layout above.
#[derive(Debug)]
pub(crate) struct Packed {
    dtype: GgmlDType,
    n: usize,
    nb: usize,
    data: Vec<u8>,
}

fn half_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

impl Packed {
    /// Repack GGUF blocks (`w`: n rows of k/32 blocks of `dtype`), or None where these kernels
    /// do not run (another block type, k not whole blocks, a CPU without AVX-512 VNNI, or
    /// `LEVER_ISA` asking for a lower instruction set).
    pub(crate) fn new(dtype: GgmlDType, w: &[u8], n: usize, k: usize) -> Option<Packed> {
        if isa() != Isa::Avx512Vnni
            || !k.is_multiple_of(QK)
            || !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
        {
            return None;
        }
        Some(Self::repack(dtype, w, n, k))
    }

    fn repack(dtype: GgmlDType, w: &[u8], n: usize, k: usize) -> Packed {
        let nb = k / QK;
        let groups = n.div_ceil(GROUP);
        match dtype {
            GgmlDType::Q4_1 => {
                let mut data = vec![0u8; groups * nb * Q4_1_GROUP_BLOCK];
                for r in 0..n {
                    let (g, j) = (r / GROUP, r % GROUP);
                    for b in 0..nb {
                        let src = &w[(r * nb + b) * Q4_1_BYTES..][..Q4_1_BYTES];
                        let dst = &mut data[(g * nb + b) * Q4_1_GROUP_BLOCK..][..Q4_1_GROUP_BLOCK];
                        let value = |e: usize| {
                            let q = src[4 + e % 16];
                            if e < 16 { q & 0x0F } else { q >> 4 }
                        };
                        for p in 0..4 {
                            for i in 0..4 {
                                dst[p * 64 + j * 4 + i] =
                                    value(8 * p + i) | (value(8 * p + 4 + i) << 4);
                            }
                        }
                        dst[256 + 2 * j..][..2].copy_from_slice(&src[0..2]);
                        dst[288 + 2 * j..][..2].copy_from_slice(&src[2..4]);
                    }
                }
                Packed { dtype, n, nb, data }
            }
            _ => {
                let mut data = vec![0u8; groups * nb * Q8_0_GROUP_BLOCK];
                for r in 0..n {
                    let (g, j) = (r / GROUP, r % GROUP);
                    for b in 0..nb {
                        let src = &w[(r * nb + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                        let dst = &mut data[(g * nb + b) * Q8_0_GROUP_BLOCK..][..Q8_0_GROUP_BLOCK];
                        for c in 0..8 {
                            dst[c * 64 + j * 4..][..4].copy_from_slice(&src[2 + 4 * c..][..4]);
                        }
                        dst[512 + 2 * j..][..2].copy_from_slice(&src[0..2]);
                        let sum: i32 = src[2..].iter().map(|&q| q as i8 as i32).sum();
                        dst[544 + 4 * j..][..4].copy_from_slice(&(-128 * sum).to_le_bytes());
                    }
                }
                Packed { dtype, n, nb, data }
            }
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    fn group_bytes(&self) -> usize {
        self.nb
            * match self.dtype {
                GgmlDType::Q4_1 => Q4_1_GROUP_BLOCK,
                _ => Q8_0_GROUP_BLOCK,
            }
    }

    /// y (m × n, row-major) = x (m × k) · Wᵀ; activations quantized as `kernels::matmul` does.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        ACTS.with(|acts| {
            let mut acts = acts.borrow_mut();
            let (ref mut q, ref mut unsigned) = *acts;
            q.quantize(Isa::Avx512Vnni, x, m, self.nb * QK);
            let mut y = vec![0f32; m * self.n];
            self.matmul_quantized(q, unsigned, &mut y);
            y
        })
    }

    /// y = acts · Wᵀ; `unsigned` is scratch for Q8_0's q+128 activations.
    pub(crate) fn matmul_quantized(&self, acts: &QuantActs, unsigned: &mut Vec<u8>, y: &mut [f32]) {
        assert_eq!(acts.nb, self.nb, "packed matmul: activation blocks");
        assert_eq!(y.len(), acts.rows * self.n, "packed matmul: output size");
        assert!(acts.qs.len() >= acts.rows * self.nb * QK && acts.d.len() >= acts.rows * self.nb);
        assert!(acts.s.len() >= acts.rows * self.nb);
        // `new` made this only on such a CPU; asserted again because `group` relies on it.
        assert!(Isa::Avx512Vnni.runs_here());
        let xs: &[u8] = match self.dtype {
            GgmlDType::Q4_1 => {
                // SAFETY: the same memory read as u8 instead of i8 (same size and alignment),
                // borrowed as long as `acts`.
                unsafe { std::slice::from_raw_parts(acts.qs.as_ptr() as *const u8, acts.qs.len()) }
            }
            _ => {
                unsigned.clear();
                unsigned.extend(acts.qs.iter().map(|&q| (q as u8) ^ 0x80));
                unsigned
            }
        };
        let groups = self.n.div_ceil(GROUP);
        let out = SyncPtr(y.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            let out = &out;
            for g in range {
                // SAFETY: the CPU has AVX-512 VNNI and `acts` holds rows × nb blocks (asserted
                // above), `xs` its rows × nb × 32 bytes, `y` rows × n floats; group g's columns
                // 16g..16g+16 of every token are written by this call only (each group once).
                unsafe { vnni::group(self, g, acts, xs, out.0) };
            }
        };
        if acts.rows * self.n * self.nb >= 1 << 12 {
            parallel(groups, acts.rows >= LARGE_M, run);
        } else {
            run(0..groups);
        }
    }

    /// The same arithmetic in scalar code, from the original GGUF blocks (for tests).
    #[cfg(test)]
    pub(crate) fn reference(dtype: GgmlDType, w: &[u8], n: usize, acts: &QuantActs) -> Vec<f32> {
        let nb = acts.nb;
        let mut y = vec![0f32; acts.rows * n];
        for t in 0..acts.rows {
            for r in 0..n {
                let (mut acc, mut mins) = (0f32, 0f32);
                for b in 0..nb {
                    let x = &acts.qs[(t * nb + b) * QK..][..QK];
                    let (xd, xs) = (acts.d[t * nb + b], acts.s[t * nb + b]);
                    match dtype {
                        GgmlDType::Q4_1 => {
                            let src = &w[(r * nb + b) * Q4_1_BYTES..][..Q4_1_BYTES];
                            let dot: i32 = (0..QK)
                                .map(|e| {
                                    let q = src[4 + e % 16];
                                    let v = if e < 16 { q & 0x0F } else { q >> 4 };
                                    v as i32 * x[e] as i32
                                })
                                .sum();
                            let (d, m) = (half_at(src, 0).to_f32(), half_at(src, 2).to_f32());
                            acc = (d * xd).mul_add(dot as f32, acc);
                            mins = m.mul_add(xs, mins);
                        }
                        _ => {
                            let src = &w[(r * nb + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                            let dot: i32 =
                                (0..QK).map(|e| src[2 + e] as i8 as i32 * x[e] as i32).sum();
                            acc = (half_at(src, 0).to_f32() * xd).mul_add(dot as f32, acc);
                        }
                    }
                }
                y[t * n + r] = acc + mins;
            }
        }
        y
    }
}

impl Packed {
    /// Row r's values in f32, as candle dequantizes GGUF blocks (Q4_1: q·d + m; Q8_0: q·d).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() == self.nb * QK, "packed row {r}");
        let (g, j) = (r / GROUP, r % GROUP);
        let gb = self.group_bytes();
        for b in 0..self.nb {
            let o = &mut out[b * QK..(b + 1) * QK];
            match self.dtype {
                GgmlDType::Q4_1 => {
                    let blk = &self.data[g * gb + b * Q4_1_GROUP_BLOCK..][..Q4_1_GROUP_BLOCK];
                    let d = half_at(blk, 256 + 2 * j).to_f32();
                    let m = half_at(blk, 288 + 2 * j).to_f32();
                    for p in 0..4 {
                        for i in 0..4 {
                            let q = blk[p * 64 + j * 4 + i];
                            o[8 * p + i] = (q & 0x0F) as f32 * d + m;
                            o[8 * p + 4 + i] = (q >> 4) as f32 * d + m;
                        }
                    }
                }
                _ => {
                    let blk = &self.data[g * gb + b * Q8_0_GROUP_BLOCK..][..Q8_0_GROUP_BLOCK];
                    let d = half_at(blk, 512 + 2 * j).to_f32();
                    for c in 0..8 {
                        for i in 0..4 {
                            o[4 * c + i] = blk[c * 64 + j * 4 + i] as i8 as f32 * d;
                        }
                    }
                }
            }
        }
    }

    /// The whole matrix in f32, n × k row-major (rows spread over rayon's threads: training
    /// with LoRA on a quantized base does this twice per step).
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let k = self.nb * QK;
        let mut out = vec![0f32; self.n * k];
        out.par_chunks_mut(k * GROUP)
            .enumerate()
            .for_each(|(g, rows)| {
                for (j, row) in rows.chunks_exact_mut(k).enumerate() {
                    self.dequantize_row(g * GROUP + j, row);
                }
            });
        out
    }

    /// The GGUF blocks again (for writing files and for candle's kernels).
    pub(crate) fn unpack(&self) -> Vec<u8> {
        let bytes = match self.dtype {
            GgmlDType::Q4_1 => Q4_1_BYTES,
            _ => Q8_0_BYTES,
        };
        let gb = self.group_bytes();
        let mut w = vec![0u8; self.n * self.nb * bytes];
        for r in 0..self.n {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..self.nb {
                let dst = &mut w[(r * self.nb + b) * bytes..][..bytes];
                match self.dtype {
                    GgmlDType::Q4_1 => {
                        let blk = &self.data[g * gb + b * Q4_1_GROUP_BLOCK..][..Q4_1_GROUP_BLOCK];
                        dst[0..2].copy_from_slice(&blk[256 + 2 * j..][..2]);
                        dst[2..4].copy_from_slice(&blk[288 + 2 * j..][..2]);
                        let mut v = [0u8; QK];
                        for p in 0..4 {
                            for i in 0..4 {
                                let q = blk[p * 64 + j * 4 + i];
                                v[8 * p + i] = q & 0x0F;
                                v[8 * p + 4 + i] = q >> 4;
                            }
                        }
                        for e in 0..16 {
                            dst[4 + e] = v[e] | (v[e + 16] << 4);
                        }
                    }
                    _ => {
                        let blk = &self.data[g * gb + b * Q8_0_GROUP_BLOCK..][..Q8_0_GROUP_BLOCK];
                        dst[0..2].copy_from_slice(&blk[512 + 2 * j..][..2]);
                        for c in 0..8 {
                            dst[2 + 4 * c..][..4].copy_from_slice(&blk[c * 64 + j * 4..][..4]);
                        }
                    }
                }
            }
        }
        w
    }

    pub(crate) fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// (n, k)
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.nb * QK)
    }
}

thread_local! {
    static ACTS: RefCell<(QuantActs, Vec<u8>)> = RefCell::new(Default::default());
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{GROUP, Packed, Q4_1_GROUP_BLOCK, Q8_0_GROUP_BLOCK};
    use crate::kernels::quant_matmul::{QK, QuantActs};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    /// Tokens per tile: accumulators for 4 tokens and the 8 weight registers fit the 32 zmm.
    const T: usize = 4;

    /// Every token × the 16 rows of group g.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, VNNI and BW; g < ⌈p.n / 16⌉; `acts` holds acts.rows tokens of
    /// p.nb blocks (qs, d, s) and `xs` acts.rows × p.nb × 32 bytes; `y` is valid for writes of
    /// acts.rows × p.n floats, and no other thread touches its columns 16g..16g+16 meanwhile.
    #[target_feature(enable = "avx512f,avx512vnni,avx512bw,f16c")]
    pub(super) unsafe fn group(p: &Packed, g: usize, acts: &QuantActs, xs: &[u8], y: *mut f32) {
        let m = acts.rows;
        let mut t0 = 0;
        // SAFETY: each tile gets tokens t0..t0+TT < m of group g: `tile`'s contract, from ours.
        unsafe {
            while t0 < m {
                match (m - t0).min(T) {
                    4 => tile::<4>(p, g, acts, xs, t0, y),
                    3 => tile::<3>(p, g, acts, xs, t0, y),
                    2 => tile::<2>(p, g, acts, xs, t0, y),
                    _ => tile::<1>(p, g, acts, xs, t0, y),
                }
                t0 += T;
            }
        }
    }

    /// Tokens t0..t0+TT × the rows of group g.
    ///
    /// # Safety
    /// As for [`group`], with t0 + TT ≤ acts.rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni,avx512bw,f16c")]
    unsafe fn tile<const TT: usize>(
        p: &Packed,
        g: usize,
        acts: &QuantActs,
        xs: &[u8],
        t0: usize,
        y: *mut f32,
    ) {
        let nb = p.nb;
        let q4 = p.dtype == GgmlDType::Q4_1;
        // SAFETY: group g < ⌈n / 16⌉ starts inside `p.data` (groups × group_bytes bytes).
        let base = unsafe { p.data.as_ptr().add(g * p.group_bytes()) };
        let mut acc = [_mm512_setzero_ps(); TT];
        let mut mins = [_mm512_setzero_ps(); TT];
        let x = xs.as_ptr();
        // SAFETY: block b < nb of group g lies in `p.data` (the loads read its 320 or 608
        // bytes); token t0 + t < acts.rows, so its 32 activation bytes in `xs` and its d and s
        // are in bounds; the masked store writes only columns r0..r0+keep (< n) of those tokens,
        // the ones the contract gives this call.
        unsafe {
            for b in 0..nb {
                let mut w = [_mm512_setzero_si512(); 8];
                let d;
                let mut corr = _mm512_setzero_si512();
                let mut mw = _mm512_setzero_ps();
                if q4 {
                    let blk = base.add(b * Q4_1_GROUP_BLOCK);
                    let mask = _mm512_set1_epi8(0x0F);
                    for i in 0..4 {
                        let z = _mm512_loadu_si512(blk.add(64 * i) as *const _);
                        w[2 * i] = _mm512_and_si512(z, mask);
                        w[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), mask);
                    }
                    d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256) as *const __m256i));
                    mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(288) as *const __m256i));
                } else {
                    let blk = base.add(b * Q8_0_GROUP_BLOCK);
                    for (i, wi) in w.iter_mut().enumerate() {
                        *wi = _mm512_loadu_si512(blk.add(64 * i) as *const _);
                    }
                    d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512) as *const __m256i));
                    corr = _mm512_loadu_si512(blk.add(544) as *const _);
                }
                for t in 0..TT {
                    let xi = (t0 + t) * nb + b;
                    let xa = x.add(xi * QK) as *const i32;
                    let at = |c: usize| _mm512_set1_epi32(xa.add(c).read_unaligned());
                    // Two chains for latency; integer sums are exact in any order.
                    let (mut s0, mut s1) = (corr, _mm512_setzero_si512());
                    if q4 {
                        // Weights unsigned (0..15), activations signed.
                        for c in (0..8).step_by(2) {
                            s0 = _mm512_dpbusd_epi32(s0, w[c], at(c));
                            s1 = _mm512_dpbusd_epi32(s1, w[c + 1], at(c + 1));
                        }
                    } else {
                        // Activations unsigned (q+128), weights signed.
                        for c in (0..8).step_by(2) {
                            s0 = _mm512_dpbusd_epi32(s0, at(c), w[c]);
                            s1 = _mm512_dpbusd_epi32(s1, at(c + 1), w[c + 1]);
                        }
                    }
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*acts.d.get_unchecked(xi)));
                    acc[t] = _mm512_fmadd_ps(scale, dot, acc[t]);
                    if q4 {
                        mins[t] =
                            _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts.s.get_unchecked(xi)), mins[t]);
                    }
                }
            }
            let r0 = g * GROUP;
            let keep = (p.n - r0).min(GROUP);
            let mask: __mmask16 = if keep == GROUP {
                0xFFFF
            } else {
                (1u16 << keep) - 1
            };
            for t in 0..TT {
                let v = _mm512_add_ps(acc[t], mins[t]);
                _mm512_mask_storeu_ps(y.add((t0 + t) * p.n + r0), mask, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod vnni {
    use super::Packed;
    use crate::kernels::quant_matmul::QuantActs;
    /// # Safety
    /// Never called: `Packed::new` returns None off x86-64.
    pub(super) unsafe fn group(_: &Packed, _: usize, _: &QuantActs, _: &[u8], _: *mut f32) {
        unreachable!("Packed::new returns None off x86-64")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, random};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Bit for bit the scalar formula, for every tile shape, remainder of tokens and of rows;
    /// and within the 8-bit activations' error of the dequantized product. Without AVX-512
    /// VNNI the packed kernels do not run (`Packed::new` declines, so the lane-order kernels
    /// take the products) and the scalar formula alone is held to the dequantized product.
    #[test]
    fn packed_matmul_equals_its_scalar_formula() {
        let vnni = isa() == Isa::Avx512Vnni;
        eprintln!(
            "packed kernels: {}",
            if vnni {
                "AVX-512 VNNI"
            } else {
                "not on this CPU"
            }
        );
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, k, n) in [
                (1, 64, 40),
                (5, 96, 37),
                (9, 32, 17),
                (4, 128, 64),
                (3, 576, 16),
            ] {
                let wt = Tensor::from_vec(random(n * k, 9), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&wt, dtype).unwrap();
                let bytes = q.data().unwrap();
                let x = random(m * k, 11);
                let mut acts = QuantActs::default();
                acts.quantize(Isa::Scalar, &x, m, k);
                let want = Packed::reference(dtype, &bytes, n, &acts);
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let exact = xt.matmul(&deq.t().unwrap()).unwrap();
                let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = exact.iter().fold(0f32, |a, e| a.max(e.abs()));
                let err = max_abs_diff(&want, &exact);
                assert!(
                    err / scale < 0.02,
                    "{dtype:?} {m}x{k}x{n} formula: {err} vs {scale}"
                );
                let Some(packed) = Packed::new(dtype, &bytes, n, k) else {
                    assert!(!vnni, "{dtype:?}: not packed on an AVX-512 VNNI CPU");
                    continue;
                };
                let got = packed.matmul(&x, m);
                assert_eq!(got, want, "{dtype:?} {m}x{k}x{n}");
                // Each token alone gets the bits it gets in the batch.
                for t in 0..m {
                    let alone = packed.matmul(&x[t * k..(t + 1) * k], 1);
                    assert_eq!(alone, got[t * n..(t + 1) * n], "{dtype:?} token {t}");
                }
            }
        }
    }

    /// The packed layout loses nothing: it unpacks to the same GGUF bytes and dequantizes to
    /// candle's values bit for bit (the layout code is portable: checked on every CPU); and
    /// the weight looks embedding rows up as candle does, packed where the CPU runs the packed
    /// kernels and in GGUF blocks elsewhere.
    #[test]
    fn packing_round_trips_and_dequantizes_as_candle() {
        let vnni = isa() == Isa::Avx512Vnni;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (37, 96);
            let wt = Tensor::from_vec(random(n * k, 5), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let packed = Packed::repack(dtype, &bytes, n, k);
            assert_eq!(packed.unpack(), bytes, "{dtype:?}");
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            assert_eq!(
                packed.dequantize(),
                want.to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
            let ids = Tensor::new(&[[3u32, 36, 0]], &Device::Cpu).unwrap();
            let w = crate::qweight::QWeight::packed_if_possible(q);
            assert_eq!(w.packed().is_some(), vnni, "{dtype:?}");
            let got = w.embedding(&ids).unwrap();
            assert_eq!(got.dims(), &[1, 3, k]);
            let rows = want.reshape((n, k)).unwrap();
            for (i, id) in [3usize, 36, 0].into_iter().enumerate() {
                assert_eq!(
                    got.get(0)
                        .unwrap()
                        .get(i)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    rows.get(id).unwrap().to_vec1::<f32>().unwrap()
                );
            }
            assert!(
                w.embedding(&Tensor::new(&[37u32], &Device::Cpu).unwrap())
                    .is_err()
            );
            let back = w.qtensor().unwrap();
            assert_eq!(back.data().unwrap().to_vec(), bytes);
        }
    }
}
