//! `lever embed`: sentence embeddings of texts with lever's BERT encoder.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lever_model::Encoder;
use lever_model::model::ModelSource;
use serde_json::json;

use crate::cli::EmbedArgs;

/// Resolve an embedder reference (a Hugging Face folder or a registry name, provisioned on
/// first use) and load it.
pub fn load_encoder(reference: &str, batch_size: usize) -> Result<Encoder> {
    let home = lever_model::registry::lever_home();
    let source =
        lever_model::model::resolve(reference, &home, &mut crate::progress::provisioning())?;
    let dir = match source {
        ModelSource::HfFolder(dir) => dir,
        ModelSource::Gguf(p) => bail!(
            "model `{reference}` ({}) is a GGUF generator, not a sentence encoder (a BERT folder with config.json, model.safetensors, tokenizer.json)",
            p.display()
        ),
    };
    Ok(Encoder::load(&dir)?.with_batch_size(batch_size))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(text.lines().map(str::to_string).collect())
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let mut texts = a.texts.clone();
    if let Some(f) = &a.file {
        texts.extend(read_lines(f)?);
    }
    let encoder = load_encoder(&a.model, a.batch_size)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let start = Instant::now();
    let out = encoder.embed(&refs)?;
    let secs = start.elapsed().as_secs_f64();
    let id = encoder.id()?;
    if out.truncated > 0 {
        eprintln!(
            "warning: {} of {} texts were longer than {} tokens and were cut to it",
            out.truncated,
            texts.len(),
            encoder.max_tokens()
        );
    }
    eprintln!(
        "embedded {} texts with {id} in {secs:.2} s ({:.1} texts/s, batch {})",
        texts.len(),
        texts.len() as f64 / secs.max(1e-9),
        encoder.batch_size()
    );
    match print(&a, &texts, &out, &id, encoder.dim()) {
        // A closed pipe (`lever embed … | head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

fn print(
    a: &EmbedArgs,
    texts: &[String],
    out: &lever_model::Embeddings,
    id: &str,
    dim: usize,
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
    if a.json {
        let data: Vec<_> = out
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"index": i, "embedding": v}))
            .collect();
        let doc = json!({"model": id, "dim": dim, "truncated": out.truncated, "data": data});
        writeln!(w, "{doc}")?;
    } else {
        for (i, (v, t)) in out.vectors.iter().zip(texts).enumerate() {
            let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:+.4}")).collect();
            let preview: String = t.chars().take(40).collect();
            let more = if t.chars().count() > 40 { "…" } else { "" };
            writeln!(
                w,
                "{i}\tdim {}\t[{}, …]\t{preview:?}{more}",
                v.len(),
                head.join(", ")
            )?;
        }
    }
    w.flush()
}
