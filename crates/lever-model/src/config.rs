//! Two config types (STYLE habit 2): `HfConfig` mirrors a Hugging Face `config.json` with
//! optional fields; `DecoderConfig` is resolved, every field required, and is what the decoder
//! reads. GGUF metadata resolves to the same `DecoderConfig` in `formats/gguf.rs`.

use serde::Deserialize;

use crate::ops::RopeStyle;

/// The llama family architectures lever runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, SmolLM/SmolLM2, Mistral (no sliding window): no biases.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, smollm, qwen2";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" | "smollm" | "smollm2" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
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
        }
    }

    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
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
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub torch_dtype: Option<String>,
    /// transformers >= 4.56 writes `dtype` instead of `torch_dtype`.
    pub dtype: Option<String>,
    pub rope_scaling: Option<serde_json::Value>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
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
        if self.use_sliding_window == Some(true) {
            return Err((
                "use_sliding_window".into(),
                "sliding-window attention is not supported".into(),
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let cfg = DecoderConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta as f32,
            rope_style: RopeStyle::Neox,
            max_seq_len: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings,
            numerics: Numerics::Transformers,
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

    #[test]
    fn defaults_resolve() {
        let c = cfg("").resolve().expect("resolve");
        assert_eq!((c.num_kv_heads, c.head_dim, c.arch), (2, 4, Arch::Llama));
    }
}
