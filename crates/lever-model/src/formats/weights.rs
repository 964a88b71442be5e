//! Where decoder weights come from. The decoder asks for logical parameters (`Param`); each
//! source maps them to its checkpoint's key names, so a missing or mis-shaped tensor is an
//! error naming the file and the key (STYLE habit 4, candle `var_builder.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::qweight::QWeight;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::linear::{Linear, Weight};
use crate::rng::SplitMix64;

/// A logical decoder parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Embed,
    OutputNorm,
    Output,
    AttnNorm(usize),
    FfnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
    // Gemma 3's extra norms. Its pre-MLP norm is `PreFfnNorm`: the same GGUF name as
    // `FfnNorm`, but transformers calls it `pre_feedforward_layernorm` (its
    // `post_attention_layernorm` is the norm of the attention's output, `PostAttnNorm`).
    PreFfnNorm(usize),
    PostAttnNorm(usize),
    PostFfnNorm(usize),
    QNorm(usize),
    KNorm(usize),
}

impl Param {
    /// GGUF key (llama.cpp naming), without `.weight`.
    pub fn gguf_name(self) -> String {
        match self {
            Param::Embed => "token_embd".into(),
            Param::OutputNorm => "output_norm".into(),
            Param::Output => "output".into(),
            Param::AttnNorm(i) => format!("blk.{i}.attn_norm"),
            Param::FfnNorm(i) => format!("blk.{i}.ffn_norm"),
            Param::Q(i) => format!("blk.{i}.attn_q"),
            Param::K(i) => format!("blk.{i}.attn_k"),
            Param::V(i) => format!("blk.{i}.attn_v"),
            Param::O(i) => format!("blk.{i}.attn_output"),
            Param::Gate(i) => format!("blk.{i}.ffn_gate"),
            Param::Up(i) => format!("blk.{i}.ffn_up"),
            Param::Down(i) => format!("blk.{i}.ffn_down"),
            Param::PreFfnNorm(i) => format!("blk.{i}.ffn_norm"),
            Param::PostAttnNorm(i) => format!("blk.{i}.post_attention_norm"),
            Param::PostFfnNorm(i) => format!("blk.{i}.post_ffw_norm"),
            Param::QNorm(i) => format!("blk.{i}.attn_q_norm"),
            Param::KNorm(i) => format!("blk.{i}.attn_k_norm"),
        }
    }

    /// Hugging Face key (transformers `modeling_llama.py` naming), without `.weight`.
    pub fn hf_name(self) -> String {
        match self {
            Param::Embed => "model.embed_tokens".into(),
            Param::OutputNorm => "model.norm".into(),
            Param::Output => "lm_head".into(),
            Param::AttnNorm(i) => format!("model.layers.{i}.input_layernorm"),
            Param::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm"),
            Param::Q(i) => format!("model.layers.{i}.self_attn.q_proj"),
            Param::K(i) => format!("model.layers.{i}.self_attn.k_proj"),
            Param::V(i) => format!("model.layers.{i}.self_attn.v_proj"),
            Param::O(i) => format!("model.layers.{i}.self_attn.o_proj"),
            Param::Gate(i) => format!("model.layers.{i}.mlp.gate_proj"),
            Param::Up(i) => format!("model.layers.{i}.mlp.up_proj"),
            Param::Down(i) => format!("model.layers.{i}.mlp.down_proj"),
            Param::PreFfnNorm(i) => format!("model.layers.{i}.pre_feedforward_layernorm"),
            Param::PostAttnNorm(i) => format!("model.layers.{i}.post_attention_layernorm"),
            Param::PostFfnNorm(i) => format!("model.layers.{i}.post_feedforward_layernorm"),
            Param::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm"),
            Param::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm"),
        }
    }
}

/// The token embedding table (V, C), quantized (GGUF) or float.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(Arc<QWeight>),
    Float(Tensor),
}

