//! The generation engine: one thread that owns the decoding loop. Requests wait in a bounded
//! queue; each loop turn admits waiting requests (prefilling their prompts), then advances
//! every running sequence by one token in a single batched step per model variant
//! (`Decoder::step_batch`: the weights are read once for all sequences), so a request that
//! arrives mid-way joins the next step instead of waiting for the others to finish
//! (continuous batching, as in Orca, OSDI '22, and vLLM). A sequence whose client went away
//! (its event receiver dropped) is dropped at the next step.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use lever_generate::stream::{StopMatcher, Utf8Stream};
use lever_generate::{FinishReason, Sampler, SamplingParams};
use lever_model::{Cache, Model};
use tokio::sync::mpsc::UnboundedSender;

/// What a request streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Printable text, in order.
    Text(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed on this request (a model error); the message is for the client.
    Failed(String),
}

pub struct Job {
    /// Index of the model variant (base, or base + an adapter).
    pub variant: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// Why a job was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: try later (HTTP 429).
    Busy,
    /// The engine has stopped (HTTP 503).
    Stopped,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// The largest batch one step has run.
    pub max_batch_seen: AtomicUsize,
    /// Prompt tokens taken from the prompt cache instead of being computed.
    pub prompt_tokens_reused: AtomicUsize,
}

impl Engine {
    /// Start the engine thread over `variants` (index 0 is the base model). At most
    /// `max_batch` sequences run at once; at most `queue` more wait.
    pub fn start(variants: Vec<Arc<Model>>, max_batch: usize, queue: usize) -> Engine {
        let (tx, rx) = sync_channel(queue.max(1));
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("lever-engine".into())
            .spawn(move || run(variants, rx, max_batch.max(1), st))
            .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
        Engine { tx, stats }
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Refused::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Stopped),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

struct Seq {
    job: Job,
    cache: Cache,
    /// Prompt + generated tokens fed so far (for the repetition penalty's history).
    history: Vec<u32>,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    generated: usize,
    /// The token to feed at the next step: the one sampled last, or the prompt's last one
    /// for a sequence that joined after a cached prefix.
    next: u32,
}

fn run(variants: Vec<Arc<Model>>, rx: Receiver<Job>, max_batch: usize, stats: Arc<Stats>) {
    let mut running: Vec<Seq> = Vec::new();
    let mut prompts = PromptCache::new(PROMPT_CACHE_BYTES);
    let mut closed = false;
    loop {
        // Admit: block when idle, otherwise take what is waiting without stopping the batch.
        while running.len() < max_batch && !closed {
            let job = if running.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        None
                    }
                }
            } else {
                rx.try_recv().ok()
            };
            let Some(job) = job else { break };
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            if let Some(seq) = admit(&variants, job, &mut prompts, &stats) {
                running.push(seq);
            }
        }
        if running.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        stats.running.store(running.len(), Ordering::Relaxed);
        step(&variants, &mut running, &mut prompts, &stats);
        stats.running.store(running.len(), Ordering::Relaxed);
    }
}

/// A prompt prefix shorter than this is computed again rather than copied.
const MIN_REUSE: usize = 8;

/// Keys and values the prompt cache may hold, all variants together.
const PROMPT_CACHE_BYTES: usize = 256 << 20;
/// Sequences it may hold.
const PROMPT_CACHE_ENTRIES: usize = 32;

/// Recent sequences' keys and values (llama.cpp server's per-slot `cache_prompt`, vLLM's
/// prefix caching at the granularity of whole sequences): every admitted prompt, and every
/// finished sequence (prompt + answer, so a chat's next turn starts after the last answer).
/// A new prompt continues from the entry that shares the longest prefix with it, so clients
/// that take turns (several chats, several system prompts) each find their own. Most recent
/// first; the oldest go when the entries or bytes run out.
struct PromptCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    budget: usize,
}

struct Entry {
    variant: usize,
    tokens: Vec<u32>,
    cache: Cache,
    bytes: usize,
}

