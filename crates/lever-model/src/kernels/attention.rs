//! Causal attention on the CPU over the host KV cache, which holds keys and values in f16 as
//! llama.cpp's does: llama.cpp's one-query f16 flash-attention arithmetic for fewer than
//! [`ATTN_TILE_Q`] queries, an f32 softmax above (`ggml_compute_forward_flash_attn_ext_f16`).
//! Scalar code, AVX2, and with AVX-512 the query heads that share a key/value head together.
//!
//! `unsafe`: SIMD intrinsics that load through raw pointers, and each (position, head) item
//! writing its own slice of the one output buffer from its thread.
#![allow(unsafe_code)]

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::pool::{LARGE_M, SyncPtr, parallel};
use super::{Isa, isa};

/// llama.cpp's CPU flash attention takes one query at a time, with the query rounded to f16 and
/// the output accumulated in f16 (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`), until a
/// batch has this many queries; from there on it works in f32 tiles (`GGML_FA_TILE_Q`).
pub const ATTN_TILE_Q: usize = 64;

/// Largest head size the attention kernel takes.
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// Heads of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Causal attention for T new queries at positions past..past+T over cached keys and values
/// 0..past+T, each query head reading key/value head h / (H/K). q: (T, H, D) after RoPE;
/// k, v: (past+T, K, D) in f16, as llama.cpp's cache holds them; returns (T, H, D). Fewer than `ATTN_TILE_Q` queries
/// follow llama.cpp's f16 arithmetic, more its f32 arithmetic. With a `window` W, the query
/// at position p sees only keys p − W + 1 ..= p (local attention; llama.cpp
/// `is_masked_swa`, whose masked keys its kernel skips, as this one never reads them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    t: usize,
    past: usize,
    dims: AttnDims,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    assert_eq!(q.len(), t * dims.heads * dims.head_dim);
    assert_eq!(k.len(), (past + t) * dims.kv_heads * dims.head_dim);
    assert_eq!(v.len(), k.len());
    if t >= ATTN_TILE_Q {
        return attention_f32(isa(), q, k, v, t, past, dims, scale, window);
    }
    let work = t * (past + t) * dims.heads * dims.head_dim;
    attend_items(
        q,
        t,
        dims,
        work,
        t >= LARGE_M,
        |i| {
            let end = past + i + 1;
            let start = window.map_or(0, |w| end.saturating_sub(w));
            let row = dims.kv_heads * dims.head_dim;
            (&k[start * row..], &v[start * row..], end - start)
        },
        scale,
    )
}

/// One new query per sequence (a batched decoding step): row r's query q[r] (H, D), after
/// RoPE, attends over its own cache `kv[r]` = (keys, values), each (P_r, K, D) with the new
/// token's key already appended. The same arithmetic as `attention` with T = 1 for each row
/// (llama.cpp's one-query f16 path), with rows × heads spread over the threads at once.
pub(crate) fn attention_rows(
    q: &[f32],
    kv: &[(&[f16], &[f16])],
    dims: AttnDims,
    scale: f32,
) -> Vec<f32> {
    assert_eq!(q.len(), kv.len() * dims.heads * dims.head_dim);
    let row = dims.kv_heads * dims.head_dim;
    let work = kv.iter().map(|(k, _)| k.len()).sum::<usize>() * (dims.heads / dims.kv_heads);
    let cache = |r: usize| (kv[r].0, kv[r].1, kv[r].0.len() / row);
    attend_items(q, kv.len(), dims, work, false, cache, scale)
}

/// Attention of `n` query positions (H heads each) over the keys and values `cache(i)` =
/// (keys, values, how many of them position i sees), spread over the threads, in llama.cpp's
/// one-query f16 arithmetic: an item is one position × one key/value head with the H/K query
/// heads that read it.
fn attend_items<'a>(
    q: &[f32],
    n: usize,
    dims: AttnDims,
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
    let group = heads / kv_heads;
    let mut out = vec![0f32; n * heads * d];
    let ptr = SyncPtr(out.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let ptr = &ptr;
        let mut scratch = Vec::new();
        for item in range {
            let (i, kh) = (item / kv_heads, item % kv_heads);
            let (k, v, len) = cache(i);
            let kv = KvView {
                k,
                v,
                stride: kv_heads * d,
                offset: kh * d,
                len,
            };
            let at = (i * heads + kh * group) * d;
            let qs = &q[at..at + group * d];
            // SAFETY: at + group·D ≤ n·H·D = out.len(), and item (position i, heads
            // kh·group..(kh+1)·group), run once, is the only one that writes out[at..at + group·D].
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(at), group * d) };
            attend_f16_heads(isa, qs, group, &kv, scale, &mut scratch, o);
        }
    };
    let items = n * kv_heads;
    if work >= 1 << 16 {
        parallel(items, large, run);
    } else {
        run(0..items);
    }
    out
}

