//! Model file formats: reading, converting and writing.

pub mod convert;
pub mod export;
pub mod gguf;
pub mod quantize;
pub mod weights;
