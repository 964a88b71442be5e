//! `lever index …`, `lever rag ask` and `lever eval retrieval`: rung 3 from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lever_generate::Flow;
use lever_rag::embedder::BertEmbed;
use lever_rag::latent::{self, DecodeOptions, SeqDecoding};
use lever_rag::marginal::Formulation;
use lever_rag::prompt::Passage;
use lever_rag::qa::{self, Setting};
use lever_rag::{
    AddOptions, AnswerOptions, ChunkMode, ChunkSettings, DenseIndex, Embed, Event, Index, Mode,
    Retriever, Step,
};
use serde_json::json;

use crate::Usage;
use crate::cli::{
    EvalCommand, EvalRetrievalArgs, IndexArg, IndexCommand, LatentArgs, RagAskArgs, RagCommand,
    RagEvalArgs, SearchArgs,
};

fn embedder(reference: &str) -> Result<BertEmbed> {
    Ok(BertEmbed::new(crate::embed::load_encoder(reference, 32)?)?)
}

/// An existing index, or a clear error saying how to make one.
pub(crate) fn open(dir: &Path) -> Result<Index> {
    if !Index::exists(dir) {
        bail!(
            "{}: no index here; create one with `lever index add PATH… --index {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(Index::open(dir)?)
}

/// A path as the user would type it: relative to the working directory when inside it.
fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    cwd.and_then(|c| path.strip_prefix(c).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

pub fn index(cmd: IndexCommand) -> Result<()> {
    match cmd {
        IndexCommand::Add {
            paths,
            index,
            chunking,
            chunk_size,
            overlap,
            json,
        } => add(
            &paths,
            &index,
            chunking.as_deref(),
            chunk_size,
            overlap,
            json,
        ),
        IndexCommand::Rm { paths, index } => {
            let mut idx = open(&index)?;
            let mut missing = Vec::new();
            for p in &paths {
                let r = idx.remove(p)?;
                if r.sources == 0 {
                    missing.push(p.display().to_string());
                } else {
                    println!(
                        "removed {}: {} source(s), {} chunk(s)",
                        p.display(),
                        r.sources,
                        r.chunks
                    );
                }
            }
            if !missing.is_empty() {
                bail!(
                    "{}: not in the index {} (see `lever index stats`; paths are matched as `index add` stored them)",
                    missing.join(", "),
                    index.display()
                );
            }
            Ok(())
        }
        IndexCommand::Stats { index, json } => {
            let s = open(&index)?.stats()?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("index       {}", index.display());
                println!("sources     {}", s.sources);
                if s.incomplete_sources > 0 {
                    println!(
                        "incomplete  {} (an interrupted add; the next add redoes them)",
                        s.incomplete_sources
                    );
                }
                println!("chunks      {}", s.chunks);
                println!("vectors     {} × {}", s.vectors, s.dim);
                println!("embedder    {}", s.embedder);
                println!(
                    "chunking    {} (size {}, overlap {})",
                    serde_json::to_value(s.chunking.mode)?
                        .as_str()
                        .unwrap_or("?"),
                    s.chunking.size,
                    s.chunking.overlap
                );
                println!("on disk     {:.1} MB", s.db_bytes as f64 / 1e6);
            }
            Ok(())
        }
        IndexCommand::Search(a) => search(a),
    }
}

fn add(
    paths: &[PathBuf],
    arg: &IndexArg,
    chunking: Option<&str>,
    chunk_size: Option<usize>,
    overlap: Option<usize>,
    json: bool,
) -> Result<()> {
    // Every path named on the command line must be there and readable before anything is
    // created or changed.
    for p in paths {
        let readable = match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).map(|_| ()),
            Ok(_) => std::fs::File::open(p).map(|_| ()),
            Err(e) => Err(e),
        };
        readable.with_context(|| format!("{}: cannot be read", p.display()))?;
    }
    let embed = embedder(&arg.embedder)?;
    let mut index = if Index::exists(&arg.index) {
        let index = Index::open(&arg.index)?;
        index.check_embedder(&embed)?;
        check_chunking(&index, chunking, chunk_size, overlap)?;
        index
    } else {
        // Room for [CLS] and [SEP] under the encoder's limit.
        let limit = embed.encoder().max_tokens().saturating_sub(2).max(1);
        let size = chunk_size.unwrap_or(224.min(limit));
        if size > limit {
            bail!("--chunk-size {size}: the encoder reads at most {limit} tokens per chunk");
        }
        let settings = ChunkSettings {
            mode: if chunking == Some("tokens") {
                ChunkMode::Tokens
            } else {
                ChunkMode::Structure
            },
            size,
            overlap: overlap.unwrap_or(32),
        };
        Index::create(&arg.index, &embed, &settings)?
    };
    let bar = crate::progress::bar(
        0,
        "{msg} [{bar:30}] {pos}/{len} files, {per_sec}, eta {eta}",
        "indexing",
    );
    let start = Instant::now();
    let mut on_event = |e: Event<'_>| match e {
        Event::Walked { files, .. } => bar.set_length(files as u64),
        Event::Recovered { sources } => bar.println(format!(
            "recovering {sources} file(s) an interrupted add left incomplete"
        )),
        Event::File { .. } => {}
        Event::Warning(w) => bar.println(format!("warning: {w}")),
        Event::Progress(p) => {
            bar.set_position(p.files_done as u64);
            bar.set_message(format!("indexing ({} chunks)", p.chunks));
        }
    };
    let report = index.add(paths, &embed, &AddOptions::default(), &mut on_event)?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let stats = index.stats()?;
    if json {
        println!(
            "{}",
            json!({
                "added": report.added, "updated": report.updated, "unchanged": report.unchanged,
                "skipped": report.skipped_by_kind(), "pruned": report.pruned,
                "skipped_files": report.skipped.iter()
                    .map(|(p, why)| json!({"path": shown(p), "kind": why.kind(), "reason": why.to_string()}))
                    .collect::<Vec<_>>(),
                "recovered": report.recovered, "chunks_written": report.chunks,
                "warnings": report.warnings.len(), "seconds": secs,
                "index": {"sources": stats.sources, "chunks": stats.chunks},
            })
        );
    } else {
        let done = report.added + report.updated;
        println!(
            "{}: {} added, {} updated, {} unchanged, {} skipped, {} removed; {} chunks written in {secs:.1} s ({:.1} files/s); the index holds {} sources, {} chunks",
            arg.index.display(),
            report.added,
            report.updated,
            report.unchanged,
            report.skipped.len(),
            report.pruned,
            report.chunks,
            done as f64 / secs.max(1e-9),
            stats.sources,
            stats.chunks
        );
        for (path, why) in &report.skipped {
            println!("  skipped {}: {why}", shown(path));
        }
        if !report.warnings.is_empty() {
            println!("  warnings: {}", report.warnings.len());
        }
    }
    if embed.truncated() > 0 {
        eprintln!(
            "warning: {} chunk(s) were longer than the encoder's {} tokens and were cut to it",
            embed.truncated(),
            embed.encoder().max_tokens()
        );
    }
    Ok(())
}

