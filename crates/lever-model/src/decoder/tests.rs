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
    assert_cache_within(m, label, 1e-5)
}

/// The same within `tol`.
fn assert_cache_within(m: &Decoder, label: &str, tol: f32) -> (Tensor, Tensor) {
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
        assert!(d < tol, "{label} position {t}: {d}");
    }
    assert_eq!(cache.len(), ids.len());
    cache.truncate(4).unwrap();
    let rest = m
        .forward(&x.narrow(1, 4, 5).unwrap(), &mut cache, Logits::All)
        .unwrap();
    let d = max_diff(&rest.squeeze(0).unwrap(), &full.narrow(0, 4, 5).unwrap());
    assert!(d < tol, "{label} truncated and refilled: {d}");
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

/// A tiny Gemma 3: layer 0 local with a window of 3 (shorter than the 9 test tokens), layer 1
/// global, its own local RoPE base and attention scale.
fn tiny_gemma(numerics: Numerics, window: usize) -> Decoder {
    let mut cfg = DecoderConfig::tiny(Arch::Gemma3, 50);
    cfg.numerics = numerics;
    cfg.num_kv_heads = 1;
    cfg.gemma = Some(crate::config::GemmaConfig {
        sliding_window: window,
        global_layers: vec![false, true],
        rope_local_theta: 100.0,
        attn_scale: 0.3,
        norm_offset: 0.0,
    });
    Decoder::load(&mut RandomWeights::new(5, &Device::Cpu), &cfg).unwrap()
}

/// Gemma 3's cache is exact on both numerics (the tensor path's windowed mask, the kernel's
/// windowed keys), the kernel and tensor paths agree, and the window changes the logits of
/// the positions past it only.
#[test]
fn gemma3_cache_and_window_are_exact_on_both_paths() {
    let (x, hf) = assert_cache_exact(&tiny_gemma(Numerics::Transformers, 3), "gemma3");
    let m = tiny_gemma(Numerics::LlamaCpp, 3);
    assert_eq!(m.blocks[0].attn.paths.inference, Path::HostKernels);
    // llama.cpp's GELU rounds its input to f16: an f32 round-off difference between a pass
    // and a step (matrix products of other shapes) can flip one rounding, hence 1e-4.
    let (_, kernel) = assert_cache_within(&m, "gemma3 f16 cache", 1e-4);
    let batch = Tensor::cat(&[&x, &x], 0).unwrap();
    let tensors = m.forward(&batch, &mut m.new_cache(), Logits::All).unwrap();
    let d = max_diff(&tensors.get(0).unwrap(), &kernel);
    assert!(d < 1e-2, "gemma3 kernel vs tensor path: {d}");
    let wide = tiny_gemma(Numerics::Transformers, 100);
    let all = wide
        .forward(&x, &mut wide.new_cache(), Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let inside = max_diff(&all.narrow(0, 0, 3).unwrap(), &hf.narrow(0, 0, 3).unwrap());
    let past = max_diff(&all.narrow(0, 3, 6).unwrap(), &hf.narrow(0, 3, 6).unwrap());
    assert!(
        inside < 1e-6 && past > 1e-4,
        "window: {inside} inside, {past} past"
    );
}

/// The batched decoding step (serve) honours the window: each row equals its sequence's
/// own cached step.
#[test]
fn gemma3_step_batch_equals_single_steps() {
    let m = tiny_gemma(Numerics::LlamaCpp, 3);
    let seqs: [&[u32]; 2] = [&[3, 17, 42, 8, 8, 1, 49], &[5, 9]];
    let mut caches: Vec<Cache> = Vec::new();
    let mut want = Vec::new();
    for s in seqs {
        let mut c = m.new_cache();
        let x = Tensor::new(s, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        m.forward(&x, &mut c, Logits::Last).unwrap();
        let mut alone = c.clone();
        let next = Tensor::new(&[11u32], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        want.push(m.forward(&next, &mut alone, Logits::Last).unwrap());
        caches.push(c);
    }
    let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
    let got = m.step_batch(&[11, 11], &mut refs).unwrap();
    for (r, w) in want.iter().enumerate() {
        let d = max_diff(&got.get(r).unwrap(), &w.squeeze(0).unwrap());
        assert!(d < 1e-5, "row {r}: {d}");
    }
}

/// Training Gemma 3 in full: every norm (q/k and the post norms too) becomes a variable
/// under its GGUF name, the training pass (fused windowed attention with Gemma's scale)
/// gives the inference pass's logits on 9 tokens past a window of 3, and every variable gets
/// a finite, non-zero gradient. (PyTorch's gradients through this block are checked in
/// lever-train's tests/peft.rs on a Hugging Face fixture.)
#[test]
fn gemma3_trains_in_full_with_the_inference_logits() {
    let want_model = tiny_gemma(Numerics::Transformers, 3);
    let mut m = want_model.clone();
    let vars = m.make_trainable().unwrap();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "blk.0.attn_q_norm.weight",
        "blk.1.attn_k_norm.weight",
        "blk.0.post_attention_norm.weight",
        "blk.1.post_ffw_norm.weight",
        "blk.1.ffn_norm.weight",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let x = Tensor::new(&[3u32, 17, 42, 8, 8, 1, 49, 0, 23], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = want_model
        .forward(&x, &mut want_model.new_cache(), Logits::All)
        .unwrap();
    let got = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
    assert!(got.track_op());
    let d = max_diff(&got, &want);
    assert!(d < 1e-5, "training vs inference logits: {d}");
    let loss = candle_nn::loss::cross_entropy(
        &got.squeeze(0).unwrap().narrow(0, 0, 8).unwrap(),
        &x.squeeze(0).unwrap().narrow(0, 1, 8).unwrap(),
    )
    .unwrap();
    let grads = m.backward(&loss).unwrap();
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let size = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(size.is_finite() && size > 0.0, "{name}: {size}");
    }
}
