//! Task specs: a TOML file that names the data (JSONL splits), maps its fields to template
//! variables, gives the prompt as a minijinja template, and picks the metric, the generation
//! parameters and the few-shot defaults. `docs/tasks.md` documents every key; examples are
//! under `examples/tasks/`.
//!
//! Every example is rendered when the task is loaded, so a missing field or a template that
//! names an unknown variable fails at once, naming the data line (and the template's line and
//! column), not halfway through a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::metrics::Metric;
use crate::{Error, Result};

/// The template name of the task's own `[prompt] template`.
pub const DEFAULT_TEMPLATE: &str = "default";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: Option<String>,
    description: Option<String>,
    data: RawData,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    prompt: RawPrompt,
    metric: RawMetric,
    #[serde(default)]
    generation: Generation,
    #[serde(default)]
    fewshot: FewshotSpec,
    rag: Option<RagSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    train: Option<PathBuf>,
    dev: Option<PathBuf>,
    test: Option<PathBuf>,
    /// One file cut into splits by a seeded shuffle: `test_size` lines for test, `dev_size`
    /// for dev, the rest for train.
    file: Option<PathBuf>,
    #[serde(default)]
    dev_size: usize,
    #[serde(default)]
    test_size: usize,
    #[serde(default)]
    split_seed: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    template: String,
    target: Option<String>,
    /// The variable holding the list of choices (multiple-choice metrics), or a list of
    /// variables, one per choice (PIQA's `["sol1", "sol2"]`).
    choices: Option<ChoicesSpec>,
    /// How one choice is written after the prompt; `choice` is its text.
    choice: Option<String>,
    /// Renders to the gold choice: a 0-based index, a label (with `labels`), or the text.
    gold: Option<String>,
    /// The variable holding the choices' labels ("A", "B", ...), to resolve `gold`.
    labels: Option<String>,
    /// Said once before everything: a system message in chat format, the first paragraph
    /// in block format.
    instruction: Option<String>,
    #[serde(default)]
    variants: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ChoicesSpec {
    List(String),
    Fields(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawMetric {
    Name(String),
    Table {
        name: String,
        pattern: Option<String>,
        target_pattern: Option<String>,
        pick: Option<String>,
        #[serde(default)]
        ignore: Vec<String>,
    },
}

/// Retrieval in front of the prompts (`lever eval --rag`, docs/tasks.md): passages from an
/// index made by `lever index add`, found with the text of `query_template`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RagSpec {
    /// The index folder, relative to the task file.
    pub index: PathBuf,
    #[serde(default = "rag_k")]
    pub k: usize,
    /// dense, bm25 or hybrid (concat; RAG-Sequence and RAG-Token search dense).
    #[serde(default = "rag_mode")]
    pub mode: String,
    /// What `lever eval` runs when `--rag` is not given: closed (no retrieval), concat (the
    /// passages in one prompt), seq (RAG-Sequence) or token (RAG-Token).
    #[serde(default = "rag_formulation")]
    pub formulation: String,
    /// The template whose text is the search query (default: the default template).
    pub query_template: Option<String>,
}

/// The values of `[rag] formulation` and `lever eval --rag`.
pub const RAG_FORMULATIONS: [&str; 4] = ["closed", "concat", "seq", "token"];

fn rag_k() -> usize {
    3
}
fn rag_mode() -> String {
    "hybrid".into()
}
fn rag_formulation() -> String {
    "concat".into()
}

/// Generation parameters (metrics that generate: exact_match, f1, contains, regex).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Generation {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Constrained decoding: the answer is one of these strings exactly.
    pub choices: Vec<String>,
    /// Constrained decoding: the answer is JSON valid against this schema (a
    /// `[generation.json_schema]` table).
    pub json_schema: Option<serde_json::Value>,
}

impl Default for Generation {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            choices: Vec::new(),
            json_schema: None,
        }
    }
}