/// The f32 arithmetic of many queries (a prompt: T ≥ `ATTN_TILE_Q`), as llama.cpp's tiled
/// path: each item is one query head × a block of `ATTN_TILE_Q` positions, whose scores are
/// computed as one tile (block × the keys its last position sees, in f32), then a softmax per
/// row over the keys that row sees (causal, and the window), then the weighted sum of the
/// values as a second tile and each row's 1/Σ. One query at a time read every key and value
/// once per query (a fifth of a 1-thread prompt's time on SmolLM2); a block reads them once
/// per 64.
///
/// Each output's bits depend on its own query and keys only, never on the block around it:
/// every score is one fma chain over the head's dimensions in order, every output value one
/// fma chain over the keys in order (a key outside the row's range weighs +0 and leaves the
/// chain's bits as they are). So a prompt computed in chunks (the server's chunked prefill,
/// its prompt cache) gets the bits it gets at once, as the one-query path gave; a blocked
/// matrix product (gemm) sums in an order that depends on the shapes, and did not.
#[allow(clippy::too_many_arguments)]
fn attention_f32(
    isa: Isa,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    t: usize,
    past: usize,
    dims: AttnDims,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let AttnDims {
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    assert!(d <= MAX_HEAD_DIM && heads % kv_heads == 0);
    let n = past + t;
    assert!(q.len() == t * heads * d && k.len() == n * kv_heads * d && v.len() == k.len());
    // Values in f32 once (SIMD conversion); keys in f32 and transposed per key/value head,
    // (K, D, n), so that one register holds one dimension of 16 keys.
    let mut vf = vec![0f32; v.len()];
    v.convert_to_f32_slice(&mut vf);
    let mut kt = vec![0f32; k.len()];
    let mut row = vec![0f32; kv_heads * d];
    for j in 0..n {
        k[j * kv_heads * d..][..kv_heads * d].convert_to_f32_slice(&mut row);
        for (c, x) in row.iter().enumerate() {
            kt[c * n + j] = *x;
        }
    }
    let blocks = t.div_ceil(ATTN_TILE_Q);
    let mut out = vec![0f32; t * heads * d];
    let ptr = SyncPtr(out.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let ptr = &ptr;
        let mut scratch = BlockScratch::default();
        for item in range {
            // Head-major: a thread's contiguous items cover every block of its heads, so the
            // causal triangle's cost splits evenly.
            let (h, i0) = (item / blocks, item % blocks * ATTN_TILE_Q);
            let rows = (t - i0).min(ATTN_TILE_Q);
            let at = Block {
                h,
                i0,
                rows,
                t,
                past,
            };
            let o = attend_f32_block(isa, q, &kt, &vf, dims, scale, window, at, &mut scratch);
            for (r, row) in o.chunks_exact(d).enumerate() {
                let at = ((i0 + r) * heads + h) * d;
                // SAFETY: at + D ≤ t·H·D = out.len(); (position i0 + r, head h) belongs to
                // this item alone, run once.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(at), d) };
                dst.copy_from_slice(row);
            }
        }
    };
    let items = heads * blocks;
    if t * n * heads * d >= 1 << 16 {
        parallel(items, t >= LARGE_M, run);
    } else {
        run(0..items);
    }
    out
}

/// Query head h's positions i0..i0+rows of T new ones after `past` cached.
#[derive(Clone, Copy)]
struct Block {
    h: usize,
    i0: usize,
    rows: usize,
    t: usize,
    past: usize,
}

/// One thread's buffers for `attend_f32_block`.
#[derive(Default)]
struct BlockScratch {
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// The outputs (rows × D, in `s.out`) of one block: q (T, H, D); kt the keys in f32,
/// (K, D, past+T); v the values in f32, (past+T, K, D).
#[allow(clippy::too_many_arguments)]
fn attend_f32_block<'s>(
    isa: Isa,
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    dims: AttnDims,
    scale: f32,
    window: Option<usize>,
    at: Block,
    s: &'s mut BlockScratch,
) -> &'s [f32] {
    let AttnDims {
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    let Block {
        h,
        i0,
        rows,
        t,
        past,
    } = at;
    let n = past + t;
    let kh = h / (heads / kv_heads);
    // Keys seen by row r: [first(r), past + i0 + r + 1); the block reads from the first row's
    // first to the last row's end.
    let first = |r: usize| window.map_or(0, |w| (past + i0 + r + 1).saturating_sub(w));
    let (lo, hi) = (first(0), past + i0 + rows);
    let len = hi - lo;
    assert!(rows <= ATTN_TILE_Q && i0 + rows <= t && h < heads && q.len() == t * heads * d);
    assert!(kt.len() == n * kv_heads * d && v.len() == kt.len());
    s.scores.resize(rows * len, 0.0);
    s.out.resize(rows * d, 0.0);
    let tile = Tile {
        q: &q[(i0 * heads + h) * d..],
        q_stride: heads * d,
        keys: &kt[kh * d * n + lo..],
        key_stride: n,
        values: &v[lo * kv_heads * d + kh * d..],
        value_stride: kv_heads * d,
        rows,
        len,
        d,
    };
    tile.scores(isa, scale, &mut s.scores);
    let mut inv = [0f32; ATTN_TILE_Q];
    for (r, sc) in s.scores.chunks_exact_mut(len).enumerate() {
        let (a, b) = (first(r) - lo, past + i0 + r + 1 - lo);
        sc[..a].fill(0.0);
        sc[b..].fill(0.0);
        inv[r] = 1.0 / exp_shifted_sum(isa, &mut sc[a..b]);
    }
    tile.weighted_values(isa, &s.scores, &mut s.out);
    for (o, inv) in s.out.chunks_exact_mut(d).zip(inv) {
        o.iter_mut().for_each(|x| *x *= inv);
    }
    &s.out
}

/// A block's operands: `rows` queries (`q_stride` apart, D each), `len` keys as D rows of
/// `key_stride` (keys[c·key_stride + j]: dimension c of key j) and `len` values
/// (`value_stride` apart, D each).
struct Tile<'a> {
    q: &'a [f32],
    q_stride: usize,
    keys: &'a [f32],
    key_stride: usize,
    values: &'a [f32],
    value_stride: usize,
    rows: usize,
    len: usize,
    d: usize,
}

