//! The document index end to end with the deterministic test embedder: incremental add, remove,
//! stats, iteration, chunk lookup, exact search, embedder checks.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;

use common::*;
use lever_rag::testing::HashEmbed;
use lever_rag::{AddOptions, ChunkSettings, Embed, Error, Event, Index};

#[test]
fn add_counts_skips_and_is_incremental_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let e = HashEmbed::new(32);
    let s = small_chunks();
    let md = write(
        &docs.join("guide.md"),
        format!(
            "# Guide\n{}\n\n## Install\n{}\n",
            paragraph(0, 0),
            paragraph(0, 1)
        ),
    );
    let txt = write(
        &docs.join("notes.txt"),
        format!("{}\n\n{}\n", paragraph(1, 0), paragraph(1, 1)),
    );
    let html = write(
        &docs.join("page.html"),
        format!(
            "<html><script>var x = 1;</script>\n<p>{}</p>\n</html>\n",
            paragraph(2, 0)
        ),
    );
    let jsonl = write(
        &docs.join("recs.jsonl"),
        format!(
            "{{\"text\": \"{}\", \"title\": \"R\"}}\n{{broken\n",
            paragraph(3, 0)
        ),
    );
    write(&docs.join("bin.txt"), b"\x00\x01\x02binary");
    write(&docs.join("latin1.txt"), b"caf\xe9\n");
    write(&docs.join("empty.md"), b"");
    write(&docs.join("paper.pdf"), b"%PDF-1.4");
    write(&docs.join("data.csv"), b"a,b\n");

    let mut index = Index::create(&tmp.path().join("idx"), &e, &s).unwrap();
    let mut events = Vec::new();
    let report = index
        .add(&[&docs], &e, &AddOptions::default(), &mut |ev| {
            if let Event::File { path, outcome } = ev {
                events.push((path.file_name().unwrap().to_owned(), outcome.clone()));
            }
        })
        .unwrap();
    assert_eq!((report.added, report.updated, report.unchanged), (4, 0, 0));
    let kinds: BTreeMap<&str, usize> = report.skipped_by_kind();
    let want: BTreeMap<&str, usize> = [
        ("binary", 1),
        ("empty", 1),
        ("invalid-utf8", 1),
        ("pdf", 1),
        ("unsupported", 1),
    ]
    .into();
    assert_eq!(kinds, want);
    assert_eq!(report.warnings.len(), 1);
    let warning = report.warnings[0].to_string();
    assert!(warning.contains("recs.jsonl:2: invalid JSON"), "{warning}");
    assert_eq!(events.len(), 9, "one File event per file: {events:?}");

    let expected: usize = [&md, &txt, &html, &jsonl]
        .iter()
        .map(|p| expected_chunks(p, &s))
        .sum();
    assert_eq!(report.chunks as usize, expected);
    let stats = index.stats().unwrap();
    assert_eq!(
        (stats.sources, stats.chunks, stats.vectors),
        (4, expected as u64, expected as u64)
    );
    assert_eq!((stats.embedder.as_str(), stats.dim), ("hash-bow-32", 32));
    assert!(stats.db_bytes > 0);

    // Nothing changed: nothing is written, the generation stays.
    let g = index.generation().unwrap();
    let again = index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(
        (again.added, again.updated, again.unchanged, again.chunks),
        (0, 0, 4, 0)
    );
    assert_eq!(index.generation().unwrap(), g);

    // Same bytes, new mtime: still unchanged (content hash, not mtime).
    std::fs::write(&txt, std::fs::read(&txt).unwrap()).unwrap();
    let touched = index
        .add(&[&txt], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(touched.unchanged, 1);

    // Changed content: the file's chunks are replaced, nothing else moves.
    let before = content(&index);
    std::fs::write(&txt, format!("{}\n", paragraph(9, 9))).unwrap();
    let changed = index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(
        (changed.added, changed.updated, changed.unchanged),
        (0, 1, 3)
    );
    assert!(index.generation().unwrap() > g);
    let after = content(&index);
    let txt_str = txt.to_str().unwrap();
    let others = |c: &Vec<(String, usize, String, usize, usize)>| {
        c.iter()
            .filter(|r| r.0 != txt_str)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&before), others(&after));
    let txt_chunks: Vec<&str> = after
        .iter()
        .filter(|r| r.0 == txt_str)
        .map(|r| r.2.as_str())
        .collect();
    assert_eq!(txt_chunks, [paragraph(9, 9).as_str()]);

    // A file deleted from an added folder is pruned; with `prune: false` it stays.
    let jsonl_copy = write(&docs.join("sub/copy.jsonl"), std::fs::read(&jsonl).unwrap());
    index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(index.stats().unwrap().sources, 5);
    std::fs::remove_file(&jsonl_copy).unwrap();
    let keep = AddOptions {
        prune: false,
        ..AddOptions::default()
    };
    assert_eq!(
        index.add(&[&docs], &e, &keep, &mut quiet).unwrap().pruned,
        0
    );
    assert_eq!(index.stats().unwrap().sources, 5);
    let pruned = index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!((pruned.pruned, pruned.unchanged), (1, 4));
    assert_eq!(index.stats().unwrap().sources, 4);

    // An indexed file that becomes empty loses its stale chunks.
    std::fs::write(&txt, "").unwrap();
    let emptied = index
        .add(&[&txt], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(emptied.stale_removed, 1);
    assert_eq!(emptied.skipped_by_kind().get("empty"), Some(&1));
    assert_eq!(index.stats().unwrap().sources, 3);
    assert!(index.verify(true).unwrap().is_ok());
}

