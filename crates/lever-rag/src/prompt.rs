//! The grounded prompt of `rag ask`: numbered passages with their source and line span, the
//! question, and an instruction to answer only from them and cite by number (the layout of
//! the RAG-with-citations prompts of ALCE, Gao et al. 2023, arXiv:2305.14627). Passages are
//! taken best first while they fit the token budget; the rest are dropped and returned, never
//! cut.

use std::path::{Path, PathBuf};

use crate::Result;
use crate::store::ChunkRecord;

/// What the model is told to do with the passages.
pub const INSTRUCTION: &str = "Answer the question using only the numbered passages. \
Cite the passages you use by their number in square brackets, like [1]. \
If the passages do not contain the answer, say that you do not know.";

/// A retrieved chunk, with what a citation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    pub path: PathBuf,
    pub line_start: usize,
    pub line_end: usize,
    pub headings: Vec<String>,
    pub text: String,
    pub score: f32,
    /// The document's own id (a JSONL record's `_id`), when the source gave one.
    pub doc_id: Option<String>,
}

impl Passage {
    /// A stored chunk as a passage with its search score; its path shown relative to
    /// `relative_to` when inside it.
    pub fn from_chunk(c: ChunkRecord, score: f32, relative_to: Option<&Path>) -> Passage {
        let path = relative_to
            .and_then(|base| c.path.strip_prefix(base).ok())
            .map_or_else(|| c.path.clone(), PathBuf::from);
        Passage {
            path,
            line_start: c.line_start,
            line_end: c.line_end,
            headings: c.headings,
            text: c.text,
            score,
            doc_id: c.doc_id,
        }
    }

    /// `path:start-end` (or `path:line`).
    pub fn citation(&self) -> String {
        if self.line_start == self.line_end {
            format!("{}:{}", self.path.display(), self.line_start)
        } else {
            format!(
                "{}:{}-{}",
                self.path.display(),
                self.line_start,
                self.line_end
            )
        }
    }

    /// The passage as the model sees it, numbered `n`.
    pub fn block(&self, n: usize) -> String {
        let heading = if self.headings.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.headings.join(" > "))
        };
        format!("[{n}] {}{heading}\n{}", self.citation(), self.text.trim())
    }
}

/// The user turn and which passages it holds.
#[derive(Debug, Clone)]
pub struct Grounded {
    pub user: String,
    /// In the prompt, numbered from 1 in this order.
    pub used: Vec<Passage>,
    /// Did not fit the budget.
    pub dropped: Vec<Passage>,
}

/// The user turn for `question` over `passages` (best first): each passage goes in if its
/// block still fits `budget` tokens (counted by `count`), else it is dropped.
pub fn grounded(
    question: &str,
    passages: Vec<Passage>,
    budget: usize,
    count: &dyn Fn(&str) -> Result<usize>,
) -> Result<Grounded> {
    let (mut used, mut dropped, mut blocks) = (Vec::new(), Vec::new(), Vec::new());
    let mut spent = 0;
    for p in passages {
        let block = p.block(used.len() + 1);
        // The blank line between blocks is counted with the block.
        let cost = count(&format!("{block}\n\n"))?;
        if spent + cost <= budget {
            spent += cost;
            blocks.push(block);
            used.push(p);
        } else {
            dropped.push(p);
        }
    }
    Ok(Grounded {
        user: user_turn(question, &blocks),
        used,
        dropped,
    })
}

/// The user turn with these passage blocks (none: the bare frame, for measuring overhead).
pub fn user_turn(question: &str, blocks: &[String]) -> String {
    let passages = if blocks.is_empty() {
        "(no passages)".to_string()
    } else {
        blocks.join("\n\n")
    };
    format!(
        "{INSTRUCTION}\n\nPassages:\n{passages}\n\nQuestion: {}",
        question.trim()
    )
}

