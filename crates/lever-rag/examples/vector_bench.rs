//! Exact vs HNSW search on seeded clustered unit vectors: exact search on one thread and on all
//! of rayon's, HNSW build time, and recall@10 / latency / speedup at several ef_search values.
//!
//! ```text
//! cargo run --release -p lever-rag --example vector_bench -- [N] [DIM] [QUERIES] [NOISE]
//! ```
//! Defaults: 20000 384 200 1.0 (the corpus of tests/hnsw_recall.rs); a larger NOISE spreads
//! the 100 clusters towards uniform vectors on the sphere, the hardest case for HNSW.

use std::time::Instant;

use lever_rag::exact;
use lever_rag::hnsw::{Hnsw, HnswParams, clustered_unit_vectors};

fn main() -> anyhow::Result<()> {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: f64| args.get(i).copied().unwrap_or(default);
    let (n, dim, nq) = (
        arg(0, 20_000.0) as usize,
        arg(1, 384.0) as usize,
        arg(2, 200.0) as usize,
    );
    let noise = arg(3, 1.0);
    let all = clustered_unit_vectors(n + nq, dim, 100, noise, 2024);
    let (data, queries) = all.split_at(n * dim);
    let ids: Vec<u64> = (0..n as u64).collect();
    let k = 10;

    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let t = Instant::now();
    let truth: Vec<Vec<u64>> = one.install(|| {
        queries
            .chunks_exact(dim)
            .map(|q| {
                Ok(exact::search(data, dim, &ids, q, k)?
                    .iter()
                    .map(|h| h.id)
                    .collect())
            })
            .collect::<lever_rag::Result<_>>()
    })?;
    let exact_1 = t.elapsed().as_secs_f64() / nq as f64;
    let t = Instant::now();
    for q in queries.chunks_exact(dim) {
        exact::search(data, dim, &ids, q, k)?;
    }
    let exact_all = t.elapsed().as_secs_f64() / nq as f64;
    let gflops = 2.0 * (n * dim) as f64 / exact_1 / 1e9;
    println!("{n} x {dim}, {nq} queries, k = {k}, noise {noise}");
    println!(
        "exact: {:.3} ms/query on 1 thread ({gflops:.1} GFLOP/s), {:.3} ms/query on {} threads",
        exact_1 * 1e3,
        exact_all * 1e3,
        rayon::current_num_threads()
    );

    let t = Instant::now();
    let mut graph = Hnsw::build(dim, &ids, data, HnswParams::default())?;
    println!(
        "HNSW build (M=16, ef_construction=200): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for ef in [16, 32, 64, 128, 256] {
        graph.set_ef_search(ef);
        let t = Instant::now();
        let mut found = 0;
        for (q, want) in queries.chunks_exact(dim).zip(&truth) {
            found += graph
                .search(q, k)?
                .iter()
                .filter(|h| want.contains(&h.id))
                .count();
        }
        let per = t.elapsed().as_secs_f64() / nq as f64;
        println!(
            "ef_search {ef:4}: recall@10 {:.4}, {:.3} ms/query, {:.1}x exact (1 thread), {:.1}x exact ({} threads)",
            found as f64 / (nq * k) as f64,
            per * 1e3,
            exact_1 / per,
            exact_all / per,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
