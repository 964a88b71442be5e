//! Helpers shared by the index tests: document trees and expected chunk counts.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lever_rag::read::{self, Format, ReadOutcome};
use lever_rag::{ChunkMode, ChunkSettings, Index};

/// Small chunks so that a few paragraphs make several chunks.
pub fn small_chunks() -> ChunkSettings {
    ChunkSettings {
        mode: ChunkMode::Structure,
        size: 16,
        overlap: 4,
    }
}

pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.canonicalize().unwrap()
}

/// A paragraph of ten words unique to (file, paragraph), so that search can find it.
pub fn paragraph(file: usize, para: usize) -> String {
    (0..10)
        .map(|w| format!("f{file}p{para}w{w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` text files under `dir`; file i has `paras(i)` ten-word paragraphs.
pub fn corpus(dir: &Path, n: usize, paras: impl Fn(usize) -> usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let text = (0..paras(i))
                .map(|p| paragraph(i, p))
                .collect::<Vec<_>>()
                .join("\n\n");
            write(&dir.join(format!("doc{i:03}.txt")), text + "\n")
        })
        .collect()
}

/// The chunks a file should have, by reading it again with the word tokenizer.
pub fn expected_chunks(path: &Path, settings: &ChunkSettings) -> usize {
    let words = |t: &str| Ok(lever_rag::chunk::word_spans(t));
    let format = Format::of(path).unwrap();
    match read::read_chunks(
        path,
        format,
        settings,
        &words,
        read::MAX_LINE_BYTES,
        &mut |_, _| Ok(()),
    )
    .unwrap()
    {
        ReadOutcome::Read { chunks, .. } => chunks,
        ReadOutcome::Skipped(_) => 0,
    }
}

pub fn expected_map(files: &[PathBuf], settings: &ChunkSettings) -> BTreeMap<String, usize> {
    files
        .iter()
        .map(|p| (p.to_str().unwrap().to_owned(), expected_chunks(p, settings)))
        .collect()
}

/// Every (path, ordinal, text, lines) of the complete sources, for comparing two indexes.
pub fn content(index: &Index) -> Vec<(String, usize, String, usize, usize)> {
    let mut out = Vec::new();
    for row in index.chunks().unwrap() {
        let (id, _) = row.unwrap();
        let c = index.chunk(id).unwrap().unwrap();
        out.push((
            c.path.to_str().unwrap().to_owned(),
            c.ordinal,
            c.text,
            c.line_start,
            c.line_end,
        ));
    }
    out.sort();
    out
}

/// Discards progress events.
pub fn quiet(_: lever_rag::Event<'_>) {}
