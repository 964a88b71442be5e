//! `lever export` and `lever merge`: the decoder's weights — fine-tuned, or with LoRA adapters
//! folded in (W' = W + scale·B·A, PEFT's `merge_and_unload`) — written as a Hugging Face folder
//! that transformers loads, or as a GGUF file that llama.cpp loads.
//!
//! Row layout: GGUF's `llama` architecture stores Q and K rows permuted for interleaved RoPE
//! (llama.cpp's converter), Hugging Face stores them rotate-half. A decoder loaded from GGUF
//! holds the GGUF rows, so the Hugging Face export un-permutes them and vice versa.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::Arch;
use crate::decoder::{Decoder, ParamRef};
use crate::error::{Error, Result, io_err};
use crate::formats::convert::{rope_permute, rope_unpermute};
use crate::formats::gguf::GgufFile;
use crate::formats::weights::{Embedding, Param};
use crate::linear::{Linear, Weight};
use crate::model::Model;
use crate::ops::RopeStyle;

/// Where the names and Q/K rows of exported tensors follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    HuggingFace,
    Gguf,
}

/// W (f32) with the adapter folded in, and the bias.
fn merged(l: &Linear) -> Result<(Tensor, Option<Tensor>)> {
    let w = match l.weight() {
        Weight::Quantized(q) => q.dequantize(&Device::Cpu)?,
        Weight::Float(t) => t.to_dtype(DType::F32)?,
    };
    let w = match &l.lora {
        Some(lora) => (w + (lora.b.matmul(&lora.a)? * lora.scale)?)?,
        None => w,
    };
    Ok((w.detach(), l.bias().map(Tensor::detach)))
}

/// Every weight of the decoder as named f32 tensors for `layout`, adapters folded in.
pub fn named_tensors(decoder: &Decoder, layout: Layout) -> Result<Vec<(String, Tensor)>> {
    let cfg = decoder.config();
    // Gemma 3's norms compute x̂·(1 + w): the decoder holds 1 + w, as GGUF stores it;
    // Hugging Face checkpoints store w (`Gemma3RMSNorm`).
    let norm_offset = match (&cfg.gemma, layout) {
        (Some(_), Layout::HuggingFace) => 1.0,
        _ => 0.0,
    };
    // Which way Q/K rows must move: None, to GGUF's interleaved rows, or back.
    let stored_interleaved = cfg.rope_style == RopeStyle::Interleaved;
    let want_interleaved = layout == Layout::Gguf && cfg.arch == Arch::Llama;
    let heads = |p: Param| match p {
        Param::Q(_) => Some(cfg.num_heads),
        Param::K(_) => Some(cfg.num_kv_heads),
        _ => None,
    };
    let rows = |p: Param, t: Tensor| -> Result<Tensor> {
        Ok(match (heads(p), stored_interleaved, want_interleaved) {
            (Some(h), false, true) => rope_permute(&t, h)?,
            (Some(h), true, false) => rope_unpermute(&t, h)?,
            _ => t,
        })
    };
    let name = |p: Param, suffix: &str| match layout {
        Layout::HuggingFace => format!("{}.{suffix}", p.hf_name()),
        Layout::Gguf => format!("{}.{suffix}", p.gguf_name()),
    };
    let mut out = Vec::new();
    for (p, r) in decoder.params() {
        match r {
            ParamRef::Embedding(e) => {
                let t = match e {
                    Embedding::Quantized(q) => q.dequantize(&Device::Cpu)?,
                    Embedding::Float(t) => t.to_dtype(DType::F32)?.detach(),
                };
                out.push((name(p, "weight"), t));
            }
            ParamRef::Vector(v) => {
                let v = (v.to_dtype(DType::F32)? - norm_offset)?;
                out.push((name(p, "weight"), v.detach()))
            }
            ParamRef::Linear(l) => {
                let (w, b) = merged(l)?;
                out.push((name(p, "weight"), rows(p, w)?));
                if let Some(b) = b {
                    out.push((name(p, "bias"), rows(p, b.to_dtype(DType::F32)?)?));
                }
            }
        }
    }
    Ok(out)
}

