//! LoRA adapters on the decoder's linear layers, and their Hugging Face PEFT layout.
//! y = W·x + (α/r)·B·A·x with A: (r, in) drawn like PEFT's default (Kaiming-uniform with
//! a = √5, i.e. U(−1/√in, 1/√in)) and B: (out, r) zero, so a fresh adapter changes nothing
//! (PEFT `tuners/lora/layer.py`, `reset_lora_parameters`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lever_model::ops::RopeStyle;
use lever_model::rng::SplitMix64;
use lever_model::{DROPOUT_OFF, Decoder, Lora, LoraDropout};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::error::{Error, Result};

/// The projections an adapter can target, by their PEFT (Hugging Face) module names.
const TARGETS: [(&str, &str, &str); 7] = [
    // (short name, GGUF suffix, HF module path under layers.N)
    ("q", "attn_q", "self_attn.q_proj"),
    ("k", "attn_k", "self_attn.k_proj"),
    ("v", "attn_v", "self_attn.v_proj"),
    ("o", "attn_output", "self_attn.o_proj"),
    ("gate", "ffn_gate", "mlp.gate_proj"),
    ("up", "ffn_up", "mlp.up_proj"),
    ("down", "ffn_down", "mlp.down_proj"),
];

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Probability of zeroing each input value of an adapter while training (PEFT's
    /// `lora_dropout`).
    pub dropout: f64,
    /// Short names: q, k, v, o, gate, up, down.
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// `q,k,v,o,gate,up,down` or `all-linear`.
    pub fn parse_targets(spec: &str) -> Result<Vec<String>> {
        if spec == "all-linear" {
            return Ok(TARGETS.iter().map(|t| t.0.to_string()).collect());
        }
        let mut out = Vec::new();
        for t in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let t = t.trim_end_matches("_proj");
            if !TARGETS.iter().any(|x| x.0 == t) {
                return Err(Error::Config {
                    what: "--lora-targets".into(),
                    problem: format!(
                        "unknown target `{t}` (q, k, v, o, gate, up, down, all-linear)"
                    ),
                });
            }
            if !out.iter().any(|x: &String| x == t) {
                out.push(t.to_string());
            }
        }
        if out.is_empty() {
            return Err(Error::Config {
                what: "--lora-targets".into(),
                problem: "no targets".into(),
            });
        }
        Ok(out)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The adapters attached to a decoder: per layer and target, A and B as trainable variables.
pub struct LoraSet {
    pub config: LoraConfig,
    /// (layer, short target name, A, B)
    pub adapters: Vec<(usize, String, Var, Var)>,
    /// The dropout key all adapters read (see `LoraDropout`); `DROPOUT_OFF` until the trainer
    /// sets one.
    pub dropout_key: Arc<AtomicU64>,
}

impl LoraSet {
    /// Attach fresh adapters to every targeted projection of `decoder`.
    pub fn attach(decoder: &mut Decoder, config: &LoraConfig, seed: u64) -> Result<LoraSet> {
        if config.r == 0 {
            return Err(Error::Config {
                what: "--lora-r".into(),
                problem: "must be at least 1".into(),
            });
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Config {
                what: "--lora-dropout".into(),
                problem: format!("{} is not in [0, 1)", config.dropout),
            });
        }
        let mut rng = SplitMix64(seed);
        let mut adapters = Vec::new();
        let dropout_key = Arc::new(AtomicU64::new(DROPOUT_OFF));
        let scale = config.scale();
        for (name, linear) in decoder.linears_mut() {
            let Some((layer, target)) = split_name(&name) else {
                continue;
            };
            if !config.targets.iter().any(|t| t == target) {
                continue;
            }
            let (out, inp) = linear.dims();
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..config.r * inp)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), &Device::Cpu)?)?;
            let b = Var::zeros((out, config.r), DType::F32, &Device::Cpu)?;
            linear.lora = Some(Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                dropout: (config.dropout > 0.0).then(|| LoraDropout {
                    p: config.dropout as f32,
                    key: dropout_key.clone(),
                    salt: adapters.len() as u64 + 1,
                }),
            });
            adapters.push((layer, target.to_string(), a, b));
        }
        Ok(LoraSet {
            config: config.clone(),
            adapters,
            dropout_key,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|(_, _, a, b)| [a.clone(), b.clone()])
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.adapters
            .iter()
            .map(|(_, _, a, b)| a.elem_count() + b.elem_count())
            .sum()
    }

    /// Save in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors` with keys
    /// `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` etc. GGUF Llama files
    /// store Q and K with rows permuted for interleaved RoPE (llama.cpp's converter); the
    /// rows of their B matrices are permuted back so the adapter fits the Hugging Face base.
    /// Written to a temporary folder, fsynced, then renamed into place.
    pub fn save_peft(&self, decoder: &Decoder, dir: &Path, base_model: &str) -> Result<()> {
        let cfg = decoder.config();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (layer, target, a, b) in &self.adapters {
            let module = TARGETS
                .iter()
                .find(|t| t.0 == target)
                .map(|t| t.2)
                .unwrap_or_default();
            let mut b = b.as_tensor().clone();
            if cfg.rope_style == RopeStyle::Interleaved {
                match target.as_str() {
                    "q" => b = unpermute_rows(&b, cfg.num_heads)?,
                    "k" => b = unpermute_rows(&b, cfg.num_kv_heads)?,
                    _ => {}
                }
            }
            let key = format!("base_model.model.model.layers.{layer}.{module}");
            tensors.insert(format!("{key}.lora_A.weight"), a.as_tensor().contiguous()?);
            tensors.insert(format!("{key}.lora_B.weight"), b.contiguous()?);
        }
        let modules: Vec<String> = self
            .config
            .targets
            .iter()
            .filter_map(|t| TARGETS.iter().find(|x| x.0 == t))
            .map(|t| t.2.rsplit('.').next().unwrap_or(t.2).to_string())
            .collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
        });
        let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
        let io = |name: &str| {
            let path = dir.join(name);
            move |source| Error::Io { path, source }
        };
        lever_model::fsutil::write_atomic(dir, |tmp| {
            std::fs::create_dir(tmp).map_err(io(""))?;
            std::fs::write(tmp.join("adapter_config.json"), text)
                .map_err(io("adapter_config.json"))?;
            candle_core::safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))?;
            Ok(())
        })
    }
}