/// `--chunking`, `--chunk-size` and `--overlap` are fixed when an index is created; asking an
/// existing index for others is refused by name rather than silently ignored.
fn check_chunking(
    index: &Index,
    chunking: Option<&str>,
    chunk_size: Option<usize>,
    overlap: Option<usize>,
) -> Result<()> {
    let have = index.stats()?.chunking;
    let mode = serde_json::to_value(have.mode)?;
    let mode = mode.as_str().unwrap_or("?");
    let differs = |flag: &str, asked: String, has: String| -> Result<()> {
        if asked != has {
            bail!(
                "{}: {flag} {asked}, but this index was built with {flag} {has} (settings are fixed when an index is created; use another --index, or leave {flag} out)",
                index.dir().display()
            );
        }
        Ok(())
    };
    if let Some(c) = chunking {
        differs("--chunking", c.to_string(), mode.to_string())?;
    }
    if let Some(size) = chunk_size {
        differs("--chunk-size", size.to_string(), have.size.to_string())?;
    }
    if let Some(o) = overlap {
        differs("--overlap", o.to_string(), have.overlap.to_string())?;
    }
    Ok(())
}

fn dense_index(s: &str) -> DenseIndex {
    match s {
        "exact" => DenseIndex::Exact,
        "hnsw" => DenseIndex::Hnsw,
        _ => DenseIndex::Auto,
    }
}

/// The file beside a query encoder's weights that names the document encoder it was trained
/// for (`lever rag train` writes it).
const PAIRING_FILE: &str = "lever_query_encoder.json";

