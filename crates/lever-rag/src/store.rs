//! The document index: a directory holding `index.db`, one SQLite database (rusqlite, bundled).
//!
//! # Schema (version 1)
//! ```sql
//! meta    (key TEXT PRIMARY KEY, value NOT NULL)
//!         -- schema_version, embedder (id), dim, chunking (JSON ChunkSettings), generation
//! sources (id INTEGER PRIMARY KEY, path TEXT UNIQUE,   -- canonical absolute path
//!          sha256 TEXT, size INTEGER, mtime_ns INTEGER, added INTEGER (Unix seconds),
//!          complete INTEGER,                           -- 0 while its chunks are being written
//!          chunks INTEGER)                             -- chunk count, set when complete
//! chunks  (id INTEGER PRIMARY KEY, source_id → sources ON DELETE CASCADE, ordinal INTEGER,
//!          text TEXT, line_start INTEGER, line_end INTEGER,
//!          meta TEXT,                -- JSON {"headings": [...], "title": ..., "doc_id": ...}
//!          UNIQUE (source_id, ordinal))
//! vectors (chunk_id INTEGER PRIMARY KEY → chunks ON DELETE CASCADE,
//!          vector BLOB)                                -- dim × f32, little-endian
//! ```
//!
//! # Why it is built this way
//! - **WAL journal** (`journal_mode=WAL`): readers (a search, the BM25/HNSW builders) keep
//!   reading a consistent snapshot while a writer ingests, and neither blocks the other; a
//!   killed writer leaves its uncommitted frames in the WAL, which SQLite ignores on the next
//!   open. `synchronous=NORMAL` is durable against process crashes (SIGKILL); a power loss
//!   may roll back the last commits but never corrupts (<https://sqlite.org/wal.html>,
//!   <https://sqlite.org/pragma.html#pragma_synchronous>).
//! - **One transaction per file**: a file's old chunks are deleted and its new ones written
//!   and marked `complete` in one commit, so readers see either the old version or the new
//!   one, and a crash loses at most the file in flight. A file too big for one transaction
//!   (more than `commit_every` chunks) is committed in batches with `complete = 0`; readers
//!   never see incomplete sources (every query filters on `complete = 1`) and the next
//!   [`Index::add`] deletes and redoes them.
//! - **`generation`** is bumped in every write transaction, so a reader can tell whether an
//!   in-memory structure built from the index (vector matrix, BM25, HNSW) is stale.
//! - **One writer at a time**: besides SQLite's own write lock (`busy_timeout` long), writers
//!   take an advisory lock on `index.lock` for the whole `add`/`remove`, because cleaning up
//!   incomplete sources is only safe when no other writer is half-way through one.
//! - **Refuse, never repair**: a file that is not our database, a newer schema or another
//!   embedder's vectors is an error naming the file; nothing is created or overwritten.
//! - Vectors are stored as raw little-endian f32 blobs (4·dim bytes), the cheapest format to
//!   load into one contiguous matrix for exact search (`exact::VectorMatrix`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkSettings;
use crate::exact::VectorMatrix;
use crate::{Embed, Error, Result};

pub const SCHEMA_VERSION: i64 = 1;
/// The database file inside an index directory.
pub const DB_FILE: &str = "index.db";
/// The advisory writer-lock file inside an index directory.
pub const LOCK_FILE: &str = "index.lock";

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
CREATE TABLE sources (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    added INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    line_start INTEGER NOT NULL,
    line_end INTEGER NOT NULL,
    meta TEXT NOT NULL,
    UNIQUE (source_id, ordinal)
);
CREATE TABLE vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
";

/// Settings of a connection to an index.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// How long to wait for another connection's write lock before [`Error::Locked`].
    pub busy_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Counts and settings of an index, as `lever index stats` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Complete sources (what search sees).
    pub sources: u64,
    /// Sources left incomplete by an interrupted ingest (redone by the next `add`).
    pub incomplete_sources: u64,
    pub chunks: u64,
    pub vectors: u64,
    pub embedder: String,
    pub dim: usize,
    pub chunking: ChunkSettings,
    pub generation: u64,
    /// Bytes on disk: `index.db` plus its `-wal` and `-shm` files.
    pub db_bytes: u64,
}

