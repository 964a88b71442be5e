//! Model files: reading them, loading weights from them, and writing them.
//!
//! - [`gguf`]: GGUF files (llama.cpp), header walked with bounds checks before candle parses it.
//! - [`weights`]: where the decoder's weights come from — GGUF, safetensors or seeded random —
//!   asked for by logical parameter and checked by shape.
//! - [`convert`]: a Hugging Face folder laid out as GGUF, as llama.cpp's converter does.
//! - [`export`]: the decoder (fine-tuned, or with adapters merged) written as a Hugging Face
//!   folder or a GGUF file.
//! - [`quantize`]: a GGUF file's matrices rewritten in another block type.

pub mod convert;
pub mod export;
pub(crate) mod gguf;
pub mod quantize;
pub mod weights;
