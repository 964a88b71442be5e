//! `lever ladder LADDER.toml --out DIR`: one task, climbed rung by rung — zero-shot, few-shot,
//! RAG, LoRA or full fine-tuning, and their combinations — each evaluated on the same test items
//! with the same metric, its cost counted, a paired comparison with the rung below, and a
//! verdict: the cheapest rung whose score is not significantly below the best.
//!
//! Nothing here is a second implementation: a rung's index is built by `lever index add`, its
//! training is `lever finetune` (both run as child processes, so their progress, checkpoints
//! and `--resume` are theirs), and its evaluation is lever-eval's `Evaluator`, the code of
//! `lever eval`, with the retrieved passages put in front of each question for RAG rungs.
//!
//! Every rung runs in a child process of its own (`lever ladder FILE --out DIR --rung NAME`,
//! hidden), so that its peak memory is its own and a killed ladder loses at most the rung in
//! flight: a rung is done when DIR/rungs/NAME/result.json exists (written last, atomically)
//! with the rung's settings; a training killed midway resumes from its checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lever_eval::{Evaluator, Format, Record, Select, Setting, Shots, Task};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::LadderArgs;

/// The ladder file (docs/ladder.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LadderFile {
    /// A lever eval task file, relative to the ladder file.
    pub task: PathBuf,
    /// The model every rung starts from (default: lever's default generator).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_split")]
    pub split: String,
    /// block or chat (default: the task's).
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
    /// Currency per hour of this machine, for the cost column.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Minutes a training rung may take: `lever plan` checks it before the training starts.
    #[serde(default)]
    pub budget_minutes: Option<f64>,
    #[serde(default)]
    pub rag: Option<RagSpec>,
    #[serde(default)]
    pub finetune: Option<FinetuneSpec>,
    #[serde(rename = "rung", default)]
    pub rungs: Vec<RungSpec>,
}

fn default_split() -> String {
    "test".into()
}
fn default_bootstrap() -> usize {
    1000
}
fn default_currency() -> String {
    "USD".into()
}

/// Retrieval for the rungs with `rag = true`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RagSpec {
    /// Files or folders to index (relative to the ladder file) into DIR/index, once.
    #[serde(default)]
    pub corpus: Vec<PathBuf>,
    /// Or an existing index folder.
    #[serde(default)]
    pub index: Option<PathBuf>,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The task template whose text is the search query (default: the default template).
    #[serde(default)]
    pub query_template: Option<String>,
}

fn default_k() -> usize {
    3
}
fn default_mode() -> String {
    "hybrid".into()
}

/// Fine-tuning for the rungs with `finetune = "lora" | "full"`: `lever finetune` on the task's
/// training split (prompt → target).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    #[serde(default)]
    pub lora_r: Option<usize>,
    /// Any other `lever finetune` options, as on its command line.
    #[serde(default)]
    pub args: Vec<String>,
}

impl Default for FinetuneSpec {
    fn default() -> Self {
        FinetuneSpec {
            steps: default_steps(),
            batch_size: default_batch(),
            lr: None,
            seq_len: default_seq_len(),
            lora_r: None,
            args: Vec::new(),
        }
    }
}

fn default_steps() -> usize {
    100
}
fn default_batch() -> usize {
    4
}
fn default_seq_len() -> usize {
    512
}

/// One rung: a way of prompting, maybe with retrieval, maybe on a fine-tuned model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RungSpec {
    pub name: String,
    #[serde(default)]
    pub shots: usize,
    #[serde(default)]
    pub select: Option<String>,
    #[serde(default)]
    pub rag: bool,
    /// How a RAG rung reads its passages: "concat" (all in one prompt, the default), "seq"
    /// (RAG-Sequence) or "token" (RAG-Token): each passage read on its own and the answer
    /// marginalized over them ([`lever_rag::latent`]). Absent from the fingerprint when unset,
    /// so that ladders written before it keep their finished rungs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formulation: Option<String>,
    /// "lora" or "full".
    #[serde(default)]
    pub finetune: Option<String>,
}

impl RungSpec {
    /// RAG-Sequence or RAG-Token, for a RAG rung that names one.
    fn latent(&self) -> Option<lever_rag::marginal::Formulation> {
        use lever_rag::marginal::Formulation;
        match (self.rag, self.formulation.as_deref()) {
            (true, Some("seq")) => Some(Formulation::Sequence),
            (true, Some("token")) => Some(Formulation::Token),
            _ => None,
        }
    }
}

/// A ladder file, read and checked: paths resolved, every rung valid, nothing missing.
pub struct Ladder {
    pub path: PathBuf,
    pub file: LadderFile,
    pub task: Task,
}

