//! lever's sentence encoder against sentence-transformers on the real all-MiniLM-L6-v2
//! (fixture: scripts/make-embed-fixtures.sh): token ids equal, cosine ≥ 0.9999 for every
//! text, with the minimum cosine and maximum absolute difference printed. Both matrix
//! products are held to it: f32 (also within 1e-4 per value) and bf16 (within 3e-3 per value,
//! its rounding being ~1e-3), the latter with AVX-512 BF16 where the CPU has it and with the
//! portable kernel, the same arithmetic, elsewhere.
//!
//! Needs the model provisioned in `$LEVER_HOME` (CI does: `lever models pull`); skipped with
//! a message otherwise.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lever_model::Encoder;
use lever_model::encoder::{Kernels, MatMul, Pooling, embed_batch};
use lever_model::kernels::bf16_gemm;
use lever_model::testing::max_abs_diff;
use serde_json::Value;

fn model_dir() -> Option<PathBuf> {
    let home = lever_model::registry::lever_home();
    let entry = lever_model::registry::find(lever_model::registry::DEFAULT_EMBEDDER)?;
    if entry.is_provisioned(&home) {
        Some(entry.dir(&home))
    } else {
        eprintln!(
            "SKIPPED: {} is not provisioned in {} (run `lever models pull {}`)",
            entry.name,
            home.display(),
            entry.name
        );
        None
    }
}

struct Case {
    text: String,
    ids: Vec<u32>,
    truncated: bool,
    embedding: Vec<f32>,
}

fn fixture() -> (usize, Vec<Case>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/embed/minilm.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: serde_json::from_value(c["ids"].clone()).unwrap(),
            truncated: c["truncated"].as_bool().unwrap(),
            embedding: serde_json::from_value(c["embedding"].clone()).unwrap(),
        })
        .collect();
    (v["max_seq_length"].as_u64().unwrap() as usize, cases)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// (min cosine, its text index, max abs difference)
fn compare(got: &[Vec<f32>], cases: &[Case]) -> (f64, usize, f32) {
    let mut worst = (f64::INFINITY, 0, 0f32);
    for (i, (g, c)) in got.iter().zip(cases).enumerate() {
        assert_eq!(g.len(), c.embedding.len(), "text {i}: dimension");
        let cos = cosine(g, &c.embedding);
        if cos < worst.0 {
            worst.0 = cos;
            worst.1 = i;
        }
        let d = max_abs_diff(g, &c.embedding);
        worst.2 = worst.2.max(d);
    }
    worst
}

/// The encoder with the given matrix product, checked against the fixture: (min cosine,
/// max abs difference) to sentence-transformers, printed.
fn check_against_fixture(mm: MatMul) -> (f64, f32) {
    let dir = model_dir().unwrap();
    let mut enc = Encoder::load(&dir).unwrap();
    enc.model.set_matmul(mm).unwrap();
    let (max_len, cases) = fixture();
    assert!(cases.len() >= 50);
    assert_eq!(enc.max_tokens(), max_len);
    assert_eq!(enc.dim(), 384);
    assert_eq!(enc.config().pooling, Pooling::Mean);
    assert!(enc.config().normalize);

    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let tokens = enc.tokenize(&texts).unwrap();
    for (i, (t, c)) in tokens.iter().zip(&cases).enumerate() {
        assert_eq!(t.ids, c.ids, "text {i} {:?}: token ids", c.text);
        assert_eq!(t.truncated, c.truncated, "text {i}: truncated");
    }

    let out = enc.embed(&texts).unwrap();
    let want_truncated = cases.iter().filter(|c| c.truncated).count();
    assert!(want_truncated >= 3, "the fixture must exercise truncation");
    assert_eq!(out.truncated, want_truncated);
    let (min_cos, at, max_diff) = compare(&out.vectors, &cases);
    println!(
        "encoder ({mm:?} matmul) vs sentence-transformers, {} texts: min cosine {min_cos:.7} (text {at}), max abs diff {max_diff:.2e}",
        cases.len()
    );
    assert!(
        min_cos >= 0.9999,
        "{mm:?}: text {at} {:?}: cosine {min_cos}",
        cases[at].text
    );
    for v in &out.vectors {
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "not normalized: {n}");
    }
    (min_cos, max_diff)
}

#[test]
fn minilm_matches_sentence_transformers() {
    if model_dir().is_none() {
        return;
    }
    let (_, max_diff) = check_against_fixture(MatMul::F32);
    assert!(max_diff < 1e-4, "max abs diff {max_diff}");
}

/// Which bf16 kernel runs here, for the log.
fn bf16_kernel() -> &'static str {
    if bf16_gemm::supported() {
        "AVX-512 BF16"
    } else {
        "portable (this CPU lacks AVX-512 BF16)"
    }
}

