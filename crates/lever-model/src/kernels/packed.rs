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
//! `block_q4_0x8` GEMV/GEMM kernels (`ggml-cpu/repack.cpp`), written here for Q4_1, Q5_0, Q8_0,
//! Q4_K and Q6_K. Every layout is the size of the GGUF blocks it replaces, and a matrix can be packed
//! 16 rows at a time as it is read (`Packed::read`), so loading never holds two copies.
//!
//! Arithmetic, per output (row r, token t), in block order b (q_w the signed value: Q5_0's q5 − 16):
//!   acc = fma(d_w[r,b]·d_x[t,b], Σ q_w·q_x, acc);  Q4_1 also: mins = fma(m_w[r,b], s_x[t,b], mins)
//!   (s_x the f16-rounded d_x·Σq_x of Q8_1, as llama.cpp's Q4_1); Q4_K also:
//!   mins = fma(−m1[r,b], d_x[t,b]·Σq_x, mins) (exact in f32); Q6_K, whose scales cover 16
//!   values: Σ q_w·q_x = sc_lo·Σ_{0..16} + sc_hi·Σ_{16..32} in integers, d_w = d
//!   y = acc + mins
//! Every token count uses exactly this formula (a batched decoding step gives each sequence the
//! bits it gets alone), and `reference` computes it in scalar code for the tests. It differs from
//! llama.cpp's lane order only in float rounding.
//!
//! Layout, 16-row group g, block b (groups row-major, blocks contiguous inside a group):
//!   Q4_1 (320 bytes = 16 × 20): 4 × 64 bytes of nibbles — register p, lane j, byte i holds row
//!        j's value 8p+i in its low nibble and 8p+4+i in its high one — then d (16 × f16) and
//!        m (16 × f16).
//!   Q5_0 (352 bytes = 16 × 22, the GGUF blocks' size): the 4 low bits as Q4_1's nibbles, then
//!        8 × 64 bits — mask c, bit 4j+i is the fifth bit of row j's value 4c+i, added to its
//!        byte with one masked `vpaddb` — then d (16 × f16). Values are q5 = 0..31, standing for
//!        q5 − 16: each block's sum starts from −16·Σq_x, as Q8_0's below.
//!   Q4_K (super-blocks of 256 values: 8 × 288 + 64 bytes = 16 × 148, the GGUF 144 + 4): each
//!        32 values as Q4_1's nibbles, then their 6-bit scale sc (16 × u8) and min mn (16 × u8);
//!        after the eight, d and dmin (16 × f16 each). A 32-value block is then Q4_1 with
//!        d_w = d·sc and m_w = −dmin·mn, both exact in f32 (17 significant bits at most), so
//!        it takes Q4_1's arithmetic; llama.cpp repacks Q4_K by default too (`q4_K_8x8`).
//!   Q6_K (super-blocks of 256 values: 8 × 416 + 32 bytes = 16 × 210, the GGUF size): each 32
//!        values as Q4_1's nibbles (low 4 bits), then 8 × 64 bits of bit 4 and 8 × 64 bits of
//!        bit 5 (added as 16 and 32 with masked `vpaddb`, as Q5_0's fifth bit), then the signed
//!        scales of values 0..16 and 16..32 (16 × i8 each); after the eight, d (16 × f16).
//!        Values are q6 = 0..63, standing for q6 − 32: each half's sum starts from −32·Σq_x
//!        over its 16 activations (`QuantActs::half_sums`). llama.cpp repacks Q6_K too.
//!   Q8_0 (544 bytes = 16 × 34, the GGUF blocks' size): 8 × 64 bytes — register c, lane j holds
//!        row j's values 4c..4c+3 as unsigned q+128 — then d (16 × f16). The weights are
//!        `vpdpbusd`'s unsigned operand and the activations its signed one, so each block's sum
//!        is Σ(q_w+128)·q_x and starts from −128·Σq_x, one number per token and block computed
//!        before the pass (llama.cpp's repacked Q8_0 is the same size: no per-row sums stored).
//! Rows past n (the last group of a matrix whose rows are not a multiple of 16) are zero and
//! never stored.
#![allow(unsafe_code)]

use std::cell::RefCell;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::kquant::{self, Q4_K_BYTES, Q6_K_BYTES, QK_K};
use super::pool::{LARGE_M, SyncPtr, parallel};
use super::quant_matmul::{Q4_1_BYTES, Q5_0_BYTES, Q8_0_BYTES, QK, QuantActs};
use super::{Isa, isa};

/// Rows per group: the 16 f32 lanes of a 512-bit register.
pub(crate) const GROUP: usize = 16;
const Q4_1_GROUP_BLOCK: usize = GROUP * 20;
const Q8_0_GROUP_BLOCK: usize = GROUP * 34;
const Q5_0_GROUP_BLOCK: usize = GROUP * 22;

