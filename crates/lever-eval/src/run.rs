//! Running a task under one setting (shots, selector, template, format): build each prompt
//! with its worked examples within the token budget, ask the model (or the cache), score, and
//! summarize with a bootstrap interval.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use lever_generate::{Flow, Generator, Prompt, Request, Sampling, Session, Source, Unset};
use lever_model::chat::Message;
use lever_model::{Encoder, Model};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cache::{self, Cache};
use crate::fewshot;
use crate::mc::{McItem, McOptions, argmax, score_item};
use crate::metrics::{Metric, bootstrap_ci, mean_ci};
use crate::task::{DEFAULT_TEMPLATE, Example, Format, Select, Task};
use crate::{Error, Result};

/// What a generation metric's prompt is before a chat template (owned; see
/// `Evaluator::generation_prompt`).
enum GenPrompt {
    Chat(Vec<Message>),
    Text(String),
}

/// One way of prompting.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub shots: usize,
    pub select: Select,
    pub template: String,
    pub format: Format,
}

impl Setting {
    /// "0-shot", "5-shot knn", "1-shot fixed [terse] chat".
    pub fn label(&self) -> String {
        let mut s = if self.shots == 0 {
            "0-shot".to_string()
        } else {
            format!("{}-shot {}", self.shots, self.select.name())
        };
        if self.template != DEFAULT_TEMPLATE {
            s.push_str(&format!(" [{}]", self.template));
        }
        if self.format == Format::Chat {
            s.push_str(" chat");
        }
        s
    }

    /// A file name for the setting's per-example records.
    pub fn slug(&self) -> String {
        self.label()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .replace("__", "_")
            .trim_end_matches('_')
            .to_string()
    }
}

/// Where the worked examples come from: a selector, or the same given set for every question
/// (`fewshot search`).
#[derive(Debug, Clone, Copy)]
pub enum Shots<'a> {
    Select,
    Given(&'a [usize]),
}

/// One evaluated example.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub id: usize,
    pub origin: String,
    pub prompt: String,
    pub output: String,
    pub target: String,
    /// The metric's score of this example (for perplexity: this example's perplexity).
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loglikelihoods: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Perplexity: the target's negative log-likelihood (nats) and its tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll: Option<f64>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub latency_ms: f64,
    /// Training-example indices shown, in prompt order.
    pub shots: Vec<usize>,
    /// Examples dropped to fit the token budget.
    pub dropped: usize,
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub task: String,
    pub setting: String,
    pub split: String,
    pub shots: usize,
    pub select: String,
    pub template: String,
    pub format: Format,
    pub metric: String,
    pub score: f64,
    /// 95% percentile-bootstrap interval of `score`.
    pub ci95: Option<[f64; 2]>,
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// regex: the share of outputs in which the pattern found an answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_rate: Option<f64>,
    pub mean_latency_ms: f64,
    pub mean_prompt_tokens: f64,
    pub mean_completion_tokens: f64,
    /// Worked examples dropped to fit the budget, in all prompts together, and how many
    /// prompts lost any.
    pub examples_dropped: usize,
    pub prompts_with_drops: usize,
    /// Results taken from the cache.
    pub cached: usize,
    pub seconds: f64,
}

pub struct Evaluator<'a> {
    pub model: &'a Model,
    pub task: &'a Task,
    pub cache: Option<Cache>,
    /// The sentence encoder for knn and mmr.
    pub encoder: Option<&'a Encoder>,
    /// Bootstrap resamples for the interval.
    pub bootstrap: usize,
    /// What answers the generation metrics: `model` in this process, or a server. Prompts are
    /// built and budgeted with `model`'s tokenizer and chat template either way; chat-format
    /// prompts go to the generator as messages.
    generator: Box<dyn Generator + 'a>,
    /// The KV cache of the log-likelihood metrics, which are read from `model` here.
    session: Session,
    /// Embeddings of the training pool's prompts, per template.
    pool_vecs: HashMap<String, Vec<Vec<f32>>>,
}

