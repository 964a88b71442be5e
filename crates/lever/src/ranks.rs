//! Training as one of several MPI ranks (`mpirun -np N lever pretrain|finetune ...`, the `mpi`
//! feature; lever_train::dist holds the communicator): the ranks check at start that they
//! were given the same settings and hold the same weights, and a failure on one rank stops
//! them all.

use std::sync::Arc;

use anyhow::Result;
use lever_data::ShardSet;
use lever_train::Dist;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// ` (N ranks × batch B)` for a world of several ranks.
pub fn describe(ranks: usize, batch_size: usize) -> String {
    if ranks > 1 {
        format!(" ({ranks} ranks × batch {batch_size})")
    } else {
        String::new()
    }
}

/// `, summed over N ranks` for a world of several ranks.
pub fn summed(ranks: usize) -> String {
    if ranks > 1 {
        format!(", summed over {ranks} ranks")
    } else {
        String::new()
    }
}

/// Every rank must train with the same `settings` (the run's, checked again on resume), the
/// same data (`data_sha256`) and the same schedule of evaluations and checkpoints (`extra`);
/// a rank that differs is named with the setting, before anything is written.
pub fn agree(dist: &Dist, settings: &Value, extra: &[(&str, Value)]) -> Result<()> {
    let mut all = settings.clone();
    if let Some(m) = all.as_object_mut() {
        for (k, v) in extra {
            m.insert(k.to_string(), v.clone());
        }
        m.insert("lever_version".into(), json!(env!("CARGO_PKG_VERSION")));
    }
    dist.agree(
        "settings",
        &all,
        "start every rank with the same command and files",
    )?;
    Ok(())
}

/// The shards' identity: their manifest (which lists every shard and its token count), or
/// for llm.c's and nanoGPT's files, their names and token counts.
pub fn shards_digest(set: &ShardSet) -> String {
    let text = match &set.manifest {
        Some(m) => serde_json::to_string(m).unwrap_or_default(),
        None => set
            .train
            .iter()
            .chain(&set.val)
            .map(|s| {
                let name = s.path.file_name().unwrap_or_default().to_string_lossy();
                format!("{name}:{}\n", s.tokens)
            })
            .collect(),
    };
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// Every rank holds the same weights (after initialization or a resume, and at the end):
/// `digest` computes this rank's.
pub fn agree_weights(
    dist: &Dist,
    step: usize,
    digest: impl FnOnce() -> lever_train::Result<u64>,
) -> Result<()> {
    if dist.size() == 1 {
        return Ok(());
    }
    let digest = format!("{:016x}", digest()?);
    dist.agree(
        &format!("the weights at step {step}"),
        &json!({ "weights_digest": digest }),
        "the ranks' gradients or starting points differ",
    )?;
    Ok(())
}

/// How a rank ends. One process: as any command. Several: a difference every rank found
/// alike (`Error::Disagree`) is printed by rank 0 alone and every rank exits 1; any other
/// failure is one rank's, printed with its rank, and stops the whole world (`MPI_Abort`),
/// since the other ranks may be waiting for it in a collective.
pub fn finish(dist: Arc<Dist>, result: Result<()>) -> Result<()> {
    let Err(e) = result else {
        return Ok(());
    };
    if dist.size() == 1 {
        return Err(e);
    }
    let everyone = matches!(
        e.downcast_ref::<lever_train::Error>(),
        Some(lever_train::Error::Disagree { .. })
    );
    if everyone {
        // Rank 0 prints before the barrier: a rank that exits first makes mpirun stop the
        // others, and rank 0 could be stopped before its line is out.
        if dist.is_root() {
            crate::report(&e);
        }
        dist.barrier();
        drop(dist); // MPI_Finalize, on every rank.
        std::process::exit(1);
    }
    eprintln!("error: rank {}: {}", dist.rank(), crate::one_line(&e));
    dist.abort(1)
}
