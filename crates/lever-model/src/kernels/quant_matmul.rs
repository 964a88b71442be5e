//! CPU matrix multiplication for block-quantized weights (GGUF Q4_1 and Q8_0), lever's own.
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
//! The instruction set is chosen at run time (AVX-512 VNNI, else AVX2, else portable scalar
//! code), so a build without `-C target-cpu=native` is as fast. Work is spread over candle's
//! persistent spinning thread pool (`candle_core::utils::barrier_pool`), sized by `--threads`.
//!
//! This is the one module of lever that uses `unsafe`: SIMD intrinsics that load through raw
//! pointers, and output tiles written from several threads into one buffer (each element by
//! exactly one tile).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per block.
pub const QK: usize = 32;
/// Bytes of one Q4_1 block: d (f16), m (f16), 16 bytes holding 32 4-bit values.
pub const Q4_1_BYTES: usize = 20;
/// Bytes of one Q8_0 block: d (f16), 32 signed bytes.
pub const Q8_0_BYTES: usize = 34;

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// What this CPU supports.
    pub fn detect() -> Isa {
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

    /// Every instruction set this CPU can run, from the portable one up (for tests).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| *i <= best)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// The instruction set in use: the best one detected, or a lower one named by `LEVER_ISA`
/// (scalar, avx2) to measure the fallbacks.
pub fn isa() -> Isa {
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

/// Whether these kernels handle a weight type.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_1 => Q4_1_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// Rows of activations quantized to 8 bits in blocks of 32: per block the values q (i8), the
/// scale d and the scaled sum s = d·Σq, both already rounded through f16 as llama.cpp stores
/// them (`block_q8_1`; Q8_0 uses q and d only).
#[derive(Debug, Default, Clone)]
pub struct QuantActs {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    /// Blocks per row.
    pub nb: usize,
    pub rows: usize,
}

impl QuantActs {
    /// Quantize `m` rows of `k` values (k a multiple of 32), reusing this buffer's memory.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(k % QK, 0);
        let nb = k / QK;
        self.nb = nb;
        self.rows = m;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        let (qs, d, s) = (
            SyncPtr(self.qs.as_mut_ptr()),
            SyncPtr(self.d.as_mut_ptr()),
            SyncPtr(self.s.as_mut_ptr()),
        );
        let rows = |range: std::ops::Range<usize>| {
            let (qs, d, s) = (&qs, &d, &s);
            for r in range {
                let xr = &x[r * k..(r + 1) * k];
                // SAFETY: rows are disjoint, each is written by one call only, and the
                // buffers were sized above for m rows.
                let (qr, dr, sr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qs.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(d.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(s.0.add(r * nb), nb),
                    )
                };
                quantize_row(isa, xr, qr, dr, sr);
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
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the instruction set was detected on this CPU; the slices hold whole blocks.
        match isa {
            Isa::Avx512Vnni => return unsafe { vnni::quantize_row(x, qs, d, s) },
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

/// A raw pointer that tiles running on several threads write through, each into elements no
/// other tile touches.
/// Tokens per call from which work goes to rayon instead of the spinning pool.
pub(crate) const LARGE_M: usize = 64;

/// Run `f` over 0..items split among the threads. Small jobs (a generated token, a short
/// prompt) go to candle's spinning barrier pool, whose wake-up costs nothing; large ones
/// (long prompts, training batches) to rayon, which candle's other CPU ops use too: a pool
/// spinning beside rayon's workers on the same cores takes their time (measured in training:
/// a quarter of the CPU spent waiting at the barrier).
pub(crate) fn parallel<F: Fn(std::ops::Range<usize>) + Sync + Send>(
    items: usize,
    large: bool,
    f: F,
) {
    if !large {
        candle_core::utils::barrier_pool().execute_chunked(items, f);
        return;
    }
    use rayon::prelude::*;
    let chunk = items.div_ceil(rayon::current_num_threads() * 4).max(1);
    (0..items.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| f(c * chunk..((c + 1) * chunk).min(items)));
}

#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: used only for disjoint writes, see the callers.
unsafe impl<T> Sync for SyncPtr<T> {}
unsafe impl<T> Send for SyncPtr<T> {}

thread_local! {
    static ACTS: RefCell<QuantActs> = RefCell::new(QuantActs::default());
}

/// y (m × n, row-major) = x (m × k) · Wᵀ, where `w` holds the GGUF blocks of an n × k matrix of
/// type `dtype` (Q4_1 or Q8_0). Uses the run-time instruction set and the shared thread pool.
pub fn matmul(dtype: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
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
pub fn matmul_quantized(
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
    let out = SyncPtr(y.as_mut_ptr());
    let strips = n.div_ceil(STRIP);
    let run = |range: std::ops::Range<usize>| {
        let out = &out;
        for strip in range {
            let r0 = strip * STRIP;
            let r1 = (r0 + STRIP).min(n);
            // SAFETY: rows r0..r1 of every token belong to this strip only; w holds n rows.
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
/// SAFETY: `y` points to rows × n floats; no other thread writes columns r0..r1.
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
        // SAFETY: the instruction set was detected on this CPU; the caller's contract holds.
        match (isa, dtype) {
            (Isa::Avx512Vnni, GgmlDType::Q4_1) => {
                return unsafe { vnni::strip_q4_1(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx512Vnni, _) => {
                return unsafe { vnni::strip_q8_0(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx2, GgmlDType::Q4_1) => {
                return unsafe { avx2::strip_q4_1(w, row_bytes, r0, r1, acts, y, n) };
            }
            (Isa::Avx2, _) => {
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

/// The x86 kernels, once per instruction set; they differ only in the 8-bit dot product:
/// `vpmaddubsw` + `vpmaddwd` (AVX2) or one `vpdpbusd` (AVX-512 VNNI, on 256-bit registers, which
/// gives the same i32 lanes).
macro_rules! x86_kernels {
    ($name:ident, $feat:literal, |$w:ident, $a:ident| $dot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
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
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_block(p: *const u8) -> (__m256i, f32, f32) {
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
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_block(p: *const u8) -> (__m256i, f32) {
                unsafe {
                    let d =
                        _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32));
                    (
                        _mm256_loadu_si256(p.add(2) as *const __m256i),
                        _mm_cvtss_f32(d),
                    )
                }
            }

            /// Single-token steps read every weight once, so they are bound by memory latency:
            /// each row is prefetched this many rows ahead, one prefetch per cache line (4 was
            /// fastest of 1-16 here, ~1.6× over none; rows in one stream beat 4 interleaved).
            const PREFETCH_ROWS: usize = 4;
            /// R rows × T tokens of Q4_1 · Q8_1.
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
                                    p.add(PREFETCH_ROWS * row_bytes + 64) as *const i8,
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

            /// R rows × T tokens of Q8_0 · Q8_0.
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
                unsafe {
                    let nb = acts.nb;
                    let mut acc = [[_mm256_setzero_ps(); T]; R];
                    let xq = acts.qs.as_ptr();
                    for b in 0..nb {
                        let mut wa = [_mm256_setzero_si256(); R];
                        let mut wq = [_mm256_setzero_si256(); R];
                        let mut wd = [0f32; R];
                        for r in 0..R {
                            let p = w.add(r * row_bytes + b * super::Q8_0_BYTES);
                            if T == 1 && (b * super::Q8_0_BYTES) % 64 < super::Q8_0_BYTES {
                                _mm_prefetch(
                                    p.add(PREFETCH_ROWS * row_bytes + 64) as *const i8,
                                    _MM_HINT_T0,
                                );
                            }
                            let (q, d) = q8_0_block(p);
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

            macro_rules! strip {
                ($fn_name:ident, $tile:ident) => {
                    /// Rows r0..r1 for every token, in R × T tiles; a token left over (and every
                    /// single-token step) goes row by row.
                    #[target_feature(enable = $feat)]
                    pub unsafe fn $fn_name(
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

            /// llama.cpp's `quantize_row_q8_1` (x86): see `QuantActs`.
            #[target_feature(enable = $feat)]
            pub unsafe fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
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

/// SwiGLU's silu(g) ⊙ u for inference, with candle's silu (g / (1 + e^−g)) and then the
/// product, so the values are those of the two tensor ops; one pass, over the threads.
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len());
    const CHUNK: usize = 2048;
    let mut y = vec![0f32; g.len()];
    let ptr = SyncPtr(y.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let ptr = &ptr;
        for c in range {
            let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(g.len()));
            // SAFETY: chunk c owns y[a..b].
            let out = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(a), b - a) };
            for ((o, &g), &u) in out.iter_mut().zip(&g[a..b]).zip(&u[a..b]) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    };
    let chunks = g.len().div_ceil(CHUNK);
    if chunks > 1 {
        parallel(chunks, false, run);
    } else {
        run(0..chunks);
    }
    y
}

/// llama.cpp's CPU flash attention takes one query at a time, with the query rounded to f16 and
/// the output accumulated in f16 (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`), until a
/// batch has this many queries; from there on it works in f32 tiles (`GGML_FA_TILE_Q`).
pub const ATTN_TILE_Q: usize = 64;

/// Largest head size the attention kernel takes.
pub const MAX_HEAD_DIM: usize = 256;

/// Heads of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Causal attention for T new queries at positions past..past+T over cached keys and values
/// 0..past+T, each query head reading key/value head h / (H/K). q: (T, H, D) after RoPE;
/// k, v: (past+T, K, D) in f16, as llama.cpp's cache holds them; returns (T, H, D). Fewer than `ATTN_TILE_Q` queries
/// follow llama.cpp's f16 arithmetic, more its f32 arithmetic.
pub fn attention(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    t: usize,
    past: usize,
    dims: AttnDims,
    scale: f32,
) -> Vec<f32> {
    assert_eq!(q.len(), t * dims.heads * dims.head_dim);
    assert_eq!(k.len(), (past + t) * dims.kv_heads * dims.head_dim);
    assert_eq!(v.len(), k.len());
    let f16_mode = t < ATTN_TILE_Q;
    let work = t * (past + t) * dims.heads * dims.head_dim;
    attend_items(
        q,
        t,
        dims,
        f16_mode,
        work,
        t >= LARGE_M,
        |i| (k, v, past + i + 1),
        scale,
    )
}

/// One new query per sequence (a batched decoding step): row r's query q[r] (H, D), after
/// RoPE, attends over its own cache `kv[r]` = (keys, values), each (P_r, K, D) with the new
/// token's key already appended. The same arithmetic as `attention` with T = 1 for each row
/// (llama.cpp's one-query f16 path), with rows × heads spread over the threads at once.
pub fn attention_rows(q: &[f32], kv: &[(&[f16], &[f16])], dims: AttnDims, scale: f32) -> Vec<f32> {
    assert_eq!(q.len(), kv.len() * dims.heads * dims.head_dim);
    let row = dims.kv_heads * dims.head_dim;
    let work = kv.iter().map(|(k, _)| k.len()).sum::<usize>() * (dims.heads / dims.kv_heads);
    let cache = |r: usize| (kv[r].0, kv[r].1, kv[r].0.len() / row);
    attend_items(q, kv.len(), dims, true, work, false, cache, scale)
}

/// Attention of `n` query positions (H heads each) over the keys and values `cache(i)` =
/// (keys, values, how many of them position i sees), spread over the threads. In f16 mode
/// an item is one position × one key/value head with the H/K query heads that read it; in
/// f32 mode one position × one query head.
#[allow(clippy::too_many_arguments)]
fn attend_items<'a>(
    q: &[f32],
    n: usize,
    dims: AttnDims,
    f16_mode: bool,
    work: usize,
    large: bool,
    cache: impl Fn(usize) -> (&'a [f16], &'a [f16], usize) + Sync,
    scale: f32,
) -> Vec<f32> {
    let AttnDims {
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    assert!(d <= MAX_HEAD_DIM && heads % kv_heads == 0);
    let isa = isa();
    let per_kv = heads / kv_heads;
    let group = if f16_mode { per_kv } else { 1 };
    let mut out = vec![0f32; n * heads * d];
    let ptr = SyncPtr(out.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let ptr = &ptr;
        let mut scratch = Vec::new();
        for item in range {
            let (i, h0) = (item / (heads / group), (item % (heads / group)) * group);
            let (k, v, len) = cache(i);
            let kv = KvView {
                k,
                v,
                stride: kv_heads * d,
                offset: (h0 / per_kv) * d,
                len,
            };
            let at = (i * heads + h0) * d;
            let qs = &q[at..at + group * d];
            // SAFETY: item (position i, heads h0..h0+group) owns out[at..at + group·D].
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(at), group * d) };
            if f16_mode {
                attend_f16_heads(isa, qs, group, &kv, scale, &mut scratch, o);
            } else {
                scratch.resize(len, 0.0);
                attend_f32(isa, qs, &kv, scale, &mut scratch, o);
            }
        }
    };
    let items = n * heads / group;
    if work >= 1 << 16 {
        parallel(items, large, run);
    } else {
        run(0..items);
    }
    out
}

/// One key/value head's rows 0..len inside the (P, K, D) cache.
struct KvView<'a> {
    k: &'a [f16],
    v: &'a [f16],
    stride: usize,
    offset: usize,
    len: usize,
}

impl KvView<'_> {
    fn key(&self, j: usize) -> &[f16] {
        let at = j * self.stride + self.offset;
        &self.k[at..at + self.stride.min(self.k.len() - at)]
    }
    fn value(&self, j: usize) -> &[f16] {
        let at = j * self.stride + self.offset;
        &self.v[at..at + self.stride.min(self.v.len() - at)]
    }
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `attend_f16` for the `g` query heads (contiguous in `q` and `out`, D each) that read one
/// key/value head, with the same arithmetic. With AVX-512 and D a multiple of 64 it runs in
/// three passes: the scores (independent dot products, so they pipeline), the running
/// maximum's rescale factors and the weights (scalar), then the f16 accumulators, held in
/// registers with the heads' rounding chains interleaved (one head alone waits on the
/// latency of each key's round trip through f16).
fn attend_f16_heads(
    isa: Isa,
    q: &[f32],
    g: usize,
    kv: &KvView,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len() / g;
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && d.is_multiple_of(64) {
        // SAFETY: AVX-512F, AVX2, FMA and F16C were detected; q and out hold g·D floats.
        unsafe { attn_avx512::attend_f16_heads(q, g, kv, scale, scratch, out) };
        return;
    }
    let _ = scratch;
    for (qh, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        attend_f16(isa, qh, kv, scale, o);
    }
}

/// One key of an online softmax with running maximum `m`: (factor for what was summed so
/// far, weight of this key). A new maximum rescales by e^(m−s) and weighs the key 1; else the
/// key weighs e^(s−m). A factor of 1 changes nothing (the accumulators hold f16 values, which
/// × 1 rounds back to themselves), so callers skip it.
#[inline]
fn online_softmax_step(s: f32, m: &mut f32) -> (f32, f32) {
    if s > *m {
        let ms = (*m - s).exp();
        *m = s;
        (ms, 1.0)
    } else {
        (1.0, (s - *m).exp())
    }
}

/// llama.cpp's one-query flash attention: f16 query, online softmax, f16 accumulator.
fn attend_f16(isa: Isa, q: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && q.len().is_multiple_of(8) {
        // SAFETY: AVX2/FMA/F16C were detected; all slices are at least D long.
        unsafe { attn_avx2::attend_f16(q, kv, scale, out) };
        return;
    }
    let _ = isa;
    let d = q.len();
    let qh: Vec<f32> = q.iter().map(|&x| f16_round(x)).collect();
    let mut acc = vec![0f32; d];
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    for j in 0..kv.len {
        let key = &kv.key(j)[..d];
        let s = qh.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        let (ms, vs) = online_softmax_step(s, &mut m);
        if ms != 1.0 {
            acc.iter_mut().for_each(|a| *a = f16_round(*a * ms));
        }
        for (a, &x) in acc.iter_mut().zip(&kv.value(j)[..d]) {
            *a = f16_round(x.to_f32().mul_add(vs, *a));
        }
        s_sum = s_sum.mul_add(ms, vs);
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// Softmax attention in f32: scores, their maximum, exponentials, weighted sum of values.
fn attend_f32(isa: Isa, q: &[f32], kv: &KvView, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && q.len().is_multiple_of(8) {
        // SAFETY: AVX2/FMA/F16C were detected; all slices are at least D long.
        unsafe { attn_avx2::attend_f32(q, kv, scale, scores, out) };
        return;
    }
    let _ = isa;
    let d = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        *s = q
            .iter()
            .zip(&kv.key(j)[..d])
            .map(|(a, b)| a * b.to_f32())
            .sum::<f32>()
            * scale;
    }
    let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, &e) in scores.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&kv.value(j)[..d]) {
            *o += e * x.to_f32();
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(target_arch = "x86_64")]
mod attn_avx2 {
    use super::{KvView, MAX_HEAD_DIM, online_softmax_step};
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn round_f16(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// 8 f16 values as f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load_f16(p: *const f16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// Σ a·b over D (a multiple of 8), two accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(a: *const f32, b: *const f16, d: usize) -> f32 {
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= d {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), load_f16(b.add(c)), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c + 8)), load_f16(b.add(c + 8)), s1);
                c += 16;
            }
            if c < d {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), load_f16(b.add(c)), s0);
            }
            hsum(_mm256_add_ps(s0, s1))
        }
    }

    /// e^x for 8 lanes: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-6 polynomial, 2^n
    /// through the exponent bits. Relative error about 2e-7; underflows to 0 below -87.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // ln 2 split in two so that n·ln2_hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_f16(q: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
        unsafe {
            let d = q.len();
            let mut qh = [0f32; MAX_HEAD_DIM];
            let mut acc = [0f32; MAX_HEAD_DIM];
            for c in (0..d).step_by(8) {
                _mm256_storeu_ps(
                    qh.as_mut_ptr().add(c),
                    round_f16(_mm256_loadu_ps(q.as_ptr().add(c))),
                );
            }
            let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
            for j in 0..kv.len {
                let s = dot(qh.as_ptr(), kv.key(j).as_ptr(), d) * scale;
                let (ms, vs) = online_softmax_step(s, &mut m);
                if ms != 1.0 {
                    let msv = _mm256_set1_ps(ms);
                    for c in (0..d).step_by(8) {
                        let a = acc.as_mut_ptr().add(c);
                        _mm256_storeu_ps(a, round_f16(_mm256_mul_ps(_mm256_loadu_ps(a), msv)));
                    }
                }
                let vsv = _mm256_set1_ps(vs);
                let val = kv.value(j).as_ptr();
                for c in (0..d).step_by(8) {
                    let a = acc.as_mut_ptr().add(c);
                    let y = _mm256_fmadd_ps(load_f16(val.add(c)), vsv, _mm256_loadu_ps(a));
                    _mm256_storeu_ps(a, round_f16(y));
                }
                s_sum = s_sum.mul_add(ms, vs);
            }
            let inv = _mm256_set1_ps(if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum });
            for c in (0..d).step_by(8) {
                let y = _mm256_mul_ps(_mm256_loadu_ps(acc.as_ptr().add(c)), inv);
                _mm256_storeu_ps(out.as_mut_ptr().add(c), y);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_f32(
        q: &[f32],
        kv: &KvView,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe {
            let d = q.len();
            let n = scores.len();
            let mut m = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(q.as_ptr(), kv.key(j).as_ptr(), d) * scale;
                m = m.max(*s);
            }
            let mv = _mm256_set1_ps(m);
            let mut sumv = _mm256_setzero_ps();
            let mut j = 0;
            while j + 8 <= n {
                let p = scores.as_mut_ptr().add(j);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
                _mm256_storeu_ps(p, e);
                sumv = _mm256_add_ps(sumv, e);
                j += 8;
            }
            let mut sum = hsum(sumv);
            for s in &mut scores[j..] {
                *s = (*s - m).exp();
                sum += *s;
            }
            let mut acc = [_mm256_setzero_ps(); MAX_HEAD_DIM / 8];
            let chunks = d / 8;
            for (j, &e) in scores.iter().enumerate() {
                let ev = _mm256_set1_ps(e);
                let val = kv.value(j).as_ptr();
                for (c, a) in acc[..chunks].iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load_f16(val.add(c * 8)), ev, *a);
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            for (c, a) in acc[..chunks].iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(c * 8), _mm256_mul_ps(*a, inv));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod attn_avx512 {
    use super::attn_avx2::{dot, round_f16};
    use super::{KvView, MAX_HEAD_DIM, online_softmax_step};
    use std::arch::x86_64::*;

    /// Query heads whose accumulators are interleaved (4 × 4 registers of 16 lanes).
    const HEADS: usize = 4;

    /// SAFETY: AVX-512F, AVX2, FMA and F16C are available; q and out hold g·D floats, D a
    /// multiple of 64 and at most `MAX_HEAD_DIM`; kv holds len keys and values of D.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn attend_f16_heads(
        q: &[f32],
        g: usize,
        kv: &KvView,
        scale: f32,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let d = q.len() / g;
        let n = kv.len;
        scratch.clear();
        scratch.resize(3 * g * n + g, 0.0);
        let (scores, rest) = scratch.split_at_mut(g * n);
        let (rescale, rest) = rest.split_at_mut(g * n);
        let (weight, inv) = rest.split_at_mut(g * n);
        unsafe {
            for h in 0..g {
                // The f16 query (as `attn_avx2::attend_f16` rounds it) and its scores.
                let mut qh = [0f32; MAX_HEAD_DIM];
                for c in (0..d).step_by(8) {
                    let x = _mm256_loadu_ps(q.as_ptr().add(h * d + c));
                    _mm256_storeu_ps(qh.as_mut_ptr().add(c), round_f16(x));
                }
                let s = &mut scores[h * n..(h + 1) * n];
                for (j, s) in s.iter_mut().enumerate() {
                    if h == 0 && j + PREFETCH < n {
                        prefetch(kv.key(j + PREFETCH).as_ptr(), d);
                    }
                    *s = dot(qh.as_ptr(), kv.key(j).as_ptr(), d) * scale;
                }
                // Online softmax: a new maximum rescales what was summed (factor ≠ 1).
                let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
                for (j, &s) in s.iter().enumerate() {
                    let (ms, vs) = online_softmax_step(s, &mut m);
                    rescale[h * n + j] = ms;
                    weight[h * n + j] = vs;
                    s_sum = s_sum.mul_add(ms, vs);
                }
                inv[h] = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
            }
            let mut h0 = 0;
            while h0 < g {
                let at = |x: &[f32]| x.as_ptr().add(h0 * n);
                let (r, w, o) = (at(rescale), at(weight), out.as_mut_ptr().add(h0 * d));
                match (g - h0).min(HEADS) {
                    4 => accumulate::<4>(kv, d, r, w, &inv[h0..], o),
                    3 => accumulate::<3>(kv, d, r, w, &inv[h0..], o),
                    2 => accumulate::<2>(kv, d, r, w, &inv[h0..], o),
                    _ => accumulate::<1>(kv, d, r, w, &inv[h0..], o),
                }
                h0 += HEADS;
            }
        }
    }

    /// Rows ahead that the passes ask the memory for: each key and value row of a cache is
    /// its own short read, which the hardware prefetcher sees too late.
    const PREFETCH: usize = 8;

    /// Ask for the cache lines of `n` f16 values from `p` on.
    #[inline]
    fn prefetch(p: *const half::f16, n: usize) {
        for off in (0..n * 2).step_by(64) {
            // SAFETY: a prefetch does not fault; the address lies within the cache rows.
            unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(off)) };
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn round16(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    /// H heads' outputs: for each 64-wide slice of D, every key's value into the f16
    /// accumulators (rescaled first where the maximum moved), then × 1/Σ. `rescale` and
    /// `weight` hold len factors per head, head after head.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn accumulate<const H: usize>(
        kv: &KvView,
        d: usize,
        rescale: *const f32,
        weight: *const f32,
        inv: &[f32],
        out: *mut f32,
    ) {
        let n = kv.len;
        unsafe {
            for c0 in (0..d).step_by(64) {
                let mut acc = [[_mm512_setzero_ps(); 4]; H];
                for j in 0..n {
                    if j + PREFETCH < n {
                        prefetch(kv.value(j + PREFETCH).as_ptr().add(c0), 64);
                    }
                    let val = kv.value(j).as_ptr().add(c0);
                    let v = [0, 16, 32, 48]
                        .map(|u| _mm512_cvtph_ps(_mm256_loadu_si256(val.add(u) as *const __m256i)));
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let ms = *rescale.add(h * n + j);
                        if ms != 1.0 {
                            let msv = _mm512_set1_ps(ms);
                            for a in acc.iter_mut() {
                                *a = round16(_mm512_mul_ps(*a, msv));
                            }
                        }
                        let vs = _mm512_set1_ps(*weight.add(h * n + j));
                        for (a, v) in acc.iter_mut().zip(&v) {
                            *a = round16(_mm512_fmadd_ps(*v, vs, *a));
                        }
                    }
                }
                for (h, acc) in acc.iter().enumerate() {
                    let iv = _mm512_set1_ps(inv[h]);
                    for (u, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(out.add(h * d + c0 + 16 * u), _mm512_mul_ps(*a, iv));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::random;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Naive attention in f64 for query `i` of head `h`.
    fn reference_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        past: usize,
        dims: AttnDims,
        i: usize,
        h: usize,
    ) -> Vec<f64> {
        let AttnDims {
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let kh = h / (heads / kv_heads);
        let qi = &q[(i * heads + h) * d..][..d];
        let scores: Vec<f64> = (0..=past + i)
            .map(|j| {
                let kj = &k[(j * kv_heads + kh) * d..][..d];
                qi.iter()
                    .zip(kj)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|c| {
                e.iter()
                    .enumerate()
                    .map(|(j, w)| w * v[(j * kv_heads + kh) * d + c] as f64)
                    .sum::<f64>()
                    / sum
            })
            .collect()
    }

    /// The attention kernel against f64 softmax attention: tight in its f32 mode (many
    /// queries), within f16 rounding in its llama.cpp f16 mode (few queries); every
    /// instruction set.
    #[test]
    fn attention_matches_softmax_attention() {
        let dims = AttnDims {
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
        };
        let d = dims.head_dim;
        for (t, past, tol) in [(1, 40, 2e-2), (5, 3, 2e-2), (ATTN_TILE_Q + 3, 9, 1e-5)] {
            let n = past + t;
            let q = random(t * dims.heads * d, 1);
            let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let (k, v) = (
                half(random(n * dims.kv_heads * d, 2)),
                half(random(n * dims.kv_heads * d, 3)),
            );
            let wide = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            let (kf, vf) = (wide(&k), wide(&v));
            for isa in Isa::available() {
                let mut got = vec![0f32; t * dims.heads * d];
                for i in 0..t {
                    for h in 0..dims.heads {
                        let kh = h / (dims.heads / dims.kv_heads);
                        let kv = KvView {
                            k: &k,
                            v: &v,
                            stride: dims.kv_heads * d,
                            offset: kh * d,
                            len: past + i + 1,
                        };
                        let qi = &q[(i * dims.heads + h) * d..][..d];
                        let o = &mut got[(i * dims.heads + h) * d..][..d];
                        if t < ATTN_TILE_Q {
                            attend_f16(isa, qi, &kv, 1.0 / (d as f32).sqrt(), o);
                        } else {
                            let mut scores = vec![0f32; past + i + 1];
                            attend_f32(isa, qi, &kv, 1.0 / (d as f32).sqrt(), &mut scores, o);
                        }
                    }
                }
                let mut worst = 0f64;
                for i in 0..t {
                    for h in 0..dims.heads {
                        let want = reference_attention(&q, &kf, &vf, past, dims, i, h);
                        let have = &got[(i * dims.heads + h) * d..][..d];
                        for (a, b) in want.iter().zip(have) {
                            worst = worst.max((a - *b as f64).abs());
                        }
                    }
                }
                assert!(worst < tol, "{isa:?} t={t} past={past}: {worst}");
            }
            assert_eq!(
                attention(&q, &k, &v, t, past, dims, 1.0 / (d as f32).sqrt()).len(),
                q.len()
            );
        }
    }

    /// The heads of a key/value head at once (the AVX-512 passes) give what each head alone
    /// gives, bit for bit: head sizes 64 and 128, groups of 1 to 7 heads, 1 to 300 keys, and
    /// scores that keep rising (a rescale at every key).
    #[test]
    fn grouped_f16_attention_equals_head_by_head() {
        let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        for d in [64, 128] {
            for g in [1, 3, 4, 7] {
                for (len, rising) in [
                    (1, false),
                    (2, false),
                    (37, false),
                    (300, false),
                    (40, true),
                ] {
                    let q = random(g * d, 5 + len as u64);
                    let mut k = half(random(len * 2 * d, 6));
                    let v = half(random(len * 2 * d, 7));
                    if rising {
                        // Keys that align ever more with every query: a new maximum each time.
                        for j in 0..len {
                            for c in 0..d {
                                k[(j * 2 + 1) * d + c] =
                                    f16::from_f32(q[c].signum() * j as f32 * 0.05);
                            }
                        }
                    }
                    let kv = KvView {
                        k: &k,
                        v: &v,
                        stride: 2 * d,
                        offset: d,
                        len,
                    };
                    let scale = 1.0 / (d as f32).sqrt();
                    let mut want = vec![0f32; g * d];
                    for (qh, o) in q.chunks_exact(d).zip(want.chunks_exact_mut(d)) {
                        attend_f16(Isa::Avx2.min(isa()), qh, &kv, scale, o);
                    }
                    for isa in Isa::available() {
                        let mut got = vec![f32::NAN; g * d];
                        attend_f16_heads(isa, &q, g, &kv, scale, &mut Vec::new(), &mut got);
                        if isa >= Isa::Avx2 {
                            let same = got
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{isa:?} d={d} g={g} len={len}");
                        }
                    }
                }
            }
        }
    }

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
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
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
                    let err = y
                        .iter()
                        .zip(&exact)
                        .fold(0f32, |a, (g, e)| a.max((g - e).abs()));
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
