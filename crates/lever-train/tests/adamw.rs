//! lever's AdamW against torch.optim.AdamW (fixture: scripts/make-adamw-fixture.py): the same
//! gradients give the same parameters after each of 6 steps.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};
use lever_train::optim::{AdamW, AdamWParams};
use serde_json::Value;

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers"),
    }
}

#[test]
fn adamw_steps_match_pytorch() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let shapes: [&[usize]; 2] = [&[2, 3], &[4]];
    let vars: Vec<Var> = fx["init"]
        .as_array()
        .unwrap()
        .iter()
        .zip(shapes)
        .map(|(v, s)| {
            Var::from_tensor(&Tensor::from_vec(flat(v), s, &Device::Cpu).unwrap()).unwrap()
        })
        .collect();
    let b = fx["betas"].as_array().unwrap();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: fx["lr"].as_f64().unwrap(),
            beta1: b[0].as_f64().unwrap(),
            beta2: b[1].as_f64().unwrap(),
            eps: fx["eps"].as_f64().unwrap(),
            weight_decay: fx["weight_decay"].as_f64().unwrap(),
        },
    )
    .unwrap();
    let mut worst = 0f32;
    for (step, (grads, after)) in fx["grads"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fx["after"].as_array().unwrap())
        .enumerate()
    {
        // loss = Σ θ·g has gradient g.
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for ((v, g), s) in vars.iter().zip(grads.as_array().unwrap()).zip(shapes) {
            let g = Tensor::from_vec(flat(g), s, &Device::Cpu).unwrap();
            loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.step(&loss.backward().unwrap()).unwrap();
        for (v, want) in vars.iter().zip(after.as_array().unwrap()) {
            let got = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (a, b) in got.iter().zip(flat(want)) {
                worst = worst.max((a - b).abs());
                assert!((a - b).abs() < 1e-6, "step {}: {a} vs torch {b}", step + 1);
            }
        }
    }
    eprintln!("AdamW vs torch, 6 steps: max |param diff| {worst:.2e}");
}
