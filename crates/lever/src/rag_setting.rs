//! Retrieval in front of an evaluation's items, shared by `lever eval` (a task file's `[rag]`
//! section, `--rag`) and `lever ladder` (its RAG rungs): the passages found for each item put
//! in front of its prompt (concat: one prompt, "Passages:\n[1] …"), or each read on its own and
//! the answer marginalized over them (RAG-Sequence, RAG-Token: [`LatentGenerator`]). Lewis et
//! al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks".

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use lever_eval::task::Example;
use lever_rag::marginal::Formulation;

/// How the passages are found and read.
pub struct Spec<'a> {
    pub k: usize,
    /// dense, bm25 or hybrid; RAG-Sequence and RAG-Token always search dense, whose inner
    /// products give p(z|x).
    pub mode: &'a str,
    /// The task template whose text is the search query (default: the default template).
    pub query_template: Option<&'a str>,
    /// RAG-Sequence or RAG-Token; none for concat.
    pub latent: Option<Formulation>,
}

/// What retrieval found, item by item.
pub struct Found {
    /// The passages of each item, best first.
    pub passages: Vec<Vec<String>>,
    /// RAG-Sequence/RAG-Token: each item's prompts, passages and p(z|x); empty for concat.
    pub latent: Vec<LatentItem>,
    pub ms_per_query: f64,
}

/// RAG-Sequence or RAG-Token for "seq" or "token"; none for "concat" (and "closed").
pub fn formulation(name: &str) -> Option<Formulation> {
    match name {
        "seq" => Some(Formulation::Sequence),
        "token" => Some(Formulation::Token),
        _ => None,
    }
}

