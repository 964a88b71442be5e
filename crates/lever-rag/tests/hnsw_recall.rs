//! HNSW recall@10 against exact search on 20,000 clustered, L2-normalized 384-dim vectors (the
//! all-MiniLM-L6-v2 width), seeded. Prints recall at several ef_search values and the speedup
//! over exact search; asserts recall@10 ≥ 0.95 at the default ef_search.

use std::time::Instant;

use lever_rag::exact;
use lever_rag::hnsw::{Hnsw, HnswParams, clustered_unit_vectors};

const N: usize = 20_000;
const DIM: usize = 384;
const QUERIES: usize = 200;
const K: usize = 10;

#[test]
fn hnsw_recall_at_10_vs_exact() {
    // 100 clusters; per-coordinate noise equal to the centre's scale, so a cluster is a broad
    // cloud (cosine to its centre ≈ 0.7) and neighbours are not trivially separated.
    // Held-out queries: the last QUERIES vectors of the same draw, not indexed.
    let all = clustered_unit_vectors(N + QUERIES, DIM, 100, 1.0, 2024);
    let (data, queries) = all.split_at(N * DIM);
    let ids: Vec<u64> = (0..N as u64).collect();

    let t = Instant::now();
    let mut graph = Hnsw::build(DIM, &ids, data, HnswParams::default()).expect("build");
    let build_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let truth: Vec<Vec<u64>> = queries
        .chunks_exact(DIM)
        .map(|q| {
            exact::search(data, DIM, &ids, q, K)
                .expect("exact")
                .iter()
                .map(|h| h.id)
                .collect()
        })
        .collect();
    let exact_s = t.elapsed().as_secs_f64() / QUERIES as f64;

    let default_ef = HnswParams::default().ef_search;
    let mut default_recall = 0.0;
    println!("HNSW on {N} x {DIM} (M=16, ef_construction=200): built in {build_s:.1} s");
    println!("exact search: {:.3} ms/query", exact_s * 1e3);
    for ef in [16, 32, 64, 128] {
        graph.set_ef_search(ef);
        let t = Instant::now();
        let results: Vec<Vec<u64>> = queries
            .chunks_exact(DIM)
            .map(|q| {
                graph
                    .search(q, K)
                    .expect("search")
                    .iter()
                    .map(|h| h.id)
                    .collect()
            })
            .collect();
        let hnsw_s = t.elapsed().as_secs_f64() / QUERIES as f64;
        let found: usize = results
            .iter()
            .zip(&truth)
            .map(|(r, t)| r.iter().filter(|id| t.contains(id)).count())
            .sum();
        let recall = found as f64 / (QUERIES * K) as f64;
        println!(
            "ef_search={ef:4}: recall@10 = {recall:.4}, {:.3} ms/query, speedup vs exact {:.1}x",
            hnsw_s * 1e3,
            exact_s / hnsw_s
        );
        if ef == default_ef {
            default_recall = recall;
        }
    }
    assert!(
        default_recall >= 0.95,
        "recall@10 at default ef_search {default_ef}: {default_recall}"
    );

    // Tombstone every 10th item: results must skip them and keep their recall against exact
    // search over the survivors.
    graph.set_ef_search(default_ef);
    let keep: Vec<usize> = (0..N).filter(|i| i % 10 != 3).collect();
    for i in (0..N).filter(|i| i % 10 == 3) {
        assert!(graph.remove(i as u64));
    }
    let kept_ids: Vec<u64> = keep.iter().map(|&i| i as u64).collect();
    let kept: Vec<f32> = keep
        .iter()
        .flat_map(|&i| data[i * DIM..(i + 1) * DIM].iter().copied())
        .collect();
    let mut found = 0;
    for q in queries.chunks_exact(DIM) {
        let want = exact::search(&kept, DIM, &kept_ids, q, K).expect("exact");
        let got = graph.search(q, K).expect("search");
        assert_eq!(got.len(), K);
        assert!(
            got.iter().all(|h| h.id % 10 != 3),
            "a deleted item was returned"
        );
        found += got
            .iter()
            .filter(|h| want.iter().any(|w| w.id == h.id))
            .count();
    }
    let recall = found as f64 / (QUERIES * K) as f64;
    println!("after deleting 10%: recall@10 = {recall:.4} at ef_search={default_ef}");
    assert!(recall >= 0.95, "recall@10 after deletions: {recall}");
}
