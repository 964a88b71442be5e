//! Hugging Face folder -> GGUF, as llama.cpp's `convert_hf_to_gguf.py` lays it out: llama.cpp
//! tensor names, `{arch}.*` hyper-parameters, the byte-level BPE vocabulary and merges from
//! tokenizer.json, the chat template, and Q/K rows permuted for `llama` checkpoints (GGUF's
//! llama arch uses interleaved RoPE; `LlamaModel.permute` in the converter).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use crate::config::{Arch, HfConfig};
use crate::error::{Error, Result, io_err};
use crate::formats::weights::{Param, SafetensorsWeights, WeightSource};

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        field: format!("line {}", e.line()),
        problem: e.to_string(),
    })
}

/// llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`, when lever can tell.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).map(str::to_string);
    match kind(pre)?.as_str() {
        // llama.cpp's name for GPT-2's regex is "gpt-2" (`llama-vocab.cpp`); it refuses "gpt2".
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            let kinds: Vec<String> = parts.iter().filter_map(kind).collect();
            let digits_one_by_one =
                parts.first().and_then(|p| p.get("individual_digits")) == Some(&Json::Bool(true));
            match kinds
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                ["Digits", "ByteLevel"] if digits_one_by_one => Some("smollm"),
                // Regex splits then byte-level: how lever writes a GGUF vocabulary out.
                [splits @ .., "ByteLevel"] if splits.iter().all(|k| *k == "Split") => {
                    let regexes: Option<Vec<&str>> = parts[..splits.len()]
                        .iter()
                        .map(|p| p.pointer("/pattern/Regex").and_then(Json::as_str))
                        .collect();
                    crate::tokenizer::pre_name_of_regexes(&regexes?)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// GGUF metadata and named tensors, ready to write.
pub type GgufParts = (Vec<(String, Value)>, Vec<(String, QTensor)>);

/// Convert `dir` into GGUF metadata and tensors (matrices in `target`, vectors F32).
pub fn hf_to_gguf(dir: &Path, target: GgmlDType) -> Result<GgufParts> {
    let cfg_path = dir.join("config.json");
    let hf: HfConfig =
        serde_json::from_value(read_json(&cfg_path)?).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            field: "config".into(),
            problem: e.to_string(),
        })?;
    let cfg = hf.resolve().map_err(|(field, problem)| Error::Config {
        path: cfg_path.clone(),
        field,
        problem,
    })?;
    if cfg.arch == Arch::Gemma3 {
        // Its q/k and post norms, layer pattern and SentencePiece vocabulary are not written
        // here yet; llama.cpp's convert_hf_to_gguf.py converts it.
        return Err(Error::Config {
            path: cfg_path,
            field: "model_type".into(),
            problem: "converting a gemma3 Hugging Face folder to GGUF is not supported yet \
                      (llama.cpp's convert_hf_to_gguf.py does it; lever runs the result)"
                .into(),
        });
    }
    let tk_path = dir.join("tokenizer.json");
    let tk = read_json(&tk_path)?;
    let tk_err = |problem: String| Error::Tokenizer {
        path: tk_path.clone(),
        problem,
    };
    let model = tk.get("model").ok_or_else(|| tk_err("no `model`".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE")
        || tk.pointer("/decoder/type").and_then(Json::as_str) != Some("ByteLevel")
    {
        return Err(tk_err(
            "only byte-level BPE tokenizers convert to GGUF (gpt2 model) so far".into(),
        ));
    }
    let pre =
        pre_tokenizer_name(tk.get("pre_tokenizer").unwrap_or(&Json::Null)).ok_or_else(|| {
            tk_err("pre_tokenizer is not one lever maps to a llama.cpp name (gpt-2, smollm)".into())
        })?;
    // Vocabulary by id, added tokens included; control (special) tokens typed 3.
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| tk_err("no model.vocab".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size];
    let mut types = vec![1i32; cfg.vocab_size];
    let mut put = |tok: &str, id: u64, ty: i32| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| tk_err(format!("token id {id} >= vocab_size {}", cfg.vocab_size)))?;
        *slot = Some(tok.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        put(tok, id.as_u64().unwrap_or(u64::MAX), 1)?;
    }
    for added in tk
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(content), Some(id)) = (
            added.get("content").and_then(Json::as_str),
            added.get("id").and_then(Json::as_u64),
        ) else {
            continue;
        };
        let special = added
            .get("special")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        put(content, id, if special { 3 } else { 4 })?;
    }
    // Ids the tokenizer leaves unused (padding rows of the embedding) get placeholder tokens.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| tk_err("no model.merges".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(tk_err(format!(
                "merge {other} is neither \"a b\" nor [a, b]"
            ))),
        })
        .collect::<Result<_>>()?;
    let tc = if dir.join("tokenizer_config.json").is_file() {
        read_json(&dir.join("tokenizer_config.json"))?
    } else {
        Json::Null
    };
    let token_name = |key: &str| -> Option<String> {
        match tc.get(key)? {
            Json::String(s) => Some(s.clone()),
            v => v.get("content").and_then(Json::as_str).map(str::to_string),
        }
    };
    let id_of = |name: Option<String>| name.and_then(|n| tokens.iter().position(|t| *t == n));

    let a = cfg.arch.name();
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(a)),
        (
            "general.name".into(),
            s(&dir
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())),
        ),
        (format!("{a}.context_length"), u(cfg.max_seq_len)),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{a}.attention.key_length"), u(cfg.head_dim)),
        (format!("{a}.attention.value_length"), u(cfg.head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(id) = id_of(token_name("bos_token")) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), u(id)));
    }
    if let Some(id) = id_of(token_name("eos_token")) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), u(id)));
    }
    if let Some(t) = tc.get("chat_template").and_then(Json::as_str) {
        meta.push(("tokenizer.chat_template".into(), s(t)));
    }

    // Tensors, in llama.cpp's order and names.
    let files = crate::model::safetensors_files(dir)?;
    let mut w = SafetensorsWeights::open(&files, &Device::Cpu)?;
    let (c, hd) = (cfg.hidden_size, cfg.head_dim);
    let permute = cfg.arch == Arch::Llama;
    let mut out: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, t: Tensor| -> Result<()> {
        let q = QTensor::quantize(&t, target)?;
        out.push((format!("{name}.weight"), q));
        Ok(())
    };
    let mut vectors: Vec<(String, QTensor)> = Vec::new();
    let mut vector = |name: String, t: Tensor| -> Result<()> {
        vectors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    let emb = match w.embedding(Param::Embed, cfg.vocab_size, c)? {
        crate::formats::weights::Embedding::Float(t) => t,
        crate::formats::weights::Embedding::Quantized(q) => q.dequantize(&Device::Cpu)?,
    };
    matrix(Param::Embed.gguf_name(), emb)?;
    for i in 0..cfg.num_layers {
        vector(
            format!("{}.weight", Param::AttnNorm(i).gguf_name()),
            w.vector(Param::AttnNorm(i), c)?,
        )?;
        for (p, rows, heads) in [
            (Param::Q(i), cfg.num_heads * hd, Some(cfg.num_heads)),
            (Param::K(i), cfg.num_kv_heads * hd, Some(cfg.num_kv_heads)),
            (Param::V(i), cfg.num_kv_heads * hd, None),
        ] {
            let lin = w.linear(p, rows, c, cfg.qkv_bias())?;
            let (wt, b) = float_parts(&lin)?;
            let (wt, b) = match (permute, heads) {
                (true, Some(h)) => (
                    rope_permute(&wt, h)?,
                    b.map(|b| rope_permute(&b, h)).transpose()?,
                ),
                _ => (wt, b),
            };
            matrix(p.gguf_name(), wt)?;
            if let Some(b) = b {
                vector(format!("{}.bias", p.gguf_name()), b)?;
            }
        }
        let (o, _) = float_parts(&w.linear(Param::O(i), c, cfg.num_heads * hd, false)?)?;
        matrix(Param::O(i).gguf_name(), o)?;
        vector(
            format!("{}.weight", Param::FfnNorm(i).gguf_name()),
            w.vector(Param::FfnNorm(i), c)?,
        )?;
        for (p, r, k) in [
            (Param::Gate(i), cfg.intermediate_size, c),
            (Param::Up(i), cfg.intermediate_size, c),
            (Param::Down(i), c, cfg.intermediate_size),
        ] {
            let (t, _) = float_parts(&w.linear(p, r, k, false)?)?;
            matrix(p.gguf_name(), t)?;
        }
    }
    vector(
        format!("{}.weight", Param::OutputNorm.gguf_name()),
        w.vector(Param::OutputNorm, c)?,
    )?;
    if !cfg.tie_embeddings && w.has(Param::Output) {
        let (t, _) = float_parts(&w.linear(Param::Output, cfg.vocab_size, c, false)?)?;
        matrix(Param::Output.gguf_name(), t)?;
    }
    out.extend(vectors);
    Ok((meta, out))
}

