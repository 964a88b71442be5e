//! A model reference (a `.gguf` file, a Hugging Face folder, or a registry name) resolved and
//! loaded into the decoder, its tokenizer and its chat template.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Deserialize;

use crate::chat::ChatTemplate;
use crate::config::{DecoderConfig, HfConfig};
use crate::decoder::Decoder;
use crate::error::{Error, Result, io_err};
use crate::formats::gguf::GgufFile;
use crate::formats::weights::{GgufWeights, SafetensorsWeights};
use crate::generation_config::GenerationConfig;
use crate::registry::{self, Progress};
use crate::tokenizer::Tokenizer;

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfFolder(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfFolder(p) => p,
        }
    }
}

/// Resolve a reference; registry names are provisioned on first use.
pub fn resolve(
    reference: &str,
    home: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ModelSource> {
    let p = Path::new(reference);
    if p.is_file() {
        return Ok(ModelSource::Gguf(p.to_path_buf()));
    }
    if p.is_dir() {
        if p.join("config.json").is_file() {
            return Ok(ModelSource::HfFolder(p.to_path_buf()));
        }
        return Err(Error::ModelRef {
            reference: reference.into(),
            problem: "folder has no config.json (not a Hugging Face model folder)".into(),
        });
    }
    if let Some(entry) = registry::find(reference) {
        let main = registry::provision(entry, home, progress)?;
        return Ok(if entry.main.is_empty() {
            ModelSource::HfFolder(main)
        } else {
            ModelSource::Gguf(main)
        });
    }
    let names: Vec<_> = registry::REGISTRY.iter().map(|e| e.name).collect();
    Err(Error::ModelRef {
        reference: reference.into(),
        problem: format!(
            "no such file or folder, and not a registry name ({})",
            names.join(", ")
        ),
    })
}

/// Facts about a loaded model, for `models list`, manifests and benchmarks.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Where it came from: the .gguf file, the Hugging Face folder, or for a model trained
    /// from scratch, its tokenizer.json.
    pub path: PathBuf,
    /// "gguf", "hf", or "pretrained" (trained from scratch by `lever pretrain`).
    pub format: &'static str,
    pub quantization: String,
    /// The sampling settings the model's authors publish (empty when unknown).
    pub generation: GenerationConfig,
    /// The LoRA adapter folder loaded on top of the weights, if any: part of what the model
    /// answers (eval's cache keys on it).
    pub adapter: Option<PathBuf>,
}

/// A runnable generator: decoder, tokenizer, chat template.
#[derive(Debug, Clone)]
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub info: ModelInfo,
}

impl Model {
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        match source {
            ModelSource::Gguf(p) => Self::load_gguf(p, device),
            ModelSource::HfFolder(p) => Self::load_hf(p, device),
        }
    }

    pub fn load_gguf(path: &Path, device: &Device) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let cfg = file.decoder_config()?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.vocab_size() != cfg.vocab_size {
            return Err(Error::Metadata {
                path: path.into(),
                key: "tokenizer.ggml.tokens".into(),
                problem: format!(
                    "{} tokens but the model has {}",
                    tokenizer.vocab_size(),
                    cfg.vocab_size
                ),
            });
        }
        let tok_str = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let chat_template = match file.opt_string("tokenizer.chat_template") {
            Some(src) => Some(
                ChatTemplate::new(&src, &tok_str(tokenizer.bos()), &tok_str(tokenizer.eos()))
                    .map_err(|e| in_model(path, e))?,
            ),
            None => None,
        };
        let quantization = file.quantization();
        let mut generation = GenerationConfig::from_gguf(&file);
        if generation.is_empty()
            && let Some(p) = registry::published_for_file(path)
        {
            generation = p.config();
        }
        let decoder = Decoder::load(
            &mut GgufWeights {
                file: &mut file,
                device: device.clone(),
            },
            &cfg,
        )?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            info: ModelInfo {
                path: path.into(),
                format: "gguf",
                quantization,
                generation,
                adapter: None,
            },
        })
    }

    pub fn load_hf(dir: &Path, device: &Device) -> Result<Self> {
        let (hf, cfg) = read_hf_config(dir)?;
        let tk_cfg = TokenizerConfig::read(dir)?;
        let tokenizer = Tokenizer::from_file(
            &dir.join("tokenizer.json"),
            tk_cfg.bos_token.as_ref().map(|t| t.content()),
            tk_cfg.eos_token.as_ref().map(|t| t.content()),
        )?;
        let chat_template = match tk_cfg.chat_template() {
            Some(src) => Some(
                ChatTemplate::new(
                    &src,
                    tk_cfg.bos_token.as_ref().map_or("", |t| t.content()),
                    tk_cfg.eos_token.as_ref().map_or("", |t| t.content()),
                )
                .map_err(|e| in_model(dir, e))?,
            ),
            None => None,
        };
        let files = safetensors_files(dir)?;
        let mut weights = SafetensorsWeights::open(&files, device)?;
        let decoder = Decoder::load(&mut weights, &cfg)?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            info: ModelInfo {
                path: dir.into(),
                format: "hf",
                generation: GenerationConfig::from_hf_folder(dir),
                adapter: None,
                quantization: hf
                    .torch_dtype
                    .clone()
                    .or_else(|| hf.dtype.clone())
                    .unwrap_or_else(|| "float32".into())
                    .to_uppercase(),
            },
        })
    }
}