/// An adapter's A and B as they are found in the file.
type AbPair = (Option<Tensor>, Option<Tensor>);

/// Load a PEFT LoRA adapter folder onto `decoder` (frozen: for inference, or as a start for
/// more training). Names and shapes are checked against the model; an adapter made for another
/// base is refused with the tensor that does not fit. Returns how many projections got one.
pub fn load_peft(decoder: &mut Decoder, dir: &Path) -> Result<usize> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let bad = |problem: String| Error::Config {
        what: cfg_path.display().to_string(),
        problem,
    };
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(bad("`peft_type` is not LORA".into()));
    }
    let r = cfg
        .get("r")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("`r` missing or not a whole number".into()))?;
    if r == 0 {
        return Err(bad("`r` is 0; a LoRA rank is at least 1".into()));
    }
    let alpha = cfg
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad("`lora_alpha` missing or not a number".into()))?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(bad(format!(
            "`lora_alpha` is {alpha}; it must be a positive number"
        )));
    }
    // Per-module ranks and alphas (PEFT `LoraConfig.rank_pattern`/`alpha_pattern`) would
    // change the scale of some projections: refused rather than silently ignored.
    for key in ["rank_pattern", "alpha_pattern"] {
        if cfg
            .get(key)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!("`{key}` is not supported")));
        }
    }
    let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if flag("use_dora") || flag("fan_in_fan_out") {
        return Err(bad(
            "DoRA and fan_in_fan_out adapters are not supported".into()
        ));
    }
    // rsLoRA scales by α/√r (PEFT `LoraLayer.update_layer`).
    let scale = if flag("use_rslora") {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        return Err(Error::Config {
            what: dir.display().to_string(),
            problem: "no adapter_model.safetensors (pickled adapter_model.bin is never loaded)"
                .into(),
        });
    }
    // A truncated or garbage file is named (candle's error alone does not say which file).
    let tensors =
        candle_core::safetensors::load(&st_path, &Device::Cpu).map_err(|e| Error::Config {
            what: st_path.display().to_string(),
            problem: format!("not a valid safetensors file ({e})"),
        })?;
    let dcfg = decoder.config().clone();
    let tensor_err = |key: &str, problem: String| Error::Config {
        what: format!("{}: tensor `{key}`", st_path.display()),
        problem,
    };
    // (layer, target) -> (A, B)
    let mut pairs: HashMap<(usize, &'static str), AbPair> = HashMap::new();
    for (key, t) in &tensors {
        let parsed = key
            .strip_prefix("base_model.model.model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(layer, rest)| {
                let layer: usize = layer.parse().ok()?;
                let rest = rest.strip_suffix(".weight")?;
                let rest = rest.strip_suffix(".default").unwrap_or(rest);
                let (module, which) = rest.rsplit_once('.')?;
                let target = TARGETS.iter().find(|x| x.2 == module)?.0;
                Some((layer, target, which))
            });
        let Some((layer, target, which)) = parsed else {
            return Err(tensor_err(
                key,
                "not a LoRA weight of a llama-family projection".into(),
            ));
        };
        if layer >= dcfg.num_layers {
            return Err(tensor_err(
                key,
                format!("layer {layer}, but the model has {}", dcfg.num_layers),
            ));
        }
        if !matches!(
            t.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            return Err(tensor_err(
                key,
                format!("{:?} is not a floating-point type", t.dtype()),
            ));
        }
        let t = t.to_dtype(DType::F32)?;
        if let Some(i) = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .position(|x| !x.is_finite())
        {
            return Err(tensor_err(key, format!("element {i} is NaN or infinite")));
        }
        let slot = pairs.entry((layer, target)).or_default();
        match which {
            "lora_A" => slot.0 = Some(t),
            "lora_B" => slot.1 = Some(t),
            _ => return Err(tensor_err(key, "expected lora_A or lora_B".into())),
        }
    }
    let mut n = 0;
    for (name, linear) in decoder.linears_mut() {
        let Some((layer, target)) = split_name(&name) else {
            continue;
        };
        let Some((a, b)) = pairs.remove(&(layer, target)) else {
            continue;
        };
        let module = TARGETS
            .iter()
            .find(|x| x.0 == target)
            .map(|x| x.2)
            .unwrap_or_default();
        let key = format!("base_model.model.model.layers.{layer}.{module}");
        let (Some(a), Some(mut b)) = (a, b) else {
            return Err(tensor_err(&key, "needs both lora_A and lora_B".into()));
        };
        let (out, inp) = linear.dims();
        let rank = a.dims().first().copied().unwrap_or(0);
        if rank as u64 != r {
            return Err(tensor_err(
                &key,
                format!(
                    "lora_A {:?} has rank {rank}, but adapter_config.json says r = {r} (the scale α/r would be wrong)",
                    a.dims()
                ),
            ));
        }
        if a.dims() != [rank, inp] || b.dims() != [out, rank] {
            return Err(tensor_err(
                &key,
                format!(
                    "lora_A {:?} and lora_B {:?} do not fit a ({out}, {inp}) projection with rank {rank}; the adapter was made for another base model",
                    a.dims(),
                    b.dims()
                ),
            ));
        }
        if dcfg.rope_style == RopeStyle::Interleaved {
            match target {
                "q" => b = permute_rows(&b, dcfg.num_heads)?,
                "k" => b = permute_rows(&b, dcfg.num_kv_heads)?,
                _ => {}
            }
        }
        linear.lora = Some(Lora {
            a,
            b,
            scale,
            dropout: None,
        });
        n += 1;
    }
    if n == 0 {
        return Err(bad("no LoRA weights in the adapter".into()));
    }
    Ok(n)
}