impl PromptCache {
    fn new(budget: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    /// A cache holding the longest cached prefix of `prompt` (at most all but its last
    /// token, which is fed for its logits), and that prefix's length; None below `MIN_REUSE`.
    fn lookup(&mut self, variant: usize, prompt: &[u32]) -> Option<(Cache, usize)> {
        let limit = prompt.len().checked_sub(1)?;
        let (at, common) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.variant == variant)
            .map(|(i, e)| {
                let n = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, n.min(limit))
            })
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if common < MIN_REUSE {
            return None;
        }
        let mut cache = self.entries[at].cache.clone();
        cache.truncate(common).ok()?;
        let e = self.entries.remove(at)?;
        self.entries.push_front(e);
        Some((cache, common))
    }

    /// Keep `tokens` with the keys and values `cache` holds for them. An entry whose tokens
    /// begin the new ones says nothing more and goes.
    fn insert(&mut self, variant: usize, tokens: Vec<u32>, cache: Cache, bytes_per_token: usize) {
        let bytes = cache.len() * bytes_per_token;
        if tokens.len() != cache.len() || bytes > self.budget {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = e.variant == variant && tokens.starts_with(&e.tokens);
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        self.bytes -= freed;
        self.entries.push_front(Entry {
            variant,
            tokens,
            cache,
            bytes,
        });
        self.bytes += bytes;
        while self.bytes > self.budget || self.entries.len() > PROMPT_CACHE_ENTRIES {
            match self.entries.pop_back() {
                Some(e) => self.bytes -= e.bytes,
                None => break,
            }
        }
    }
}

/// Bytes of keys and values per token (f16 host rows, every layer).
fn kv_bytes_per_token(model: &Model) -> usize {
    let c = model.decoder.config();
    2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
}