/// The answer without its citation marks (`[2]`, `[1, 3]`), spaces around them closed up:
/// what exact match and F1 compare with the gold answers.
pub fn strip_citations(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let close = after.find(']');
        let is_citation = close.is_some_and(|c| {
            let inside = &after[..c];
            !inside.trim().is_empty()
                && inside
                    .split([',', ';'])
                    .all(|s| s.trim().parse::<usize>().is_ok())
        });
        match close {
            Some(c) if is_citation => {
                out.push_str(rest[..open].trim_end());
                rest = &after[c + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The passage numbers an answer cites.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Citations {
    /// Numbers of passages that were given (1..=n), in order of first citation.
    pub given: Vec<usize>,
    /// Numbers the answer cites that no given passage has (0, or above n): a sign that the
    /// model made the citation up.
    pub unknown: Vec<usize>,
}

/// Read the citations of an answer (`[2]`, `[1, 3]`, `[1][2]`) given `n` passages.
pub fn cited(answer: &str, n: usize) -> Citations {
    let mut out = Citations::default();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        let inside = &rest[..close];
        let numbers: Option<Vec<usize>> = inside
            .split([',', ';'])
            .map(|s| s.trim().parse::<usize>().ok())
            .collect();
        for k in numbers.unwrap_or_default() {
            let list = if (1..=n).contains(&k) {
                &mut out.given
            } else {
                &mut out.unknown
            };
            if !list.contains(&k) {
                list.push(k);
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn passage(name: &str, words: usize) -> Passage {
        Passage {
            path: PathBuf::from(name),
            line_start: 3,
            line_end: 7,
            headings: vec![],
            text: vec!["word"; words].join(" "),
            score: 1.0,
            doc_id: None,
        }
    }

    fn words(s: &str) -> Result<usize> {
        Ok(s.split_whitespace().count())
    }

    #[test]
    fn passages_that_do_not_fit_are_dropped_whole_and_the_rest_renumbered() {
        // Blocks cost words + 2 ("[n]" and the citation).
        let ps = vec![passage("a.md", 10), passage("b.md", 50), passage("c.md", 5)];
        let g = grounded("why?", ps, 20, &words).unwrap();
        let names: Vec<_> = g
            .used
            .iter()
            .map(|p| p.path.display().to_string())
            .collect();
        assert_eq!(names, ["a.md", "c.md"]);
        assert_eq!(g.dropped.len(), 1);
        assert_eq!(g.dropped[0].path, PathBuf::from("b.md"));
        assert!(g.user.contains("[1] a.md:3-7\n"));
        assert!(g.user.contains("[2] c.md:3-7\n"));
        assert!(!g.user.contains("[3]"));
        assert!(g.user.ends_with("Question: why?"));
        // Nothing at all fits: no passage, the frame says so.
        let g = grounded("why?", vec![passage("a.md", 10)], 3, &words).unwrap();
        assert!(g.used.is_empty() && g.user.contains("(no passages)"));
    }

    #[test]
    fn citation_marks_are_stripped_and_other_brackets_kept() {
        assert_eq!(strip_citations("Denver Broncos [1]."), "Denver Broncos.");
        assert_eq!(strip_citations("In 1066 [2, 3] [1]"), "In 1066");
        assert_eq!(strip_citations("[1] Paris"), "Paris");
        assert_eq!(strip_citations("x[a] and [ ] [4"), "x[a] and [ ] [4");
    }

    #[test]
    fn citations_are_read_from_brackets() {
        let c = cited("Yes [2]. Also [1, 3] and [1][4].", 3);
        assert_eq!(c.given, vec![2, 1, 3]);
        assert_eq!(c.unknown, vec![4]);
        let c = cited("See [x] or [0] or [12", 3);
        assert_eq!(
            c,
            Citations {
                given: vec![],
                unknown: vec![0]
            }
        );
        let mut p = passage("d/e.txt", 1);
        p.line_end = 3;
        assert_eq!(p.citation(), "d/e.txt:3");
    }
}
