//! LoRA adapters both ways between lever and Hugging Face PEFT (fixtures made by
//! scripts/make-peft-fixtures.py with peft 0.17.1 and transformers 4.57.6): an adapter PEFT
//! made runs in lever with PEFT's logits, on the Hugging Face folder and on its GGUF
//! conversion (Q/K rows permuted for interleaved RoPE); an adapter lever trained gives in lever
//! the logits PEFT computes for it; an adapter for another base is refused by tensor name.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lever_model::{Logits, Model};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn base() -> PathBuf {
    tiny("llama-f32")
}

/// A tiny Hugging Face model of lever-model's fixtures: llama-f32, or gemma3-f32 (3 layers,
/// a sliding window of 5 on its local layers, q/k norms, GeGLU).
fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lever-model/tests/fixtures/hf-tiny")
        .join(name)
}

fn max_diff(model: &Model, reference: &Path) -> f64 {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let want: Vec<Vec<f64>> = serde_json::from_value(r["logits"].clone()).unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let got = model
        .decoder
        .forward(&x, &mut model.decoder.new_cache(), Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (*a as f64 - b).abs()))
        .fold(0f64, f64::max)
}

#[test]
fn adapters_run_the_same_in_lever_and_peft() {
    adapters_run_the_same(&base(), ["peft-made", "lever-made"], 2);
}

/// Gemma 3 (scripts/make-gemma3-peft-fixtures.py): the same module names as the llama
/// family under `base_model.model.model.layers.N`, both ways.
#[test]
fn gemma3_adapters_run_the_same_in_lever_and_peft() {
    adapters_run_the_same(
        &tiny("gemma3-f32"),
        ["gemma3-peft-made", "gemma3-lever-made"],
        3,
    );
}

fn adapters_run_the_same(base: &Path, made: [&str; 2], layers: usize) {
    for made in made {
        let dir = fixtures().join(made);
        let mut model = Model::load_hf(base, &Device::Cpu).unwrap();
        let without = max_diff(&model, &dir.join("reference.json"));
        let n = lever_train::load_peft(&mut model.decoder, &dir).unwrap();
        assert_eq!(n, layers * 7, "{made}");
        let d = max_diff(&model, &dir.join("reference.json"));
        eprintln!("{made}: max |logit diff| vs PEFT {d:.2e} (without the adapter {without:.2e})");
        assert!(d < 1e-4, "{made}: {d}");
        assert!(
            without > 100.0 * d,
            "{made}: the adapter must matter ({without} vs {d})"
        );
    }
}