fn float_parts(l: &crate::Linear) -> Result<(Tensor, Option<Tensor>)> {
    match l.weight() {
        crate::Weight::Float(t) => Ok((t.clone(), l.bias().cloned())),
        crate::Weight::Quantized(q) => Ok((q.dequantize(&Device::Cpu)?, l.bias().cloned())),
    }
}

/// Rows of each head reordered from rotate-half pairs (i, i + D/2) to adjacent pairs
/// (2i, 2i + 1): `reshape(H, 2, D/2, ...).swapaxes(1, 2)` in llama.cpp's converter.
/// Works for a weight (H·D, C) and a bias (H·D,).
pub fn rope_permute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let d = rows / heads;
    let x = t
        .reshape((heads, 2, d / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(x.reshape(dims)?)
}

/// Inverse of `rope_permute`: adjacent pairs back to rotate-half halves (GGUF `llama` rows
/// to Hugging Face rows).
pub fn rope_unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let d = rows / heads;
    let x = t
        .reshape((heads, d / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(x.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: GPT-2's pre-tokenizer was written as "gpt2", which llama.cpp refuses
    /// ("unknown pre-tokenizer type"); its name there is "gpt-2".
    #[test]
    fn gpt2_pre_tokenizer_has_llama_cpps_name() {
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false});
        assert_eq!(pre_tokenizer_name(&byte_level), Some("gpt-2"));
        let split = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": crate::tokenizer::GPT2_RE}},
            {"type": "ByteLevel"},
        ]});
        assert_eq!(pre_tokenizer_name(&split), Some("gpt-2"));
    }
}
