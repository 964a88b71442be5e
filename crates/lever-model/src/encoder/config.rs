//! Encoder hyper-parameters: `config.json` as transformers writes it, and resolved.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Mirror of a BERT `config.json` (transformers `BertConfig`): optional fields default as
/// transformers does.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BertHfConfig {
    #[serde(default)]
    pub(crate) model_type: Option<String>,
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) intermediate_size: usize,
    #[serde(default = "default_act")]
    pub(crate) hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub(crate) max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub(crate) type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub(crate) layer_norm_eps: f64,
    #[serde(default)]
    pub(crate) position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

/// How token states become one vector (sentence-transformers `Pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the non-padding tokens' last hidden states (special tokens included).
    Mean,
    /// The first ([CLS]) token's last hidden state.
    Cls,
}

impl Pooling {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }
}

/// Resolved encoder hyper-parameters, every field required.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pooling: Pooling,
    /// L2-normalize the pooled vector (sentence-transformers `Normalize` module).
    pub normalize: bool,
    /// Tokens per text, special tokens included; longer texts are cut (and counted).
    pub max_seq_len: usize,
}

impl EncoderConfig {
    /// A tiny encoder for unit tests: 2 layers, width 32, 4 heads.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            intermediate_size: 64,
            max_positions: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pooling: Pooling::Mean,
            normalize: true,
            max_seq_len: 64,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Resolve `config.json` plus the sentence-transformers settings read from the folder.
    pub(crate) fn resolve(
        hf: &BertHfConfig,
        path: &Path,
        pooling: Pooling,
        normalize: bool,
        max_seq_len: usize,
    ) -> Result<Self> {
        let bad = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            problem,
        };
        if let Some(t) = &hf.model_type
            && !matches!(t.as_str(), "bert")
        {
            return Err(bad(
                "model_type",
                format!("`{t}`: lever's encoder runs `bert`"),
            ));
        }
        if hf.hidden_act != "gelu" {
            return Err(bad(
                "hidden_act",
                format!("`{}`: lever's encoder runs `gelu` (erf)", hf.hidden_act),
            ));
        }
        if let Some(p) = &hf.position_embedding_type
            && p != "absolute"
        {
            return Err(bad(
                "position_embedding_type",
                format!("`{p}`: lever's encoder runs `absolute`"),
            ));
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    hf.num_attention_heads, hf.hidden_size
                ),
            ));
        }
        if max_seq_len < 2 || max_seq_len > hf.max_position_embeddings {
            return Err(bad(
                "max_seq_length",
                format!(
                    "{max_seq_len}: must be between 2 and max_position_embeddings ({})",
                    hf.max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_positions: hf.max_position_embeddings,
            type_vocab_size: hf.type_vocab_size.max(1),
            layer_norm_eps: hf.layer_norm_eps as f32,
            pooling,
            normalize,
            max_seq_len,
        })
    }
}
