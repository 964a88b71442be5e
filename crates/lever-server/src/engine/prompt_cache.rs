//! The prompt cache: keys and values of recent sequences, so that a prompt which starts like
//! one of them computes only what follows.

use std::collections::VecDeque;

use lever_model::{Cache, Model};

/// A prompt prefix shorter than this is computed again rather than copied.
const MIN_REUSE: usize = 8;

/// Keys and values the prompt cache may hold, all variants together.
pub(super) const PROMPT_CACHE_BYTES: usize = 256 << 20;
/// Sequences it may hold.
const PROMPT_CACHE_ENTRIES: usize = 32;

/// Recent sequences' keys and values (llama.cpp server's per-slot `cache_prompt`, vLLM's
/// prefix caching at the granularity of whole sequences): every admitted prompt, and every
/// finished sequence (prompt + answer, so a chat's next turn starts after the last answer).
/// A new prompt continues from the entry that shares the longest prefix with it, so clients
/// that take turns (several chats, several system prompts) each find their own. Most recent
/// first; the oldest go when the entries or bytes run out.
pub(super) struct PromptCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    budget: usize,
}

struct Entry {
    variant: usize,
    tokens: Vec<u32>,
    cache: Cache,
    bytes: usize,
}

impl PromptCache {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// A cache holding the longest cached prefix of `prompt` (at most all but its last
    /// token, which is fed for its logits), and that prefix's length; None below `MIN_REUSE`.
    pub(super) fn lookup(&mut self, variant: usize, prompt: &[u32]) -> Option<(Cache, usize)> {
        let limit = prompt.len().checked_sub(1)?;
        let (at, common) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.variant == variant)
            .map(|(i, e)| {
                let n = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, n.min(limit))
            })
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if common < MIN_REUSE {
            return None;
        }
        let mut cache = self.entries[at].cache.clone();
        cache.truncate(common).ok()?;
        let e = self.entries.remove(at)?;
        self.entries.push_front(e);
        Some((cache, common))
    }

    /// Keep `tokens` with the keys and values `cache` holds for them. An entry whose tokens
    /// begin the new ones says nothing more and goes.
    pub(super) fn insert(
        &mut self,
        variant: usize,
        tokens: Vec<u32>,
        cache: Cache,
        bytes_per_token: usize,
    ) {
        let bytes = cache.len() * bytes_per_token;
        if tokens.len() != cache.len() || bytes > self.budget {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = e.variant == variant && tokens.starts_with(&e.tokens);
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        self.bytes -= freed;
        self.entries.push_front(Entry {
            variant,
            tokens,
            cache,
            bytes,
        });
        self.bytes += bytes;
        while self.bytes > self.budget || self.entries.len() > PROMPT_CACHE_ENTRIES {
            match self.entries.pop_back() {
                Some(e) => self.bytes -= e.bytes,
                None => break,
            }
        }
    }
}

/// Bytes of keys and values per token (f16 host rows, every layer).
pub(super) fn kv_bytes_per_token(model: &Model) -> usize {
    let c = model.decoder.config();
    2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
}