impl Generation {
    /// The constraint the task's generation section asks for, if any.
    pub fn constraint(&self) -> Option<lever_generate::Constraint> {
        match (&self.json_schema, self.choices.is_empty()) {
            (Some(s), _) => Some(lever_generate::Constraint::JsonSchema(s.clone())),
            (None, false) => Some(lever_generate::Constraint::Choice(self.choices.clone())),
            (None, true) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Examples and the question as one text, separated by `separator`.
    Block,
    /// Examples as user/assistant turns under the model's chat template.
    Chat,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// The same examples for every question: `fixed = [...]` indices, else the first k.
    Fixed,
    /// k examples drawn per question (seeded by `seed` and the question's index).
    Random,
    /// The k training examples whose prompts are nearest to the question's (embedder).
    Knn,
    /// Maximal marginal relevance: near the question, far from each other.
    Mmr,
}

impl Select {
    pub fn name(self) -> &'static str {
        match self {
            Select::Fixed => "fixed",
            Select::Random => "random",
            Select::Knn => "knn",
            Select::Mmr => "mmr",
        }
    }

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fixed" => Ok(Select::Fixed),
            "random" => Ok(Select::Random),
            "knn" => Ok(Select::Knn),
            "mmr" => Ok(Select::Mmr),
            _ => Err(format!(
                "unknown selector {s:?} (expected fixed, random, knn or mmr)"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FewshotSpec {
    pub k: usize,
    pub format: Format,
    pub select: Select,
    /// Between examples (and before the question) in block format.
    pub separator: String,
    /// Between an example's prompt and its answer in block format (generation tasks; a
    /// multiple-choice answer is written with `[prompt] choice`).
    pub target_delimiter: String,
    pub seed: u64,
    /// Most prompt tokens; examples that do not fit are dropped (least relevant first) and
    /// counted. Default: the model's context less what the answer needs.
    pub budget: Option<usize>,
    pub mmr_lambda: f64,
    /// knn/mmr consider only the first `pool` training examples (embedding cost).
    pub pool: Option<usize>,
    /// Training-example indices (0-based) for the fixed selector.
    pub fixed: Option<Vec<usize>>,
    /// In block format, send the block as one user turn under the chat template.
    pub chat_template: bool,
}

impl Default for FewshotSpec {
    fn default() -> Self {
        Self {
            k: 0,
            format: Format::Block,
            select: Select::Fixed,
            separator: "\n\n".into(),
            target_delimiter: " ".into(),
            seed: 1234,
            budget: None,
            mmr_lambda: 0.5,
            pool: None,
            fixed: None,
            chat_template: false,
        }
    }
}

/// One data line, rendered.
#[derive(Debug, Clone)]
pub struct Example {
    /// `FILE:LINE`.
    pub origin: String,
    /// The prompt under each template name.
    pub prompts: BTreeMap<String, String>,
    /// The reference answer (generation metrics), the scored text (perplexity), or the gold
    /// choice's text (multiple choice).
    pub target: String,
    /// Multiple choice: each choice as written after the prompt, and the gold index.
    pub choices: Vec<String>,
    pub gold: usize,
}

impl Example {
    pub fn prompt(&self, template: &str) -> &str {
        self.prompts.get(template).map_or("", String::as_str)
    }

    /// What follows the prompt in a worked example (block format).
    pub fn answer_continuation(&self, delimiter: &str) -> String {
        if self.choices.is_empty() {
            format!("{delimiter}{}", self.target)
        } else {
            self.choices[self.gold].clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub instruction: Option<String>,
    pub metric: Metric,
    pub generation: Generation,
    pub fewshot: FewshotSpec,
    /// Retrieval for `lever eval --rag`, its index resolved against the task file's folder.
    pub rag: Option<RagSpec>,
    /// Template names: "default" first, then the variants.
    pub templates: Vec<String>,
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
    /// Where each split came from, for messages.
    pub sources: BTreeMap<&'static str, String>,
}

impl Task {
    pub fn split(&self, name: &str) -> Result<&[Example]> {
        let (split, what) = match name {
            "train" => (&self.train, "train"),
            "dev" => (&self.dev, "dev"),
            "test" => (&self.test, "test"),
            _ => {
                return Err(self.err(format!(
                    "unknown split {name:?} (expected train, dev or test)"
                )));
            }
        };
        if split.is_empty() {
            return Err(self.err(format!(
                "the {what} split has no examples{}",
                self.from(what)
            )));
        }
        Ok(split)
    }

    fn from(&self, split: &str) -> String {
        self.sources
            .get(split)
            .map_or(" ([data] names none)".into(), |s| format!(" ({s})"))
    }

    /// Refuse k larger than the training split.
    pub fn check_k(&self, k: usize) -> Result<()> {
        if k > self.train.len() {
            return Err(self.err(format!(
                "{k} examples asked but the train split has {}{}",
                self.train.len(),
                self.from("train")
            )));
        }
        Ok(())
    }

    pub fn err(&self, problem: String) -> Error {
        Error::File {
            path: self.path.clone(),
            problem,
        }
    }
}

/// Read and check a task file, then load and render its splits.
pub fn load(path: &Path) -> Result<Task> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io {
        path: path.to_path_buf(),
        err,
    })?;
    let raw: RawTask = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((0, 0));
        let problem = e.message().trim().to_string();
        if line > 0 {
            Error::Line {
                path: path.to_path_buf(),
                line,
                problem: format!("column {col}: {problem}"),
            }
        } else {
            Error::File {
                path: path.to_path_buf(),
                problem,
            }
        }
    })?;
    let spec_err = |problem: String| Error::File {
        path: path.to_path_buf(),
        problem,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let metric = match &raw.metric {
        RawMetric::Name(n) => Metric::new(n, None, None, None, &[]),
        RawMetric::Table {
            name,
            pattern,
            target_pattern,
            pick,
            ignore,
        } => Metric::new(
            name,
            pattern.as_deref(),
            target_pattern.as_deref(),
            pick.as_deref(),
            ignore,
        ),
    }
    .map_err(|p| spec_err(format!("[metric] {p}")))?;

    // Templates, compiled once; a syntax error names the template, line and column.
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // `{{ text | regex_replace("\\[.*?\\]", "") }}`: for data that needs cleaning the way
    // benchmark harnesses preprocess it (HellaSwag's `[title]` tags).
    env.add_filter(
        "regex_replace",
        |s: String,
         pattern: String,
         with: String|
         -> std::result::Result<String, minijinja::Error> {
            let re = regex::Regex::new(&pattern).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
            })?;
            Ok(re.replace_all(&s, with.as_str()).into_owned())
        },
    );
    let mut templates = vec![DEFAULT_TEMPLATE.to_string()];
    let mut sources_of: BTreeMap<String, String> = BTreeMap::new();
    let mut add = |env: &mut Environment<'static>, key: String, src: &str| -> Result<()> {
        sources_of.insert(key.clone(), src.to_string());
        env.add_template_owned(key.clone(), src.to_string())
            .map_err(|e| spec_err(template_problem(&key, src, &e)))
    };
    add(&mut env, "prompt.default".into(), &raw.prompt.template)?;
    for (name, src) in &raw.prompt.variants {
        if name == DEFAULT_TEMPLATE {
            return Err(spec_err(
                "[prompt.variants] cannot name a variant \"default\" (that is [prompt] template)"
                    .into(),
            ));
        }
        add(&mut env, format!("prompt.{name}"), src)?;
        templates.push(name.clone());
    }
    if raw.generation.json_schema.is_some() && !raw.generation.choices.is_empty() {
        return Err(spec_err(
            "[generation] give json_schema or choices, not both".into(),
        ));
    }
    let mc = metric.is_multiple_choice();
    if mc {
        if raw.prompt.choices.is_none() || raw.prompt.gold.is_none() {
            return Err(spec_err(format!(
                "[metric] {} needs [prompt] choices (the variable with the list) and gold",
                metric.name()
            )));
        }
        add(
            &mut env,
            "choice".into(),
            raw.prompt.choice.as_deref().unwrap_or(" {{ choice }}"),
        )?;
        add(
            &mut env,
            "gold".into(),
            raw.prompt.gold.as_deref().unwrap_or(""),
        )?;
    } else {
        let Some(target) = &raw.prompt.target else {
            return Err(spec_err(format!(
                "[metric] {} needs [prompt] target (the reference answer)",
                metric.name()
            )));
        };
        add(&mut env, "target".into(), target)?;
    }
    if let Some(i) = &raw.prompt.instruction {
        add(&mut env, "instruction".into(), i)?;
    }
    let tpl = Templates {
        env,
        sources: sources_of,
    };
    let instruction = match &raw.prompt.instruction {
        Some(_) => Some(
            tpl.render("instruction", &Value::Object(Map::new()))
                .map_err(spec_err)?,
        ),
        None => None,
    };

