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

/// The model's name for `general.name`: the folder's, without the suffix of the temporary
/// folder `lever export` converts through.
fn model_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let name = name.strip_suffix(".hf.tmp-lever").unwrap_or(&name);
    if name.is_empty() {
        "model".into()
    } else {
        name.to_string()
    }
}

/// The metadata every converted architecture writes: its name and the block's
/// hyper-parameters under `{arch}.*`.
fn block_meta(dir: &Path, cfg: &crate::config::DecoderConfig) -> Vec<(String, Value)> {
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(model_name(dir))),
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
    ]
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
        return gemma3_to_gguf(dir, &cfg, target);
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

    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let mut meta = block_meta(dir, &cfg);
    meta.extend([
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
    ]);
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

/// A Gemma 3 folder as llama.cpp's converter writes it (`Gemma3Model` in
/// convert_hf_to_gguf.py): `gemma3.*` hyper-parameters, the SentencePiece vocabulary
/// (`tokenizer.ggml.model = llama`) recovered from tokenizer.json, and the decoder's tensors
/// under llama.cpp's names with every norm weight stored as 1 + w (what `Gemma3RMSNorm`
/// multiplies by). llama.cpp fixes the local layers' RoPE base (10,000), the layer pattern
/// (every sixth global) and the attention scale (1/√head size) for gemma3, so a folder that
/// departs from them is refused by name rather than written into a file that runs otherwise.
fn gemma3_to_gguf(
    dir: &Path,
    cfg: &crate::config::DecoderConfig,
    target: GgmlDType,
) -> Result<GgufParts> {
    let cfg_path = dir.join("config.json");
    let Some(g) = &cfg.gemma else {
        return Err(Error::Config {
            path: cfg_path,
            field: "model_type".into(),
            problem: "gemma3 without its Gemma fields".into(),
        });
    };
    let fixed = |field: &str, ok: bool, problem: String| -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::Config {
                path: cfg_path.clone(),
                field: field.into(),
                problem: format!("{problem}; llama.cpp's gemma3 fixes it, so GGUF cannot hold it"),
            })
        }
    };
    let pattern = crate::config::GemmaConfig::pattern(cfg.num_layers, 6);
    fixed(
        "layer_types",
        g.global_layers == pattern,
        "the global layers are not every sixth".into(),
    )?;
    fixed(
        "rope_local_base_freq",
        g.rope_local_theta == 10_000.0,
        format!("{} is not 10000", g.rope_local_theta),
    )?;
    let scale = (cfg.head_dim as f32).powf(-0.5);
    fixed(
        "query_pre_attn_scalar",
        (g.attn_scale - scale).abs() <= 1e-6 * scale,
        format!(
            "the attention scale {} is not 1/√{}",
            g.attn_scale, cfg.head_dim
        ),
    )?;

    let tk_path = dir.join("tokenizer.json");
    let tk = read_json(&tk_path)?;
    let tc = if dir.join("tokenizer_config.json").is_file() {
        read_json(&dir.join("tokenizer_config.json"))?
    } else {
        Json::Null
    };
    let vocab = SpmVocab::from_tokenizer_json(&tk, &tc, cfg.vocab_size).map_err(|problem| {
        Error::Tokenizer {
            path: tk_path.clone(),
            problem,
        }
    })?;

    let a = cfg.arch.name();
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let mut meta = block_meta(dir, cfg);
    meta.extend([
        (format!("{a}.attention.sliding_window"), u(g.sliding_window)),
        ("tokenizer.ggml.model".into(), s("llama")),
        ("tokenizer.ggml.pre".into(), s("default")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.scores.iter().map(|&x| Value::F32(x)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.iter().map(|&t| Value::I32(t)).collect()),
        ),
    ]);
    for (key, id) in [
        ("bos_token_id", vocab.bos),
        ("eos_token_id", vocab.eos),
        ("unknown_token_id", vocab.unk),
        ("padding_token_id", vocab.pad),
    ] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), u(id)));
        }
    }
    meta.extend([
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(vocab.add_bos),
        ),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(vocab.add_space_prefix),
        ),
    ]);
    if let Some(t) = tc.get("chat_template").and_then(Json::as_str) {
        meta.push(("tokenizer.chat_template".into(), s(t)));
    }

    // The tensors: the decoder loaded as lever runs it (norms already 1 + w), written under
    // GGUF's names (Gemma keeps rotate-half rows: llama.cpp runs gemma3 with NeoX RoPE).
    let model = crate::model::Model::load_hf(dir, &Device::Cpu)?;
    let tied = model.decoder.tied();
    let dst = dir.join("model.gguf");
    let mut out = Vec::new();
    let mut vectors = Vec::new();
    for (name, t) in
        crate::formats::export::named_tensors(&model.decoder, crate::formats::export::Layout::Gguf)?
    {
        if t.rank() < 2 {
            vectors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        } else {
            let cols = *t.dims().last().unwrap_or(&0);
            let ty = crate::formats::quantize::matrix_type(&name, cols, tied, target, &dst)?;
            out.push((name, QTensor::quantize(&t, ty)?));
        }
    }
    out.extend(vectors);
    Ok((meta, out))
}

