//! `lever eval TASK.toml` (task specs, few-shot settings side by side), `lever fewshot
//! search`, and `lever eval mc` (multiple-choice accuracy by log-likelihood), on lever-eval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use lever_eval::{Evaluator, Format, McOptions, Record, Setting, Shots, Summary, Task};

use crate::cli::{EvalMcArgs, EvalTaskArgs, FewshotSearchArgs, TaskRunArgs};

pub fn mc(a: EvalMcArgs) -> Result<()> {
    let mut items = lever_eval::read_items(&a.data)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let model = crate::load_model(&a.model)?;
    let opts = McOptions {
        prefix_reuse: !a.no_prefix_cache,
    };
    let bar = crate::progress::counter(items.len() as u64, "scoring");
    let start = Instant::now();
    let result = lever_eval::evaluate(&model, &items, opts, &mut |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let (report, _) = result?;
    let secs = start.elapsed().as_secs_f64();
    let rate = report.n as f64 / secs.max(1e-9);
    eprintln!(
        "{}: {} items in {secs:.2} s, {rate:.2} examples/s ({})",
        a.data.display(),
        report.n,
        if opts.prefix_reuse {
            "prefix reuse"
        } else {
            "no prefix reuse"
        }
    );
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["examples_per_s"] = serde_json::json!(rate);
        println!("{v}");
    } else {
        let se = |s: Option<f64>| s.map_or(String::new(), |s| format!(" ± {s:.4}"));
        println!("acc       {:.4}{}", report.acc, se(report.acc_stderr));
        println!(
            "acc_norm  {:.4}{}",
            report.acc_norm,
            se(report.acc_norm_stderr)
        );
        println!("n         {}", report.n);
    }
    Ok(())
}

/// `lever eval TASK.toml`: every combination of --shots, --select and --template, one
/// comparison table.
pub fn task(a: EvalTaskArgs) -> Result<()> {
    let r = &a.run;
    let task = load_task(r)?;
    let fs = &task.fewshot;
    let shots = if a.shots.is_empty() {
        vec![fs.k]
    } else {
        a.shots.clone()
    };
    let selects = if a.select.is_empty() {
        vec![fs.select]
    } else {
        a.select.clone()
    };
    let templates = if a.templates.is_empty() {
        vec![lever_eval::task::DEFAULT_TEMPLATE.to_string()]
    } else {
        a.templates.clone()
    };
    let format = format_of(r, &task);
    // Zero shots need no selector: one 0-shot setting per template.
    let mut settings: Vec<Setting> = Vec::new();
    for t in &templates {
        for &k in &shots {
            for &sel in &selects {
                let s = Setting {
                    shots: k,
                    select: if k == 0 { fs.select } else { sel },
                    template: t.clone(),
                    format,
                };
                if !settings.iter().any(|x| x.label() == s.label()) {
                    settings.push(s);
                }
            }
        }
    }
    let rags = rag_settings(&a, &task)?;
    let mut examples = task.split(&a.split)?.to_vec();
    if let Some(n) = r.limit {
        examples.truncate(n);
    }
    let out = out_dir(r, &format!("eval-{}", task.name))?;
    // RAG-Sequence and RAG-Token step their passages' contexts as one batch, with the packed
    // kernels `lever serve` batches with.
    if rags
        .iter()
        .any(|f| crate::rag_setting::formulation(f).is_some())
    {
        lever_model::qweight::set_packing(true);
    }
    let model = Arc::new(crate::load_model(&r.model)?);
    let encoder = needs_encoder(&settings, r)?;
    // Check every setting before spending time on any.
    {
        let ev = evaluator(&model, &task, r, encoder.as_ref(), None)?;
        for s in &settings {
            ev.check(s)?;
        }
    }
    let mut summaries = Vec::new();
    let mut report = serde_json::Value::Null;
    // The folder appears (or replaces the old one, with --force) once every file is written.
    lever_model::fsutil::write_atomic(&out, |tmp| -> Result<()> {
        std::fs::create_dir(tmp).with_context(|| out.display().to_string())?;
        for rag in &rags {
            // Each retrieval setting rewrites the items' prompts (concat) or answers through
            // the passages read one by one (RAG-Sequence, RAG-Token).
            let mut items = examples.clone();
            let mut passages = Vec::new();
            let mut latent = None;
            if rag != "closed" {
                let spec = task.rag.as_ref().context("[rag]")?;
                let f = crate::rag_setting::formulation(rag);
                let found = crate::rag_setting::retrieve(
                    &spec.index,
                    &mut items,
                    &crate::rag_setting::Spec {
                        k: spec.k,
                        mode: &spec.mode,
                        query_template: spec.query_template.as_deref(),
                        latent: f,
                    },
                    &format!("--rag {rag}"),
                )?;
                passages = found.passages;
                if let Some(f) = f {
                    latent = Some(crate::rag_setting::LatentGenerator::new(
                        model.clone(),
                        f,
                        found.latent,
                    ));
                }
            }
            let mut ev = evaluator(&model, &task, r, encoder.as_ref(), latent)?;
            for s in &settings {
                let label = if rags.len() > 1 || rag != "closed" {
                    format!("{} {}", rag_label(rag, &task), s.label())
                } else {
                    s.label()
                };
                let bar = crate::progress::counter(items.len() as u64, &label);
                let result = ev.run(s, &a.split, &items, Shots::Select, &mut |d, _| {
                    bar.set_position(d as u64)
                });
                bar.finish_and_clear();
                let (mut summary, records) = result?;
                let slug = if label == s.label() {
                    s.slug()
                } else {
                    format!("{rag}-{}", s.slug())
                };
                summary.setting = label;
                write_records(
                    tmp,
                    &out,
                    &format!("{}-{slug}.jsonl", a.split),
                    &records,
                    &passages,
                )?;
                eprintln!(
                    "{}: {} = {:.4} (n {}, {:.1} s{})",
                    summary.setting,
                    summary.metric,
                    summary.score,
                    summary.n,
                    summary.seconds,
                    if summary.cached > 0 {
                        format!(", {} from the cache", summary.cached)
                    } else {
                        String::new()
                    }
                );
                summaries.push(summary);
            }
        }
        report = serde_json::json!({
            "task": task.name,
            "task_file": task.path,
            "model": model.info.path,
            "split": a.split,
            "settings": summaries,
        });
        put(
            tmp,
            &out,
            "summary.json",
            &serde_json::to_string_pretty(&report)?,
        )
    })?;
    if r.json {
        println!("{report}");
    } else {
        print_table(&task, &summaries);
        eprintln!("per-example records and summary.json: {}", out.display());
    }
    Ok(())
}

