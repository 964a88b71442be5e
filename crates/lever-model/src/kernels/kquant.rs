//! CPU matrix multiplication for GGUF K-quant weights (Q4_K, Q5_K, Q6_K), lever's own.
//!
//! y = x · Wᵀ with W kept in its 256-value super-blocks and the activations quantized first as
//! llama.cpp does for these types (`block_q8_K`: per 256 values an f32 scale, 256 i8 values and
//! the sum of every 16; `quantize_row_q8_K_ref` in `ggml-quants.c`). The block layouts are
//! ggml's (`block_q4_K`, `block_q5_K`, `block_q6_K` in `ggml-common.h`, read in candle's
//! `quantized/k_quants.rs` too); the code here is lever's own.
//!
//! One decoding serves the three types: a super-block becomes 256 unsigned values q (0..15,
//! 0..31 or 0..63), an integer scale sc and an integer offset weight mn per 16 values, and two
//! floats d, dm, so that its dot product with a Q8_K block (values a, scale dx, sums of 16 bsum) is
//!
//!   dx · (d · Σ_g sc_g · Σ_{i∈g} q_i·a_i − dm · Σ_g mn_g · bsum_g)
//!
//! (Q4_K/Q5_K: sc, mn the 6-bit scale and min of each 32, d, dm = d, dmin; Q6_K: sc the i8 scale
//! of each 16, mn = 32·sc for the offset −32 of its values, dm = d). Both integer sums are exact
//! in i32. The portable kernel takes the float step above per block. The AVX2 kernel follows
//! the lane arithmetic of llama.cpp's `ggml_vec_dot_q4_K_q8_K` (`ggml-cpu/arch/x86/quants.c`,
//! also candle's `quantized/avx.rs`): the 8 i32 lanes of Σ sc·q·a (`vpmaddubsw`, `vpmaddwd`)
//! go to f32 and are accumulated as d·dx times them in 8 f32 lanes over the whole row, the
//! mins' term in 4 more (Q6_K subtracts its offset in the integers first), with one horizontal
//! sum per row instead of one per block; so the two kernels differ in float rounding only
//! (measured: under 6e-7 of the outputs' scale, see the tests).
//!
//! `unsafe`: the x86 kernel loads through raw pointers, and each strip of output rows is
//! written from its own thread into the one output buffer (see the `# Safety` sections).
#![allow(unsafe_code)]

use std::cell::RefCell;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::pool::{LARGE_M, SyncPtr, parallel};
use super::{Isa, isa};

/// Values per super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes of a Q4_K block: d, dmin (f16), 12 bytes of packed 6-bit scales and mins, 128 bytes
/// holding 256 4-bit values.
pub(crate) const Q4_K_BYTES: usize = 144;
/// Bytes of a Q5_K block: as Q4_K with 32 bytes of fifth bits before the 4-bit values.
pub(crate) const Q5_K_BYTES: usize = 176;
/// Bytes of a Q6_K block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 i8 scales, d (f16).
pub(crate) const Q6_K_BYTES: usize = 210;

/// Whether these kernels handle a weight type.
pub(crate) fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

/// Bytes of one super-block of a supported type.
pub(crate) fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4K => Q4_K_BYTES,
        GgmlDType::Q5K => Q5_K_BYTES,
        _ => Q6_K_BYTES,
    }
}

/// Rows of activations quantized to Q8_K: per super-block the values (i8), the scale d (f32)
/// and the sum of each 16 values.
#[derive(Debug, Default, Clone)]
pub(crate) struct ActsK {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) bsums: Vec<i16>,
    /// Super-blocks per row.
    pub(crate) nb: usize,
    pub(crate) rows: usize,
}

