//! What `lever pretrain` trains and how: a model shape (the llama-family decoder's sizes, the
//! vocabulary coming from the tokenizer) and a training recipe, as a named preset or a TOML
//! file. Two config types (STYLE habit 2): [`RecipeFile`] mirrors the TOML, every field
//! optional; [`Recipe`] is resolved and checked, every field set.
//!
//! Presets:
//! - `shakespeare-char`: nanoGPT's `config/train_shakespeare_char.py` with its README's CPU
//!   overrides (`--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
//!   --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`): lr 1e-3 with 100 warmup
//!   iterations, cosine to 1e-4 at 2000, β2 0.99, weight decay 0.1 (train.py's default),
//!   clipping at 1.0, random windows, evaluation every 250 iterations on 20 batches (the
//!   README's `--eval_iters=20`; lever's are fixed windows spread over the split, and the
//!   last evaluation covers the whole validation split). nanoGPT trains a GPT-2 block
//!   (LayerNorm, learned positions, GELU MLP of 4·C); lever trains its llama block (RMSNorm,
//!   RoPE, SwiGLU), so the SwiGLU width is chosen to match: 3·C·F ≈ 2·C·4C gives F ≈ 341;
//!   344 (the next multiple of 8) keeps the parameter count and the FLOPs per token within
//!   1% of nanoGPT's (`nanogpt_reference`).
//! - `smollm2-135m`: the default model's shape (SmolLM2-135M: 30 layers, 9 heads, 3
//!   key/value heads, width 576, MLP 1536, RoPE base 100000, tied embeddings) at a context of
//!   2048, with nanoGPT's GPT-2 recipe (lr 6e-4 to 6e-5, β2 0.95, weight decay 0.1).

use std::path::Path;

use lever_model::{Arch, DecoderConfig, Numerics};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decoder's sizes, without the vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub width: usize,
    pub mlp_width: usize,
    /// The training window and the model's context.
    pub context: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    /// The output layer is the embedding table (GPT-2, nanoGPT, SmolLM2).
    pub tie_embeddings: bool,
}

/// How training windows are drawn from the training tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Batches {
    /// Each window at a uniformly random offset (nanoGPT's `get_batch`).
    Random,
    /// Windows one after another through the tokens, wrapping at the end (llm.c's loader);
    /// the position is saved in checkpoints.
    Sequential,
}

/// A resolved recipe: the model and every training setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// The preset or file it came from.
    pub name: String,
    pub model: ModelShape,
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    /// The floor the cosine decays to.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// The step at which the cosine reaches `min_lr` (nanoGPT's `lr_decay_iters`).
    pub decay_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, on matrices only (embedding and projections; not norms or
    /// biases), as nanoGPT's `configure_optimizers` groups them.
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    pub grad_clip: f64,
    pub batches: Batches,
    /// Validation every N steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Validation batches per evaluation: fixed windows spread over the validation tokens,
    /// the same ones each time; the last evaluation covers every window.
    pub eval_batches: usize,
    pub seed: u64,
}

/// A recipe file (TOML): any field may be left out; `preset` names where the rest comes from
/// (default `shakespeare-char`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub preset: Option<String>,
    #[serde(default)]
    pub model: ModelFile,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<usize>,
    pub decay_steps: Option<usize>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub grad_clip: Option<f64>,
    pub batches: Option<Batches>,
    pub eval_every: Option<usize>,
    pub eval_batches: Option<usize>,
    pub seed: Option<u64>,
}

/// The `[model]` table of a recipe file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub width: Option<usize>,
    pub mlp_width: Option<usize>,
    pub context: Option<usize>,
    pub rope_theta: Option<f64>,
    pub norm_eps: Option<f64>,
    pub tie_embeddings: Option<bool>,
}

/// The presets `--config` knows by name.
pub const PRESETS: [&str; 2] = ["shakespeare-char", "smollm2-135m"];

