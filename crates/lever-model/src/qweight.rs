//! A frozen block-quantized weight, held once: as candle's `QTensor` in GGUF blocks (computed by
//! `kernels.rs` in llama.cpp's lane order), or, where packing is on and the CPU has AVX-512 VNNI,
//! in the interleaved layout of `packed.rs` (batched steps nearly free; float rounding differs
//! from llama.cpp's). `lever serve` turns packing on; `LEVER_PACKED=1|0` decides for any
//! command. The GGUF blocks are not kept beside the packed copy (a 7B Q4 model would need twice
//! its size); the rare paths that want them (candle's kernels, writing files) unpack them again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result, Shape, Tensor};

use crate::packed::Packed;

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

/// Whether weights loaded from now on are packed (when the CPU runs the packed kernels);
/// `LEVER_PACKED=1|0` overrides what the program asks for.
pub fn set_packing(on: bool) {
    let on = match std::env::var("LEVER_PACKED").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => on,
    };
    PACK.store(on, Ordering::Relaxed);
}

fn packing() -> bool {
    match std::env::var("LEVER_PACKED").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => PACK.load(Ordering::Relaxed),
    }
}

impl QWeight {
    /// Packed when packing is on and the tensor is a CPU matrix these kernels cover, on a CPU
    /// that runs them; else in GGUF blocks.
    pub fn new(q: QTensor) -> Self {
        if packing() {
            Self::pack(q)
        } else {
            Self::blocks(q)
        }
    }

    /// Packed where the CPU and block type allow, whatever the setting.
    pub fn packed_if_possible(q: QTensor) -> Self {
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
    pub fn blocks(q: QTensor) -> Self {
        Self {
            shape: q.shape().clone(),
            repr: Repr::Blocks(Arc::new(q)),
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dtype(&self) -> GgmlDType {
        match &self.repr {
            Repr::Blocks(q) => q.dtype(),
            Repr::Packed(p) => p.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.repr {
            Repr::Blocks(q) => q.device(),
            Repr::Packed(_) => Device::Cpu,
        }
    }

    pub fn packed(&self) -> Option<&Packed> {
        match &self.repr {
            Repr::Packed(p) => Some(p),
            Repr::Blocks(_) => None,
        }
    }

    /// The weight as candle's `QTensor` (shared when held so, rebuilt from the packed layout
    /// otherwise).
    pub fn qtensor(&self) -> Result<Arc<QTensor>> {
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
    pub fn storage_size_in_bytes(&self) -> usize {
        match &self.repr {
            Repr::Blocks(q) => q.storage_size_in_bytes(),
            Repr::Packed(p) => p.bytes(),
        }
    }

    /// The f32 matrix.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match &self.repr {
            Repr::Blocks(q) => q.dequantize(device),
            Repr::Packed(p) => Tensor::from_vec(p.dequantize(), self.shape.clone(), device),
        }
    }

    /// Rows of an embedding table: ids (...) -> (..., k), only the rows asked for dequantized.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
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