#[test]
fn chunk_lookup_iterators_and_exact_search_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let e = HashEmbed::new(64);
    let s = small_chunks();
    let md = write(
        &tmp.path().join("docs/guide.md"),
        format!(
            "# Guide\n{}\n\n## Install\n{}\n\n{}\n",
            paragraph(100, 0),
            paragraph(100, 1),
            paragraph(100, 2)
        ),
    );
    corpus(&tmp.path().join("docs"), 5, |_| 3);
    let mut index = Index::create(&tmp.path().join("idx"), &e, &s).unwrap();
    index
        .add(
            &[tmp.path().join("docs")],
            &e,
            &AddOptions::default(),
            &mut quiet,
        )
        .unwrap();

    let hits = index.search_text(&e, &paragraph(100, 1), 3).unwrap();
    assert_eq!(hits.len(), 3);
    assert!(
        hits[0].score > 0.9 && hits[1].score < hits[0].score,
        "{hits:?}"
    );
    // The "Install" heading (line 4) and its first paragraph (line 5) make one chunk.
    let top = index.chunk(hits[0].chunk_id).unwrap().unwrap();
    assert_eq!(top.path, md);
    assert_eq!(top.text, format!("## Install\n\n{}", paragraph(100, 1)));
    assert_eq!((top.line_start, top.line_end), (4, 5));
    assert_eq!(top.headings, ["Guide", "Install"]);
    assert_eq!(index.chunk(i64::MAX).unwrap(), None);

    // The iterators see the same chunks as the stats and the search matrix.
    let stats = index.stats().unwrap();
    let texts: Vec<(i64, String)> = index.chunks().unwrap().map(Result::unwrap).collect();
    let vectors: Vec<(i64, Vec<f32>)> = index.vectors().unwrap().map(Result::unwrap).collect();
    assert_eq!(texts.len() as u64, stats.chunks);
    assert_eq!(
        texts.iter().map(|t| t.0).collect::<Vec<_>>(),
        vectors.iter().map(|v| v.0).collect::<Vec<_>>()
    );
    let (id, text) = &texts[3];
    assert_eq!(vectors[3].1, e.embed(&[text]).unwrap()[0], "chunk {id}");
    let matrix = index.load_vectors().unwrap();
    assert_eq!(matrix.len() as u64, stats.chunks);
    assert_eq!(matrix.generation, stats.generation);
    assert_eq!(index.chunks().unwrap().generation(), stats.generation);

    // The cached matrix follows a change of the index.
    std::fs::write(&md, "completely different words here\n").unwrap();
    index
        .add(&[&md], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    let hits = index
        .search_text(&e, "completely different words here", 1)
        .unwrap();
    assert_eq!(index.chunk(hits[0].chunk_id).unwrap().unwrap().path, md);
    assert!(hits[0].score > 0.99);
}

