//! y = x·Wᵀ on the CPU with bf16 inputs and f32 sums (AVX-512 BF16, `vdpbf16ps`): the
//! encoder's linear layers at twice the multiply-adds per instruction of f32 FMA.
//!
//! W (N × K, the layer's `(out, in)` weight) is rounded to bf16 once, at load, and packed in
//! panels of [`NR`] output columns with pairs of K side by side, the operand layout of
//! `vdpbf16ps` (each 32-bit lane holds W[n, 2p] in its low half and W[n, 2p+1] in its high
//! half). Per call, each block of x rows is rounded to bf16 (round to nearest even, as
//! `vcvtne2ps2bf16` does) into a row-major buffer, whose consecutive pairs are already that
//! layout; a micro-kernel of [`MR`] rows × [`NR`] columns broadcasts one pair of a row and
//! multiplies it into two registers of the panel, keeping 2·MR accumulators in registers for
//! the whole K. Blocks of [`MC`] rows run in parallel on rayon's pool (`--threads`).
//!
//! The blocking is the usual GotoBLAS one (Goto & van de Geijn 2008, "Anatomy of
//! High-Performance Matrix Multiplication", §4), with packing of A dropped because bf16 rows are
//! already in the order the broadcast reads them. Our own code.
//!
//! Rounding both operands to bf16 (8 significant bits) moves all-MiniLM-L6-v2's vectors by
//! about 1e-3 (cosine to sentence-transformers ≥ 0.99996 on the fixture; `tests/encoder.rs`);
//! the f32 path stays the reference and the fallback. A portable kernel computes the same
//! products lane by lane on any CPU ([`PackedBf16::matmul_portable`]): the encoder never picks
//! bf16 by itself where the CPU lacks AVX-512 BF16, but the tests run its arithmetic there.
//!
//! `unsafe`: SIMD intrinsics that load and store through raw pointers, each bounds-checked by
//! an assertion before the loop that uses it.
#![allow(unsafe_code)]

use std::cell::RefCell;

use rayon::prelude::*;