    let render_cfg = Render {
        tpl: &tpl,
        templates: &templates,
        fields: &raw.fields,
        choices: raw.prompt.choices.as_ref(),
        labels: raw.prompt.labels.as_deref(),
    };
    let d = &raw.data;
    let mut sources = BTreeMap::new();
    let (train, dev, test) = if let Some(file) = &d.file {
        if d.train.is_some() || d.dev.is_some() || d.test.is_some() {
            return Err(spec_err(
                "[data] gives either `file` (with dev_size, test_size) or train/dev/test paths, not both"
                    .into(),
            ));
        }
        let p = base.join(file);
        let all = read_split(&p, &render_cfg)?;
        if d.dev_size + d.test_size > all.len() {
            return Err(spec_err(format!(
                "[data] dev_size {} + test_size {} exceed the {} examples of {}",
                d.dev_size,
                d.test_size,
                all.len(),
                p.display()
            )));
        }
        // A seeded shuffle of line order, then test | dev | train.
        let mut order: Vec<usize> = (0..all.len()).collect();
        lever_model::rng::SplitMix64(d.split_seed).shuffle(&mut order);
        let pick = |r: std::ops::Range<usize>| -> Vec<Example> {
            let mut idx: Vec<usize> = order[r].to_vec();
            idx.sort_unstable();
            idx.into_iter().map(|i| all[i].clone()).collect()
        };
        let (t, dv) = (d.test_size, d.dev_size);
        let shown = p.display().to_string();
        sources.insert("train", format!("{shown}, lines not in dev or test"));
        sources.insert("dev", format!("{shown}, {dv} lines by split_seed"));
        sources.insert("test", format!("{shown}, {t} lines by split_seed"));
        (pick(t + dv..all.len()), pick(t..t + dv), pick(0..t))
    } else {
        let mut load = |name: &'static str, p: &Option<PathBuf>| -> Result<Vec<Example>> {
            match p {
                Some(p) => {
                    let p = base.join(p);
                    sources.insert(name, p.display().to_string());
                    read_split(&p, &render_cfg)
                }
                None => Ok(Vec::new()),
            }
        };
        let train = load("train", &d.train)?;
        let dev = load("dev", &d.dev)?;
        let test = load("test", &d.test)?;
        (train, dev, test)
    };
    if let Some(fixed) = &raw.fewshot.fixed
        && let Some(&bad) = fixed.iter().find(|&&i| i >= train.len())
    {
        return Err(spec_err(format!(
            "[fewshot] fixed names training example {bad} but train has {}",
            train.len()
        )));
    }
    if !(0.0..=1.0).contains(&raw.fewshot.mmr_lambda) {
        return Err(spec_err("[fewshot] mmr_lambda must be within 0..1".into()));
    }
    let rag = match raw.rag {
        Some(mut r) => {
            r.index = base.join(&r.index);
            if r.k == 0 {
                return Err(spec_err("[rag] k: at least 1".into()));
            }
            if !["dense", "bm25", "hybrid"].contains(&r.mode.as_str()) {
                return Err(spec_err(format!(
                    "[rag] mode = {:?}: expected \"dense\", \"bm25\" or \"hybrid\"",
                    r.mode
                )));
            }
            if !RAG_FORMULATIONS.contains(&r.formulation.as_str()) {
                return Err(spec_err(format!(
                    "[rag] formulation = {:?}: expected \"closed\", \"concat\", \"seq\" or \"token\"",
                    r.formulation
                )));
            }
            if let Some(q) = &r.query_template
                && !templates.contains(q)
            {
                return Err(spec_err(format!(
                    "[rag] query_template = {q:?}: no such template (templates: {})",
                    templates.join(", ")
                )));
            }
            Some(r)
        }
        None => None,
    };
    let name = match &raw.name {
        Some(n) => {
            check_name(n).map_err(|problem| spec_err(format!("name {n:?}: {problem}")))?;
            n.clone()
        }
        None => path
            .file_stem()
            .map_or("task".into(), |s| s.to_string_lossy().into_owned()),
    };
    Ok(Task {
        path: path.to_path_buf(),
        name,
        description: raw.description,
        instruction,
        metric,
        generation: raw.generation,
        fewshot: raw.fewshot,
        rag,
        templates,
        train,
        dev,
        test,
        sources,
    })
}

