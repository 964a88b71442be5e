//! A model's published generation settings: what its authors say to sample it with. Read
//! from a Hugging Face folder's `generation_config.json` (transformers' `GenerationConfig`:
//! `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`), from a GGUF
//! file's `general.sampling.*` keys (llama.cpp's `gguf-py` constants), or, for registry models
//! whose files carry neither, from the registry (the model card's recommendation).
//!
//! Greedy decoding of a small model with no repetition penalty loops; these settings are what
//! `lever ask`, `chat` and `rag ask` use unless a flag says otherwise.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::formats::gguf::GgufFile;

/// Sampling settings a model's authors publish. `None`: not said.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationConfig {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// Where the settings come from (shown to the user), e.g. "generation_config.json".
    pub source: Option<String>,
}

impl GenerationConfig {
    pub fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_k.is_none()
            && self.top_p.is_none()
            && self.min_p.is_none()
            && self.repeat_penalty.is_none()
    }

    /// `generation_config.json` in a Hugging Face folder; an absent or unreadable file says
    /// nothing (it is optional, and never needed to run the model).
    pub fn from_hf_folder(dir: &Path) -> Self {
        let path = dir.join("generation_config.json");
        let Some(raw) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<HfGenerationConfig>(&t).ok())
        else {
            return Self::default();
        };
        let sane = |v: Option<f32>| v.filter(|x| x.is_finite() && *x >= 0.0);
        let mut c = Self {
            temperature: sane(raw.temperature),
            top_k: raw.top_k,
            top_p: sane(raw.top_p).filter(|p| *p <= 1.0),
            min_p: sane(raw.min_p).filter(|p| *p <= 1.0),
            repeat_penalty: sane(raw.repetition_penalty).filter(|p| *p > 0.0),
            source: Some("generation_config.json".into()),
        };
        // transformers samples only with do_sample; without it the settings above are unused
        // and decoding is greedy.
        if raw.do_sample == Some(false) {
            c.temperature = Some(0.0);
        }
        if c.is_empty() { Self::default() } else { c }
    }

    /// llama.cpp's `general.sampling.*` metadata (written by its converter from
    /// generation_config.json since 2025).
    pub fn from_gguf(file: &GgufFile) -> Self {
        let f = |k: &str| {
            file.opt_f32(&format!("general.sampling.{k}"))
                .filter(|x| x.is_finite() && *x >= 0.0)
        };
        let c = Self {
            temperature: f("temp"),
            top_k: file.opt_usize("general.sampling.top_k"),
            top_p: f("top_p").filter(|p| *p <= 1.0),
            min_p: f("min_p").filter(|p| *p <= 1.0),
            repeat_penalty: f("penalty_repeat").filter(|p| *p > 0.0),
            source: Some("GGUF general.sampling".into()),
        };
        if c.is_empty() { Self::default() } else { c }
    }
}

#[derive(Debug, Deserialize)]
struct HfGenerationConfig {
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_json_is_read_and_do_sample_false_means_greedy() {
        let d = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(d.path().join("generation_config.json"), text);
        write(r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "bos_token_id": 1}"#)
            .unwrap();
        let c = GenerationConfig::from_hf_folder(d.path());
        assert_eq!(
            (c.temperature, c.top_p, c.top_k, c.repeat_penalty),
            (Some(0.6), Some(0.95), Some(20), None)
        );
        write(r#"{"do_sample": false, "temperature": 0.6}"#).unwrap();
        assert_eq!(
            GenerationConfig::from_hf_folder(d.path()).temperature,
            Some(0.0)
        );
        // Only token ids: nothing about sampling.
        write(r#"{"bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
        assert!(GenerationConfig::from_hf_folder(d.path()).is_empty());
        // Out-of-range values are not taken.
        write(r#"{"temperature": -1, "top_p": 3}"#).unwrap();
        assert!(GenerationConfig::from_hf_folder(d.path()).is_empty());
    }
}
