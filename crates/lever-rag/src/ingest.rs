//! Incremental ingest: [`Index::add`] walks the given paths, and for each file decides
//! unchanged / added / updated / skipped, then streams it through reader → chunker → embedder
//! → database.
//!
//! - **Change detection by content**: a first pass hashes the file (sha256, also validating it:
//!   binary, UTF-8, line length); an indexed file with the same hash is left alone, whatever
//!   its mtime. Hashing is cheap next to embedding, and mtimes lie (copies, checkouts).
//! - **Per-file transactions** (see [`crate::store`]): a file's old chunks are replaced by its
//!   new ones in one commit; a file with more than `commit_every` chunks commits in batches
//!   with its source marked incomplete until the last one. Sources left incomplete by a crash
//!   are deleted at the start of the next `add`, which then redoes them as new files.
//! - **Bounded memory**: chunks are embedded `embed_batch` at a time and written at once, so a
//!   file of any size holds one batch of chunks (plus the chunker's one chunk) in memory.
//! - A file that was indexed but now cannot be (emptied, turned binary) loses its stale chunks,
//!   and with `prune` (the default) so does one deleted from a folder given to `add`.
//! - The library never prints: progress goes to the caller's callback as [`Event`]s (files
//!   done of total, chunks, bytes), and the outcome comes back as an [`AddReport`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};

use crate::chunk::Chunk;
use crate::read::{self, FileEntry, ReadOutcome, Scanned, Skip, Warning};
use crate::store::{ChunkMeta, Index, WriteTx, encode_vector};
use crate::{Embed, Error, Result};

/// Knobs of [`Index::add`].
#[derive(Clone, Debug)]
pub struct AddOptions {
    /// Chunks per `embed` call.
    pub embed_batch: usize,
    /// Chunks after which a big file commits what it has so far (as an incomplete source).
    pub commit_every: usize,
    /// Longest line accepted (bytes); a file with a longer one is skipped.
    pub max_line_bytes: usize,
    /// Remove the sources under a folder given to `add` whose files were deleted from disk, so
    /// that re-adding a folder mirrors it.
    pub prune: bool,
}

impl Default for AddOptions {
    fn default() -> Self {
        AddOptions {
            embed_batch: 32,
            commit_every: 4096,
            max_line_bytes: read::MAX_LINE_BYTES,
            prune: true,
        }
    }
}

/// Where an ingest stands; sent after every embedded batch and every file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub files_done: usize,
    pub files_total: usize,
    /// Chunks embedded and written by this run so far.
    pub chunks: u64,
    /// Bytes of the walked files processed so far (unchanged files count as processed).
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What happened to one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOutcome {
    Added { chunks: usize },
    Updated { chunks: usize },
    Unchanged,
    Skipped(Skip),
}

/// What [`Index::add`] reports while it works.
#[derive(Debug)]
pub enum Event<'a> {
    /// The paths were walked: files to consider and their total size.
    Walked {
        files: usize,
        bytes: u64,
        skipped: usize,
    },
    /// Sources left incomplete by an interrupted run were removed; they are redone.
    Recovered {
        sources: u64,
    },
    /// A file is finished (or was skipped).
    File {
        path: &'a Path,
        outcome: &'a FileOutcome,
    },
    /// A problem inside a file that is otherwise indexed (a bad JSONL line).
    Warning(&'a Warning),
    Progress(Progress),
}

/// The result of [`Index::add`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// Files not indexed, with why.
    pub skipped: Vec<(PathBuf, Skip)>,
    /// Previously indexed files whose chunks were removed because they can no longer be read
    /// (they are also in `skipped`).
    pub stale_removed: usize,
    /// Incomplete sources from an interrupted run that were cleaned up (and redone if their
    /// file still exists).
    pub recovered: u64,
    /// Sources removed because their file is gone from a folder given to `add`.
    pub pruned: usize,
    /// Chunks written by this run.
    pub chunks: u64,
    /// Bytes of the files that were (re)indexed.
    pub bytes: u64,
    pub warnings: Vec<Warning>,
}

