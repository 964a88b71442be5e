//! The generation engine: one thread that owns the decoding loop.
//!
//! Requests wait in a bounded queue. Each loop turn admits waiting requests, computes one
//! chunk of a waiting prompt (chunked prefill), then advances every decoding sequence by one
//! token in a single batched step per model variant (`Decoder::step_batch`: the weights are
//! read once for all sequences), so a request that arrives mid-way joins the next step
//! instead of waiting for the others to finish (continuous batching, as in Orca, OSDI '22,
//! and vLLM).
//!
//! Chunked prefill (Sarathi-Serve, OSDI '24; vLLM's `enable_chunked_prefill`): a prompt is
//! computed `prefill_chunk` tokens at a time, its keys and values kept in its cache between
//! chunks, and the prompts waiting take turns chunk by chunk. A prompt's next chunk runs only
//! once the decoding sequences have had as much time as its last chunk took (a new prompt's
//! first chunk runs at once), so a long prompt costs the running requests at most about half
//! their speed, and a short request that arrives behind an 8k-token prompt waits for the
//! chunk in progress, then is computed and answered while the long prompt waits its turn.
//! Splitting a prompt gives the same keys, values and logits as computing it at once as long
//! as no chunk is shorter than `MIN_PREFILL_CHUNK`: shorter ones would take llama.cpp's
//! one-query f16 attention path instead of the f32 tiles (`lever_model::kernels::attention`),
//! so the last chunk takes up to `MIN_PREFILL_CHUNK - 1` extra tokens instead.
//!
//! A sequence whose client went away (its event receiver dropped) is dropped at the next
//! step, or before its next prompt chunk.

mod prompt_cache;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use lever_generate::stream::{StopMatcher, Utf8Stream};
use lever_generate::{FinishReason, Guide, Sampler, SamplingParams};
use lever_model::{Cache, Model};
use tokio::sync::mpsc::UnboundedSender;

use prompt_cache::{PROMPT_CACHE_BYTES, PromptCache, kv_bytes_per_token};

/// Prompt tokens computed at a time by default: about a second of work on 2 cores for the
/// default model, early in a prompt.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// The shortest chunk that keeps a split prompt's numbers equal to an unsplit one's (the
/// attention kernel's switch from one-query f16 to f32 tiles).
pub const MIN_PREFILL_CHUNK: usize = lever_model::kernels::ATTN_TILE_Q;

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
    /// With `Job::echo`: the prompt's tokens, each with its log-probability given the tokens
    /// before it (none for the first), sent once the prompt is computed.
    Prompt(Vec<TokenLogprob>),
    /// With `Job::logprobs`: a generated token, sent before the text it brings.
    Token(TokenLogprob),
}

/// A token and its log-probability under the model (log-softmax of the raw logits: before
/// temperature, penalties and any constraint, as vLLM reports them by default), with the most
/// probable alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: Option<f32>,
    /// The `Job::logprobs` most probable tokens there, most probable first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `id`'s log-probability in `logits` and the `top` most probable tokens.
    pub fn of(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        // The index list is only built when alternatives are asked for (a hot path: once per
        // generated token, over the whole vocabulary).
        let top = top.min(logits.len());
        let mut best: Vec<usize> = if top == 0 {
            Vec::new()
        } else {
            (0..logits.len()).collect()
        };
        if top > 0 && top < best.len() {
            // Ties in index order (the first maximum wins, as argmax does).
            let key = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            best.select_nth_unstable_by(top - 1, key);
            best.truncate(top);
            best.sort_by(key);
        } else {
            best.truncate(top);
        }
        TokenLogprob {
            id,
            logprob: logits.get(id as usize).map(|_| lp(id as usize)),
            top: best.into_iter().map(|i| (i as u32, lp(i))).collect(),
        }
    }
}

