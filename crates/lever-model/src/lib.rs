//! lever-model: the one decoder (llama family) that lever runs and trains, weight loading from
//! GGUF and Hugging Face folders, tokenizers, chat templates and the model registry.

pub mod chat;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod formats;
pub mod fsutil;
pub mod generation_config;
pub mod kernels;
pub mod linear;
pub mod model;
pub mod ops;
pub mod qweight;
pub mod registry;
pub mod testing;
pub mod tokenizer;

// Kept while the moved modules' paths are updated (next commit).
pub use formats::{convert, export, gguf, quantize, weights};

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, DecoderConfig, HfConfig, KvPrecision};
pub use decoder::{Cache, Decoder, Logits};
pub use encoder::{Embeddings, Encoder, EncoderConfig, Pooling};
pub use error::{Error, Result};
pub use generation_config::GenerationConfig;
pub use linear::{DROPOUT_OFF, Linear, Lora, LoraDropout, Weight};
pub use model::{Model, ModelInfo, ModelSource};
pub use tokenizer::Tokenizer;