struct Templates {
    env: Environment<'static>,
    sources: BTreeMap<String, String>,
}

impl Templates {
    fn render(&self, name: &str, ctx: &Value) -> std::result::Result<String, String> {
        let src = self.sources.get(name).map_or("", String::as_str);
        let t = self
            .env
            .get_template(name)
            .map_err(|e| template_problem(name, src, &e))?;
        t.render(minijinja::Value::from_serialize(ctx))
            .map_err(|e| template_problem(name, src, &e))
    }
}

struct Render<'a> {
    tpl: &'a Templates,
    templates: &'a [String],
    fields: &'a BTreeMap<String, String>,
    choices: Option<&'a ChoicesSpec>,
    labels: Option<&'a str>,
}

fn read_split(path: &Path, r: &Render) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io {
        path: path.to_path_buf(),
        err,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_err = |problem: String| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        };
        let obj: Value =
            serde_json::from_str(line).map_err(|e| line_err(format!("not JSON: {e}")))?;
        let Value::Object(obj) = obj else {
            return Err(line_err("not a JSON object".into()));
        };
        out.push(
            render_example(obj, r, format!("{}:{}", path.display(), i + 1)).map_err(line_err)?,
        );
    }
    Ok(out)
}

/// Look up `a.b.c` in a JSON object.
fn lookup<'v>(obj: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut v = obj.get(parts.next()?)?;
    for p in parts {
        v = match v {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn render_example(
    obj: Map<String, Value>,
    r: &Render,
    origin: String,
) -> std::result::Result<Example, String> {
    // Every top-level field is a variable under its own name; [fields] adds (or overrides)
    // names for (nested) fields.
    let mut vars = obj.clone();
    for (name, path) in r.fields {
        let v = lookup(&obj, path)
            .ok_or_else(|| format!("missing field `{path}` (mapped to `{name}` in [fields])"))?;
        vars.insert(name.clone(), v.clone());
    }
    let ctx = Value::Object(vars.clone());
    let mut prompts = BTreeMap::new();
    for t in r.templates {
        prompts.insert(t.clone(), r.tpl.render(&format!("prompt.{t}"), &ctx)?);
    }
    let (target, choices, gold) = match r.choices {
        Some(spec) => {
            let text_of = |v: &Value| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let texts: Vec<String> = match spec {
                ChoicesSpec::List(var) => match vars.get(var) {
                    Some(Value::Array(a)) if !a.is_empty() => a.iter().map(text_of).collect(),
                    Some(_) => {
                        return Err(format!("field `{var}` is not a non-empty list of choices"));
                    }
                    None => return Err(format!("missing field `{var}` ([prompt] choices)")),
                },
                ChoicesSpec::Fields(names) => names
                    .iter()
                    .map(|n| {
                        vars.get(n)
                            .map(text_of)
                            .ok_or_else(|| format!("missing field `{n}` ([prompt] choices)"))
                    })
                    .collect::<std::result::Result<_, String>>()?,
            };
            let mut conts = Vec::with_capacity(texts.len());
            for t in &texts {
                let mut c = vars.clone();
                c.insert("choice".into(), Value::String(t.clone()));
                conts.push(r.tpl.render("choice", &Value::Object(c))?);
            }
            let g = r.tpl.render("gold", &ctx)?;
            let g = g.trim();
            let gold = if let Ok(n) = g.parse::<usize>() {
                n
            } else if let Some(lv) = r.labels {
                let labels = vars
                    .get(lv)
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("missing list field `{lv}` ([prompt] labels)"))?;
                labels
                    .iter()
                    .position(|l| l.as_str().map_or(l.to_string(), str::to_string) == g)
                    .ok_or_else(|| format!("gold {g:?} is not one of the labels {labels:?}"))?
            } else {
                texts
                    .iter()
                    .position(|t| t == g)
                    .ok_or_else(|| format!("gold {g:?} is neither an index nor a choice"))?
            };
            if gold >= texts.len() {
                return Err(format!(
                    "gold {gold} is out of range for {} choices",
                    texts.len()
                ));
            }
            (texts[gold].clone(), conts, gold)
        }
        None => (r.tpl.render("target", &ctx)?, Vec::new(), 0),
    };
    Ok(Example {
        origin,
        prompts,
        target,
        choices,
        gold,
    })
}

/// "template `prompt.default` line 1, column 12: undefined value".
fn template_problem(name: &str, src: &str, e: &minijinja::Error) -> String {
    let detail = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_string);
    let what = match name.split_once('.') {
        Some(("prompt", v)) if v == DEFAULT_TEMPLATE => "[prompt] template".to_string(),
        Some(("prompt", v)) => format!("[prompt.variants] {v}"),
        _ => format!("[prompt] {name}"),
    };
    match (e.line(), e.range()) {
        (Some(line), Some(range)) => {
            let start = range.start.min(src.len());
            let col = start - src[..start].rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{what}: line {line}, column {col}: {detail}")
        }
        (Some(line), None) => format!("{what}: line {line}: {detail}"),
        _ => format!("{what}: {detail}"),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// A task's name becomes part of a folder name (`runs/eval-<name>`): one path component of
/// letters, digits, `.`, `-` and `_`, so that a task file cannot write outside the runs folder.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 100 {
        return Err("must be 1 to 100 characters".into());
    }
    if name.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (letters, digits, '.', '-' and '_' only)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const QA: &str = r#"{"q": "2+2?", "a": "4"}
{"q": "3+3?", "a": "6"}
"#;

    #[test]
    fn renders_prompts_targets_and_variants() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "qa.jsonl", QA);
        let t = write(
            d.path(),
            "t.toml",
            r#"
[data]
train = "qa.jsonl"
test = "qa.jsonl"
[fields]
question = "q"
[prompt]
template = "Q: {{ question }}\nA:"
target = "{{ a }}"
[prompt.variants]
terse = "{{ q }} ="
[metric]
name = "exact_match"
"#,
        );
        let task = load(&t).unwrap();
        assert_eq!(task.templates, vec!["default", "terse"]);
        assert_eq!(task.test[1].prompt("default"), "Q: 3+3?\nA:");
        assert_eq!(task.test[1].prompt("terse"), "3+3? =");
        assert_eq!(task.test[0].target, "4");
        assert!(task.test[0].origin.ends_with("qa.jsonl:1"));
        assert_eq!(task.name, "t");
    }

    /// `[generation] choices` and a `[generation.json_schema]` table become the constraint
    /// the answers are generated under; both at once is refused by section.
    #[test]
    fn generation_constraints_from_the_task_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "qa.jsonl", QA);
        let head = r#"