pub struct Job {
    /// Index of the model variant (base, or base + an adapter).
    pub variant: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Constrained decoding: masks this sequence's logits before each draw.
    pub guide: Option<Guide>,
    /// Log-probabilities of the generated tokens, with this many alternatives each
    /// (`Event::Token`); None: none.
    pub logprobs: Option<usize>,
    /// The prompt's own log-probabilities (`Event::Prompt`, with `logprobs` alternatives): the
    /// whole prompt is computed (no prompt-cache reuse), every position's logits kept.
    pub echo: bool,
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

/// How much the engine takes on.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences at once, prefilling and decoding together.
    pub max_batch: usize,
    /// Requests waiting for a place.
    pub queue: usize,
    /// Prompt tokens per prefill chunk (at least `MIN_PREFILL_CHUNK`).
    pub prefill_chunk: usize,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences decoding.
    pub running: AtomicUsize,
    /// Sequences whose prompt is being computed.
    pub prefilling: AtomicUsize,
    pub waiting: AtomicUsize,
    /// The largest batch one step has run.
    pub max_batch_seen: AtomicUsize,
    /// Prompt tokens taken from the prompt cache instead of being computed.
    pub prompt_tokens_reused: AtomicUsize,
}

impl Engine {
    /// Start the engine thread over `variants` (index 0 is the base model).
    pub fn start(variants: Vec<Arc<Model>>, cfg: EngineConfig) -> Engine {
        let (tx, rx) = sync_channel(cfg.queue.max(1));
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let cfg = EngineConfig {
            max_batch: cfg.max_batch.max(1),
            prefill_chunk: cfg.prefill_chunk.max(MIN_PREFILL_CHUNK),
            ..cfg
        };
        std::thread::Builder::new()
            .name("lever-engine".into())
            .spawn(move || run(variants, rx, cfg, st))
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
    /// With `Job::echo`: the prompt's tokens so far with their log-probabilities.
    echoed: Vec<TokenLogprob>,
}

/// A sequence whose prompt is being computed: `done` of its tokens are in its cache.
struct Prefill {
    seq: Seq,
    done: usize,
    /// How long its last chunk took: the estimate for its next one.
    last_chunk: Duration,
}

/// Where the prefill chunk that starts at `done` of `total` prompt tokens ends: `chunk`
/// tokens on, or the end when fewer than `chunk + MIN_PREFILL_CHUNK` are left, so that no
/// chunk after the first is shorter than `MIN_PREFILL_CHUNK`.
pub fn chunk_end(done: usize, total: usize, chunk: usize) -> usize {
    if total - done < chunk + MIN_PREFILL_CHUNK {
        total
    } else {
        done + chunk
    }
}

fn run(variants: Vec<Arc<Model>>, rx: Receiver<Job>, cfg: EngineConfig, stats: Arc<Stats>) {
    let mut running: Vec<Seq> = Vec::new();
    let mut prefilling: VecDeque<Prefill> = VecDeque::new();
    let mut prompts = PromptCache::new(PROMPT_CACHE_BYTES);
    let mut closed = false;
    // Decoding time the running sequences have had, less the prefill chunks' time since.
    let mut credit = Duration::ZERO;
    loop {
        // Admit: block when idle, otherwise take what is waiting without stopping the batch.
        while running.len() + prefilling.len() < cfg.max_batch && !closed {
            let job = if running.is_empty() && prefilling.is_empty() {
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
            match admit(&variants, job, &mut prompts, &stats) {
                Admitted::Decoding(seq) => running.push(seq),
                Admitted::Prefill(p) => prefilling.push_back(p),
            }
        }
        // Clients that left while their prompt waited.
        prefilling.retain(|p| !p.seq.job.events.is_closed());
        stats.prefilling.store(prefilling.len(), Ordering::Relaxed);
        stats.running.store(running.len(), Ordering::Relaxed);
        if running.is_empty() && prefilling.is_empty() {
            if closed {
                return;
            }
            continue;
        }
        // One prefill chunk, when the decoding sequences have had their share: a prompt's
        // next chunk runs once they have decoded for as long as its last chunk took, and a
        // new prompt's first chunk before any other prompt's next one. With nobody decoding,
        // prompts go back to back, taking turns.
        if running.is_empty() {
            credit = Duration::ZERO;
        }
        let pick = prefilling
            .iter()
            .position(|p| p.last_chunk <= credit)
            .or_else(|| (running.is_empty() && !prefilling.is_empty()).then_some(0));
        if let Some(p) = pick.and_then(|i| prefilling.remove(i)) {
            let t0 = Instant::now();
            let out = prefill_chunk(&variants, p, cfg.prefill_chunk, &mut prompts);
            let took = t0.elapsed();
            credit = credit.saturating_sub(took);
            match out {
                Chunked::More(mut p) => {
                    p.last_chunk = took;
                    prefilling.push_back(p);
                }
                Chunked::Decoding(seq) => running.push(seq),
                Chunked::Ended => {}
            }
            stats.prefilling.store(prefilling.len(), Ordering::Relaxed);
        }
        if running.is_empty() {
            continue;
        }
        stats.running.store(running.len(), Ordering::Relaxed);
        let t0 = Instant::now();
        step(&variants, &mut running, &mut prompts, &stats);
        credit += t0.elapsed();
        stats.running.store(running.len(), Ordering::Relaxed);
    }
}

enum Admitted {
    Decoding(Seq),
    Prefill(Prefill),
}

/// Take a job: its cached prefix from the prompt cache, and the rest to prefill.
///
/// Prompt caching (`PromptCache`): a prompt that starts like a recent sequence computes only
/// what follows. The reused positions hold the same values a full prefill computes, except
/// that a prompt of 64 tokens or more is then attended in two parts, and the part after the
/// cached prefix may be shorter than 64 (README: attention precision).
fn admit(variants: &[Arc<Model>], job: Job, prompts: &mut PromptCache, stats: &Stats) -> Admitted {
    let model = &variants[job.variant];
    // Echo needs every prompt position's logits: nothing is taken from the cache.
    let cached = if job.echo {
        None
    } else {
        prompts.lookup(job.variant, &job.prompt)
    };
    let (cache, start) = cached.unwrap_or_else(|| (model.decoder.new_cache(), 0));
    stats
        .prompt_tokens_reused
        .fetch_add(start, Ordering::Relaxed);
    let mut seq = Seq {
        sampler: Sampler::new(job.sampling.clone()),
        stops: StopMatcher::new(&job.stop),
        history: job.prompt.get(..start).unwrap_or_default().to_vec(),
        utf8: Utf8Stream::default(),
        generated: 0,
        next: 0,
        echoed: Vec::new(),
        cache,
        job,
    };
    if start > 0 && start + 1 == seq.job.prompt.len() {
        // Everything but the last token came from the cache: that token joins the next
        // batched step as this sequence's row (its logits there equal a prefill's), so the
        // arrival costs the running batch one more row, not a step of its own.
        seq.next = seq.job.prompt[start];
        return Admitted::Decoding(seq);
    }
    Admitted::Prefill(Prefill {
        seq,
        done: start,
        last_chunk: Duration::ZERO,
    })
}

enum Chunked {
    /// More of the prompt is left.
    More(Prefill),
    /// The prompt is done and the first token sampled: the sequence decodes from now on.
    Decoding(Seq),
    /// The request ended (its first token ended it, or the model failed).
    Ended,
}

/// Compute the next chunk of a prompt; after the last, keep the prompt in the prompt cache
/// and sample the first token.
fn prefill_chunk(
    variants: &[Arc<Model>],
    mut p: Prefill,
    chunk: usize,
    prompts: &mut PromptCache,
) -> Chunked {
    let model = &variants[p.seq.job.variant];
    let total = p.seq.job.prompt.len();
    let end = chunk_end(p.done, total, chunk);
    let out = (|| -> candle_core::Result<Option<Vec<f32>>> {
        let ids = &p.seq.job.prompt[p.done..end];
        let input = candle_core::Tensor::new(ids, model.decoder.device())?.unsqueeze(0)?;
        let dec = &model.decoder;
        if p.seq.job.echo {
            // Every row: row i predicts prompt token done + i + 1 (the last row, past the
            // prompt's end, the first generated token).
            let rows = dec.forward(&input, &mut p.seq.cache, lever_model::Logits::All)?;
            let rows = rows.squeeze(0)?.to_vec2::<f32>()?;
            let s = &mut p.seq;
            if s.echoed.is_empty() {
                s.echoed.push(TokenLogprob {
                    id: s.job.prompt[0],
                    logprob: None,
                    top: Vec::new(),
                });
            }
            let top = s.job.logprobs.unwrap_or(0);
            for (i, row) in rows.iter().enumerate() {
                if let Some(&next) = s.job.prompt.get(p.done + i + 1) {
                    lever_generate::check_logits(model, row, p.done + i)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    s.echoed.push(TokenLogprob::of(row, next, top));
                }
            }
            return Ok((end == total).then(|| rows.last().cloned().unwrap_or_default()));
        }
        if end < total {
            // Only the keys and values are needed from a chunk before the last.
            dec.hidden(&input, &mut p.seq.cache)?;
            return Ok(None);
        }
        let logits = dec.forward(&input, &mut p.seq.cache, lever_model::Logits::Last)?;
        Ok(Some(logits.squeeze(0)?.to_vec1::<f32>()?))
    })();
    let logits = match out {
        Ok(Some(l)) => l,
        Ok(None) => {
            p.done = end;
            return Chunked::More(p);
        }
        Err(e) => {
            let _ = p.seq.job.events.send(Event::Failed(e.to_string()));
            return Chunked::Ended;
        }
    };
    let mut s = p.seq;
    s.history = s.job.prompt.clone();
    prompts.insert(
        s.job.variant,
        s.history.clone(),
        s.cache.clone(),
        kv_bytes_per_token(model),
    );
    if s.job.echo {
        let echoed = std::mem::take(&mut s.echoed);
        if s.job.events.send(Event::Prompt(echoed)).is_err() {
            return Chunked::Ended;
        }
    }
    if s.job.max_tokens == 0 {
        // Only the prompt's log-probabilities were asked for (echo, max_tokens 0).
        let _ = s.job.events.send(Event::Done {
            finish: FinishReason::Length,
            prompt_tokens: s.job.prompt.len(),
            completion_tokens: 0,
        });
        return Chunked::Ended;
    }
    if advance(model, &mut s, &logits) {
        Chunked::Decoding(s)
    } else {
        Chunked::Ended
    }
}

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
    // A model whose weights hold NaN or infinity: the request fails with that, never a
    // token drawn from garbage.
    if let Err(e) = lever_generate::check_logits(model, logits, s.cache.len()) {
        let _ = s.job.events.send(Event::Failed(e.to_string()));
        return false;
    }
    let raw_logits = logits;
    let mut masked = Vec::new();
    let logits = match &mut s.job.guide {
        None => logits,
        Some(g) => {
            masked.extend_from_slice(logits);
            if let Err(e) = g.mask(&mut masked) {
                let _ = s.job.events.send(Event::Failed(e.to_string()));
                return false;
            }
            &masked
        }
    };
    let next = s.sampler.sample(logits, &s.history);
    if let Some(g) = &mut s.job.guide
        && let Err(e) = g.commit(next)
    {
        let _ = s.job.events.send(Event::Failed(e.to_string()));
        return false;
    }
    if let Some(top) = s.job.logprobs {
        // The model's own distribution: the logits before the constraint's mask.
        let raw = raw_logits;
        if s.job
            .events
            .send(Event::Token(TokenLogprob::of(raw, next, top)))
            .is_err()
        {
            return false;
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_are_log_softmax_with_the_most_probable_first() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let t = TokenLogprob::of(&logits, 4, 3);
        assert!((t.logprob.unwrap() as f64 - (0.5 - lse)).abs() < 1e-6);
        // Ties keep index order; then the next most probable.
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 2, 0]);
        assert!((t.top[2].1 as f64 - (1.0 - lse)).abs() < 1e-6);
        let total: f64 = logits.iter().map(|&x| (x as f64 - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(TokenLogprob::of(&logits, 0, 0).top.is_empty());
        assert_eq!(TokenLogprob::of(&logits, 0, 9).top.len(), 5);
    }

    #[test]
    fn prefill_chunks_cover_the_prompt_and_none_is_short() {
        for total in [1, 63, 64, 255, 256, 300, 319, 320, 321, 512, 7000] {
            for chunk in [64, 100, 256] {
                let (mut done, mut sizes) = (0, Vec::new());
                while done < total {
                    let end = chunk_end(done, total, chunk);
                    sizes.push(end - done);
                    done = end;
                }
                assert_eq!(sizes.iter().sum::<usize>(), total);
                assert!(sizes.iter().all(|&n| n < chunk + MIN_PREFILL_CHUNK));
                if total >= MIN_PREFILL_CHUNK {
                    assert!(
                        sizes.iter().all(|&n| n >= MIN_PREFILL_CHUNK),
                        "{total} by {chunk}: {sizes:?}"
                    );
                }
                if total >= chunk + MIN_PREFILL_CHUNK {
                    assert!(sizes.len() >= 2, "{total} by {chunk}: {sizes:?}");
                }
            }
        }
    }
}
