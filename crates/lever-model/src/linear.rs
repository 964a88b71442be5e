//! The linear layer of every lever model: a frozen quantized weight (fast inference, GGUF) or a
//! float weight (trainable), an optional bias (Qwen2's q/k/v), and a slot for a LoRA adapter.
//! Adapters wrap the base, they never change it (PEFT `tuners/lora/layer.py`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};

use crate::kernels;

/// y = x · Wᵀ for a frozen quantized W: lever's own kernels (`kernels.rs`) for the block types
/// they cover on CPU, candle's otherwise. Its backward passes the gradient through to x
/// (∂x = ∂y · W, with W dequantized), so adapters before a frozen quantized layer train
/// (QLoRA); W itself gets none.
#[derive(Debug, Clone)]
struct KernelMatMul {
    w: Arc<QTensor>,
    /// Dequantize W and multiply in f32 (gemm) instead of lever's block kernels, which
    /// quantize the activations to 8 bits as llama.cpp does. Training takes this path: at a
    /// thousand tokens per call the f32 gemm is faster (dequantizing W costs one pass over it),
    /// and the loss is the float model's, as PyTorch computes it on the dequantized weights.
    dense: bool,
}

impl CustomOp1 for KernelMatMul {
    fn name(&self) -> &'static str {
        "lever-qmatmul"
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = self.w.dequantize(grad_res.device())?; // (out, in)
        Ok(Some(grad_res.broadcast_matmul(&w)?))
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.w.shape().dims2()?;
        let x = match storage {
            CpuStorage::F32(x) => x,
            _ => candle_core::bail!("lever-qmatmul expects f32 input"),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("lever-qmatmul expects a contiguous input");
        };
        let dims = layout.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("lever-qmatmul: input {dims:?} does not end in {k}");
        }
        let m = (end - start) / k;
        let mut out = dims.to_vec();
        *out.last_mut().unwrap_or(&mut 0) = n;
        if self.dense {
            let cpu = candle_core::Device::Cpu;
            let xt = Tensor::from_slice(&x[start..end], (m, k), &cpu)?;
            let y = xt.matmul(&self.w.dequantize(&cpu)?.t()?)?; // (M, N)
            return Ok((
                CpuStorage::F32(y.flatten_all()?.to_vec1()?),
                Shape::from(out),
            ));
        }
        if !kernels::supports(self.w.dtype()) || k % kernels::QK != 0 {
            // Other block types (reached when gradients flow): candle's quantized matmul.
            let xt = Tensor::from_slice(&x[start..end], (m, k), &candle_core::Device::Cpu)?;
            let y = QMatMul::from_arc(self.w.clone())?.forward(&xt)?;
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            return Ok((CpuStorage::F32(y), Shape::from(out)));
        }
        let w = self.w.data()?;
        let y = kernels::matmul(self.w.dtype(), &w, n, k, &x[start..end], m);
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// The base weight W: (out, in).
#[derive(Debug, Clone)]
pub enum Weight {
    /// Frozen, block-quantized; y = x · Wᵀ runs in candle's quantized kernels.
    Quantized(Arc<QTensor>),
    /// Float (f32 on CPU); trainable when it is a `Var`.
    Float(Tensor),
}

/// A low-rank adapter: y += scale · (dropout(x) · Aᵀ) · Bᵀ, A: (r, in), B: (out, r). B starts
/// at zero.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: Option<LoraDropout>,
}

/// The key that turns adapter dropout off (evaluation, inference).
pub const DROPOUT_OFF: u64 = u64::MAX;

/// Dropout on the adapter's input while training (PEFT's `lora_dropout`). Masks are drawn
/// from a key the trainer sets before each forward pass (shared by all adapters, each mixing
/// in its own salt), so a run and its resumption draw the same masks; `DROPOUT_OFF` disables it.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    pub p: f32,
    pub key: Arc<AtomicU64>,
    pub salt: u64,
}

impl LoraDropout {
    /// x with each value zeroed with probability p and the rest scaled by 1/(1−p), or x
    /// itself when dropout is off.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let key = self.key.load(Ordering::Relaxed);
        if key == DROPOUT_OFF || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng =
            crate::weights::SplitMix64(key ^ self.salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.uniform() < self.p { 0.0 } else { keep })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// Prebuilt matmul for the quantized case (holds the same Arc as `weight`).
    qmatmul: Option<QMatMul>,
    /// lever's kernels, for the quantized types and devices they cover.
    kernel: Option<KernelMatMul>,
    bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let qmatmul = match &weight {
            Weight::Quantized(q) => Some(QMatMul::from_arc(q.clone())?),
            Weight::Float(_) => None,
        };
        let kernel = match &weight {
            Weight::Quantized(q) => Some(KernelMatMul {
                w: q.clone(),
                dense: false,
            }),
            Weight::Float(_) => None,
        };
        Ok(Self {
            weight,
            qmatmul,
            kernel,
            bias,
            lora: None,
        })
    }

    /// Whether lever's kernels compute this layer for input x (CPU, f32, a covered type).
    fn kernel_runs(&self, x: &Tensor) -> bool {
        match &self.weight {
            Weight::Quantized(q) => {
                x.device().is_cpu()
                    && x.dtype() == candle_core::DType::F32
                    && kernels::supports(q.dtype())
                    && q.shape().dims().len() == 2
                    && q.shape().dims()[1] % kernels::QK == 0
            }
            Weight::Float(_) => false,
        }
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
            (_, Some(_)) if x.track_op() && self.kernel.is_some() => {
                let w = self
                    .kernel
                    .as_ref()
                    .unwrap_or_else(|| unreachable!())
                    .w
                    .clone();
                let dense = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
                x.contiguous()?.apply_op1(KernelMatMul { w, dense })?
            }
            (_, Some(_)) if self.kernel_runs(x) => {
                let op = self.kernel.as_ref().unwrap_or_else(|| unreachable!());
                x.contiguous()?.apply_op1_no_bwd(op)?
            }
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
                let x = match &l.dropout {
                    Some(d) => d.apply(x)?,
                    None => x.clone(),
                };
                // The scale goes on the rank-r product, the smallest tensor of the three.
                let xa = (x.broadcast_matmul(&l.a.t()?)? * l.scale)?;
                y + xa.broadcast_matmul(&l.b.t()?)?
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Off: the input itself. On: about p of the values zeroed, the rest scaled by 1/(1−p),
    /// the same mask for the same key, another for another key.
    #[test]
    fn lora_dropout_is_seeded_and_scaled() {
        let x = Tensor::ones(
            (4, 1000),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let d = LoraDropout {
            p: 0.25,
            key: Arc::new(AtomicU64::new(DROPOUT_OFF)),
            salt: 3,
        };
        let masked = |d: &LoraDropout| -> Vec<f32> {
            let y = d.apply(&x).unwrap();
            y.flatten_all().unwrap().to_vec1().unwrap()
        };
        let off = masked(&d);
        assert!(off.iter().all(|v| *v == 1.0));
        d.key.store(42, Ordering::Relaxed);
        let a = masked(&d);
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((900..1100).contains(&zeros), "{zeros} of 4000 dropped");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(a, masked(&d));
        d.key.store(43, Ordering::Relaxed);
        assert_ne!(a, masked(&d));
    }
}
