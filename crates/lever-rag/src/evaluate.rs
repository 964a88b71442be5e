//! Retrieval evaluation on a BEIR folder: the corpus embedded once (title + " " + text, as
//! BEIR's SentenceBERT wrapper encodes it), BM25 over the same texts, each query answered by
//! the asked modes at depth 100, and nDCG@10 / recall@100 / MRR@10 as BEIR computes them.

use crate::beir::Beir;
use crate::bm25::{Bm25, Bm25Params};
use crate::fuse::{self, Hit, RRF_K};
use crate::metrics::Evaluation;
use crate::retrieve::Mode;
use crate::{Embed, Error, Result, exact};

/// Results per query: enough for recall@100.
pub const DEPTH: usize = 100;

/// The corpus embedded as one row-major matrix (`corpus.len() × dim`), in batches, with a
/// callback after each (documents done, total).
pub fn embed_corpus(
    beir: &Beir,
    embedder: &dyn Embed,
    batch: usize,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let dim = embedder.dim();
    let texts: Vec<String> = beir.corpus.iter().map(|d| d.contents()).collect();
    let mut data = Vec::with_capacity(texts.len() * dim);
    for (i, part) in texts.chunks(batch.max(1)).enumerate() {
        let refs: Vec<&str> = part.iter().map(String::as_str).collect();
        for v in embedder.embed(&refs)? {
            if v.len() != dim {
                return Err(Error::Dim {
                    what: "document vector".into(),
                    expected: dim,
                    got: v.len(),
                });
            }
            data.extend_from_slice(&v);
        }
        on_progress(
            (i * batch.max(1) + part.len()).min(texts.len()),
            texts.len(),
        );
    }
    Ok(data)
}

/// Each mode's evaluation. `doc_vectors` (from `embed_corpus`) is needed by dense and hybrid.
pub fn evaluate(
    beir: &Beir,
    modes: &[Mode],
    embedder: &dyn Embed,
    doc_vectors: Option<&[f32]>,
) -> Result<Vec<(Mode, Evaluation)>> {
    let needs_dense = modes.iter().any(|m| *m != Mode::Bm25);
    let needs_bm25 = modes.iter().any(|m| *m != Mode::Dense);
    let ids: Vec<u64> = (0..beir.corpus.len() as u64).collect();
    let dense_lists: Vec<Vec<Hit>> = if needs_dense {
        let data = doc_vectors
            .ok_or_else(|| Error::Embed("dense modes need the corpus vectors".into()))?;
        let texts: Vec<&str> = beir.queries.iter().map(|q| q.text.as_str()).collect();
        let queries = embedder.embed(&texts)?;
        queries
            .iter()
            .map(|q| exact::search(data, embedder.dim(), &ids, q, DEPTH))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let bm25_lists: Vec<Vec<Hit>> = if needs_bm25 {
        let texts: Vec<String> = beir.corpus.iter().map(|d| d.contents()).collect();
        let bm25 = Bm25::build(
            ids.iter().copied().zip(texts.iter().map(String::as_str)),
            Bm25Params::default(),
            Default::default(),
        )?;
        beir.queries
            .iter()
            .map(|q| bm25.search(&q.text, DEPTH))
            .collect()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for &mode in modes {
        let mut i = 0;
        let (_, evaluation) = beir.evaluate(|_| {
            let hits = match mode {
                Mode::Dense => dense_lists[i].clone(),
                Mode::Bm25 => bm25_lists[i].clone(),
                Mode::Hybrid => fuse::rrf(&[&dense_lists[i], &bm25_lists[i]], RRF_K, DEPTH),
            };
            i += 1;
            Ok(hits)
        })?;
        out.push((mode, evaluation));
    }
    Ok(out)
}