/// Q4_K: one 32-value block of a group (nibbles, sc, mn) and one super-block of a group.
const Q4_K_GROUP_SUB: usize = GROUP * 18;
const Q4_K_GROUP_SUPER: usize = 8 * Q4_K_GROUP_SUB + GROUP * 4;
/// Q6_K: one 32-value block of a group (nibbles, two bit masks, two scales) and one
/// super-block of a group.
const Q6_K_GROUP_SUB: usize = GROUP * 26;
const Q6_K_GROUP_SUPER: usize = 8 * Q6_K_GROUP_SUB + GROUP * 2;

/// Whether `dtype` is laid out by 256-value super-block (the K-quants packed here).
fn k_quant(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
}

/// A K-quant's GGUF super-block bytes and packed (block, super-block) bytes of a group.
fn k_sizes(dtype: GgmlDType) -> (usize, usize, usize) {
    if dtype == GgmlDType::Q6K {
        (Q6_K_BYTES, Q6_K_GROUP_SUB, Q6_K_GROUP_SUPER)
    } else {
        (Q4_K_BYTES, Q4_K_GROUP_SUB, Q4_K_GROUP_SUPER)
    }
}

/// GGUF block bytes and packed group-block bytes of a type these kernels take (32-value
/// blocks; Q4_K, whose GGUF blocks hold 256 values, is laid out by super-block instead).
fn sizes(dtype: GgmlDType) -> Option<(usize, usize)> {
    match dtype {
        GgmlDType::Q4_1 => Some((Q4_1_BYTES, Q4_1_GROUP_BLOCK)),
        GgmlDType::Q5_0 => Some((Q5_0_BYTES, Q5_0_GROUP_BLOCK)),
        GgmlDType::Q8_0 => Some((Q8_0_BYTES, Q8_0_GROUP_BLOCK)),
        _ => None,
    }
}

/// GGUF bytes of a row of k values.
fn gguf_row_bytes(dtype: GgmlDType, k: usize) -> usize {
    if k_quant(dtype) {
        return k / QK_K * k_sizes(dtype).0;
    }
    k / QK * sizes(dtype).expect("a packable type").0
}

/// Bytes of one group (16 rows) of nb blocks.
fn group_bytes(dtype: GgmlDType, nb: usize) -> usize {
    if k_quant(dtype) {
        return nb / 8 * k_sizes(dtype).2;
    }
    nb * sizes(dtype).expect("a packable type").1
}

/// Offset of block b inside a group.
fn block_offset(dtype: GgmlDType, b: usize) -> usize {
    if k_quant(dtype) {
        let (_, sub, sup) = k_sizes(dtype);
        return b / 8 * sup + b % 8 * sub;
    }
    b * sizes(dtype).expect("a packable type").1
}

