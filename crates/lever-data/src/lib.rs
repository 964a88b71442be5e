//! lever-data: the datasets every rung reads. JSONL in the four shapes users already have
//! (Alpaca `instruction`/`input`/`output`, chat `messages`, ShareGPT `conversations`, plain
//! `text`), and their tokenization under the model's own chat template with a mask that marks
//! the assistant tokens, which are the only ones a fine-tuning loss covers. For pretraining:
//! tokenizer training (byte-level BPE or characters), and token shards in llm.c's format
//! (written from text, folders and JSONL; read back with nanoGPT's files too).

pub mod error;
pub mod jsonl;
pub mod pieces;
pub mod sft;
pub mod sharding;
pub mod shards;
pub mod tokenizer_train;

pub use error::{Error, Result};
pub use jsonl::{Dataset, Example, Fields, Format};
pub use sft::{Overlong, Prepared, Tokenized};
pub use shards::{Manifest, Shard, ShardSet, Split};
