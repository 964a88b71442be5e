//! Reading GGUF files (llama.cpp `gguf.md` spec). candle parses the file; before that we walk
//! the header with bounds checks so that a truncated or corrupt file is an error that names the
//! file and the byte, never an allocation of a garbage length or a panic.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::config::{Arch, DecoderConfig};
use crate::error::{Error, Result, io_err};
use crate::ops::RopeStyle;

pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut reader = BufReader::new(file);
        prescan(&mut reader, len).map_err(|detail| Error::GgufHeader {
            path: path.to_path_buf(),
            detail,
        })?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let content = Content::read(&mut reader).map_err(|e| Error::GgufHeader {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(bs) {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    problem: format!("{elems} elements is not a multiple of block size {bs}"),
                });
            }
            // Checked: the prescan bounds each tensor's element count, not the offsets.
            let end = ((elems / bs) as u64)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .and_then(|bytes| bytes.checked_add(info.offset))
                .and_then(|b| b.checked_add(content.tensor_data_offset))
                .unwrap_or(u64::MAX);
            if end > len {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    needed: end,
                    actual: len,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor(&mut self, name: &str, dev: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                problem: "missing".into(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, dev)
            .map_err(|e| Error::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                problem: e.to_string(),
            })
    }

    /// A matrix that [`QWeight::new`](crate::qweight::QWeight) would pack, read into the
    /// packed layout 16 rows at a time (the GGUF blocks are never all in memory beside it: a
    /// 262k-row embedding table would double the peak); None for any other tensor.
    pub(crate) fn packed(&mut self, name: &str) -> Result<Option<crate::kernels::packed::Packed>> {
        use crate::kernels::packed::Packed;
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let Ok((n, k)) = info.shape.dims2() else {
            return Ok(None);
        };
        if !crate::qweight::QWeight::would_pack(info.ggml_dtype, k) {
            return Ok(None);
        }
        let start = self.content.tensor_data_offset + info.offset;
        let dtype = info.ggml_dtype;
        let err = |e: std::io::Error| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            problem: e.to_string(),
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(err)?;
        let reader = &mut self.reader;
        Packed::read(dtype, n, k, |rows| reader.read_exact(rows))
            .map(Some)
            .map_err(err)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    pub fn string(&self, key: &str) -> Result<String> {
        let v = self.get(key).ok_or_else(|| self.meta_err(key, "missing"))?;
        v.to_string()
            .cloned()
            .map_err(|_| self.meta_err(key, "not a string"))
    }

    pub fn opt_string(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok().cloned())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.meta_err(key, "missing"))?;
        value_u64(v)
            .map(|n| n as usize)
            .ok_or_else(|| self.meta_err(key, "not a non-negative integer"))
    }

    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(value_u64).map(|n| n as usize)
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(|v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.meta_err(key, "missing"))?;
        let arr = v.to_vec().map_err(|_| self.meta_err(key, "not an array"))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.to_string()
                    .cloned()
                    .map_err(|_| self.meta_err(key, format!("element {i} is not a string")))
            })
            .collect()
    }

    pub fn int_array(&self, key: &str) -> Option<Vec<i64>> {
        let arr = self.get(key)?.to_vec().ok()?;
        arr.iter().map(|x| value_u64(x).map(|n| n as i64)).collect()
    }

    /// An array of floats (F32 or F64 elements).
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.get(key).ok_or_else(|| self.meta_err(key, "missing"))?;
        let arr = v.to_vec().map_err(|_| self.meta_err(key, "not an array"))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(self.meta_err(key, format!("element {i} is not a number"))),
            })
            .collect()
    }

    pub fn architecture(&self) -> Result<Arch> {
        let name = self.string("general.architecture")?;
        Arch::parse(&name).ok_or_else(|| Error::UnsupportedArch {
            path: self.path.clone(),
            arch: name,
            supported: Arch::SUPPORTED,
        })
    }

    /// The dominant block type of the matrices (what `models list` shows as quantization).
    pub fn quantization(&self) -> String {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for info in self.content.tensor_infos.values() {
            if info.shape.rank() == 2 {
                *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() +=
                    info.shape.elem_count();
            }
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(t, _)| t.to_uppercase())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Resolve the decoder config from `{arch}.*` metadata, checked by
    /// [`DecoderConfig::validate`] before anything is allocated from it; an error names the
    /// key. A key of the wrong type is an error too, never a silent default.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let arch = self.architecture()?;
        let a = self.string("general.architecture")?;
        let k = |s: &str| format!("{a}.{s}");
        let hidden = self.usize(&k("embedding_length"))?;
        let heads = self.usize(&k("attention.head_count"))?;
        let kv_heads = self
            .opt_usize_checked(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = self
            .opt_usize_checked(&k("attention.key_length"))?
            .unwrap_or(hidden / heads.max(1));
        let vocab = match self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
        {
            Some(t) => t.len(),
            None => self.usize(&k("vocab_size"))?,
        };
        let tie = !self.has_tensor("output.weight");
        let cfg = DecoderConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            num_layers: self.usize(&k("block_count"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: self
                .opt_f32_checked(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self
                .opt_f32_checked(&k("rope.freq_base"))?
                .unwrap_or(10_000.0),
            // llama.cpp's converter permutes Q/K of `llama` checkpoints for interleaved RoPE;
            // qwen2 keeps the NeoX layout (llama.cpp `llama_model_rope_type`).
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 | Arch::Gemma3 => RopeStyle::Neox,
            },
            max_seq_len: self.usize(&k("context_length"))?,
            tie_embeddings: tie,
            numerics: crate::config::Numerics::LlamaCpp,
            gemma: match arch {
                Arch::Gemma3 => Some(self.gemma_config(&a, hidden, heads, head_dim)?),
                _ => None,
            },
        };
        cfg.validate()
            .map_err(|(field, problem)| self.meta_err(&field.gguf_key(&a), problem))?;
        Ok(cfg)
    }

    /// Gemma 3's block as llama.cpp reads it (`llama_model_gemma3::load_arch_hparams`): the
    /// window from `gemma3.attention.sliding_window`; every sixth layer global unless
    /// `attention.sliding_window_pattern` says otherwise; local RoPE base 10,000 unless
    /// `rope.freq_base_swa`; queries scaled by 1/√head size (1/√(C/H) for the 62-layer 27B);
    /// norm weights already 1 + w (the converter added the 1).
    fn gemma_config(
        &self,
        a: &str,
        hidden: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<crate::config::GemmaConfig> {
        let k = |s: &str| format!("{a}.{s}");
        let factor_key = k("rope.scaling.factor");
        if let Some(f) = self.opt_f32_checked(&factor_key)?
            && f != 1.0
        {
            return Err(self.meta_err(&factor_key, format!("RoPE scaling by {f} is not supported")));
        }
        let cap_key = k("final_logit_softcapping");
        if let Some(c) = self.opt_f32_checked(&cap_key)?
            && c != 0.0
        {
            return Err(self.meta_err(&cap_key, format!("soft-capping ({c}) is not supported")));
        }
        let layers = self.usize(&k("block_count"))?;
        let scalar = if layers == 62 {
            hidden / heads.max(1)
        } else {
            head_dim
        };
        // No window (or 0): every layer global. The pattern: one flag per layer (true:
        // local), or every n-th layer global (default 6), as `load_swa_pattern` reads it.
        let window = self
            .opt_usize_checked(&k("attention.sliding_window"))?
            .unwrap_or(0);
        let pattern_key = k("attention.sliding_window_pattern");
        let global_layers = match self.get(&pattern_key) {
            _ if window == 0 => vec![true; layers],
            Some(Value::Array(flags)) => flags
                .iter()
                .map(|f| match f {
                    Value::Bool(local) => Ok(!local),
                    _ => Err(self.meta_err(&pattern_key, "not an array of booleans")),
                })
                .collect::<Result<Vec<bool>>>()?,
            _ => crate::config::GemmaConfig::pattern(
                layers,
                self.opt_usize_checked(&pattern_key)?.unwrap_or(6),
            ),
        };
        Ok(crate::config::GemmaConfig {
            sliding_window: window.max(1),
            global_layers,
            rope_local_theta: self
                .opt_f32_checked(&k("rope.freq_base_swa"))?
                .unwrap_or(10_000.0),
            attn_scale: 1.0 / (scalar.max(1) as f32).sqrt(),
            norm_offset: 0.0,
        })
    }

    /// An optional integer: absent is None, any other type an error naming the key.
    fn opt_usize_checked(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.meta_err(key, "not a non-negative integer")),
        }
    }

    /// An optional float: absent is None, any other type an error naming the key.
    fn opt_f32_checked(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(_) => Err(self.meta_err(key, "not a float")),
        }
    }

    /// Names and block types of all tensors, in file order.
    pub fn tensor_types(&self) -> Vec<(String, GgmlDType)> {
        let mut v: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (i.offset, n.clone(), i.ggml_dtype))
            .collect();
        v.sort_by_key(|(off, name, _)| (*off, name.clone()));
        v.into_iter().map(|(_, n, t)| (n, t)).collect()
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::U64(x) => Some(*x),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// Walk the header (magic, version, key/values, tensor infos), checking that every length
/// fits in the file. Returns a description of the first problem.
fn prescan<R: Read + Seek>(r: &mut R, len: u64) -> std::result::Result<(), String> {
    let mut s = Scanner { r, pos: 0, len };
    let magic = s.bytes(4)?;
    if magic != b"GGUF" {
        return Err(format!("bad magic {magic:?}, expected \"GGUF\""));
    }
    let version = s.u32()?;
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    let n_tensors = s.u64()?;
    let n_kv = s.u64()?;
    // Each key/value takes at least 12 bytes, each tensor info at least 24.
    if n_kv.saturating_mul(12) > len || n_tensors.saturating_mul(24) > len {
        return Err(format!(
            "header claims {n_kv} metadata entries and {n_tensors} tensors, more than a {len}-byte file holds"
        ));
    }
    for _ in 0..n_kv {
        let key = s.string()?;
        let ty = s.u32()?;
        s.value(ty).map_err(|e| format!("metadata `{key}`: {e}"))?;
    }
    for _ in 0..n_tensors {
        let name = s.string()?;
        let n_dims = s.u32()?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("tensor `{name}`: {n_dims} dimensions"));
        }
        // The element count must not overflow (candle multiplies the dimensions unchecked);
        // no block type stores an element in less than one bit.
        let mut elems = 1u64;
        for _ in 0..n_dims {
            elems = elems.saturating_mul(s.u64()?);
        }
        if elems > len.saturating_mul(8) {
            return Err(format!(
                "tensor `{name}`: {elems} elements, more than a {len}-byte file holds"
            ));
        }
        s.u32()?; // type
        s.u64()?; // offset
    }
    Ok(())
}