impl Ladder {
    pub fn load(path: &Path) -> Result<Ladder> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot be read", path.display()))?;
        let mut file: LadderFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let err = |what: String| anyhow::anyhow!("{}: {what}", path.display());
        file.task = base.join(&file.task);
        if let Some(rag) = &mut file.rag {
            for c in &mut rag.corpus {
                *c = base.join(&*c);
                if !c.exists() {
                    return Err(err(format!(
                        "[rag] corpus {}: no such file or folder",
                        c.display()
                    )));
                }
            }
            if let Some(i) = &mut rag.index {
                *i = base.join(&*i);
                if !lever_rag::Index::exists(i) {
                    return Err(err(format!("[rag] index {}: no index here", i.display())));
                }
            }
            if rag.corpus.is_empty() && rag.index.is_none() {
                return Err(err("[rag] needs corpus = [files] or index = \"DIR\"".into()));
            }
            rag.mode
                .parse::<lever_rag::Mode>()
                .map_err(|e| err(format!("[rag] mode: {e}")))?;
            if rag.k == 0 {
                return Err(err("[rag] k: at least 1".into()));
            }
        }
        if file.rungs.is_empty() {
            return Err(err("no [[rung]]: add at least one".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &file.rungs {
            if !seen.insert(r.name.as_str()) {
                return Err(err(format!("rung `{}` twice", r.name)));
            }
            lever_eval::task::check_name(&r.name)
                .map_err(|e| err(format!("rung `{}`: {e}", r.name)))?;
            if let Some(s) = &r.select {
                Select::parse(s).map_err(|e| err(format!("rung `{}`: select {e}", r.name)))?;
            }
            if r.rag && file.rag.is_none() {
                return Err(err(format!(
                    "rung `{}`: rag = true needs a [rag] section",
                    r.name
                )));
            }
            match (r.formulation.as_deref(), r.rag) {
                (None | Some("concat"), _) => {}
                (Some("seq" | "token"), true) => {}
                (Some("seq" | "token"), false) => {
                    return Err(err(format!(
                        "rung `{}`: formulation needs rag = true",
                        r.name
                    )));
                }
                (Some(other), _) => {
                    return Err(err(format!(
                        "rung `{}`: formulation = \"{other}\": expected \"concat\", \"seq\" or \"token\"",
                        r.name
                    )));
                }
            }
            match r.finetune.as_deref() {
                None => {}
                Some("lora" | "full") if file.finetune.is_some() => {}
                Some("lora" | "full") => {
                    return Err(err(format!(
                        "rung `{}`: finetune needs a [finetune] section",
                        r.name
                    )));
                }
                Some(other) => {
                    return Err(err(format!(
                        "rung `{}`: finetune = \"{other}\": expected \"lora\" or \"full\"",
                        r.name
                    )));
                }
            }
        }
        if !["train", "dev", "test"].contains(&file.split.as_str()) {
            return Err(err(format!("split `{}`: train, dev or test", file.split)));
        }
        if let Some(f) = file.format.as_deref()
            && !["block", "chat"].contains(&f)
        {
            return Err(err(format!("format `{f}`: block or chat")));
        }
        let task = lever_eval::task::load(&file.task)?;
        if let Some(r) = file.rungs.iter().find(|r| r.latent().is_some())
            && !task.metric.generates()
        {
            return Err(err(format!(
                "rung `{}`: formulation = \"{}\" decodes its answers; the task's metric {} needs log-likelihoods (use concat)",
                r.name,
                r.formulation.as_deref().unwrap_or_default(),
                task.metric.name()
            )));
        }
        let ladder = Ladder {
            path: path.to_path_buf(),
            file,
            task,
        };
        ladder.check_leakage()?;
        Ok(ladder)
    }

    /// A test item that is also a worked example or a fine-tuning example would measure
    /// memory, not skill: refused, with the overlapping lines.
    fn check_leakage(&self) -> Result<()> {
        let learns = self
            .file
            .rungs
            .iter()
            .any(|r| r.shots > 0 || r.finetune.is_some());
        if !learns {
            return Ok(());
        }
        let key = |e: &lever_eval::Example| {
            format!(
                "{}\u{1}{}",
                e.prompt(lever_eval::task::DEFAULT_TEMPLATE),
                e.target
            )
        };
        let train: std::collections::HashMap<String, &str> = self
            .task
            .train
            .iter()
            .map(|e| (key(e), e.origin.as_str()))
            .collect();
        let overlap: Vec<String> = self
            .task
            .split(&self.file.split)?
            .iter()
            .filter_map(|e| train.get(&key(e)).map(|t| format!("{} = {t}", e.origin)))
            .collect();
        if !overlap.is_empty() {
            bail!(
                "{}: leakage: {} {} item(s) are also training examples (the few-shot pool and the fine-tuning data): {}",
                self.path.display(),
                overlap.len(),
                self.file.split,
                overlap
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if overlap.len() > 5 { ", ..." } else { "" }
            );
        }
        Ok(())
    }

    fn rung(&self, name: &str) -> Result<&RungSpec> {
        self.file
            .rungs
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("{}: no rung `{name}`", self.path.display()))
    }

    fn format(&self) -> Format {
        match self.file.format.as_deref() {
            Some("chat") => Format::Chat,
            Some(_) => Format::Block,
            None => self.task.fewshot.format,
        }
    }

    /// What a rung's result depends on: a finished rung with other settings (or generated
    /// by another backend) is run again.
    fn fingerprint(&self, r: &RungSpec, a: &LadderArgs) -> Value {
        json!({
            "rung": r, "task": self.file.task, "model": self.file.model, "split": self.file.split,
            "format": self.file.format, "limit": a.limit,
            "backend": [&a.backend.backend, &a.backend.backend_model],
            "rag": r.rag.then(|| self.file.rag.clone()),
            "finetune": r.finetune.as_ref().map(|_| self.file.finetune.clone()),
        })
    }
}

pub fn run(a: LadderArgs) -> Result<()> {
    if let Some(dir) = &a.report_only {
        return report_only(dir);
    }
    // clap requires both unless --report-only.
    let (Some(file), Some(out)) = (&a.file, &a.out) else {
        bail!("lever ladder: a ladder file and --out DIR are needed");
    };
    let ladder = Ladder::load(file)?;
    if let Some(name) = &a.rung {
        return run_rung(&ladder, &a, out, name);
    }
    let names: Vec<String> = if a.rungs.is_empty() {
        ladder.file.rungs.iter().map(|r| r.name.clone()).collect()
    } else {
        for n in &a.rungs {
            ladder.rung(n)?;
        }
        a.rungs.clone()
    };
    if a.backend.backend.is_some()
        && let Some(r) = names
            .iter()
            .filter_map(|n| ladder.rung(n).ok())
            .find(|r| r.finetune.is_some())
    {
        bail!(
            "rung `{}`: a fine-tuned model is evaluated in this process; --backend serves the prompting and RAG rungs (use --rungs)",
            r.name
        );
    }
    // A ladder's folder is gone on with; one that holds other files is refused (--force
    // starts over, removing only what a ladder writes).
    let ours = [
        "rungs",
        "train",
        "index",
        "index.json",
        "ladder.json",
        "report.html",
    ];
    if out.join("rungs").is_dir() {
        if a.force {
            for n in ours {
                let p = out.join(n);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).with_context(|| p.display().to_string())?;
                } else if p.exists() {
                    std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
                }
            }
        }
    } else {
        crate::check_target(out, a.force)?;
    }
    std::fs::create_dir_all(out.join("rungs"))
        .with_context(|| format!("{}: cannot be created", out.display()))?;
    // Every training rung within the budget, by the plan, before any rung starts.
    for name in &names {
        check_budget(&ladder, out, ladder.rung(name)?)?;
    }
    let exe = std::env::current_exe().context("the path of this program")?;
    let mut results = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let r = ladder.rung(name)?;
        let done = out.join("rungs").join(name).join("result.json");
        let want = ladder.fingerprint(r, &a);
        let cached = read_json(&done).filter(|v| v["fingerprint"] == want);
        let result = match cached {
            Some(v) => {
                eprintln!("[{}/{}] {name}: done before, kept", i + 1, names.len());
                v
            }
            None => {
                eprintln!("[{}/{}] {name}", i + 1, names.len());
                let mut cmd = Command::new(&exe);
                cmd.arg("ladder")
                    .arg(file)
                    .arg("--out")
                    .arg(out)
                    .arg("--rung")
                    .arg(name);
                if let Some(n) = a.limit {
                    cmd.arg("--limit").arg(n.to_string());
                }
                // The key travels in the environment, not in the arguments others can see.
                if let Some(b) = &a.backend.backend {
                    cmd.arg("--backend").arg(b);
                }
                if let Some(k) = &a.backend.backend_key {
                    cmd.env("LEVER_BACKEND_KEY", k);
                }
                if let Some(m) = &a.backend.backend_model {
                    cmd.arg("--backend-model").arg(m);
                }
                if a.no_cache {
                    cmd.arg("--no-cache");
                }
                cmd.stdout(std::process::Stdio::from(std::io::stderr()));
                crate::supervise::die_with_parent(&mut cmd);
                let status = cmd.status().context("starting a rung")?;
                if !status.success() {
                    bail!(
                        "rung `{name}` failed (see above); finished rungs are kept: run the same command again to go on"
                    );
                }
                read_json(&done).with_context(|| format!("{}: missing", done.display()))?
            }
        };
        results.push(result);
    }
    let mut report = report(&ladder, out, &results)?;
    report["verdict"]["next"] = json!(next_rung(&ladder, out, &names));
    write_report(out, &report)?;
    if a.json {
        println!("{report}");
    } else {
        print_table(&ladder, &report);
        eprintln!(
            "ladder.json, report.html and each rung's records: {}",
            out.display()
        );
    }
    Ok(())
}

