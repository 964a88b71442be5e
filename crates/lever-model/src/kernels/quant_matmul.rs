//! CPU matrix multiplication for block-quantized weights (GGUF Q4_1, Q5_0 and Q8_0), lever's own.
//!
//! y = x · Wᵀ with W kept in its GGUF blocks (no second copy in memory) and the activations x
//! quantized to 8 bits per 32-value block first, as llama.cpp does (`quantize_row_q8_1`,
//! `ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0` in `ggml-cpu/arch/x86/quants.c`). Per
//! output the arithmetic follows llama.cpp's x86 path lane for lane (8 i32 lanes per block, each
//! scaled and fused-multiply-added into 8 f32 lanes in block order, then the same horizontal
//! sum), so lever and llama.cpp round alike.
//!
//! Why not candle's: candle 0.11.1 has no SIMD Q4_1 dot product (it falls back to scalar code),
//! rounds the Q8_1 block sum differently (f16(Σq)·f16(d) instead of f16(d·Σq)), and computes
//! one (row, token) pair at a time. Here a tile of R weight rows × T tokens is computed
//! together, so each weight block is decoded once for T tokens during prompt processing.
//!
//! `unsafe`: the x86 kernels load through raw pointers, and each strip of output rows is
//! written from its own thread into the one output buffer (see the `# Safety` sections).
#![allow(unsafe_code)]

use std::cell::RefCell;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::pool::{LARGE_M, SyncPtr, parallel};
use super::{Isa, isa};

/// Values per block.
pub(crate) const QK: usize = 32;
/// Bytes of one Q4_1 block: d (f16), m (f16), 16 bytes holding 32 4-bit values.
pub(crate) const Q4_1_BYTES: usize = 20;
/// Bytes of one Q8_0 block: d (f16), 32 signed bytes.
pub(crate) const Q8_0_BYTES: usize = 34;
/// Bytes of one Q5_0 block: d (f16), the 32 fifth bits (u32), 16 bytes of 32 low nibbles;
/// value = (nibble | bit << 4) − 16 (ggml's `block_q5_0`). It multiplies with Q8_0
/// activations as Q8_0 does (`ggml_vec_dot_q5_0_q8_0`).
pub(crate) const Q5_0_BYTES: usize = 22;

/// Whether these kernels handle a weight type.
pub(crate) fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0)
}

pub(crate) fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_1 => Q4_1_BYTES,
        GgmlDType::Q5_0 => Q5_0_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// Rows of activations quantized to 8 bits in blocks of 32: per block the values q (i8), the
/// scale d and the scaled sum s = d·Σq, both already rounded through f16 as llama.cpp stores
/// them (`block_q8_1`; Q8_0 uses q and d only).
#[derive(Debug, Default, Clone)]
pub(crate) struct QuantActs {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    /// Σq per block, exact (the packed kernels' offsets and Q4_K's mins).
    pub(crate) sums: Vec<i32>,
    /// Σq over each block's first 16 values (packed Q6_K's offsets: its scales cover 16).
    pub(crate) half_sums: Vec<i32>,
    /// Blocks per row.
    pub(crate) nb: usize,
    pub(crate) rows: usize,
}

