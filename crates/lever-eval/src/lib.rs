//! lever-eval: measuring models. Today: multiple-choice evaluation by log-likelihood, scored
//! the way EleutherAI's lm-evaluation-harness scores `output_type: multiple_choice` tasks
//! (`acc`, `acc_norm`), with the query's keys and values computed once per item and reused
//! for every choice.

pub mod error;
pub mod mc;

pub use error::{Error, Result};
pub use mc::{
    ChoiceScore, ItemScore, McItem, McOptions, McReport, encode_pair, evaluate, read_items, report,
    score_item,
};
