//! `lever export` and `lever merge`: write the model, adapters folded in, as a Hugging Face
//! folder or a GGUF file (lever-model `export.rs`).

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::quantized::GgmlDType;
use lever_model::Model;

use crate::cli::{ExportArgs, MergeArgs, ModelArg};

pub fn export(a: ExportArgs) -> Result<()> {
    crate::check_target(&a.out, a.force)?;
    let model = crate::load_model(&a.model)?;
    write(&model, &a.out, a.qtype)
}

pub fn merge(a: MergeArgs) -> Result<()> {
    crate::check_target(&a.out, a.force)?;
    let model = crate::load_model(&ModelArg {
        model: a.model,
        adapter: Some(a.lora),
    })?;
    write(&model, &a.out, a.qtype)
}

fn write(model: &Model, out: &Path, qtype: Option<GgmlDType>) -> Result<()> {
    let gguf = out.extension().is_some_and(|e| e == "gguf");
    if gguf {
        let t = qtype.unwrap_or(GgmlDType::Q8_0);
        lever_model::formats::export::write_gguf(model, out, t)?;
        eprintln!("wrote {} ({t:?})", out.display());
    } else {
        if qtype.is_some() {
            bail!(
                "--type applies to a .gguf output; {} is written as a Hugging Face folder (f32)",
                out.display()
            );
        }
        if out.is_file() {
            bail!(
                "{}: is a file; a Hugging Face export is a folder",
                out.display()
            );
        }
        lever_model::formats::export::write_hf(model, out)?;
        eprintln!("wrote {} (Hugging Face folder, f32)", out.display());
    }
    Ok(())
}
