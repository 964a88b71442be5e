//! Choosing worked examples from the training split. Each selector returns training indices
//! ranked from most to least wanted; the prompt builder drops from the end of that ranking
//! when the token budget is short, so the examples that go are the least relevant ones.

use lever_model::rng::SplitMix64;

use crate::task::Select;

/// How to choose: the selector and its settings (`[fewshot]` in the task file).
#[derive(Debug, Clone, Copy)]
pub struct Selector<'a> {
    pub how: Select,
    pub seed: u64,
    pub fixed: Option<&'a [usize]>,
    pub lambda: f64,
}

/// Rank `k` training examples (out of `n`) for the question `q`.
///
/// - `fixed`: `fixed` if given, else 0..k — the same for every question;
/// - `random`: a seeded draw without replacement, different per question (`q`);
/// - `knn`: the k nearest by cosine (vectors L2-normalized, so a dot product);
/// - `mmr`: maximal marginal relevance (Carbonell & Goldstein 1998): each pick maximizes
///   λ·sim(question, d) − (1−λ)·max sim(d, already picked).
pub fn select(
    sel: &Selector,
    k: usize,
    n: usize,
    q: usize,
    sim: Option<(&[f32], &[Vec<f32>])>,
) -> Vec<usize> {
    let Selector {
        how,
        seed,
        fixed,
        lambda,
    } = *sel;
    let k = k.min(n);
    match how {
        Select::Fixed => match fixed {
            Some(f) => f.iter().copied().take(k).collect(),
            None => (0..k).collect(),
        },
        Select::Random => random_set(k, n, seed ^ (q as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        Select::Knn | Select::Mmr => {
            let Some((query, pool)) = sim else {
                return (0..k).collect();
            };
            let rel: Vec<f64> = pool.iter().map(|v| dot(query, v)).collect();
            if how == Select::Knn {
                let mut idx: Vec<usize> = (0..pool.len()).collect();
                // Most similar first; ties by index, so the ranking is deterministic.
                idx.sort_by(|&a, &b| rel[b].total_cmp(&rel[a]).then(a.cmp(&b)));
                idx.truncate(k);
                idx
            } else {
                mmr(&rel, pool, k, lambda)
            }
        }
    }
}

/// k distinct indices of 0..n, seeded (a partial Fisher-Yates shuffle).
pub fn random_set(k: usize, n: usize, seed: u64) -> Vec<usize> {
    SplitMix64(seed).choose(k, n)
}

fn mmr(rel: &[f64], pool: &[Vec<f32>], k: usize, lambda: f64) -> Vec<usize> {
    let mut picked: Vec<usize> = Vec::with_capacity(k);
    // max similarity of each candidate to the picked set so far.
    let mut redundancy = vec![f64::NEG_INFINITY; pool.len()];
    while picked.len() < k.min(pool.len()) {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..pool.len() {
            if picked.contains(&i) {
                continue;
            }
            let red = if picked.is_empty() {
                0.0
            } else {
                redundancy[i]
            };
            let score = lambda * rel[i] - (1.0 - lambda) * red;
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        let Some((i, _)) = best else { break };
        picked.push(i);
        for (j, r) in redundancy.iter_mut().enumerate() {
            *r = r.max(dot(&pool[i], &pool[j]));
        }
    }
    picked
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sel(how: Select, seed: u64, fixed: Option<&[usize]>, lambda: f64) -> Selector<'_> {
        Selector {
            how,
            seed,
            fixed,
            lambda,
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn fixed_and_random() {
        assert_eq!(
            select(&sel(Select::Fixed, 0, None, 0.5), 3, 10, 0, None),
            vec![0, 1, 2]
        );
        assert_eq!(
            select(
                &sel(Select::Fixed, 0, Some(&[7, 3, 1]), 0.5),
                2,
                10,
                5,
                None
            ),
            vec![7, 3]
        );
        let a = select(&sel(Select::Random, 42, None, 0.5), 4, 10, 0, None);
        let b = select(&sel(Select::Random, 42, None, 0.5), 4, 10, 0, None);
        let c = select(&sel(Select::Random, 42, None, 0.5), 4, 10, 1, None);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 4);
        assert!(a.iter().all(|&i| i < 10));
        // k beyond n takes all.
        assert_eq!(random_set(5, 3, 1).len(), 3);
    }

    #[test]
    fn knn_ranks_by_cosine_and_mmr_avoids_duplicates() {
        let pool = vec![
            unit(&[1.0, 0.0, 0.0]),  // 0: close to the query
            unit(&[1.0, 0.05, 0.0]), // 1: a near-copy of 0
            unit(&[0.6, 0.0, 0.8]),  // 2: less close, different
            unit(&[0.0, 1.0, 0.0]),  // 3: far
        ];
        let q = unit(&[1.0, 0.02, 0.3]);
        let knn = select(&sel(Select::Knn, 0, None, 0.5), 2, 4, 0, Some((&q, &pool)));
        assert_eq!(knn, vec![0, 1]);
        let m = select(&sel(Select::Mmr, 0, None, 0.5), 2, 4, 0, Some((&q, &pool)));
        assert_eq!(m, vec![0, 2]);
        // λ = 1 is knn.
        assert_eq!(
            select(&sel(Select::Mmr, 0, None, 1.0), 3, 4, 0, Some((&q, &pool))),
            vec![0, 1, 2]
        );
    }
}
