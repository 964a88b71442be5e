//! Turning a stream of token bytes into text: multi-byte characters split across tokens are
//! held back until whole, and text that might be the start of a stop string is held back until
//! it is known not to be.

/// Emits only complete UTF-8 characters.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // An incomplete sequence at the end: keep it for the next token.
                None => e.valid_up_to(),
                // Invalid bytes mid-stream: emit them replaced, as text must flow.
                Some(_) => self.pending.len(),
            },
        };
        let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        out
    }

    /// What is left (an incomplete character), replaced.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to print now, and whether a stop string was reached.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_multibyte_character_prints_whole() {
        let mut s = Utf8Stream::default();
        let bytes = "é🦀".as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..3]), "é");
        assert_eq!(s.push(&bytes[3..5]), "");
        assert_eq!(s.push(&bytes[5..]), "🦀");
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn truncated_character_flushes_as_replacement() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&"🦀".as_bytes()[..2]), "");
        assert_eq!(s.flush(), "\u{FFFD}");
    }

    #[test]
    fn stop_string_across_chunks_is_not_printed() {
        let mut m = StopMatcher::new(&["\n\nUser:".to_string()]);
        let a = m.push("Hello\n");
        assert_eq!(a.emit, "Hello");
        assert!(!a.stopped);
        let b = m.push("\nUs");
        assert_eq!(b.emit, "");
        let c = m.push("er: hi");
        assert_eq!(
            c,
            StopCheck {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_that_is_not_a_stop_is_released() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("the E").emit, "the ");
        assert_eq!(m.push("nd").emit, "End");
        assert_eq!(m.flush(), "");
    }
}