/// A key for the model's results in the cache: its path, size and modification time, and
/// those of its adapter's files.
pub fn model_key(model: &Model) -> String {
    let p = &model.info.path;
    let mut parts = vec![
        p.canonicalize()
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
    ];
    let stat = |path: &Path| -> Option<String> {
        let m = std::fs::metadata(path).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(format!("{}:{}", m.len(), t.as_nanos()))
    };
    // A folder (a Hugging Face model, a LoRA adapter) by each of its files.
    let mut add = |p: &Path| {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
                names.sort();
                parts.extend(names.iter().filter_map(|n| stat(n)));
            }
        } else {
            parts.extend(stat(p));
        }
    };
    add(p);
    if let Some(a) = &model.info.adapter {
        // Another adapter on the same base answers otherwise.
        let dir = a.canonicalize().unwrap_or_else(|_| a.clone());
        add(&dir);
        parts.push(format!("adapter {}", dir.display()));
    }
    parts.join("|")
}

impl<'a> Evaluator<'a> {
    /// `generator` answers the generation metrics (`model`, in-process, or a server);
    /// `model` builds the prompts and scores the log-likelihood metrics.
    pub fn new(model: &'a Model, task: &'a Task, generator: Box<dyn Generator + 'a>) -> Self {
        Self {
            model,
            task,
            cache: None,
            encoder: None,
            bootstrap: 1000,
            generator,
            session: Session::new(model),
            pool_vecs: HashMap::new(),
        }
    }

    /// Check a setting against the task and the model before running it.
    pub fn check(&self, s: &Setting) -> Result<()> {
        self.task.check_k(s.shots)?;
        // Log-likelihoods come from `model` in this process; a server's answers could come
        // from another model.
        let remote = matches!(self.generator.source(), Source::Server(_));
        if remote && !self.task.metric.generates() {
            return Err(self.task.err(format!(
                "metric {} needs log-likelihoods, which lever reads from the model in-process; --backend serves the generation metrics (exact_match, f1, contains, regex)",
                self.task.metric.name()
            )));
        }
        if !self.task.templates.contains(&s.template) {
            return Err(self.task.err(format!(
                "no template {:?} (the task has {})",
                s.template,
                self.task.templates.join(", ")
            )));
        }
        let chat = s.format == Format::Chat || self.task.fewshot.chat_template;
        if chat && self.model.chat_template.is_none() {
            return Err(self.task.err(format!(
                "{} has no chat template; use format = \"block\"",
                self.model.info.path.display()
            )));
        }
        if s.shots > 0 && matches!(s.select, Select::Knn | Select::Mmr) && self.encoder.is_none() {
            return Err(self
                .task
                .err(format!("selector {} needs the embedder", s.select.name())));
        }
        Ok(())
    }

    /// Evaluate `examples` (a split, maybe cut) under `setting`. `progress(done, total)`.
    pub fn run(
        &mut self,
        setting: &Setting,
        split: &str,
        examples: &[Example],
        shots: Shots,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Summary, Vec<Record>)> {
        self.check(setting)?;
        let start = Instant::now();
        let task = self.task;
        let fs = &task.fewshot;
        let k = match shots {
            Shots::Select => setting.shots,
            Shots::Given(s) => s.len(),
        };
        // Embeddings for knn / mmr: the pool once per template, the questions per run.
        let needs_vecs = k > 0
            && matches!(shots, Shots::Select)
            && matches!(setting.select, Select::Knn | Select::Mmr);
        let pool_n = fs.pool.unwrap_or(task.train.len()).min(task.train.len());
        let query_vecs = if needs_vecs {
            self.pool_vectors(&setting.template, pool_n)?;
            Some(self.embed(examples.iter().map(|e| e.prompt(&setting.template)))?)
        } else {
            None
        };
        let mut records = Vec::with_capacity(examples.len());
        for (i, ex) in examples.iter().enumerate() {
            let ranked = match shots {
                Shots::Given(s) => s.to_vec(),
                Shots::Select => {
                    let sim = match (&query_vecs, self.pool_vecs.get(&setting.template)) {
                        (Some(q), Some(pool)) => Some((q[i].as_slice(), pool.as_slice())),
                        _ => None,
                    };
                    let n = if needs_vecs { pool_n } else { task.train.len() };
                    let how = fewshot::Selector {
                        how: setting.select,
                        seed: fs.seed,
                        fixed: fs.fixed.as_deref(),
                        lambda: fs.mmr_lambda,
                    };
                    fewshot::select(&how, k, n, i, sim)
                }
            };
            let record = self.one(setting, i, ex, &ranked)?;
            records.push(record);
            progress(i + 1, examples.len());
        }
        let summary = self.summarize(setting, split, &records, start.elapsed().as_secs_f64());
        Ok((summary, records))
    }