/// A training rung whose training `lever plan` says will take longer than `budget_minutes`
/// is refused before it starts.
fn check_budget(ladder: &Ladder, out: &Path, r: &RungSpec) -> Result<()> {
    let (Some(budget), Some(method)) = (ladder.file.budget_minutes, r.finetune.as_deref()) else {
        return Ok(());
    };
    let result = if method == "lora" { "adapter" } else { "model" };
    if out
        .join("train")
        .join(method)
        .join("run")
        .join(result)
        .exists()
    {
        return Ok(()); // Trained already.
    }
    let spec = ladder.file.finetune.clone().unwrap_or_default();
    let p = plan_training(ladder, out, method, &spec)?;
    let planned = p["time"]["total_s"].as_f64().unwrap_or(0.0);
    if planned > budget * 60.0 {
        bail!(
            "rung `{}`: {} steps of {method} fine-tuning are planned at {:.1} min on this machine ({}), over budget_minutes = {budget}; lower [finetune] steps or raise the budget",
            r.name,
            spec.steps,
            planned / 60.0,
            if p["hardware"]["calibrated"].as_bool() == Some(true) {
                "calibrated"
            } else {
                "uncalibrated: run `lever plan --calibrate`"
            }
        );
    }
    Ok(())
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The peak resident memory of this process and of the largest child it waited for, in MB.
fn peak_rss_mb() -> f64 {
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    own.max(children_maxrss_kb()) / 1024.0
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn children_maxrss_kb() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no other memory is touched.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) == 0 {
            u.ru_maxrss as f64
        } else {
            0.0
        }
    }
}

