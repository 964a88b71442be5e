//! The linear layer of every lever model: a frozen quantized weight (fast inference, GGUF) or a
//! float weight (trainable), an optional bias (Qwen2's q/k/v), and a slot for a LoRA adapter.
//! Adapters wrap the base, they never change it (PEFT `tuners/lora/layer.py`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

/// The base weight W: (out, in).
#[derive(Debug, Clone)]
pub enum Weight {
    /// Frozen, block-quantized; y = x · Wᵀ runs in candle's quantized kernels.
    Quantized(Arc<QTensor>),
    /// Float (f32 on CPU); trainable when it is a `Var`.
    Float(Tensor),
}

/// A low-rank adapter: y += scale · (x · Aᵀ) · Bᵀ, A: (r, in), B: (out, r). B starts at zero.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// Prebuilt matmul for the quantized case (holds the same Arc as `weight`).
    qmatmul: Option<QMatMul>,
    bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let qmatmul = match &weight {
            Weight::Quantized(q) => Some(QMatMul::from_arc(q.clone())?),
            Weight::Float(_) => None,
        };
        Ok(Self {
            weight,
            qmatmul,
            bias,
            lora: None,
        })
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        let dims = match &self.weight {
            Weight::Quantized(q) => q.shape().dims().to_vec(),
            Weight::Float(t) => t.dims().to_vec(),
        };
        (dims[0], dims[1])
    }

    /// The block type of a quantized weight, or None for float.
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Quantized(q) => Some(q.dtype()),
            Weight::Float(_) => None,
        }
    }

    /// x: (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, &self.qmatmul) {
            (_, Some(q)) => q.forward(&x.contiguous()?)?,
            (Weight::Float(w), None) => x.broadcast_matmul(&w.t()?)?,
            (Weight::Quantized(_), None) => unreachable!("quantized weight always has a QMatMul"),
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let delta = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
                y + (delta * l.scale)?
            }
            None => Ok(y),
        }
    }
}

impl Linear {
    /// Bytes the base weight and bias occupy (what one forward pass reads).
    pub fn storage_bytes(&self) -> usize {
        let w = match &self.weight {
            Weight::Quantized(q) => q.storage_size_in_bytes(),
            Weight::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
        };
        w + self
            .bias
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }
}
