//! Command-line definitions (clap). Parsing only; `main.rs` resolves and dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lever",
    version,
    about = "Prompting, few-shot, RAG, fine-tuning and pretraining of language models, measured, in one binary",
    long_about = None
)]
pub struct Cli {
    /// Threads for the CPU kernels (default: all cores).
    #[arg(long, global = true, env = "LEVER_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask the model one question and stream the answer.
    Ask(AskArgs),
    /// Multi-turn chat (interactive, or one user turn per line of piped stdin).
    Chat(ChatArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Sentence embeddings of texts (BERT-family encoder, default all-MiniLM-L6-v2).
    Embed(EmbedArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Prompt-processing and generation speed, and peak memory.
    Bench(BenchArgs),
    /// Write a GGUF file with its weights in another block type (llama.cpp loads it).
    Quantize(QuantizeArgs),
    /// Fine-tune the model on a JSONL dataset: LoRA (writes a PEFT adapter) or every weight
    /// (writes a Hugging Face model folder).
    Finetune(FinetuneArgs),
    /// Train a language model from scratch on token shards (`lever data shard`): a preset
    /// (shakespeare-char, smollm2-135m) or a TOML recipe; writes a Hugging Face folder.
    Pretrain(PretrainArgs),
    /// Write the model (with --adapter folded in) as a Hugging Face folder or a GGUF file.
    Export(ExportArgs),
    /// Fold a LoRA adapter into its base model and write the result (as `export`).
    Merge(MergeArgs),
    /// A document index for retrieval: add files and folders, remove, stats, search.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Retrieval-augmented generation: answer from an index's passages, with citations.
    #[command(subcommand)]
    Rag(RagCommand),
    /// Measure a model on a task file (zero-, one- and few-shot, prompt variants side by
    /// side, 95% intervals); or retrieval quality on a BEIR folder (`eval retrieval`); or
    /// multiple-choice accuracy of a JSONL file (`eval mc`).
    Eval(EvalArgs),
    /// Few-shot example sets: `fewshot search` tries random sets on dev, keeps the best,
    /// reports it on test.
    #[command(subcommand)]
    Fewshot(FewshotCommand),
    /// An OpenAI-compatible HTTP server: chat and text completions (streaming or not),
    /// embeddings, models, health; concurrent requests are batched together.
    Serve(ServeArgs),
    /// Plan a run before spending it: FLOPs, memory (weights, gradients, AdamW, activations,
    /// KV cache), time and cost of inference, LoRA or full fine-tuning, or pretraining, on
    /// this machine (calibrated with --calibrate) or on GPUs.
    Plan(PlanArgs),
    /// Provision and list models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Tokenizers for pretraining: `tokenizer train` learns one from text files.
    #[command(subcommand)]
    Tokenizer(crate::pretrain_data::TokenizerCommand),
    /// Pretraining data: `data shard` turns text into token shards (llm.c's format).
    #[command(subcommand)]
    Data(crate::pretrain_data::DataCommand),
    /// Climb a ladder file's rungs (zero-shot, few-shot, RAG, LoRA, ...) on one task: each
    /// scored on the same items with an interval and a paired comparison, its cost counted,
    /// and a verdict (docs/ladder.md).
    Ladder(LadderArgs),
}

#[derive(Debug, Args)]
pub struct LadderArgs {
    /// The ladder file (TOML; docs/ladder.md).
    #[arg(required_unless_present = "report_only")]
    pub file: Option<PathBuf>,
    /// Folder for the rungs' records and results, the index, the trainings, ladder.json and
    /// report.html. Running the same command again goes on where it stopped (finished rungs
    /// are kept).
    #[arg(long, required_unless_present = "report_only")]
    pub out: Option<PathBuf>,
    /// Run nothing: write DIR/report.html again from DIR/ladder.json (a ladder's --out).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["file", "out", "limit", "rungs", "force", "rung"])]
    pub report_only: Option<PathBuf>,
    /// Evaluate only the first N items of the split.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Only these rungs, in this order (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub rungs: Vec<String>,
    /// Start over: remove what an earlier ladder wrote in --out; also write into an --out that
    /// holds other files.
    #[arg(long)]
    pub force: bool,
    /// Neither read nor write the evaluation cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Print ladder.json.
    #[arg(long)]
    pub json: bool,
    /// Run one rung in this process (the ladder runs each rung so).
    #[arg(long, hide = true)]
    pub rung: Option<String>,
    #[command(flatten)]
    pub backend: BackendArg,
}

/// Generate on a remote OpenAI-compatible server instead of in this process.
#[derive(Debug, Args, Clone)]
pub struct BackendArg {
    /// An OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, `lever serve`) at
    /// http[s]://HOST[:PORT][/v1] to generate with.
    #[arg(long, env = "LEVER_BACKEND")]
    pub backend: Option<String>,
    /// The backend's API key (sent as a Bearer token).
    #[arg(long, env = "LEVER_BACKEND_KEY", hide_env_values = true)]
    pub backend_key: Option<String>,
    /// The model to ask the backend for (default: the server's own).
    #[arg(long)]
    pub backend_model: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The generator: a .gguf file, a Hugging Face folder, or a registry name.
    #[arg(long, short = 'm', env = "LEVER_MODEL", default_value = lever_model::registry::DEFAULT_GENERATOR)]
    pub model: String,
    /// A LoRA adapter a request can choose with "model": "BASE:NAME" (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR", value_parser = parse_adapter)]
    pub adapters: Vec<(String, PathBuf)>,
    /// The sentence encoder behind /v1/embeddings.
    #[arg(long, env = "LEVER_EMBEDDER", default_value = lever_model::registry::DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Serve no embeddings (and load no encoder).
    #[arg(long)]
    pub no_embedder: bool,
    /// Address to bind; the default takes connections from this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "LEVER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences generated together in one batched step.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more get 429.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub queue: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub max_tokens_limit: usize,
    /// max_tokens for a request that does not say.
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub default_max_tokens: usize,
    /// Largest request body, in bytes; a larger Content-Length is refused (413) unread.
    #[arg(long, default_value_t = 1 << 20, value_parser = at_least_one)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send a request's line and headers (and an idle keep-alive
    /// connection to send its next request) before the connection is closed.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers are in (then 408).
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub body_timeout: f64,
    /// Seconds after SIGTERM/Ctrl-C for the requests in flight to finish; then the
    /// connections still open are closed and the server exits.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub shutdown_timeout: f64,
    /// Prompt tokens computed at a time, between the decoding steps of the running requests
    /// (chunked prefill: a long prompt does not stall the others). At least 64.
    #[arg(long, default_value_t = lever_server::engine::DEFAULT_PREFILL_CHUNK, value_parser = prefill_chunk)]
    pub prefill_chunk: usize,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        _ => Err(format!(
            "`{s}`: expected seconds, more than 0 and at most 86400"
        )),
    }
}

fn prefill_chunk(s: &str) -> Result<usize, String> {
    let min = lever_server::engine::MIN_PREFILL_CHUNK;
    match s.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!(
            "`{s}`: expected a number of tokens, at least {min} (shorter chunks would change \
             the attention arithmetic)"
        )),
    }
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() && !name.contains(':') => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("`{s}`: expected NAME=DIR (NAME without ':')")),
    }
}