/// Prefill the prompt and sample the first token; None if the request ended already.
///
/// Prompt caching (`PromptCache`): a prompt that starts like a recent sequence computes only
/// what follows. Without it every arrival stalls the running batch for a whole prefill. The
/// reused positions hold the same values a full prefill computes, except that a prompt of
/// 64 tokens or more is then attended in two chunks (README: attention precision).
fn admit(
    variants: &[Arc<Model>],
    job: Job,
    prompts: &mut PromptCache,
    stats: &Stats,
) -> Option<Seq> {
    let model = &variants[job.variant];
    let (cache, start) = prompts
        .lookup(job.variant, &job.prompt)
        .unwrap_or_else(|| (model.decoder.new_cache(), 0));
    let mut seq = Seq {
        sampler: Sampler::new(job.sampling.clone()),
        stops: StopMatcher::new(&job.stop),
        history: job.prompt.get(..start).unwrap_or_default().to_vec(),
        utf8: Utf8Stream::default(),
        generated: 0,
        next: 0,
        cache,
        job,
    };
    let prompt = &seq.job.prompt;
    if start > 0 && start + 1 == prompt.len() {
        // Everything but the last token came from the cache: that token joins the next
        // batched step as this sequence's row (its logits there equal a prefill's), so the
        // arrival costs the running batch one more row, not a step of its own.
        stats
            .prompt_tokens_reused
            .fetch_add(start, Ordering::Relaxed);
        seq.next = prompt[start];
        return Some(seq);
    }
    let logits = (|| -> candle_core::Result<Vec<f32>> {
        let input =
            candle_core::Tensor::new(&prompt[start..], model.decoder.device())?.unsqueeze(0)?;
        model
            .decoder
            .forward(&input, &mut seq.cache, lever_model::Logits::Last)?
            .squeeze(0)?
            .to_vec1::<f32>()
    })();
    let logits = match logits {
        Ok(l) => l,
        Err(e) => {
            let _ = seq.job.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    stats
        .prompt_tokens_reused
        .fetch_add(start, Ordering::Relaxed);
    seq.history = prompt.clone();
    let bytes = kv_bytes_per_token(model);
    prompts.insert(
        seq.job.variant,
        seq.history.clone(),
        seq.cache.clone(),
        bytes,
    );
    if advance(model, &mut seq, &logits) {
        Some(seq)
    } else {
        None
    }
}

/// One batched step for every running sequence, grouped by model variant.
fn step(variants: &[Arc<Model>], running: &mut Vec<Seq>, prompts: &mut PromptCache, stats: &Stats) {
    // Clients that left: drop their sequences before spending a step on them.
    running.retain(|s| !s.job.events.is_closed());
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in running.iter().enumerate() {
        groups.entry(s.job.variant).or_default().push(i);
    }
    let mut keep = vec![true; running.len()];
    let mut failed = vec![false; running.len()];
    for (variant, idx) in groups {
        let model = &variants[variant];
        let ids: Vec<u32> = idx.iter().map(|&i| running[i].next).collect();
        stats.max_batch_seen.fetch_max(ids.len(), Ordering::Relaxed);
        // Take the caches out for the step, and put them back after.
        let mut caches: Vec<Cache> = idx
            .iter()
            .map(|&i| std::mem::replace(&mut running[i].cache, model.decoder.new_cache()))
            .collect();
        let rows = {
            let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
            model
                .decoder
                .step_batch(&ids, &mut refs)
                .and_then(|t| t.to_vec2::<f32>())
        };
        for (&i, c) in idx.iter().zip(caches) {
            running[i].cache = c;
        }
        match rows {
            Ok(rows) => {
                for (&i, logits) in idx.iter().zip(&rows) {
                    let s = &mut running[i];
                    s.history.push(s.next);
                    keep[i] = advance(model, s, logits);
                }
            }
            Err(e) => {
                for &i in &idx {
                    let _ = running[i].job.events.send(Event::Failed(e.to_string()));
                    keep[i] = false;
                    failed[i] = true;
                }
            }
        }
    }
    // Finished sequences leave their keys and values to the prompt cache (a chat's next
    // turn repeats this one's prompt and answer).
    let ended = keep.into_iter().zip(failed);
    for (s, (keep, failed)) in std::mem::take(running).into_iter().zip(ended) {
        if keep {
            running.push(s);
        } else if !failed {
            let bytes = kv_bytes_per_token(&variants[s.job.variant]);
            prompts.insert(s.job.variant, s.history, s.cache, bytes);
        }
    }
}

/// Sample after `logits`, stream the text, and say whether the sequence goes on.
fn advance(model: &Model, s: &mut Seq, logits: &[f32]) -> bool {
    let tok = &model.tokenizer;
    let ctx = model.decoder.config().max_seq_len;
    let next = s.sampler.sample(logits, &s.history);
    let finish = if tok.is_eog(next) {
        Some(FinishReason::Eog)
    } else {
        s.generated += 1;
        let piece = s.utf8.push(tok.token_bytes(next));
        let check = s.stops.push(&piece);
        if !check.emit.is_empty() && s.job.events.send(Event::Text(check.emit)).is_err() {
            return false;
        }
        if check.stopped {
            Some(FinishReason::Stop)
        } else if s.generated >= s.job.max_tokens {
            Some(FinishReason::Length)
        } else if s.cache.len() + 1 >= ctx {
            Some(FinishReason::Context)
        } else {
            None
        }
    };
    match finish {
        None => {
            s.next = next;
            true
        }
        Some(finish) => {
            let mut finish = finish;
            if finish != FinishReason::Stop {
                let tail = s.stops.push(&s.utf8.flush());
                let rest = if tail.stopped {
                    finish = FinishReason::Stop;
                    tail.emit
                } else {
                    format!("{}{}", tail.emit, s.stops.flush())
                };
                if !rest.is_empty() {
                    let _ = s.job.events.send(Event::Text(rest));
                }
            }
            let _ = s.job.events.send(Event::Done {
                finish,
                prompt_tokens: s.job.prompt.len(),
                completion_tokens: s.generated,
            });
            false
        }
    }
}