/// `lever fewshot search TASK.toml`.
pub fn fewshot_search(a: FewshotSearchArgs) -> Result<()> {
    let r = &a.run;
    let task = load_task(r)?;
    let k = a.k.unwrap_or(if task.fewshot.k > 0 {
        task.fewshot.k
    } else {
        5
    });
    if k == 0 {
        anyhow::bail!(
            "{}: fewshot search needs k of at least 1",
            task.path.display()
        );
    }
    let setting = Setting {
        shots: k,
        select: lever_eval::Select::Random,
        template: a.template.clone(),
        format: format_of(r, &task),
    };
    let mut dev = task.split("dev")?.to_vec();
    if let Some(n) = r.limit {
        dev.truncate(n);
    }
    let mut test = task.split("test")?.to_vec();
    if let Some(n) = a.test_limit {
        test.truncate(n);
    }
    let out = out_dir(r, &format!("fewshot-{}", task.name))?;
    let model = Arc::new(crate::load_model(&r.model)?);
    let mut ev = evaluator(&model, &task, r, None, None)?;
    let mut bar: Option<(String, indicatif::ProgressBar)> = None;
    let result = lever_eval::search(
        &mut ev,
        &setting,
        a.trials,
        a.seed,
        &dev,
        &test,
        &mut |what, d, all| {
            if bar.as_ref().is_none_or(|(w, _)| w != what) {
                if let Some((_, b)) = bar.take() {
                    b.finish_and_clear();
                }
                bar = Some((what.to_string(), crate::progress::counter(all as u64, what)));
            }
            if let Some((_, b)) = &bar {
                b.set_position(d as u64);
            }
        },
    );
    if let Some((_, b)) = bar.take() {
        b.finish_and_clear();
    }
    let (trials, best, test_summary, records) = result?;
    let report = serde_json::json!({
        "task": task.name,
        "k": k,
        "trials": trials,
        "best_trial": best,
        "best_shots": trials.get(best).map(|t| t.shots.clone()),
        "test": test_summary,
    });
    lever_model::fsutil::write_atomic(&out, |tmp| -> Result<()> {
        std::fs::create_dir(tmp).with_context(|| out.display().to_string())?;
        write_records(
            tmp,
            &out,
            &format!("search-k{k}-best-test.jsonl"),
            &records,
            &[],
        )?;
        let text = serde_json::to_string_pretty(&report)?;
        put(tmp, &out, &format!("search-k{k}.json"), &text)
    })?;
    if r.json {
        println!("{report}");
        return Ok(());
    }
    let metric = task.metric.name();
    println!(
        "{} k={k}: {} random sets on dev (n {}), metric {metric}",
        task.name,
        trials.len(),
        dev.len()
    );
    println!(
        "{:<7} {:>8}  {:<18}  shots (train indices)",
        "trial", "dev", "95% CI"
    );
    for t in &trials {
        println!(
            "{:<7} {:>8.4}  {:<18}  {:?}{}",
            t.trial,
            t.dev.score,
            ci(t.dev.ci95),
            t.shots,
            if t.trial == best { "  <- best" } else { "" }
        );
    }
    println!(
        "best set on test (n {}): {metric} {:.4} {}",
        test_summary.n,
        test_summary.score,
        ci(test_summary.ci95)
    );
    eprintln!("records and search-k{k}.json: {}", out.display());
    Ok(())
}

