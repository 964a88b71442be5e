//! `lever plan`: resolve the model (a registry name, a file, a shape or a parameter count),
//! the job and the hardware (this machine, calibrated or not, or named GPUs), call
//! `lever_train::plan`, print a table or JSON. `--calibrate` measures this machine and stores
//! the result for later plans.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use lever_train::plan::{
    self, Calibration, Hardware, Job, JobKind, Model, Options, Plan, Precision, Shape,
};
use serde_json::json;

use crate::Usage;
use crate::cli::{PlanArgs, PlanJob};

/// Training sequences per step when --batch is not given.
const DEFAULT_TRAIN_BATCH: usize = 8;
/// `lever finetune`'s defaults, for --data.
const FINETUNE_STEPS: usize = 100;
const FINETUNE_BATCH: usize = 4;
/// Tokens per step on GPUs when --batch is not given (GPT-3 175B used 3.2 M, its 125M
/// model 0.5 M).
const GPU_BATCH_TOKENS: usize = 1 << 20;
/// The window with only --params.
const DEFAULT_CONTEXT: usize = 2048;
/// The MFU assumed where nothing was measured.
const DEFAULT_MFU: f64 = 0.4;

pub fn run(a: PlanArgs) -> Result<()> {
    let home = lever_model::registry::lever_home();
    let has_model = a.model.is_some() || a.params.is_some() || a.layers.is_some();
    if a.calibrate {
        if a.gpu.is_some() {
            return Err(Usage("--calibrate measures this machine; leave out --gpu".into()).into());
        }
        eprintln!(
            "calibrating: matmul peak, memory bandwidth, lever's training step on two small decoders and a LoRA step (about 15 s)"
        );
        let cal = plan::calibrate(Duration::from_secs(3))?;
        let path = cal.save(&home)?;
        eprintln!(
            "calibrated: matmul {:.1} GFLOP/s, memory {:.1} GB/s, training {:.1} GFLOP/s + {:.2} ns per element-wise value ({} threads); stored in {}",
            cal.matmul_flops_per_s / 1e9,
            cal.memory_bytes_per_s / 1e9,
            cal.train_flops_per_s / 1e9,
            cal.elementwise_s * 1e9,
            cal.threads,
            path.display()
        );
        for p in &cal.probes {
            eprintln!(
                "  probe {} layers × width {} (context {}, batch {}): {:.1} ms per step, {:.0} tokens/s",
                p.layers,
                p.width,
                p.context,
                p.batch,
                p.step_s * 1e3,
                p.tokens_per_s
            );
        }
        if let Some(p) = &cal.lora_probe {
            eprintln!(
                "  LoRA probe {} layers × width {} (rank 8, context {}, batch {}): {:.1} ms per step, {:.2}× what the rates above predict (LoRA plans scale by it)",
                p.layers,
                p.width,
                p.context,
                p.batch,
                p.step_s * 1e3,
                cal.lora_factor
            );
        }
        if !has_model {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&cal)?);
            }
            return Ok(());
        }
    }
    if !has_model {
        return Err(Usage(
            "no model: give --model M, --params N, or a shape (--layers --width --heads --vocab --context)".into(),
        )
        .into());
    }

    let on_gpu = a.gpu.is_some();
    let resolved = resolve_model(&a)?;
    let kind = match a.job {
        PlanJob::Infer => JobKind::Infer,
        PlanJob::Lora => JobKind::Lora,
        PlanJob::Full => JobKind::Full,
        PlanJob::Pretrain => JobKind::Pretrain,
    };
    let data = match &a.data {
        Some(path) => Some(data_tokens(&a, path, kind)?),
        None => None,
    };
    let context = match &data {
        Some(d) => d.mean_window.ceil() as usize,
        None => a.context.unwrap_or(resolved.context),
    };
    let batch = a.batch.unwrap_or(match (kind, &data) {
        (JobKind::Infer, _) => 1,
        (_, Some(_)) => FINETUNE_BATCH,
        // About a million tokens a step, at least a sequence per GPU.
        _ if on_gpu => (GPU_BATCH_TOKENS / context).max(a.gpus).max(1),
        _ => DEFAULT_TRAIN_BATCH,
    });
    let tokens = match (a.tokens, a.steps) {
        _ if data.is_some() => data.as_ref().map(|d| d.tokens),
        (Some(d), _) => Some(d),
        (None, Some(s)) if kind != JobKind::Infer => Some(s as f64 * (batch * context) as f64),
        (None, Some(_)) => {
            return Err(
                Usage("--steps: inference has no steps; give --tokens to generate".into()).into(),
            );
        }
        (None, None) => None,
    };
    if matches!(kind, JobKind::Lora | JobKind::Full) && tokens.is_none() {
        return Err(Usage(format!(
            "--job {}: give the training data's size, --tokens D or --steps N",
            if kind == JobKind::Lora {
                "lora"
            } else {
                "full"
            }
        ))
        .into());
    }
    let job = Job {
        kind,
        tokens,
        batch,
        grad_accum: a.grad_accum,
        context,
        lora_rank: a.lora_rank,
        trained_fraction: data.as_ref().map_or(1.0, |d| d.trained / d.tokens.max(1.0)),
        steps: match (&data, a.steps) {
            (Some(_), s) => Some(s.map_or(FINETUNE_STEPS as f64, |s| s as f64)),
            (None, Some(s)) if kind != JobKind::Infer => Some(s as f64),
            _ => None,
        },
    };

    let hw = hardware(&a, &home)?;
    let mut precision = match a.precision.as_deref() {
        Some("bf16-mixed") => Precision::BF16_MIXED,
        Some(_) => Precision::F32,
        None if on_gpu => Precision::BF16_MIXED,
        None => Precision::F32,
    };
    if let Some(kv) = resolved.kv_bytes.filter(|_| !on_gpu) {
        precision.kv = kv;
    }
    let opts = Options {
        precision,
        base_weight_bytes: resolved.weight_bytes.filter(|_| !on_gpu),
        price_per_hour: a.price,
    };
    let mut p = plan::plan(&resolved.model, &job, &hw, &opts)?;
    if let (Some(d), Some(path)) = (&data, &a.data) {
        p.notes.insert(
            0,
            format!(
                "data: {} as `lever finetune` draws it: {} micro-batches of {} padded to {:.1} tokens on average, {:.0}% of positions trained",
                path.display(),
                d.micro_batches,
                batch,
                d.mean_window,
                100.0 * d.trained / d.tokens.max(1.0)
            ),
        );
    }
    if let Hardware::Cpu {
        calibration,
        calibrated: true,
        ..
    } = &hw
        && calibration.threads != rayon_threads()
    {
        p.notes.push(format!(
            "calibrated on {} threads, planning for {}: calibrate again with these threads",
            calibration.threads,
            rayon_threads()
        ));
    }
    if on_gpu && a.gpus > 8 && a.interconnect.is_none() {
        p.notes.push(format!(
            "{} GPUs: more than one server, joined by their network rather than {}; give --interconnect (e.g. ib-ndr)",
            a.gpus,
            p.hardware.link.as_ref().map_or("", |l| l.0.as_str())
        ));
    }
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = json!(resolved.name);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&p, &resolved.name));
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `--data`: what `lever finetune` with the same settings will process.
fn data_tokens(a: &PlanArgs, path: &Path, kind: JobKind) -> Result<plan::DataTokens> {
    if !matches!(kind, JobKind::Lora | JobKind::Full) {
        return Err(
            Usage("--data plans fine-tuning: use it with --job lora or --job full".into()).into(),
        );
    }
    let reference = a.model.clone().unwrap_or_default();
    let model = crate::load_model(&crate::cli::ModelArg {
        model: reference,
        adapter: None,
    })?;
    let mut fields = lever_data::Fields::default();
    for f in &a.fields {
        fields.set(f)?;
    }
    let data = lever_data::Dataset::read(path, None, &fields)?;
    let prepared = lever_data::sft::Prepared::new(
        &data,
        &model.tokenizer,
        model.chat_template.as_ref(),
        a.seq_len,
        lever_data::sft::Overlong::Skip,
        a.val_fraction,
        a.seed,
    )?;
    if prepared.train.is_empty() {
        anyhow::bail!(
            "{}: no training examples of at most {} tokens",
            path.display(),
            a.seq_len
        );
    }
    let examples: Vec<(usize, usize)> = prepared
        .train
        .iter()
        .map(|t| (t.ids.len(), t.trained_tokens()))
        .collect();
    let config = lever_train::TrainConfig {
        steps: a.steps.map_or(FINETUNE_STEPS, |s| s as usize),
        batch_size: a.batch.unwrap_or(FINETUNE_BATCH),
        grad_accum: a.grad_accum,
        seed: a.seed,
        ..Default::default()
    };
    Ok(plan::data_tokens(&examples, &config))
}

