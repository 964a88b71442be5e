//! Two config types (STYLE habit 2): `HfConfig` mirrors a Hugging Face `config.json` with
//! optional fields; `DecoderConfig` is resolved, every field required, and is what the decoder
//! reads. GGUF metadata resolves to the same `DecoderConfig` in `formats/gguf.rs`.

use serde::Deserialize;

use crate::ops::RopeStyle;

/// The decoder architectures lever runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, SmolLM/SmolLM2, Mistral (no sliding window): no biases.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Gemma 3 (text): the departures from the llama block are in [`GemmaConfig`].
    Gemma3,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, smollm, qwen2, gemma3";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" | "smollm" | "smollm2" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" | "gemma3_text" => Some(Self::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Gemma 3's departures from the llama block (Gemma Team 2025, "Gemma 3 Technical Report",
/// arXiv:2503.19786; transformers `modeling_gemma3.py`, llama.cpp `llm_build_gemma3_iswa`):
/// the embedding scaled by √C, norms before and after attention and MLP, RMS norms of the
/// queries and keys per head before RoPE, a GeGLU MLP (tanh GELU), and local sliding-window
/// attention on most layers with their own RoPE base.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    /// Keys a local layer's query sees, itself included: the query at p attends to keys
    /// p − window + 1 ..= p (transformers `sliding_window`, llama.cpp `n_swa`).
    pub sliding_window: usize,
    /// Per layer: true where it attends to every earlier position (global), false where it
    /// attends within the window (local).
    pub global_layers: Vec<bool>,
    /// RoPE base of the local layers; the global ones use `DecoderConfig::rope_theta`.
    pub rope_local_theta: f32,
    /// Attention scores are q·k times this (query_pre_attn_scalar^-1/2).
    pub attn_scale: f32,
    /// Added to every norm weight at load: 1 for Hugging Face checkpoints, which store w and
    /// compute x̂·(1 + w) (`Gemma3RMSNorm`); 0 for GGUF files, whose converter stored 1 + w.
    pub norm_offset: f32,
}

impl GemmaConfig {
    /// transformers' default layer pattern: every `pattern`-th layer global, the others local
    /// (`Gemma3TextConfig`, `sliding_window_pattern` 6; llama.cpp `set_swa_pattern(6)`).
    pub fn pattern(num_layers: usize, pattern: usize) -> Vec<bool> {
        (0..num_layers)
            .map(|i| pattern > 0 && (i + 1) % pattern == 0)
            .collect()
    }
}

/// Resolved decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub max_seq_len: usize,
    pub tie_embeddings: bool,
    /// Whose arithmetic the decoder reproduces.
    pub numerics: Numerics,
    /// Gemma 3's block ([`Arch::Gemma3`]); None for the llama family.
    pub gemma: Option<GemmaConfig>,
}

/// Whose arithmetic the decoder reproduces: the reference runtime of the format a model came
/// in, so that each side's output is reproduced (GGUF files: llama.cpp; Hugging Face folders:
/// transformers). Chosen once, when the configuration is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numerics {
    /// llama.cpp: keys and values kept in f16 (its default cache type, `llama_context_params`
    /// type_k/type_v), RoPE angles as `ggml_rope_cache_init` computes them, and on the CPU its
    /// flash-attention arithmetic (f16 for fewer than `kernels::ATTN_TILE_Q` queries).
    LlamaCpp,
    /// transformers: keys, values and attention in the compute dtype (f32 here), RoPE angles
    /// from the inverse frequencies.
    Transformers,
}

impl Numerics {
    /// Keys and values are rounded to f16 on their way into the cache.
    pub fn f16_kv(self) -> bool {
        self == Numerics::LlamaCpp
    }
}

/// The longest context lever accepts: 2^24 = 16,777,216 tokens. Positions reach RoPE as f32,
/// which holds every integer only up to 2^24; real models stop at about 1M (Llama 3.1: 128K,
/// Qwen2.5-1M). A model file claiming more (0xFFFFFFFF) is corrupt or hostile.
pub const MAX_CONTEXT: usize = 1 << 24;

