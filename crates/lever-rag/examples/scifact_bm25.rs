//! BM25 on a BEIR folder (default: SciFact's train split in ../shared/data/scifact), with
//! ablations of the analyzer and of k1/b, evaluated as BEIR does.
//!
//! ```text
//! cargo run --release -p lever-rag --example scifact_bm25 -- [--dir DIR] [--split train]
//!     [--dump tokens.json]     # analyzer tokens + our top-10 scores of 5 queries, for
//!                              # scripts/check-bm25-rank-bm25.py
//! ```
//!
//! "porter2" stems with the Snowball English stemmer (rust-stemmers, a dev-dependency) after
//! the same tokenizer, possessive filter, lowercasing and stopwords.

use std::path::PathBuf;
use std::time::Instant;

use lever_rag::analyze::{Analyzer, Stemmer};
use lever_rag::beir::{self, Beir};
use lever_rag::bm25::{Bm25, Bm25Params};
use lever_rag::metrics::{Run, evaluate};

struct Variant {
    name: &'static str,
    analyzer: Analyzer,
    porter2: bool,
    params: Bm25Params,
}

fn tokens(v: &Variant, stemmer: &rust_stemmers::Stemmer, text: &str) -> Vec<String> {
    let terms = v.analyzer.analyze(text);
    if v.porter2 {
        terms.iter().map(|t| stemmer.stem(t).into_owned()).collect()
    } else {
        terms
    }
}

fn run_variant(v: &Variant, data: &Beir) -> anyhow::Result<(Bm25, Run, f64)> {
    let stemmer = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
    let t = Instant::now();
    let mut index = Bm25::new(v.params, v.analyzer)?;
    for (i, doc) in data.corpus.iter().enumerate() {
        index.add_terms(i as u64, &tokens(v, &stemmer, &doc.contents()));
    }
    let mut run = Run::new();
    for q in &data.queries {
        let hits = index.search_terms(&tokens(v, &stemmer, &q.text), 100);
        run.insert(
            q.id.clone(),
            hits.iter()
                .map(|h| (data.corpus[h.id as usize].id.clone(), f64::from(h.score)))
                .collect(),
        );
    }
    Ok((index, run, t.elapsed().as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/scifact");
    let mut split = "train".to_string();
    let mut dump: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--dir" => dir = value()?.into(),
            "--split" => split = value()?,
            "--dump" => dump = Some(value()?.into()),
            _ => anyhow::bail!("unknown argument {a}"),
        }
    }
    let data = beir::load(&dir, &split)?;
    println!(
        "{}: {} docs, {} judged queries ({split})",
        dir.display(),
        data.corpus.len(),
        data.queries.len()
    );
    let default = Bm25Params::default();
    let porter = Analyzer::default();
    let variants = [
        Variant {
            name: "porter+stop k1=0.9 b=0.4 (default)",
            analyzer: porter,
            porter2: false,
            params: default,
        },
        Variant {
            name: "porter, no stopwords",
            analyzer: Analyzer {
                stopwords: false,
                ..porter
            },
            porter2: false,
            params: default,
        },
        Variant {
            name: "no stemming +stop",
            analyzer: Analyzer {
                stemmer: Stemmer::None,
                ..porter
            },
            porter2: false,
            params: default,
        },
        Variant {
            name: "porter2 (snowball) +stop",
            analyzer: Analyzer {
                stemmer: Stemmer::None,
                ..porter
            },
            porter2: true,
            params: default,
        },
        Variant {
            name: "porter+stop k1=1.2 b=0.75",
            analyzer: porter,
            porter2: false,
            params: Bm25Params {
                k1: 1.2,
                b: 0.75,
                ..default
            },
        },
        Variant {
            name: "porter+stop, Lucene's 1-byte lengths",
            analyzer: porter,
            porter2: false,
            params: Bm25Params {
                lucene_norms: true,
                ..default
            },
        },
    ];
    println!(
        "{:<38} {:>8} {:>11} {:>8} {:>7}",
        "variant", "nDCG@10", "recall@100", "MRR@10", "secs"
    );
    for v in &variants {
        let (index, run, secs) = run_variant(v, &data)?;
        let m = evaluate(&data.qrels, &run, true).mean;
        println!(
            "{:<38} {:>8.4} {:>11.4} {:>8.4} {:>7.2}",
            v.name, m.ndcg_10, m.recall_100, m.mrr_10, secs
        );
        if let (Some(path), true) = (&dump, std::ptr::eq(v, &variants[0])) {
            let corpus: Vec<Vec<String>> = data
                .corpus
                .iter()
                .map(|d| porter.analyze(&d.contents()))
                .collect();
            let queries: Vec<serde_json::Value> = data
                .queries
                .iter()
                .take(5)
                .map(|q| {
                    let top: Vec<(u64, f32)> = index
                        .search(&q.text, 10)
                        .iter()
                        .map(|h| (h.id, h.score))
                        .collect();
                    serde_json::json!({"id": q.id, "tokens": porter.analyze(&q.text), "top": top})
                })
                .collect();
            let out = serde_json::json!({"k1": default.k1, "b": default.b, "corpus": corpus, "queries": queries});
            std::fs::write(path, serde_json::to_vec(&out)?)?;
            println!("  wrote {}", path.display());
        }
    }
    Ok(())
}
