//! lever-data: the datasets every rung reads. JSONL in the four shapes users already have
//! (Alpaca `instruction`/`input`/`output`, chat `messages`, ShareGPT `conversations`, plain
//! `text`), and their tokenization under the model's own chat template with a mask that marks
//! the assistant tokens, which are the only ones a fine-tuning loss covers.

pub mod error;
pub mod jsonl;
pub mod sft;

pub use error::{Error, Result};
pub use jsonl::{Dataset, Example, Fields, Format};
pub use sft::{Overlong, Prepared, Tokenized};