impl QuantActs {
    /// Quantize `m` rows of `k` values (k a multiple of 32), reusing this buffer's memory.
    pub(crate) fn quantize(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(k % QK, 0);
        let nb = k / QK;
        self.nb = nb;
        self.rows = m;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        self.sums.resize(m * nb, 0);
        self.half_sums.resize(m * nb, 0);
        let (qs, d, s, sums, halves) = (
            SyncPtr(self.qs.as_mut_ptr()),
            SyncPtr(self.d.as_mut_ptr()),
            SyncPtr(self.s.as_mut_ptr()),
            SyncPtr(self.sums.as_mut_ptr()),
            SyncPtr(self.half_sums.as_mut_ptr()),
        );
        let rows = |range: std::ops::Range<usize>| {
            let (qs, d, s, sums, halves) = (&qs, &d, &s, &sums, &halves);
            for r in range {
                let xr = &x[r * k..(r + 1) * k];
                // SAFETY: rows are disjoint, each is written by one call only, and the
                // buffers were sized above for m rows.
                let (qr, dr, sr, sumr, halfr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qs.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(d.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(s.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(sums.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(halves.0.add(r * nb), nb),
                    )
                };
                quantize_row(isa, xr, qr, dr, sr);
                for ((sum, half), q) in sumr.iter_mut().zip(halfr).zip(qr.chunks_exact(QK)) {
                    let (lo, hi) = q.split_at(QK / 2);
                    *half = lo.iter().map(|&v| v as i32).sum();
                    *sum = *half + hi.iter().map(|&v| v as i32).sum::<i32>();
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

/// One row: per block d = max|x|/127, q = round-half-even(x·127/max|x|), s = d·Σq.
fn quantize_row(isa: Isa, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(QK) && qs.len() >= x.len() && d.len().min(s.len()) >= x.len() / QK
    );
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa.runs_here(), "{isa:?} on a CPU without it");
        match isa {
            // SAFETY: the CPU runs AVX-512 VNNI (asserted); the slices' sizes are asserted above.
            Isa::Avx512Vnni => return unsafe { vnni::quantize_row(x, qs, d, s) },
            // SAFETY: as above, for AVX2.
            Isa::Avx2 => return unsafe { avx2::quantize_row(x, qs, d, s) },
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs[b * QK..(b + 1) * QK].iter_mut().zip(xb) {
            let r = (v * inv).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        d[b] = f16::from_f32(scale).to_f32();
        s[b] = f16::from_f32(scale * sum as f32).to_f32();
    }
}

thread_local! {
    static ACTS: RefCell<QuantActs> = RefCell::new(QuantActs::default());
}

/// y (m × n, row-major) = x (m × k) · Wᵀ, where `w` holds the GGUF blocks of an n × k matrix of
/// type `dtype` (Q4_1, Q5_0 or Q8_0). Uses the run-time instruction set and the shared thread pool.
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
        acts.quantize(isa, x, m, k);
        let mut y = vec![0f32; m * n];
        matmul_quantized(isa, dtype, w, n, &acts, &mut y);
        y
    })
}

/// Rows of W per work item: a strip small enough to stay in L1 while every token passes by.
const STRIP: usize = 16;

/// y (rows × n) = acts · Wᵀ with the activations already quantized.
pub(crate) fn matmul_quantized(
    isa: Isa,
    dtype: GgmlDType,
    w: &[u8],
    n: usize,
    acts: &QuantActs,
    y: &mut [f32],
) {
    let (m, nb) = (acts.rows, acts.nb);
    let row_bytes = nb * block_bytes(dtype);
    assert!(supports(dtype), "kernels::matmul called for {dtype:?}");
    assert!(w.len() >= n * row_bytes, "weight buffer too small");
    assert_eq!(y.len(), m * n);
    assert!(acts.qs.len() >= m * nb * QK && acts.d.len().min(acts.s.len()) >= m * nb);
    assert!(isa.runs_here(), "{isa:?} on a CPU without it");
    let out = SyncPtr(y.as_mut_ptr());
    let strips = n.div_ceil(STRIP);
    let run = |range: std::ops::Range<usize>| {
        let out = &out;
        for strip in range {
            let r0 = strip * STRIP;
            let r1 = (r0 + STRIP).min(n);
            // SAFETY: asserted above: the CPU runs `isa`, `w` holds n ≥ r1 rows of whole
            // blocks, `acts` m tokens of nb blocks, `y` m × n floats; columns r0..r1 belong to
            // this strip only, and every strip is run once.
            unsafe { strip_kernel(isa, dtype, w, row_bytes, r0, r1, acts, out.0, n) };
        }
    };
    if m * n * nb >= 1 << 12 {
        parallel(strips, m >= LARGE_M, run);
    } else {
        run(0..strips);
    }
}

/// All tokens × rows r0..r1.
///
/// # Safety
/// `isa` runs on this CPU; `w` holds at least r1 rows of `row_bytes` bytes, each `acts.nb`
/// blocks of `dtype` (Q4_1 or Q8_0); r1 ≤ n; `y` is valid for writes of acts.rows × n floats,
/// and no other thread touches columns r0..r1 of it meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn strip_kernel(
    isa: Isa,
    dtype: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    r0: usize,
    r1: usize,
    acts: &QuantActs,
    y: *mut f32,
    n: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        match (isa, dtype) {
            (Isa::Avx512Vnni, GgmlDType::Q4_1) => {
                // SAFETY: the strip kernels' contract is ours, with the instruction set named.
                return unsafe { vnni::strip_q4_1(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx512Vnni, GgmlDType::Q5_0) => {
                // SAFETY: as above.
                return unsafe { vnni::strip_q5_0(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx512Vnni, _) => {
                // SAFETY: as above.
                return unsafe { vnni::strip_q8_0(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx2, GgmlDType::Q4_1) => {
                // SAFETY: as above.
                return unsafe { avx2::strip_q4_1(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx2, GgmlDType::Q5_0) => {
                // SAFETY: as above.
                return unsafe { avx2::strip_q5_0(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx2, _) => {
                // SAFETY: as above.
                return unsafe { avx2::strip_q8_0(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Scalar, _) => {}
        }
    }
    let _ = isa;
    let nb = acts.nb;
    for t in 0..acts.rows {
        let xq = &acts.qs[t * nb * QK..(t + 1) * nb * QK];
        let (xd, xs) = (&acts.d[t * nb..(t + 1) * nb], &acts.s[t * nb..(t + 1) * nb]);
        for r in r0..r1 {
            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
            let v = match dtype {
                GgmlDType::Q4_1 => scalar_dot_q4_1(wr, xq, xd, xs),
                GgmlDType::Q5_0 => scalar_dot_q5_0(wr, xq, xd),
                _ => scalar_dot_q8_0(wr, xq, xd),
            };
            // SAFETY: (t, r) is inside the caller's region.
            unsafe { *y.add(t * n + r) = v };
        }
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Σ_blocks d_w·d_x·Σ(q_w·q_x) + m_w·s_x.
fn scalar_dot_q4_1(w: &[u8], xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let (mut sum, mut summ) = (0f32, 0f32);
    for (b, wb) in w.chunks_exact(Q4_1_BYTES).enumerate() {
        let (d, m) = (half_at(wb, 0), half_at(wb, 2));
        let q = &xq[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let byte = wb[4 + j] as i32;
            sumi += (byte & 0x0F) * q[j] as i32 + (byte >> 4) * q[j + QK / 2] as i32;
        }
        sum += sumi as f32 * (d * xd[b]);
        summ += m * xs[b];
    }
    sum + summ
}

/// Σ_blocks d_w·d_x·Σ(q_w·q_x).
fn scalar_dot_q8_0(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (b, wb) in w.chunks_exact(Q8_0_BYTES).enumerate() {
        let q = &xq[b * QK..(b + 1) * QK];
        let sumi: i32 = wb[2..]
            .iter()
            .zip(q)
            .map(|(&a, &b)| a as i8 as i32 * b as i32)
            .sum();
        sum += sumi as f32 * (half_at(wb, 0) * xd[b]);
    }
    sum
}

/// Σ_blocks d_w·d_x·Σ(q_w·q_x) with q_w the 5-bit values less 16.
fn scalar_dot_q5_0(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (b, wb) in w.chunks_exact(Q5_0_BYTES).enumerate() {
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let q = &xq[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = (wb[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
            let hi = (wb[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
            sumi += (lo - 16) * q[j] as i32 + (hi - 16) * q[j + QK / 2] as i32;
        }
        sum += sumi as f32 * (half_at(wb, 0) * xd[b]);
    }
    sum
}

/// The x86 kernels, once per instruction set; they differ only in the 8-bit dot product:
/// `vpmaddubsw` + `vpmaddwd` (AVX2) or one `vpdpbusd` (AVX-512 VNNI, on 256-bit registers, which
/// gives the same i32 lanes).
macro_rules! x86_kernels {
    ($name:ident, $feat:literal, |$w:ident, $a:ident| $dot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        mod $name {
            use super::{QK, QuantActs};
            use std::arch::x86_64::*;

            /// 8 lanes, each the sum of 4 adjacent u8·i8 products.
            #[inline]
            #[target_feature(enable = $feat)]
            fn dot4($w: __m256i, $a: __m256i) -> __m256i {
                $dot
            }

            /// llama.cpp's `hsum_float_8`, same order of additions.
            #[inline]
            #[target_feature(enable = $feat)]
            fn hsum(x: __m256) -> f32 {
                let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
                let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
                let r = _mm_add_ss(r, _mm_movehdup_ps(r));
                _mm_cvtss_f32(r)
            }

            /// Q4_1 block at p: 32 unsigned values in element order, d and m.
            ///
            /// # Safety
            /// The CPU runs this module's instruction set; p points to a readable Q4_1 block
            /// (20 bytes, any alignment).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_block(p: *const u8) -> (__m256i, f32, f32) {
                // SAFETY: the 4 + 16 bytes read (unaligned) are the block's, per the contract.
                unsafe {
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let mask = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    (
                        _mm256_set_m128i(hi, lo),
                        _mm_cvtss_f32(dm),
                        _mm_cvtss_f32(_mm_movehdup_ps(dm)),
                    )
                }
            }

            /// Q8_0 block at p: 32 signed values and d.
            ///
            /// # Safety
            /// The CPU runs this module's instruction set; p points to a readable Q8_0 block
            /// (34 bytes, any alignment).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_block(p: *const u8) -> (__m256i, f32) {
                // SAFETY: the 2 + 32 bytes read (unaligned) are the block's, per the contract.
                unsafe {
                    let d =
                        _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32));
                    (
                        _mm256_loadu_si256(p.add(2) as *const __m256i),
                        _mm_cvtss_f32(d),
                    )
                }
            }

            /// Q5_0 block at p: 32 signed values (−16..15) and d. Each fifth bit becomes a
            /// byte mask (byte i of qh spread over 8 bytes, one bit tested per byte, the
            /// trick of llama.cpp's `bytes_from_bits_32`); where it is clear the nibble gets
            /// 0xF0, which is nibble − 16 as i8.
            ///
            /// # Safety
            /// The CPU runs this module's instruction set; p points to a readable Q5_0 block
            /// (22 bytes, any alignment).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q5_0_block(p: *const u8) -> (__m256i, f32) {
                // SAFETY: the 2 + 4 + 16 bytes read (unaligned) are the block's.
                unsafe {
                    let d =
                        _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32));
                    let qh = (p.add(2) as *const u32).read_unaligned();
                    let q = _mm_loadu_si128(p.add(6) as *const __m128i);
                    let mask = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let nib = _mm256_set_m128i(hi, lo);
                    let spread = _mm256_shuffle_epi8(
                        _mm256_set1_epi32(qh as i32),
                        _mm256_set_epi64x(
                            0x0303_0303_0303_0303,
                            0x0202_0202_0202_0202,
                            0x0101_0101_0101_0101,
                            0,
                        ),
                    );
                    let probe = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
                    let set =
                        _mm256_cmpeq_epi8(_mm256_or_si256(spread, probe), _mm256_set1_epi64x(-1));
                    let off = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
                    (_mm256_or_si256(nib, off), _mm_cvtss_f32(d))
                }
            }

            /// Single-token steps read every weight once, so they are bound by memory latency:
            /// each row is prefetched this many rows ahead, one prefetch per cache line (4 was
            /// fastest of 1-16 here, ~1.6× over none; rows in one stream beat 4 interleaved).
            const PREFETCH_ROWS: usize = 4;
            /// R rows × T tokens of Q4_1 · Q8_1.
            ///
            /// # Safety
            /// The CPU runs this module's instruction set. `w` points to R rows of `row_bytes`
            /// bytes one after another, each `acts.nb` blocks of this type; tokens t0..t0+T are
            /// rows of `acts`; `y` is valid for writes at (t0 + t)·n + r0 + r for t < T, r < R,
            /// and no other thread touches those elements meanwhile.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_q4_1<const R: usize, const T: usize>(
                w: *const u8,
                row_bytes: usize,
                acts: &QuantActs,
                t0: usize,
                y: *mut f32,
                n: usize,
                r0: usize,
            ) {
                // SAFETY: every block read lies in the R rows of `w`, every activation read in
                // tokens t0..t0+T of `acts` (indices below nb per token), and every store at an
                // element of `y` the contract gives this tile. The prefetch address is formed
                // with `wrapping_add` (it may lie past the weights: a prefetch never faults).
                unsafe {
                    let nb = acts.nb;
                    let mut acc = [[_mm256_setzero_ps(); T]; R];
                    let mut summ = [[0f32; T]; R];
                    let xq = acts.qs.as_ptr();
                    for b in 0..nb {
                        let mut wq = [_mm256_setzero_si256(); R];
                        let mut wd = [0f32; R];
                        let mut wm = [0f32; R];
                        for r in 0..R {
                            let p = w.add(r * row_bytes + b * super::Q4_1_BYTES);
                            if T == 1 && (b * super::Q4_1_BYTES) % 64 < super::Q4_1_BYTES {
                                _mm_prefetch(
                                    p.wrapping_add(PREFETCH_ROWS * row_bytes + 64) as *const i8,
                                    _MM_HINT_T0,
                                );
                            }
                            let (q, d, m) = q4_1_block(p);
                            wq[r] = q;
                            wd[r] = d;
                            wm[r] = m;
                        }
                        for t in 0..T {
                            let xi = (t0 + t) * nb + b;
                            let a = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                            let ad = *acts.d.get_unchecked(xi);
                            let as_ = *acts.s.get_unchecked(xi);
                            for r in 0..R {
                                let p = _mm256_cvtepi32_ps(dot4(wq[r], a));
                                acc[r][t] =
                                    _mm256_fmadd_ps(_mm256_set1_ps(wd[r] * ad), p, acc[r][t]);
                                summ[r][t] = wm[r].mul_add(as_, summ[r][t]);
                            }
                        }
                    }
                    for r in 0..R {
                        for t in 0..T {
                            *y.add((t0 + t) * n + r0 + r) = hsum(acc[r][t]) + summ[r][t];
                        }
                    }
                }
            }

            /// R rows × T tokens of Q8_0 · Q8_0 (or Q5_0 · Q8_0 where `Q5`).
            ///
            /// # Safety
            /// The CPU runs this module's instruction set. `w` points to R rows of `row_bytes`
            /// bytes one after another, each `acts.nb` blocks of this type; tokens t0..t0+T are
            /// rows of `acts`; `y` is valid for writes at (t0 + t)·n + r0 + r for t < T, r < R,
            /// and no other thread touches those elements meanwhile.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_q8<const R: usize, const T: usize, const Q5: bool>(
                w: *const u8,
                row_bytes: usize,
                acts: &QuantActs,
                t0: usize,
                y: *mut f32,
                n: usize,
                r0: usize,
            ) {
                // SAFETY: every block read lies in the R rows of `w`, every activation read in
                // tokens t0..t0+T of `acts` (indices below nb per token), and every store at an
                // element of `y` the contract gives this tile. The prefetch address is formed
                // with `wrapping_add` (it may lie past the weights: a prefetch never faults).
                unsafe {
                    let nb = acts.nb;
                    let mut acc = [[_mm256_setzero_ps(); T]; R];
                    let xq = acts.qs.as_ptr();
                    for b in 0..nb {
                        let mut wa = [_mm256_setzero_si256(); R];
                        let mut wq = [_mm256_setzero_si256(); R];
                        let mut wd = [0f32; R];
                        for r in 0..R {
                            let bytes = if Q5 {
                                super::Q5_0_BYTES
                            } else {
                                super::Q8_0_BYTES
                            };
                            let p = w.add(r * row_bytes + b * bytes);
                            if T == 1 && (b * bytes) % 64 < bytes {
                                _mm_prefetch(
                                    p.wrapping_add(PREFETCH_ROWS * row_bytes + 64) as *const i8,
                                    _MM_HINT_T0,
                                );
                            }
                            let (q, d) = if Q5 { q5_0_block(p) } else { q8_0_block(p) };
                            wa[r] = _mm256_sign_epi8(q, q);
                            wq[r] = q;
                            wd[r] = d;
                        }
                        for t in 0..T {
                            let xi = (t0 + t) * nb + b;
                            let a = _mm256_loadu_si256(xq.add(xi * QK) as *const __m256i);
                            let ad = *acts.d.get_unchecked(xi);
                            for r in 0..R {
                                // llama.cpp `mul_sum_i8_pairs_float`: |w| · sign(a, w).
                                let p = _mm256_cvtepi32_ps(dot4(wa[r], _mm256_sign_epi8(a, wq[r])));
                                acc[r][t] =
                                    _mm256_fmadd_ps(_mm256_set1_ps(wd[r] * ad), p, acc[r][t]);
                            }
                        }
                    }
                    for r in 0..R {
                        for t in 0..T {
                            *y.add((t0 + t) * n + r0 + r) = hsum(acc[r][t]);
                        }
                    }
                }
            }

            /// `tile_q8` for Q8_0 weights (same contract).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_q8_0<const R: usize, const T: usize>(
                w: *const u8,
                row_bytes: usize,
                acts: &QuantActs,
                t0: usize,
                y: *mut f32,
                n: usize,
                r0: usize,
            ) {
                // SAFETY: the contract is `tile_q8`'s.
                unsafe { tile_q8::<R, T, false>(w, row_bytes, acts, t0, y, n, r0) }
            }

            /// `tile_q8` for Q5_0 weights (same contract).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_q5_0<const R: usize, const T: usize>(
                w: *const u8,
                row_bytes: usize,
                acts: &QuantActs,
                t0: usize,
                y: *mut f32,
                n: usize,
                r0: usize,
            ) {
                // SAFETY: the contract is `tile_q8`'s.
                unsafe { tile_q8::<R, T, true>(w, row_bytes, acts, t0, y, n, r0) }
            }

            macro_rules! strip {
                ($fn_name:ident, $tile:ident) => {
                    /// Rows r0..r1 for every token, in R × T tiles; a token left over (and every
                    /// single-token step) goes row by row.
                    ///
                    /// # Safety
                    /// The CPU runs this module's instruction set. `w` holds at least r1 rows of
                    /// `row_bytes` bytes, each `acts.nb` blocks of this type; r1 ≤ n; `y` is
                    /// valid for writes of acts.rows × n floats, and no other thread touches
                    /// columns r0..r1 of it meanwhile.
                    #[target_feature(enable = $feat)]
                    pub(super) unsafe fn $fn_name(
                        w: &[u8],
                        row_bytes: usize,
                        r0: usize,
                        r1: usize,
                        acts: &QuantActs,
                        y: *mut f32,
                        n: usize,
                    ) {
                        const R: usize = 4;
                        const T: usize = 4;
                        let m = acts.rows;
                        let wp = w.as_ptr();
                        // SAFETY: each tile gets rows r..r+rr < r1 of `w` (rr rows from `wr`)
                        // and tokens t0..t0+tt < acts.rows, and writes only its own (token, row)
                        // elements of `y` in columns r0..r1: the tiles' contract, from ours.
                        unsafe {
                            let mut t0 = 0;
                            while t0 < m {
                                let tt = T.min(m - t0);
                                let mut r = r0;
                                while r < r1 {
                                    let rr = R.min(r1 - r);
                                    let wr = wp.add(r * row_bytes);
                                    if rr == R && tt == T {
                                        $tile::<R, T>(wr, row_bytes, acts, t0, y, n, r);
                                    } else if rr == R && tt == 1 {
                                        $tile::<R, 1>(wr, row_bytes, acts, t0, y, n, r);
                                    } else if rr == R {
                                        for t in t0..t0 + tt {
                                            for i in 0..R {
                                                $tile::<1, 1>(
                                                    wr.add(i * row_bytes),
                                                    row_bytes,
                                                    acts,
                                                    t,
                                                    y,
                                                    n,
                                                    r + i,
                                                );
                                            }
                                        }
                                    } else {
                                        for i in 0..rr {
                                            for t in t0..t0 + tt {
                                                $tile::<1, 1>(
                                                    wr.add(i * row_bytes),
                                                    row_bytes,
                                                    acts,
                                                    t,
                                                    y,
                                                    n,
                                                    r + i,
                                                );
                                            }
                                        }
                                    }
                                    r += rr;
                                }
                                t0 += tt;
                            }
                        }
                    }
                };
            }
            strip!(strip_q4_1, tile_q4_1);
            strip!(strip_q8_0, tile_q8_0);
            strip!(strip_q5_0, tile_q5_0);

            /// llama.cpp's `quantize_row_q8_1` (x86): see `QuantActs`.
            ///
            /// # Safety
            /// The CPU runs this module's instruction set; `x` holds whole blocks of 32
            /// values, `qs` at least `x.len()` values, `d` and `s` at least `x.len() / 32`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn quantize_row(
                x: &[f32],
                qs: &mut [i8],
                d: &mut [f32],
                s: &mut [f32],
            ) {
                // SAFETY: block b reads x[32b..32b+32] and writes qs[32b..32b+32], d[b] and s[b],
                // all inside the slices by the contract.
                unsafe {
                    let sign = _mm256_set1_ps(-0.0);
                    for b in 0..x.len() / QK {
                        let p = x.as_ptr().add(b * QK);
                        let v = [
                            _mm256_loadu_ps(p),
                            _mm256_loadu_ps(p.add(8)),
                            _mm256_loadu_ps(p.add(16)),
                            _mm256_loadu_ps(p.add(24)),
                        ];
                        let mut mx = _mm256_andnot_ps(sign, v[0]);
                        for vi in &v[1..] {
                            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, *vi));
                        }
                        let m4 =
                            _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
                        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                        let amax = _mm_cvtss_f32(m4);
                        let scale = amax / 127.0;
                        let inv = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                        let mut i = [_mm256_setzero_si256(); 4];
                        for (ii, vi) in i.iter_mut().zip(&v) {
                            let r = _mm256_round_ps(
                                _mm256_mul_ps(*vi, inv),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                            );
                            *ii = _mm256_cvtps_epi32(r);
                        }
                        let sum = _mm256_add_epi32(
                            _mm256_add_epi32(i[0], i[1]),
                            _mm256_add_epi32(i[2], i[3]),
                        );
                        let s4 = _mm_add_epi32(
                            _mm256_extracti128_si256(sum, 1),
                            _mm256_castsi256_si128(sum),
                        );
                        let s4 = _mm_hadd_epi32(s4, s4);
                        let s4 = _mm_hadd_epi32(s4, s4);
                        let total = _mm_cvtsi128_si32(s4);
                        // Pack 4×8 i32 to 32 i8 in order: packs work per 128-bit lane, then
                        // a permute restores the element order (as llama.cpp does).
                        let p16a = _mm256_packs_epi32(i[0], i[1]);
                        let p16b = _mm256_packs_epi32(i[2], i[3]);
                        let p8 = _mm256_packs_epi16(p16a, p16b);
                        let p8 = _mm256_permutevar8x32_epi32(
                            p8,
                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                        );
                        _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK) as *mut __m256i, p8);
                        *d.get_unchecked_mut(b) = half::f16::from_f32(scale).to_f32();
                        *s.get_unchecked_mut(b) =
                            half::f16::from_f32(scale * total as f32).to_f32();
                    }
                }
            }
        }
    };
}

x86_kernels!(avx2, "avx2,fma,f16c", |w, a| _mm256_madd_epi16(
    _mm256_maddubs_epi16(w, a),
    _mm256_set1_epi16(1)
));
x86_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", |w, a| {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
});

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, random};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    /// Every instruction set gives the same activations, and they follow llama.cpp's rules.
    #[test]
    fn activation_quantization_agrees_across_instruction_sets() {
        let (m, k) = (3, 96);
        let mut x = random(m * k, 4);
        x[64..96].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let mut want = QuantActs::default();
        want.quantize(Isa::Scalar, &x, m, k);
        for isa in Isa::available() {
            let mut got = QuantActs::default();
            got.quantize(isa, &x, m, k);
            assert_eq!(got.qs, want.qs, "{isa:?}");
            assert_eq!(got.d, want.d, "{isa:?}");
            assert_eq!(got.s, want.s, "{isa:?}");
        }
        let amax = x[..32].iter().fold(0f32, |a, v| a.max(v.abs()));
        let sum: i32 = want.qs[..32].iter().map(|&q| q as i32).sum();
        assert_eq!(want.s[0], f16::from_f32(amax / 127.0 * sum as f32).to_f32());
        assert_eq!(
            want.qs[..32].iter().map(|q| q.unsigned_abs()).max(),
            Some(127)
        );
        assert_eq!((want.d[2], want.s[2]), (0.0, 0.0));
    }

    /// Against the dequantized weights in f32, every shape of tile and remainder, every
    /// instruction set: the only error left is the 8-bit activations.
    #[test]
    fn matmul_matches_the_dequantized_product() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            for (m, k, n) in [(1, 64, 40), (5, 96, 37), (9, 32, 17), (4, 128, 64)] {
                let wt = Tensor::from_vec(random(n * k, 9), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&wt, dtype).unwrap();
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let x = random(m * k, 11);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let exact = xt.matmul(&deq.t().unwrap()).unwrap();
                let exact = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = exact.iter().fold(0f32, |a, e| a.max(e.abs()));
                let mut outs = Vec::new();
                for isa in Isa::available() {
                    let mut acts = QuantActs::default();
                    acts.quantize(isa, &x, m, k);
                    let mut y = vec![f32::NAN; m * n];
                    matmul_quantized(isa, dtype, &q.data().unwrap(), n, &acts, &mut y);
                    let err = max_abs_diff(&y, &exact);
                    assert!(
                        err / scale < 0.02,
                        "{dtype:?} {isa:?} {m}x{k}x{n}: {err} vs {scale}"
                    );
                    assert!(err > 0.0);
                    outs.push(y);
                }
                // The SIMD paths compute the same sums in the same order.
                if outs.len() == 3 {
                    assert_eq!(outs[1], outs[2], "{dtype:?} avx2 vs vnni");
                }
            }
        }
    }
}
