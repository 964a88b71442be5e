//! Tokenizers: from a Hugging Face `tokenizer.json`, or built from GGUF metadata (gpt2-style
//! byte-level BPE with llama.cpp's pre-tokenizer regexes, `llama-vocab.cpp`; or a
//! SentencePiece vocabulary, `spm.rs`). The first two become a `tokenizers::Tokenizer`, the
//! third lever's own [`Spm`]; each comes with a table of each token's raw bytes, which is what
//! the streaming detokenizer and `decode` use (as llama.cpp's `token_to_piece` does).

use std::collections::HashSet;
use std::path::Path;

use tokenizers::ModelWrapper;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::spm::{self, Spm};

/// GPT-2's pre-tokenizer regex (the one ByteLevel applies with `use_regex`).
pub(crate) const GPT2_RE: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The llama.cpp pre-tokenizer name of a sequence of split regexes (before the byte-level
/// step), as `from_gguf` builds them: what a tokenizer.json lever wrote maps back to.
pub(crate) fn pre_name_of_regexes(regexes: &[&str]) -> Option<&'static str> {
    match regexes {
        [GPT2_RE] => Some("gpt-2"),
        [r"\p{N}", GPT2_RE] => Some("smollm"),
        [LLAMA3_RE] => Some("llama3"),
        [QWEN2_RE] => Some("qwen2"),
        _ => None,
    }
}

/// Tokens that end a turn or a document, besides the declared EOS (llama.cpp's EOG list).
const EOG_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    // FIM repo/file separators end a generation in llama.cpp too (`llama-vocab.cpp`).
    "<reponame>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|fim_pad|>",
];

/// What turns text into ids.
#[derive(Debug, Clone)]
enum Backend {
    Hf(Box<HfTokenizer>),
    Spm(Box<Spm>),
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Backend,
    bytes: Vec<Vec<u8>>,
    special: HashSet<u32>,
    eog: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// GGUF: we prepend BOS ourselves when the model asks for it; tokenizer.json: its
    /// post-processor does.
    add_bos: bool,
    bos_by_post_processor: bool,
}

