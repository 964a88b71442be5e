//! Continuous batching's decoding step: several sequences at different positions advance one
//! token together, and each row of the result equals that sequence decoded alone.
#![allow(clippy::unwrap_used)]

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lever_model::testing::{TinyGguf, max_abs_diff};
use lever_model::{Logits, Model};

#[test]
fn a_batched_step_equals_each_sequence_alone() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyGguf {
            dtype,
            ..Default::default()
        }
        .write(&path)
        .unwrap();
        let model = Model::load_gguf(&path, &Device::Cpu).unwrap();
        let dec = &model.decoder;
        let prompts: [&[u32]; 3] = [&[3, 17, 42, 8], &[5], &[9, 1, 2, 7, 7, 30, 11]];
        let next = [4u32, 12, 6];
        // Alone: prefill, then one step.
        let mut alone = Vec::new();
        for (p, &n) in prompts.iter().zip(&next) {
            let mut c = dec.new_cache();
            dec.forward(
                &Tensor::new(*p, &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
                &mut c,
                Logits::Last,
            )
            .unwrap();
            let l = dec
                .forward(
                    &Tensor::new(&[[n]], &Device::Cpu).unwrap(),
                    &mut c,
                    Logits::Last,
                )
                .unwrap();
            alone.push((l.squeeze(0).unwrap().to_vec1::<f32>().unwrap(), c.len()));
        }
        // Together.
        let mut caches: Vec<_> = prompts
            .iter()
            .map(|p| {
                let mut c = dec.new_cache();
                dec.forward(
                    &Tensor::new(*p, &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
                    &mut c,
                    Logits::Last,
                )
                .unwrap();
                c
            })
            .collect();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let rows = dec
            .step_batch(&next, &mut refs)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, (want, len)) in alone.iter().enumerate() {
            let diff = max_abs_diff(&rows[r], want);
            // Quantized weights: the same per-row kernels (seen: 0). F32: gemm sums a 3-row
            // product in another order than a 1-row one (seen: 1.7e-5).
            let bound = if dtype == GgmlDType::F32 { 1e-4 } else { 1e-5 };
            assert!(diff <= bound, "{dtype:?} row {r}: max diff {diff}");
            assert_eq!(caches[r].len(), *len);
        }
        // A second step keeps them apart too.
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let again = dec.step_batch(&[1, 2, 3], &mut refs).unwrap();
        assert_eq!(again.dims(), &[3, dec.config().vocab_size]);
        assert!(dec.step_batch(&[1], &mut []).is_err());
    }
}