/// The value e (0..32) of a Q4_1 or Q5_0 block's 16 nibble bytes: low nibbles first.
fn nibble(qs: &[u8], e: usize) -> u8 {
    let q = qs[e % 16];
    if e < 16 { q & 0x0F } else { q >> 4 }
}

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
    /// Whether an n × k matrix of `dtype` can be packed here: a type these kernels take, k whole
    /// blocks, a CPU with AVX-512 VNNI and `LEVER_ISA` not asking for a lower instruction set.
    pub(crate) fn packable(dtype: GgmlDType, k: usize) -> bool {
        isa() == Isa::Avx512Vnni
            && if k_quant(dtype) {
                k.is_multiple_of(QK_K)
            } else {
                k.is_multiple_of(QK) && sizes(dtype).is_some()
            }
    }

    /// Repack GGUF blocks (`w`: n rows of k/32 blocks of `dtype`), or None where these kernels
    /// do not run (see [`Packed::packable`]).
    pub(crate) fn new(dtype: GgmlDType, w: &[u8], n: usize, k: usize) -> Option<Packed> {
        if !Self::packable(dtype, k) {
            return None;
        }
        Some(Self::repack(dtype, w, n, k))
    }

    fn repack(dtype: GgmlDType, w: &[u8], n: usize, k: usize) -> Packed {
        let mut next = w.chunks(GROUP * gguf_row_bytes(dtype, k));
        Self::read(dtype, n, k, |rows| {
            rows.copy_from_slice(next.next().expect("n rows of blocks"));
            Ok(())
        })
        .expect("reading from memory")
    }

    /// Pack an n × k matrix of `dtype` (a type these kernels take, k whole blocks) whose GGUF
    /// blocks `fill` gives 16 rows at a time (fewer for the last group), in order: only the
    /// packed matrix and one group of rows are in memory.
    pub(crate) fn read(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        mut fill: impl FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Packed> {
        let unit = if k_quant(dtype) { QK_K } else { QK };
        assert!(
            k.is_multiple_of(unit),
            "packed: {k} columns are not whole blocks"
        );
        let nb = k / QK;
        let row_bytes = gguf_row_bytes(dtype, k);
        let groups = n.div_ceil(GROUP);
        let gb = group_bytes(dtype, nb);
        let mut data = vec![0u8; groups * gb];
        let mut rows = vec![0u8; GROUP * row_bytes];
        for (g, dst) in data.chunks_exact_mut(gb).enumerate() {
            let count = (n - g * GROUP).min(GROUP);
            let rows = &mut rows[..count * row_bytes];
            fill(rows)?;
            for (j, row) in rows.chunks_exact(row_bytes).enumerate() {
                if k_quant(dtype) {
                    let (bytes, _, sup) = k_sizes(dtype);
                    for (sb, src) in row.chunks_exact(bytes).enumerate() {
                        let dst = &mut dst[sb * sup..][..sup];
                        if dtype == GgmlDType::Q6K {
                            pack_q6k(src, j, dst);
                        } else {
                            pack_q4k(src, j, dst);
                        }
                    }
                    continue;
                }
                let (bytes, group_block) = sizes(dtype).expect("a packable type");
                for (b, src) in row.chunks_exact(bytes).enumerate() {
                    pack_block(dtype, src, j, &mut dst[b * group_block..][..group_block]);
                }
            }
        }
        Ok(Packed { dtype, n, nb, data })
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    fn group_bytes(&self) -> usize {
        group_bytes(self.dtype, self.nb)
    }

    /// Row r's block b: its 32 values as signed integers, d_w and m_w (see the layouts; not
    /// Q6_K, whose halves have scales of their own: `q6k_block_values`).
    fn block_values(&self, r: usize, b: usize) -> ([i32; QK], f32, f32) {
        let (g, j) = (r / GROUP, r % GROUP);
        let group = &self.data[g * self.group_bytes()..][..self.group_bytes()];
        let blk = &group[block_offset(self.dtype, b)..];
        if self.dtype != GgmlDType::Q4K {
            let (v, d, m) = unpack_block(self.dtype, blk, j);
            return (v, d.to_f32(), m.to_f32());
        }
        let (v, sc, mn) = unpack_q4k_block(blk, j);
        let sup = &group[b / 8 * Q4_K_GROUP_SUPER + 8 * Q4_K_GROUP_SUB..];
        let (d, dmin) = (
            half_at(sup, 2 * j).to_f32(),
            half_at(sup, 32 + 2 * j).to_f32(),
        );
        (v, d * sc as f32, -(dmin * mn as f32))
    }

    /// Row r's Q6_K block b: its 32 values (−32..31), d, and the scales of its two halves.
    fn q6k_block_values(&self, r: usize, b: usize) -> ([i32; QK], f32, [i8; 2]) {
        let (g, j) = (r / GROUP, r % GROUP);
        let group = &self.data[g * self.group_bytes()..][..self.group_bytes()];
        let (mut v, sc) = unpack_q6k_block(&group[block_offset(self.dtype, b)..], j);
        v.iter_mut().for_each(|v| *v -= 32);
        let sup = &group[b / 8 * Q6_K_GROUP_SUPER + 8 * Q6_K_GROUP_SUB..];
        (v, half_at(sup, 2 * j).to_f32(), sc)
    }

    /// y (m × n, row-major) = x (m × k) · Wᵀ; activations quantized as `kernels::matmul` does.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        ACTS.with(|acts| {
            let mut acts = acts.borrow_mut();
            acts.quantize(Isa::Avx512Vnni, x, m, self.nb * QK);
            let mut y = vec![0f32; m * self.n];
            self.matmul_quantized(&acts, &mut y);
            y
        })
    }

    /// y = acts · Wᵀ. The blocks' exact sums Σq_x give Q8_0's and Q5_0's offsets (−128·Σq_x,
    /// −16·Σq_x) and Q4_K's mins (d_x·Σq_x, exact in f32, rather than the f16-rounded s_x of
    /// Q8_1: Q4_K's mins are large, and that rounding moved Gemma 3's perplexity 0.6% from
    /// llama.cpp's, against 0.3%).
    pub(crate) fn matmul_quantized(&self, acts: &QuantActs, y: &mut [f32]) {
        assert_eq!(acts.nb, self.nb, "packed matmul: activation blocks");
        assert_eq!(y.len(), acts.rows * self.n, "packed matmul: output size");
        assert!(acts.qs.len() >= acts.rows * self.nb * QK && acts.d.len() >= acts.rows * self.nb);
        assert!(acts.s.len() >= acts.rows * self.nb);
        // `new` made this only on such a CPU; asserted again because `group` relies on it.
        assert!(Isa::Avx512Vnni.runs_here());
        // SAFETY: the same memory read as u8 instead of i8 (same size and alignment), borrowed
        // as long as `acts`; the kernels load it as `vpdpbusd`'s signed operand.
        let xs: &[u8] =
            unsafe { std::slice::from_raw_parts(acts.qs.as_ptr() as *const u8, acts.qs.len()) };
        assert!(acts.sums.len() >= acts.rows * self.nb);
        assert!(acts.half_sums.len() >= acts.rows * self.nb);
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
                        GgmlDType::Q4K => {
                            let src = &w[(r * nb / 8 + b / 8) * Q4_K_BYTES..][..Q4_K_BYTES];
                            let mut q = [0u8; QK_K];
                            kquant::decode(GgmlDType::Q4K, src, &mut q);
                            let (sc, mn) = kquant::scales_raw(src)[b % 8];
                            let v = &q[32 * (b % 8)..][..QK];
                            let dot: i32 = (0..QK).map(|e| v[e] as i32 * x[e] as i32).sum();
                            let d1 = half_at(src, 0).to_f32() * sc as f32;
                            let m1 = half_at(src, 2).to_f32() * mn as f32;
                            acc = (d1 * xd).mul_add(dot as f32, acc);
                            let sum: i32 = x.iter().map(|&q| q as i32).sum();
                            mins = (-m1).mul_add(xd * sum as f32, mins);
                        }
                        GgmlDType::Q6K => {
                            let src = &w[(r * nb / 8 + b / 8) * Q6_K_BYTES..][..Q6_K_BYTES];
                            let mut q = [0u8; QK_K];
                            kquant::decode(GgmlDType::Q6K, src, &mut q);
                            let v = &q[32 * (b % 8)..][..QK];
                            // Each half: Σ q6·x − 32·Σx, times its scale, in integers.
                            let dot: i32 = (0..2)
                                .map(|h| {
                                    let sc = src[192 + 2 * (b % 8) + h] as i8 as i32;
                                    let e = 16 * h..16 * h + 16;
                                    let half: i32 =
                                        e.map(|e| (v[e] as i32 - 32) * x[e] as i32).sum();
                                    sc * half
                                })
                                .sum();
                            acc = (half_at(src, 208).to_f32() * xd).mul_add(dot as f32, acc);
                        }
                        GgmlDType::Q5_0 => {
                            // ggml's `block_q5_0`: d, the fifth bits qh, 16 nibble bytes.
                            let src = &w[(r * nb + b) * Q5_0_BYTES..][..Q5_0_BYTES];
                            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                            let dot: i32 = (0..QK)
                                .map(|e| {
                                    let v = nibble(&src[6..], e) as i32
                                        | ((((qh >> e) & 1) as i32) << 4);
                                    (v - 16) * x[e] as i32
                                })
                                .sum();
                            acc = (half_at(src, 0).to_f32() * xd).mul_add(dot as f32, acc);
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

/// Row j's GGUF block `src` into its lanes of a group-block.
fn pack_block(dtype: GgmlDType, src: &[u8], j: usize, dst: &mut [u8]) {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 => {
            let (qs, tail) = if dtype == GgmlDType::Q4_1 {
                (&src[4..20], 256)
            } else {
                (&src[6..22], 320)
            };
            for p in 0..4 {
                for i in 0..4 {
                    dst[p * 64 + j * 4 + i] =
                        nibble(qs, 8 * p + i) | (nibble(qs, 8 * p + 4 + i) << 4);
                }
            }
            dst[tail + 2 * j..][..2].copy_from_slice(&src[0..2]);
            if dtype == GgmlDType::Q4_1 {
                dst[288 + 2 * j..][..2].copy_from_slice(&src[2..4]);
            } else {
                let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                for c in 0..8 {
                    let bits = ((qh >> (4 * c)) & 0xF) as u8;
                    // Bits 4j..4j+3 of mask c: byte j / 2, nibble j % 2.
                    dst[256 + 8 * c + j / 2] |= bits << (4 * (j % 2));
                }
            }
        }
        _ => {
            for c in 0..8 {
                for i in 0..4 {
                    dst[c * 64 + j * 4 + i] = src[2 + 4 * c + i] ^ 0x80;
                }
            }
            dst[512 + 2 * j..][..2].copy_from_slice(&src[0..2]);
        }
    }
}

/// Row j's 32 values of a group-block as the signed integers they stand for (Q4_1: 0..15,
/// Q5_0: −16..15, Q8_0: −128..127), and its d (and Q4_1's m).
fn unpack_block(dtype: GgmlDType, blk: &[u8], j: usize) -> ([i32; QK], f16, f16) {
    let mut v = [0i32; QK];
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 => {
            for p in 0..4 {
                for i in 0..4 {
                    let q = blk[p * 64 + j * 4 + i];
                    v[8 * p + i] = (q & 0x0F) as i32;
                    v[8 * p + 4 + i] = (q >> 4) as i32;
                }
            }
            if dtype == GgmlDType::Q4_1 {
                return (v, half_at(blk, 256 + 2 * j), half_at(blk, 288 + 2 * j));
            }
            for c in 0..8 {
                let bits = (blk[256 + 8 * c + j / 2] >> (4 * (j % 2))) & 0xF;
                for i in 0..4 {
                    v[4 * c + i] += (((bits >> i) & 1) as i32) * 16 - 16;
                }
            }
            (v, half_at(blk, 320 + 2 * j), f16::ZERO)
        }
        _ => {
            for c in 0..8 {
                for i in 0..4 {
                    v[4 * c + i] = (blk[c * 64 + j * 4 + i] ^ 0x80) as i8 as i32;
                }
            }
            (v, half_at(blk, 512 + 2 * j), f16::ZERO)
        }
    }
}

