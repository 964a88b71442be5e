//! Constrained decoding: output that fits a JSON Schema, a regular expression, a Lark grammar
//! or one of a set of strings, by construction. Before each token is drawn, every token the
//! constraint cannot continue with gets a logit of −∞, so any sampler (greedy, top-k/p, min-p,
//! temperature, repeat penalty) only ever sees allowed tokens; the end-of-generation tokens are
//! allowed exactly when the output so far is complete.
//!
//! The engine is the `llguidance` crate (the one llama.cpp, vLLM and SGLang use: an Earley
//! parser over a lazily built lexer automaton, with a token trie): lever does not write its own
//! (issue 23). The trie is built from lever's own token bytes, so byte-level BPE and
//! SentencePiece vocabularies alike are matched byte for byte; special tokens are marked (their
//! bytes never match text).

use std::sync::Arc;
use std::time::Instant;

use lever_model::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::{Error, Result};

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON document valid against this JSON Schema (draft 2020-12 keywords llguidance
    /// supports; an unsupported one is an error naming it).
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// Text the whole of which matches this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's Lark dialect; rule `start`).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Constraint {
    /// The grammar llguidance compiles. JSON is written compactly with Python's separators
    /// (`", "`, `": "`) and no other whitespace unless the schema's `x-guidance` says
    /// otherwise: free whitespace lets a small model pad forever.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Constraint::JsonSchema(schema) => {
                // A schema that is not one (a misspelt type, a bound that is not a number)
                // is named by its path inside the schema before llguidance sees it.
                if let Err(e) = jsonschema::meta::validate(schema) {
                    let path = e.instance_path.to_string();
                    return Err(Error::Constraint(format!(
                        "JSON schema, at {}: {e}",
                        if path.is_empty() { "the top" } else { &path }
                    )));
                }
                TopLevelGrammar::from_json_schema(with_compact_json(schema.clone()))
            }
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(with_compact_json(json!({"type": "object"})))
            }
            Constraint::Regex(rx) => {
                // Checked here so that a bad expression is one line naming it, not a
                // grammar compiler's message.
                regex_syntax::Parser::new().parse(rx).map_err(|e| {
                    Error::Constraint(format!(
                        "regular expression {rx:?}: {}",
                        e.to_string().lines().last().unwrap_or_default().trim()
                    ))
                })?;
                TopLevelGrammar::from_regex(rx)
            }
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(Error::Constraint("--choice: no choices given".into()));
                }
                let alts: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}\n", alts.join(" | ")))
            }
        })
    }

    /// How the constraint is named in messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::JsonObject => "JSON object",
            Constraint::Regex(_) => "regular expression",
            Constraint::Lark(_) => "grammar",
            Constraint::Choice(_) => "choice",
        }
    }
}

fn with_compact_json(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// The compiled vocabulary of one model: built once (a trie of every token's bytes), shared
/// by every constrained generation on that model.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// End-of-generation tokens, all allowed where the constraint lets the output end.
    eog: Vec<u32>,
    vocab: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Grammars {
    /// The token trie of `tok`, for logits of `vocab` entries (a model may have more rows than
    /// its tokenizer has tokens: those are never allowed).
    pub fn new(tok: &Tokenizer, vocab: usize) -> Result<Self> {
        let vocab = vocab.max(tok.vocab_size());
        let eog: Vec<u32> = tok.eog().to_vec();
        let eos = tok.eos().or_else(|| eog.first().copied()).ok_or_else(|| {
            Error::Constraint(
                "the tokenizer has no end-of-sequence token, so a constrained answer could not end"
                    .into(),
            )
        })?;
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if id as usize >= tok.vocab_size() {
                    Vec::new()
                } else if tok.is_special(id) {
                    // toktrie's marker: a special token's bytes never match text.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tok.token_text(id).as_bytes());
                    w
                } else {
                    tok.token_bytes(id).to_vec()
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: vocab as u32,
            tok_eos: eos,
            tok_bos: tok.bos(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Constraint(format!("building the token trie: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            eog: if eog.contains(&eos) {
                eog
            } else {
                [vec![eos], eog].concat()
            },
            vocab,
        })
    }

    /// A fresh guide for one generation. An invalid or unsupported constraint is an error
    /// naming what is wrong (llguidance's message: the keyword, the path in the schema).
    pub fn guide(&self, c: &Constraint) -> Result<Guide> {
        let grammar = c.grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| {
            Error::Constraint(format!("{}: {}", c.kind(), one_line(&e.to_string())))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Constraint(format!("{}: {}", c.kind(), one_line(&e))));
        }
        Ok(Guide {
            matcher,
            eog: self.eog.clone(),
            mask_ms: 0.0,
            masks: 0,
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The state of one constrained generation.
pub struct Guide {
    matcher: Matcher,
    eog: Vec<u32>,
    mask_ms: f64,
    masks: usize,
}

impl Guide {
    /// Set every token the constraint does not allow next to −∞. The end-of-generation tokens
    /// are allowed exactly when the output so far is complete. An error when no token is
    /// allowed (a grammar that matches nothing).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let t0 = Instant::now();
        let m: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Constraint(one_line(&e.to_string())))?;
        let end = self.eog.iter().any(|&t| m.is_allowed(t));
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            let id = id as u32;
            if m.is_allowed(id) || (end && self.eog.contains(&id)) {
                any |= l.is_finite();
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        self.mask_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.masks += 1;
        if !any {
            return Err(Error::Constraint(
                "the constraint allows no token here (a grammar that matches nothing?)".into(),
            ));
        }
        Ok(())
    }

    /// Advance past the token drawn (an end-of-generation token ends it).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        if self.eog.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Constraint(one_line(&e.to_string())))
    }

    /// Whether the output so far is complete: a document the constraint accepts.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Time spent computing masks, and how many.
    pub fn mask_stats(&self) -> (f64, usize) {
        (self.mask_ms, self.masks)
    }
}
