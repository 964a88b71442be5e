//! Ranked lists: the [`Hit`] every retriever returns, top-k selection with a bounded heap, and
//! reciprocal rank fusion (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms
//! Condorcet and individual Rank Learning Methods", SIGIR 2009):
//!
//! ```text
//! RRF(d) = Σ_lists 1 / (k + rank_list(d)),   rank starting at 1, k = 60 in the paper
//! ```
//!
//! A document missing from a list adds nothing for that list.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The constant k of reciprocal rank fusion, as chosen in Cormack et al. (2009).
pub const RRF_K: f32 = 60.0;

/// One retrieved item: its id (the store's chunk id) and its score (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
}

/// The order of a ranked list: higher score first, equal scores by smaller id, so that every
/// retriever's output is deterministic.
pub fn rank_order(a: &Hit, b: &Hit) -> Ordering {
    b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
}

/// A heap entry whose maximum is the hit that ranks last.
struct Last(Hit);

impl PartialEq for Last {
    fn eq(&self, other: &Self) -> bool {
        rank_order(&self.0, &other.0) == Ordering::Equal
    }
}
impl Eq for Last {}
impl PartialOrd for Last {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Last {
    fn cmp(&self, other: &Self) -> Ordering {
        rank_order(&self.0, &other.0)
    }
}

/// Keeps the `k` best hits pushed into it: O(n log k) for n pushes, no full sort.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Last>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.saturating_add(1).min(1 << 16)),
        }
    }

    /// Offers a hit; it is kept if fewer than k are held or it ranks before the worst held.
    #[inline]
    pub fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(Last(hit));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && rank_order(&hit, &worst.0) == Ordering::Less
        {
            *worst = Last(hit);
        }
    }

    /// The score a new hit must beat to enter once the heap is full (`None` until then).
    pub fn threshold(&self) -> Option<f32> {
        if self.heap.len() < self.k {
            None
        } else {
            self.heap.peek().map(|h| h.0.score)
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Merges another selection into this one (for parallel reductions).
    pub fn merge(mut self, other: TopK) -> TopK {
        for h in other.heap {
            self.push(h.0);
        }
        self
    }

    /// The hits held, best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.into_iter().map(|h| h.0).collect();
        hits.sort_by(rank_order);
        hits
    }
}

/// Fuses ranked lists (each best first) by reciprocal rank with constant `k` ([`RRF_K`] in the
/// paper), returning at most `limit` hits whose scores are the fused RRF scores, best first
/// (ties by smaller id). An id repeated within one list counts at its first (best) rank only.
pub fn rrf(lists: &[&[Hit]], k: f32, limit: usize) -> Vec<Hit> {
    let mut fused: HashMap<u64, f64> = HashMap::new();
    for list in lists {
        let mut seen = std::collections::HashSet::with_capacity(list.len());
        for (i, hit) in list.iter().enumerate() {
            if seen.insert(hit.id) {
                *fused.entry(hit.id).or_insert(0.0) += 1.0 / (f64::from(k) + (i + 1) as f64);
            }
        }
    }
    let mut top = TopK::new(limit);
    for (id, score) in fused {
        top.push(Hit {
            id,
            score: score as f32,
        });
    }
    top.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(ids: &[u64]) -> Vec<Hit> {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| Hit {
                id,
                score: 100.0 - i as f32,
            })
            .collect()
    }

    #[test]
    fn topk_keeps_best_with_id_tiebreak() {
        let mut top = TopK::new(3);
        for (id, score) in [(5, 1.0), (1, 3.0), (9, 2.0), (2, 2.0), (7, 0.5), (3, 3.0)] {
            top.push(Hit { id, score });
        }
        assert_eq!(top.threshold(), Some(2.0));
        let ids: Vec<u64> = top.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!(TopK::new(0).into_sorted().is_empty());
    }

    #[test]
    fn rrf_matches_hand_computed_scores() {
        // List A: 10, 20, 30.  List B: 30, 10, 40.  k = 60.
        //   10: 1/61 + 1/62 = 0.0325224749...
        //   30: 1/63 + 1/61 = 0.0322664585...
        //   20: 1/62        = 0.0161290322...
        //   40: 1/63        = 0.0158730158...
        let a = hits(&[10, 20, 30]);
        let b = hits(&[30, 10, 40]);
        let fused = rrf(&[&a, &b], RRF_K, 10);
        let ids: Vec<u64> = fused.iter().map(|h| h.id).collect();
        assert_eq!(ids, [10, 30, 20, 40]);
        let want = [
            0.032_522_475_f32,
            0.032_266_46,
            0.016_129_032,
            0.015_873_017,
        ];
        for (h, w) in fused.iter().zip(want) {
            assert!((h.score - w).abs() < 1e-8, "{} vs {w}", h.score);
        }
        assert_eq!(rrf(&[&a, &b], RRF_K, 2).len(), 2);
        // Equal fused scores fall back to the smaller id; a repeat in one list counts once.
        let c = hits(&[7, 7]);
        let d = hits(&[3]);
        let tie = rrf(&[&c, &d], RRF_K, 10);
        assert_eq!(tie.iter().map(|h| h.id).collect::<Vec<_>>(), [3, 7]);
        assert!((tie[0].score - 1.0 / 61.0).abs() < 1e-9);
    }
}
