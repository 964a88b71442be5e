//! The encoder as `lever rag train` trains it (fixtures: scripts/make-rag-train-fixtures.py):
//! - on a tiny random transformers BertModel, the training forward (elementary kernels,
//!   trainable weights) gives sentence-transformers' pooled, normalized vectors within 1e-5,
//!   equals the inference forward within 1e-5, and the gradient of Σ w ⊙ e with respect to
//!   every weight equals PyTorch autograd's within 1e-5 of the tensor's largest gradient (or
//!   absolute, below 1);
//! - on the real all-MiniLM-L6-v2, the training forward equals the inference encoder within
//!   1e-4 per value;
//! - a trained encoder written with `Encoder::write_folder` (weights moved by a fixed pattern)
//!   is a sentence-transformers folder: lever loads it and embeds as the in-memory encoder
//!   does, and as sentence-transformers embeds with the same weights (the committed fixture)
//!   within 1e-4. (crates/lever/tests/rag_train.rs runs sentence-transformers live on the
//!   folder a real `rag train` writes.)
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lever_model::encoder::{BertModel, Kernels, MatMul, pooled_batch};
use lever_model::{Encoder, EncoderConfig, Pooling};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn minilm_dir() -> Option<PathBuf> {
    let home = lever_model::registry::lever_home();
    let entry = lever_model::registry::find(lever_model::registry::DEFAULT_EMBEDDER)?;
    if entry.is_provisioned(&home) {
        Some(entry.dir(&home))
    } else {
        eprintln!("SKIPPED: {} is not provisioned", entry.name);
        None
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tiny_config() -> EncoderConfig {
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("bert-grad/config.json")).unwrap(),
    )
    .unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap() as usize;
    EncoderConfig {
        vocab_size: n("vocab_size"),
        hidden_size: n("hidden_size"),
        num_layers: n("num_hidden_layers"),
        num_heads: n("num_attention_heads"),
        intermediate_size: n("intermediate_size"),
        max_positions: n("max_position_embeddings"),
        type_vocab_size: n("type_vocab_size"),
        layer_norm_eps: cfg["layer_norm_eps"].as_f64().unwrap() as f32,
        pooling: Pooling::Mean,
        normalize: true,
        max_seq_len: n("max_position_embeddings"),
    }
}

#[test]
fn training_forward_and_gradients_match_pytorch_on_a_tiny_bert() {
    let dir = fixtures().join("bert-grad");
    let cfg = tiny_config();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let lens: Vec<usize> = reference["lens"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&n| n as usize)
        .collect();
    let seqs: Vec<&[u32]> = ids.iter().zip(&lens).map(|(s, &n)| &s[..n]).collect();
    let want = &reference["embeddings"];

    // Inference (fused kernels, f32 products) on the model as loaded.
    let mut frozen = BertModel::load(&dir.join("model.safetensors"), &cfg).unwrap();
    frozen.set_matmul(MatMul::F32).unwrap();
    let inference = pooled_batch(&frozen, &seqs, Some(Kernels::Fused)).unwrap();

    let mut model = BertModel::load(&dir.join("model.safetensors"), &cfg).unwrap();
    let vars = model.make_trainable(None).unwrap();
    assert_eq!(vars.len(), 5 + 16 * cfg.num_layers);
    let e = pooled_batch(&model, &seqs, Some(Kernels::Elementary)).unwrap(); // (B, C)
    let (d_ref, d_inf) = (max_diff(&e, want), max_diff(&e, &inference));
    println!("training forward vs PyTorch {d_ref:.2e}, vs lever's inference forward {d_inf:.2e}");
    assert!(d_ref <= 1e-5, "training forward vs PyTorch: {d_ref}");
    assert!(d_inf <= 1e-5, "training vs inference forward: {d_inf}");

    let loss = (&e * &reference["w"]).unwrap().sum_all().unwrap();
    let want_loss = reference["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want_loss).abs() <= 1e-5);
    let grads = loss.backward().unwrap();
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let r = reference
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("the fixture has no gradient for {name}"));
        assert_eq!(g.dims(), r.dims(), "{name}");
        // Relative to the tensor's largest gradient: sums over many tokens reach tens.
        let scale = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let d = max_diff(g, r) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
        assert!(
            d <= 1e-5,
            "{name}: gradient off by {d} (relative to {scale})"
        );
    }
    println!(
        "gradients of {} weights: max relative diff {:.2e} ({})",
        vars.len(),
        worst.0,
        worst.1
    );
    // The queries' gradient is there and not small: attention's softmax passes gradients
    // (a softmax without a backward once cut them off silently).
    let (_, query) = vars
        .iter()
        .find(|(n, _)| n == "encoder.layer.0.attention.self.query.weight")
        .unwrap();
    let g = grads.get(query.as_tensor()).unwrap();
    assert!(
        g.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.1
    );

    // Only the top layer trained: its 16 weights, the same gradients.
    let mut top = BertModel::load(&dir.join("model.safetensors"), &cfg).unwrap();
    let top_vars = top.make_trainable(Some(1)).unwrap();
    assert_eq!(top_vars.len(), 16);
    assert!(
        top_vars
            .iter()
            .all(|(n, _)| n.starts_with("encoder.layer.1."))
    );
    let e = pooled_batch(&top, &seqs, Some(Kernels::Elementary)).unwrap();
    let grads = (&e * &reference["w"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in &top_vars {
        let r = &reference[&format!("grad.{name}")];
        let scale = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), r) / scale;
        assert!(d <= 1e-5, "top layer only, {name}: {d}");
    }
    assert!(top.make_trainable(Some(3)).is_err());
}

