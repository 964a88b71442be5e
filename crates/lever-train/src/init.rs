//! Initial weights for a model trained from scratch, as GPT-2 and nanoGPT draw them
//! (nanoGPT `model.py` `_init_weights` and the residual scaling after it; Radford et al.
//! 2019, section 2.3): every matrix and the embedding from N(0, 0.02²), the projections that
//! write into the residual stream (attention output, MLP down) from N(0, (0.02/√(2·L))²),
//! biases zero, norm weights one. Seeded through SplitMix64, drawn in the decoder's load
//! order, so a seed gives the same model everywhere.

use candle_core::{DType, Device, Tensor};
use lever_model::formats::weights::{Embedding, Param, WeightSource};
use lever_model::rng::SplitMix64;
use lever_model::{Decoder, DecoderConfig, Linear, Weight};

/// The standard deviation of every matrix but the residual projections.
pub const STD: f32 = 0.02;

/// A [`WeightSource`] of GPT-2-initialized weights.
pub struct Gpt2Init {
    rng: SplitMix64,
    device: Device,
    layers: usize,
    tied: bool,
}

impl Gpt2Init {
    pub fn new(seed: u64, cfg: &DecoderConfig, device: &Device) -> Self {
        Self {
            rng: SplitMix64(seed),
            device: device.clone(),
            layers: cfg.num_layers,
            tied: cfg.tie_embeddings,
        }
    }

    fn normal(&mut self, dims: &[usize], std: f32) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.normal() * std).collect();
        Tensor::from_vec(v, dims, &self.device)
    }
}

impl WeightSource for Gpt2Init {
    fn device(&self) -> &Device {
        &self.device
    }

    fn has(&self, p: Param) -> bool {
        !(self.tied && p == Param::Output)
    }

    fn linear(
        &mut self,
        p: Param,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> lever_model::Result<Linear> {
        let std = match p {
            Param::O(_) | Param::Down(_) => STD / (2.0 * self.layers as f32).sqrt(),
            _ => STD,
        };
        let w = self.normal(&[out, inp], std)?;
        let b = if bias {
            Some(Tensor::zeros(out, DType::F32, &self.device)?)
        } else {
            None
        };
        Ok(Linear::new(Weight::Float(w), b)?)
    }

    fn vector(&mut self, _p: Param, n: usize) -> lever_model::Result<Tensor> {
        Ok(Tensor::ones(n, DType::F32, &self.device)?)
    }

    fn embedding(
        &mut self,
        _p: Param,
        vocab: usize,
        hidden: usize,
    ) -> lever_model::Result<Embedding> {
        Ok(Embedding::Float(self.normal(&[vocab, hidden], STD)?))
    }
}

/// A new decoder for `cfg`, GPT-2-initialized from `seed`.
pub fn new_decoder(
    cfg: &DecoderConfig,
    seed: u64,
    device: &Device,
) -> lever_model::Result<Decoder> {
    Decoder::load(&mut Gpt2Init::new(seed, cfg, device), cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lever_model::decoder::ParamRef;

    fn std_of(t: &Tensor) -> f64 {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    }

    /// The residual projections are drawn 1/√(2·L) narrower than the rest; norms start at
    /// one; the same seed gives the same weights.
    #[test]
    fn residual_projections_are_scaled_down() {
        let mut cfg = DecoderConfig::tiny(lever_model::Arch::Llama, 50);
        cfg.hidden_size = 64;
        cfg.intermediate_size = 256;
        cfg.num_layers = 8;
        cfg.head_dim = 16;
        cfg.tie_embeddings = true;
        let dev = Device::Cpu;
        let d = new_decoder(&cfg, 7, &dev).unwrap();
        assert!(d.tied());
        let scaled = 0.02 / 4.0; // √(2·8)
        for (p, r) in d.params() {
            match (p, r) {
                (Param::O(_) | Param::Down(_), ParamRef::Linear(l)) => {
                    let Weight::Float(w) = l.weight() else {
                        panic!()
                    };
                    let s = std_of(w);
                    assert!((s - scaled).abs() < 0.1 * scaled, "{p:?}: {s}");
                }
                (_, ParamRef::Linear(l)) => {
                    let Weight::Float(w) = l.weight() else {
                        panic!()
                    };
                    let s = std_of(w);
                    assert!((s - 0.02).abs() < 0.002, "{p:?}: {s}");
                }
                (_, ParamRef::Vector(v)) => {
                    assert_eq!(v.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
                }
                (_, ParamRef::Embedding(Embedding::Float(e))) => {
                    assert!((std_of(e) - 0.02).abs() < 0.002);
                }
                _ => panic!("{p:?}"),
            }
        }
        let again = new_decoder(&cfg, 7, &dev).unwrap();
        let other = new_decoder(&cfg, 8, &dev).unwrap();
        let first = |d: &Decoder| match d.params()[1].1 {
            ParamRef::Vector(_) => match d.params()[2].1 {
                ParamRef::Linear(l) => match l.weight() {
                    Weight::Float(w) => w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    _ => panic!(),
                },
                _ => panic!(),
            },
            _ => panic!(),
        };
        assert_eq!(first(&d), first(&again));
        assert_ne!(first(&d), first(&other));
    }
}
