//! lever-train: fine-tuning the one decoder that `lever ask` runs. LoRA adapters (Hu et al.
//! 2021, arXiv:2106.09685) on a frozen base that may stay quantized (QLoRA: gradients pass
//! through the quantized layers), AdamW with decoupled weight decay (Loshchilov & Hutter,
//! arXiv:1711.05101), linear warmup then cosine decay, gradient clipping, a loss over the
//! trained (assistant) tokens only, adapters saved in Hugging Face PEFT's layout, and the run
//! folder (run.rs: start, resume, start over, metrics, best weights, loss curve). Pretraining
//! from scratch (pretrain.rs) trains the same decoder from a recipe (recipe.rs: presets and
//! TOML files) and GPT-2's initialization (init.rs). plan.rs plans a run before it is
//! spent: FLOPs, memory, time and cost, on this machine (calibrated) or on GPUs. rag.rs trains
//! a retriever's query encoder and a generator's adapter together on the marginal likelihood
//! of RAG-Sequence or RAG-Token, through the same trainer.

pub mod checkpoint;
pub mod dist;
pub mod error;
pub mod init;
mod lanes;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod peak;
pub mod plan;
pub mod plot;
pub mod pretrain;
pub mod rag;
pub mod recipe;
pub mod run;
pub mod spike;
pub mod trainer;

pub use dist::Dist;
pub use error::{Error, Result};
pub use lora::{LoraConfig, LoraSet, load_peft};
pub use pretrain::{PretrainStep, Pretrainer};
pub use recipe::{Batches, Recipe, Size};
pub use run::{Best, RunDir, Start};
pub use trainer::{MicroStep, StepMetrics, TrainConfig, Trainer};
