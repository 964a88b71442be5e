//! The retriever over a real index: each mode finds the chunk a query is about; forcing HNSW
//! gives the exact scan's answers on a small index; bm25.bin and hnsw.bin are reused while
//! the index is unchanged and brought up to date after an add or a removal.
#![allow(clippy::unwrap_used)]

use crate::common;

use lever_rag::testing::HashEmbed;
use lever_rag::{AddOptions, DenseIndex, Index, Mode, Retriever};

const DOCS: [(&str, &str); 4] = [
    (
        "cats.md",
        "# Cats\nCats purr and chase mice around the barn.\n",
    ),
    (
        "rust.md",
        "# Rust\nThe borrow checker enforces ownership of memory.\n",
    ),
    (
        "tea.txt",
        "Green tea is steeped at eighty degrees for two minutes.\n",
    ),
    (
        "rivers.txt",
        "The Nile and the Amazon are the longest rivers.\n",
    ),
];

fn path_of(index: &Index, id: u64) -> String {
    let c = index.chunk(id as i64).unwrap().unwrap();
    c.path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_mode_finds_the_chunk_and_caches_follow_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    for (name, text) in DOCS {
        common::write(&docs.join(name), text);
    }
    let embedder = HashEmbed::new(256);
    let dir = tmp.path().join("idx");
    let mut index = Index::create(&dir, &embedder, &common::small_chunks()).unwrap();
    index
        .add(
            &[&docs],
            &embedder,
            &AddOptions::default(),
            &mut common::quiet,
        )
        .unwrap();

    for dense_index in [DenseIndex::Exact, DenseIndex::Hnsw] {
        let mut r = Retriever::new(&index, dense_index);
        for mode in Mode::ALL {
            let hits = r
                .search(&embedder, "how long to steep green tea", mode, 3)
                .unwrap();
            assert_eq!(
                path_of(&index, hits[0].id),
                "tea.txt",
                "{mode:?} {dense_index:?}"
            );
            let hits = r
                .search(&embedder, "borrow checker ownership", mode, 2)
                .unwrap();
            assert_eq!(
                path_of(&index, hits[0].id),
                "rust.md",
                "{mode:?} {dense_index:?}"
            );
            assert!(hits.len() <= 2);
        }
    }
    let generation = index.generation().unwrap();
    assert_eq!(
        lever_rag::bm25::Bm25::read_generation(&dir.join("bm25.bin")).unwrap(),
        generation
    );
    assert_eq!(
        lever_rag::hnsw::Hnsw::read_generation(&dir.join("hnsw.bin")).unwrap(),
        generation
    );

    // A new file and a removed one: the saved structures are stale and get brought up to date.
    common::write(
        &docs.join("owls.txt"),
        "Owls hunt mice at night in silence.\n",
    );
    index
        .add(
            &[&docs],
            &embedder,
            &AddOptions::default(),
            &mut common::quiet,
        )
        .unwrap();
    index.remove(&docs.join("cats.md")).unwrap();
    for dense_index in [DenseIndex::Exact, DenseIndex::Hnsw] {
        let mut r = Retriever::new(&index, dense_index);
        for mode in Mode::ALL {
            let hits = r.search(&embedder, "mice owls hunt", mode, 10).unwrap();
            assert_eq!(
                path_of(&index, hits[0].id),
                "owls.txt",
                "{mode:?} {dense_index:?}"
            );
            assert!(
                hits.iter().all(|h| path_of(&index, h.id) != "cats.md"),
                "{mode:?} {dense_index:?}: a removed file is still found"
            );
        }
    }
    let generation = index.generation().unwrap();
    assert_eq!(
        lever_rag::bm25::Bm25::read_generation(&dir.join("bm25.bin")).unwrap(),
        generation
    );
    assert_eq!(
        lever_rag::hnsw::Hnsw::read_generation(&dir.join("hnsw.bin")).unwrap(),
        generation
    );
}
