//! The sentence-embedding encoder (being split into config, model, ops and pipeline).

mod model;
pub use model::*;
