//! Ingest rate and search latency of the document index (`bench/index-100k.sh` runs this).
//!
//! ```text
//! cargo run --release -p lever-rag --example index_bench -- SCIFACT_DIR ENCODER_DIR \
//!     [--docs 1000] [--chunks 100000] [--queries 200]
//! ```
//!
//! 1. **Ingest with the real encoder**: the first `--docs` SciFact abstracts, one file each,
//!    through `Index::add` with all-MiniLM-L6-v2 (read, chunk, embed, write): docs/s, chunks/s.
//! 2. **An index of `--chunks` chunks**: the SciFact abstracts, copied into as many folders as
//!    it takes, cut into 64-token windows. Embedding 100k chunks with the real encoder takes
//!    most of an hour on two cores, so these vectors come from `HashEmbed` (384 dimensions, a
//!    hashed bag of words): search does the same work on them (same dimension, same count),
//!    only the ranking means nothing. The store's own rate (docs/s without the encoder) is
//!    printed too.
//! 3. **Search latency** of SciFact's queries on that index, one query at a time in a warm
//!    process, per mode (dense exact, dense HNSW, BM25, hybrid): p50/p99 in ms, plus the time
//!    of the first query (loading or building bm25.bin / hnsw.bin). Separately, the real
//!    encoder's time to embed one query (p50/p99), which the dense and hybrid modes add.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use lever_model::Encoder;
use lever_rag::chunk::{ChunkMode, ChunkSettings};
use lever_rag::embedder::BertEmbed;
use lever_rag::ingest::AddOptions;
use lever_rag::retrieve::{DenseIndex, Mode, Retriever};
use lever_rag::store::Index;
use lever_rag::testing::HashEmbed;
use lever_rag::{Embed, beir};

struct Args {
    scifact: PathBuf,
    encoder: PathBuf,
    docs: usize,
    chunks: u64,
    queries: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut pos = Vec::new();
    let (mut docs, mut chunks, mut queries) = (1000, 100_000, 200);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} {v}"))
        };
        match a.as_str() {
            "--docs" => docs = value("--docs")? as usize,
            "--chunks" => chunks = value("--chunks")?,
            "--queries" => queries = value("--queries")? as usize,
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [scifact, encoder] = <[PathBuf; 2]>::try_from(pos).map_err(|_| {
        anyhow::anyhow!(
            "usage: index_bench SCIFACT_DIR ENCODER_DIR [--docs N] [--chunks N] [--queries N]"
        )
    })?;
    Ok(Args {
        scifact,
        encoder,
        docs,
        chunks,
        queries,
    })
}

/// Writes `docs` as one .txt file each under `dir`.
fn write_docs(dir: &Path, docs: &[beir::Doc]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:05}.txt")), d.contents())?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p50 and p99 of `ms`.
fn p50_p99(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let corpus = ["corpus.jsonl.gz", "corpus.jsonl"]
        .iter()
        .map(|f| a.scifact.join(f))
        .find(|p| p.exists())
        .with_context(|| format!("{}: no corpus.jsonl(.gz)", a.scifact.display()))?;
    let docs = beir::load_corpus(&corpus)?;
    let queries: Vec<String> = beir::load_queries(&a.scifact.join("queries.jsonl"))?
        .into_iter()
        .take(a.queries)
        .map(|q| q.text)
        .collect();
    let tmp = tempfile::tempdir()?;
    let quiet = &mut |_: lever_rag::ingest::Event<'_>| {};

    // 1. The real encoder.
    let encoder = BertEmbed::new(Encoder::load(&a.encoder)?.with_batch_size(32))?;
    let n = a.docs.min(docs.len());
    let real_dir = tmp.path().join("real-docs");
    write_docs(&real_dir, &docs[..n])?;
    let mut index = Index::create(
        &tmp.path().join("real"),
        &encoder,
        &ChunkSettings::default(),
    )?;
    let t = Instant::now();
    let report = index.add(&[&real_dir], &encoder, &AddOptions::default(), quiet)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "ingest, all-MiniLM-L6-v2: {} SciFact abstracts -> {} chunks in {s:.1} s: {:.1} docs/s, {:.1} chunks/s",
        report.added,
        report.chunks,
        report.added as f64 / s,
        report.chunks as f64 / s
    );
    let mut embed_ms = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        encoder.embed(&[q.as_str()])?;
        embed_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (p50, p99) = p50_p99(embed_ms);
    println!("query embedding, all-MiniLM-L6-v2: p50 {p50:.2} ms, p99 {p99:.2} ms");

    // 2. An index of `chunks` chunks.
    let hash = HashEmbed::new(384);
    let settings = ChunkSettings {
        mode: ChunkMode::Tokens,
        size: 64,
        overlap: 0,
    };
    let dir = tmp.path().join("big");
    let mut index = Index::create(&dir, &hash, &settings)?;
    let (mut files, mut seconds, mut copy) = (0usize, 0f64, 0);
    while index.stats()?.chunks < a.chunks {
        copy += 1;
        let src = tmp.path().join(format!("copy{copy}"));
        write_docs(&src, &docs)?;
        let t = Instant::now();
        let r = index.add(&[&src], &hash, &AddOptions::default(), quiet)?;
        seconds += t.elapsed().as_secs_f64();
        files += r.added;
        if r.chunks == 0 {
            bail!("copy {copy} added no chunks");
        }
    }
    let stats = index.stats()?;
    println!(
        "store without the encoder (HashEmbed): {files} files -> {} chunks in {seconds:.1} s: {:.0} docs/s",
        stats.chunks,
        files as f64 / seconds
    );
    drop(index);

    // 3. Search latency on it.
    let index = Index::open(&dir)?;
    println!(
        "search, {} chunks x 384 dims, {} SciFact queries, k 10, one at a time:",
        index.stats()?.chunks,
        queries.len()
    );
    let runs = [
        ("dense exact", Mode::Dense, DenseIndex::Exact),
        ("dense hnsw", Mode::Dense, DenseIndex::Hnsw),
        ("bm25", Mode::Bm25, DenseIndex::Auto),
        ("hybrid (hnsw)", Mode::Hybrid, DenseIndex::Hnsw),
    ];
    for (name, mode, dense) in runs {
        let mut r = Retriever::new(&index, dense);
        let t = Instant::now();
        r.search(&hash, &queries[0], mode, 10)?;
        let first = t.elapsed().as_secs_f64() * 1e3;
        let mut ms = Vec::with_capacity(queries.len());
        for q in &queries {
            let t = Instant::now();
            r.search(&hash, q, mode, 10)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (p50, p99) = p50_p99(ms);
        println!("  {name:<14} p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  (first query {first:.0} ms)");
    }
    Ok(())
}