impl Tile<'_> {
    /// Whether every index the kernels read is inside the slices.
    fn in_bounds(&self) -> bool {
        let (r, l, d) = (self.rows, self.len, self.d);
        r > 0
            && l > 0
            && (r - 1) * self.q_stride + d <= self.q.len()
            && (d - 1) * self.key_stride + l <= self.keys.len()
            && (l - 1) * self.value_stride + d <= self.values.len()
    }

    /// scores[r·len + j] = scale · (fma chain over c = 0..D of q_r[c]·key_j[c], from 0).
    fn scores(&self, isa: Isa, scale: f32, scores: &mut [f32]) {
        assert!(self.in_bounds() && scores.len() == self.rows * self.len);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Vnni {
            assert!(isa.runs_here());
            // SAFETY: the CPU has AVX-512 F (VNNI implies it); the reads are in bounds
            // (asserted: `in_bounds`) and `scores` holds rows × len.
            unsafe { attn_avx512::tile_scores(self, scale, scores) };
            return;
        }
        #[inline(always)]
        fn body(t: &Tile, scale: f32, scores: &mut [f32]) {
            for (r, out) in scores.chunks_exact_mut(t.len).enumerate() {
                let qr = &t.q[r * t.q_stride..][..t.d];
                out.fill(0.0);
                for (c, &x) in qr.iter().enumerate() {
                    let keys = &t.keys[c * t.key_stride..][..t.len];
                    for (o, &k) in out.iter_mut().zip(keys) {
                        *o = x.mul_add(k, *o);
                    }
                }
                out.iter_mut().for_each(|o| *o *= scale);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            #[target_feature(enable = "avx2,fma")]
            fn avx2(t: &Tile, scale: f32, scores: &mut [f32]) {
                body(t, scale, scores)
            }
            assert!(isa.runs_here());
            // SAFETY: the CPU has AVX2 and FMA (asserted); `avx2` is safe code compiled for them
            // (the same fused multiply-adds as libm's fmaf, in hardware).
            unsafe { avx2(self, scale, scores) };
            return;
        }
        let _ = isa;
        body(self, scale, scores);
    }

    /// out[r·D + c] = fma chain over j = 0..len of w[r·len + j]·value_j[c], from 0.
    fn weighted_values(&self, isa: Isa, w: &[f32], out: &mut [f32]) {
        assert!(self.in_bounds() && w.len() == self.rows * self.len);
        assert!(out.len() == self.rows * self.d);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx512Vnni && self.d.is_multiple_of(16) {
            assert!(isa.runs_here());
            // SAFETY: as for `scores`; D is a multiple of 16 and `out` holds rows × D.
            unsafe { attn_avx512::tile_values(self, w, out) };
            return;
        }
        #[inline(always)]
        fn body(t: &Tile, w: &[f32], out: &mut [f32]) {
            for (r, o) in out.chunks_exact_mut(t.d).enumerate() {
                o.fill(0.0);
                for (j, &p) in w[r * t.len..][..t.len].iter().enumerate() {
                    let val = &t.values[j * t.value_stride..][..t.d];
                    for (o, &x) in o.iter_mut().zip(val) {
                        *o = p.mul_add(x, *o);
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            #[target_feature(enable = "avx2,fma")]
            fn avx2(t: &Tile, w: &[f32], out: &mut [f32]) {
                body(t, w, out)
            }
            assert!(isa.runs_here());
            // SAFETY: as in `scores`.
            unsafe { avx2(self, w, out) };
            return;
        }
        let _ = isa;
        body(self, w, out);
    }
}

/// Each score s replaced by e^(s − max), returning their sum (at least 1: the maximum's own).
fn exp_shifted_sum(isa: Isa, scores: &mut [f32]) -> f32 {
    let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut j = 0;
    let mut sum = 0f32;
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        assert!(isa.runs_here());
        // SAFETY: the CPU has AVX2, FMA and F16C (asserted); `exp8_in_place` reads and writes
        // whole groups of 8 inside the slice.
        (j, sum) = unsafe { attn_avx2::exp8_in_place(scores, m) };
    }
    let _ = isa;
    for s in &mut scores[j..] {
        *s = (*s - m).exp();
        sum += *s;
    }
    sum
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
    /// Whether rows 0..len hold `d` keys and values each from `offset` on, inside the row:
    /// what the SIMD paths read without bounds checks.
    fn holds(&self, d: usize) -> bool {
        self.len == 0 || {
            let end = (self.len - 1) * self.stride + self.offset + d;
            self.offset + d <= self.stride && end <= self.k.len() && end <= self.v.len()
        }
    }

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
        assert!(isa.runs_here() && d <= MAX_HEAD_DIM && kv.holds(d));
        assert!(q.len() == g * d && out.len() == g * d);
        // SAFETY: the CPU has AVX-512 (VNNI implies F, with AVX2, FMA, F16C) and the sizes
        // are as the contract asks (asserted above).
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
        assert!(isa.runs_here() && q.len() <= MAX_HEAD_DIM && out.len() >= q.len());
        assert!(kv.holds(q.len()));
        // SAFETY: the CPU has AVX2, FMA and F16C, and the sizes are as the contract asks
        // (asserted above).
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
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; p points to 8 readable f16 values (any alignment).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load_f16(p: *const f16) -> __m256 {
        // SAFETY: the 16 bytes read are the 8 values the contract gives.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// Σ a·b over D (a multiple of 8), two accumulators.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; d is a multiple of 8; `a` points to d readable f32 and
    /// `b` to d readable f16 values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(a: *const f32, b: *const f16, d: usize) -> f32 {
        // SAFETY: every load reads 8 values at c + 8 ≤ d (d a multiple of 8).
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

    /// `super::attend_f16` in AVX2, the same arithmetic.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; D = q.len() is a multiple of 8 and at most
    /// `MAX_HEAD_DIM`; out.len() ≥ D; `kv.holds(D)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_f16(q: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
        // SAFETY: loads and stores at c < D ≤ MAX_HEAD_DIM in q, out and the two local arrays;
        // keys and values j < kv.len hold D values (`kv.holds(D)`).
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

    /// e^(s − m) for each score in whole groups of 8 from the start, by `exp8`: (how many
    /// were done, their sum).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp8_in_place(scores: &mut [f32], m: f32) -> (usize, f32) {
        let mv = _mm256_set1_ps(m);
        let mut sumv = _mm256_setzero_ps();
        let mut j = 0;
        while j + 8 <= scores.len() {
            // SAFETY: j + 8 ≤ len: the 8 floats read and written lie in the slice.
            unsafe {
                let p = scores.as_mut_ptr().add(j);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
                _mm256_storeu_ps(p, e);
                sumv = _mm256_add_ps(sumv, e);
            }
            j += 8;
        }
        (j, hsum(sumv))
    }
}

#[cfg(target_arch = "x86_64")]
mod attn_avx512 {
    use super::attn_avx2::{dot, round_f16};
    use super::{KvView, MAX_HEAD_DIM, Tile, online_softmax_step};
    use std::arch::x86_64::*;

    /// `f::<R>(args.., r0)` for rows r0..r0+R of 0..rows in groups of R = 4 (the last 1 to 3),
    /// in an `unsafe` block: only inside an unsafe function whose contract covers `f`'s.
    macro_rules! in_fours {
        ($rows:expr, $f:ident($($arg:expr),*)) => {{
            let mut r0 = 0;
            while r0 < $rows {
                let take = ($rows - r0).min(4);
                // SAFETY: rows r0..r0+take ≤ rows; the invoking function's contract (the
                // comment at the invocation) gives the rest.
                unsafe {
                    match take {
                        4 => $f::<4>($($arg,)* r0),
                        3 => $f::<3>($($arg,)* r0),
                        2 => $f::<2>($($arg,)* r0),
                        _ => $f::<1>($($arg,)* r0),
                    }
                }
                r0 += take;
            }
        }};
    }

    /// Query heads whose accumulators are interleaved (4 × 4 registers of 16 lanes).
    const HEADS: usize = 4;

    /// `super::attend_f16_heads` with AVX-512: scores, then weights, then the interleaved
    /// accumulators.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, AVX2, FMA and F16C; q and out hold g·D floats, D a multiple of
    /// 64 and at most `MAX_HEAD_DIM`; `kv.holds(D)`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn attend_f16_heads(
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
        // SAFETY: query and output reads and writes stay in head h < g's D values; keys and
        // values j < n hold D values (`kv.holds(D)`); `accumulate` gets HEADS or fewer heads
        // from h0 < g, with their n factors each in `rescale` and `weight` (g·n long).
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
            // SAFETY: a prefetch never faults, whatever the address (formed with
            // `wrapping_add`, so no out-of-bounds pointer arithmetic either).
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
    ///
    /// # Safety
    /// The CPU has AVX-512 F, AVX2, FMA and F16C; d is a multiple of 64 and `kv.holds(d)`;
    /// `rescale` and `weight` point to H·kv.len readable floats; inv.len() ≥ H; `out` is valid
    /// for writes of H·d floats.
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
        // SAFETY: value rows j < n hold d values, read 64 at a time from c0 < d; factors are
        // read at h·n + j < H·n; outputs written at h·d + c0 + 16u + 16 ≤ H·d.
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

    /// `Tile::scores` with AVX-512: 4 queries × 64 keys at a time, each score one fma chain
    /// over the dimensions in order (as the scalar code).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `tile.in_bounds()`; scores holds rows × len.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_scores(tile: &Tile, scale: f32, scores: &mut [f32]) {
        // Each call gets rows r0..r0+R ≤ rows, under this function's contract.
        in_fours!(tile.rows, scores_rows(tile, scale, scores));
    }

    /// Lanes below `n` (of 16).
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
    }

    /// Rows r0..r0+R of `tile_scores`.
    ///
    /// # Safety
    /// As `tile_scores`, with r0 + R ≤ rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_rows<const R: usize>(tile: &Tile, scale: f32, scores: &mut [f32], r0: usize) {
        let (len, d) = (tile.len, tile.d);
        let sv = _mm512_set1_ps(scale);
        let mut j0 = 0;
        // SAFETY: loads of keys c·key_stride + j0 + 16i + lane, lanes masked below len; query
        // values (r0+r)·q_stride + c < rows·q_stride, c < D; stores masked the same way into
        // row r0 + r of scores (all inside by `in_bounds` and the sizes asserted by the caller).
        unsafe {
            while j0 < len {
                let m: [__mmask16; 4] =
                    std::array::from_fn(|i| lanes(len.saturating_sub(j0 + 16 * i)));
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                for c in 0..d {
                    let kp = tile.keys.as_ptr().add(c * tile.key_stride + j0);
                    let kv: [__m512; 4] =
                        std::array::from_fn(|i| _mm512_maskz_loadu_ps(m[i], kp.add(16 * i)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(*tile.q.get_unchecked((r0 + r) * tile.q_stride + c));
                        for i in 0..4 {
                            acc[i] = _mm512_fmadd_ps(x, kv[i], acc[i]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let o = scores.as_mut_ptr().add((r0 + r) * len + j0);
                    for i in 0..4 {
                        _mm512_mask_storeu_ps(o.add(16 * i), m[i], _mm512_mul_ps(acc[i], sv));
                    }
                }
                j0 += 64;
            }
        }
    }

    /// `Tile::weighted_values` with AVX-512: 4 rows × 64 dimensions at a time, each output one
    /// fma chain over the keys in order (as the scalar code).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `tile.in_bounds()`; D is a multiple of 16; w holds rows × len
    /// and out rows × D.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_values(tile: &Tile, w: &[f32], out: &mut [f32]) {
        // Each call gets rows r0..r0+R ≤ rows, under this function's contract.
        in_fours!(tile.rows, values_rows(tile, w, out));
    }

    /// Rows r0..r0+R of `tile_values`.
    ///
    /// # Safety
    /// As `tile_values`, with r0 + R ≤ rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn values_rows<const R: usize>(tile: &Tile, w: &[f32], out: &mut [f32], r0: usize) {
        let (len, d) = (tile.len, tile.d);
        let mut c0 = 0;
        // SAFETY: value loads at j·value_stride + c0 + 16i + 16 ≤ (len−1)·value_stride + D
        // (c0 + 16·regs ≤ D, D a multiple of 16); weights (r0+r)·len + j < rows·len; stores
        // into row r0 + r of out, columns below D.
        unsafe {
            while c0 < d {
                let regs = ((d - c0) / 16).min(4);
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                for j in 0..len {
                    let vp = tile.values.as_ptr().add(j * tile.value_stride + c0);
                    let vv: [__m512; 4] = std::array::from_fn(|i| {
                        if i < regs {
                            _mm512_loadu_ps(vp.add(16 * i))
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let p = _mm512_set1_ps(*w.get_unchecked((r0 + r) * len + j));
                        for i in 0..regs {
                            acc[i] = _mm512_fmadd_ps(p, vv[i], acc[i]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add((r0 + r) * d + c0);
                    for (i, a) in acc.iter().enumerate().take(regs) {
                        _mm512_storeu_ps(o.add(16 * i), *a);
                    }
                }
                c0 += 16 * regs;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::random;

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
        for (t, past, tol) in [
            (1, 40, 2e-2),
            (5, 3, 2e-2),
            (ATTN_TILE_Q + 3, 9, 1e-5),
            (2 * ATTN_TILE_Q + 21, 0, 1e-5),
        ] {
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
                let scale = 1.0 / (d as f32).sqrt();
                let mut got = vec![0f32; t * dims.heads * d];
                if t >= ATTN_TILE_Q {
                    got = attention_f32(isa, &q, &k, &v, t, past, dims, scale, None);
                }
                for h in (0..dims.heads).filter(|_| t < ATTN_TILE_Q) {
                    for i in 0..t {
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
                        attend_f16(isa, qi, &kv, scale, o);
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
            // The threaded entry point gives what the per-block calls give.
            let all = attention(&q, &k, &v, t, past, dims, 1.0 / (d as f32).sqrt(), None);
            let mut worst = 0f64;
            for i in 0..t {
                for h in 0..dims.heads {
                    let want = reference_attention(&q, &kf, &vf, past, dims, i, h);
                    let have = &all[(i * dims.heads + h) * d..][..d];
                    for (a, b) in want.iter().zip(have) {
                        worst = worst.max((a - *b as f64).abs());
                    }
                }
            }
            assert!(worst < tol, "attention t={t} past={past}: {worst}");
        }
    }

    /// A sliding window W (Gemma 3's local layers, head size 256, one key/value head): the
    /// query at p attends to keys p − W + 1 ..= p only, against f64 softmax attention over
    /// those keys, in both arithmetic modes; and the window changes the answer.
    #[test]
    fn windowed_attention_sees_only_the_window() {
        let dims = AttnDims {
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
        };
        let d = dims.head_dim;
        let w = 7;
        for (t, past, tol) in [
            (1, 30, 2e-2),
            (5, 12, 2e-2),
            (ATTN_TILE_Q + 2, 3, 1e-5),
            (2 * ATTN_TILE_Q + 5, 40, 1e-5),
        ] {
            let n = past + t;
            let q = random(t * dims.heads * d, 11);
            let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let (k, v) = (half(random(n * d, 12)), half(random(n * d, 13)));
            let scale = 0.0625;
            let got = attention(&q, &k, &v, t, past, dims, scale, Some(w));
            let full = attention(&q, &k, &v, t, past, dims, scale, None);
            let mut worst = 0f64;
            for i in 0..t {
                let p = past + i;
                let keys = p.saturating_sub(w - 1)..=p;
                for h in 0..dims.heads {
                    let qi = &q[(i * dims.heads + h) * d..][..d];
                    let s: Vec<f64> = keys
                        .clone()
                        .map(|j| {
                            (0..d)
                                .map(|c| qi[c] as f64 * k[j * d + c].to_f64())
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want = keys
                            .clone()
                            .zip(&e)
                            .map(|(j, e)| e * v[j * d + c].to_f64())
                            .sum::<f64>()
                            / sum;
                        let have = got[(i * dims.heads + h) * d + c] as f64;
                        worst = worst.max((want - have).abs());
                    }
                }
            }
            assert!(worst < tol, "t={t} past={past}: {worst}");
            let moved = got
                .iter()
                .zip(&full)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                moved > 1e-2,
                "t={t} past={past}: the window changed nothing"
            );
        }
    }

    /// A prompt computed in chunks gets the bits it gets at once (the server's chunked prefill
    /// and prompt cache rely on it): every instruction set, causal and windowed, chunks that
    /// cut blocks of 64 anywhere.
    #[test]
    fn prompt_attention_is_the_same_in_chunks() {
        let half = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        for (dims, window) in [
            (
                AttnDims {
                    heads: 6,
                    kv_heads: 2,
                    head_dim: 64,
                },
                None,
            ),
            (
                AttnDims {
                    heads: 2,
                    kv_heads: 1,
                    head_dim: 256,
                },
                Some(37),
            ),
        ] {
            let (t, cut) = (150, 70);
            let d = dims.head_dim;
            let q = random(t * dims.heads * d, 21);
            let k = half(random(t * dims.kv_heads * d, 22));
            let v = half(random(t * dims.kv_heads * d, 23));
            let row = dims.kv_heads * d;
            for isa in Isa::available() {
                let all = attention_f32(isa, &q, &k, &v, t, 0, dims, 0.125, window);
                let (qa, qb) = q.split_at(cut * dims.heads * d);
                let first = attention_f32(
                    isa,
                    qa,
                    &k[..cut * row],
                    &v[..cut * row],
                    cut,
                    0,
                    dims,
                    0.125,
                    window,
                );
                let rest = attention_f32(isa, qb, &k, &v, t - cut, cut, dims, 0.125, window);
                let chunked: Vec<f32> = first.into_iter().chain(rest).collect();
                let same = all
                    .iter()
                    .zip(&chunked)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} {dims:?} window {window:?}");
            }
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
}