impl ActsK {
    /// Quantize `m` rows of `k` values (k a multiple of 256), reusing this buffer's memory.
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        debug_assert_eq!(x.len(), m * k);
        assert!(k.is_multiple_of(QK_K));
        let nb = k / QK_K;
        self.nb = nb;
        self.rows = m;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.bsums.resize(m * nb * 16, 0);
        let (qs, d, bs) = (
            SyncPtr(self.qs.as_mut_ptr()),
            SyncPtr(self.d.as_mut_ptr()),
            SyncPtr(self.bsums.as_mut_ptr()),
        );
        let rows = |range: std::ops::Range<usize>| {
            let (qs, d, bs) = (&qs, &d, &bs);
            for r in range {
                // SAFETY: rows are disjoint, each is written by one call only, and the
                // buffers were sized above for m rows.
                let (qr, dr, br) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qs.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(d.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(bs.0.add(r * nb * 16), nb * 16),
                    )
                };
                for b in 0..nb {
                    dr[b] = quantize_block(
                        &x[r * k + b * QK_K..r * k + (b + 1) * QK_K],
                        &mut qr[b * QK_K..(b + 1) * QK_K],
                        &mut br[b * 16..(b + 1) * 16],
                    );
                }
            }
        };
        if m * k >= 1 << 15 {
            parallel(m, m >= LARGE_M, rows);
        } else {
            rows(0..m);
        }
    }
}

/// Round half to even through the float adder, as llama.cpp's `nearest_int` (|v| < 2²²):
/// `f32::round_ties_even` is a library call without SSE4.1 enabled at build time, and was
/// half the time of a single-token product.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let f = v + 12_582_912.0; // 1.5 · 2²³: the integer lands in the low mantissa bits.
    (f.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One Q8_K block as llama.cpp makes it: the value of largest magnitude maps to −127,
/// q = min(127, round-half-even(x·(−127/max))), d = 1/(−127/max); all zeros for a zero block.
fn quantize_block(x: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        qs.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, g) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    1.0 / iscale
}

/// The scales of one super-block, per 16 values (see the module comment).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scales {
    pub(crate) sc: [i16; 16],
    pub(crate) mn: [i16; 16],
    pub(crate) d: f32,
    pub(crate) dm: f32,
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min j (0..8) of the 12 packed bytes of Q4_K/Q5_K: six bits each, the first four
/// whole in bytes 0..8, the last four split between the low/high nibbles of bytes 8..12 and
/// the top two bits of bytes 0..8 (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The eight (scale, min) pairs of a Q4_K/Q5_K block, 6 bits each.
pub(crate) fn scales_raw(blk: &[u8]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| scale_min(j, &blk[4..16]))
}

/// The scales of a block of a supported type.
pub(crate) fn scales(dtype: GgmlDType, blk: &[u8]) -> Scales {
    let (mut sc, mut mn) = ([0i16; 16], [0i16; 16]);
    if dtype == GgmlDType::Q6K {
        for g in 0..16 {
            sc[g] = blk[192 + g] as i8 as i16;
            mn[g] = 32 * sc[g];
        }
        let d = half_at(blk, 208);
        Scales { sc, mn, d, dm: d }
    } else {
        for j in 0..8 {
            let (s, m) = scale_min(j, &blk[4..16]);
            sc[2 * j] = s as i16;
            sc[2 * j + 1] = s as i16;
            mn[2 * j] = m as i16;
            mn[2 * j + 1] = m as i16;
        }
        Scales {
            sc,
            mn,
            d: half_at(blk, 0),
            dm: half_at(blk, 2),
        }
    }
}

