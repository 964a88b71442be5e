//! The sentence encoder: a model folder's tokenizer, BERT and sentence-transformers pooling,
//! run over texts in batches sorted by length.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Tensor;
use serde::Deserialize;
use tokenizers::Tokenizer as HfTokenizer;

use super::config::{BertHfConfig, EncoderConfig, Pooling};
use super::model::{BertModel, Kernels, pool};
use crate::error::{Error, Result, io_err};

/// Vectors for a list of texts, in input order, and how many texts were cut to
/// `max_tokens()` (never silently: the caller reports it).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub truncated: usize,
}

/// A text's token ids, with special tokens, cut to the encoder's maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

/// A sentence-embedding model loaded from a (sentence-transformers) Hugging Face folder.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub model: BertModel,
    tokenizer: HfTokenizer,
    /// Special tokens the tokenizer puts before and after a text ([CLS] … [SEP]: 1, 1).
    specials: (usize, usize),
    dir: PathBuf,
    batch_size: usize,
    id: OnceLock<String>,
}

/// The default number of texts per forward pass (sentence-transformers' default too).
pub(crate) const DEFAULT_BATCH_SIZE: usize = 32;

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct StPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct StConfig {
    max_seq_length: Option<usize>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: "(json)".into(),
        problem: e.to_string(),
    })
}

/// Pooling and normalization as the folder's sentence-transformers files say. A folder
/// without modules.json is a plain transformers model: mean pooling, no normalization, as
/// sentence-transformers builds it.
fn read_pipeline(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, false));
    }
    let modules: Vec<StModule> = read_json(&modules_path)?;
    let mut pooling = None;
    let mut normalize = false;
    for m in &modules {
        let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let path = dir.join(&m.path).join("config.json");
                let p: StPooling = read_json(&path)?;
                let bad = |mode: &str| Error::Config {
                    path: path.clone(),
                    field: mode.into(),
                    problem: "lever pools by mean or cls token only".into(),
                };
                let other = [
                    (p.pooling_mode_max_tokens, "pooling_mode_max_tokens"),
                    (
                        p.pooling_mode_mean_sqrt_len_tokens,
                        "pooling_mode_mean_sqrt_len_tokens",
                    ),
                    (
                        p.pooling_mode_weightedmean_tokens,
                        "pooling_mode_weightedmean_tokens",
                    ),
                    (p.pooling_mode_lasttoken, "pooling_mode_lasttoken"),
                ];
                if let Some((_, mode)) = other.iter().find(|(on, _)| *on) {
                    return Err(bad(mode));
                }
                pooling = Some(
                    match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token) {
                        (true, false) => Pooling::Mean,
                        (false, true) => Pooling::Cls,
                        _ => {
                            return Err(Error::Config {
                                path: path.clone(),
                                field: "pooling_mode_mean_tokens".into(),
                                problem: "exactly one of mean and cls pooling must be on".into(),
                            });
                        }
                    },
                );
            }
            other => {
                return Err(Error::Config {
                    path: modules_path.clone(),
                    field: "type".into(),
                    problem: format!(
                        "module `{other}` is not supported (lever runs Transformer, Pooling, Normalize)"
                    ),
                });
            }
        }
    }
    let pooling = pooling.ok_or_else(|| Error::Config {
        path: modules_path.clone(),
        field: "type".into(),
        problem: "no Pooling module".into(),
    })?;
    Ok((pooling, normalize))
}

