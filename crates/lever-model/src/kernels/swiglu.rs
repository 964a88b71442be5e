//! SwiGLU's elementwise step on the host, for inference.
//!
//! `unsafe`: each chunk of the output is written from its own thread.
#![allow(unsafe_code)]

use super::pool::{SyncPtr, parallel};

/// SwiGLU's silu(g) ⊙ u for inference, with candle's silu (g / (1 + e^−g)) and then the
/// product, so the values are those of the two tensor ops; one pass, over the threads.
pub(crate) fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len());
    const CHUNK: usize = 2048;
    let mut y = vec![0f32; g.len()];
    let ptr = SyncPtr(y.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        let ptr = &ptr;
        for c in range {
            let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(g.len()));
            // SAFETY: a ≤ b ≤ y.len(), and chunk c (run once) is the only writer of y[a..b].
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