/// The model as planned, and what its file says about bytes.
struct Resolved {
    model: Model,
    name: String,
    context: usize,
    /// Bytes per weight of the file (a quantized GGUF's), for this machine.
    weight_bytes: Option<f64>,
    /// Bytes per cached key/value on this machine (GGUF models: f16, as llama.cpp).
    kv_bytes: Option<f64>,
}

fn resolve_model(a: &PlanArgs) -> Result<Resolved> {
    if let Some(reference) = &a.model {
        let home = lever_model::registry::lever_home();
        let source =
            lever_model::model::resolve(reference, &home, &mut crate::progress::provisioning())?;
        let header = lever_model::model::read_header(&source)?;
        let cfg = header.config;
        let (weight_bytes, kv_bytes) =
            (Some(header.bytes_per_weight), header.f16_kv.then_some(2.0));
        let mut shape = Shape::of_config(&cfg);
        let context = a.context.unwrap_or(cfg.max_seq_len);
        shape.context = context;
        return Ok(Resolved {
            model: Model::Shape(shape),
            name: reference.clone(),
            context,
            weight_bytes,
            kv_bytes,
        });
    }
    if let Some(n) = a.params {
        return Ok(Resolved {
            model: Model::Params(n),
            name: format!("{n:e} parameters"),
            context: a.context.unwrap_or(DEFAULT_CONTEXT),
            weight_bytes: None,
            kv_bytes: None,
        });
    }
    let missing: Vec<&str> = [
        ("--layers", a.layers.is_none()),
        ("--width", a.width.is_none()),
        ("--heads", a.heads.is_none()),
        ("--vocab", a.vocab.is_none()),
        ("--context", a.context.is_none()),
    ]
    .iter()
    .filter(|(_, m)| *m)
    .map(|(n, _)| *n)
    .collect();
    let (Some(layers), Some(width), Some(heads), Some(vocab), Some(context)) =
        (a.layers, a.width, a.heads, a.vocab, a.context)
    else {
        return Err(Usage(format!("a shape needs {} too", missing.join(" "))).into());
    };
    let shape = Shape {
        tied: !a.untied,
        ..Shape::new(
            layers,
            width,
            heads,
            a.kv_heads,
            a.mlp_width,
            a.mlp_linears,
            vocab,
            context,
        )
    };
    shape.validate()?;
    Ok(Resolved {
        name: "a shape".into(),
        model: Model::Shape(shape),
        context,
        weight_bytes: None,
        kv_bytes: None,
    })
}