impl Encoder {
    /// Load a model folder: config.json, model.safetensors, tokenizer.json, and the
    /// sentence-transformers files (modules.json, 1_Pooling/config.json,
    /// sentence_bert_config.json) when present.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::ModelRef {
                reference: dir.display().to_string(),
                problem: "not a folder".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let hf: BertHfConfig = read_json(&cfg_path)?;
        let (pooling, normalize) = read_pipeline(dir)?;
        let st_path = dir.join("sentence_bert_config.json");
        let max_seq_len = if st_path.is_file() {
            read_json::<StConfig>(&st_path)?.max_seq_length
        } else {
            None
        }
        .unwrap_or(hf.max_position_embeddings);
        let cfg = EncoderConfig::resolve(&hf, &cfg_path, pooling, normalize, max_seq_len)?;
        let model = BertModel::load(&dir.join("model.safetensors"), &cfg)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: "missing".into(),
            });
        }
        let mut tokenizer = HfTokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            problem: e.to_string(),
        })?;
        // tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2's: fixed
        // 128); lever pads per batch and truncates to max_seq_len itself, counting it.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                problem: e.to_string(),
            })?;
        let probe = tokenizer
            .encode_fast("a", true)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                problem: e.to_string(),
            })?;
        let mask = probe.get_special_tokens_mask();
        let front = mask.iter().take_while(|&&s| s == 1).count();
        let back = mask.iter().rev().take_while(|&&s| s == 1).count();
        if front + back >= cfg.max_seq_len {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: format!(
                    "{front}+{back} special tokens leave no room in {} tokens",
                    cfg.max_seq_len
                ),
            });
        }
        if let Some(bad) = probe
            .get_ids()
            .iter()
            .find(|&&id| id as usize >= cfg.vocab_size)
        {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    cfg.vocab_size
                ),
            });
        }
        Ok(Self {
            model,
            tokenizer,
            specials: (front, back),
            dir: dir.to_path_buf(),
            batch_size: DEFAULT_BATCH_SIZE,
            id: OnceLock::new(),
        })
    }

    /// Texts per forward pass (at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.model.cfg
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn dim(&self) -> usize {
        self.model.cfg.hidden_size
    }

    /// Tokens per text, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.model.cfg.max_seq_len
    }

    /// Names the model and every setting that changes its vectors:
    /// `<folder>:<sha256 of model.safetensors, 16 hex>:<pooling>[+norm]:<max tokens>`, e.g.
    /// `all-minilm-l6-v2:53aa51172d142c89:mean+norm:256`. Hashes the weights on first call.
    pub fn id(&self) -> Result<String> {
        if let Some(id) = self.id.get() {
            return Ok(id.clone());
        }
        let weights = self.dir.join("model.safetensors");
        let sum = crate::registry::sha256_file(&weights).map_err(io_err(&weights))?;
        let name = self
            .dir
            .file_name()
            .map_or_else(|| "encoder".into(), |n| n.to_string_lossy().into_owned());
        let cfg = &self.model.cfg;
        let id = format!(
            "{name}:{}:{}{}:{}",
            &sum[..16],
            cfg.pooling.name(),
            if cfg.normalize { "+norm" } else { "" },
            cfg.max_seq_len
        );
        Ok(self.id.get_or_init(|| id).clone())
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            problem: e.to_string(),
        }
    }

    /// Token ids with special tokens, cut to `max_tokens()` as transformers does (the text's
    /// tokens are cut; the closing special tokens stay).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| self.tok_err(e))?;
        let max = self.max_tokens();
        let (_, back) = self.specials;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let ids = e.get_ids();
                if ids.len() <= max {
                    return Tokens {
                        ids: ids.to_vec(),
                        truncated: false,
                    };
                }
                let mut cut = ids[..max - back].to_vec();
                cut.extend_from_slice(&ids[ids.len() - back..]);
                Tokens {
                    ids: cut,
                    truncated: true,
                }
            })
            .collect())
    }

    /// Byte spans (start, end) in `text` of its WordPiece tokens, without special tokens and
    /// without truncation: what a chunker cuts token windows by.
    pub fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let e = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.tok_err(e))?;
        Ok(e.get_offsets().to_vec())
    }

    /// Embed texts: tokenized, sorted by length, run `batch_size()` at a time (each batch
    /// padded to its longest text), pooled, normalized as the model says.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        let tokens = self.tokenize(texts)?;
        let truncated = tokens.iter().filter(|t| t.truncated).count();
        let ids: Vec<Vec<u32>> = tokens.into_iter().map(|t| t.ids).collect();
        Ok(Embeddings {
            vectors: self.embed_ids(&ids)?,
            truncated,
        })
    }

    /// Embed token-id sequences (each within `max_tokens()`), in input order.
    pub fn embed_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        embed_sorted(&self.model, seqs, self.batch_size)
    }
}

