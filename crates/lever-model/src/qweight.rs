//! A frozen block-quantized weight, held once: as candle's `QTensor` in GGUF blocks (computed by
//! `kernels/quant_matmul.rs` in llama.cpp's lane order for Q4_1/Q5_0/Q8_0, by `kernels/kquant.rs` for
//! Q4_K/Q5_K/Q6_K), or, where packing is on, the CPU has AVX-512 VNNI and the type is Q4_1, Q5_0, Q8_0,
//! Q4_K or Q6_K,
//! in the interleaved layout of `kernels/packed.rs` (batched steps nearly free; float rounding differs
//! from llama.cpp's lane order). Q8_0, Q5_0, Q4_K and Q6_K are packed by default (llama.cpp repacks
//! Q8_0, Q4_K and Q6_K by default too, its CPU backend's `q8_0_4x8`, `q4_K_8x8` and `q6_K_8x8`
//! buffers); Q4_1, the default model's type, keeps
//! llama.cpp's lane order (llama.cpp does not repack it, and the teacher-forced agreement with
//! it drops from 368 to 365 of 380 steps packed) except in `lever serve` and the batched commands;
//! `LEVER_PACKED=1|0` decides for any command. The GGUF blocks are not kept beside the packed copy (a 7B Q4 model would need twice
//! its size); the rare paths that want them (candle's kernels, writing files) unpack them again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result, Shape, Tensor};

use crate::kernels;
use crate::kernels::packed::Packed;

#[derive(Debug)]
pub struct QWeight {
    shape: Shape,
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    Blocks(Arc<QTensor>),
    Packed(Packed),
}

static PACK: AtomicBool = AtomicBool::new(false);

/// Whether Q4_1 weights loaded from now on are packed too (when the CPU runs the packed
/// kernels; Q5_0, Q8_0, Q4_K and Q6_K are packed whatever this says); `LEVER_PACKED=1|0` overrides
/// both.
pub fn set_packing(on: bool) {
    PACK.store(on, Ordering::Relaxed);
}

fn packing(dtype: GgmlDType) -> bool {
    match std::env::var("LEVER_PACKED").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => {
            matches!(
                dtype,
                GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q6K
            ) || PACK.load(Ordering::Relaxed)
        }
    }
}

impl QWeight {
    /// Packed when packing is on and the tensor is a CPU matrix these kernels cover, on a CPU
    /// that runs them; else in GGUF blocks.
    pub(crate) fn new(q: QTensor) -> Self {
        if packing(q.dtype()) {
            Self::pack(q)
        } else {
            Self::blocks(q)
        }
    }

    /// Whether [`QWeight::new`] would pack an n × k matrix of `dtype` on the CPU (so that a
    /// loader can pack it as it reads, [`QWeight::from_packed`]).
    pub(crate) fn would_pack(dtype: GgmlDType, k: usize) -> bool {
        packing(dtype) && Packed::packable(dtype, k)
    }

    /// A matrix packed as it was read.
    pub(crate) fn from_packed(p: Packed) -> Self {
        let (n, k) = p.dims();
        Self {
            shape: Shape::from((n, k)),
            repr: Repr::Packed(p),
        }
    }

    /// Packed where the CPU and block type allow, whatever the setting.
    #[cfg(test)]
    pub(crate) fn packed_if_possible(q: QTensor) -> Self {
        Self::pack(q)
    }

    fn pack(q: QTensor) -> Self {
        let shape = q.shape().clone();
        if q.device().is_cpu()
            && let Ok((n, k)) = shape.dims2()
            && let Ok(data) = q.data()
            && let Some(p) = Packed::new(q.dtype(), &data, n, k)
        {
            return Self {
                shape,
                repr: Repr::Packed(p),
            };
        }
        Self::blocks(q)
    }

    /// Kept in GGUF blocks whatever the CPU (for tests of the other kernels).
    pub(crate) fn blocks(q: QTensor) -> Self {
        Self {
            shape: q.shape().clone(),
            repr: Repr::Blocks(Arc::new(q)),
        }
    }

    pub(crate) fn shape(&self) -> &Shape {
        &self.shape
    }