/// Searches `index_dir` (with lever's default embedder, which built it) for every example and
/// either writes the passages in front of its prompts (concat) or keeps them for a
/// [`LatentGenerator`]. `what` names the setting in errors ("rung `rag`").
pub fn retrieve(
    index_dir: &Path,
    examples: &mut [Example],
    spec: &Spec<'_>,
    what: &str,
) -> Result<Found> {
    let index = lever_rag::Index::open(index_dir)?;
    let embed = lever_rag::embedder::BertEmbed::new(crate::embed::load_encoder(
        lever_model::registry::DEFAULT_EMBEDDER,
        32,
    )?)?;
    index.check_embedder(&embed)?;
    let mode: lever_rag::Mode = match spec.latent {
        Some(_) => lever_rag::Mode::Dense,
        None => spec.mode.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let query_t = spec
        .query_template
        .unwrap_or(lever_eval::task::DEFAULT_TEMPLATE);
    let mut retriever = lever_rag::Retriever::new(&index, lever_rag::DenseIndex::Auto);
    let started = Instant::now();
    let mut found = Found {
        passages: Vec::new(),
        latent: Vec::new(),
        ms_per_query: 0.0,
    };
    for e in examples.iter_mut() {
        let query = e.prompt(query_t).to_string();
        let hits = retriever.search(&embed, &query, mode, spec.k)?;
        let mut passages = Vec::new();
        let mut scores = Vec::new();
        for h in hits {
            if let Some(c) = index.chunk(h.id as i64)? {
                passages.push(c.text);
                scores.push(h.score);
            }
        }
        if spec.latent.is_some() {
            if passages.is_empty() {
                bail!(
                    "{what}: no passage of {} matches item {}",
                    index_dir.display(),
                    e.origin
                );
            }
            found.latent.push(LatentItem {
                prompts: e.prompts.values().cloned().collect(),
                doc_log_probs: lever_rag::marginal::doc_log_probs(
                    &scores,
                    lever_rag::marginal::DEFAULT_TEMPERATURE,
                )?,
                passages: passages.clone(),
            });
            found.passages.push(passages);
            continue;
        }
        let context: String = passages
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[{}] {}\n", i + 1, p.trim()))
            .collect();
        for p in e.prompts.values_mut() {
            *p = format!("Passages:\n{context}\n{p}");
        }
        found.passages.push(passages);
    }
    found.ms_per_query = started.elapsed().as_secs_f64() * 1e3 / examples.len().max(1) as f64;
    Ok(found)
}

/// One item of a RAG-Sequence or RAG-Token evaluation: its prompts (as the task renders them,
/// one per template), its passages and log p(z|x).
pub struct LatentItem {
    prompts: Vec<String>,
    passages: Vec<String>,
    doc_log_probs: Vec<f64>,
}

/// The evaluator's generator for RAG-Sequence or RAG-Token: it finds the item whose prompt ends the
/// request's (the last user turn, or the block text), writes one prompt per passage with that
/// passage in front of the item's prompt as concat puts its passages ("Passages:\n[1]
/// …"), and decodes the answer marginalized over them ([`lever_rag::latent::Contexts`]).
pub struct LatentGenerator {
    model: Arc<lever_model::Model>,
    formulation: lever_rag::marginal::Formulation,
    items: Vec<LatentItem>,
}

impl LatentGenerator {
    pub fn new(
        model: Arc<lever_model::Model>,
        formulation: lever_rag::marginal::Formulation,
        items: Vec<LatentItem>,
    ) -> Self {
        LatentGenerator {
            model,
            formulation,
            items,
        }
    }

    /// The item whose prompt is the longest suffix of `text`, and that prompt.
    fn item_of(&self, text: &str) -> Option<(&LatentItem, usize)> {
        self.items
            .iter()
            .flat_map(|it| {
                it.prompts
                    .iter()
                    .filter(|p| text.ends_with(p.as_str()))
                    .map(move |p| (it, p.len()))
            })
            .max_by_key(|(_, n)| *n)
    }
}

impl lever_generate::Generator for LatentGenerator {
    fn source(&self) -> lever_generate::Source {
        lever_generate::Source::Model(self.model.info.path.clone())
    }

    fn can_chat(&self) -> bool {
        self.model.chat_template.is_some()
    }

    fn generate(
        &mut self,
        req: &lever_generate::Request<'_>,
        _on_text: &mut dyn FnMut(&str) -> lever_generate::Flow,
    ) -> lever_generate::Result<lever_generate::Output> {
        use lever_generate::{Error as GenError, Prompt};
        let model = &*self.model;
        let last = match &req.prompt {
            Prompt::Chat(m) => m.last().map(|m| m.content.as_str()).unwrap_or_default(),
            Prompt::Text(t) => t,
        };
        let Some((item, len)) = self.item_of(last) else {
            return Err(GenError::Invalid(
                "RAG-Sequence/RAG-Token was asked a prompt that is none of its items'".into(),
            ));
        };
        let at = last.len() - len;
        let start = std::time::Instant::now();
        let prompts = item
            .passages
            .iter()
            .map(|p| {
                let text = format!(
                    "{}Passages:\n[1] {}\n\n{}",
                    &last[..at],
                    p.trim(),
                    &last[at..]
                );
                match &req.prompt {
                    Prompt::Chat(m) => {
                        let mut m = m.to_vec();
                        if let Some(l) = m.last_mut() {
                            l.content = text;
                        }
                        lever_generate::local::prompt_ids(model, &Prompt::Chat(&m))
                    }
                    Prompt::Text(_) => {
                        lever_generate::local::prompt_ids(model, &Prompt::Text(&text))
                    }
                }
            })
            .collect::<lever_generate::Result<Vec<_>>>()?;
        let rag = |e: lever_rag::Error| GenError::Invalid(e.to_string());
        let mut ctx = lever_rag::latent::Contexts::new(model, prompts, item.doc_log_probs.clone())
            .map_err(rag)?;
        let prompt_ms = start.elapsed().as_secs_f64() * 1e3;
        let sampling = req.sampling.resolve(&model.info.generation);
        let d = ctx
            .decode(
                self.formulation,
                &lever_rag::latent::DecodeOptions {
                    beam: 1,
                    max_tokens: req.max_tokens,
                    stop: req.stop,
                    sampling: sampling.clone(),
                    seq_decoding: lever_rag::latent::SeqDecoding::Thorough,
                },
            )
            .map_err(rag)?;
        Ok(lever_generate::Output {
            valid: None,
            text: d.text,
            finish_reason: lever_generate::Finish::Local(d.finish),
            prompt_tokens: Some(ctx.prompt_tokens()),
            completion_tokens: Some(d.tokens.len()),
            timings: Some(lever_generate::Timings {
                prompt_ms,
                generation_ms: start.elapsed().as_secs_f64() * 1e3 - prompt_ms,
                mask: None,
            }),
            sampling: Some(lever_generate::UsedSampling {
                params: sampling,
                defaults_from: None,
            }),
        })
    }
}