#[test]
fn minilm_bf16_matmul_matches_sentence_transformers() {
    println!("bf16 kernel: {}", bf16_kernel());
    if model_dir().is_none() {
        return;
    }
    let (_, max_diff) = check_against_fixture(MatMul::Bf16);
    assert!(max_diff < 3e-3, "max abs diff {max_diff}");
}

/// The bf16 and f32 matrix products give the same vectors within cosine 0.9999 on the
/// fixture texts, batch by batch.
#[test]
fn minilm_bf16_and_f32_matmul_agree() {
    println!("bf16 kernel: {}", bf16_kernel());
    let Some(dir) = model_dir() else { return };
    let mut enc = Encoder::load(&dir).unwrap();
    let (_, cases) = fixture();
    let batch: Vec<&[u32]> = cases.iter().map(|c| c.ids.as_slice()).collect();
    enc.model.set_matmul(MatMul::F32).unwrap();
    let a = embed_batch(&enc.model, &batch, Some(Kernels::Fused)).unwrap();
    enc.model.set_matmul(MatMul::Bf16).unwrap();
    let b = embed_batch(&enc.model, &batch, Some(Kernels::Fused)).unwrap();
    let min_cos = a
        .iter()
        .zip(&b)
        .map(|(x, y)| cosine(x, y))
        .fold(f64::INFINITY, f64::min);
    println!(
        "bf16 vs f32 matmul, {} texts: min cosine {min_cos:.7}",
        cases.len()
    );
    assert!(
        min_cos >= 0.9999,
        "bf16 vs f32 matmul: min cosine {min_cos}"
    );
}

/// The differentiable (elementary) kernels give the same vectors as the fused ones on the
/// real model, batch by batch.
#[test]
fn minilm_fused_and_elementary_kernels_agree() {
    let Some(dir) = model_dir() else { return };
    let mut enc = Encoder::load(&dir).unwrap();
    // The fused kernels with the f32 product (training multiplies in f32).
    enc.model.set_matmul(MatMul::F32).unwrap();
    let (_, cases) = fixture();
    let batch: Vec<&[u32]> = cases[40..52].iter().map(|c| c.ids.as_slice()).collect();
    let a = embed_batch(&enc.model, &batch, Some(Kernels::Elementary)).unwrap();
    let b = embed_batch(&enc.model, &batch, Some(Kernels::Fused)).unwrap();
    let d = max_abs_diff(&a.concat(), &b.concat());
    println!("fused vs elementary kernels: max abs diff {d:.2e}");
    assert!(d < 1e-5, "{d}");
    let (min_cos, _, _) = compare(&a, &cases[40..52]);
    assert!(
        min_cos >= 0.9999,
        "elementary kernels: min cosine {min_cos}"
    );
}

#[test]
fn token_offsets_are_byte_spans_of_the_wordpieces() {
    let Some(dir) = model_dir() else { return };
    let enc = Encoder::load(&dir).unwrap();
    let text = "Café au lait, 東京! unaffable";
    let spans = enc.token_offsets(text).unwrap();
    let pieces: Vec<&str> = spans.iter().map(|&(a, b)| &text[a..b]).collect();
    // WordPiece splits `unaffable` and keeps each CJK character a token; no [CLS]/[SEP].
    assert_eq!(pieces.first(), Some(&"Café"));
    assert!(
        pieces.contains(&"東") && pieces.contains(&"京"),
        "{pieces:?}"
    );
    assert_eq!(pieces.last().map(|p| text.ends_with(p)), Some(true));
    let ids = enc.tokenize(&[text]).unwrap().remove(0).ids;
    assert_eq!(spans.len() + 2, ids.len());
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
}

#[test]
fn id_names_model_pooling_and_length() {
    let Some(dir) = model_dir() else { return };
    let enc = Encoder::load(&dir).unwrap();
    // sha256 of model.safetensors pinned in the registry: 53aa5117…
    assert_eq!(
        enc.id().unwrap(),
        "all-minilm-l6-v2:53aa51172d142c89:mean+norm:256"
    );
}

#[test]
fn missing_tensor_and_missing_folder_are_named_errors() {
    let Some(dir) = model_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        dir.join("1_Pooling/config.json"),
        tmp.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    // A safetensors file whose only tensor is the word embeddings, at the wrong shape.
    let t = candle_core::Tensor::zeros(
        (10, 384),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings.word_embeddings.weight".to_string(), t)]),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let e = Encoder::load(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("embeddings.word_embeddings.weight")
            && e.contains("[10, 384]"),
        "{e}"
    );
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = Encoder::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    let e = Encoder::load(&tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("not a folder"), "{e}");
}
