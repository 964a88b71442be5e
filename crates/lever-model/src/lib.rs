//! lever-model: the models lever runs and trains, and everything needed to load, run and
//! write them. A map, in the order a model is used:
//!
//! **Finding and loading a model**
//! - [`registry`]: the default models, pinned by sha256, and how they are provisioned.
//! - [`model`]: a model reference (a `.gguf` file, a Hugging Face folder, a registry name)
//!   resolved and loaded into a [`Model`]: decoder, tokenizer, chat template.
//! - [`formats`]: the file formats — GGUF reading, weight loading from GGUF and safetensors
//!   by logical parameter, Hugging Face → GGUF conversion, export, re-quantization.
//! - `config`: the decoder's hyper-parameters, as a checkpoint writes them ([`HfConfig`]) and
//!   resolved ([`DecoderConfig`]), with the [`Numerics`] a model's format calls for.
//!
//! **The models**
//! - [`decoder`]: the one decoder (llama family), top to bottom; its KV [`Cache`].
//! - `linear`: the linear layer every projection is — frozen quantized or float, with a slot
//!   for a LoRA adapter ([`Linear`], [`Lora`]).
//! - [`ops`]: the operations the decoder shares (RoPE, RMS norm, causal mask, grouped-query
//!   heads), their fused differentiable versions for CPU training (`ops::grad`), and the host
//!   helpers those are written with (`ops::host`).
//! - [`encoder`]: the sentence-embedding encoder (BERT + Sentence-BERT pooling).
//!
//! **CPU kernels**
//! - [`kernels`]: lever's own inference kernels — quantized matrix products in llama.cpp's lane
//!   order, their AVX-512 repacked variant, attention over the f16 cache, SwiGLU, the
//!   encoder's bf16 product, the thread pool — chosen by the CPU's instruction set at run time.
//!   The one place lever uses `unsafe` for speed.
//! - [`qweight`]: a frozen quantized weight, held once (GGUF blocks or repacked).
//!
//! **Text in and out**
//! - `tokenizer`: [`Tokenizer`] from `tokenizer.json` or GGUF metadata (`spm`: SentencePiece
//!   vocabularies from GGUF, encoded as llama.cpp does); [`chat`]: chat and
//!   prompt templates; `generation_config`: a model's published sampling settings.
//!
//! **Shared**
//! - `error`: the crate's one [`Error`]; [`fsutil`]: atomic writes of files and folders;
//!   [`rng`]: the seeded generator every reproducible draw uses; [`testing`]: tiny models
//!   and helpers for tests.

pub mod chat;
pub(crate) mod config;
pub mod decoder;
pub mod encoder;
pub(crate) mod error;
pub mod formats;
pub mod fsutil;
pub(crate) mod generation_config;
pub mod kernels;
pub(crate) mod linear;
pub mod model;
pub mod ops;
pub mod qweight;
pub mod registry;
pub mod rng;
pub(crate) mod spm;
pub mod testing;
pub(crate) mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, DecoderConfig, HfConfig, Numerics};
pub use decoder::{Cache, Decoder, Logits};
pub use encoder::{Embeddings, Encoder, EncoderConfig, Pooling};
pub use error::{Error, Result};
pub use generation_config::GenerationConfig;
pub use linear::{DROPOUT_OFF, Linear, Lora, LoraDropout, Weight};
pub use model::{Model, ModelInfo, ModelSource};
pub use tokenizer::Tokenizer;
