//! BM25 on a BEIR folder (default: SciFact's train split in ../shared/data/scifact), with
//! ablations of the analyzer and of k1/b, evaluated as BEIR does.
//!
//! ```text
//! cargo run --release -p lever-rag --example scifact_bm25 -- [--dir DIR] [--split train]
//!     [--dump tokens.json]     # analyzer tokens + our top-10 scores (exact lengths) of 5
//!                              # queries, for scripts/check-bm25-rank-bm25.py
//!     [--export DIR]           # docs.tsv + queries.tsv for scripts/LuceneBm25Reference.java
//!     [--compare DIR]          # our tokens and scores vs Lucene's lucene_tokens.txt and
//!                              # lucene_run.tsv; both runs evaluated
//! ```
//!
//! scripts/lucene-bm25-reference.sh runs --export, Lucene, then --compare.
//!
//! "porter2" stems with the Snowball English stemmer (rust-stemmers, a dev-dependency) after
//! the same tokenizer, possessive filter, lowercasing and stopwords.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
        index.add_terms(i as u64, &tokens(v, &stemmer, &doc.contents()))?;
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

/// Text on one TSV line: tabs and line breaks become spaces (the analyzer splits on both).
fn one_line(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

fn export_tsv(data: &Beir, out: &Path) -> anyhow::Result<()> {
    let docs: String = data
        .corpus
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{i}\t{}\n", one_line(&d.contents())))
        .collect();
    let queries: String = data
        .queries
        .iter()
        .map(|q| format!("{}\t{}\n", q.id, one_line(&q.text)))
        .collect();
    std::fs::write(out.join("docs.tsv"), docs)?;
    std::fs::write(out.join("queries.tsv"), queries)?;
    Ok(())
}

fn compare_with_lucene(data: &Beir, work: &Path) -> anyhow::Result<()> {
    // Tokens: one line per doc, then per query.
    let analyzer = Analyzer::default();
    let lucene_tokens = std::fs::read_to_string(work.join("lucene_tokens.txt"))?;
    let texts: Vec<String> = data
        .corpus
        .iter()
        .map(|d| one_line(&d.contents()))
        .chain(data.queries.iter().map(|q| one_line(&q.text)))
        .collect();
    let (mut differ, mut tokens, mut token_diffs) = (0, 0, 0);
    for (n, (text, line)) in texts.iter().zip(lucene_tokens.lines()).enumerate() {
        let ours = analyzer.analyze(text);
        let theirs: Vec<&str> = line.split(' ').filter(|t| !t.is_empty()).collect();
        tokens += theirs.len();
        if ours != theirs {
            differ += 1;
            token_diffs += ours.len().abs_diff(theirs.len()).max(1);
            if differ <= 20 {
                let only_ours: Vec<&String> = ours
                    .iter()
                    .filter(|t| !theirs.contains(&t.as_str()))
                    .collect();
                let only_theirs: Vec<&&str> = theirs
                    .iter()
                    .filter(|t| !ours.contains(&t.to_string()))
                    .collect();
                println!(
                    "  text {n} differs: only ours {only_ours:?}, only Lucene {only_theirs:?}"
                );
            }
        }
    }
    println!(
        "tokens: {differ} of {} texts differ from Lucene's EnglishAnalyzer ({tokens} Lucene tokens, ~{token_diffs} differing)",
        texts.len()
    );
    // Lucene's run, and ours with Lucene's 1-byte lengths (the same formula, term for term).
    let mut lucene = Run::new();
    let mut lucene_score: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for line in std::fs::read_to_string(work.join("lucene_run.tsv"))?.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(cols.len() == 4, "bad lucene_run.tsv line {line:?}");
        let pos: usize = cols[1].parse()?;
        let score: f64 = cols[3].parse()?;
        lucene
            .entry(cols[0].to_string())
            .or_default()
            .push((data.corpus[pos].id.clone(), score));
        lucene_score.insert((cols[0].to_string(), pos as u64), score);
    }
    let params = Bm25Params {
        lucene_norms: true,
        ..Bm25Params::default()
    };
    let variant = Variant {
        name: "porter+stop, Lucene's 1-byte lengths",
        analyzer,
        porter2: false,
        params,
    };
    let (index, ours, _) = run_variant(&variant, data)?;
    let (mut same_top10, mut max_diff, mut compared) = (0, 0f64, 0);
    for q in &data.queries {
        let hits = index.search(&q.text, 100);
        for h in &hits {
            if let Some(s) = lucene_score.get(&(q.id.clone(), h.id)) {
                max_diff = max_diff.max((s - f64::from(h.score)).abs());
                compared += 1;
            }
        }
        let top = |run: &Run| -> Vec<String> {
            run.get(&q.id)
                .map(|v| v.iter().take(10).map(|h| h.0.clone()).collect())
                .unwrap_or_default()
        };
        if top(&ours) == top(&lucene) {
            same_top10 += 1;
        }
    }
    println!(
        "scores: {compared} (query, doc) pairs in both top-100s, max |lever - Lucene| = {max_diff:.2e}; identical top-10 lists: {same_top10} of {}",
        data.queries.len()
    );
    for (name, run) in [
        ("Lucene 8 BM25 (k1=0.9 b=0.4)", &lucene),
        ("lever BM25 (default params)", &ours),
    ] {
        let m = evaluate(&data.qrels, run, true).mean;
        println!(
            "{name:<38} nDCG@10 {:.4}  recall@100 {:.4}  MRR@10 {:.4}",
            m.ndcg_10, m.recall_100, m.mrr_10
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/scifact");
    let mut split = "train".to_string();
    let mut dump: Option<PathBuf> = None;
    let mut export: Option<PathBuf> = None;
    let mut compare: Option<PathBuf> = None;
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
            "--export" => export = Some(value()?.into()),
            "--compare" => compare = Some(value()?.into()),
            _ => anyhow::bail!("unknown argument {a}"),
        }
    }
    let data = beir::load(&dir, &split)?;
    if let Some(out) = export {
        return export_tsv(&data, &out);
    }
    if let Some(work) = compare {
        return compare_with_lucene(&data, &work);
    }
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
            name: "porter+stop, exact lengths",
            analyzer: porter,
            porter2: false,
            params: Bm25Params {
                lucene_norms: false,
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
        if let (Some(path), true) = (&dump, std::ptr::eq(v, &variants[5])) {
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
