//! lever's BERT sentence encoder (lever-model) as the index's embedder. Texts longer than the
//! encoder's limit are cut by it; the cut is counted here so the caller can report it (a chunker
//! that counts the encoder's own tokens keeps chunks under the limit, so it stays at zero for
//! documents; a long query is what usually reaches it).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use lever_model::Encoder;

use crate::{Embed, Error, Result};

pub struct BertEmbed {
    encoder: Encoder,
    id: String,
    truncated: AtomicUsize,
}

impl BertEmbed {
    pub fn new(encoder: Encoder) -> Result<BertEmbed> {
        let id = encoder.id().map_err(|e| Error::Embed(e.to_string()))?;
        Ok(BertEmbed {
            encoder,
            id,
            truncated: AtomicUsize::new(0),
        })
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Texts cut to the encoder's limit so far.
    pub fn truncated(&self) -> usize {
        self.truncated.load(Ordering::Relaxed)
    }
}

impl Embed for BertEmbed {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn dim(&self) -> usize {
        self.encoder.dim()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let out = self
            .encoder
            .embed(texts)
            .map_err(|e| Error::Embed(e.to_string()))?;
        self.truncated.fetch_add(out.truncated, Ordering::Relaxed);
        Ok(out.vectors)
    }

    fn token_spans(&self, text: &str) -> Result<Vec<Range<usize>>> {
        Ok(self
            .encoder
            .token_offsets(text)
            .map_err(|e| Error::Embed(e.to_string()))?
            .into_iter()
            .map(|(a, b)| a..b)
            .collect())
    }
}
