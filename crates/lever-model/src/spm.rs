//! SentencePiece vocabularies from GGUF metadata (`tokenizer.ggml.model = llama`), encoded the
//! way llama.cpp encodes them, so that lever and `llama-tokenize` give the same ids:
//!
//! 1. Control, user-defined and unknown tokens are cut out of the text whole, one token at a
//!    time, longest token first, each at every leftmost non-overlapping occurrence in what is
//!    left (llama.cpp's `tokenizer_st_partition`). Gemma's vocabulary makes runs of newlines,
//!    spaces and tabs user-defined tokens, so this step matters for plain text too.
//! 2. Each remaining stretch of text gets a space in front when the file says
//!    `tokenizer.ggml.add_space_prefix` (and the stretch starts the text or follows a token
//!    cut out in step 1), and its spaces become `▁` (U+2581).
//! 3. SentencePiece's BPE: start from single characters; repeatedly merge the adjacent pair
//!    whose joined text is a vocabulary piece with the highest score (ties: the leftmost);
//!    symbols that end up as no piece are spelled with the byte tokens `<0xAB>` ("byte
//!    fallback"). This is `llm_tokenizer_spm` in llama.cpp's `src/llama-vocab.cpp`, itself
//!    after `bpe_model.cc` in google/sentencepiece. Written here from that description.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use aho_corasick::AhoCorasick;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub(crate) const NORMAL: i64 = 1;
pub(crate) const UNKNOWN: i64 = 2;
pub(crate) const CONTROL: i64 = 3;
pub(crate) const USER_DEFINED: i64 = 4;
pub(crate) const BYTE: i64 = 6;

/// The SentencePiece space symbol.
pub(crate) const SPACE: char = '\u{2581}';

#[derive(Debug, Clone)]
pub(crate) struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    /// Piece text → id; a text that appears twice maps to the later id (as llama.cpp's map).
    ids: HashMap<String, u32>,
    /// Tokens cut out whole before SentencePiece runs, longest first (ties by id).
    whole: Vec<u32>,
    /// Finds which of `whole` occur in a text at all (pattern `k` is `whole[k]`), so that the
    /// token-by-token cutting only visits those: a text of 1 MB is then not scanned once per
    /// each of Gemma's ~6,400 such tokens.
    finder: Option<AhoCorasick>,
    /// The token of each byte: `<0xAB>`, else the one-byte text (llama.cpp's `byte_to_token`).
    byte_token: [Option<u32>; 256],
    add_space_prefix: bool,
    /// Each token's GGUF type.
    types: Vec<i64>,
}