/// Row j's Q4_K super-block `src` into its lanes of a group's super-block.
fn pack_q4k(src: &[u8], j: usize, dst: &mut [u8]) {
    let mut q = [0u8; QK_K];
    kquant::decode(GgmlDType::Q4K, src, &mut q);
    let s = kquant::scales_raw(src);
    for (i, sub) in dst[..8 * Q4_K_GROUP_SUB]
        .chunks_exact_mut(Q4_K_GROUP_SUB)
        .enumerate()
    {
        let v = &q[32 * i..32 * i + 32];
        for p in 0..4 {
            for t in 0..4 {
                sub[p * 64 + j * 4 + t] = v[8 * p + t] | (v[8 * p + 4 + t] << 4);
            }
        }
        (sub[256 + j], sub[272 + j]) = s[i];
    }
    let tail = 8 * Q4_K_GROUP_SUB;
    dst[tail + 2 * j..][..2].copy_from_slice(&src[0..2]);
    dst[tail + 32 + 2 * j..][..2].copy_from_slice(&src[2..4]);
}

/// Row j's 32 values (0..15) of a Q4_K group block, its scale and its min.
fn unpack_q4k_block(blk: &[u8], j: usize) -> ([i32; QK], u8, u8) {
    let mut v = [0i32; QK];
    for p in 0..4 {
        for t in 0..4 {
            let q = blk[p * 64 + j * 4 + t];
            v[8 * p + t] = (q & 0x0F) as i32;
            v[8 * p + 4 + t] = (q >> 4) as i32;
        }
    }
    (v, blk[256 + j], blk[272 + j])
}