/// transformers' `config.json` for the decoder.
fn hf_config(model: &Model) -> serde_json::Value {
    let c = model.decoder.config();
    let (class, model_type) = match c.arch {
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let mut v = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": model.decoder.tied(),
        "attention_bias": c.qkv_bias(),
        "mlp_bias": false,
        "torch_dtype": "float32",
        "bos_token_id": model.tokenizer.bos(),
        "eos_token_id": model.tokenizer.eos(),
    });
    if c.arch == Arch::Qwen2 {
        v["use_sliding_window"] = json!(false);
    }
    if let Some(g) = &c.gemma {
        // `Gemma3TextConfig`: what lever reads back (config.rs `HfConfig::gemma`).
        let scalar = 1.0 / (g.attn_scale as f64 * g.attn_scale as f64);
        let layer_types: Vec<&str> = g
            .global_layers
            .iter()
            .map(|&global| {
                if global {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        v["architectures"] = json!(["Gemma3ForCausalLM"]);
        v["model_type"] = json!("gemma3_text");
        if let Some(o) = v.as_object_mut() {
            o.remove("hidden_act");
        }
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        v["query_pre_attn_scalar"] = json!(if (scalar - scalar.round()).abs() < 1e-3 {
            json!(scalar.round() as u64)
        } else {
            json!(scalar)
        });
        v["sliding_window"] = json!(g.sliding_window);
        v["layer_types"] = json!(layer_types);
        v["rope_local_base_freq"] = json!(g.rope_local_theta);
        v["final_logit_softcapping"] = json!(null);
        v["attn_logit_softcapping"] = json!(null);
    }
    v
}

/// Write a Hugging Face folder: config.json, model.safetensors (f32) and the tokenizer files.
/// A model loaded from a Hugging Face folder keeps its own tokenizer files and config (with
/// the dtype set to float32); one loaded from GGUF gets them built from its metadata; one
/// trained from scratch (`info.format` "pretrained", `info.path` its tokenizer.json) gets its
/// config from the decoder and the tokenizer files it was trained with, copied as they are. The folder appears complete or
/// not at all.
pub fn write_hf(model: &Model, dir: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> =
        named_tensors(&model.decoder, Layout::HuggingFace)?
            .into_iter()
            .collect();
    let src = &model.info.path;
    crate::fsutil::write_atomic(dir, |tmp| -> Result<()> {
        std::fs::create_dir(tmp).map_err(io_err(dir))?;
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st)?;
        // The writer creates it private (0600); the folder's other files are 0644.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err(&dir.join("model.safetensors")))?;
        }
        let write = |name: &str, text: String| -> Result<()> {
            std::fs::write(tmp.join(name), text).map_err(io_err(&dir.join(name)))
        };
        if model.info.format == "hf" {
            let cfg_path = src.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
            let mut cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: cfg_path.clone(),
                    field: format!("line {}", e.line()),
                    problem: e.to_string(),
                })?;
            cfg["torch_dtype"] = json!("float32");
            if let Some(o) = cfg.as_object_mut() {
                o.remove("dtype");
            }
            write("config.json", pretty(&cfg))?;
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
            ] {
                if src.join(f).is_file() {
                    std::fs::copy(src.join(f), tmp.join(f)).map_err(io_err(src.join(f)))?;
                }
            }
        } else if model.info.format == "pretrained" {
            // Trained here: the configuration from the decoder, the tokenizer's files as
            // they were trained (`info.path` is its tokenizer.json; the files beside it).
            write("config.json", pretty(&hf_config(model)))?;
            std::fs::copy(src, tmp.join("tokenizer.json")).map_err(io_err(src))?;
            let beside = crate::fsutil::parent_or_dot(src);
            for f in ["tokenizer_config.json", "special_tokens_map.json"] {
                if beside.join(f).is_file() {
                    std::fs::copy(beside.join(f), tmp.join(f)).map_err(io_err(beside.join(f)))?;
                }
            }
            if !beside.join("tokenizer_config.json").is_file() {
                write("tokenizer_config.json", pretty(&tokenizer_config(model)))?;
            }
        } else {
            write("config.json", pretty(&hf_config(model)))?;
            write("tokenizer.json", model.tokenizer.to_hf_json()?)?;
            write("tokenizer_config.json", pretty(&tokenizer_config(model)))?;
        }
        Ok(())
    })
}

/// transformers' `tokenizer_config.json` for the model's tokenizer.
fn tokenizer_config(model: &Model) -> serde_json::Value {
    let tok = |id: Option<u32>| id.and_then(|i| model.tokenizer.id_to_token(i));
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok(model.tokenizer.bos()),
        "eos_token": tok(model.tokenizer.eos()),
        "add_bos_token": model.tokenizer.add_bos(),
        "clean_up_tokenization_spaces": false,
        "model_max_length": model.decoder.config().max_seq_len,
    });
    if let Some(t) = &model.chat_template {
        tc["chat_template"] = json!(t.source());
    }
    tc
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Write a GGUF file with matrices in `target` (vectors stay F32). A model loaded from GGUF
/// keeps its metadata (tokenizer, chat template, hyper-parameters); any other (a Hugging Face
/// folder, a model trained from scratch) goes through a Hugging Face export and the converter. As `lever quantize`
/// does, a tied embedding is kept at 8 bits when the target has fewer.
pub fn write_gguf(model: &Model, dst: &Path, target: GgmlDType) -> Result<()> {
    if model.info.format != "gguf" {
        let tmp = dst.with_extension("hf.tmp-lever");
        write_hf(model, &tmp)?;
        let r = crate::formats::quantize::convert_hf(&tmp, dst, target);
        let _ = std::fs::remove_dir_all(&tmp);
        return r;
    }
    let file = GgufFile::open(&model.info.path)?;
    let mut metadata: Vec<(String, Value)> = file
        .content()
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let tied = model.decoder.tied();
    let mut tensors = Vec::new();
    for (name, t) in named_tensors(&model.decoder, Layout::Gguf)? {
        let ty = if t.rank() < 2 {
            GgmlDType::F32
        } else {
            let cols = *t.dims().last().unwrap_or(&0);
            crate::formats::quantize::matrix_type(&name, cols, tied, target, dst)?
        };
        tensors.push((name, QTensor::quantize(&t, ty)?));
    }
    crate::formats::quantize::write_gguf(dst, metadata, &tensors, target)
}