/// A SentencePiece vocabulary for GGUF recovered from a Hugging Face tokenizer.json of the
/// kind transformers' SentencePiece converter writes (and lever's `Spm::hf_json`): a BPE model
/// with byte fallback, `▁` for spaces, control and user-defined pieces as added tokens.
pub(crate) struct SpmVocab {
    pub(crate) tokens: Vec<String>,
    pub(crate) scores: Vec<f32>,
    pub(crate) types: Vec<i32>,
    pub(crate) bos: Option<usize>,
    pub(crate) eos: Option<usize>,
    pub(crate) unk: Option<usize>,
    pub(crate) pad: Option<usize>,
    pub(crate) add_bos: bool,
    pub(crate) add_space_prefix: bool,
}

impl SpmVocab {
    /// Scores: SentencePiece merges the adjacent pair whose joined piece scores highest,
    /// where the BPE model merges the pair listed first; the converter lists the splits of
    /// each piece in the order of that piece's score. So a piece's score here is minus the
    /// position of the first merge that makes it (an order, not the original log-probability),
    /// which gives llama.cpp's SentencePiece the BPE model's choices. Pieces no merge makes
    /// (single characters, bytes) score 0; control and user-defined ones −1000, as Gemma's
    /// own file has them.
    pub(crate) fn from_tokenizer_json(
        tk: &Json,
        tc: &Json,
        vocab_size: usize,
    ) -> std::result::Result<Self, String> {
        let model = tk.get("model").ok_or("no `model`")?;
        if model.get("type").and_then(Json::as_str) != Some("BPE")
            || model.get("byte_fallback").and_then(Json::as_bool) != Some(true)
        {
            return Err(
                "a gemma3 vocabulary must be a SentencePiece BPE with byte fallback \
                 (model.type BPE, byte_fallback true)"
                    .into(),
            );
        }
        let vocab = model
            .get("vocab")
            .and_then(Json::as_object)
            .ok_or("no model.vocab")?;
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        let mut types = vec![crate::spm::NORMAL as i32; vocab_size];
        let mut put = |tok: &str, id: Option<u64>, ty: i32| -> std::result::Result<(), String> {
            let slot = id
                .and_then(|id| tokens.get_mut(id as usize))
                .ok_or_else(|| {
                    format!("token {tok:?}: id {id:?} outside the vocabulary of {vocab_size}")
                })?;
            *slot = Some(tok.to_string());
            types[id.unwrap_or_default() as usize] = ty;
            Ok(())
        };
        for (tok, id) in vocab {
            let byte = tok.len() == 6
                && tok.starts_with("<0x")
                && tok.ends_with('>')
                && u8::from_str_radix(&tok[3..5], 16).is_ok();
            let ty = if byte {
                crate::spm::BYTE
            } else {
                crate::spm::NORMAL
            };
            put(tok, id.as_u64(), ty as i32)?;
        }
        for added in tk
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let Some(content) = added.get("content").and_then(Json::as_str) else {
                continue;
            };
            let special = added
                .get("special")
                .and_then(Json::as_bool)
                .unwrap_or(false);
            let ty = if special {
                crate::spm::CONTROL
            } else {
                crate::spm::USER_DEFINED
            };
            put(content, added.get("id").and_then(Json::as_u64), ty as i32)?;
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut scores: Vec<f32> = types
            .iter()
            .map(|&t| {
                if t == crate::spm::CONTROL as i32 || t == crate::spm::USER_DEFINED as i32 {
                    -1000.0
                } else {
                    0.0
                }
            })
            .collect();
        let mut made = vec![false; vocab_size];
        let merges = model
            .get("merges")
            .and_then(Json::as_array)
            .ok_or("no model.merges")?;
        for (rank, m) in merges.iter().enumerate() {
            let joined = match m {
                Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
                Json::Array(p) if p.len() == 2 => Some(format!(
                    "{}{}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )),
                _ => None,
            }
            .ok_or_else(|| format!("merge {rank} ({m}) is neither \"a b\" nor [a, b]"))?;
            if let Some(&id) = index.get(joined.as_str())
                && !made[id]
            {
                made[id] = true;
                scores[id] = -(rank as f32) - 1.0;
            }
        }
        let token_name = |key: &str| -> Option<String> {
            match tc.get(key)? {
                Json::String(s) => Some(s.clone()),
                v => v.get("content").and_then(Json::as_str).map(str::to_string),
            }
        };
        let id_of = |name: Option<String>| name.and_then(|n| index.get(n.as_str()).copied());
        // Named in tokenizer_config, else by the model, else SentencePiece's usual pieces.
        let named = |key: &str, usual: &str| {
            id_of(token_name(key))
                .or_else(|| {
                    model
                        .get(key)
                        .and_then(Json::as_str)
                        .and_then(|n| index.get(n).copied())
                })
                .or_else(|| index.get(usual).copied())
        };
        let unk = named("unk_token", "<unk>");
        let pad = named("pad_token", "<pad>");
        // BOS: tokenizer_config's `add_bos_token`, else whether the post-processor puts a
        // special token first (as transformers' Gemma tokenizer.json does).
        let add_bos = tc
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or_else(|| {
                tk.pointer("/post_processor/single/0/SpecialToken")
                    .is_some()
            });
        let add_space_prefix = tk
            .pointer("/normalizer/normalizers")
            .and_then(Json::as_array)
            .is_some_and(|n| {
                n.iter()
                    .any(|x| x.get("type").and_then(Json::as_str) == Some("Prepend"))
            })
            || tk.pointer("/normalizer/type").and_then(Json::as_str) == Some("Prepend");
        Ok(SpmVocab {
            bos: id_of(token_name("bos_token")),
            eos: id_of(token_name("eos_token")),
            pad,
            unk,
            tokens,
            scores,
            types,
            add_bos,
            add_space_prefix,
        })
    }
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