/// A chunk with its provenance, for showing and citing a search hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub id: i64,
    pub path: PathBuf,
    /// Position of the chunk in its source, from 0.
    pub ordinal: usize,
    pub text: String,
    pub line_start: usize,
    pub line_end: usize,
    pub headings: Vec<String>,
    pub title: Option<String>,
    /// The document's own id (a JSONL record's `_id`), shared by its chunks.
    pub doc_id: Option<String>,
}

/// The JSON in `chunks.meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkMeta {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<String>,
}

/// A complete source, as listed by [`Index::sources`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub added: i64,
    pub chunks: u64,
}

/// One search result: a chunk id and its score (dot product; cosine for normalized vectors).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub chunk_id: i64,
    pub score: f32,
}

/// What [`Index::remove`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub sources: u64,
    pub chunks: u64,
}

/// What [`Index::verify`] found; [`Verify::is_ok`] when every invariant holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verify {
    /// `PRAGMA integrity_check` output ("ok"), when asked for.
    pub integrity: Option<String>,
    pub complete_sources: u64,
    pub incomplete_sources: u64,
    /// Chunks of complete sources without a vector.
    pub chunks_without_vector: u64,
    /// Vectors whose blob is not 4·dim bytes.
    pub malformed_vectors: u64,
    /// Complete sources whose stored chunk count differs from their chunk rows.
    pub miscounted_sources: Vec<PathBuf>,
}

impl Verify {
    pub fn is_ok(&self) -> bool {
        self.integrity.as_deref().is_none_or(|s| s == "ok")
            && self.chunks_without_vector == 0
            && self.malformed_vectors == 0
            && self.miscounted_sources.is_empty()
    }
}

/// An open index. Not `Sync` (one SQLite connection); open one per thread.
pub struct Index {
    pub(crate) dir: PathBuf,
    pub(crate) db_path: PathBuf,
    pub(crate) conn: Connection,
    pub(crate) busy_timeout: Duration,
    embedder: String,
    dim: usize,
    chunking: ChunkSettings,
    /// The vectors of the last exact search, reused while `generation` is unchanged.
    matrix: RefCell<Option<Arc<VectorMatrix>>>,
}

impl Index {
    /// True when `dir` holds an index database (valid or not).
    pub fn exists(dir: &Path) -> bool {
        dir.join(DB_FILE).exists()
    }

    /// Creates a new index in `dir` (created if missing) for `embedder`'s vectors, cutting
    /// documents with `chunking`. Refuses if `dir` already holds an index.
    pub fn create(dir: &Path, embedder: &dyn Embed, chunking: &ChunkSettings) -> Result<Index> {
        Self::create_with(dir, embedder, chunking, &OpenOptions::default())
    }