impl Embedding {
    /// ids: (B, T) -> (B, T, C)
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // Dequantizes only the rows asked for.
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Float(w) => {
                let (b, t) = ids.dims2()?;
                let c = w.dim(1)?;
                w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))
            }
        }
    }

    /// The same table as an output projection (tied embeddings); shares the storage.
    pub fn as_linear(&self) -> candle_core::Result<Linear> {
        match self {
            Embedding::Quantized(q) => Linear::new(Weight::Quantized(q.clone()), None),
            Embedding::Float(w) => Linear::new(Weight::Float(w.clone()), None),
        }
    }

    pub fn row_bytes(&self) -> usize {
        match self {
            Embedding::Quantized(q) => q.storage_size_in_bytes() / q.shape().dims()[0].max(1),
            Embedding::Float(w) => w.dim(1).unwrap_or(0) * w.dtype().size_in_bytes(),
        }
    }
}

pub trait WeightSource {
    fn device(&self) -> &Device;
    fn has(&self, p: Param) -> bool;
    /// A (out, in) projection, with a bias of (out,) when `bias`.
    fn linear(&mut self, p: Param, out: usize, inp: usize, bias: bool) -> Result<Linear>;
    /// A (n,) float vector (norm weights).
    fn vector(&mut self, p: Param, n: usize) -> Result<Tensor>;
    fn embedding(&mut self, p: Param, vocab: usize, hidden: usize) -> Result<Embedding>;
}

pub(crate) fn check_shape(path: &Path, key: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            tensor: key.to_string(),
            problem: format!("shape {got:?}, expected {want:?}"),
        });
    }
    Ok(())
}

/// Weights of a GGUF file: quantized matrices stay quantized (frozen), F16/F32 ones become
/// float tensors, norms are float.
pub(crate) struct GgufWeights<'a> {
    pub file: &'a mut GgufFile,
    pub device: Device,
}

impl GgufWeights<'_> {
    fn qtensor(&mut self, key: &str, want: &[usize]) -> Result<QTensor> {
        let q = self.file.tensor(key, &self.device)?;
        check_shape(self.file.path(), key, q.shape().dims(), want)?;
        Ok(q)
    }

    fn float(&mut self, key: &str, want: &[usize]) -> Result<Tensor> {
        let q = self.qtensor(key, want)?;
        Ok(q.dequantize(&self.device)?)
    }

    fn weight(&mut self, key: &str, want: &[usize]) -> Result<Weight> {
        use candle_core::quantized::GgmlDType as G;
        if self.device.is_cpu()
            && let Some(info) = self.file.content().tensor_infos.get(key)
        {
            check_shape(self.file.path(), key, info.shape.dims(), want)?;
            if let Some(p) = self.file.packed(key)? {
                return Ok(Weight::Quantized(Arc::new(QWeight::from_packed(p))));
            }
        }
        let q = self.qtensor(key, want)?;
        Ok(match q.dtype() {
            G::F32 | G::F16 | G::BF16 => Weight::Float(q.dequantize(&self.device)?),
            _ => Weight::Quantized(Arc::new(QWeight::new(q))),
        })
    }
}

impl WeightSource for GgufWeights<'_> {
    fn device(&self) -> &Device {
        &self.device
    }

    fn has(&self, p: Param) -> bool {
        self.file.has_tensor(&format!("{}.weight", p.gguf_name()))
    }

    fn linear(&mut self, p: Param, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = p.gguf_name();
        let w = self.weight(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.float(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(w, b)?)
    }

    fn vector(&mut self, p: Param, n: usize) -> Result<Tensor> {
        self.float(&format!("{}.weight", p.gguf_name()), &[n])
    }

    fn embedding(&mut self, p: Param, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(
            match self.weight(&format!("{}.weight", p.gguf_name()), &[vocab, hidden])? {
                Weight::Quantized(q) => Embedding::Quantized(q),
                Weight::Float(t) => Embedding::Float(t),
            },
        )
    }
}

/// Weights of a Hugging Face folder (one or several `*.safetensors`), converted to f32.
pub(crate) struct SafetensorsWeights {
    files: MmapedSafetensors,
    paths: Vec<PathBuf>,
    device: Device,
}

