use candle_core::{Device, Tensor};
use lever_model::{Logits, Model};
use std::time::Instant;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let model = Model::load_gguf(std::path::Path::new(&path), &Device::Cpu).unwrap();
    let dec = &model.decoder;
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 7).collect();
    let bs: Vec<usize> = std::env::var("BS")
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![1, 2, 4, 8, 16]);
    let steps: usize = std::env::var("STEPS")
        .map(|s| s.parse().unwrap())
        .unwrap_or(40);
    for b in bs {
        let mut caches: Vec<_> = (0..b)
            .map(|_| {
                let mut c = dec.new_cache();
                dec.forward(
                    &Tensor::new(prompt.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    &mut c,
                    Logits::Last,
                )
                .unwrap();
                c
            })
            .collect();
        let ids: Vec<u32> = (0..b as u32).map(|i| 200 + i).collect();

        let t = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let l = dec.step_batch(&ids, &mut refs).unwrap();
            let _ = l.to_vec2::<f32>().unwrap();
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        println!(
            "B={b:2} step {ms:7.2} ms  {:7.1} tok/s",
            b as f64 * 1000.0 / ms
        );
    }
}