impl Recipe {
    /// A preset by name.
    pub fn preset(name: &str) -> Option<Recipe> {
        match name {
            "shakespeare-char" => Some(Recipe {
                name: name.into(),
                model: ModelShape {
                    layers: 4,
                    heads: 4,
                    kv_heads: 4,
                    width: 128,
                    mlp_width: 344,
                    context: 64,
                    rope_theta: 10_000.0,
                    // nanoGPT's LayerNorm epsilon (PyTorch's default).
                    norm_eps: 1e-5,
                    tie_embeddings: true,
                },
                steps: 2000,
                batch_size: 12,
                grad_accum: 1,
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_steps: 100,
                decay_steps: 2000,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
                batches: Batches::Random,
                eval_every: 250,
                eval_batches: 20,
                seed: 1337,
            }),
            "smollm2-135m" => Some(Recipe {
                name: name.into(),
                model: ModelShape {
                    layers: 30,
                    heads: 9,
                    kv_heads: 3,
                    width: 576,
                    mlp_width: 1536,
                    context: 2048,
                    rope_theta: 100_000.0,
                    norm_eps: 1e-5,
                    tie_embeddings: true,
                },
                steps: 5000,
                batch_size: 4,
                grad_accum: 8,
                lr: 6e-4,
                min_lr: 6e-5,
                warmup_steps: 200,
                decay_steps: 5000,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
                batches: Batches::Sequential,
                eval_every: 250,
                eval_batches: 20,
                seed: 1337,
            }),
            _ => None,
        }
    }

    /// Continued pretraining (`lever pretrain --init`): the model's own shape replaces the
    /// recipe's, trained on windows of `context` tokens (at most the model's context).
    pub fn with_model_of(&mut self, cfg: &DecoderConfig, context: usize) {
        self.model = ModelShape {
            layers: cfg.num_layers,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            width: cfg.hidden_size,
            mlp_width: cfg.intermediate_size,
            context: context.min(cfg.max_seq_len),
            rope_theta: f64::from(cfg.rope_theta),
            norm_eps: f64::from(cfg.rms_norm_eps),
            tie_embeddings: cfg.tie_embeddings,
        };
    }

    /// `--config`: a preset name, or a TOML file.
    pub fn load(arg: &str) -> Result<Recipe> {
        if let Some(r) = Self::preset(arg) {
            return Ok(r);
        }
        let path = Path::new(arg);
        if !path.is_file() {
            return Err(Error::Config {
                what: format!("--config {arg}"),
                problem: format!("neither a preset ({}) nor a TOML file", PRESETS.join(", ")),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: RecipeFile = toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!("line {}: ", text[..s.start].lines().count().max(1)))
                .unwrap_or_default();
            Error::Config {
                what: path.display().to_string(),
                problem: format!("{at}{}", e.message().trim()),
            }
        })?;
        file.resolve(&path.display().to_string())
    }

    /// Check every size and setting; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, problem: String| Error::Config {
            what: format!("{}: `{field}`", self.name),
            problem,
        };
        let m = &self.model;
        for (field, v) in [
            ("layers", m.layers),
            ("heads", m.heads),
            ("kv_heads", m.kv_heads),
            ("width", m.width),
            ("mlp_width", m.mlp_width),
            ("context", m.context),
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        if !m.width.is_multiple_of(m.heads) {
            return Err(bad(
                "heads",
                format!("{} heads do not divide the width {}", m.heads, m.width),
            ));
        }
        if !m.heads.is_multiple_of(m.kv_heads) {
            return Err(bad(
                "kv_heads",
                format!("{} do not divide the {} heads", m.kv_heads, m.heads),
            ));
        }
        if !(m.width / m.heads).is_multiple_of(2) {
            return Err(bad(
                "heads",
                format!(
                    "the head size {} is odd (RoPE rotates pairs)",
                    m.width / m.heads
                ),
            ));
        }
        for (field, v) in [("lr", self.lr), ("min_lr", self.min_lr)] {
            if !(v.is_finite() && v >= 0.0) || (field == "lr" && v == 0.0) {
                return Err(bad(field, format!("{v} is not a positive learning rate")));
            }
        }
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(field, format!("{v} is not in [0, 1)")));
            }
        }
        for (field, v) in [
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(field, format!("{v} is not a non-negative number")));
            }
        }
        self.decoder_config(1)
            .validate()
            .map_err(|(field, problem)| bad(&format!("model ({})", field.hf_name()), problem))?;
        Ok(())
    }

    /// The decoder's configuration for a vocabulary of `vocab_size` tokens: lever's llama
    /// block with transformers' arithmetic (f32 throughout), so that the exported folder
    /// gives the same logits in transformers.
    pub fn decoder_config(&self, vocab_size: usize) -> DecoderConfig {
        let m = &self.model;
        DecoderConfig {
            arch: Arch::Llama,
            vocab_size,
            hidden_size: m.width,
            intermediate_size: m.mlp_width,
            num_layers: m.layers,
            num_heads: m.heads,
            num_kv_heads: m.kv_heads,
            head_dim: m.width / m.heads.max(1),
            rms_norm_eps: m.norm_eps as f32,
            rope_theta: m.rope_theta as f32,
            rope_style: lever_model::ops::RopeStyle::Neox,
            max_seq_len: m.context,
            tie_embeddings: m.tie_embeddings,
            numerics: Numerics::Transformers,
            gemma: None,
        }
    }

    /// The learning rate of optimizer step `step` (0-based), nanoGPT's `get_lr`: linear
    /// warmup to `lr` over `warmup_steps` (`lr·(s+1)/(warmup+1)`), cosine from `lr` to
    /// `min_lr` at `decay_steps`, `min_lr` after.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step > self.decay_steps {
            return self.min_lr;
        }
        let span = self.decay_steps.saturating_sub(self.warmup_steps).max(1);
        let ratio = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }

    /// Tokens per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.model.context
    }
}

