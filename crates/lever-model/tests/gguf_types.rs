//! Every GGUF block type candle reads loads into the one decoder and computes logits close to
//! the same weights in F32 (each type's tolerance reflects its bits per weight).
#![allow(clippy::unwrap_used)]

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lever_model::testing::{TinyGguf, max_abs_diff};
use lever_model::{Logits, Model};

fn logits(dtype: GgmlDType, dir: &std::path::Path) -> (Vec<f32>, String) {
    let path = dir.join(format!("tiny-{dtype:?}.gguf"));
    TinyGguf {
        dtype,
        ..Default::default()
    }
    .write(&path)
    .expect("write gguf");
    let model = Model::load_gguf(&path, &Device::Cpu).expect("load");
    let ids = model
        .tokenizer
        .encode("hello world, 42!", false)
        .expect("encode");
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = model
        .decoder
        .forward(&x, &mut model.decoder.new_cache(), Logits::All)
        .unwrap();
    (
        out.flatten_all().unwrap().to_vec1().unwrap(),
        model.info.quantization,
    )
}

#[test]
fn every_block_type_loads_and_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, q) = logits(GgmlDType::F32, dir.path());
    assert_eq!(q, "F32");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "degenerate tiny model");
    // Relative tolerance (max |diff| / max |logit|) per type.
    let types = [
        (GgmlDType::F16, 0.01),
        (GgmlDType::BF16, 0.03),
        (GgmlDType::Q8_0, 0.03),
        (GgmlDType::Q5_0, 0.1),
        (GgmlDType::Q5_1, 0.1),
        (GgmlDType::Q4_0, 0.2),
        (GgmlDType::Q4_1, 0.2),
        (GgmlDType::Q6K, 0.1),
        (GgmlDType::Q5K, 0.1),
        (GgmlDType::Q4K, 0.2),
        (GgmlDType::Q3K, 0.4),
        (GgmlDType::Q2K, 0.8),
    ];
    for (dtype, tol) in types {
        let (got, q) = logits(dtype, dir.path());
        assert_eq!(
            q,
            format!("{dtype:?}").to_uppercase(),
            "reported quantization"
        );
        let diff = max_abs_diff(&got, &reference);
        let rel = diff / scale;
        eprintln!("{dtype:?}: max |diff| / max |logit| = {rel:.4}");
        assert!(rel < tol, "{dtype:?}: {rel} >= {tol}");
        assert!(
            rel > 0.0 || matches!(dtype, GgmlDType::F16),
            "{dtype:?} identical to F32?"
        );
    }
}