#[derive(Debug, Args)]
pub struct IndexArg {
    /// The index folder (created by `index add`).
    #[arg(long, env = "LEVER_INDEX", default_value = "lever-index")]
    pub index: PathBuf,
    /// The sentence encoder: a Hugging Face (sentence-transformers) folder or a registry name.
    /// An index keeps the vectors of one encoder and refuses another.
    #[arg(long, env = "LEVER_EMBEDDER", default_value = lever_model::registry::DEFAULT_EMBEDDER)]
    pub embedder: String,
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Index files and folders (.txt, .md, .html, .jsonl with a `text` field); re-adding only
    /// re-embeds files whose content changed, and drops files deleted from an added folder.
    Add {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        index: IndexArg,
        /// How documents are cut: structure (the default) or tokens. Fixed when the index is
        /// created; an existing index refuses other settings.
        #[arg(long, value_parser = ["structure", "tokens"])]
        chunking: Option<String>,
        /// Largest chunk, in the encoder's tokens (default: 224, or the encoder's limit).
        #[arg(long, value_parser = at_least_one)]
        chunk_size: Option<usize>,
        /// Tokens shared by consecutive windows (default 32).
        #[arg(long)]
        overlap: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove files (or everything under a folder) from the index.
    Rm {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, env = "LEVER_INDEX", default_value = "lever-index")]
        index: PathBuf,
    },
    /// Counts, sizes and settings of the index.
    Stats {
        #[arg(long, env = "LEVER_INDEX", default_value = "lever-index")]
        index: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The best chunks for a query.
    Search(SearchArgs),
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    pub query: String,
    #[command(flatten)]
    pub index: IndexArg,
    /// How many results.
    #[arg(short, long, default_value_t = 10, value_parser = at_least_one)]
    pub k: usize,
    /// dense (encoder vectors), bm25 (words), or hybrid (both, fused by reciprocal rank).
    #[arg(long, default_value = "hybrid", value_parser = parse_mode)]
    pub mode: lever_rag::Mode,
    /// Dense search: `exact` scans every vector, `hnsw` walks a graph, `auto` picks HNSW above
    /// 20,000 chunks.
    #[arg(long, default_value = "auto", value_parser = ["auto", "exact", "hnsw"])]
    pub dense_index: String,
    /// A sentence-transformers folder that embeds the query instead of --embedder (e.g. the
    /// query encoder `lever rag train` wrote) against the index's document vectors.
    #[arg(long, value_name = "DIR")]
    pub query_encoder: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RagCommand {
    /// Retrieve passages for the question, answer from them, and list the cited sources.
    Ask(RagAskArgs),
    /// Open-domain questions (JSONL {"_id", "text", "answers", "gold_ids"}) answered
    /// closed-book, from all passages in one prompt, by RAG-Sequence or by RAG-Token: exact
    /// match and F1 (SQuAD normalization) and the gold passage's retrieval recall@1/5/20,
    /// each with a 95% bootstrap interval. Greedy decoding.
    Eval(RagEvalArgs),
    /// Train the query encoder and a LoRA adapter on the generator together (RAG, Lewis et
    /// al. 2020): the negative marginal likelihood of each question's answer over its top-k
    /// passages; the index stays fixed. Writes RUN/query-encoder/ and RUN/adapter/.
    Train(RagTrainArgs),
}

/// The passage as a latent variable (Lewis et al. 2020, "Retrieval-Augmented Generation for
/// Knowledge-Intensive NLP Tasks"): the settings of RAG-Sequence and RAG-Token.
#[derive(Debug, Args, Clone)]
pub struct LatentArgs {
    /// τ of the passages' probabilities p(z|x) = softmax(q·d / τ) over the k retrieved
    /// (inner products of unit vectors: cosines).
    #[arg(long, default_value_t = lever_rag::marginal::DEFAULT_TEMPERATURE, value_parser = positive)]
    pub doc_temperature: f32,
    /// Beams (RAG-Sequence: per passage); 1 decodes greedily, or samples at --temperature > 0.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub beam: usize,
    /// RAG-Sequence: `thorough` scores every passage's hypotheses under every passage;
    /// `fast` counts a hypothesis only under the passages whose beam produced it.
    #[arg(long, default_value = "thorough", value_parser = ["thorough", "fast"])]
    pub decoding: String,
    /// A sentence-transformers folder that embeds the question instead of --embedder (the
    /// query encoder `lever rag train` wrote), against the index's document vectors.
    #[arg(long, value_name = "DIR")]
    pub query_encoder: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RagEvalArgs {
    /// Questions, one JSON object a line: {"_id", "text", "answers": [...], "gold_ids": [...]}.
    #[arg(value_name = "QUESTIONS.jsonl")]
    pub questions: PathBuf,
    #[command(flatten)]
    pub index: IndexArg,
    #[command(flatten)]
    pub model: ModelArg,
    /// closed: the question alone; concat: all passages in one prompt (`rag ask`); seq:
    /// RAG-Sequence; token: RAG-Token.
    #[arg(long, default_value = "concat", value_parser = ["closed", "concat", "seq", "token"])]
    pub formulation: String,
    /// Passages answered from (retrieval recall is measured at 1, 5 and 20 regardless).
    #[arg(short, long, default_value_t = 10, value_parser = at_least_one)]
    pub k: usize,
    /// Only the first N questions.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub latent: LatentArgs,
    /// Most tokens of an answer.
    #[arg(long, short = 'n', default_value_t = 32, value_parser = at_least_one)]
    pub max_tokens: usize,
    /// Write every question's answer, scores and retrieved ids here (JSONL).
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Print {"n", "em", "f1", "recall@1", "recall@5", "recall@20", ...} (fractions) instead
    /// of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RagAskArgs {
    pub question: String,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub index: IndexArg,
    #[command(flatten)]
    pub model: ModelArg,
    /// Passages to retrieve.
    #[arg(short, long, default_value_t = 4, value_parser = at_least_one)]
    pub k: usize,
    /// dense, bm25 or hybrid [default: hybrid for concat; seq and token need dense, their
    /// p(z|x) is a softmax of the encoder's inner products].
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<lever_rag::Mode>,
    /// concat: every passage that fits in one prompt; seq: RAG-Sequence, token: RAG-Token
    /// (the generator reads each passage alone and the answer's probability is marginalized
    /// over them).
    #[arg(long, default_value = "concat", value_parser = ["concat", "seq", "token"])]
    pub formulation: String,
    #[command(flatten)]
    pub latent: LatentArgs,
    /// Most prompt tokens the passages may take (default: what the model's context leaves
    /// after the question and --max-tokens). Passages that do not fit are dropped and reported.
    #[arg(long)]
    pub context_tokens: Option<usize>,
    /// Print the prompt the model sees before the answer.
    #[arg(long)]
    pub show_context: bool,
    /// Print {"answer", "citations", "passages", "dropped", ...} instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct RagTrainArgs {
    /// Questions (JSONL): {"_id", "text", "answers": [...], "gold_ids": [...]}; the first
    /// answer is trained.
    #[arg(long, value_name = "QUESTIONS.jsonl")]
    pub data: PathBuf,
    /// The index the passages come from, and the sentence encoder it was built with: the
    /// query encoder starts from it (another encoder is refused by name).
    #[command(flatten)]
    pub index: IndexArg,
    /// The generator (an adapter is trained on it).
    #[command(flatten)]
    pub model: BaseModelArg,
    /// Run folder: manifest.json, metrics.jsonl, loss.png, checkpoints/, query-encoder/
    /// (sentence-transformers) and adapter/ (PEFT).
    #[arg(long, value_name = "RUN")]
    pub out: PathBuf,
    /// seq: one passage per answer (RAG-Sequence); token: a passage per token (RAG-Token).
    #[arg(long, default_value = "seq", value_parser = ["seq", "token"])]
    pub formulation: String,
    /// Passages per question (the paper trains with 5).
    #[arg(short, long, default_value_t = 5, value_parser = at_least_one)]
    pub k: usize,
    /// τ of the passages' probabilities p(z|x) = softmax(q·d / τ) over the k retrieved
    /// (inner products of unit vectors: cosines; 0.05 is sentence-transformers' scale 20).
    #[arg(long, default_value_t = 0.05, value_parser = positive_f64)]
    pub doc_temperature: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub steps: usize,
    /// Questions per step.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub batch_size: usize,
    /// The adapter's peak learning rate (warmup, then cosine decay to a tenth).
    #[arg(long, default_value_t = 2e-4, value_parser = positive_f64)]
    pub lr: f64,
    /// The query encoder's peak learning rate (same schedule).
    #[arg(long, default_value_t = 2e-5, value_parser = positive_f64)]
    pub encoder_lr: f64,
    /// Which query-encoder weights train: `all` (embeddings and every layer) or the top N
    /// layers (0: the encoder stays frozen).
    #[arg(long, default_value = "all", value_name = "all|N")]
    pub encoder_layers: String,
    /// Warmup steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub lora_r: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA dropout on the adapters' inputs while training (seeded).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Projections to adapt: a list of q,k,v,o,gate,up,down, or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// Held-out questions (same format): their mean loss and the recall@1/5/20 of their
    /// gold_ids, before and after training.
    #[arg(long, value_name = "QUESTIONS.jsonl")]
    pub val: Option<PathBuf>,
    /// Seed for the order of questions and the adapter's initial values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint (trainable values, optimizer, question order) every N steps.
    #[arg(long, default_value_t = 25)]
    pub save_every: usize,
    /// Continue the run in --out from its last checkpoint (the same settings are required).
    #[arg(long)]
    pub resume: bool,
    /// Start over in an --out that already holds a run.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    #[command(flatten)]
    pub task: EvalTaskArgs,
}

/// What `eval TASK` and `fewshot search` share.
#[derive(Debug, Args)]
pub struct TaskRunArgs {
    /// The task file (TOML: data, fields, prompt template, metric; see docs/tasks.md).
    #[arg(required = true)]
    pub task: Option<PathBuf>,
    /// Prompt format: block (examples and question as one text) or chat (user/assistant
    /// turns under the model's chat template). Default: the task's [fewshot] format.
    #[arg(long, value_parser = ["block", "chat"])]
    pub format: Option<String>,
    /// Evaluate only the first N examples of the split.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Folder for per-example JSONL and summary.json (default runs/eval-<task name>, or
    /// runs/eval-<task name>-N when that one is taken). An existing folder that is not empty
    /// is refused unless --force.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out when it exists and is not empty (the new results replace the folder
    /// once they are complete).
    #[arg(long)]
    pub force: bool,
    /// Neither read nor write the result cache.
    #[arg(long)]
    pub no_cache: bool,
    /// The result cache's folder (default $LEVER_HOME/cache/eval).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Bootstrap resamples for the 95% interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArg,
    /// The sentence encoder for the knn and mmr selectors.
    #[arg(long, env = "LEVER_EMBEDDER", default_value = lever_model::registry::DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Generation metrics only: the prompts are built and budgeted with --model's tokenizer
    /// and chat template, and answered by the backend.
    #[command(flatten)]
    pub backend: BackendArg,
}

#[derive(Debug, Args)]
pub struct EvalTaskArgs {
    #[command(flatten)]
    pub run: TaskRunArgs,
    /// Split to evaluate.
    #[arg(long, default_value = "test", value_parser = ["train", "dev", "test"])]
    pub split: String,
    /// Numbers of worked examples, e.g. 0,1,5 (default: the task's [fewshot] k).
    #[arg(long, value_delimiter = ',')]
    pub shots: Vec<usize>,
    /// Example selectors: fixed, random, knn, mmr (default: the task's [fewshot] select).
    #[arg(long, value_delimiter = ',', value_parser = parse_select)]
    pub select: Vec<lever_eval::Select>,
    /// Prompt templates by name: default, or a [prompt.variants] name (default: default).
    #[arg(long = "template", value_delimiter = ',')]
    pub templates: Vec<String>,
    /// Retrieval settings side by side, e.g. closed,concat,seq,token: none, the passages in
    /// one prompt, RAG-Sequence, RAG-Token (needs the task's [rag] section; default: its
    /// formulation, or closed without one).
    #[arg(long, value_delimiter = ',', value_parser = lever_eval::task::RAG_FORMULATIONS)]
    pub rag: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum FewshotCommand {
    /// Try N random k-example sets on the dev split, keep the best, report it on test.
    Search(FewshotSearchArgs),
}

#[derive(Debug, Args)]
pub struct FewshotSearchArgs {
    #[command(flatten)]
    pub run: TaskRunArgs,
    /// Examples per set (default: the task's [fewshot] k, else 5).
    #[arg(long, short)]
    pub k: Option<usize>,
    /// Random sets to try.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub trials: usize,
    /// Seed of the first set (trial t uses seed + t).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "default")]
    pub template: String,
    /// Evaluate the best set on only the first N test examples.
    #[arg(long, value_parser = at_least_one)]
    pub test_limit: Option<usize>,
}

fn parse_select(s: &str) -> Result<lever_eval::Select, String> {
    lever_eval::Select::parse(s)
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// nDCG@10, recall@100 and MRR@10 on a BEIR folder (corpus.jsonl[.gz], queries.jsonl,
    /// qrels/SPLIT.tsv), per retrieval mode.
    Retrieval(EvalRetrievalArgs),
    /// Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores it: each
    /// choice is a continuation of the query; acc and acc_norm (per character).
    Mc(EvalMcArgs),
}

#[derive(Debug, Args)]
pub struct EvalMcArgs {
    /// JSONL items: {"query": str, "choices": [str, ...], "gold": int (0-based)}.
    pub data: PathBuf,
    #[command(flatten)]
    pub model: ModelArg,
    /// Score only the first N items.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Score every (query + choice) from scratch instead of reusing the query's keys and
    /// values (for measuring what the reuse buys).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Print {"acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr", "examples_per_s"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalRetrievalArgs {
    pub dir: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// dense, bm25, hybrid, or all.
    #[arg(long, default_value = "all")]
    pub mode: String,
    /// The sentence encoder for dense and hybrid.
    #[arg(long, env = "LEVER_EMBEDDER", default_value = lever_model::registry::DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Texts per encoder call.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Print {"dense": {"ndcg@10", "recall@100", "mrr@10"}, "bm25": {...}, "hybrid": {...}}.
    #[arg(long)]
    pub json: bool,
}

fn parse_mode(s: &str) -> Result<lever_rag::Mode, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: BaseModelArg,
    /// JSONL training data (Alpaca, chat `messages`, ShareGPT `conversations` or `text`).
    #[arg(long)]
    pub data: PathBuf,
    /// The data's format (default: detected from the first line).
    #[arg(long, value_parser = parse_format)]
    pub format: Option<lever_data::Format>,
    /// Read a field from another key or a nested path, e.g. `instruction=question`,
    /// `output=instances/0/output` (repeatable).
    #[arg(long = "field", value_name = "NAME=PATH")]
    pub fields: Vec<String>,
    /// Print example N (0-based, in file order) token by token, `+` marking trained tokens, and exit.
    #[arg(long, value_name = "N")]
    pub show_mask: Option<usize>,
    /// Train LoRA adapters on a frozen base (which may stay quantized). Without it, every
    /// weight is trained in f32 (full fine-tuning).
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA dropout on the adapters' inputs while training (seeded).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Projections to adapt: a list of q,k,v,o,gate,up,down, or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Maximum tokens per example.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Examples longer than --seq-len: cut them (truncate), leave them out (skip), or stop
    /// with an error naming the line (error).
    #[arg(long, default_value = "skip", value_parser = ["skip", "truncate", "error"])]
    pub overlong: String,
    /// Peak learning rate (after warmup; cosine decay to a tenth). Default: 2e-4 with --lora,
    /// 2e-5 for full fine-tuning.
    #[arg(long, value_parser = positive_f64)]
    pub lr: Option<f64>,
    /// Warmup steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (gradient checkpointing): much less memory, about a third more compute.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Fraction of examples held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Validation loss every N steps (and at the start and end); 0 turns validation off.
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Seed for the split, the order of examples and the adapter's initial values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint (trainable values, optimizer, data order, RNG) every N steps.
    #[arg(long, default_value_t = 25)]
    pub save_every: usize,
    /// Continue the run in --out from its last checkpoint (the same settings are required).
    #[arg(long)]
    pub resume: bool,
    /// Start over in an --out that already holds a run (its checkpoints, metrics and result
    /// are replaced), or write into an --out folder that holds other files.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Run folder: manifest.json, metrics.jsonl, loss.png, checkpoints/, and the result:
    /// adapter/ (PEFT layout) or model/ (Hugging Face folder), plus best/. Default:
    /// runs/<name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The run's name when --out is not given (default: the data file's stem and the method).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub supervise: SuperviseArgs,
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// The model and recipe: a preset (shakespeare-char: nanoGPT's shakespeare_char CPU
    /// recipe; smollm2-135m: the default model's shape) or a TOML file. With --init the
    /// model's shape replaces the recipe's (default recipe: smollm2-135m's, at lr 1e-4).
    #[arg(long, value_name = "NAME|FILE.toml", required_unless_present = "init")]
    pub config: Option<String>,
    /// Continued pretraining: start from this model (a .gguf file, dequantized; a Hugging
    /// Face folder; or a registry name) with its own tokenizer. The shards must have been
    /// made with it (`lever data shard --tokenizer MODEL`).
    #[arg(long, value_name = "MODEL", conflicts_with = "tokenizer")]
    pub init: Option<String>,
    /// Training window in tokens (default: the recipe's context; with --init at most the
    /// model's).
    #[arg(long)]
    pub context: Option<usize>,
    /// Token shards: a folder `lever data shard` wrote, llm.c's .bin shards, or nanoGPT's
    /// train.bin and val.bin.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The tokenizer.json the shards were made with (default: the one their manifest names;
    /// required for shards without a manifest).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Run folder: manifest.json, metrics.jsonl, loss.png, checkpoints/, and the result
    /// model/ (Hugging Face folder).
    #[arg(long, value_name = "RUN")]
    pub out: PathBuf,
    /// Optimizer steps (default: the recipe's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Windows of the context per micro-batch (default: the recipe's).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (default: the recipe's).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (default: the recipe's).
    #[arg(long, value_parser = positive_f64)]
    pub lr: Option<f64>,
    /// Seed of the initial weights and the batches (default: the recipe's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validation loss and a sample every N steps, and at the end (default: the recipe's;
    /// 0 = only at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save a checkpoint (weights, optimizer, batch position, RNG) every N steps (0 = never).
    #[arg(long, default_value_t = 250)]
    pub save_every: usize,
    /// Besides checkpoints/last, keep the N newest checkpoints as checkpoints/step-NNNNNN.
    #[arg(long, default_value_t = 0)]
    pub keep: usize,
    /// Also keep every checkpoint at a multiple of M steps, never deleted (llm.c's -nm).
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub keep_every: usize,
    /// Continue the run in --out from its newest complete checkpoint (a torn or corrupt one
    /// is skipped for the one before it, with a warning); the same settings are required.
    #[arg(long)]
    pub resume: bool,
    /// Start over in an --out that already holds a run, or write into an --out folder that
    /// holds other files.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Also write RUN/model.gguf (f32), which llama.cpp loads (needs a byte-level BPE
    /// tokenizer).
    #[arg(long)]
    pub gguf: bool,
    #[command(flatten)]
    pub supervise: SuperviseArgs,
    #[command(flatten)]
    pub spikes: SpikeArgs,
}

/// Loss spikes: detection and what to do (spikes.rs, lever_train::spike).
#[derive(Debug, Args, Clone)]
pub struct SpikeArgs {
    /// A loss spike — a loss or gradient norm far above the recent window's — is written to
    /// RUN/events.jsonl and marked on loss.png; then `log` applies the update anyway, `skip`
    /// does not apply it, `rollback` goes back to the newest checkpoint before it and skips
    /// the batches from there through the spike's. `off`: no detection.
    #[arg(long, value_name = "POLICY", default_value = "log", value_parser = parse_policy)]
    pub on_spike: lever_train::spike::Policy,
    /// Steps in the detector's rolling window; judging starts once it is half full.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub spike_window: usize,
    /// A loss this many standard deviations above the window's mean is a spike (0: the loss
    /// is not judged).
    #[arg(long, value_name = "Z", default_value_t = 6.0)]
    pub spike_loss_z: f64,
    /// A gradient norm this many standard deviations above the window's mean is a spike (0:
    /// not judged).
    #[arg(long, value_name = "Z", default_value_t = 6.0)]
    pub spike_grad_z: f64,
    /// With --on-spike rollback: batches skipped after the spike's, besides those from the
    /// checkpoint through it (PaLM skipped 200–500 in all).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub rollback_skip: u64,
    /// With --on-spike rollback: multiply the learning rate by F after each rollback.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = positive_f64)]
    pub rollback_lr_factor: f64,
    /// Tests only: the batch of step S (the S-th drawn) gets one target everywhere (the
    /// vocabulary's last token) and a 300× learning rate.
    #[arg(long, value_name = "S", hide = true)]
    pub debug_poison_step: Option<u64>,
    /// Tests only: the S-th batch drawn is thrown away (a run that never saw it).
    #[arg(long, value_name = "S", hide = true)]
    pub debug_drop_batch: Option<u64>,
}

fn parse_policy(s: &str) -> Result<lever_train::spike::Policy, String> {
    s.parse()
}

/// Restarting a training run that dies (supervise.rs).
#[derive(Debug, Args, Clone)]
pub struct SuperviseArgs {
    /// Run the training as a child process and restart it from its newest complete
    /// checkpoint when it dies (a non-zero exit, a signal); each restart is a line of
    /// RUN/restarts.jsonl. Bad usage (exit 2) and 3 starts in a row that fail with an error
    /// before their first step are not restarted.
    #[arg(long)]
    pub supervise: bool,
    /// With --supervise: the most restarts before giving up.
    #[arg(long, value_name = "N", default_value_t = 10, requires = "supervise")]
    pub max_restarts: usize,
    /// With --supervise: seconds before a restart, doubled for each restart in a row that
    /// got no further than the one before (at most 600).
    #[arg(long, value_name = "SECS", default_value_t = 10.0, requires = "supervise", value_parser = non_negative_seconds)]
    pub restart_delay: f64,
    /// With --supervise: start the training through this launcher, the training's command
    /// line appended to it, e.g. "mpirun -np 4 --hostfile hosts" (split on spaces); a rank
    /// that dies ends the launcher and the whole world is restarted.
    #[arg(long, value_name = "CMD", requires = "supervise")]
    pub launcher: Option<String>,
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=86_400.0).contains(&x) => Ok(x),
        _ => Err(format!("`{s}`: expected seconds, from 0 to 86400")),
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Output: a folder (Hugging Face: config.json, model.safetensors, tokenizer files) or a
    /// `.gguf` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Block type of a GGUF's matrices: f16, q8_0, q4_1 or q4_0 (default q8_0).
    #[arg(long = "type", short = 't', value_parser = parse_quant_type)]
    pub qtype: Option<candle_core::quantized::GgmlDType>,
    /// Replace an existing output (a file, or a folder that is not empty).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a .gguf file, a Hugging Face folder, or a registry name.
    #[arg(long, short = 'm', env = "LEVER_MODEL", default_value = lever_model::registry::DEFAULT_GENERATOR)]
    pub model: String,
    /// The LoRA adapter folder (PEFT layout) to fold in.
    #[arg(long = "lora", value_name = "ADAPTER_DIR")]
    pub lora: PathBuf,
    /// Output: a Hugging Face folder, or a `.gguf` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Block type of a GGUF's matrices: f16, q8_0, q4_1 or q4_0 (default q8_0).
    #[arg(long = "type", short = 't', value_parser = parse_quant_type)]
    pub qtype: Option<candle_core::quantized::GgmlDType>,
    /// Replace an existing output (a file, or a folder that is not empty).
    #[arg(long)]
    pub force: bool,
}

fn parse_format(s: &str) -> Result<lever_data::Format, String> {
    s.parse()
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

#[derive(Debug, Args, Clone)]
pub struct ModelArg {
    /// A .gguf file, a Hugging Face folder, or a registry name (see `lever models list`).
    #[arg(long, short = 'm', env = "LEVER_MODEL", default_value = lever_model::registry::DEFAULT_GENERATOR)]
    pub model: String,
    /// A LoRA adapter folder in Hugging Face PEFT's layout (adapter_config.json +
    /// adapter_model.safetensors), e.g. one `lever finetune` wrote.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// A generator without an adapter (commands that do not apply one).
#[derive(Debug, Args, Clone)]
pub struct BaseModelArg {
    /// A .gguf file, a Hugging Face folder, or a registry name (see `lever models list`).
    #[arg(long, short = 'm', env = "LEVER_MODEL", default_value = lever_model::registry::DEFAULT_GENERATOR)]
    pub model: String,
}

impl BaseModelArg {
    pub fn without_adapter(&self) -> ModelArg {
        ModelArg {
            model: self.model.clone(),
            adapter: None,
        }
    }
}

/// Sampling. Settings left out come from the model's published generation settings
/// (generation_config.json, GGUF `general.sampling.*`, or its model card in the registry:
/// SmolLM2 temperature 0.2, top-p 0.9), else llama.cpp's defaults (temperature 0.8, top-k 40,
/// top-p 0.95, min-p 0.05). `--temperature 0` is greedy.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy [default: the model's].
    #[arg(long, value_parser = non_negative)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens (0 = off) [default: the model's].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set with this much probability (1 = off)
    /// [default: the model's].
    #[arg(long, value_parser = unit_interval)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min-p times the best one (0 = off) [default: the model's].
    #[arg(long, value_parser = unit_interval)]
    pub min_p: Option<f32>,
    /// Penalty for repeating recent tokens (1 = off) [default: the model's].
    #[arg(long, value_parser = positive)]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Maximum new tokens.
    #[arg(long, short = 'n', default_value_t = 256, value_parser = at_least_one)]
    pub max_tokens: usize,
    /// Stop when this string is produced (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The prompt; read from stdin when absent.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub model: ModelArg,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// A minijinja prompt template file; its output is the question.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// A template variable, key=value (repeatable).
    #[arg(long = "var", value_parser = parse_key_val)]
    pub vars: Vec<(String, String)>,
    /// Send the text as is, without the model's chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub constraint: ConstraintArgs,
    #[command(flatten)]
    pub backend: BackendArg,
}

/// What the answer must be, by construction (constrained decoding with llguidance): at most
/// one of these.
#[derive(Debug, Args, Clone, Default)]
pub struct ConstraintArgs {
    /// A JSON document valid against this JSON Schema file.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Any JSON object (OpenAI's `json_object` response format).
    #[arg(long)]
    pub json_object: bool,
    /// Text the whole of which matches this regular expression.
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
    /// Text in the language of this Lark grammar file (llguidance's Lark; rule `start`).
    #[arg(long, value_name = "FILE.lark")]
    pub grammar: Option<PathBuf>,
    /// One of these strings exactly (repeatable).
    #[arg(long = "choice", value_name = "TEXT")]
    pub choices: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Start from a saved conversation (JSON written by /save).
    #[arg(long)]
    pub load: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub constraint: ConstraintArgs,
    #[command(flatten)]
    pub backend: BackendArg,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The text to tokenize.
    pub text: String,
    #[command(flatten)]
    pub model: BaseModelArg,
    /// Do not add BOS even if the model asks for it.
    #[arg(long)]
    pub no_bos: bool,
    /// Print {"ids": [...]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The texts to embed.
    #[arg(required_unless_present = "file")]
    pub texts: Vec<String>,
    /// Also embed every line of this UTF-8 file (after the TEXT arguments).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The encoder: a Hugging Face (sentence-transformers) folder or a registry name.
    #[arg(long, short = 'm', env = "LEVER_EMBEDDER", default_value = lever_model::registry::DEFAULT_EMBEDDER)]
    pub model: String,
    /// Print {"model", "dim", "truncated", "data": [{"index", "embedding"}]}.
    #[arg(long)]
    pub json: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// A UTF-8 text file.
    pub file: PathBuf,
    #[command(flatten)]
    pub model: ModelArg,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..))]
    pub ctx: u32,
    /// Score at most this many windows.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunks: Option<u32>,
    /// Print {"ppl": ...}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Prompt tokens processed in one batch.
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens generated one by one.
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Repetitions; the median is reported.
    #[arg(long, short = 'r', default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Input model: a .gguf file or a registry name.
    pub input: String,
    /// Output .gguf file (written to a temp name, then renamed).
    pub output: PathBuf,
    /// Block type of the weight matrices: q8_0, q4_1, q4_0 or f16.
    #[arg(long = "type", short = 't', value_parser = parse_quant_type)]
    pub qtype: candle_core::quantized::GgmlDType,
    /// Replace an existing output file (also the input itself).
    #[arg(long)]
    pub force: bool,
}