thread_local! {
    /// The bf16 copy of a block of rows (at most MC·⌈K/2⌉ pairs).
    static A_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Output columns per panel (two 16-lane registers).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel: 2·MR = 24 accumulators + 2 panel registers + 1 broadcast ≤ 32.
pub(crate) const MR: usize = 12;
/// Rows per parallel task (a multiple of MR); their bf16 copy stays in L2.
pub(crate) const MC: usize = 96;

/// Whether this CPU runs [`PackedBf16::matmul`] (AVX-512 F + BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A (N × K) weight rounded to bf16 and packed for the micro-kernel.
#[derive(Debug)]
pub(crate) struct PackedBf16 {
    n: usize,
    k: usize,
    /// ⌈K/2⌉: pairs of K (an odd K gets a zero at the end).
    kp: usize,
    /// Panel j, pair p, column c (of NR) at `(j·kp + p)·NR + c`: bf16 W[j·NR+c, 2p] in the low
    /// 16 bits, W[j·NR+c, 2p+1] in the high; columns past N are zero.
    data: Vec<u32>,
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN), as `half` and `vcvtne2ps2bf16` do.
fn bf16_bits(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

impl PackedBf16 {
    /// w: (N × K) row-major f32.
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "bf16 pack: weight of {} for {n}×{k}",
            w.len()
        );
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        let at = |r: usize, c: usize| if r < n && c < k { w[r * k + c] } else { 0.0 };
        for j in 0..panels {
            for p in 0..kp {
                for c in 0..NR {
                    let r = j * NR + c;
                    data[(j * kp + p) * NR + c] =
                        bf16_bits(at(r, 2 * p)) | bf16_bits(at(r, 2 * p + 1)) << 16;
                }
            }
        }
        Self { n, k, kp, data }
    }

    /// Output width N.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Input width K.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// x: (M × K) row-major -> x·Wᵀ: (M × N) row-major, with AVX-512 BF16 where the CPU has
    /// it ([`supported`]), else with [`Self::matmul_portable`].
    pub(crate) fn matmul(&self, x: &[f32]) -> Vec<f32> {
        if !supported() {
            return self.matmul_portable(x);
        }
        let (n, k) = (self.n, self.k);
        assert_eq!(
            x.len() % k.max(1),
            0,
            "bf16 matmul: input of {} for K {k}",
            x.len()
        );
        let m = x.len().checked_div(k).unwrap_or(0);
        let mut y = vec![0f32; m * n];
        if n == 0 {
            return y;
        }
        y.par_chunks_mut(MC * n)
            .zip(x.par_chunks(MC * k.max(1)))
            .for_each(|(y, x)| {
                // SAFETY: the CPU has AVX-512 F, BW and BF16 (`supported()` above).
                unsafe { self.block(x, y) }
            });
        y
    }

    /// The same product in portable code, for any CPU: per output, the arithmetic of
    /// `vdpbf16ps` lane by lane (for each pair of K, the odd product added first, then the
    /// even one, into an f32 sum), without its flushing of denormals to zero.
    pub(crate) fn matmul_portable(&self, x: &[f32]) -> Vec<f32> {
        let (n, k, kp) = (self.n, self.k, self.kp);
        assert_eq!(
            x.len() % k.max(1),
            0,
            "bf16 matmul: input of {} for K {k}",
            x.len()
        );
        let m = x.len().checked_div(k).unwrap_or(0);
        let mut y = vec![0f32; m * n];
        if n == 0 {
            return y;
        }
        let wide = |bits: u32| f32::from_bits(bits << 16);
        y.par_chunks_mut(n)
            .zip(x.par_chunks(k.max(1)))
            .for_each(|(y, x)| {
                let mut a = vec![0u32; kp];
                bf16_pairs(x, &mut a);
                for (j, y) in y.chunks_mut(NR).enumerate() {
                    let panel = &self.data[j * kp * NR..(j + 1) * kp * NR];
                    let mut acc = [0f32; NR];
                    for (p, &pair) in a.iter().enumerate() {
                        let (lo, hi) = (wide(pair & 0xFFFF), wide(pair >> 16));
                        for (acc, &w) in acc.iter_mut().zip(&panel[p * NR..(p + 1) * NR]) {
                            *acc += hi * wide(w >> 16);
                            *acc += lo * wide(w & 0xFFFF);
                        }
                    }
                    y.copy_from_slice(&acc[..y.len()]);
                }
            });
        y
    }

    /// One block of rows: x (rows × K) f32, y (rows × N).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16 (sizes are checked).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn block(&self, x: &[f32], y: &mut [f32]) {
        let (n, k, kp) = (self.n, self.k, self.kp);
        let rows = y.len() / n;
        assert!(x.len() == rows * k && y.len() == rows * n);
        // Rows rounded to bf16, row stride kp pairs, in a buffer each thread keeps (a fresh
        // one per block costs page faults).
        A_BUF.with_borrow_mut(|a| {
            a.clear();
            a.resize(rows * kp, 0);
            for (src, dst) in x.chunks_exact(k).zip(a.chunks_exact_mut(kp)) {
                to_bf16_pairs(src, dst);
            }
            // SAFETY: the CPU has the features (our contract); `a` holds rows·kp pairs for
            // the rows of `y` (sized above).
            unsafe { self.block_bf16(a, y) }
        })
    }

    /// One block of rows already rounded: a (rows × kp pairs), y (rows × N).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16 (sizes are checked).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn block_bf16(&self, a: &[u32], y: &mut [f32]) {
        let (n, kp) = (self.n, self.kp);
        let rows = y.len() / n;
        assert!(a.len() == rows * kp);
        let panels = n.div_ceil(NR);
        assert!(self.data.len() == panels * kp * NR);
        for j in 0..panels {
            let cols = NR.min(n - j * NR);
            let panel = &self.data[j * kp * NR..(j + 1) * kp * NR];
            let mut r = 0;
            while r < rows {
                let mr = MR.min(rows - r);
                let a = &a[r * kp..(r + mr) * kp];
                let y = &mut y[r * n + j * NR..];
                assert!(y.len() >= (mr - 1) * n + cols);
                // SAFETY: the CPU has the features (our contract); `a` holds mr rows of kp
                // pairs and `panel` kp·NR values; the stores write `cols` columns of mr rows at
                // stride n, the last ending at (mr-1)·n + cols ≤ y.len() (asserted; y starts at
                // row r, column j·NR).
                unsafe {
                    match mr {
                        12 => tile::<12>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        11 => tile::<11>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        10 => tile::<10>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        9 => tile::<9>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        8 => tile::<8>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        7 => tile::<7>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        6 => tile::<6>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        5 => tile::<5>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        4 => tile::<4>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        3 => tile::<3>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        2 => tile::<2>(a, panel, kp, y.as_mut_ptr(), n, cols),
                        _ => tile::<1>(a, panel, kp, y.as_mut_ptr(), n, cols),
                    }
                }
                r += mr;
            }
        }
    }

    /// # Safety
    /// Never called: [`supported`] is false off x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn block(&self, _x: &[f32], _y: &mut [f32]) {
        unreachable!("bf16 matmul is x86-64 only")
    }
}

