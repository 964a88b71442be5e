//! A frozen block-quantized weight, held once: in the AVX-512 VNNI interleaved layout
//! (`packed.rs`) on CPUs that run those kernels, else as candle's `QTensor` in GGUF blocks. The
//! GGUF blocks are not kept beside the packed copy (a 7B Q4 model would need twice its size);
//! the rare paths that want them (candle's kernels, writing files) unpack them again.

use std::sync::Arc;

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

impl QWeight {
    /// Packed when the tensor is a CPU matrix these kernels cover, on a CPU that runs them.
    pub fn new(q: QTensor) -> Self {
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