/// The 256 unsigned values of a block, in element order.
///
/// Q4_K: each 64 values are 32 bytes, low nibbles first. Q5_K: the same, plus bit 2j (first
/// 32) or 2j+1 (second 32) of qh[l] for value l of the j-th 64 as the fifth bit. Q6_K: each
/// 128 values take 64 bytes of ql (values l and l+64 from the low/high nibble of ql[l], l+32
/// and l+96 from ql[l+32]) and 32 of qh (two bits each, in that order).
pub(crate) fn decode(dtype: GgmlDType, blk: &[u8], out: &mut [u8; QK_K]) {
    match dtype {
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let five = dtype == GgmlDType::Q5K;
            let qs = if five { &blk[48..176] } else { &blk[16..144] };
            for j in 0..4 {
                for l in 0..32 {
                    let (mut lo, mut hi) = (qs[32 * j + l] & 0x0F, qs[32 * j + l] >> 4);
                    if five {
                        let h = blk[16 + l];
                        lo |= ((h >> (2 * j)) & 1) << 4;
                        hi |= ((h >> (2 * j + 1)) & 1) << 4;
                    }
                    out[64 * j + l] = lo;
                    out[64 * j + 32 + l] = hi;
                }
            }
        }
        _ => {
            for n in 0..2 {
                for l in 0..32 {
                    let h = blk[128 + 32 * n + l];
                    let (a, b) = (blk[64 * n + l], blk[64 * n + 32 + l]);
                    out[128 * n + l] = (a & 0x0F) | ((h & 3) << 4);
                    out[128 * n + 32 + l] = (b & 0x0F) | (((h >> 2) & 3) << 4);
                    out[128 * n + 64 + l] = (a >> 4) | (((h >> 4) & 3) << 4);
                    out[128 * n + 96 + l] = (b >> 4) | (((h >> 6) & 3) << 4);
                }
            }
        }
    }
}

/// One super-block as f32, the values candle's `to_float` gives (same operations).
pub(crate) fn dequantize_block(dtype: GgmlDType, blk: &[u8], out: &mut [f32]) {
    let mut q = [0u8; QK_K];
    decode(dtype, blk, &mut q);
    let s = scales(dtype, blk);
    if dtype == GgmlDType::Q6K {
        for (i, (o, &v)) in out.iter_mut().zip(&q).enumerate() {
            *o = s.d * s.sc[i / 16] as f32 * (v as i32 - 32) as f32;
        }
    } else {
        for (i, (o, &v)) in out.iter_mut().zip(&q).enumerate() {
            let (d1, m1) = (s.d * s.sc[i / 16] as f32, s.dm * s.mn[i / 16] as f32);
            *o = d1 * v as f32 - m1;
        }
    }
}

/// The f32 step of one block's dot product, the same on every instruction set.
#[inline(always)]
fn block_sum(dx: f32, d: f32, dm: f32, sumi: i32, summ: i32) -> f32 {
    dx * (d * sumi as f32 - dm * summ as f32)
}

thread_local! {
    static ACTS: RefCell<ActsK> = RefCell::new(ActsK::default());
}

/// y (m × n, row-major) = x (m × k) · Wᵀ, where `w` holds the GGUF super-blocks of an n × k
/// matrix of type `dtype` (Q4_K, Q5_K or Q6_K; k a multiple of 256). Uses the run-time
/// instruction set and the shared thread pool.
pub(crate) fn matmul(
    dtype: GgmlDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let isa = isa();
    ACTS.with(|acts| {
        let mut acts = acts.borrow_mut();
        acts.quantize(x, m, k);
        let mut y = vec![0f32; m * n];
        matmul_quantized(isa, dtype, w, n, &acts, &mut y);
        y
    })
}

/// Rows of W per work item.
const STRIP: usize = 16;
/// Tokens per pass over a row: each block is decoded once for this many tokens.
const TT: usize = 8;

