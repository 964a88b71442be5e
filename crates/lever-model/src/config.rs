//! Two config types (STYLE habit 2): `HfConfig` mirrors a Hugging Face `config.json` with
//! optional fields; `DecoderConfig` is resolved, every field required, and is what the decoder
//! reads. GGUF metadata resolves to the same `DecoderConfig` in `gguf.rs`.

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
    /// Precision the KV cache keeps keys and values in.
    pub kv_precision: KvPrecision,
}

/// llama.cpp stores K and V in f16 by default, transformers in the compute dtype (f32 here);
/// lever follows the convention of the format a model came in, so each side's reference
/// output is reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPrecision {
    F32,
    F16,
}

impl DecoderConfig {
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
            kv_precision: KvPrecision::F32,
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
        if num_kv_heads == 0
            || self.num_attention_heads == 0
            || !self.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            return Err((
                "num_key_value_heads".into(),
                format!(
                    "{num_kv_heads} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        Ok(DecoderConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta as f32,
            rope_style: RopeStyle::Neox,
            max_seq_len: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings,
            kv_precision: KvPrecision::F32,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> HfConfig {
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2"#;
        serde_json::from_str(&format!("{{{base}{extra}}}")).expect("config json")
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

    #[test]
    fn defaults_resolve() {
        let c = cfg("").resolve().expect("resolve");
        assert_eq!((c.num_kv_heads, c.head_dim, c.arch), (2, 4, Arch::Llama));
    }
}