fn load_task(r: &TaskRunArgs) -> Result<Task> {
    let Some(path) = &r.task else {
        anyhow::bail!("a task file is needed: lever eval TASK.toml");
    };
    Ok(lever_eval::task::load(path)?)
}

fn format_of(r: &TaskRunArgs, task: &Task) -> Format {
    match r.format.as_deref() {
        Some("chat") => Format::Chat,
        Some(_) => Format::Block,
        None => task.fewshot.format,
    }
}

fn needs_encoder(settings: &[Setting], r: &TaskRunArgs) -> Result<Option<lever_model::Encoder>> {
    let knn = settings.iter().any(|s| {
        s.shots > 0 && matches!(s.select, lever_eval::Select::Knn | lever_eval::Select::Mmr)
    });
    Ok(if knn {
        Some(crate::embed::load_encoder(&r.embedder, 32)?)
    } else {
        None
    })
}

/// The evaluator: prompts built with `model`, generation metrics answered by `--backend`'s
/// server or `model`.
fn evaluator<'a>(
    model: &'a Arc<lever_model::Model>,
    task: &'a Task,
    r: &TaskRunArgs,
    encoder: Option<&'a lever_model::Encoder>,
    latent: Option<crate::rag_setting::LatentGenerator>,
) -> Result<Evaluator<'a>> {
    // RAG-Sequence and RAG-Token need the model's logits under every passage, which a server
    // does not give; their prompts stay the closed-book ones, so the eval cache (keyed on the
    // prompt) is not theirs to use.
    let is_latent = latent.is_some();
    let generator: Box<dyn lever_generate::Generator> = match latent {
        Some(g) => {
            if r.backend.backend.is_some() {
                anyhow::bail!(
                    "--rag seq and --rag token need the model's logits under every passage, which a --backend server does not give"
                );
            }
            Box::new(g)
        }
        None => crate::generator::resolve(&r.backend, || Ok(model.clone()))?,
    };
    let mut ev = Evaluator::new(model, task, generator);
    ev.encoder = encoder;
    ev.bootstrap = r.bootstrap;
    if !r.no_cache && !is_latent {
        let dir = r.cache.clone().unwrap_or_else(|| {
            lever_model::registry::lever_home()
                .join("cache")
                .join("eval")
        });
        ev.cache = Some(lever_eval::cache::Cache::open(
            &dir,
            &lever_eval::model_key(model),
        )?);
    }
    Ok(ev)
}