#[cfg(not(unix))]
fn children_maxrss_kb() -> f64 {
    0.0
}

/// One rung, in this (child) process: its index and training when missing, then the
/// evaluation; DIR/rungs/NAME/records.jsonl, then result.json.
fn run_rung(ladder: &Ladder, a: &LadderArgs, out: &Path, name: &str) -> Result<()> {
    let r = ladder.rung(name)?;
    let dir = out.join("rungs").join(name);
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let exe = std::env::current_exe().context("the path of this program")?;
    let base_model = ladder
        .file
        .model
        .clone()
        .unwrap_or_else(|| lever_model::registry::DEFAULT_GENERATOR.to_string());
    let mut cost = serde_json::Map::new();

    // Training: `lever finetune` on the training split, shared by the rungs with the same
    // method (DIR/train/METHOD), resumed when a run was killed midway.
    let mut adapter = None;
    let mut model_ref = base_model.clone();
    if let Some(method) = &r.finetune {
        let spec = ladder.file.finetune.as_ref().context("[finetune]")?;
        let tdir = out.join("train").join(method);
        let run_dir = tdir.join("run");
        let result_dir = run_dir.join(if method == "lora" { "adapter" } else { "model" });
        let started = Instant::now();
        if !result_dir.exists() {
            std::fs::create_dir_all(&tdir).with_context(|| tdir.display().to_string())?;
            let data = training_data(ladder, out)?;
            let mut cmd = Command::new(&exe);
            cmd.arg("finetune")
                .arg("--model")
                .arg(&base_model)
                .arg("--data")
                .arg(&data)
                .args(["--steps", &spec.steps.to_string()])
                .args(["--batch-size", &spec.batch_size.to_string()])
                .args(["--seq-len", &spec.seq_len.to_string()])
                .args(["--overlong", "truncate", "--val-fraction", "0"])
                .arg("--out")
                .arg(&run_dir);
            if method == "lora" {
                cmd.arg("--lora");
                if let Some(rk) = spec.lora_r {
                    cmd.args(["--lora-r", &rk.to_string()]);
                }
            }
            if let Some(lr) = spec.lr {
                cmd.args(["--lr", &lr.to_string()]);
            }
            cmd.args(&spec.args);
            if lever_train::checkpoint::any(&run_dir.join("checkpoints")) {
                cmd.arg("--resume");
            } else if run_dir.exists() {
                cmd.arg("--force");
            }
            // The ladder's table is its standard output: the training reports on stderr.
            cmd.stdout(std::process::Stdio::from(std::io::stderr()));
            crate::supervise::die_with_parent(&mut cmd);
            let status = cmd.status().context("starting lever finetune")?;
            if !status.success() {
                bail!("rung `{name}`: lever finetune failed (see above)");
            }
            crate::write_file(
                &tdir.join("train.json"),
                json!({"wall_s": started.elapsed().as_secs_f64()}).to_string(),
            )?;
        }
        let manifest = read_json(&run_dir.join("manifest.json")).unwrap_or(Value::Null);
        let res = &manifest["result"];
        // Every rung that needs the training pays for it (as every RAG rung pays for the
        // index), also when an earlier rung or an earlier run of the ladder trained it.
        let wall = read_json(&tdir.join("train.json")).map(|v| v["wall_s"].clone());
        cost.insert(
            "train_s".into(),
            wall.filter(Value::is_number)
                .unwrap_or_else(|| res["seconds"].clone()),
        );
        cost.insert("train_steps".into(), json!(spec.steps));
        // The training's own figures (its manifest): seconds training, tokens seen.
        cost.insert("train_seconds".into(), res["seconds"].clone());
        cost.insert("train_tokens".into(), res["tokens"].clone());
        if method == "lora" {
            adapter = Some(result_dir);
        } else {
            model_ref = result_dir.display().to_string();
        }
    }

    // Retrieval: the index, built once into DIR/index by `lever index add`.
    let mut task = ladder.task.clone();
    let split = ladder.file.split.clone();
    let mut examples = task.split(&split)?.to_vec();
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let mut retrieved: Vec<Vec<String>> = Vec::new();
    let mut latent_items: Vec<crate::rag_setting::LatentItem> = Vec::new();
    if r.rag {
        let spec = ladder.file.rag.as_ref().context("[rag]")?;
        let index_dir = match &spec.index {
            Some(i) => i.clone(),
            None => {
                let i = out.join("index");
                let marker = out.join("index.json");
                if read_json(&marker).is_none() {
                    let started = Instant::now();
                    let mut cmd = Command::new(&exe);
                    cmd.args(["index", "add"])
                        .args(&spec.corpus)
                        .arg("--index")
                        .arg(&i);
                    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
                    crate::supervise::die_with_parent(&mut cmd);
                    let status = cmd.status().context("starting lever index add")?;
                    if !status.success() {
                        bail!("rung `{name}`: lever index add failed (see above)");
                    }
                    let bytes: u64 = std::fs::read_dir(&i)
                        .map(|d| {
                            d.flatten()
                                .filter_map(|e| e.metadata().ok())
                                .map(|m| m.len())
                                .sum()
                        })
                        .unwrap_or(0);
                    crate::write_file(
                        &marker,
                        json!({"index_build_s": started.elapsed().as_secs_f64(), "index_mb": bytes as f64 / 1e6})
                            .to_string(),
                    )?;
                }
                if let Some(m) = read_json(&marker) {
                    cost.insert("index_build_s".into(), m["index_build_s"].clone());
                    cost.insert("index_mb".into(), m["index_mb"].clone());
                }
                i
            }
        };
        let found = crate::rag_setting::retrieve(
            &index_dir,
            &mut examples,
            &crate::rag_setting::Spec {
                k: spec.k,
                mode: &spec.mode,
                query_template: spec.query_template.as_deref(),
                latent: r.latent(),
            },
            &format!("rung `{name}`"),
        )?;
        retrieved = found.passages;
        latent_items = found.latent;
        cost.insert("retrieval_ms_per_query".into(), json!(found.ms_per_query));
    }
    match split.as_str() {
        "dev" => task.dev = examples.clone(),
        "train" => task.train = examples.clone(),
        _ => task.test = examples.clone(),
    }

    // Evaluation: lever eval's evaluator. A latent rung steps its passages' contexts as one
    // batch, with the packed kernels `lever serve` batches with.
    if r.latent().is_some() {
        lever_model::qweight::set_packing(true);
    }
    let model = Arc::new(crate::load_model(&crate::cli::ModelArg {
        model: model_ref.clone(),
        adapter: adapter.clone(),
    })?);
    let select = match &r.select {
        Some(s) => Select::parse(s).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => task.fewshot.select,
    };
    let setting = Setting {
        shots: r.shots,
        select,
        template: lever_eval::task::DEFAULT_TEMPLATE.to_string(),
        format: ladder.format(),
    };
    let encoder = if r.shots > 0 && matches!(select, Select::Knn | Select::Mmr) {
        Some(crate::embed::load_encoder(
            lever_model::registry::DEFAULT_EMBEDDER,
            32,
        )?)
    } else {
        None
    };
    let generator: Box<dyn lever_generate::Generator> = match r.latent() {
        Some(f) => {
            if a.backend.backend.is_some() {
                bail!(
                    "rung `{name}`: formulation = \"{}\" needs the model's logits for every passage, which a --backend server does not give (use --rungs)",
                    f.name()
                );
            }
            Box::new(crate::rag_setting::LatentGenerator::new(
                model.clone(),
                f,
                latent_items,
            ))
        }
        None => crate::generator::resolve(&a.backend, || Ok(model.clone()))?,
    };
    let mut ev = Evaluator::new(&model, &task, generator);
    ev.encoder = encoder.as_ref();
    ev.bootstrap = ladder.file.bootstrap;
    // The eval cache keys on the prompt, which a latent rung leaves as the closed-book one.
    if !a.no_cache && r.latent().is_none() {
        let cache_dir = lever_model::registry::lever_home()
            .join("cache")
            .join("eval");
        ev.cache = Some(lever_eval::cache::Cache::open(
            &cache_dir,
            &lever_eval::model_key(&model),
        )?);
    }
    let bar = crate::progress::counter(examples.len() as u64, name);
    let evaluated = ev.run(&setting, &split, &examples, Shots::Select, &mut |d, _| {
        bar.set_position(d as u64)
    });
    bar.finish_and_clear();
    let (summary, records) = evaluated?;
    let mut lines = String::new();
    for (i, rec) in records.iter().enumerate() {
        let mut v = serde_json::to_value(rec)?;
        if let Some(p) = retrieved.get(i) {
            v["passages"] = json!(p);
        }
        lines += &v.to_string();
        lines.push('\n');
    }
    crate::write_file(&dir.join("records.jsonl"), lines)?;
    // Each answer's latency as first measured (the eval cache keeps it): a rung answered
    // from the cache costs what it cost when it ran, not the milliseconds of a lookup.
    let mut lat: Vec<f64> = records.iter().map(|r| r.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> Option<f64> {
        (!lat.is_empty())
            .then(|| lat[((p * (lat.len() - 1) as f64).round() as usize).min(lat.len() - 1)])
    };
    cost.insert("eval_s".into(), json!(lat.iter().sum::<f64>() / 1e3));
    cost.insert("eval_wall_s".into(), json!(summary.seconds));
    cost.insert("cached_answers".into(), json!(summary.cached));
    cost.insert("latency_p50_ms".into(), json!(pct(0.5)));
    cost.insert("latency_p95_ms".into(), json!(pct(0.95)));
    cost.insert(
        "prompt_tokens_per_query".into(),
        json!(summary.mean_prompt_tokens),
    );
    cost.insert("peak_rss_mb".into(), json!(peak_rss_mb()));
    let result = json!({
        "name": name,
        "fingerprint": ladder.fingerprint(r, a),
        "model": model_ref,
        "adapter": adapter,
        "setting": summary.setting,
        "metric": summary.metric,
        "score": summary.score,
        "ci": summary.ci95,
        "n": summary.n,
        "cached": summary.cached,
        "scores": records.iter().map(|r: &Record| r.score).collect::<Vec<_>>(),
        "cost": cost,
    });
    crate::write_file(
        &dir.join("result.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    eprintln!(
        "{name}: {} {:.4} (n {}, {:.1} s)",
        summary.metric, summary.score, summary.n, summary.seconds
    );
    Ok(())
}

/// The task's training split as `lever finetune` data (the prompt under the default template
/// as the instruction, the target as the answer): DIR/train/data.jsonl, written once.
fn training_data(ladder: &Ladder, out: &Path) -> Result<PathBuf> {
    let path = out.join("train").join("data.jsonl");
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(out.join("train")).with_context(|| out.display().to_string())?;
    let mut lines = String::new();
    for e in &ladder.task.train {
        lines += &json!({
            "instruction": e.prompt(lever_eval::task::DEFAULT_TEMPLATE),
            "output": e.target,
        })
        .to_string();
        lines.push('\n');
    }
    crate::write_file(&path, lines)?;
    Ok(path)
}

/// `lever plan` for `lever finetune` of the training split by `method`, on this machine:
/// its JSON (`time.total_s`, `cost`, `hardware.calibrated`).
fn plan_training(ladder: &Ladder, out: &Path, method: &str, spec: &FinetuneSpec) -> Result<Value> {
    let exe = std::env::current_exe().context("the path of this program")?;
    let data = training_data(ladder, out)?;
    let model = ladder
        .file
        .model
        .clone()
        .unwrap_or_else(|| lever_model::registry::DEFAULT_GENERATOR.to_string());
    let mut cmd = Command::new(&exe);
    cmd.args(["plan", "--model", &model, "--job", method, "--data"])
        .arg(&data)
        .args(["--steps", &spec.steps.to_string()])
        .args(["--batch", &spec.batch_size.to_string()])
        .args(["--seq-len", &spec.seq_len.to_string()])
        .args(["--val-fraction", "0", "--json"]);
    if let Some(r) = spec.lora_r {
        cmd.args(["--lora-rank", &r.to_string()]);
    }
    if let Some(p) = ladder.file.price_per_hour {
        cmd.args(["--price", &p.to_string()]);
    }
    let o = cmd.output().context("starting lever plan")?;
    if !o.status.success() {
        bail!(
            "lever plan for the {method} rung: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    serde_json::from_slice(&o.stdout).context("lever plan --json: not JSON")
}

/// The rung above the highest of those run, with its planned cost: LoRA when nothing is
/// fine-tuned, full fine-tuning after LoRA.
fn next_rung(ladder: &Ladder, out: &Path, names: &[String]) -> Option<Value> {
    let has = |m: &str| {
        names
            .iter()
            .filter_map(|n| ladder.rung(n).ok())
            .any(|r| r.finetune.as_deref() == Some(m))
    };
    let method = if !has("lora") && !has("full") {
        "lora"
    } else if !has("full") {
        "full"
    } else {
        return Some(json!({
            "rung": "continued pretraining",
            "note": "every fine-tuning rung is in the ladder; plan continued pretraining with `lever plan --job pretrain --model M --tokens D`",
        }));
    };
    let spec = ladder.file.finetune.clone().unwrap_or_default();
    match plan_training(ladder, out, method, &spec) {
        Ok(p) => Some(json!({
            "rung": if method == "lora" { "LoRA fine-tuning" } else { "full fine-tuning" },
            "method": method, "steps": spec.steps,
            "planned_s": p["time"]["total_s"], "planned_cost": p["cost"],
            "peak_memory": p["memory"],
            "calibrated": p["hardware"]["calibrated"],
        })),
        Err(e) => Some(json!({"rung": method, "note": format!("not planned: {e:#}")})),
    }
}

/// A rung's total seconds: its training, its index build, its evaluation.
fn seconds(v: &Value) -> f64 {
    let c = &v["cost"];
    ["train_s", "index_build_s", "eval_s"]
        .iter()
        .filter_map(|k| c[k].as_f64())
        .sum()
}

/// The mean difference b − a over paired items, with its 95% paired-bootstrap interval.
pub fn paired(a: &[f64], b: &[f64], iters: usize, seed: u64) -> (f64, Option<(f64, f64)>) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    lever_eval::metrics::mean_ci(&d, iters, seed)
}

fn scores(v: &Value) -> Vec<f64> {
    v["scores"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// ladder.json: the rungs (score, interval, costs, the paired comparison with the rung
/// below) and the verdict.
fn report(ladder: &Ladder, out: &Path, results: &[Value]) -> Result<Value> {
    let iters = ladder.file.bootstrap;
    let price = ladder.file.price_per_hour;
    let mut rungs = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let mut v = r.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("fingerprint");
            o.remove("scores");
        }
        let secs = seconds(r);
        v["seconds"] = json!(secs);
        if let Some(p) = price {
            v["cost"]["money"] = json!(p * secs / 3600.0);
        }
        let method = r["name"]
            .as_str()
            .and_then(|n| ladder.rung(n).ok())
            .and_then(|s| s.finetune.as_deref());
        if let Some(method) = method {
            v["loss_curve"] = json!(loss_curve(&out.join("train").join(method).join("run"))?);
        }
        if i > 0 {
            let (mean, ci) = paired(&scores(&results[i - 1]), &scores(r), iters, 7);
            let real = ci.is_some_and(|(lo, hi)| lo > 0.0 || hi < 0.0);
            v["vs_below"] = json!({
                "rung": results[i - 1]["name"], "gain": mean, "ci": ci.map(|c| [c.0, c.1]),
                "significant": real,
            });
        }
        rungs.push(v);
    }
    // The best score; the cheapest rung not significantly below it.
    // The first of equal scores: the lower rung.
    let score = |i: usize| results[i]["score"].as_f64().unwrap_or(0.0);
    let best = (1..results.len()).fold(0, |b, i| if score(i) > score(b) { i } else { b });
    if results.is_empty() {
        bail!("no rungs");
    }
    let mut pick = best;
    for i in 0..results.len() {
        let (_, ci) = paired(&scores(&results[best]), &scores(&results[i]), iters, 11);
        let not_below = i == best || ci.is_none_or(|(_, hi)| hi >= 0.0);
        if not_below && seconds(&results[i]) < seconds(&results[pick]) {
            pick = i;
        }
    }
    let name = |i: usize| results[i]["name"].as_str().unwrap_or("?").to_string();
    let said = if pick == best {
        format!(
            "use `{}`: the best score, and no cheaper rung comes within its interval",
            name(best)
        )
    } else {
        format!(
            "use `{}`: not significantly below the best (`{}`) on these {} items, and cheaper ({:.0} s vs {:.0} s)",
            name(pick),
            name(best),
            results[best]["n"],
            seconds(&results[pick]),
            seconds(&results[best])
        )
    };
    Ok(json!({
        "ladder": ladder.path, "task": ladder.task.name, "split": ladder.file.split,
        "metric": ladder.task.metric.name(), "out": out,
        "price_per_hour": price, "currency": ladder.file.currency,
        "rungs": rungs,
        "items": items(ladder, out, results)?,
        "verdict": {"best": name(best), "use": name(pick), "text": said},
    }))
}

/// A training's loss per step, `[[step, loss], ...]`, from RUN/metrics.jsonl (the last line
/// of a step counts: a resumed training logs again the steps after its checkpoint).
fn loss_curve(run: &Path) -> Result<Vec<[f64; 2]>> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot be read", path.display()))?;
    let mut steps = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            steps.insert(step, loss);
        }
    }
    Ok(steps.into_iter().map(|(s, l)| [s as f64, l]).collect())
}