/// Row j's Q6_K super-block `src` (ggml's `block_q6_K`: ql, qh, 16 scales, d) into its lanes
/// of a group's super-block: per 32 values the nibbles as Q4_1's, then mask c of bit 4 and
/// mask c of bit 5 (bit 4j+i: row j's value 4c+i), then the scales of values 0..16 and
/// 16..32 (16 × i8 each); after the eight, d (16 × f16).
fn pack_q6k(src: &[u8], j: usize, dst: &mut [u8]) {
    let mut q = [0u8; QK_K];
    kquant::decode(GgmlDType::Q6K, src, &mut q);
    for (i, sub) in dst[..8 * Q6_K_GROUP_SUB]
        .chunks_exact_mut(Q6_K_GROUP_SUB)
        .enumerate()
    {
        let v = &q[32 * i..32 * i + 32];
        for p in 0..4 {
            for t in 0..4 {
                sub[p * 64 + j * 4 + t] = (v[8 * p + t] & 0x0F) | ((v[8 * p + 4 + t] & 0x0F) << 4);
            }
        }
        for (plane, bit) in [(256, 4), (320, 5)] {
            for c in 0..8 {
                let bits = (0..4).fold(0u8, |m, t| m | (((v[4 * c + t] >> bit) & 1) << t));
                sub[plane + 8 * c + j / 2] |= bits << (4 * (j % 2));
            }
        }
        sub[384 + j] = src[192 + 2 * i];
        sub[400 + j] = src[192 + 2 * i + 1];
    }
    let tail = 8 * Q6_K_GROUP_SUB;
    dst[tail + 2 * j..][..2].copy_from_slice(&src[208..210]);
}

/// Row j's 32 values (0..63) of a Q6_K group block and the scales of its two halves.
fn unpack_q6k_block(blk: &[u8], j: usize) -> ([i32; QK], [i8; 2]) {
    let (mut v, _, _) = unpack_q4k_block(blk, j);
    for (plane, add) in [(256, 16), (320, 32)] {
        for c in 0..8 {
            let bits = (blk[plane + 8 * c + j / 2] >> (4 * (j % 2))) & 0xF;
            for t in 0..4 {
                v[4 * c + t] += ((bits >> t) & 1) as i32 * add;
            }
        }
    }
    (v, [blk[384 + j] as i8, blk[400 + j] as i8])
}