/// Only a model's tokenizer, read without its weights or its architecture (`lever tokenize`
/// works on a GGUF whose architecture lever does not run yet).
pub fn load_tokenizer(source: &ModelSource) -> Result<Tokenizer> {
    match source {
        ModelSource::Gguf(path) => Tokenizer::from_gguf(&GgufFile::open(path)?),
        ModelSource::HfFolder(dir) => {
            let tk_cfg = TokenizerConfig::read(dir)?;
            Tokenizer::from_file(
                &dir.join("tokenizer.json"),
                tk_cfg.bos_token.as_ref().map(|t| t.content()),
                tk_cfg.eos_token.as_ref().map(|t| t.content()),
            )
        }
    }
}

/// A model's configuration and the size of its weights, read without loading them (the
/// GGUF header; a Hugging Face folder's config.json).
#[derive(Debug, Clone)]
pub struct Header {
    pub config: DecoderConfig,
    /// Bytes per weight as stored: a GGUF's blocks (Q4_1: 0.625), else the folder's dtype.
    pub bytes_per_weight: f64,
    /// Keys and values are cached in f16 (GGUF models, as llama.cpp), else f32.
    pub f16_kv: bool,
}

/// Read a model's [`Header`].
pub fn read_header(source: &ModelSource) -> Result<Header> {
    match source {
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let (mut bytes, mut elems) = (0f64, 0f64);
            for info in file.content().tensor_infos.values() {
                let n = info.shape.elem_count();
                bytes += (n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as f64;
                elems += n as f64;
            }
            let config = file.decoder_config()?;
            Ok(Header {
                f16_kv: config.numerics.f16_kv(),
                config,
                bytes_per_weight: if elems > 0.0 { bytes / elems } else { 4.0 },
            })
        }
        ModelSource::HfFolder(dir) => {
            let (hf, config) = read_hf_config(dir)?;
            let dtype = hf.torch_dtype.or(hf.dtype).unwrap_or_default();
            Ok(Header {
                config,
                bytes_per_weight: match dtype.as_str() {
                    "bfloat16" | "float16" => 2.0,
                    _ => 4.0,
                },
                f16_kv: false,
            })
        }
    }
}

/// A Hugging Face folder's config.json, parsed and resolved; errors name the field.
fn read_hf_config(dir: &Path) -> Result<(HfConfig, DecoderConfig)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: cfg_path.clone(),
        field: json_field(&e),
        problem: e.to_string(),
    })?;
    let cfg: DecoderConfig = hf.resolve().map_err(|(field, problem)| Error::Config {
        path: cfg_path.clone(),
        field,
        problem,
    })?;
    Ok((hf, cfg))
}

/// A template error carries no path; name the model it came from.
fn in_model(path: &Path, e: Error) -> Error {
    Error::ModelRef {
        reference: path.display().to_string(),
        problem: e.to_string(),
    }
}

fn json_field(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.split('`')
        .nth(1)
        .map_or_else(|| format!("line {}", e.line()), str::to_string)
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: index.clone(),
            field: "weight_map".into(),
            problem: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                field: "weight_map".into(),
                problem: "missing or not an object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::ModelRef {
        reference: dir.display().to_string(),
        problem: "no model.safetensors or model.safetensors.index.json (lever never loads pickle .bin files)".into(),
    })
}

/// The parts of `tokenizer_config.json` lever reads.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenName>,
    eos_token: Option<TokenName>,
    chat_template: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Added { content: String },
}

impl TokenName {
    fn content(&self) -> &str {
        match self {
            TokenName::Plain(s) | TokenName::Added { content: s } => s,
        }
    }
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path,
            field: json_field(&e),
            problem: e.to_string(),
        })
    }

    /// A string, or a list of `{name, template}` of which "default" is used.
    fn chat_template(&self) -> Option<String> {
        match self.chat_template.as_ref()? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        }
    }
}
