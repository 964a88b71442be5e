//! The retrieval side of RAG-Sequence and RAG-Token on a real index: JSONL `_id`s kept by
//! every chunk of their record, p(z|x) as a softmax of the inner products over the top k,
//! `k` above the index's size refused by name, and a query encoder other than the index's
//! accepted or refused by name.
#![allow(clippy::unwrap_used)]

use crate::common;

use lever_rag::testing::HashEmbed;
use lever_rag::{
    AddOptions, ChunkMode, ChunkSettings, DenseIndex, Embed, Index, Retriever, latent,
};

/// An embedder with the vectors of a hashed bag of words and the id a real encoder would
/// have (`name:hash:pooling:max_tokens`).
struct Named {
    id: String,
    inner: HashEmbed,
}

impl Named {
    fn new(id: &str, dim: usize) -> Named {
        Named {
            id: id.into(),
            inner: HashEmbed::new(dim),
        }
    }
}

impl Embed for Named {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn embed(&self, texts: &[&str]) -> lever_rag::Result<Vec<Vec<f32>>> {
        self.inner.embed(texts)
    }
}

const DOCUMENT_ENCODER: &str = "all-minilm-l6-v2:53aa51172d142c89:mean+norm:256";

fn corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let long: Vec<String> = (0..40).map(|i| format!("nile{i}")).collect();
    common::write(
        &dir.join("corpus.jsonl"),
        format!(
            "{{\"_id\": \"d1\", \"title\": \"Rivers\", \"text\": \"{}\"}}\n\
             {{\"_id\": \"d2\", \"text\": \"green tea steeped at eighty degrees\"}}\n\
             {{\"_id\": 3, \"text\": \"owls hunt at night with silent feathers\"}}\n\
             {{\"text\": \"octopuses have three hearts\"}}\n",
            long.join(" ")
        ),
    )
}

fn index(tmp: &std::path::Path, embed: &dyn Embed) -> Index {
    let settings = ChunkSettings {
        mode: ChunkMode::Tokens,
        size: 16,
        overlap: 4,
    };
    let docs = corpus(&tmp.join("docs"));
    let mut index = Index::create(&tmp.join("idx"), embed, &settings).unwrap();
    index
        .add(&[&docs], embed, &AddOptions::default(), &mut common::quiet)
        .unwrap();
    index
}

#[test]
fn chunks_keep_their_record_id_and_passages_get_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let embed = Named::new(DOCUMENT_ENCODER, 64);
    let index = index(tmp.path(), &embed);
    // 40 words in windows of 16 advancing by 12: d1 makes 3 chunks, the others 1 each.
    assert_eq!(index.stats().unwrap().chunks, 6);
    let mut r = Retriever::new(&index, DenseIndex::Exact);
    let got = latent::retrieve(&mut r, &embed, "nile0 nile1 nile2", 6, 0.05, None).unwrap();
    let ids: Vec<Option<&str>> = got
        .passages
        .iter()
        .map(|(_, p)| p.doc_id.as_deref())
        .collect();
    assert_eq!(ids[0], Some("d1"));
    assert_eq!(ids.iter().filter(|i| **i == Some("d1")).count(), 3);
    assert!(ids.contains(&Some("3")) && ids.contains(&None), "{ids:?}");
    // p(z|x) = softmax(s / τ) over the k: sums to 1, ratios are exp(Δs / τ).
    let p = got.doc_probs();
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let (s0, s1) = (got.passages[0].1.score, got.passages[1].1.score);
    let ratio = (got.doc_log_probs[0] - got.doc_log_probs[1]).exp();
    assert!((ratio - ((s0 - s1) as f64 / 0.05).exp()).abs() < 1e-3 * ratio);

    // More passages than the index holds, and an empty question: errors naming what.
    let e = latent::check_k(&index, 7).unwrap_err().to_string();
    assert!(
        e.starts_with("-k 7: the index ") && e.ends_with("holds only 6 passages"),
        "{e}"
    );
    latent::check_k(&index, 6).unwrap();
    let e = latent::retrieve(&mut r, &embed, "  ", 2, 0.05, None).unwrap_err();
    assert_eq!(e.to_string(), "the question is empty");
}

#[test]
fn a_query_encoder_is_accepted_for_the_index_it_was_trained_for_and_refused_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let embed = Named::new(DOCUMENT_ENCODER, 64);
    let index = index(tmp.path(), &embed);
    let q = "green tea degrees";
    let mut plain = Retriever::new(&index, DenseIndex::Exact);
    let want = latent::retrieve(&mut plain, &embed, q, 3, 0.05, None).unwrap();

    // Not accepted: the index refuses any other encoder, as before.
    let trained = Named::new("query-encoder:0123456789abcdef:mean+norm:256", 64);
    let mut r = Retriever::new(&index, DenseIndex::Exact);
    let e = latent::retrieve(&mut r, &trained, q, 3, 0.05, None).unwrap_err();
    assert!(
        e.to_string().contains("refusing embedder `query-encoder:"),
        "{e}"
    );

    // Accepted with the same settings (no pairing note) or paired with this index's encoder.
    for paired in [None, Some(DOCUMENT_ENCODER)] {
        let mut r = Retriever::new(&index, DenseIndex::Exact);
        r.accept_query_encoder(&trained, paired).unwrap();
        let got = latent::retrieve(&mut r, &trained, q, 3, 0.05, None).unwrap();
        let ids = |x: &latent::Retrieved| x.passages.iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want));
    }

    // Refused by name: paired with another index's encoder, other settings, another dimension.
    let mut r = Retriever::new(&index, DenseIndex::Exact);
    let e = r
        .accept_query_encoder(&trained, Some("bge-small:feed:cls+norm:512"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "index was built with embedder `{DOCUMENT_ENCODER}`"
        )) && e.contains("refusing query encoder `query-encoder:")
            && e.ends_with("it was trained for an index built with `bge-small:feed:cls+norm:512`"),
        "{e}"
    );
    let cls = Named::new("other:0123456789abcdef:cls+norm:256", 64);
    let e = r.accept_query_encoder(&cls, None).unwrap_err().to_string();
    assert!(
        e.ends_with("their pooling, normalization or length limit differ"),
        "{e}"
    );
    let narrow = Named::new("query-encoder:0123456789abcdef:mean+norm:256", 32);
    let e = r
        .accept_query_encoder(&narrow, Some(DOCUMENT_ENCODER))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("(dim 32)") && e.ends_with("their dimensions differ"),
        "{e}"
    );
}