/// Row j's Q4_K GGUF super-block from a group's super-block `sup`: the 6-bit scales and mins
/// packed back as ggml's `get_scale_min_k4` reads them (every one of the 96 bits is used, so
/// this is exact).
fn q4k_super_block(sup: &[u8], j: usize, dst: &mut [u8]) {
    let tail = 8 * Q4_K_GROUP_SUB;
    dst[0..2].copy_from_slice(&sup[tail + 2 * j..][..2]);
    dst[2..4].copy_from_slice(&sup[tail + 32 + 2 * j..][..2]);
    let (mut sc, mut mn, mut v) = ([0u8; 8], [0u8; 8], [0u8; QK_K]);
    for i in 0..8 {
        let (vals, s, m) = unpack_q4k_block(&sup[i * Q4_K_GROUP_SUB..], j);
        (sc[i], mn[i]) = (s, m);
        for (o, x) in v[32 * i..32 * i + 32].iter_mut().zip(vals) {
            *o = x as u8;
        }
    }
    let s = &mut dst[4..16];
    for i in 0..4 {
        s[i] = (sc[i] & 63) | ((sc[i + 4] >> 4) << 6);
        s[i + 4] = (mn[i] & 63) | ((mn[i + 4] >> 4) << 6);
        s[i + 8] = (sc[i + 4] & 0x0F) | ((mn[i + 4] & 0x0F) << 4);
    }
    for c in 0..4 {
        for l in 0..32 {
            dst[16 + 32 * c + l] = v[64 * c + l] | (v[64 * c + 32 + l] << 4);
        }
    }
}

/// Row j's Q6_K GGUF super-block from a group's super-block `sup` (ql, qh, scales, d: the
/// inverse of `kquant::decode`).
fn q6k_super_block(sup: &[u8], j: usize, dst: &mut [u8]) {
    let mut q = [0u8; QK_K];
    for i in 0..8 {
        let (vals, sc) = unpack_q6k_block(&sup[i * Q6_K_GROUP_SUB..], j);
        for (o, x) in q[32 * i..32 * i + 32].iter_mut().zip(vals) {
            *o = x as u8;
        }
        dst[192 + 2 * i] = sc[0] as u8;
        dst[192 + 2 * i + 1] = sc[1] as u8;
    }
    for n in 0..2 {
        for l in 0..32 {
            let v = |o: usize| q[128 * n + o + l];
            dst[64 * n + l] = (v(0) & 0x0F) | ((v(64) & 0x0F) << 4);
            dst[64 * n + 32 + l] = (v(32) & 0x0F) | ((v(96) & 0x0F) << 4);
            dst[128 + 32 * n + l] =
                (v(0) >> 4) | ((v(32) >> 4) << 2) | ((v(64) >> 4) << 4) | ((v(96) >> 4) << 6);
        }
    }
    let tail = 8 * Q6_K_GROUP_SUB;
    dst[208..210].copy_from_slice(&sup[tail + 2 * j..][..2]);
}