/// y (rows × n) = acts · Wᵀ with the activations already quantized.
pub(crate) fn matmul_quantized(
    isa: Isa,
    dtype: GgmlDType,
    w: &[u8],
    n: usize,
    acts: &ActsK,
    y: &mut [f32],
) {
    let (m, nb) = (acts.rows, acts.nb);
    let row_bytes = nb * block_bytes(dtype);
    assert!(supports(dtype), "kernels::kquant called for {dtype:?}");
    assert!(w.len() >= n * row_bytes, "weight buffer too small");
    assert_eq!(y.len(), m * n);
    assert!(acts.qs.len() >= m * nb * QK_K && acts.d.len() >= m * nb);
    assert!(acts.bsums.len() >= m * nb * 16);
    assert!(isa.runs_here(), "{isa:?} on a CPU without it");
    let out = SyncPtr(y.as_mut_ptr());
    let strips = n.div_ceil(STRIP);
    let run = |range: std::ops::Range<usize>| {
        let out = &out;
        for strip in range {
            let r0 = strip * STRIP;
            let r1 = (r0 + STRIP).min(n);
            for r in r0..r1 {
                let row = &w[r * row_bytes..(r + 1) * row_bytes];
                let mut t0 = 0;
                while t0 < m {
                    let tt = TT.min(m - t0);
                    let mut acc = [0f32; TT];
                    row_dots(isa, dtype, row, acts, t0, &mut acc[..tt]);
                    for (t, v) in acc[..tt].iter().enumerate() {
                        // SAFETY: column r belongs to this strip only, every strip is run
                        // once, and (t0 + t, r) lies inside the m × n output (asserted).
                        unsafe { *out.0.add((t0 + t) * n + r) = *v };
                    }
                    t0 += tt;
                }
            }
        }
    };
    if m * n * nb >= 1 << 9 {
        parallel(strips, m >= LARGE_M, run);
    } else {
        run(0..strips);
    }
}