fn hardware(a: &PlanArgs, home: &Path) -> Result<Hardware> {
    if let Some(name) = &a.gpu {
        let gpu = *plan::gpu(name).ok_or_else(|| {
            let names: Vec<_> = plan::GPUS.iter().map(|g| g.name).collect();
            Usage(format!(
                "--gpu {name}: unknown GPU (known: {})",
                names.join(", ")
            ))
        })?;
        let link = match &a.interconnect {
            Some(s) => plan::interconnect(s).ok_or_else(|| {
                let names: Vec<_> = plan::INTERCONNECTS.iter().map(|(n, _)| *n).collect();
                Usage(format!(
                    "--interconnect {s}: neither a link ({}) nor GB/s",
                    names.join(", ")
                ))
            })?,
            None => plan::interconnect(gpu.link)
                .ok_or_else(|| anyhow::anyhow!("{}: no link {}", gpu.name, gpu.link))?,
        };
        return Ok(Hardware::Gpu {
            gpu,
            count: a.gpus,
            mfu: a.mfu.unwrap_or(DEFAULT_MFU),
            link,
        });
    }
    match Calibration::load(home)? {
        Some(calibration) => Ok(Hardware::Cpu {
            calibration,
            calibrated: true,
            mfu: a.mfu,
        }),
        None => Ok(Hardware::uncalibrated_cpu(a.mfu.unwrap_or(DEFAULT_MFU))?),
    }
}

