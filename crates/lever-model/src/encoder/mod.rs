//! The sentence-embedding encoder: a BERT encoder (Devlin et al. 2018, "BERT: Pre-training of
//! Deep Bidirectional Transformers", §3 and Vaswani et al. 2017 §3.2) followed by
//! Sentence-BERT pooling (Reimers & Gurevych 2019, "Sentence-BERT", §3: mean or CLS of the
//! last hidden states, then L2 normalization when the model folder asks for it).
//!
//! Matches transformers `models/bert/modeling_bert.py` (BertEmbeddings, BertSelfAttention
//! with the additive padding mask, BertSelfOutput/BertOutput post-norm residuals, exact erf
//! GELU) and sentence-transformers `models/Pooling.py` + `models/Normalize.py`; checked
//! against a sentence-transformers dump of all-MiniLM-L6-v2 in `tests/encoder.rs`. candle's
//! `candle-transformers/src/models/bert.rs` was read as a second reference; this module is our
//! own (one forward for inference and training, fused CPU kernels, counted truncation).
//!
//! Dimension legend: B batch (texts), T tokens (padded to the batch's longest), C hidden
//! size, H heads, D head size (C = H·D), F feed-forward size, V vocabulary.
//!
//! Two kernel sets run the same forward ([`Kernels`]): `Elementary` is candle's
//! differentiable ops (what training uses, chosen automatically when a tensor tracks
//! gradients); `Fused` replaces the memory-bound steps (masked softmax, bias + GELU,
//! bias + residual + LayerNorm) with one-pass CPU loops. Matrix products are candle's
//! (gemm crate) in both. The test `fused_and_elementary_kernels_agree` holds them together.
//!
//! The files, in data-flow order:
//! - `config`: `config.json` mirrored (`BertHfConfig`) and resolved ([`EncoderConfig`]), with
//!   the pooling the model folder asks for.
//! - `model`: the weights by their transformers key names, and the BERT forward
//!   ([`BertModel`]), on either kernel set.
//! - `ops`: the memory-bound steps, elementary or fused, and the fused steps' CPU loops.
//! - `pipeline`: the sentence encoder ([`Encoder`]): tokenizer, batches sorted by length,
//!   BERT, pooling.
//!
//! Training (`lever rag train`'s query encoder): [`BertModel::make_trainable`] turns the
//! weights (all, or the top layers) into variables, [`Encoder::embed_tensor`] runs the
//! elementary kernels and returns the pooled vectors with their graph, and
//! [`Encoder::write_folder`] writes the trained encoder back as a sentence-transformers
//! folder. `tests/encoder_train.rs` holds the gradients to PyTorch autograd on a tiny BERT and
//! the written folder to sentence-transformers.

mod config;
mod model;
mod ops;
mod pipeline;

pub use config::{EncoderConfig, Pooling};
pub use model::{BertModel, Kernels, MatMul};
pub use pipeline::{Embeddings, Encoder, Tokens, embed_batch, pooled_batch};