/// A Gemma 3 adapter folded into its Hugging Face base and written as a folder: the norms go
/// back to transformers' w (lever holds 1 + w) and the folder reloads with PEFT's logits.
/// Converting it to GGUF is refused by name (the tiny model's global layers are not every
/// sixth, which llama.cpp's gemma3 fixes), before anything is written.
#[test]
fn a_gemma3_adapter_merges_into_a_hugging_face_folder() {
    let dir = fixtures().join("gemma3-peft-made");
    let mut model = Model::load_hf(&tiny("gemma3-f32"), &Device::Cpu).unwrap();
    lever_train::load_peft(&mut model.decoder, &dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    lever_model::formats::export::write_hf(&model, &out).unwrap();
    let merged = Model::load_hf(&out, &Device::Cpu).unwrap();
    let d = max_diff(&merged, &dir.join("reference.json"));
    eprintln!("gemma3-peft-made merged into a HF folder: max |logit diff| vs PEFT {d:.2e}");
    assert!(d < 1e-4, "{d}");
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let base =
        candle_core::safetensors::load(tiny("gemma3-f32").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    for norm in [
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.2.post_feedforward_layernorm.weight",
        "model.norm.weight",
    ] {
        let diff = lever_model::testing::max_abs_diff_tensors(&st[norm], &base[norm]);
        assert!(diff < 1e-6, "{norm}: {diff}");
    }
    let gguf = tmp.path().join("merged.gguf");
    let e = lever_model::formats::quantize::convert_hf(&out, &gguf, GgmlDType::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer_types") && e.contains("GGUF cannot hold it"),
        "{e}"
    );
    assert!(!gguf.exists());
}

/// The GGUF conversion stores Q and K permuted; the adapter's B rows follow.
#[test]
fn a_peft_adapter_runs_on_the_gguf_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    lever_model::formats::quantize::convert_hf(&base(), &gguf, GgmlDType::F32).unwrap();
    let mut model = Model::load_gguf(&gguf, &Device::Cpu).unwrap();
    let dir = fixtures().join("peft-made");
    lever_train::load_peft(&mut model.decoder, &dir).unwrap();
    let d = max_diff(&model, &dir.join("reference.json"));
    eprintln!("peft-made on GGUF F32: max |logit diff| vs PEFT {d:.2e}");
    // The GGUF path keeps llama.cpp's f16 K/V cache and f16 attention accumulator, and this
    // adapter (B scaled up 4x) makes Q/K/V large: measured 6.1e-2 on logits up to 3.1 (1.9e-2
    // with f32 attention). Leaving B's rows unpermuted gives 4.8, so the bound still tells a
    // wrong permutation apart.
    assert!(d < 0.15, "{d}");
}

#[test]
fn an_adapter_for_another_base_is_refused_by_tensor_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    let src = fixtures().join("peft-made");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
    t.insert(
        key.to_string(),
        Tensor::zeros((4, 96), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let mut model = Model::load_hf(&base(), &Device::Cpu).unwrap();
    let e = lever_train::load_peft(&mut model.decoder, &dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.1.mlp.down_proj") && e.contains("another base model"),
        "{e}"
    );

    t.insert(
        "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight".into(),
        Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let e = lever_train::load_peft(&mut model.decoder, &dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 7, but the model has 2"), "{e}");
}

/// The decoder's backward against PyTorch's: with the PEFT-made adapter trainable, the mean
/// next-token loss over the fixture prompt and its gradient for every lora_A and lora_B
/// (through both layers, attention, norms and the MLP) equal PEFT's.
#[test]
fn decoder_gradients_match_pytorch() {
    gradients_match_pytorch(&base(), "peft-made", 2);
}

/// The same through Gemma 3's block: q/k norms, its attention scale, the sliding window
/// (5 keys, on a 39-token prompt) on local layers, the norms after attention and MLP, GeGLU
/// and the scaled embedding.
#[test]
fn gemma3_decoder_gradients_match_pytorch() {
    gradients_match_pytorch(&tiny("gemma3-f32"), "gemma3-peft-made", 3);
}

fn gradients_match_pytorch(base: &Path, made: &str, layers: usize) {
    use candle_core::Var;
    let dir = fixtures().join(made);
    let mut model = Model::load_hf(base, &Device::Cpu).unwrap();
    lever_train::load_peft(&mut model.decoder, &dir).unwrap();
    let modules = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    let mut vars = Vec::new();
    for (name, l) in model.decoder.linears_mut() {
        let Some(lora) = l.lora.as_mut() else {
            continue;
        };
        let (layer, suffix) = name.strip_prefix("blk.").unwrap().split_once('.').unwrap();
        let module = modules.iter().find(|m| m.0 == suffix).unwrap().1;
        let key = format!("base_model.model.model.layers.{layer}.{module}");
        let a = Var::from_tensor(&lora.a).unwrap();
        let b = Var::from_tensor(&lora.b).unwrap();
        lora.a = a.as_tensor().clone();
        lora.b = b.as_tensor().clone();
        vars.push((format!("{key}.lora_A.weight"), a));
        vars.push((format!("{key}.lora_B.weight"), b));
    }
    assert_eq!(vars.len(), layers * 14);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let ex = lever_data::Tokenized {
        line: 1,
        trained: vec![true; ids.len()],
        ids,
    };
    let (sum, n) = lever_train::trainer::masked_loss_sum(&model.decoder, &[&ex]).unwrap();
    let loss = (sum / n as f64).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("loss.json")).unwrap()).unwrap();
    let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got_loss - want["loss"].as_f64().unwrap()).abs() < 1e-5,
        "loss {got_loss} vs {}",
        want["loss"]
    );
    let torch =
        candle_core::safetensors::load(dir.join("grads.safetensors"), &Device::Cpu).unwrap();
    // Keeping every activation, and recomputing them block by block (checkpointing): both
    // must give PyTorch's gradients.
    for checkpoint in [false, true] {
        let (value, count, grads) =
            lever_train::trainer::forward_backward(&model.decoder, &[&ex], n, checkpoint).unwrap();
        assert_eq!(count, n);
        assert!(
            (value / n as f64 - got_loss).abs() < 1e-6,
            "checkpoint={checkpoint}"
        );
        let mut worst = 0f32;
        for (key, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap();
            let t = &torch[key];
            let scale = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-6);
            let d = (g - t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(d / scale);
            assert!(
                d <= 1e-4 * scale + 1e-7,
                "checkpoint={checkpoint} {key}: max diff {d} (scale {scale})"
            );
        }
        eprintln!(
            "{made}: gradients vs PyTorch, {} LoRA tensors, checkpoint={checkpoint}: worst relative diff {worst:.2e}",
            vars.len()
        );
    }
}

