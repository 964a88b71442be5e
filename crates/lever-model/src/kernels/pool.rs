//! How kernel work is spread over the threads (`--threads`): candle's persistent spinning
//! pool for small jobs, rayon's for large ones, and the pointer through which parallel tiles
//! write their own parts of one output buffer.
#![allow(unsafe_code)]

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

/// A raw pointer that tiles running on several threads write through, each into elements no
/// other tile touches.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: the pointer is only dereferenced inside `unsafe` blocks of the callers, each of
// which writes elements that no other thread reads or writes while the parallel call runs
// (and the buffer outlives the call, which returns after every thread is done).
unsafe impl<T> Sync for SyncPtr<T> {}
// SAFETY: as for `Sync`: sending the pointer to a worker thread shares nothing else.
unsafe impl<T> Send for SyncPtr<T> {}