    fn embed<'t>(&self, texts: impl Iterator<Item = &'t str>) -> Result<Vec<Vec<f32>>> {
        let enc = self
            .encoder
            .ok_or_else(|| self.task.err("knn and mmr need the embedder".into()))?;
        let texts: Vec<&str> = texts.collect();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(64) {
            out.extend(
                enc.embed(chunk)
                    .map_err(lever_generate::Error::from)?
                    .vectors,
            );
        }
        Ok(out)
    }

    fn pool_vectors(&mut self, template: &str, n: usize) -> Result<()> {
        if self.pool_vecs.get(template).is_some_and(|v| v.len() == n) {
            return Ok(());
        }
        let v = self.embed(self.task.train[..n].iter().map(|e| e.prompt(template)))?;
        self.pool_vecs.insert(template.to_string(), v);
        Ok(())
    }

    /// The prompt text with the given worked examples, in the setting's format.
    pub fn build(&self, s: &Setting, ex: &Example, shots: &[usize]) -> Result<String> {
        let fs = &self.task.fewshot;
        match s.format {
            Format::Block => {
                let text = self.block_text(s, ex, shots);
                if fs.chat_template {
                    self.chat(&[Message::new("user", text)])
                } else {
                    Ok(text)
                }
            }
            Format::Chat => self.chat(&self.messages(s, ex, shots)),
        }
    }

    /// Block format's text: instruction, worked examples, the question, joined by the
    /// separator.
    fn block_text(&self, s: &Setting, ex: &Example, shots: &[usize]) -> String {
        let task = self.task;
        let fs = &task.fewshot;
        let mut parts: Vec<String> = Vec::new();
        if let Some(instr) = &task.instruction {
            parts.push(instr.clone());
        }
        for &i in shots {
            let e = &task.train[i];
            parts.push(format!(
                "{}{}",
                e.prompt(&s.template),
                e.answer_continuation(&fs.target_delimiter)
            ));
        }
        parts.push(ex.prompt(&s.template).to_string());
        parts.join(&fs.separator)
    }

    /// The chat-format prompt as messages.
    fn messages(&self, s: &Setting, ex: &Example, shots: &[usize]) -> Vec<Message> {
        let task = self.task;
        let mut msgs = Vec::new();
        if let Some(instr) = &task.instruction {
            msgs.push(Message::new("system", instr.clone()));
        }
        for &i in shots {
            let e = &task.train[i];
            msgs.push(Message::new("user", e.prompt(&s.template)));
            msgs.push(Message::new("assistant", e.target.trim()));
        }
        msgs.push(Message::new("user", ex.prompt(&s.template)));
        msgs
    }

    /// What the generator continues: the messages (or the block as one user turn) where the
    /// prompt goes through a chat template, else the block text. In-process this renders to
    /// exactly `build`'s text.
    fn generation_prompt(&self, s: &Setting, ex: &Example, shots: &[usize]) -> GenPrompt {
        match s.format {
            Format::Chat => GenPrompt::Chat(self.messages(s, ex, shots)),
            Format::Block if self.task.fewshot.chat_template => {
                GenPrompt::Chat(vec![Message::new("user", self.block_text(s, ex, shots))])
            }
            Format::Block => GenPrompt::Text(self.block_text(s, ex, shots)),
        }
    }

    fn chat(&self, msgs: &[Message]) -> Result<String> {
        let t = self.model.chat_template.as_ref().ok_or_else(|| {
            self.task
                .err("the model has no chat template; use format = \"block\"".into())
        })?;
        Ok(t.render(msgs, true).map_err(lever_generate::Error::from)?)
    }

    /// Tokens the answer needs after the prompt.
    fn reserve(&self, ex: &Example) -> Result<usize> {
        let tok = &self.model.tokenizer;
        let n = |s: &str| -> Result<usize> {
            Ok(tok
                .encode(s, false)
                .map_err(lever_generate::Error::from)?
                .len())
        };
        Ok(match &self.task.metric {
            m if m.generates() => self.task.generation.max_tokens,
            Metric::Perplexity => n(&ex.target)? + 1,
            _ => {
                let mut most = 0;
                for c in &ex.choices {
                    most = most.max(n(c)? + 1);
                }
                most
            }
        })
    }

    /// Drop worked examples (least wanted first) until the prompt fits the budget.
    fn fit(
        &self,
        s: &Setting,
        ex: &Example,
        ranked: &[usize],
    ) -> Result<(String, Vec<usize>, usize)> {
        let ctx = self.model.decoder.config().max_seq_len;
        let reserve = self.reserve(ex)?;
        let budget = self
            .task
            .fewshot
            .budget
            .unwrap_or(ctx.saturating_sub(reserve))
            .min(ctx.saturating_sub(1));
        // knn and mmr rank the nearest first; the nearest goes last, next to the question.
        let near_last = matches!(s.select, Select::Knn | Select::Mmr);
        let mut keep = ranked.len();
        loop {
            let mut shots: Vec<usize> = ranked[..keep].to_vec();
            if near_last {
                shots.reverse();
            }
            let text = self.build(s, ex, &shots)?;
            let tokens = self
                .model
                .tokenizer
                .encode(&text, true)
                .map_err(lever_generate::Error::from)?
                .len();
            if tokens <= budget {
                return Ok((text, shots, ranked.len() - keep));
            }
            if keep == 0 {
                if tokens + 1 >= ctx {
                    return Err(Error::Item {
                        origin: ex.origin.clone(),
                        problem: format!(
                            "the prompt alone is {tokens} tokens; the model's context is {ctx}"
                        ),
                    });
                }
                return Ok((text, shots, ranked.len()));
            }
            keep -= 1;
        }
    }

    fn one(&mut self, s: &Setting, id: usize, ex: &Example, ranked: &[usize]) -> Result<Record> {
        let (prompt, shots, dropped) = self.fit(s, ex, ranked)?;
        let task = self.task;
        let mut rec = Record {
            id,
            origin: ex.origin.clone(),
            prompt: prompt.clone(),
            output: String::new(),
            target: ex.target.clone(),
            score: 0.0,
            extracted: None,
            loglikelihoods: None,
            acc: None,
            acc_norm: None,
            nll: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0.0,
            shots,
            dropped,
            cached: false,
        };
        let t0 = Instant::now();
        match &task.metric {
            m if m.generates() => {
                let g = &task.generation;
                let seed = g.seed.wrapping_add(id as u64);
                let mut parts = json!([
                    "gen",
                    prompt,
                    g.max_tokens,
                    g.temperature,
                    g.top_p,
                    g.top_k,
                    if g.temperature > 0.0 { seed } else { 0 },
                    g.stop
                ]);
                let constraint = g.constraint();
                if let (Some(c), Some(list)) = (&constraint, parts.as_array_mut()) {
                    list.push(json!(format!("{c:?}")));
                }
                // A server answers for its own model: its results are its own.
                if let Source::Server(url) = self.generator.source()
                    && let Some(list) = parts.as_array_mut()
                {
                    list.push(json!(url));
                }
                let key = cache::key(&parts);
                let v = match self.cache.as_mut().and_then(|c| c.get(&key)) {
                    Some(v) => {
                        rec.cached = true;
                        v
                    }
                    None => {
                        let what = self.generation_prompt(s, ex, &rec.shots);
                        let req = Request {
                            constraint: constraint.as_ref(),
                            prompt: match &what {
                                GenPrompt::Chat(m) => Prompt::Chat(m),
                                GenPrompt::Text(t) => Prompt::Text(t),
                            },
                            max_tokens: g.max_tokens,
                            stop: &g.stop,
                            // A task file names every setting it uses: the rest are off.
                            sampling: Sampling {
                                temperature: Some(g.temperature),
                                top_p: Some(g.top_p),
                                top_k: (g.top_k > 0).then_some(g.top_k),
                                seed: Some(seed),
                                unset: Unset::Off,
                                ..Sampling::default()
                            },
                        };
                        let out = self
                            .generator
                            .generate(&req, &mut |_| Flow::Continue)
                            .map_err(|e| match e {
                                // A server's failure is this item's: say which.
                                lever_generate::Error::Remote { .. } => Error::Item {
                                    origin: ex.origin.clone(),
                                    problem: e.to_string(),
                                },
                                e => Error::Generate(e),
                            })?;
                        let v = json!({
                            "text": out.text,
                            "prompt_tokens": out.prompt_tokens,
                            "completion_tokens": out.completion_tokens,
                            "latency_ms": t0.elapsed().as_secs_f64() * 1e3,
                        });
                        self.put(key, &v)?;
                        v
                    }
                };
                rec.output = v["text"].as_str().unwrap_or_default().to_string();
                rec.prompt_tokens = as_usize(&v["prompt_tokens"]);
                rec.completion_tokens = as_usize(&v["completion_tokens"]);
                rec.latency_ms = v["latency_ms"].as_f64().unwrap_or(0.0);
                let (score, extracted) = m.score_text(&rec.output, &ex.target);
                rec.score = score;
                rec.extracted = extracted;
            }
            Metric::Perplexity => {
                let (ll, tokens) = self.loglikelihoods(
                    &prompt,
                    std::slice::from_ref(&ex.target),
                    ex,
                    &mut rec,
                    t0,
                )?;
                let nll = -ll[0];
                rec.nll = Some(nll);
                rec.completion_tokens = tokens[0];
                rec.score = (nll / tokens[0].max(1) as f64).exp();
                rec.loglikelihoods = Some(ll);
            }
            _ => {
                let (ll, _) = self.loglikelihoods(&prompt, &ex.choices, ex, &mut rec, t0)?;
                let pred = argmax(ll.iter().copied());
                let texts: Vec<&String> = ex.choices.iter().collect();
                let pred_norm = argmax(
                    ll.iter()
                        .zip(&texts)
                        .map(|(l, t)| l / t.chars().count().max(1) as f64),
                );
                let acc = f64::from(u8::from(pred == ex.gold));
                let acc_norm = f64::from(u8::from(pred_norm == ex.gold));
                rec.output = ex.choices[if matches!(task.metric, Metric::AccNorm) {
                    pred_norm
                } else {
                    pred
                }]
                .clone();
                rec.acc = Some(acc);
                rec.acc_norm = Some(acc_norm);
                rec.score = if matches!(task.metric, Metric::AccNorm) {
                    acc_norm
                } else {
                    acc
                };
                rec.loglikelihoods = Some(ll);
            }
        }
        Ok(rec)
    }

    /// Log-likelihoods of `conts` after `prompt` (scored as `eval mc` scores choices), from
    /// the cache when it has them.
    fn loglikelihoods(
        &mut self,
        prompt: &str,
        conts: &[String],
        ex: &Example,
        rec: &mut Record,
        t0: Instant,
    ) -> Result<(Vec<f64>, Vec<usize>)> {
        let key = cache::key(&json!(["ll", prompt, conts]));
        let v = match self.cache.as_mut().and_then(|c| c.get(&key)) {
            Some(v) => {
                rec.cached = true;
                v
            }
            None => {
                let item = McItem {
                    query: prompt.to_string(),
                    choices: conts.to_vec(),
                    gold: 0,
                    origin: ex.origin.clone(),
                };
                let s = score_item(self.model, &mut self.session, &item, McOptions::default())?;
                let v = json!({
                    "ll": s.choices.iter().map(|c| c.loglikelihood).collect::<Vec<_>>(),
                    "tokens": s.choices.iter().map(|c| c.tokens).collect::<Vec<_>>(),
                    "prompt_tokens": self.model.tokenizer.encode(prompt, true).map_err(lever_generate::Error::from)?.len(),
                    "latency_ms": t0.elapsed().as_secs_f64() * 1e3,
                });
                self.put(key, &v)?;
                v
            }
        };
        let ll: Vec<f64> = v["ll"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let tokens: Vec<usize> = v["tokens"]
            .as_array()
            .map(|a| a.iter().map(as_usize).collect())
            .unwrap_or_default();
        if ll.len() != conts.len() || tokens.len() != conts.len() {
            return Err(Error::Item {
                origin: ex.origin.clone(),
                problem: "a cached result does not match the item (delete the cache file)".into(),
            });
        }
        rec.prompt_tokens = as_usize(&v["prompt_tokens"]);
        rec.latency_ms = v["latency_ms"].as_f64().unwrap_or(0.0);
        Ok((ll, tokens))
    }

    fn put(&mut self, key: String, v: &Value) -> Result<()> {
        if let Some(c) = self.cache.as_mut() {
            c.put(key, v.clone())?;
        }
        Ok(())
    }

    fn summarize(&self, s: &Setting, split: &str, recs: &[Record], seconds: f64) -> Summary {
        let task = self.task;
        let n = recs.len();
        let mean = |f: &dyn Fn(&Record) -> f64| recs.iter().map(f).sum::<f64>() / n.max(1) as f64;
        let seed = 0x5eed;
        let (score, ci) = if matches!(task.metric, Metric::Perplexity) {
            // Corpus perplexity: exp(total NLL / total tokens), the interval by resampling
            // examples.
            let nll: Vec<f64> = recs.iter().map(|r| r.nll.unwrap_or(0.0)).collect();
            let tok: Vec<f64> = recs.iter().map(|r| r.completion_tokens as f64).collect();
            let ppl = |idx: &[usize]| {
                let a: f64 = idx.iter().map(|&i| nll[i]).sum();
                let b: f64 = idx.iter().map(|&i| tok[i]).sum();
                (a / b.max(1.0)).exp()
            };
            let all: Vec<usize> = (0..n).collect();
            (ppl(&all), bootstrap_ci(n, self.bootstrap, seed, &ppl))
        } else {
            let xs: Vec<f64> = recs.iter().map(|r| r.score).collect();
            mean_ci(&xs, self.bootstrap, seed)
        };
        let mc = task.metric.is_multiple_choice();
        Summary {
            task: task.name.clone(),
            setting: s.label(),
            split: split.to_string(),
            shots: s.shots,
            select: if s.shots == 0 {
                "-".into()
            } else {
                s.select.name().into()
            },
            template: s.template.clone(),
            format: s.format,
            metric: task.metric.name().into(),
            score,
            ci95: ci.map(|(a, b)| [a, b]),
            n,
            acc: mc.then(|| mean(&|r| r.acc.unwrap_or(0.0))),
            acc_norm: mc.then(|| mean(&|r| r.acc_norm.unwrap_or(0.0))),
            format_rate: matches!(task.metric, Metric::Regex(_))
                .then(|| mean(&|r| f64::from(u8::from(r.extracted.is_some())))),
            mean_latency_ms: mean(&|r| r.latency_ms),
            mean_prompt_tokens: mean(&|r| r.prompt_tokens as f64),
            mean_completion_tokens: mean(&|r| r.completion_tokens as f64),
            examples_dropped: recs.iter().map(|r| r.dropped).sum(),
            prompts_with_drops: recs.iter().filter(|r| r.dropped > 0).count(),
            cached: recs.iter().filter(|r| r.cached).count(),
            seconds,
        }
    }
}