    pub fn create_with(
        dir: &Path,
        embedder: &dyn Embed,
        chunking: &ChunkSettings,
        options: &OpenOptions,
    ) -> Result<Index> {
        chunking.validate()?;
        if embedder.dim() == 0 {
            return Err(Error::Embed(format!(
                "embedder `{}` reports dimension 0",
                embedder.id()
            )));
        }
        let db_path = dir.join(DB_FILE);
        if db_path.exists() {
            return Err(Error::File {
                path: db_path,
                problem: "an index already exists here".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = connect(&db_path, flags, options)?;
        let err = |e| db_error(&db_path, options.busy_timeout, e);
        let chunking_json = serde_json::to_string(chunking).map_err(|e| Error::File {
            path: db_path.clone(),
            problem: format!("cannot encode chunk settings: {e}"),
        })?;
        // The schema and the meta rows in one transaction: a crash leaves no half index.
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{SCHEMA}"))
            .map_err(err)?;
        let rows: [(&str, rusqlite::types::Value); 5] = [
            ("schema_version", SCHEMA_VERSION.into()),
            ("embedder", embedder.id().into()),
            ("dim", (embedder.dim() as i64).into()),
            ("chunking", chunking_json.into()),
            ("generation", 1i64.into()),
        ];
        for (k, v) in rows {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(err)?;
        }
        conn.execute_batch("COMMIT").map_err(err)?;
        Ok(Index {
            dir: dir.to_owned(),
            db_path,
            conn,
            busy_timeout: options.busy_timeout,
            embedder: embedder.id(),
            dim: embedder.dim(),
            chunking: chunking.clone(),
            matrix: RefCell::new(None),
        })
    }

    /// Opens an existing index. Never creates or modifies the database file.
    pub fn open(dir: &Path) -> Result<Index> {
        Self::open_with(dir, &OpenOptions::default())
    }

    pub fn open_with(dir: &Path, options: &OpenOptions) -> Result<Index> {
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(Error::File {
                path: db_path,
                problem: "no index here (create one first)".into(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = connect(&db_path, flags, options)?;
        let not_index = |problem: String| Error::NotAnIndex {
            path: db_path.clone(),
            problem,
        };
        let has_meta: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| db_error(&db_path, options.busy_timeout, e))?
            > 0;
        if !has_meta {
            return Err(not_index("no `meta` table".into()));
        }
        let meta = |key: &str| -> Result<rusqlite::types::Value> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(|e| db_error(&db_path, options.busy_timeout, e))?
                .ok_or_else(|| not_index(format!("meta has no `{key}`")))
        };
        use rusqlite::types::Value;
        match meta("schema_version")? {
            Value::Integer(SCHEMA_VERSION) => {}
            v => {
                return Err(not_index(format!(
                    "schema version {v:?}; this lever reads version {SCHEMA_VERSION}"
                )));
            }
        }
        let (Value::Text(embedder), Value::Integer(dim), Value::Text(chunking)) =
            (meta("embedder")?, meta("dim")?, meta("chunking")?)
        else {
            return Err(not_index(
                "meta `embedder`, `dim` or `chunking` has the wrong type".into(),
            ));
        };
        let chunking: ChunkSettings = serde_json::from_str(&chunking)
            .map_err(|e| not_index(format!("meta `chunking` is not valid: {e}")))?;
        let dim = usize::try_from(dim)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| not_index(format!("meta `dim` is {dim}")))?;
        Ok(Index {
            dir: dir.to_owned(),
            db_path,
            conn,
            busy_timeout: options.busy_timeout,
            embedder,
            dim,
            chunking,
            matrix: RefCell::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The id of the embedder whose vectors this index holds.
    pub fn embedder_id(&self) -> &str {
        &self.embedder
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn chunking(&self) -> &ChunkSettings {
        &self.chunking
    }

    /// Refuses an embedder whose id or dimension differs from the index's.
    pub fn check_embedder(&self, embedder: &dyn Embed) -> Result<()> {
        if embedder.id() == self.embedder && embedder.dim() == self.dim {
            return Ok(());
        }
        Err(Error::EmbedderMismatch {
            path: self.db_path.clone(),
            index_embedder: self.embedder.clone(),
            index_dim: self.dim,
            given_embedder: embedder.id(),
            given_dim: embedder.dim(),
        })
    }

    /// Whether `encoder` may embed queries against this index's vectors though it did not make
    /// them (see [`crate::Retriever::accept_query_encoder`]): the same dimension, and either
    /// `paired_with` (the document encoder it was trained for) names this index's embedder,
    /// or, without a pairing, the same pooling, normalization and length limit (the parts of
    /// an embedder id after its name and weights' hash).
    pub fn check_query_encoder(
        &self,
        encoder: &dyn Embed,
        paired_with: Option<&str>,
    ) -> Result<()> {
        let id = encoder.id();
        if id == self.embedder && encoder.dim() == self.dim {
            return Ok(());
        }
        let refuse = |why: String| {
            Err(Error::QueryEncoderMismatch {
                path: self.db_path.clone(),
                pair: Box::new(crate::error::EncoderPair {
                    index_embedder: self.embedder.clone(),
                    index_dim: self.dim,
                    query_encoder: id.clone(),
                    query_dim: encoder.dim(),
                    why,
                }),
            })
        };
        if encoder.dim() != self.dim {
            return refuse("their dimensions differ".into());
        }
        match paired_with {
            Some(doc) if doc != self.embedder => {
                refuse(format!("it was trained for an index built with `{doc}`"))
            }
            Some(_) => Ok(()),
            None => {
                // name:hash:pooling[+norm]:max_tokens
                let settings = |s: &str| s.splitn(3, ':').nth(2).map(str::to_string);
                if settings(&id) != settings(&self.embedder) {
                    refuse("their pooling, normalization or length limit differ".into())
                } else {
                    Ok(())
                }
            }
        }
    }

    pub(crate) fn err(&self, e: rusqlite::Error) -> Error {
        db_error(&self.db_path, self.busy_timeout, e)
    }

    /// The write counter: it changes whenever the index content changes.
    pub fn generation(&self) -> Result<u64> {
        generation(&self.conn).map_err(|e| self.err(e))
    }

    pub fn stats(&self) -> Result<Stats> {
        let snapshot = Snapshot::begin(&self.conn).map_err(|e| self.err(e))?;
        let count = |sql: &str| -> Result<u64> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| self.err(e))
        };
        let stats = Stats {
            sources: count("SELECT count(*) FROM sources WHERE complete = 1")?,
            incomplete_sources: count("SELECT count(*) FROM sources WHERE complete = 0")?,
            chunks: count(
                "SELECT count(*) FROM chunks c JOIN sources s ON s.id = c.source_id
                 WHERE s.complete = 1",
            )?,
            vectors: count(
                "SELECT count(*) FROM vectors v JOIN chunks c ON c.id = v.chunk_id
                 JOIN sources s ON s.id = c.source_id WHERE s.complete = 1",
            )?,
            embedder: self.embedder.clone(),
            dim: self.dim,
            chunking: self.chunking.clone(),
            generation: self.generation()?,
            db_bytes: ["", "-wal", "-shm"]
                .iter()
                .filter_map(|suffix| {
                    let mut p = self.db_path.clone().into_os_string();
                    p.push(suffix);
                    std::fs::metadata(p).ok().map(|m| m.len())
                })
                .sum(),
        };
        snapshot.end();
        Ok(stats)
    }

    /// The complete sources, by path.
    pub fn sources(&self) -> Result<Vec<SourceInfo>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, sha256, size, mtime_ns, added, chunks FROM sources
                 WHERE complete = 1 ORDER BY path",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SourceInfo {
                    path: PathBuf::from(r.get::<_, String>(0)?),
                    sha256: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                    added: r.get(4)?,
                    chunks: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// One chunk of a complete source, with its provenance; `None` if there is no such chunk.
    pub fn chunk(&self, id: i64) -> Result<Option<ChunkRecord>> {
        let row = self
            .conn
            .query_row(
                "SELECT s.path, c.ordinal, c.text, c.line_start, c.line_end, c.meta
                 FROM chunks c JOIN sources s ON s.id = c.source_id
                 WHERE c.id = ?1 AND s.complete = 1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((path, ordinal, text, line_start, line_end, meta)) = row else {
            return Ok(None);
        };
        let meta: ChunkMeta = serde_json::from_str(&meta).map_err(|e| Error::File {
            path: self.db_path.clone(),
            problem: format!("chunk {id}: metadata is not valid JSON: {e}"),
        })?;
        Ok(Some(ChunkRecord {
            id,
            path: PathBuf::from(path),
            ordinal: ordinal as usize,
            text,
            line_start: line_start as usize,
            line_end: line_end as usize,
            headings: meta.headings,
            title: meta.title,
            doc_id: meta.doc_id,
        }))
    }

    /// Iterates over `(chunk_id, text)` of complete sources in id order, all from one snapshot
    /// (see [`Paged`]).
    pub fn chunks(&self) -> Result<Paged<'_, String>> {
        Paged::new(self, |conn, after, limit| {
            let mut stmt = conn.prepare_cached(
                "SELECT c.id, c.text FROM chunks c JOIN sources s ON s.id = c.source_id
                 WHERE s.complete = 1 AND c.id > ?1 ORDER BY c.id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Iterates over `(chunk_id, vector)` of complete sources in id order, from one snapshot.
    pub fn vectors(&self) -> Result<Paged<'_, Vec<f32>>> {
        let dim = self.dim;
        Paged::new(self, move |conn, after, limit| {
            let mut stmt = conn.prepare_cached(
                "SELECT v.chunk_id, v.vector FROM vectors v JOIN chunks c ON c.id = v.chunk_id
                 JOIN sources s ON s.id = c.source_id
                 WHERE s.complete = 1 AND v.chunk_id > ?1 ORDER BY v.chunk_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit], |r| {
                let id: i64 = r.get(0)?;
                let blob: Vec<u8> = r.get(1)?;
                let v = decode_vector(&blob, dim).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Blob,
                        format!(
                            "vector of chunk {id} has {} bytes, expected {}",
                            blob.len(),
                            4 * dim
                        )
                        .into(),
                    )
                })?;
                Ok((id, v))
            })?;
            rows.collect()
        })
    }

    /// Loads every vector of the complete sources into one contiguous matrix.
    pub fn load_vectors(&self) -> Result<VectorMatrix> {
        let mut iter = self.vectors()?;
        let generation = iter.generation();
        let mut m = VectorMatrix {
            dim: self.dim,
            generation,
            ids: Vec::new(),
            data: Vec::new(),
        };
        for row in &mut iter {
            let (id, v) = row?;
            // SQLite rowids of chunks are positive.
            m.ids.push(id as u64);
            m.data.extend_from_slice(&v);
        }
        Ok(m)
    }

    /// Exact top-`k` by dot product over the stored vectors. The matrix is loaded on first use
    /// and reloaded only when the index's generation changed.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let generation = self.generation()?;
        let cached = self
            .matrix
            .borrow()
            .as_ref()
            .filter(|m| m.generation == generation)
            .cloned();
        let matrix = match cached {
            Some(m) => m,
            None => {
                let m = Arc::new(self.load_vectors()?);
                *self.matrix.borrow_mut() = Some(m.clone());
                m
            }
        };
        Ok(matrix
            .top_k(query, k)?
            .into_iter()
            .map(|h| Hit {
                chunk_id: h.id as i64,
                score: h.score,
            })
            .collect())
    }

    /// Embeds `query` (checking that the embedder is the index's) and searches.
    pub fn search_text(&self, embedder: &dyn Embed, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.check_embedder(embedder)?;
        let v = embedder.embed(&[query])?;
        let q = v
            .into_iter()
            .next()
            .ok_or_else(|| Error::Embed(format!("`{}` returned no vector", embedder.id())))?;
        self.search(&q, k)
    }

    /// Checks the invariants in one snapshot; with `integrity`, also SQLite's own
    /// `integrity_check` (reads the whole file).
    pub fn verify(&self, integrity: bool) -> Result<Verify> {
        let snap = Snapshot::begin(&self.conn).map_err(|e| self.err(e))?;
        let q = |sql: &str| -> Result<u64> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| self.err(e))
        };
        let mut v = Verify {
            integrity: None,
            complete_sources: q("SELECT count(*) FROM sources WHERE complete = 1")?,
            incomplete_sources: q("SELECT count(*) FROM sources WHERE complete = 0")?,
            chunks_without_vector: q(
                "SELECT count(*) FROM chunks c JOIN sources s ON s.id = c.source_id
                 LEFT JOIN vectors v ON v.chunk_id = c.id
                 WHERE s.complete = 1 AND v.chunk_id IS NULL",
            )?,
            malformed_vectors: q(&format!(
                "SELECT count(*) FROM vectors WHERE length(vector) != {}",
                4 * self.dim
            ))?,
            miscounted_sources: Vec::new(),
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT s.path FROM sources s WHERE s.complete = 1 AND s.chunks !=
                 (SELECT count(*) FROM chunks c WHERE c.source_id = s.id) ORDER BY s.path",
            )
            .map_err(|e| self.err(e))?;
        v.miscounted_sources = stmt
            .query_map([], |r| r.get::<_, String>(0).map(PathBuf::from))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        drop(stmt);
        if integrity {
            let mut stmt = self
                .conn
                .prepare("PRAGMA integrity_check")
                .map_err(|e| self.err(e))?;
            let lines: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(|e| self.err(e))?;
            v.integrity = Some(lines.join("; "));
        }
        snap.end();
        Ok(v)
    }

    /// Removes a source, or every source under a folder, with its chunks and vectors.
    /// `path` need not exist any more. Returns what was deleted (zeros if nothing matched).
    pub fn remove(&mut self, path: &Path) -> Result<Removed> {
        let target = normalize(path)?;
        let Some(exact) = target.to_str() else {
            return Ok(Removed::default());
        };
        let prefix = if exact.ends_with('/') {
            exact.to_owned()
        } else {
            format!("{exact}/")
        };
        let _lock = self.writer_lock()?;
        let tx = WriteTx::begin(self)?;
        let matching = "FROM sources WHERE path = ?1 OR substr(path, 1, length(?2)) = ?2";
        let removed = Removed {
            sources: tx.count(
                &format!("SELECT count(*) {matching}"),
                params![exact, prefix],
            )?,
            chunks: tx.count(
                &format!("SELECT count(*) FROM chunks WHERE source_id IN (SELECT id {matching})"),
                params![exact, prefix],
            )?,
        };
        if removed.sources > 0 {
            tx.conn
                .execute(&format!("DELETE {matching}"), params![exact, prefix])
                .map_err(|e| self.err(e))?;
            tx.commit()?;
        }
        Ok(removed)
    }

    /// Takes the advisory writer lock (`index.lock`), waiting up to the busy timeout.
    pub(crate) fn writer_lock(&self) -> Result<File> {
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < self.busy_timeout => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        path,
                        waited_ms: start.elapsed().as_millis(),
                    });
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(Error::Io { path, source });
                }
            }
        }
    }
}