[data]
test = "qa.jsonl"
[prompt]
template = "Q: {{ q }}\nA:"
target = "{{ a }}"
[metric]
name = "exact_match"
"#;
        let t = write(
            d.path(),
            "choices.toml",
            &format!("{head}[generation]\nchoices = [\"4\", \"6\"]\n"),
        );
        assert_eq!(
            load(&t).unwrap().generation.constraint(),
            Some(lever_generate::Constraint::Choice(vec![
                "4".into(),
                "6".into()
            ]))
        );
        let schema = "[generation.json_schema]\ntype = \"object\"\nrequired = [\"answer\"]\n\
                      [generation.json_schema.properties.answer]\ntype = \"integer\"\n";
        let t = write(d.path(), "schema.toml", &format!("{head}{schema}"));
        assert_eq!(
            load(&t).unwrap().generation.constraint(),
            Some(lever_generate::Constraint::JsonSchema(serde_json::json!(
                {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
            )))
        );
        let t = write(
            d.path(),
            "both2.toml",
            &format!(
                "{head}[generation]\nchoices = [\"4\"]\n[generation.json_schema]\ntype = \"integer\"\n"
            ),
        );
        let e = load(&t).unwrap_err().to_string();
        assert!(e.contains("json_schema or choices"), "{e}");
    }

    #[test]
    fn regex_replace_filter() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "h.jsonl",
            r#"{"ctx": "Howto [title] Tie a knot [step] Loop it."}"#,
        );
        let t = write(
            d.path(),
            "t.toml",
            r#"
[data]
test = "h.jsonl"
[prompt]
template = '{{ ctx | replace(" [title]", ".") | regex_replace("\[.*?\]", "") | replace("  ", " ") | trim }}'
target = "x"
[metric]
name = "exact_match"
"#,
        );
        assert_eq!(
            load(&t).unwrap().test[0].prompt("default"),
            "Howto. Tie a knot Loop it."
        );
    }

    #[test]
    fn multiple_choice_gold_by_index_label_or_text() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "mc.jsonl",
            r#"{"question": "Sky?", "choices": {"text": ["green", "blue"], "label": ["A", "B"]}, "answerKey": "B"}"#,
        );
        let t = write(
            d.path(),
            "t.toml",
            r#"
[data]
test = "mc.jsonl"
[fields]
options = "choices.text"
keys = "choices.label"
[prompt]
template = "Question: {{ question }}\nAnswer:"
choices = "options"
labels = "keys"
gold = "{{ answerKey }}"
[metric]
name = "acc_norm"
"#,
        );
        let task = load(&t).unwrap();
        let e = &task.test[0];
        assert_eq!(e.choices, vec![" green", " blue"]);
        assert_eq!(e.gold, 1);
        assert_eq!(e.target, "blue");
        assert_eq!(e.answer_continuation(" "), " blue");
    }

    #[test]
    fn errors_name_the_line_field_and_template_position() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "qa.jsonl",
            "{\"q\": \"x\", \"a\": \"y\"}\n{\"a\": \"z\"}\n",
        );
        let spec = |body: &str| {
            let t = write(d.path(), "t.toml", body);
            load(&t).unwrap_err().to_string()
        };
        let base = "[data]\ntest = \"qa.jsonl\"\n[metric]\nname = \"f1\"\n";
        // A missing mapped field names the data line.
        let e = spec(&format!(
            "{base}[fields]\nquestion = \"q\"\n[prompt]\ntemplate = \"{{{{ question }}}}\"\ntarget = \"{{{{ a }}}}\"\n"
        ));
        assert!(e.contains("qa.jsonl:2: missing field `q`"), "{e}");
        // An unknown variable: data line, template, line and column.
        let e = spec(&format!(
            "{base}[prompt]\ntemplate = \"Q:\\n {{{{ qq }}}}\"\ntarget = \"{{{{ a }}}}\"\n"
        ));
        assert!(
            e.contains("qa.jsonl:1: [prompt] template: line 2, column"),
            "{e}"
        );
        assert!(e.contains("undefined"), "{e}");
        // A syntax error is found when the task is read.
        let e = spec(&format!(
            "{base}[prompt]\ntemplate = \"{{{{ q \"\ntarget = \"{{{{ a }}}}\"\n"
        ));
        assert!(
            e.contains("t.toml: [prompt] template: line 1, column"),
            "{e}"
        );
        // TOML errors: line and column in the task file.
        let e = spec("[data]\ntest = \"qa.jsonl\"\nbogus = 1\n");
        assert!(e.contains("t.toml:3: column 1"), "{e}");
        // Unknown metric.
        let e = spec(
            "[data]\ntest = \"qa.jsonl\"\n[prompt]\ntemplate = \"x\"\ntarget = \"y\"\n[metric]\nname = \"bleu\"\n",
        );
        assert!(e.contains("[metric] unknown metric \"bleu\""), "{e}");
    }

    #[test]
    fn a_task_name_cannot_leave_the_runs_folder() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "qa.jsonl", QA);
        let body = |name: &str| {
            format!(
                "name = {name:?}\n[data]\ntest = \"qa.jsonl\"\n[prompt]\ntemplate = \"{{{{ q }}}}\"\ntarget = \"{{{{ a }}}}\"\n[metric]\nname = \"f1\"\n"
            )
        };
        for bad in ["../../x", "/etc/x", "a/b", "..", ".hidden", "", "a\\b"] {
            let t = write(d.path(), "t.toml", &body(bad));
            let e = load(&t).unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains("name"), "{bad}: {e}");
        }
        let t = write(d.path(), "t.toml", &body("gsm8k-v2_1.0"));
        assert_eq!(load(&t).unwrap().name, "gsm8k-v2_1.0");
    }

    #[test]
    fn empty_split_and_k_beyond_train_are_refused() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "qa.jsonl", QA);
        write(d.path(), "empty.jsonl", "\n");
        let t = write(
            d.path(),
            "t.toml",
            "[data]\ntrain = \"qa.jsonl\"\ntest = \"empty.jsonl\"\n[prompt]\ntemplate = \"{{ q }}\"\ntarget = \"{{ a }}\"\n[metric]\nname = \"contains\"\n",
        );
        let task = load(&t).unwrap();
        let e = task.split("test").unwrap_err().to_string();
        assert!(
            e.contains("the test split has no examples") && e.contains("empty.jsonl"),
            "{e}"
        );
        let e = task.check_k(3).unwrap_err().to_string();
        assert!(
            e.contains("3 examples asked but the train split has 2"),
            "{e}"
        );
        assert!(task.check_k(2).is_ok());
    }

    #[test]
    fn one_file_is_split_by_seed() {
        let d = tempfile::tempdir().unwrap();
        let lines: String = (0..20)
            .map(|i| format!("{{\"q\": \"{i}\", \"a\": \"{i}\"}}\n"))
            .collect();
        write(d.path(), "all.jsonl", &lines);
        let t = write(
            d.path(),
            "t.toml",
            "[data]\nfile = \"all.jsonl\"\ndev_size = 3\ntest_size = 5\nsplit_seed = 7\n[prompt]\ntemplate = \"{{ q }}\"\ntarget = \"{{ a }}\"\n[metric]\nname = \"exact_match\"\n",
        );
        let task = load(&t).unwrap();
        assert_eq!(
            (task.train.len(), task.dev.len(), task.test.len()),
            (12, 3, 5)
        );
        let mut all: Vec<String> = [&task.train, &task.dev, &task.test]
            .iter()
            .flat_map(|s| s.iter().map(|e| e.target.clone()))
            .collect();
        all.sort_by_key(|s| s.parse::<usize>().unwrap());
        assert_eq!(all, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
        // The same seed gives the same split.
        let again = load(&t).unwrap();
        assert_eq!(
            task.test.iter().map(|e| &e.target).collect::<Vec<_>>(),
            again.test.iter().map(|e| &e.target).collect::<Vec<_>>()
        );
    }
}