/// Upper limits for the other sizes, far above any released llama-family model (Llama 3.1
/// 405B: width 16,384, MLP 53,248, 126 layers, 128 heads; Gemma: vocabulary 262,144), and low
/// enough that no product of them overflows or asks for an absurd allocation before a tensor
/// is read.
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_INTERMEDIATE: usize = 1 << 18;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;

/// A field of [`DecoderConfig`], for errors: each format names it its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigField {
    Vocab,
    Hidden,
    Intermediate,
    Layers,
    Heads,
    KvHeads,
    HeadDim,
    RmsEps,
    RopeTheta,
    Context,
    SlidingWindow,
    RopeLocalTheta,
    LayerTypes,
    AttnScale,
}

impl ConfigField {
    /// The key in a Hugging Face `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Vocab => "vocab_size",
            Self::Hidden => "hidden_size",
            Self::Intermediate => "intermediate_size",
            Self::Layers => "num_hidden_layers",
            Self::Heads => "num_attention_heads",
            Self::KvHeads => "num_key_value_heads",
            Self::HeadDim => "head_dim",
            Self::RmsEps => "rms_norm_eps",
            Self::RopeTheta => "rope_theta",
            Self::Context => "max_position_embeddings",
            Self::SlidingWindow => "sliding_window",
            Self::RopeLocalTheta => "rope_local_base_freq",
            Self::LayerTypes => "layer_types",
            Self::AttnScale => "query_pre_attn_scalar",
        }
    }

    /// The GGUF metadata key (llama.cpp `gguf.md`) for architecture `arch`.
    pub fn gguf_key(self, arch: &str) -> String {
        let suffix = match self {
            Self::Vocab => return "tokenizer.ggml.tokens".into(),
            Self::Hidden => "embedding_length",
            Self::Intermediate => "feed_forward_length",
            Self::Layers => "block_count",
            Self::Heads => "attention.head_count",
            Self::KvHeads => "attention.head_count_kv",
            Self::HeadDim => "attention.key_length",
            Self::RmsEps => "attention.layer_norm_rms_epsilon",
            Self::RopeTheta => "rope.freq_base",
            Self::Context => "context_length",
            Self::SlidingWindow => "attention.sliding_window",
            // llama.cpp fixes these for gemma3 (`llama_model::load_hparams`).
            Self::RopeLocalTheta => "rope.freq_base_swa",
            Self::LayerTypes => "attention.sliding_window_pattern",
            Self::AttnScale => "attention.key_length",
        };
        format!("{arch}.{suffix}")
    }
}