/// The retrieval settings `lever eval` runs: `--rag`, else the task's `[rag] formulation`,
/// else closed-book. Each one but closed needs the task's `[rag]` section and its index.
fn rag_settings(a: &EvalTaskArgs, task: &Task) -> Result<Vec<String>> {
    let mut rags: Vec<String> = Vec::new();
    let wanted = if a.rag.is_empty() {
        vec![
            task.rag
                .as_ref()
                .map_or("closed".into(), |r| r.formulation.clone()),
        ]
    } else {
        a.rag.clone()
    };
    for f in wanted {
        if !rags.contains(&f) {
            rags.push(f);
        }
    }
    if let Some(f) = rags.iter().find(|f| *f != "closed") {
        let Some(spec) = &task.rag else {
            anyhow::bail!(
                "{}: --rag {f} needs a [rag] section naming an index (docs/tasks.md)",
                task.path.display()
            );
        };
        if !lever_rag::Index::exists(&spec.index) {
            anyhow::bail!(
                "{}: [rag] index {}: no index here (make one with `lever index add PATH… --index {}`)",
                task.path.display(),
                spec.index.display(),
                spec.index.display()
            );
        }
    }
    Ok(rags)
}

/// How a retrieval setting reads in the table: "closed", "concat k3", "seq k3", "token k3".
fn rag_label(rag: &str, task: &Task) -> String {
    match &task.rag {
        Some(spec) if rag != "closed" => format!("{rag} k{}", spec.k),
        _ => rag.to_string(),
    }
}

/// `--out` (refused when it holds anything, unless --force), or the first of runs/NAME,
/// runs/NAME-2, ... that is missing or empty: every run gets its own folder.
fn out_dir(r: &TaskRunArgs, name: &str) -> Result<PathBuf> {
    if let Some(out) = &r.out {
        crate::check_target(out, r.force)?;
        return Ok(out.clone());
    }
    let runs = PathBuf::from("runs");
    let free = |p: &Path| crate::check_target(p, false).is_ok();
    let mut dir = runs.join(name);
    let mut n = 2;
    while !free(&dir) {
        dir = runs.join(format!("{name}-{n}"));
        n += 1;
    }
    Ok(dir)
}

/// Write `name` into the folder being built (`tmp`); errors name the final folder `out`.
fn put(tmp: &Path, out: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::write(tmp.join(name), text).with_context(|| out.join(name).display().to_string())
}

/// One JSON line per record, with the passages retrieved for it where there are any.
fn write_records(
    tmp: &Path,
    out: &Path,
    name: &str,
    records: &[Record],
    passages: &[Vec<String>],
) -> Result<()> {
    let mut text = String::new();
    for (i, r) in records.iter().enumerate() {
        let mut v = serde_json::to_value(r)?;
        if let Some(p) = passages.get(i) {
            v["passages"] = serde_json::json!(p);
        }
        text.push_str(&v.to_string());
        text.push('\n');
    }
    put(tmp, out, name, &text)
}

fn ci(c: Option<[f64; 2]>) -> String {
    c.map_or("-".into(), |[a, b]| format!("[{a:.4}, {b:.4}]"))
}

fn print_table(task: &Task, rows: &[Summary]) {
    let n = rows.first().map_or(0, |s| s.n);
    let split = rows.first().map_or("", |s| s.split.as_str());
    println!(
        "{}: split {split}, n {n}, metric {}",
        task.name,
        task.metric.name()
    );
    let extra = match &task.metric {
        lever_eval::metrics::Metric::Regex(_) => "format",
        m if m.is_multiple_choice() => "acc/acc_norm",
        _ => "",
    };
    let w = rows
        .iter()
        .map(|s| s.setting.len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!(
        "{:<w$}  {:>8}  {:<18}  {:>13}  {:>9}  {:>10}  {:>7}",
        "setting", "score", "95% CI", extra, "ms/ex", "prompt tok", "dropped"
    );
    for s in rows {
        let x = match (s.format_rate, s.acc, s.acc_norm) {
            (Some(f), _, _) => format!("{f:.3}"),
            (_, Some(a), Some(b)) => format!("{a:.3}/{b:.3}"),
            _ => String::new(),
        };
        println!(
            "{:<w$}  {:>8.4}  {:<18}  {:>13}  {:>9.0}  {:>10.0}  {:>7}",
            s.setting,
            s.score,
            ci(s.ci95),
            x,
            s.mean_latency_ms,
            s.mean_prompt_tokens,
            s.examples_dropped
        );
    }
}