impl Tokenizer {
    /// Build from GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path().to_path_buf();
        let err = |problem: String| Error::Tokenizer {
            path: path.clone(),
            problem,
        };
        let model = g.string("tokenizer.ggml.model")?;
        if model == "llama" {
            return Self::from_gguf_spm(g);
        }
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` from GGUF metadata is not supported (lever reads `gpt2` byte-level BPE and `llama` SentencePiece); load the Hugging Face folder with its tokenizer.json instead"
            )));
        }
        let tokens = g.string_array("tokenizer.ggml.tokens")?;
        if g.get("tokenizer.ggml.merges").is_none() {
            return Err(err(
                "metadata has tokens but no `tokenizer.ggml.merges`: cannot build a BPE tokenizer"
                    .into(),
            ));
        }
        let merges = g
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {i} `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("building BPE: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);

        let pre = g
            .opt_string("tokenizer.ggml.pre")
            .unwrap_or_else(|| "default".into());
        let regexes: &[&str] = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" => &[GPT2_RE],
            "smollm" | "starcoder" | "refact" => &[r"\p{N}", GPT2_RE],
            "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => &[LLAMA3_RE],
            "qwen2" | "deepseek-r1-qwen" => &[QWEN2_RE],
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported (lever knows gpt2, smollm, starcoder, refact, llama3, qwen2)"
                )));
            }
        };
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));

        // Control (3) and user-defined (4) tokens are matched whole in the text, as llama.cpp
        // does with parse_special.
        let types = g.int_array("tokenizer.ggml.token_type").unwrap_or_default();
        let mut special = HashSet::new();
        let mut added = Vec::new();
        for (id, ty) in types.iter().enumerate() {
            if *ty == 3 || *ty == 4 {
                special.insert(id as u32);
                added.push(AddedToken::from(tokens[id].clone(), true));
            }
        }
        inner
            .add_special_tokens(added)
            .map_err(|e| err(format!("adding special tokens: {e}")))?;

        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| {
                if special.contains(&(id as u32)) {
                    t.as_bytes().to_vec()
                } else {
                    byte_level_decode(t)
                }
            })
            .collect();
        let id = |k: &str| g.opt_usize(k).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut eog: Vec<u32> = eos.into_iter().collect();
        eog.extend(id("tokenizer.ggml.eot_token_id"));
        let mut me = Self {
            inner: Backend::Hf(Box::new(inner)),
            bytes,
            special,
            eog,
            bos,
            eos,
            add_bos: g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            bos_by_post_processor: false,
        };
        me.add_known_eog();
        Ok(me)
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`): tokens, scores, token
    /// types, and `add_space_prefix` as the file says (llama.cpp's defaults when it says
    /// nothing: a space prefix, and BOS added).
    fn from_gguf_spm(g: &GgufFile) -> Result<Self> {
        let path = g.path().to_path_buf();
        let tokens = g.string_array("tokenizer.ggml.tokens")?;
        let scores = match g.get("tokenizer.ggml.scores") {
            Some(_) => g.f32_array("tokenizer.ggml.scores")?,
            None => Vec::new(),
        };
        let types = g.int_array("tokenizer.ggml.token_type").unwrap_or_default();
        let add_space_prefix = g
            .opt_bool("tokenizer.ggml.add_space_prefix")
            .unwrap_or(true);
        let ty = |id: usize| types.get(id).copied().unwrap_or(spm::NORMAL);
        let special: HashSet<u32> = (0..tokens.len())
            .filter(|&i| ty(i) == spm::CONTROL)
            .map(|i| i as u32)
            .collect();
        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| match ty(id) {
                spm::BYTE => sentencepiece_decode(t),
                spm::NORMAL => t.replace(spm::SPACE, " ").into_bytes(),
                _ => t.as_bytes().to_vec(),
            })
            .collect();
        let inner = Spm::new(tokens, scores, &types, add_space_prefix).map_err(|problem| {
            Error::Tokenizer {
                path: path.clone(),
                problem,
            }
        })?;
        let id = |k: &str| g.opt_usize(k).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut eog: Vec<u32> = eos.into_iter().collect();
        eog.extend(id("tokenizer.ggml.eot_token_id"));
        let mut me = Self {
            inner: Backend::Spm(Box::new(inner)),
            bytes,
            special,
            eog,
            bos,
            eos,
            add_bos: g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(true),
            bos_by_post_processor: false,
        };
        me.add_known_eog();
        Ok(me)
    }

    /// Load a Hugging Face `tokenizer.json`; bos/eos names come from tokenizer_config.json.
    pub fn from_file(path: &Path, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let inner = HfTokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        // A word-level vocabulary (lever's character tokenizers) holds its tokens as written.
        let literal = matches!(inner.get_model(), ModelWrapper::WordLevel(_));
        let n = inner.get_vocab_size(true);
        let mut special = HashSet::new();
        // Built once: `get_added_tokens_decoder` makes a new map at every call (Gemma's
        // vocabulary has ~6,400 added tokens and 262k ids).
        let added = inner.get_added_tokens_decoder();
        for (id, tok) in &added {
            if tok.special {
                special.insert(*id);
            }
        }
        let bytes = (0..n as u32)
            .map(|id| {
                let t = inner.id_to_token(id).unwrap_or_default();
                if literal || special.contains(&id) || added.contains_key(&id) {
                    t.into_bytes()
                } else if byte_level {
                    byte_level_decode(&t)
                } else {
                    sentencepiece_decode(&t)
                }
            })
            .collect();
        let bos = bos.and_then(|b| inner.token_to_id(b));
        let eos = eos.and_then(|e| inner.token_to_id(e));
        let probe = inner.encode("a", true).map(|e| e.get_ids().to_vec());
        let bos_by_post_processor =
            matches!((&probe, bos), (Ok(ids), Some(b)) if ids.first() == Some(&b));
        let mut me = Self {
            inner: Backend::Hf(Box::new(inner)),
            bytes,
            special,
            eog: eos.into_iter().collect(),
            bos,
            eos,
            add_bos: bos_by_post_processor,
            bos_by_post_processor,
        };
        me.add_known_eog();
        Ok(me)
    }

    fn add_known_eog(&mut self) {
        for t in EOG_TEXTS {
            if let Some(id) = self.token_to_id(t)
                && self.special.contains(&id)
                && !self.eog.contains(&id)
            {
                self.eog.push(id);
            }
        }
    }

    /// Token ids of `text`. Special tokens written in the text become their single ids.
    /// `add_special` adds BOS when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Backend::Hf(hf) => hf
                .encode(text, add_special && self.bos_by_post_processor)
                .map_err(|e| Error::Tokenizer {
                    path: "(tokenizer)".into(),
                    problem: e.to_string(),
                })?
                .get_ids()
                .to_vec(),
            Backend::Spm(spm) => spm.encode(text).map_err(|problem| Error::Tokenizer {
                path: "(tokenizer)".into(),
                problem,
            })?,
        };
        if add_special
            && self.add_bos
            && !self.bos_by_post_processor
            && let Some(b) = self.bos
        {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    /// The raw bytes of one token (may be part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    /// Text of a sequence of ids (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (what `lever export` writes beside
    /// the weights). A tokenizer built from GGUF metadata gets the byte-level decoder that
    /// tokenizer.json files of such models carry.
    pub fn to_hf_json(&self) -> Result<String> {
        let err = |problem: String| Error::Tokenizer {
            path: "tokenizer.json".into(),
            problem,
        };
        let inner = match &self.inner {
            Backend::Hf(inner) => inner,
            Backend::Spm(spm) => {
                // A SentencePiece vocabulary from GGUF: written, then read back by the
                // `tokenizers` crate, so that a file it would refuse is never written.
                let bos = self.bos.filter(|_| self.add_bos);
                let v = spm.hf_json(bos).map_err(err)?;
                let text = serde_json::to_string_pretty(&v)
                    .map_err(|e| err(format!("serializing: {e}")))?;
                text.parse::<HfTokenizer>()
                    .map_err(|e| err(format!("the written tokenizer.json does not load: {e}")))?;
                return Ok(text);
            }
        };
        let mut inner = inner.clone();
        if inner.get_decoder().is_none() {
            inner.with_decoder(Some(ByteLevel::new(false, false, false)));
        }
        inner.to_string(true).map_err(|e| Error::Tokenizer {
            path: "tokenizer.json".into(),
            problem: format!("serializing: {e}"),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(hf) => hf.token_to_id(token),
            Backend::Spm(spm) => spm.token_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Backend::Hf(hf) => hf.id_to_token(id),
            Backend::Spm(spm) => spm.id_to_token(id).map(str::to_string),
        }
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// End-of-generation tokens: EOS, EOT and the known end-of-turn markers.
    pub fn eog(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn token_text(&self, id: u32) -> String {
        self.id_to_token(id)
            .map(|t| {
                if self.is_special(id) {
                    t
                } else {
                    String::from_utf8_lossy(self.token_bytes(id)).into_owned()
                }
            })
            .unwrap_or_default()
    }
}

/// GPT-2's reversible byte <-> printable-char map (`bytes_to_unicode` in openai/gpt-2
/// `encoder.py`): printable Latin-1 bytes map to themselves, the rest to U+0100 upwards.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    table
}

/// The 256 symbols byte-level BPE vocabularies use for the bytes 0..=255.
pub fn byte_level_symbols() -> [char; 256] {
    byte_to_char_table()
}

fn byte_level_decode(token: &str) -> Vec<u8> {
    use std::sync::OnceLock;
    static INV: OnceLock<std::collections::HashMap<char, u8>> = OnceLock::new();
    let inv = INV.get_or_init(|| {
        byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect()
    });
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match inv.get(&c) {
            Some(b) => out.push(*b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// SentencePiece-style pieces: `▁` is a space, `<0xAB>` a raw byte.
fn sentencepiece_decode(token: &str) -> Vec<u8> {
    if token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && let Ok(b) = u8::from_str_radix(&token[3..5], 16)
    {
        return vec![b];
    }
    token.replace('\u{2581}', " ").into_bytes()
}
