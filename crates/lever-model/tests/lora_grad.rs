//! Gradients through the decoder with a frozen quantized base (QLoRA): a fresh adapter changes
//! nothing, yet the first layer's adapter receives a gradient from the loss at the output.
#![allow(clippy::unwrap_used)]

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use lever_model::testing::TinyGguf;
use lever_model::{Logits, Lora, Model};

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn first_layer_adapter_gets_a_gradient_through_quantized_layers() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyGguf {
            dtype,
            ..Default::default()
        }
        .write(&path)
        .unwrap();
        let mut model = Model::load_gguf(&path, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[3u32, 17, 42, 8, 9, 1]], &Device::Cpu).unwrap();
        let base = model
            .decoder
            .forward(&ids, &mut model.decoder.new_cache(), Logits::All)
            .unwrap();
        let mut vars = Vec::new();
        for (name, l) in model.decoder.linears_mut() {
            if name.starts_with("blk.0.attn_q") {
                let (out, inp) = l.dims();
                let a =
                    Var::from_tensor(&(Tensor::randn(0f32, 0.02, (4, inp), &Device::Cpu).unwrap()))
                        .unwrap();
                let b = Var::zeros((out, 4), DType::F32, &Device::Cpu).unwrap();
                l.lora = Some(Lora {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 2.0,
                    dropout: None,
                });
                vars.push(a);
                vars.push(b);
            }
        }
        let logits = model
            .decoder
            .forward(&ids, &mut model.decoder.new_cache(), Logits::All)
            .unwrap();
        let same = max_abs(&(&logits - &base).unwrap());
        // With an adapter the forward takes the differentiable tensor path (f32 attention)
        // instead of the inference kernels (llama.cpp's f16 attention): equal up to that.
        let scale = max_abs(&base);
        assert!(
            same / scale < 2e-2,
            "{dtype:?}: a fresh adapter (B = 0) moved logits by {same} (scale {scale})"
        );
        assert!(
            logits.track_op(),
            "{dtype:?}: logits do not depend on the adapter"
        );
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        // B = 0, so A's gradient is zero and B's is not: ∂L/∂B = scale · Σ ∂L/∂y · (x·Aᵀ).
        let gb = max_abs(grads.get(vars[1].as_tensor()).unwrap());
        assert!(
            gb > 0.0 && gb.is_finite(),
            "{dtype:?}: first layer's lora_B gradient {gb}"
        );
    }
}