impl DecoderConfig {
    /// Check every size and constant before anything is allocated from it: zero layers or
    /// heads, a context of 0xFFFFFFFF, a negative epsilon or a NaN RoPE base are refused with
    /// the field at fault. Both loaders (GGUF metadata, `config.json`) call it.
    pub fn validate(&self) -> std::result::Result<(), (ConfigField, String)> {
        use ConfigField as F;
        let sizes = [
            (F::Vocab, self.vocab_size, 1, MAX_VOCAB),
            (F::Hidden, self.hidden_size, 1, MAX_HIDDEN),
            (F::Intermediate, self.intermediate_size, 1, MAX_INTERMEDIATE),
            (F::Layers, self.num_layers, 1, MAX_LAYERS),
            (F::Heads, self.num_heads, 1, MAX_HEADS),
            (F::KvHeads, self.num_kv_heads, 1, MAX_HEADS),
            (F::HeadDim, self.head_dim, 2, MAX_HEAD_DIM),
            (F::Context, self.max_seq_len, 1, MAX_CONTEXT),
        ];
        for (field, value, min, max) in sizes {
            if value < min || value > max {
                return Err((field, format!("{value} is not between {min} and {max}")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err((
                F::KvHeads,
                format!(
                    "{} does not divide the {} query heads",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err((
                F::HeadDim,
                format!("{} is odd (RoPE rotates pairs)", self.head_dim),
            ));
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err((F::RmsEps, format!("{eps} is not a small positive number")));
        }
        let theta = self.rope_theta;
        if !(theta.is_finite() && theta > 1.0) {
            return Err((
                F::RopeTheta,
                format!("{theta} is not a finite base above 1"),
            ));
        }
        if let Some(g) = &self.gemma {
            if g.sliding_window == 0 {
                return Err((F::SlidingWindow, "0 is not a window".into()));
            }
            let local = g.rope_local_theta;
            if !(local.is_finite() && local > 1.0) {
                return Err((
                    F::RopeLocalTheta,
                    format!("{local} is not a finite base above 1"),
                ));
            }
            if g.global_layers.len() != self.num_layers {
                return Err((
                    F::LayerTypes,
                    format!(
                        "{} layer types for {} layers",
                        g.global_layers.len(),
                        self.num_layers
                    ),
                ));
            }
            let s = g.attn_scale;
            if !(s.is_finite() && s > 0.0) {
                return Err((F::AttnScale, format!("scale {s} is not a positive number")));
            }
        }
        Ok(())
    }

    /// A tiny model for unit tests: 2 layers, width 32, GQA 4:2.
    pub fn tiny(arch: Arch, vocab_size: usize) -> Self {
        Self {
            arch,
            vocab_size,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Neox,
            max_seq_len: 128,
            tie_embeddings: false,
            numerics: Numerics::Transformers,
            gemma: None,
        }
    }

    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    /// The sliding window of layer `i` (None: global attention).
    pub fn window(&self, i: usize) -> Option<usize> {
        let g = self.gemma.as_ref()?;
        (!g.global_layers.get(i).copied().unwrap_or(true)).then_some(g.sliding_window)
    }
}

/// `config.json` of a Hugging Face llama-family checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Absent: false, but true for Gemma 3 (`Gemma3TextConfig`'s default).
    pub tie_word_embeddings: Option<bool>,
    pub torch_dtype: Option<String>,
    /// transformers >= 4.56 writes `dtype` instead of `torch_dtype`.
    pub dtype: Option<String>,
    pub rope_scaling: Option<serde_json::Value>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
    // Gemma 3 (`Gemma3TextConfig`).
    pub query_pre_attn_scalar: Option<f64>,
    pub rope_local_base_freq: Option<f64>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    pub final_logit_softcapping: Option<serde_json::Value>,
    pub attn_logit_softcapping: Option<serde_json::Value>,
    pub hidden_activation: Option<String>,
}

impl HfConfig {
    /// Gemma 3's fields, with `Gemma3TextConfig`'s defaults; what lever does not run
    /// (logit soft-capping, another activation) is refused by name.
    fn gemma(&self) -> std::result::Result<GemmaConfig, (String, String)> {
        let err = |f: &str, p: String| Err((f.to_string(), p));
        for (name, v) in [
            ("final_logit_softcapping", &self.final_logit_softcapping),
            ("attn_logit_softcapping", &self.attn_logit_softcapping),
        ] {
            if let Some(v) = v
                && !v.is_null()
            {
                return err(name, format!("soft-capping ({v}) is not supported"));
            }
        }
        if let Some(a) = &self.hidden_activation
            && a != "gelu_pytorch_tanh"
        {
            return err(
                "hidden_activation",
                format!("`{a}` is not supported (gelu_pytorch_tanh is)"),
            );
        }
        let sliding_window = match &self.sliding_window {
            None => 4096,
            Some(v) => match v.as_u64() {
                Some(w) => w as usize,
                None => return err("sliding_window", format!("{v} is not a window size")),
            },
        };
        let global_layers = match &self.layer_types {
            Some(types) => {
                let mut out = Vec::with_capacity(types.len());
                for t in types {
                    out.push(match t.as_str() {
                        "full_attention" => true,
                        "sliding_attention" => false,
                        other => {
                            return err("layer_types", format!("unknown layer type `{other}`"));
                        }
                    });
                }
                out
            }
            None => GemmaConfig::pattern(
                self.num_hidden_layers,
                self.sliding_window_pattern
                    .or(self.sliding_window_pattern_private)
                    .unwrap_or(6),
            ),
        };
        let scalar = self.query_pre_attn_scalar.unwrap_or(256.0);
        Ok(GemmaConfig {
            sliding_window,
            global_layers,
            rope_local_theta: self.rope_local_base_freq.unwrap_or(10_000.0) as f32,
            attn_scale: scalar.powf(-0.5) as f32,
            norm_offset: 1.0,
        })
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    /// Resolve; the error names the offending field.
    pub fn resolve(&self) -> std::result::Result<DecoderConfig, (String, String)> {
        let model_type = self.model_type.clone().unwrap_or_else(|| "llama".into());
        let arch = Arch::parse(&model_type).ok_or_else(|| {
            (
                "model_type".to_string(),
                format!(
                    "unsupported `{model_type}` (lever runs: {})",
                    Arch::SUPPORTED
                ),
            )
        })?;
        if let Some(s) = &self.rope_scaling
            && !s.is_null()
        {
            return Err((
                "rope_scaling".into(),
                format!("rope scaling {s} is not supported yet"),
            ));
        }
        if arch != Arch::Gemma3 && self.use_sliding_window == Some(true) {
            return Err((
                "use_sliding_window".into(),
                "sliding-window attention is not supported".into(),
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let gemma = if arch == Arch::Gemma3 {
            Some(self.gemma()?)
        } else {
            None
        };
        // Gemma3TextConfig's head size defaults to 256, not C / H.
        let head_dim = self.head_dim.unwrap_or(if gemma.is_some() {
            256
        } else {
            self.hidden_size / self.num_attention_heads.max(1)
        });
        let cfg = DecoderConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta as f32,
            rope_style: RopeStyle::Neox,
            max_seq_len: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(gemma.is_some()),
            numerics: Numerics::Transformers,
            gemma,
        };
        cfg.validate()
            .map_err(|(field, problem)| (field.hf_name().to_string(), problem))?;
        Ok(cfg)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A small config with the fields of `extra` (`, "key": value, ...`) set over it.
    fn cfg(extra: &str) -> HfConfig {
        let mut base: serde_json::Value = serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let extra: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        base.as_object_mut().unwrap().extend(extra);
        serde_json::from_value(base).expect("config json")
    }

    #[test]
    fn zero_kv_heads_is_an_error_not_a_division_by_zero() {
        let err = cfg(r#", "num_key_value_heads": 0"#).resolve().unwrap_err();
        assert_eq!(err.0, "num_key_value_heads");
    }

    #[test]
    fn rope_scaling_is_refused_by_name() {
        let err = cfg(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(err.0, "rope_scaling");
    }

    /// Regression: zero layers, a NaN or negative epsilon, a zero RoPE base and a context of
    /// 0xFFFFFFFF resolved, to fail (or abort) later.
    #[test]
    fn absurd_values_are_refused_by_field_name() {
        for (extra, field, problem) in [
            (
                r#", "num_hidden_layers": 0"#,
                "num_hidden_layers",
                "0 is not between 1 and 1024",
            ),
            (
                r#", "num_attention_heads": 0"#,
                "num_attention_heads",
                "0 is not between",
            ),
            (r#", "vocab_size": 0"#, "vocab_size", "0 is not between"),
            (
                r#", "rms_norm_eps": -1e-5"#,
                "rms_norm_eps",
                "is not a small positive number",
            ),
            (
                r#", "rms_norm_eps": 0"#,
                "rms_norm_eps",
                "0 is not a small positive",
            ),
            (
                r#", "rope_theta": 0"#,
                "rope_theta",
                "0 is not a finite base above 1",
            ),
            (
                r#", "rope_theta": 1e300"#,
                "rope_theta",
                "inf is not a finite base",
            ),
            (
                r#", "max_position_embeddings": 4294967295"#,
                "max_position_embeddings",
                "4294967295 is not between 1 and 16777216",
            ),
            (r#", "head_dim": 5"#, "head_dim", "5 is odd"),
            (
                r#", "num_key_value_heads": 3, "num_attention_heads": 4, "head_dim": 2"#,
                "num_key_value_heads",
                "3 does not divide the 4 query heads",
            ),
        ] {
            let (f, p) = cfg(extra).resolve().unwrap_err();
            assert_eq!(f, field, "{extra}: {p}");
            assert!(p.contains(problem), "{extra}: {p}");
        }
        // The largest accepted context, and one a real model has (Qwen2.5-1M), resolve.
        for ctx in [1 << 24, 1_010_000] {
            let c = cfg(&format!(r#", "max_position_embeddings": {ctx}"#))
                .resolve()
                .unwrap();
            assert_eq!(c.max_seq_len, ctx);
        }
    }

    /// Gemma 3 from `config.json`: `Gemma3TextConfig`'s defaults (head size 256, tied
    /// embeddings, every sixth layer global, window 4096, scale 256^-1/2, norms 1 + w), the
    /// explicit fields over them, and soft-capping or another activation refused by name.
    #[test]
    fn gemma3_config_resolves_with_transformers_defaults() {
        let c = cfg(r#", "model_type": "gemma3_text", "num_hidden_layers": 7"#)
            .resolve()
            .unwrap();
        let g = c.gemma.clone().unwrap();
        assert_eq!(
            (c.arch, c.head_dim, c.tie_embeddings),
            (Arch::Gemma3, 256, true)
        );
        assert_eq!(
            g.global_layers,
            [false, false, false, false, false, true, false]
        );
        assert_eq!(
            (g.sliding_window, g.attn_scale, g.norm_offset),
            (4096, 0.0625, 1.0)
        );
        assert_eq!(c.window(0), Some(4096));
        assert_eq!(c.window(5), None);
        let c = cfg(r#", "model_type": "gemma3_text", "num_hidden_layers": 2,
            "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 3,
            "query_pre_attn_scalar": 16, "rope_local_base_freq": 100.0, "head_dim": 4,
            "tie_word_embeddings": false"#)
        .resolve()
        .unwrap();
        let g = c.gemma.clone().unwrap();
        assert_eq!(g.global_layers, [true, false]);
        assert_eq!((g.sliding_window, g.attn_scale), (3, 0.25));
        assert_eq!(
            (g.rope_local_theta, c.head_dim, c.tie_embeddings),
            (100.0, 4, false)
        );
        for (extra, field) in [
            (
                r#", "final_logit_softcapping": 30.0"#,
                "final_logit_softcapping",
            ),
            (
                r#", "attn_logit_softcapping": 50.0"#,
                "attn_logit_softcapping",
            ),
            (r#", "hidden_activation": "silu""#, "hidden_activation"),
            (r#", "layer_types": ["chunked_attention"]"#, "layer_types"),
            (
                r#", "layer_types": ["full_attention", "full_attention"]"#,
                "layer_types",
            ),
            (r#", "sliding_window": 0"#, "sliding_window"),
        ] {
            let (f, p) = cfg(&format!(r#", "model_type": "gemma3_text"{extra}"#))
                .resolve()
                .unwrap_err();
            assert_eq!(f, field, "{extra}: {p}");
        }
        // The llama family has no Gemma fields.
        assert!(cfg("").resolve().unwrap().gemma.is_none());
    }

    #[test]
    fn defaults_resolve() {
        let c = cfg("").resolve().expect("resolve");
        assert_eq!((c.num_kv_heads, c.head_dim, c.arch), (2, 4, Arch::Llama));
    }
}
