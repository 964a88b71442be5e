//! Search over an index: dense (exact, or HNSW once the index is large), BM25, or both fused
//! by reciprocal rank (hybrid).
//!
//! The BM25 postings and the HNSW graph live beside `index.db` as `bm25.bin` and `hnsw.bin`,
//! each tagged with the index generation it reflects. A file older than the database is
//! brought up to date on first use and saved again (atomically), so a search after an ingest
//! pays once and later searches load. The database stays the only source of truth: deleting
//! either file loses nothing.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

use crate::bm25::{Bm25, Bm25Params};
use crate::exact::VectorMatrix;
use crate::fuse::{self, Hit, RRF_K};
use crate::hnsw::{Hnsw, HnswParams};
use crate::store::Index;
use crate::{Embed, Error, Result};

/// Above this many chunks, dense search walks an HNSW graph instead of scanning every vector
/// (recall@10 ≥ 0.95 against the exact scan, measured in tests/hnsw_recall.rs).
pub const HNSW_MIN_CHUNKS: usize = 20_000;

/// How many candidates each retriever hands to the fusion in hybrid mode.
const FUSION_DEPTH: usize = 100;

/// Which retriever answers a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dense,
    Bm25,
    Hybrid,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Dense, Mode::Bm25, Mode::Hybrid];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Dense => "dense",
            Mode::Bm25 => "bm25",
            Mode::Hybrid => "hybrid",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "dense" => Ok(Mode::Dense),
            "bm25" => Ok(Mode::Bm25),
            "hybrid" => Ok(Mode::Hybrid),
            _ => Err(format!("`{s}` is not a mode: dense, bm25 or hybrid")),
        }
    }
}

/// How dense search scans the vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DenseIndex {
    /// Exact below `HNSW_MIN_CHUNKS` chunks, HNSW above.
    #[default]
    Auto,
    Exact,
    Hnsw,
}

enum Dense {
    Exact(VectorMatrix),
    Graph(Hnsw),
}

/// Searches one index; builds (or loads) each structure the first time a mode needs it.
pub struct Retriever<'a> {
    index: &'a Index,
    dense_index: DenseIndex,
    bm25: Option<Bm25>,
    dense: Option<Dense>,
    /// The id of a query encoder accepted for this index's document vectors
    /// ([`Retriever::accept_query_encoder`]).
    query_encoder: Option<String>,
}

impl<'a> Retriever<'a> {
    pub fn new(index: &'a Index, dense_index: DenseIndex) -> Retriever<'a> {
        Retriever {
            index,
            dense_index,
            bm25: None,
            dense: None,
            query_encoder: None,
        }
    }

    pub fn index(&self) -> &'a Index {
        self.index
    }

    /// Let `encoder` embed the queries of dense search although another encoder made the
    /// index's vectors: a query encoder trained against them (RAG's, Lewis et al. 2020 §2.4,
    /// which keeps the document encoder and index fixed). `paired_with` is the document
    /// encoder it was trained for, when its folder says so. Refused by name: another
    /// dimension, another pooling, normalization or length limit, or a pairing with another
    /// document encoder ([`Index::check_query_encoder`]).
    pub fn accept_query_encoder(
        &mut self,
        encoder: &dyn Embed,
        paired_with: Option<&str>,
    ) -> Result<()> {
        self.index.check_query_encoder(encoder, paired_with)?;
        self.query_encoder = Some(encoder.id());
        Ok(())
    }

    fn bm25_path(&self) -> PathBuf {
        self.index.dir().join("bm25.bin")
    }

    fn hnsw_path(&self) -> PathBuf {
        self.index.dir().join("hnsw.bin")
    }