/// One row f32 (K) -> bf16 pairs (⌈K/2⌉ u32), round to nearest even; an odd K ends in a zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    assert_eq!(dst.len(), src.len().div_ceil(2));
    let mut chunks = src.chunks_exact(32);
    let mut out = dst.chunks_exact_mut(16);
    for (c, o) in (&mut chunks).zip(&mut out) {
        // SAFETY: c holds 32 floats and o 16 u32s (chunks_exact).
        unsafe {
            let lo = _mm512_loadu_ps(c.as_ptr());
            let hi = _mm512_loadu_ps(c.as_ptr().add(16));
            // The first argument fills the upper 16 bf16s, the second the lower.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(o.as_mut_ptr().cast(), v);
        }
    }
    bf16_pairs(chunks.remainder(), &mut dst[src.len() / 32 * 16..]);
}

/// The same in portable code: pairs of `src` (an odd length ends in a zero) into `dst`.
fn bf16_pairs(src: &[f32], dst: &mut [u32]) {
    for (i, d) in dst.iter_mut().enumerate() {
        let lo = src.get(2 * i).copied().unwrap_or(0.0);
        let hi = src.get(2 * i + 1).copied().unwrap_or(0.0);
        *d = bf16_bits(lo) | bf16_bits(hi) << 16;
    }
}

/// y[0..R, 0..cols] (row stride ldy) = a (R rows of kp bf16 pairs) · panel (kp pairs × NR).
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; `a.len() ≥ R·kp`, `panel.len() ≥ kp·NR`, and y is
/// valid for writes of `cols ≤ NR` floats at each of the R rows `y + r·ldy`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize>(
    a: &[u32],
    panel: &[u32],
    kp: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * kp && panel.len() >= kp * NR && cols <= NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (a, b) = (a.as_ptr(), panel.as_ptr());
    for p in 0..kp {
        // SAFETY: p < kp, so b + p·NR + 16 + 15 < kp·NR and a + r·kp + p < R·kp (the
        // contract's sizes); the CPU has the features.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                // The broadcast pair as the last operand, which `vdpbf16ps` can read from
                // memory with an embedded broadcast.
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], b0, x);
                acc[1] = _mm512_dpbf16_ps(acc[1], b1, x);
            }
        }
    }
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u16 << cols) - 1
    };
    let m1: __mmask16 = if cols >= NR {
        0xffff
    } else if cols > 16 {
        (1u16 << (cols - 16)) - 1
    } else {
        0
    };
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: as the caller guarantees: `cols` floats at y + r·ldy, masked.
        unsafe {
            let row = y.add(r * ldy);
            _mm512_mask_storeu_ps(row, m0, acc[0]);
            _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::testing::max_abs_diff;

    fn round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    /// The dispatching product (AVX-512 BF16 where the CPU has it, else the portable kernel)
    /// and the portable one, against an f64 product of the bf16-rounded inputs, over shapes
    /// that leave partial tiles, panels and blocks (and an odd K); and the two within a few
    /// f32 roundings of each other.
    #[test]
    fn matches_a_reference_product_of_the_rounded_inputs() {
        eprintln!(
            "bf16 product: {}",
            if supported() {
                "AVX-512 BF16 and portable"
            } else {
                "portable"
            }
        );
        let mut rng = SplitMix64(3);
        for (m, n, k) in [
            (1, 1, 1),
            (13, 33, 7),
            (200, 70, 64),
            (97, 384, 384),
            (5, 32, 1536),
        ] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let packed = PackedBf16::pack(&w, n, k);
            let (y, portable) = (packed.matmul(&x), packed.matmul_portable(&x));
            assert_eq!((y.len(), portable.len()), (m * n, m * n));
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| round(x[i * k + l]) as f64 * round(w[j * k + l]) as f64)
                        .sum();
                    for (what, got) in [("dispatched", &y), ("portable", &portable)] {
                        let got = got[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (k as f64).sqrt(),
                            "{what} {m}×{n}×{k} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
            // Both sum the same bf16 products in the same order (the same bits on the CPUs
            // seen; the SIMD kernel flushes denormals): at most a few f32 roundings apart.
            let scale = w.iter().chain(&x).fold(0f32, |a, v| a.max(v.abs()));
            let d = max_abs_diff(&y, &portable);
            let bound = 8.0 * f32::EPSILON * scale * scale * k as f32;
            assert!(d <= bound, "{m}×{n}×{k}: {d} > {bound}");
        }
    }
}