impl SafetensorsWeights {
    pub fn open(paths: &[PathBuf], device: &Device) -> Result<Self> {
        for p in paths {
            check_safetensors_header(p)?;
        }
        // SAFETY: the files are memory-mapped read-only; lever never writes to a model file it
        // has open, and a user editing it mid-run is outside what any mmap-based loader guards.
        #[allow(unsafe_code)]
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Tensor {
            path: paths.first().cloned().unwrap_or_default(),
            tensor: "(header)".into(),
            problem: e.to_string(),
        })?;
        Ok(Self {
            files,
            paths: paths.to_vec(),
            device: device.clone(),
        })
    }

    /// The file to name in errors: the file itself, or the folder of a sharded checkpoint.
    fn display_path(&self) -> PathBuf {
        if self.paths.len() == 1 {
            self.paths[0].clone()
        } else {
            self.paths
                .first()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }
    }

    fn tensor(&self, key: &str, want: &[usize]) -> Result<Tensor> {
        let path = self.display_path();
        let view = self.files.get(key).map_err(|_| Error::Tensor {
            path: path.clone(),
            tensor: key.to_string(),
            problem: "missing".into(),
        })?;
        check_shape(&path, key, view.shape(), want)?;
        let t = self
            .files
            .load(key, &self.device)
            .map_err(|e| Error::Tensor {
                path: path.clone(),
                tensor: key.to_string(),
                problem: e.to_string(),
            })?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Reject a truncated or corrupt safetensors file with a clear message before mapping it.
pub(crate) fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |problem: String| Error::Tensor {
        path: path.to_path_buf(),
        tensor: "(header)".into(),
        problem,
    };
    let mut f = std::fs::File::open(path).map_err(crate::error::io_err(path))?;
    let len = f.metadata().map_err(crate::error::io_err(path))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "file of {len} bytes is too short for a safetensors header"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) {
        return Err(bad(format!(
            "header claims {n} bytes but the file has {len}: truncated or not safetensors"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("reading header: {e}")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    if let Some(map) = header.as_object() {
        for (k, v) in map {
            if let Some(off) = v
                .get("data_offsets")
                .and_then(|o| o.get(1))
                .and_then(|o| o.as_u64())
                && 8 + n + off > len
            {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    tensor: k.clone(),
                    needed: 8 + n + off,
                    actual: len,
                });
            }
        }
    }
    Ok(())
}

impl WeightSource for SafetensorsWeights {
    fn device(&self) -> &Device {
        &self.device
    }

    fn has(&self, p: Param) -> bool {
        self.files.get(&format!("{}.weight", p.hf_name())).is_ok()
    }

    fn linear(&mut self, p: Param, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = p.hf_name();
        let w = self.tensor(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.tensor(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(Weight::Float(w), b)?)
    }

    fn vector(&mut self, p: Param, n: usize) -> Result<Tensor> {
        self.tensor(&format!("{}.weight", p.hf_name()), &[n])
    }

    fn embedding(&mut self, p: Param, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::Float(self.tensor(
            &format!("{}.weight", p.hf_name()),
            &[vocab, hidden],
        )?))
    }
}

/// Seeded random float weights (std 0.02, norms at 1), for tiny test models and pretraining.
pub struct RandomWeights {
    rng: SplitMix64,
    device: Device,
}

impl RandomWeights {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: SplitMix64(seed),
            device: device.clone(),
        }
    }

    fn normal(&mut self, dims: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.normal() * std).collect();
        Ok(Tensor::from_vec(v, dims, &self.device)?)
    }
}

impl WeightSource for RandomWeights {
    fn device(&self) -> &Device {
        &self.device
    }

    fn has(&self, _p: Param) -> bool {
        true
    }

    fn linear(&mut self, _p: Param, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.normal(&[out, inp], 0.02)?;
        let b = if bias {
            Some(self.normal(&[out], 0.02)?)
        } else {
            None
        };
        Ok(Linear::new(Weight::Float(w), b)?)
    }

    fn vector(&mut self, _p: Param, n: usize) -> Result<Tensor> {
        Ok(Tensor::ones(n, DType::F32, &self.device)?)
    }

    fn embedding(&mut self, _p: Param, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::Float(self.normal(&[vocab, hidden], 0.02)?))
    }
}