impl Packed {
    /// Row r's values in f32, as candle dequantizes GGUF blocks (Q4_1: q·d + m; Q8_0: q·d).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() == self.nb * QK, "packed row {r}");
        for b in 0..self.nb {
            let o = &mut out[b * QK..(b + 1) * QK];
            if self.dtype == GgmlDType::Q6K {
                // candle's `d * sc * (q − 32)`, left to right.
                let (v, d, sc) = self.q6k_block_values(r, b);
                for (e, (o, v)) in o.iter_mut().zip(v).enumerate() {
                    *o = d * sc[e / 16] as f32 * v as f32;
                }
                continue;
            }
            let (v, d, m) = self.block_values(r, b);
            for (o, v) in o.iter_mut().zip(v) {
                *o = match self.dtype {
                    GgmlDType::Q4_1 => v as f32 * d + m,
                    // candle's `d1 * q - m1`, m = −m1.
                    GgmlDType::Q4K => d * v as f32 - (-m),
                    _ => v as f32 * d,
                };
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
        if k_quant(self.dtype) {
            return self.unpack_k_quant();
        }
        let (bytes, blk) = sizes(self.dtype).expect("a packable type");
        let gb = self.group_bytes();
        let mut w = vec![0u8; self.n * self.nb * bytes];
        for r in 0..self.n {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..self.nb {
                let dst = &mut w[(r * self.nb + b) * bytes..][..bytes];
                let (v, d, m) = unpack_block(self.dtype, &self.data[g * gb + b * blk..][..blk], j);
                dst[0..2].copy_from_slice(&d.to_le_bytes());
                match self.dtype {
                    GgmlDType::Q4_1 | GgmlDType::Q5_0 => {
                        let q4 = self.dtype == GgmlDType::Q4_1;
                        let u: Vec<u8> = v
                            .iter()
                            .map(|&v| (v + if q4 { 0 } else { 16 }) as u8)
                            .collect();
                        let qs = if q4 {
                            dst[2..4].copy_from_slice(&m.to_le_bytes());
                            4
                        } else {
                            let qh = (0..QK).fold(0u32, |h, e| h | (((u[e] >> 4) as u32) << e));
                            dst[2..6].copy_from_slice(&qh.to_le_bytes());
                            6
                        };
                        for e in 0..16 {
                            dst[qs + e] = (u[e] & 0x0F) | ((u[e + 16] & 0x0F) << 4);
                        }
                    }
                    _ => {
                        for (d, v) in dst[2..].iter_mut().zip(v) {
                            *d = v as i8 as u8;
                        }
                    }
                }
            }
        }
        w
    }

    /// A K-quant's GGUF super-blocks again, row by row (`q4k_super_block`, `q6k_super_block`).
    fn unpack_k_quant(&self) -> Vec<u8> {
        let (bytes, _, sup_bytes) = k_sizes(self.dtype);
        let (gb, supers) = (self.group_bytes(), self.nb / 8);
        let mut w = vec![0u8; self.n * supers * bytes];
        for r in 0..self.n {
            let (g, j) = (r / GROUP, r % GROUP);
            let group = &self.data[g * gb..][..gb];
            for sb in 0..supers {
                let dst = &mut w[(r * supers + sb) * bytes..][..bytes];
                let sup = &group[sb * sup_bytes..][..sup_bytes];
                if self.dtype == GgmlDType::Q6K {
                    q6k_super_block(sup, j, dst);
                } else {
                    q4k_super_block(sup, j, dst);
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
    static ACTS: RefCell<QuantActs> = RefCell::new(Default::default());
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::GROUP;
    use super::Packed;
    use crate::kernels::quant_matmul::{QK, QuantActs};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    /// Tokens per tile: accumulators for 4 tokens and the 8 weight registers fit the 32 zmm.
    const T: usize = 4;

    /// Every token × the 16 rows of group g.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, VNNI and BW; g < ⌈p.n / 16⌉; `acts` holds acts.rows tokens of
    /// p.nb blocks (qs, d, s, sums) and `xs` acts.rows × p.nb × 32 bytes; `y` is valid for writes of acts.rows × p.n floats, and no other
    /// thread touches its columns 16g..16g+16 meanwhile.
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
        let q5 = p.dtype == GgmlDType::Q5_0;
        let q4k = p.dtype == GgmlDType::Q4K;
        let q6k = p.dtype == GgmlDType::Q6K;
        // Hoisted out of the block loop (a per-block lookup cost 8% of a Q8_0 prompt).
        let group_block = super::sizes(p.dtype).map_or(0, |s| s.1);
        // SAFETY: group g < ⌈n / 16⌉ starts inside `p.data` (groups × group_bytes bytes).
        let base = unsafe { p.data.as_ptr().add(g * p.group_bytes()) };
        let mut acc = [_mm512_setzero_ps(); TT];
        let mut mins = [_mm512_setzero_ps(); TT];
        let x = xs.as_ptr();
        // SAFETY: block b < nb of group g lies in `p.data` (the loads read its 320, 352, 288
        // or 544 bytes, and Q4_K's super-block tail of 64); token t0 + t < acts.rows, so its 32 activation bytes in `xs`, its d and s and
        // its sum are in bounds; the masked store writes only columns r0..r0+keep (< n) of those tokens,
        // the ones the contract gives this call.
        unsafe {
            for b in 0..nb {
                let mut w = [_mm512_setzero_si512(); 8];
                let d;
                let mut mw = _mm512_setzero_ps();
                let (mut sc_lo, mut sc_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                let blk = if q4k {
                    base.add(b / 8 * super::Q4_K_GROUP_SUPER + b % 8 * super::Q4_K_GROUP_SUB)
                } else if q6k {
                    base.add(b / 8 * super::Q6_K_GROUP_SUPER + b % 8 * super::Q6_K_GROUP_SUB)
                } else {
                    base.add(b * group_block)
                };
                if q4 || q5 || q4k || q6k {
                    let mask = _mm512_set1_epi8(0x0F);
                    for i in 0..4 {
                        let z = _mm512_loadu_si512(blk.add(64 * i) as *const _);
                        w[2 * i] = _mm512_and_si512(z, mask);
                        w[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(z, 4), mask);
                    }
                    if q4 {
                        d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256) as *const __m256i));
                        mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(288) as *const __m256i));
                    } else if q4k {
                        // d·sc and dmin·mn (exact); mw is the min's magnitude here, subtracted
                        // below.
                        let sup =
                            base.add(b / 8 * super::Q4_K_GROUP_SUPER + 8 * super::Q4_K_GROUP_SUB);
                        let dd = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                        let dm = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(32) as *const __m256i));
                        let byte_lanes = |at: usize| {
                            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                                blk.add(at) as *const __m128i
                            )))
                        };
                        d = _mm512_mul_ps(dd, byte_lanes(256));
                        mw = _mm512_mul_ps(dm, byte_lanes(272));
                    } else if q6k {
                        // Bits 4 and 5: 16 and 32 added to the bytes masks c name; the
                        // halves' signed scales as 32-bit lanes; d per row.
                        for (plane, add) in [(256, 16), (320, 32)] {
                            let masks = blk.add(plane) as *const u64;
                            let add = _mm512_set1_epi8(add);
                            for (c, wc) in w.iter_mut().enumerate() {
                                let k = _cvtu64_mask64(masks.add(c).read_unaligned());
                                *wc = _mm512_mask_add_epi8(*wc, k, *wc, add);
                            }
                        }
                        let scales = |at: usize| {
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(at) as *const __m128i))
                        };
                        (sc_lo, sc_hi) = (scales(384), scales(400));
                        let sup =
                            base.add(b / 8 * super::Q6_K_GROUP_SUPER + 8 * super::Q6_K_GROUP_SUB);
                        d = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                    } else {
                        // The fifth bits: 16 added to the bytes mask c names.
                        let sixteen = _mm512_set1_epi8(16);
                        let masks = blk.add(256) as *const u64;
                        for (c, wc) in w.iter_mut().enumerate() {
                            let k = _cvtu64_mask64(masks.add(c).read_unaligned());
                            *wc = _mm512_mask_add_epi8(*wc, k, *wc, sixteen);
                        }
                        d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(320) as *const __m256i));
                    }
                } else {
                    for (i, wi) in w.iter_mut().enumerate() {
                        *wi = _mm512_loadu_si512(blk.add(64 * i) as *const _);
                    }
                    d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512) as *const __m256i));
                }
                for t in 0..TT {
                    let xi = (t0 + t) * nb + b;
                    let xa = x.add(xi * QK) as *const i32;
                    let at = |c: usize| _mm512_set1_epi32(xa.add(c).read_unaligned());
                    // Two chains for latency, values 0..16 and 16..32 (integer sums are exact in
                    // any order; Q6_K scales the halves apart). Weights are unsigned (Q4_1 0..15,
                    // Q5_0 q5 = q+16, Q6_K q6 = q+32, Q8_0 q+128), activations signed.
                    let sum = *acts.sums.get_unchecked(xi);
                    let (mut s0, mut s1) = if q6k {
                        let lo = *acts.half_sums.get_unchecked(xi);
                        (
                            _mm512_set1_epi32(-32 * lo),
                            _mm512_set1_epi32(-32 * (sum - lo)),
                        )
                    } else {
                        let start = match (q4 || q4k, q5) {
                            (true, _) => _mm512_setzero_si512(),
                            (false, true) => _mm512_set1_epi32(-16 * sum),
                            (false, false) => _mm512_set1_epi32(-128 * sum),
                        };
                        (start, _mm512_setzero_si512())
                    };
                    for c in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, w[c], at(c));
                        s1 = _mm512_dpbusd_epi32(s1, w[c + 4], at(c + 4));
                    }
                    let dot = if q6k {
                        _mm512_add_epi32(
                            _mm512_mullo_epi32(s0, sc_lo),
                            _mm512_mullo_epi32(s1, sc_hi),
                        )
                    } else {
                        _mm512_add_epi32(s0, s1)
                    };
                    let dot = _mm512_cvtepi32_ps(dot);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*acts.d.get_unchecked(xi)));
                    acc[t] = _mm512_fmadd_ps(scale, dot, acc[t]);
                    if q4 {
                        mins[t] =
                            _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts.s.get_unchecked(xi)), mins[t]);
                    } else if q4k {
                        let sx = *acts.d.get_unchecked(xi) * *acts.sums.get_unchecked(xi) as f32;
                        mins[t] = _mm512_fnmadd_ps(mw, _mm512_set1_ps(sx), mins[t]);
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
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let shapes: &[(usize, usize, usize)] = if k_quant(dtype) {
                &[(1, 256, 40), (5, 512, 37), (9, 256, 17), (3, 1024, 16)]
            } else {
                &[
                    (1, 64, 40),
                    (5, 96, 37),
                    (9, 32, 17),
                    (4, 128, 64),
                    (3, 576, 16),
                ]
            };
            for &(m, k, n) in shapes {
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
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (n, k) = (37, if k_quant(dtype) { 512 } else { 96 });
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