/// Opens a connection and applies the pragmas every connection needs.
fn connect(db_path: &Path, flags: OpenFlags, options: &OpenOptions) -> Result<Connection> {
    let err = |e| db_error(db_path, options.busy_timeout, e);
    let conn = Connection::open_with_flags(db_path, flags).map_err(err)?;
    conn.busy_timeout(options.busy_timeout).map_err(err)?;
    // The first statement that reads the file: garbage fails here with "not a database".
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::File {
            path: db_path.to_owned(),
            problem: format!("cannot use write-ahead logging (journal mode stays {mode})"),
        });
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(err)?;
    Ok(conn)
}

/// Names the failure: busy → [`Error::Locked`], not-a-database/corrupt → [`Error::NotAnIndex`].
pub(crate) fn db_error(path: &Path, timeout: Duration, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Locked {
            path: path.to_owned(),
            waited_ms: timeout.as_millis(),
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::NotAnIndex {
            path: path.to_owned(),
            problem: e.to_string(),
        },
        _ => Error::Db {
            path: path.to_owned(),
            source: e,
        },
    }
}

pub(crate) fn generation(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|g| g as u64)
}

/// An absolute path for `path`, with symbolic links resolved when it still exists (sources are
/// stored canonical), lexically otherwise (a deleted file can still be removed).
pub(crate) fn normalize(path: &Path) -> Result<PathBuf> {
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
}

