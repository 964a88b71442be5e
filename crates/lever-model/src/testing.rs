//! Helpers for tests across the workspace: tiny models written to disk, for tests of the
//! loaders and the CLI (STYLE habit 10: a 2-layer llama-family GGUF with a byte-level
//! vocabulary, in any block type candle writes), seeded random data, and the one
//! `max_abs_diff` the numerics tests compare with.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::rng::SplitMix64;

/// What to put in a tiny GGUF; the defaults make a valid model.
#[derive(Debug, Clone)]
pub struct TinyGguf {
    pub arch: String,
    /// Block type of the 2-D matrices (norms stay F32).
    pub dtype: GgmlDType,
    pub with_merges: bool,
    pub with_chat_template: bool,
    pub chat_template: String,
    pub seed: u64,
}

impl Default for TinyGguf {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            dtype: GgmlDType::F32,
            with_merges: true,
            with_chat_template: true,
            chat_template: "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            seed: 0,
        }
    }
}

/// Hidden size: a multiple of 256 so every k-quant block type applies.
pub const TINY_HIDDEN: usize = 256;
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

impl TinyGguf {
    pub fn write(&self, path: &Path) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (c, f, layers, heads, kv) = (TINY_HIDDEN, 512usize, 2usize, 4usize, 2usize);
        let hd = c / heads;
        // Vocabulary: the 256 byte-level symbols, one merge ("Ġ" + "t"), then the specials.
        let table = crate::tokenizer::byte_level_symbols();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.push("\u{120}t".into());
        let mut types = vec![1i32; tokens.len()];
        for s in TINY_SPECIALS {
            tokens.push(s.into());
            types.push(3);
        }
        let v = tokens.len();
        let mut rng = SplitMix64(self.seed);
        let mut mat = |rows: usize, cols: usize, std: f32| -> candle_core::Result<QTensor> {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * std).collect();
            let t = Tensor::from_vec(data, (rows, cols), &dev)?;
            QTensor::quantize(&t, self.dtype)
        };
        let ones = |n: usize| -> candle_core::Result<QTensor> {
            QTensor::quantize(
                &Tensor::ones(n, candle_core::DType::F32, &dev)?,
                GgmlDType::F32,
            )
        };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        // The embedding rows are gathered, so keep them in a type with a small block (or F32).
        tensors.push(("token_embd.weight".into(), mat(v, c, 0.5)?));
        for i in 0..layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            tensors.push((p("attn_norm"), ones(c)?));
            tensors.push((p("attn_q"), mat(heads * hd, c, 0.05)?));
            tensors.push((p("attn_k"), mat(kv * hd, c, 0.05)?));
            tensors.push((p("attn_v"), mat(kv * hd, c, 0.05)?));
            tensors.push((p("attn_output"), mat(c, heads * hd, 0.05)?));
            tensors.push((p("ffn_norm"), ones(c)?));
            tensors.push((p("ffn_gate"), mat(f, c, 0.05)?));
            tensors.push((p("ffn_up"), mat(f, c, 0.05)?));
            tensors.push((p("ffn_down"), mat(c, f, 0.05)?));
        }
        tensors.push(("output_norm.weight".into(), ones(c)?));

        let a = &self.arch;
        let s = |x: &str| Value::String(x.to_string());
        let u = |x: usize| Value::U32(x as u32);
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), s(a)),
            ("general.name".into(), s("lever-tiny")),
            (format!("{a}.context_length"), u(128)),
            (format!("{a}.embedding_length"), u(c)),
            (format!("{a}.block_count"), u(layers)),
            (format!("{a}.feed_forward_length"), u(f)),
            (format!("{a}.attention.head_count"), u(heads)),
            (format!("{a}.attention.head_count_kv"), u(kv)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
            (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), u(v - 2)),
            ("tokenizer.ggml.eos_token_id".into(), u(v - 1)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ];
        if self.with_merges {
            meta.push((
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![s("\u{120} t")]),
            ));
        }
        if self.with_chat_template {
            meta.push(("tokenizer.chat_template".into(), s(&self.chat_template)));
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        crate::fsutil::write_atomic(path, |tmp| -> crate::Result<()> {
            let mut file = std::fs::File::create(tmp).map_err(|source| crate::Error::Io {
                path: path.into(),
                source,
            })?;
            Ok(gguf_file::write(&mut file, &meta_refs, &tensor_refs)?)
        })
        .map_err(candle_core::Error::wrap)
    }
}

/// A copy of the GGUF at `src`, written to `dst` with its metadata edited by `meta` and its
/// tensors by `tensors` (kept in file order): real models made hostile or broken, for tests.
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    meta: impl FnOnce(&mut std::collections::BTreeMap<String, Value>),
    tensors: impl FnOnce(&mut Vec<(String, QTensor)>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(src)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let mut order: Vec<(u64, String)> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| (info.offset, name.clone()))
        .collect();
    order.sort();
    let mut ts = Vec::with_capacity(order.len());
    for (_, name) in order {
        let t = content.tensor(&mut reader, &name, &Device::Cpu)?;
        ts.push((name, t));
    }
    tensors(&mut ts)?;
    let mut m: std::collections::BTreeMap<String, Value> = content.metadata.into_iter().collect();
    meta(&mut m);
    let meta_refs: Vec<(&str, &Value)> = m.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dst)?);
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

/// n standard normal values, the same for the same seed (test data).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| rng.normal()).collect()
}

/// Random normal tensors of any shape from one seeded stream, one after another.
pub struct Randn(SplitMix64);

impl Randn {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64(seed))
    }

    pub fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.0.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("randn {shape:?}: {e}"))
    }
}

/// The largest |a − b| over two slices of the same length: how far a result is from its
/// reference. A NaN on either side makes it NaN, so that a `< tolerance` check fails instead
/// of passing over it (as folding with `f32::max` would).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "max_abs_diff: {} values vs {}",
        a.len(),
        b.len()
    );
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    })
}

/// [`max_abs_diff`] of two tensors of the same shape (values read as f32).
pub fn max_abs_diff_tensors(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "max_abs_diff_tensors: shapes differ");
    let host = |t: &Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("max_abs_diff_tensors: {e}"))
    };
    max_abs_diff(&host(a), &host(b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_finds_the_largest_gap_and_keeps_nan() {
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, 2.0, 3.0]), 4.0);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
        assert!(max_abs_diff(&[0.0, f32::NAN, 9.0], &[0.0, 0.0, 0.0]).is_nan());
        assert!(max_abs_diff(&[f32::NAN], &[f32::NAN]).is_nan());
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 2.5], [3.0, 4.0]], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff_tensors(&a, &b), 0.5);
    }
}
