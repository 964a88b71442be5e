//! Data parallelism over threads inside one process: a micro-batch's examples are split into
//! as many contiguous parts as there are threads, each part's forward and backward pass runs
//! on a thread of its own with every operation inside it on that thread alone (a one-thread
//! rayon pool per lane), and the parts' gradients are summed in lane order.
//!
//! Why: a small model's training step is hundreds of small operations (nanoGPT's
//! shakespeare-char recipe moves 768 × 128 activations); spread over the threads one
//! operation at a time, the threads meet at a barrier in each of them and the element-wise
//! ones hardly gain. Split by examples, they meet once per micro-batch, as the ranks of
//! PyTorch's DistributedDataParallel or llm.c's multi-GPU training meet once per step. The
//! sum over lanes has a fixed order, so a run gives the same numbers every time for a given
//! thread count (not across thread counts: the sums are grouped differently).

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

/// Stack of a lane's thread: a backward pass walks the graph recursively.
const LANE_STACK: usize = 16 << 20;

/// One-thread pools, one per lane, made when first needed and kept.
#[derive(Default)]
pub(crate) struct Lanes {
    pools: Vec<ThreadPool>,
}

impl Lanes {
    /// At least `n` lanes.
    pub(crate) fn ensure(&mut self, n: usize) -> Result<()> {
        while self.pools.len() < n {
            let i = self.pools.len();
            let pool = ThreadPoolBuilder::new()
                .num_threads(1)
                .stack_size(LANE_STACK)
                .thread_name(move |_| format!("lever-lane-{i}"))
                .build()
                .map_err(|e| Error::Config {
                    what: "training threads".into(),
                    problem: format!("cannot start lane {i}: {e}"),
                })?;
            self.pools.push(pool);
        }
        Ok(())
    }

    /// `work` on `items` cut into one contiguous part per lane (as many lanes as rayon has
    /// threads here, at most one per item, at most those made by [`Lanes::ensure`]); the
    /// results in part order. With one part it runs on the calling thread, where each
    /// operation may still use rayon's threads.
    pub(crate) fn run<T, R, F>(&self, items: &[T], work: F) -> Vec<R>
    where
        T: Sync,
        R: Send,
        F: Fn(&[T]) -> R + Sync,
    {
        let n = rayon::current_num_threads()
            .min(items.len())
            .min(self.pools.len());
        if n <= 1 {
            return vec![work(items)];
        }
        let parts = split(items, n);
        let work = &work;
        std::thread::scope(|s| {
            let rest: Vec<_> = parts[1..]
                .iter()
                .zip(&self.pools[1..])
                .map(|(part, pool)| s.spawn(move || pool.install(|| work(part))))
                .collect();
            let mut out = vec![self.pools[0].install(|| work(parts[0]))];
            for h in rest {
                match h.join() {
                    Ok(r) => out.push(r),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        })
    }
}

/// `items` in `n` contiguous parts whose sizes differ by at most one, the larger first.
fn split<T>(items: &[T], n: usize) -> Vec<&[T]> {
    let (base, extra) = (items.len() / n, items.len() % n);
    let mut parts = Vec::with_capacity(n);
    let mut rest = items;
    for i in 0..n {
        let (part, tail) = rest.split_at(base + usize::from(i < extra));
        parts.push(part);
        rest = tail;
    }
    parts
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_items_in_order() {
        let items: Vec<u32> = (0..7).collect();
        let parts = split(&items, 3);
        assert_eq!(parts, vec![&items[0..3], &items[3..5], &items[5..7]]);
        assert_eq!(split(&items, 7).len(), 7);
    }

    #[test]
    fn lanes_run_each_part_on_its_own_one_thread_pool_in_order() {
        let pool = ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut lanes = Lanes::default();
        lanes.ensure(3).unwrap();
        let items: Vec<u32> = (0..10).collect();
        let out = pool.install(|| {
            lanes.run(&items, |part| {
                (
                    part.to_vec(),
                    rayon::current_num_threads(),
                    std::thread::current().name().map(String::from),
                )
            })
        });
        assert_eq!(out.len(), 3);
        let joined: Vec<u32> = out.iter().flat_map(|(p, _, _)| p.clone()).collect();
        assert_eq!(joined, items);
        for (i, (_, threads, name)) in out.iter().enumerate() {
            assert_eq!(*threads, 1, "a lane's operations run on one thread");
            assert_eq!(name.as_deref(), Some(format!("lever-lane-{i}").as_str()));
        }
        // One item, or one thread: the calling thread does it all.
        let one = ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(one.install(|| lanes.run(&items, |p| p.len())), vec![10]);
    }
}