    pub(crate) fn dtype(&self) -> GgmlDType {
        match &self.repr {
            Repr::Blocks(q) => q.dtype(),
            Repr::Packed(p) => p.dtype(),
        }
    }

    pub(crate) fn packed(&self) -> Option<&Packed> {
        match &self.repr {
            Repr::Packed(p) => Some(p),
            Repr::Blocks(_) => None,
        }
    }

    /// The weight as candle's `QTensor` (shared when held so, rebuilt from the packed layout
    /// otherwise).
    pub(crate) fn qtensor(&self) -> Result<Arc<QTensor>> {
        match &self.repr {
            Repr::Blocks(q) => Ok(q.clone()),
            Repr::Packed(p) => {
                let blocks = p.unpack();
                let storage =
                    QStorage::from_data(std::borrow::Cow::Owned(blocks), &Device::Cpu, p.dtype())?;
                Ok(Arc::new(QTensor::new(storage, self.shape.clone())?))
            }
        }
    }

    /// Bytes held.
    pub(crate) fn storage_size_in_bytes(&self) -> usize {
        match &self.repr {
            Repr::Blocks(q) => q.storage_size_in_bytes(),
            Repr::Packed(p) => p.bytes(),
        }
    }

    /// The f32 matrix.
    pub(crate) fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match &self.repr {
            Repr::Blocks(q) if !lever_blocks(q) => q.dequantize(device),
            _ => Tensor::from_vec(self.dequantize_vec()?, self.shape.clone(), device),
        }
    }

    /// The f32 matrix as rows, in parallel and straight into one buffer (no tensor to copy
    /// out of): the values candle's `to_float` gives.
    pub(crate) fn dequantize_vec(&self) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        match &self.repr {
            Repr::Packed(p) => Ok(p.dequantize()),
            Repr::Blocks(q) if lever_blocks(q) => {
                let data = q.data()?;
                let dtype = q.dtype();
                let Some((values, bytes)) = kernels::block_shape(dtype) else {
                    candle_core::bail!("no lever dequantization for {dtype:?}");
                };
                let mut out = vec![0f32; data.len() / bytes * values];
                // About 32 KiB of blocks per task.
                let chunk = (32 << 10) / bytes;
                out.par_chunks_mut(chunk * values)
                    .zip(data.par_chunks(chunk * bytes))
                    .for_each(|(o, d)| {
                        for (o, blk) in o.chunks_exact_mut(values).zip(d.chunks_exact(bytes)) {
                            kernels::dequantize_block(dtype, blk, o);
                        }
                    });
                Ok(out)
            }
            Repr::Blocks(q) => q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>(),
        }
    }

    /// Rows of an embedding table: ids (...) -> (..., k), only the rows asked for dequantized.
    pub(crate) fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.repr {
            Repr::Blocks(q) => q.embedding(ids),
            Repr::Packed(p) => {
                let (n, k) = p.dims();
                let flat = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?;
                let flat = flat.to_vec1::<u32>()?;
                let mut out = vec![0f32; flat.len() * k];
                for (&id, row) in flat.iter().zip(out.chunks_exact_mut(k)) {
                    if id as usize >= n {
                        candle_core::bail!("token id {id} is outside the embedding table of {n}");
                    }
                    p.dequantize_row(id as usize, row);
                }
                let mut dims = ids.dims().to_vec();
                dims.push(k);
                Tensor::from_vec(out, dims, ids.device())
            }
        }
    }
}

/// Blocks on the CPU of a type lever dequantizes (and multiplies) itself.
fn lever_blocks(q: &QTensor) -> bool {
    q.device().is_cpu() && kernels::block_shape(q.dtype()).is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// lever's parallel dequantization gives candle's values bit for bit, in both layouts.
    #[test]
    fn dequantize_vec_equals_candles() {
        let mut rng = crate::rng::SplitMix64(3);
        let (n, k) = (40, 512);
        let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let t = Tensor::from_vec(x, (n, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            assert!(lever_blocks(&QTensor::quantize(&t, dtype).unwrap()));
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let q2 = QTensor::quantize(&t, dtype).unwrap();
            for w in [QWeight::blocks(q), QWeight::packed_if_possible(q2)] {
                let got = w.dequantize_vec().unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && got.len() == want.len(), "{dtype:?}");
            }
        }
    }
}