fn parse_quant_type(s: &str) -> Result<candle_core::quantized::GgmlDType, String> {
    lever_model::formats::quantize::parse_type(s)
        .ok_or_else(|| format!("`{s}` is not one of q8_0, q4_1, q4_0, f16"))
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download and verify models (default: all registry models).
    Pull {
        /// Registry names.
        names: Vec<String>,
    },
    /// Registry models: name, kind, size, quantization, path.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

fn parse_key_val(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

fn parse_f32(s: &str) -> Result<f32, String> {
    s.parse::<f32>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("`{s}` is not a number"))
}

fn non_negative(s: &str) -> Result<f32, String> {
    parse_f32(s).and_then(|v| {
        if v >= 0.0 {
            Ok(v)
        } else {
            Err(format!("{v} is negative"))
        }
    })
}

fn positive(s: &str) -> Result<f32, String> {
    parse_f32(s).and_then(|v| {
        if v > 0.0 {
            Ok(v)
        } else {
            Err(format!("{v} must be > 0"))
        }
    })
}

fn unit_interval(s: &str) -> Result<f32, String> {
    parse_f32(s).and_then(|v| {
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{v} is outside 0..=1"))
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanJob {
    /// Generation: prompt and decoding speed, KV cache at --context × --batch.
    Infer,
    /// LoRA adapters on a frozen base, on --tokens or --steps.
    Lora,
    /// Every weight trained, on --tokens or --steps.
    Full,
    /// Training from scratch on --tokens (default: 20 per parameter, Chinchilla's).
    Pretrain,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Measure this machine (matmul FLOP/s, memory bandwidth, and lever's own training step
    /// on two small decoders; about 10 s) and store it in $LEVER_HOME/plan/calibration.json,
    /// which later plans on this machine use. Alone, only calibrates.
    #[arg(long)]
    pub calibrate: bool,
    /// The model: a registry name, a .gguf file or a Hugging Face folder (its configuration
    /// is read, not its weights).
    #[arg(long, short = 'm', conflicts_with_all = ["params", "layers"])]
    pub model: Option<String>,
    /// Only a parameter count, e.g. 175e9 (no attention term, activations or KV cache).
    #[arg(long, value_parser = positive_count, conflicts_with = "layers")]
    pub params: Option<f64>,
    /// A shape: layers (with --width --heads --vocab --context).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width (default: 8/3 × width rounded up to 64 with 3 matrices, 4 × width with 2).
    #[arg(long)]
    pub mlp_width: Option<usize>,
    /// Matrices per MLP: 3 (SwiGLU, llama) or 2 (GPT).
    #[arg(long, default_value_t = 3)]
    pub mlp_linears: usize,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// The training window, or the KV cache's length for inference (default: the shape's,
    /// or the model's context; 2048 with --params).
    #[arg(long)]
    pub context: Option<usize>,
    /// The output layer is a matrix of its own (default: tied to the embedding).
    #[arg(long)]
    pub untied: bool,
    #[arg(long, value_enum, default_value = "pretrain")]
    pub job: PlanJob,
    /// Training tokens (every position of every window), e.g. 300e9; for inference, tokens to
    /// generate.
    #[arg(long, value_parser = positive_count)]
    pub tokens: Option<f64>,
    /// Optimizer steps instead of --tokens: tokens = steps × batch × context.
    #[arg(long, conflicts_with = "tokens", value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Plan `lever finetune --data FILE` (with --model and --job lora|full): the examples are
    /// tokenized as finetune does and the micro-batches it will draw counted, padding
    /// included (--steps, --batch, --grad-accum default to finetune's 100, 4, 1).
    #[arg(long, requires = "model", conflicts_with = "tokens")]
    pub data: Option<PathBuf>,
    /// With --data: finetune's --field NAME=PATH (repeatable), e.g. instruction=question.
    #[arg(long = "field", value_name = "NAME=PATH", requires = "data")]
    pub fields: Vec<String>,
    /// With --data: finetune's --seq-len (longer examples are skipped, its default).
    #[arg(long, default_value_t = 256, value_parser = at_least_one, requires = "data")]
    pub seq_len: usize,
    /// With --data: finetune's --val-fraction.
    #[arg(long, default_value_t = 0.05, requires = "data")]
    pub val_fraction: f64,
    /// With --data: finetune's --seed (the order of the examples).
    #[arg(long, default_value_t = 0, requires = "data")]
    pub seed: u64,
    /// Sequences per optimizer step, all devices together (default 8); for inference,
    /// sequences decoded together (default 1).
    #[arg(long, value_parser = at_least_one)]
    pub batch: Option<usize>,
    /// Micro-batches per step (activations are held for batch / (devices × grad-accum)).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub lora_rank: usize,
    /// A GPU instead of this machine: H100, H100-PCIe, H200, A100, A100-40GB, L40S, V100,
    /// MI300X.
    #[arg(long)]
    pub gpu: Option<String>,
    /// GPUs in data parallel.
    #[arg(long, default_value_t = 1, value_parser = at_least_one, requires = "gpu")]
    pub gpus: usize,
    /// The fraction of the peak FLOP/s reached (default 0.4 on GPUs; on this machine the
    /// calibration's measured speed is used unless --mfu is given).
    #[arg(long, value_parser = fraction)]
    pub mfu: Option<f64>,
    /// The link between GPUs: nvlink2/3/4, pcie4, pcie5, ib-hdr, ib-ndr, 100gbe, 25gbe,
    /// infinity-fabric, or GB/s each way (default: the GPU's usual server link).
    #[arg(long, requires = "gpu")]
    pub interconnect: Option<String>,
    /// Bytes per value: f32 (lever on a CPU; the default there) or bf16-mixed (bf16 weights
    /// and activations, fp32 gradients and AdamW with a master copy; the default on GPUs).
    #[arg(long, value_parser = ["f32", "bf16-mixed"])]
    pub precision: Option<String>,
    /// Price per hour, per GPU or for this machine: the plan's cost.
    #[arg(long, value_parser = positive_f64)]
    pub price: Option<f64>,
    /// Print the plan as JSON ({"train_flops", "memory": {...}, "time": {...}, "cost", ...}).
    #[arg(long)]
    pub json: bool,
}

fn positive_count(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive number (e.g. 300e9)")),
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("`{s}` is not a fraction in (0, 1]")),
    }
}