pub(crate) fn decode_vector(blob: &[u8], dim: usize) -> Option<Vec<f32>> {
    if blob.len() != 4 * dim {
        return None;
    }
    Some(
        blob.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

pub(crate) fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A write transaction (`BEGIN IMMEDIATE`: takes the write lock up front, so a busy database
/// fails here after `busy_timeout` rather than half-way through). Rolls back when dropped
/// uncommitted. Every commit bumps `generation`.
pub(crate) struct WriteTx<'c> {
    pub conn: &'c Connection,
    path: &'c Path,
    timeout: Duration,
    open: bool,
}

impl<'c> WriteTx<'c> {
    pub fn begin(index: &'c Index) -> Result<Self> {
        index
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| index.err(e))?;
        Ok(WriteTx {
            conn: &index.conn,
            path: &index.db_path,
            timeout: index.busy_timeout,
            open: true,
        })
    }

    pub fn err(&self, e: rusqlite::Error) -> Error {
        db_error(self.path, self.timeout, e)
    }

    pub fn count(&self, sql: &str, p: impl rusqlite::Params) -> Result<u64> {
        self.conn
            .query_row(sql, p, |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Commits what was written so far and opens the next transaction at once (the batches of
    /// a file too big for one transaction).
    pub fn commit_and_continue(&mut self) -> Result<()> {
        self.conn
            .execute_batch("UPDATE meta SET value = value + 1 WHERE key = 'generation'; COMMIT;")
            .map_err(|e| self.err(e))?;
        self.open = false;
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        self.open = true;
        Ok(())
    }

    pub fn commit(mut self) -> Result<()> {
        self.conn
            .execute_batch("UPDATE meta SET value = value + 1 WHERE key = 'generation'; COMMIT;")
            .map_err(|e| self.err(e))?;
        self.open = false;
        Ok(())
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // Nothing to report to: the error that dropped us is already on its way up, and a
            // failed rollback leaves SQLite to discard the transaction when the connection
            // closes.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// A read snapshot held by a savepoint: statements between `begin` and `end` (or drop) see one
/// committed state. Savepoints nest, so iterators and `stats` can overlap.
pub(crate) struct Snapshot<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Snapshot<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.execute_batch("SAVEPOINT lever_read")?;
        Ok(Snapshot { conn, open: true })
    }

    fn end(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.open {
            self.open = false;
            // A read-only savepoint cannot fail to release in a way the caller could act on.
            let _ = self.conn.execute_batch("RELEASE lever_read");
        }
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

type FetchPage<T> = Box<dyn Fn(&Connection, i64, i64) -> rusqlite::Result<Vec<(i64, T)>>>;

/// An iterator over rows of complete sources, fetched a page at a time by id (keyset paging)
/// inside one read snapshot: every row comes from the same committed state, whose generation is
/// [`Paged::generation`]. While it lives, a writer can still commit (WAL), but the WAL cannot be
/// checkpointed past the snapshot, so don't keep one open for long.
pub struct Paged<'a, T> {
    index: &'a Index,
    snapshot: Snapshot<'a>,
    fetch: FetchPage<T>,
    generation: u64,
    after: i64,
    page: VecDeque<(i64, T)>,
    done: bool,
}

const PAGE: i64 = 1024;

impl<'a, T> Paged<'a, T> {
    fn new(
        index: &'a Index,
        fetch: impl Fn(&Connection, i64, i64) -> rusqlite::Result<Vec<(i64, T)>> + 'static,
    ) -> Result<Self> {
        let snapshot = Snapshot::begin(&index.conn).map_err(|e| index.err(e))?;
        // The first read fixes the snapshot.
        let generation = index.generation()?;
        Ok(Paged {
            index,
            snapshot,
            fetch: Box::new(fetch),
            generation,
            after: i64::MIN,
            page: VecDeque::new(),
            done: false,
        })
    }

    /// The generation of the snapshot the rows come from.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl<T> Iterator for Paged<'_, T> {
    type Item = Result<(i64, T)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            match (self.fetch)(&self.index.conn, self.after, PAGE) {
                Ok(rows) => {
                    self.done = (rows.len() as i64) < PAGE;
                    if let Some((id, _)) = rows.last() {
                        self.after = *id;
                    }
                    self.page.extend(rows);
                }
                Err(e) => {
                    self.done = true;
                    self.snapshot.release();
                    return Some(Err(self.index.err(e)));
                }
            }
        }
        let row = self.page.pop_front();
        if row.is_none() {
            self.snapshot.release();
        }
        row.map(Ok)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_little_endian() {
        let v = [1.5f32, -0.25, 3.0e-8];
        let b = encode_vector(&v);
        assert_eq!(&b[..4], &1.5f32.to_le_bytes());
        assert_eq!(decode_vector(&b, 3).unwrap(), v);
        assert_eq!(decode_vector(&b, 2), None);
    }
}