impl RecipeFile {
    /// Fill what the file leaves out from its preset, then check.
    pub fn resolve(&self, name: &str) -> Result<Recipe> {
        let base = self.preset.as_deref().unwrap_or("shakespeare-char");
        let mut r = Recipe::preset(base).ok_or_else(|| Error::Config {
            what: format!("{name}: `preset`"),
            problem: format!("unknown preset {base:?} ({})", PRESETS.join(", ")),
        })?;
        r.name = name.to_string();
        let m = &self.model;
        let s = &mut r.model;
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src {
                    $dst = v;
                }
            };
        }
        set!(s.layers, m.layers);
        set!(s.heads, m.heads);
        // Without kv_heads, every head has its own keys and values.
        s.kv_heads = m.kv_heads.unwrap_or(if m.heads.is_some() {
            s.heads
        } else {
            s.kv_heads
        });
        set!(s.width, m.width);
        set!(s.mlp_width, m.mlp_width);
        set!(s.context, m.context);
        set!(s.rope_theta, m.rope_theta);
        set!(s.norm_eps, m.norm_eps);
        set!(s.tie_embeddings, m.tie_embeddings);
        set!(r.steps, self.steps);
        // The cosine ends where training does unless the file says otherwise.
        r.decay_steps = self.decay_steps.unwrap_or(r.steps);
        set!(r.batch_size, self.batch_size);
        set!(r.grad_accum, self.grad_accum);
        set!(r.lr, self.lr);
        set!(r.min_lr, self.min_lr);
        set!(r.warmup_steps, self.warmup_steps);
        set!(r.beta1, self.beta1);
        set!(r.beta2, self.beta2);
        set!(r.eps, self.eps);
        set!(r.weight_decay, self.weight_decay);
        set!(r.grad_clip, self.grad_clip);
        set!(r.batches, self.batches);
        set!(r.eval_every, self.eval_every);
        set!(r.eval_batches, self.eval_batches);
        set!(r.seed, self.seed);
        r.validate()?;
        Ok(r)
    }
}

/// Parameters and training FLOPs of a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Size {
    /// Every weight, a tied embedding counted once (what nanoGPT's `get_num_params` counts:
    /// the token embedding, used again as the output layer, is in; learned positions, which
    /// lever does not have, are out).
    pub params: usize,
    /// Training FLOPs per token: 6·N for the matrix products forward and backward, plus the
    /// attention scores and their use, 12·L·H·Q·T (PaLM, arXiv:2204.02311 appendix B; nanoGPT
    /// `estimate_mfu`, llm.c `train_gpt2.cu`).
    pub flops_per_token: usize,
}

impl Size {
    fn new(params: usize, layers: usize, width: usize, context: usize) -> Size {
        // H·Q = the width.
        Size {
            params,
            flops_per_token: 6 * params + 12 * layers * width * context,
        }
    }