/// The encoder that embeds queries: the index's own (`--embedder`), or a query encoder folder
/// that `retriever` accepts for the index's vectors (refused by name when they cannot be
/// compared).
enum Query {
    Index(BertEmbed),
    Trained(BertEmbed),
}

impl Query {
    fn load(index_embedder: &str, query_encoder: Option<&Path>) -> Result<Query> {
        match query_encoder {
            None => Ok(Query::Index(embedder(index_embedder)?)),
            Some(dir) => {
                if !dir.join("config.json").is_file() {
                    bail!(
                        "--query-encoder {}: not a sentence-transformers folder (no config.json)",
                        dir.display()
                    );
                }
                let reference = dir.to_str().with_context(|| {
                    format!("--query-encoder {}: not a UTF-8 path", dir.display())
                })?;
                Ok(Query::Trained(embedder(reference)?))
            }
        }
    }

    fn embed(&self) -> &BertEmbed {
        match self {
            Query::Index(e) | Query::Trained(e) => e,
        }
    }

    /// A retriever over `index` that takes this encoder's queries.
    fn retriever<'a>(
        &self,
        index: &'a Index,
        dense: DenseIndex,
        query_encoder: Option<&Path>,
    ) -> Result<Retriever<'a>> {
        let mut r = Retriever::new(index, dense);
        if let (Query::Trained(e), Some(dir)) = (self, query_encoder) {
            let pairing = dir.join(PAIRING_FILE);
            let paired = if pairing.is_file() {
                let v: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&pairing)
                        .with_context(|| pairing.display().to_string())?,
                )
                .with_context(|| format!("{}: not JSON", pairing.display()))?;
                Some(
                    v.get("document_encoder")
                        .and_then(|d| d.as_str())
                        .with_context(|| {
                            format!("{}: no string `document_encoder`", pairing.display())
                        })?
                        .to_string(),
                )
            } else {
                None
            };
            r.accept_query_encoder(e, paired.as_deref())?;
        }
        Ok(r)
    }
}

/// The `k` best chunks as passages, with their chunk ids; paths as the user would type them.
fn retrieve(
    retriever: &mut Retriever<'_>,
    embed: &dyn Embed,
    query: &str,
    mode: Mode,
    k: usize,
) -> Result<Vec<(i64, Passage)>> {
    let cwd = std::env::current_dir().ok();
    Ok(lever_rag::answer::passages_with(
        retriever,
        embed,
        query,
        mode,
        k,
        cwd.as_deref(),
    )?)
}