    /// The BM25 index at the database's generation: loaded from bm25.bin when it is current,
    /// else rebuilt from the chunks and saved.
    fn bm25(&mut self) -> Result<&Bm25> {
        if self.bm25.is_none() {
            let generation = self.index.generation()?;
            let path = self.bm25_path();
            let cached = match Bm25::read_generation(&path) {
                Ok(g) if g == generation => Bm25::load(&path).ok().map(|(b, _)| b),
                _ => None,
            };
            let bm25 = match cached {
                Some(b) => b,
                None => {
                    let mut b = Bm25::new(Bm25Params::default(), Default::default())?;
                    let chunks = self.index.chunks()?;
                    let at = chunks.generation();
                    for item in chunks {
                        let (id, text) = item?;
                        b.add(id as u64, &text)?;
                    }
                    b.save(&path, at)?;
                    b
                }
            };
            self.bm25 = Some(bm25);
        }
        self.bm25
            .as_ref()
            .ok_or_else(|| Error::Embed("bm25 index missing".into()))
    }

    /// Dense search's structure: the vectors themselves, or an HNSW graph brought up to the
    /// database's state (ids deleted since are removed, new ones inserted) and saved.
    fn dense(&mut self) -> Result<&Dense> {
        if self.dense.is_none() {
            let matrix = self.index.load_vectors()?;
            let graph = match self.dense_index {
                DenseIndex::Exact => false,
                DenseIndex::Hnsw => true,
                DenseIndex::Auto => matrix.ids.len() >= HNSW_MIN_CHUNKS,
            };
            let dense = if graph {
                Dense::Graph(self.update_graph(&matrix)?)
            } else {
                Dense::Exact(matrix)
            };
            self.dense = Some(dense);
        }
        self.dense
            .as_ref()
            .ok_or_else(|| Error::Embed("dense index missing".into()))
    }

    fn update_graph(&self, matrix: &VectorMatrix) -> Result<Hnsw> {
        let path = self.hnsw_path();
        let (mut graph, at) = match Hnsw::load(&path) {
            Ok((g, at)) if g.dim() == matrix.dim => (g, Some(at)),
            _ => (Hnsw::new(matrix.dim, HnswParams::default())?, None),
        };
        if at == Some(matrix.generation) {
            return Ok(graph);
        }
        // Too many tombstones make the graph slow and less accurate: start over.
        if graph.deleted_count() > graph.len() / 4 {
            graph = Hnsw::new(matrix.dim, HnswParams::default())?;
        }
        let live: HashSet<u64> = matrix.ids.iter().copied().collect();
        let stale: Vec<u64> = graph.ids().filter(|id| !live.contains(id)).collect();
        for id in stale {
            graph.remove(id);
        }
        for (row, &id) in matrix.ids.iter().enumerate() {
            if !graph.contains(id) {
                graph.insert(id, &matrix.data[row * matrix.dim..(row + 1) * matrix.dim])?;
            }
        }
        graph.save(&path, matrix.generation)?;
        Ok(graph)
    }

    /// The `k` best chunks for `query` (ids are chunk ids), best first.
    pub fn search(
        &mut self,
        embedder: &dyn Embed,
        query: &str,
        mode: Mode,
        k: usize,
    ) -> Result<Vec<Hit>> {
        match mode {
            Mode::Bm25 => Ok(self.bm25()?.search(query, k)),
            Mode::Dense => self.dense_search(embedder, query, k),
            Mode::Hybrid => {
                let depth = k.max(FUSION_DEPTH);
                let dense = self.dense_search(embedder, query, depth)?;
                let lexical = self.bm25()?.search(query, depth);
                Ok(fuse::rrf(&[&dense, &lexical], RRF_K, k))
            }
        }
    }

    fn dense_search(&mut self, embedder: &dyn Embed, query: &str, k: usize) -> Result<Vec<Hit>> {
        if self.query_encoder.as_deref() != Some(embedder.id().as_str()) {
            self.index.check_embedder(embedder)?;
        }
        let q = embedder
            .embed(&[query])?
            .pop()
            .ok_or_else(|| Error::Embed("no vector for the query".into()))?;
        match self.dense()? {
            Dense::Exact(m) => m.top_k(&q, k),
            Dense::Graph(g) => g.search(&q, k),
        }
    }
}