struct Scanner<'a, R> {
    r: &'a mut R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Scanner<'_, R> {
    fn need(&self, n: u64) -> std::result::Result<(), String> {
        if self.pos.saturating_add(n) > self.len {
            Err(format!(
                "truncated or corrupt header: {n} bytes needed at byte {} of {}",
                self.pos, self.len
            ))
        } else {
            Ok(())
        }
    }
    fn bytes(&mut self, n: u64) -> std::result::Result<Vec<u8>, String> {
        self.need(n)?;
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(b)
    }
    fn skip(&mut self, n: u64) -> std::result::Result<(), String> {
        self.need(n)?;
        self.r
            .seek(SeekFrom::Current(n as i64))
            .map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(())
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()?;
        let b = self.bytes(n)?;
        String::from_utf8(b).map_err(|_| "string is not UTF-8".to_string())
    }
    fn value(&mut self, ty: u32) -> std::result::Result<(), String> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.u64()?;
                self.skip(n)
            }
            9 => {
                let elem = self.u32()?;
                let count = self.u64()?;
                match elem {
                    8 => {
                        for _ in 0..count {
                            let n = self.u64()?;
                            self.skip(n)?;
                        }
                        Ok(())
                    }
                    9 => Err("nested arrays are not supported".into()),
                    _ => {
                        let size = match elem {
                            0 | 1 | 7 => 1,
                            2 | 3 => 2,
                            4..=6 => 4,
                            10..=12 => 8,
                            t => return Err(format!("unknown array element type {t}")),
                        };
                        self.skip(count.saturating_mul(size))
                    }
                }
            }
            t => Err(format!("unknown value type {t}")),
        }
    }
}
