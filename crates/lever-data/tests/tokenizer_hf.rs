//! Tokenizers lever trains are Hugging Face tokenizers: trained here on the first 200 KB of
//! ../shared/data/tinyshakespeare, they are byte for byte the tokenizer.json files that
//! tests/fixtures/hf_tokenizer_ids.py loaded into Hugging Face `tokenizers` (Python 0.23.2),
//! and lever (lever_model::Tokenizer) encodes and decodes the fixture's strings — unicode,
//! digits, code, whitespace runs, a special token — to exactly the ids and text Python gave.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use lever_data::tokenizer_train::{self, END_OF_TEXT, Kind, TrainOptions, Trained};
use serde_json::Value;

const SLICE: usize = 200_000;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tokenizer_ids.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The first 200 KB of Tiny Shakespeare (ASCII, so any cut is a character boundary).
fn corpus(dir: &Path) -> PathBuf {
    let input = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/tinyshakespeare/input.txt");
    let bytes = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
    let path = dir.join("ts200k.txt");
    std::fs::write(&path, &bytes[..SLICE]).unwrap();
    path
}

fn train(dir: &Path, kind: Kind, vocab_size: Option<usize>) -> Trained {
    let opts = TrainOptions {
        kind,
        vocab_size,
        min_frequency: 0,
        special: vec![END_OF_TEXT.into()],
    };
    tokenizer_train::train(&[corpus(dir)], &opts, &|_| {}).unwrap()
}

fn sha256(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Write `t`, load it with lever, and compare every case of the fixture's `section`.
fn check_cases(dir: &Path, t: &Trained, section: &Value) -> lever_model::Tokenizer {
    let out = dir.join(section["args"].as_str().unwrap().replace(' ', "_"));
    t.write(&out).unwrap();
    assert_eq!(
        sha256(&t.tokenizer_json),
        section["sha256"].as_str().unwrap()
    );
    let tok = lever_model::Tokenizer::from_file(
        &out.join("tokenizer.json"),
        Some(END_OF_TEXT),
        Some(END_OF_TEXT),
    )
    .unwrap();
    assert_eq!(
        tok.vocab_size() as u64,
        section["vocab_size"].as_u64().unwrap()
    );
    let cases = section["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(
            tok.decode(&got),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    tok
}

#[test]
fn bpe_ids_match_hugging_face_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture();
    let t = train(dir.path(), Kind::Bpe, Some(512));
    assert_eq!(
        (t.vocab_size, t.alphabet, t.merges, t.eot_id),
        (512, 256, 255, 0)
    );
    assert_eq!(t.bytes, SLICE as u64);
    let tok = check_cases(dir.path(), &t, &fx["bpe"]);
    // Byte-level: every string comes back exactly, and the special token is one id.
    for case in fx["bpe"]["cases"].as_array().unwrap() {
        assert_eq!(case["decoded"], case["text"]);
    }
    assert_eq!(tok.encode("<|endoftext|>", false).unwrap(), [0]);
    assert!(tok.is_eog(0));
}

#[test]
fn char_ids_match_hugging_face_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture();
    let t = train(dir.path(), Kind::Char, None);
    // The slice has 62 distinct characters; the end-of-text token follows them.
    assert_eq!((t.vocab_size, t.alphabet, t.eot_id), (63, 62, 62));
    let tok = check_cases(dir.path(), &t, &fx["char"]);
    // nanoGPT's ids: sorted characters, "\n" first, then " ".
    assert_eq!(tok.encode("\n !", false).unwrap(), [0, 1, 2]);
    // Characters outside the vocabulary: an error in Python, an error in lever.
    for case in fx["char"]["unknown"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert!(case["error"].is_string(), "Python encoded {text:?}");
        assert!(tok.encode(text, false).is_err(), "lever encoded {text:?}");
    }
}

#[test]
fn training_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(dir.path(), Kind::Bpe, Some(300));
    let b = train(dir.path(), Kind::Bpe, Some(300));
    assert_eq!(a.tokenizer_json, b.tokenizer_json);
    assert_eq!(a.merges, 300 - 256 - 1);
}