const SENTENCES: [&str; 3] = [
    "Which NFL team represented the AFC at Super Bowl 50?",
    "The Normans gave their name to Normandy, a region in France.",
    "a",
];

#[test]
fn training_forward_equals_the_inference_encoder_on_minilm() {
    let Some(dir) = minilm_dir() else { return };
    let mut encoder = Encoder::load(&dir).unwrap();
    // The fused forward multiplies in f32, as training does (on a CPU with AVX-512 BF16 it
    // would take bf16 products by default: 9e-4 apart, which this bound is not about).
    encoder.model.set_matmul(MatMul::F32).unwrap();
    let inference = encoder.embed(&SENTENCES).unwrap().vectors;
    let mut trained = encoder.clone();
    trained.model.make_trainable(None).unwrap();
    let (e, truncated) = trained.embed_tensor(&SENTENCES).unwrap();
    assert_eq!(truncated, 0);
    let inference = Tensor::new(inference, &Device::Cpu).unwrap();
    let d = max_diff(&e, &inference);
    println!("all-MiniLM-L6-v2: training forward vs inference encoder, max diff {d:.2e}");
    assert!(d <= 1e-4, "{d}");
}

/// Every trained weight moved by the fixture's pattern: w + 0.01·sin(0.37·i + k).
fn perturb(encoder: &mut Encoder, keys: &[String]) {
    let vars = encoder.model.make_trainable(None).unwrap();
    assert_eq!(vars.len(), keys.len());
    for (name, var) in &vars {
        let k = keys.iter().position(|x| x == name).unwrap();
        let w = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let moved: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &x)| (x as f64 + 0.01 * (0.37 * i as f64 + k as f64).sin()) as f32)
            .collect();
        var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

#[test]
fn a_written_query_encoder_is_a_sentence_transformers_folder() {
    let Some(dir) = minilm_dir() else { return };
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("embed/minilm-perturbed.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<String> = serde_json::from_value(fixture["keys"].clone()).unwrap();
    let texts: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let st: Vec<Vec<f32>> = serde_json::from_value(fixture["embeddings"].clone()).unwrap();
    let st = Tensor::new(st, &Device::Cpu).unwrap();

    let base = Encoder::load(&dir).unwrap();
    let mut encoder = base.clone();
    perturb(&mut encoder, &keys);
    let (in_memory, _) = encoder.embed_tensor(&texts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("query-encoder");
    encoder
        .write_folder(&out, &[("note.json", "{}\n".to_string())])
        .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "note.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the folder");
    }
    assert!(!out.join(".lever-verified").exists());
    // Every tensor of the original file is there, with the same dtype.
    let a = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!((t.dtype(), t.dims()), (b[k].dtype(), b[k].dims()), "{k}");
    }

    let mut loaded = Encoder::load(&out).unwrap();
    // f32 products, as the in-memory and sentence-transformers vectors have (not bf16).
    loaded.model.set_matmul(MatMul::F32).unwrap();
    let lever = Tensor::new(loaded.embed(&texts).unwrap().vectors, &Device::Cpu).unwrap();
    let base_vectors = Tensor::new(base.embed(&texts).unwrap().vectors, &Device::Cpu).unwrap();
    let moved = max_diff(&lever, &base_vectors);
    let (d_mem, d_st) = (max_diff(&lever, &in_memory), max_diff(&lever, &st));
    println!(
        "written folder: lever vs in-memory {d_mem:.2e}, vs sentence-transformers (fixture) {d_st:.2e}; moved {moved:.3} from the base"
    );
    assert!(
        moved > 1e-2,
        "the folder's weights are the base's ({moved})"
    );
    assert!(d_mem <= 1e-4, "{d_mem}");
    assert!(d_st <= 1e-4, "{d_st}");
}