/// The plan as a two-column table.
fn table(p: &Plan, name: &str) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let job = match p.job.kind {
        JobKind::Infer => "inference".to_string(),
        JobKind::Lora => format!("LoRA fine-tuning (rank {})", p.job.lora_rank),
        JobKind::Full => "full fine-tuning".to_string(),
        JobKind::Pretrain => "pretraining".to_string(),
    };
    rows.push(("job", job));
    let model = match &p.shape {
        Some(s) => format!(
            "{name}: {} parameters; {} layers, width {}, {} heads ({} key/value), MLP {} ({} matrices), vocabulary {}{}",
            count(p.params),
            s.layers,
            s.width,
            s.heads,
            s.kv_heads,
            s.mlp_width,
            s.mlp_linears,
            s.vocab,
            if s.tied { ", tied" } else { "" }
        ),
        None => format!("{} parameters (no shape)", count(p.params)),
    };
    rows.push(("model", model));
    if p.job.kind != JobKind::Infer {
        rows.push((
            "trainable",
            format!("{} parameters", count(p.trainable_params)),
        ));
        if let (Some(d), Some(steps)) = (p.tokens, p.steps) {
            let from = match p.tokens_from {
                Some("chinchilla") => " (Chinchilla: 20 per parameter)",
                _ => "",
            };
            rows.push((
                "data",
                format!(
                    "{} tokens{from} = {} steps × {} sequences × {} tokens",
                    count(d),
                    count(steps),
                    p.job.batch,
                    p.job.context
                ),
            ));
        }
        if let (Some(f), Some(frc), Some(per)) = (
            p.train_flops,
            p.train_flops_full_recompute,
            p.flops_per_token,
        ) {
            rows.push((
                "FLOPs",
                format!(
                    "{f:.3e} training ({frc:.3e} with full recomputation); {per:.3e} per token"
                ),
            ));
        }
    } else {
        rows.push((
            "context",
            format!("{} tokens × {} sequences", p.job.context, p.job.batch),
        ));
    }
    let m = &p.memory;
    let mut mem = format!("weights {}", bytes(m.weights));
    if p.job.kind != JobKind::Infer {
        mem += &format!(
            ", gradients {}, AdamW {}",
            bytes(m.gradients),
            bytes(m.adamw)
        );
    }
    if let (Some(act), Some(sel), Some(full)) = (
        m.activations,
        m.activations_selective_recompute,
        m.activations_full_recompute,
    ) {
        mem += &format!(
            ", activations {} (selective recomputation {}, full {})",
            bytes(act),
            bytes(sel),
            bytes(full)
        );
    }
    if let Some(kv) = m.kv_cache {
        mem += &format!(", KV cache {}", bytes(kv));
    }
    mem += &format!(" → {}", bytes(m.total));
    if m.total_full_recompute < m.total {
        mem += &format!(
            " ({} with full recomputation)",
            bytes(m.total_full_recompute)
        );
    }
    let per = if p.devices > 1 { " per device" } else { "" };
    rows.push(("memory", format!("{mem}{per} ({})", p.precision.name)));
    let h = &p.hardware;
    let hw = if h.kind == "cpu" {
        match (&h.calibration, h.mfu) {
            (Some(c), None) => format!(
                "this machine, calibrated ({}, {} threads, {}): training {:.1} GFLOP/s + {:.2} ns per element-wise value, matmul peak {:.1} GFLOP/s, memory {:.1} GB/s",
                c.cpu,
                c.threads,
                age(c.created_unix),
                c.train_flops_per_s / 1e9,
                c.elementwise_s * 1e9,
                c.matmul_flops_per_s / 1e9,
                c.memory_bytes_per_s / 1e9
            ),
            (Some(_), Some(mfu)) => format!(
                "this machine: matmul peak {:.1} GFLOP/s (calibrated) × MFU {mfu} (stated, in place of the calibration's measured training speed), memory {:.1} GB/s",
                h.peak_flops_per_s / 1e9,
                h.memory_bytes_per_s / 1e9
            ),
            (None, mfu) => format!(
                "this machine, UNCALIBRATED (run `lever plan --calibrate`): matmul peak {:.1} GFLOP/s × MFU {} (stated), memory {:.1} GB/s",
                h.peak_flops_per_s / 1e9,
                mfu.unwrap_or(DEFAULT_MFU),
                h.memory_bytes_per_s / 1e9
            ),
        }
    } else {
        let mut s = format!(
            "{} × {}: {:.0} TFLOP/s bf16 peak × MFU {} (stated), memory {:.0} GB/s",
            h.devices,
            h.kind,
            h.peak_flops_per_s / 1e12,
            h.mfu.unwrap_or(DEFAULT_MFU),
            h.memory_bytes_per_s / 1e9
        );
        if let Some((link, bw)) = &h.link {
            s += &format!(
                ", data parallel over {link} ({:.1} GB/s each way)",
                bw / 1e9
            );
        }
        s
    };
    rows.push(("hardware", hw));
    if let Some(inf) = &p.inference {
        rows.push((
            "speed",
            format!(
                "prompt {:.0} tokens/s; decoding {:.1} tokens/s ({} sequences, {}-bound)",
                inf.prefill_tokens_per_s, inf.decode_tokens_per_s, p.job.batch, inf.decode_bound
            ),
        ));
    }
    if let Some(t) = &p.time {
        let mut s = duration(t.total_s);
        if let Some(step) = t.per_step_s {
            s += &format!(" ({} per step", duration(step));
            if t.allreduce_s > 0.0 {
                s += &format!("; all-reduce {} of the total", duration(t.allreduce_s));
            }
            s += ")";
        }
        rows.push(("time", s));
    }
    if let Some(c) = p.cost {
        let price = p.price_per_hour.unwrap_or(0.0);
        let unit = if p.devices > 1 || h.kind != "cpu" {
            " per GPU-hour"
        } else {
            " per hour"
        };
        rows.push(("cost", format!("{c:.2} (at {price}{unit})")));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out += &format!("{k:<10} {v}\n");
    }
    for n in &p.notes {
        out += &format!("note: {n}\n");
    }
    out
}

fn count(x: f64) -> String {
    let (v, unit) = if x >= 1e12 {
        (x / 1e12, " T")
    } else if x >= 1e9 {
        (x / 1e9, " B")
    } else if x >= 1e6 {
        (x / 1e6, " M")
    } else if x >= 1e4 {
        (x / 1e3, " K")
    } else {
        return format!("{x:.0}");
    };
    format!("{v:.2}{unit}")
}

fn bytes(x: f64) -> String {
    if x >= 1e12 {
        format!("{:.2} TB", x / 1e12)
    } else if x >= 1e9 {
        format!("{:.2} GB", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} MB", x / 1e6)
    } else {
        format!("{:.0} KB", x / 1e3)
    }
}

fn duration(s: f64) -> String {
    if s >= 2.0 * 86_400.0 {
        format!("{:.1} days", s / 86_400.0)
    } else if s >= 3600.0 {
        format!("{:.2} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

fn age(created_unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created_unix);
    if s < 120 {
        format!("{s} s ago")
    } else if s < 7200 {
        format!("{} min ago", s / 60)
    } else if s < 172_800 {
        format!("{} h ago", s / 3600)
    } else {
        format!("{} days ago", s / 86_400)
    }
}
