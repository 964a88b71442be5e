//! `lever serve`: load the models, bind, and run lever-server until SIGTERM or Ctrl-C (then
//! at most `--shutdown-timeout` seconds for the requests in flight).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lever_server::{Limits, Served};

use crate::cli::{ModelArg, ServeArgs};

pub fn run(a: ServeArgs) -> Result<()> {
    // Batched steps: the packed kernels make extra sequences nearly free (LEVER_PACKED=0: off).
    lever_model::qweight::set_packing(true);
    let base = crate::load_model(&ModelArg {
        model: a.model.clone(),
        adapter: None,
    })?;
    let base_id = client_name(&a.model, true);
    let mut variants = vec![(base_id.clone(), Arc::new(base.clone()))];
    for (name, dir) in &a.adapters {
        let mut m = base.clone();
        let n = lever_train::load_peft(&mut m.decoder, dir)
            .with_context(|| format!("--adapter {name}={}", dir.display()))?;
        eprintln!(
            "adapter {base_id}:{name}: {} ({n} projections)",
            dir.display()
        );
        variants.push((format!("{base_id}:{name}"), Arc::new(m)));
    }
    let embedder = if a.no_embedder {
        None
    } else {
        let enc = crate::embed::load_encoder(&a.embedder, 32)?;
        Some((client_name(&a.embedder, false), Arc::new(enc)))
    };
    let names: Vec<String> = variants
        .iter()
        .map(|(id, _)| id.clone())
        .chain(embedder.iter().map(|(id, _)| id.clone()))
        .collect();
    let limits = Limits {
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        max_tokens: a.max_tokens_limit,
        default_max_tokens: a.default_max_tokens.min(a.max_tokens_limit),
        max_batch: a.max_batch,
        queue: a.queue,
        header_timeout: Duration::from_secs_f64(a.header_timeout),
        body_timeout: Duration::from_secs_f64(a.body_timeout),
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        prefill_chunk: a.prefill_chunk,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out = rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let local = listener.local_addr().context("local address")?;
        eprintln!(
            "lever serve: listening on http://{local} (models: {}; {})",
            names.join(", "),
            if limits.api_key.is_some() {
                "API key required"
            } else {
                "no API key"
            }
        );
        let stopped = lever_server::serve(
            listener,
            Served { variants, embedder },
            limits,
            lever_server::shutdown_signal(),
        )
        .await
        .context("server")?;
        if stopped.cut > 0 {
            eprintln!(
                "lever serve: {} connection(s) still open at the shutdown deadline were closed",
                stopped.cut
            );
        }
        eprintln!("lever serve: stopped");
        anyhow::Ok(())
    });
    // Tasks still running (an embedding in spawn_blocking) must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// The name clients use for a model: a registry name as given, else the file's stem (a .gguf)
/// or the folder's name.
fn client_name(reference: &str, stem: bool) -> String {
    let p = Path::new(reference);
    if !p.exists() {
        return reference.to_string();
    }
    let part = if stem { p.file_stem() } else { p.file_name() };
    part.map_or_else(
        || reference.to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