fn search(a: SearchArgs) -> Result<()> {
    if a.query.trim().is_empty() {
        bail!("the query is empty");
    }
    let index = open(&a.index.index)?;
    let query = Query::load(&a.index.embedder, a.query_encoder.as_deref())?;
    let mut retriever = query.retriever(
        &index,
        dense_index(&a.dense_index),
        a.query_encoder.as_deref(),
    )?;
    let start = Instant::now();
    let found = retrieve(&mut retriever, query.embed(), &a.query, a.mode, a.k)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if a.json {
        let results: Vec<_> = found
            .iter()
            .enumerate()
            .map(|(i, (id, p))| {
                json!({
                    "rank": i + 1, "score": p.score, "chunk_id": id, "doc_id": p.doc_id,
                    "path": p.path, "line_start": p.line_start, "line_end": p.line_end,
                    "headings": p.headings, "text": p.text,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"query": a.query, "mode": a.mode.name(), "results": results})
        );
    } else {
        for (i, (_, p)) in found.iter().enumerate() {
            let preview: String = p.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let preview: String = preview.chars().take(160).collect();
            println!(
                "{:>2}. {:.4}  {}\n    {preview}",
                i + 1,
                p.score,
                p.citation()
            );
        }
        eprintln!("{} results ({}, {ms:.0} ms)", found.len(), a.mode.name());
    }
    Ok(())
}

pub fn rag(cmd: RagCommand) -> Result<()> {
    match cmd {
        RagCommand::Ask(a) => ask(a),
        RagCommand::Eval(a) => rag_eval(a),
        RagCommand::Train(a) => crate::rag_train::run(a),
    }
}

/// --beam is for the latent formulations, --decoding for RAG-Sequence only.
fn check_latent_flags(formulation: &str, a: &LatentArgs) -> Result<()> {
    let latent = formulation == "seq" || formulation == "token";
    if a.beam > 1 && !latent {
        return Err(Usage(format!(
            "--beam applies to --formulation seq or token, not {formulation}"
        ))
        .into());
    }
    if a.decoding != "thorough" && formulation != "seq" {
        return Err(Usage(format!(
            "--decoding applies to --formulation seq, not {formulation}"
        ))
        .into());
    }
    Ok(())
}

fn seq_decoding(a: &LatentArgs) -> SeqDecoding {
    if a.decoding == "fast" {
        SeqDecoding::Fast
    } else {
        SeqDecoding::Thorough
    }
}

fn ask(a: RagAskArgs) -> Result<()> {
    if a.question.trim().is_empty() {
        bail!("the question is empty");
    }
    let formulation = match a.formulation.as_str() {
        "seq" => Some(Formulation::Sequence),
        "token" => Some(Formulation::Token),
        _ => None,
    };
    if let Some(f) = formulation {
        if let Some(mode) = a.mode.filter(|m| *m != Mode::Dense) {
            return Err(Usage(format!(
                "--formulation {}: --mode {} has no probabilities for the passages; RAG-Sequence and RAG-Token take p(z|x) from dense search's inner products (leave --mode out, or use dense)",
                f.name(),
                mode.name()
            ))
            .into());
        }
        if a.backend.backend.is_some() {
            return Err(Usage(format!(
                "--formulation {}: needs the model's logits for every passage, which a --backend server does not give; leave --backend out",
                f.name()
            ))
            .into());
        }
    }
    check_latent_flags(&a.formulation, &a.latent)?;
    let index = open(&a.index.index)?;
    // The latent formulations normalize p(z|x) over exactly k passages, so a k the index
    // cannot fill is refused; one-prompt RAG answers from the passages there are, as before.
    if formulation.is_some() {
        latent::check_k(&index, a.k)?;
    } else {
        latent::check_not_empty(&index)?;
    }
    let query = Query::load(&a.index.embedder, a.latent.query_encoder.as_deref())?;
    let mut retriever =
        query.retriever(&index, DenseIndex::Auto, a.latent.query_encoder.as_deref())?;
    // RAG-Sequence and RAG-Token step the k passages' contexts as one batch: the packed
    // kernels `lever serve` batches with make the extra sequences nearly free.
    if formulation.is_some() {
        lever_model::qweight::set_packing(true);
    }
    // The local model measures the passages' budget even when a server generates (its
    // tokenizer stands in for the server's).
    let model = Arc::new(crate::load_model(&a.model)?);
    if let Some(f) = formulation {
        return ask_latent(&a, f, &model, &mut retriever, query.embed());
    }
    let mode = a.mode.unwrap_or(Mode::Hybrid);
    let found = retrieve(&mut retriever, query.embed(), &a.question, mode, a.k)?;
    if found.is_empty() {
        return Err(lever_rag::Error::NoMatch {
            path: index.dir().to_path_buf(),
            mode: mode.name(),
        }
        .into());
    }
    let mut generator = crate::generator::resolve(&a.backend, || Ok(model.clone()))?;
    let cwd = std::env::current_dir().ok();
    let opts = AnswerOptions {
        mode,
        k: a.k,
        dense: DenseIndex::Auto,
        context_tokens: a.context_tokens,
        relative_to: cwd.as_deref(),
        max_tokens: a.sampling.max_tokens,
        stop: &a.sampling.stop,
        sampling: a.sampling.sampling(),
    };
    let json_mode = a.json;
    let show_context = a.show_context;
    let answer = lever_rag::answer::answer_from(
        &model,
        generator.as_mut(),
        &a.question,
        found.into_iter().map(|(_, p)| p).collect(),
        &opts,
        &mut |step| match step {
            Step::Prompt {
                budget,
                dropped,
                text,
            } => {
                for p in dropped {
                    eprintln!(
                        "dropped a passage that does not fit the {budget}-token budget: {}",
                        p.citation()
                    );
                }
                if show_context {
                    eprintln!("----- prompt -----\n{text}\n------------------");
                }
                Flow::Continue
            }
            Step::Text(_) if json_mode => Flow::Continue,
            Step::Text(piece) => crate::generator::print_text(piece),
        },
    )?;
    if json_mode {
        let passages: Vec<_> = answer
            .passages
            .iter()
            .enumerate()
            .map(|(i, p)| json!({"n": i + 1, "source": answer.source(i + 1), "score": p.score, "text": p.text}))
            .collect();
        let dropped: Vec<_> = answer.dropped.iter().map(|p| p.citation()).collect();
        let citations: Vec<_> = answer
            .citations
            .iter()
            .map(|&n| json!({"n": n, "source": answer.source(n)}))
            .collect();
        println!(
            "{}",
            json!({
                "answer": answer.text, "citations": citations,
                "unknown_citations": answer.unknown_citations,
                "passages": passages, "dropped": dropped, "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            })
        );
        return Ok(());
    }
    println!();
    if answer.citations.is_empty() {
        println!("\nSources (none cited; the passages given):");
        for n in 1..=answer.passages.len() {
            println!("  [{n}] {}", answer.source(n));
        }
    } else {
        println!("\nSources:");
        for &n in &answer.citations {
            println!("  [{n}] {}", answer.source(n));
        }
    }
    if !answer.unknown_citations.is_empty() {
        let unknown: Vec<String> = answer
            .unknown_citations
            .iter()
            .map(|n| format!("[{n}]"))
            .collect();
        println!(
            "  warning: the answer cites {}, which no given passage has ({} were given)",
            unknown.join(", "),
            answer.passages.len()
        );
    }
    Ok(())
}

/// `rag ask --formulation seq|token`: every passage read on its own, the answer marginalized
/// over them; prints the answer, then each passage with p(z|x) and p(z|x,y).
fn ask_latent(
    a: &RagAskArgs,
    f: Formulation,
    model: &lever_model::Model,
    retriever: &mut Retriever<'_>,
    query: &dyn Embed,
) -> Result<()> {
    let cwd = std::env::current_dir().ok();
    let r = latent::retrieve(
        retriever,
        query,
        &a.question,
        a.k,
        a.latent.doc_temperature,
        cwd.as_deref(),
    )?;
    let start = Instant::now();
    let mut ctx = latent::contexts(model, &a.question, &r)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    if a.show_context {
        for (n, (_, p)) in r.passages.iter().enumerate() {
            let user = lever_rag::prompt::user_turn(&a.question, &[p.block(1)]);
            eprintln!(
                "----- prompt {} of {} -----\n{user}",
                n + 1,
                r.passages.len()
            );
        }
        eprintln!("------------------");
    }
    let sampling = a.sampling.sampling().resolve(&model.info.generation);
    let decode_start = Instant::now();
    let d = ctx.decode(
        f,
        &DecodeOptions {
            beam: a.latent.beam,
            max_tokens: a.sampling.max_tokens,
            stop: &a.sampling.stop,
            sampling,
            seq_decoding: seq_decoding(&a.latent),
        },
    )?;
    let decode_secs = decode_start.elapsed().as_secs_f64();
    let prior = r.doc_probs();
    if a.json {
        let passages: Vec<_> = r
            .passages
            .iter()
            .enumerate()
            .map(|(i, (_, p))| {
                json!({
                    "n": i + 1, "source": p.citation(), "doc_id": p.doc_id, "score": p.score,
                    "p": prior[i], "posterior": d.posterior[i], "text": p.text,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "answer": d.text, "formulation": f.name(), "log_likelihood": d.log_likelihood,
                "finish_reason": d.finish, "passages": passages,
                "prompt_tokens": ctx.prompt_tokens(), "completion_tokens": d.tokens.len(),
                "hypotheses": d.hypotheses, "decode_rows": d.decode_rows,
                "prefill_seconds": prefill_secs, "decode_seconds": decode_secs,
            })
        );
        return Ok(());
    }
    println!("{}", d.text);
    println!(
        "\nPassages (p(z|x) from retrieval, p(z|x,y) given this answer; {} log p(y|x) = {:.3}):",
        match f {
            Formulation::Sequence => "RAG-Sequence",
            Formulation::Token => "RAG-Token",
        },
        d.log_likelihood
    );
    for (i, (_, p)) in r.passages.iter().enumerate() {
        println!(
            "  [{}] p {:.3}  posterior {:.3}  {}",
            i + 1,
            prior[i],
            d.posterior[i],
            p.citation()
        );
    }
    Ok(())
}

/// An f32 setting as typed (0.05, not 0.05000000074505806).
fn shown_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// `rag eval`: every question answered in one setting, then EM/F1 and recall with intervals.
fn rag_eval(a: RagEvalArgs) -> Result<()> {
    let setting: Setting = a.formulation.parse().map_err(anyhow::Error::msg)?;
    check_latent_flags(&a.formulation, &a.latent)?;
    let mut questions = qa::read_questions(&a.questions)?;
    if let Some(n) = a.limit {
        questions.truncate(n);
    }
    let index = open(&a.index.index)?;
    latent::check_k(&index, a.k)?;
    let query = Query::load(&a.index.embedder, a.latent.query_encoder.as_deref())?;
    let mut retriever =
        query.retriever(&index, DenseIndex::Auto, a.latent.query_encoder.as_deref())?;
    if matches!(setting, Setting::Latent(_)) {
        lever_model::qweight::set_packing(true);
    }
    let model = Arc::new(crate::load_model(&a.model)?);
    let mut generator = lever_generate::Local::new(model.clone());
    let cwd = std::env::current_dir().ok();
    let opts = qa::QaOptions {
        setting,
        k: a.k,
        temperature: a.latent.doc_temperature,
        beam: a.latent.beam,
        seq_decoding: seq_decoding(&a.latent),
        max_tokens: a.max_tokens,
        stop: &[],
        sampling: lever_generate::Sampling {
            temperature: Some(0.0),
            unset: lever_generate::Unset::Off,
            ..Default::default()
        },
        relative_to: cwd.as_deref(),
    };
    let mut predictions = match &a.predictions {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| p.display().to_string())?,
        )),
        None => None,
    };
    let bar = crate::progress::bar(
        questions.len() as u64,
        "{msg} [{bar:30}] {pos}/{len} questions, {per_sec}, eta {eta}",
        &format!("rag eval ({})", setting.name()),
    );
    let start = Instant::now();
    let mut outcomes = Vec::with_capacity(questions.len());
    let mut judged_without_ids = 0;
    for q in &questions {
        let o = qa::run_question(
            &model,
            &mut generator,
            &mut retriever,
            query.embed(),
            q,
            &opts,
        )
        .with_context(|| format!("{}: question {}", a.questions.display(), q.id))?;
        if o.hits.is_some() && o.retrieved.iter().all(Option::is_none) {
            judged_without_ids += 1;
        }
        if let Some(w) = predictions.as_mut() {
            use std::io::Write;
            writeln!(w, "{}", serde_json::to_string(&o)?)?;
        }
        outcomes.push(o);
        let em = outcomes.iter().map(|o| o.em).sum::<f64>() / outcomes.len() as f64;
        bar.set_message(format!("rag eval ({}) EM {:.3}", setting.name(), em));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(mut w) = predictions {
        use std::io::Write;
        w.flush()?;
    }
    if judged_without_ids == outcomes.len() && !outcomes.is_empty() {
        bail!(
            "{}: the questions name gold_ids, but no retrieved passage has a document id: rebuild the index from a JSONL corpus with `_id`s (lever keeps them since this version)",
            index.dir().display()
        );
    }
    let secs = start.elapsed().as_secs_f64();
    let s = qa::summarize(&outcomes);
    let ci = |e: &qa::Estimate| e.ci95.map(|(lo, hi)| json!([lo, hi]));
    let recall = |d: usize| s.recall[d].map(|e| e.mean);
    let recall_ci = |d: usize| s.recall[d].as_ref().and_then(ci);
    if a.json {
        println!(
            "{}",
            json!({
                "n": s.n, "em": s.em.mean, "f1": s.f1.mean,
                "recall@1": recall(0), "recall@5": recall(1), "recall@20": recall(2),
                "em_ci95": ci(&s.em), "f1_ci95": ci(&s.f1),
                "recall@1_ci95": recall_ci(0), "recall@5_ci95": recall_ci(1),
                "recall@20_ci95": recall_ci(2),
                "judged": s.judged, "formulation": setting.name(), "k": a.k,
                "doc_temperature": shown_f32(a.latent.doc_temperature), "beam": a.latent.beam,
                "decoding": a.latent.decoding, "max_tokens": a.max_tokens,
                "seconds": secs, "seconds_per_question": secs / s.n.max(1) as f64,
            })
        );
    } else {
        let pct = |x: f64| format!("{:.1}", 100.0 * x);
        let with_ci = |e: &qa::Estimate| match e.ci95 {
            Some((lo, hi)) => format!("{} [{}, {}]", pct(e.mean), pct(lo), pct(hi)),
            None => pct(e.mean),
        };
        let r = |d: usize| s.recall[d].as_ref().map_or("-".to_string(), with_ci);
        println!(
            "{} ({} questions, {}, k {}; 95% intervals)",
            a.questions.display(),
            s.n,
            setting.name(),
            a.k
        );
        println!("| EM | F1 | recall@1 | recall@5 | recall@20 |");
        println!("|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} |",
            with_ci(&s.em),
            with_ci(&s.f1),
            r(0),
            r(1),
            r(2)
        );
        eprintln!("{secs:.0} s ({:.1} s a question)", secs / s.n.max(1) as f64);
    }
    Ok(())
}

pub fn eval(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Retrieval(a) => eval_retrieval(a),
        EvalCommand::Mc(a) => crate::eval::mc(a),
    }
}

fn eval_retrieval(a: EvalRetrievalArgs) -> Result<()> {
    let modes: Vec<Mode> = if a.mode == "all" {
        Mode::ALL.to_vec()
    } else {
        vec![a.mode.parse().map_err(anyhow::Error::msg)?]
    };
    let beir = lever_rag::beir::load(&a.dir, &a.split)?;
    if beir.queries.is_empty() {
        bail!(
            "{}: no judged queries in split `{}`",
            a.dir.display(),
            a.split
        );
    }
    eprintln!(
        "{}: {} documents, {} judged queries ({} split)",
        a.dir.display(),
        beir.corpus.len(),
        beir.queries.len(),
        a.split
    );
    let needs_dense = modes.iter().any(|m| *m != Mode::Bm25);
    let embed = if needs_dense {
        Some(embedder(&a.embedder)?)
    } else {
        None
    };
    let vectors = match &embed {
        Some(e) => Some(corpus_vectors(&a, &beir, e)?),
        None => None,
    };
    let unused;
    let embed_ref: &dyn lever_rag::Embed = match &embed {
        Some(e) => e,
        None => {
            unused = lever_rag::testing::HashEmbed::new(1);
            &unused
        }
    };
    let results = lever_rag::evaluate::evaluate(&beir, &modes, embed_ref, vectors.as_deref())?;
    if a.json {
        let mut m = serde_json::Map::new();
        for (mode, e) in &results {
            m.insert(
                mode.name().into(),
                json!({"ndcg@10": e.mean.ndcg_10, "recall@100": e.mean.recall_100, "mrr@10": e.mean.mrr_10}),
            );
        }
        println!("{}", serde_json::Value::Object(m));
    } else {
        println!(
            "{} ({} split, {} queries)",
            a.dir.display(),
            a.split,
            beir.queries.len()
        );
        println!("| mode | nDCG@10 | recall@100 | MRR@10 |");
        println!("|---|---|---|---|");
        for (mode, e) in &results {
            println!(
                "| {} | {:.4} | {:.4} | {:.4} |",
                mode.name(),
                e.mean.ndcg_10,
                e.mean.recall_100,
                e.mean.mrr_10
            );
        }
    }
    Ok(())
}

/// The corpus vectors, from `$LEVER_HOME/cache/beir/` when this corpus was embedded with this
/// encoder before (keyed by both), else embedded now (with a progress bar) and cached.
fn corpus_vectors(
    a: &EvalRetrievalArgs,
    beir: &lever_rag::beir::Beir,
    embed: &BertEmbed,
) -> Result<Vec<f32>> {
    use lever_rag::Embed;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(embed.id().as_bytes());
    for d in &beir.corpus {
        h.update(d.id.as_bytes());
        h.update([0]);
        h.update(d.contents().as_bytes());
        h.update([0]);
    }
    let key = format!("{:x}", h.finalize())[..24].to_string();
    let dir = lever_model::registry::lever_home().join("cache/beir");
    let path = dir.join(format!("{key}.f32"));
    let dim = embed.dim();
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == beir.corpus.len() * dim * 4
    {
        eprintln!("corpus vectors: {} (cached)", path.display());
        return Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    let bar = crate::progress::counter(beir.corpus.len() as u64, "embedding the corpus");
    let start = Instant::now();
    let data = lever_rag::evaluate::embed_corpus(beir, embed, a.batch_size, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    eprintln!(
        "embedded {} documents in {:.0} s ({:.1} docs/s); {} were longer than {} tokens and cut to it, as sentence-transformers does",
        beir.corpus.len(),
        start.elapsed().as_secs_f64(),
        beir.corpus.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
        embed.truncated(),
        embed.encoder().max_tokens()
    );
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    crate::write_file(&path, &bytes)?;
    Ok(data)
}
