//! A deterministic stand-in embedder for tests, examples and benchmarks of the index logic.
//!
//! [`HashEmbed`] is a hashed bag of words (the "hashing trick", Weinberger et al. 2009,
//! <https://arxiv.org/abs/0902.2206>): each lower-cased whitespace word, stripped of surrounding
//! punctuation, adds ±1 to one of `dim` buckets chosen by its FNV-1a hash; the sum is
//! L2-normalized. Texts sharing words get a positive dot product, so exact search behaves
//! sensibly, but it knows nothing of meaning: never use it for real retrieval.
//!
//! Test hooks: a delay per `embed` call (to make ingest slow enough to interrupt) and a failure
//! after a number of calls (to interrupt it deterministically).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{Embed, Error, Result};

#[derive(Debug)]
pub struct HashEmbed {
    dim: usize,
    delay: Duration,
    fail_after: Option<usize>,
    calls: AtomicUsize,
}

impl HashEmbed {
    pub fn new(dim: usize) -> Self {
        HashEmbed {
            dim,
            delay: Duration::ZERO,
            fail_after: None,
            calls: AtomicUsize::new(0),
        }
    }

    /// Sleeps this long in every `embed` call.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// `embed` calls after the first `calls` return an error.
    pub fn failing_after(mut self, calls: usize) -> Self {
        self.fail_after = Some(calls);
        self
    }

    /// How many times `embed` was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    fn vector(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        for word in text.split_whitespace() {
            let w = word
                .trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase();
            if w.is_empty() {
                continue;
            }
            let h = fnv1a(w.as_bytes());
            let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
            v[(h % self.dim as u64) as usize] += sign;
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

/// FNV-1a, 64-bit (<http://www.isthe.com/chongo/tech/comp/fnv/>): stable across runs and
/// platforms, unlike `std`'s randomly seeded hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Embed for HashEmbed {
    fn id(&self) -> String {
        format!("hash-bow-{}", self.dim)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fail_after.is_some_and(|n| call > n) {
            return Err(Error::Embed(format!("test embedder fails on call {call}")));
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(texts.iter().map(|t| self.vector(t)).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_normalized_deterministic_and_share_words() {
        let e = HashEmbed::new(64);
        let v = e
            .embed(&["The cat sat.", "the CAT sat", "quantum chromodynamics", ""])
            .unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-6);
        assert_eq!(v[0], v[1]);
        assert!(dot(&v[0], &v[2]) < 0.9);
        assert!(v[3].iter().all(|&x| x == 0.0));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn fails_after_the_given_number_of_calls() {
        let e = HashEmbed::new(8).failing_after(1);
        assert!(e.embed(&["a"]).is_ok());
        assert!(e.embed(&["a"]).is_err());
        assert_eq!(e.calls(), 2);
    }
}