/// Every test item with each rung's answer, from the rungs' records.jsonl: `{"id": FILE:LINE,
/// "question": the prompt under the default template, "gold", "answers": {RUNG: {"output",
/// "score", "right"}}}`, in the split's order. `right`: a score of at least 0.5 (the metrics
/// that score 0 or 1; F1 over one half); none for perplexity, which has no right answer.
fn items(ladder: &Ladder, out: &Path, results: &[Value]) -> Result<Vec<Value>> {
    let questions: std::collections::HashMap<&str, &str> = ladder
        .task
        .split(&ladder.file.split)?
        .iter()
        .map(|e| {
            (
                e.origin.as_str(),
                e.prompt(lever_eval::task::DEFAULT_TEMPLATE),
            )
        })
        .collect();
    let graded = !matches!(ladder.task.metric, lever_eval::metrics::Metric::Perplexity);
    let mut items: Vec<Value> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for r in results {
        let name = r["name"].as_str().unwrap_or("?");
        let path = out.join("rungs").join(name).join("records.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot be read", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let rec: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let origin = rec["origin"].as_str().unwrap_or_default().to_string();
            let at = *index.entry(origin.clone()).or_insert_with(|| {
                let question = questions
                    .get(origin.as_str())
                    .map_or(rec["prompt"].clone(), |q| json!(q));
                items.push(json!({
                    "id": origin, "question": question, "gold": rec["target"], "answers": {},
                }));
                items.len() - 1
            });
            let score = rec["score"].as_f64();
            items[at]["answers"][name] = json!({
                "output": rec["output"], "score": score,
                "right": graded.then(|| score.map(|s| s >= 0.5)).flatten(),
            });
        }
    }
    Ok(items)
}

