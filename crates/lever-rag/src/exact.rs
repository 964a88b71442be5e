//! Exact (brute-force) nearest neighbours by dot product over a contiguous row-major f32
//! matrix. lever's embedder L2-normalizes its vectors, so the dot product is the cosine
//! similarity. This is the reference every approximate index is measured against, and the
//! right index for small corpora (a 384-dim scan of 100k rows is ~40 M multiply-adds).
//!
//! The inner loop ([`dot`]) accumulates 16 independent lanes so that the compiler turns it
//! into SIMD multiply-adds without `unsafe` or intrinsics; large matrices are scanned in
//! parallel row blocks with rayon, each block keeping its own bounded heap ([`TopK`]).

use std::collections::HashMap;

use rayon::prelude::*;

use crate::fuse::{Hit, TopK};
use crate::{Error, Result};

/// Rows × dim above which a search is split across rayon's threads.
const PARALLEL_MIN_WORK: usize = 1 << 18;
/// Rows per parallel block.
const BLOCK_ROWS: usize = 1024;

/// The dot product of two equal-length slices (the shorter length if they differ).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// Checks that `data` holds `ids.len()` rows of `dim` and `query` has `dim` values.
fn check_shapes(data: &[f32], dim: usize, ids: &[u64], query: &[f32]) -> Result<()> {
    if dim == 0 || data.len() != ids.len() * dim {
        return Err(Error::Dim {
            what: format!("vector matrix of {} rows", ids.len()),
            expected: ids.len() * dim,
            got: data.len(),
        });
    }
    if query.len() != dim {
        return Err(Error::Dim {
            what: "query vector".into(),
            expected: dim,
            got: query.len(),
        });
    }
    Ok(())
}

/// The `k` rows of `data` (row-major, `dim` columns, row i has id `ids[i]`) with the largest
/// dot product with `query`, best first (equal scores: smaller id first).
pub fn search(data: &[f32], dim: usize, ids: &[u64], query: &[f32], k: usize) -> Result<Vec<Hit>> {
    check_shapes(data, dim, ids, query)?;
    let scan = |rows: &[f32], ids: &[u64]| {
        let mut top = TopK::new(k);
        for (row, &id) in rows.chunks_exact(dim).zip(ids) {
            top.push(Hit {
                id,
                score: dot(row, query),
            });
        }
        top
    };
    let top = if data.len() >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 {
        data.par_chunks(BLOCK_ROWS * dim)
            .zip(ids.par_chunks(BLOCK_ROWS))
            .map(|(rows, ids)| scan(rows, ids))
            .reduce(|| TopK::new(k), TopK::merge)
    } else {
        scan(data, ids)
    };
    Ok(top.into_sorted())
}

/// An in-memory matrix of vectors with ids, searched exactly. Removal swaps the last row into
/// the hole, so the matrix stays contiguous.
#[derive(Debug, Clone, Default)]
pub struct Flat {
    dim: usize,
    ids: Vec<u64>,
    data: Vec<f32>,
    row_of: HashMap<u64, usize>,
}

impl Flat {
    pub fn new(dim: usize) -> Flat {
        Flat {
            dim,
            ..Flat::default()
        }
    }

    /// A matrix from rows already laid out row-major; ids must be distinct.
    pub fn from_rows(dim: usize, ids: Vec<u64>, data: Vec<f32>) -> Result<Flat> {
        if dim == 0 || data.len() != ids.len() * dim {
            return Err(Error::Dim {
                what: format!("vector matrix of {} rows", ids.len()),
                expected: ids.len() * dim,
                got: data.len(),
            });
        }
        let mut row_of = HashMap::with_capacity(ids.len());
        for (row, &id) in ids.iter().enumerate() {
            if row_of.insert(id, row).is_some() {
                return Err(Error::Param {
                    name: "ids",
                    value: id.to_string(),
                    problem: "repeated id in the vector matrix",
                });
            }
        }
        Ok(Flat {
            dim,
            ids,
            data,
            row_of,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The vector of `id`.
    pub fn get(&self, id: u64) -> Option<&[f32]> {
        let row = *self.row_of.get(&id)?;
        Some(&self.data[row * self.dim..(row + 1) * self.dim])
    }

    /// Adds `vector` under `id`, replacing what `id` held.
    pub fn add(&mut self, id: u64, vector: &[f32]) -> Result<()> {
        if vector.len() != self.dim {
            return Err(Error::Dim {
                what: format!("vector {id}"),
                expected: self.dim,
                got: vector.len(),
            });
        }
        if let Some(&row) = self.row_of.get(&id) {
            self.data[row * self.dim..(row + 1) * self.dim].copy_from_slice(vector);
        } else {
            self.row_of.insert(id, self.ids.len());
            self.ids.push(id);
            self.data.extend_from_slice(vector);
        }
        Ok(())
    }

    /// Removes `id`; returns whether it was there.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(row) = self.row_of.remove(&id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.data
                .copy_within(last * self.dim..(last + 1) * self.dim, row * self.dim);
            self.row_of.insert(moved, row);
        }
        self.ids.pop();
        self.data.truncate(last * self.dim);
        true
    }

    /// The exact top `k` by dot product with `query`.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        search(&self.data, self.dim, &self.ids, query, k)
    }
}

