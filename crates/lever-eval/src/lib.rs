//! lever-eval: measuring models. Task specs (TOML: data, field mapping, a minijinja prompt,
//! the metric, generation parameters), few-shot example selection (fixed, random, knn, mmr)
//! within a token budget, generation metrics (exact match, F1, contains, regex-extracted
//! answers), multiple choice by log-likelihood scored the way EleutherAI's
//! lm-evaluation-harness scores `output_type: multiple_choice` tasks (`acc`, `acc_norm`),
//! perplexity, bootstrap intervals, and a result cache.

pub mod cache;
pub mod error;
pub mod fewshot;
pub mod mc;
pub mod metrics;
pub mod run;
pub mod task;

pub use error::{Error, Result};
pub use mc::{
    ChoiceScore, ItemScore, McItem, McOptions, McReport, encode_pair, evaluate, read_items, report,
    score_item,
};
pub use run::{Evaluator, Record, Setting, Shots, Summary, Trial, model_key, search};
pub use task::{Example, Format, Select, Task};