    /// lever's decoder for `recipe` at a vocabulary of `vocab` tokens.
    pub fn of(recipe: &Recipe, vocab: usize) -> Size {
        let m = &recipe.model;
        let (c, d) = (m.width, m.width / m.heads.max(1));
        let attn = c * m.heads * d + 2 * c * m.kv_heads * d + m.heads * d * c;
        let per_layer = attn + 3 * c * m.mlp_width + 2 * c;
        let embed = vocab * c * if m.tie_embeddings { 1 } else { 2 };
        Size::new(embed + m.layers * per_layer + c, m.layers, c, m.context)
    }

    /// nanoGPT's GPT-2 model of the same layers, width and context (no biases, as its
    /// train.py defaults to; tied embedding), for the comparison the benchmark states:
    /// 12·C² per block (attention 4·C², MLP 8·C²) and two LayerNorm weights.
    pub fn nanogpt_reference(recipe: &Recipe, vocab: usize) -> Size {
        let m = &recipe.model;
        let c = m.width;
        let per_layer = 12 * c * c + 2 * c;
        Size::new(vocab * c + m.layers * per_layer + c, m.layers, c, m.context)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// nanoGPT prints "number of parameters: 0.80M" for this config (vocabulary 65); the
    /// llama block lever trains stays within 1% of it in parameters and FLOPs per token.
    #[test]
    fn shakespeare_char_matches_nanogpt_within_one_percent() {
        let r = Recipe::preset("shakespeare-char").unwrap();
        r.validate().unwrap();
        let ours = Size::of(&r, 65);
        let theirs = Size::nanogpt_reference(&r, 65);
        assert_eq!(theirs.params, 795_904);
        assert_eq!(theirs.flops_per_token, 6 * 795_904 + 12 * 4 * 4 * 32 * 64);
        let rel = |a: usize, b: usize| (a as f64 / b as f64 - 1.0).abs();
        assert!(
            rel(ours.params, theirs.params) < 0.01,
            "{ours:?} {theirs:?}"
        );
        assert!(rel(ours.flops_per_token, theirs.flops_per_token) < 0.01);
        assert_eq!(r.tokens_per_step(), 768);
    }

    #[test]
    fn the_smollm2_preset_has_the_default_models_size() {
        let r = Recipe::preset("smollm2-135m").unwrap();
        r.validate().unwrap();
        // SmolLM2-135M: 134,515,008 parameters (49,152-token vocabulary, tied).
        assert_eq!(Size::of(&r, 49_152).params, 134_515_008);
    }

    /// nanoGPT's get_lr at its shakespeare settings.
    #[test]
    fn the_schedule_is_nanogpts() {
        let r = Recipe::preset("shakespeare-char").unwrap();
        assert!((r.lr_at(0) - 1e-3 / 101.0).abs() < 1e-15);
        assert!((r.lr_at(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-15);
        assert!((r.lr_at(100) - 1e-3).abs() < 1e-15);
        assert!((r.lr_at(1050) - 5.5e-4).abs() < 1e-12);
        assert!((r.lr_at(2000) - 1e-4).abs() < 1e-15);
        assert!((r.lr_at(2500) - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn files_override_a_preset_and_bad_fields_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tiny.toml");
        std::fs::write(
            &p,
            "steps = 30\nlr = 3e-3\n[model]\nlayers = 2\nheads = 2\nwidth = 32\nmlp_width = 64\ncontext = 16\n",
        )
        .unwrap();
        let r = Recipe::load(p.to_str().unwrap()).unwrap();
        assert_eq!((r.steps, r.decay_steps, r.lr), (30, 30, 3e-3));
        assert_eq!((r.model.heads, r.model.kv_heads, r.model.width), (2, 2, 32));
        assert_eq!(r.batch_size, 12);

        std::fs::write(&p, "[model]\nheads = 3\n").unwrap();
        let e = Recipe::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("`heads`") && e.contains("3 heads do not divide the width 128"),
            "{e}"
        );

        std::fs::write(&p, "stpes = 3\n").unwrap();
        let e = Recipe::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("stpes"), "{e}");

        let e = Recipe::load("no-such-preset").unwrap_err().to_string();
        assert!(e.contains("shakespeare-char, smollm2-135m"), "{e}");
    }
}