/// One `fewshot search` trial: a random set of k training examples, scored on dev.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub trial: usize,
    pub shots: Vec<usize>,
    pub dev: Summary,
}

/// Try `trials` random k-example sets on `dev`, keep the best (highest score; lowest for
/// perplexity), and evaluate it on `test`.
pub fn search(
    ev: &mut Evaluator,
    setting: &Setting,
    trials: usize,
    seed: u64,
    dev: &[Example],
    test: &[Example],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(Vec<Trial>, usize, Summary, Vec<Record>)> {
    ev.check(setting)?;
    let n = ev.task.train.len();
    let lower_better = matches!(ev.task.metric, Metric::Perplexity);
    let mut out: Vec<Trial> = Vec::with_capacity(trials);
    for t in 0..trials {
        let shots = fewshot::random_set(setting.shots, n, seed.wrapping_add(t as u64));
        let what = format!("trial {}/{trials} on dev", t + 1);
        let (dev_summary, _) =
            ev.run(setting, "dev", dev, Shots::Given(&shots), &mut |d, all| {
                progress(&what, d, all)
            })?;
        out.push(Trial {
            trial: t,
            shots,
            dev: dev_summary,
        });
    }
    let best = (0..out.len())
        .reduce(|a, b| {
            let (sa, sb) = (out[a].dev.score, out[b].dev.score);
            if (lower_better && sb < sa) || (!lower_better && sb > sa) {
                b
            } else {
                a
            }
        })
        .unwrap_or(0);
    let shots = out.get(best).map(|t| t.shots.clone()).unwrap_or_default();
    let (summary, records) = ev.run(
        setting,
        "test",
        test,
        Shots::Given(&shots),
        &mut |d, all| progress("best set on test", d, all),
    )?;
    Ok((out, best, summary, records))
}

fn as_usize(v: &Value) -> usize {
    v.as_u64().unwrap_or(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_slugs() {
        let s = |shots, select, template: &str, format| Setting {
            shots,
            select,
            template: template.into(),
            format,
        };
        assert_eq!(
            s(0, Select::Knn, "default", Format::Block).label(),
            "0-shot"
        );
        assert_eq!(
            s(5, Select::Knn, "default", Format::Block).label(),
            "5-shot knn"
        );
        let t = s(1, Select::Fixed, "terse", Format::Chat);
        assert_eq!(t.label(), "1-shot fixed [terse] chat");
        assert_eq!(t.slug(), "1-shot_fixed_terse_chat");
    }
}