/// The vectors of an index in one row-major `n × dim` matrix, for exact search.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorMatrix {
    pub dim: usize,
    /// The index generation these vectors were read at.
    pub generation: u64,
    /// Chunk id of each row.
    pub ids: Vec<u64>,
    /// `ids.len() × dim` values.
    pub data: Vec<f32>,
}

impl VectorMatrix {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The `k` rows with the largest dot product with `query`, best first; ties go to the
    /// smaller chunk id so results are deterministic ([`search`]).
    pub fn top_k(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        if query.len() != self.dim {
            return Err(Error::Embed(format!(
                "query vector has dimension {}, the index has {}",
                query.len(),
                self.dim
            )));
        }
        if self.is_empty() {
            return Ok(Vec::new());
        }
        search(&self.data, self.dim, &self.ids, query, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_for_every_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn search_finds_best_rows_serial_and_parallel() {
        // 2,000 rows of dim 160 (above the parallel threshold), row i at angle 0.003·i (< 2π).
        let dim = 160;
        let n = 2000;
        let mut data = Vec::with_capacity(n * dim);
        for i in 0..n {
            let t = i as f32 * 0.003;
            let mut row = vec![0f32; dim];
            row[0] = t.cos();
            row[1] = t.sin();
            data.extend_from_slice(&row);
        }
        let ids: Vec<u64> = (0..n as u64).map(|i| i * 10).collect();
        let mut q = vec![0f32; dim];
        let t = 500.4f32 * 0.003; // between rows 500 and 501: nearest 500, 501, 499, 502
        q[0] = t.cos();
        q[1] = t.sin();
        let hits = search(&data, dim, &ids, &q, 4).expect("shapes");
        let mut got: Vec<u64> = hits.iter().map(|h| h.id).collect();
        got.sort_unstable();
        assert_eq!(got, [4990, 5000, 5010, 5020]);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        // The serial path on a small slice gives the same ranking as the parallel one.
        let small = search(&data[..600 * dim], dim, &ids[..600], &q, 4).expect("shapes");
        assert_eq!(small, hits);
        assert!(search(&data, dim, &ids, &q[..3], 4).is_err());
        assert!(search(&data[1..], dim, &ids, &q, 4).is_err());
    }

    #[test]
    fn flat_add_remove_search() {
        let mut flat = Flat::new(2);
        flat.add(7, &[1.0, 0.0]).expect("dim");
        flat.add(8, &[0.0, 1.0]).expect("dim");
        flat.add(9, &[0.6, 0.8]).expect("dim");
        assert!(flat.add(10, &[1.0]).is_err());
        assert_eq!(flat.search(&[1.0, 0.0], 1).expect("dim")[0].id, 7);
        assert!(flat.remove(7));
        assert!(!flat.remove(7));
        assert_eq!(flat.len(), 2);
        assert_eq!(flat.get(9), Some(&[0.6f32, 0.8][..]));
        let hits = flat.search(&[1.0, 0.0], 5).expect("dim");
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), [9, 8]);
        assert!(Flat::from_rows(2, vec![1, 1], vec![0.0; 4]).is_err());
    }

    #[test]
    fn top_k_orders_by_score_then_id() {
        let m = VectorMatrix {
            dim: 2,
            generation: 1,
            ids: vec![10, 11, 12, 13],
            data: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 1.0, 0.0],
        };
        let hits = m.top_k(&[1.0, 0.0], 3).expect("dim");
        let got: Vec<(u64, f32)> = hits.iter().map(|h| (h.id, h.score)).collect();
        assert_eq!(got, [(10, 1.0), (13, 1.0), (12, 0.6)]);
        assert_eq!(m.top_k(&[1.0, 0.0], 0).expect("dim"), []);
        assert_eq!(m.top_k(&[1.0, 0.0], 99).expect("dim").len(), 4);
        assert!(m.top_k(&[1.0], 1).is_err());
    }
}
