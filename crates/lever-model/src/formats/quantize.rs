//! `lever quantize`: rewrite a GGUF file with its matrices in another block type.
//! Every 2-D weight is dequantized to f32 and quantized again; vectors (norms, biases) stay F32.
//! As llama.cpp's `llama-quantize` does for small models, a tied embedding (no `output.weight`,
//! so the table is also the output layer) is kept at 8 bits when the target has fewer.
//! The file is written to a temp name, synced, then renamed.

use std::io::Write;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{Error, Result, io_err};
use crate::formats::gguf::GgufFile;

/// Block types `lever quantize` writes, by their CLI names.
pub fn parse_type(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "f16" => GgmlDType::F16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_1" => GgmlDType::Q4_1,
        "q4_0" => GgmlDType::Q4_0,
        _ => return None,
    })
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a whole-file type.
pub(crate) fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        _ => 0,
    }
}

/// Quantize `src` into `dst`. `progress(done, total)` counts tensors.
pub fn quantize_gguf(
    src: &Path,
    dst: &Path,
    target: GgmlDType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let mut file = GgufFile::open(src)?;
    file.architecture()?;
    let dev = Device::Cpu;
    let tied = !file.has_tensor("output.weight");
    let names: Vec<String> = file.tensor_types().into_iter().map(|(n, _)| n).collect();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let q = file.tensor(name, &dev)?;
        let out = if q.shape().rank() < 2 {
            if q.dtype() == GgmlDType::F32 {
                q
            } else {
                QTensor::quantize(&q.dequantize(&dev)?, GgmlDType::F32)?
            }
        } else {
            let cols = *q.shape().dims().last().unwrap_or(&0);
            let ty = matrix_type(name, cols, tied, target, src)?;
            if q.dtype() == ty {
                q
            } else {
                QTensor::quantize(&q.dequantize(&dev)?, ty)?
            }
        };
        tensors.push((name.clone(), out));
        progress(i + 1, names.len());
    }
    let mut metadata: Vec<(String, Value)> = file
        .content()
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_gguf(dst, metadata, &tensors, target)
}

/// The block type a matrix gets when the file's target is `target`: a tied embedding (also the
/// output layer) stays at 8 bits when the target has fewer; rows must fill whole blocks.
pub(crate) fn matrix_type(
    name: &str,
    cols: usize,
    tied: bool,
    target: GgmlDType,
    path: &Path,
) -> Result<GgmlDType> {
    let ty = if name == "token_embd.weight"
        && tied
        && target.type_size() * 8 / target.block_size() < 8
    {
        GgmlDType::Q8_0
    } else {
        target
    };
    if !cols.is_multiple_of(ty.block_size()) {
        return Err(Error::Tensor {
            path: path.into(),
            tensor: name.to_string(),
            problem: format!(
                "row length {cols} is not a multiple of {ty:?}'s block of {}",
                ty.block_size()
            ),
        });
    }
    Ok(ty)
}

/// Convert a Hugging Face folder into a GGUF file with matrices in `target`.
pub fn convert_hf(dir: &Path, dst: &Path, target: GgmlDType) -> Result<()> {
    let (metadata, tensors) = crate::formats::convert::hf_to_gguf(dir, target)?;
    write_gguf(dst, metadata, &tensors, target)
}

/// Write metadata (with `general.file_type` set for `target`) and tensors to `dst`: a temp
/// name first, synced, then renamed; nothing is left behind on failure.
pub(crate) fn write_gguf(
    dst: &Path,
    mut metadata: Vec<(String, Value)>,
    tensors: &[(String, QTensor)],
    target: GgmlDType,
) -> Result<()> {
    metadata.retain(|(k, _)| k != "general.file_type");
    metadata.push(("general.file_type".into(), Value::U32(file_type(target))));
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::fsutil::write_atomic(dst, |tmp| -> Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(tmp).map_err(io_err(dst))?);
        gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
        out.flush().map_err(io_err(dst))
    })
}
