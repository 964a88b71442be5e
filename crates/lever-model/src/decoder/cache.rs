//! The decoder's per-sequence state (STYLE habit 5: state out of the weights): every layer's
//! keys and values for the tokens seen so far, as tensors (the tensor path, other devices) or
//! as host rows in f16 (lever's attention kernel), converted when a call changes path.

use candle_core::{IndexOp, Result, Tensor};
use half::f16;

use crate::config::DecoderConfig;

/// One layer's keys and values.
#[derive(Debug, Clone)]
enum LayerKv {
    Empty,
    /// (B, K, P, D) tensors: the differentiable path and other devices.
    Tensors(Tensor, Tensor),
    /// Host rows (P, K, D) in f16 as llama.cpp's cache stores them: the CPU inference path,
    /// appended in place without copying what is there.
    Host(Vec<f16>, Vec<f16>),
}

/// Per-sequence state: keys and values of every layer for the tokens seen so far.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerKv>,
    pub(super) len: usize,
    /// K·D: floats per token per layer.
    row: usize,
}

impl Cache {
    pub fn new(cfg: &DecoderConfig) -> Self {
        Self {
            layers: vec![LayerKv::Empty; cfg.num_layers],
            len: 0,
            row: cfg.num_kv_heads * cfg.head_dim,
        }
    }

    /// Tokens held (P).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::Empty);
        self.len = 0;
    }

    /// Keep only the first `len` tokens (to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for kv in self.layers.iter_mut() {
            match kv {
                LayerKv::Empty => {}
                LayerKv::Tensors(k, v) => {
                    *kv = LayerKv::Tensors(k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)
                }
                LayerKv::Host(k, v) => {
                    k.truncate(len * self.row);
                    v.truncate(len * self.row);
                }
            }
        }
        self.len = len;
        Ok(())
    }

    /// A training pass (the fused attention of `ops::grad`) counts its tokens but keeps no
    /// keys: continuing from such a cache is an error, not a silently wrong answer.
    fn check_kept(&self, layer: usize) -> Result<()> {
        if self.len > 0 && matches!(self.layers[layer], LayerKv::Empty) {
            candle_core::bail!("this cache holds no keys (a training pass); start a new one");
        }
        Ok(())
    }

    /// Append this layer's new (B, K, T, D) keys/values; returns all (B, K, P+T, D).
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.check_kept(layer)?;
        let kv = match std::mem::replace(&mut self.layers[layer], LayerKv::Empty) {
            LayerKv::Empty => (k, v),
            LayerKv::Tensors(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            LayerKv::Host(hk, hv) => {
                let (_, kh, _, d) = k.dims4()?;
                let p = hk.len() / (kh * d);
                let dev = k.device();
                let to_t = |x: Vec<f16>| {
                    let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                    Tensor::from_vec(x, (1, p, kh, d), dev)?.transpose(1, 2)
                };
                (
                    Tensor::cat(&[&to_t(hk)?, &k], 2)?,
                    Tensor::cat(&[&to_t(hv)?, &v], 2)?,
                )
            }
        };
        self.layers[layer] = LayerKv::Tensors(kv.0.clone(), kv.1.clone());
        Ok(kv)
    }

    /// This layer's host rows, converted from tensors if an earlier call left them there.
    pub(super) fn host(&mut self, layer: usize) -> Result<(&mut Vec<f16>, &mut Vec<f16>)> {
        self.check_kept(layer)?;
        let kv = &mut self.layers[layer];
        match std::mem::replace(kv, LayerKv::Empty) {
            LayerKv::Empty => *kv = LayerKv::Host(Vec::new(), Vec::new()),
            LayerKv::Tensors(k, v) => {
                let rows = |t: Tensor| {
                    let x = t.i(0)?.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok::<_, candle_core::Error>(x.iter().map(|&v| f16::from_f32(v)).collect())
                };
                *kv = LayerKv::Host(rows(k)?, rows(v)?);
            }
            host => *kv = host,
        }
        match kv {
            LayerKv::Host(k, v) => Ok((k, v)),
            _ => unreachable!("set to Host above"),
        }
    }

    /// This layer's host rows, as [`Cache::host`] made them (for reading several caches at once).
    pub(super) fn host_rows(&self, layer: usize) -> (&[f16], &[f16]) {
        match &self.layers[layer] {
            LayerKv::Host(k, v) => (k.as_slice(), v.as_slice()),
            _ => unreachable!("host() made this layer's cache a host cache"),
        }
    }
}