/// A piece of text between whole tokens, or a whole token.
#[derive(Debug, Clone, Copy)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl Spm {
    /// `types` may be empty (all normal); `scores` empty means all 0, as llama.cpp takes it.
    pub(crate) fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        add_space_prefix: bool,
    ) -> Result<Self, String> {
        let n = tokens.len();
        let scores = if scores.is_empty() {
            vec![0.0; n]
        } else if scores.len() == n {
            scores
        } else {
            return Err(format!("{} scores for {n} tokens", scores.len()));
        };
        if !types.is_empty() && types.len() != n {
            return Err(format!("{} token types for {n} tokens", types.len()));
        }
        let ty = |id: usize| types.get(id).copied().unwrap_or(NORMAL);
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }
        let mut whole: Vec<u32> = (0..n)
            .filter(|&i| matches!(ty(i), UNKNOWN | CONTROL | USER_DEFINED) && !tokens[i].is_empty())
            .map(|i| i as u32)
            .collect();
        whole.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });
        let finder = if whole.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::new(whole.iter().map(|&id| tokens[id as usize].as_str()))
                    .map_err(|e| format!("indexing the special tokens: {e}"))?,
            )
        };
        let mut byte_token = [None; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                (b < 0x80)
                    .then(|| ids.get(&(b as u8 as char).to_string()))
                    .flatten()
                    .copied()
            });
        }
        let types = (0..n).map(ty).collect();
        Ok(Self {
            tokens,
            scores,
            ids,
            whole,
            finder,
            byte_token,
            add_space_prefix,
            types,
        })
    }

    /// The vocabulary as a Hugging Face `tokenizer.json` that encodes as [`Spm::encode`] does:
    /// a BPE model with byte fallback whose merges come from the scores the way transformers'
    /// SentencePiece converter derives them (`SentencePieceExtractor`: every split of every
    /// piece into two pieces, ordered by the joined piece's score, highest first, then by the
    /// two pieces' ids), no pre-tokenizer (SentencePiece merges across the whole stretch), the
    /// control, user-defined and unknown tokens as added tokens matched in the raw text (step
    /// 1), spaces written `▁` (with one in front when the file says `add_space_prefix`), and
    /// BOS added by the post-processor when `bos` is given.
    pub(crate) fn hf_json(&self, bos: Option<u32>) -> Result<serde_json::Value, String> {
        use serde_json::{Map, Value, json};
        let mut vocab = Map::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            if vocab.insert(t.clone(), json!(i)).is_some() {
                return Err(format!(
                    "token {i} {t:?} appears twice in the vocabulary; tokenizer.json cannot hold that"
                ));
            }
        }
        let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
        for (id, t) in self.tokens.iter().enumerate() {
            if self.types[id] != NORMAL {
                continue;
            }
            for (at, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(at);
                if let (Some(&a), Some(&b)) = (self.ids.get(l), self.ids.get(r)) {
                    merges.push((self.scores[id], id as u32, a, b));
                }
            }
        }
        merges.sort_by(|x, y| {
            y.0.total_cmp(&x.0)
                .then(x.1.cmp(&y.1))
                .then(x.2.cmp(&y.2))
                .then(x.3.cmp(&y.3))
        });
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(_, _, a, b)| json!([self.tokens[a as usize], self.tokens[b as usize]]))
            .collect();
        let added: Vec<Value> = (0..self.tokens.len())
            .filter(|&i| matches!(self.types[i], UNKNOWN | CONTROL | USER_DEFINED))
            .filter(|&i| !self.tokens[i].is_empty())
            .map(|i| {
                json!({"id": i, "content": self.tokens[i], "single_word": false,
                       "lstrip": false, "rstrip": false, "normalized": false,
                       "special": self.types[i] != USER_DEFINED})
            })
            .collect();
        let space = SPACE.to_string();
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": space});
        let normalizer = if self.add_space_prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": space}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": space}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let post = match bos {
            None => Value::Null,
            Some(b) => {
                let name = &self.tokens[b as usize];
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": name, "type_id": 0}},
                               {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": name, "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": name, "type_id": 1}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {name.as_str(): {"id": name, "ids": [b], "tokens": [name]}}})
            }
        };
        let unk = (0..self.tokens.len())
            .find(|&i| self.types[i] == UNKNOWN)
            .map(|i| json!(self.tokens[i]))
            .unwrap_or(Value::Null);
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        }))
    }

    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub(crate) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text` (no BOS: the caller adds it).
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut prev_whole = true;
        for f in self.fragments(text) {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_whole = true;
                }
                Fragment::Text(a, b) => {
                    let mut s = String::with_capacity(b - a + 3);
                    if self.add_space_prefix && prev_whole {
                        s.push(SPACE);
                    }
                    for c in text[a..b].chars() {
                        s.push(if c == ' ' { SPACE } else { c });
                    }
                    self.bpe(&s, &mut out)?;
                    prev_whole = false;
                }
            }
        }
        Ok(out)
    }

    /// Step 1: the text cut at the whole tokens it holds.
    fn fragments(&self, text: &str) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        let Some(finder) = &self.finder else {
            return frags;
        };
        let present: HashSet<usize> = finder
            .find_overlapping_iter(text)
            .map(|m| m.pattern().as_usize())
            .collect();
        let mut order: Vec<usize> = present.into_iter().collect();
        order.sort_unstable();
        for k in order {
            let id = self.whole[k];
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(a, b) = f else {
                    next.push(f);
                    continue;
                };
                let mut pos = a;
                while let Some(i) = text[pos..b].find(needle) {
                    if i > 0 {
                        next.push(Fragment::Text(pos, pos + i));
                    }
                    next.push(Fragment::Token(id));
                    pos += i + needle.len();
                }
                if pos < b {
                    next.push(Fragment::Text(pos, b));
                }
            }
            frags = next;
        }
        frags
    }

    /// Step 3 on one stretch of (escaped) text.
    fn bpe(&self, s: &str, out: &mut Vec<u32>) -> Result<(), String> {
        // Symbols: byte ranges of `s`, linked left to right; merged-away ones get len 0.
        let mut syms: Vec<Sym> = Vec::with_capacity(s.len());
        for (i, (at, c)) in s.char_indices().enumerate() {
            syms.push(Sym {
                at,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        for i in 1..syms.len() {
            self.push_pair(s, &syms, i - 1, i, &mut queue);
        }
        while let Some(p) = queue.pop() {
            let (l, r) = (syms[p.left], syms[p.right]);
            // Stale: one side was merged into something else since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != p.len {
                continue;
            }
            syms[p.left].len += r.len;
            syms[p.right].len = 0;
            syms[p.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(p.left);
            }
            if let Some(prev) = syms[p.left].prev {
                self.push_pair(s, &syms, prev, p.left, &mut queue);
            }
            if let Some(n) = syms[p.left].next {
                self.push_pair(s, &syms, p.left, n, &mut queue);
            }
        }
        let mut at = (!syms.is_empty()).then_some(0);
        while let Some(i) = at {
            let sym = syms[i];
            let piece = &s[sym.at..sym.at + sym.len];
            // Every merge made a vocabulary piece, so only a single character can be missing
            // from the vocabulary: it is spelled in bytes.
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_token[b as usize].ok_or_else(|| {
                            format!("`{piece}` is in no token and the vocabulary has no byte token <0x{b:02X}>")
                        })?);
                    }
                }
            }
            at = sym.next;
        }
        Ok(())
    }

    fn push_pair(
        &self,
        s: &str,
        syms: &[Sym],
        left: usize,
        right: usize,
        q: &mut BinaryHeap<Pair>,
    ) {
        let (l, r) = (syms[left], syms[right]);
        let text = &s[l.at..r.at + r.len];
        if let Some(&id) = self.ids.get(text) {
            q.push(Pair {
                score: self.scores[id as usize],
                left,
                right,
                len: text.len(),
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sym {
    at: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the queue pops the highest score, then the leftmost.
#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Pair {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Pair {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tiny vocabulary: bytes, a few pieces with scores, a user-defined and a control token.
    fn tiny(add_space_prefix: bool) -> Spm {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<bos>".into(), "\n\n".into()];
        let mut types = vec![UNKNOWN, CONTROL, USER_DEFINED];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
            scores.push(0.0);
        }
        for (t, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("c", -2.0),
            ("ab", -5.0),
            ("bc", -3.0),
            ("abc", -4.0),
            ("▁a", -6.0),
            ("▁abc", -7.0),
        ] {
            tokens.push(t.into());
            types.push(NORMAL);
            scores.push(s);
        }
        Spm::new(tokens, scores, &types, add_space_prefix).unwrap()
    }

    fn pieces(spm: &Spm, text: &str) -> Vec<String> {
        spm.encode(text)
            .unwrap()
            .iter()
            .map(|&i| spm.id_to_token(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn merges_follow_the_scores_not_the_order() {
        let spm = tiny(false);
        // "bc" (-3) beats "ab" (-5); then "a"+"bc" makes "abc" (-4).
        assert_eq!(pieces(&spm, "abc"), ["abc"]);
        // "ab" alone: the only pair.
        assert_eq!(pieces(&spm, "ab"), ["ab"]);
        // "▁a" (-6) is a piece, but "bc" (-3), then "abc" (-4), then "▁abc" (-7) go first.
        assert_eq!(pieces(&spm, " abc"), ["▁abc"]);
    }

    /// A vocabulary written as tokenizer.json and read back for GGUF (convert.rs's
    /// `SpmVocab`, Hugging Face Gemma → GGUF): the same pieces and types (the unknown piece
    /// comes back a control one: tokenizer.json has no such type), BOS and the space prefix
    /// as they were, and scores that make the same merges.
    #[test]
    fn a_tokenizer_json_written_from_a_vocabulary_reads_back_as_it() {
        use crate::formats::convert::SpmVocab;
        for prefix in [false, true] {
            let spm = tiny(prefix);
            let json = spm.hf_json(Some(1)).unwrap();
            let v =
                SpmVocab::from_tokenizer_json(&json, &serde_json::Value::Null, spm.tokens.len())
                    .unwrap();
            assert_eq!(v.tokens, spm.tokens);
            let types: Vec<i64> = v.types.iter().map(|&t| t as i64).collect();
            let want: Vec<i64> = spm
                .types
                .iter()
                .map(|&t| if t == UNKNOWN { CONTROL } else { t })
                .collect();
            assert_eq!(types, want);
            assert_eq!(
                (v.add_bos, v.add_space_prefix, v.unk),
                (true, prefix, Some(0))
            );
            let back = Spm::new(v.tokens, v.scores, &types, v.add_space_prefix).unwrap();
            for text in [
                "abc",
                "ab",
                " abc",
                "aé",
                "ab\n\nab",
                "<bos>c",
                "cab ba abcabc bca",
                "",
            ] {
                assert_eq!(back.encode(text), spm.encode(text), "{text:?}");
            }
        }
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let spm = tiny(false);
        assert_eq!(pieces(&spm, "aé"), ["a", "<0xC3>", "<0xA9>"]);
    }

    #[test]
    fn whole_tokens_are_cut_out_first_and_space_prefix_follows_the_file() {
        let spm = tiny(true);
        assert_eq!(pieces(&spm, "ab\n\nab"), ["▁", "ab", "\n\n", "▁", "ab"]);
        assert_eq!(pieces(&spm, "<bos>c"), ["<bos>", "▁", "c"]);
        let spm = tiny(false);
        assert_eq!(pieces(&spm, "ab\n\nab"), ["ab", "\n\n", "ab"]);
        assert_eq!(pieces(&spm, ""), Vec::<String>::new());
    }
}