/// Gradient checkpointing changes memory, not math: for every weight of a fully trainable
/// model (embedding and tied output layer included), and for LoRA adapters with dropout on
/// (the recomputation must draw the same masks), the gradients with and without it agree.
#[test]
fn checkpointing_gives_the_same_gradients() {
    use std::sync::atomic::Ordering;
    let batch: Vec<lever_data::Tokenized> = [vec![3u32, 17, 42, 8, 9, 1, 5], vec![7, 7, 2, 11]]
        .into_iter()
        .enumerate()
        .map(|(i, ids)| lever_data::Tokenized {
            line: i + 1,
            trained: (0..ids.len()).map(|p| p >= 2).collect(),
            ids,
        })
        .collect();
    let refs: Vec<&lever_data::Tokenized> = batch.iter().collect();
    let compare = |decoder: &lever_model::Decoder, vars: &[candle_core::Var], what: &str| {
        let (v0, n0, g0) =
            lever_train::trainer::forward_backward(decoder, &refs, 5, false).unwrap();
        let (v1, n1, g1) = lever_train::trainer::forward_backward(decoder, &refs, 5, true).unwrap();
        assert_eq!(n0, n1);
        assert!((v0 - v1).abs() < 1e-5, "{what}: loss {v0} vs {v1}");
        let mut worst = 0f32;
        for v in vars {
            let (a, b) = (
                g0.get(v.as_tensor()).unwrap(),
                g1.get(v.as_tensor()).unwrap(),
            );
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 0.0, "{what}: a zero gradient");
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(d / scale);
        }
        eprintln!(
            "{what}: {} tensors, worst relative diff {worst:.2e}",
            vars.len()
        );
        assert!(worst < 1e-5, "{what}: worst relative diff {worst}");
    };

    let mut model = Model::load_hf(&base(), &Device::Cpu).unwrap();
    let vars: Vec<candle_core::Var> = model
        .decoder
        .make_trainable()
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    compare(&model.decoder, &vars, "full fine-tuning");

    let mut model = Model::load_hf(&base(), &Device::Cpu).unwrap();
    let config = lever_train::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.3,
        targets: lever_train::LoraConfig::parse_targets("all-linear").unwrap(),
    };
    let set = lever_train::LoraSet::attach(&mut model.decoder, &config, 1).unwrap();
    // B starts at zero: give it values so every A gets a gradient too.
    for (_, _, _, b) in &set.adapters {
        b.set(&(b.randn_like(0.0, 0.1).unwrap())).unwrap();
    }
    set.dropout_key.store(12345, Ordering::Relaxed);
    let vars: Vec<candle_core::Var> = set
        .adapters
        .iter()
        .flat_map(|(_, _, a, b)| [a.clone(), b.clone()])
        .collect();
    compare(&model.decoder, &vars, "LoRA with dropout");
}

/// A copy of the PEFT-made adapter in a temp folder, with its config edited by `config` and
/// its tensors by `tensors`.
fn edited_adapter(
    tmp: &Path,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> PathBuf {
    let src = fixtures().join("peft-made");
    let dir = tmp.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut c);
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let mut model = Model::load_hf(&base(), &Device::Cpu).unwrap();
    lever_train::load_peft(&mut model.decoder, dir)
        .unwrap_err()
        .to_string()
}

/// Regression: `r` was read but never compared with the tensors, so an adapter whose config
/// said r = 8 for rank-4 tensors loaded with half its scale.
#[test]
fn an_adapter_whose_r_differs_from_its_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(tmp.path(), |c| c["r"] = 8.into(), |_| {});
    let e = load_err(&dir);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    assert!(
        e.contains("has rank 4, but adapter_config.json says r = 8"),
        "{e}"
    );
    let dir = edited_adapter(tmp.path(), |c| c["r"] = 0.into(), |_| {});
    let e = load_err(&dir);
    assert!(
        e.contains("adapter_config.json") && e.contains("`r` is 0"),
        "{e}"
    );
}

/// Regression: a zero, negative or absurd alpha loaded (scale 0 or a sign flip).
#[test]
fn an_adapter_with_alpha_not_positive_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for alpha in [
        serde_json::json!(0),
        serde_json::json!(-8.0),
        serde_json::json!("8"),
    ] {
        let dir = edited_adapter(tmp.path(), |c| c["lora_alpha"] = alpha.clone(), |_| {});
        let e = load_err(&dir);
        assert!(
            e.contains("adapter_config.json") && e.contains("`lora_alpha`"),
            "{alpha}: {e}"
        );
    }
    let dir = edited_adapter(
        tmp.path(),
        |c| c["rank_pattern"] = serde_json::json!({"q_proj": 8}),
        |_| {},
    );
    assert!(load_err(&dir).contains("`rank_pattern` is not supported"));
}

/// Regression: NaN weights in an adapter loaded silently and turned every logit into NaN.
#[test]
fn an_adapter_with_nan_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    let dir = edited_adapter(
        tmp.path(),
        |_| {},
        |t| {
            let dims = t[key].dims().to_vec();
            let mut v = t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[5] = f32::NAN;
            t.insert(key.into(), Tensor::from_vec(v, dims, &Device::Cpu).unwrap());
        },
    );
    let e = load_err(&dir);
    assert!(
        e.contains(key) && e.contains("element 5 is NaN or infinite"),
        "{e}"
    );
}

/// Regression: a truncated or garbage adapter_model.safetensors gave candle's error alone,
/// naming no file.
#[test]
fn a_broken_safetensors_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(tmp.path(), |_| {}, |_| {});
    let st = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for (what, content) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&st, &content).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains(&st.display().to_string()) && e.contains("not a valid safetensors file"),
            "{what}: {e}"
        );
    }
}