impl AddReport {
    /// Skipped files counted by [`Skip::kind`].
    pub fn skipped_by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for (_, s) in &self.skipped {
            *m.entry(s.kind()).or_insert(0) += 1;
        }
        m
    }
}

impl AddOptions {
    fn validate(&self) -> Result<()> {
        if self.embed_batch == 0 || self.commit_every == 0 || self.max_line_bytes == 0 {
            return Err(Error::Settings(format!(
                "embed_batch, commit_every and max_line_bytes must be at least 1 (got {self:?})"
            )));
        }
        Ok(())
    }
}

impl Index {
    /// Indexes the files under `paths` (files or folders) incrementally with `embedder`, which
    /// must be the index's. Errors (database, embedder, a missing path) abort the run; what was
    /// committed before stays, and a re-run continues.
    pub fn add<P: AsRef<Path>>(
        &mut self,
        paths: &[P],
        embedder: &dyn Embed,
        options: &AddOptions,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<AddReport> {
        self.check_embedder(embedder)?;
        options.validate()?;
        let _lock = self.writer_lock()?;
        let mut walked = read::walk(paths, Some(&self.dir))?;
        let recovered = self.drop_incomplete()?;
        let mut report = AddReport {
            recovered: recovered.len() as u64,
            ..AddReport::default()
        };
        if !recovered.is_empty() {
            on_event(Event::Recovered {
                sources: report.recovered,
            });
        }
        // "A re-run continues": files an interrupted run left half-written are redone even when
        // this run was given other paths.
        for path in recovered {
            let path = PathBuf::from(path);
            if walked.files.iter().all(|f| f.path != path)
                && let Ok(entry) = read::entry(&path)
            {
                walked.files.push(entry);
            }
        }
        if options.prune {
            report.pruned = self.prune_missing(paths)?;
        }
        let mut progress = Progress {
            files_total: walked.files.len(),
            bytes_total: walked.files.iter().map(|f| f.size).sum(),
            ..Progress::default()
        };
        on_event(Event::Walked {
            files: progress.files_total,
            bytes: progress.bytes_total,
            skipped: walked.skipped.len(),
        });
        for (path, skip) in walked.skipped {
            let outcome = FileOutcome::Skipped(skip.clone());
            on_event(Event::File {
                path: &path,
                outcome: &outcome,
            });
            report.skipped.push((path, skip));
        }
        let mut bytes_before = 0;
        for file in &walked.files {
            let outcome = self.add_file(
                file,
                embedder,
                options,
                bytes_before,
                &mut progress,
                &mut report,
                on_event,
            )?;
            bytes_before += file.size;
            progress.files_done += 1;
            progress.bytes_done = bytes_before;
            on_event(Event::File {
                path: &file.path,
                outcome: &outcome,
            });
            on_event(Event::Progress(progress));
            match outcome {
                FileOutcome::Added { .. } => report.added += 1,
                FileOutcome::Updated { .. } => report.updated += 1,
                FileOutcome::Unchanged => report.unchanged += 1,
                FileOutcome::Skipped(skip) => report.skipped.push((file.path.clone(), skip)),
            }
        }
        Ok(report)
    }

    /// Deletes sources an interrupted run left incomplete; returns their paths.
    fn drop_incomplete(&self) -> Result<Vec<String>> {
        let tx = WriteTx::begin(self)?;
        let paths: Vec<String> = tx
            .conn
            .prepare("SELECT path FROM sources WHERE complete = 0 ORDER BY path")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        if !paths.is_empty() {
            tx.conn
                .execute("DELETE FROM sources WHERE complete = 0", [])
                .map_err(|e| self.err(e))?;
            tx.commit()?;
        }
        Ok(paths)
    }

    /// Deletes the sources under the given folders whose files no longer exist; returns how
    /// many. Named files are not checked: `walk` already refused missing ones.
    fn prune_missing<P: AsRef<Path>>(&self, paths: &[P]) -> Result<usize> {
        let mut missing = Vec::new();
        for p in paths {
            let Ok(folder) = p.as_ref().canonicalize() else {
                continue;
            };
            let Some(folder) = folder.to_str().filter(|_| folder.is_dir()) else {
                continue;
            };
            let prefix = format!("{}/", folder.trim_end_matches('/'));
            let under: Vec<String> = self
                .conn
                .prepare("SELECT path FROM sources WHERE substr(path, 1, length(?1)) = ?1")
                .and_then(|mut stmt| stmt.query_map([&prefix], |r| r.get(0))?.collect())
                .map_err(|e| self.err(e))?;
            missing.extend(under.into_iter().filter(|p| !Path::new(p).exists()));
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let tx = WriteTx::begin(self)?;
        let mut n = 0;
        for path in &missing {
            n += tx
                .conn
                .execute("DELETE FROM sources WHERE path = ?1", [path])
                .map_err(|e| self.err(e))?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Deletes the source at `path` (if any) in its own transaction; true if there was one.
    fn delete_source(&self, path: &str) -> Result<bool> {
        let tx = WriteTx::begin(self)?;
        let n = tx
            .conn
            .execute("DELETE FROM sources WHERE path = ?1", [path])
            .map_err(|e| self.err(e))?;
        if n > 0 {
            tx.commit()?;
        }
        Ok(n > 0)
    }

    #[allow(clippy::too_many_arguments)] // private; the run's state, threaded through
    fn add_file(
        &self,
        file: &FileEntry,
        embedder: &dyn Embed,
        options: &AddOptions,
        bytes_before: u64,
        progress: &mut Progress,
        report: &mut AddReport,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<FileOutcome> {
        let Some(path) = file.path.to_str() else {
            return Ok(FileOutcome::Skipped(Skip::NonUtf8Path));
        };
        let indexed: Option<String> = self
            .conn
            .query_row(
                "SELECT sha256 FROM sources WHERE path = ?1 AND complete = 1",
                [path],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let scanned = match read::scan(&file.path, options.max_line_bytes) {
            Ok(s) => s,
            Err(skip) => {
                if self.delete_source(path)? {
                    report.stale_removed += 1;
                }
                return Ok(FileOutcome::Skipped(skip));
            }
        };
        if indexed.as_deref() == Some(scanned.sha256.as_str()) {
            return Ok(FileOutcome::Unchanged);
        }

        let mut writer = FileWriter::start(self, path, file, embedder, options)?;
        let tokenize = |t: &str| embedder.token_spans(t);
        let mut sink = |chunk: Chunk, consumed: u64| -> Result<()> {
            if writer.push(chunk)? {
                progress.chunks += options.embed_batch as u64;
                progress.bytes_done = bytes_before + consumed;
                on_event(Event::Progress(*progress));
            }
            Ok(())
        };
        let outcome = read::read_chunks(
            &file.path,
            file.format,
            self.chunking(),
            &tokenize,
            options.max_line_bytes,
            &mut sink,
        )?;
        match outcome {
            ReadOutcome::Read {
                scanned,
                chunks,
                warnings,
            } => {
                let tail = writer.finish(&scanned)?;
                progress.chunks += tail as u64;
                report.chunks += chunks as u64;
                report.bytes += scanned.bytes;
                for w in warnings {
                    on_event(Event::Warning(&w));
                    report.warnings.push(w);
                }
                Ok(match indexed {
                    Some(_) => FileOutcome::Updated { chunks },
                    None => FileOutcome::Added { chunks },
                })
            }
            // The file changed between the two passes, or holds no text.
            ReadOutcome::Skipped(skip) => {
                drop(writer); // rolls back the open transaction
                if self.delete_source(path)? && indexed.is_some() {
                    report.stale_removed += 1;
                }
                Ok(FileOutcome::Skipped(skip))
            }
        }
    }
}

/// Writes one file's chunks: embeds them a batch at a time inside the file's transaction.
struct FileWriter<'i> {
    tx: WriteTx<'i>,
    embedder: &'i dyn Embed,
    dim: usize,
    source_id: i64,
    batch: Vec<Chunk>,
    embed_batch: usize,
    commit_every: usize,
    written: usize,
    since_commit: usize,
}

impl<'i> FileWriter<'i> {
    /// Opens the file's transaction, deletes its previous version and inserts its source row,
    /// incomplete.
    fn start(
        index: &'i Index,
        path: &str,
        file: &FileEntry,
        embedder: &'i dyn Embed,
        options: &AddOptions,
    ) -> Result<Self> {
        let tx = WriteTx::begin(index)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        tx.conn
            .execute("DELETE FROM sources WHERE path = ?1", [path])
            .map_err(|e| tx.err(e))?;
        tx.conn
            .execute(
                "INSERT INTO sources (path, sha256, size, mtime_ns, added, complete, chunks)
                 VALUES (?1, '', ?2, ?3, ?4, 0, 0)",
                params![path, file.size as i64, file.mtime_ns, now],
            )
            .map_err(|e| tx.err(e))?;
        let source_id = tx.conn.last_insert_rowid();
        Ok(FileWriter {
            tx,
            embedder,
            dim: index.dim(),
            source_id,
            batch: Vec::with_capacity(options.embed_batch),
            embed_batch: options.embed_batch,
            commit_every: options.commit_every,
            written: 0,
            since_commit: 0,
        })
    }

    /// Queues a chunk; returns true when that completed a batch, which was embedded and written.
    fn push(&mut self, chunk: Chunk) -> Result<bool> {
        self.batch.push(chunk);
        if self.batch.len() < self.embed_batch {
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = self.batch.iter().map(|c| c.text.as_str()).collect();
        let vectors = self.embedder.embed(&texts)?;
        let bad = vectors.len() != texts.len()
            || vectors
                .iter()
                .any(|v| v.len() != self.dim || v.iter().any(|x| !x.is_finite()));
        if bad {
            return Err(Error::Embed(format!(
                "`{}` returned {} vectors for {} texts, not all of dimension {} with finite values",
                self.embedder.id(),
                vectors.len(),
                texts.len(),
                self.dim
            )));
        }
        let conn = self.tx.conn;
        let err = |e| self.tx.err(e);
        let mut insert_chunk = conn
            .prepare_cached(
                "INSERT INTO chunks (source_id, ordinal, text, line_start, line_end, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(err)?;
        let mut insert_vector = conn
            .prepare_cached("INSERT INTO vectors (chunk_id, vector) VALUES (?1, ?2)")
            .map_err(err)?;
        for (chunk, vector) in self.batch.iter().zip(&vectors) {
            let meta = serde_json::to_string(&ChunkMeta {
                headings: chunk.headings.clone(),
                title: chunk.title.clone(),
                doc_id: chunk.doc_id.clone(),
            })
            .map_err(|e| Error::Embed(format!("cannot encode chunk metadata: {e}")))?;
            let chunk_id = insert_chunk
                .insert(params![
                    self.source_id,
                    self.written as i64,
                    chunk.text,
                    chunk.line_start as i64,
                    chunk.line_end as i64,
                    meta
                ])
                .map_err(err)?;
            insert_vector
                .execute(params![chunk_id, encode_vector(vector)])
                .map_err(err)?;
            self.written += 1;
            self.since_commit += 1;
        }
        drop((insert_chunk, insert_vector));
        self.batch.clear();
        if self.since_commit >= self.commit_every {
            // A big file: make the work so far durable, the source still incomplete.
            self.tx.commit_and_continue()?;
            self.since_commit = 0;
        }
        Ok(())
    }

    /// Writes the last batch, marks the source complete and commits. Returns the chunks of that
    /// last batch.
    fn finish(mut self, scanned: &Scanned) -> Result<usize> {
        let tail = self.batch.len();
        self.flush()?;
        self.tx
            .conn
            .execute(
                "UPDATE sources SET complete = 1, chunks = ?1, sha256 = ?2 WHERE id = ?3",
                params![self.written as i64, scanned.sha256, self.source_id],
            )
            .map_err(|e| self.tx.err(e))?;
        self.tx.commit()?;
        Ok(tail)
    }
}
