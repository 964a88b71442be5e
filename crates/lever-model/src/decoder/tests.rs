//! The decoder's unit tests, on tiny seeded models (STYLE habit 10).
#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::Arch;
use crate::formats::weights::RandomWeights;
use crate::testing::max_abs_diff_tensors as max_diff;

fn tiny(arch: Arch) -> Decoder {
    let cfg = DecoderConfig::tiny(arch, 50);
    Decoder::load(&mut RandomWeights::new(3, &Device::Cpu), &cfg).unwrap()
}

/// One pass over 9 tokens, then the same tokens as single cached steps, then the cache cut
/// back to 4 and refilled with the rest: every logit within 1e-5 of the full pass.
fn assert_cache_exact(m: &Decoder, label: &str) -> (Tensor, Tensor) {
    let ids: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 49, 0, 23];
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = m
        .forward(&x, &mut m.new_cache(), Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = m.new_cache();
    for (t, id) in ids.iter().enumerate() {
        let xi = Tensor::new(&[*id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let step = m
            .forward(&xi, &mut cache, Logits::Last)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = max_diff(&step, &full.get(t).unwrap());
        assert!(d < 1e-5, "{label} position {t}: {d}");
    }
    assert_eq!(cache.len(), ids.len());
    cache.truncate(4).unwrap();
    let rest = m
        .forward(&x.narrow(1, 4, 5).unwrap(), &mut cache, Logits::All)
        .unwrap();
    let d = max_diff(&rest.squeeze(0).unwrap(), &full.narrow(0, 4, 5).unwrap());
    assert!(d < 1e-5, "{label} truncated and refilled: {d}");
    (x, full)
}

/// The KV cache is exact: one pass over T tokens gives the logits of T single steps,
/// and a prompt split in two chunks gives the same as one chunk.
#[test]
fn cached_steps_equal_one_full_pass() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = tiny(arch);
        let (x, full) = assert_cache_exact(&m, &format!("{arch:?}"));
        let mut cache = m.new_cache();
        m.forward(&x.narrow(1, 0, 4).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        let rest = m
            .forward(&x.narrow(1, 4, 5).unwrap(), &mut cache, Logits::All)
            .unwrap();
        let d = max_diff(&rest.squeeze(0).unwrap(), &full.narrow(0, 4, 5).unwrap());
        assert!(d < 1e-5, "{arch:?} chunked prefill: {d}");
    }
}

/// GGUF-style models (f16 cache) run lever's attention kernel on CPU: cached steps and
/// chunked prefill still equal one pass, and a batch of two (which takes the tensor path,
/// f32 attention) gives nearly the same logits.
#[test]
fn attention_kernel_path_agrees_with_the_tensor_path() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut cfg = DecoderConfig::tiny(arch, 50);
        cfg.numerics = Numerics::LlamaCpp;
        let m = Decoder::load(&mut RandomWeights::new(3, &Device::Cpu), &cfg).unwrap();
        let (x, full) = assert_cache_exact(&m, &format!("{arch:?} f16 cache"));
        let batch = Tensor::cat(&[&x, &x], 0).unwrap();
        let tensors = m.forward(&batch, &mut m.new_cache(), Logits::All).unwrap();
        let d = max_diff(&tensors.get(0).unwrap(), &full);
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d > 0.0 && d < 1e-2 * scale,
            "{arch:?} kernel vs tensor path: {d} (scale {scale})"
        );
    }
}

#[test]
fn truncated_cache_recomputes_the_same_logits() {
    let m = tiny(Arch::Llama);
    let x = Tensor::new(&[5u32, 6, 7, 8], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = m.new_cache();
    let a = m.forward(&x, &mut cache, Logits::Last).unwrap();
    cache.truncate(2).unwrap();
    let b = m
        .forward(&x.narrow(1, 2, 2).unwrap(), &mut cache, Logits::Last)
        .unwrap();
    assert!(max_diff(&a, &b) < 1e-5);
}

#[test]
fn a_zero_lora_changes_nothing_and_a_nonzero_one_does() {
    let mut m = tiny(Arch::Llama);
    let x = Tensor::new(&[1u32, 2, 3], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let base = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
    let q = &mut m.blocks[0].attn.q;
    let (out, inp) = q.dims();
    q.lora = Some(crate::linear::Lora {
        a: Tensor::ones((4, inp), candle_core::DType::F32, &Device::Cpu).unwrap(),
        b: Tensor::zeros((out, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        scale: 2.0,
        dropout: None,
    });
    let same = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
    assert_eq!(max_diff(&base, &same), 0.0);
    let q = &mut m.blocks[0].attn.q;
    if let Some(l) = q.lora.as_mut() {
        l.b = Tensor::ones((out, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    }
    let changed = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
    assert!(max_diff(&base, &changed) > 1e-3);
}

/// The paths are chosen at load from the device and the numerics: lever's attention kernel
/// only for llama.cpp numerics and heads it takes, its SwiGLU step and fused training ops on
/// any CPU model.
#[test]
fn paths_follow_the_device_and_the_numerics() {
    let cpu = Device::Cpu;
    let llama = Paths::attention(&cpu, Numerics::LlamaCpp, 64);
    assert_eq!(llama.inference, Path::HostKernels);
    assert_eq!(llama.training, Path::Differentiable);
    let hf = Paths::attention(&cpu, Numerics::Transformers, 64);
    assert_eq!(hf.inference, Path::Tensors);
    assert_eq!(hf.training, Path::Differentiable);
    let wide = Paths::attention(&cpu, Numerics::LlamaCpp, kernels::MAX_HEAD_DIM + 2);
    assert_eq!(wide.inference, Path::Tensors);
    assert_eq!(Paths::mlp(&cpu).inference, Path::HostKernels);
    for numerics in [Numerics::LlamaCpp, Numerics::Transformers] {
        let mut cfg = DecoderConfig::tiny(Arch::Llama, 50);
        cfg.numerics = numerics;
        let m = Decoder::load(&mut RandomWeights::new(3, &cpu), &cfg).unwrap();
        let want = Paths::attention(&cpu, numerics, cfg.head_dim);
        assert!(
            m.blocks.iter().all(|b| b.attn.paths == want),
            "{numerics:?}"
        );
    }
}