impl Encoder {
    /// Training's forward: the texts' vectors as one tensor (B, C), through the elementary
    /// (differentiable) kernels, so that a loss on them reaches the variables of
    /// [`BertModel::make_trainable`]. Equal to [`Encoder::embed`]'s vectors up to rounding.
    /// Also returns how many texts were cut to `max_tokens()`.
    pub fn embed_tensor(&self, texts: &[&str]) -> Result<(Tensor, usize)> {
        let tokens = self.tokenize(texts)?;
        let truncated = tokens.iter().filter(|t| t.truncated).count();
        let seqs: Vec<&[u32]> = tokens.iter().map(|t| t.ids.as_slice()).collect();
        Ok((
            pooled_batch(&self.model, &seqs, Some(Kernels::Elementary))?,
            truncated,
        ))
    }

    /// Write this encoder, with its current weights, as a sentence-transformers folder at
    /// `out`: the folder it was loaded from, minus its weights, plus a model.safetensors
    /// holding every tensor of the original file (same key names) with this encoder's values
    /// in place of its own. Only the files a sentence-transformers or transformers load reads
    /// are copied (config, tokenizer, the modules' folders), never weights in other formats
    /// (they would be stale). `extra` files (name, contents) are added. Written to a
    /// temporary folder, fsynced, then renamed into place.
    pub fn write_folder(&self, out: &Path, extra: &[(&str, String)]) -> Result<()> {
        let base = &self.dir;
        let weights = base.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
            .map_err(|e| Error::Tensor {
                path: weights.clone(),
                tensor: "(file)".into(),
                problem: e.to_string(),
            })?;
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        for (key, t) in self.model.named_tensors() {
            let full = format!("{prefix}{key}");
            if !tensors.contains_key(&full) {
                return Err(Error::Tensor {
                    path: weights.clone(),
                    tensor: full,
                    problem: "missing".into(),
                });
            }
            tensors.insert(full, t.detach().contiguous()?);
        }
        // Files at the top, then the modules' folders (1_Pooling, ...) as modules.json names them.
        let mut files: Vec<std::path::PathBuf> = [
            "config.json",
            "config_sentence_transformers.json",
            "modules.json",
            "sentence_bert_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.txt",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .collect();
        let modules_path = base.join("modules.json");
        if modules_path.is_file() {
            let modules: Vec<StModule> = read_json(&modules_path)?;
            for m in modules.iter().filter(|m| !m.path.is_empty()) {
                let dir = base.join(&m.path);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue; // a module without files (Normalize)
                };
                for e in entries {
                    let e = e.map_err(io_err(&dir))?;
                    if e.path().is_file() {
                        files.push(std::path::Path::new(&m.path).join(e.file_name()));
                    }
                }
            }
        }
        crate::fsutil::write_atomic(out, |tmp| -> Result<()> {
            std::fs::create_dir_all(tmp).map_err(io_err(out))?;
            for f in &files {
                let from = base.join(f);
                if !from.is_file() {
                    continue;
                }
                let to = tmp.join(f);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err(out.join(f)))?;
                }
                std::fs::copy(&from, &to).map_err(io_err(&from))?;
            }
            for (name, text) in extra {
                std::fs::write(tmp.join(name), text).map_err(io_err(out.join(name)))?;
            }
            candle_core::safetensors::save(&tensors, tmp.join("model.safetensors")).map_err(
                |e| Error::Tensor {
                    path: out.join("model.safetensors"),
                    tensor: "(file)".into(),
                    problem: e.to_string(),
                },
            )?;
            Ok(())
        })
    }
}