/// llama.cpp's Q/K row permutation for interleaved RoPE (the converter's; inverse of
/// `unpermute_rows`).
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    Ok(lever_model::formats::convert::rope_permute(t, heads)?)
}

/// "blk.3.attn_q" → (3, "q").
fn split_name(name: &str) -> Option<(usize, &'static str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    TARGETS.iter().find(|t| t.1 == suffix).map(|t| (layer, t.0))
}

/// Inverse of llama.cpp's Q/K row permutation (rows grouped per head as (2, D/2) → (D/2, 2)).
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    Ok(lever_model::formats::convert::rope_unpermute(t, heads)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_refuse_unknown_names() {
        assert_eq!(LoraConfig::parse_targets("all-linear").unwrap().len(), 7);
        assert_eq!(
            LoraConfig::parse_targets("q_proj, v").unwrap(),
            vec!["q", "v"]
        );
        let e = LoraConfig::parse_targets("q,lm_head")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown target `lm_head`"), "{e}");
        assert_eq!(split_name("blk.12.ffn_down"), Some((12, "down")));
        assert_eq!(split_name("output"), None);
    }

    /// Unpermuting undoes the converter's permutation (the one in lever-model's convert.rs).
    #[test]
    fn unpermute_inverts_the_gguf_permutation() {
        let (heads, d, cols) = (3, 8, 5);
        let t = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        let permuted = t
            .reshape((heads, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        assert_eq!(
            permute_rows(&t, heads).unwrap().to_vec2::<f32>().unwrap(),
            permuted.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