/// DIR/ladder.json, then DIR/report.html from it: each written whole (a temporary file,
/// renamed), so a reader never sees half of either.
fn write_report(out: &Path, report: &Value) -> Result<()> {
    crate::write_file(
        &out.join("ladder.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    crate::write_file(&out.join("report.html"), crate::ladder_report::html(report))
}

/// `lever ladder --report-only DIR`: DIR/report.html again from DIR/ladder.json.
fn report_only(dir: &Path) -> Result<()> {
    let path = dir.join("ladder.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot be read", path.display()))?;
    let report: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    if !report["rungs"].is_array() {
        bail!("{}: no \"rungs\": not a ladder's", path.display());
    }
    let html = dir.join("report.html");
    crate::write_file(&html, crate::ladder_report::html(&report))?;
    eprintln!("{}", html.display());
    Ok(())
}

fn print_table(ladder: &Ladder, report: &Value) {
    println!(
        "{} ({} split, metric {})",
        ladder.task.name,
        ladder.file.split,
        ladder.task.metric.name()
    );
    println!(
        "{:<14} {:>7}  {:<17} {:>8} {:>8} {:>9} {:>9} {:>8}  vs rung below",
        "rung", "score", "95% CI", "train s", "eval s", "p50 ms", "prompt tk", "RSS MB"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    for r in report["rungs"].as_array().into_iter().flatten() {
        let ci = r["ci"].as_array().map_or("-".to_string(), |c| {
            format!(
                "[{:.3}, {:.3}]",
                c[0].as_f64().unwrap_or(0.0),
                c[1].as_f64().unwrap_or(0.0)
            )
        });
        let below = &r["vs_below"];
        let vs = if below.is_null() {
            String::new()
        } else {
            format!(
                "{:+.3} vs {}{}",
                below["gain"].as_f64().unwrap_or(0.0),
                below["rung"].as_str().unwrap_or("?"),
                if below["significant"].as_bool() == Some(true) {
                    " (real)"
                } else {
                    " (within noise)"
                }
            )
        };
        let c = &r["cost"];
        println!(
            "{:<14} {:>7.4}  {:<17} {:>8} {:>8} {:>9} {:>9} {:>8}  {vs}",
            r["name"].as_str().unwrap_or("?"),
            r["score"].as_f64().unwrap_or(0.0),
            ci,
            f(&c["train_s"]),
            f(&c["eval_s"]),
            f(&c["latency_p50_ms"]),
            f(&c["prompt_tokens_per_query"]),
            f(&c["peak_rss_mb"]),
        );
    }
    println!(
        "verdict: {}",
        report["verdict"]["text"].as_str().unwrap_or("")
    );
    let next = &report["verdict"]["next"];
    if let Some(s) = next["planned_s"].as_f64() {
        let cost = next["planned_cost"].as_f64().map_or(String::new(), |c| {
            format!(", {c:.3} {}", report["currency"].as_str().unwrap_or(""))
        });
        let how = if next["calibrated"].as_bool() == Some(true) {
            ""
        } else {
            " (uncalibrated: `lever plan --calibrate`)"
        };
        println!(
            "next rung: {} ({} steps), planned {:.1} min on this machine{cost}{how}",
            next["rung"].as_str().unwrap_or("?"),
            next["steps"],
            s / 60.0,
        );
    } else if let Some(n) = next["note"].as_str() {
        println!("next rung: {}: {n}", next["rung"].as_str().unwrap_or("?"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_gain_is_real_only_when_its_interval_excludes_zero() {
        // b is right wherever a is, and on 30 more items of 100.
        let a: Vec<f64> = (0..100).map(|i| f64::from(i < 40)).collect();
        let b: Vec<f64> = (0..100).map(|i| f64::from(i < 70)).collect();
        let (gain, ci) = paired(&a, &b, 1000, 7);
        assert!((gain - 0.30).abs() < 1e-12);
        let (lo, hi) = ci.unwrap();
        assert!(lo > 0.15 && hi < 0.45, "{lo} {hi}");
        // Two rungs that differ on 2 items of 100, one each way: no real difference.
        let mut c = a.clone();
        c[0] = 0.0;
        c[50] = 1.0;
        let (gain, ci) = paired(&a, &c, 1000, 7);
        assert_eq!(gain, 0.0);
        let (lo, hi) = ci.unwrap();
        assert!(lo < 0.0 && hi > 0.0, "{lo} {hi}");
    }
}