/// acc[t] = row · token t0 + t, for the tokens acc covers.
fn row_dots(isa: Isa, dtype: GgmlDType, row: &[u8], acts: &ActsK, t0: usize, acc: &mut [f32]) {
    let bb = block_bytes(dtype);
    let nb = acts.nb;
    assert!(row.len() >= nb * bb && (t0 + acc.len()) <= acts.rows);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        assert!(isa.runs_here());
        // SAFETY: the CPU runs AVX2, FMA and F16C (every `Isa` from Avx2 up has them:
        // asserted), the row holds nb whole blocks of `dtype`, and tokens t0..t0+acc.len()
        // are rows of `acts` (asserted above).
        unsafe { avx2::row_dots(dtype, row, acts, t0, acc) };
        return;
    }
    let _ = isa;
    let mut q = [0u8; QK_K];
    for (b, blk) in row.chunks_exact(bb).take(nb).enumerate() {
        decode(dtype, blk, &mut q);
        let s = scales(dtype, blk);
        for (t, a) in acc.iter_mut().enumerate() {
            let xi = (t0 + t) * nb + b;
            let xq = &acts.qs[xi * QK_K..(xi + 1) * QK_K];
            let bs = &acts.bsums[xi * 16..(xi + 1) * 16];
            let mut sumi = 0i32;
            for g in 0..16 {
                let gi: i32 = q[16 * g..16 * g + 16]
                    .iter()
                    .zip(&xq[16 * g..16 * g + 16])
                    .map(|(&w, &x)| w as i32 * x as i32)
                    .sum();
                sumi += s.sc[g] as i32 * gi;
            }
            let summ: i32 =
                s.mn.iter()
                    .zip(bs)
                    .map(|(&m, &b)| m as i32 * b as i32)
                    .sum();
            *a += block_sum(acts.d[xi], s.d, s.dm, sumi, summ);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActsK, QK_K};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    /// Sum of the 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum_ps(x: __m256) -> f32 {
        hsum4_ps(_mm_add_ps(
            _mm256_extractf128_ps(x, 1),
            _mm256_castps256_ps128(x),
        ))
    }

    /// Sum of the 4 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum4_ps(r: __m128) -> f32 {
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// A `vpshufb` pattern that puts i16 lane j (of each 128-bit half) in every i16 lane.
    #[inline(always)]
    fn pick(j: usize) -> i16 {
        (0x0100 + 0x0202 * j) as i16
    }

    /// Bytes per block of each kind: 0 Q4_K, 1 Q5_K, 2 Q6_K.
    const BYTES: [usize; 3] = [super::Q4_K_BYTES, super::Q5_K_BYTES, super::Q6_K_BYTES];

    /// Values 32i..32i+32 of the block at p as unsigned bytes (see `decode`).
    ///
    /// # Safety
    /// The CPU runs AVX2; `p` points to a readable block of kind K; i < 8.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_reg<const K: usize>(p: *const u8, i: usize) -> __m256i {
        // SAFETY: every load reads 32 bytes inside the block: Q4_K 16 + 32j + 32 ≤ 144, Q5_K
        // 48 + 32j + 32 ≤ 176 and qh at 16..48, Q6_K ql at 64n..64n + 64 and qh at
        // 128 + 32n..+32 ≤ 192 (j = i/2 < 4, n = i/4 < 2).
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            if K < 2 {
                let qs = if K == 1 { p.add(48) } else { p.add(16) };
                let v = _mm256_loadu_si256(qs.add(32 * (i / 2)) as *const __m256i);
                let v = if i.is_multiple_of(2) {
                    v
                } else {
                    _mm256_srli_epi16(v, 4)
                };
                let v = _mm256_and_si256(v, m4);
                if K == 0 {
                    return v;
                }
                // Bit i of each qh byte, moved to bit 4. The 16-bit shift brings bits of the
                // neighbouring byte along; the mask drops them.
                let h = _mm256_loadu_si256(p.add(16) as *const __m256i);
                let bit = _mm256_and_si256(
                    _mm256_srl_epi16(h, _mm_cvtsi32_si128(i as i32)),
                    _mm256_set1_epi8(1),
                );
                _mm256_or_si256(v, _mm256_slli_epi16(bit, 4))
            } else {
                let (n, r) = (i / 4, i % 4);
                let m2 = _mm256_set1_epi8(0x30);
                let lo = _mm256_loadu_si256(p.add(64 * n + 32 * (r % 2)) as *const __m256i);
                let h = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                // Nibble r/2 of the ql byte, the qh bits 2r..2r+1 at bits 4..5.
                let lo = if r < 2 { lo } else { _mm256_srli_epi16(lo, 4) };
                let hb = match r {
                    0 => _mm256_slli_epi16(h, 4),
                    1 => _mm256_slli_epi16(h, 2),
                    2 => h,
                    _ => _mm256_srli_epi16(h, 2),
                };
                _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(hb, m2))
            }
        }
    }

    /// sums[t] += the i32 products of values 32I..32I+32 of block b (at p) with token
    /// t0 + t, each 16 times its scale (from lo8/hi8, see `row_dots_k`).
    ///
    /// # Safety
    /// The CPU runs AVX2; `p` points to a readable block of kind K; tokens t0..t0 + T are
    /// rows of `acts` and b < acts.nb.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reg_step<const K: usize, const T: usize, const I: usize>(
        (p, lo8, hi8, t0, b): (*const u8, __m256i, __m256i, usize, usize),
        acts: &ActsK,
        sums: &mut [__m256i; T],
    ) {
        // SAFETY: the decode contract is ours; the loads read 32 of the 256 values of
        // activation block xi < acts.rows · nb.
        unsafe {
            let q = decode_reg::<K>(p, I);
            let sv = if K < 2 {
                _mm256_shuffle_epi8(lo8, _mm256_set1_epi16(pick(I)))
            } else {
                let (src, j) = if I < 4 {
                    (lo8, 2 * I)
                } else {
                    (hi8, 2 * I - 8)
                };
                let mask = _mm256_set_m128i(_mm_set1_epi16(pick(j + 1)), _mm_set1_epi16(pick(j)));
                _mm256_shuffle_epi8(src, mask)
            };
            let nb = acts.nb;
            for (t, sum) in sums.iter_mut().enumerate() {
                let xi = (t0 + t) * nb + b;
                let x =
                    _mm256_loadu_si256(acts.qs.as_ptr().add(xi * QK_K + 32 * I) as *const __m256i);
                // u8 · i8 pairs in i16 (at most 2·63·127, no saturation), then each 16
                // values' pairs times their scale, in i32.
                let pr = _mm256_maddubs_epi16(q, x);
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pr, sv));
            }
        }
    }

    /// acc[t] = the row at `row` (acts.nb blocks of kind K) · token t0 + t, for T tokens;
    /// each 32 weights are decoded once and meet the T tokens while in a register.
    ///
    /// # Safety
    /// The CPU runs AVX2, FMA and F16C; `row` points to acts.nb readable blocks of kind K;
    /// tokens t0..t0 + T are rows of `acts`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dots_k<const K: usize, const T: usize>(
        row: *const u8,
        acts: &ActsK,
        t0: usize,
        acc: &mut [f32; T],
    ) {
        // SAFETY: block b < nb of the row is readable (the contract); the activation loads
        // read 256 values and 16 sums of block xi < acts.rows · nb, inside the buffers (sized
        // by `quantize`); the prefetch address is formed with `wrapping_add` (a prefetch never
        // faults).
        unsafe {
            let nb = acts.nb;
            let bb = BYTES[K];
            // Per token, the f32 lanes of the block sums (d·dx times the i32 lanes) and of the
            // mins' terms (dm·dx times theirs), summed across lanes once at the end of the row.
            let mut accv = [_mm256_setzero_ps(); T];
            let mut accm = [_mm_setzero_ps(); T];
            for b in 0..nb {
                let p = row.add(b * bb);
                if T == 1 {
                    // One token: the weights stream through once; fetch 4 rows ahead.
                    for off in (0..bb).step_by(64) {
                        _mm_prefetch(p.wrapping_add(4 * nb * bb + off) as *const i8, _MM_HINT_T0);
                    }
                }
                // The i16 scales (Q4_K/Q5_K: per 32, both halves alike; Q6_K: per 16, the
                // first 8 and the last 8 each in both halves), the offsets' weights (mn8:
                // Q4_K/Q5_K mins per 32, s16: Q6_K scales per 16), d and dm.
                let (d, dm, mn8, s16, lo8, hi8);
                if K < 2 {
                    let word = |o: usize| (p.add(4 + o) as *const u32).read_unaligned();
                    let (a0, a1, a2) = (word(0), word(4), word(8));
                    let sc_lo = a0 & 0x3f3f_3f3f;
                    let mn_lo = a1 & 0x3f3f_3f3f;
                    let sc_hi = (a2 & 0x0f0f_0f0f) | (((a0 >> 6) & 0x0303_0303) << 4);
                    let mn_hi = ((a2 >> 4) & 0x0f0f_0f0f) | (((a1 >> 6) & 0x0303_0303) << 4);
                    let sc8 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sc_hi as i32, sc_lo as i32));
                    mn8 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, mn_hi as i32, mn_lo as i32));
                    let both = _mm256_broadcastsi128_si256(sc8);
                    let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    d = _mm_cvtss_f32(dd);
                    dm = _mm_cvtss_f32(_mm_movehdup_ps(dd));
                    (s16, lo8, hi8) = (_mm256_setzero_si256(), both, both);
                } else {
                    s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
                    lo8 = _mm256_permute2x128_si256(s16, s16, 0x00);
                    hi8 = _mm256_permute2x128_si256(s16, s16, 0x11);
                    let h = (p.add(208) as *const u16).read_unaligned() as i32;
                    d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
                    dm = d;
                    mn8 = _mm_setzero_si128();
                }
                let mut sums = [_mm256_setzero_si256(); T];
                // The 8 registers spelled out, so that each one's layout is constant.
                let regs = (p, lo8, hi8, t0, b);
                reg_step::<K, T, 0>(regs, acts, &mut sums);
                reg_step::<K, T, 1>(regs, acts, &mut sums);
                reg_step::<K, T, 2>(regs, acts, &mut sums);
                reg_step::<K, T, 3>(regs, acts, &mut sums);
                reg_step::<K, T, 4>(regs, acts, &mut sums);
                reg_step::<K, T, 5>(regs, acts, &mut sums);
                reg_step::<K, T, 6>(regs, acts, &mut sums);
                reg_step::<K, T, 7>(regs, acts, &mut sums);
                for (t, sum) in sums.iter().enumerate() {
                    let xi = (t0 + t) * nb + b;
                    let dx = *acts.d.get_unchecked(xi);
                    let bs = _mm256_loadu_si256(acts.bsums.as_ptr().add(xi * 16) as *const __m256i);
                    if K < 2 {
                        // The mins' term per 32: pairs of sums of 16 against the 8 mins.
                        let pairs = _mm_hadd_epi16(
                            _mm256_castsi256_si128(bs),
                            _mm256_extracti128_si256(bs, 1),
                        );
                        let summ = _mm_cvtepi32_ps(_mm_madd_epi16(pairs, mn8));
                        accm[t] = _mm_fmadd_ps(_mm_set1_ps(dm * dx), summ, accm[t]);
                        let sumi = _mm256_cvtepi32_ps(*sum);
                        accv[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), sumi, accv[t]);
                    } else {
                        // Q6_K: dm = d, so the offset −32 comes off in integers (exact).
                        let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, s16), 5);
                        let sumi = _mm256_cvtepi32_ps(_mm256_sub_epi32(*sum, off));
                        accv[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), sumi, accv[t]);
                    }
                }
            }
            for (t, a) in acc.iter_mut().enumerate() {
                *a += hsum_ps(accv[t]) - hsum4_ps(accm[t]);
            }
        }
    }

    /// acc[t] = the row (acts.nb blocks of `dtype`) · token t0 + t: 8 tokens at a time,
    /// the rest one by one.
    ///
    /// # Safety
    /// The CPU runs AVX2, FMA and F16C; `row` holds acts.nb whole blocks of `dtype`; tokens
    /// t0..t0 + acc.len() are rows of `acts`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dots(
        dtype: GgmlDType,
        row: &[u8],
        acts: &ActsK,
        t0: usize,
        acc: &mut [f32],
    ) {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn kind<const K: usize>(row: *const u8, acts: &ActsK, t0: usize, acc: &mut [f32]) {
            // SAFETY: the contract is `row_dots_k`'s: tokens t0 + c·8 + (0..8) and
            // t0 + i lie inside t0..t0 + acc.len().
            unsafe {
                let mut chunks = acc.chunks_exact_mut(8);
                let mut t = t0;
                for c in &mut chunks {
                    let c: &mut [f32; 8] = c.try_into().unwrap_unchecked();
                    row_dots_k::<K, 8>(row, acts, t, c);
                    t += 8;
                }
                for a in chunks.into_remainder() {
                    let mut one = [*a];
                    row_dots_k::<K, 1>(row, acts, t, &mut one);
                    *a = one[0];
                    t += 1;
                }
            }
        }
        // SAFETY: the contract is `kind`'s, with the kind matching `dtype`.
        unsafe {
            match dtype {
                GgmlDType::Q4K => kind::<0>(row.as_ptr(), acts, t0, acc),
                GgmlDType::Q5K => kind::<1>(row.as_ptr(), acts, t0, acc),
                _ => kind::<2>(row.as_ptr(), acts, t0, acc),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, random};
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    const TYPES: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for v in [
            -127.0f32, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 3.7, 126.5, 127.0,
        ] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        for v in random(10_000, 8) {
            let v = v * 60.0;
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    /// Q8_K activations follow llama.cpp's rules: the largest magnitude maps to −127, the
    /// sums of 16 are the values', a zero block is all zeros.
    #[test]
    fn activation_quantization_follows_llama_cpp() {
        let mut x = random(3 * QK_K, 5);
        x[2 * QK_K..].iter_mut().for_each(|v| *v = 0.0);
        let mut a = ActsK::default();
        a.quantize(&x, 1, 3 * QK_K);
        let (i, &max) = x[..QK_K]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert_eq!(a.qs[i], -127);
        assert_eq!(a.d[0], 1.0 / (-127.0 / max));
        for (g, s) in a.bsums[..32].iter().enumerate() {
            let want: i16 = a.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
            assert_eq!(*s, want);
        }
        let err = x[..QK_K]
            .iter()
            .zip(&a.qs[..QK_K])
            .map(|(v, &q)| (v - q as f32 * a.d[0]).abs())
            .fold(0f32, f32::max);
        assert!(err <= a.d[0].abs() / 2.0 * 1.0001, "{err}");
        assert_eq!(a.d[2], 0.0);
        assert!(a.qs[2 * QK_K..].iter().all(|&q| q == 0));
    }

    /// Against candle's dequantized weights in f32 and candle's own quantized matmul, single
    /// tokens and batches (odd sizes, remainders of the token passes and of the strips), every
    /// instruction set; the portable and SIMD kernels agree to float rounding.
    #[test]
    fn matmul_matches_the_dequantized_product() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            for (m, k, n) in [
                (1, 256, 40),
                (5, 512, 37),
                (9, 256, 17),
                (1, 768, 33),
                (13, 512, 16),
            ] {
                let wt = Tensor::from_vec(random(n * k, 9), (n, k), &dev).unwrap();
                let q = QTensor::quantize(&wt, dtype).unwrap();
                let deq = q.dequantize(&dev).unwrap();
                let x = random(m * k, 11);
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let exact = xt.matmul(&deq.t().unwrap()).unwrap();
                let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = exact.iter().fold(0f32, |a, e| a.max(e.abs()));
                let cand = QMatMul::from_qtensor(q).unwrap().forward(&xt).unwrap();
                let cand = cand.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let q = QTensor::quantize(&wt, dtype).unwrap();
                let data = q.data().unwrap();
                let mut outs = Vec::new();
                for isa in Isa::available() {
                    let mut acts = ActsK::default();
                    acts.quantize(&x, m, k);
                    let mut y = vec![f32::NAN; m * n];
                    matmul_quantized(isa, dtype, &data, n, &acts, &mut y);
                    let err = max_abs_diff(&y, &exact);
                    // The only error left is the 8-bit activations (≤ half a step of 1/127 of
                    // each 256's largest value): a few thousandths of the outputs' scale.
                    assert!(
                        err / scale < 0.01,
                        "{dtype:?} {isa:?} {m}x{k}x{n}: {err} vs {scale}"
                    );
                    assert!(err > 0.0);
                    // candle quantizes the activations the same way (it rounds halves away
                    // from zero), so the two agree far more closely than either with f32.
                    let err_c = max_abs_diff(&y, &cand);
                    assert!(
                        err_c / scale < 1e-5,
                        "{dtype:?} {isa:?} {m}x{k}x{n} vs candle: {err_c} vs {scale}"
                    );
                    outs.push(y);
                }
                // The portable and SIMD kernels sum in different float orders (measured up
                // to 5.0e-7 of the scale on these cases).
                for o in &outs[1..] {
                    let d = max_abs_diff(o, &outs[0]);
                    assert!(
                        d / scale < 2e-6,
                        "{dtype:?} {m}x{k}x{n}: SIMD vs portable {d}"
                    );
                }
            }
        }
    }

    /// The block decoding gives candle's dequantized values bit for bit.
    #[test]
    fn dequantize_block_equals_candles() {
        let (n, k) = (6, 512);
        let wt = Tensor::from_vec(random(n * k, 21), (n, k), &Device::Cpu).unwrap();
        for dtype in TYPES {
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let data = q.data().unwrap();
            let mut got = vec![0f32; n * k];
            for (o, blk) in got
                .chunks_exact_mut(QK_K)
                .zip(data.chunks_exact(block_bytes(dtype)))
            {
                dequantize_block(dtype, blk, o);
            }
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?}"
            );
        }
    }
}
