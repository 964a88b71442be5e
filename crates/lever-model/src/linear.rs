//! The linear layer of every lever model: a frozen quantized weight (fast inference, GGUF) or a
//! float weight (trainable), an optional bias (Qwen2's q/k/v), and a slot for a LoRA adapter.
//! Adapters wrap the base, they never change it (PEFT `tuners/lora/layer.py`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Module, Result, Shape, Storage, Tensor,
};

use crate::ops::host::{Gemm, HostRows, Mat, f32_slice, gemm_into, gemm_new};

use crate::kernels;
use crate::qweight::QWeight;

/// y = x · Wᵀ for a frozen quantized W: lever's own kernels (`kernels/quant_matmul.rs`, `kernels/kquant.rs`) for the block types
/// they cover on CPU, candle's otherwise. Its backward passes the gradient through to x
/// (∂x = ∂y · W, with W dequantized), so adapters before a frozen quantized layer train
/// (QLoRA); W itself gets none.
#[derive(Debug, Clone)]
struct KernelMatMul {
    w: Arc<QWeight>,
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
        if let Some(p) = self.w.packed() {
            return Ok((
                CpuStorage::F32(p.matmul(&x[start..end], m)),
                Shape::from(out),
            ));
        }
        if !kernels::preferred(self.w.dtype(), k) {
            // Other block types (reached when gradients flow): candle's quantized matmul.
            let xt = Tensor::from_slice(&x[start..end], (m, k), &candle_core::Device::Cpu)?;
            let y = QMatMul::from_arc(self.w.qtensor()?)?.forward(&xt)?;
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            return Ok((CpuStorage::F32(y), Shape::from(out)));
        }
        let q = self.w.qtensor()?;
        let y = kernels::matmul(q.dtype(), &q.data()?, n, k, &x[start..end], m);
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// A frozen quantized layer with its LoRA adapter as one operation (the training path):
/// y = x · Wᵀ + scale · (x · Aᵀ) · Bᵀ with W dequantized to f32, x: (M, in), A: (r, in),
/// B: (out, r). Its backward gives x, A and B their gradients straight from gemm calls
/// (∂x = ∂y · W + scale · (∂y · B) · A, ∂A = scale · (∂y · B)ᵀ · x, ∂B = scale · ∂yᵀ · (x · Aᵀ)),
/// where the elementary version is seven graph nodes, each gradient of which candle
/// materializes and sums separately.
#[derive(Debug, Clone)]
struct LoraMatMul {
    w: Arc<QWeight>,
    scale: f32,
}

impl LoraMatMul {
    /// W as f32 rows (out, in).
    fn dense(&self) -> Result<Vec<f32>> {
        self.w.dequantize_vec()
    }
}

impl CustomOp3 for LoraMatMul {
    fn name(&self) -> &'static str {
        "lever-lora-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.w.shape().dims2()?;
        let (r, ka) = l2.shape().dims2()?;
        let (nb, rb) = l3.shape().dims2()?;
        let dims = l1.dims();
        if dims.last() != Some(&k) || ka != k || nb != n || rb != r {
            candle_core::bail!(
                "lora matmul: x {dims:?}, A {:?}, B {:?} for W ({n}, {k})",
                l2.dims(),
                l3.dims()
            );
        }
        let x = f32_slice(s1, l1, self.name())?;
        let a = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let m = x.len() / k;
        let w = self.dense()?;
        let mut y = vec![0f32; m * n];
        let mut xa = vec![0f32; m * r];
        // y = x·Wᵀ; xa = x·Aᵀ; y += scale · xa·Bᵀ
        gemm_into(&mut y, Mat::rows(x, k), Mat::t(&w, k), Gemm::new(m, n, k));
        gemm_into(&mut xa, Mat::rows(x, k), Mat::t(a, k), Gemm::new(m, r, k));
        gemm_into(
            &mut y,
            Mat::rows(&xa, r),
            Mat::t(b, r),
            Gemm::new(m, n, r).accumulate().scaled(self.scale),
        );
        let mut out = dims.to_vec();
        *out.last_mut().unwrap_or(&mut 0) = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (hx, ha, hb, hg) = (
            HostRows::new(x)?,
            HostRows::new(a)?,
            HostRows::new(b)?,
            HostRows::new(grad)?,
        );
        let dev = x.device();
        let needs_dx = x.track_op();
        let (dx, da, db) = hx.with(name, |xs| {
            ha.with(name, |as_| {
                hb.with(name, |bs| {
                    hg.with(name, |dy| self.grads(xs, as_, bs, dy, needs_dx))
                })
            })
        })?;
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(da, a.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

impl LoraMatMul {
    /// (∂x if wanted, ∂A, ∂B) from x (M, in), A (r, in), B (out, r) and ∂y (M, out).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        xs: &[f32],
        as_: &[f32],
        bs: &[f32],
        dy: &[f32],
        needs_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>, Vec<f32>)> {
        let (n, k) = self.w.shape().dims2()?;
        let r = as_.len() / k;
        let m = xs.len() / k;
        let s = self.scale;
        // xa = x·Aᵀ (M, r); dxa = scale · dy·B (M, r)
        let (mut xa, mut dxa) = (vec![0f32; m * r], vec![0f32; m * r]);
        gemm_into(
            &mut xa,
            Mat::rows(xs, k),
            Mat::t(as_, k),
            Gemm::new(m, r, k),
        );
        gemm_into(
            &mut dxa,
            Mat::rows(dy, n),
            Mat::rows(bs, r),
            Gemm::new(m, r, n).scaled(s),
        );
        // dB = scale · dyᵀ·xa (out, r); dA = dxaᵀ·x (r, in)
        let (mut db, mut da) = (vec![0f32; n * r], vec![0f32; r * k]);
        gemm_into(
            &mut db,
            Mat::t(dy, n),
            Mat::rows(&xa, r),
            Gemm::new(n, r, m).scaled(s),
        );
        gemm_into(
            &mut da,
            Mat::t(&dxa, r),
            Mat::rows(xs, k),
            Gemm::new(r, k, m),
        );
        // dx = dy·W + dxa·A, only when x needs it (the first layer's input does not).
        let dx = if needs_dx {
            let w = self.dense()?;
            let mut dx = vec![0f32; m * k];
            gemm_into(
                &mut dx,
                Mat::rows(dy, n),
                Mat::rows(&w, k),
                Gemm::new(m, k, n),
            );
            gemm_into(
                &mut dx,
                Mat::rows(&dxa, r),
                Mat::rows(as_, k),
                Gemm::new(m, k, r).accumulate(),
            );
            Some(dx)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// y = x · Wᵀ for a float W (out, in) and x (..., in) as one operation with its own backward
/// (∂x = ∂y · W, ∂W = ∂yᵀ · x over all rows at once): candle's broadcast matmul would
/// expand W over the batch, compute a per-batch ∂W and sum it, and transpose both ways.
/// With a `WeightGrad`, ∂W goes there instead of to candle's backward.
#[derive(Debug, Clone)]
struct DenseMatMul {
    weight_grad: Option<WeightGrad>,
}

/// Where a trainable float weight's gradient collects during a backward pass. candle's
/// backward adds every gradient it is given into a zeroed tensor of the same size (one more
/// allocation and pass per weight: at full fine-tuning, 540 MB each, per step); the layer
/// keeps ∂W here instead, and `Linear::take_weight_grad` moves it into the gradient store.
///
/// One slot per thread: a backward pass adds and takes on the thread that runs it, and
/// training may run several at once over the same weights (one per batch part, lever-train's
/// `lanes.rs`), each of which must get its own gradient and no other, in the same order
/// every time.
#[derive(Debug, Clone, Default)]
pub struct WeightGrad(Arc<Mutex<Vec<(ThreadId, Tensor)>>>);

impl WeightGrad {
    /// Add `g` to what this thread's backward pass has collected.
    pub(crate) fn add(&self, g: Tensor) -> Result<()> {
        let me = std::thread::current().id();
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slots.iter_mut().find(|(id, _)| *id == me) {
            Some((_, prev)) => *prev = (&*prev + g)?,
            None => slots.push((me, g)),
        }
        Ok(())
    }

    /// What this thread's backward pass collected.
    fn take(&self) -> Option<Tensor> {
        let me = std::thread::current().id();
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = slots.iter().position(|(id, _)| *id == me)?;
        Some(slots.swap_remove(i).1)
    }
}

impl CustomOp2 for DenseMatMul {
    fn name(&self) -> &'static str {
        "lever-dense-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l2.shape().dims2()?;
        let dims = l1.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("dense matmul: x {dims:?} for W ({n}, {k})");
        }
        let (x, w) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let m = x.len() / k;
        let y = gemm_new(Mat::rows(x, k), Mat::t(w, k), Gemm::new(m, n, k));
        let mut out = dims.to_vec();
        *out.last_mut().unwrap_or(&mut 0) = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        // Read in place (x and W are contiguous, as the forward took them, so `contiguous` is
        // free): a copy of W here would be one more pass over every weight per step.
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let (dg, dl) = grad.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(wc), Storage::Cpu(dc)) = (&*xg, &*wg, &*dg) else {
            candle_core::bail!("{}: expects CPU tensors", self.name());
        };
        let (xs, ws, dy) = (
            f32_slice(xc, xl, self.name())?,
            f32_slice(wc, wl, self.name())?,
            f32_slice(dc, dl, self.name())?,
        );
        let m = xs.len() / k;
        let dx = if x.track_op() {
            let dx = gemm_new(Mat::rows(dy, n), Mat::rows(ws, k), Gemm::new(m, k, n));
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = gemm_new(Mat::t(dy, n), Mat::rows(xs, k), Gemm::new(n, k, m));
            let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
            match &self.weight_grad {
                Some(slot) => {
                    slot.add(dw)?;
                    None
                }
                None => Some(dw),
            }
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// A trainable float weight (out, in) with the slot its gradient collects in.
#[derive(Debug, Clone)]
pub(crate) struct TrainedWeight {
    pub(crate) w: Tensor,
    pub(crate) grad: WeightGrad,
}

/// The base weight W: (out, in).
#[derive(Debug, Clone)]
pub enum Weight {
    /// Frozen, block-quantized; y = x · Wᵀ runs in lever's kernels (`kernels/quant_matmul.rs`,
    /// `kernels/packed.rs`) on CPU, candle's elsewhere.
    Quantized(Arc<QWeight>),
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
    /// Whether `apply` changes anything now.
    fn active(&self) -> bool {
        self.p > 0.0 && self.key.load(Ordering::Relaxed) != DROPOUT_OFF
    }

    /// x with each value zeroed with probability p and the rest scaled by 1/(1−p), or x
    /// itself when dropout is off.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let key = self.key.load(Ordering::Relaxed);
        if key == DROPOUT_OFF || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = crate::rng::SplitMix64(key ^ self.salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
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
    /// Prebuilt candle matmul for a quantized weight kept in GGUF blocks (shares its storage).
    qmatmul: Option<QMatMul>,
    /// lever's kernels, for the quantized types and devices they cover.
    kernel: Option<KernelMatMul>,
    bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Set by `collect_weight_grad` (full fine-tuning).
    weight_grad: Option<WeightGrad>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let qmatmul = match &weight {
            Weight::Quantized(q) if q.packed().is_none() => Some(QMatMul::from_arc(q.qtensor()?)?),
            Weight::Quantized(_) => None,
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
            weight_grad: None,
        })
    }

    /// Whether lever's kernels compute this layer for input x (CPU, f32, a covered type).
    fn kernel_runs(&self, x: &Tensor) -> bool {
        match &self.weight {
            Weight::Quantized(q) => {
                x.device().is_cpu()
                    && x.dtype() == candle_core::DType::F32
                    && q.shape().dims().len() == 2
                    && (q.packed().is_some() || kernels::preferred(q.dtype(), q.shape().dims()[1]))
            }
            Weight::Float(_) => false,
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// From now on the backward pass of this layer's fused CPU matmul leaves the float
    /// weight's gradient in the layer, for `take_weight_grad`, instead of in the gradient
    /// store `backward` returns (see `WeightGrad`).
    pub fn collect_weight_grad(&mut self) {
        self.weight_grad = Some(WeightGrad::default());
    }

    /// Move the weight gradient collected since the last call into `grads`, adding it to any
    /// gradient of the same weight already there (a tied embedding's lookup).
    pub fn take_weight_grad(&self, grads: &mut GradStore) -> Result<()> {
        let (Some(slot), Weight::Float(w)) = (&self.weight_grad, &self.weight) else {
            return Ok(());
        };
        let Some(g) = slot.take() else {
            return Ok(());
        };
        let g = match grads.get(w) {
            Some(other) => (g + other)?,
            None => g,
        };
        grads.insert(w, g);
        Ok(())
    }

    /// The weight (out, in) and where its gradient collects, when this layer is a plain
    /// trainable f32 CPU weight (`collect_weight_grad`; no bias, no adapter): what the fused
    /// training ops of `ops::sublayer` multiply with directly.
    pub(crate) fn trained_weight(&self) -> Option<TrainedWeight> {
        match (&self.weight, &self.weight_grad, &self.bias, &self.lora) {
            (Weight::Float(w), Some(grad), None, None)
                if w.device().is_cpu()
                    && w.dtype() == candle_core::DType::F32
                    && w.rank() == 2
                    && w.is_contiguous() =>
            {
                Some(TrainedWeight {
                    w: w.clone(),
                    grad: grad.clone(),
                })
            }
            _ => None,
        }
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
        if let (Some(l), Some(k)) = (&self.lora, &self.kernel)
            && (x.track_op() || l.a.track_op() || l.b.track_op())
            && x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && !l.dropout.as_ref().is_some_and(LoraDropout::active)
        {
            // Training an adapter on a frozen quantized layer: one fused node.
            let op = LoraMatMul {
                w: k.w.clone(),
                scale: l.scale as f32,
            };
            let y = x
                .contiguous()?
                .apply_op3(&l.a.contiguous()?, &l.b.contiguous()?, op)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let y = match (&self.weight, &self.kernel) {
            (Weight::Quantized(_), Some(kernel)) if x.track_op() => {
                let dense = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
                let op = KernelMatMul {
                    dense,
                    ..kernel.clone()
                };
                x.contiguous()?.apply_op1(op)?
            }
            (Weight::Quantized(_), Some(kernel)) if self.kernel_runs(x) => {
                x.contiguous()?.apply_op1_no_bwd(kernel)?
            }
            (Weight::Quantized(q), _) => match &self.qmatmul {
                Some(qm) => qm.forward(&x.contiguous()?)?,
                // Packed (CPU) weights with an input the kernels do not take (not f32).
                None => {
                    let w = q.dequantize(x.device())?;
                    x.to_dtype(candle_core::DType::F32)?
                        .broadcast_matmul(&w.t()?)?
                        .to_dtype(x.dtype())?
                }
            },
            (Weight::Float(w), _)
                if (x.track_op() || w.track_op())
                    && x.device().is_cpu()
                    && x.dtype() == candle_core::DType::F32
                    && w.dtype() == candle_core::DType::F32 =>
            {
                let op = DenseMatMul {
                    weight_grad: self.weight_grad.clone(),
                };
                x.contiguous()?.apply_op2(&w.contiguous()?, op)?
            }
            (Weight::Float(w), _) => x.broadcast_matmul(&w.t()?)?,
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
    use candle_core::quantized::QTensor;

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

    /// The fused adapter-on-quantized-base node equals the elementary ops on the dequantized
    /// weight: values, and gradients of a weighted sum in x, A and B (within 1e-4 relative).
    #[test]
    fn fused_lora_on_a_quantized_base_equals_the_elementary_one() {
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        let mut rng = crate::testing::Randn::new(11);
        let mut randn = |shape: &[usize]| rng.tensor(shape);
        let (m, k, n, r) = (6, 64, 48, 4);
        let w = QTensor::quantize(&randn(&[n, k]), GgmlDType::Q4_1).unwrap();
        let wd = w.dequantize(&dev).unwrap();
        let x = Var::from_tensor(&randn(&[2, m / 2, k])).unwrap();
        let a = Var::from_tensor(&randn(&[r, k])).unwrap();
        let b = Var::from_tensor(&randn(&[n, r])).unwrap();
        let mut lin = Linear::new(Weight::Quantized(Arc::new(QWeight::new(w))), None).unwrap();
        lin.lora = Some(Lora {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.5,
            dropout: None,
        });
        let fused = lin.forward(x.as_tensor()).unwrap();
        let xa = (x
            .as_tensor()
            .broadcast_matmul(&a.as_tensor().t().unwrap())
            .unwrap()
            * 0.5)
            .unwrap();
        let plain = (x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap()
            + xa.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap())
        .unwrap();
        let rel = |p: &Tensor, q: &Tensor| {
            let d = (p - q).unwrap().abs().unwrap().max_all().unwrap();
            let s = q
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            d.to_scalar::<f32>().unwrap() / s.max(1e-6)
        };
        assert!(rel(&fused, &plain) < 1e-5, "values");
        let weights = randn(fused.dims());
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let (gf, gp) = (
            loss(&fused).backward().unwrap(),
            loss(&plain).backward().unwrap(),
        );
        for (v, what) in [(&x, "x"), (&a, "A"), (&b, "B")] {
            let d = rel(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient of {what} differs by {d} (relative)");
        }
    }

    /// The fused float product equals candle's broadcast matmul: values and the gradients of
    /// a weighted sum in x and W.
    #[test]
    fn fused_float_matmul_equals_the_elementary_one() {
        use candle_core::Var;
        let mut rng = crate::testing::Randn::new(12);
        let mut randn = |shape: &[usize]| rng.tensor(shape);
        let x = Var::from_tensor(&randn(&[2, 3, 16])).unwrap();
        let w = Var::from_tensor(&randn(&[24, 16])).unwrap();
        let lin = Linear::new(Weight::Float(w.as_tensor().clone()), None).unwrap();
        let fused = lin.forward(x.as_tensor()).unwrap();
        let plain = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            let d = (p - q).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        assert!(diff(&fused, &plain) < 1e-4, "values");
        let weights = randn(fused.dims());
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let (gf, gp) = (
            loss(&fused).backward().unwrap(),
            loss(&plain).backward().unwrap(),
        );
        for (v, what) in [(&x, "x"), (&w, "W")] {
            let d = diff(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient of {what} differs by {d}");
        }
    }

    /// A layer that collects its weight gradient (full fine-tuning) gives candle's gradients
    /// once `take_weight_grad` moves it in, added to another use of the same weight (as a
    /// tied embedding's lookup), and holds nothing afterwards.
    #[test]
    fn a_collected_weight_gradient_equals_candles() {
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        let mut rng = crate::rng::SplitMix64(13);
        let mut randn = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let x = Var::from_tensor(&randn(&[2, 3, 16])).unwrap();
        let w = Var::from_tensor(&randn(&[24, 16])).unwrap();
        let weights = randn(&[2, 3, 24]);
        let plain = Linear::new(Weight::Float(w.as_tensor().clone()), None).unwrap();
        let mut collecting = plain.clone();
        collecting.collect_weight_grad();
        // Σ weights ⊙ (x·Wᵀ) + Σ W²: the second term reaches W outside the layer.
        let loss = |lin: &Linear| {
            let y = (lin.forward(x.as_tensor()).unwrap() * &weights).unwrap();
            let w2 = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            (y.sum_all().unwrap() + w2).unwrap()
        };
        let want = loss(&plain).backward().unwrap();
        let mut got = loss(&collecting).backward().unwrap();
        let before = got.get(w.as_tensor()).unwrap().clone();
        collecting.take_weight_grad(&mut got).unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            let d = (p - q).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        let (gw, ww) = (
            got.get(w.as_tensor()).unwrap(),
            want.get(w.as_tensor()).unwrap(),
        );
        assert!(diff(&before, &(w.as_tensor() * 2.0).unwrap()) < 1e-6);
        assert!(
            diff(gw, ww) < 1e-5,
            "gradient of W differs by {}",
            diff(gw, ww)
        );
        let (gx, wx) = (
            got.get(x.as_tensor()).unwrap(),
            want.get(x.as_tensor()).unwrap(),
        );
        assert_eq!(diff(gx, wx), 0.0);
        let again = got.get(w.as_tensor()).unwrap().clone();
        collecting.take_weight_grad(&mut got).unwrap();
        assert_eq!(diff(got.get(w.as_tensor()).unwrap(), &again), 0.0);
    }
}