#[test]
fn remove_deletes_a_file_or_everything_under_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let e = HashEmbed::new(16);
    let s = small_chunks();
    let docs = tmp.path().join("docs");
    let a = corpus(&docs.join("a"), 3, |_| 2);
    corpus(&docs.join("ab"), 2, |_| 2); // shares the prefix "a" but is not under a/
    let mut index = Index::create(&tmp.path().join("idx"), &e, &s).unwrap();
    index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    assert_eq!(index.stats().unwrap().sources, 5);

    let one = index.remove(&a[0]).unwrap();
    assert_eq!(
        (one.sources, one.chunks),
        (1, expected_chunks(&a[0], &s) as u64)
    );
    let folder = index.remove(&docs.join("a")).unwrap();
    assert_eq!(folder.sources, 2);
    let stats = index.stats().unwrap();
    assert_eq!(stats.sources, 2, "docs/ab survives removing docs/a");
    let nothing = index.remove(&docs.join("nope")).unwrap();
    assert_eq!((nothing.sources, nothing.chunks), (0, 0));

    // A file deleted from disk can still be removed by its path.
    let ab0 = docs.join("ab/doc000.txt");
    std::fs::remove_file(&ab0).unwrap();
    assert_eq!(index.remove(&ab0).unwrap().sources, 1);
    let verify = index.verify(true).unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(
        index.stats().unwrap().vectors,
        index.stats().unwrap().chunks
    );
}

/// Another embedder with the same dimension but another id.
struct Other;
impl Embed for Other {
    fn id(&self) -> String {
        "other-model".into()
    }
    fn dim(&self) -> usize {
        32
    }
    fn embed(&self, texts: &[&str]) -> lever_rag::Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|_| vec![0.0; 32]).collect())
    }
}

#[test]
fn an_index_refuses_another_embedder_and_keeps_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let e = HashEmbed::new(32);
    let docs = tmp.path().join("docs");
    corpus(&docs, 2, |_| 2);
    let dir = tmp.path().join("idx");
    let mut index = Index::create(&dir, &e, &ChunkSettings::default()).unwrap();
    index
        .add(&[&docs], &e, &AddOptions::default(), &mut quiet)
        .unwrap();
    // Byte sizes move with WAL checkpoints; compare everything else.
    let counts = |i: &Index| lever_rag::Stats {
        db_bytes: 0,
        ..i.stats().unwrap()
    };
    let before = counts(&index);
    drop(index);

    let mut index = Index::open(&dir).unwrap();
    for wrong in [&HashEmbed::new(16) as &dyn Embed, &Other] {
        let err = index
            .add(&[&docs], wrong, &AddOptions::default(), &mut quiet)
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::EmbedderMismatch { .. }), "{msg}");
        assert!(msg.contains("`hash-bow-32` (dim 32)"), "{msg}");
        assert!(
            msg.contains(&format!("`{}` (dim {})", wrong.id(), wrong.dim())),
            "{msg}"
        );
        assert!(msg.contains("index.db"), "{msg}");
        assert!(index.search_text(wrong, "x", 1).is_err());
    }
    assert_eq!(counts(&index), before);
    // A second create over an existing index is refused too.
    let err = Index::create(&dir, &Other, &ChunkSettings::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(counts(&Index::open(&dir).unwrap()), before);
}

#[test]
fn progress_events_count_files_chunks_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let e = HashEmbed::new(16);
    let s = small_chunks();
    let files = corpus(&tmp.path().join("docs"), 4, |i| 2 + i);
    let total_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let total_chunks: usize = files.iter().map(|f| expected_chunks(f, &s)).sum();
    let mut index = Index::create(&tmp.path().join("idx"), &e, &s).unwrap();
    let mut seen = Vec::new();
    let opts = AddOptions {
        embed_batch: 2,
        ..AddOptions::default()
    };
    let mut walked = None;
    index
        .add(&[tmp.path().join("docs")], &e, &opts, &mut |ev| match ev {
            Event::Progress(p) => seen.push(p),
            Event::Walked { files, bytes, .. } => walked = Some((files, bytes)),
            _ => {}
        })
        .unwrap();
    assert_eq!(walked, Some((4, total_bytes)));
    let last = *seen.last().unwrap();
    assert_eq!((last.files_done, last.files_total), (4, 4));
    assert_eq!(
        (last.bytes_done, last.bytes_total),
        (total_bytes, total_bytes)
    );
    assert_eq!(last.chunks as usize, total_chunks);
    assert!(
        seen.windows(2)
            .all(|w| w[0].chunks <= w[1].chunks && w[0].bytes_done <= w[1].bytes_done)
    );
    assert!(seen.len() > 4, "progress within files too: {}", seen.len());
}