/// Longest first (as sentence-transformers orders them), so each batch pads little.
fn embed_sorted(model: &BertModel, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![Vec::new(); seqs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
        let vectors = embed_batch(model, &batch, None)?;
        for (&i, v) in chunk.iter().zip(vectors) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// One padded batch through the model and the pooling. `kernels`: None picks automatically.
pub fn embed_batch(
    model: &BertModel,
    seqs: &[&[u32]],
    kernels: Option<Kernels>,
) -> Result<Vec<Vec<f32>>> {
    if seqs.iter().all(|s| s.is_empty()) {
        return Ok(vec![vec![0.0; model.cfg.hidden_size]; seqs.len()]);
    }
    Ok(pooled_batch(model, seqs, kernels)?.to_vec2()?)
}

/// One padded batch through the model and the pooling, as a tensor (B, C): with the
/// elementary kernels and trainable weights ([`BertModel::make_trainable`]) it carries the
/// graph that training differentiates. `kernels`: None picks automatically.
pub fn pooled_batch(
    model: &BertModel,
    seqs: &[&[u32]],
    kernels: Option<Kernels>,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let t = lens.iter().copied().max().unwrap_or(0);
    if t == 0 {
        return Err(Error::Candle(candle_core::Error::Msg(
            "no tokens to embed".into(),
        )));
    }
    if t > cfg.max_positions {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "a sequence of {t} tokens exceeds the encoder's {} positions",
            cfg.max_positions
        ))));
    }
    if let Some(bad) = seqs
        .iter()
        .flat_map(|s| s.iter())
        .find(|&&id| id as usize >= cfg.vocab_size)
    {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "token id {bad} is outside the vocabulary of {}",
            cfg.vocab_size
        ))));
    }
    let dev = model.word_embeddings.device();
    // Padding id 0 ([PAD] in BERT vocabularies); masked out, so any id would do.
    let ids: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
        .collect();
    let ids = Tensor::from_vec(ids, (seqs.len(), t), dev)?; // (B, T)
    let k = kernels.unwrap_or_else(|| Kernels::auto(&model.word_embeddings));
    let hidden = model.forward(&ids, &lens, k)?; // (B, T, C)
    pool(&hidden, &lens, cfg.pooling, cfg.normalize) // (B, C)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::encoder::MatMul;
    use crate::rng::SplitMix64;
    use crate::testing::max_abs_diff;

    /// f32 products, whatever the CPU or LEVER_ENCODER_GEMM.
    fn tiny() -> BertModel {
        let mut m = BertModel::random(&EncoderConfig::tiny(50), 7).unwrap();
        m.set_matmul(MatMul::F32).unwrap();
        m
    }

    fn seq(seed: u64, n: usize) -> Vec<u32> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| (rng.next_u64() % 50) as u32).collect()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        max_abs_diff(&a.concat(), &b.concat())
    }

    /// Padding changes nothing: a text alone equals the same text in a batch with longer
    /// ones (both kernel sets).
    #[test]
    fn padding_does_not_change_an_embedding() {
        let m = tiny();
        let short = seq(1, 5);
        let long = seq(2, 23);
        for k in [Kernels::Elementary, Kernels::Fused] {
            let alone = embed_batch(&m, &[&short], Some(k)).unwrap();
            let batched = embed_batch(&m, &[&long, &short, &seq(3, 11)], Some(k)).unwrap();
            let d = max_diff(&alone, &batched[1..2]);
            assert!(d < 1e-5, "{k:?}: padding changed the embedding by {d}");
            // And the padded text is not just equal to something trivial.
            assert!(max_diff(&alone, &batched[0..1]) > 1e-3);
        }
    }

    #[test]
    fn fused_and_elementary_kernels_agree() {
        let m = tiny();
        let seqs = [seq(4, 17), seq(5, 3), seq(6, 9)];
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let a = embed_batch(&m, &refs, Some(Kernels::Elementary)).unwrap();
        let b = embed_batch(&m, &refs, Some(Kernels::Fused)).unwrap();
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "fused vs elementary: {d}");
    }

    /// Sorting by length for batching gives the vectors back in input order.
    #[test]
    fn sorted_batches_return_input_order() {
        let m = tiny();
        let seqs = vec![seq(7, 4), seq(8, 30), seq(9, 1), seq(10, 12), seq(11, 30)];
        let together = embed_sorted(&m, &seqs, 2).unwrap();
        for (s, v) in seqs.iter().zip(&together) {
            let alone = embed_batch(&m, &[s], None).unwrap();
            assert!(max_diff(&alone, std::slice::from_ref(v)) < 1e-5);
        }
    }

    #[test]
    fn unsupported_pooling_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.json"),
            r#"[{"path":"","type":"sentence_transformers.models.Transformer"},
                {"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"pooling_mode_max_tokens": true}"#,
        )
        .unwrap();
        let e = read_pipeline(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("1_Pooling/config.json") && e.contains("pooling_mode_max_tokens"),
            "{e}"
        );
    }
}
